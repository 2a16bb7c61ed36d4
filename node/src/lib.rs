//! spaced's node: the daemon (`spaced`), the admin CLI (`spacectl`), their protocol and the demo.

pub mod admin;
pub mod agent;
pub mod client;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod device_control;
pub mod devices;
pub mod guard;
pub mod http;
pub mod lb_service;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod services;
pub mod standalone_lb;
pub mod supervisor;
pub mod takeover;
pub mod takeover_backend;

/// Locks a mutex, recovering from poisoning: the state behind spaced's mutexes stays
/// consistent between statements, so a panicked holder leaves nothing half-written.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Raises the soft limit on open files to the hard limit: every held device and every
/// balanced connection (two sockets, two pipes) holds descriptors. Returns the soft limit now
/// in force.
pub fn raise_fd_limit() -> Result<u64, nix::Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        tracing::info!(from = soft, to = hard, "raised the open-files limit");
    }
    Ok(hard.max(soft))
}
