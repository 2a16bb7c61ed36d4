//! What operators touch around the daemon: its configuration file ([`config`]), the HTTP
//! endpoint for `/metrics` and `/healthz` ([`http`]), the Prometheus metrics ([`metrics`]) and
//! the service manager's notify protocol ([`sdnotify`]), the daemon's CPU priority
//! ([`priority`]) and a probe of the async runtime's stalls ([`stall`]).

pub mod config;
pub mod events;
pub mod http;
pub mod metrics;
pub mod priority;
pub mod sdnotify;
pub mod stall;
