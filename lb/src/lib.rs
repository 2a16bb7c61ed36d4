//! The zero-copy TCP load balancer that follows the cluster VIP (DESIGN §7).
//!
//! * [`relay`] — the data path: once a client connection has been accepted
//!   and a backend connection opened, [`relay::relay`] moves the bytes both
//!   ways: small messages are copied (cheaper for them), and once a read
//!   fills the copy buffer the stream goes by `splice(2)` through kernel
//!   pipes (taken from a [`relay::PipePool`]) and never enters user space. It propagates
//!   half-close, enforces an idle timeout and closes both sides on any error.
//! * [`backend`] — the backend set, its live state and the balancing policies.
//! * [`balancer`] — a listener's accept loop, connect with redispatch, health
//!   checks, limits and drain.
//! * [`peek`] — the session route (JSESSIONID `.route`) in a peeked request.
//! * [`maglev`] — the consistent-hash table for source-address affinity.
//! * [`proxy_v2`] — PROXY protocol v2 headers towards backends.
//! * [`stats`] — counters and their Prometheus text.

pub mod backend;
pub mod balancer;
pub mod maglev;
pub mod peek;
pub mod proxy_v2;
pub mod relay;
pub mod stats;

/// Locks `m`, also after a panic elsewhere poisoned it: every critical section in this crate
/// only pushes, pops or replaces whole values, so the data behind a poisoned lock is valid.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
