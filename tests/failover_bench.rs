//! On-demand failover benchmark (`benches/failover`, or `cargo bench -p spaced-tests --bench
//! failover` as root; it builds `spaced` and `spacectl` first).
//!
//! What is measured is what a client sees: the time from a fault at the VIP's owner to the first
//! successful TCP exchange on the VIP that is answered by a *different* host. One network lab
//! (3 hosts + a client on one bridge) runs three systems side by side, each with its own VIP:
//!
//! - spaced (3 nodes, default Raft and lease settings),
//! - keepalived with 1 s adverts, and keepalived with 100 ms adverts (the Debian package; VRRPv3,
//!   all BACKUP with `nopreempt` and priorities 100/99/98, so there is no failback — like spaced).
//!
//! Every host runs a stand-in service on every VIP (bound with IP_FREEBIND) that answers its own
//! host name, so a reply says who holds the address. A prober in the client namespace starts a
//! short TCP exchange every 5 ms (100 ms timeout each, several in flight), and every round:
//! finds the owner from the replies, injects the fault at t0, takes the first exchange completed
//! after t0 that another host answered, then repairs the fault and waits until the system is
//! healthy again before the next round, probing on meanwhile: a second move of the VIP or a
//! second outage after the takeover is reported too. Rounds are interleaved across systems; a
//! link-down round cuts off every system on that host, so after one all systems must be healthy
//! (spaced: same term, leader and owner for 0.7 s) before the next round starts.
//!
//! Faults: crash by SIGKILL (spaced: only the `spaced` process — its fence guard child is left to
//! do its job; keepalived: the whole daemon, parent and VRRP child), crash by link down (the
//! owner's switch port goes down), and graceful stop by SIGTERM. Nothing is asserted: the result
//! is a Markdown report on stdout. The exit status is non-zero only when the harness itself
//! failed (no lab, a system that never became healthy, a round that never recovered).
//!
//! Environment: `ROUNDS` (default 20), `FAILOVER_FAULTS` (default `kill,link,term`),
//! `FAILOVER_SYSTEMS` (default `spaced,keepalived-1s,keepalived-100ms`), `FAILOVER_KEEP_LOGS`
//! (keep the daemons' logs in /tmp/failover-bench-logs-<lab id>, as is done anyway when the
//! harness failed), and `FAILOVER_LAB_ID_FILE` (the lab id is written there, so the calling
//! script can clean up even if this process is SIGKILLed). SIGINT/SIGTERM/SIGHUP stop the run
//! after the current step; the lab is torn down and what was measured so far is printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread::Scope;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, killpg, sigaction};
use nix::unistd::Pid;
use serde_json::Value;
use spaced_node::ops::config::NodeConfig;
use spaced_tests::lab::{Lab, LabProcess};
use spaced_tests::{binary, make_pki};

/// Port of the stand-in service on every VIP.
const SERVICE_PORT: u16 = 8080;
/// A new probe starts this often.
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Bound on one probe (connect + send + reply + EOF).
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// A round that has not recovered by then counts as a failed round (a harness failure).
const RECOVER_WITHIN: Duration = Duration::from_secs(15);
/// How long a system may take to become healthy again after a round.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// After the repair, probing goes on this long before the round's probes are judged.
const AFTER_REPAIR: Duration = Duration::from_millis(500);
/// Consecutive probes from one host that make it "the owner" before a fault is injected.
const STABLE_PROBES: usize = 10;
/// spaced: a node counts as in contact when the leader heard from it this recently.
const CONTACT_MS: u64 = 500;
/// spaced: healthy means also the same term, leader and VIP owner for this long.
const SPACED_SETTLE: Duration = Duration::from_millis(700);
/// spaced: how long a settled cluster whose leader owns the VIP is given to hand leadership
/// away before the next round. A leader does that once it has held the same placements for 2
/// s (and at most every 5 s), so a cluster left alone has a leader that owns nothing; with
/// only `SPACED_SETTLE` between rounds, 6 of 10 host-loss rounds (2026-12-06) started with the
/// VIP on the leader, and measured a leader's loss instead.
const STEP_ASIDE_WITHIN: Duration = Duration::from_secs(8);

/// spaced: the bench's singleton service.
const SINGLETON: &str = "bench-one";
/// spaced: the writer of a leader round sends a write this often.
const WRITE_EVERY: Duration = Duration::from_millis(5);

/// A client adding devices through the survivors of a leader round, from the client namespace.
struct Writer {
    /// (sent, acknowledged) of every acknowledged write.
    acks: std::sync::Arc<Mutex<Vec<(Instant, Instant)>>>,
    ids: std::sync::Arc<Mutex<Vec<String>>>,
    stop: std::sync::Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(lab: &Lab, pki: &Path, endpoints: Vec<String>, round: usize) -> Result<Writer> {
        use spaced_node::admin::client::{AdminClient, AdminCredentials};
        use spaced_node::admin::{AdminReply, AdminRequest};
        let creds = std::sync::Arc::new(AdminCredentials::load(pki, None)?);
        let w = Writer {
            acks: Default::default(),
            ids: Default::default(),
            stop: Default::default(),
            handle: None,
        };
        let (acks, ids, stop) = (w.acks.clone(), w.ids.clone(), w.stop.clone());
        let handle = spaced_tests::lab::spawn_async_in(
            &lab.client().ns,
            "failover-writer",
            move || async move {
                let mut tick = tokio::time::interval(WRITE_EVERY);
                let mut running = tokio::task::JoinSet::new();
                let mut seq = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let id = format!("fo{round}-{seq}");
                    let device = spaced_fabric::NewDevice {
                        id: id.clone(),
                        addr: spaced_tests::unreachable_device_addr(seq),
                        mode: spaced_fabric::DeviceMode::SpaceInitiated,
                    };
                    let endpoint = endpoints[seq % endpoints.len()].clone();
                    seq += 1;
                    lock(&ids).push(id);
                    let (creds, acks) = (creds.clone(), acks.clone());
                    running.spawn(async move {
                        let sent = Instant::now();
                        let call = async {
                            let mut c = AdminClient::connect(&endpoint, &creds).await.ok()?;
                            let reply =
                                c.call_leader(&AdminRequest::AddDevices(vec![device])).await;
                            c.close().await;
                            reply.ok()
                        };
                        if let Ok(Some(AdminReply::Applied(_))) =
                            tokio::time::timeout(Duration::from_secs(2), call).await
                        {
                            lock(&acks).push((sent, Instant::now()));
                        }
                    });
                    while running.try_join_next().is_some() {}
                }
                while running.join_next().await.is_some() {}
            },
        )?;
        Ok(Writer {
            handle: Some(handle),
            ..w
        })
    }

    /// When the first write sent at or after `t` was acknowledged.
    fn acked_since(&self, t: Instant) -> Option<Instant> {
        lock(&self.acks)
            .iter()
            .filter(|(sent, _)| *sent >= t)
            .map(|(_, done)| *done)
            .min()
    }

    /// Stops writing (waiting for the writes under way); returns every id it tried to add.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        lock(&self.ids).clone()
    }
}

/// spaced: extra configuration for every node (`FAILOVER_SPACED_CONFIG`, TOML: top-level keys
/// first, then tables), put before the `[tls]` table of the bench's own config; e.g.
/// `timing = "fast"` or `[lease]\nduration_ms = 200`.
fn extra_config() -> String {
    std::env::var("FAILOVER_SPACED_CONFIG").unwrap_or_default()
}

/// Set by SIGINT/SIGTERM/SIGHUP: stop after the current step and clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in short steps so an interrupt is noticed.
fn nap(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        std::thread::sleep((until - now).min(Duration::from_millis(20)));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Faults and results
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL of the owner's daemon.
    Kill,
    /// The owner's switch port goes down.
    Link,
    /// SIGTERM of the owner's daemon.
    Term,
    /// spaced only: SIGKILL of the Raft leader's daemon; measured until a write is
    /// acknowledged again.
    Leader,
    /// spaced only: SIGKILL of the daemon of the node running the singleton; measured until
    /// the singleton's program runs on another node.
    Singleton,
}

impl Fault {
    fn parse(s: &str) -> Result<Fault> {
        match s.trim() {
            "kill" | "sigkill" => Ok(Fault::Kill),
            "link" | "linkdown" => Ok(Fault::Link),
            "term" | "sigterm" => Ok(Fault::Term),
            "leader" => Ok(Fault::Leader),
            "singleton" => Ok(Fault::Singleton),
            other => bail!("unknown fault {other:?} (kill, link, term, leader, singleton)"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Fault::Kill => "crash: SIGKILL",
            Fault::Link => "crash: link down",
            Fault::Term => "graceful: SIGTERM",
            Fault::Leader => "leader SIGKILL: writes again",
            Fault::Singleton => "singleton owner SIGKILL: runs again",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Fault::Kill => "sigkill",
            Fault::Link => "linkdown",
            Fault::Term => "sigterm",
            Fault::Leader => "leader",
            Fault::Singleton => "singleton",
        }
    }

    /// Measured on the VIP by the prober (the others by the system itself).
    fn on_vip(self) -> bool {
        matches!(self, Fault::Kill | Fault::Link | Fault::Term)
    }
}

/// One measured round.
#[derive(Debug, Clone)]
struct Round {
    /// Fault to first exchange answered by another host; None if it never came (failure).
    ms: Option<f64>,
    /// The old owner still had the VIP on its interface when the new owner first answered.
    old_held: bool,
    /// After the new owner first answered and until the system was repaired and healthy again
    /// (+`AFTER_REPAIR`), yet another host answered: the VIP moved a second time.
    moved_again: bool,
    /// When some did: the longest time without a successful exchange after the takeover (ms).
    second_outage_ms: Option<f64>,
    /// spaced: whether the faulted owner was also the Raft leader.
    owner_led: Option<bool>,
}

impl Round {
    /// A round measured by the system itself, not on the VIP (nothing about VIP holders).
    fn measured_elsewhere(ms: Option<f64>) -> Round {
        Round {
            ms,
            old_held: false,
            moved_again: false,
            second_outage_ms: None,
            owner_led: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The prober
// ---------------------------------------------------------------------------------------------

/// One finished probe.
#[derive(Debug, Clone)]
struct Probe {
    sent: Instant,
    done: Instant,
    /// Host index (1-based) that answered, or None for a failed/timed-out exchange.
    host: Option<usize>,
}

/// Probes the current target from the client namespace every `PROBE_EVERY`, each on its own
/// thread so a probe stuck in a timeout does not delay the next one.
struct Prober {
    /// Current target and its generation; None pauses probing.
    target: Mutex<(u64, Option<SocketAddr>)>,
    generation: AtomicU64,
    log: Mutex<Vec<Probe>>,
    quit: AtomicBool,
}

impl Prober {
    fn new() -> Prober {
        Prober {
            target: Mutex::new((0, None)),
            generation: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            quit: AtomicBool::new(false),
        }
    }

    /// The scheduler loop; runs on a scoped thread until `stop`.
    fn run<'s>(&'s self, lab: &'s Lab, scope: &'s Scope<'s, '_>) {
        let ns = lab.client().ns.clone();
        let mut next = Instant::now();
        while !self.quit.load(Ordering::SeqCst) {
            let (generation, target) = *lock(&self.target);
            if let Some(addr) = target {
                let ns = ns.clone();
                let spawned = std::thread::Builder::new()
                    .name("failover-probe".into())
                    .spawn_scoped(scope, move || {
                        let sent = Instant::now();
                        let reply = lab.tcp_exchange(&ns, addr, b"", PROBE_TIMEOUT);
                        let done = Instant::now();
                        let host = reply.ok().and_then(|r| parse_host(&r));
                        if self.generation.load(Ordering::SeqCst) == generation {
                            lock(&self.log).push(Probe { sent, done, host });
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("prober: cannot spawn a probe thread: {e}");
                }
            }
            next += PROBE_EVERY;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }

    fn stop(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }

    /// Starts probing `addr` with an empty log (None pauses).
    fn aim(&self, addr: Option<SocketAddr>) {
        let mut t = lock(&self.target);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *t = (generation, addr);
        lock(&self.log).clear();
    }

    fn snapshot(&self) -> Vec<Probe> {
        let mut v = lock(&self.log).clone();
        v.sort_by_key(|p| p.done);
        v
    }

    /// Waits until the last `STABLE_PROBES` probes were all answered by the same host.
    fn stable_owner(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            check_interrupt()?;
            let log = self.snapshot();
            if log.len() >= STABLE_PROBES {
                let tail = &log[log.len() - STABLE_PROBES..];
                if let Some(h) = tail[0].host
                    && tail.iter().all(|p| p.host == Some(h))
                {
                    return Ok(h);
                }
            }
            if Instant::now() > deadline {
                let tail: Vec<_> = log
                    .iter()
                    .rev()
                    .take(STABLE_PROBES)
                    .map(|p| p.host)
                    .collect();
                bail!("no stable owner within {within:?} (last probes, newest first: {tail:?})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The earliest exchange completed at/after `t0` answered by a host other than `old`.
    fn first_other(&self, t0: Instant, old: usize) -> Option<(Instant, usize)> {
        lock(&self.log)
            .iter()
            .filter(|p| p.done >= t0)
            .filter_map(|p| p.host.filter(|h| *h != old).map(|h| (p.done, h)))
            .min_by_key(|(t, _)| *t)
    }
}

fn parse_host(reply: &[u8]) -> Option<usize> {
    std::str::from_utf8(reply)
        .ok()?
        .trim()
        .strip_prefix('h')?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Systems under test
// ---------------------------------------------------------------------------------------------

trait System {
    fn name(&self) -> &str;
    fn vip(&self) -> Ipv4Addr;
    /// Injects `fault` at host `owner`; returns t0 (taken just before the fault is applied).
    fn inject(&mut self, lab: &Lab, fault: Fault, owner: usize) -> Result<Instant>;
    /// Undoes the fault (restart / heal) and returns once the system is healthy again.
    fn restore(&mut self, lab: &Lab, fault: Fault, owner: usize) -> Result<()>;
    /// Waits until the system is healthy (all members up, the VIP held by exactly one host).
    fn wait_healthy(&mut self, lab: &Lab, within: Duration) -> Result<()>;
    /// Called just before the fault; spaced answers whether `owner` is the Raft leader.
    fn owner_leads(&mut self, _lab: &Lab, _owner: usize) -> Option<bool> {
        None
    }
    /// Remarks for the report (counts of unusual events).
    fn remarks(&self) -> Vec<String> {
        Vec::new()
    }
    /// One round of a fault the system measures itself (not on the VIP); None when it has
    /// nothing to measure for it (keepalived has no writes and no singletons).
    fn own_round(&mut self, _lab: &Lab, _fault: Fault, _tag: &str) -> Option<Result<Round>> {
        None
    }
}

/// Hosts that currently have `vip` on eth0. Asks `ip`, because `Lab::addresses` filters by
/// getifaddrs' interface name, which for a labelled IPv4 address (spaced adds its VIPs as
/// `eth0:0`) is the label, so it would never see spaced's VIP.
fn holders(lab: &Lab, vip: Ipv4Addr) -> Result<Vec<usize>> {
    let needle = format!(" {vip}/");
    let mut v = Vec::new();
    for (i, h) in lab.hosts().iter().enumerate() {
        let out = lab.run_in(&h.ns, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])?;
        if out.contains(&needle) {
            v.push(i + 1);
        }
    }
    Ok(v)
}

/// Runs a command with a time limit (killed and reaped when it runs over).
fn output_within(mut cmd: Command, within: Duration, what: &str) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(within) {
        Ok(out) => out,
        Err(_) => {
            // Not reaped yet (the waiter is still blocked in wait), so the pid is still ours.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = rx.recv();
            let _ = waiter.join();
            bail!("{what} did not finish within {within:?}");
        }
    };
    let _ = waiter.join();
    out.with_context(|| format!("running {what}"))
}

/// Pids of live processes whose process group is `pgid` (from /proc).
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // "pid (comm) state ppid pgrp ...": comm may hold spaces, so cut after ')'.
                    let rest = s.get(s.rfind(')')? + 1..)?.to_string();
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    let state = *fields.first()?;
                    let pgrp: u32 = fields.get(2)?.parse().ok()?;
                    Some(pgrp == pgid && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// After a group leader exited, waits for the rest of its group (spaced's guard) to exit too,
/// and SIGKILLs stragglers after `within` (the group still has members, so the id is not reused).
fn reap_group(pgid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if group_members(pgid).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !group_members(pgid).is_empty() {
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
    }
    false
}

// --- spaced ----------------------------------------------------------------------------------

struct Spaced {
    pki: PathBuf,
    configs: Vec<PathBuf>,
    procs: Vec<LabProcess>,
    spawns: usize,
    vip: Ipv4Addr,
    spaced_bin: PathBuf,
    spacectl_bin: PathBuf,
    /// Guards that had not exited 3 s after their spaced did.
    lingering_guards: usize,
    /// Leader rounds run (each writer's device ids are its own).
    writes_made: usize,
    /// Where the singleton's program appends its start time (ns since the epoch), one line per
    /// start.
    singleton_log: PathBuf,
}

impl Spaced {
    fn start(lab: &Lab, vip: Ipv4Addr) -> Result<Spaced> {
        let pki = lab.dir().join("pki");
        make_pki(&pki, lab.hosts().len() as u64)?;
        let mut s = Spaced {
            pki,
            configs: Vec::new(),
            procs: Vec::new(),
            spawns: 0,
            vip,
            spaced_bin: binary("spaced")?,
            spacectl_bin: binary("spacectl")?,
            lingering_guards: 0,
            writes_made: 0,
            singleton_log: lab.dir().join("singleton-starts.log"),
        };
        for (i, host) in lab.hosts().iter().enumerate() {
            let id = i as u64 + 1;
            let name = format!("n{id}");
            let dir = lab.dir();
            // Written as TOML (not via `NodeConfig`) so fields added to the config later, which
            // all have defaults, do not break this bench: everything not set here is default.
            let source = dir.join(format!("{name}.toml"));
            let toml = format!(
                "node_id = {id}\n\
                 name = \"{name}\"\n\
                 data_dir = \"{data}\"\n\
                 listen = \"{ip}:7000\"\n\
                 roles = [\"ha\"]\n\
                 takeover = \"netlink\"\n\
                 {extra}\n\
                 [tls]\n\
                 ca = \"{pki}/ca.pem\"\n\
                 cert = \"{pki}/{name}.pem\"\n\
                 key = \"{pki}/{name}.key\"\n",
                data = dir.join(format!("data-{name}")).display(),
                ip = host.ip,
                pki = s.pki.display(),
                extra = extra_config(),
            );
            // Fail here, not in four spawned daemons, if the text is not what spaced accepts.
            NodeConfig::parse_str(&toml, &source)
                .with_context(|| format!("the bench's config for {name}"))?;
            std::fs::write(&source, &toml)
                .with_context(|| format!("writing {}", source.display()))?;
            s.configs.push(source);
            let p = s.spawn(lab, i + 1, id == 1)?;
            s.procs.push(p);
        }
        let h1 = s.endpoint(lab, 1);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.status(lab, &h1).is_ok_and(|st| st["leader"] == 1) {
            if Instant::now() > deadline {
                bail!("spaced n1 did not become leader within 20 s");
            }
            nap(Duration::from_millis(100))?;
        }
        for h in 2..=lab.hosts().len() {
            let addr = s.endpoint(lab, h);
            s.ctl(
                lab,
                &h1,
                &[
                    "node",
                    "add",
                    "--id",
                    &h.to_string(),
                    "--name",
                    &format!("n{h}"),
                    "--addr",
                    &addr,
                ],
                Duration::from_secs(20),
            )?;
        }
        s.ctl(
            lab,
            &h1,
            &[
                "vip",
                "add",
                "--name",
                "bench",
                "--address",
                &format!("{vip}/{}", lab.subnet_prefix()),
                "--interface",
                "eth0",
                "--roles",
                "ha",
            ],
            Duration::from_secs(10),
        )?;
        // The singleton: its first act is to write down when it started.
        let program = format!(
            "date +%s%N >> {}; exec sleep 1000000",
            s.singleton_log.display()
        );
        s.ctl(
            lab,
            &h1,
            &[
                "service",
                "add",
                SINGLETON,
                "--scope",
                "singleton",
                "--roles",
                "ha",
                "--",
                "sh",
                "-c",
                &program,
            ],
            Duration::from_secs(10),
        )?;
        Ok(s)
    }

    fn spawn(&mut self, lab: &Lab, host: usize, bootstrap: bool) -> Result<LabProcess> {
        self.spawns += 1;
        let cfg = self.configs[host - 1]
            .to_str()
            .context("config path is not UTF-8")?
            .to_string();
        let mut args = vec!["run", "--config", cfg.as_str()];
        if bootstrap {
            args.push("--bootstrap");
        }
        lab.spawn_in(
            &lab.host(host).ns,
            &self.spaced_bin,
            &args,
            &format!("spaced-h{host}-{}.log", self.spawns),
        )
    }

    fn endpoint(&self, lab: &Lab, host: usize) -> String {
        format!("{}:7000", lab.host(host).ip)
    }

    /// spacectl from the client namespace, bounded in time.
    fn ctl(&self, lab: &Lab, endpoint: &str, args: &[&str], within: Duration) -> Result<String> {
        let mut cmd = lab.command_in(&lab.client().ns, &self.spacectl_bin);
        cmd.args(args)
            .env("SPACED_ENDPOINT", endpoint)
            .env("SPACED_PKI", &self.pki);
        let what = format!("spacectl {} (endpoint {endpoint})", args.join(" "));
        let out = output_within(cmd, within, &what)?;
        if !out.status.success() {
            bail!(
                "{what}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL of the Raft leader while a client writes (a new device every `WRITE_EVERY`,
    /// each on a new connection to a survivor, following its redirect): the time from the
    /// SIGKILL to the first acknowledgement of a write sent after it.
    fn leader_round(&mut self, lab: &Lab, tag: &str) -> Result<Round> {
        let leader = self.leader_status(lab)?["leader"]
            .as_u64()
            .context("status without leader")? as usize;
        let survivors: Vec<String> = (1..=lab.hosts().len())
            .filter(|h| *h != leader)
            .map(|h| self.endpoint(lab, h))
            .collect();
        self.writes_made += 1;
        let writer = Writer::start(lab, &self.pki, survivors, self.writes_made)?;
        let ready = Instant::now() + Duration::from_secs(5);
        while writer
            .acked_since(Instant::now() - Duration::from_secs(60))
            .is_none()
        {
            if Instant::now() > ready {
                bail!("no write acknowledged within 5 s before the fault");
            }
            nap(Duration::from_millis(10))?;
        }
        let t0 = self.inject(lab, Fault::Kill, leader)?;
        let deadline = t0 + RECOVER_WITHIN;
        let mut acked = None;
        while Instant::now() < deadline && !interrupted() {
            if let Some(at) = writer.acked_since(t0) {
                acked = Some(at);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let ids = writer.stop();
        check_interrupt()?;
        self.restore(lab, Fault::Kill, leader)?;
        self.remove_devices(lab, &ids)?;
        let ms = acked.map(|at| at.duration_since(t0).as_secs_f64() * 1000.0);
        match ms {
            Some(ms) => {
                eprintln!("{tag} spaced leader: n{leader} killed, writes again after {ms:.1} ms")
            }
            None => eprintln!(
                "{tag} spaced leader: n{leader} killed, NO WRITE within {RECOVER_WITHIN:?}"
            ),
        }
        Ok(Round::measured_elsewhere(ms))
    }

    /// The devices a writer added go again (one write), so rounds do not pile them up.
    fn remove_devices(&self, lab: &Lab, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(1_000) {
            let mut args = vec!["device", "remove"];
            args.extend(chunk.iter().map(String::as_str));
            self.ctl(lab, &self.endpoint(lab, 1), &args, Duration::from_secs(10))
                .or_else(|_| {
                    self.ctl(lab, &self.endpoint(lab, 2), &args, Duration::from_secs(10))
                })?;
        }
        Ok(())
    }

    /// SIGKILL of the daemon on the node that runs the singleton: the time from the SIGKILL to
    /// the start of its program on another node (the program writes its start time, wall
    /// clock, to `singleton_log` before anything else).
    fn singleton_round(&mut self, lab: &Lab, tag: &str) -> Result<Round> {
        let owner = self.singleton_owner(lab)?;
        let before = std::fs::read_to_string(&self.singleton_log).unwrap_or_default();
        let started_before = before.lines().count();
        let wall0 = std::time::SystemTime::now();
        let t0 = self.inject(lab, Fault::Kill, owner)?;
        let deadline = t0 + RECOVER_WITHIN;
        let mut ms = None;
        while Instant::now() < deadline && !interrupted() {
            let text = std::fs::read_to_string(&self.singleton_log).unwrap_or_default();
            let start = text
                .lines()
                .skip(started_before)
                .filter_map(|l| l.trim().parse::<u128>().ok())
                .next();
            if let Some(ns) = start {
                let at = std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64);
                let since = at.duration_since(wall0).unwrap_or_default();
                ms = Some(since.as_secs_f64() * 1000.0);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        check_interrupt()?;
        let now_owner = self.singleton_owner(lab).ok();
        self.restore(lab, Fault::Kill, owner)?;
        match ms {
            Some(ms) => eprintln!(
                "{tag} spaced singleton: h{owner} killed, runs on h{} after {ms:.1} ms",
                now_owner.map_or("?".into(), |h| h.to_string())
            ),
            None => eprintln!(
                "{tag} spaced singleton: h{owner} killed, NOT RUNNING within {RECOVER_WITHIN:?}"
            ),
        }
        Ok(Round::measured_elsewhere(ms))
    }

    /// The node the fabric grants the bench's singleton to.
    fn singleton_owner(&self, lab: &Lab) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.ctl(
                lab,
                &self.endpoint(lab, 1),
                &["singleton", "list", "--json"],
                Duration::from_secs(3),
            );
            let owner = text.ok().and_then(|t| {
                let v: Value = serde_json::from_str(&t).ok()?;
                v.as_array()?.iter().find(|s| s["name"] == SINGLETON)?["owner"].as_u64()
            });
            if let Some(o) = owner {
                return Ok(o as usize);
            }
            if Instant::now() > deadline {
                bail!("the singleton {SINGLETON} has no owner after 10 s");
            }
            nap(Duration::from_millis(100))?;
        }
    }

    fn status(&self, lab: &Lab, endpoint: &str) -> Result<Value> {
        let text = self.ctl(lab, endpoint, &["status", "--json"], Duration::from_secs(3))?;
        serde_json::from_str(&text).with_context(|| format!("parsing status: {text}"))
    }

    /// The Raft leader's status (last_contact_ms is the leader's view).
    fn leader_status(&self, lab: &Lab) -> Result<Value> {
        let mut last_err = anyhow!("no spaced node is running");
        for h in 1..=self.procs.len() {
            if !self.procs[h - 1].is_running() {
                continue;
            }
            match self.status(lab, &self.endpoint(lab, h)) {
                Ok(st) => {
                    let Some(leader) = st["leader"].as_u64() else {
                        last_err = anyhow!("n{h} knows no leader");
                        continue;
                    };
                    if st["served_by"].as_u64() == Some(leader) {
                        return Ok(st);
                    }
                    let l = leader as usize;
                    if (1..=self.procs.len()).contains(&l) && self.procs[l - 1].is_running() {
                        return self.status(lab, &self.endpoint(lab, l));
                    }
                    last_err = anyhow!("leader n{leader} is not running");
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// Healthy: every process running, the leader in recent contact with all nodes (all voters),
    /// the VIP owned by a running node which is the only host holding the address. Returns
    /// (term, leader, owner), which must then stay the same for a while (`wait_healthy`).
    fn check_healthy(&self, lab: &Lab) -> Result<(u64, u64, usize)> {
        for (i, p) in self.procs.iter().enumerate() {
            if !p.is_running() {
                bail!(
                    "spaced on h{} is not running; log:\n{}",
                    i + 1,
                    p.read_log()
                );
            }
        }
        let st = self.leader_status(lab)?;
        let nodes = st["nodes"].as_array().context("status without nodes")?;
        if nodes.len() != self.procs.len() {
            bail!("{} nodes in status, want {}", nodes.len(), self.procs.len());
        }
        for n in nodes {
            let contact = n["last_contact_ms"].as_u64();
            if contact.is_none_or(|ms| ms >= CONTACT_MS) || n["voter"] != true {
                bail!("node {} not in contact: {n}", n["id"]);
            }
        }
        let owner = st["vips"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "bench"))
            .and_then(|v| v["owner"].as_u64())
            .context("the VIP has no owner")? as usize;
        let held = holders(lab, self.vip)?;
        if held != [owner] {
            bail!("VIP owned by n{owner} but held by {held:?}");
        }
        let term = st["term"].as_u64().context("status without term")?;
        let leader = st["leader"].as_u64().context("status without leader")?;
        Ok((term, leader, owner))
    }
}

impl System for Spaced {
    fn name(&self) -> &str {
        "spaced"
    }

    fn vip(&self) -> Ipv4Addr {
        self.vip
    }

    fn inject(&mut self, lab: &Lab, fault: Fault, owner: usize) -> Result<Instant> {
        let p = &self.procs[owner - 1];
        let t0 = Instant::now();
        match fault {
            // Only the daemon: its fence guard (same process group) must survive it.
            Fault::Kill | Fault::Leader | Fault::Singleton => p.signal(Signal::SIGKILL)?,
            Fault::Term => p.signal(Signal::SIGTERM)?,
            Fault::Link => lab.partition(lab.host(owner))?,
        }
        Ok(t0)
    }

    fn restore(&mut self, lab: &Lab, fault: Fault, owner: usize) -> Result<()> {
        match fault {
            Fault::Kill | Fault::Term | Fault::Leader | Fault::Singleton => {
                let p = self.procs[owner - 1].clone();
                let status = p
                    .wait(Duration::from_secs(10))?
                    .with_context(|| format!("spaced on h{owner} did not exit after {fault:?}"))?;
                if fault == Fault::Term && !status.success() {
                    eprintln!("  note: spaced on h{owner} exited with {status} after SIGTERM");
                }
                if !reap_group(p.pid(), Duration::from_secs(3)) {
                    self.lingering_guards += 1;
                    eprintln!(
                        "  note: the guard of spaced pid {} outlived it by 3 s",
                        p.pid()
                    );
                }
                self.procs[owner - 1] = self.spawn(lab, owner, false)?;
            }
            Fault::Link => lab.heal(lab.host(owner))?,
        }
        self.wait_healthy(lab, HEALTHY_WITHIN)
    }

    /// Healthy, and the same term, leader and owner for `SPACED_SETTLE`: a node that comes back
    /// from a partition may still force an election shortly after it is in contact again. A
    /// leader that owns the VIP is given `STEP_ASIDE_WITHIN` to hand leadership away.
    fn wait_healthy(&mut self, lab: &Lab, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let step_aside_by = Instant::now() + STEP_ASIDE_WITHIN;
        let mut since: Option<((u64, u64, usize), Instant)> = None;
        loop {
            check_interrupt()?;
            match self.check_healthy(lab) {
                Ok(state) => match since {
                    Some((s, t)) if s == state => {
                        let (_, leader, owner) = state;
                        if t.elapsed() >= SPACED_SETTLE
                            && (leader as usize != owner || Instant::now() >= step_aside_by)
                        {
                            return Ok(());
                        }
                    }
                    _ => since = Some((state, Instant::now())),
                },
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context(format!("spaced not healthy within {within:?}"));
                }
                Err(_) => since = None,
            }
            if Instant::now() > deadline {
                bail!(
                    "spaced healthy but not settled (term/leader/owner changing) within {within:?}"
                );
            }
            nap(Duration::from_millis(100))?;
        }
    }

    fn owner_leads(&mut self, lab: &Lab, owner: usize) -> Option<bool> {
        let leader = self.leader_status(lab).ok()?["leader"].as_u64()?;
        Some(leader as usize == owner)
    }

    fn own_round(&mut self, lab: &Lab, fault: Fault, tag: &str) -> Option<Result<Round>> {
        match fault {
            Fault::Leader => Some(self.leader_round(lab, tag)),
            Fault::Singleton => Some(self.singleton_round(lab, tag)),
            _ => None,
        }
    }

    fn remarks(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.lingering_guards > 0 {
            v.push(format!(
                "spaced: a fence guard outlived its daemon by > 3 s {} time(s)",
                self.lingering_guards
            ));
        }
        v
    }
}

// --- keepalived ------------------------------------------------------------------------------

struct Keepalived {
    label: String,
    bin: PathBuf,
    confs: Vec<PathBuf>,
    procs: Vec<LabProcess>,
    spawns: usize,
    vip: Ipv4Addr,
    /// Rounds after which the harness had to remove a VIP left by a SIGKILLed keepalived.
    stale_removed: usize,
}

impl Keepalived {
    fn start(
        lab: &Lab,
        bin: &Path,
        label: &str,
        advert: &str,
        vrid: u8,
        vip: Ipv4Addr,
    ) -> Result<Keepalived> {
        let mut k = Keepalived {
            label: label.to_string(),
            bin: bin.to_path_buf(),
            confs: Vec::new(),
            procs: Vec::new(),
            spawns: 0,
            vip,
            stale_removed: 0,
        };
        for (i, host) in lab.hosts().iter().enumerate() {
            let priority = 100 - i as u32;
            let conf = format!(
                "global_defs {{\n\
                 \x20   router_id {label}-{host}\n\
                 }}\n\
                 vrrp_instance {label} {{\n\
                 \x20   state BACKUP\n\
                 \x20   nopreempt\n\
                 \x20   interface eth0\n\
                 \x20   version 3\n\
                 \x20   virtual_router_id {vrid}\n\
                 \x20   priority {priority}\n\
                 \x20   advert_int {advert}\n\
                 \x20   virtual_ipaddress {{\n\
                 \x20       {vip}/{prefix} dev eth0\n\
                 \x20   }}\n\
                 }}\n",
                host = host.name,
                prefix = lab.subnet_prefix(),
            );
            let path = lab.dir().join(format!("{label}-{}.conf", host.name));
            std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
            k.confs.push(path);
            let p = k.spawn(lab, i + 1)?;
            k.procs.push(p);
        }
        Ok(k)
    }

    fn spawn(&mut self, lab: &Lab, host: usize) -> Result<LabProcess> {
        self.spawns += 1;
        let dir = lab.dir();
        let tag = format!("{}-h{host}", self.label);
        // Fresh pid files per start: after a SIGKILL the old ones may still name a process that
        // is not reaped yet, and keepalived would refuse to start ("daemon is already running").
        let n = self.spawns;
        let path = |suffix: &str| {
            dir.join(format!("{tag}-{n}.{suffix}"))
                .display()
                .to_string()
        };
        let conf = self.confs[host - 1].display().to_string();
        let (pid, vrrp, checkers, bfd) = (
            path("pid"),
            path("vrrp.pid"),
            path("check.pid"),
            path("bfd.pid"),
        );
        lab.spawn_in(
            &lab.host(host).ns,
            &self.bin,
            &[
                "-n", "-l", "-D", "-G", "-P", "-f", &conf, "-p", &pid, "-r", &vrrp, "-c",
                &checkers, "-b", &bfd,
            ],
            &format!("{tag}-{n}.log"),
        )
    }

    fn check_healthy(&self, lab: &Lab) -> Result<()> {
        for (i, p) in self.procs.iter().enumerate() {
            if !p.is_running() {
                bail!(
                    "{} on h{} is not running; log:\n{}",
                    self.label,
                    i + 1,
                    p.read_log()
                );
            }
            let log = p.read_log();
            if !log.contains("Entering BACKUP STATE") && !log.contains("Entering MASTER STATE") {
                bail!(
                    "{} on h{} has not entered a VRRP state yet",
                    self.label,
                    i + 1
                );
            }
        }
        let held = holders(lab, self.vip)?;
        if held.len() != 1 {
            bail!("{} VIP held by {held:?}", self.label);
        }
        Ok(())
    }
}

impl System for Keepalived {
    fn name(&self) -> &str {
        &self.label
    }

    fn vip(&self) -> Ipv4Addr {
        self.vip
    }

    fn inject(&mut self, lab: &Lab, fault: Fault, owner: usize) -> Result<Instant> {
        let p = &self.procs[owner - 1];
        let t0 = Instant::now();
        match fault {
            // The whole daemon (parent and VRRP child share the process group), like a crash.
            Fault::Kill | Fault::Leader | Fault::Singleton => {
                p.kill();
            }
            Fault::Term => p.signal(Signal::SIGTERM)?,
            Fault::Link => lab.partition(lab.host(owner))?,
        }
        Ok(t0)
    }

    fn restore(&mut self, lab: &Lab, fault: Fault, owner: usize) -> Result<()> {
        match fault {
            Fault::Kill | Fault::Term | Fault::Leader | Fault::Singleton => {
                let p = self.procs[owner - 1].clone();
                p.wait(Duration::from_secs(10))?.with_context(|| {
                    format!("{} on h{owner} did not exit after {fault:?}", self.label)
                })?;
                reap_group(p.pid(), Duration::from_secs(3));
                self.procs[owner - 1] = self.spawn(lab, owner)?;
            }
            Fault::Link => lab.heal(lab.host(owner))?,
        }
        // A SIGKILLed keepalived leaves its VIP behind; see whether the restarted one clears it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            check_interrupt()?;
            if self.check_healthy(lab).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let held = holders(lab, self.vip)?;
                if held.len() > 1 && held.contains(&owner) {
                    eprintln!(
                        "  note: {} left the VIP on h{owner} after restart ({held:?}); removing it",
                        self.label
                    );
                    lab.run_in(
                        &lab.host(owner).ns,
                        &[
                            "ip",
                            "addr",
                            "del",
                            &format!("{}/{}", self.vip, lab.subnet_prefix()),
                            "dev",
                            "eth0",
                        ],
                    )?;
                    self.stale_removed += 1;
                }
                break;
            }
            nap(Duration::from_millis(50))?;
        }
        self.wait_healthy(lab, HEALTHY_WITHIN)
    }

    fn wait_healthy(&mut self, lab: &Lab, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            check_interrupt()?;
            match self.check_healthy(lab) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context(format!("{} not healthy within {within:?}", self.label));
                }
                Err(_) => nap(Duration::from_millis(50))?,
            }
        }
    }

    fn remarks(&self) -> Vec<String> {
        if self.stale_removed > 0 {
            vec![format!(
                "{}: the restarted keepalived kept the VIP left by its SIGKILLed predecessor {} time(s); the harness removed it",
                self.label, self.stale_removed
            )]
        } else {
            Vec::new()
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn keepalived_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.starts_with("Keepalived"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "keepalived (version unknown)".into())
}

// ---------------------------------------------------------------------------------------------
// Rounds
// ---------------------------------------------------------------------------------------------

/// One round: find the owner, inject, wait for another host to answer, repair, and look at
/// what the client saw from the takeover until the system was healthy again.
fn round(
    lab: &Lab,
    prober: &Prober,
    sys: &mut dyn System,
    fault: Fault,
    tag: &str,
) -> Result<Round> {
    let vip = SocketAddr::new(IpAddr::V4(sys.vip()), SERVICE_PORT);
    prober.aim(Some(vip));
    let owner = prober
        .stable_owner(Duration::from_secs(10))
        .with_context(|| format!("{}: finding the owner", sys.name()))?;
    let owner_led = sys.owner_leads(lab, owner);
    let t0 = sys.inject(lab, fault, owner)?;
    let deadline = t0 + RECOVER_WITHIN;
    let mut recovered = None;
    while Instant::now() < deadline && !interrupted() {
        if let Some(found) = prober.first_other(t0, owner) {
            recovered = Some(found);
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    check_interrupt()?;
    let old_held = holders(lab, sys.vip())?.contains(&owner);
    let led = match owner_led {
        Some(true) => " (owner led Raft)",
        _ => "",
    };
    let Some((at, new)) = recovered else {
        prober.aim(None);
        eprintln!(
            "{tag} {} {}: h{owner}: NO RECOVERY within {RECOVER_WITHIN:?}{led}",
            sys.name(),
            fault.short()
        );
        sys.restore(lab, fault, owner)
            .with_context(|| format!("{}: restoring after {}", sys.name(), fault.short()))?;
        return Ok(Round {
            ms: None,
            old_held,
            moved_again: false,
            second_outage_ms: None,
            owner_led,
        });
    };
    let ms = at.duration_since(t0).as_secs_f64() * 1000.0;
    // Probing goes on through the repair: a second move (failback, flapping) shows up here.
    sys.restore(lab, fault, owner)
        .with_context(|| format!("{}: restoring after {}", sys.name(), fault.short()))?;
    nap(AFTER_REPAIR)?;
    let log = prober.snapshot();
    prober.aim(None);
    let later: Vec<&Probe> = log.iter().filter(|p| p.sent > at).collect();
    let others: Vec<usize> = later
        .iter()
        .filter_map(|p| p.host)
        .filter(|h| *h != new)
        .collect();
    let moved_again = !others.is_empty();
    let failed_after = later.iter().filter(|p| p.host.is_none()).count();
    let second_outage_ms = (failed_after > 0).then(|| {
        let mut ok: Vec<Instant> = later
            .iter()
            .filter(|p| p.host.is_some())
            .map(|p| p.done)
            .collect();
        ok.push(at);
        ok.push(log.iter().map(|p| p.done).max().unwrap_or(at));
        ok.sort_unstable();
        ok.windows(2)
            .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max)
    });
    let mut extra = String::new();
    if old_held {
        extra.push_str(", old owner still held the VIP");
    }
    if moved_again {
        let mut hosts = others.clone();
        hosts.sort_unstable();
        hosts.dedup();
        let _ = write!(extra, ", then moved again (to {hosts:?})");
    }
    if let Some(gap) = second_outage_ms {
        let _ = write!(
            extra,
            ", then {failed_after} failed probe(s), longest gap {gap:.0} ms"
        );
    }
    eprintln!(
        "{tag} {} {}: h{owner} -> h{new} {ms:.1} ms{extra}{led}",
        sys.name(),
        fault.short(),
    );
    Ok(Round {
        ms: Some(ms),
        old_held,
        moved_again,
        second_outage_ms,
        owner_led,
    })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Linear interpolation between closest ranks (sorted input).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.len() == 1 {
        return sorted[0];
    }
    let h = (sorted.len() - 1) as f64 * p / 100.0;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

struct Stats {
    min: f64,
    median: f64,
    p99: f64,
    max: f64,
}

fn stats(rounds: &[Round]) -> Option<Stats> {
    let mut v: Vec<f64> = rounds.iter().filter_map(|r| r.ms).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Stats {
        min: v[0],
        median: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v[v.len() - 1],
    })
}

fn ms(v: f64) -> String {
    format!("{v:.0}")
}

#[allow(clippy::too_many_arguments)]
fn report(
    results: &BTreeMap<(usize, Fault), Vec<Round>>,
    names: &[String],
    faults: &[Fault],
    rounds_wanted: usize,
    ka_version: Option<&str>,
    remarks: &[String],
    failures: &[String],
    elapsed: Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Failover as the client sees it\n");
    let _ = writeln!(
        out,
        "Client-observed failover: time from the fault at the VIP's owner to the first TCP \
         exchange on the VIP answered by another host, in ms. The client probes every {} ms \
         ({} ms timeout per exchange); 3 hosts and the client on one bridge (network \
         namespaces); {rounds_wanted} rounds per row, rounds of all systems interleaved; {:.0} s \
         in all. spaced with default settings; {}, VRRPv3, all BACKUP with nopreempt, \
         priorities 100/99/98. SIGKILL: spaced's daemon only (its fence guard survives it), \
         keepalived's whole daemon; link down: the owner's switch port goes down; SIGTERM: a \
         graceful stop. Median and p99 interpolated between ranks (with {rounds_wanted} \
         rounds p99 lies between the two largest values).\n",
        PROBE_EVERY.as_millis(),
        PROBE_TIMEOUT.as_millis(),
        elapsed.as_secs_f64(),
        ka_version.unwrap_or("keepalived not run"),
    );
    let _ = writeln!(
        out,
        "| system | fault | rounds | min | median | p99 | max | old owner still held the VIP | VIP moved again | second outage after the takeover: rounds (longest) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for fault in faults {
        for (si, name) in names.iter().enumerate() {
            let Some(rs) = results.get(&(si, *fault)) else {
                continue;
            };
            let failed = rs.iter().filter(|r| r.ms.is_none()).count();
            let held = rs.iter().filter(|r| r.old_held).count();
            let moved = rs.iter().filter(|r| r.moved_again).count();
            let gaps: Vec<f64> = rs.iter().filter_map(|r| r.second_outage_ms).collect();
            let gap_text = if gaps.is_empty() {
                "0".to_string()
            } else {
                format!(
                    "{} ({} ms)",
                    gaps.len(),
                    ms(gaps.iter().copied().fold(0.0, f64::max))
                )
            };
            let rounds = if failed > 0 {
                format!("{} ({failed} did not recover)", rs.len())
            } else {
                rs.len().to_string()
            };
            let held_text = if fault.on_vip() {
                format!("{held} / {} | {moved} | {gap_text}", rs.len())
            } else {
                "– | – | –".to_string()
            };
            match stats(rs) {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {rounds} | {} | {} | {} | {} | {held_text} |",
                        fault.label(),
                        ms(s.min),
                        ms(s.median),
                        ms(s.p99),
                        ms(s.max),
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {rounds} | – | – | – | – | {held_text} |",
                        fault.label()
                    );
                }
            }
        }
    }

    let _ = writeln!(
        out,
        "\n*Old owner still held the VIP*: the address was still on the old owner's interface \
         when the new owner first answered. *VIP moved again*: yet another host answered later, \
         before the fault was repaired and the system healthy again. *Second outage*: exchanges \
         failed after the new owner had answered (rounds, and the longest time without a \
         successful exchange)."
    );

    // Ratios of medians: spaced / each keepalived.
    let spaced = names.iter().position(|n| n == "spaced");
    let others: Vec<usize> = (0..names.len()).filter(|i| Some(*i) != spaced).collect();
    if let Some(sp) = spaced
        && !others.is_empty()
    {
        let _ = writeln!(out);
        let mut header = "| fault | spaced median |".to_string();
        let mut rule = "|---|---|".to_string();
        for o in &others {
            let _ = write!(header, " {} median | spaced / {} |", names[*o], names[*o]);
            rule.push_str("---|---|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for fault in faults {
            let Some(sm) = results.get(&(sp, *fault)).and_then(|r| stats(r)) else {
                continue;
            };
            let mut line = format!("| {} | {} |", fault.label(), ms(sm.median));
            for o in &others {
                match results.get(&(*o, *fault)).and_then(|r| stats(r)) {
                    Some(om) => {
                        let _ = write!(line, " {} | {:.2} |", ms(om.median), sm.median / om.median);
                    }
                    None => line.push_str(" – | – |"),
                }
            }
            let _ = writeln!(out, "{line}");
        }
    }

    // Targets (issue 19).
    if let Some(sp) = spaced {
        let _ = writeln!(out, "\nTargets for spaced with default settings:\n");
        let ka100 = names.iter().position(|n| n == "keepalived-100ms");
        for fault in faults {
            let Some(rs) = results.get(&(sp, *fault)) else {
                continue;
            };
            let failed = rs.iter().filter(|r| r.ms.is_none()).count();
            let Some(s) = stats(rs) else {
                let _ = writeln!(out, "- {}: no round recovered: not met", fault.label());
                continue;
            };
            let verdict = |ok: bool| if ok && failed == 0 { "met" } else { "NOT met" };
            let median = |limit: f64| {
                format!(
                    "median ≤ {limit} ms: {} ({} ms)",
                    verdict(s.median <= limit),
                    ms(s.median)
                )
            };
            let max = |limit: f64| {
                format!(
                    "max ≤ {limit} ms: {} ({} ms)",
                    verdict(s.max <= limit),
                    ms(s.max)
                )
            };
            let line = match fault {
                Fault::Link => {
                    let mut l = format!("{}; {}", median(250.0), max(400.0));
                    if let Some(k) = ka100
                        .and_then(|k| results.get(&(k, *fault)))
                        .and_then(|r| stats(r))
                    {
                        let ratio = s.median / k.median;
                        let _ = write!(
                            l,
                            "; ≤ 0.75 × keepalived-100ms: {} ({ratio:.2})",
                            verdict(ratio <= 0.75)
                        );
                    }
                    l
                }
                Fault::Kill => median(100.0),
                Fault::Term => format!("{}; {}", median(20.0), max(50.0)),
                Fault::Leader => median(400.0),
                Fault::Singleton => median(150.0),
            };
            let _ = writeln!(out, "- {}: {line}", fault.label());
        }
        let doubles: usize = faults
            .iter()
            .filter(|f| f.on_vip())
            .filter_map(|f| results.get(&(sp, *f)))
            .flatten()
            .filter(|r| r.old_held)
            .count();
        let _ = writeln!(
            out,
            "- rounds in which the old owner still held the VIP when the new one answered: {doubles} ({})",
            if doubles == 0 { "met" } else { "NOT met" }
        );
    }
    // spaced: does it matter whether the owner was also the Raft leader?
    let mut notes: Vec<String> = Vec::new();
    if let Some(sp) = spaced {
        for fault in faults.iter().filter(|f| f.on_vip()) {
            let Some(rs) = results.get(&(sp, *fault)) else {
                continue;
            };
            let (led, rest): (Vec<Round>, Vec<Round>) =
                rs.iter().cloned().partition(|r| r.owner_led == Some(true));
            let median = |v: &[Round]| {
                stats(v).map_or_else(|| "–".to_string(), |s| format!("{} ms", ms(s.median)))
            };
            notes.push(format!(
                "spaced, {}: the owner was also the Raft leader in {} of {} rounds (median {}; other rounds: median {})",
                fault.label(),
                led.len(),
                rs.len(),
                median(&led),
                median(&rest),
            ));
        }
    }
    notes.extend(remarks.iter().cloned());
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n");
        for r in &notes {
            let _ = writeln!(out, "- {r}");
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\nHarness failures:\n");
        for f in failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

struct Settings {
    rounds: usize,
    faults: Vec<Fault>,
    systems: Vec<String>,
}

fn settings() -> Result<Settings> {
    let rounds = match std::env::var("ROUNDS") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("ROUNDS={v:?} is not a positive number"))?,
        Err(_) => 20,
    };
    let faults = std::env::var("FAILOVER_FAULTS")
        .unwrap_or_else(|_| "kill,link,term".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Fault::parse)
        .collect::<Result<Vec<_>>>()?;
    let systems: Vec<String> = std::env::var("FAILOVER_SYSTEMS")
        .unwrap_or_else(|_| "spaced,keepalived-1s,keepalived-100ms".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &systems {
        if !["spaced", "keepalived-1s", "keepalived-100ms"].contains(&s.as_str()) {
            bail!("unknown system {s:?} (spaced, keepalived-1s, keepalived-100ms)");
        }
    }
    if faults.is_empty() || systems.is_empty() {
        bail!("nothing to run (FAILOVER_FAULTS / FAILOVER_SYSTEMS are empty)");
    }
    Ok(Settings {
        rounds,
        faults,
        systems,
    })
}

/// Exit codes: 0 done, 1 harness failure, 2 cannot run (not root, bad settings), 130 interrupted.
fn main() -> ExitCode {
    // `cargo bench` passes --bench; under `cargo test --benches` do nothing (this takes minutes).
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "failover bench: run with `cargo bench` or benches/failover; nothing to do in test mode"
        );
        return ExitCode::SUCCESS;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("failover bench: needs root (network namespaces, veth, bridge, keepalived)");
        return ExitCode::from(2);
    }
    let settings = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("failover bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = install_signal_handlers() {
        eprintln!("failover bench: {e:#}");
        return ExitCode::from(1);
    }
    let code = match run(&settings) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("failover bench: {e:#}");
            ExitCode::from(1)
        }
    };
    if interrupted() {
        eprintln!("failover bench: interrupted; lab cleaned up");
        return ExitCode::from(130);
    }
    code
}

/// Builds the lab, runs everything, prints the report. Ok(false) when the harness failed in
/// some round (the report is still printed).
fn run(settings: &Settings) -> Result<bool> {
    let ka_bin = if settings.systems.iter().any(|s| s.starts_with("keepalived")) {
        Some(find_program("keepalived").context(
            "keepalived is not installed (apt-get install keepalived; benches/failover does this)",
        )?)
    } else {
        None
    };
    let ka_version = ka_bin.as_deref().map(keepalived_version);
    // The tree's daemon, not whatever an earlier build left.
    spaced_tests::build_binaries()?;
    binary("spaced")?;
    binary("spacectl")?;

    let lab = Lab::new(3).context("building the network lab")?;
    if let Ok(file) = std::env::var("FAILOVER_LAB_ID_FILE") {
        std::fs::write(&file, lab.id()).with_context(|| format!("writing {file}"))?;
    }
    eprintln!(
        "failover bench: lab {} (logs in {}), {} rounds of {:?} for {:?}",
        lab.id(),
        lab.dir().display(),
        settings.rounds,
        settings.faults,
        settings.systems
    );
    let prober = Prober::new();
    let outcome = std::thread::scope(|scope| {
        let prober = &prober;
        let lab = &lab;
        let scheduler = std::thread::Builder::new()
            .name("failover-prober".into())
            .spawn_scoped(scope, move || prober.run(lab, scope))
            .context("spawning the prober");
        let outcome = match scheduler {
            Ok(_) => bench(
                lab,
                prober,
                settings,
                ka_bin.as_deref(),
                ka_version.as_deref(),
            ),
            Err(e) => Err(e),
        };
        prober.stop();
        outcome
    });
    if !matches!(outcome, Ok(true)) || std::env::var_os("FAILOVER_KEEP_LOGS").is_some() {
        keep_logs(&lab);
    }
    // The lab (processes, namespaces) is torn down here, also on errors.
    drop(lab);
    outcome
}

/// Copies the lab's logs and configs (not data dirs or keys) somewhere that outlives the lab.
fn keep_logs(lab: &Lab) {
    let dest = std::env::temp_dir().join(format!("failover-bench-logs-{}", lab.id()));
    let copy = || -> Result<()> {
        std::fs::create_dir_all(&dest)?;
        for entry in std::fs::read_dir(lab.dir())? {
            let entry = entry?;
            let name = entry.file_name();
            let keep = name.to_str().is_some_and(|n| {
                n.ends_with(".log") || n.ends_with(".conf") || n.ends_with(".toml")
            });
            if keep && entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), dest.join(&name))?;
            }
        }
        Ok(())
    };
    match copy() {
        Ok(()) => eprintln!("failover bench: logs kept in {}", dest.display()),
        Err(e) => eprintln!("failover bench: could not keep the logs: {e:#}"),
    }
}

fn bench(
    lab: &Lab,
    prober: &Prober,
    settings: &Settings,
    ka_bin: Option<&Path>,
    ka_version: Option<&str>,
) -> Result<bool> {
    let started = Instant::now();
    // A VRRP router id unique to this lab (two consecutive ids).
    let vrid = 1 + (std::process::id() % 120) as u8 * 2;
    let mut systems: Vec<Box<dyn System>> = Vec::new();
    for (k, name) in settings.systems.iter().enumerate() {
        let vip = lab.free_ip(k as u8);
        for h in lab.hosts() {
            lab.serve_in(
                &h.ns,
                SocketAddr::new(IpAddr::V4(vip), SERVICE_PORT),
                h.name.clone().into_bytes(),
            )?;
        }
        let sys: Box<dyn System> = match name.as_str() {
            "spaced" => Box::new(Spaced::start(lab, vip).context("starting spaced")?),
            ka => {
                let (advert, id) = if ka == "keepalived-1s" {
                    ("1", vrid)
                } else {
                    ("0.1", vrid + 1)
                };
                let bin = ka_bin.context("keepalived binary")?;
                Box::new(
                    Keepalived::start(lab, bin, ka, advert, id, vip)
                        .with_context(|| format!("starting {ka}"))?,
                )
            }
        };
        systems.push(sys);
    }
    for sys in &mut systems {
        sys.wait_healthy(lab, Duration::from_secs(60))?;
    }
    eprintln!(
        "failover bench: all systems up after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let names: Vec<String> = systems.iter().map(|s| s.name().to_string()).collect();
    let mut results: BTreeMap<(usize, Fault), Vec<Round>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut broken = vec![false; systems.len()];
    let total = settings.rounds * settings.faults.len() * systems.len();
    let mut done = 0;
    // A link-down round cuts the host off for every system running on it, not only the one
    // measured: after one, all systems must be healthy again before the next round.
    let mut disturbed = false;
    'rounds: for r in 1..=settings.rounds {
        for fault in &settings.faults {
            for si in 0..systems.len() {
                if interrupted() {
                    break 'rounds;
                }
                done += 1;
                if broken[si] {
                    continue;
                }
                if disturbed {
                    for (oi, other) in systems.iter_mut().enumerate() {
                        if broken[oi] {
                            continue;
                        }
                        if let Err(e) = other.wait_healthy(lab, HEALTHY_WITHIN) {
                            if interrupted() {
                                break 'rounds;
                            }
                            eprintln!("{}: HARNESS FAILURE: {e:#}", names[oi]);
                            failures.push(format!(
                                "{}: not healthy after another system's link-down round: {e:#} (no further rounds of {})",
                                names[oi], names[oi]
                            ));
                            broken[oi] = true;
                        }
                    }
                    disturbed = false;
                    if broken[si] {
                        continue;
                    }
                }
                let sys = &mut systems[si];
                let tag = format!("[{done:>3}/{total}] r{r}");
                disturbed = *fault == Fault::Link;
                let measured = if fault.on_vip() {
                    round(lab, prober, sys.as_mut(), *fault, &tag)
                } else {
                    match sys.own_round(lab, *fault, &tag) {
                        Some(r) => r,
                        None => continue,
                    }
                };
                match measured {
                    Ok(rd) => {
                        if rd.ms.is_none() {
                            failures.push(format!(
                                "{} {} round {r}: no other host answered within {RECOVER_WITHIN:?}",
                                names[si],
                                fault.short()
                            ));
                        }
                        results.entry((si, *fault)).or_default().push(rd);
                    }
                    Err(e) => {
                        prober.aim(None);
                        if interrupted() {
                            break 'rounds;
                        }
                        eprintln!(
                            "{tag} {} {}: HARNESS FAILURE: {e:#}",
                            names[si],
                            fault.short()
                        );
                        failures.push(format!(
                            "{} {} round {r}: {e:#} (no further rounds of {})",
                            names[si],
                            fault.short(),
                            names[si]
                        ));
                        broken[si] = true;
                    }
                }
            }
        }
    }
    prober.aim(None);
    let remarks: Vec<String> = systems.iter().flat_map(|s| s.remarks()).collect();
    let text = report(
        &results,
        &names,
        &settings.faults,
        settings.rounds,
        ka_version,
        &remarks,
        &failures,
        started.elapsed(),
    );
    println!("{text}");
    Ok(failures.is_empty() && !interrupted())
}
