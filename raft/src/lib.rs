//! spaced's replicated fabric: Raft types, the `Fabric` state machine, sled storage and the QUIC transport.

pub mod assign;
pub mod codec;
pub mod fabric;
pub mod frame;
pub mod network;
pub mod pki;
pub mod store;
pub mod types;

pub use fabric::{Command, CommandError, Fabric, Outcome};
pub use types::{Member, NodeId, Raft, Response, TypeConfig};
