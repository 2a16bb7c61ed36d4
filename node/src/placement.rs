//! The daemon's placement service: VIP agent loop, the leader's controller loop, lease RPCs,
//! VIP admin operations and graceful hand-over on shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::ReadPolicy;
use spaced_raft::fabric::{Command, PlacementKind};
use spaced_raft::network::{BoxFuture, NodeHooks, RaftReply, RaftRpc};
use spaced_raft::{NodeId, Outcome, Response};
use tokio::sync::watch;

use crate::admin::VipRow;
use crate::agent::{Agent, LoopbackBackend, TICK, VipBackend, owned_vips};
use crate::config::{NodeConfig, TakeoverMode, VipSection};
use crate::controller::{eligible, plan};
use crate::daemon::NodeInner;
use crate::lease::{Held, LeaseConfig, RenewalBook};

/// How often the leader plans.
const PLAN_EVERY: Duration = Duration::from_millis(10);
/// A peer counts as live for placement while the leader heard from it this recently.
const LIVE_WITHIN: Duration = Duration::from_millis(1000);

/// Placement state of one node.
pub struct Placements {
    /// Lease timing.
    pub(crate) lease: LeaseConfig,
    /// The VIP agent.
    pub(crate) agent: Arc<Agent>,
    /// The leader's renewal book (empty while not leading).
    pub(crate) book: Mutex<RenewalBook>,
    /// Operator-requested targets of `vip move`, consulted by the planner.
    pub(crate) moves: Mutex<BTreeMap<String, NodeId>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Placements {
    /// Builds the agent with the configured takeover backend; checks the config's VIPs against
    /// the host (interface present, address inside its subnet, capabilities) before anything runs.
    pub async fn new(cfg: &NodeConfig) -> Result<Self, String> {
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
        Ok(Placements {
            agent: Arc::new(Agent::new(cfg.node_id, lease.clone(), backend)),
            book: Mutex::new(RenewalBook::new(lease.clone())),
            lease,
            moves: Mutex::default(),
        })
    }
}

/// Proposes `cmd` through whichever node leads (locally when this node does).
pub(crate) async fn propose_anywhere(inner: &NodeInner, cmd: Command) -> Result<Response, String> {
    if inner.raft.is_leader() {
        return match inner.propose(cmd).await {
            Ok(o) => Ok(Ok(o)),
            Err(e) => Err(e),
        };
    }
    let (leader, member) = {
        let m = inner.raft.metrics();
        let m = m.borrow_watched();
        let l = m.current_leader.ok_or("no leader")?;
        let member = m
            .membership_config
            .membership()
            .get_node(&l)
            .cloned()
            .ok_or("leader not in membership")?;
        (l, member)
    };
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

/// The VIP agent: reconcile every tick, renew through the leader.
pub(crate) async fn agent_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renewing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let owned = inner.view.read(|f| owned_vips(f, inner.id));
        let step = inner.placements.agent.plan_step(&owned, Instant::now());
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
        inner.placements.agent.execute(&step).await;
    }
}

/// Sends one renewal to the leader (or handles it here when this node leads).
async fn renew(inner: &Arc<NodeInner>, held: Vec<Held>) -> Result<Vec<Held>, String> {
    let ttl = inner.placements.lease.renew_every;
    let (leader, member) = {
        let m = inner.raft.metrics();
        let m = m.borrow_watched();
        let l = m.current_leader.ok_or("no leader")?;
        (l, m.membership_config.membership().get_node(&l).cloned())
    };
    if leader == inner.id {
        return confirm_renewal(inner, inner.id, held).await;
    }
    let member = member.ok_or("leader not in membership")?;
    match inner
        .network
        .call(
            leader,
            &member,
            RaftRpc::Renew(held),
            ttl.max(Duration::from_millis(50)),
        )
        .await?
    {
        RaftReply::Renewed(c) => Ok(c),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// Leader side of a renewal: confirm leadership with a quorum, then confirm what `from` still owns.
async fn confirm_renewal(
    inner: &NodeInner,
    from: NodeId,
    held: Vec<Held>,
) -> Result<Vec<Held>, String> {
    let received = Instant::now();
    inner
        .raft
        .ensure_linearizable(ReadPolicy::ReadIndex)
        .await
        .map_err(|e| format!("not leader: {e}"))?;
    let confirmed: Vec<Held> = inner.view.read(|f| {
        held.into_iter()
            .filter(|(name, epoch)| {
                f.nodes.contains_key(&from)
                    && f.placements
                        .get(name)
                        .is_some_and(|p| p.owner == Some(from) && p.epoch == *epoch)
            })
            .collect()
    });
    let mut book = lock(&inner.placements.book);
    if !book.is_leader() {
        // Renewals can arrive before the controller loop notices the win: start the book now,
        // later than the real win, which only makes the leader wait longer.
        book.became_leader(received);
    }
    for (name, epoch) in &confirmed {
        book.renewed(name, from, *epoch, received);
    }
    Ok(confirmed)
}

/// Nodes the leader heard from recently, plus itself.
fn live_nodes(inner: &NodeInner) -> BTreeSet<NodeId> {
    let m = inner.raft.metrics();
    let m = m.borrow_watched();
    let mut live: BTreeSet<NodeId> = BTreeSet::from([inner.id]);
    if let Some(hb) = &m.heartbeat {
        for (id, t) in hb {
            if t.as_ref().is_some_and(|t| t.elapsed() < LIVE_WITHIN) {
                live.insert(*id);
            }
        }
    }
    live
}

/// On the leader: plan and propose grants and take-backs.
pub(crate) async fn controller_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PLAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_step_aside: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let leading = inner.raft.is_leader();
        {
            let mut book = lock(&inner.placements.book);
            match (leading, book.is_leader()) {
                (true, false) => {
                    book.became_leader(Instant::now());
                    tracing::info!(
                        node = inner.id,
                        wait_ms = inner.placements.lease.reassign_after().as_millis() as u64,
                        "leading: placements of silent owners move after one lease span"
                    );
                }
                (false, true) => book.stepped_down(),
                _ => {}
            }
        }
        if !leading {
            continue;
        }
        let live = live_nodes(&inner);
        step_aside_if_owner(&inner, &live, &mut last_step_aside).await;
        let prefer = lock(&inner.placements.moves).clone();
        let now = Instant::now();
        let cmds = {
            let book = lock(&inner.placements.book);
            inner
                .view
                .read(|f| plan(f, &live, inner.id, &book, &prefer, now))
        };
        for cmd in cmds {
            let desc = cmd.to_string();
            match inner.propose(cmd.clone()).await {
                Ok(Outcome::Epoch(epoch)) => {
                    if let Command::GrantPlacement { name, to, .. } = &cmd {
                        lock(&inner.placements.book).granted(name, *to, epoch, Instant::now());
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
    let settled = lock(&inner.placements.book)
        .leader_since()
        .is_some_and(|t| t.elapsed() > Duration::from_secs(2));
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

/// The RPC handlers this node offers its peers.
pub(crate) struct Hooks(pub(crate) Arc<NodeInner>);

impl NodeHooks for Hooks {
    fn renew(
        &self,
        from: NodeId,
        held: Vec<Held>,
    ) -> BoxFuture<'static, Result<Vec<Held>, String>> {
        let inner = self.0.clone();
        Box::pin(async move { confirm_renewal(&inner, from, held).await })
    }

    fn propose(&self, _from: NodeId, cmd: Command) -> BoxFuture<'static, Result<Response, String>> {
        let inner = self.0.clone();
        Box::pin(async move {
            if !inner.raft.is_leader() {
                return Err("not the leader".to_string());
            }
            match inner.raft.client_write(cmd).await {
                Ok(r) => Ok(r.response().clone()),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn release(&self, name: String, epoch: u64) -> BoxFuture<'static, Result<(), String>> {
        let inner = self.0.clone();
        Box::pin(async move { inner.placements.agent.fence_and_hold(&name, epoch).await })
    }
}

/// Rows for `vip list` / `status`, with the leader's view of lease time left.
pub(crate) fn vip_rows(inner: &NodeInner) -> Vec<VipRow> {
    let now = Instant::now();
    let book = lock(&inner.placements.book);
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
                    lease_ms: p
                        .owner
                        .and_then(|o| book.expires_in(name, o, p.epoch, now))
                        .map(|d| d.as_millis() as u64),
                }),
                PlacementKind::Singleton { .. } => None,
            })
            .collect()
    })
}

/// `vip add` on the leader: refuses a VIP no registered node could hold.
pub(crate) async fn vip_add(inner: &NodeInner, v: VipSection) -> Result<(), String> {
    let roles: BTreeSet<String> = v.roles.iter().cloned().collect();
    let anyone = inner
        .view
        .read(|f| f.nodes.values().any(|n| !n.roles.is_disjoint(&roles)));
    if !anyone {
        return Err(format!(
            "no node has any of the roles {:?}; VIP {:?} could never be placed",
            v.roles, v.name
        ));
    }
    let cmd = Command::AddPlacement {
        name: v.name.clone(),
        kind: PlacementKind::Vip {
            address: v.address,
            interface: v.interface,
        },
        eligible_roles: roles,
    };
    inner.propose(cmd).await.map(|_| ())
}

/// `vip move` on the leader: the owner fences and the release commits before the target is granted.
pub(crate) async fn vip_move(inner: &NodeInner, name: &str, to: NodeId) -> Result<u64, String> {
    let (owner, epoch, ok) = inner.view.read(|f| {
        let p = f
            .placements
            .get(name)
            .ok_or_else(|| format!("no VIP {name:?}"))?;
        Ok::<_, String>((p.owner, p.epoch, eligible(f, p, to)))
    })?;
    if !ok {
        return Err(format!(
            "node {to} is not eligible for {name:?} (roles or draining)"
        ));
    }
    if !live_nodes(inner).contains(&to) {
        return Err(format!("node {to} is not reachable from the leader"));
    }
    if owner == Some(to) {
        return Err(format!("{name:?} is already on node {to}"));
    }
    lock(&inner.placements.moves).insert(name.to_string(), to);
    let result = async {
        if let Some(o) = owner {
            if o == inner.id {
                inner.placements.agent.fence_and_hold(name, epoch).await?;
            } else {
                let member = inner
                    .raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .get_node(&o)
                    .cloned()
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

/// Graceful stop: fence and release every VIP, let the leader re-grant them, and hand
/// leadership to another voter if this node leads.
pub(crate) async fn hand_over(inner: &Arc<NodeInner>) {
    let held = inner.placements.agent.stop().await;
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
    let target = {
        let m = inner.raft.metrics();
        let m = m.borrow_watched();
        let voters: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != inner.id)
            .collect();
        let hb = m.heartbeat.clone().unwrap_or_default();
        voters.into_iter().min_by_key(|v| {
            hb.get(v)
                .and_then(|t| t.as_ref().map(|t| t.elapsed()))
                .unwrap_or(Duration::MAX)
        })
    };
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
