//! Devices (DESIGN §8): the agent on every node that holds the connections of the devices the
//! fabric gives it ([`agent`]), and the leader's side that assigns, rebalances and drains
//! ([`leader`]), and the limits on the unauthenticated device port ([`gate`]). Uses the
//! cluster handle only.

pub mod agent;
pub mod gate;
pub mod leader;
pub mod report;
