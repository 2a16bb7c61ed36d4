//! The openraft type configuration of spaced: what a log entry carries and what a node is.

use std::fmt;

use serde::{Deserialize, Serialize};

use spaced_fabric::{Command, CommandError, Outcome};

pub use spaced_fabric::NodeId;

/// What Raft membership knows about a node: enough to dial it and to check its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Member {
    /// Node name; its certificate must carry `<name>.node.spaced`.
    pub name: String,
    /// QUIC address (`host:port`) where the node serves Raft and admin requests.
    pub addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// The result of applying one log entry, returned to the proposer.
pub type Response = Result<Outcome, CommandError>;

openraft::declare_raft_types!(
    /// spaced's Raft types: commands on the `Fabric` as log payload, `Member` as node.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        AsyncRuntime = openraft::impls::TokioRuntime,
);

/// The state machine store type the Raft handle is parameterised with.
pub type Raft = openraft::Raft<TypeConfig, crate::store::FabricStore>;

/// Log id alias used across the crate.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// Vote alias used across the crate.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// Entry alias used across the crate.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Stored membership alias used across the crate.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata alias used across the crate.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
