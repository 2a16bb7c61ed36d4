//! spaced's node: the daemon (`spaced`), the admin CLI (`spacectl`), their protocol and the demo.

pub mod admin;
pub mod client;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod controller;
pub mod lease;
