//! A fault campaign against one cluster of real `spaced` processes in the network lab (root):
//! a nemesis throws seeded random faults at the nodes while a client writes unique devices
//! through the admin API and every host's hold on the VIP is sampled every 2 ms; then the
//! checkers read the history. `cargo bench -p spaced-tests --bench chaos` runs it (see
//! docs/testing.md); `tests/chaos_lab.rs` runs a few faults of it in CI.
//!
//! The checkers: no acknowledged write is missing from any node once the run has healed, no
//! device is read back that was never written, never two hosts holding the VIP in one
//! sample, the VIP held by one host and writes acknowledged again within a bound after every
//! heal, and no owner change in the quiet time between faults (a flap).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use spaced_fabric::{Command, DeviceMode, NewDevice};
use spaced_node::admin::client::{AdminClient, AdminCredentials};
use spaced_node::admin::{AdminReply, AdminRequest};
use spaced_node::ops::config::{RaftTimings, TakeoverMode, VipSection};

use crate::lab::{
    AddressWatch, Lab, LabProcess, Oneway, ProcessWatch, SmallDisk, WatchReport, hosts_running,
    spawn_async_in,
};
use crate::sites::Rng;
use crate::{binary, make_pki, unreachable_device_addr};

const NODE_PORT: u16 = 7000;
/// How long after a heal the VIP must be held by one host and a write acknowledged again.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// The quiet time after each recovery, in which the VIP must not move (no fault is active).
const QUIET: Duration = Duration::from_millis(1500);
/// The singleton service every campaign runs, and the program it runs (its arguments are how
/// the process watch finds it on the hosts).
const SINGLETON: &str = "chaos-single";
const SINGLETON_ARGV: [&str; 2] = ["sleep", "86401"];
/// Each node's data dir is a tmpfs of this size (the full-disk fault fills it up).
const DATA_DISK: &str = "256m";
/// The reader asks for a linearizable read of every device this often (one at a time).
const READ_EVERY: Duration = Duration::from_millis(100);
/// A read or write with no answer within this is recorded as timed out.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a harness `spacectl` call (status, membership, leader transfer) may take.
const CTL_WITHIN: Duration = Duration::from_secs(8);
/// The balancer's port on the VIP, and the application's port on every node behind it.
pub const LB_PORT: u16 = 8080;
/// See [`LB_PORT`].
pub const APP_PORT: u16 = 8081;
/// The soak's client opens a connection through the balancer this often (one at a time).
const LB_CONNECT_EVERY: Duration = Duration::from_millis(20);

/// The campaign's knobs.
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    /// Nodes (3 or 5).
    pub nodes: usize,
    /// The client writes one device this often.
    pub write_every: Duration,
    /// Keep the client's devices to this many: each add past it also removes the device
    /// added that many adds before, if that add was acknowledged (a steady state for long runs;
    /// the removals are history the checkers read). `None`: they pile up.
    pub churn: Option<usize>,
    /// Run the balancer on the VIP (`[lb]`: port [`LB_PORT`] to [`APP_PORT`] on every node,
    /// where a lab server answers with its host's name); the soak sends connections through it.
    pub balancer: bool,
    /// `[raft] snapshot_after_logs` of every node (`None`: the default): small values
    /// snapshot (and purge the log) often, to see what that costs the leases.
    pub snapshot_after_logs: Option<u64>,
    /// `nice` of every node (`None`: the daemon's default), to compare stalls at two
    /// priorities.
    pub nice: Option<i32>,
    /// Only faults whose kind (as the report names it) contains this text, to look at how
    /// one kind of fault is recovered from (`None`: the whole mix).
    pub only: Option<String>,
}

impl Default for ChaosSettings {
    fn default() -> Self {
        ChaosSettings {
            nodes: 3,
            write_every: Duration::from_millis(40),
            churn: Some(1000),
            balancer: false,
            snapshot_after_logs: None,
            nice: None,
            only: None,
        }
    }
}

/// Who a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The Raft leader, as the nodes say.
    Leader,
    /// The VIP's holder, as the hosts' addresses say.
    Owner,
    /// Any node.
    Any,
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of the daemon (its fence guard lives on); restarted at the heal.
    Kill(Target),
    /// SIGKILL of the daemon's whole process group (the guard too); restarted at the heal.
    KillGroup(Target),
    /// SIGSTOP of the daemon's process group; SIGCONT at the heal.
    Stop(Target),
    /// The host's own eth0 down; up at the heal.
    LinkDown(Target),
    /// The host cut off at the switch (both ways); reconnected at the heal.
    Partition(Target),
    /// One direction of the host's link cut ([`Oneway`]); restored at the heal.
    OneWay(Target, Oneway),
    /// Every node but one cut off: no majority anywhere until the heal.
    PartitionMajority,
    /// SIGTERM (a graceful stop), then a restart at the heal.
    Restart(Target),
    /// `spacectl leader transfer` to another voter.
    TransferLeader,
    /// The wall clock (CLOCK_REALTIME, one for the whole machine: every node at once) set this
    /// many seconds forward (or back, negative); set back by as much at the heal.
    ClockJump(i64),
    /// The node's data dir (a small tmpfs of its own) filled up; freed at the heal, and the
    /// node restarted if its store had stopped (what its log asks the operator to do).
    DiskFull(Target),
    /// A node added to the cluster (a new id on the spare host) or the one added before
    /// removed, while another fault holds.
    Membership(Box<Fault>),
}

impl Fault {
    /// Its kind, for the summary.
    pub fn kind(&self) -> String {
        let t = |t: &Target| match t {
            Target::Leader => "leader",
            Target::Owner => "VIP owner",
            Target::Any => "a node",
        };
        match self {
            Fault::Kill(x) => format!("SIGKILL daemon of {}", t(x)),
            Fault::KillGroup(x) => format!("SIGKILL process group of {}", t(x)),
            Fault::Stop(x) => format!("SIGSTOP process group of {}", t(x)),
            Fault::LinkDown(x) => format!("link down on {}", t(x)),
            Fault::Partition(x) => format!("partition of {} (minority)", t(x)),
            Fault::OneWay(x, Oneway::Mute) => {
                format!("one-way partition of {}: it hears, cannot send", t(x))
            }
            Fault::OneWay(x, Oneway::Deaf) => {
                format!("one-way partition of {}: it sends, cannot hear", t(x))
            }
            Fault::PartitionMajority => "partition of all but one (majority)".into(),
            Fault::Restart(x) => format!("restart (SIGTERM) of {}", t(x)),
            Fault::TransferLeader => "leader transfer".into(),
            Fault::ClockJump(s) if *s >= 0 => "wall clock jumps forward".into(),
            Fault::ClockJump(_) => "wall clock jumps back".into(),
            Fault::DiskFull(x) => format!("full disk on {}", t(x)),
            Fault::Membership(_) => {
                "membership change (node added or removed) during another fault".into()
            }
        }
    }

    /// A random fault.
    pub fn random(rng: &mut Rng) -> Fault {
        match rng.below(13) {
            11 => Fault::Membership(Box::new(Fault::random_single(rng))),
            12 => {
                let secs = 5 + rng.below(116) as i64;
                Fault::ClockJump(if rng.below(2) == 0 { secs } else { -secs })
            }
            _ => Fault::random_single(rng),
        }
    }

    /// A random fault of one node or of the network, or a leader transfer: one that a
    /// membership change can be made during.
    fn random_single(rng: &mut Rng) -> Fault {
        let target = match rng.below(3) {
            0 => Target::Leader,
            1 => Target::Owner,
            _ => Target::Any,
        };
        match rng.below(11) {
            0 => Fault::Kill(target),
            1 => Fault::KillGroup(target),
            2 => Fault::Stop(target),
            3 => Fault::LinkDown(target),
            4 => Fault::Partition(target),
            5 => Fault::OneWay(target, Oneway::Mute),
            6 => Fault::OneWay(target, Oneway::Deaf),
            7 => Fault::PartitionMajority,
            8 => Fault::Restart(target),
            9 => Fault::DiskFull(target),
            _ => Fault::TransferLeader,
        }
    }
}

/// What a write did to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Added it (each id is added once).
    Add,
    /// Removed it (the churn; only ids whose add was acknowledged).
    Remove,
}

/// One write the client made and what it heard.
#[derive(Debug, Clone)]
pub struct Write {
    /// The device id (unique per add).
    pub id: String,
    /// Added or removed.
    pub op: Op,
    /// When it was sent, since the campaign's start.
    pub sent: Duration,
    /// How long until the answer (or the time-out).
    pub took: Duration,
    /// What came back.
    pub result: WriteResult,
}

/// One linearizable read of every device (`ReadDevices`, through the leader) and what it saw.
#[derive(Debug, Clone)]
pub struct Read {
    /// When it was sent, since the campaign's start.
    pub sent: Duration,
    /// How long until the answer (or the time-out).
    pub took: Duration,
    /// The client's device ids it saw, or why it failed.
    pub seen: Result<Seen, String>,
}

/// The ids one read saw, kept small: a read of every device every 100 ms for an hour is
/// 36,000 sets. The client's ids are `c<n>`: their numbers, sorted; any other id as it came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    numbers: Vec<u64>,
    other: Vec<String>,
}

impl Seen {
    /// The number of a `c<n>` id written the way the client writes it.
    fn number(id: &str) -> Option<u64> {
        let digits = id.strip_prefix('c')?;
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits.len() == 1 || !digits.starts_with('0'));
        canonical.then(|| digits.parse().ok()).flatten()
    }

    /// Whether the read saw `id`.
    pub fn contains(&self, id: &str) -> bool {
        match Self::number(id) {
            Some(n) => self.numbers.binary_search(&n).is_ok(),
            None => self.other.iter().any(|o| o == id),
        }
    }

    /// The ids it saw.
    pub fn iter(&self) -> impl Iterator<Item = String> + '_ {
        self.numbers
            .iter()
            .map(|n| format!("c{n}"))
            .chain(self.other.iter().cloned())
    }
}

impl FromIterator<String> for Seen {
    fn from_iter<I: IntoIterator<Item = String>>(ids: I) -> Self {
        let mut seen = Seen::default();
        for id in ids {
            match Seen::number(&id) {
                Some(n) => seen.numbers.push(n),
                None => seen.other.push(id),
            }
        }
        seen.numbers.sort_unstable();
        seen.numbers.dedup();
        seen.other.sort();
        seen.other.dedup();
        seen.numbers.shrink_to_fit();
        seen
    }
}

/// What a write heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    /// Acknowledged: committed and applied.
    Acked,
    /// Refused with this reason (it may or may not have been applied).
    Refused(String),
    /// No answer in time (it may or may not have been applied).
    TimedOut,
}

/// Writes the config of node `id` on lab host `host` (0-based), with the campaign's VIP and
/// its data in `data_dir`; returns the file.
fn node_config(
    lab: &Lab,
    pki: &std::path::Path,
    host: usize,
    id: u64,
    vip: Ipv4Addr,
    data_dir: PathBuf,
    settings: &ChaosSettings,
) -> Result<PathBuf> {
    let mut raft = RaftTimings::default();
    if let Some(n) = settings.snapshot_after_logs {
        raft.snapshot_after_logs = n;
    }
    let mut cfg = crate::node_config(lab.dir(), pki, id, raft);
    cfg.listen = SocketAddr::new(IpAddr::V4(lab.hosts()[host].ip), NODE_PORT);
    cfg.takeover = TakeoverMode::Netlink;
    cfg.roles = vec!["ha".into(), "app".into()];
    cfg.data_dir = data_dir;
    cfg.nice = settings.nice;
    cfg.vips = vec![VipSection {
        name: "front".into(),
        address: format!("{vip}/24"),
        interface: "eth0".into(),
        roles: vec!["ha".into()],
        port: None,
    }];
    if settings.balancer {
        cfg.lb = Some(spaced_node::ops::config::LbSection {
            health_interval_ms: 500,
            ..spaced_node::ops::config::LbSection::new(
                "front",
                vec![spaced_node::ops::config::LbPort {
                    listen: LB_PORT,
                    backend: APP_PORT,
                }],
            )
        });
    }
    std::fs::write(&cfg.source, cfg.to_toml())?;
    Ok(cfg.source)
}

/// A running cluster in the lab and its client.
pub struct Chaos {
    /// The nodes' data dirs (first: unmounted before the lab goes).
    disks: Vec<SmallDisk>,
    lab: Lab,
    pki: PathBuf,
    configs: Vec<PathBuf>,
    procs: Vec<LabProcess>,
    vip: Ipv4Addr,
    settings: ChaosSettings,
    start: Instant,
    writes: Arc<Mutex<Vec<Write>>>,
    reads: Arc<Mutex<Vec<Read>>>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    /// The node the last membership change added on the spare host (the lab's last), while it
    /// is there; the id a new one gets.
    spare: Option<Spare>,
    next_id: u64,
    /// Seconds the wall clock was set forward (back, negative) and not yet set back.
    clock_jumped: i64,
}

/// A node a membership change added on the spare host.
struct Spare {
    id: u64,
    proc: LabProcess,
}

impl Chaos {
    /// Builds the lab, starts the nodes with a VIP, joins them and starts the client's
    /// writes. `None`: no root and not CI (printed).
    pub fn start(settings: ChaosSettings) -> Result<Option<Chaos>> {
        // One host more than the nodes: the spare, where membership changes add a node.
        let Some(lab) = crate::lab::lab_or_skip(settings.nodes + 1)? else {
            return Ok(None);
        };
        let pki = lab.dir().join("pki");
        make_pki(&pki, settings.nodes as u64)?;
        let vip = lab.free_ip(1);
        let nodes = settings.nodes;
        let mut configs = Vec::new();
        let mut disks = Vec::new();
        for i in 0..settings.nodes {
            let disk = SmallDisk::mount(lab.dir().join(format!("disk-n{}", i + 1)), DATA_DISK)
                .context("a small disk for a node's data dir")?;
            let data = disk.path().join("data");
            let cfg = node_config(&lab, &pki, i, i as u64 + 1, vip, data, &settings)?;
            if settings.balancer {
                let host = &lab.hosts()[i];
                lab.serve_in(
                    &host.ns,
                    SocketAddr::new(IpAddr::V4(host.ip), APP_PORT),
                    format!("app-n{}", i + 1).into_bytes(),
                )?;
            }
            configs.push(cfg);
            disks.push(disk);
        }
        let mut chaos = Chaos {
            disks,
            lab,
            pki,
            configs,
            procs: Vec::new(),
            vip,
            settings,
            start: Instant::now(),
            writes: Arc::default(),
            reads: Arc::default(),
            stop: Arc::default(),
            writer: None,
            reader: None,
            spare: None,
            next_id: nodes as u64 + 1,
            clock_jumped: 0,
        };
        for i in 0..chaos.settings.nodes {
            let p = chaos.spawn(i, i == 0)?;
            chaos.procs.push(p);
        }
        let first = chaos.endpoint(0);
        crate::wait_until(Duration::from_secs(30), "n1 leads", || {
            Ok(chaos.leader().is_some_and(|l| l == 0))
        })?;
        for i in 1..chaos.settings.nodes {
            let id = (i + 1).to_string();
            let addr = chaos.endpoint(i);
            let name = format!("n{id}");
            chaos.ctl(
                &first,
                &["node", "add", "--id", &id, "--name", &name, "--addr", &addr],
            )?;
        }
        crate::wait_until(Duration::from_secs(30), "the VIP held by one host", || {
            Ok(chaos.vip_holders()?.len() == 1)
        })?;
        let mut add = vec![
            "service",
            "add",
            SINGLETON,
            "--scope",
            "singleton",
            "--roles",
        ];
        add.extend(["app", "--"]);
        add.extend(SINGLETON_ARGV);
        chaos.ctl(&first, &add)?;
        crate::wait_until(
            Duration::from_secs(30),
            "the singleton run by one host",
            || Ok(chaos.singleton_hosts()?.len() == 1),
        )?;
        chaos.start_writer()?;
        Ok(Some(chaos))
    }

    fn spawn(&self, i: usize, bootstrap: bool) -> Result<LabProcess> {
        self.spawn_config(i, &self.configs[i], bootstrap, &format!("n{}", i + 1))
    }

    /// Starts `spaced run --config CONFIG` on lab host `host`, its log named `log`.
    fn spawn_config(
        &self,
        host: usize,
        config: &std::path::Path,
        bootstrap: bool,
        log: &str,
    ) -> Result<LabProcess> {
        let config = config.to_str().context("config path")?.to_string();
        let mut args = vec!["run", "--config", config.as_str()];
        if bootstrap {
            args.push("--bootstrap");
        }
        let host = &self.lab.hosts()[host];
        self.lab.spawn_in(&host.ns, &binary("spaced")?, &args, log)
    }

    /// `host:port` of node `i` (0-based).
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}:{NODE_PORT}", self.lab.hosts()[i].ip)
    }

    /// Keeps the lab's directory (node logs, configs) when it is dropped, and says where.
    pub fn keep_logs(&self) {
        self.lab.keep_logs();
    }

    /// Runs spacectl against `endpoint` from the client namespace, giving up after
    /// [`CTL_WITHIN`]: a call to a faulted node must not hold the campaign (and the fault) up.
    pub fn ctl(&self, endpoint: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self
            .lab
            .command_in(&self.lab.client().ns, binary("spacectl")?);
        cmd.env("SPACED_ENDPOINT", endpoint)
            .env("SPACED_PKI", &self.pki)
            .env("SPACED_COMMAND_TIMEOUT", CTL_WITHIN.as_secs().to_string());
        crate::spacectl_stdout(cmd, args)
    }

    /// The lab host (0-based) of the leader that a node answering `status` names (a node the
    /// membership changes added, whatever its id, is on the spare host).
    pub fn leader(&self) -> Option<usize> {
        (0..self.settings.nodes).find_map(|i| {
            let s = self.ctl(&self.endpoint(i), &["status", "--json"]).ok()?;
            let v: serde_json::Value = serde_json::from_str(&s).ok()?;
            let id = v["leader"].as_u64().filter(|l| *l > 0)? as usize;
            Some(if id <= self.settings.nodes {
                id - 1
            } else {
                self.settings.nodes
            })
        })
    }

    /// The hosts (0-based) holding the VIP now.
    pub fn vip_holders(&self) -> Result<Vec<usize>> {
        let mut holders = Vec::new();
        for (i, h) in self.lab.hosts().iter().enumerate() {
            if self.lab.addresses(&h.ns)?.contains(&IpAddr::V4(self.vip)) {
                holders.push(i);
            }
        }
        Ok(holders)
    }

    /// What the hosts and the nodes say now: who holds the VIP and runs the singleton, the
    /// last acknowledged write, and each member's leader, VIPs and singletons.
    fn diagnosis(&self) -> String {
        let last_ack = lock(&self.writes)
            .iter()
            .filter(|w| w.result == WriteResult::Acked)
            .map(|w| w.sent + w.took)
            .max();
        let mut out = format!(
            "VIP on hosts {:?}, singleton on {:?}, last write acknowledged at {:?} (now {:?})",
            self.vip_holders().unwrap_or_default(),
            self.singleton_hosts().unwrap_or_default(),
            last_ack,
            self.start.elapsed()
        );
        let hosts = self.settings.nodes + usize::from(self.spare.is_some());
        for i in 0..hosts {
            let e = self.endpoint(i);
            let get = |args: &[&str]| -> String {
                match self.ctl(&e, args) {
                    Ok(o) => o.split_whitespace().collect::<Vec<_>>().join(" "),
                    Err(err) => format!("<{err:#}>"),
                }
            };
            let status = get(&["status", "--json"]);
            let leader = serde_json::from_str::<serde_json::Value>(&status)
                .map(|v| format!("leader {} term {}", v["leader"], v["term"]))
                .unwrap_or(status);
            out += &format!(
                "\n    host {}: {leader}; vips {}; singletons {}",
                i + 1,
                get(&["vip", "list", "--json"]),
                get(&["singleton", "list", "--json"])
            );
        }
        out
    }

    /// The hosts (by namespace) running the singleton's process now.
    pub fn singleton_hosts(&self) -> Result<Vec<String>> {
        hosts_running(&self.lab.host_namespaces(), &SINGLETON_ARGV)
    }

    /// Samples every host's singleton processes every 5 ms.
    fn watch_singleton(&self) -> Result<ProcessWatch> {
        ProcessWatch::start(
            &self.lab.host_namespaces(),
            &SINGLETON_ARGV,
            Duration::from_millis(5),
        )
    }

    /// Samples every host's hold on the VIP every 2 ms.
    fn watch_vip(&self) -> Result<AddressWatch> {
        AddressWatch::start(
            &self.lab,
            &self.lab.host_namespaces(),
            IpAddr::V4(self.vip),
            Duration::from_millis(2),
        )
    }

    /// The lab directory (logs, configs).
    pub fn dir(&self) -> &std::path::Path {
        self.lab.dir()
    }

    /// Starts the client: from the client namespace, one `AddDevices` of a fresh id every
    /// `write_every`, to the nodes in turn (following a redirect to the leader).
    fn start_writer(&mut self) -> Result<()> {
        let ns = self.lab.client().ns.clone();
        let endpoints: Vec<String> = (0..self.settings.nodes).map(|i| self.endpoint(i)).collect();
        let creds = AdminCredentials::load(&self.pki, None)?;
        let (writes, stop, every, churn, start) = (
            self.writes.clone(),
            self.stop.clone(),
            self.settings.write_every,
            self.settings.churn,
            self.start,
        );
        let reader_endpoints = endpoints.clone();
        let reader_creds = AdminCredentials::load(&self.pki, None)?;
        let handle = spawn_async_in(&ns, "chaos-writer", move || {
            write_loop(endpoints, creds, writes, stop, every, churn, start)
        })?;
        self.writer = Some(handle);
        let (reads, stop) = (self.reads.clone(), self.stop.clone());
        let handle = spawn_async_in(&ns, "chaos-reader", move || {
            read_loop(
                reader_endpoints,
                reader_creds,
                reads,
                stop,
                READ_EVERY,
                start,
            )
        })?;
        self.reader = Some(handle);
        Ok(())
    }

    /// Stops the client and returns every write and read it made.
    fn stop_writer(&mut self) -> (Vec<Write>, Vec<Read>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in [self.writer.take(), self.reader.take()]
            .into_iter()
            .flatten()
        {
            let _ = w.join();
        }
        (lock(&self.writes).clone(), lock(&self.reads).clone())
    }

    /// The node `target` names now; a leader or owner not known within 5 s (a cluster still
    /// settling from the last fault) gives way to a random node, said in the log.
    fn pick(&self, target: Target, rng: &mut Rng) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = match target {
                Target::Leader => self.leader().filter(|i| *i < self.settings.nodes),
                // The spare host's node is not one the faults hit.
                Target::Owner => self
                    .vip_holders()?
                    .into_iter()
                    .find(|i| *i < self.settings.nodes),
                Target::Any => None,
            };
            if let Some(i) = found {
                return Ok(i);
            }
            if target == Target::Any || Instant::now() > deadline {
                if target != Target::Any {
                    println!("  no {target:?} known within 5 s: hitting a random node");
                }
                return Ok(rng.below(self.settings.nodes as u64) as usize);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Applies `fault`; returns what undoes it and the node it hit.
    fn apply(&mut self, fault: &Fault, rng: &mut Rng) -> Result<(Heal, Option<usize>)> {
        let mut heal = Heal::default();
        let hit = match fault {
            Fault::Kill(t) | Fault::KillGroup(t) | Fault::Restart(t) => {
                let i = self.pick(*t, rng)?;
                let p = &self.procs[i];
                match fault {
                    Fault::Kill(_) => p.signal(Signal::SIGKILL)?,
                    Fault::KillGroup(_) => p.signal_group(Signal::SIGKILL)?,
                    _ => {
                        p.signal(Signal::SIGTERM)?;
                        p.wait(Duration::from_secs(10))?;
                    }
                }
                heal.respawn.push(i);
                Some(i)
            }
            Fault::Stop(t) => {
                let i = self.pick(*t, rng)?;
                self.procs[i].signal_group(Signal::SIGSTOP)?;
                heal.resume.push(i);
                Some(i)
            }
            Fault::LinkDown(t) => {
                let i = self.pick(*t, rng)?;
                self.lab.host_eth_down(&self.lab.hosts()[i].clone())?;
                heal.links.push(i);
                Some(i)
            }
            Fault::Partition(t) => {
                let i = self.pick(*t, rng)?;
                self.lab.partition(&self.lab.hosts()[i].clone())?;
                heal.partitioned.push(i);
                Some(i)
            }
            Fault::PartitionMajority => {
                let keep = rng.below(self.settings.nodes as u64) as usize;
                for i in (0..self.settings.nodes).filter(|i| *i != keep) {
                    self.lab.partition(&self.lab.hosts()[i].clone())?;
                    heal.partitioned.push(i);
                }
                None
            }
            Fault::OneWay(t, way) => {
                let i = self.pick(*t, rng)?;
                self.lab.cut_one_way(&self.lab.hosts()[i].clone(), *way)?;
                heal.one_way.push((i, *way));
                Some(i)
            }
            Fault::ClockJump(secs) => {
                jump_wall_clock(*secs)?;
                self.clock_jumped += secs;
                heal.clock = *secs;
                None
            }
            Fault::DiskFull(t) => {
                let i = self.pick(*t, rng)?;
                let stops = raft_stops(&self.procs[i]);
                self.disks[i].fill()?;
                heal.disks.push((i, stops));
                Some(i)
            }
            Fault::Membership(during) => {
                let (heal, hit) = self.apply(during, rng)?;
                self.change_membership()?;
                return Ok((heal, hit));
            }
            Fault::TransferLeader => {
                let leader = self.leader().context("no leader to transfer from")?;
                let to = (leader + 1 + rng.below(self.settings.nodes as u64 - 1) as usize)
                    % self.settings.nodes;
                let name = format!("n{}", to + 1);
                // A transfer the cluster does not carry out in time (a busy target) is a fault
                // that did not take, not a broken campaign.
                if let Err(e) = self.ctl(
                    &self.endpoint(leader),
                    &["leader", "transfer", "--to", &name],
                ) {
                    println!("  leader transfer to {name} not carried out: {e:#}");
                }
                Some(to)
            }
        };
        Ok((heal, hit))
    }

    /// Adds a node (a new id) on the spare host, or removes the one added before. A change the
    /// cluster refuses or does not finish in time is said in the log, not a broken campaign;
    /// whether the node is a member is read back from the cluster, not assumed.
    fn change_membership(&mut self) -> Result<()> {
        let endpoint = self
            .leader()
            .map_or_else(|| self.endpoint(0), |l| self.endpoint(l));
        let spare_host = self.settings.nodes;
        match self.spare.take() {
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let name = format!("n{id}");
                spaced_raft::pki::issue(&self.pki, &name, false)?;
                let data = self.lab.dir().join(format!("data-{name}"));
                let config = node_config(
                    &self.lab,
                    &self.pki,
                    spare_host,
                    id,
                    self.vip,
                    data,
                    &self.settings,
                )?;
                let proc = self.spawn_config(spare_host, &config, false, &name)?;
                let addr = format!("{}:{NODE_PORT}", self.lab.hosts()[spare_host].ip);
                let id_s = id.to_string();
                let args = [
                    "node", "add", "--id", &id_s, "--name", &name, "--addr", &addr,
                ];
                match self.ctl(&endpoint, &args) {
                    Ok(_) => println!("  {name} added on the spare host"),
                    Err(e) => println!("  adding {name} not carried out: {e:#}"),
                }
                self.spare = Some(Spare { id, proc });
            }
            Some(spare) => {
                let name = format!("n{}", spare.id);
                let removed = match self.ctl(&endpoint, &["node", "remove", &spare.id.to_string()])
                {
                    Ok(_) => {
                        println!("  {name} removed");
                        true
                    }
                    Err(e) => {
                        let member = self.member_ids().is_ok_and(|m| m.contains(&spare.id));
                        println!(
                            "  removing {name} not carried out ({}): {e:#}",
                            if member {
                                "still a member"
                            } else {
                                "not a member"
                            }
                        );
                        !member
                    }
                };
                if removed {
                    spare.proc.signal(Signal::SIGTERM)?;
                    if spare.proc.wait(Duration::from_secs(10))?.is_none() {
                        let _ = spare.proc.kill();
                    }
                } else {
                    self.spare = Some(spare);
                }
            }
        }
        Ok(())
    }

    /// The node ids the cluster lists as members now (asked of the original nodes in turn).
    fn member_ids(&self) -> Result<BTreeSet<u64>> {
        let mut last = None;
        for i in 0..self.settings.nodes {
            match self.ctl(&self.endpoint(i), &["node", "list", "--json"]) {
                Ok(out) => {
                    let rows: serde_json::Value = serde_json::from_str(&out)?;
                    return Ok(rows
                        .as_array()
                        .context("node list is not an array")?
                        .iter()
                        .filter_map(|r| r["id"].as_u64())
                        .collect());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node to ask")))
    }

    /// Undoes a fault.
    fn heal(&mut self, heal: Heal) -> Result<()> {
        if heal.clock != 0 {
            jump_wall_clock(-heal.clock)?;
            self.clock_jumped -= heal.clock;
        }
        for (i, way) in heal.one_way {
            self.lab.heal_one_way(&self.lab.hosts()[i].clone(), way)?;
        }
        for (i, stops) in heal.disks {
            self.disks[i].free()?;
            // A store that hit the full disk stopped Raft and fenced; the node says to free
            // the disk and restart it, as an operator would.
            if raft_stops(&self.procs[i]) > stops {
                println!(
                    "  n{}'s store stopped on the full disk: restarting it",
                    i + 1
                );
                self.procs[i].signal(Signal::SIGTERM)?;
                if self.procs[i].wait(Duration::from_secs(10))?.is_none() {
                    let _ = self.procs[i].kill();
                }
                self.procs[i] = self.spawn(i, false)?;
            }
        }
        for i in heal.partitioned {
            self.lab.heal(&self.lab.hosts()[i].clone())?;
        }
        for i in heal.links {
            self.lab.host_eth_up(&self.lab.hosts()[i].clone())?;
        }
        for i in heal.resume {
            self.procs[i].signal_group(Signal::SIGCONT)?;
        }
        for i in heal.respawn {
            // Reaps what is left of the old process first.
            let _ = self.procs[i].kill();
            self.procs[i] = self.spawn(i, false)?;
        }
        Ok(())
    }

    /// Every acknowledged-or-not device id each node holds now.
    fn devices_on(&self, i: usize) -> Result<BTreeSet<String>> {
        let out = self.ctl(&self.endpoint(i), &["device", "list", "--json"])?;
        let rows: serde_json::Value = serde_json::from_str(&out)?;
        Ok(rows
            .as_array()
            .context("device list is not an array")?
            .iter()
            .filter_map(|r| r["id"].as_str().map(str::to_string))
            .collect())
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in [self.writer.take(), self.reader.take()]
            .into_iter()
            .flatten()
        {
            let _ = w.join();
        }
        // SIGCONT whatever a failed fault left stopped, so that the lab's kill reaps it.
        for p in &self.procs {
            let _ = p.signal_group(Signal::SIGCONT);
        }
        // The wall clock is the machine's: never leave it off.
        if self.clock_jumped != 0 {
            let _ = jump_wall_clock(-self.clock_jumped);
        }
    }
}

/// What undoes a fault.
#[derive(Debug, Default)]
struct Heal {
    respawn: Vec<usize>,
    resume: Vec<usize>,
    links: Vec<usize>,
    partitioned: Vec<usize>,
    one_way: Vec<(usize, Oneway)>,
    /// Seconds the wall clock was set forward (negative: back).
    clock: i64,
    /// Full disks: the node, and how often its log had said Raft stopped before.
    disks: Vec<(usize, usize)>,
}

/// How often a node's log says its Raft stopped on a fatal (store) error.
fn raft_stops(p: &LabProcess) -> usize {
    p.read_log().matches("raft stopped: fencing").count()
}

/// Sets CLOCK_REALTIME `secs` seconds forward (back, negative): the machine's one wall clock.
fn jump_wall_clock(secs: i64) -> Result<()> {
    use nix::time::{ClockId, clock_gettime, clock_settime};
    let now = clock_gettime(ClockId::CLOCK_REALTIME).context("reading the wall clock")?;
    let to = nix::sys::time::TimeSpec::new(now.tv_sec() + secs, now.tv_nsec());
    clock_settime(ClockId::CLOCK_REALTIME, to).context("setting the wall clock")?;
    Ok(())
}

async fn write_loop(
    endpoints: Vec<String>,
    creds: AdminCredentials,
    writes: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    every: Duration,
    churn: Option<usize>,
    start: Instant,
) {
    let mut seq = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let creds = Arc::new(creds);
    let mut running = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // Writes go out on schedule, each on its own: one that waits on a dead node does not
        // hold back the others (the history is about the cluster, not one client's queue).
        let id = format!("c{seq}");
        let endpoint = endpoints[seq % endpoints.len()].clone();
        let device = NewDevice {
            id: id.clone(),
            addr: unreachable_device_addr(seq),
            mode: DeviceMode::SpaceInitiated,
        };
        let expired = churn
            .and_then(|w| seq.checked_sub(w))
            .map(|old| format!("c{old}"))
            // Only a device whose add was acknowledged is removed: the history then says for
            // every id whether it must be there at the end.
            .filter(|old| {
                lock(&writes)
                    .iter()
                    .rev()
                    .any(|w| w.id == *old && w.op == Op::Add && w.result == WriteResult::Acked)
            });
        seq += 1;
        let add = AdminRequest::AddDevices(vec![device]);
        running.spawn(timed_write(
            endpoint.clone(),
            creds.clone(),
            writes.clone(),
            start,
            id,
            Op::Add,
            add,
        ));
        if let Some(old) = expired {
            let remove = AdminRequest::Write(Command::RemoveDevice { id: old.clone() });
            running.spawn(timed_write(
                endpoint,
                creds.clone(),
                writes.clone(),
                start,
                old,
                Op::Remove,
                remove,
            ));
        }
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// Sends one write through `endpoint` (following a redirect to the leader) and records it.
async fn timed_write(
    endpoint: String,
    creds: Arc<AdminCredentials>,
    writes: Arc<Mutex<Vec<Write>>>,
    start: Instant,
    id: String,
    op: Op,
    req: AdminRequest,
) {
    let sent = Instant::now();
    let call = async {
        let mut c = AdminClient::connect(&endpoint, &creds)
            .await
            .map_err(|e| e.to_string())?;
        let reply = c.call_leader(&req).await;
        c.close().await;
        reply.map_err(|e| e.to_string())
    };
    let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(AdminReply::Applied(_))) => WriteResult::Acked,
        Ok(Ok(other)) => WriteResult::Refused(format!("{other:?}")),
        Ok(Err(e)) => WriteResult::Refused(e),
        Err(_) => WriteResult::TimedOut,
    };
    lock(&writes).push(Write {
        id,
        op,
        sent: sent.duration_since(start),
        took: sent.elapsed(),
        result,
    });
}

/// The reader: one linearizable read of every device at a time, every `every`, through the
/// nodes in turn (following a redirect to the leader).
async fn read_loop(
    endpoints: Vec<String>,
    creds: AdminCredentials,
    reads: Arc<Mutex<Vec<Read>>>,
    stop: Arc<AtomicBool>,
    every: Duration,
    start: Instant,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let endpoint = &endpoints[n % endpoints.len()];
        n += 1;
        let sent = Instant::now();
        let call = async {
            let mut c = AdminClient::connect(endpoint, &creds)
                .await
                .map_err(|e| e.to_string())?;
            let reply = c.call_leader(&AdminRequest::ReadDevices).await;
            c.close().await;
            match reply.map_err(|e| e.to_string())? {
                AdminReply::Devices(rows) => Ok(rows
                    .into_iter()
                    .map(|r| r.id)
                    .filter(|id| id.starts_with('c'))
                    .collect()),
                other => Err(format!("{other:?}")),
            }
        };
        let seen = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        lock(&reads).push(Read {
            sent: sent.duration_since(start),
            took: sent.elapsed(),
            seen,
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How one fault went.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The fault.
    pub fault: Fault,
    /// The node it hit (0-based), where it hit one.
    pub hit: Option<usize>,
    /// When it began and when it was healed, since the campaign's start.
    pub began: Duration,
    /// Healed.
    pub healed: Duration,
    /// From the heal until the VIP was held by one host and a write sent after the heal was
    /// acknowledged; `None`: not within the bound.
    pub recovered_in: Option<Duration>,
    /// The quiet window after the recovery (the VIP must not move in it).
    pub quiet: (Duration, Duration),
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Campaign {
    /// Every fault's outcome.
    pub outcomes: Vec<Outcome>,
    /// Every write.
    pub writes: Vec<Write>,
    /// Every linearizable read.
    pub reads: Vec<Read>,
    /// What the read checker found wrong with them ([`check_reads`]).
    pub read_violations: Vec<String>,
    /// What the VIP watch saw (its times on the campaign's clock).
    pub watch: WatchReport,
    /// Acknowledged writes some node does not reflect at the end (an added device missing, or
    /// a removed one still there): (node, ids).
    pub lost: Vec<(usize, Vec<String>)>,
    /// Devices a node holds that the client never wrote.
    pub phantoms: Vec<String>,
    /// Owner changes in quiet windows: the VIP came up on another host than the one that
    /// last held it, with no fault active (when, holders before, holders after).
    pub flaps: Vec<(Duration, Vec<String>, Vec<String>)>,
    /// Outages in quiet windows that ended on the same host (the fence guard removed the
    /// address of a daemon starved of CPU, which took it up again): (when, how long).
    pub blips: Vec<(Duration, Duration)>,
    /// What the singleton's process watch saw (its times on the campaign's clock).
    pub singleton: WatchReport,
    /// The singleton's owner changes in quiet windows, as `flaps` for the VIP.
    pub singleton_flaps: Vec<(Duration, Vec<String>, Vec<String>)>,
    /// Failed faults (could not be applied; the run stopped there).
    pub aborted: Option<String>,
}

/// The wall clock now as the node logs print it (UTC `HH:MM:SS.mmm`): the campaign jumps that
/// clock, so its lines say both clocks to line the node logs up with the faults.
fn wall_clock_now() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = since.as_secs() % 86_400;
    format!(
        "wall {:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_millis()
    )
}

/// A random fault whose kind contains `only` (any fault if `None`); an error if no kind of
/// the mix does.
pub fn draw_fault(rng: &mut Rng, only: Option<&str>) -> Result<Fault> {
    let Some(only) = only else {
        return Ok(Fault::random(rng));
    };
    // The rarest kind (a membership change beside one given kind) is about 1 draw in 400.
    for _ in 0..100_000 {
        let fault = Fault::random(rng);
        if fault.kind().contains(only) {
            return Ok(fault);
        }
    }
    bail!(
        "--only {only:?}: no kind of fault contains it (the kinds are as the report's table names them)"
    )
}

/// Runs `faults` random faults from `seed`, each held for 0.3–3 s, and checks the history.
pub fn campaign(chaos: &mut Chaos, seed: u64, faults: usize) -> Result<Campaign> {
    let mut rng = Rng::new(seed);
    // The watch times its samples from its own start: this puts them on the campaign's clock.
    let watch_offset = chaos.start.elapsed();
    let watch = chaos.watch_vip()?;
    let singleton_offset = chaos.start.elapsed();
    let singleton_watch = chaos.watch_singleton()?;
    let mut outcomes = Vec::new();
    let mut aborted = None;
    for n in 0..faults {
        let fault = draw_fault(&mut rng, chaos.settings.only.as_deref())?;
        let hold = Duration::from_millis(300 + rng.below(2700));
        let began = chaos.start.elapsed();
        let began_wall = wall_clock_now();
        let (heal, hit) = match chaos.apply(&fault, &mut rng) {
            Ok(h) => h,
            Err(e) => {
                aborted = Some(format!("fault {n} ({}): {e:#}", fault.kind()));
                break;
            }
        };
        // A membership change waits for its `spacectl` calls with the inner fault applied:
        // that time counts too (the fault is held from `began` to the heal).
        let applying = chaos.start.elapsed().saturating_sub(began);
        let inner = match &fault {
            Fault::Membership(during) => format!(" [inner fault: {}]", during.kind()),
            _ => String::new(),
        };
        println!(
            "fault {n}: {}{}{inner} for {} ms after {} ms applying it, from {:.3} s ({began_wall})",
            fault.kind(),
            hit.map_or(String::new(), |i| format!(" (n{})", i + 1)),
            hold.as_millis(),
            applying.as_millis(),
            began.as_secs_f64(),
        );
        std::thread::sleep(hold);
        chaos.heal(heal)?;
        let healed = chaos.start.elapsed();
        println!(
            "  healed at {:.3} s ({})",
            healed.as_secs_f64(),
            wall_clock_now()
        );
        let recovered_in = recover(chaos, healed, RECOVERY_BOUND);
        if recovered_in.is_none() {
            // For the record: what the cluster says, and whether it recovers at all later.
            println!(
                "  not recovered within {RECOVERY_BOUND:?}: {}",
                chaos.diagnosis()
            );
            let late = recover(chaos, healed, RECOVERY_BOUND * 5);
            println!(
                "  {}; then: {}",
                late.map_or("not recovered within 150 s either".into(), |d| format!(
                    "recovered {} ms after the heal",
                    d.as_millis()
                )),
                chaos.diagnosis()
            );
        }
        let quiet_from = chaos.start.elapsed();
        std::thread::sleep(QUIET);
        let quiet = (quiet_from, chaos.start.elapsed());
        println!(
            "  recovered {} after the heal",
            recovered_in.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
        );
        let failed = recovered_in.is_none();
        outcomes.push(Outcome {
            fault,
            hit,
            began,
            healed,
            recovered_in,
            quiet,
        });
        if failed {
            break;
        }
    }
    let (writes, reads) = chaos.stop_writer();
    let shift = |mut report: WatchReport, offset: Duration| {
        for (at, _) in report
            .overlaps
            .iter_mut()
            .chain(report.holders_over_time.iter_mut())
        {
            *at += offset;
        }
        report
    };
    let watch = shift(watch.stop(), watch_offset);
    let singleton = shift(singleton_watch.stop(), singleton_offset);
    // The nodes to check: the original ones, and the spare host's while it is a member.
    let mut checked: Vec<usize> = (0..chaos.settings.nodes).collect();
    if let Some(spare) = &chaos.spare
        && chaos.member_ids().is_ok_and(|m| m.contains(&spare.id))
    {
        checked.push(chaos.settings.nodes);
    }
    // Every node must hold every acknowledged add not removed since, and none whose removal
    // was acknowledged, once it has caught up.
    let history = History::of(&writes);
    let mut lost = Vec::new();
    let mut phantoms = BTreeSet::new();
    for i in checked {
        let deadline = Instant::now() + Duration::from_secs(30);
        let held = loop {
            let held = chaos.devices_on(i).unwrap_or_default();
            let caught_up =
                history.must_hold.is_subset(&held) && history.must_lack.is_disjoint(&held);
            if caught_up || Instant::now() > deadline {
                break held;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let missing: Vec<String> = history
            .must_hold
            .difference(&held)
            .chain(history.must_lack.intersection(&held))
            .cloned()
            .collect();
        if !missing.is_empty() {
            lost.push((i, missing));
        }
        phantoms.extend(
            held.iter()
                .filter(|id| id.starts_with('c') && !history.added.contains(*id))
                .cloned(),
        );
    }
    let read_violations = check_reads(&writes, &reads);
    let quiet = |at: Duration| in_quiet_window(&outcomes, at);
    let (flaps, blips) = flaps_and_blips(&watch.holders_over_time, quiet);
    let (singleton_flaps, _) = flaps_and_blips(&singleton.holders_over_time, quiet);
    Ok(Campaign {
        outcomes,
        writes,
        reads,
        read_violations,
        watch,
        lost,
        phantoms: phantoms.into_iter().collect(),
        flaps,
        blips,
        singleton,
        singleton_flaps,
        aborted,
    })
}

/// What the writes say the fabric must hold once every node has caught up.
struct History {
    /// Every id an add was sent for (acknowledged or not).
    added: BTreeSet<String>,
    /// Ids whose add was acknowledged and whose removal was never sent.
    must_hold: BTreeSet<String>,
    /// Ids whose removal was acknowledged.
    must_lack: BTreeSet<String>,
}

impl History {
    fn of(writes: &[Write]) -> History {
        let ids = |op: Op, acked: bool| -> BTreeSet<String> {
            writes
                .iter()
                .filter(|w| w.op == op && (!acked || w.result == WriteResult::Acked))
                .map(|w| w.id.clone())
                .collect()
        };
        let removal_sent = ids(Op::Remove, false);
        History {
            added: ids(Op::Add, false),
            must_hold: ids(Op::Add, true)
                .difference(&removal_sent)
                .cloned()
                .collect(),
            must_lack: ids(Op::Remove, true),
        }
    }
}

/// Checks the reads against the writes, over the unique ids (Elle-style: each id is added
/// once and removed at most once, so every read pins down which writes it saw). A
/// linearizable read, sent at `s` and answered at `d`, must
/// - hold every id whose add was acknowledged before `s`, unless its removal was sent
///   before `d` (a stale read otherwise);
/// - hold every id an earlier read (answered before `s`) saw, with the same exception: what
///   one read saw, no later read may lose (reads never go back in time);
/// - not hold an id whose removal was acknowledged before `s`;
/// - not hold an id whose add was sent after `d`, or never (a read from the future, or of
///   something never written).
///
/// Failed reads are skipped. One line per violation, at most 20.
pub fn check_reads(writes: &[Write], reads: &[Read]) -> Vec<String> {
    let mut add_sent: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut add_acked: Vec<(Duration, &str)> = Vec::new();
    let mut remove_sent: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut remove_acked: BTreeMap<&str, Duration> = BTreeMap::new();
    for w in writes {
        let acked = (w.result == WriteResult::Acked).then_some(w.sent + w.took);
        match w.op {
            Op::Add => {
                add_sent.insert(&w.id, w.sent);
                if let Some(at) = acked {
                    add_acked.push((at, &w.id));
                }
            }
            Op::Remove => {
                remove_sent.insert(&w.id, w.sent);
                if let Some(at) = acked {
                    remove_acked.insert(&w.id, at);
                }
            }
        }
    }
    add_acked.sort();
    let mut ok: Vec<(&Read, &Seen)> = reads
        .iter()
        .filter_map(|r| r.seen.as_ref().ok().map(|seen| (r, seen)))
        .collect();
    ok.sort_by_key(|(r, _)| r.sent);
    let removed_before = |id: &str, t: Duration| remove_sent.get(id).is_some_and(|at| *at < t);
    let mut v = Vec::new();
    // Ids some read must hold (acknowledged, or seen by an answered read), and since when.
    let mut required: BTreeMap<&str, String> = BTreeMap::new();
    let mut next_ack = 0;
    // Earlier reads not yet answered as of the current read's start (answered later).
    let mut pending: Vec<(Duration, usize)> = Vec::new();
    for (n, (r, seen)) in ok.iter().enumerate() {
        let done = r.sent + r.took;
        while next_ack < add_acked.len() && add_acked[next_ack].0 <= r.sent {
            let (at, id) = add_acked[next_ack];
            required
                .entry(id)
                .or_insert_with(|| format!("its add was acknowledged at {at:?}"));
            next_ack += 1;
        }
        pending.retain(|(answered, earlier)| {
            if *answered >= r.sent {
                return true;
            }
            for id in ok[*earlier].1.iter() {
                // An id never written has been reported with that read.
                if let Some((id, _)) = add_sent.get_key_value(id.as_str()) {
                    required
                        .entry(id)
                        .or_insert_with(|| format!("a read answered at {answered:?} saw it"));
                }
            }
            false
        });
        // A removal sent before this read began exempts the id from here on.
        required.retain(|id, _| !removed_before(id, r.sent));
        for (id, why) in &required {
            if !seen.contains(id) && !removed_before(id, done) {
                v.push(format!(
                    "the read sent at {:?} (answered at {done:?}) lacks {id}: {why}",
                    r.sent
                ));
            }
        }
        for id in seen.iter() {
            match (add_sent.get(id.as_str()), remove_acked.get(id.as_str())) {
                (None, _) => v.push(format!(
                    "the read sent at {:?} saw {id}, which was never written",
                    r.sent
                )),
                (Some(at), _) if *at > done => v.push(format!(
                    "the read sent at {:?} (answered at {done:?}) saw {id}, added only at {at:?}",
                    r.sent
                )),
                (_, Some(at)) if *at < r.sent => v.push(format!(
                    "the read sent at {:?} saw {id}, whose removal was acknowledged at {at:?}",
                    r.sent
                )),
                _ => {}
            }
        }
        pending.push((done, n));
        if v.len() >= 20 {
            v.truncate(20);
            break;
        }
    }
    v
}

/// How long after `recover` saw the recovered holders the watches may still be recording
/// their arrival: a watch stamps a sample with the start of its round, and `recover` can see
/// the new holder a round (or, on a loaded machine, a few) before the watch does. Without this,
/// a recovery onto another host (the old owner was cut off and fenced itself) read as a flap.
const WATCH_LAG: Duration = Duration::from_millis(100);

/// Whether `at` (campaign clock) is in a quiet window: after a fault healed, the cluster
/// recovered and the watches caught up with the recovery, and before the next fault.
fn in_quiet_window(outcomes: &[Outcome], at: Duration) -> bool {
    outcomes
        .iter()
        .any(|o| o.quiet.0 + WATCH_LAG < at && at <= o.quiet.1)
}

/// An owner's moves to other hosts (when, holders before, holders after) and its outages
/// that ended on the same holders (when, how long).
type OwnerChanges = (
    Vec<(Duration, Vec<String>, Vec<String>)>,
    Vec<(Duration, Duration)>,
);

/// Owner changes at a time `quiet` accepts (a flap: the holders came up other than the last
/// ones seen), and outages at such times that ended on the same holders.
fn flaps_and_blips(
    holders_over_time: &[(Duration, Vec<String>)],
    quiet: impl Fn(Duration) -> bool,
) -> OwnerChanges {
    let mut flaps = Vec::new();
    let mut blips = Vec::new();
    let mut last_holders: Vec<String> = Vec::new();
    let mut emptied: Option<Duration> = None;
    for w in holders_over_time.windows(2) {
        let (at, before, after) = (w[1].0, &w[0].1, &w[1].1);
        if !before.is_empty() {
            last_holders = before.clone();
        }
        if after.is_empty() {
            emptied = Some(at);
            continue;
        }
        if quiet(at) {
            if *after != last_holders {
                flaps.push((at, last_holders.clone(), after.clone()));
            } else if let Some(from) = emptied {
                blips.push((from, at.saturating_sub(from)));
            }
        }
        emptied = None;
    }
    (flaps, blips)
}

/// A soak's owner changes in words: the moves to another host (spurious failovers) and the
/// outages that ended on the same host, each with its time.
fn describe_changes((moves, blips): OwnerChanges) -> String {
    let mut out = format!(
        "{} move(s) to another host (spurious failovers), {} outage(s) that ended on the same host",
        moves.len(),
        blips.len()
    );
    for (at, from, to) in moves.iter().take(10) {
        out += &format!("; at {:.1} s {from:?} -> {to:?}", at.as_secs_f64());
    }
    for (at, took) in blips.iter().take(10) {
        out += &format!(
            "; at {:.1} s out for {} ms",
            at.as_secs_f64(),
            took.as_millis()
        );
    }
    out
}

/// Waits until the VIP is held by exactly one host, the singleton runs on exactly one, and a
/// write sent after `healed` was acknowledged; how long that took after the heal.
fn recover(chaos: &Chaos, healed: Duration, bound: Duration) -> Option<Duration> {
    let deadline = chaos.start + healed + bound;
    while Instant::now() < deadline {
        let one_holder = chaos.vip_holders().is_ok_and(|h| h.len() == 1)
            && chaos.singleton_hosts().is_ok_and(|h| h.len() == 1);
        let written = lock(&chaos.writes)
            .iter()
            .any(|w| w.sent >= healed && w.result == WriteResult::Acked);
        if one_holder && written {
            return Some(chaos.start.elapsed().saturating_sub(healed));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Campaign {
    /// Every violation found, described (empty: the run kept every promise).
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(a) = &self.aborted {
            v.push(format!("the campaign stopped: {a}"));
        }
        let during = |at: Duration| {
            self.outcomes
                .iter()
                .rev()
                .find(|o| o.began <= at)
                .map_or("before the first fault".into(), |o| o.fault.kind())
        };
        for (at, holders) in &self.watch.overlaps {
            v.push(format!(
                "at {at:?} {} held the VIP at once, during: {}",
                holders.join(" and "),
                during(*at)
            ));
        }
        for (at, hosts) in &self.singleton.overlaps {
            v.push(format!(
                "at {at:?} {} ran the singleton at once, during: {}",
                hosts.join(" and "),
                during(*at)
            ));
        }
        for (at, from, to) in &self.singleton_flaps {
            v.push(format!(
                "at {at:?} the singleton moved from {from:?} to {to:?} with no fault active (after: {})",
                during(*at)
            ));
        }
        for (node, ids) in &self.lost {
            v.push(format!(
                "n{} lacks {} acknowledged write(s), e.g. {:?}",
                node + 1,
                ids.len(),
                &ids[..ids.len().min(5)]
            ));
        }
        v.extend(
            self.read_violations
                .iter()
                .map(|r| format!("linearizable reads: {r}")),
        );
        if !self.phantoms.is_empty() {
            v.push(format!(
                "devices read back that were never written: {:?}",
                self.phantoms
            ));
        }
        for (at, from, to) in &self.flaps {
            v.push(format!(
                "at {at:?} the VIP moved from {from:?} to {to:?} with no fault active (after: {})",
                during(*at)
            ));
        }
        for (i, o) in self.outcomes.iter().enumerate() {
            if o.recovered_in.is_none() {
                v.push(format!(
                    "fault {i} ({}) was not recovered from within {RECOVERY_BOUND:?}",
                    o.fault.kind()
                ));
            }
        }
        v
    }

    /// The longest time without an acknowledged write that overlaps each outcome, from the
    /// fault until its recovery.
    fn write_gaps(&self) -> Vec<Duration> {
        let acks: Vec<Duration> = self
            .writes
            .iter()
            .filter(|w| w.result == WriteResult::Acked)
            .map(|w| w.sent + w.took)
            .collect();
        self.outcomes
            .iter()
            .map(|o| {
                let end = o.healed + o.recovered_in.unwrap_or(RECOVERY_BOUND);
                let mut last = acks
                    .iter()
                    .rev()
                    .find(|a| **a <= o.began)
                    .copied()
                    .unwrap_or(o.began);
                let mut gap = Duration::ZERO;
                for a in acks.iter().filter(|a| **a > o.began && **a <= end) {
                    gap = gap.max(*a - last);
                    last = *a;
                }
                gap.max(end.saturating_sub(last))
            })
            .collect()
    }

    /// The summary table.
    pub fn summary(&self, seed: u64) -> String {
        let gaps = self.write_gaps();
        let mut kinds: BTreeMap<String, (usize, Duration, Duration)> = BTreeMap::new();
        for (o, gap) in self.outcomes.iter().zip(&gaps) {
            let e = kinds.entry(o.fault.kind()).or_default();
            e.0 += 1;
            e.1 = e.1.max(o.recovered_in.unwrap_or(RECOVERY_BOUND));
            e.2 = e.2.max(*gap);
        }
        let count =
            |r: fn(&WriteResult) -> bool| self.writes.iter().filter(|w| r(&w.result)).count();
        let acked = count(|r| *r == WriteResult::Acked);
        let removals = self.writes.iter().filter(|w| w.op == Op::Remove).count();
        let reads_ok = self.reads.iter().filter(|r| r.seen.is_ok()).count();
        let refused = count(|r| matches!(r, WriteResult::Refused(_)));
        let timed_out = count(|r| *r == WriteResult::TimedOut);
        let lost: usize = self
            .lost
            .iter()
            .map(|(_, ids)| ids.len())
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "seed {seed}: {} faults; {removals} of the writes remove a device (churn)\n",
            self.outcomes.len()
        );
        out += "| fault | count | longest recovery after the heal | longest time without an acknowledged write |\n|---|---|---|---|\n";
        for (k, (n, rec, gap)) in &kinds {
            out += &format!(
                "| {k} | {n} | {} ms | {} ms |\n",
                rec.as_millis(),
                gap.as_millis()
            );
        }
        out += &format!(
            "\nwrites: {} sent, {acked} acknowledged, {refused} refused, {timed_out} timed out; \
             acknowledged writes lost: {lost}; never-written devices read back: {}\n\
             linearizable reads: {} sent, {reads_ok} answered, {} violation(s)\n\
             VIP samples: {} rounds every 2 ms, {} with two holders; flaps (owner changes with no fault): {}; \
             outages with no fault that ended on the same host: {} (longest {} ms)\n\
             singleton samples: {} rounds every 5 ms, {} with two hosts running it; flaps: {}\n",
            self.writes.len(),
            self.phantoms.len(),
            self.reads.len(),
            self.read_violations.len(),
            self.watch.samples,
            self.watch.overlap_samples,
            self.flaps.len(),
            self.blips.len(),
            self.blips
                .iter()
                .map(|(_, d)| d.as_millis())
                .max()
                .unwrap_or(0),
            self.singleton.samples,
            self.singleton.overlap_samples,
            self.singleton_flaps.len(),
        );
        out
    }
}

/// Fails with the violations, if any, printing the summary either way.
pub fn check(chaos: &Chaos, campaign: &Campaign, seed: u64) -> Result<()> {
    println!("{}", campaign.summary(seed));
    let v = campaign.violations();
    if !v.is_empty() {
        chaos.lab.keep_logs();
        bail!(
            "{} violation(s) (replay with --seed {seed}; logs in {}):\n{}",
            v.len(),
            chaos.dir().display(),
            v.join("\n")
        );
    }
    Ok(())
}

/// One sample of a soak: each node's resident memory and open descriptors.
#[derive(Debug, Clone)]
pub struct SoakSample {
    /// Since the soak began.
    pub at: Duration,
    /// Resident set per node, KiB (`VmRSS`); 0 if it could not be read.
    pub rss_kib: Vec<u64>,
    /// Open file descriptors per node.
    pub fds: Vec<usize>,
}

/// What a soak saw.
#[derive(Debug)]
pub struct Soak {
    /// How long it ran.
    pub duration: Duration,
    /// Memory and descriptors over time.
    pub samples: Vec<SoakSample>,
    /// The client's writes.
    pub writes: Vec<Write>,
    /// The VIP watch (its times from its own start).
    pub watch: WatchReport,
    /// The singleton's process watch (its times from its own start).
    pub singleton: WatchReport,
    /// The CPU stress that ran beside it, as started; `None`: none.
    pub stress: Option<String>,
    /// What `spacectl check perf --json` reported of the commit load beside it, if one ran.
    pub load: Option<String>,
    /// Each connection through the balancer: how long its exchange took, or why it failed
    /// (empty without [`ChaosSettings::balancer`]).
    pub balanced: Vec<Result<Duration, String>>,
    /// Per node, the daemon's "async runtime stalled" warnings.
    pub stalls: Vec<Stalls>,
}

/// A daemon's "async runtime stalled" warnings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stalls {
    /// How many.
    pub count: usize,
    /// The longest lateness in milliseconds (its `late_ms` field).
    pub longest_ms: u64,
    /// How many of each `cause` the daemon gave (where its time went).
    pub causes: std::collections::BTreeMap<String, usize>,
    /// The cause given for the longest.
    pub longest_cause: Option<String>,
}

/// Reads the "async runtime stalled" warnings in a daemon's log, in the text or the JSON
/// format.
pub fn runtime_stalls(log: &str) -> Stalls {
    /// The digits after the first `field`.
    fn number(line: &str, field: &str) -> Option<u64> {
        let rest = line.split(field).nth(1)?;
        rest.trim_start_matches(|c: char| !c.is_ascii_digit())
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    }
    /// The quoted text after the first `field` (`cause="x"` or `"cause":"x"`).
    fn quoted(line: &str, field: &str) -> Option<String> {
        let rest = line
            .split(field)
            .nth(1)?
            .trim_start_matches(['"', '=', ':']);
        Some(rest[..rest.find('"')?].to_string())
    }
    let mut out = Stalls::default();
    for l in log.lines().filter(|l| l.contains("async runtime stalled")) {
        let late = number(l, "late_ms").unwrap_or(0);
        let cause = quoted(l, "cause");
        out.count += 1;
        if let Some(c) = &cause {
            *out.causes.entry(c.clone()).or_default() += 1;
        }
        if late >= out.longest_ms {
            out.longest_ms = late;
            out.longest_cause = cause;
        }
    }
    out
}

/// Connects to the balancer at `to` every [`LB_CONNECT_EVERY`], one connection at a time,
/// and reads the backend's whole answer, until `stop`; records each exchange's time or
/// failure in `out`.
async fn lb_client_loop(
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<Result<Duration, String>>>>,
) {
    use tokio::io::AsyncReadExt;
    let mut tick = tokio::time::interval(LB_CONNECT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let began = Instant::now();
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(to).await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let result = match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(Ok(a)) if a.starts_with(b"app-n") => Ok(began.elapsed()),
            Ok(Ok(a)) => Err(format!("answer {:?}", String::from_utf8_lossy(&a))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        };
        lock(&out).push(result);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Keeps the cluster under the client's steady load (start it with `churn`) and, with
/// `stress`, every core busy with `stress-ng --cpu`, for `duration`, no faults; samples every
/// node's memory and descriptors every `every`. The VIP must not move.
pub fn soak(
    chaos: &mut Chaos,
    duration: Duration,
    every: Duration,
    stress: bool,
    load_rate: Option<u32>,
) -> Result<Soak> {
    let watch = chaos.watch_vip()?;
    let singleton = chaos.watch_singleton()?;
    // Commits at a steady rate beside the writer: `spacectl check perf` from the client's
    // namespace, straight to the leader, for the whole soak.
    let load = match load_rate {
        None => None,
        Some(rate) => {
            let mut cmd = chaos
                .lab
                .command_in(&chaos.lab.client().ns, crate::binary("spacectl")?);
            cmd.args(["--endpoint", &chaos.endpoint(0), "--pki"])
                .arg(&chaos.pki)
                .args(["check", "perf", "--load", "l", "--rate", &rate.to_string()])
                // One client per 20 writes a second (etcdctl's `l`: 8,000/s by 500 clients).
                .args(["--clients", &(rate / 20).clamp(1, 500).to_string()])
                .args(["--duration", &duration.as_secs().to_string(), "--json"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            Some(cmd.spawn().context("starting spacectl check perf")?)
        }
    };
    let mut stressor = None;
    let mut stress_line = None;
    if stress {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let args = [
            "--cpu".to_string(),
            cpus.to_string(),
            "--timeout".into(),
            format!("{}s", duration.as_secs() + 5),
            "--quiet".into(),
        ];
        let child = std::process::Command::new("stress-ng")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting stress-ng (apt-get install stress-ng)")?;
        stress_line = Some(format!("stress-ng {}", args.join(" ")));
        stressor = Some(child);
    }
    // Connections through the balancer on the VIP, one at a time, from the client namespace.
    let lb_stop = Arc::new(AtomicBool::new(false));
    let balanced: Arc<Mutex<Vec<Result<Duration, String>>>> = Arc::default();
    let lb_client = if chaos.settings.balancer {
        let (stop, to) = (
            lb_stop.clone(),
            SocketAddr::new(IpAddr::V4(chaos.vip), LB_PORT),
        );
        let out = balanced.clone();
        Some(spawn_async_in(
            &chaos.lab.client().ns,
            "soak-lb-client",
            move || lb_client_loop(to, stop, out),
        )?)
    } else {
        None
    };
    let began = Instant::now();
    let sample = || SoakSample {
        at: began.elapsed(),
        rss_kib: chaos.procs.iter().map(|p| rss_kib(p.pid())).collect(),
        fds: chaos.procs.iter().map(|p| open_fds(p.pid())).collect(),
    };
    let mut samples = Vec::new();
    while began.elapsed() < duration {
        samples.push(sample());
        std::thread::sleep(every.min(duration.saturating_sub(began.elapsed())));
    }
    samples.push(sample());
    if let Some(mut s) = stressor {
        let _ = s.kill();
        let _ = s.wait();
    }
    let load = match load {
        None => None,
        Some(child) => {
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Some(if text.is_empty() {
                format!(
                    "spacectl check perf printed nothing ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            } else {
                text
            })
        }
    };
    lb_stop.store(true, Ordering::Relaxed);
    if let Some(h) = lb_client {
        let _ = h.join();
    }
    let balanced = lock(&balanced).clone();
    let (writes, _) = chaos.stop_writer();
    let stalls = chaos
        .procs
        .iter()
        .map(|p| runtime_stalls(&p.read_log()))
        .collect();
    Ok(Soak {
        stalls,
        duration: began.elapsed(),
        samples,
        writes,
        balanced,
        watch: watch.stop(),
        singleton: singleton.stop(),
        stress: stress_line,
        load,
    })
}

/// A watch's owner changes over a soak: every moment counts, since no fault ran.
fn unfaulted_changes(watch: &WatchReport) -> OwnerChanges {
    flaps_and_blips(&watch.holders_over_time, |_| true)
}

impl Soak {
    /// Spurious failovers of the VIP: it came up on another host with no fault.
    pub fn spurious_moves(&self) -> usize {
        unfaulted_changes(&self.watch).0.len()
    }

    /// Spurious moves of the singleton to another host.
    pub fn spurious_singleton_moves(&self) -> usize {
        unfaulted_changes(&self.singleton).0.len()
    }

    /// The summary: memory and descriptors at the start, the highest and at the end per node,
    /// write latencies, VIP moves.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "soak of {} s{}\n| node | RSS first / max / last (MiB) | fds first / max / last |\n|---|---|---|\n",
            self.duration.as_secs(),
            self.stress
                .as_ref()
                .map_or(String::new(), |s| format!(", beside `{s}`"))
        );
        let nodes = self.samples.first().map_or(0, |s| s.rss_kib.len());
        for i in 0..nodes {
            let rss: Vec<f64> = self
                .samples
                .iter()
                .map(|s| s.rss_kib[i] as f64 / 1024.0)
                .collect();
            let fds: Vec<usize> = self.samples.iter().map(|s| s.fds[i]).collect();
            let max = rss.iter().cloned().fold(0.0, f64::max);
            out += &format!(
                "| n{} | {:.1} / {:.1} / {:.1} | {} / {} / {} |\n",
                i + 1,
                rss[0],
                max,
                rss[rss.len() - 1],
                fds[0],
                fds.iter().max().copied().unwrap_or(0),
                fds[fds.len() - 1]
            );
        }
        // The trend: each node's RSS at every tenth of the soak (flat, or still growing).
        if self.samples.len() > 2 {
            out += "\nRSS (MiB) over time:\n| at | ";
            out += &(1..=nodes)
                .map(|i| format!("n{i}"))
                .collect::<Vec<_>>()
                .join(" | ");
            out += " |\n|---|";
            out += &"---|".repeat(nodes);
            out += "\n";
            let last = self.samples.len() - 1;
            let mut picked: Vec<usize> = (0..=10).map(|k| last * k / 10).collect();
            picked.dedup();
            for k in picked {
                let s = &self.samples[k];
                out += &format!("| {} s |", s.at.as_secs());
                for kib in &s.rss_kib {
                    out += &format!(" {:.1} |", *kib as f64 / 1024.0);
                }
                out += "\n";
            }
        }
        let mut took: Vec<u128> = self
            .writes
            .iter()
            .filter(|w| w.result == WriteResult::Acked)
            .map(|w| w.took.as_micros())
            .collect();
        took.sort_unstable();
        let pct = |p: f64| {
            took.get(((took.len().max(1) - 1) as f64 * p).round() as usize)
                .map_or("-".into(), |us| format!("{:.1} ms", *us as f64 / 1000.0))
        };
        let acked = took.len();
        out += &format!(
            "\nwrites: {} sent, {acked} acknowledged; acknowledged in (connect, write, close): p50 {}, p99 {}, max {}\n\
             VIP: {} samples, {} with two holders, {}\n\
             singleton: {} samples, {} with two hosts running it, {}\n",
            self.writes.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            self.watch.samples,
            self.watch.overlap_samples,
            describe_changes(unfaulted_changes(&self.watch)),
            self.singleton.samples,
            self.singleton.overlap_samples,
            describe_changes(unfaulted_changes(&self.singleton)),
        );
        out += &format!(
            "runtime stalls (\"async runtime stalled\" warnings, count / longest, causes): {}\n",
            self.stalls
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let causes = s
                        .causes
                        .iter()
                        .map(|(c, n)| format!("{n} {c}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let longest = s.longest_cause.as_deref().unwrap_or("no cause given");
                    format!(
                        "n{} {} / {} ms ({longest}){}",
                        i + 1,
                        s.count,
                        s.longest_ms,
                        if causes.is_empty() {
                            String::new()
                        } else {
                            format!("; {causes}")
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        if let Some(load) = &self.load {
            out += &format!("commit load (spacectl check perf --json): {load}\n");
        }
        if !self.balanced.is_empty() {
            let mut took: Vec<Duration> = self
                .balanced
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            took.sort_unstable();
            let pct = |p: f64| {
                took.get(((took.len().max(1) - 1) as f64 * p).round() as usize)
                    .map_or("-".into(), |d| {
                        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
                    })
            };
            let failed: Vec<&String> = self
                .balanced
                .iter()
                .filter_map(|r| r.as_ref().err())
                .collect();
            out += &format!(
                "balancer: {} connections through the VIP, {} failed{}; answered in p50 {}, p99 {}, max {}\n",
                self.balanced.len(),
                failed.len(),
                failed
                    .first()
                    .map_or(String::new(), |e| format!(" (first: {e})")),
                pct(0.5),
                pct(0.99),
                pct(1.0),
            );
        }
        out
    }

    /// Connections through the balancer that failed.
    pub fn balancer_failures(&self) -> usize {
        self.balanced.iter().filter(|r| r.is_err()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn only_draws_the_kind_asked_for_and_refuses_a_kind_that_is_not_there() {
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            let f = draw_fault(&mut rng, Some("(majority)")).expect("majority partitions exist");
            assert_eq!(f.kind(), "partition of all but one (majority)");
        }
        let kinds: BTreeSet<String> = (0..500)
            .map(|_| draw_fault(&mut rng, None).expect("any fault").kind())
            .collect();
        assert!(kinds.len() > 10, "the whole mix without --only: {kinds:?}");
        let e = draw_fault(&mut rng, Some("meteor strike")).expect_err("no such kind");
        assert!(e.to_string().contains("\"meteor strike\""), "{e}");
    }

    #[test]
    fn runtime_stalls_counts_the_warnings_and_keeps_the_longest() {
        let log = "2026-12-05T12:00:00Z  WARN spaced::ops::stall: async runtime stalled: a task ran 41 ms late late_ms=41 window_ms=260 cause=\"waiting for a CPU\"\n\
                   2026-12-05T12:00:01Z  INFO spaced::vip: renewed late_ms=900\n\
                   {\"level\":\"WARN\",\"fields\":{\"late_ms\":130,\"cause\":\"hypervisor steal\",\"message\":\"async runtime stalled: a task ran 130 ms late\"}}\n\
                   2026-12-05T12:00:02Z  WARN spaced::ops::stall: async runtime stalled: a task ran 35 ms late late_ms=35\n";
        let s = runtime_stalls(log);
        assert_eq!((s.count, s.longest_ms), (3, 130));
        assert_eq!(s.longest_cause.as_deref(), Some("hypervisor steal"));
        assert_eq!(
            s.causes.into_iter().collect::<Vec<_>>(),
            vec![
                ("hypervisor steal".to_string(), 1),
                ("waiting for a CPU".to_string(), 1)
            ]
        );
        assert_eq!(runtime_stalls("nothing here\n"), Stalls::default());
    }

    fn write(id: &str, op: Op, sent: u64, took: u64, acked: bool) -> Write {
        Write {
            id: id.into(),
            op,
            sent: ms(sent),
            took: ms(took),
            result: if acked {
                WriteResult::Acked
            } else {
                WriteResult::TimedOut
            },
        }
    }

    fn read(sent: u64, took: u64, ids: &[&str]) -> Read {
        Read {
            sent: ms(sent),
            took: ms(took),
            seen: Ok(ids.iter().map(|i| i.to_string()).collect()),
        }
    }

    #[test]
    fn a_recovery_onto_another_host_is_not_a_flap_but_a_later_move_is() {
        let outcome = Outcome {
            fault: Fault::Partition(Target::Leader),
            hit: Some(1),
            began: ms(1000),
            healed: ms(2000),
            recovered_in: Some(ms(500)),
            quiet: (ms(2500), ms(4000)),
        };
        let outcomes = [outcome];
        let h = |n: &str| vec![n.to_string()];
        // h2 held it, was cut off and fenced itself; h3 took it up as the cluster recovered:
        // `recover` saw h3 at 2,500 ms, the watch recorded it 3 ms later.
        let history = [
            (ms(0), h("h2")),
            (ms(1200), vec![]),
            (ms(2503), h("h3")),
            // Then h3 lost it and h1 took it, with no fault: a flap.
            (ms(3000), vec![]),
            (ms(3400), h("h1")),
        ];
        let (flaps, _) = flaps_and_blips(&history, |at| in_quiet_window(&outcomes, at));
        assert_eq!(flaps, vec![(ms(3400), h("h3"), h("h1"))]);
    }

    #[test]
    fn a_read_set_keeps_every_id_it_was_given() {
        let ids = ["c10", "c2", "c01", "x7", "c", "c2"];
        let seen: Seen = ids.iter().map(|i| i.to_string()).collect();
        for id in ids {
            assert!(seen.contains(id), "{id}");
        }
        for id in ["c1", "c02", "c3", "x", "7"] {
            assert!(!seen.contains(id), "{id}");
        }
        let back: Vec<String> = seen.iter().collect();
        assert_eq!(back, ["c2", "c10", "c", "c01", "x7"]);
    }

    #[test]
    fn reads_that_follow_the_writes_pass() {
        let writes = [
            write("c0", Op::Add, 0, 10, true),
            write("c1", Op::Add, 20, 10, false),
            write("c0", Op::Remove, 50, 10, true),
        ];
        let reads = [
            // Before c0's ack it may or may not be seen; c1 (not acknowledged) may show up.
            read(5, 2, &[]),
            read(12, 5, &["c0"]),
            read(25, 5, &["c0", "c1"]),
            // c0's removal in flight: either way.
            read(52, 2, &["c1"]),
            read(70, 2, &["c1"]),
            Read {
                sent: ms(80),
                took: ms(3000),
                seen: Err("timed out".into()),
            },
        ];
        assert_eq!(check_reads(&writes, &reads), Vec::<String>::new());
    }

    #[test]
    fn a_stale_read_is_caught() {
        let writes = [write("c0", Op::Add, 0, 10, true)];
        let v = check_reads(&writes, &[read(20, 5, &[])]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("lacks c0"), "{v:?}");
    }

    #[test]
    fn a_read_that_loses_what_an_earlier_read_saw_is_caught() {
        // c1 was never acknowledged, but once a read saw it, later reads must too.
        let writes = [write("c1", Op::Add, 0, 10, false)];
        let v = check_reads(&writes, &[read(20, 5, &["c1"]), read(30, 5, &[])]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("a read answered at 25ms saw it"), "{v:?}");
        // Overlapping reads are not ordered: the second began before the first was answered.
        assert!(check_reads(&writes, &[read(20, 15, &["c1"]), read(30, 5, &[])]).is_empty());
    }

    #[test]
    fn reads_of_removed_future_or_unwritten_ids_are_caught() {
        let writes = [
            write("c0", Op::Add, 0, 10, true),
            write("c0", Op::Remove, 20, 5, true),
            write("c1", Op::Add, 100, 10, true),
        ];
        let v = check_reads(&writes, &[read(30, 5, &["c0"])]);
        assert!(
            v.len() == 1 && v[0].contains("removal was acknowledged"),
            "{v:?}"
        );
        let v = check_reads(&writes, &[read(40, 5, &["c1"])]);
        assert!(v.len() == 1 && v[0].contains("added only at"), "{v:?}");
        let v = check_reads(&writes, &[read(40, 5, &["c9"])]);
        assert!(v.len() == 1 && v[0].contains("never written"), "{v:?}");
    }

    #[test]
    fn the_history_says_what_must_and_must_not_be_held() {
        let writes = [
            write("c0", Op::Add, 0, 10, true),
            write("c1", Op::Add, 0, 10, true),
            write("c1", Op::Remove, 20, 10, true),
            write("c2", Op::Add, 0, 10, true),
            // A removal that timed out: c2 may be held or not.
            write("c2", Op::Remove, 20, 10, false),
            write("c3", Op::Add, 0, 10, false),
        ];
        let h = History::of(&writes);
        let set = |ids: &[&str]| ids.iter().map(|i| i.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(h.must_hold, set(&["c0"]));
        assert_eq!(h.must_lack, set(&["c1"]));
        assert_eq!(h.added, set(&["c0", "c1", "c2", "c3"]));
    }
}
