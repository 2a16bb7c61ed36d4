//! The UDP socket under a QUIC endpoint, with a send buffer a peer that cannot be reached
//! cannot fill.
//!
//! A datagram to an address whose link-layer address is not known yet waits in the kernel's
//! neighbour queue until ARP (or neighbour discovery) answers, and while it waits it counts
//! against the send buffer of the socket that sent it. A peer that is cut off, or that hears
//! nothing, never answers: its queue fills up to `unres_qlen_bytes` (212,992 bytes by default)
//! and stays full until the entry fails, about 3 s after the first probe, and again as soon
//! as the next datagram creates a new one. That is exactly Linux's default send buffer
//! (`wmem_default`), and every Raft message, lease renewal and silence question of a node
//! leaves through its one endpoint socket: with the default buffer, one unreachable peer
//! stops every send to every other peer for seconds (`EAGAIN`, and the socket is not writable
//! again until the queue is dropped), long enough for the node's leases to run out while its
//! healthy peers are a wire away. In a fault campaign a VIP and a singleton moved that way.
//!
//! So the socket asks for [`SEND_BUFFER`], room for the queues of many unreachable peers at
//! once, first past `wmem_max` (`SO_SNDBUFFORCE`, which needs `CAP_NET_ADMIN`, which the
//! daemon has for its addresses), then within it (`SO_SNDBUF`).

use std::io;
use std::net::{SocketAddr, UdpSocket};

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

/// The send buffer asked for. The kernel doubles it and counts queued datagrams against the
/// double: room for the full neighbour queues of 39 unreachable peers at the default
/// `unres_qlen_bytes`.
pub const SEND_BUFFER: usize = 4 << 20;

/// A bound socket and what the kernel granted.
#[derive(Debug)]
pub struct Bound {
    /// Non-blocking, close-on-exec, bound.
    pub socket: UdpSocket,
    /// The send buffer the kernel reports (`SO_SNDBUF`: twice what was asked for, the bytes
    /// queued datagrams may take up).
    pub send_buffer: usize,
}

impl Bound {
    /// Whether the send buffer holds more than two full neighbour queues
    /// (`neighbour_queue`: `unres_qlen_bytes`), so that unreachable peers leave room for the
    /// others.
    pub fn outlasts(&self, neighbour_queue: usize) -> bool {
        self.send_buffer > neighbour_queue.saturating_mul(2)
    }
}

/// Binds a UDP socket at `addr` for a QUIC endpoint with the largest send buffer up to
/// [`SEND_BUFFER`] the kernel allows this process.
pub fn bind(addr: SocketAddr) -> io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if setsockopt(&socket, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        // Without CAP_NET_ADMIN: as much as `wmem_max` lets us have.
        socket.set_send_buffer_size(SEND_BUFFER)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let send_buffer = socket.send_buffer_size()?;
    Ok(Bound {
        socket: socket.into(),
        send_buffer,
    })
}

/// The kernel's limit on the bytes waiting for one unresolved neighbour
/// (`unres_qlen_bytes`): the largest over every interface's IPv4 and IPv6 neighbour settings
/// (outside the host's first network namespace there is no `default` entry), if any can be
/// read.
pub fn neighbour_queue_limit() -> Option<usize> {
    ["/proc/sys/net/ipv4/neigh", "/proc/sys/net/ipv6/neigh"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| {
            std::fs::read_to_string(entry.ok()?.path().join("unres_qlen_bytes"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .max()
}

/// A QUIC endpoint on a socket from [`bind`] (a server when `server` is given), on the
/// current tokio runtime. A send buffer that one unreachable peer could fill is logged as a
/// warning naming the setting to raise.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let bound = bind(addr)?;
    if let Some(queue) = neighbour_queue_limit()
        && !bound.outlasts(queue)
    {
        tracing::warn!(
            %addr,
            send_buffer = bound.send_buffer,
            neighbour_queue = queue,
            "the QUIC socket's send buffer holds no more than two unreachable peers' queued datagrams: \
             while a peer does not answer ARP, sends to every peer can stop for seconds; \
             run with CAP_NET_ADMIN or raise net.core.wmem_max to {SEND_BUFFER}"
        );
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime to run the QUIC endpoint on"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        bound.socket,
        runtime,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_bound_non_blocking_with_a_larger_send_buffer_than_the_default()
    -> io::Result<()> {
        let bound = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        assert_ne!(bound.socket.local_addr()?.port(), 0);
        let default = Socket::new(Domain::IPV4, Type::DGRAM, None)?.send_buffer_size()?;
        assert!(
            bound.send_buffer > default,
            "send buffer {} not above the default {default}",
            bound.send_buffer
        );
        // Non-blocking: a read with nothing queued does not wait.
        let mut buf = [0u8; 8];
        let read = bound.socket.recv(&mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{read:?}"
        );
        Ok(())
    }

    #[test]
    fn one_full_neighbour_queue_must_leave_room() -> io::Result<()> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let mut bound = Bound {
            socket,
            send_buffer: 212_992,
        };
        assert!(!bound.outlasts(212_992));
        bound.send_buffer = 425_984;
        assert!(!bound.outlasts(212_992));
        bound.send_buffer = 2 * SEND_BUFFER;
        assert!(bound.outlasts(212_992));
        Ok(())
    }
}
