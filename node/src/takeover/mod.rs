//! How a VIP moves on a host: addresses over netlink with conflict probes and announcements as
//! raw frames ([`netlink`]), the agent's backend on top of it ([`backend`]), and the fence
//! guard child process that removes addresses when the daemon dies ([`guard`]). Knows nothing
//! of Raft; uses only the placement agent's `VipBackend` contract.

pub mod backend;
pub mod guard;
pub mod netlink;

pub use netlink::*;
