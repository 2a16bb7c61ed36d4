//! spaced's node: the daemon (`spaced`), the admin CLI (`spacectl`), their protocol and the demo.
//!
//! The folders are the architecture; arrows point one way, from the root down:
//!
//! * [`node`] — the composition root: [`node::Node::start`] builds everything, hands each
//!   subsystem only what it uses, and stops it all. Nothing imports it but the binaries.
//! * [`admin`] — the admin protocol (`spacectl` ⇄ node), the server that carries requests out
//!   (membership changes included) and the admin client.
//! * [`placement`] — leased placements: the lease arithmetic, the VIP agent and its renewal
//!   loop, the leader's controller, VIP operations and hand-over.
//! * [`takeover`] — how an address moves: netlink and raw ARP/NA frames, and the fence guard.
//! * [`services`] — the supervisor and which services this node runs (singletons included).
//! * [`devices`] — the device agent (connections) and the leader's device planner loop.
//! * [`lb`] — the balancer glue on the cluster VIP, and standalone `spaced lb`.
//! * [`ops`] — configuration, the HTTP endpoint, metrics.
//! * [`cluster`] — the narrow [`cluster::Cluster`] handle subsystems share: identity, Raft,
//!   the applied fabric, commit/propose, membership and liveness.
//! * [`ctl`] — `spacectl`, one file per command group; [`demo`] — `spaced demo`.

/// This build: package version, git commit and build date (`0.1.0 (3f2a9c1d0b7e, built
/// 2026-12-02)`), as `--version` and `spacectl status` show it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("SPACED_GIT_COMMIT"),
    ", built ",
    env!("SPACED_BUILD_DATE"),
    ")"
);

/// Parses the command line of a binary whose `--version` is [`VERSION`] (`-V`) and
/// [`long_version`] (`--version`); exits on a usage error as clap does.
pub fn parse_args<C: clap::Parser>() -> C {
    let long: &'static str = Box::leak(long_version().into_boxed_str());
    let matches = C::command()
        .version(VERSION)
        .long_version(long)
        .get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The shells `completion` writes a script for.
pub use clap_complete::Shell;

/// `C`'s command with this build's version, as `--version` and the man page show it.
fn command_of<C: clap::CommandFactory>() -> clap::Command {
    C::command().version(VERSION)
}

/// Writes the `shell` completion script for `C` (`spaced`, `spacectl`) to `out`. Rendered
/// in memory first: the generator panics on a failed write (a closed pipe), this returns it.
pub fn write_completion<C: clap::CommandFactory>(
    shell: Shell,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let mut cmd = command_of::<C>();
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// Writes `C`'s man page (roff, section 1) to `out`.
pub fn write_man<C: clap::CommandFactory>(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command_of::<C>()).render(&mut page)?;
    out.write_all(&page)?;
    out.flush()
}

/// [`VERSION`] with the data format and protocol versions, for `--version`.
pub fn long_version() -> String {
    format!(
        "{VERSION}\ndata format {} (format {} backups read too), data dirs of format {} (dirs \
         of formats {} upgraded in place); protocols {}, {} (to nodes of format {} during a \
         rolling upgrade) and {}",
        spaced_raft::store::DATA_FORMAT,
        spaced_raft::store::PREVIOUS_FORMAT,
        spaced_raft::store::DIR_FORMAT,
        spaced_raft::store::UPGRADES_FROM
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        String::from_utf8_lossy(spaced_raft::pki::ALPN_RAFT),
        String::from_utf8_lossy(spaced_raft::pki::ALPN_RAFT_PREVIOUS),
        spaced_raft::store::PREVIOUS_FORMAT,
        String::from_utf8_lossy(spaced_raft::pki::ALPN_ADMIN),
    )
}

pub mod admin;
pub mod cluster;
pub mod ctl;
pub mod demo;
pub mod demo_dr;
pub mod devices;
pub mod lb;
pub mod node;
pub mod ops;
pub mod placement;
pub mod services;
pub mod takeover;

/// Current wall clock in ms since the epoch, for stamping commands.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CLOCK_BOOTTIME, read between two reads of CLOCK_MONOTONIC (`Instant`): the pair leases
/// and the fence guard convert between. Two clocks cannot be read at one instant; a thread
/// preempted between the reads would see their offset off by the time it waited (tens of ms on
/// a loaded host). The bracket bounds that error, and each user rounds it the safe way.
#[derive(Debug, Clone, Copy)]
pub struct ClockPair {
    /// CLOCK_MONOTONIC just before `boottime` was read.
    pub before: std::time::Instant,
    /// CLOCK_BOOTTIME, which goes on while the host is suspended (CLOCK_MONOTONIC stops).
    pub boottime: std::time::Duration,
    /// CLOCK_MONOTONIC just after.
    pub after: std::time::Instant,
}

/// A bracket this tight is taken at once; a wider one (the thread was preempted) is read again.
const CLOCK_PAIR_TIGHT: std::time::Duration = std::time::Duration::from_micros(200);

impl ClockPair {
    /// Reads the pair, again (a few times at most) while the bracket is wider than 200 µs;
    /// `None` if CLOCK_BOOTTIME cannot be read.
    pub fn read() -> Option<ClockPair> {
        let mut best: Option<ClockPair> = None;
        for _ in 0..4 {
            let before = std::time::Instant::now();
            let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
            let after = std::time::Instant::now();
            let pair = ClockPair {
                before,
                boottime: std::time::Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32),
                after,
            };
            if best.is_none_or(|b| pair.width() < b.width()) {
                best = Some(pair);
            }
            if pair.width() <= CLOCK_PAIR_TIGHT {
                break;
            }
        }
        best
    }

    /// How far apart the two monotonic reads were.
    pub fn width(&self) -> std::time::Duration {
        self.after.saturating_duration_since(self.before)
    }
}

/// The log format the binary chose (`text` or `json`). The helper processes it starts (the
/// fence guards) are told it, so that every line a daemon and its guards write to the same
/// stderr has one format: a JSON log with a guard's text lines in it breaks whatever reads it.
pub static LOG_FORMAT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

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
