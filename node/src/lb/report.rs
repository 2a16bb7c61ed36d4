//! What a node reports about its balancer (`lb status`): built here, carried by the admin
//! protocol.

use serde::{Deserialize, Serialize};

/// One node's load balancer, for `lb status` (answered by every node, from its own state).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbReport {
    /// The answering node.
    pub node: String,
    /// The VIP its `[lb]` section follows; `None`: the node has no `[lb]` section.
    pub vip: Option<String>,
    /// One entry per configured port.
    pub listeners: Vec<LbListenerRow>,
    /// Why the balancer cannot serve as configured right now (its VIP's address differs in
    /// the fabric, a listener cannot be bound); empty when all is well.
    pub problems: Vec<String>,
}

/// One balancer (one listening port) on one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbListenerRow {
    /// `VIP:port`.
    pub listen: String,
    /// Accepting now (only on the VIP's owner; a node that lost it may still drain).
    pub accepting: bool,
    /// Connections open now.
    pub active: u64,
    /// Connections accepted since start.
    pub total: u64,
    /// Connections closed at accept because of `max_conns`.
    pub refused: u64,
    /// Connections closed because no backend could be reached.
    pub no_backend: u64,
    /// Relay failures other than a peer's reset.
    pub relay_errors: u64,
    /// Bytes client → backend (spliced and copied).
    pub bytes_in: u64,
    /// Bytes backend → client (spliced and copied).
    pub bytes_out: u64,
    /// The backends, in the balancer's order.
    pub backends: Vec<LbBackendRow>,
}

/// One backend of one balancer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbBackendRow {
    /// Its name (the node's name; the session route).
    pub name: String,
    /// `IP:port`.
    pub addr: String,
    /// Healthy: it gets new connections.
    pub up: bool,
    /// Connections open to it now.
    pub active: u64,
    /// Connections sent to it since it was added.
    pub total: u64,
    /// Failed connects.
    pub connect_errors: u64,
    /// Up/down changes.
    pub transitions: u64,
}
