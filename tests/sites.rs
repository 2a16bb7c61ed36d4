//! Two disaster-recovery sites in the network lab, and a nemesis for the link between them.
//!
//! ```text
//!   east: h1..hN ── bridge ─┐                    ┌─ bridge ── h1..hN :west
//!                           ├── router (blackhole rules cut a direction) ──┤
//!                           └─ bridge ── w1..wK witnesses ─────────────────┘
//! ```
//!
//! Each site is a lab of its own (bridge, /24, real `spaced` processes with their own CA and a
//! VIP on the site's subnet); the witnesses (`spaced witness`) sit in a third. A router joins
//! them, and the nemesis cuts the inter-site link one way or both, cuts a site from a subset of
//! the witnesses, and SIGSTOPs a site's leader or all of its daemons, in randomized, seeded
//! schedules. Meanwhile an
//! [`AddressWatch`] samples both sites' VIPs on every host every 2 ms, and a poller records each
//! site's role and epoch as its leader reports them. The checker: no sample with two holders
//! (two sites active, or two hosts of one), never two sites active at one epoch, epochs never
//! back, and after every schedule one site active again with its VIP served.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use spaced_fabric::SiteRole;
use spaced_node::admin::client::{AdminClient, AdminCredentials};
use spaced_node::admin::{AdminReply, AdminRequest, DrAction};
use spaced_node::ops::config::{RaftTimings, TakeoverMode, VipSection};
use spaced_replication::DrSection;

use crate::lab::{AddressWatch, Lab, LabProcess, Router, WatchReport};
use crate::{binary, make_pki, spacectl_stdout};

/// The two sites, in lab order: east starts active, west standby.
pub const SITES: [&str; 2] = ["east", "west"];
/// Raft/admin port of every node.
const NODE_PORT: u16 = 7000;
/// DR link port of every node.
const DR_PORT: u16 = 7100;
/// Witness port.
const WITNESS_PORT: u16 = 7200;

/// How the two sites are built.
#[derive(Debug, Clone)]
pub struct SitesSettings {
    /// Nodes per site.
    pub nodes: usize,
    /// Witnesses.
    pub witnesses: usize,
    /// The witness lease (the DR heartbeat is 200 ms, its timeout 300 ms, 3 retries).
    pub witness_lease_ms: u64,
}

impl Default for SitesSettings {
    fn default() -> Self {
        SitesSettings {
            nodes: 3,
            witnesses: 3,
            witness_lease_ms: 2_000,
        }
    }
}

/// One role sample: when, which site, what its leader said.
#[derive(Debug, Clone, Copy)]
pub struct RoleSample {
    /// When the answer came.
    pub at: Instant,
    /// Site index into [`SITES`].
    pub site: usize,
    /// Its role.
    pub role: SiteRole,
    /// Its site epoch.
    pub epoch: u64,
}

/// The running pair of sites (dropped: every process killed, every namespace removed).
pub struct Sites {
    // Declaration order is drop order: the router's rules and ports go first.
    router: Router,
    labs: Vec<Lab>,
    pki: Vec<PathBuf>,
    nodes: Vec<Vec<LabProcess>>,
    _witnesses: Vec<LabProcess>,
    vips: Vec<Ipv4Addr>,
    settings: SitesSettings,
    roles: Arc<Mutex<Vec<RoleSample>>>,
    stop: Arc<AtomicBool>,
    pollers: Vec<std::thread::JoinHandle<()>>,
}

impl Sites {
    /// Builds the lab, starts both sites and the witnesses, and waits until east is active
    /// with its VIP held and west is standby. `None` (after printing why) without root,
    /// unless CI=true.
    pub fn start(settings: SitesSettings) -> Result<Option<Sites>> {
        let Some(east) = crate::lab::lab_or_skip(settings.nodes)? else {
            return Ok(None);
        };
        let west = Lab::new(settings.nodes)?;
        let arb = Lab::new(settings.witnesses)?;
        let router = Router::join(&[&east, &west, &arb])?;
        let labs = vec![east, west, arb];
        let mut pki = Vec::new();
        for (k, site) in SITES.iter().enumerate() {
            let dir = labs[k].dir().join(format!("pki-{site}"));
            make_pki(&dir, settings.nodes as u64)?;
            pki.push(dir);
        }
        let vips: Vec<Ipv4Addr> = (0..2).map(|k| labs[k].free_ip(1)).collect();
        let spaced = binary("spaced")?;
        let mut witnesses = Vec::new();
        let mut witness_addrs = Vec::new();
        let cas = [pki[0].join("ca.pem"), pki[1].join("ca.pem")];
        for (i, host) in labs[2].hosts().iter().enumerate() {
            let files = spaced_raft::pki::issue(&pki[0], &format!("witness{}", i + 1), false)?;
            let listen = format!("{}:{WITNESS_PORT}", host.ip);
            let args = [
                "witness",
                "--listen",
                &listen,
                "--cert",
                path_str(&files.cert)?,
                "--key",
                path_str(&files.key)?,
                "--ca",
                path_str(&cas[0])?,
                "--ca",
                path_str(&cas[1])?,
                "--grace-ms",
                "0",
            ];
            witnesses.push(labs[2].spawn_in(
                &host.ns,
                &spaced,
                &args,
                &format!("witness{}", i + 1),
            )?);
            witness_addrs.push(listen);
        }
        let mut sites = Sites {
            router,
            labs,
            pki,
            nodes: vec![Vec::new(), Vec::new()],
            _witnesses: witnesses,
            vips,
            settings,
            roles: Arc::default(),
            stop: Arc::default(),
            pollers: Vec::new(),
        };
        for k in 0..2 {
            sites.start_site(k, &witness_addrs)?;
        }
        for k in 0..2 {
            sites.start_poller(k)?;
        }
        sites.wait(
            Duration::from_secs(60),
            "east active holding its VIP, west standby",
            |s| {
                Ok(s.latest(0)
                    .is_some_and(|r| (r.role, r.epoch) == (SiteRole::Active, 1))
                    && s.latest(1).is_some_and(|r| r.role == SiteRole::Standby)
                    && s.vip_holders(0)?.len() == 1)
            },
        )?;
        Ok(Some(sites))
    }

    fn start_site(&mut self, k: usize, witnesses: &[String]) -> Result<()> {
        let lab = &self.labs[k];
        let peer = &self.labs[1 - k];
        let pki = &self.pki[k];
        let n = self.settings.nodes;
        let mut configs = Vec::new();
        for (i, host) in lab.hosts().iter().enumerate() {
            let id = i as u64 + 1;
            let dir = lab.dir().to_path_buf();
            let mut cfg = crate::node_config(&dir, pki, id, RaftTimings::default());
            cfg.listen = SocketAddr::new(IpAddr::V4(host.ip), NODE_PORT);
            cfg.takeover = TakeoverMode::Netlink;
            cfg.devices = Default::default();
            cfg.vips = vec![VipSection {
                name: "front".into(),
                address: format!("{}/24", self.vips[k]),
                interface: "eth0".into(),
                roles: vec!["ha".into()],
                port: None,
            }];
            cfg.dr = Some(DrSection {
                site: SITES[k].into(),
                role: if k == 0 { "active" } else { "standby" }.into(),
                listen: SocketAddr::new(IpAddr::V4(host.ip), DR_PORT),
                peer_site: SITES[1 - k].into(),
                peers: peer
                    .hosts()
                    .iter()
                    .map(|h| format!("{}:{DR_PORT}", h.ip))
                    .collect(),
                peer_ca: self.pki[1 - k].join("ca.pem"),
                heartbeat_interval_ms: 200,
                heartbeat_timeout_ms: 300,
                heartbeat_retries: 3,
                witnesses: witnesses.to_vec(),
                witness_lease_ms: self.settings.witness_lease_ms,
                automatic_failover: true,
                // Every schedule starts afresh: no site sits out a wait after one.
                isolation_wait_ms: 0,
                failure_detection_script: None,
                script_timeout_ms: 10_000,
                backup: Default::default(),
            });
            std::fs::write(&cfg.source, cfg.to_toml())?;
            configs.push(cfg.source.clone());
        }
        let spaced = binary("spaced")?;
        for (i, config) in configs.iter().enumerate() {
            let mut args = vec!["run", "--config", path_str(config)?];
            if i == 0 {
                args.push("--bootstrap");
            }
            let host = &lab.hosts()[i];
            let proc = lab.spawn_in(
                &host.ns,
                &spaced,
                &args,
                &format!("{}-n{}", SITES[k], i + 1),
            )?;
            self.nodes[k].push(proc);
        }
        let first = self.endpoint(k, 0);
        crate::wait_until(
            Duration::from_secs(30),
            "the site's first node leads",
            || {
                Ok(self
                    .ctl(k, &first, &["status", "--json"])
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .is_some_and(|s| s["leader"] == 1))
            },
        )?;
        for i in 1..n {
            let id = (i + 1).to_string();
            let addr = self.endpoint(k, i);
            let name = format!("n{id}");
            self.ctl(
                k,
                &first,
                &["node", "add", "--id", &id, "--name", &name, "--addr", &addr],
            )?;
        }
        Ok(())
    }

    /// Records every ~150 ms what site `k`'s leader says of its role, from inside the site's
    /// client namespace (a thread of its own with a runtime of its own).
    fn start_poller(&mut self, k: usize) -> Result<()> {
        let ns = self.labs[k].client().ns.clone();
        let endpoints: Vec<String> = (0..self.settings.nodes)
            .map(|i| self.endpoint(k, i))
            .collect();
        let creds = AdminCredentials::load(&self.pki[k], None)?;
        let roles = self.roles.clone();
        let stop = self.stop.clone();
        let handle =
            crate::lab::spawn_async_in(&ns, &format!("dr-roles-{}", SITES[k]), move || {
                poll_roles(k, endpoints, creds, roles, stop)
            })?;
        self.pollers.push(handle);
        Ok(())
    }

    /// `host:port` of site `k`'s node `i` (0-based).
    pub fn endpoint(&self, k: usize, i: usize) -> String {
        format!("{}:{NODE_PORT}", self.labs[k].hosts()[i].ip)
    }

    /// Runs spacectl against `endpoint` from site `k`'s client namespace.
    pub fn ctl(&self, k: usize, endpoint: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.labs[k].command_in(&self.labs[k].client().ns, binary("spacectl")?);
        cmd.env("SPACED_ENDPOINT", endpoint)
            .env("SPACED_PKI", &self.pki[k]);
        spacectl_stdout(cmd, args)
    }

    /// Site `k`'s leader as any of its nodes reports it.
    pub fn leader(&self, k: usize) -> Option<usize> {
        (0..self.settings.nodes).find_map(|i| {
            let s = self
                .ctl(k, &self.endpoint(k, i), &["status", "--json"])
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&s).ok()?;
            v["leader"].as_u64().map(|l| l as usize - 1)
        })
    }

    /// Asks site `k` to fail over (an operator's `dr failover --yes`), through any node.
    pub fn failover(&self, k: usize) -> Result<String> {
        self.admin(k, &["dr", "failover", "--yes"], Duration::from_secs(1))
    }

    /// Runs an administrative spacectl command against site `k` through any of its nodes,
    /// again and again for up to `within`: right after a fault the site may have no leader
    /// yet ("not the leader (leader: None)"), as an operator would find it. The last error
    /// if none succeeded.
    pub fn admin(&self, k: usize, args: &[&str], within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let mut last = None;
            for i in 0..self.settings.nodes {
                match self.ctl(k, &self.endpoint(k, i), args) {
                    Ok(out) => return Ok(out),
                    Err(e) => last = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let e = last.unwrap_or_else(|| anyhow::anyhow!("no node"));
                return Err(e.context(format!("spacectl {} on site {k}", args.join(" "))));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The hosts (0-based) of site `k` holding its VIP now.
    pub fn vip_holders(&self, k: usize) -> Result<Vec<usize>> {
        let lab = &self.labs[k];
        let mut holders = Vec::new();
        for (i, h) in lab.hosts().iter().enumerate() {
            if lab.addresses(&h.ns)?.contains(&IpAddr::V4(self.vips[k])) {
                holders.push(i);
            }
        }
        Ok(holders)
    }

    /// Site `k`'s latest role sample.
    pub fn latest(&self, k: usize) -> Option<RoleSample> {
        lock(&self.roles)
            .iter()
            .rev()
            .find(|r| r.site == k)
            .copied()
    }

    /// Every role sample so far.
    pub fn role_samples(&self) -> Vec<RoleSample> {
        lock(&self.roles).clone()
    }

    /// Samples both sites' VIPs on every host of both sites every `period`.
    pub fn watch_vips(&self, period: Duration) -> Result<AddressWatch> {
        let mut watched = Vec::new();
        for k in 0..2 {
            for h in self.labs[k].hosts() {
                watched.push((h.ns.clone(), IpAddr::V4(self.vips[k])));
            }
        }
        AddressWatch::start_each(&self.labs[0], &watched, period)
    }

    /// Which site a watched namespace belongs to.
    pub fn site_of_ns(&self, ns: &str) -> Option<usize> {
        (0..2).find(|k| self.labs[*k].hosts().iter().any(|h| h.ns == ns))
    }

    /// Polls `f` every 50 ms until it holds, or fails after `within`.
    pub fn wait(
        &self,
        within: Duration,
        what: &str,
        mut f: impl FnMut(&Sites) -> Result<bool>,
    ) -> Result<()> {
        crate::wait_until(within, what, || f(self))
    }

    /// The lab directory holding every log (east's).
    pub fn dir(&self) -> &std::path::Path {
        self.labs[0].dir()
    }

    /// Applies a fault; what undoes it.
    pub fn apply(&self, fault: &Fault) -> Result<Heal> {
        let mut heal = Heal::default();
        let subnet = |k: usize| self.router.subnet(k);
        match fault {
            Fault::Cut { from } => {
                heal.rules
                    .push(self.router.block(&subnet(*from), &subnet(1 - from))?);
            }
            Fault::CutBoth => {
                heal.rules.push(self.router.block(&subnet(0), &subnet(1))?);
                heal.rules.push(self.router.block(&subnet(1), &subnet(0))?);
            }
            Fault::Witnesses {
                site,
                which,
                both_ways,
            } => {
                for w in which {
                    let ip = self.labs[2].hosts()[*w].ip.to_string();
                    heal.rules.push(self.router.block(&subnet(*site), &ip)?);
                    if *both_ways {
                        heal.rules.push(self.router.block(&ip, &subnet(*site))?);
                    }
                }
            }
            Fault::StopLeader { site } => {
                let leader = self
                    .leader(*site)
                    .context("the site has no leader to stop")?;
                let p = self.nodes[*site][leader].clone();
                p.signal(Signal::SIGSTOP)?;
                heal.stopped.push(p);
            }
            Fault::StopSite { site } => {
                for p in &self.nodes[*site] {
                    p.signal(Signal::SIGSTOP)?;
                    heal.stopped.push(p.clone());
                }
            }
        }
        Ok(heal)
    }

    /// Undoes faults.
    pub fn heal(&self, heal: Heal) -> Result<()> {
        for rule in heal.rules {
            self.router.unblock(rule)?;
        }
        for p in heal.stopped {
            p.signal(Signal::SIGCONT)?;
        }
        Ok(())
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for p in self.pollers.drain(..) {
            let _ = p.join();
        }
        // SIGCONT whatever a failed schedule left stopped, so that the kill reaps it.
        for site in &self.nodes {
            for p in site {
                let _ = p.signal(Signal::SIGCONT);
            }
        }
    }
}

/// Locks a mutex, tolerating poisoning (a panicking test must still be able to clean up).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn path_str(p: &std::path::Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

async fn poll_roles(
    k: usize,
    endpoints: Vec<String>,
    creds: AdminCredentials,
    roles: Arc<Mutex<Vec<RoleSample>>>,
    stop: Arc<AtomicBool>,
) {
    let mut client: Option<AdminClient> = None;
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            let target = &endpoints[next % endpoints.len()];
            next += 1;
            client =
                tokio::time::timeout(Duration::from_secs(1), AdminClient::connect(target, &creds))
                    .await
                    .ok()
                    .and_then(|c| c.ok());
        }
        if let Some(c) = client.as_mut() {
            let asked = tokio::time::timeout(
                Duration::from_secs(1),
                c.call_leader(&AdminRequest::Dr(DrAction::Status)),
            )
            .await;
            match asked {
                Ok(Ok(AdminReply::DrStatus(s))) => lock(&roles).push(RoleSample {
                    at: Instant::now(),
                    site: k,
                    role: s.role,
                    epoch: s.epoch,
                }),
                _ => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Nothing from site `from` reaches the other site.
    Cut {
        /// Site index.
        from: usize,
    },
    /// The inter-site link is down both ways.
    CutBoth,
    /// Site `site` cannot reach these witnesses (nor they it, with `both_ways`).
    Witnesses {
        /// Site index.
        site: usize,
        /// Witness indexes.
        which: Vec<usize>,
        /// Both directions.
        both_ways: bool,
    },
    /// The site's leader is SIGSTOPped.
    StopLeader {
        /// Site index.
        site: usize,
    },
    /// Every daemon of the site is SIGSTOPped (a paused site; their fence guards run on).
    StopSite {
        /// Site index.
        site: usize,
    },
}

impl Fault {
    /// Its kind, for the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Cut { .. } => "inter-site link cut one way",
            Fault::CutBoth => "inter-site link cut both ways",
            Fault::Witnesses {
                both_ways: false, ..
            } => "site cut from witnesses one way",
            Fault::Witnesses { .. } => "site cut from witnesses both ways",
            Fault::StopLeader { .. } => "site leader SIGSTOPped",
            Fault::StopSite { .. } => "whole site SIGSTOPped",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Cut { from } => write!(f, "cut {}→{}", SITES[*from], SITES[1 - from]),
            Fault::CutBoth => write!(f, "cut east↔west"),
            Fault::Witnesses {
                site,
                which,
                both_ways,
            } => write!(
                f,
                "{} {} witnesses {which:?}",
                SITES[*site],
                if *both_ways { "↮" } else { "↛" }
            ),
            Fault::StopLeader { site } => write!(f, "SIGSTOP {}'s leader", SITES[*site]),
            Fault::StopSite { site } => write!(f, "SIGSTOP all of {}", SITES[*site]),
        }
    }
}

/// What undoes applied faults.
#[derive(Default)]
pub struct Heal {
    rules: Vec<u32>,
    stopped: Vec<LabProcess>,
}

impl Heal {
    /// Adds another fault's undoing.
    pub fn and(mut self, other: Heal) -> Heal {
        self.rules.extend(other.rules);
        self.stopped.extend(other.stopped);
        self
    }
}

/// A small seeded generator (splitmix64): schedules replay from their seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One schedule: its faults, how long they last, and how far apart they start.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The faults, applied in order.
    pub faults: Vec<Fault>,
    /// The pause before each fault (the first's is 0).
    pub gaps: Vec<Duration>,
    /// How long all of them hold after the last began.
    pub hold: Duration,
}

impl Schedule {
    /// A random schedule of 1–3 faults held for ¼ to 3 witness leases.
    pub fn random(rng: &mut Rng, settings: &SitesSettings) -> Schedule {
        let lease = settings.witness_lease_ms;
        let count = 1 + rng.below(3) as usize;
        let mut faults = Vec::new();
        let mut gaps = Vec::new();
        for i in 0..count {
            let site = rng.below(2) as usize;
            let fault = match rng.below(6) {
                0 => Fault::Cut { from: site },
                1 => Fault::CutBoth,
                2 | 3 => {
                    let w = settings.witnesses as u64;
                    // A non-empty subset: each witness in with one chance in two, at least one.
                    let mut which: Vec<usize> =
                        (0..w as usize).filter(|_| rng.below(2) == 0).collect();
                    if which.is_empty() {
                        which.push(rng.below(w) as usize);
                    }
                    Fault::Witnesses {
                        site,
                        which,
                        both_ways: rng.below(2) == 0,
                    }
                }
                4 => Fault::StopLeader { site },
                _ => Fault::StopSite { site },
            };
            // One stop per schedule: a second would find its process stopped already.
            let stops = |f: &Fault| matches!(f, Fault::StopLeader { .. } | Fault::StopSite { .. });
            if faults.contains(&fault) || (stops(&fault) && faults.iter().any(stops)) {
                continue;
            }
            faults.push(fault);
            gaps.push(if i == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(rng.below(lease))
            });
        }
        let hold = Duration::from_millis(lease / 4 + rng.below(lease * 3 - lease / 4));
        Schedule { faults, gaps, hold }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (fault, gap)) in self.faults.iter().zip(&self.gaps).enumerate() {
            if i > 0 {
                write!(f, ", +{} ms ", gap.as_millis())?;
            }
            write!(f, "{fault}")?;
        }
        write!(f, ", held {} ms", self.hold.as_millis())
    }
}

/// How one schedule went.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The schedule.
    pub schedule: Schedule,
    /// When it began (since the campaign's start).
    pub began: Duration,
    /// The active site (and epoch) before and after.
    pub before: Option<(usize, u64)>,
    /// After.
    pub after: Option<(usize, u64)>,
    /// From the heal until one site was active again with its VIP held once.
    pub settled_in: Option<Duration>,
    /// Whether an operator's `dr failover` was needed (both sites ended standby).
    pub manual_failover: bool,
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Campaign {
    /// Every schedule's outcome.
    pub outcomes: Vec<Outcome>,
    /// What the VIP watch saw.
    pub watch: WatchReport,
    /// Epochs at which both sites said they were active.
    pub epoch_conflicts: Vec<u64>,
    /// A site whose epoch went down: (site, from, to).
    pub epoch_regressions: Vec<(usize, u64, u64)>,
    /// Role samples taken.
    pub role_samples: usize,
}

impl Campaign {
    /// Every violation found, described (empty: the run kept every promise).
    pub fn violations(&self, sites: &Sites) -> Vec<String> {
        let mut v = Vec::new();
        for (at, holders) in &self.watch.overlaps {
            let which: BTreeSet<&str> = holders
                .iter()
                .filter_map(|ns| sites.site_of_ns(ns).map(|k| SITES[k]))
                .collect();
            let during = self
                .outcomes
                .iter()
                .rev()
                .find(|o| o.began <= *at)
                .map(|o| o.schedule.to_string())
                .unwrap_or_else(|| "before the first schedule".into());
            v.push(format!(
                "at {at:?} {} held a VIP at once (sites {which:?}), during: {during}",
                holders.join(" and ")
            ));
        }
        for e in &self.epoch_conflicts {
            v.push(format!("both sites said they were active at epoch {e}"));
        }
        for (k, from, to) in &self.epoch_regressions {
            v.push(format!(
                "{}'s epoch went down from {from} to {to}",
                SITES[*k]
            ));
        }
        for (i, o) in self.outcomes.iter().enumerate() {
            if o.settled_in.is_none() {
                v.push(format!(
                    "schedule {i} ({}) did not end with one site active and its VIP served",
                    o.schedule
                ));
            }
        }
        v
    }

    /// The summary table.
    pub fn summary(&self, seed: u64) -> String {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &self.outcomes {
            for f in &o.schedule.faults {
                *kinds.entry(f.kind()).or_default() += 1;
            }
        }
        let moved = self
            .outcomes
            .iter()
            .filter(|o| o.before.map(|b| b.0) != o.after.map(|a| a.0))
            .count();
        let manual = self.outcomes.iter().filter(|o| o.manual_failover).count();
        let mut settle: Vec<u128> = self
            .outcomes
            .iter()
            .filter_map(|o| o.settled_in.map(|d| d.as_millis()))
            .collect();
        settle.sort_unstable();
        let pct = |p: f64| {
            settle
                .get(((settle.len() as f64 - 1.0) * p).round() as usize)
                .map_or("-".to_string(), |v| format!("{v} ms"))
        };
        let mut out = format!("seed {seed}: {} schedules\n", self.outcomes.len());
        out += "| fault | count |\n|---|---|\n";
        for (k, n) in &kinds {
            out += &format!("| {k} | {n} |\n");
        }
        out += &format!(
            "\nactive site changed in {moved} schedules ({manual} needed an operator's `dr failover`: both sites ended standby)\n\
             settled after the heal: median {}, p90 {}, max {}\n\
             VIP samples: {} rounds, {} with two holders; role samples: {}; epoch conflicts: {}; epoch regressions: {}\n",
            pct(0.5),
            pct(0.9),
            pct(1.0),
            self.watch.samples,
            self.watch.overlap_samples,
            self.role_samples,
            self.epoch_conflicts.len(),
            self.epoch_regressions.len(),
        );
        out
    }
}

/// The site active now, as the latest samples of both say (one active, the other standby).
fn active_site(sites: &Sites) -> Option<(usize, u64)> {
    let a = sites.latest(0)?;
    let b = sites.latest(1)?;
    match (a.role, b.role) {
        (SiteRole::Active, SiteRole::Standby) => Some((0, a.epoch)),
        (SiteRole::Standby, SiteRole::Active) => Some((1, b.epoch)),
        _ => None,
    }
}

/// Waits, after a heal, until one site is active, the other standby, only the active site's
/// VIP is held and on one host. When both stay standby for 4 s, fails one over as an operator
/// would (the site with the higher epoch, or east). Gives up after `within`.
fn settle(sites: &Sites, within: Duration) -> (Option<Duration>, bool) {
    let healed = Instant::now();
    let mut both_standby_since: Option<Instant> = None;
    let mut manual = false;
    while healed.elapsed() < within {
        // Fresh samples only: taken after the heal.
        let fresh = |k: usize| sites.latest(k).filter(|r| r.at > healed);
        if let (Some(a), Some(b)) = (fresh(0), fresh(1)) {
            if let Some((k, _)) = active_site(sites) {
                let served = sites.vip_holders(k).is_ok_and(|h| h.len() == 1)
                    && sites.vip_holders(1 - k).is_ok_and(|h| h.is_empty());
                if served {
                    return (Some(healed.elapsed()), manual);
                }
            }
            if a.role == SiteRole::Standby && b.role == SiteRole::Standby {
                let since = *both_standby_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(4) && !manual {
                    let k = if b.epoch > a.epoch { 1 } else { 0 };
                    match sites.failover(k) {
                        Ok(_) => manual = true,
                        Err(e) => eprintln!("dr failover of {}: {e:#}", SITES[k]),
                    }
                }
            } else {
                both_standby_since = None;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (None, manual)
}

/// Runs `schedules` random schedules from `seed` on running sites, printing each; then the
/// checks over everything recorded.
pub fn campaign(sites: &Sites, seed: u64, schedules: usize) -> Result<Campaign> {
    let mut rng = Rng::new(seed);
    let watch = sites.watch_vips(Duration::from_millis(2))?;
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for i in 0..schedules {
        let schedule = Schedule::random(&mut rng, &sites.settings);
        let before = active_site(sites);
        let began = start.elapsed();
        println!("schedule {i}: {schedule}");
        let mut heal = Heal::default();
        let mut result = Ok(());
        for (fault, gap) in schedule.faults.iter().zip(&schedule.gaps) {
            std::thread::sleep(*gap);
            match sites.apply(fault) {
                Ok(h) => heal = heal.and(h),
                Err(e) => {
                    result = Err(e.context(format!("applying {fault}")));
                    break;
                }
            }
        }
        std::thread::sleep(schedule.hold);
        sites.heal(heal)?;
        result?;
        let (settled_in, manual_failover) = settle(sites, Duration::from_secs(40));
        let after = active_site(sites);
        println!(
            "  → {} active (was {}), settled in {}{}",
            after.map_or("none".into(), |(k, e)| format!("{} at epoch {e}", SITES[k])),
            before.map_or("none".into(), |(k, e)| format!("{} at epoch {e}", SITES[k])),
            settled_in.map_or("never".into(), |d| format!("{} ms", d.as_millis())),
            if manual_failover {
                " after an operator's failover"
            } else {
                ""
            }
        );
        let failed = settled_in.is_none();
        outcomes.push(Outcome {
            schedule,
            began,
            before,
            after,
            settled_in,
            manual_failover,
        });
        if failed {
            break;
        }
    }
    let watch = watch.stop();
    let samples = sites.role_samples();
    let mut active_at: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    let mut last_epoch = [0u64; 2];
    let mut epoch_regressions = Vec::new();
    for s in &samples {
        if s.role == SiteRole::Active {
            active_at.entry(s.epoch).or_default().insert(s.site);
        }
        if s.epoch < last_epoch[s.site] {
            epoch_regressions.push((s.site, last_epoch[s.site], s.epoch));
        }
        last_epoch[s.site] = last_epoch[s.site].max(s.epoch);
    }
    Ok(Campaign {
        outcomes,
        watch,
        epoch_conflicts: active_at
            .into_iter()
            .filter(|(_, s)| s.len() > 1)
            .map(|(e, _)| e)
            .collect(),
        epoch_regressions,
        role_samples: samples.len(),
    })
}

/// A seed from the environment (`SPACED_CHAOS_SEED`) or the clock.
pub fn seed_from_env() -> Result<u64> {
    match std::env::var("SPACED_CHAOS_SEED") {
        Ok(s) => s
            .parse()
            .with_context(|| format!("SPACED_CHAOS_SEED={s:?} is not a number")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)),
    }
}

/// Fails with the violations, if any, printing the summary either way.
pub fn check(sites: &Sites, campaign: &Campaign, seed: u64) -> Result<()> {
    println!("{}", campaign.summary(seed));
    let v = campaign.violations(sites);
    if !v.is_empty() {
        bail!(
            "{} violation(s) (replay with SPACED_CHAOS_SEED={seed}; logs in {}):\n{}",
            v.len(),
            sites.dir().display(),
            v.join("\n")
        );
    }
    Ok(())
}
