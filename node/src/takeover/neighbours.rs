//! Asking the host to resolve a silent peer's link-layer address again, now.
//!
//! When a host loses its link (a pulled cable, a switch port down) Linux drops its neighbour
//! entries; when a peer stops answering ARP, its entry ends unresolved. The next datagram to the
//! peer makes an entry in state `INCOMPLETE`, which broadcasts an ARP request at once, and then
//! again only every `retrans_time_ms` (a second by default), holding the datagrams meanwhile.
//! So after a heal a host could wait up to a second before anything it sent to a peer left it:
//! in a kept lab run two nodes of a healed cluster heard nothing from each other for 600 ms,
//! and two hosts on a bridge, cut and healed, waited 317–762 ms for their first ping.
//!
//! The Raft dialer calls [`NeighbourProbe::reprobe`] before an attempt that follows an
//! unanswered one (`QuicNetwork::with_path_probe`): an `INCOMPLETE` entry for the peer's
//! address is deleted, so the attempt's first datagram makes a new one, and with it a fresh ARP
//! (or IPv6 neighbour) request. A host that answers it is reached within one attempt of the
//! heal. Entries in any other state are left alone: a resolved one (`REACHABLE`, `STALE`,
//! `PROBE`...) still sends, and a `FAILED` one asks again at the next datagram on its own. Only
//! the peer's own address is looked at: a peer behind a router waits for the router's entry
//! as before.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use spaced_raft::network::PathProbe;

use super::netlink::netlink_errno;

/// A netlink connection for re-resolving peers' addresses.
pub struct NeighbourProbe {
    /// rtnetlink request handle, bound to the namespace `new` ran in.
    handle: rtnetlink::Handle,
    /// The task driving the netlink socket; aborted on drop.
    connection: tokio::task::JoinHandle<()>,
    /// Whether the kernel refused a deletion for want of privilege (said once, then quiet).
    refused: AtomicBool,
}

impl Drop for NeighbourProbe {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The destination of a neighbour entry.
fn destination(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    })
}

/// Whether `msg` is an entry for `ip` that is still waiting for its first answer.
pub fn unresolved_entry_for(msg: &NeighbourMessage, ip: IpAddr) -> bool {
    msg.header.state == NeighbourState::Incomplete && destination(msg) == Some(ip)
}

impl NeighbourProbe {
    /// Opens a netlink connection in the calling thread's network namespace (inside a tokio
    /// runtime, which drives it).
    pub fn new() -> std::io::Result<Self> {
        let (connection, handle, _messages) = rtnetlink::new_connection()?;
        Ok(NeighbourProbe {
            handle,
            connection: tokio::spawn(connection),
            refused: AtomicBool::new(false),
        })
    }

    /// Deletes the host's unresolved (`INCOMPLETE`) neighbour entries for `ip`, so the next
    /// datagram to it asks for its link-layer address at once; how many it deleted.
    pub async fn reprobe(&self, ip: IpAddr) -> Result<usize, rtnetlink::Error> {
        let mut found = Vec::new();
        let family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(msg) = dump.try_next().await? {
            if unresolved_entry_for(&msg, ip) {
                found.push(msg);
            }
        }
        let mut deleted = 0;
        for msg in found {
            match self.handle.neighbours().del(msg).execute().await {
                Ok(()) => deleted += 1,
                // Resolved or dropped meanwhile.
                Err(e) if netlink_errno(&e) == Some(Errno::ENOENT as i32) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// [`Self::reprobe`] for a dial to `peer`: failures are logged, not returned (the dial
    /// goes on either way), and a refusal for want of privilege only once.
    pub async fn reprobe_for_dial(&self, peer: SocketAddr) {
        match self.reprobe(peer.ip()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                %peer,
                entries = n,
                "the peer's address was unresolved: asking for it again now"
            ),
            Err(e) if netlink_errno(&e) == Some(Errno::EPERM as i32) => {
                if !self.refused.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        error = %e,
                        "cannot re-resolve silent peers' addresses (needs CAP_NET_ADMIN): after \
                         a partition heals, a peer may be reached up to a second later"
                    );
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "re-resolving the peer's address failed"),
        }
    }

    /// This probe as the Raft dialer's path probe (`QuicNetwork::with_path_probe`).
    pub fn into_path_probe(self) -> PathProbe {
        let probe = Arc::new(self);
        Arc::new(move |peer| {
            let probe = probe.clone();
            Box::pin(async move { probe.reprobe_for_dial(peer).await })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn entry(state: NeighbourState, ip: IpAddr) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.state = state;
        msg.attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        msg
    }

    #[test]
    fn only_the_peers_unresolved_entries_are_taken() {
        let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
        assert!(unresolved_entry_for(
            &entry(NeighbourState::Incomplete, peer),
            peer
        ));
        assert!(unresolved_entry_for(
            &entry(NeighbourState::Incomplete, v6),
            v6
        ));
        assert!(!unresolved_entry_for(
            &entry(NeighbourState::Incomplete, other),
            peer
        ));
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Failed,
            NeighbourState::Permanent,
            NeighbourState::Noarp,
        ] {
            assert!(
                !unresolved_entry_for(&entry(state, peer), peer),
                "{state:?} taken"
            );
        }
        let mut no_destination = entry(NeighbourState::Incomplete, peer);
        no_destination.attributes.clear();
        assert!(!unresolved_entry_for(&no_destination, peer));
    }
}
