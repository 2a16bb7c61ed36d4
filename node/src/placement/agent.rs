//! The VIP agent on every node: keeps leases on what the fabric grants this node and makes the
//! host match — address up only while the lease is valid, down (self-fenced) the moment it is not.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spaced_fabric::{Fabric, PlacementKind};
use spaced_raft::NodeId;
use spaced_raft::network::BoxFuture;

use crate::placement::lease::{Held, LeaseConfig, OwnerLeases, Renewal};

/// Reconcile passes are at least this far apart, so a due time already past cannot spin the
/// loop. A pass runs when something falls due (`Agent::next_due`: a renewal, a lease end, an
/// announcement), when the fabric changes or when the agent is poked, so it acts within about
/// this much (plus the timer's 1 ms grain) of a lease end; the leader's `margin` must exceed it.
pub const MIN_GAP: Duration = Duration::from_millis(1);

/// While it owns or holds anything, the agent runs a pass at least this often even when
/// nothing falls due sooner (a safety net).
pub const MAX_GAP: Duration = Duration::from_millis(100);

/// How soon a removal that failed is tried again.
const FENCE_RETRY: Duration = Duration::from_millis(50);

/// A VIP as the agent hands it to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSpec {
    /// Placement name.
    pub name: String,
    /// Address with prefix (`10.0.0.100/24`).
    pub address: String,
    /// Interface.
    pub interface: String,
    /// Set for a singleton placement: the service it runs (address and interface are empty).
    pub service: Option<String>,
}

impl VipSpec {
    /// The bare IP of the VIP.
    pub fn ip(&self) -> Option<IpAddr> {
        spaced_fabric::vip_ip(&self.address)
    }
}

/// Why a backend could not take a placement up or down, or would not be able to. Its text is
/// what the operator sees as a refusal's reason, so every variant shows its words as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// This host cannot hold it: no such interface, an address outside its subnets, no
    /// capability, a port it cannot bind.
    #[error("{0}")]
    Host(String),
    /// The fence guard could not be started or told.
    #[error("{0}")]
    Guard(String),
    /// The singleton's service could not be started or stopped.
    #[error("{0}")]
    Service(String),
    /// Another host answered the conflict probe for the VIP's address.
    #[error(
        "refusing VIP {vip} ({address}): host {mac}{} already answers for it on {interface}",
        at_list(holders)
    )]
    Conflict {
        /// The VIP.
        vip: String,
        /// Its address.
        address: String,
        /// The interface probed.
        interface: String,
        /// The answering host's MAC.
        mac: String,
        /// The IPs this host's neighbour table has for that MAC (the answering host's own
        /// addresses, when this host has talked to it), to tell which node it is.
        holders: Vec<std::net::IpAddr>,
    },
}

/// ` (at 10.0.0.2, fd00::2)`, or nothing.
fn at_list(ips: &[std::net::IpAddr]) -> String {
    if ips.is_empty() {
        return String::new();
    }
    let list: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    format!(" (at {})", list.join(", "))
}

impl HoldError {
    /// The refusal's text as the fabric keeps it: for a conflict, also which node of the
    /// cluster the answering host is, when one of its addresses is a node's (a node whose
    /// daemon is gone, or stopped, with the address still up: its guard did not fence).
    pub fn explain(&self, fabric: &spaced_fabric::Fabric) -> String {
        let HoldError::Conflict { holders, .. } = self else {
            return self.to_string();
        };
        let nodes: Vec<String> = fabric
            .nodes
            .values()
            .filter(|n| {
                let raft_ip = n
                    .raft_addr
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.ip());
                holders
                    .iter()
                    .any(|h| Some(*h) == raft_ip || Some(*h) == n.mgmt_ip)
            })
            .map(|n| n.name.clone())
            .collect();
        match nodes.as_slice() {
            [] => self.to_string(),
            names => format!(
                "{self}: that host is node {} of this cluster, which no longer holds the VIP (its daemon is gone or stopped with the address still up); restart or repair it",
                names.join(", ")
            ),
        }
    }
}

/// How a host takes a VIP up and down (netlink + ARP, or a loopback stand-in). A backend that
/// wraps another must forward every method, the defaulted ones too: a default answers "cannot
/// tell" (`is_up`, `guard_state`), which turns the agent's checks off without a word.
pub trait VipBackend: Send + Sync + 'static {
    /// Everything before the VIP may come up that takes time: a conflict probe, say. The agent
    /// checks that the lease still holds after it and before [`acquire`](Self::acquire).
    fn prepare(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        Box::pin(async { Ok(()) })
    }
    /// Bring the VIP up and announce it once.
    fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>>;
    /// Announce it again (gratuitous ARP / NA); a no-op where meaningless.
    fn announce(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>>;
    /// Take it down; must succeed fast, it is the self-fence.
    fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>>;
    /// Take it down on request (move, shutdown), where there is time to be gentle.
    fn release_gracefully(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        self.release(vip)
    }
    /// Whether this host could hold the VIP (interface, subnet, capabilities); changes nothing.
    fn check(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        Box::pin(async { Ok(()) })
    }
    /// Whether the VIP's address is on the host now; `None`: this backend cannot tell (or the
    /// look-up failed). The agent asks it of the VIPs it holds (see [`Agent::verify_up`]).
    fn is_up(&self, _vip: VipSpec) -> BoxFuture<'static, Option<bool>> {
        Box::pin(async { None })
    }
    /// Offsets after acquiring at which to announce again.
    fn announce_schedule(&self) -> Vec<Duration> {
        Vec::new()
    }
    /// The lease on `vip` (held at `epoch`) now ends at `until`: a backend with an
    /// out-of-process guard passes it on, so the VIP goes down at that instant even if this
    /// process is stopped (and, told the epoch, the guard can report the fence).
    fn hold_until(&self, _vip: &VipSpec, _epoch: u64, _until: Instant) {}
    /// The out-of-process guard's state for metrics (see
    /// [`crate::takeover::guard::GuardCell::state`]); `None`: this backend has none.
    fn guard_state(&self) -> Option<(Option<bool>, u64)> {
        None
    }
}

/// Stand-in for rootless demos: "holding" a VIP means answering TCP on `ip:port` with the node
/// name, so a client can tell which node serves it.
pub struct LoopbackBackend {
    /// Name written to every client.
    node_name: String,
    /// Port per VIP name.
    ports: BTreeMap<String, u16>,
    /// Running responders.
    running: Mutex<BTreeMap<String, tokio::task::JoinHandle<()>>>,
}

/// Answers every connection to `listener` with `name` and a newline, then closes it: how a
/// loopback "VIP holder" (and the demo's stand-in app servers) tell a client who they are.
/// Aborting the task closes the listener.
pub(crate) fn answer_with_name(
    listener: tokio::net::TcpListener,
    name: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let reply = format!("{name}\n");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    })
}

impl LoopbackBackend {
    /// A backend answering with `node_name` on each VIP's port.
    pub fn new(node_name: String, ports: BTreeMap<String, u16>) -> Self {
        LoopbackBackend {
            node_name,
            ports,
            running: Mutex::default(),
        }
    }
}

impl LoopbackBackend {
    /// Where this node answers for `vip`: its address and the port configured for it here.
    fn responder_addr(&self, vip: &VipSpec) -> Result<SocketAddr, HoldError> {
        let port = self.ports.get(&vip.name).copied().ok_or_else(|| {
            HoldError::Host(format!(
                "VIP {}: no loopback port configured on this node",
                vip.name
            ))
        })?;
        let ip = vip.ip().ok_or_else(|| {
            HoldError::Host(format!("VIP {}: bad address {}", vip.name, vip.address))
        })?;
        Ok(SocketAddr::new(ip, port))
    }
}

impl VipBackend for LoopbackBackend {
    fn check(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let result = self.responder_addr(&vip).map(|_| ());
        Box::pin(async move { result })
    }

    fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let name = self.node_name.clone();
        let result = (|| {
            let addr = self.responder_addr(&vip)?;
            let std_listener = std::net::TcpListener::bind(addr)
                .map_err(|e| HoldError::Host(format!("VIP {}: bind {addr}: {e}", vip.name)))?;
            let host = |e: std::io::Error| HoldError::Host(e.to_string());
            std_listener.set_nonblocking(true).map_err(host)?;
            let listener = tokio::net::TcpListener::from_std(std_listener).map_err(host)?;
            let task = answer_with_name(listener, name);
            let mut running = crate::lock(&self.running);
            if let Some(old) = running.insert(vip.name.clone(), task) {
                old.abort();
            }
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn announce(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        Box::pin(async { Ok(()) })
    }

    fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        if let Some(t) = crate::lock(&self.running).remove(&vip.name) {
            t.abort();
        }
        Box::pin(async { Ok(()) })
    }
}

/// How long after taking a VIP up [`Agent::verify_up`] starts checking that its address is
/// still there (an acquisition in flight is not mistaken for a loss).
pub const VERIFY_AFTER: Duration = Duration::from_millis(200);

/// A VIP this node currently serves.
#[derive(Debug, Clone)]
struct Active {
    /// Epoch it was acquired at.
    epoch: u64,
    /// What was acquired.
    vip: VipSpec,
    /// When, for the announcement schedule.
    since: Instant,
    /// Announcements already sent from the schedule.
    announced: usize,
    /// Periodic refreshes sent after the schedule.
    refreshed: u32,
    /// Lease end last passed to the backend's guard.
    guarded_until: Option<Instant>,
}

impl Active {
    /// When it is announced next: the next offset of the burst (`schedule`, from `since`),
    /// then every `refresh` after the burst's last offset (never, without a refresh).
    fn next_announcement(
        &self,
        schedule: &[Duration],
        refresh: Option<Duration>,
    ) -> Option<Instant> {
        match schedule.get(self.announced) {
            Some(offset) => Some(self.since + *offset),
            None => refresh.map(|every| {
                let last = schedule.last().copied().unwrap_or_default();
                self.since + last + every * (self.refreshed + 1)
            }),
        }
    }
}

/// What the agent's state is shared as between its loop, renewal tasks and RPC handlers.
pub struct Agent {
    /// This node.
    pub me: NodeId,
    /// Lease clock per placement.
    leases: Mutex<OwnerLeases>,
    /// VIPs up on this host.
    active: Mutex<BTreeMap<String, Active>>,
    /// Placements fenced on request (graceful move/shutdown) that must not come back at that epoch.
    released: Mutex<BTreeSet<Held>>,
    /// Host side.
    backend: Arc<dyn VipBackend>,
    /// No acquisitions once shutting down.
    stopping: std::sync::atomic::AtomicBool,
    /// Re-announce held VIPs this often after the initial burst (`None`: never).
    refresh: Mutex<Option<Duration>>,
    /// Told of every change of the VIPs up here, once the host side is done, so followers of VIP
    /// ownership (the balancer) act at once instead of polling.
    changes: tokio::sync::watch::Sender<()>,
    /// Wakes the agent loop early when something it sleeps on changed outside it: a renewal
    /// was confirmed (a first confirmation lets a VIP come up), a placement was fenced on request.
    poke: tokio::sync::Notify,
    /// VIPs whose removal failed (netlink refused or timed out): tried again every pass until
    /// they are gone. Meanwhile the guard, still holding them, removes them at the lease end.
    unfenced: Mutex<BTreeMap<String, VipSpec>>,
    /// Held while the host is changed: a pass's takeovers and a fence on request never
    /// interleave, so a VIP released for a move cannot come up again behind the release from
    /// a takeover that was already under way.
    host: tokio::sync::Mutex<()>,
}

/// What one reconcile pass decided, for the caller to carry out.
#[derive(Debug, Default)]
pub struct Step {
    /// Renewal to send to the leader.
    pub renewal: Option<Renewal>,
    /// VIPs to bring up.
    pub acquire: Vec<(u64, VipSpec)>,
    /// VIPs to take down now (lease over or grant gone).
    pub fence: Vec<VipSpec>,
    /// VIPs to announce again.
    pub announce: Vec<VipSpec>,
    /// New lease ends of VIPs that are up.
    pub extend: Vec<(VipSpec, u64, Instant)>,
}

/// This node's placements in the fabric, VIPs and singletons: (name, epoch) and their specs.
pub fn owned_vips(fabric: &Fabric, me: NodeId) -> Vec<(Held, VipSpec)> {
    fabric
        .placements
        .iter()
        .filter(|(_, p)| p.owner == Some(me))
        .map(|(name, p)| {
            let spec = match &p.kind {
                PlacementKind::Vip { address, interface } => VipSpec {
                    name: name.clone(),
                    address: address.clone(),
                    interface: interface.clone(),
                    service: None,
                },
                PlacementKind::Singleton { service } => VipSpec {
                    name: name.clone(),
                    address: String::new(),
                    interface: String::new(),
                    service: Some(service.clone()),
                },
            };
            ((name.clone(), p.epoch), spec)
        })
        .collect()
}

impl Agent {
    /// A new agent with no leases.
    pub fn new(me: NodeId, cfg: LeaseConfig, backend: Arc<dyn VipBackend>) -> Self {
        Agent {
            me,
            leases: Mutex::new(OwnerLeases::new(cfg)),
            active: Mutex::default(),
            released: Mutex::default(),
            backend,
            stopping: std::sync::atomic::AtomicBool::new(false),
            refresh: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(()),
            poke: tokio::sync::Notify::new(),
            unfenced: Mutex::default(),
            host: tokio::sync::Mutex::new(()),
        }
    }

    /// Resolves when the agent loop should run a pass before its planned time (see `poke`).
    pub async fn poked(&self) {
        self.poke.notified().await
    }

    /// When the next reconcile pass has something to do: a renewal, a lease end (fence), an
    /// announcement or refresh. `None` after a pass means nothing is held and nothing is up
    /// (a pass takes down whatever has no lease), so nothing falls due until the fabric
    /// grants this node something.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        if !crate::lock(&self.unfenced).is_empty() {
            return Some(now + FENCE_RETRY);
        }
        let leases = crate::lock(&self.leases).next_due(now);
        let schedule = self.backend.announce_schedule();
        let refresh = *crate::lock(&self.refresh);
        let announcements = crate::lock(&self.active)
            .values()
            .filter_map(|a| a.next_announcement(&schedule, refresh))
            .min();
        match (leases, announcements) {
            (Some(l), Some(a)) => Some(l.min(a)),
            (l, a) => l.or(a),
        }
    }

    /// A receiver told each time VIPs went up or down here, from now on; see [`active_names`].
    ///
    /// [`active_names`]: Agent::active_names
    pub fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_replace(());
    }

    /// Re-announce held VIPs every `every` after the initial burst (gratuitous ARP refresh).
    pub fn set_refresh(&self, every: Option<Duration>) {
        *crate::lock(&self.refresh) = every;
    }

    /// Pure part of a reconcile pass: given what the fabric grants and the clock, decide.
    pub fn plan_step(&self, owned: &[(Held, VipSpec)], now: Instant) -> Step {
        let mut step = Step::default();
        let released = crate::lock(&self.released).clone();
        let owned_ids: Vec<Held> = owned
            .iter()
            .map(|(h, _)| h.clone())
            .filter(|h| !released.contains(h))
            .collect();
        let mut leases = crate::lock(&self.leases);
        leases.sync(&owned_ids, now);
        let valid: BTreeSet<Held> = leases.valid(now).into_iter().collect();
        let ends: BTreeMap<String, Instant> = valid
            .iter()
            .map(|(n, _)| (n.clone(), now + leases.remaining(n, now)))
            .collect();
        step.renewal = leases.renewal_due(now);
        drop(leases);
        let stopping = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
        let mut active = crate::lock(&self.active);
        // Fence first: anything up without a valid lease at its epoch.
        let gone: Vec<String> = active
            .iter()
            .filter(|(name, a)| !valid.contains(&((*name).clone(), a.epoch)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(a) = active.remove(&name) {
                step.fence.push(a.vip);
            }
        }
        // A removal that failed before is tried again, unless the VIP is ours again.
        let mut unfenced = crate::lock(&self.unfenced);
        unfenced.retain(|name, _| !active.contains_key(name));
        for vip in unfenced.values() {
            if !step.fence.iter().any(|f| f.name == vip.name) {
                step.fence.push(vip.clone());
            }
        }
        drop(unfenced);
        let schedule = self.backend.announce_schedule();
        let refresh = *crate::lock(&self.refresh);
        for a in active.values_mut() {
            while a.announced < schedule.len()
                && a.next_announcement(&schedule, refresh)
                    .is_some_and(|due| now >= due)
            {
                a.announced += 1;
                step.announce.push(a.vip.clone());
            }
            // After the burst, an optional periodic refresh (at most one a pass) for caches
            // that age entries out.
            if a.announced >= schedule.len()
                && a.next_announcement(&schedule, refresh)
                    .is_some_and(|due| now >= due)
            {
                a.refreshed += 1;
                step.announce.push(a.vip.clone());
            }
        }
        if !stopping {
            for ((name, epoch), spec) in owned {
                if valid.contains(&(name.clone(), *epoch)) && !active.contains_key(name) {
                    let a = Active {
                        epoch: *epoch,
                        vip: spec.clone(),
                        since: now,
                        announced: 0,
                        refreshed: 0,
                        guarded_until: None,
                    };
                    active.insert(name.clone(), a);
                    step.acquire.push((*epoch, spec.clone()));
                }
            }
        }
        for (name, a) in active.iter_mut() {
            if let Some(end) = ends.get(name)
                && a.guarded_until != Some(*end)
            {
                a.guarded_until = Some(*end);
                step.extend.push((a.vip.clone(), a.epoch, *end));
            }
        }
        step
    }

    /// Carries out the host side of a step (fences first). Returns the placements that could not
    /// be taken (already fenced and held down here) with the error, for the caller to give back
    /// with a refusal.
    pub async fn execute(&self, step: &Step) -> Vec<(Held, HoldError)> {
        let _host = self.host.lock().await;
        let mut failed = Vec::new();
        for vip in &step.fence {
            match self.backend.release(vip.clone()).await {
                Ok(()) => {
                    if crate::lock(&self.unfenced).remove(&vip.name).is_some() {
                        tracing::warn!(vip = %vip.name, address = %vip.address, "VIP removed on a later try (self-fenced)")
                    } else {
                        tracing::warn!(vip = %vip.name, address = %vip.address, "lease lost: VIP removed (self-fenced)")
                    }
                }
                Err(e) => {
                    tracing::error!(vip = %vip.name, error = %e, "could not remove VIP while fencing; trying again");
                    crate::lock(&self.unfenced).insert(vip.name.clone(), vip.clone());
                }
            }
        }
        if !step.fence.is_empty() {
            self.changed();
        }
        for (epoch, vip) in &step.acquire {
            // The probe takes time: the lease may have run out, or the placement been released
            // or fenced, meanwhile. Decided before it, the takeover is decided again after it.
            let prepared = match self.backend.prepare(vip.clone()).await {
                Ok(()) if self.still_holds(&vip.name, *epoch, Instant::now()) => Ok(()),
                Ok(()) => {
                    tracing::info!(vip = %vip.name, epoch, "lease ended or placement released during the takeover; not taken");
                    self.forget_active(&vip.name, *epoch);
                    continue;
                }
                Err(e) => Err(e),
            };
            let acquired = match prepared {
                Ok(()) => {
                    // The guard learns the lease end before the address exists: a daemon
                    // killed between the two leaves nothing it does not know to remove.
                    let now = Instant::now();
                    let until = now + crate::lock(&self.leases).remaining(&vip.name, now);
                    self.backend.hold_until(vip, *epoch, until);
                    self.backend.acquire(vip.clone()).await
                }
                Err(e) => Err(e),
            };
            match acquired {
                Ok(()) => {
                    tracing::info!(vip = %vip.name, address = %vip.address, epoch, "VIP taken over")
                }
                Err(e) => {
                    // Stop renewing it: the leader sees the lease lapse and grants it elsewhere,
                    // rather than leaving the VIP with a node that cannot serve it.
                    tracing::error!(vip = %vip.name, epoch, error = %e, "could not take over VIP; giving it back");
                    if let Err(e) = self.fence_and_hold_locked(&vip.name, *epoch).await {
                        tracing::error!(vip = %vip.name, error = %e, "could not clean up after a failed takeover");
                    }
                    failed.push(((vip.name.clone(), *epoch), e));
                }
            }
        }
        for (vip, epoch, until) in &step.extend {
            self.backend.hold_until(vip, *epoch, *until);
        }
        if !step.acquire.is_empty() {
            self.changed();
        }
        for vip in &step.announce {
            if let Err(e) = self.backend.announce(vip.clone()).await {
                tracing::warn!(vip = %vip.name, error = %e, "announcement failed");
            }
        }
        failed
    }

    /// The host was suspended (see `SuspendWatch`): every lease ends now; the next pass
    /// fences whatever is up, and nothing comes back before a renewal sent from now on.
    pub fn suspended(&self, now: Instant) {
        crate::lock(&self.leases).expire_all(now);
        self.poke.notify_one();
    }

    /// The leader answered `renewal` with `confirmed`.
    pub fn confirmed(&self, renewal: &Renewal, confirmed: &[Held]) {
        crate::lock(&self.leases).confirmed(renewal, confirmed);
        self.poke.notify_one();
    }

    /// Whether `name` at `epoch` is still to be up here at `now`: planned up, not released on
    /// request, its lease valid.
    fn still_holds(&self, name: &str, epoch: u64, now: Instant) -> bool {
        let held = (name.to_string(), epoch);
        crate::lock(&self.active)
            .get(name)
            .is_some_and(|a| a.epoch == epoch)
            && !crate::lock(&self.released).contains(&held)
            && crate::lock(&self.leases).valid(now).contains(&held)
    }

    /// Drops a takeover that did not happen from the VIPs planned up here.
    /// Checks that every VIP it holds, taken up at least [`VERIFY_AFTER`] before `now`, still
    /// has its address on the host. One whose address went away behind its back is forgotten,
    /// so the next step takes it up again while its lease holds: the fence guard removes an
    /// address whose deadline passed before the renewal's extension reached it (a daemon
    /// starved of CPU renews just in time for its own lease, too late for the guard's), and an
    /// operator may remove one by hand; without this the node kept renewing a lease on a VIP
    /// nobody served. Returns the names forgotten.
    pub async fn verify_up(&self, now: Instant) -> Vec<String> {
        let _host = self.host.lock().await;
        let held: Vec<(String, u64, VipSpec)> = crate::lock(&self.active)
            .iter()
            .filter(|(_, a)| now.saturating_duration_since(a.since) >= VERIFY_AFTER)
            .map(|(n, a)| (n.clone(), a.epoch, a.vip.clone()))
            .collect();
        let mut gone = Vec::new();
        for (name, epoch, vip) in held {
            if self.backend.is_up(vip.clone()).await == Some(false) {
                tracing::warn!(vip = %name, address = %vip.address, epoch, "VIP address gone from the host while its lease holds (the fence guard or someone removed it): taking it up again");
                self.forget_active(&name, epoch);
                gone.push(name);
            }
        }
        gone
    }

    fn forget_active(&self, name: &str, epoch: u64) {
        let mut active = crate::lock(&self.active);
        if active.get(name).is_some_and(|a| a.epoch == epoch) {
            active.remove(name);
        }
    }

    /// Fences `name` at `epoch` now and keeps it down at that epoch (graceful move or stop).
    /// Waits for a takeover under way to finish first, so it cannot bring the VIP back after.
    pub async fn fence_and_hold(&self, name: &str, epoch: u64) -> Result<(), HoldError> {
        let _host = self.host.lock().await;
        self.fence_and_hold_locked(name, epoch).await
    }

    /// [`fence_and_hold`](Self::fence_and_hold) with the host lock already held.
    async fn fence_and_hold_locked(&self, name: &str, epoch: u64) -> Result<(), HoldError> {
        crate::lock(&self.released).insert((name.to_string(), epoch));
        let a = crate::lock(&self.active).remove(name);
        if let Some(a) = a {
            let released = self.backend.release_gracefully(a.vip.clone()).await;
            self.changed();
            released?;
            tracing::info!(vip = %name, epoch, "VIP released on request");
        }
        self.poke.notify_one();
        Ok(())
    }

    /// Stops acquiring; fences everything held and returns it, for the caller to release in the fabric.
    pub async fn stop(&self) -> Vec<Held> {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let held = crate::lock(&self.leases).all();
        for (name, epoch) in &held {
            if let Err(e) = self.fence_and_hold(name, *epoch).await {
                tracing::error!(vip = %name, error = %e, "could not remove VIP on shutdown");
            }
        }
        held
    }

    /// Time left on a placement's lease here.
    pub fn lease_remaining(&self, name: &str, now: Instant) -> Duration {
        crate::lock(&self.leases).remaining(name, now)
    }

    /// The epoch this node holds `name` at, if it holds it.
    pub fn held_epoch(&self, name: &str) -> Option<u64> {
        crate::lock(&self.leases).epoch(name)
    }

    /// The VIP fence guard's state: running (`None`: none started yet) and how many were
    /// started; `None` without an out-of-process guard (loopback).
    pub fn guard_state(&self) -> Option<(Option<bool>, u64)> {
        self.backend.guard_state()
    }

    /// VIP names up on this host.
    pub fn active_names(&self) -> Vec<String> {
        crate::lock(&self.active).keys().cloned().collect()
    }

    /// Placements up on this host with the epoch they were acquired at.
    pub fn active_epochs(&self) -> BTreeMap<String, u64> {
        crate::lock(&self.active)
            .iter()
            .map(|(n, a)| (n.clone(), a.epoch))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_names_the_cluster_node_that_still_answers() {
        let mut fabric = spaced_fabric::Fabric::default();
        fabric.nodes.insert(
            2,
            spaced_fabric::NodeRecord {
                name: "n2".into(),
                raft_addr: "10.0.0.2:7000".into(),
                mgmt_ip: None,
                roles: Default::default(),
                admin_state: spaced_fabric::AdminState::Active,
                joined_at: 0,
                version: String::new(),
            },
        );
        let conflict = |holders: Vec<std::net::IpAddr>| HoldError::Conflict {
            vip: "cluster".into(),
            address: "10.0.0.100/24".into(),
            interface: "eth0".into(),
            mac: "02:00:00:00:00:02".into(),
            holders,
        };
        let named = conflict(vec!["10.0.0.2".parse().unwrap()]).explain(&fabric);
        assert!(
            named.contains("host 02:00:00:00:00:02 (at 10.0.0.2)"),
            "{named}"
        );
        assert!(named.contains("is node n2 of this cluster"), "{named}");
        let stranger = conflict(vec!["10.0.0.9".parse().unwrap()]).explain(&fabric);
        assert!(!stranger.contains("node"), "{stranger}");
        let unknown = conflict(vec![]).explain(&fabric);
        assert!(
            unknown.ends_with("already answers for it on eth0"),
            "{unknown}"
        );
        assert_eq!(HoldError::Host("x".into()).explain(&fabric), "x");
    }

    /// Records calls; no host effects.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
    }

    impl VipBackend for Recorder {
        fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.calls.lock().unwrap().push(format!("up {}", vip.name));
            Box::pin(async { Ok(()) })
        }
        fn announce(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("announce {}", vip.name));
            Box::pin(async { Ok(()) })
        }
        fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("down {}", vip.name));
            Box::pin(async { Ok(()) })
        }
        fn announce_schedule(&self) -> Vec<Duration> {
            vec![Duration::from_millis(250), Duration::from_millis(1000)]
        }
    }

    fn spec(name: &str) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: "10.0.0.100/24".into(),
            interface: "eth0".into(),
            service: None,
        }
    }

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            duration: Duration::from_millis(300),
            renew_every: Duration::from_millis(75),
            ..Default::default()
        }
    }

    #[test]
    fn acquires_only_with_a_confirmed_lease_and_fences_when_it_runs_out() {
        let t0 = Instant::now();
        let agent = Agent::new(1, cfg(), Arc::new(Recorder::default()));
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let s = agent.plan_step(&owned, t0);
        assert!(s.acquire.is_empty(), "no lease yet: nothing comes up");
        let r = s.renewal.expect("renewal sent at once");
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(2));
        assert_eq!(s.acquire.len(), 1);
        // Announcements follow the schedule.
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(260));
        assert_eq!(s.announce.len(), 1);
        // No more confirmations: at send + L the VIP is fenced.
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(299));
        assert!(s.fence.is_empty());
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(300));
        assert_eq!(s.fence, vec![spec("cluster")]);
        assert!(agent.active_names().is_empty());
    }

    /// Answers `is_up` from a switch the test flips.
    struct Vanishing {
        up: std::sync::atomic::AtomicBool,
    }

    impl VipBackend for Vanishing {
        fn acquire(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.up.store(true, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn announce(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            Box::pin(async { Ok(()) })
        }
        fn release(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.up.store(false, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn is_up(&self, _vip: VipSpec) -> BoxFuture<'static, Option<bool>> {
            let up = self.up.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { Some(up) })
        }
    }

    /// Found by the fault campaign: the fence guard removed a VIP's address when a renewal
    /// reached it late, the agent's own lease held on, and the node renewed a lease on a VIP
    /// nobody served until the test ended. A held VIP whose address went away is taken up
    /// again while its lease holds.
    #[tokio::test]
    async fn a_vip_whose_address_went_away_is_taken_up_again_while_its_lease_holds() {
        let backend = Arc::new(Vanishing {
            up: std::sync::atomic::AtomicBool::new(false),
        });
        let agent = Agent::new(1, cfg(), backend.clone());
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let t0 = Instant::now();
        let r = agent.plan_step(&owned, t0).renewal.expect("renewal");
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let s = agent.plan_step(&owned, t0);
        assert_eq!(s.acquire.len(), 1);
        assert!(agent.execute(&s).await.is_empty());
        assert!(backend.up.load(std::sync::atomic::Ordering::SeqCst));
        // Just taken up: not looked at yet; later, with the address there, kept.
        assert!(agent.verify_up(t0).await.is_empty());
        let later = t0 + VERIFY_AFTER;
        assert!(agent.verify_up(later).await.is_empty());
        // The guard removes the address; the lease still holds.
        backend.up.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(agent.verify_up(later).await, vec!["cluster".to_string()]);
        let s = agent.plan_step(&owned, later);
        assert_eq!(s.acquire.len(), 1, "taken up again");
        assert!(s.fence.is_empty());
        assert!(agent.execute(&s).await.is_empty());
        assert!(backend.up.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// The agent loop sleeps until the fabric changes while nothing is due, so something must
    /// be due while anything is held or up, and nothing once the grant has gone and the VIP
    /// is down.
    #[test]
    fn idle_only_with_nothing_held_and_nothing_up() {
        let t0 = Instant::now();
        let agent = Agent::new(1, cfg(), Arc::new(Recorder::default()));
        let idle = |agent: &Agent, now| agent.next_due(now).is_none();
        assert!(idle(&agent, t0));
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.expect("renewal");
        assert!(!idle(&agent, t0), "granted, lease not yet confirmed");
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        assert_eq!(agent.plan_step(&owned, t0).acquire.len(), 1);
        assert!(!idle(&agent, t0), "up");
        // The grant goes (moved elsewhere): fenced in the same pass, and idle after it.
        let s = agent.plan_step(&[], t0 + Duration::from_millis(10));
        assert_eq!(s.fence, vec![spec("cluster")]);
        assert!(idle(&agent, t0 + Duration::from_millis(10)));
    }

    /// The agent loop sleeps until `next_due`, so it must name the earliest of: the next
    /// renewal (sooner while unconfirmed), the lease end, the next announcement.
    #[test]
    fn next_due_is_the_earliest_renewal_lease_end_or_announcement() {
        let ms = Duration::from_millis;
        let agent_with = |duration, renew_every| {
            let lease = LeaseConfig {
                duration,
                renew_every,
                ..Default::default()
            };
            Agent::new(1, lease, Arc::new(Recorder::default()))
        };
        let t0 = Instant::now();
        let agent = agent_with(ms(100), ms(80));
        assert_eq!(agent.next_due(t0), None, "nothing held");
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        // Granted: a renewal goes out at once; unconfirmed, the next is due a quarter later.
        let r = agent.plan_step(&owned, t0).renewal.expect("renewal");
        assert_eq!(agent.next_due(t0), Some(t0 + ms(20)));
        // Confirmed: up at t0 + 1; the lease (t0 + 100) and the announcement (t0 + 251) are
        // later than the renewal (t0 + 80).
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        assert_eq!(agent.plan_step(&owned, t0 + ms(1)).acquire.len(), 1);
        assert_eq!(agent.next_due(t0 + ms(1)), Some(t0 + ms(80)));
        // The renewal at t0 + 80 goes unanswered: the lease end comes first now.
        assert!(agent.plan_step(&owned, t0 + ms(80)).renewal.is_some());
        assert_eq!(agent.next_due(t0 + ms(80)), Some(t0 + ms(100)));
        // At the lease end the VIP goes down; only the next renewal (t0 + 80 + 80) is left.
        assert_eq!(agent.plan_step(&owned, t0 + ms(100)).fence.len(), 1);
        assert_eq!(agent.next_due(t0 + ms(100)), Some(t0 + ms(160)));
        // An announcement can be the earliest: a long lease, up at t1, first announcement at +250.
        let agent = agent_with(ms(10_000), ms(5_000));
        let t1 = t0 + ms(1_000);
        let r = agent.plan_step(&owned, t1).renewal.expect("renewal");
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        assert_eq!(agent.plan_step(&owned, t1).acquire.len(), 1);
        assert_eq!(agent.next_due(t1), Some(t1 + ms(250)));
    }

    #[test]
    fn periodic_refresh_follows_the_burst() {
        let t0 = Instant::now();
        let agent = Agent::new(1, cfg(), Arc::new(Recorder::default()));
        agent.set_refresh(Some(Duration::from_secs(30)));
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        // A long-lived lease so the VIP stays up across the simulated minute.
        let mut t = t0;
        let mut announces = 0;
        while t < t0 + Duration::from_secs(62) {
            let s = agent.plan_step(&owned, t);
            if let Some(r) = s.renewal {
                agent.confirmed(&r, &[("cluster".into(), 2)]);
            }
            announces += s.announce.len();
            t += Duration::from_millis(50);
        }
        // Burst of 2 (0.25 s, 1 s), then refreshes at 1 s + 30 s and 1 s + 60 s.
        assert_eq!(announces, 4);
    }

    #[test]
    fn losing_the_grant_fences_even_with_lease_left() {
        let t0 = Instant::now();
        let agent = Agent::new(1, cfg(), Arc::new(Recorder::default()));
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        assert_eq!(agent.plan_step(&owned, t0).acquire.len(), 1);
        let s = agent.plan_step(&[], t0 + Duration::from_millis(10));
        assert_eq!(s.fence, vec![spec("cluster")]);
    }

    /// Followers of VIP ownership are told when a VIP came up (after the host side), when
    /// it was fenced, and when it was released on request; not on announcements.
    #[tokio::test]
    async fn vip_changes_are_told_once_the_host_side_is_done() {
        let t0 = Instant::now();
        let agent = Agent::new(1, cfg(), Arc::new(Recorder::default()));
        let mut changes = agent.changes();
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let up = agent.plan_step(&owned, t0 + Duration::from_millis(1));
        assert!(!changes.has_changed().unwrap(), "told before the VIP is up");
        agent.execute(&up).await;
        assert!(changes.has_changed().unwrap(), "not told the VIP came up");
        changes.borrow_and_update();
        let announce = agent.plan_step(&owned, t0 + Duration::from_millis(260));
        assert_eq!(announce.announce.len(), 1);
        agent.execute(&announce).await;
        assert!(!changes.has_changed().unwrap(), "told of an announcement");
        let fence = agent.plan_step(&[], t0 + Duration::from_millis(270));
        agent.execute(&fence).await;
        assert!(
            changes.has_changed().unwrap(),
            "not told the VIP was fenced"
        );
        changes.borrow_and_update();
        // Up again at a new epoch, then released on request.
        let owned = vec![(("cluster".to_string(), 3), spec("cluster"))];
        let r = agent
            .plan_step(&owned, t0 + Duration::from_millis(280))
            .renewal
            .unwrap();
        agent.confirmed(&r, &[("cluster".into(), 3)]);
        agent
            .execute(&agent.plan_step(&owned, t0 + Duration::from_millis(281)))
            .await;
        changes.borrow_and_update();
        agent.fence_and_hold("cluster", 3).await.unwrap();
        assert!(changes.has_changed().unwrap(), "not told of the release");
    }

    /// Takes its time to bring a VIP up (a conflict probe, a slow netlink answer).
    #[derive(Default)]
    struct Slow {
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl VipBackend for Slow {
        fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            let call = format!("up {}", vip.name);
            let calls = self.calls.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                calls.lock().unwrap().push(call);
                Ok(())
            })
        }
        fn announce(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            Box::pin(async { Ok(()) })
        }
        fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("down {}", vip.name));
            Box::pin(async { Ok(()) })
        }
    }

    /// `vip move` fences the owner while its takeover of the VIP may still be under way: the
    /// release must come after the takeover, or the VIP comes up behind it and stays up while
    /// another node is granted it.
    #[tokio::test]
    async fn a_release_during_a_takeover_leaves_the_vip_down() {
        let t0 = Instant::now();
        let backend = Arc::new(Slow::default());
        let agent = Arc::new(Agent::new(1, cfg(), backend.clone()));
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let step = agent.plan_step(&owned, t0);
        let taking = {
            let agent = agent.clone();
            tokio::spawn(async move { agent.execute(&step).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        agent.fence_and_hold("cluster", 2).await.unwrap();
        taking.await.unwrap();
        let calls = backend.calls.lock().unwrap().clone();
        assert_eq!(
            calls.last().map(String::as_str),
            Some("down cluster"),
            "{calls:?}"
        );
        assert!(agent.active_names().is_empty());
    }

    /// A lease that runs out while the takeover probes is not acted on after the probe.
    #[tokio::test]
    async fn a_lease_that_ends_during_the_probe_is_not_taken() {
        struct SlowProbe(Mutex<Vec<String>>);
        impl VipBackend for SlowProbe {
            fn prepare(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
                Box::pin(async {
                    tokio::time::sleep(Duration::from_millis(120)).await;
                    Ok(())
                })
            }
            fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
                self.0.lock().unwrap().push(format!("up {}", vip.name));
                Box::pin(async { Ok(()) })
            }
            fn announce(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
                Box::pin(async { Ok(()) })
            }
            fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
                self.0.lock().unwrap().push(format!("down {}", vip.name));
                Box::pin(async { Ok(()) })
            }
        }
        let backend = Arc::new(SlowProbe(Mutex::default()));
        let lease = LeaseConfig {
            duration: Duration::from_millis(100),
            renew_every: Duration::from_millis(25),
            ..Default::default()
        };
        let agent = Agent::new(1, lease, backend.clone());
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let t0 = Instant::now();
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let step = agent.plan_step(&owned, Instant::now());
        assert_eq!(step.acquire.len(), 1);
        let failed = agent.execute(&step).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert!(
            backend.0.lock().unwrap().is_empty(),
            "taken after the lease ended"
        );
        assert!(agent.active_names().is_empty());
    }

    /// Removing an address fails a few times (netlink busy, say) before it works.
    struct Stubborn {
        failures_left: Mutex<u32>,
        calls: Mutex<Vec<String>>,
    }

    impl VipBackend for Stubborn {
        fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            self.calls.lock().unwrap().push(format!("up {}", vip.name));
            Box::pin(async { Ok(()) })
        }
        fn announce(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            Box::pin(async { Ok(()) })
        }
        fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            let mut left = self.failures_left.lock().unwrap();
            let result = if *left > 0 {
                *left -= 1;
                self.calls
                    .lock()
                    .unwrap()
                    .push(format!("down {} failed", vip.name));
                Err(HoldError::Host("netlink timed out".into()))
            } else {
                self.calls
                    .lock()
                    .unwrap()
                    .push(format!("down {}", vip.name));
                Ok(())
            };
            Box::pin(async move { result })
        }
    }

    /// A self-fence that fails is tried again on every pass until the address is gone.
    #[tokio::test]
    async fn a_failed_self_fence_is_tried_again_until_it_works() {
        let t0 = Instant::now();
        let backend = Arc::new(Stubborn {
            failures_left: Mutex::new(2),
            calls: Mutex::default(),
        });
        let agent = Agent::new(1, cfg(), backend.clone());
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        agent.execute(&agent.plan_step(&owned, t0)).await;
        // The lease runs out: fenced, and the removal fails.
        let mut at = t0 + Duration::from_millis(300);
        agent.execute(&agent.plan_step(&owned, at)).await;
        assert!(
            agent.next_due(at).is_some(),
            "nothing due while the VIP may be up"
        );
        for _ in 0..3 {
            at += FENCE_RETRY;
            agent.execute(&agent.plan_step(&owned, at)).await;
        }
        assert_eq!(
            *backend.calls.lock().unwrap(),
            vec![
                "up cluster".to_string(),
                "down cluster failed".to_string(),
                "down cluster failed".to_string(),
                "down cluster".to_string(),
            ]
        );
        // Gone now: not tried again, and nothing left to do.
        assert!(agent.plan_step(&[], at + FENCE_RETRY).fence.is_empty());
    }

    /// A backend that cannot bring VIPs up (no capability, say).
    struct Broken;

    impl VipBackend for Broken {
        fn acquire(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            Box::pin(async { Err(HoldError::Host("missing CAP_NET_ADMIN".into())) })
        }
        fn announce(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            Box::pin(async { Ok(()) })
        }
        fn release(&self, _vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_vip_that_cannot_be_taken_is_not_renewed() {
        let t0 = Instant::now();
        let agent = Agent::new(1, cfg(), Arc::new(Broken));
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(1));
        let failed = agent.execute(&s).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, ("cluster".to_string(), 2));
        assert!(agent.active_names().is_empty());
        // Later steps neither retry nor renew it at that epoch.
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(200));
        assert!(s.acquire.is_empty() && s.renewal.is_none(), "{s:?}");
    }

    #[tokio::test]
    async fn released_placements_stay_down_at_that_epoch() {
        let t0 = Instant::now();
        let rec = Arc::new(Recorder::default());
        let agent = Agent::new(1, cfg(), rec.clone());
        let owned = vec![(("cluster".to_string(), 2), spec("cluster"))];
        let r = agent.plan_step(&owned, t0).renewal.unwrap();
        agent.confirmed(&r, &[("cluster".into(), 2)]);
        let s = agent.plan_step(&owned, t0);
        agent.execute(&s).await;
        agent.fence_and_hold("cluster", 2).await.unwrap();
        let s = agent.plan_step(&owned, t0 + Duration::from_millis(5));
        assert!(s.acquire.is_empty());
        assert_eq!(
            *rec.calls.lock().unwrap(),
            vec!["up cluster".to_string(), "down cluster".to_string()]
        );
        // Granted again at a later epoch: it may come back.
        let owned = vec![(("cluster".to_string(), 4), spec("cluster"))];
        // (unconfirmed grants are renewed at a quarter of the normal pace)
        let r = agent
            .plan_step(&owned, t0 + Duration::from_millis(30))
            .renewal
            .unwrap();
        agent.confirmed(&r, &[("cluster".into(), 4)]);
        assert_eq!(
            agent
                .plan_step(&owned, t0 + Duration::from_millis(31))
                .acquire
                .len(),
            1
        );
    }
}
