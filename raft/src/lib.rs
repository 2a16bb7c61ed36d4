//! spaced's Raft: the openraft type configuration over the `Fabric` (crate `spaced-fabric`), sled
//! storage, the QUIC transport with mutual TLS, and the PKI.

pub mod backup;
pub mod chunked;
pub mod codec;
pub mod frame;
pub mod network;
pub mod pki;
pub mod proof;
pub mod segments;
pub mod store;
pub mod types;
pub mod udp;

pub use spaced_fabric::{Command, CommandError, Fabric, Outcome};
pub use types::{Member, NodeId, Raft, Response, TypeConfig};
