//! Leased placements (DESIGN §5), the safety core: at no instant do two nodes hold the same
//! VIP or singleton.
//!
//! * [`lease`] — the lease arithmetic, pure: the owner's lease clock, every voter's witness of
//!   renewals, joint majorities and quorum silence.
//! * [`agent`] — the VIP agent's core: what this node holds and what falls due (pure steps,
//!   executed against a `VipBackend`).
//! * [`renewal`] — the agent's loop on every node: renew with every voter, reconcile the host,
//!   give back what it cannot hold; and a voter's side of renewals.
//! * [`controller`] — the leader's loop: plan grants and take-backs, find silent leases, step
//!   aside when the leader holds placements.
//! * [`vip_ops`] — `vip list`/`add`/`move`, registering the config's VIPs, graceful hand-over.
//!
//! Uses the [`Cluster`] handle and the pure planner of `spaced-fabric`; knows nothing of the
//! takeover backend, services or devices (the root wires them in through `VipBackend`).

pub mod agent;
pub mod controller;
pub mod lease;
pub mod renewal;
pub mod report;
pub mod vip_ops;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spaced_raft::NodeId;

use crate::cluster::Cluster;
use agent::{Agent, VipBackend};
use lease::{LeaseConfig, Witness};

/// A peer counts as live for placement while the leader heard from it this recently.
pub const LIVE_WITHIN: Duration = Duration::from_millis(1000);

/// Waits until at least `gap` has passed since the pass before (`last`), then records this one:
/// a loop woken by every change runs at most once per `gap` however fast changes come.
pub(crate) async fn pace(last: &mut Option<Instant>, gap: Duration) {
    if let Some(since) = last.map(|t| t.elapsed()).filter(|since| *since < gap) {
        tokio::time::sleep(gap - since).await;
    }
    *last = Some(Instant::now());
}

/// The placement subsystem of one node: its VIP agent, its witness of others' renewals and,
/// when it leads, the operator's pending moves. Shared as `Arc<Placements>`.
pub struct Placements {
    /// The cluster this node is part of.
    pub(crate) cluster: Cluster,
    /// Lease timing.
    pub(crate) lease: LeaseConfig,
    /// The VIP agent.
    pub(crate) agent: Arc<Agent>,
    /// The agent's backend, asked whether this node could hold a VIP (`vip add`, `vip move`).
    pub(crate) backend: Arc<dyn VipBackend>,
    /// This node's witness of renewals (used when it votes).
    pub(crate) witness: Mutex<Witness>,
    /// Operator-requested targets of `vip move`, consulted by the planner.
    pub(crate) moves: Mutex<BTreeMap<String, NodeId>>,
    /// Placements the planner must not grant while an operation releases them for good
    /// (a singleton's service being removed).
    pub(crate) withheld: Mutex<std::collections::BTreeSet<String>>,
    /// On a standby site's leader: the placements (name, epoch) whose owner is being asked to
    /// let go.
    pub(crate) demoting: Mutex<std::collections::BTreeSet<(String, u64)>>,
    /// Whether the site's role lets this node confirm workload leases (DR).
    pub(crate) site: Arc<spaced_replication::site_lease::SiteGate>,
}

impl Placements {
    /// The subsystem around an agent the root built with its takeover backend.
    pub fn new(
        cluster: Cluster,
        lease: LeaseConfig,
        agent: Arc<Agent>,
        backend: Arc<dyn VipBackend>,
        site: Arc<spaced_replication::site_lease::SiteGate>,
    ) -> Arc<Self> {
        Arc::new(Placements {
            site,
            cluster,
            lease,
            agent,
            backend,
            witness: Mutex::new(Witness::new(Instant::now())),
            moves: Mutex::default(),
            withheld: Mutex::default(),
            demoting: Mutex::default(),
        })
    }

    /// The VIP agent (the services loop and the balancer follow what it holds).
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }
}
