//! How a VIP moves on a host: addresses over netlink ([`netlink`], with [`addr`]), the raw frames that probe
//! for a conflict and announce the move ([`frames`], pure; [`probe`], their socket side), the
//! agent's backend on top of them ([`backend`]), and the fence guard child process that
//! removes addresses when the daemon dies ([`guard`]), kept out of the daemon's cgroup
//! ([`cgroup`]) and reporting its fence through a sender the root gives it ([`report`]).
//! Knows nothing of Raft (a `BoxFuture` alias aside); uses the placement agent's `VipBackend`
//! contract and the config's `FenceCgroup`.

pub mod addr;
pub mod backend;
pub mod cgroup;
pub mod frames;
pub mod guard;
pub mod neighbours;
pub mod netlink;
pub mod probe;
pub mod report;

pub use netlink::*;
