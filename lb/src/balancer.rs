//! One balancer: a listener's accept loop, per-connection backend choice, connect and relay, health checks, drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, SockaddrStorage, bind, listen, recv,
    setsockopt, socket, sockopt,
};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};

use crate::backend::{Backend, BackendSpec, Backends, HealthCounter, Policy};
use crate::peek::{Peeked, session_route};
use crate::relay::{PipePool, RelayError, relay_counted};
use crate::stats::{LbStats, Rendered};

/// Active TCP health checks of the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between two probes of one backend.
    pub interval: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// A probe's connect must finish within this.
    pub timeout: Duration,
    /// Passive health (HAProxy's `observe layer4` with `error-limit` and `on-error
    /// mark-down`): this many connects in a row that fail on live traffic (refused, reset or
    /// timed out) take a backend down at once, until `rise` probes bring it up again; 0 = off.
    pub error_limit: u32,
}

/// The default [`HealthConfig::error_limit`]: the first connect that fails on live traffic
/// takes a backend down.
pub const DEFAULT_ERROR_LIMIT: u32 = 1;

impl HealthConfig {
    /// Checks every `interval` with the given rise/fall; a probe may take the interval, at most 2 s.
    pub fn every(interval: Duration, rise: u32, fall: u32) -> Self {
        HealthConfig {
            interval,
            rise,
            fall,
            timeout: interval.min(Duration::from_secs(2)),
            error_limit: DEFAULT_ERROR_LIMIT,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig::every(Duration::from_secs(1), 2, 3)
    }
}

/// Open files one relayed connection holds: its two sockets and the two ends
/// of each direction's pipe.
pub const FDS_PER_CONN: u64 = 6;

/// How many relayed connections fit in an open-files `limit` of which
/// `reserved` are kept for other uses. A balancer whose `max_conns` is above
/// this would fail connections after accepting them (no pipe, no backend
/// socket) instead of refusing the excess at accept.
pub fn conns_within_fd_limit(limit: u64, reserved: u64) -> u64 {
    limit.saturating_sub(reserved) / FDS_PER_CONN
}

/// How one balancer behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbConfig {
    /// Backend choice.
    pub policy: Policy,
    /// Connections open at once; the excess is closed at accept and counted.
    pub max_conns: u64,
    /// A backend connect taking longer fails over to another backend.
    pub connect_timeout: Duration,
    /// Backends tried per connection after the first fails to connect.
    pub retries: u32,
    /// A connection with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Most bytes peeked for a session route ([`Policy::Sticky`] only).
    pub peek_bytes: usize,
    /// Longest wait for the first request before falling back to round-robin.
    pub peek_timeout: Duration,
    /// Send a PROXY protocol v2 header to backends.
    pub proxy_protocol: bool,
    /// Requested capacity of each relay pipe (F_SETPIPE_SZ).
    pub pipe_size: usize,
    /// Health checks; `None` trusts every backend.
    pub health: Option<HealthConfig>,
    /// After the balancer stops accepting, open connections get this long to finish.
    pub drain_grace: Duration,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            policy: Policy::RoundRobin,
            max_conns: 20_000,
            connect_timeout: Duration::from_secs(3),
            retries: 2,
            idle_timeout: Duration::from_secs(300),
            peek_bytes: crate::peek::DEFAULT_PEEK_BYTES,
            peek_timeout: Duration::from_secs(1),
            proxy_protocol: false,
            pipe_size: 1 << 20,
            health: Some(HealthConfig::default()),
            drain_grace: Duration::from_secs(10),
        }
    }
}

impl LbConfig {
    /// Lowers `max_conns` to `fit` if it is above, with a warning naming `setting` (the flag or
    /// config key) and `why`; the excess is then refused at accept. Whether it lowered it.
    pub fn cap_max_conns(&mut self, fit: u64, setting: &str, why: &str) -> bool {
        if fit >= self.max_conns {
            return false;
        }
        tracing::warn!(
            max_conns = fit,
            asked = self.max_conns,
            "{setting} lowered to {why} ({FDS_PER_CONN} open files per connection); the excess is refused at accept"
        );
        self.max_conns = fit;
        true
    }
}

/// Creates a listening TCP socket on `addr`. With `freebind` the address
/// need not be on this host yet (`IP_FREEBIND`): a VIP's listener is bound
/// before takeover adds the address, so gaining the VIP needs no rebind.
pub fn bind_listener(addr: SocketAddr, freebind: bool, backlog: i32) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std_listener(addr, freebind, backlog, false)?)
}

/// `count` listening sockets on one `addr` (see [`bind_listener`]), one per accept loop. With
/// more than one they share the port through `SO_REUSEPORT`: the kernel spreads new
/// connections over them, so each loop (each on a thread or core of its own) accepts its share
/// without a shared queue, as HAProxy's `nbthread` listeners do. Made before any runtime
/// exists, so they are std sockets (non-blocking); each runtime converts its own. With port 0
/// they all share the port the kernel gives the first. All or none: if one fails, those
/// already bound are closed.
///
/// `SO_REUSEPORT` would also let another process of the same user share the port (a second
/// `spaced lb` on it, which would silently take half of the connections). So with more than
/// one listener the port is first bound once without it: that fails with "address in use"
/// while anything listens there, as a single listener's bind does.
pub fn bind_listeners(
    addr: SocketAddr,
    freebind: bool,
    backlog: i32,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let count = count.max(1);
    if count > 1 && addr.port() != 0 {
        drop(bind_std_socket(addr, freebind, false)?);
    }
    let first = bind_std_listener(addr, freebind, backlog, count > 1)?;
    // Port 0: the others take the port the kernel gave the first.
    let addr = SocketAddr::new(addr.ip(), first.local_addr()?.port());
    let mut all = vec![first];
    for _ in 1..count {
        all.push(bind_std_listener(addr, freebind, backlog, true)?);
    }
    Ok(all)
}

fn bind_std_listener(
    addr: SocketAddr,
    freebind: bool,
    backlog: i32,
    reuseport: bool,
) -> io::Result<std::net::TcpListener> {
    let fd = bind_std_socket(addr, freebind, reuseport)?;
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("listener {addr}: listen: {e}"),
        )
    })?;
    Ok(std::net::TcpListener::from(fd))
}

/// A TCP socket bound to `addr` (`SO_REUSEADDR`, and `SO_REUSEPORT` if asked), not listening.
fn bind_std_socket(
    addr: SocketAddr,
    freebind: bool,
    reuseport: bool,
) -> io::Result<std::os::fd::OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let context = |what: &str, e: nix::Error| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("listener {addr}: {what}: {e}"),
        )
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| context("socket", e))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| context("SO_REUSEADDR", e))?;
    if reuseport {
        setsockopt(&fd, sockopt::ReusePort, &true).map_err(|e| context("SO_REUSEPORT", e))?;
    }
    if freebind {
        setsockopt(&fd, sockopt::IpFreebind, &true).map_err(|e| context("IP_FREEBIND", e))?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| context("bind", e))?;
    Ok(fd)
}

/// Opens a connection to a backend: non-blocking, with `TCP_NODELAY` set before the connect
/// (the relay forwards what arrives as it arrives). With `hold_ack` (the caller has bytes to
/// send as soon as it is connected) `TCP_QUICKACK` is off first, so Linux holds back the
/// handshake's last ACK and those bytes carry it: one packet fewer per connection, as with a
/// client that keeps `TCP_DEFER_ACCEPT` on its socket. Without bytes to send the ACK must go
/// at once: a server-first backend would otherwise see its connection only when the
/// delayed-ACK timer fires (200 ms).
///
/// Success is read from the readiness epoll reports (`EPOLLOUT` alone): only a socket that
/// also reports a hang-up or an error is asked for its error (`SO_ERROR`), which saves that
/// system call on every connection that succeeds.
async fn connect_backend(addr: SocketAddr, hold_ack: bool) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    if hold_ack {
        // Best effort: without it the handshake ends with an ACK of its own.
        let _ = socket.set_tcp_quickack(false);
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

/// Reads what the client has sent already (an HTTP request usually arrives with the
/// handshake) into `consumed`, before the backend is connected, so that it leaves with the
/// backend handshake's last ACK. This is the read the relay would make first; a short read
/// emptied the socket and clears tokio's read readiness, as the relay's own reads do. Nothing
/// queued, or a failure, leaves it to the relay.
fn read_early(client: &TcpStream, consumed: &mut Vec<u8>) {
    let mut buf = [0u8; EARLY_READ];
    if let Ok(n) = crate::relay::recv_clearing(client, &mut buf) {
        consumed.extend_from_slice(&buf[..n]);
    }
}

/// The most [`read_early`] takes; a longer first message is relayed from there on.
const EARLY_READ: usize = 4096;

/// One listener's balancer: its configuration, backends, counters and pipes.
#[derive(Debug)]
pub struct Balancer {
    /// Label in logs and metrics (the listen address).
    label: String,
    /// Behaviour: read once per connection, replaced whole by [`Balancer::reconfigure`].
    config: RwLock<Arc<LbConfig>>,
    /// Current backends and their health.
    backends: Backends,
    /// Counters.
    stats: LbStats,
    /// Relay pipes, reused across connections.
    pool: PipePool,
    /// How many `serve` loops are accepting right now (one per listener; metrics and status
    /// show whether any is). A draining `serve` watches it to spare its connections while the
    /// balancer serves again (the VIP came back within the grace), and starts its grace when
    /// the last loop stops. Subscribers are told only when it changes between 0 and more.
    accepting: watch::Sender<usize>,
}

impl Balancer {
    /// A balancer with no backends yet.
    pub fn new(label: impl Into<String>, config: LbConfig) -> Arc<Self> {
        let pool = PipePool::new(1024, config.pipe_size);
        Arc::new(Balancer {
            label: label.into(),
            config: RwLock::new(Arc::new(config)),
            backends: Backends::new(),
            stats: LbStats::default(),
            pool,
            accepting: watch::Sender::new(0),
        })
    }

    /// Its label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its configuration now.
    pub fn config(&self) -> Arc<LbConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces its configuration while it runs (a reload): connections accepted from now on
    /// follow `config`; open ones keep relaying and keep the settings they started with (the
    /// backend they chose, their idle timeout). A changed health check restarts the checks of
    /// every backend with the new settings (each keeps its up or down state); `pipe_size` applies
    /// to pipes made from now on (pooled pipes keep theirs). Needs a tokio runtime when the
    /// health check changes.
    pub fn reconfigure(self: &Arc<Self>, config: LbConfig) {
        let health = config.health;
        let old = std::mem::replace(
            &mut *self
                .config
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Arc::new(config),
        );
        if old.health != health {
            match health {
                Some(h) => {
                    for backend in self.backends.snapshot().iter().cloned() {
                        tokio::spawn(check_backend(Arc::downgrade(self), backend, h));
                    }
                }
                None => {
                    // Without checks every backend is trusted; retire the running checkers.
                    for backend in self.backends.snapshot().iter() {
                        backend.start_checker();
                        self.backends.set_up(backend, true);
                    }
                }
            }
        }
        tracing::info!(lb = %self.label, "balancer settings replaced; open connections kept");
    }

    /// Its backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Its counters.
    pub fn stats(&self) -> &LbStats {
        &self.stats
    }

    /// Whether it is accepting connections now.
    pub fn is_accepting(&self) -> bool {
        *self.accepting.borrow() > 0
    }

    /// One more (`true`) or one fewer accepting loop; subscribers hear of it only when the
    /// balancer as a whole starts or stops accepting.
    fn count_serving(&self, starts: bool) {
        self.accepting.send_if_modified(|n| {
            let was = *n > 0;
            *n = if starts { *n + 1 } else { n.saturating_sub(1) };
            was != (*n > 0)
        });
    }

    /// The figures to render for `/metrics`.
    pub fn rendered(&self) -> Rendered<'_> {
        Rendered {
            listener: &self.label,
            stats: &self.stats,
            backends: &self.backends,
            accepting: self.is_accepting(),
        }
    }

    /// Replaces the backend set without touching open connections, and
    /// starts health checks on new backends (needs a tokio runtime).
    pub fn set_backends(self: &Arc<Self>, specs: &[BackendSpec]) {
        let added = self.backends.update(specs);
        for backend in &added {
            tracing::info!(lb = %self.label, backend = %backend.name(), addr = %backend.spec.addr, "backend added");
        }
        if let Some(health) = self.config().health {
            for backend in added {
                tokio::spawn(check_backend(Arc::downgrade(self), backend, health));
            }
        }
    }

    /// Accepts and relays connections until `stop` completes, then drains:
    /// the listener is closed at once (no new connections) and open
    /// connections get `drain_grace` to finish before they are cut. Several
    /// `serve` loops may run at once on listeners sharing a port
    /// ([`bind_listeners`]), each on a runtime or thread of its own; they share
    /// the backends, counters and settings.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, stop: impl Future<Output = ()>) {
        // Latency over batching: the relay forwards what arrives as it arrives. Accepted sockets
        // inherit TCP_NODELAY from the listener, which saves a system call per connection.
        let client_nodelay = setsockopt(&listener, sockopt::TcpNoDelay, &true).is_ok();
        let mut conns = JoinSet::new();
        self.count_serving(true);
        tracing::info!(lb = %self.label, policy = %self.config().policy, "balancer accepting");
        tokio::pin!(stop);
        // Registering a timer that expires before every other one wakes
        // tokio's driver through its eventfd: a write and an extra epoll
        // round for each connection's connect timeout. A tick due sooner
        // than any connect timeout keeps the driver's next wake-up close, so
        // those registrations need no wake-up.
        // (Set from the connect timeout at start; a reload that shortens it costs an eventfd
        // write per connection until the next start, nothing more.)
        let mut keep_timer_near = tokio::time::interval(
            (self.config().connect_timeout / 2).max(Duration::from_millis(10)),
        );
        keep_timer_near.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = keep_timer_near.tick() => {}
                accepted = listener.accept() => match accepted {
                    Ok((client, peer)) => {
                        let config = self.config();
                        if self.stats.active.load(Ordering::Relaxed) >= config.max_conns {
                            self.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
                            drop(client);
                            continue;
                        }
                        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                        let open = OpenConn::new(self.clone());
                        conns.spawn(async move {
                            open.0.handle(&config, client, peer, client_nodelay).await;
                            drop(open);
                        });
                    }
                    Err(error) => {
                        // EMFILE/ENFILE and the like: back off instead of spinning.
                        tracing::warn!(lb = %self.label, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        self.count_serving(false);
        drop(listener);
        self.drain(conns).await;
    }

    /// Lets `conns` finish: each gets `drain_grace` from the moment the
    /// balancer stopped accepting, then the rest are cut. If the balancer
    /// accepts again meanwhile (another `serve`: the VIP came back), their
    /// addresses are valid again and they are kept with no deadline until it
    /// stops again, when a new grace starts.
    async fn drain(&self, mut conns: JoinSet<()>) {
        let mut accepting = self.accepting.subscribe();
        let grace = || self.config().drain_grace;
        let mut deadline = Instant::now() + grace();
        // Cannot close while `self` holds the sender; if it did, drain as if not serving.
        let mut watching = true;
        tracing::info!(lb = %self.label, open = conns.len(), grace = ?grace(), "balancer draining");
        while !conns.is_empty() {
            let serving_again = watching && *accepting.borrow_and_update() > 0;
            tokio::select! {
                _ = conns.join_next() => {}
                changed = accepting.changed(), if watching => {
                    watching = changed.is_ok();
                    if serving_again {
                        // Stopped once more: a new grace from now.
                        deadline = Instant::now() + grace();
                    } else if watching {
                        tracing::info!(lb = %self.label, open = conns.len(), "accepting again; drained connections are kept");
                    }
                }
                () = tokio::time::sleep_until(deadline), if !serving_again => {
                    let cut = conns.len();
                    self.stats.drain_cut.fetch_add(cut as u64, Ordering::Relaxed);
                    // Aborted tasks drop their sockets (closing them) and their `OpenConn`.
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    tracing::info!(lb = %self.label, cut, "drain grace over; remaining connections closed");
                    return;
                }
            }
        }
    }

    /// One client connection: choose, connect (with redispatch), relay, with the settings
    /// `config` in force when it was accepted. `client_nodelay`: the client socket has
    /// TCP_NODELAY already (inherited from the listener).
    async fn handle(
        &self,
        config: &LbConfig,
        client: TcpStream,
        peer: SocketAddr,
        client_nodelay: bool,
    ) {
        // Client bytes already read (by a peek that timed out, or `read_early`); they go to
        // the backend first.
        let mut consumed = Vec::new();
        let route = match config.policy {
            Policy::Sticky => self.peek_route(config, &client, &mut consumed).await,
            _ => None,
        };
        read_early(&client, &mut consumed);
        // Bytes to send the moment the backend answers: its handshake's last ACK can wait
        // for them (see `connect_backend`).
        let hold_ack = config.proxy_protocol || !consumed.is_empty();
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let (backend, upstream, claim) = loop {
            let Some(backend) =
                self.backends
                    .choose(config.policy, route.as_deref(), peer.ip(), &tried)
            else {
                self.stats.no_backend.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(lb = %self.label, %peer, tried = tried.len(), "no backend available; closing");
                return;
            };
            // Counted from now (not once connected), so leastconn spreads a burst.
            let claim = backend.claim();
            match timeout(
                config.connect_timeout,
                connect_backend(backend.spec.addr, hold_ack),
            )
            .await
            {
                Ok(Ok(stream)) => {
                    backend.count_connected();
                    break (backend, stream, claim);
                }
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", config.connect_timeout),
                    };
                    tracing::debug!(lb = %self.label, backend = %backend.name(), %error, "backend connect failed");
                    let streak = backend.count_connect_error();
                    if let Some(h) = &config.health
                        && h.error_limit > 0
                        && streak >= h.error_limit
                        && backend.is_up()
                    {
                        // Taken down before its next probe; the checker sees the change and
                        // wants `rise` good probes before it is up again.
                        self.backends.set_up(&backend, false);
                        tracing::warn!(lb = %self.label, backend = %backend.name(), addr = %backend.spec.addr, failed = streak, %error, "backend down: connects failed on live traffic");
                    }
                    self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    tried.push(backend);
                    if tried.len() > config.retries as usize {
                        self.stats.no_backend.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        };
        if route.as_deref() == Some(backend.name()) {
            self.stats.sticky_routed.fetch_add(1, Ordering::Relaxed);
        }
        claim.connected();
        if !client_nodelay {
            let _ = client.set_nodelay(true);
        }
        let mut upstream = upstream;
        let mut first = Vec::new();
        if config.proxy_protocol {
            let local = client.local_addr().unwrap_or(peer);
            first = crate::proxy_v2::encode(peer, local);
        }
        first.extend_from_slice(&consumed);
        if !first.is_empty() {
            if let Err(error) = upstream.write_all(&first).await {
                tracing::debug!(lb = %self.label, backend = %backend.name(), %error, "writing the first bytes (PROXY header, request read before the connect) failed");
                self.stats.relay_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.stats
                .copied
                .client_to_backend
                .fetch_add(first.len() as u64, Ordering::Relaxed);
        }
        match relay_counted(
            client,
            upstream,
            &self.pool,
            config.idle_timeout,
            &self.stats.spliced,
            &self.stats.copied,
        )
        .await
        {
            Ok(_) => {}
            Err(RelayError::Idle { .. }) => {
                self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::debug!(lb = %self.label, backend = %backend.name(), %error, "relay ended with an error");
                if error.is_peer_gone() {
                    self.stats.relay_resets.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.relay_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Peeks (without consuming) at the client's first bytes, bounded by
    /// `peek_bytes` and `peek_timeout`, for a session route.
    ///
    /// Waiting for more bytes means clearing the client's read readiness
    /// with bytes still queued (they were only peeked at). If the peek then
    /// times out, no new edge may ever come for those bytes (the client may
    /// be waiting for an answer), and the relay, which trusts readiness,
    /// would never read them; so in that case they are consumed here into
    /// `consumed`, which the caller must send to the backend first.
    async fn peek_route(
        &self,
        config: &LbConfig,
        client: &TcpStream,
        consumed: &mut Vec<u8>,
    ) -> Option<String> {
        let deadline = Instant::now() + config.peek_timeout;
        let mut buf = vec![0u8; config.peek_bytes.max(1)];
        let mut seen = 0usize;
        let fd = client.as_fd();
        // Readiness was cleared with `seen` bytes queued and no edge since.
        let mut cleared_with_bytes = false;
        loop {
            let ready = match timeout_at(deadline, client.ready(Interest::READABLE)).await {
                Ok(Ok(ready)) => ready,
                Ok(Err(_)) => return None,
                Err(_) => {
                    self.stats.peek_timeouts.fetch_add(1, Ordering::Relaxed);
                    if cleared_with_bytes {
                        take_queued(fd, &mut buf[..seen], consumed);
                    }
                    return None;
                }
            };
            cleared_with_bytes = false;
            // Only new bytes count as progress; "no new bytes" clears the
            // readiness so we sleep until more arrive instead of spinning.
            let peeked = client.try_io(Interest::READABLE, || {
                let n = recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)?;
                if n == seen && n != 0 {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match peeked {
                Ok(0) => return None,
                Ok(n) => seen = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ready.is_read_closed() {
                        // The client half-closed: no more bytes will come (a
                        // closed readiness is never cleared, so the relay reads on).
                        return None;
                    }
                    cleared_with_bytes = seen > 0;
                    continue;
                }
                Err(_) => return None,
            }
            match session_route(&buf[..seen]) {
                Peeked::Route(route) => return Some(route),
                Peeked::NoRoute => return None,
                Peeked::Incomplete if seen >= buf.len() => return None,
                Peeked::Incomplete => {}
            }
        }
    }
}

/// Consumes the bytes a peek saw (at most `buf.len()`) into `consumed`. A
/// failure leaves them queued; the relay then meets the socket's error itself.
fn take_queued(fd: BorrowedFd<'_>, buf: &mut [u8], consumed: &mut Vec<u8>) {
    if let Ok(n) = crate::relay::recv_io(fd, buf) {
        consumed.extend_from_slice(&buf[..n]);
    }
}

/// Counts one open client connection for as long as its task lives, also
/// when the task is aborted at the end of a drain.
struct OpenConn(Arc<Balancer>);

impl OpenConn {
    fn new(balancer: Arc<Balancer>) -> Self {
        balancer.stats.active.fetch_add(1, Ordering::Relaxed);
        OpenConn(balancer)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Probes one backend until it is retired, a newer checker took over, or its balancer is gone.
async fn check_backend(balancer: Weak<Balancer>, backend: Arc<Backend>, health: HealthConfig) {
    let me = backend.start_checker();
    let mut counter = HealthCounter::new(backend.is_up());
    // A zero interval (only reachable through the library API) would panic `interval`.
    let mut tick = tokio::time::interval(health.interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !backend.checker_current(me) {
            return;
        }
        let ok = matches!(
            timeout(health.timeout, TcpStream::connect(backend.spec.addr)).await,
            Ok(Ok(_))
        );
        let Some(balancer) = balancer.upgrade() else {
            return;
        };
        // Live traffic may have taken it down meanwhile (passive health): count from there.
        if counter.up != backend.is_up() {
            counter = HealthCounter::new(backend.is_up());
        }
        if let Some(up) = counter.observe(ok, health.rise, health.fall) {
            balancer.backends.set_up(&backend, up);
            if up {
                tracing::info!(lb = %balancer.label, backend = %backend.name(), addr = %backend.spec.addr, "backend up");
            } else {
                tracing::warn!(lb = %balancer.label, backend = %backend.name(), addr = %backend.spec.addr, "backend down");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve` relies on accepted sockets inheriting TCP_NODELAY from the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        for nodelay in [true, false] {
            let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false, 16).unwrap();
            setsockopt(&listener, sockopt::TcpNoDelay, &nodelay).unwrap();
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert_eq!(accepted.nodelay().unwrap(), nodelay);
        }
    }
}
