//! What operators touch around the daemon: its configuration file ([`config`]), the HTTP
//! endpoint for `/metrics` and `/healthz` ([`http`]) and the Prometheus metrics ([`metrics`]).

pub mod config;
pub mod events;
pub mod http;
pub mod metrics;
