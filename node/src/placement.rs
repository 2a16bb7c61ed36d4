//! The daemon's placement service: VIP agent loop, the leader's controller loop, lease RPCs,
//! VIP admin operations and graceful hand-over on shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use spaced_fabric::{Command, Millis, PlacementKind};
use spaced_raft::network::{BoxFuture, NodeHooks, RaftReply, RaftRpc};
use spaced_raft::{NodeId, Outcome, Response};
use tokio::sync::watch;

use crate::admin::{RefusalRow, VipRow};
use crate::agent::{Agent, LoopbackBackend, MAX_GAP, MIN_GAP, VipBackend, owned_vips};
use crate::config::{NodeConfig, TakeoverMode, VipSection};
use crate::daemon::{NodeInner, now_millis};
use crate::lease::{Held, LeaseConfig, LeaseKey, Witness, joint_majority, quorum_silent};
use crate::lock;
use spaced_fabric::plan::placements::{eligible, plan};

/// How often the leader plans.
const PLAN_EVERY: Duration = Duration::from_millis(10);
/// An agent with nothing granted and nothing up waits for a fabric change, but looks at least
/// this often anyway (a safety net, not the way it learns of grants).
const AGENT_IDLE_LOOK: Duration = Duration::from_secs(1);
/// How often the agent forgets witnessed leases of placements that moved on.
const WITNESS_PRUNE_EVERY: Duration = Duration::from_secs(5);
/// A node that handed its placements over is not granted any for this long (it is exiting).
const STOPPING_FOR: Duration = Duration::from_secs(10);
/// A peer counts as live for placement while the leader heard from it this recently.
const LIVE_WITHIN: Duration = Duration::from_millis(1000);

/// Placement state of one node.
pub struct Placements {
    /// Lease timing.
    pub(crate) lease: LeaseConfig,
    /// The VIP agent.
    pub(crate) agent: Arc<Agent>,
    /// This node's witness of renewals (used when it votes).
    pub(crate) witness: Mutex<Witness>,
    /// When this node last became leader (for the step-aside policy).
    pub(crate) leading_since: Mutex<Option<Instant>>,
    /// Nodes handing their placements over because they are stopping, and since when: the
    /// planner must not grant them anything back.
    pub(crate) stopping: Mutex<BTreeMap<NodeId, Instant>>,
    /// Operator-requested targets of `vip move`, consulted by the planner.
    pub(crate) moves: Mutex<BTreeMap<String, NodeId>>,
    /// Runs this node's services (and the singletons it holds).
    pub(crate) supervisor: crate::supervisor::Supervisor,
    /// Wakes the services loop when a singleton lease arrives.
    pub(crate) services_wake: Arc<tokio::sync::Notify>,
    /// The agent's backend, also asked by the services loop to guard new singleton processes.
    pub(crate) placement_backend: Arc<crate::services::PlacementBackend>,
}

impl Placements {
    /// Builds the agent with the configured takeover backend; checks the config's VIPs against
    /// the host (interface present, address inside its subnet, capabilities) before anything runs.
    pub async fn new(
        cfg: &NodeConfig,
        recorder: Arc<dyn metrics::Recorder + Send + Sync>,
    ) -> Result<Self, String> {
        let lease = LeaseConfig {
            duration: Duration::from_millis(cfg.lease.duration_ms),
            renew_every: Duration::from_millis(cfg.lease.renew_every_ms),
            margin: Duration::from_millis(cfg.lease.margin_ms),
            drift: cfg.lease.drift,
        };
        let file = cfg.source.display();
        let backend: Arc<dyn VipBackend> = match cfg.takeover {
            TakeoverMode::Loopback => {
                let ports = cfg
                    .vips
                    .iter()
                    .filter_map(|v| v.port.map(|p| (v.name.clone(), p)))
                    .collect();
                Arc::new(LoopbackBackend::new(cfg.name.clone(), ports))
            }
            TakeoverMode::Netlink => {
                let backend = crate::takeover_backend::NetlinkBackend::new()
                    .await
                    .map_err(|e| format!("config {file}: takeover: {e}"))?;
                if !cfg.vips.is_empty() {
                    crate::takeover::check_capabilities().map_err(|e| {
                        format!("config {file}: key `vip`: this node cannot hold VIPs: {e}")
                    })?;
                }
                for (i, v) in cfg.vips.iter().enumerate() {
                    backend
                        .check(&v.address, &v.interface)
                        .await
                        .map_err(|e| format!("config {file}: key `vip[{i}]`: {e}"))?;
                }
                Arc::new(backend)
            }
        };
        let log_dir = cfg.data_dir.join("service-logs");
        let supervisor = crate::supervisor::Supervisor::start_with_recorder(
            crate::supervisor::SupervisorConfig::new(&log_dir),
            recorder,
        )
        .map_err(|e| format!("config {file}: key `data_dir`: service supervisor: {e}"))?;
        let services_wake = Arc::new(tokio::sync::Notify::new());
        let placement_backend = Arc::new(crate::services::PlacementBackend::new(
            backend,
            supervisor.clone(),
            services_wake.clone(),
        ));
        let agent = Agent::new(cfg.node_id, lease.clone(), placement_backend.clone());
        agent
            .set_refresh((cfg.garp_refresh_s > 0).then(|| Duration::from_secs(cfg.garp_refresh_s)));
        Ok(Placements {
            agent: Arc::new(agent),
            witness: Mutex::new(Witness::new(Instant::now())),
            leading_since: Mutex::new(None),
            stopping: Mutex::default(),
            lease,
            moves: Mutex::default(),
            supervisor,
            services_wake,
            placement_backend,
        })
    }
}

/// Proposes `cmd` through whichever node leads (locally when this node does): `Ok` carries the
/// applied result (a refused command included), `Err` means it was not delivered.
pub(crate) async fn propose_anywhere(inner: &NodeInner, cmd: Command) -> Result<Response, String> {
    if inner.raft.is_leader() {
        return inner.commit(cmd).await.map_err(|e| e.to_string());
    }
    let leader = inner
        .raft
        .metrics()
        .borrow_watched()
        .current_leader
        .ok_or("no leader")?;
    let member = inner.member(leader).ok_or("leader not in membership")?;
    match inner
        .network
        .call(
            leader,
            &member,
            RaftRpc::Propose(cmd),
            Duration::from_secs(3),
        )
        .await?
    {
        RaftReply::Proposed(r) => Ok(r),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// The VIP agent: reconcile when something falls due, the fabric changes or the agent is
/// poked; renew with the voters.
pub(crate) async fn agent_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let agent = inner.placements.agent.clone();
    let renewing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut fabric_changed = inner.view.changes();
    let mut pruned = Instant::now();
    let mut next = tokio::time::Instant::now();
    let mut last_pass: Option<Instant> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            Ok(()) = fabric_changed.changed() => {}
            () = agent.poked() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if let Some(gap) = last_pass.map(|t| t.elapsed()).filter(|gap| *gap < MIN_GAP) {
            tokio::time::sleep(MIN_GAP - gap).await;
        }
        last_pass = Some(Instant::now());
        // Seen before reading: a grant applied from now on wakes the wait above.
        fabric_changed.borrow_and_update();
        let owned = inner.view.read(|f| owned_vips(f, inner.id));
        if pruned.elapsed() >= WITNESS_PRUNE_EVERY {
            pruned = Instant::now();
            // Keep the witness bounded: forget leases of placements that moved on.
            let current: BTreeMap<String, u64> = inner.view.read(|f| {
                f.placements
                    .iter()
                    .map(|(n, p)| (n.clone(), p.epoch))
                    .collect()
            });
            lock(&inner.placements.witness)
                .retain(|(n, e, _)| current.get(n).is_some_and(|c| e >= c));
        }
        let step = agent.plan_step(&owned, Instant::now());
        if let Some(renewal) = step.renewal.clone()
            && !renewing.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let inner = inner.clone();
            let renewing = renewing.clone();
            tokio::spawn(async move {
                match renew(&inner, renewal.placements.clone()).await {
                    Ok(confirmed) => inner.placements.agent.confirmed(&renewal, &confirmed),
                    Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
                }
                renewing.store(false, std::sync::atomic::Ordering::SeqCst);
            });
        }
        for (held, reason) in agent.execute(&step).await {
            give_back(&inner, held, reason);
        }
        // Sleep until the next thing falls due. With nothing granted here and nothing up,
        // nothing can before the fabric grants this node something (most nodes own nothing
        // most of the time), so only the fabric or the safety net wakes it.
        let now = Instant::now();
        let due = match agent.next_due(now) {
            Some(due) => due.min(now + MAX_GAP),
            None if owned.is_empty() => now + AGENT_IDLE_LOOK,
            None => now + MAX_GAP,
        };
        next = tokio::time::Instant::from_std(due);
    }
}

/// Gives a placement this node cannot hold back to the fabric, saying why (a VIP it could not
/// add, a singleton it cannot keep running): fenced and held down here first (nothing more to
/// do if that already happened), then refused. In the background and best effort: if the
/// refusal does not commit, the lease, no longer renewed, lapses and the placement moves on
/// anyway (only without the reason and the hold).
pub(crate) fn give_back(inner: &Arc<NodeInner>, (name, epoch): Held, reason: String) {
    let inner = inner.clone();
    tokio::spawn(async move {
        if let Err(e) = inner.placements.agent.fence_and_hold(&name, epoch).await {
            tracing::error!(placement = %name, epoch, error = %e, "could not stop what it gives back");
        }
        let cmd = Command::RefusePlacement {
            name: name.clone(),
            node: inner.id,
            epoch,
            reason: reason.clone(),
            at: now_millis(),
        };
        for _ in 0..3 {
            match propose_anywhere(&inner, cmd.clone()).await {
                Ok(Ok(_)) => {
                    tracing::warn!(placement = %name, epoch, %reason, "placement refused: given back for another node");
                    return;
                }
                Ok(Err(e)) => {
                    // It moved on meanwhile (lease lapsed, re-granted): nothing to give back.
                    tracing::debug!(placement = %name, epoch, error = %e, "refusal not needed");
                    return;
                }
                Err(e) => {
                    tracing::debug!(placement = %name, epoch, error = %e, "refusal not delivered; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tracing::warn!(placement = %name, epoch, "could not deliver the refusal; its lease will lapse");
    });
}

/// Sends one renewal to every voter; succeeds once voters holding a majority of every voter
/// set (see [`joint_majority`]) recorded it.
async fn renew(inner: &Arc<NodeInner>, held: Vec<Held>) -> Result<Vec<Held>, String> {
    use futures::StreamExt;
    let ttl = inner
        .placements
        .lease
        .renew_every
        .max(Duration::from_millis(50));
    let configs = voter_configs(inner);
    let mut calls = futures::stream::FuturesUnordered::new();
    for (v, member) in voters(inner) {
        let inner = inner.clone();
        let held = held.clone();
        calls.push(async move {
            if v == inner.id {
                return (v, Ok(record_renewal(&inner, inner.id, held)));
            }
            let Some(member) = member else {
                return (v, Err("voter not in membership".to_string()));
            };
            let reply = match inner
                .network
                .call(v, &member, RaftRpc::Renew(held), ttl)
                .await
            {
                Ok(RaftReply::Renewed(c)) => Ok(c),
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            (v, reply)
        });
    }
    // A placement's lease counts once a quorum confirmed that placement at that epoch;
    // voters confirm only what their own fabric grants us.
    let mut acks: BTreeMap<Held, BTreeSet<NodeId>> = BTreeMap::new();
    let mut answered = BTreeSet::new();
    let mut last_err = String::from("no voters");
    let quorum = |acks: &BTreeMap<Held, BTreeSet<NodeId>>, h: &Held| {
        acks.get(h).is_some_and(|by| joint_majority(&configs, by))
    };
    while let Some((v, r)) = calls.next().await {
        match r {
            Ok(confirmed) => {
                answered.insert(v);
                for h in confirmed {
                    acks.entry(h).or_default().insert(v);
                }
                if held.iter().all(|h| quorum(&acks, h)) {
                    return Ok(held);
                }
            }
            Err(e) => last_err = e,
        }
    }
    let confirmed: Vec<Held> = held.into_iter().filter(|h| quorum(&acks, h)).collect();
    if joint_majority(&configs, &answered) {
        return Ok(confirmed);
    }
    Err(format!(
        "renewal answered by voters {answered:?}, not a majority of {configs:?} (last error: {last_err})"
    ))
}

/// The voter sets a lease decision needs a majority of: one, or two during a joint-consensus
/// membership change.
fn voter_configs(inner: &NodeInner) -> Vec<BTreeSet<NodeId>> {
    inner.membership().membership().get_joint_config().clone()
}

/// The current voters and how to reach them.
fn voters(inner: &NodeInner) -> Vec<(NodeId, Option<spaced_raft::Member>)> {
    let membership = inner.membership();
    let membership = membership.membership();
    membership
        .voter_ids()
        .map(|v| (v, membership.get_node(&v).cloned()))
        .collect()
}

/// Every lease the fabric knows of now: (placement, epoch, owner).
fn lease_keys(inner: &NodeInner) -> Vec<LeaseKey> {
    inner.view.read(|f| {
        f.placements
            .iter()
            .filter_map(|(n, p)| p.owner.map(|o| (n.clone(), p.epoch, o)))
            .collect()
    })
}

/// A voter records a renewal from `from`. No leadership or ownership check is needed: the
/// record is only ever used to *delay* a reassignment.
/// A voter confirms only what its own applied fabric grants `from` at that epoch: a node acting
/// on an old grant (restarted and still replaying its log, or back from a partition) gets no
/// lease for a placement that has since moved on.
fn record_renewal(inner: &NodeInner, from: NodeId, held: Vec<Held>) -> Vec<Held> {
    let now = Instant::now();
    let current: Vec<Held> = inner.view.read(|f| {
        held.into_iter()
            .filter(|(name, epoch)| {
                f.placements
                    .get(name)
                    .is_some_and(|p| p.owner == Some(from) && p.epoch == *epoch)
            })
            .collect()
    });
    let mut w = lock(&inner.placements.witness);
    for (name, epoch) in &current {
        w.renewed((name.clone(), *epoch, from), now);
    }
    current
}

/// Silence per lease as this node's witness sees it.
fn local_silence(inner: &NodeInner, keys: &[LeaseKey]) -> Vec<Duration> {
    let now = Instant::now();
    let mut w = lock(&inner.placements.witness);
    keys.iter().map(|k| w.silence(k, now)).collect()
}

/// On the leader: the placements whose owner a majority of voters has not heard from for a
/// full span. Asks the other voters only about leases its own witness finds silent.
async fn expired_leases(inner: &Arc<NodeInner>) -> BTreeSet<String> {
    let span = inner.placements.lease.reassign_after();
    let keys = lease_keys(inner);
    let mine = local_silence(inner, &keys);
    let suspects: Vec<LeaseKey> = keys
        .into_iter()
        .zip(mine)
        .filter(|(_, d)| *d > span)
        .map(|(k, _)| k)
        .collect();
    if suspects.is_empty() {
        return BTreeSet::new();
    }
    let configs = voter_configs(inner);
    let asks = voters(inner).into_iter().map(|(v, member)| {
        let inner = inner.clone();
        let suspects = suspects.clone();
        async move {
            if v == inner.id {
                return Some((v, local_silence(&inner, &suspects)));
            }
            let rpc = RaftRpc::Silence(suspects.clone());
            match inner
                .network
                .call(v, &member?, rpc, Duration::from_millis(100))
                .await
            {
                Ok(RaftReply::Silences(ms)) if ms.len() == suspects.len() => Some((
                    v,
                    ms.into_iter()
                        .map(Duration::from_millis)
                        .collect::<Vec<_>>(),
                )),
                _ => None,
            }
        }
    });
    let mut reports: Vec<Vec<(NodeId, Duration)>> = vec![Vec::new(); suspects.len()];
    for (v, answer) in futures::future::join_all(asks).await.into_iter().flatten() {
        for (i, d) in answer.into_iter().enumerate() {
            reports[i].push((v, d));
        }
    }
    suspects
        .into_iter()
        .zip(reports)
        .filter(|(_, r)| quorum_silent(&inner.placements.lease, &configs, r))
        .map(|((name, ..), _)| name)
        .collect()
}

/// Nodes the leader heard from within `within`, plus itself.
pub(crate) fn live_nodes(inner: &NodeInner, within: Duration) -> BTreeSet<NodeId> {
    let mut live: BTreeSet<NodeId> = inner
        .contacts()
        .into_iter()
        .filter(|(_, t)| t.is_some_and(|t| t < within))
        .map(|(id, _)| id)
        .collect();
    live.insert(inner.id);
    live
}

/// On the leader: the nodes work may go to now: heard from within `within` and not stopping.
/// Placements count [`LIVE_WITHIN`]; devices their own `[devices] lost_after_ms`.
pub(crate) fn live_set(inner: &NodeInner, within: Duration) -> BTreeSet<NodeId> {
    let mut live = live_nodes(inner, within);
    let mut stopping = lock(&inner.placements.stopping);
    stopping.retain(|_, since| since.elapsed() < STOPPING_FOR);
    live.retain(|n| !stopping.contains_key(n));
    live
}

/// On the leader: plan and propose grants and take-backs.
pub(crate) async fn controller_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PLAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_step_aside: Option<Instant> = None;
    // Changes with the server state (leader, follower, candidate), the vote and membership,
    // not with every heartbeat: a follower sleeps on it instead of ticking.
    let mut server = inner.raft.server_metrics();
    loop {
        let was_leading = server.borrow_watched().state.is_leader();
        let raft_gone = tokio::select! {
            _ = tick.tick(), if was_leading => false,
            changed = server.changed(), if !was_leading => changed.is_err(),
            _ = shutdown.wait_for(|s| *s) => return,
        };
        if raft_gone {
            // Raft has shut down: tick (and find no leadership) until shutdown.
            tick.tick().await;
        }
        let leading = inner.raft.is_leader();
        {
            let mut since = lock(&inner.placements.leading_since);
            match (leading, since.is_some()) {
                (true, false) => *since = Some(Instant::now()),
                (false, true) => *since = None,
                _ => {}
            }
        }
        if !leading {
            continue;
        }
        let live = live_set(&inner, LIVE_WITHIN);
        step_aside_if_owner(&inner, &live, &mut last_step_aside).await;
        let prefer = lock(&inner.placements.moves).clone();
        let expired = expired_leases(&inner).await;
        let cmds = inner
            .view
            .read(|f| plan(f, &live, inner.id, &expired, &prefer, now_millis()));
        for cmd in cmds {
            let desc = cmd.to_string();
            match inner.propose(cmd.clone()).await {
                Ok(Outcome::Epoch(epoch)) => {
                    if let Command::GrantPlacement { name, to, .. } = &cmd {
                        // The grant counts as hearing from the new owner: a full span to start renewing.
                        lock(&inner.placements.witness)
                            .renewed((name.clone(), epoch, *to), Instant::now());
                        tracing::info!(placement = %name, to, epoch, "placement granted");
                    } else {
                        tracing::warn!(command = %desc, epoch, "placement taken back: no eligible live node");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(command = %desc, error = %e, "placement change refused"),
            }
        }
    }
}

/// A leader that also holds placements makes its own crash cost an election *and* a lease
/// span; hand leadership to a live voter that holds none (at most every 5 s).
async fn step_aside_if_owner(
    inner: &NodeInner,
    live: &BTreeSet<NodeId>,
    last: &mut Option<Instant>,
) {
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
        return;
    }
    let (owns, owners) = inner.view.read(|f| {
        let owners: BTreeSet<NodeId> = f.placements.values().filter_map(|p| p.owner).collect();
        (owners.contains(&inner.id), owners)
    });
    if !owns {
        return;
    }
    // Only in a settled cluster: leading for a while, membership committed and not joint,
    // at least three voters, and the target fully caught up.
    let settled =
        lock(&inner.placements.leading_since).is_some_and(|t| t.elapsed() > Duration::from_secs(2));
    if !settled {
        return;
    }
    let to = {
        let m = inner.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        let stable = m.membership_config.log_id() == m.committed_membership_config.log_id()
            && membership.get_joint_config().len() == 1;
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let replication = m.replication.clone().unwrap_or_default();
        let caught_up = |v: &NodeId| {
            replication
                .get(v)
                .is_some_and(|l| l.map(|l| l.index) == m.last_log_index)
        };
        if !stable || voters.len() < 3 {
            return;
        }
        voters
            .into_iter()
            .find(|v| *v != inner.id && live.contains(v) && !owners.contains(v) && caught_up(v))
    };
    if let Some(to) = to {
        *last = Some(Instant::now());
        tracing::info!(
            to,
            "leader holds placements: handing leadership to a voter that holds none"
        );
        if let Err(e) = inner.raft.trigger().transfer_leader(to).await {
            tracing::warn!(to, error = %e, "leadership transfer failed");
        }
    }
}

/// Registers the config's VIPs in the fabric (once; the first node to declare a name wins).
pub(crate) async fn register_config_vips(inner: Arc<NodeInner>, vips: Vec<VipSection>) {
    for v in vips {
        let cmd = Command::AddPlacement {
            name: v.name.clone(),
            kind: PlacementKind::Vip {
                address: v.address.clone(),
                interface: v.interface.clone(),
            },
            eligible_roles: v.roles.iter().cloned().collect(),
        };
        loop {
            let known = inner
                .view
                .read(|f| f.placements.get(&v.name).map(|p| p.kind.clone()));
            match known {
                Some(PlacementKind::Vip { address, .. }) if address == v.address => break,
                Some(other) => {
                    tracing::error!(vip = %v.name, fabric = ?other, config = %v.address, "VIP in this node's config differs from the fabric's; the fabric's is kept");
                    break;
                }
                None => {}
            }
            match propose_anywhere(&inner, cmd.clone()).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::error!(vip = %v.name, error = %e, "VIP from config refused by the fabric");
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Records this node's management IP from its config in the fabric, once it is registered
/// there (at start, or when it joins later), if the fabric has another (or none); `None` in
/// the config clears it. Stops when the fabric agrees, or refuses (logged), or at shutdown.
pub(crate) async fn record_mgmt_ip(
    inner: Arc<NodeInner>,
    want: Option<IpAddr>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fabric_changed = inner.view.changes();
    loop {
        fabric_changed.borrow_and_update();
        let recorded = inner
            .view
            .read(|f| f.nodes.get(&inner.id).map(|n| n.mgmt_ip));
        match recorded {
            Some(ip) if ip == want => return,
            Some(_) => {
                let cmd = Command::SetMgmtIp {
                    id: inner.id,
                    mgmt_ip: want,
                };
                match propose_anywhere(&inner, cmd).await {
                    Ok(Ok(_)) => {
                        tracing::info!(mgmt_ip = ?want, "management IP recorded in the fabric");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::error!(mgmt_ip = ?want, error = %e, "management IP refused by the fabric");
                        return;
                    }
                    // No leader yet, or it did not answer: try again shortly.
                    Err(_) => {}
                }
            }
            // Not registered yet: wait for the fabric to change.
            None => {}
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = fabric_changed.changed(), if recorded.is_none() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(100)), if recorded.is_some() => {}
        }
    }
}

/// The RPC handlers this node offers its peers.
pub(crate) struct Hooks(pub(crate) Arc<NodeInner>);

impl NodeHooks for Hooks {
    fn renew(
        &self,
        from: NodeId,
        held: Vec<Held>,
    ) -> BoxFuture<'static, Result<Vec<Held>, String>> {
        let recorded = record_renewal(&self.0, from, held);
        Box::pin(async move { Ok(recorded) })
    }

    fn silence(&self, keys: Vec<LeaseKey>) -> BoxFuture<'static, Result<Vec<u64>, String>> {
        let ms = local_silence(&self.0, &keys)
            .into_iter()
            .map(|d| d.as_millis() as u64)
            .collect();
        Box::pin(async move { Ok(ms) })
    }

    fn propose(
        &self,
        _from: NodeId,
        mut cmd: Command,
    ) -> BoxFuture<'static, Result<Response, String>> {
        stamp_with_leader_clock(&mut cmd, now_millis());
        let inner = self.0.clone();
        Box::pin(async move { inner.commit(cmd).await.map_err(|e| e.to_string()) })
    }

    fn leaving(&self, from: NodeId) {
        lock(&self.0.placements.stopping).insert(from, Instant::now());
    }

    fn release(&self, name: String, epoch: u64) -> BoxFuture<'static, Result<(), String>> {
        let inner = self.0.clone();
        Box::pin(async move { inner.placements.agent.fence_and_hold(&name, epoch).await })
    }

    fn check_vip(&self, address: String, interface: String) -> BoxFuture<'static, Option<String>> {
        check_vip_here(&self.0, address, interface)
    }

    fn admin(
        &self,
        from: NodeId,
        admin: String,
        request: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let inner = self.0.clone();
        Box::pin(async move { inner.serve_forwarded_admin(from, admin, request).await })
    }
}

/// A refusal a peer sent to the leader carries the time the leader received it, not the
/// peer's clock: the planner, on the leader, measures its hold and retry periods against its
/// own clock, so a peer's clock skew must not stretch or cancel them.
fn stamp_with_leader_clock(cmd: &mut Command, now: Millis) {
    if let Command::RefusePlacement { at, .. } = cmd {
        *at = now;
    }
}

/// Whether node `id` (this one or a peer) could hold a VIP: `Ok(None)` yes, `Ok(Some(why))`
/// no, `Err` no answer.
async fn check_vip_on(
    inner: &NodeInner,
    id: NodeId,
    address: String,
    interface: String,
) -> Result<Option<String>, String> {
    if id == inner.id {
        return Ok(check_vip_here(inner, address, interface).await);
    }
    let member = inner.member(id).ok_or("not a member")?;
    let rpc = RaftRpc::CheckVip { address, interface };
    match inner.network.call(id, &member, rpc, CHECK_VIP_WITHIN).await {
        Ok(RaftReply::VipChecked(answer)) => Ok(answer),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

/// Whether this node could hold a VIP (`None`) or why not.
fn check_vip_here(
    inner: &NodeInner,
    address: String,
    interface: String,
) -> BoxFuture<'static, Option<String>> {
    let spec = crate::agent::VipSpec {
        name: String::new(),
        address,
        interface,
        service: None,
    };
    let check = inner.placements.placement_backend.check(spec);
    Box::pin(async move { check.await.err() })
}

/// How long `vip add` waits for each node's answer to whether it could hold the VIP.
const CHECK_VIP_WITHIN: Duration = Duration::from_secs(2);

/// Rows for `vip list` / `status`, with the leader's view of lease time left.
pub(crate) fn vip_rows(inner: &NodeInner) -> Vec<VipRow> {
    let span = inner.placements.lease.reassign_after();
    let known = lease_keys(inner);
    let silences: BTreeMap<String, Duration> = known
        .iter()
        .map(|k| k.0.clone())
        .zip(local_silence(inner, &known))
        .collect();
    let now = now_millis();
    inner.view.read(|f| {
        f.placements
            .iter()
            .filter_map(|(name, p)| match &p.kind {
                PlacementKind::Vip { address, interface } => Some(VipRow {
                    name: name.clone(),
                    address: address.clone(),
                    interface: interface.clone(),
                    roles: p.eligible_roles.iter().cloned().collect(),
                    owner: p.owner,
                    owner_name: p
                        .owner
                        .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone())),
                    epoch: p.epoch,
                    // Time until this node's witness would count the owner as silent.
                    lease_ms: p
                        .owner
                        .and(silences.get(name))
                        .map(|d| span.saturating_sub(*d).as_millis() as u64),
                    refused: RefusalRow::of(f, p, now),
                }),
                PlacementKind::Singleton { .. } => None,
            })
            .collect()
    })
}

/// `vip add` on the leader: asks every live node with one of the roles whether it could hold
/// the VIP (interface present, address inside one of its subnets, capabilities) and refuses a
/// VIP none of them can hold, naming each node's reason; nothing is added then. When some can,
/// returns the nodes (name, reason) that said they cannot, and those (name, why) that were not
/// asked or did not answer.
pub(crate) async fn vip_add(
    inner: &NodeInner,
    name: String,
    address: String,
    interface: String,
    roles: Vec<String>,
) -> Result<NodeAnswers, String> {
    let roles: BTreeSet<String> = roles.into_iter().collect();
    let candidates: Vec<(NodeId, String)> = inner.view.read(|f| {
        f.nodes
            .iter()
            .filter(|(_, n)| !n.roles.is_disjoint(&roles))
            .map(|(id, n)| (*id, n.name.clone()))
            .collect()
    });
    if candidates.is_empty() {
        return Err(format!(
            "no node has any of the roles {roles:?}; VIP {name:?} could never be placed"
        ));
    }
    let live = &live_set(inner, LIVE_WITHIN);
    let answers = futures::future::join_all(candidates.iter().map(|(id, node)| {
        let (address, interface) = (address.clone(), interface.clone());
        async move {
            let answer = if live.contains(id) {
                check_vip_on(inner, *id, address, interface).await
            } else {
                Err("not live, so not asked".to_string())
            };
            (node.clone(), answer)
        }
    }))
    .await;
    let mut can = 0;
    let mut cannot = Vec::new();
    let mut unknown = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(None) => can += 1,
            Ok(Some(why)) => cannot.push((node, why)),
            Err(why) => unknown.push((node, why)),
        }
    }
    if can == 0 {
        let all: Vec<String> = cannot
            .iter()
            .chain(&unknown)
            .map(|(node, why)| format!("{node}: {why}"))
            .collect();
        return Err(format!(
            "VIP {name:?} ({address} on {interface}) not added: no node with one of the roles \
             {roles:?} can hold it ({})",
            all.join("; ")
        ));
    }
    let cmd = Command::AddPlacement {
        name,
        kind: PlacementKind::Vip { address, interface },
        eligible_roles: roles,
    };
    inner.propose(cmd).await?;
    Ok((cannot, unknown))
}

/// Nodes (name, reason) that said they cannot hold a VIP, and nodes (name, why) that were not
/// asked or did not answer.
pub(crate) type NodeAnswers = (Vec<(String, String)>, Vec<(String, String)>);

/// `vip move` on the leader: the owner fences and the release commits before the target is granted.
pub(crate) async fn vip_move(inner: &NodeInner, name: &str, to: NodeId) -> Result<u64, String> {
    let (owner, epoch, ok, vip) = inner.view.read(|f| {
        let p = f
            .placements
            .get(name)
            .ok_or_else(|| format!("no VIP {name:?}"))?;
        let vip = match &p.kind {
            PlacementKind::Vip { address, interface } => Some((address.clone(), interface.clone())),
            PlacementKind::Singleton { .. } => None,
        };
        Ok::<_, String>((p.owner, p.epoch, eligible(f, p, to), vip))
    })?;
    if !ok {
        return Err(format!(
            "node {to} is not eligible for {name:?} (roles or draining)"
        ));
    }
    if !live_nodes(inner, LIVE_WITHIN).contains(&to) {
        return Err(format!("node {to} is not reachable from the leader"));
    }
    if owner == Some(to) {
        return Err(format!("{name:?} is already on node {to}"));
    }
    // Ask the target before the owner lets go: a VIP it cannot hold would be given straight back.
    if let Some((address, interface)) = vip {
        match check_vip_on(inner, to, address, interface).await {
            Ok(None) => {}
            Ok(Some(why)) => return Err(format!("node {to} cannot hold {name:?}: {why}")),
            Err(e) => {
                return Err(format!(
                    "node {to} did not say whether it can hold {name:?}: {e}"
                ));
            }
        }
    }
    lock(&inner.placements.moves).insert(name.to_string(), to);
    let result = async {
        if let Some(o) = owner {
            if o == inner.id {
                inner.placements.agent.fence_and_hold(name, epoch).await?;
            } else {
                let member = inner
                    .member(o)
                    .ok_or_else(|| format!("owner {o} is not a member"))?;
                let rpc = RaftRpc::Release {
                    name: name.to_string(),
                    epoch,
                };
                match inner
                    .network
                    .call(o, &member, rpc, Duration::from_secs(2))
                    .await
                {
                    Ok(RaftReply::Released) => {}
                    Ok(other) => return Err(format!("owner {o}: unexpected reply {other:?}")),
                    Err(e) => return Err(format!("owner {o} did not release {name:?}: {e}")),
                }
            }
            inner
                .propose(Command::ReleasePlacement {
                    name: name.to_string(),
                    epoch,
                })
                .await?;
        }
        // The planner grants it to `to` (preferred) on its next pass; wait for that.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let now_owner = inner
                .view
                .read(|f| f.placements.get(name).map(|p| (p.owner, p.epoch)));
            if let Some((Some(o), e)) = now_owner
                && o == to
            {
                return Ok(e);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name:?} was released but not granted to node {to} within 3 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    lock(&inner.placements.moves).remove(name);
    result
}

/// Tells the leader (or this node's own planner, when it leads) not to grant this node
/// anything back while it stops. Best effort: without it a re-grant just lapses.
async fn tell_leader_leaving(inner: &NodeInner) {
    let leader = inner.raft.metrics().borrow_watched().current_leader;
    match leader {
        Some(l) if l == inner.id => {
            lock(&inner.placements.stopping).insert(inner.id, Instant::now());
        }
        Some(l) => {
            let Some(member) = inner.member(l) else {
                return;
            };
            if let Err(e) = inner
                .network
                .call(l, &member, RaftRpc::Leaving, Duration::from_secs(1))
                .await
            {
                tracing::warn!(leader = l, error = %e, "could not tell the leader this node is leaving");
            }
        }
        None => {}
    }
}

/// Graceful stop: fence and release every VIP, let the leader re-grant them, and hand
/// leadership to another voter if this node leads.
pub(crate) async fn hand_over(inner: &Arc<NodeInner>) {
    let held = inner.placements.agent.stop().await;
    tell_leader_leaving(inner).await;
    for (name, epoch) in &held {
        match propose_anywhere(
            inner,
            Command::ReleasePlacement {
                name: name.clone(),
                epoch: *epoch,
            },
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!(vip = %name, epoch, "released for hand-over"),
            Ok(Err(e)) => tracing::warn!(vip = %name, error = %e, "release refused"),
            Err(e) => {
                tracing::warn!(vip = %name, error = %e, "release not delivered; the lease will run out")
            }
        }
    }
    if !inner.raft.is_leader() {
        return;
    }
    // Let this node's planner grant the released placements elsewhere before it stops leading.
    let deadline = Instant::now() + Duration::from_secs(1);
    let names: Vec<String> = held.iter().map(|(n, _)| n.clone()).collect();
    while Instant::now() < deadline {
        let done = inner.view.read(|f| {
            names.iter().all(|n| {
                f.placements
                    .get(n)
                    .is_none_or(|p| p.owner.is_some_and(|o| o != inner.id))
            })
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The voter heard from most recently is the best placed to lead.
    let contacts = inner.contacts();
    let target = voters(inner)
        .into_iter()
        .map(|(v, _)| v)
        .filter(|v| *v != inner.id)
        .min_by_key(|v| contacts.get(v).copied().flatten().unwrap_or(Duration::MAX));
    if let Some(to) = target {
        if let Err(e) = inner.raft.trigger().transfer_leader(to).await {
            tracing::warn!(to, error = %e, "leadership transfer on shutdown failed");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && inner.raft.is_leader() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!(to, "leadership handed over");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_sent_to_the_leader_is_stamped_with_the_leaders_clock() {
        let refusal = |at| Command::RefusePlacement {
            name: "vip".into(),
            node: 2,
            epoch: 7,
            reason: "no such interface".into(),
            at,
        };
        // The peer's clock runs an hour ahead; the leader's time replaces it.
        let mut cmd = refusal(5_000_000);
        stamp_with_leader_clock(&mut cmd, 1_400_000);
        assert_eq!(cmd, refusal(1_400_000));
        // Other commands keep the proposer's times.
        let other = || Command::AddDevices {
            devices: Vec::new(),
            at: 5_000_000,
        };
        let mut cmd = other();
        stamp_with_leader_clock(&mut cmd, 1_400_000);
        assert_eq!(cmd, other());
    }
}
