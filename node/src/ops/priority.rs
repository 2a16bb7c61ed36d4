//! The daemon's CPU priority (`nice` in the config). A node whose daemon cannot run for about
//! a lease loses its VIPs and singletons; on a host whose CPUs are busy with other work, a
//! daemon at the ordinary priority waits its turn behind it. Like corosync (real-time by
//! default) and keepalived (`vrrp_priority`), the daemon raises its own priority at start: a
//! negative nice value, set on the main thread before any other starts, so every thread
//! inherits it. The processes it starts do not: the thread that forks services goes back to
//! the priority the daemon was started with ([`restore_started_priority`]), and the fence
//! guards run at real-time priority of their own.

use std::sync::atomic::{AtomicI32, Ordering};

/// The default `nice`: ahead of ordinary processes (0) by a weight of about 9 to 1, without
/// the real-time class a busy balancer could starve the host with.
pub const DEFAULT_NICE: i32 = -10;

/// The priority the process was started with, for the threads that fork children.
static STARTED_WITH: AtomicI32 = AtomicI32::new(0);

/// The calling thread's nice value.
pub fn own_nice() -> std::io::Result<i32> {
    nix::errno::Errno::clear();
    // SAFETY: getpriority only reads the calling thread's priority (`who` 0).
    let n = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
    // -1 is a valid nice value; only errno tells an error.
    match nix::errno::Errno::last_raw() {
        0 => Ok(n),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Sets the calling thread's nice value; threads it starts afterwards inherit it.
fn set_own_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: on Linux, setpriority with PRIO_PROCESS and `who` 0 changes only the calling
    // thread's nice value.
    let r = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What [`raise`] did, for the start-up log.
#[derive(Debug, PartialEq, Eq)]
pub enum Raised {
    /// Now at `to`, from `from`.
    Set { from: i32, to: i32 },
    /// Already there (the config asks for the priority the process has).
    Unchanged(i32),
    /// Not allowed (raising the priority needs root or CAP_SYS_NICE): still at `at`.
    Refused { at: i32, wanted: i32, error: String },
}

/// Sets the daemon's priority to `nice`. Call on the main thread before the runtime and any
/// other thread start.
pub fn raise(nice: i32) -> Raised {
    let from = own_nice().unwrap_or(0);
    STARTED_WITH.store(from, Ordering::Relaxed);
    if from == nice {
        return Raised::Unchanged(from);
    }
    match set_own_nice(nice) {
        Ok(()) => Raised::Set { from, to: nice },
        Err(e) => Raised::Refused {
            at: from,
            wanted: nice,
            error: e.to_string(),
        },
    }
}

/// Sets the daemon's priority to the configured `nice` (unset: [`DEFAULT_NICE`]) and logs
/// what came of it; a refusal is a warning when the config asked for the value, a note when
/// it is only the default. Call on the main thread before the runtime starts.
pub fn set_for_daemon(configured: Option<i32>) {
    match raise(configured.unwrap_or(DEFAULT_NICE)) {
        Raised::Set { from, to } => tracing::info!(nice = to, was = from, "daemon priority set"),
        Raised::Unchanged(_) => {}
        Raised::Refused { at, wanted, error } if configured.is_some() => tracing::warn!(
            nice = at,
            wanted,
            %error,
            "cannot set the daemon's priority (raising it needs root or CAP_SYS_NICE): under CPU contention it may miss lease renewals"
        ),
        Raised::Refused { at, wanted, error } => tracing::info!(
            nice = at,
            wanted,
            %error,
            "runs at the priority it was started with (raising it needs root or CAP_SYS_NICE)"
        ),
    }
}

/// Puts the calling thread back at the priority the daemon was started with, so that the
/// processes it forks (services) run at the host's ordinary priority, not the daemon's.
/// Lowering a priority is always allowed; a failure is logged and the thread goes on.
pub fn restore_started_priority() {
    let to = STARTED_WITH.load(Ordering::Relaxed);
    if own_nice().ok() != Some(to)
        && let Err(e) = set_own_nice(to)
    {
        tracing::warn!(error = %e, nice = to, "cannot put the process-spawning thread back at the started priority: services inherit the daemon's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a thread of its own, since a nice value is per thread.
    #[test]
    fn a_thread_moved_and_restored_goes_back_to_the_started_priority() {
        std::thread::spawn(|| {
            let start = own_nice().unwrap();
            // Lowering needs no privilege, so this runs as any user; a test already at the
            // lowest priority goes up instead, which needs root.
            let other = if start < 19 {
                (start + 3).min(19)
            } else {
                start - 3
            };
            if other < start && !nix::unistd::geteuid().is_root() {
                eprintln!("skipped: the test runs at nice 19 and is not root");
                return;
            }
            let r = raise(other);
            assert_eq!(
                r,
                Raised::Set {
                    from: start,
                    to: other
                }
            );
            assert_eq!(own_nice().unwrap(), other);
            // A thread started now inherits the new value.
            let inherited = std::thread::spawn(|| own_nice().unwrap()).join().unwrap();
            assert_eq!(inherited, other);
            // Going back up to where it started is a raise for the thread: only a privileged
            // process may; without privilege it stays where it is and says so in the log.
            restore_started_priority();
            let now = own_nice().unwrap();
            if nix::unistd::geteuid().is_root() || start > other {
                assert_eq!(now, start);
            } else {
                assert_eq!(now, other);
            }
            assert_eq!(raise(now), Raised::Unchanged(now));
        })
        .join()
        .unwrap();
    }
}
