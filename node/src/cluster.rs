//! The narrow handle every subsystem is given: who this node is, the Raft handle, the applied
//! fabric, how to commit or propose a command, the membership and the liveness the leader
//! sees. Cheap to clone; it holds nothing of any subsystem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::Command;
use spaced_raft::network::{QuicNetwork, RaftReply, RaftRpc, RpcError};
use spaced_raft::store::FabricView;
use spaced_raft::types::StoredMembership;
use spaced_raft::{Member, NodeId, Outcome, Raft, Response};
use tokio::sync::watch;

use crate::lock;

/// Whether a node that said it is leaving `since` ago is still to get no new work, given how
/// long ago the leader last heard from it (`contact`): until [`LEAVING_FOR`] has passed, unless
/// it was heard from again more than [`BACK_AFTER`] after it said so, which means it started
/// again (a crashed node whose fence guard reported its fence, restarted by its supervisor,
/// or a node stopped and started). A node still answering for a moment while it stops is
/// heard from within [`BACK_AFTER`] of its word.
fn still_leaving(since: Duration, contact: Option<Duration>) -> bool {
    if since >= LEAVING_FOR {
        return false;
    }
    let heard_again = contact.is_some_and(|c| since > BACK_AFTER && c < since - BACK_AFTER);
    !heard_again
}

/// See [`still_leaving`].
const BACK_AFTER: Duration = Duration::from_secs(2);

/// A node that said it is stopping is given no new work for this long (it is exiting).
const LEAVING_FOR: Duration = Duration::from_secs(10);

/// How long a proposal forwarded to the leader may take.
const PROPOSE_WITHIN: Duration = Duration::from_secs(3);

/// Why a command was not committed through this node.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead; the leader's id and address, if known.
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<NodeId>, Option<String>),
    /// No leader is known, or it is not in the membership.
    #[error("no leader known")]
    NoLeader,
    /// The leader did not answer a forwarded proposal, or answered something else.
    #[error("leader {leader}: {problem}")]
    Forward {
        /// The leader asked.
        leader: NodeId,
        /// What went wrong.
        problem: String,
    },
    /// Raft failed (shutting down, fatal error).
    #[error("raft: {0}")]
    Raft(String),
    /// The command was delivered and refused by the fabric.
    #[error(transparent)]
    Refused(#[from] spaced_fabric::CommandError),
}

/// `NotLeader` with the leader openraft names (if any) when `e` says this node does not lead
/// (it never did, lost an election, or its quorum lease ran out); `None` for other errors.
pub(crate) fn not_leader<E>(
    e: &openraft::error::RaftError<spaced_raft::TypeConfig, E>,
) -> Option<ProposeError>
where
    E: openraft::TryAsRef<openraft::error::ForwardToLeader<spaced_raft::TypeConfig>>
        + std::error::Error,
{
    e.forward_to_leader().map(|f| {
        ProposeError::NotLeader(f.leader_id, f.leader_node.as_ref().map(|n| n.addr.clone()))
    })
}

/// The cluster as one node sees it. Cloning shares it.
#[derive(Clone)]
pub struct Cluster {
    state: Arc<ClusterState>,
}

/// What a [`Cluster`] handle shares.
pub struct ClusterState {
    /// This node's id.
    pub id: NodeId,
    /// This node's name.
    pub name: String,
    /// Roles from the config (registered in the fabric when the node joins).
    pub roles: BTreeSet<String>,
    /// The address other nodes and spacectl dial (`advertise`, else the bound address).
    pub advertise: SocketAddr,
    /// The Raft handle.
    pub raft: Raft,
    /// The applied fabric.
    pub view: FabricView,
    /// Dialer for node-to-node calls.
    pub network: QuicNetwork,
    /// Where the time from proposal to applied result is recorded (a Prometheus histogram
    /// the root registered).
    commit_latency: metrics::Histogram,
    /// Since when this node leads (`None`: it does not).
    pub tenure: LeaderTenure,
    /// On the leader: nodes that said they are stopping, and since when; the planners give
    /// them nothing new.
    leaving: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Deref for Cluster {
    type Target = ClusterState;
    fn deref(&self) -> &ClusterState {
        &self.state
    }
}

impl Cluster {
    /// Wraps what the composition root built.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: NodeId,
        name: String,
        roles: BTreeSet<String>,
        advertise: SocketAddr,
        raft: Raft,
        view: FabricView,
        network: QuicNetwork,
        commit_latency: metrics::Histogram,
    ) -> Self {
        Cluster {
            state: Arc::new(ClusterState {
                id,
                name,
                roles,
                advertise,
                raft,
                view,
                network,
                commit_latency,
                tenure: LeaderTenure::default(),
                leaving: Mutex::default(),
            }),
        }
    }
}

impl ClusterState {
    /// The Raft membership this node knows now (effective, possibly not yet committed).
    pub fn membership(&self) -> Arc<StoredMembership> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone()
    }

    /// How to reach member `id`, if it is one.
    pub fn member(&self, id: NodeId) -> Option<Member> {
        self.membership().membership().get_node(&id).cloned()
    }

    /// Whether `id` is a voter.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.membership().membership().voter_ids().any(|v| v == id)
    }

    /// The voter sets a lease decision needs a majority of: those of the committed membership
    /// and those of the effective one (the newest this node has appended), when they differ:
    /// one set when settled, two or three while a membership change is under way. An owner
    /// that counts its renewal confirmed, and a leader that counts a lease silent, each by a
    /// majority of every set it knows, are safe whichever of the two is behind the other
    /// (see [`lease_configs`]).
    pub fn voter_configs(&self) -> Vec<BTreeSet<NodeId>> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        lease_configs(
            m.committed_membership_config
                .membership()
                .get_joint_config(),
            m.membership_config.membership().get_joint_config(),
        )
    }

    /// The current voters and how to reach them.
    pub fn voters(&self) -> Vec<(NodeId, Option<Member>)> {
        let membership = self.membership();
        let membership = membership.membership();
        membership
            .voter_ids()
            .map(|v| (v, membership.get_node(&v).cloned()))
            .collect()
    }

    /// Why Raft stopped, if it did (a fatal storage error: a full or failing disk). A node
    /// whose Raft stopped cannot follow the fabric: it fences everything and confirms nothing.
    pub fn raft_failure(&self) -> Option<String> {
        match &self.raft.metrics().borrow_watched().running_state {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The leader this node knows of, and its address.
    pub fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let leader = self.raft.metrics().borrow_watched().current_leader;
        (leader, leader.and_then(|l| self.member(l)).map(|n| n.addr))
    }

    /// On the leader: time since it last heard from each peer (`None`: never). Empty elsewhere.
    pub fn contacts(&self) -> BTreeMap<NodeId, Option<Duration>> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.heartbeat
            .as_ref()
            .map(|hb| {
                hb.iter()
                    .map(|(id, t)| (*id, t.as_ref().map(|t| t.elapsed())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nodes the leader heard from within `within`, plus itself.
    pub fn live_nodes(&self, within: Duration) -> BTreeSet<NodeId> {
        let mut live: BTreeSet<NodeId> = self
            .contacts()
            .into_iter()
            .filter(|(_, t)| t.is_some_and(|t| t < within))
            .map(|(id, _)| id)
            .collect();
        live.insert(self.id);
        live
    }

    /// On the leader: the nodes work may go to now: heard from within `within` and not leaving.
    pub fn live_set(&self, within: Duration) -> BTreeSet<NodeId> {
        let mut live = self.live_nodes(within);
        let contacts = self.contacts();
        let mut leaving = lock(&self.leaving);
        leaving.retain(|node, since| {
            let contact = contacts.get(node).copied().flatten();
            still_leaving(since.elapsed(), contact)
        });
        live.retain(|n| !leaving.contains_key(n));
        live
    }

    /// Records that `node` is stopping: the planners give it nothing new for a while. When
    /// `node` is the leader this node follows (its fence guard says its daemon died), the
    /// followers also stop waiting for it: see [`Cluster::replace_departed_leader`].
    pub fn leaving(&self, node: NodeId) {
        lock(&self.leaving).insert(node, Instant::now());
        self.replace_departed_leader(node);
    }

    /// The leader `node` is gone: rather than let its leader lease run out on every follower
    /// and then wait an election timeout (together up to twice `election_timeout_max`), every
    /// follower that hears it drops the lease of `node`'s term, and the lowest-numbered other
    /// voter stands for election at once, as if `node` had handed leadership over. Raft's own
    /// rules still decide the election (a voter grants only a candidate whose log is as
    /// current as its own), so a wrong word costs at most an election, never a commit; and
    /// only a member can say it (`Leaving` is a node RPC, checked against the membership).
    fn replace_departed_leader(&self, node: NodeId) {
        if node == self.id {
            return;
        }
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(node) {
            return;
        }
        let Some(to) = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != node)
            .min()
        else {
            return;
        };
        tracing::info!(
            leader = node,
            candidate = to,
            "the leader's daemon died (its fence guard says): electing a new leader at once"
        );
        let request = openraft::raft::TransferLeaderRequest::new(m.vote, to, None);
        let raft = self.raft.clone();
        tokio::spawn(async move {
            if let Err(e) = raft.handle_transfer_leader(request).await {
                tracing::warn!(error = %e, "the election after the leader's death did not start");
            }
        });
    }

    /// Commits `cmd` through this node (it must lead) and returns its applied result, refused
    /// commands included; records the commit latency.
    pub async fn commit(&self, cmd: Command) -> Result<Response, ProposeError> {
        // Refused before it is logged: the entry would reach nodes of an older data format,
        // which cannot decode it (the fabric refuses it too, in the same words).
        if let Err(e) = self.view.read(|f| f.format_allows(&cmd)) {
            return Ok(Err(e));
        }
        let started = Instant::now();
        match self.raft.client_write(cmd).await {
            Ok(resp) => {
                self.commit_latency.record(started.elapsed().as_secs_f64());
                Ok(resp.response().clone())
            }
            Err(e) => Err(not_leader(&e).unwrap_or_else(|| ProposeError::Raft(e.to_string()))),
        }
    }

    /// Like [`commit`](Self::commit), with a refused command as an error too.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        Ok(self.commit(cmd).await??)
    }

    /// Proposes `cmd` through whichever node leads (locally when this node does): `Ok` carries
    /// the applied result (a refused command included), `Err` means it was not delivered.
    pub async fn propose_anywhere(&self, cmd: Command) -> Result<Response, ProposeError> {
        if self.raft.is_leader() {
            return self.commit(cmd).await;
        }
        let leader = self
            .raft
            .metrics()
            .borrow_watched()
            .current_leader
            .ok_or(ProposeError::NoLeader)?;
        let member = self.member(leader).ok_or(ProposeError::NoLeader)?;
        let forward = |problem: String| ProposeError::Forward { leader, problem };
        match self
            .call(leader, &member, RaftRpc::Propose(cmd), PROPOSE_WITHIN)
            .await
            .map_err(|e| forward(e.to_string()))?
        {
            RaftReply::Proposed(r) => Ok(r),
            other => Err(forward(format!("unexpected reply {other:?}"))),
        }
    }

    /// The serial of the certificate `peer` presents (dialing it if needed), within `ttl`.
    pub async fn peer_serial(
        &self,
        peer: NodeId,
        member: &Member,
        ttl: Duration,
    ) -> Option<String> {
        self.network.peer_serial(peer, member, ttl).await
    }

    /// One RPC to a peer, within `ttl` (dialing included).
    pub async fn call(
        &self,
        peer: NodeId,
        member: &Member,
        rpc: RaftRpc,
        ttl: Duration,
    ) -> Result<RaftReply, RpcError> {
        self.network.call(peer, member, rpc, ttl).await
    }
}

/// The voter sets of the committed and of the effective membership, each set once, in order.
pub fn lease_configs(
    committed: &[BTreeSet<NodeId>],
    effective: &[BTreeSet<NodeId>],
) -> Vec<BTreeSet<NodeId>> {
    let mut sets: Vec<BTreeSet<NodeId>> = Vec::new();
    for c in committed.iter().chain(effective) {
        if !sets.contains(c) {
            sets.push(c.clone());
        }
    }
    sets
}

/// Since when this node leads, kept by [`LeaderTenure::track`] from Raft's server state. The
/// planners use it: a new leader knows little of its peers' liveness at first.
#[derive(Default)]
pub struct LeaderTenure {
    since: Mutex<Option<Instant>>,
}

impl LeaderTenure {
    /// How long this node has led; `None` when it does not lead.
    pub fn leading_for(&self) -> Option<Duration> {
        lock(&self.since).map(|t| t.elapsed())
    }

    /// Records whether this node leads now (the start of a tenure is kept while it lasts).
    pub fn observe(&self, leading: bool) {
        let mut since = lock(&self.since);
        match (leading, since.is_some()) {
            (true, false) => *since = Some(Instant::now()),
            (false, true) => *since = None,
            _ => {}
        }
    }

    /// Follows Raft's server state until shutdown or until Raft stops.
    pub async fn track(cluster: Cluster, mut shutdown: watch::Receiver<bool>) {
        let mut server = cluster.raft.server_metrics();
        loop {
            let leading = server.borrow_watched().state.is_leader();
            cluster.tenure.observe(leading);
            tokio::select! {
                changed = server.changed() => if changed.is_err() {
                    cluster.tenure.observe(false);
                    return;
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Why an operator's operation (membership, VIP, devices) was not carried out. Its text is
/// the reason `spacectl` shows.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Not possible as asked: an unknown or ineligible node, a VIP no node can hold, a node
    /// that is already a member.
    #[error("{0}")]
    Refused(String),
    /// A node involved did not answer, or answered something else.
    #[error("{0}")]
    Peer(String),
    /// Raft refused a membership change or a leader transfer, or it did not complete.
    #[error("{0}")]
    Raft(String),
    /// Committing a change to the fabric failed or was refused.
    #[error(transparent)]
    Propose(#[from] ProposeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaving_node_is_back_once_heard_from_well_after_it_left() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Said so 1 s ago, heard from just now: still stopping.
        assert!(still_leaving(s(1), Some(ms(10))));
        // Said so 5 s ago, silent since: gone.
        assert!(still_leaving(s(5), Some(s(5))));
        assert!(still_leaving(s(5), None));
        // Said so 5 s ago, heard from 1 s ago (4 s after): started again.
        assert!(!still_leaving(s(5), Some(s(1))));
        // Heard from 1.5 s after it said so: within the grace, still stopping.
        assert!(still_leaving(s(5), Some(ms(3_500))));
        // The mark runs out whatever happens.
        assert!(!still_leaving(LEAVING_FOR, None));
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn lease_quorums_cover_the_committed_and_the_effective_membership() {
        let old = set(&[1, 2, 3]);
        let new = set(&[3, 4, 5]);
        // Settled: one set.
        assert_eq!(
            lease_configs(&[old.clone()], &[old.clone()]),
            vec![old.clone()]
        );
        // The joint config appended, not committed: the owner also needs the new set,
        // although its committed view has only the old one.
        assert_eq!(
            lease_configs(&[old.clone()], &[old.clone(), new.clone()]),
            vec![old.clone(), new.clone()]
        );
        // The final config appended while the joint one is the committed one.
        assert_eq!(
            lease_configs(&[old.clone(), new.clone()], &[new.clone()]),
            vec![old.clone(), new.clone()]
        );
        // A node that appended the new config but whose commit lags at the old one counts
        // both: a majority of the old set alone would let removed voters extend a lease.
        let configs = lease_configs(&[old.clone()], &[new.clone()]);
        assert_eq!(configs, vec![old, new]);
        let removed_only = set(&[1, 2]);
        assert!(!crate::placement::lease::joint_majority(
            &configs,
            &removed_only
        ));
    }
}
