//! The per-node service supervisor (the model's watchdog): makes this host's child processes match a desired set.
//!
//! The caller (later: the agent, from the fabric) says *which* services should run here with
//! [`Supervisor::set_desired`]; the supervisor starts, health-checks, restarts (with exponential
//! backoff) and stops them as real child processes. The decisions are pure and tested without
//! processes: [`plan`] (desired vs supervised → [`Action`]s), [`Backoff`] (restart delays) and
//! [`validate_desired`]. The rest is a thin tokio shell: one task per service.
//!
//! Process hygiene, so that no service outlives its supervision:
//! - every service (and every health check) runs in its own process group; stopping it signals
//!   the group — SIGTERM, then SIGKILL after `stop_grace` — so its children go too;
//! - every child has `PR_SET_PDEATHSIG(SIGKILL)`, so a SIGKILLed `spaced` takes its services
//!   with it. PDEATHSIG fires when the *thread* that forked the child exits, not the process,
//!   and tokio's blocking-pool threads exit when idle (and a worker thread that enters
//!   `block_in_place` can end up as one). So every fork happens on one dedicated thread
//!   (`Spawner`) that lives as long as the supervisor: its exit is exactly "nobody supervises
//!   these processes any more", which is when they should die;
//! - every child is reaped (tokio's pidfd reaper), and the group is swept after the leader
//!   exits, so stray grandchildren do not run alongside the restarted service.
//!
//! PDEATHSIG reaches only the group leader: grandchildren of a service survive a SIGKILLed
//! `spaced` (they are reparented to init). Only cgroups can close that gap.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Recorder};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

use super::logfile::{LogLimits, ServiceLogs};

const RESTARTS_TOTAL: &str = "spaced_service_restarts_total";
const SERVICE_UP: &str = "spaced_service_up";

/// Longest service name: it becomes a file name (`<name>.log`) and a metric label.
pub const MAX_NAME_LEN: usize = 128;

/// How often a stop polls for stray members of a service's process group.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// How long to wait for a SIGKILLed group to disappear before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(1);

/// How the supervisor paces checks, stops and restarts.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Service `X`'s stdout and stderr are appended to `<log_dir>/X.log`, so output survives
    /// restarts; created at start.
    pub log_dir: PathBuf,
    /// When `X.log` is rotated to `X.log.1` and how many rotated files are kept.
    pub log_limits: LogLimits,
    /// Pace of health checks. Liveness needs no polling: an exit is noticed the moment it happens.
    pub check_interval: Duration,
    /// Time a service gets to exit after SIGTERM before its whole group gets SIGKILL.
    pub stop_grace: Duration,
    /// A health check still running after this counts as failed and is killed, so a hung check
    /// cannot hide a hung service.
    pub health_timeout: Duration,
    /// Delay before the first restart after a failure; doubled on each consecutive failure.
    pub backoff_initial: Duration,
    /// Ceiling of the restart delay, so a crash-looping service is still retried now and then.
    pub backoff_max: Duration,
    /// A service healthy this long has its failure count reset, so a crash after a long good
    /// run restarts after `backoff_initial` again.
    pub backoff_reset: Duration,
    /// Consecutive failed health checks that make the supervisor restart a service: more than
    /// one, so one slow answer does not restart a loaded service.
    pub unhealthy_after: u32,
}

impl SupervisorConfig {
    /// Defaults: checks every 1 s, 5 s stop grace, 2 s health timeout, restarts after 200 ms
    /// doubling up to 30 s (reset after 10 s healthy), restart after 3 failed checks.
    ///
    /// 200 ms puts a killed service back well within 2 s; 3 checks at 1 s restart a hung
    /// service 3–9 s after it stops answering (each check may take up to the timeout).
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        SupervisorConfig {
            log_dir: log_dir.into(),
            log_limits: LogLimits::default(),
            check_interval: Duration::from_secs(1),
            stop_grace: Duration::from_secs(5),
            health_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            backoff_reset: Duration::from_secs(10),
            unhealthy_after: 3,
        }
    }

    /// The restart schedule this configuration implies.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.backoff_initial,
            max: self.backoff_max,
            reset_after: self.backoff_reset,
        }
    }

    /// Rejects values that would spin or stall the supervisor.
    fn validate(&self) -> Result<(), StartError> {
        let problem = if self.check_interval.is_zero() {
            "check_interval must be greater than zero"
        } else if self.backoff_initial.is_zero() {
            "backoff_initial must be greater than zero (a zero delay restarts a crash loop in a busy loop)"
        } else if self.backoff_max < self.backoff_initial {
            "backoff_max must not be less than backoff_initial"
        } else if self.health_timeout.is_zero() {
            "health_timeout must be greater than zero"
        } else if self.unhealthy_after == 0 {
            "unhealthy_after must be at least 1"
        } else {
            return Ok(());
        };
        Err(StartError::Config(problem.to_string()))
    }
}

/// Why the supervisor could not start; fatal for the caller.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The log directory could not be created.
    #[error("supervisor: cannot create the service log directory {}: {source}", dir.display())]
    LogDir {
        /// The directory from the configuration.
        dir: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A configuration value is unusable.
    #[error("supervisor: invalid configuration: {0}")]
    Config(String),
    /// `start` was called outside a tokio runtime.
    #[error("supervisor: must be started inside a tokio runtime")]
    NoRuntime,
    /// The thread that forks every child could not be started.
    #[error("supervisor: cannot start the process-spawning thread: {0}")]
    SpawnerThread(#[source] io::Error),
}

/// Why [`Supervisor::set_desired`] did not apply (all of) a desired set.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// [`Supervisor::shutdown`] ran; nothing is started any more.
    #[error("supervisor is shut down; desired set of {0} service(s) not applied")]
    ShutDown(usize),
    /// Some entries were invalid. The valid ones *were* applied, so one bad entry cannot keep
    /// other services from being stopped (fenced) or started.
    #[error("{} service(s) rejected, the others applied: {}", .0.len(), list_rejections(.0))]
    Rejected(Vec<Rejection>),
}

/// One desired service that cannot be run as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {name:?}: {reason}")]
pub struct Rejection {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

fn list_rejections(r: &[Rejection]) -> String {
    r.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A service that should run on this node, as the caller wants it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DesiredService {
    /// Unique name: `[A-Za-z0-9._-]`, not starting with `.`; names the log file and metrics.
    pub name: String,
    /// Program and arguments, run directly (no shell); the program is looked up in `PATH`.
    pub command: Vec<String>,
    /// Program and arguments run every `check_interval`; exit status 0 means healthy.
    pub health_check: Option<Vec<String>>,
    /// Added to the environment `spaced` runs with (`SPACED_NODE`, `SPACED_EPOCH`,
    /// `SPACED_PLACEMENT`, set by the caller); the health check gets it too. A change restarts
    /// the service, which is how a new epoch reaches it.
    pub env: BTreeMap<String, String>,
}

/// Why a service cannot run here: its definition, its start or its health check. The text is
/// what operators see as the service's `last_error` or rejection reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The definition is unusable (name, command, environment).
    #[error("{0}")]
    Spec(String),
    /// The process could not be started (log file, program).
    #[error("{0}")]
    Start(String),
    /// The health check failed, timed out or could not run.
    #[error("{0}")]
    Check(String),
}

/// Checks that `name` is usable as a file name and metric label.
pub fn validate_service_name(name: &str) -> Result<(), ServiceError> {
    let bad = |why: String| Err(ServiceError::Spec(why));
    if name.is_empty() {
        return bad("name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!("name is longer than {MAX_NAME_LEN} characters"));
    }
    if name.starts_with('.') {
        return bad("name must not start with '.'".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => bad(format!(
            "name contains {c:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
        )),
        None => Ok(()),
    }
}

impl DesiredService {
    /// Everything that would make the service unstartable for reasons of its own definition.
    fn check(&self) -> Result<(), ServiceError> {
        validate_service_name(&self.name)?;
        check_argv("command", &self.command)?;
        if let Some(hc) = &self.health_check {
            check_argv("health_check", hc)?;
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ServiceError::Spec(format!(
                    "environment variable name {k:?} is not valid"
                )));
            }
            if v.contains('\0') {
                return Err(ServiceError::Spec(format!(
                    "environment variable {k} contains a NUL byte"
                )));
            }
        }
        Ok(())
    }
}

fn check_argv(what: &str, argv: &[String]) -> Result<(), ServiceError> {
    let bad = |why: String| Err(ServiceError::Spec(why));
    match argv.first() {
        None => bad(format!("{what} is empty")),
        Some(p) if p.is_empty() => bad(format!("{what} has an empty program name")),
        Some(_) if argv.iter().any(|a| a.contains('\0')) => {
            bad(format!("{what} contains a NUL byte"))
        }
        Some(_) => Ok(()),
    }
}

/// Splits a desired list into the runnable services, by name, and the rejected entries.
/// Of two entries with the same name the first wins and the second is rejected.
pub fn validate_desired(
    services: Vec<DesiredService>,
) -> (BTreeMap<String, DesiredService>, Vec<Rejection>) {
    let mut ok = BTreeMap::new();
    let mut rejected = Vec::new();
    for s in services {
        if let Err(reason) = s.check() {
            rejected.push(Rejection {
                name: s.name,
                reason: reason.to_string(),
            });
        } else if ok.contains_key(&s.name) {
            rejected.push(Rejection {
                name: s.name,
                reason: "duplicate name; the first entry is used".into(),
            });
        } else {
            ok.insert(s.name.clone(), s);
        }
    }
    (ok, rejected)
}

/// One step that brings the supervised set to the desired one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Desired but not supervised: start it.
    Start(String),
    /// Supervised but no longer desired: stop it.
    Stop(String),
    /// Supervised with a different definition (command, health check or env such as a new
    /// `SPACED_EPOCH`): stop the old process, then start the new one.
    Restart(String),
}

/// Desired vs supervised → actions: stops first, then restarts, then starts, each by name.
/// The shell completes every stop before it starts anything.
pub fn plan(
    desired: &BTreeMap<String, DesiredService>,
    supervised: &BTreeMap<String, DesiredService>,
) -> Vec<Action> {
    let stops = supervised
        .keys()
        .filter(|n| !desired.contains_key(*n))
        .map(|n| Action::Stop(n.clone()));
    let restarts = desired
        .iter()
        .filter(|(n, d)| supervised.get(*n).is_some_and(|s| s != *d))
        .map(|(n, _)| Action::Restart(n.clone()));
    let starts = desired
        .keys()
        .filter(|n| !supervised.contains_key(*n))
        .map(|n| Action::Start(n.clone()));
    stops.chain(restarts).chain(starts).collect()
}

/// The restart schedule: `initial`, doubled per consecutive failure, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Healthy time after which the failure count starts over.
    pub reset_after: Duration,
}

impl Backoff {
    /// Delay before restarting after `failures` consecutive failures (0 → no delay).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The consecutive-failure count after one more failure of a service that had been healthy
    /// for `healthy_for` just before it.
    pub fn after_failure(&self, failures: u32, healthy_for: Duration) -> u32 {
        if healthy_for >= self.reset_after {
            1
        } else {
            failures.saturating_add(1)
        }
    }
}

/// Where a supervised service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Being spawned, or (with a health check) spawned but not yet healthy.
    Starting,
    /// Alive, and healthy if it has a health check.
    Running,
    /// Alive but its last health check failed; restarted after `unhealthy_after` in a row.
    Unhealthy,
    /// Exited or was restarted for ill health; waiting `backoff_ms` before the next start.
    Backoff,
    /// Being stopped: SIGTERM sent, SIGKILL after the grace.
    Stopping,
    /// Stopped on request; started again only by `set_desired`.
    Stopped,
    /// Could not be spawned (e.g. the program does not exist); retried after `backoff_ms`.
    FailedToStart,
    /// The desired entry was invalid (see `last_error`) and is not run.
    Rejected,
}

/// What `spacectl` shows about one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Current state.
    pub state: ServiceState,
    /// Pid (= process group id) of the current process, if one exists.
    pub pid: Option<u32>,
    /// Restarts the supervisor made on its own (exit, ill health, failed start). Restarts asked
    /// for by `set_desired` (a changed definition) are not counted.
    pub restarts: u64,
    /// How the previous process ended: `exit code N` or `killed by SIGNAME`.
    pub last_exit: Option<String>,
    /// Result of the last health check; `None` without a health check or before the first.
    pub healthy: Option<bool>,
    /// When `state` was entered, Unix time in milliseconds.
    pub since: u64,
    /// The latest problem, naming the service (and program where relevant).
    pub last_error: Option<String>,
    /// In `backoff` and `failed-to-start`: the delay before the next start, so a crash loop
    /// visibly slows down.
    pub backoff_ms: Option<u64>,
    /// Failures in a row (exits, failed starts, restarts for ill health) without a healthy run
    /// long enough to reset the backoff in between, as of the latest failure.
    pub failures: u32,
}

impl ServiceStatus {
    pub(crate) fn new(name: &str, state: ServiceState, restarts: u64) -> Self {
        ServiceStatus {
            name: name.to_string(),
            state,
            pid: None,
            restarts,
            last_exit: None,
            healthy: None,
            since: unix_ms(),
            last_error: None,
            backoff_ms: None,
            failures: 0,
        }
    }

    /// Moves to `state`, stamping `since` only on a real change.
    fn enter(&mut self, state: ServiceState) {
        if self.state != state {
            self.state = state;
            self.since = unix_ms();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `exit code N`, `killed by SIGKILL`, or `unknown` when the status could not be collected.
fn describe_exit(status: Option<ExitStatus>) -> String {
    match status {
        None => "unknown".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {}", sig.as_str()),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, None) => "unknown".into(),
        },
    }
}

/// A spawn handed to the [`Spawner`] thread.
struct SpawnRequest {
    /// The fully prepared command.
    command: Command,
    /// Where the child (or the spawn error) goes.
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The one long-lived thread that forks every child of the supervisor (see the module doc:
/// PDEATHSIG follows the forking thread). It ends when the last sender is dropped, i.e. when
/// the supervisor and all its service tasks are gone — and with it any child still running.
struct Spawner {
    /// Requests to the thread.
    requests: mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    /// Starts the thread; tokio's child handles (pidfd registrations) belong to `runtime`.
    fn start(runtime: tokio::runtime::Handle) -> io::Result<Spawner> {
        let (requests, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("spaced-spawner".into())
            .spawn(move || {
                // Children inherit the forking thread's priority: the host's, not the daemon's.
                crate::ops::priority::restore_started_priority();
                let _runtime = runtime.enter();
                for mut req in rx {
                    // A requester that went away drops the child, and kill_on_drop kills it.
                    let _ = req.reply.send(req.command.spawn());
                }
            })?;
        Ok(Spawner { requests })
    }

    /// Spawns `command` on the spawner thread.
    async fn spawn(&self, command: Command) -> io::Result<Child> {
        let gone = || io::Error::other("the process-spawning thread has stopped");
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(SpawnRequest { command, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// A child command in its own process group, killed with `spaced`, stdin from /dev/null,
/// killed if its handle is dropped.
fn child_command(argv: &[String], env: &BTreeMap<String, String>) -> io::Result<Command> {
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let parent = nix::unistd::getpid();
    // SAFETY: runs in the forked child before exec. It makes only async-signal-safe system
    // calls (prctl, getppid) and neither allocates nor takes locks; an error makes std's child
    // side `_exit` without exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // spaced died between fork and prctl: the signal will never come, so do not exec.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A child's process group. Dropped while armed (a panicking or aborted task), it SIGKILLs the
/// whole group, so nothing runs on unsupervised.
struct ProcessGroup {
    /// The group id: the leader's pid, since children are spawned with `process_group(0)`.
    pgid: Pid,
    /// Whether the drop should still kill the group.
    armed: bool,
}

impl ProcessGroup {
    fn of(pid: u32) -> Self {
        ProcessGroup {
            pgid: Pid::from_raw(pid as i32),
            armed: true,
        }
    }

    /// Signals every member; a vanished group is not an error.
    fn signal(&self, sig: Signal) {
        match killpg(self.pgid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                warn!(pgid = self.pgid.as_raw(), signal = %sig, error = %e, "cannot signal process group")
            }
        }
    }

    /// Whether any member is still running (zombies waiting for init do not count).
    ///
    /// Only asked after the leader was reaped: the pgid stays reserved while any member exists,
    /// so it can only be reused once the group is empty — and then a new group would need a
    /// full pid wrap-around within this call.
    fn has_live_members(&self) -> bool {
        if let Err(Errno::ESRCH) = killpg(self.pgid, None) {
            return false;
        }
        live_group_members(self.pgid).map_or(true, |m| !m.is_empty())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Pids of the non-zombie processes in group `pgid`, from `/proc`.
fn live_group_members(pgid: Pid) -> io::Result<Vec<Pid>> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile simply has no stat any more.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, pgrp)) = parse_stat(&stat)
            && pgrp == pgid.as_raw()
            && !matches!(state, 'Z' | 'X')
        {
            members.push(Pid::from_raw(pid));
        }
    }
    Ok(members)
}

/// State and process group from `/proc/<pid>/stat` (after the parenthesised command name,
/// which may itself contain spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// State shared by the supervisor handle and its service tasks.
struct Shared {
    /// Timing and paths.
    cfg: SupervisorConfig,
    /// Where the services' output goes.
    logs: ServiceLogs,
    /// The thread every child is forked from.
    spawner: Spawner,
    /// What `status()` reports, updated by the service tasks.
    statuses: Mutex<BTreeMap<String, ServiceStatus>>,
    /// The node's own metrics registry; `None` uses the global `metrics` recorder.
    recorder: Option<Arc<dyn Recorder + Send + Sync>>,
    /// Signalled after every start, once `status()` shows the new pid.
    started: Notify,
    /// Asked before every start and restart (see [`Supervisor::set_start_gate`]).
    gate: std::sync::RwLock<Option<StartGate>>,
}

/// Whether a service may start now; see [`Supervisor::set_start_gate`].
pub type StartGate = Arc<dyn Fn(&DesiredService) -> bool + Send + Sync>;

/// How often a start the gate holds back is asked again.
const GATE_LOOK: Duration = Duration::from_millis(20);

impl Shared {
    fn update(&self, name: &str, f: impl FnOnce(&mut ServiceStatus)) {
        if let Some(s) = crate::lock(&self.statuses).get_mut(name) {
            f(s);
        }
    }

    fn with_recorder<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.recorder {
            Some(r) => metrics::with_local_recorder(r.as_ref(), f),
            None => f(),
        }
    }
}

/// One service under supervision, as the control side sees it.
struct Supervised {
    /// The definition its task runs; compared with the next desired set.
    spec: DesiredService,
    /// Set to `true` to make the task stop the service and end.
    stop: watch::Sender<bool>,
    /// Set before `stop` to skip the grace: SIGKILL at once (fencing a lapsed lease).
    hard: Arc<AtomicBool>,
    /// The task; awaited to know the service is fully stopped.
    task: JoinHandle<()>,
}

/// The control side, changed by one caller at a time.
#[derive(Default)]
struct Control {
    /// Services with a task, by name.
    supervised: BTreeMap<String, Supervised>,
    /// Set by `shutdown`; nothing is started afterwards.
    shut_down: bool,
    /// Names killed by [`Supervisor::kill_now`]: not started by `set_desired` until
    /// [`Supervisor::unfence`], so a desired set computed just before a fence cannot revive them.
    fenced: BTreeSet<String>,
}

/// Inside the `Supervisor` handle.
struct Inner {
    /// Shared with the service tasks.
    shared: Arc<Shared>,
    /// Serialises `set_desired`, `stop_now` and `shutdown`, so a restart's stop always completes
    /// before its start and no two calls interleave their stops and starts. Dropping it (the last
    /// handle) drops every stop sender, which makes each task stop its service.
    control: tokio::sync::Mutex<Control>,
}

/// The supervisor handle; cheap to clone. When the last clone is dropped without
/// [`shutdown`](Self::shutdown), every service is still stopped (SIGTERM, grace, SIGKILL) in the
/// background while the runtime runs; if the runtime goes first, the groups are SIGKILLed.
#[derive(Clone)]
pub struct Supervisor {
    /// Everything, shared by the clones.
    inner: Arc<Inner>,
}

impl Supervisor {
    /// Sets what is asked before every start and restart of a service: while it says no, the
    /// service waits (state `starting`), asked again every 20 ms, until it says yes or the
    /// service is stopped. A singleton's process must not start without a valid lease: the
    /// restart after a crash, too, comes from the service's own task, which knows nothing of
    /// leases (the fence guard SIGKILLs a singleton whose daemon is frozen at the lease end;
    /// the daemon, thawed, saw the exit and restarted it at the old epoch, while another node
    /// already ran it at the next one: the fault campaign found this).
    pub fn set_start_gate(&self, gate: StartGate) {
        *self
            .inner
            .shared
            .gate
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// Starts a supervisor with no services, recording metrics in the global `metrics` recorder.
    /// Must be called inside a tokio runtime.
    pub fn start(cfg: SupervisorConfig) -> Result<Supervisor, StartError> {
        Self::start_inner(cfg, None)
    }

    /// Like [`start`](Self::start), recording metrics in `recorder` (a node's own registry).
    pub fn start_with_recorder(
        cfg: SupervisorConfig,
        recorder: Arc<dyn Recorder + Send + Sync>,
    ) -> Result<Supervisor, StartError> {
        Self::start_inner(cfg, Some(recorder))
    }

    fn start_inner(
        cfg: SupervisorConfig,
        recorder: Option<Arc<dyn Recorder + Send + Sync>>,
    ) -> Result<Supervisor, StartError> {
        cfg.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        std::fs::create_dir_all(&cfg.log_dir).map_err(|source| StartError::LogDir {
            dir: cfg.log_dir.clone(),
            source,
        })?;
        let spawner = Spawner::start(runtime).map_err(StartError::SpawnerThread)?;
        let logs = ServiceLogs::new(cfg.log_dir.clone(), cfg.log_limits);
        let shared = Arc::new(Shared {
            cfg,
            logs,
            spawner,
            statuses: Mutex::default(),
            recorder,
            started: Notify::new(),
            gate: std::sync::RwLock::new(None),
        });
        shared.with_recorder(|| {
            metrics::describe_counter!(
                RESTARTS_TOTAL,
                "Restarts the supervisor made on its own (exit, failed health checks, failed start)."
            );
            metrics::describe_gauge!(
                SERVICE_UP,
                "1 while the service runs and is healthy, 0 otherwise."
            );
        });
        Ok(Supervisor {
            inner: Arc::new(Inner {
                shared,
                control: tokio::sync::Mutex::default(),
            }),
        })
    }

    /// Makes the host match `services`: stops what is no longer desired, restarts what changed
    /// (stop completes first), starts what is new. Returns once every stop has completed; new
    /// services are then being spawned.
    ///
    /// Invalid entries (see [`validate_desired`]) are left out, shown in [`status`](Self::status)
    /// as `rejected`, and returned as [`DesiredError::Rejected`] — after the valid ones were
    /// applied. A service stopped with [`stop_now`](Self::stop_now) starts again when it is in
    /// `services`.
    pub async fn set_desired(&self, services: Vec<DesiredService>) -> Result<(), DesiredError> {
        let count = services.len();
        let (mut desired, rejected) = validate_desired(services);
        let shared = &self.inner.shared;
        let mut control = self.inner.control.lock().await;
        if control.shut_down {
            return Err(DesiredError::ShutDown(count));
        }
        desired.retain(|name, _| !control.fenced.contains(name));
        let supervised: BTreeMap<String, DesiredService> = control
            .supervised
            .iter()
            .map(|(n, s)| (n.clone(), s.spec.clone()))
            .collect();
        let actions = plan(&desired, &supervised);

        let mut stopping = Vec::new();
        for action in &actions {
            if let Action::Stop(name) | Action::Restart(name) = action
                && let Some(s) = control.supervised.remove(name)
            {
                stopping.push((name.clone(), s));
            }
        }
        stop_all(shared, stopping).await;

        {
            let mut statuses = crate::lock(&shared.statuses);
            // What is no longer desired has just been stopped: forget it.
            statuses
                .retain(|name, s| desired.contains_key(name) && s.state != ServiceState::Rejected);
            for r in &rejected {
                if !desired.contains_key(&r.name) {
                    let mut s = ServiceStatus::new(&r.name, ServiceState::Rejected, 0);
                    s.last_error = Some(r.to_string());
                    statuses.insert(r.name.clone(), s);
                }
            }
        }
        for r in &rejected {
            warn!(service = %r.name, reason = %r.reason, "desired service rejected");
        }

        for action in actions {
            if let Action::Start(name) | Action::Restart(name) = action
                && let Some(spec) = desired.get(&name)
            {
                let s = self.launch(spec.clone());
                control.supervised.insert(name, s);
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(DesiredError::Rejected(rejected))
        }
    }

    /// Stops `name` at once and returns when its whole process group is gone (singleton fencing:
    /// it must be dead before its lease can be granted elsewhere). It stays stopped until a later
    /// `set_desired` includes it. Returns whether it was supervised.
    pub async fn stop_now(&self, name: &str) -> bool {
        self.stop_one(name, false, false).await
    }

    /// A graceful stop, as [`stop_now`](Self::stop_now), that also fences `name` as
    /// [`kill_now`](Self::kill_now) does, in one step: no `set_desired` can start it again
    /// between the stop and the fence (a singleton handed over on request).
    pub async fn stop_and_fence(&self, name: &str) -> bool {
        self.stop_one(name, true, false).await
    }

    /// Like [`stop_now`](Self::stop_now) without the grace: SIGKILL to the whole group at once.
    /// For fencing a singleton whose lease ran out, where waiting is not allowed.
    /// It stays fenced (never started, whatever `set_desired` asks) until [`unfence`](Self::unfence).
    pub async fn kill_now(&self, name: &str) -> bool {
        self.stop_one(name, true, true).await
    }

    /// Stops `name` (without the grace if `hard`), fencing it first if `fence`, all under the
    /// control lock; returns whether it was supervised.
    async fn stop_one(&self, name: &str, fence: bool, hard: bool) -> bool {
        let mut control = self.inner.control.lock().await;
        if fence {
            control.fenced.insert(name.to_string());
        }
        let Some(s) = control.supervised.remove(name) else {
            return false;
        };
        if hard {
            s.hard.store(true, Ordering::SeqCst);
        }
        stop_all(&self.inner.shared, vec![(name.to_string(), s)]).await;
        true
    }

    /// Lets `set_desired` start `name` again after [`kill_now`](Self::kill_now) (a new lease).
    pub async fn unfence(&self, name: &str) {
        self.inner.control.lock().await.fenced.remove(name);
    }

    /// Completes after the supervisor started a process (a first start or a restart), once
    /// [`status`](Self::status) shows its pid. A start while nobody waits is remembered, so
    /// a caller that checks the status and then waits misses none.
    pub async fn started(&self) {
        self.inner.shared.started.notified().await;
    }

    /// Every known service: the desired ones, those stopped by `stop_now`, rejected entries.
    pub fn status(&self) -> Vec<ServiceStatus> {
        crate::lock(&self.inner.shared.statuses)
            .values()
            .cloned()
            .collect()
    }

    /// Stops every service (SIGTERM, grace, SIGKILL; all in parallel) and waits until all are
    /// gone. Later `set_desired` calls are refused.
    pub async fn shutdown(&self) {
        let mut control = self.inner.control.lock().await;
        control.shut_down = true;
        let all = std::mem::take(&mut control.supervised);
        stop_all(&self.inner.shared, all.into_iter().collect()).await;
    }

    /// Starts the task that supervises `spec`, keeping the restart count of an earlier run.
    fn launch(&self, spec: DesiredService) -> Supervised {
        let shared = &self.inner.shared;
        let restarts = {
            let mut statuses = crate::lock(&shared.statuses);
            let restarts = statuses.get(&spec.name).map_or(0, |s| s.restarts);
            statuses.insert(
                spec.name.clone(),
                ServiceStatus::new(&spec.name, ServiceState::Starting, restarts),
            );
            restarts
        };
        let (restarts_total, up) = shared.with_recorder(|| {
            (
                metrics::counter!(RESTARTS_TOTAL, "service" => spec.name.clone()),
                metrics::gauge!(SERVICE_UP, "service" => spec.name.clone()),
            )
        });
        up.set(0.0);
        let (stop, stop_rx) = watch::channel(false);
        let hard = Arc::new(AtomicBool::new(false));
        let run = ServiceRun {
            shared: shared.clone(),
            spec: spec.clone(),
            stop: stop_rx,
            restarts,
            restarts_total,
            up,
            hard: hard.clone(),
        };
        Supervised {
            spec,
            stop,
            hard,
            task: tokio::spawn(run.run()),
        }
    }
}

/// Tells each task to stop and waits for all of them together (one grace, not one per service).
async fn stop_all(shared: &Shared, services: Vec<(String, Supervised)>) {
    for (_, s) in &services {
        s.stop.send_replace(true);
    }
    futures::future::join_all(services.into_iter().map(|(name, s)| async move {
        if let Err(e) = s.task.await {
            // The task's ProcessGroup guard SIGKILLed the group while unwinding.
            error!(service = %name, error = %e, "supervision task failed");
            shared.update(&name, |st| {
                st.enter(ServiceState::Stopped);
                st.pid = None;
                st.last_error = Some(format!("service {name}: supervision task failed: {e}"));
            });
        }
    }))
    .await;
}

/// Resolves once a stop is requested (or every stop sender is gone).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A running service process.
struct Live {
    /// Tokio's handle: waits for (and reaps) the leader.
    child: Child,
    /// The leader's group.
    group: ProcessGroup,
    /// The leader's pid.
    pid: u32,
}

/// How watching a live service ended.
enum Ended {
    /// The caller wants it stopped.
    StopRequested,
    /// The leader exited on its own.
    Exited {
        /// Its status, if it could be collected.
        status: Option<ExitStatus>,
        /// How long it had been healthy before, for the backoff reset.
        healthy_for: Duration,
    },
    /// `unhealthy_after` health checks failed in a row.
    Unhealthy,
}

/// A running health check.
type HealthCheck = Pin<Box<dyn Future<Output = Result<(), ServiceError>> + Send>>;

/// The task that keeps one service alive.
struct ServiceRun {
    /// Config, spawner, statuses.
    shared: Arc<Shared>,
    /// What to run.
    spec: DesiredService,
    /// Becomes `true` when the service is to be stopped.
    stop: watch::Receiver<bool>,
    /// Restarts made so far, mirrored into the status.
    restarts: u64,
    /// `spaced_service_restarts_total{service}`.
    restarts_total: Counter,
    /// `spaced_service_up{service}`.
    up: Gauge,
    /// When set, a stop skips the grace period (see [`Supervisor::kill_now`]).
    hard: Arc<AtomicBool>,
}

impl ServiceRun {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn update(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.shared.update(&self.spec.name, f);
    }

    /// Whether the start gate lets this service start now.
    fn gate_allows(&self) -> bool {
        let gate = self
            .shared
            .gate
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        gate.is_none_or(|g| g(&self.spec))
    }

    /// Waits until the start gate lets this service start (`true`), or it is to stop.
    async fn gate_open(&mut self) -> bool {
        let mut said = false;
        while !self.gate_allows() {
            if !said {
                info!(service = %self.name(), "start held back: no valid lease for it here");
                said = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(GATE_LOOK) => {}
                _ = stop_requested(&mut self.stop) => return false,
            }
        }
        true
    }

    async fn run(mut self) {
        let backoff = self.shared.cfg.backoff();
        let mut failures = 0u32;
        loop {
            self.update(|s| {
                s.enter(ServiceState::Starting);
                s.pid = None;
                s.healthy = None;
                s.backoff_ms = None;
            });
            if !self.gate_open().await {
                self.update(|s| s.enter(ServiceState::Stopped));
                info!(service = %self.name(), "service stopped before it started");
                return;
            }
            let (failed_state, healthy_for) = match self.spawn_service().await {
                Err(msg) => {
                    warn!(service = %self.name(), error = %msg, "service failed to start");
                    self.update(|s| s.last_error = Some(msg.to_string()));
                    (ServiceState::FailedToStart, Duration::ZERO)
                }
                Ok(mut live) => {
                    let ended = self.watch(&mut live).await;
                    self.up.set(0.0);
                    match ended {
                        Ended::StopRequested => {
                            self.stop_service(live).await;
                            return;
                        }
                        Ended::Exited {
                            status,
                            healthy_for,
                        } => {
                            let exit = describe_exit(status);
                            warn!(service = %self.name(), pid = live.pid, exit = %exit, "service exited");
                            let error = format!("service {} exited ({exit})", self.name());
                            self.update(|s| {
                                s.pid = None;
                                s.healthy = None;
                                s.last_exit = Some(exit);
                                s.last_error = Some(error);
                            });
                            // Stray children of the old run must not overlap the next one.
                            let deadline = Instant::now() + self.shared.cfg.stop_grace;
                            self.clear_group(&mut live.group, deadline, false).await;
                            (ServiceState::Backoff, healthy_for)
                        }
                        Ended::Unhealthy => {
                            self.update(|s| s.enter(ServiceState::Stopping));
                            let exit = describe_exit(self.terminate(&mut live).await);
                            warn!(service = %self.name(), pid = live.pid, exit = %exit, "unhealthy service stopped for a restart");
                            self.update(|s| {
                                s.pid = None;
                                s.last_exit = Some(exit);
                            });
                            (ServiceState::Backoff, Duration::ZERO)
                        }
                    }
                }
            };
            failures = backoff.after_failure(failures, healthy_for);
            let delay = backoff.delay(failures);
            self.update(|s| {
                s.enter(failed_state);
                s.pid = None;
                s.backoff_ms = Some(delay.as_millis() as u64);
                s.failures = failures;
            });
            info!(service = %self.name(), delay_ms = delay.as_millis() as u64, failures, "restarting after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut self.stop) => {
                    self.update(|s| {
                        s.enter(ServiceState::Stopped);
                        s.backoff_ms = None;
                    });
                    info!(service = %self.name(), "service stopped during backoff");
                    return;
                }
            }
            self.restarts += 1;
            self.restarts_total.increment(1);
            let restarts = self.restarts;
            self.update(|s| s.restarts = restarts);
        }
    }

    /// Spawns the service with its output appended to its log file.
    async fn spawn_service(&self) -> Result<Live, ServiceError> {
        let name = self.name();
        let program = self.spec.command.first().map_or("", String::as_str);
        let log_path = self.shared.logs.path(&self.spec.name);
        let log_error = |e: io::Error| {
            ServiceError::Start(format!(
                "service {name}: cannot open log file {}: {e}",
                log_path.display()
            ))
        };
        let stdout = self
            .shared
            .logs
            .attach(&self.spec.name)
            .map_err(log_error)?;
        let stderr = stdout.try_clone().map_err(log_error)?;
        let spawn_error = |e: io::Error| {
            ServiceError::Start(format!("service {name}: cannot start {program:?}: {e}"))
        };
        let mut cmd = child_command(&self.spec.command, &self.spec.env).map_err(spawn_error)?;
        cmd.stdout(stdout).stderr(stderr);
        let child = self.shared.spawner.spawn(cmd).await.map_err(spawn_error)?;
        let Some(pid) = child.id() else {
            return Err(ServiceError::Start(format!(
                "service {name}: {program:?} vanished right after spawning"
            )));
        };
        let epoch = self.spec.env.get("SPACED_EPOCH").map_or("", String::as_str);
        info!(service = %name, pid, epoch, "service started");
        let has_check = self.spec.health_check.is_some();
        self.update(|s| {
            s.pid = Some(pid);
            if !has_check {
                s.enter(ServiceState::Running);
            }
        });
        if !has_check {
            self.up.set(1.0);
        }
        self.shared.started.notify_one();
        Ok(Live {
            child,
            group: ProcessGroup::of(pid),
            pid,
        })
    }

    /// Waits for the service to exit, fail its health checks, or be asked to stop.
    async fn watch(&mut self, live: &mut Live) -> Ended {
        let cfg = &self.shared.cfg;
        let started = Instant::now();
        let has_check = self.spec.health_check.is_some();
        let mut healthy_since = if has_check { None } else { Some(started) };
        let mut ticker = tokio::time::interval_at(started + cfg.check_interval, cfg.check_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut check: Option<HealthCheck> = None;
        let mut failed_checks = 0u32;
        loop {
            tokio::select! {
                status = live.child.wait() => {
                    let status = match status {
                        Ok(s) => Some(s),
                        Err(e) => {
                            warn!(service = %self.spec.name, pid = live.pid, error = %e, "cannot collect exit status");
                            None
                        }
                    };
                    let healthy_for = healthy_since.map_or(Duration::ZERO, |t| t.elapsed());
                    return Ended::Exited { status, healthy_for };
                }
                _ = stop_requested(&mut self.stop) => return Ended::StopRequested,
                _ = ticker.tick(), if has_check && check.is_none() => {
                    check = Some(Box::pin(run_health_check(self.shared.clone(), self.spec.clone())));
                }
                result = poll_check(&mut check) => {
                    check = None;
                    match result {
                        Ok(()) => {
                            failed_checks = 0;
                            healthy_since.get_or_insert_with(Instant::now);
                            self.update(|s| {
                                s.enter(ServiceState::Running);
                                s.healthy = Some(true);
                            });
                            self.up.set(1.0);
                        }
                        Err(reason) => {
                            failed_checks += 1;
                            healthy_since = None;
                            let error = format!(
                                "service {}: health check failed ({failed_checks}/{}): {reason}",
                                self.spec.name, cfg.unhealthy_after
                            );
                            warn!(service = %self.spec.name, pid = live.pid, failed_checks, reason = %reason, "health check failed");
                            self.update(|s| {
                                s.enter(ServiceState::Unhealthy);
                                s.healthy = Some(false);
                                s.last_error = Some(error);
                            });
                            self.up.set(0.0);
                            if failed_checks >= cfg.unhealthy_after {
                                return Ended::Unhealthy;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Stops a live service on request and records it as stopped.
    async fn stop_service(&self, mut live: Live) {
        self.update(|s| s.enter(ServiceState::Stopping));
        let exit = describe_exit(self.terminate(&mut live).await);
        info!(service = %self.name(), pid = live.pid, exit = %exit, "service stopped");
        self.update(|s| {
            s.enter(ServiceState::Stopped);
            s.pid = None;
            s.healthy = None;
            s.last_exit = Some(exit);
        });
    }

    /// SIGTERM to the group; SIGKILL to it after `stop_grace`; returns once the leader is reaped
    /// and no member is left.
    async fn terminate(&self, live: &mut Live) -> Option<ExitStatus> {
        let grace = if self.hard.load(Ordering::SeqCst) {
            Duration::ZERO
        } else {
            self.shared.cfg.stop_grace
        };
        let deadline = Instant::now() + grace;
        live.group.signal(Signal::SIGTERM);
        let status = match tokio::time::timeout_at(deadline, live.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(e)) => {
                warn!(service = %self.name(), pid = live.pid, error = %e, "cannot wait for service; killing its group");
                live.group.signal(Signal::SIGKILL);
                None
            }
            Err(_) => {
                warn!(service = %self.name(), pid = live.pid, grace_ms = grace.as_millis() as u64, "service ignored SIGTERM; sending SIGKILL");
                live.group.signal(Signal::SIGKILL);
                live.child.wait().await.ok()
            }
        };
        self.clear_group(&mut live.group, deadline, true).await;
        status
    }

    /// Once the leader is reaped: lets the rest of the group exit until `deadline` (after a
    /// SIGTERM unless `termed`), then SIGKILLs it.
    async fn clear_group(&self, group: &mut ProcessGroup, deadline: Instant, termed: bool) {
        let mut termed = termed;
        while group.has_live_members() {
            if !termed {
                group.signal(Signal::SIGTERM);
                termed = true;
            }
            if Instant::now() >= deadline {
                warn!(service = %self.name(), pgid = group.pgid.as_raw(), "processes left in the service's group; sending SIGKILL");
                group.signal(Signal::SIGKILL);
                let give_up = Instant::now() + KILL_WAIT;
                while group.has_live_members() && Instant::now() < give_up {
                    tokio::time::sleep(GROUP_POLL).await;
                }
                break;
            }
            tokio::time::sleep(GROUP_POLL).await;
        }
        group.armed = false;
    }
}

/// The running check's result; never resolves while no check runs.
async fn poll_check(check: &mut Option<HealthCheck>) -> Result<(), ServiceError> {
    match check {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// Runs the service's health check once, with the timeout; output is discarded.
async fn run_health_check(shared: Arc<Shared>, spec: DesiredService) -> Result<(), ServiceError> {
    let Some(argv) = spec.health_check.as_deref() else {
        return Ok(());
    };
    let program = argv.first().map_or("", String::as_str);
    let failed = |why: String| ServiceError::Check(why);
    let cannot_start = |e: io::Error| failed(format!("cannot start {program:?}: {e}"));
    let mut cmd = child_command(argv, &spec.env).map_err(cannot_start)?;
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = shared.spawner.spawn(cmd).await.map_err(cannot_start)?;
    let Some(pid) = child.id() else {
        return Err(failed(format!("{program:?} vanished right after spawning")));
    };
    // Dropped early (the service exited or is being stopped), the guard kills the check's group.
    let mut group = ProcessGroup::of(pid);
    let timeout = shared.cfg.health_timeout;
    let result = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(failed(format!(
            "{program:?} ended with {}",
            describe_exit(Some(status))
        ))),
        Ok(Err(e)) => Err(failed(format!("cannot wait for {program:?}: {e}"))),
        Err(_) => {
            group.signal(Signal::SIGKILL);
            let _ = child.wait().await;
            Err(failed(format!(
                "{program:?} did not finish within {} ms",
                timeout.as_millis()
            )))
        }
    };
    // Whatever the check left running in its group goes now.
    if group.has_live_members() {
        group.signal(Signal::SIGKILL);
    }
    group.armed = false;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokio::time::timeout;

    // ---- pure parts ----

    fn spec(name: &str, epoch: &str) -> DesiredService {
        DesiredService {
            name: name.into(),
            command: vec!["/bin/true".into()],
            health_check: None,
            env: BTreeMap::from([("SPACED_EPOCH".into(), epoch.into())]),
        }
    }

    fn by_name(list: &[DesiredService]) -> BTreeMap<String, DesiredService> {
        list.iter().map(|s| (s.name.clone(), s.clone())).collect()
    }

    #[test]
    fn plan_table() {
        use Action::*;
        let a1 = spec("a", "1");
        let a2 = spec("a", "2");
        let b = spec("b", "1");
        let c = spec("c", "1");
        // (what, desired, supervised, expected actions)
        type Case = (
            &'static str,
            Vec<DesiredService>,
            Vec<DesiredService>,
            Vec<Action>,
        );
        let cases: Vec<Case> = vec![
            ("nothing to do", vec![], vec![], vec![]),
            (
                "start new",
                vec![a1.clone()],
                vec![],
                vec![Start("a".into())],
            ),
            (
                "stop removed",
                vec![],
                vec![a1.clone()],
                vec![Stop("a".into())],
            ),
            (
                "unchanged stays",
                vec![a1.clone()],
                vec![a1.clone()],
                vec![],
            ),
            (
                "new epoch restarts",
                vec![a2.clone()],
                vec![a1.clone()],
                vec![Restart("a".into())],
            ),
            (
                "stops before restarts before starts",
                vec![a2.clone(), c.clone()],
                vec![a1.clone(), b.clone()],
                vec![Stop("b".into()), Restart("a".into()), Start("c".into())],
            ),
        ];
        for (what, desired, supervised, want) in cases {
            assert_eq!(
                plan(&by_name(&desired), &by_name(&supervised)),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        };
        let ms: Vec<u64> = (0..=10).map(|n| b.delay(n).as_millis() as u64).collect();
        assert_eq!(
            ms,
            [
                0, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000
            ]
        );
        // No overflow, however long the crash loop.
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(30));
        // A crash loop's first minute: 8 restarts, where a fixed 200 ms delay would make ~300.
        let mut spent = Duration::ZERO;
        let mut restarts = 0;
        while spent + b.delay(restarts + 1) <= Duration::from_secs(60) {
            restarts += 1;
            spent += b.delay(restarts);
        }
        assert_eq!(restarts, 8);
    }

    #[test]
    fn backoff_resets_after_a_healthy_run() {
        let b = SupervisorConfig::new("/x").backoff();
        assert_eq!(b.after_failure(0, Duration::ZERO), 1);
        assert_eq!(b.after_failure(5, Duration::from_secs(9)), 6);
        assert_eq!(b.after_failure(5, Duration::from_secs(10)), 1);
        assert_eq!(b.after_failure(u32::MAX, Duration::ZERO), u32::MAX);
    }

    #[test]
    fn service_names() {
        for ok in [
            "web",
            "job-poller",
            "a.b_c-1",
            "X",
            &"n".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(validate_service_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "../etc/passwd",
            "a/b",
            "a b",
            "tab\t",
            "é",
            &"n".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(validate_service_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn validate_desired_keeps_the_valid_entries() {
        let mut empty_cmd = spec("nocmd", "1");
        empty_cmd.command.clear();
        let mut empty_check = spec("nocheck", "1");
        empty_check.health_check = Some(vec![]);
        let mut bad_env = spec("badenv", "1");
        bad_env.env.insert("A=B".into(), "x".into());
        let (ok, rejected) = validate_desired(vec![
            spec("a", "1"),
            spec("../a", "1"),
            spec("a", "2"),
            empty_cmd,
            empty_check,
            bad_env,
            spec("b", "1"),
        ]);
        assert_eq!(ok.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(ok["a"].env["SPACED_EPOCH"], "1", "first entry wins");
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["../a", "a", "nocmd", "nocheck", "badenv"]);
        assert!(rejected[1].reason.contains("duplicate"), "{rejected:?}");
        assert!(
            rejected[2].reason.contains("command is empty"),
            "{rejected:?}"
        );
    }

    #[test]
    fn config_validation() {
        let good = SupervisorConfig::new("/x");
        assert!(good.validate().is_ok());
        let mut c = good.clone();
        c.check_interval = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.backoff_initial = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.backoff_max = Duration::from_millis(1);
        assert!(c.validate().is_err());
        let mut c = good;
        c.unhealthy_after = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn status_json_uses_kebab_case_states() {
        let mut s = ServiceStatus::new("web", ServiceState::FailedToStart, 2);
        s.since = 1;
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "failed-to-start");
        assert_eq!(json["restarts"], 2);
        let back: ServiceStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn proc_stat_parsing() {
        let stat = "4242 (we ird) name)) S 1 4240 4240 0 -1 4194560 0";
        assert_eq!(parse_stat(stat), Some(('S', 4240)));
        assert_eq!(parse_stat("garbage"), None);
    }

    // ---- real processes ----

    fn test_config(dir: &Path) -> SupervisorConfig {
        SupervisorConfig {
            log_dir: dir.join("logs"),
            log_limits: LogLimits::default(),
            check_interval: Duration::from_millis(100),
            stop_grace: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            backoff_reset: Duration::from_secs(10),
            unhealthy_after: 2,
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    fn service(name: &str, script: &str) -> DesiredService {
        DesiredService {
            name: name.into(),
            command: sh(script),
            health_check: None,
            env: BTreeMap::from([
                ("SPACED_NODE".into(), "n1".into()),
                ("SPACED_EPOCH".into(), "1".into()),
            ]),
        }
    }

    /// Polls `probe` until it yields, failing the test after `limit`.
    async fn eventually<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn status_of(sup: &Supervisor, name: &str) -> Option<ServiceStatus> {
        sup.status().into_iter().find(|s| s.name == name)
    }

    /// The pid of `name` once it is `running`.
    fn running_pid(sup: &Supervisor, name: &str) -> Option<u32> {
        status_of(sup, name)
            .filter(|s| s.state == ServiceState::Running)
            .and_then(|s| s.pid)
    }

    /// Whether `pid` exists and is not a zombie.
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
    }

    fn read_pid(path: &Path) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn group_is_empty(pgid: u32) -> bool {
        live_group_members(Pid::from_raw(pgid as i32))
            .unwrap()
            .is_empty()
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn starts_with_env_and_logs_output() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let env_file = dir.path().join("env");
        let script = format!(
            "echo \"$SPACED_NODE $SPACED_EPOCH\" > {}; echo to-stdout; echo to-stderr >&2; exec sleep 1000",
            env_file.display()
        );
        sup.set_desired(vec![service("web", &script)])
            .await
            .unwrap();
        let pid = eventually("web running", LONG, || running_pid(&sup, "web")).await;
        let env = eventually("env written", LONG, || {
            std::fs::read_to_string(&env_file)
                .ok()
                .filter(|s| s.ends_with('\n'))
        })
        .await;
        assert_eq!(env, "n1 1\n");
        let log = dir.path().join("logs/web.log");
        let text = eventually("both streams in the log", LONG, || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("to-stdout") && t.contains("to-stderr"))
        })
        .await;
        assert!(
            text.contains("to-stdout\n") && text.contains("to-stderr\n"),
            "{text}"
        );
        let s = status_of(&sup, "web").unwrap();
        assert_eq!((s.restarts, s.healthy, s.last_exit), (0, None, None));
        sup.shutdown().await;
        assert!(!alive(pid));
        assert_eq!(status_of(&sup, "web").unwrap().state, ServiceState::Stopped);
        assert!(matches!(
            sup.set_desired(vec![service("web", "true")]).await,
            Err(DesiredError::ShutDown(1))
        ));
    }

    #[tokio::test]
    async fn a_services_output_is_rotated_by_size_into_a_bounded_count_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SupervisorConfig {
            log_limits: LogLimits {
                max_bytes: 16 * 1024,
                files: 2,
            },
            ..test_config(dir.path())
        };
        let sup = Supervisor::start(cfg).unwrap();
        // 100,000 bytes in lines of 100, from the service and from a child it forked.
        let script = "i=0; while [ $i -lt 1000 ]; do printf '%099d\\n' $i; i=$((i+1)); done; \
                      sh -c 'echo from-the-child >&2'; exec sleep 1000";
        sup.set_desired(vec![service("chatty", script)])
            .await
            .unwrap();
        let logs = dir.path().join("logs");
        let file = |n: u32| {
            logs.join(match n {
                0 => "chatty.log".to_string(),
                n => format!("chatty.log.{n}"),
            })
        };
        let now = eventually("the child's line in the current log", LONG, || {
            std::fs::read_to_string(file(0))
                .ok()
                .filter(|t| t.ends_with("from-the-child\n"))
        })
        .await;
        assert!(!file(3).exists(), "only 2 rotated files are kept");
        let (one, two) = (
            std::fs::read_to_string(file(1)).unwrap(),
            std::fs::read_to_string(file(2)).unwrap(),
        );
        for f in [&two, &one, &now] {
            assert!(f.len() <= 16 * 1024, "a file of {} bytes", f.len());
        }
        // The files are the tail of the output, in order, nothing lost at the rotations.
        let tail = [two, one, now].concat();
        let lines: Vec<&str> = tail.lines().collect();
        let numbers: Vec<u32> = lines[1..lines.len() - 1]
            .iter()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(numbers.last(), Some(&999));
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive lines across the files"
        );
        assert!(numbers.len() > 300, "{} whole lines kept", numbers.len());
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn killed_service_is_back_with_a_new_pid() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let sup =
            Supervisor::start_with_recorder(test_config(dir.path()), Arc::new(recorder)).unwrap();
        sup.set_desired(vec![service("web", "exec sleep 1000")])
            .await
            .unwrap();
        let first = eventually("web running", LONG, || running_pid(&sup, "web")).await;
        nix::sys::signal::kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        let second = eventually("web back", LONG, || {
            running_pid(&sup, "web").filter(|p| *p != first)
        })
        .await;
        let s = status_of(&sup, "web").unwrap();
        assert_eq!(s.restarts, 1);
        assert_eq!(s.last_exit.as_deref(), Some("killed by SIGKILL"));
        assert!(!alive(first));
        let text = metrics.render();
        assert!(
            text.contains("spaced_service_restarts_total{service=\"web\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("spaced_service_up{service=\"web\"} 1"),
            "{text}"
        );
        sup.shutdown().await;
        assert!(!alive(second));
        let text = metrics.render();
        assert!(
            text.contains("spaced_service_up{service=\"web\"} 0"),
            "{text}"
        );
    }

    /// What the services loop relies on to tell the fence guard a restarted service's new
    /// process group at once: every start is signalled, after `status()` shows the new pid.
    #[tokio::test]
    async fn every_start_is_signalled_with_its_pid_visible() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        sup.set_desired(vec![service("web", "exec sleep 1000")])
            .await
            .unwrap();
        timeout(LONG, sup.started())
            .await
            .expect("first start signalled");
        let first = status_of(&sup, "web")
            .and_then(|s| s.pid)
            .expect("pid shown at the signal");
        // Nothing else starts: no signal.
        assert!(
            timeout(Duration::from_millis(300), sup.started())
                .await
                .is_err()
        );
        nix::sys::signal::kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        timeout(LONG, sup.started())
            .await
            .expect("restart signalled");
        let second = status_of(&sup, "web")
            .and_then(|s| s.pid)
            .expect("new pid shown at the signal");
        assert_ne!(second, first);
        assert!(alive(second));
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn failing_health_check_restarts_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let sick = dir.path().join("sick");
        let mut web = service("web", "exec sleep 1000");
        web.health_check = Some(sh(&format!("test ! -e {}", sick.display())));
        sup.set_desired(vec![web]).await.unwrap();
        let first = eventually("web healthy", LONG, || {
            running_pid(&sup, "web")
                .filter(|_| status_of(&sup, "web").is_some_and(|s| s.healthy == Some(true)))
        })
        .await;
        std::fs::write(&sick, "").unwrap();
        let mut saw_unhealthy = false;
        eventually("web restarted", LONG, || {
            let s = status_of(&sup, "web")?;
            saw_unhealthy |= s.state == ServiceState::Unhealthy && s.healthy == Some(false);
            (s.restarts >= 1).then_some(())
        })
        .await;
        assert!(saw_unhealthy, "never reported unhealthy");
        assert!(!alive(first), "the unhealthy process is still running");
        let s = status_of(&sup, "web").unwrap();
        assert!(
            s.last_error
                .as_deref()
                .unwrap_or("")
                .contains("health check failed"),
            "{s:?}"
        );
        std::fs::remove_file(&sick).unwrap();
        let second = eventually("web healthy again", LONG, || {
            running_pid(&sup, "web")
                .filter(|_| status_of(&sup, "web").is_some_and(|s| s.healthy == Some(true)))
        })
        .await;
        assert_ne!(first, second);
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn hung_health_check_counts_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.health_timeout = Duration::from_millis(200);
        let sup = Supervisor::start(cfg).unwrap();
        let mut web = service("web", "exec sleep 1000");
        web.health_check = Some(sh("exec sleep 1000"));
        sup.set_desired(vec![web]).await.unwrap();
        let s = eventually("web restarted for its hung check", LONG, || {
            status_of(&sup, "web").filter(|s| s.restarts >= 1)
        })
        .await;
        assert!(
            s.last_error
                .as_deref()
                .unwrap_or("")
                .contains("did not finish within 200 ms"),
            "{s:?}"
        );
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn crash_loop_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.backoff_initial = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_secs(10);
        let sup = Supervisor::start(cfg).unwrap();
        sup.set_desired(vec![service("crash", "exit 1")])
            .await
            .unwrap();
        let mut seen: Vec<(u64, u64)> = Vec::new();
        eventually("a 400 ms backoff", Duration::from_secs(10), || {
            let s = status_of(&sup, "crash")?;
            if s.state == ServiceState::Backoff {
                assert_eq!(s.last_exit.as_deref(), Some("exit code 1"));
                let entry = (s.restarts, s.backoff_ms?);
                if seen.last() != Some(&entry) {
                    seen.push(entry);
                }
            }
            (seen.last()?.1 >= 400).then_some(())
        })
        .await;
        // Each consecutive failure doubles the delay: 50, 100, 200, 400 ms.
        for (restarts, ms) in &seen {
            assert_eq!(*ms, 50 << restarts, "{seen:?}");
        }
        assert!(seen.len() >= 3, "too few backoffs observed: {seen:?}");
        sup.shutdown().await;
        assert_eq!(
            status_of(&sup, "crash").unwrap().state,
            ServiceState::Stopped
        );
    }

    #[tokio::test]
    async fn missing_program_fails_to_start_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let ghost = DesiredService {
            name: "ghost".into(),
            command: vec!["/nonexistent/spaced-no-such-program".into()],
            health_check: None,
            env: BTreeMap::new(),
        };
        sup.set_desired(vec![ghost]).await.unwrap();
        let s = eventually("retried after failing to start", LONG, || {
            status_of(&sup, "ghost")
                .filter(|s| s.state == ServiceState::FailedToStart && s.restarts >= 2)
        })
        .await;
        let msg = s.last_error.unwrap_or_default();
        assert!(msg.contains("service ghost"), "{msg}");
        assert!(msg.contains("/nonexistent/spaced-no-such-program"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        assert_eq!(s.pid, None);
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn sigterm_ignoring_group_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let gc = dir.path().join("gc");
        let script = format!(
            "trap '' TERM; sleep 1000 & echo $! > {}; wait",
            gc.display()
        );
        sup.set_desired(vec![service("stubborn", &script)])
            .await
            .unwrap();
        let pid = eventually("running", LONG, || running_pid(&sup, "stubborn")).await;
        let grandchild = eventually("grandchild started", LONG, || read_pid(&gc)).await;
        assert!(alive(grandchild));
        let started = std::time::Instant::now();
        sup.shutdown().await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1),
            "grace not honoured: {took:?}"
        );
        assert!(!alive(pid) && !alive(grandchild));
        assert!(group_is_empty(pid));
        let s = status_of(&sup, "stubborn").unwrap();
        assert_eq!(s.state, ServiceState::Stopped);
        assert_eq!(s.last_exit.as_deref(), Some("killed by SIGKILL"));
    }

    /// Found by the fault campaign: the fence guard SIGKILLed a singleton at its lease end
    /// while its daemon was frozen; thawed, the supervisor restarted it after the backoff, with
    /// no lease, while another node ran it. Starts and restarts now ask the gate.
    #[tokio::test]
    async fn the_start_gate_holds_back_starts_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let gate = open.clone();
        sup.set_start_gate(Arc::new(move |_| gate.load(Ordering::SeqCst)));
        sup.set_desired(vec![service("gated", "sleep 1000")])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            running_pid(&sup, "gated").is_none(),
            "started through a shut gate"
        );
        assert_eq!(
            status_of(&sup, "gated").unwrap().state,
            ServiceState::Starting
        );
        open.store(true, Ordering::SeqCst);
        let pid = eventually("started once the gate opened", LONG, || {
            running_pid(&sup, "gated")
        })
        .await;
        // The gate shuts; the process dies on its own: no restart.
        open.store(false, Ordering::SeqCst);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            running_pid(&sup, "gated").is_none(),
            "restarted through a shut gate"
        );
        // Fenced while held back, it stays down once the gate opens.
        let _ = sup.kill_now("gated").await;
        open.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            running_pid(&sup, "gated").is_none(),
            "a fenced service started"
        );
    }

    #[tokio::test]
    async fn kill_now_skips_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.stop_grace = Duration::from_secs(60);
        let sup = Supervisor::start(cfg).unwrap();
        let gc = dir.path().join("gc");
        let script = format!(
            "trap '' TERM; sleep 1000 & echo $! > {}; wait",
            gc.display()
        );
        sup.set_desired(vec![service("fenced", &script)])
            .await
            .unwrap();
        let pid = eventually("running", LONG, || running_pid(&sup, "fenced")).await;
        let grandchild = eventually("grandchild started", LONG, || read_pid(&gc)).await;
        // A graceful stop would wait the whole minute for this SIGTERM-ignoring group.
        tokio::time::timeout(Duration::from_secs(30), sup.kill_now("fenced"))
            .await
            .expect("kill_now must not wait for the grace period");
        assert!(!alive(pid) && !alive(grandchild));
        assert!(group_is_empty(pid));
        assert!(!sup.kill_now("fenced").await, "already gone");
        // Fenced: a desired set (computed before the fence) does not revive it...
        sup.set_desired(vec![service("fenced", &script)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(running_pid(&sup, "fenced").is_none());
        // ...until a new lease unfences it.
        sup.unfence("fenced").await;
        sup.set_desired(vec![service("fenced", &script)])
            .await
            .unwrap();
        eventually("running again", LONG, || running_pid(&sup, "fenced")).await;
        assert!(sup.kill_now("fenced").await);
    }

    #[tokio::test]
    async fn stop_and_fence_stops_gracefully_and_stays_stopped_until_unfenced() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let termed = dir.path().join("termed");
        let starts = dir.path().join("starts");
        // Counts its starts and records the SIGTERM it gets: a graceful stop, not a SIGKILL.
        let script = format!(
            "echo start >> {}; trap 'echo term > {}; exit 0' TERM; sleep 1000 & wait",
            starts.display(),
            termed.display()
        );
        let desired = vec![service("handed", &script)];
        sup.set_desired(desired.clone()).await.unwrap();
        let pid = eventually("running", LONG, || running_pid(&sup, "handed")).await;
        // The services loop may hand the supervisor its (stale) desired set at any moment.
        let pusher = {
            let (sup, desired) = (sup.clone(), desired.clone());
            tokio::spawn(async move {
                loop {
                    let _ = sup.set_desired(desired.clone()).await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        assert!(sup.stop_and_fence("handed").await);
        assert!(!alive(pid));
        assert_eq!(std::fs::read_to_string(&termed).unwrap().trim(), "term");
        // Fenced from the moment it stopped: the desired set never revived it...
        tokio::time::sleep(Duration::from_millis(300)).await;
        pusher.abort();
        assert!(running_pid(&sup, "handed").is_none());
        assert_eq!(std::fs::read_to_string(&starts).unwrap().lines().count(), 1);
        // ...until a new lease unfences it.
        sup.unfence("handed").await;
        sup.set_desired(desired).await.unwrap();
        eventually("running again", LONG, || running_pid(&sup, "handed")).await;
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn stop_now_takes_the_grandchildren_and_fences_until_set_desired() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let gc = dir.path().join("gc");
        let script = format!("sleep 1000 & echo $! > {}; wait", gc.display());
        let desired = vec![service("single", &script)];
        sup.set_desired(desired.clone()).await.unwrap();
        let pid = eventually("running", LONG, || running_pid(&sup, "single")).await;
        let grandchild = eventually("grandchild started", LONG, || read_pid(&gc)).await;
        assert!(sup.stop_now("single").await);
        assert!(!alive(pid) && !alive(grandchild));
        assert!(group_is_empty(pid));
        // Fenced: not restarted, whatever the backoff.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = status_of(&sup, "single").unwrap();
        assert_eq!(
            (s.state, s.pid, s.restarts),
            (ServiceState::Stopped, None, 0)
        );
        assert!(!sup.stop_now("single").await);
        // Back when the desired set says so.
        std::fs::remove_file(&gc).unwrap();
        sup.set_desired(desired).await.unwrap();
        let again = eventually("running again", LONG, || running_pid(&sup, "single")).await;
        assert_ne!(again, pid);
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn new_epoch_restarts_with_new_env_and_removal_stops() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let env_file = dir.path().join("env");
        let script = format!(
            "echo \"$SPACED_EPOCH\" > {}; exec sleep 1000",
            env_file.display()
        );
        let mut svc = service("vip-web", &script);
        sup.set_desired(vec![svc.clone()]).await.unwrap();
        let first = eventually("epoch 1 running", LONG, || running_pid(&sup, "vip-web")).await;
        eventually("epoch 1 seen", LONG, || {
            (std::fs::read_to_string(&env_file).ok()? == "1\n").then_some(())
        })
        .await;
        svc.env.insert("SPACED_EPOCH".into(), "2".into());
        sup.set_desired(vec![svc]).await.unwrap();
        // set_desired returns after the old epoch's process is gone.
        assert!(!alive(first));
        let second = eventually("epoch 2 running", LONG, || running_pid(&sup, "vip-web")).await;
        assert_ne!(first, second);
        eventually("epoch 2 seen", LONG, || {
            (std::fs::read_to_string(&env_file).ok()? == "2\n").then_some(())
        })
        .await;
        assert_eq!(status_of(&sup, "vip-web").unwrap().restarts, 0);
        sup.set_desired(vec![]).await.unwrap();
        assert!(!alive(second));
        assert!(group_is_empty(second));
        assert!(sup.status().is_empty(), "{:?}", sup.status());
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn invalid_entries_are_rejected_and_the_rest_applied() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        let err = sup
            .set_desired(vec![
                service("../evil", "exec sleep 1000"),
                service("ok", "exec sleep 1000"),
            ])
            .await
            .unwrap_err();
        match &err {
            DesiredError::Rejected(r) => {
                assert_eq!(r.len(), 1);
                assert_eq!(r[0].name, "../evil");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("\"../evil\""), "{err}");
        eventually("ok running", LONG, || running_pid(&sup, "ok")).await;
        let evil = status_of(&sup, "../evil").unwrap();
        assert_eq!(evil.state, ServiceState::Rejected);
        assert!(!dir.path().join("evil.log").exists());
        sup.set_desired(vec![service("ok", "exec sleep 1000")])
            .await
            .unwrap();
        assert!(status_of(&sup, "../evil").is_none());
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn children_die_when_the_spawning_thread_exits() {
        // The PDEATHSIG trap, shown: the signal follows the forking *thread*. Ending the spawner
        // thread (while this process lives on) kills a child that nothing else would stop.
        let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
        let mut cmd = child_command(&sh("exec sleep 1000"), &BTreeMap::new()).unwrap();
        // Not the test's stdout: a surviving child would hold the test harness's pipe open.
        cmd.kill_on_drop(false)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawner.spawn(cmd).await.unwrap();
        assert!(alive(child.id().unwrap()));
        drop(spawner);
        let status = tokio::time::timeout(LONG, child.wait())
            .await
            .expect("child outlived its spawning thread")
            .unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_services() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::start(test_config(dir.path())).unwrap();
        sup.set_desired(vec![service("web", "exec sleep 1000")])
            .await
            .unwrap();
        let pid = eventually("web running", LONG, || running_pid(&sup, "web")).await;
        let clone = sup.clone();
        drop(sup);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(alive(pid), "stopped while a clone still exists");
        drop(clone);
        eventually("web stopped", LONG, || (!alive(pid)).then_some(())).await;
    }

    #[tokio::test]
    async fn start_needs_a_usable_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.check_interval = Duration::ZERO;
        assert!(matches!(Supervisor::start(cfg), Err(StartError::Config(_))));
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let cfg = test_config(&file);
        let err = Supervisor::start(cfg).err().unwrap();
        assert!(err.to_string().contains("file/logs"), "{err}");
    }
}
