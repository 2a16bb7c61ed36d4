//! The balancer (crate `spaced-lb`) in a node: bound on the cluster VIP, serving while this
//! node holds it, backends from the fabric ([`service`]); and `spaced lb`, the balancer alone
//! with backends from flags ([`standalone`]).

pub mod busy_poll;
pub mod report;
pub mod service;
pub mod standalone;
