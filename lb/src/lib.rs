//! The zero-copy TCP load balancer that follows the cluster VIP (DESIGN §7).
//!
//! Issue 4 fills this crate piece by piece. What exists so far:
//!
//! * [`relay`] — the data path: once a client connection has been accepted
//!   and a backend connection opened, [`relay::relay`] moves the bytes both
//!   ways with `splice(2)` through kernel pipes (taken from a
//!   [`relay::PipePool`]), so payload never enters user space. It propagates
//!   half-close, enforces an idle timeout and closes both sides on any error.
//!
//! Listener, backend selection and health checks are not built yet.

pub mod maglev;
pub mod peek;
pub mod proxy_v2;
pub mod relay;
