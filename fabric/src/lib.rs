//! spaced's replicated model: the `Fabric` state machine, the commands that change it, and the
//! leader's pure planners. No IO, no clock, no Raft: it depends on nothing of ours, so every
//! decision here is tested with plain values.
//!
//! * [`model`] — what the fabric holds: nodes, placements (VIPs, singletons), devices, services.
//! * [`command`] — [`Command`], [`Outcome`] and [`CommandError`].
//! * [`validate`] — shape checks for names, ids and addresses.
//! * `apply` — [`Fabric::apply`], one file per command group.
//! * [`plan`] — the leader's planners: placements to grant or take back, devices to assign.
//! * [`restore`] — a backup's fabric as the first state of a new cluster.

pub mod command;
pub mod model;
pub mod plan;
pub mod restore;
pub mod validate;

mod apply;

pub use apply::recorded_format;

pub use command::{Command, CommandError, MAX_PROBE_BYTES, Outcome, SET_COMMANDS_FORMAT};
pub use model::*;
pub use validate::*;

/// Raft node id; chosen by the operator (`node_id` in the config).
pub type NodeId = u64;
