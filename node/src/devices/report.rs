//! What the device planner reports (`device rebalance`): built here, carried by the admin
//! protocol.

use serde::{Deserialize, Serialize};
use spaced_raft::NodeId;

/// Devices one node holds, for `device rebalance`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeDevices {
    /// Raft id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// Devices it owns after the operation.
    pub devices: u64,
}

/// What `device rebalance` did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RebalanceReport {
    /// Moves the plan had.
    pub planned: u64,
    /// Moves committed (fewer than planned only if a concurrent change overtook the plan).
    pub moved: u64,
    /// Device counts of the eligible nodes afterwards.
    pub nodes: Vec<NodeDevices>,
}
