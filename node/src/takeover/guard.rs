//! The fence guard: a child process that removes this node's VIPs when `spaced` dies or stalls.
//!
//! A SIGKILLed or SIGSTOPped daemon cannot remove its own addresses, and the kernel would go on
//! answering ARP for them while another node takes over. So every VIP is also registered with
//! `spaced guard`, a small child process reading commands on its stdin:
//!
//! ```text
//! hold <name> <address/prefix> <interface> <deadline, CLOCK_BOOTTIME ns> [<epoch>]
//! hold-group <name> <process group id> <deadline, CLOCK_BOOTTIME ns> [<epoch>]
//! drop <name>
//! identity<TAB><node id><TAB><CA file><TAB><certificate file><TAB><key file>
//! members <id>=<name>@<host:port> ...
//! ```
//!
//! When spaced dies (not when it closes the guard itself), the guard fences at once and then
//! reports each placement it fenced at a known epoch to the cluster, as the node itself would
//! on a graceful stop: a `ReleasePlacement` proposed through the leader with the node's own
//! certificate ([`crate::takeover::report`]), so that another node takes over without
//! waiting out the lease.
//!
//! It removes a held VIP when its deadline (the lease end) passes without an extension, and
//! every held VIP at once when its stdin closes — which happens when the parent dies, however.
//! A held process group (a singleton service) gets SIGKILL at the same moments, so a stopped
//! (SIGSTOP) or killed spaced cannot leave its singleton running past the lease. Every other
//! service's group is held with no deadline (`u64::MAX`): it is killed only when spaced dies,
//! so that what a service forked does not outlive a SIGKILLed spaced (the direct child already
//! goes with it, by `PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use crate::ops::config::FenceCgroup;
use crate::placement::agent::VipSpec;
use crate::takeover::cgroup::Placed;

/// The guard's real-time priority (SCHED_RR, 1-99): above every ordinary process, below the
/// kernel's own real-time threads (50 and up).
const GUARD_RT_PRIORITY: i32 = 10;

/// Puts the calling thread (the guard's, before its runtime starts) on real-time scheduling,
/// so that CPU starvation of the host cannot make it late on a lease end: the margin of the
/// lease arithmetic (`lease.margin_ms`) must cover how late the fence comes, and a guard that
/// mostly sleeps costs nothing at this priority. Threads and processes it starts later do not
/// inherit it (SCHED_RESET_ON_FORK). Without the privilege (CAP_SYS_NICE or RLIMIT_RTPRIO)
/// the guard runs at the ordinary priority, said on stderr (the daemon's log).
pub fn run_in_real_time() {
    let param = nix::libc::sched_param {
        sched_priority: GUARD_RT_PRIORITY,
    };
    // SAFETY: sched_setscheduler reads `param` and changes only this thread's policy.
    let rc = unsafe {
        nix::libc::sched_setscheduler(
            0,
            nix::libc::SCHED_RR | nix::libc::SCHED_RESET_ON_FORK,
            &param,
        )
    };
    if rc != 0 {
        eprintln!(
            "spaced guard: runs without real-time priority ({}): under CPU starvation its fence \
             may come later than the lease margin allows",
            std::io::Error::last_os_error()
        );
    }
}

/// The longest the guard sleeps while it holds anything (see `run_guard`).
const GUARD_LOOK: Duration = Duration::from_millis(50);

/// How long a guard whose daemon died tries to report its fence (the leases end well before).
const REPORT_WITHIN: Duration = Duration::from_secs(3);

/// How long the guard waits, after its stdin ended, to be re-parented (the daemon's death).
const REPARENT_WITHIN: Duration = Duration::from_millis(200);

/// CLOCK_BOOTTIME now, in ns: the same clock in every process of the host, and one that goes
/// on while the host is suspended (CLOCK_MONOTONIC stops), so a deadline that passed during a
/// suspension is seen as passed at the first look after it.
pub fn boottime_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// An `Instant` (CLOCK_MONOTONIC on Linux) as CLOCK_BOOTTIME ns, counted from now. The clocks
/// are read as a bracketed pair ([`crate::ClockPair`]) and the deadline taken from the later
/// monotonic read: a thread preempted between the reads gets an earlier deadline (the guard
/// fences sooner), never a later one (it would hold a VIP past the lease it stands for).
pub fn instant_to_ns(t: Instant) -> u64 {
    let Some(pair) = crate::ClockPair::read() else {
        return 0;
    };
    let now_ns = pair.boottime.as_nanos() as u64;
    if t >= pair.after {
        now_ns.saturating_add((t - pair.after).as_nanos() as u64)
    } else {
        now_ns.saturating_sub((pair.after - t).as_nanos() as u64)
    }
}

/// One guard line, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum GuardCommand {
    /// Hold `vip` until `deadline_ns`.
    Hold {
        /// The VIP.
        vip: VipSpec,
        /// CLOCK_BOOTTIME ns.
        deadline_ns: u64,
        /// The epoch it is held at, when known (reported after a fence).
        epoch: Option<u64>,
    },
    /// SIGKILL process group `pgid` at `deadline_ns` (a singleton service).
    HoldGroup {
        /// Placement name.
        name: String,
        /// The service's process group.
        pgid: i32,
        /// CLOCK_BOOTTIME ns.
        deadline_ns: u64,
        /// The epoch it is held at, when known.
        epoch: Option<u64>,
    },
    /// Who to report as, and with which key material.
    Identity(crate::takeover::report::Identity),
    /// The cluster's members to report to (replaces the list).
    Members(Vec<crate::takeover::report::Peer>),
    /// Forget `name` (the parent removed it).
    Drop {
        /// VIP name.
        name: String,
    },
}

/// Why a guard protocol line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardLineError {
    /// The deadline is not a number of nanoseconds.
    #[error("bad deadline {0:?}")]
    Deadline(String),
    /// The process group is not a number above 1.
    #[error("bad process group {0:?}")]
    ProcessGroup(String),
    /// The epoch is not a number.
    #[error("bad epoch {0:?}")]
    Epoch(String),
    /// An `identity` or `members` line that does not parse.
    #[error("bad {0} line: {1}")]
    Report(&'static str, crate::takeover::report::ReportLineError),
    /// Not a command of the protocol.
    #[error("unknown guard command {0:?}")]
    Unknown(String),
}

/// Why the guard could not be started or told something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuardError {
    /// The daemon's own executable could not be found.
    #[error("locate spaced for the fence guard: {0}")]
    Locate(String),
    /// The child could not be started.
    #[error("start the fence guard: {0}")]
    Start(String),
    /// The child has no stdin pipe.
    #[error("fence guard has no stdin")]
    NoStdin,
    /// Writing to it failed (it died).
    #[error("fence guard: {0}")]
    Write(String),
}

/// Parses one line of the guard protocol.
pub fn parse_line(line: &str) -> Result<GuardCommand, GuardLineError> {
    if let Some(rest) = line.strip_prefix("identity\t") {
        return crate::takeover::report::Identity::parse(rest)
            .map(GuardCommand::Identity)
            .map_err(|e| GuardLineError::Report("identity", e));
    }
    let f: Vec<&str> = line.split_whitespace().collect();
    let deadline = |d: &str| {
        d.parse()
            .map_err(|_| GuardLineError::Deadline(d.to_string()))
    };
    let epoch = |e: Option<&&str>| {
        e.map(|e| e.parse().map_err(|_| GuardLineError::Epoch(e.to_string())))
            .transpose()
    };
    match f.as_slice() {
        ["hold", name, address, interface, d, rest @ ..] if rest.len() <= 1 => {
            Ok(GuardCommand::Hold {
                vip: VipSpec {
                    name: name.to_string(),
                    address: address.to_string(),
                    interface: interface.to_string(),
                    service: None,
                },
                deadline_ns: deadline(d)?,
                epoch: epoch(rest.first())?,
            })
        }
        ["hold-group", name, pgid, d, rest @ ..] if rest.len() <= 1 => {
            Ok(GuardCommand::HoldGroup {
                name: name.to_string(),
                pgid: pgid
                    .parse()
                    .ok()
                    .filter(|p: &i32| *p > 1)
                    .ok_or_else(|| GuardLineError::ProcessGroup(pgid.to_string()))?,
                deadline_ns: deadline(d)?,
                epoch: epoch(rest.first())?,
            })
        }
        ["members", peers @ ..] => peers
            .iter()
            .map(|p| crate::takeover::report::Peer::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map(GuardCommand::Members)
            .map_err(|e| GuardLineError::Report("members", e)),
        ["drop", name] => Ok(GuardCommand::Drop {
            name: name.to_string(),
        }),
        _ => Err(GuardLineError::Unknown(line.to_string())),
    }
}

/// The parent's handle on its guard.
pub struct GuardHandle {
    /// The child, reaped on drop.
    child: Mutex<Child>,
    /// Its stdin; closing it (or dying) makes the guard remove everything.
    stdin: Mutex<ChildStdin>,
}

impl GuardHandle {
    /// Starts `<this executable> guard` and moves it into the fence cgroup (see
    /// [`crate::takeover::cgroup`]); a failed move is logged, not fatal: the guard still
    /// outlives a signal to the daemon's process group.
    pub fn spawn(fence: &FenceCgroup) -> Result<Self, GuardError> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|e| GuardError::Locate(e.to_string()))?;
        let mut cmd = Command::new(exe);
        if let Some(format) = crate::LOG_FORMAT.get() {
            cmd.env("SPACED_LOG_FORMAT", format);
        }
        let mut child = cmd
            .arg("guard")
            // A process group of its own: a signal to the daemon's whole group (a SIGKILL or
            // SIGSTOP of `spaced` and its children at once) does not reach the guard, which
            // then fences as it should (at once when the daemon died, at the lease end when
            // it is stopped).
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| GuardError::Start(e.to_string()))?;
        let stdin = child.stdin.take().ok_or(GuardError::NoStdin)?;
        // Until the move the guard shares the daemon's cgroup; it holds nothing before its
        // first command, which comes after this.
        match crate::takeover::cgroup::move_out(fence, child.id()) {
            Ok(Placed::Moved(dir)) => {
                tracing::info!(cgroup = %dir.display(), "fence guard runs in a cgroup of its own")
            }
            Ok(Placed::Stays(why)) => {
                tracing::debug!(why, "fence guard stays in the daemon's cgroup")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "fence guard stays in the daemon's cgroup: killing or freezing that cgroup \
                 (systemctl kill, a stop timeout) takes the fence down with the daemon"
            ),
        }
        Ok(GuardHandle {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
        })
    }

    fn send(&self, line: &str) -> Result<(), GuardError> {
        let mut w = crate::lock(&self.stdin);
        writeln!(w, "{line}")
            .and_then(|_| w.flush())
            .map_err(|e| GuardError::Write(e.to_string()))
    }

    /// The guard removes `vip` (held at `epoch`) at `until` unless told a later deadline.
    pub fn hold(&self, vip: &VipSpec, epoch: u64, until: Instant) -> Result<(), GuardError> {
        self.send(&format!(
            "hold {} {} {} {} {epoch}",
            vip.name,
            vip.address,
            vip.interface,
            instant_to_ns(until)
        ))
    }

    /// The guard SIGKILLs process group `pgid` (a singleton held at `epoch`) at `until` unless
    /// told a later deadline.
    pub fn hold_group(
        &self,
        name: &str,
        pgid: i32,
        epoch: u64,
        until: Instant,
    ) -> Result<(), GuardError> {
        self.send(&format!(
            "hold-group {name} {pgid} {} {epoch}",
            instant_to_ns(until)
        ))
    }

    /// The guard SIGKILLs process group `pgid` only when spaced goes (its stdin closes): for
    /// services with no lease, whose forked children would otherwise outlive a SIGKILLed spaced.
    pub fn hold_group_while_spaced_lives(&self, name: &str, pgid: i32) -> Result<(), GuardError> {
        self.send(&format!("hold-group {name} {pgid} {}", u64::MAX))
    }

    /// The parent removed `name` itself.
    pub fn drop_vip(&self, name: &str) -> Result<(), GuardError> {
        self.send(&format!("drop {name}"))
    }
}

impl GuardHandle {
    /// Whether the guard process is still running.
    pub fn alive(&self) -> bool {
        matches!(crate::lock(&self.child).try_wait(), Ok(None))
    }
}

/// The fence guard as its users hold it: started on first use, and started again when it is
/// found dead (killed on its own, say), with the loss logged as an error, so every later hold
/// reaches a live guard. [`generation`](Self::generation) changes with every start: a user
/// that registered something with an earlier guard registers it again.
pub struct GuardCell {
    /// What this guard fences, for the log ("VIPs", "services").
    what: &'static str,
    /// The guard started last.
    current: Mutex<Option<std::sync::Arc<GuardHandle>>>,
    /// Guards started so far.
    generation: std::sync::atomic::AtomicU64,
    /// Where each new guard is moved.
    fence: FenceCgroup,
    /// Who the guard reports its fence as, and to whom; `None` until the node sets it.
    reporting: Mutex<Option<Reporting>>,
    /// The `members` line the current guard was told last, with that guard's generation.
    members_told: Mutex<(u64, String)>,
}

/// What a guard needs to report its fence to the cluster (see [`crate::takeover::report`]).
#[derive(Clone)]
pub struct Reporting {
    /// This node and its key material.
    pub identity: crate::takeover::report::Identity,
    /// The cluster's members now (read at every renewal; told to the guard when they change).
    pub members: std::sync::Arc<dyn Fn() -> Vec<crate::takeover::report::Peer> + Send + Sync>,
}

impl GuardCell {
    /// No guard yet; the first use starts one.
    pub fn new(what: &'static str, fence: FenceCgroup) -> Self {
        GuardCell {
            what,
            fence,
            reporting: Mutex::new(None),
            members_told: Mutex::new((0, String::new())),
            current: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A live guard: the current one, or a new one if there is none or it died.
    pub fn get(&self) -> Result<std::sync::Arc<GuardHandle>, GuardError> {
        let mut current = crate::lock(&self.current);
        if let Some(g) = current.as_ref() {
            if g.alive() {
                return Ok(g.clone());
            }
            tracing::error!(
                fences = self.what,
                "the fence guard died; starting a new one"
            );
        }
        let g = std::sync::Arc::new(GuardHandle::spawn(&self.fence)?);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(fences = self.what, "fence guard started");
        if let Some(r) = crate::lock(&self.reporting).as_ref() {
            g.send(&r.identity.line())?;
        }
        *current = Some(g.clone());
        drop(current);
        self.tell_members(&g)?;
        Ok(g)
    }

    /// Tells the running guard the members again if they changed, whether or not it holds
    /// anything: a guard holding nothing still tells the members when its daemon dies (which,
    /// from a leader, saves the followers an election timeout). Called every second.
    pub fn refresh_members(&self) {
        if let Some(g) = self.started().filter(|g| g.alive())
            && let Err(e) = self.tell_members(&g)
        {
            tracing::warn!(fences = self.what, error = %e, "fence guard unreachable");
        }
    }

    /// From now on every guard is told who this node is and the cluster's members, so that
    /// it can report its fence when spaced dies.
    pub fn set_reporting(&self, reporting: Reporting) {
        if let Some(g) = self.started().filter(|g| g.alive())
            && let Err(e) = g.send(&reporting.identity.line())
        {
            tracing::warn!(fences = self.what, error = %e, "fence guard unreachable");
        }
        *crate::lock(&self.reporting) = Some(reporting);
    }

    /// Tells `g` the members if they changed since it was told last.
    fn tell_members(&self, g: &GuardHandle) -> Result<(), GuardError> {
        let Some(members) = crate::lock(&self.reporting)
            .as_ref()
            .map(|r| r.members.clone())
        else {
            return Ok(());
        };
        let line = crate::takeover::report::members_line(&members());
        let generation = self.generation();
        let mut told = crate::lock(&self.members_told);
        if told.0 == generation && told.1 == line {
            return Ok(());
        }
        g.send(&line)?;
        *told = (generation, line);
        Ok(())
    }

    /// The guard started last, if any, without starting one (it may have died).
    pub fn started(&self) -> Option<std::sync::Arc<GuardHandle>> {
        crate::lock(&self.current).clone()
    }

    /// How many guards were started so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// For metrics: whether the guard started last is running (`None`: none started yet),
    /// and how many were started.
    pub fn state(&self) -> (Option<bool>, u64) {
        (self.started().map(|g| g.alive()), self.generation())
    }

    /// Tells a live guard something; if the guard died under the call, tells a new one.
    pub fn send(
        &self,
        op: impl Fn(&GuardHandle) -> Result<(), GuardError>,
    ) -> Result<(), GuardError> {
        let g = self.get()?;
        let sent = self.tell_members(&g).and_then(|()| op(&g));
        match sent {
            Err(_) if !g.alive() => {
                let g = self.get()?;
                self.tell_members(&g)?;
                op(&g)
            }
            sent => sent,
        }
    }
}

impl Drop for GuardHandle {
    fn drop(&mut self) {
        let mut c = crate::lock(&self.child);
        // Closing stdin happens when `stdin` drops after this; kill to be sure it goes.
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `spaced guard`: runs until stdin closes, then removes what it still holds and exits.
/// `reporter` sends the report of what it fenced when spaced died (see
/// [`crate::takeover::report`]).
pub async fn run_guard(
    reporter: crate::takeover::report::Reporter,
) -> Result<(), crate::takeover::TakeoverError> {
    let tk = crate::takeover::Takeover::new().await?;
    // Re-parented once the daemon is gone: how a closed stdin from a dead daemon is told from
    // one a living daemon closed.
    let parent = nix::unistd::getppid();
    let mut identity: Option<crate::takeover::report::Identity> = None;
    let mut members: Vec<crate::takeover::report::Peer> = Vec::new();
    let mut held: BTreeMap<String, (Guarded, u64, Option<u64>)> = BTreeMap::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let next_deadline = held.values().map(|(_, d, _)| *d).min();
        // Timers count CLOCK_MONOTONIC, which stops while the host is suspended: waking at
        // least every GUARD_LOOK makes a deadline passed during a suspension seen at once.
        let wait = next_deadline
            .map(|d| Duration::from_nanos(d.saturating_sub(boottime_ns())).min(GUARD_LOOK));
        let line = match wait {
            Some(w) => tokio::time::timeout(w, lines.next_line()).await.ok(),
            None => Some(lines.next_line().await),
        };
        match line {
            // Deadline passed: fence whatever is due.
            None => {
                let now = boottime_ns();
                let due: Vec<String> = held
                    .iter()
                    .filter(|(_, (_, d, _))| *d <= now)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in due {
                    if let Some((what, _, _)) = held.remove(&name) {
                        fence(
                            &tk,
                            &name,
                            &what,
                            "lease ran out without renewal (spaced stalled?)",
                        )
                        .await;
                    }
                }
            }
            Some(Ok(Some(l))) => match parse_line(&l) {
                Ok(GuardCommand::Hold {
                    vip,
                    deadline_ns,
                    epoch,
                }) => {
                    held.insert(vip.name.clone(), (Guarded::Vip(vip), deadline_ns, epoch));
                }
                Ok(GuardCommand::HoldGroup {
                    name,
                    pgid,
                    deadline_ns,
                    epoch,
                }) => {
                    held.insert(name, (Guarded::Group(pgid), deadline_ns, epoch));
                }
                Ok(GuardCommand::Identity(i)) => identity = Some(i),
                Ok(GuardCommand::Members(m)) => members = m,
                Ok(GuardCommand::Drop { name }) => {
                    held.remove(&name);
                }
                Err(e) => tracing::warn!(error = %e, "fence guard: ignored line"),
            },
            // EOF or read error: the parent is gone.
            Some(Ok(None)) | Some(Err(_)) => {
                let mut fenced = Vec::new();
                for (name, (what, _, epoch)) in std::mem::take(&mut held) {
                    if fence(&tk, &name, &what, "spaced exited").await
                        && let Some(epoch) = epoch
                    {
                        fenced.push((name, epoch));
                    }
                }
                // The daemon's files close before it is reaped: the guard is re-parented a
                // moment after it read the end of its stdin.
                let waited = Instant::now();
                while nix::unistd::getppid() == parent && waited.elapsed() < REPARENT_WITHIN {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if nix::unistd::getppid() == parent {
                    // The daemon lives and closed the guard itself: it releases on its own.
                    tracing::info!("fence guard closed by a living spaced; nothing to report");
                    return Ok(());
                }
                // Reported even when nothing was fenced: the members learn at once that this
                // node's daemon died (a follower of a dead leader then elects another at once).
                match &identity {
                    None => tracing::warn!(
                        "fence guard was not told who this node is; its fence is not reported and the leases run out"
                    ),
                    Some(_) if members.is_empty() => tracing::warn!(
                        "fence guard was not told the members; its fence is not reported and the leases run out"
                    ),
                    Some(_) => {
                        tracing::info!(fenced = ?fenced, "fence guard reports its fence (and its daemon's death) to the cluster")
                    }
                }
                if let Some(me) = identity {
                    reporter(me, members, fenced, REPORT_WITHIN).await;
                }
                return Ok(());
            }
        }
    }
}

/// What the guard takes down for a name.
enum Guarded {
    /// A VIP: remove the address.
    Vip(VipSpec),
    /// A singleton's process group: SIGKILL it.
    Group(i32),
}

/// Takes `what` down; whether it is down now (what the guard may then report).
async fn fence(tk: &crate::takeover::Takeover, name: &str, what: &Guarded, why: &str) -> bool {
    match what {
        Guarded::Vip(vip) => remove(tk, vip, why).await,
        Guarded::Group(pgid) => {
            match nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(*pgid),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                Ok(()) => {
                    tracing::warn!(group = %name, pgid, why, "fence guard killed a service's processes");
                    true
                }
                Err(nix::errno::Errno::ESRCH) => true,
                Err(e) => {
                    tracing::error!(group = %name, pgid, error = %e, "fence guard could not kill a service's processes");
                    false
                }
            }
        }
    }
}

async fn remove(tk: &crate::takeover::Takeover, vip: &VipSpec, why: &str) -> bool {
    match crate::takeover::VipAddr::parse(&vip.address, &vip.interface) {
        Ok(addr) => match tk.remove(&addr).await {
            Ok(()) => {
                tracing::warn!(vip = %vip.name, address = %vip.address, why, "fence guard removed VIP");
                true
            }
            Err(e) => {
                tracing::error!(vip = %vip.name, error = %e, "fence guard could not remove VIP");
                false
            }
        },
        Err(e) => {
            tracing::error!(vip = %vip.name, error = %e, "fence guard: bad VIP");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_protocol() {
        assert_eq!(
            parse_line("hold cluster 10.0.0.100/24 eth0 123"),
            Ok(GuardCommand::Hold {
                vip: VipSpec {
                    name: "cluster".into(),
                    address: "10.0.0.100/24".into(),
                    interface: "eth0".into(),
                    service: None,
                },
                deadline_ns: 123,
                epoch: None,
            })
        );
        assert!(matches!(
            parse_line("hold cluster 10.0.0.100/24 eth0 123 7"),
            Ok(GuardCommand::Hold { epoch: Some(7), .. })
        ));
        assert!(parse_line("hold cluster 10.0.0.100/24 eth0 123 x").is_err());
        assert!(parse_line("hold cluster 10.0.0.100/24 eth0 123 7 8").is_err());
        assert_eq!(
            parse_line("hold-group poller 4242 99"),
            Ok(GuardCommand::HoldGroup {
                name: "poller".into(),
                pgid: 4242,
                deadline_ns: 99,
                epoch: None,
            })
        );
        assert!(matches!(
            parse_line("hold-group poller 4242 99 12"),
            Ok(GuardCommand::HoldGroup {
                epoch: Some(12),
                ..
            })
        ));
        assert!(matches!(
            parse_line("members 1=n1@10.0.0.1:7000 2=n2@10.0.0.2:7000"),
            Ok(GuardCommand::Members(m)) if m.len() == 2
        ));
        assert!(parse_line("members n1").is_err());
        assert!(matches!(
            parse_line("identity\t3\t/a/ca.pem\t/a/n3.pem\t/a/n3.key"),
            Ok(GuardCommand::Identity(i)) if i.node == 3
        ));
        assert!(parse_line("identity\tthree\t/a\t/b\t/c").is_err());
        assert!(
            parse_line("hold-group poller 1 99").is_err(),
            "never init's group"
        );
        assert!(parse_line("hold-group poller -5 99").is_err());
        assert_eq!(
            parse_line("drop cluster"),
            Ok(GuardCommand::Drop {
                name: "cluster".into()
            })
        );
        assert!(parse_line("hold cluster 10.0.0.100/24 eth0 soon").is_err());
        assert!(parse_line("explode").is_err());
    }

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let now = Instant::now();
        let a = instant_to_ns(now + Duration::from_millis(300));
        let b = boottime_ns();
        assert!(a > b + 250_000_000 && a < b + 350_000_000, "{a} vs {b}");
    }
}
