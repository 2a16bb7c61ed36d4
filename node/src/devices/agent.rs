//! The device agent (DESIGN §8): holds the management connection of every device this node owns
//! in the fabric, and reports each device's state to the leader.
//!
//! - *space-initiated*: the agent connects to the device's address (`host`, `host:port`, port 22
//!   when none is given) and keeps the connection open, TCP keepalive probing it every
//!   `keepalive_interval_s`. A read that ends (EOF, reset, keepalive timeout) means the
//!   connection is gone: it reconnects with backoff. The device is reported `up` on connecting and
//!   `down` once it has been unreachable for `down_after_s`.
//! - *device-initiated*: the device connects to any node's device port (`[devices] listen`,
//!   7804 by default) and names itself with one line, `<device id>\n`. The accepting node claims
//!   the device (an `AssignDevices` to itself, compare-and-set on the owner it saw, proposed
//!   through the leader), answers `OK <node name>\n` and holds the connection; on a refusal it
//!   answers `ERR <reason>\n` and closes. A node that loses a device (to a claim elsewhere, a
//!   reassignment or a rebalance) closes its connection at once.
//!
//! Reports are batched (every `REPORT_EVERY`, [`REPORT_BATCH`] per command) and sent through
//! the leader. One tokio task per held device keeps the cost at a few kilobytes per connection.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use spaced_fabric::{
    Command, CommandError, DeviceAssignment, DeviceMode, DeviceReport, DeviceStatus,
    check_device_id,
};
use spaced_raft::{NodeId, Outcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::devices::gate::{HeldElsewhere, HelloGate, device_held_elsewhere};
use crate::lock;
use crate::now_millis;
use crate::ops::config::DevicesSection;

/// SSH, where a space-initiated device is reached when its address names no port.
pub const DEFAULT_DEVICE_PORT: u16 = 22;
/// How often the agent compares the connections it holds with the fabric (when it changed).
const RECONCILE_EVERY: Duration = Duration::from_millis(50);
/// How often pending status reports go to the leader.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// Reports per `ReportDeviceStatus` command: small log entries keep Raft responsive.
pub const REPORT_BATCH: usize = 1_000;
/// Connect attempts in flight at once. After a failover thousands of devices arrive together;
/// unbounded, their SYNs would overflow accept queues and cost a full SYN retransmit (1 s).
const CONNECTING_AT_ONCE: usize = 256;
/// First pause before a reconnect; it doubles up to the keepalive interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// A device-initiated connection must name its device this fast.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest hello: a device id (at most 128 characters), `\r` and `\n`.
const MAX_HELLO: usize = 130;
/// Unanswered TCP keepalive probes before the kernel drops a connection.
const KEEPALIVE_PROBES: u32 = 3;
/// Linux's largest `TCP_KEEPIDLE` / `TCP_KEEPINTVL`.
const MAX_KEEPALIVE_S: u64 = 32_767;
/// How long a claim waits for this node to apply its own committed assignment.
const CLAIM_APPLY_WAIT: Duration = Duration::from_secs(3);
/// Claims retried after losing a compare-and-set to a concurrent change.
const CLAIM_ATTEMPTS: usize = 3;

/// The device agent's timing, from `[devices]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSettings {
    /// Keepalive probe period of a held connection, and the longest pause between reconnects.
    pub keepalive: Duration,
    /// Unreachable this long → reported `down`.
    pub down_after: Duration,
    /// A slower connect attempt fails.
    pub connect_timeout: Duration,
    /// Leader side: silence after which a node's devices move.
    pub lost_after: Duration,
}

impl From<&DevicesSection> for DeviceSettings {
    fn from(s: &DevicesSection) -> Self {
        DeviceSettings {
            keepalive: Duration::from_secs(s.keepalive_interval_s),
            down_after: Duration::from_secs(s.down_after_s),
            connect_timeout: Duration::from_secs(s.connect_timeout_s),
            lost_after: Duration::from_millis(s.lost_after_ms),
        }
    }
}

/// Where a space-initiated device is reached, as parsed from its registered address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    /// A literal address; no lookup needed.
    Socket(SocketAddr),
    /// A host name to resolve, and the port.
    Host(String, u16),
}

/// A registered address the agent cannot use (the fabric checks addresses at registration, so
/// this means a record from an older, laxer version).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device address {addr:?}: {why}")]
pub struct DeviceAddrError {
    /// The address as registered.
    pub addr: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses `ip`, `ip:port`, `[v6]:port`, `host` or `host:port`; no port means
/// [`DEFAULT_DEVICE_PORT`].
pub fn device_target(addr: &str) -> Result<DeviceTarget, DeviceAddrError> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(DeviceTarget::Socket(a));
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Ok(DeviceTarget::Socket(SocketAddr::new(
            ip,
            DEFAULT_DEVICE_PORT,
        )));
    }
    let bad = |why| DeviceAddrError {
        addr: addr.to_string(),
        why,
    };
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| bad("port must be 1..65535"))?,
        ),
        None => (addr, DEFAULT_DEVICE_PORT),
    };
    if host.is_empty() || port == 0 || host.contains(':') {
        return Err(bad("expected ip, ip:port, host or host:port"));
    }
    Ok(DeviceTarget::Host(host.to_string(), port))
}

/// One device this node holds (or waits for): the task that owns its connection.
struct Held {
    /// Address the task connects to; a changed registration restarts the task.
    addr: String,
    /// Who connects; a changed mode restarts the task.
    mode: DeviceMode,
    /// Aborting it closes the connection at once.
    task: AbortHandle,
    /// The last reconcile pass that found the device still ours; older ones are closed.
    seen: u64,
}

/// The agent's state, shared by its loops and by every connection task.
pub struct DeviceAgent {
    /// This node's id: the owner the agent looks for in the fabric.
    me: NodeId,
    /// Keepalive, down-after and connect timeout.
    settings: DeviceSettings,
    /// The device-initiated listener, bound at start (so a taken port fails the start) and
    /// taken over by the accept loop.
    listener: std::sync::Mutex<Option<TcpListener>>,
    /// Where the listener is bound, if it is.
    listen_addr: Option<SocketAddr>,
    /// Connection tasks by device id.
    held: std::sync::Mutex<HashMap<String, Held>>,
    /// Set once the agent stopped: nothing may be held after that.
    stopped: AtomicBool,
    /// Status changes not yet sent to the leader; the newest per device wins.
    pending: std::sync::Mutex<BTreeMap<String, DeviceStatus>>,
    /// Limits connect attempts in flight.
    connecting: Semaphore,
    /// Hellos being read on the device port, in all and per source.
    hellos: std::sync::Mutex<HelloGate>,
}

/// A hello admitted by the gate; its place is given back when it is dropped.
struct HelloTicket {
    agent: Arc<DeviceAgent>,
    source: std::net::IpAddr,
}

impl Drop for HelloTicket {
    fn drop(&mut self) {
        lock(&self.agent.hellos).done(self.source);
    }
}

impl DeviceAgent {
    /// Binds the device-initiated listener, if one is configured.
    pub(crate) fn new(me: NodeId, cfg: &DevicesSection) -> Result<DeviceAgent, std::io::Error> {
        let listener = cfg.listen.map(bind_listener).transpose()?;
        let listen_addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        Ok(DeviceAgent {
            me,
            settings: DeviceSettings::from(cfg),
            listener: std::sync::Mutex::new(listener),
            listen_addr,
            held: std::sync::Mutex::default(),
            stopped: AtomicBool::new(false),
            pending: std::sync::Mutex::default(),
            connecting: Semaphore::new(CONNECTING_AT_ONCE),
            hellos: std::sync::Mutex::default(),
        })
    }

    /// Timing from `[devices]`.
    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    /// The bound device-initiated port, if any.
    pub(crate) fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// Number of devices this node holds a task for (connected or trying).
    pub(crate) fn held_count(&self) -> usize {
        lock(&self.held).len()
    }

    /// Queues a status report for the next batch.
    fn report(&self, device: &str, status: DeviceStatus) {
        lock(&self.pending).insert(device.to_string(), status);
    }

    /// Closes every held connection and refuses new ones.
    pub(crate) fn stop_all(&self) {
        let mut held = lock(&self.held);
        self.stopped.store(true, Ordering::SeqCst);
        for (_, h) in held.drain() {
            h.task.abort();
        }
    }

    /// Makes the held set match the fabric: closes what this node no longer owns (or whose
    /// address or mode changed) and starts a task for each owned device it does not hold yet.
    ///
    /// One pass over the fabric with hash lookups in the held set, under the fabric's read lock
    /// (which holds up `apply`): with 100,000 devices a lookup per held device in the fabric's
    /// tree instead cost tens of milliseconds per pass.
    fn reconcile(self: &Arc<Self>, inner: &Cluster, pass: u64) {
        let me = self.me;
        let to_start: Vec<(String, String, DeviceMode)> = inner.view.read(|f| {
            let mut held = lock(&self.held);
            let mut to_start = Vec::new();
            for (id, d) in &f.devices {
                if d.owner != Some(me) {
                    continue;
                }
                match held.get_mut(id.as_str()) {
                    Some(h)
                        if h.mode == d.mode
                            && (d.mode == DeviceMode::DeviceInitiated || d.addr == h.addr) =>
                    {
                        h.seen = pass;
                    }
                    _ => to_start.push((id.clone(), d.addr.clone(), d.mode)),
                }
            }
            held.retain(|id, h| {
                let keep = h.seen == pass;
                if !keep {
                    h.task.abort();
                    tracing::debug!(device = %id, "device no longer ours: connection closed");
                }
                keep
            });
            to_start
        });
        if to_start.is_empty() {
            return;
        }
        let mut held = lock(&self.held);
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        for (id, addr, mode) in to_start {
            if held.contains_key(&id) {
                continue;
            }
            let agent = self.clone();
            let task = match mode {
                DeviceMode::SpaceInitiated => {
                    tokio::spawn(hold_space_initiated(agent, id.clone(), addr.clone()))
                }
                DeviceMode::DeviceInitiated => {
                    tokio::spawn(await_device(agent, id.clone(), Instant::now()))
                }
            };
            held.insert(
                id,
                Held {
                    addr,
                    mode,
                    task: task.abort_handle(),
                    seen: pass,
                },
            );
        }
    }

    /// Takes over a claimed device-initiated connection: replaces whatever this node held for
    /// the device and reports it up.
    fn adopt(self: &Arc<Self>, id: &str, addr: String, stream: TcpStream) {
        let mut held = lock(&self.held);
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let task = tokio::spawn(hold_device_initiated(self.clone(), id.to_string(), stream));
        let old = held.insert(
            id.to_string(),
            Held {
                addr,
                mode: DeviceMode::DeviceInitiated,
                task: task.abort_handle(),
                // Claimed after this node applied the claim: the next pass finds it ours.
                seen: 0,
            },
        );
        if let Some(old) = old {
            old.task.abort();
        }
        drop(held);
        self.report(id, DeviceStatus::Up);
    }
}

/// Binds a TCP listener with a deep accept queue (devices reconnect in bursts after a failover).
fn bind_listener(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// A pause of `base` shortened by up to half at random, so retries of many devices spread out.
fn jittered(base: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    base.mul_f64(0.5 + (r % 1024) as f64 / 2048.0)
}

/// Opens a TCP connection to a device, trying each resolved address in turn.
async fn connect(target: &DeviceTarget) -> Result<TcpStream, std::io::Error> {
    match target {
        DeviceTarget::Socket(a) => TcpStream::connect(a).await,
        DeviceTarget::Host(host, port) => {
            let mut last = None;
            for a in tokio::net::lookup_host((host.as_str(), *port)).await? {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host} resolves to no address"),
                )
            }))
        }
    }
}

/// Turns on TCP keepalive: a probe after `every` of silence, then every `every`; the kernel
/// drops the connection after [`KEEPALIVE_PROBES`] unanswered ones.
fn keepalive(stream: &TcpStream, every: Duration) -> Result<(), nix::Error> {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = every.as_secs().clamp(1, MAX_KEEPALIVE_S) as u32;
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &secs)?;
    setsockopt(stream, sockopt::TcpKeepInterval, &secs)?;
    setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    Ok(())
}

/// Holds a connection until it ends; what the device sends is read and dropped. Returns why it
/// ended.
async fn hold(stream: &mut TcpStream) -> String {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return "closed by the device".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// The task behind one space-initiated device: connect, hold, reconnect, report.
async fn hold_space_initiated(agent: Arc<DeviceAgent>, id: String, addr: String) {
    let s = agent.settings.clone();
    let target = match device_target(&addr) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(device = %id, error = %e, "cannot connect to device: bad address");
            return await_device(agent, id, Instant::now()).await;
        }
    };
    // The down clock runs from the assignment, then from each lost connection.
    let mut unreachable_since = Instant::now();
    let mut down = false;
    let mut retry = FIRST_RETRY;
    loop {
        let attempt = {
            let _permit = agent.connecting.acquire().await;
            tokio::time::timeout(s.connect_timeout, connect(&target)).await
        };
        match attempt {
            Ok(Ok(mut stream)) => {
                if let Err(e) = keepalive(&stream, s.keepalive) {
                    tracing::warn!(device = %id, error = %e, "cannot set TCP keepalive on the device connection");
                }
                agent.report(&id, DeviceStatus::Up);
                if down {
                    tracing::info!(device = %id, %addr, "device reachable again");
                }
                down = false;
                retry = FIRST_RETRY;
                let why = hold(&mut stream).await;
                tracing::info!(device = %id, %addr, reason = %why, "device connection lost; reconnecting");
                unreachable_since = Instant::now();
            }
            Ok(Err(e)) => {
                tracing::debug!(device = %id, %addr, error = %e, "cannot connect to device")
            }
            Err(_) => {
                tracing::debug!(device = %id, %addr, timeout = ?s.connect_timeout, "connect to device timed out")
            }
        }
        let unreachable = unreachable_since.elapsed();
        if !down && unreachable >= s.down_after {
            tracing::warn!(device = %id, %addr, unreachable = ?unreachable, "device down");
            agent.report(&id, DeviceStatus::Down);
            down = true;
        }
        let mut pause = jittered(retry);
        if !down {
            pause = pause.min(s.down_after.saturating_sub(unreachable));
        }
        tokio::time::sleep(pause).await;
        retry = (retry * 2).min(s.keepalive.max(FIRST_RETRY));
    }
}

/// The task behind a device-initiated device this node owns but holds no connection for:
/// reports it down once `down_after` has passed since `since`.
async fn await_device(agent: Arc<DeviceAgent>, id: String, since: Instant) {
    tokio::time::sleep_until(since + agent.settings.down_after).await;
    tracing::warn!(device = %id, "device has not connected: down");
    agent.report(&id, DeviceStatus::Down);
    std::future::pending::<()>().await;
}

/// The task behind a claimed device-initiated connection.
async fn hold_device_initiated(agent: Arc<DeviceAgent>, id: String, mut stream: TcpStream) {
    if let Err(e) = keepalive(&stream, agent.settings.keepalive) {
        tracing::warn!(device = %id, error = %e, "cannot set TCP keepalive on the device connection");
    }
    let why = hold(&mut stream).await;
    tracing::info!(device = %id, reason = %why, "device connection lost; waiting for it to connect again");
    drop(stream);
    await_device(agent, id, Instant::now()).await;
}

/// Why a device-initiated connection was refused; sent to the device as `ERR <this>`.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The first line was not a usable device id.
    #[error("bad hello: {0}")]
    BadHello(String),
    /// No device of that id is registered.
    #[error("unknown device {0:?}")]
    Unknown(String),
    /// The device is registered as space-initiated: the nodes connect to it.
    #[error("device {0:?} is registered as space-initiated")]
    NotDeviceInitiated(String),
    /// The fabric refused the assignment (this node is draining, lacks the role `app`, ...).
    #[error("device {device:?} cannot be claimed: {error}")]
    Refused {
        /// The device.
        device: String,
        /// The state machine's reason.
        error: CommandError,
    },
    /// The device came up on another node too recently to be taken from it (see
    /// [`crate::devices::gate`]).
    #[error(transparent)]
    TooSoon(#[from] HeldElsewhere),
    /// The claim did not reach the leader.
    #[error("device {device:?} cannot be claimed now: {error}")]
    NotDelivered {
        /// The device.
        device: String,
        /// What failed on the way.
        error: String,
    },
}

/// Reads the hello line: the device id, then `\n` (a `\r` before it is allowed). Public for
/// the fuzz targets (`fuzz/`), which feed it bytes.
pub async fn read_hello<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<String, ClaimError> {
    let mut line = Vec::with_capacity(64);
    let mut buf = [0u8; MAX_HELLO];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| ClaimError::BadHello(e.to_string()))?;
        if n == 0 {
            return Err(ClaimError::BadHello("closed before a full line".into()));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_HELLO {
            return Err(ClaimError::BadHello(format!(
                "no newline in the first {MAX_HELLO} bytes"
            )));
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let id = String::from_utf8(line).map_err(|_| ClaimError::BadHello("not UTF-8".into()))?;
    check_device_id(&id).map_err(|e| ClaimError::BadHello(e.to_string()))?;
    Ok(id)
}

/// Makes this node the owner of device-initiated device `id` (compare-and-set on the owner it
/// sees, through the leader) and waits until it applied that. Returns the device's address.
async fn claim(inner: &Cluster, id: &str) -> Result<String, ClaimError> {
    let me = inner.id;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (owner, mode, addr) = inner
            .view
            .read(|f| f.devices.get(id).map(|d| (d.owner, d.mode, d.addr.clone())))
            .ok_or_else(|| ClaimError::Unknown(id.to_string()))?;
        if mode != DeviceMode::DeviceInitiated {
            return Err(ClaimError::NotDeviceInitiated(id.to_string()));
        }
        if owner == Some(me) {
            return Ok(addr);
        }
        inner
            .view
            .read(|f| device_held_elsewhere(f, id, me, now_millis()))?;
        let cmd = Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: id.to_string(),
                from: owner,
                to: Some(me),
            }],
            at: now_millis(),
        };
        match inner.propose_anywhere(cmd).await {
            Ok(Ok(_)) => break,
            // This node's view lagged behind a change; look again.
            Ok(Err(CommandError::DeviceOwnerChanged { .. })) if attempt < CLAIM_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(error)) => {
                return Err(ClaimError::Refused {
                    device: id.to_string(),
                    error,
                });
            }
            Err(error) => {
                return Err(ClaimError::NotDelivered {
                    device: id.to_string(),
                    error: error.to_string(),
                });
            }
        }
    }
    let deadline = Instant::now() + CLAIM_APPLY_WAIT;
    loop {
        let owner = inner.view.read(|f| f.devices.get(id).map(|d| d.owner));
        match owner {
            Some(Some(o)) if o == me => {
                return inner
                    .view
                    .read(|f| f.devices.get(id).map(|d| d.addr.clone()))
                    .ok_or_else(|| ClaimError::Unknown(id.to_string()));
            }
            None => return Err(ClaimError::Unknown(id.to_string())),
            Some(_) if Instant::now() > deadline => {
                return Err(ClaimError::NotDelivered {
                    device: id.to_string(),
                    error: format!(
                        "claim committed but not applied here within {CLAIM_APPLY_WAIT:?}"
                    ),
                });
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Serves one device-initiated connection: hello, claim, then hand it to the agent.
async fn greet(
    inner: Cluster,
    agent: Arc<DeviceAgent>,
    mut stream: TcpStream,
    peer: SocketAddr,
    ticket: HelloTicket,
) {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream))
        .await
        .unwrap_or_else(|_| {
            Err(ClaimError::BadHello(format!(
                "no line within {HELLO_TIMEOUT:?}"
            )))
        });
    drop(ticket);
    let claimed = match hello {
        Ok(id) => claim(&inner, &id).await.map(|addr| (id, addr)),
        Err(e) => Err(e),
    };
    match claimed {
        Ok((id, addr)) => {
            if let Err(e) = stream
                .write_all(format!("OK {}\n", inner.name).as_bytes())
                .await
            {
                tracing::info!(device = %id, %peer, error = %e, "device left during its claim");
            }
            tracing::info!(device = %id, %peer, "device connected and claimed");
            agent.adopt(&id, addr, stream);
        }
        Err(e) => {
            // A stranger's garbage (a port scan, say) is worth less noise than a device that
            // names itself and is refused.
            if matches!(e, ClaimError::BadHello(_)) {
                tracing::warn!(%peer, error = %e, "device connection refused");
            } else {
                tracing::error!(%peer, error = %e, "device connection refused");
            }
            let _ = stream.write_all(format!("ERR {e}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}

/// Accepts device-initiated connections until shutdown.
async fn accept_devices(
    inner: Cluster,
    agent: Arc<DeviceAgent>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut greeting = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(_) = greeting.join_next(), if !greeting.is_empty() => continue,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((mut stream, peer)) => {
                let admitted = lock(&agent.hellos).admit(peer.ip());
                match admitted {
                    Ok(()) => {
                        let ticket = HelloTicket {
                            agent: agent.clone(),
                            source: peer.ip(),
                        };
                        greeting.spawn(greet(inner.clone(), agent.clone(), stream, peer, ticket));
                    }
                    Err(refused) => {
                        tracing::debug!(%peer, %refused, "device connection turned away");
                        greeting.spawn(async move {
                            let _ = stream
                                .write_all(format!("ERR {refused}\n").as_bytes())
                                .await;
                            let _ = stream.shutdown().await;
                        });
                    }
                }
            }
            Err(e) => {
                // Out of descriptors, say: pause instead of spinning.
                tracing::warn!(error = %e, "accepting a device connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Sends the pending reports about devices this node still owns, whose state the fabric does
/// not show yet, in batches through the leader. Undelivered ones are kept for the next round.
async fn send_reports(inner: &Cluster, agent: &DeviceAgent) {
    let pending = std::mem::take(&mut *lock(&agent.pending));
    if pending.is_empty() {
        return;
    }
    let me = agent.me;
    let reports: Vec<DeviceReport> = inner.view.read(|f| {
        pending
            .into_iter()
            .filter(|(id, status)| {
                f.devices
                    .get(id)
                    .is_some_and(|d| d.owner == Some(me) && d.status != *status)
            })
            .map(|(device, status)| DeviceReport { device, status })
            .collect()
    });
    let mut rest = reports.into_iter().peekable();
    while rest.peek().is_some() {
        let batch: Vec<DeviceReport> = rest.by_ref().take(REPORT_BATCH).collect();
        let n = batch.len();
        let cmd = Command::ReportDeviceStatus {
            node: me,
            reports: batch.clone(),
            at: now_millis(),
        };
        match inner.propose_anywhere(cmd).await {
            Ok(Ok(Outcome::DevicesReported { changed, stale })) => {
                tracing::debug!(reports = n, changed, stale, "device status reported")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(reports = n, error = %e, "device status report refused"),
            Err(e) => {
                tracing::debug!(reports = n, error = %e, "device status report not delivered; retrying");
                let mut pending = lock(&agent.pending);
                for r in batch.into_iter().chain(rest) {
                    pending.entry(r.device).or_insert(r.status);
                }
                return;
            }
        }
    }
}

/// Closes every held connection when the agent's loops end (shutdown, or a crash in tests).
struct StopOnDrop(Arc<DeviceAgent>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop_all();
    }
}

/// Runs the agent until shutdown: reconcile with the fabric, accept device-initiated
/// connections, send reports.
pub async fn run(inner: Cluster, agent: Arc<DeviceAgent>, mut shutdown: watch::Receiver<bool>) {
    let _stop = StopOnDrop(agent.clone());
    let listener = lock(&agent.listener).take();
    let accepting = listener.map(|l| {
        tokio::spawn(accept_devices(
            inner.clone(),
            agent.clone(),
            l,
            shutdown.clone(),
        ))
    });
    let _abort_accepting = accepting.map(|h| AbortOnDrop(h.abort_handle()));
    let reporting = {
        let inner = inner.clone();
        let agent = agent.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REPORT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                send_reports(&inner, &agent).await;
            }
        })
    };
    let _abort_reporting = AbortOnDrop(reporting.abort_handle());
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<u64> = None;
    let mut pass: u64 = 0;
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Reconcile when the fabric changed, and now and then anyway.
        let applied = inner.view.last_applied_index();
        if applied != seen || last_full.elapsed() > Duration::from_secs(5) {
            seen = applied;
            last_full = Instant::now();
            pass += 1;
            agent.reconcile(&inner, pass);
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_addresses_parse_with_ssh_as_the_default_port() {
        let cases: &[(&str, Result<DeviceTarget, &str>)] = &[
            (
                "10.0.0.1",
                Ok(DeviceTarget::Socket("10.0.0.1:22".parse().unwrap())),
            ),
            (
                "10.0.0.1:830",
                Ok(DeviceTarget::Socket("10.0.0.1:830".parse().unwrap())),
            ),
            (
                "fd00::1",
                Ok(DeviceTarget::Socket("[fd00::1]:22".parse().unwrap())),
            ),
            (
                "[fd00::1]:830",
                Ok(DeviceTarget::Socket("[fd00::1]:830".parse().unwrap())),
            ),
            (
                "router-1.lab",
                Ok(DeviceTarget::Host("router-1.lab".into(), 22)),
            ),
            (
                "router-1.lab:2022",
                Ok(DeviceTarget::Host("router-1.lab".into(), 2022)),
            ),
            ("router:0", Err("expected")),
            ("router:x", Err("port")),
            (":22", Err("expected")),
            ("", Err("expected")),
        ];
        for (addr, expected) in cases {
            match (device_target(addr), expected) {
                (Ok(t), Ok(e)) => assert_eq!(&t, e, "{addr}"),
                (Err(err), Err(why)) => {
                    assert!(err.to_string().contains(why), "{addr}: {err}")
                }
                (got, _) => panic!("{addr}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    /// An agent with the given timing and no listener.
    fn agent(keepalive_s: u64, down_after_s: u64) -> Arc<DeviceAgent> {
        let cfg = DevicesSection {
            keepalive_interval_s: keepalive_s,
            down_after_s,
            listen: None,
            ..DevicesSection::default()
        };
        Arc::new(DeviceAgent::new(1, &cfg).unwrap())
    }

    fn pending(agent: &DeviceAgent) -> Vec<(String, DeviceStatus)> {
        std::mem::take(&mut *lock(&agent.pending))
            .into_iter()
            .collect()
    }

    /// A loopback port nothing listens on (bound, then released).
    async fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_device_is_down_after_down_after_and_up_once_it_answers() {
        let a = agent(5, 60);
        let addr = closed_port().await;
        let task = tokio::spawn(hold_space_initiated(
            a.clone(),
            "d1".into(),
            addr.to_string(),
        ));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(pending(&a), vec![], "not down before down_after");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pending(&a), vec![("d1".to_string(), DeviceStatus::Down)]);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(pending(&a), vec![], "down is reported once");

        // The device comes up: the next retry (at most the keepalive interval away) connects.
        let listener = bind_listener(addr).unwrap();
        let (conn, _) = tokio::time::timeout(Duration::from_secs(6), listener.accept())
            .await
            .expect("a retry within the keepalive interval")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(pending(&a), vec![("d1".to_string(), DeviceStatus::Up)]);

        // It goes away again: down only after another full down_after.
        drop(conn);
        drop(listener);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(pending(&a), vec![]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pending(&a), vec![("d1".to_string(), DeviceStatus::Down)]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_initiated_device_that_never_calls_is_down_after_down_after() {
        let a = agent(5, 30);
        let task = tokio::spawn(await_device(a.clone(), "d2".into(), Instant::now()));
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(pending(&a), vec![]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pending(&a), vec![("d2".to_string(), DeviceStatus::Down)]);
        task.abort();
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        for _ in 0..100 {
            let j = jittered(Duration::from_millis(1000));
            assert!(
                j >= Duration::from_millis(500) && j <= Duration::from_millis(1000),
                "{j:?}"
            );
        }
    }
}
