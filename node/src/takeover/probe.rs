//! The blocking half of a conflict probe and raw-socket helpers: send a frame, close a packet
//! socket off the caller's thread, and watch incoming frames for a claim on the address.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pnet::datalink::DataLinkSender;
use tracing::debug;

use super::addr::{TakeoverError, VipAddr};
use super::frames::{arp_claimant, na_claimant};

/// A raw AF_PACKET channel: its sender and receiver.
pub(super) type RawChannel = (
    Box<dyn DataLinkSender>,
    Box<dyn pnet::datalink::DataLinkReceiver>,
);

/// Sends one frame, turning pnet's "buffer too small" None into an error.
pub(super) fn send_frame(tx: &mut dyn DataLinkSender, frame: &[u8]) -> io::Result<()> {
    match tx.send_to(frame, None) {
        Some(result) => result,
        None => Err(io::Error::other("frame larger than the send buffer")),
    }
}

/// Closes an AF_PACKET socket off the caller's thread: the kernel waits for an RCU grace period
/// (about 8 ms measured on veth) when a packet socket is released, which would otherwise delay
/// every announcement and probe result.
pub(super) fn close_in_background(channel: RawChannel) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || drop(channel));
        }
        Err(_) => {
            // If no thread can be started the closure (and with it the socket) is dropped right here.
            let _ = std::thread::Builder::new()
                .name("spaced-rawclose".into())
                .spawn(move || drop(channel));
        }
    }
}

/// Sets the shared cancel flag when the probe future is dropped, so the blocking loop stops early.
pub(super) struct CancelOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Everything the blocking half of a probe needs, moved onto the blocking pool.
pub(super) struct ProbeJob {
    /// The address probed for.
    pub(super) vip: VipAddr,
    /// Our MAC: frames from it (our own probes, seen on the way out) are ignored.
    pub(super) own_mac: [u8; 6],
    /// The probe frame, sent `count` times.
    pub(super) frame: Vec<u8>,
    /// How many probes to send.
    pub(super) count: u32,
    /// Spacing between probes.
    pub(super) interval: Duration,
    /// When `probe` was called: probes go out at `start + i * interval`.
    pub(super) start: Instant,
    /// When to stop listening; at most `count * interval + wait` minus one receive tick after `start`.
    pub(super) deadline: Instant,
    /// Set when the caller gave up on the probe.
    pub(super) cancel: Arc<AtomicBool>,
}

impl ProbeJob {
    /// Sends the probes on schedule and watches incoming frames for a claim on the address.
    pub(super) fn run(self, channel: &mut RawChannel) -> Result<Option<[u8; 6]>, TakeoverError> {
        let (tx, rx) = channel;
        let (start, deadline) = (self.start, self.deadline);
        let mut sent = 0u32;
        let raw_error = |what: &str, e: io::Error| TakeoverError::Raw {
            interface: self.vip.interface.clone(),
            detail: format!("{what} while probing for {}: {e}", self.vip.address),
        };
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let now = Instant::now();
            if sent < self.count && now >= start + self.interval.saturating_mul(sent) {
                if now < deadline || sent == 0 {
                    send_frame(tx.as_mut(), &self.frame)
                        .map_err(|e| raw_error("sending probe", e))?;
                    debug!(vip = %self.vip.address, interface = %self.vip.interface, probe = sent + 1, "probe sent");
                }
                sent += 1;
                continue;
            }
            if now >= deadline {
                return Ok(None);
            }
            match rx.next() {
                Ok(frame) => {
                    let claimant = match self.vip.address {
                        IpAddr::V4(ip) => arp_claimant(frame, ip, self.own_mac),
                        IpAddr::V6(ip) => na_claimant(frame, ip, self.own_mac),
                    };
                    if claimant.is_some() {
                        return Ok(claimant);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(raw_error("receiving", e)),
            }
        }
    }
}
