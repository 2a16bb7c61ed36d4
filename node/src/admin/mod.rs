//! The admin side of a node: what `spacectl` may ask ([`protocol`]), the server that carries a
//! request out or forwards it to the leader ([`server`]), membership changes ([`membership`]),
//! and the client `spacectl` and the demo dial with ([`client`]). Uses the cluster handle and
//! the placement, devices, services and balancer handles the root gives it.

pub mod client;
pub mod membership;
pub mod protocol;
pub mod server;

pub use protocol::*;
