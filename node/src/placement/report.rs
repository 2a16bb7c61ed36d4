//! The placement rows operators see (`vip list`, `singleton list`, `status`): built here from
//! the fabric, carried by the admin protocol.

use serde::{Deserialize, Serialize};
use spaced_raft::NodeId;

/// One singleton placement for `singleton list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SingletonRow {
    /// Placement name.
    pub name: String,
    /// The service it runs.
    pub service: String,
    /// Eligible roles.
    pub roles: Vec<String>,
    /// Owner id.
    pub owner: Option<NodeId>,
    /// Owner name.
    pub owner_name: Option<String>,
    /// Fencing epoch (`SPACED_EPOCH` of the running instance).
    pub epoch: u64,
    /// Nodes that gave it back because they could not run it, and why.
    pub refused: Vec<RefusalRow>,
}

/// A node that gave a placement back because it could not hold it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefusalRow {
    /// Node id.
    pub node: NodeId,
    /// Node name, while it is registered.
    pub node_name: Option<String>,
    /// What went wrong on it.
    pub reason: String,
    /// When, ms since the Unix epoch (the leader's clock when it received the refusal).
    pub at: u64,
    /// Whether the planner still passes the node over for it (see `controller::REFUSAL_HOLD_MS`).
    pub holding: bool,
}

impl RefusalRow {
    /// The refusals recorded on `p`, as of `now`.
    pub fn of(
        f: &spaced_fabric::Fabric,
        p: &spaced_fabric::Placement,
        now: u64,
    ) -> Vec<RefusalRow> {
        p.refused
            .iter()
            .map(|(node, r)| RefusalRow {
                node: *node,
                node_name: f.nodes.get(node).map(|n| n.name.clone()),
                reason: r.reason.clone(),
                at: r.at,
                holding: spaced_fabric::plan::placements::refused_recently(p, *node, now),
            })
            .collect()
    }
}

/// One VIP for `vip list` and `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VipRow {
    /// Placement name.
    pub name: String,
    /// Address with prefix.
    pub address: String,
    /// Interface.
    pub interface: String,
    /// Eligible roles.
    pub roles: Vec<String>,
    /// Owner id.
    pub owner: Option<NodeId>,
    /// Owner name.
    pub owner_name: Option<String>,
    /// Fencing epoch.
    pub epoch: u64,
    /// On the leader: ms until it may reassign (the owner's lease ends before that).
    pub lease_ms: Option<u64>,
    /// Nodes that gave it back because they could not hold it, and why.
    pub refused: Vec<RefusalRow>,
}
