//! The node's TOML configuration: parsing, path resolution, validation and serialization.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A node's full configuration, as loaded from its TOML file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Raft member id; unique in the cluster and never 0 (openraft reserves nothing, but 0
    /// is the classic "unset" value and is rejected to catch forgotten keys).
    pub node_id: u64,
    /// Human-readable node name, used in logs, metrics labels and certificate names.
    pub name: String,
    /// Directory holding the Raft log, state machine and snapshots.
    pub data_dir: PathBuf,
    /// QUIC (UDP) socket address serving Raft traffic and admin requests.
    pub listen: SocketAddr,
    /// The address other nodes dial to reach this one, when it differs from `listen` (which
    /// must then be given when `listen` is a wildcard such as `0.0.0.0:7000`). A bootstrap node
    /// records it as its own address in the cluster; joining nodes are added with theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// This node's management IP: where the balancer on the VIP owner connects to the
    /// application servers on this node (and what `spacectl status --json` shows). Unset: the
    /// IP of its Raft address. The node records it in the fabric at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mgmt_ip: Option<std::net::IpAddr>,
    /// HTTP address for /metrics and /healthz; `None` disables the HTTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// Log filter (`info`, `debug`, `info,spaced_node::placement=debug`, ...); applied at
    /// start and again on SIGHUP. `--log-level` and `SPACED_LOG` take precedence at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Roles this node is willing to host (e.g. "ha", "app"), used for placement.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The named set of Raft and lease timings the `[raft]` and `[lease]` keys not given here
    /// default to (`fast`, `default`, `wan`; see [`TimingProfile`]).
    #[serde(default, skip_serializing_if = "TimingProfile::is_default")]
    pub timing: TimingProfile,
    /// Certificate material for mutual TLS between nodes and with the admin CLI.
    pub tls: TlsSection,
    /// Raft timing and log-compaction knobs.
    #[serde(default)]
    pub raft: RaftTimings,
    /// Lease timing for VIPs and singletons.
    #[serde(default)]
    pub lease: LeaseTimings,
    /// How this node takes over VIPs: real addresses (`netlink`) or, for the rootless demo,
    /// a TCP responder on a loopback address (`loopback`).
    #[serde(default)]
    pub takeover: TakeoverMode,
    /// Re-announce held VIPs (gratuitous ARP / NA) this often after the initial burst; 0 = never.
    #[serde(default)]
    pub garp_refresh_s: u64,
    /// The cgroup v2 (a path under the cgroup2 mount) the fence guards are moved into, out of
    /// the daemon's own, so that killing or freezing the daemon's cgroup (`systemctl kill`, a
    /// stop timeout) does not take the fence with it. Unset: `spaced-fence`; `none`: the
    /// guards stay in the daemon's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_cgroup: Option<String>,
    /// The daemon's CPU priority as a nice value, -20 (first) to 19 (last); unset:
    /// [`crate::ops::priority::DEFAULT_NICE`]. Services it starts run at the priority the
    /// daemon was started with. Raising it needs root or CAP_SYS_NICE; without, the daemon
    /// runs at the priority it was given and says so in its log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
    /// VIPs this node declares; registered in the fabric at start-up if missing.
    #[serde(default, rename = "vip", skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<VipSection>,
    /// The load balancer on a VIP (DESIGN §7); absent = no balancer on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbSection>,
    /// The device agent (DESIGN §8): keepalive, down detection and the device-initiated port.
    #[serde(default)]
    pub devices: DevicesSection,
    /// Supervised services: how their output is kept. Written out only when not the default,
    /// so a config this build writes still loads in builds that predate the section.
    #[serde(default, skip_serializing_if = "ServicesSection::is_default")]
    pub services: ServicesSection,
    /// Disaster recovery (DESIGN §9): this site, its peer site and the link between them;
    /// absent = a standalone site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dr: Option<spaced_replication::DrSection>,
    /// The file this configuration came from (not part of the TOML text).
    #[serde(skip)]
    pub source: PathBuf,
}

/// The default `fence_cgroup`.
pub const DEFAULT_FENCE_CGROUP: &str = "spaced-fence";

/// Where the fence guards go (`fence_cgroup`, see `crate::takeover::cgroup`): a cgroup v2
/// path below the cgroup2 mount, or nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceCgroup {
    /// Leave the guard in the daemon's cgroup.
    Off,
    /// This path relative to the cgroup2 mount (no leading `/`, no `.` or `..`).
    Under(String),
}

impl Default for FenceCgroup {
    fn default() -> Self {
        FenceCgroup::Under(DEFAULT_FENCE_CGROUP.to_string())
    }
}

/// A `fence_cgroup` value that is not a usable cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a cgroup path: {why}")]
pub struct FenceCgroupError {
    /// The value.
    pub value: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl FenceCgroup {
    /// Parses the config value: `none`, or a relative path of plain names.
    pub fn parse(value: &str) -> Result<Self, FenceCgroupError> {
        let bad = |why| {
            Err(FenceCgroupError {
                value: value.to_string(),
                why,
            })
        };
        if value == "none" {
            return Ok(FenceCgroup::Off);
        }
        let path = value.trim_start_matches('/');
        if path.is_empty() {
            return bad("the root cgroup is not a cgroup of its own; give a name or `none`");
        }
        for part in path.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return bad("empty, `.` and `..` parts are not allowed");
            }
            if part.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return bad("names may not hold spaces or control characters");
            }
            if part.starts_with("cgroup.") {
                return bad("a `cgroup.` name is a control file");
            }
        }
        Ok(FenceCgroup::Under(path.to_string()))
    }
}

/// `[lb]`: a TCP balancer that listens on a VIP's ports and is active on the VIP's owner.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LbSection {
    /// The VIP (placement name) whose owner runs the balancer.
    pub vip: String,
    /// Ports to balance: each listens on the VIP and forwards to the same backend port on every backend.
    pub ports: Vec<LbPort>,
    /// Nodes with this role are the backends (model: the `app` nodes).
    #[serde(default = "default_backend_role")]
    pub backend_role: String,
    /// `rr`, `leastconn`, `sticky` (JSESSIONID route, else rr) or `source` (Maglev on the client address).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Connections open at once per port; the excess is refused at accept.
    #[serde(default = "default_max_conns")]
    pub max_conns: u64,
    /// A backend connect slower than this fails over to another backend.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Other backends tried when a connect fails.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// A connection with no byte moving either way for this long is closed.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Longest wait for the first request when looking for a session route.
    #[serde(default = "default_peek_timeout_ms")]
    pub peek_timeout_ms: u64,
    /// Send a PROXY protocol v2 header to backends.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Health-check interval; 0 disables health checks.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Successful checks that bring a backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failed checks that take a backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Connects in a row that fail on live traffic and take a backend down before its next
    /// check (passive health); 0 = only the checks decide.
    #[serde(default = "default_error_limit")]
    pub error_limit: u32,
    /// After losing the VIP, open connections get this long before they are cut.
    #[serde(default = "default_drain_grace_s")]
    pub drain_grace_s: u64,
    /// Accept loops per port, each on a listening socket of its own (SO_REUSEPORT), spread
    /// over the daemon's runtime threads.
    #[serde(default = "default_lb_threads")]
    pub threads: usize,
}

/// One `[[lb.ports]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LbPort {
    /// Port on the VIP.
    pub listen: u16,
    /// Port on each backend node.
    pub backend: u16,
}

fn default_backend_role() -> String {
    "app".into()
}
fn default_policy() -> String {
    "rr".into()
}
fn default_max_conns() -> u64 {
    20_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_retries() -> u32 {
    2
}
fn default_idle_timeout_s() -> u64 {
    300
}
fn default_peek_timeout_ms() -> u64 {
    1_000
}
fn default_health_interval_ms() -> u64 {
    1_000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_error_limit() -> u32 {
    spaced_lb::balancer::DEFAULT_ERROR_LIMIT
}
fn default_drain_grace_s() -> u64 {
    10
}
fn default_lb_threads() -> usize {
    1
}

/// The most accept loops `lb.threads` may ask for per port.
pub const MAX_LB_THREADS: usize = 64;

impl LbSection {
    /// A section for `vip` and `ports` with every other key at its default, as a config file
    /// that names only those two would give.
    pub fn new(vip: &str, ports: Vec<LbPort>) -> Self {
        LbSection {
            vip: vip.to_string(),
            ports,
            backend_role: default_backend_role(),
            policy: default_policy(),
            max_conns: default_max_conns(),
            connect_timeout_ms: default_connect_timeout_ms(),
            retries: default_retries(),
            idle_timeout_s: default_idle_timeout_s(),
            peek_timeout_ms: default_peek_timeout_ms(),
            proxy_protocol: false,
            health_interval_ms: default_health_interval_ms(),
            rise: default_rise(),
            fall: default_fall(),
            error_limit: default_error_limit(),
            drain_grace_s: default_drain_grace_s(),
            threads: default_lb_threads(),
        }
    }

    /// The balancer settings this section describes (`policy` must have passed validation).
    pub fn balancer_config(&self) -> spaced_lb::balancer::LbConfig {
        use std::time::Duration;
        let defaults = spaced_lb::balancer::LbConfig::default();
        spaced_lb::balancer::LbConfig {
            policy: self.policy.parse().unwrap_or_default(),
            max_conns: self.max_conns,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            retries: self.retries,
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            peek_timeout: Duration::from_millis(self.peek_timeout_ms),
            proxy_protocol: self.proxy_protocol,
            health: (self.health_interval_ms > 0).then(|| spaced_lb::balancer::HealthConfig {
                error_limit: self.error_limit,
                ..spaced_lb::balancer::HealthConfig::every(
                    Duration::from_millis(self.health_interval_ms),
                    self.rise,
                    self.fall,
                )
            }),
            drain_grace: Duration::from_secs(self.drain_grace_s),
            ..defaults
        }
    }
}

/// `[devices]`: how this node holds the management connections of the devices it owns; every
/// key is optional (the model's 40 s keepalive and 15 min down-after are the defaults).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesSection {
    /// Heartbeat period of a held connection: TCP keepalive probes go out after this much
    /// silence and this often after that; also the longest pause between reconnect attempts.
    pub keepalive_interval_s: u64,
    /// A device this node owns but cannot reach for this long is reported `down`.
    pub down_after_s: u64,
    /// Where devices in device-initiated mode connect and name themselves (`"off"`: nowhere,
    /// e.g. several nodes on one test host).
    #[serde(with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
    /// A connect attempt to a device that takes longer than this counts as failed.
    pub connect_timeout_s: u64,
    /// On the leader: a node not heard from for this long is lost and its devices move to the
    /// others (a new leader also waits this long before it counts a node it has not heard from
    /// as lost). Lower fails over faster; too low moves devices off a node that only paused.
    pub lost_after_ms: u64,
}

/// `[services]`: how this node keeps its supervised services' output
/// (`<data_dir>/service-logs/<name>.log`); every key is optional.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesSection {
    /// A service's log file is rotated (to `<name>.log.1`, the older ones moving up) before it
    /// would grow past this many bytes; at least [`MIN_SERVICE_LOG_BYTES`].
    pub log_max_bytes: u64,
    /// Rotated files kept per service (0: the log starts over empty instead); at most
    /// [`MAX_SERVICE_LOG_FILES`].
    pub log_files: u32,
}

impl ServicesSection {
    /// Whether every key has its default.
    pub fn is_default(&self) -> bool {
        *self == ServicesSection::default()
    }
}

/// The smallest `services.log_max_bytes`.
pub const MIN_SERVICE_LOG_BYTES: u64 = 16 * 1024;
/// The most `services.log_files`.
pub const MAX_SERVICE_LOG_FILES: u32 = 100;

impl Default for ServicesSection {
    /// 10 MiB files, 5 rotated ones kept: at most 60 MiB per service.
    fn default() -> Self {
        Self {
            log_max_bytes: 10 * 1024 * 1024,
            log_files: 5,
        }
    }
}

/// The port devices connect to in device-initiated mode (as in the model).
pub const DEVICE_PORT: u16 = 7804;

impl Default for DevicesSection {
    fn default() -> Self {
        Self {
            keepalive_interval_s: 40,
            down_after_s: 900,
            listen: Some(SocketAddr::from(([0, 0, 0, 0], DEVICE_PORT))),
            connect_timeout_s: 10,
            lost_after_ms: 800,
        }
    }
}

/// `listen = "off"` or a socket address, for [`DevicesSection::listen`].
mod listen_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected \"off\" or ip:port (e.g. \"0.0.0.0:{}\"), found {text:?}",
                super::DEVICE_PORT
            ))
        })
    }
}

/// Paths to the PEM files used for mutual TLS.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Cluster CA certificate that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This node's certificate chain, presented to peers and clients.
    pub cert: PathBuf,
    /// Private key matching `cert`.
    pub key: PathBuf,
}

/// Raft timing and snapshot policy; every key is optional in the file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTimings {
    /// How often the leader sends heartbeats; must be below the minimum election timeout.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound (exclusive of equality with the minimum) of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last snapshot.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot so slightly lagging followers avoid a full install.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        TimingProfile::Default.raft()
    }
}

/// A named set of Raft and lease timings (`timing = "..."`). The trade-off is failover time
/// against tolerance of stalls: a node whose daemon cannot run for about a lease (CPU
/// starvation, a VM paused, a long GC-like stall of the host) loses its VIPs and singletons,
/// and a leader silent for about an election timeout loses its leadership.
///
/// | profile | Raft heartbeat, election | lease, renewals, margin | host loss | leader loss |
/// |---|---|---|---|---|
/// | `fast` | 15 ms, 60–120 ms | 100, 20, 25 ms | about 0.15 s | about 0.2 s |
/// | `default` | 25 ms, 100–200 ms | 150, 30, 40 ms | about 0.2 s | about 0.3 s |
/// | `wan` | 150 ms, 1,000–2,000 ms | 1,500, 300, 250 ms | about 2 s | about 3 s |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimingProfile {
    /// One LAN, idle or lightly loaded hosts: the shortest failover.
    Fast,
    /// One LAN or one data centre, hosts under ordinary load.
    #[default]
    Default,
    /// Nodes across a WAN or on hosts that stall (oversubscribed VMs): slow but steady.
    Wan,
}

impl TimingProfile {
    /// Whether this is the default profile (not written out by `to_toml`).
    pub fn is_default(&self) -> bool {
        *self == TimingProfile::Default
    }

    /// The name written in the config.
    pub fn name(self) -> &'static str {
        match self {
            TimingProfile::Fast => "fast",
            TimingProfile::Default => "default",
            TimingProfile::Wan => "wan",
        }
    }

    /// The profile's Raft timings (the log-compaction knobs are the same in every profile).
    pub fn raft(self) -> RaftTimings {
        let (heartbeat_interval_ms, election_timeout_min_ms, election_timeout_max_ms) = match self {
            TimingProfile::Fast => (15, 60, 120),
            TimingProfile::Default => (25, 100, 200),
            TimingProfile::Wan => (150, 1_000, 2_000),
        };
        RaftTimings {
            heartbeat_interval_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 1_000,
        }
    }

    /// The profile's lease timings (the drift bound is the same in every profile).
    pub fn lease(self) -> LeaseTimings {
        let (duration_ms, renew_every_ms, margin_ms) = match self {
            TimingProfile::Fast => (100, 20, 25),
            TimingProfile::Default => (150, 30, 40),
            TimingProfile::Wan => (1_500, 300, 250),
        };
        LeaseTimings {
            duration_ms,
            renew_every_ms,
            margin_ms,
            drift: 0.01,
        }
    }
}

/// Lease timing (DESIGN §5); every key optional.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseTimings {
    /// `L`: how long a confirmed renewal lets the owner hold a placement.
    pub duration_ms: u64,
    /// How often the owner renews; must be well below `duration_ms` (default L/4).
    pub renew_every_ms: u64,
    /// Extra wait on the leader beyond `L·(1+drift)` before it reassigns.
    pub margin_ms: u64,
    /// Bound on clock rate difference between nodes, as a fraction (0.01 = 1%).
    pub drift: f64,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        TimingProfile::Default.lease()
    }
}

/// How VIPs are taken over on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TakeoverMode {
    /// Add the address with netlink and announce it with gratuitous ARP / unsolicited NA.
    #[default]
    Netlink,
    /// No root needed: serve a TCP responder on the VIP (a loopback address) instead.
    Loopback,
}

/// One `[[vip]]` entry.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// Placement name, unique in the fabric.
    pub name: String,
    /// Address with prefix, e.g. `10.0.0.100/24` or `fd00::100/64`.
    pub address: String,
    /// Interface to add it to.
    pub interface: String,
    /// Roles eligible to hold it (e.g. `["ha"]` for the cluster VIP, `["db"]` for a database VIP).
    pub roles: Vec<String>,
    /// Loopback mode only: TCP port of the responder that stands in for the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Why a configuration could not be loaded; every message is a single line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {}: cannot read file: {source}", file.display())]
    Read {
        /// The file that was being read.
        file: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("config {}: TOML syntax error at line {line}, column {column}: {message}", file.display())]
    Syntax {
        /// The file being parsed.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the parser complained about, flattened to one line.
        message: String,
    },
    /// A specific key is missing, unknown, mistyped or semantically invalid.
    #[error("config {}: key `{key}`: {problem}", file.display())]
    Key {
        /// The file being parsed.
        file: PathBuf,
        /// Dotted path of the offending key, e.g. `raft.heartbeat_interval_ms` or `roles[1]`.
        key: String,
        /// What is wrong with it, one line.
        problem: String,
    },
    /// A problem that applies to the document as a whole rather than to one key.
    #[error("config {}: {problem}", file.display())]
    Document {
        /// The file being parsed.
        file: PathBuf,
        /// What is wrong, one line.
        problem: String,
    },
}

impl ConfigError {
    /// Dotted key the error is about, if any (handy for tests and tooling).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

impl NodeConfig {
    /// Reads and parses the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse_str(&text, path)
    }

    /// Parses `text` as if read from `source`; relative paths are resolved against
    /// `source.parent()`, then the result is validated.
    pub fn parse_str(text: &str, source: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| syntax_error(e, text, source))?;
        let mut cfg: NodeConfig =
            serde_path_to_error::deserialize(de).map_err(|e| deser_error(e, text, source))?;
        cfg.source = source.to_path_buf();
        cfg.apply_timing_profile(text)?;
        let base = source.parent().unwrap_or_else(|| Path::new(""));
        cfg.validate()?;
        cfg.data_dir = resolve(base, &cfg.data_dir);
        cfg.tls.ca = resolve(base, &cfg.tls.ca);
        cfg.tls.cert = resolve(base, &cfg.tls.cert);
        cfg.tls.key = resolve(base, &cfg.tls.key);
        if let Some(dr) = &mut cfg.dr {
            dr.peer_ca = resolve(base, &dr.peer_ca);
            if let Some(script) = &dr.failure_detection_script {
                dr.failure_detection_script = Some(resolve(base, script));
            }
        }
        Ok(cfg)
    }

    /// Gives the `[raft]` and `[lease]` keys that `text` does not set the values of the
    /// `timing` profile (serde filled them with the default profile's).
    fn apply_timing_profile(&mut self, text: &str) -> Result<(), ConfigError> {
        if self.timing.is_default() {
            return Ok(());
        }
        let problem = |what: String| ConfigError::Document {
            file: self.source.clone(),
            problem: format!("timing profile `{}`: {what}", self.timing.name()),
        };
        // The text parsed already; this second reading only tells which keys it sets.
        let doc: toml::Table = toml::from_str(text).map_err(|e| problem(e.to_string()))?;
        let overlay = |table: &str, profile: Result<toml::Table, toml::ser::Error>| {
            let mut merged = profile.map_err(|e| problem(format!("[{table}]: {e}")))?;
            if let Some(given) = doc.get(table).and_then(|t| t.as_table()) {
                merged.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Ok::<_, ConfigError>(merged)
        };
        let raft = overlay("raft", toml::Table::try_from(self.timing.raft()))?;
        let lease = overlay("lease", toml::Table::try_from(self.timing.lease()))?;
        self.raft = raft
            .try_into()
            .map_err(|e| problem(format!("[raft]: {e}")))?;
        self.lease = lease
            .try_into()
            .map_err(|e| problem(format!("[lease]: {e}")))?;
        Ok(())
    }

    /// Serialize back to TOML (used by a demo that writes config files for child processes).
    ///
    /// Paths are written as held (after resolution); relative ones will be resolved again
    /// against the directory of whatever file the text is written to, so prefer absolute paths
    /// when the destination directory differs from the original one.
    pub fn to_toml(&self) -> String {
        // Every field is a plain string, integer, array or table, all of which TOML can
        // represent; a failure here would be a bug in this module, so degrade to a comment
        // rather than panic.
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# failed to serialize configuration: {e}\n"))
    }

    /// Where the fence guards go (`fence_cgroup`); an invalid value was refused at load, and
    /// reads as the default here.
    pub fn fence_cgroup(&self) -> FenceCgroup {
        self.fence_cgroup
            .as_deref()
            .and_then(|v| FenceCgroup::parse(v).ok())
            .unwrap_or_default()
    }

    /// Semantic checks that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: String| ConfigError::Key {
            file: self.source.clone(),
            key: key.to_string(),
            problem,
        };
        if self.node_id == 0 {
            return Err(err("node_id", "must be greater than 0".into()));
        }
        if let Some(dr) = &self.dr
            && let Err((key, problem)) = dr.validate()
        {
            return Err(err(&key, problem));
        }
        if let Some(level) = &self.log_level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            return Err(err("log_level", format!("not a log filter: {e}")));
        }
        if let Some(problem) = name_problem(&self.name) {
            return Err(err("name", problem));
        }
        if let Some(n) = self.nice
            && !(-20..=19).contains(&n)
        {
            return Err(err(
                "nice",
                format!("{n} is not a nice value: must be from -20 to 19"),
            ));
        }
        if let Some(v) = &self.fence_cgroup
            && let Err(e) = FenceCgroup::parse(v)
        {
            return Err(err("fence_cgroup", e.to_string()));
        }
        let mut seen = HashSet::new();
        for (i, role) in self.roles.iter().enumerate() {
            let key = format!("roles[{i}]");
            if let Some(problem) = name_problem(role) {
                return Err(err(&key, problem));
            }
            if !seen.insert(role.as_str()) {
                return Err(err(&key, format!("duplicate role {role:?}")));
            }
        }
        match self.advertise {
            None if self.listen.ip().is_unspecified() => {
                return Err(err(
                    "listen",
                    format!(
                        "{} is a wildcard address other nodes cannot dial; set `advertise` to the address they should use",
                        self.listen
                    ),
                ));
            }
            Some(a) if a.ip().is_unspecified() || a.port() == 0 => {
                return Err(err(
                    "advertise",
                    format!("{a} cannot be dialled: give a concrete address and port"),
                ));
            }
            _ => {}
        }
        if let Some(ip) = &self.mgmt_ip
            && let Err(e) = spaced_fabric::check_mgmt_ip(ip)
        {
            return Err(err("mgmt_ip", e.to_string()));
        }
        let l = &self.lease;
        if l.duration_ms == 0 {
            return Err(err("lease.duration_ms", "must be greater than 0".into()));
        }
        if l.renew_every_ms == 0 || l.renew_every_ms * 2 > l.duration_ms {
            return Err(err(
                "lease.renew_every_ms",
                format!(
                    "must be between 1 and half of lease.duration_ms ({})",
                    l.duration_ms
                ),
            ));
        }
        if !(0.0..1.0).contains(&l.drift) {
            return Err(err("lease.drift", "must be a fraction in [0, 1)".into()));
        }
        let mut vip_names = HashSet::new();
        for (i, v) in self.vips.iter().enumerate() {
            if let Some(problem) = name_problem(&v.name) {
                return Err(err(&format!("vip[{i}].name"), problem));
            }
            if !vip_names.insert(v.name.as_str()) {
                return Err(err(
                    &format!("vip[{i}].name"),
                    format!("duplicate VIP {:?}", v.name),
                ));
            }
            if let Err(e) = spaced_fabric::check_vip_address(&v.address) {
                return Err(err(&format!("vip[{i}].address"), e.to_string()));
            }
            if v.interface.is_empty() || v.interface.len() > 15 {
                return Err(err(
                    &format!("vip[{i}].interface"),
                    "not a Linux interface name".into(),
                ));
            }
            if v.roles.is_empty() {
                return Err(err(
                    &format!("vip[{i}].roles"),
                    "at least one eligible role is required".into(),
                ));
            }
            for (j, r) in v.roles.iter().enumerate() {
                if let Some(problem) = name_problem(r) {
                    return Err(err(&format!("vip[{i}].roles[{j}]"), problem));
                }
            }
            if self.takeover == TakeoverMode::Loopback && v.port.is_none() {
                return Err(err(
                    &format!("vip[{i}].port"),
                    "required with takeover = \"loopback\"".into(),
                ));
            }
        }
        if let Some(lb) = &self.lb {
            if !self.vips.iter().any(|v| v.name == lb.vip) {
                return Err(err(
                    "lb.vip",
                    format!(
                        "no [[vip]] named {:?} in this file (the balancer needs its address)",
                        lb.vip
                    ),
                ));
            }
            if lb.ports.is_empty() {
                return Err(err("lb.ports", "at least one port is required".into()));
            }
            let mut listen_ports = HashSet::new();
            for (i, p) in lb.ports.iter().enumerate() {
                if p.listen == 0 || p.backend == 0 {
                    return Err(err(
                        &format!("lb.ports[{i}]"),
                        "port 0 is not usable".into(),
                    ));
                }
                if !listen_ports.insert(p.listen) {
                    return Err(err(
                        &format!("lb.ports[{i}].listen"),
                        format!("port {} listed twice", p.listen),
                    ));
                }
            }
            if let Some(problem) = name_problem(&lb.backend_role) {
                return Err(err("lb.backend_role", problem));
            }
            if let Err(problem) = lb.policy.parse::<spaced_lb::backend::Policy>() {
                return Err(err("lb.policy", problem));
            }
            if lb.max_conns == 0 {
                return Err(err("lb.max_conns", "must be greater than 0".into()));
            }
            for (key, value) in [
                ("lb.connect_timeout_ms", lb.connect_timeout_ms),
                ("lb.idle_timeout_s", lb.idle_timeout_s),
                ("lb.peek_timeout_ms", lb.peek_timeout_ms),
            ] {
                if value == 0 {
                    return Err(err(key, "must be greater than 0".into()));
                }
            }
            if lb.threads == 0 || lb.threads > MAX_LB_THREADS {
                return Err(err(
                    "lb.threads",
                    format!("must be from 1 to {MAX_LB_THREADS}, not {}", lb.threads),
                ));
            }
            if lb.health_interval_ms > 0 && (lb.rise == 0 || lb.fall == 0) {
                return Err(err(
                    if lb.rise == 0 { "lb.rise" } else { "lb.fall" },
                    "must be at least 1".into(),
                ));
            }
        }
        for (key, path) in [
            ("data_dir", &self.data_dir),
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(err(key, "must not be empty".into()));
            }
        }
        let r = &self.raft;
        for (key, value) in [
            ("raft.heartbeat_interval_ms", r.heartbeat_interval_ms),
            ("raft.election_timeout_min_ms", r.election_timeout_min_ms),
            ("raft.election_timeout_max_ms", r.election_timeout_max_ms),
            ("raft.snapshot_after_logs", r.snapshot_after_logs),
            ("raft.logs_kept_after_snapshot", r.logs_kept_after_snapshot),
        ] {
            if value == 0 {
                return Err(err(key, "must be greater than 0".into()));
            }
        }
        if r.election_timeout_min_ms >= r.election_timeout_max_ms {
            return Err(err(
                "raft.election_timeout_min_ms",
                format!(
                    "must be less than raft.election_timeout_max_ms ({} >= {})",
                    r.election_timeout_min_ms, r.election_timeout_max_ms
                ),
            ));
        }
        if r.heartbeat_interval_ms >= r.election_timeout_min_ms {
            return Err(err(
                "raft.heartbeat_interval_ms",
                format!(
                    "must be less than raft.election_timeout_min_ms ({} >= {})",
                    r.heartbeat_interval_ms, r.election_timeout_min_ms
                ),
            ));
        }
        // After the Raft checks: these compare against Raft's timing.
        let d = &self.devices;
        for (key, value) in [
            ("devices.keepalive_interval_s", d.keepalive_interval_s),
            ("devices.down_after_s", d.down_after_s),
            ("devices.connect_timeout_s", d.connect_timeout_s),
        ] {
            if value == 0 {
                return Err(err(key, "must be greater than 0".into()));
            }
        }
        if d.lost_after_ms < 4 * self.raft.heartbeat_interval_ms {
            return Err(err(
                "devices.lost_after_ms",
                format!(
                    "must be at least 4 × raft.heartbeat_interval_ms ({} < {})",
                    d.lost_after_ms,
                    4 * self.raft.heartbeat_interval_ms
                ),
            ));
        }
        if d.down_after_s < d.keepalive_interval_s {
            return Err(err(
                "devices.down_after_s",
                format!(
                    "must be at least devices.keepalive_interval_s ({} < {})",
                    d.down_after_s, d.keepalive_interval_s
                ),
            ));
        }
        if self.services.log_max_bytes < MIN_SERVICE_LOG_BYTES {
            return Err(err(
                "services.log_max_bytes",
                format!(
                    "must be at least {MIN_SERVICE_LOG_BYTES} ({} < {MIN_SERVICE_LOG_BYTES})",
                    self.services.log_max_bytes
                ),
            ));
        }
        if self.services.log_files > MAX_SERVICE_LOG_FILES {
            return Err(err(
                "services.log_files",
                format!(
                    "must be at most {MAX_SERVICE_LOG_FILES} ({} > {MAX_SERVICE_LOG_FILES})",
                    self.services.log_files
                ),
            ));
        }
        Ok(())
    }
}

/// Joins a relative `path` onto `base`; absolute paths are kept as they are.
fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Returns why `name` is not a valid node/role name, or `None` if it is.
fn name_problem(name: &str) -> Option<String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty() || name.len() > 63 {
        Some(format!("{name:?} must be 1 to 63 characters long"))
    } else if !valid_chars {
        Some(format!("{name:?} may only contain a-z, 0-9 and '-'"))
    } else if name.starts_with('-') || name.ends_with('-') {
        Some(format!("{name:?} must not start or end with '-'"))
    } else {
        None
    }
}

/// 1-based (line, column) of byte `offset` in `text`, column counted in characters.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Collapses a possibly multi-line message into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn syntax_error(e: toml::de::Error, text: &str, source: &Path) -> ConfigError {
    let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
    ConfigError::Syntax {
        file: source.to_path_buf(),
        line,
        column,
        message: one_line(e.message()),
    }
}

/// Text between the first pair of backticks in `s`.
fn backticked(s: &str) -> Option<&str> {
    let rest = s.split_once('`')?.1;
    Some(rest.split_once('`')?.0)
}

fn deser_error(
    e: serde_path_to_error::Error<toml::de::Error>,
    text: &str,
    source: &Path,
) -> ConfigError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let message = one_line(inner.message());
    let at_root = path == ".";
    let join = |field: &str| {
        if at_root {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    // serde's standard wording for missing and unknown fields names the field in backticks;
    // the path then points at the enclosing table, so append the field to it.
    let (key, problem) = if let Some(rest) = message.strip_prefix("missing field ") {
        match backticked(rest) {
            Some(field) => (Some(join(field)), "missing".to_string()),
            None => (None, message.clone()),
        }
    } else if let Some(rest) = message.strip_prefix("unknown field ") {
        match backticked(rest) {
            Some(field) => {
                let key = if path.ends_with(field) {
                    path.clone()
                } else {
                    join(field)
                };
                let hint = rest
                    .split_once(", expected ")
                    .map(|(_, expected)| format!(" (expected {expected})"))
                    .unwrap_or_default();
                (Some(key), format!("unknown key{hint}"))
            }
            None => (None, message.clone()),
        }
    } else {
        let location = inner
            .span()
            .map(|s| {
                let (line, column) = line_col(text, s.start);
                format!(" (line {line}, column {column})")
            })
            .unwrap_or_default();
        let problem = format!("{message}{location}");
        if at_root {
            (None, problem)
        } else {
            (Some(path.clone()), problem)
        }
    };
    match key {
        Some(key) => ConfigError::Key {
            file: source.to_path_buf(),
            key,
            problem,
        },
        None => ConfigError::Document {
            file: source.to_path_buf(),
            problem,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_section_new_is_what_a_file_naming_only_vip_and_ports_gives() {
        let parsed: LbSection =
            toml::from_str("vip = \"cluster\"\nports = [{ listen = 80, backend = 8080 }]\n")
                .unwrap();
        let ports = vec![LbPort {
            listen: 80,
            backend: 8080,
        }];
        assert_eq!(LbSection::new("cluster", ports), parsed);
    }

    const FULL: &str = r#"
node_id = 1
name = "n1"
data_dir = "data/n1"
listen = "127.0.0.1:7001"
metrics = "127.0.0.1:9101"
roles = ["ha", "app"]
[tls]
ca = "pki/ca.pem"
cert = "pki/n1.pem"
key = "/abs/n1.key"
[raft]
heartbeat_interval_ms = 50
election_timeout_min_ms = 300
election_timeout_max_ms = 600
snapshot_after_logs = 500
logs_kept_after_snapshot = 20
[dr]
site = "east"
role = "active"
listen = "0.0.0.0:7443"
peer_site = "west"
peers = ["10.2.0.1:7443", "west-2.example:7443"]
peer_ca = "pki/west-ca.pem"
"#;

    const MINIMAL: &str = r#"
node_id = 7
name = "node-7"
data_dir = "d"
listen = "127.0.0.1:7001"
[tls]
ca = "ca.pem"
cert = "n.pem"
key = "n.key"
"#;

    fn src() -> &'static Path {
        Path::new("/etc/spaced/n1.toml")
    }

    fn err_of(text: &str) -> String {
        let e = NodeConfig::parse_str(text, src()).expect_err("should fail");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line message: {msg}");
        assert!(msg.starts_with("config /etc/spaced/n1.toml: "), "{msg}");
        msg
    }

    /// MINIMAL with `line` replaced (matched by its key) or appended.
    fn minimal_with(key: &str, line: &str) -> String {
        let mut out = String::new();
        let mut replaced = false;
        for l in MINIMAL.lines() {
            if l.starts_with(&format!("{key} =")) {
                out.push_str(line);
                replaced = true;
            } else {
                out.push_str(l);
            }
            out.push('\n');
        }
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    fn with_raft(body: &str) -> String {
        format!("{MINIMAL}[raft]\n{body}\n")
    }

    #[test]
    fn full_config_parses_and_resolves_paths() {
        let c = NodeConfig::parse_str(FULL, src()).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.name, "n1");
        assert_eq!(c.data_dir, PathBuf::from("/etc/spaced/data/n1"));
        assert_eq!(c.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.metrics, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(c.roles, vec!["ha", "app"]);
        assert_eq!(c.tls.ca, PathBuf::from("/etc/spaced/pki/ca.pem"));
        assert_eq!(c.tls.cert, PathBuf::from("/etc/spaced/pki/n1.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/n1.key"));
        assert_eq!(c.raft.heartbeat_interval_ms, 50);
        assert_eq!(c.raft.logs_kept_after_snapshot, 20);
        assert_eq!(c.source, src());
        let dr = c.dr.expect("[dr]");
        assert_eq!(dr.peer_ca, PathBuf::from("/etc/spaced/pki/west-ca.pem"));
        assert_eq!(dr.heartbeat_interval_ms, 1_000);
        assert_eq!(dr.peers.len(), 2);
    }

    #[test]
    fn a_bad_dr_section_names_its_key() {
        let dr = |extra: &str| {
            format!(
                "{MINIMAL}[dr]\nsite = \"east\"\nrole = \"active\"\nlisten = \"0.0.0.0:7443\"\n\
                 peer_site = \"west\"\npeer_ca = \"w.pem\"\n{extra}\n"
            )
        };
        let msg = err_of(&dr("peers = []"));
        assert!(msg.contains("key `dr.peers`"), "{msg}");
        let msg = err_of(&dr("peers = [\"10.2.0.1\"]"));
        assert!(
            msg.contains("key `dr.peers[0]`") && msg.contains("host:port"),
            "{msg}"
        );
        let msg = err_of(&dr("peers = [\"10.2.0.1:7443\"]\nrole2 = 1"));
        assert!(msg.contains("role2"), "{msg}");
        assert!(NodeConfig::parse_str(&dr("peers = [\"10.2.0.1:7443\"]"), src()).is_ok());
    }

    #[test]
    fn relative_source_resolves_relative_to_its_directory() {
        let c = NodeConfig::parse_str(MINIMAL, Path::new("conf/n.toml")).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("conf/d"));
        let c = NodeConfig::parse_str(MINIMAL, Path::new("n.toml")).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("d"));
        assert_eq!(c.tls.ca, PathBuf::from("ca.pem"));
    }

    #[test]
    fn defaults_apply() {
        let c = NodeConfig::parse_str(MINIMAL, src()).unwrap();
        assert_eq!(c.metrics, None);
        assert!(c.roles.is_empty());
        assert_eq!(c.raft, RaftTimings::default());
        assert_eq!(
            RaftTimings::default(),
            RaftTimings {
                heartbeat_interval_ms: 25,
                election_timeout_min_ms: 100,
                election_timeout_max_ms: 200,
                snapshot_after_logs: 10000,
                logs_kept_after_snapshot: 1000,
            }
        );
        assert_eq!(c.lease, TimingProfile::Default.lease());
        assert_eq!((c.lease.duration_ms, c.lease.renew_every_ms), (150, 30));
        // A partial [raft] table keeps the defaults for the keys it omits.
        let c = NodeConfig::parse_str(&with_raft("snapshot_after_logs = 5"), src()).unwrap();
        assert_eq!(c.raft.snapshot_after_logs, 5);
        assert_eq!(c.raft.heartbeat_interval_ms, 25);
    }

    #[test]
    fn a_timing_profile_sets_the_keys_not_given() {
        let with = |top: &str, tables: &str| {
            let (head, rest) = MINIMAL.split_once("[tls]").unwrap();
            format!("{head}{top}\n[tls]{rest}{tables}")
        };
        for profile in [
            TimingProfile::Fast,
            TimingProfile::Default,
            TimingProfile::Wan,
        ] {
            let text = with(&format!("timing = \"{}\"", profile.name()), "");
            let c = NodeConfig::parse_str(&text, src()).unwrap();
            assert_eq!(c.timing, profile);
            assert_eq!(c.raft, profile.raft(), "{}", profile.name());
            assert_eq!(c.lease, profile.lease(), "{}", profile.name());
            // Every profile passes the checks the keys are held to.
            c.validate().unwrap();
        }
        // Keys given win over the profile's; the others are the profile's, not the default's.
        let text = with(
            "timing = \"wan\"",
            "[lease]\nduration_ms = 900\n[raft]\nsnapshot_after_logs = 7\n",
        );
        let c = NodeConfig::parse_str(&text, src()).unwrap();
        assert_eq!(c.lease.duration_ms, 900);
        assert_eq!(
            c.lease.renew_every_ms,
            TimingProfile::Wan.lease().renew_every_ms
        );
        assert_eq!(c.raft.snapshot_after_logs, 7);
        assert_eq!(c.raft.election_timeout_max_ms, 2_000);
        // What to_toml writes reads back the same.
        let back = NodeConfig::parse_str(&c.to_toml(), src()).unwrap();
        assert_eq!(
            (back.timing, &back.raft, &back.lease),
            (c.timing, &c.raft, &c.lease)
        );
        // A given key that does not fit the profile's others is named.
        let msg = err_of(&with(
            "timing = \"fast\"",
            "[raft]\nheartbeat_interval_ms = 70\n",
        ));
        assert!(
            msg.contains("key `raft.heartbeat_interval_ms`: must be less than"),
            "{msg}"
        );
        let msg = err_of(&with("timing = \"quick\"", ""));
        assert!(msg.contains("timing") && msg.contains("quick"), "{msg}");
    }

    #[test]
    fn to_toml_round_trips() {
        for text in [FULL, MINIMAL] {
            let c = NodeConfig::parse_str(text, src()).unwrap();
            let out = c.to_toml();
            let back = NodeConfig::parse_str(&out, Path::new("/elsewhere/x.toml")).unwrap();
            assert_eq!(back.source, Path::new("/elsewhere/x.toml"));
            assert_eq!(
                NodeConfig {
                    source: c.source.clone(),
                    ..back
                },
                c,
                "{out}"
            );
        }
    }

    #[test]
    fn load_reads_file_and_reports_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = NodeConfig::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("d"));
        assert_eq!(c.source, path);

        let missing = dir.path().join("nope.toml");
        let msg = NodeConfig::load(&missing).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("config {}: cannot read file: ", missing.display())),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let msg = err_of("node_id = 1\nname = \"n1\n");
        assert!(msg.contains("TOML syntax error at line 2, column"), "{msg}");
        let msg = err_of("node_id = 1\nnode_id = 2\n");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn missing_keys_are_named() {
        let no_id = MINIMAL.replace("node_id = 7\n", "");
        assert!(
            err_of(&no_id).ends_with("key `node_id`: missing"),
            "{}",
            err_of(&no_id)
        );
        let no_ca = MINIMAL.replace("ca = \"ca.pem\"\n", "");
        assert!(
            err_of(&no_ca).ends_with("key `tls.ca`: missing"),
            "{}",
            err_of(&no_ca)
        );
        let no_tls = MINIMAL.split("[tls]").next().unwrap().to_string();
        assert!(
            err_of(&no_tls).ends_with("key `tls`: missing"),
            "{}",
            err_of(&no_tls)
        );
    }

    #[test]
    fn devices_section_defaults_parses_and_bad_values_are_named() {
        let c = NodeConfig::parse_str(MINIMAL, src()).unwrap();
        assert_eq!(c.devices.keepalive_interval_s, 40);
        assert_eq!(c.devices.down_after_s, 900);
        assert_eq!(c.devices.listen, Some("0.0.0.0:7804".parse().unwrap()));
        let c = NodeConfig::parse_str(
            &format!("{MINIMAL}[devices]\nlisten = \"off\"\ndown_after_s = 60\n"),
            src(),
        )
        .unwrap();
        assert_eq!(c.devices.listen, None);
        assert_eq!(c.devices.down_after_s, 60);
        assert_eq!(c.devices.keepalive_interval_s, 40);
        let back = NodeConfig::parse_str(&c.to_toml(), src()).unwrap();
        assert_eq!(back.devices, c.devices);
        let c = NodeConfig::parse_str(
            &format!("{MINIMAL}[devices]\nlisten = \"127.0.0.1:17804\"\n"),
            src(),
        )
        .unwrap();
        assert_eq!(c.devices.listen, Some("127.0.0.1:17804".parse().unwrap()));
        assert_eq!(
            NodeConfig::parse_str(&c.to_toml(), src()).unwrap().devices,
            c.devices
        );

        for (body, key, problem) in [
            (
                "listen = \"nowhere\"",
                "devices.listen",
                "expected \"off\" or ip:port",
            ),
            (
                "keepalive_interval_s = 0",
                "devices.keepalive_interval_s",
                "greater than 0",
            ),
            (
                "down_after_s = 10",
                "devices.down_after_s",
                "at least devices.keepalive_interval_s",
            ),
            (
                "connect_timeout_s = 0",
                "devices.connect_timeout_s",
                "greater than 0",
            ),
            (
                "lost_after_ms = 90",
                "devices.lost_after_ms",
                "at least 4 × raft.heartbeat_interval_ms (90 < 100)",
            ),
            ("keepalive = 5", "devices.keepalive", "unknown key"),
        ] {
            let msg = err_of(&format!("{MINIMAL}[devices]\n{body}\n"));
            assert!(
                msg.contains(&format!("key `{key}`")) && msg.contains(problem),
                "{key}: {msg}"
            );
        }
    }

    #[test]
    fn services_section_defaults_parses_and_bad_values_are_named() {
        let c = NodeConfig::parse_str(MINIMAL, src()).unwrap();
        assert_eq!(c.services, ServicesSection::default());
        // Left out when default: builds that predate the section load what this one writes.
        assert!(!c.to_toml().contains("[services]"), "{}", c.to_toml());
        assert_eq!(
            (c.services.log_max_bytes, c.services.log_files),
            (10 * 1024 * 1024, 5)
        );
        let c = NodeConfig::parse_str(
            &format!(
                "{MINIMAL}[services]
log_max_bytes = 1048576
log_files = 0
"
            ),
            src(),
        )
        .unwrap();
        assert_eq!(
            (c.services.log_max_bytes, c.services.log_files),
            (1 << 20, 0)
        );
        let back = NodeConfig::parse_str(&c.to_toml(), src()).unwrap();
        assert_eq!(back.services, c.services);
        for (body, key, problem) in [
            (
                "log_max_bytes = 1000",
                "services.log_max_bytes",
                "at least 16384 (1000 < 16384)",
            ),
            (
                "log_files = 101",
                "services.log_files",
                "at most 100 (101 > 100)",
            ),
            (
                "log_max_bytes = -1",
                "services.log_max_bytes",
                "invalid value",
            ),
            ("max_files = 3", "services.max_files", "unknown key"),
        ] {
            let msg = err_of(&format!("{MINIMAL}[services]\n{body}\n"));
            assert!(
                msg.contains(&format!("key `{key}`")) && msg.contains(problem),
                "{key}: {msg}"
            );
        }
    }

    #[test]
    fn lb_section_parses_and_bad_values_are_named() {
        let vip = "[[vip]]\nname = \"cluster\"\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\nroles = [\"ha\"]\n";
        let good = format!(
            "{MINIMAL}{vip}[lb]\nvip = \"cluster\"\npolicy = \"sticky\"\nports = [{{ listen = 80, backend = 8080 }}]\n"
        );
        let c = NodeConfig::parse_str(&good, src()).unwrap();
        let lb = c.lb.as_ref().unwrap();
        assert_eq!(lb.backend_role, "app");
        assert_eq!(
            lb.ports,
            vec![LbPort {
                listen: 80,
                backend: 8080
            }]
        );
        let b = lb.balancer_config();
        assert_eq!(b.policy, spaced_lb::backend::Policy::Sticky);
        assert_eq!(b.health.unwrap().fall, 3);
        let back = NodeConfig::parse_str(&c.to_toml(), src()).unwrap();
        assert_eq!(back.lb, c.lb);

        for (text, key, problem) in [
            (
                good.replace("policy = \"sticky\"", "policy = \"random\""),
                "lb.policy",
                "unknown balancing policy",
            ),
            (
                good.replace("vip = \"cluster\"\npolicy", "vip = \"other\"\npolicy"),
                "lb.vip",
                "no [[vip]] named",
            ),
            (
                good.replace("listen = 80", "listen = 0"),
                "lb.ports[0]",
                "port 0",
            ),
            (
                good.replace("[{ listen = 80, backend = 8080 }]", "[]"),
                "lb.ports",
                "at least one",
            ),
            (
                format!("{good}max_conns = 0\n"),
                "lb.max_conns",
                "greater than 0",
            ),
            (format!("{good}fall = 0\n"), "lb.fall", "at least 1"),
        ] {
            let msg = err_of(&text);
            assert!(
                msg.contains(&format!("key `{key}`")) && msg.contains(problem),
                "{key}: {msg}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let msg = err_of(&with_raft("heartbeat_ms = 5"));
        assert!(
            msg.contains("key `raft.heartbeat_ms`: unknown key"),
            "{msg}"
        );
        let msg = err_of(&minimal_with("colour", "colour = 1"));
        // appended after [tls], so it lands in the tls table
        assert!(msg.contains("key `tls.colour`: unknown key"), "{msg}");
        let msg = err_of(&format!("colour = 1\n{MINIMAL}"));
        assert!(msg.contains("key `colour`: unknown key"), "{msg}");
    }

    #[test]
    fn type_errors_are_named() {
        let msg = err_of(&minimal_with("node_id", "node_id = \"x\""));
        assert!(
            msg.contains("key `node_id`: invalid type: string \"x\", expected u64"),
            "{msg}"
        );
        let msg = err_of(&minimal_with("listen", "listen = \"nowhere\""));
        assert!(msg.contains("key `listen`: "), "{msg}");
        let msg = err_of(&minimal_with("node_id", "node_id = -1"));
        assert!(msg.contains("key `node_id`: "), "{msg}");
        let msg = err_of(&format!("roles = [\"a\", 3]\n{MINIMAL}"));
        assert!(msg.contains("key `roles[1]`: "), "{msg}");
        let msg = err_of(&with_raft("snapshot_after_logs = true"));
        assert!(
            msg.contains("key `raft.snapshot_after_logs`: invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn mgmt_ip_parses_and_unusable_ones_are_named() {
        let c =
            NodeConfig::parse_str(&format!("mgmt_ip = \"192.0.2.11\"\n{MINIMAL}"), src()).unwrap();
        assert_eq!(c.mgmt_ip, Some("192.0.2.11".parse().unwrap()));
        assert_eq!(NodeConfig::parse_str(&c.to_toml(), src()).unwrap(), c);
        for bad in ["0.0.0.0", "239.1.1.1"] {
            let msg = err_of(&format!("mgmt_ip = \"{bad}\"\n{MINIMAL}"));
            assert!(
                msg.contains("key `mgmt_ip`: ") && msg.contains("unicast"),
                "{msg}"
            );
        }
        let msg = err_of(&format!("mgmt_ip = \"eth0\"\n{MINIMAL}"));
        assert!(msg.contains("mgmt_ip"), "{msg}");
    }

    #[test]
    fn the_config_value_is_a_plain_relative_path_or_none() {
        assert_eq!(FenceCgroup::parse("none"), Ok(FenceCgroup::Off));
        assert_eq!(
            FenceCgroup::parse("/spaced-fence"),
            Ok(FenceCgroup::Under("spaced-fence".into()))
        );
        assert_eq!(
            FenceCgroup::parse("system.slice/spaced-fence.scope"),
            Ok(FenceCgroup::Under("system.slice/spaced-fence.scope".into()))
        );
        for bad in ["", "/", "a//b", "../x", "a/./b", "a b", "cgroup.procs"] {
            let e = FenceCgroup::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn the_fence_cgroup_defaults_parses_and_bad_values_are_named() {
        let c = NodeConfig::parse_str(MINIMAL, src()).unwrap();
        assert_eq!(c.fence_cgroup(), FenceCgroup::Under("spaced-fence".into()));
        let c =
            NodeConfig::parse_str(&format!("fence_cgroup = \"none\"\n{MINIMAL}"), src()).unwrap();
        assert_eq!(c.fence_cgroup(), FenceCgroup::Off);
        assert_eq!(NodeConfig::parse_str(&c.to_toml(), src()).unwrap(), c);
        let msg = err_of(&format!("fence_cgroup = \"../x\"\n{MINIMAL}"));
        assert!(
            msg.contains("key `fence_cgroup`: \"../x\" is not a cgroup path"),
            "{msg}"
        );
    }

    #[test]
    fn nice_is_optional_kept_and_out_of_range_values_are_named() {
        assert_eq!(NodeConfig::parse_str(MINIMAL, src()).unwrap().nice, None);
        let c = NodeConfig::parse_str(&format!("nice = -5\n{MINIMAL}"), src()).unwrap();
        assert_eq!(c.nice, Some(-5));
        assert_eq!(NodeConfig::parse_str(&c.to_toml(), src()).unwrap(), c);
        for bad in ["-21", "20"] {
            let msg = err_of(&format!("nice = {bad}\n{MINIMAL}"));
            assert!(
                msg.contains(&format!(
                    "key `nice`: {bad} is not a nice value: must be from -20 to 19"
                )),
                "{msg}"
            );
        }
        assert!(err_of(&format!("nice = \"high\"\n{MINIMAL}")).contains("nice"));
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_advertised_one() {
        let msg = err_of(&minimal_with("listen", "listen = \"0.0.0.0:7001\""));
        assert!(
            msg.contains("key `listen`: 0.0.0.0:7001 is a wildcard") && msg.contains("advertise"),
            "{msg}"
        );
        for bad in ["0.0.0.0:7001", "10.0.0.1:0"] {
            let text = format!("advertise = \"{bad}\"\n{MINIMAL}");
            let msg = err_of(&text);
            assert!(
                msg.contains("key `advertise`: ") && msg.contains(bad),
                "{msg}"
            );
        }
        let text = minimal_with(
            "listen",
            "listen = \"0.0.0.0:7001\"\nadvertise = \"10.0.0.1:7001\"",
        );
        let c = NodeConfig::parse_str(&text, src()).unwrap();
        assert_eq!(c.advertise, Some("10.0.0.1:7001".parse().unwrap()));
        assert_eq!(NodeConfig::parse_str(&c.to_toml(), src()).unwrap(), c);
    }

    #[test]
    fn semantic_errors_are_named() {
        let msg = err_of(&minimal_with("node_id", "node_id = 0"));
        assert!(
            msg.contains("key `node_id`: must be greater than 0"),
            "{msg}"
        );
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            let msg = err_of(&minimal_with("name", &format!("name = {bad:?}")));
            assert!(msg.contains("key `name`: "), "{msg}");
        }
        assert!(
            NodeConfig::parse_str(
                &minimal_with("name", &format!("name = {:?}", "a".repeat(63))),
                src()
            )
            .is_ok()
        );
        let msg = err_of(&format!("roles = [\"ha\", \"Bad\"]\n{MINIMAL}"));
        assert!(msg.contains("key `roles[1]`: "), "{msg}");
        let msg = err_of(&format!("roles = [\"ha\", \"ha\"]\n{MINIMAL}"));
        assert!(msg.contains("key `roles[1]`: duplicate role"), "{msg}");
        let msg = err_of(&minimal_with("data_dir", "data_dir = \"\""));
        assert!(msg.contains("key `data_dir`: must not be empty"), "{msg}");
        let msg = err_of(&with_raft("election_timeout_min_ms = 800"));
        assert!(
            msg.contains("key `raft.election_timeout_min_ms`: must be less than"),
            "{msg}"
        );
        let msg = err_of(&with_raft("heartbeat_interval_ms = 400"));
        assert!(
            msg.contains("key `raft.heartbeat_interval_ms`: must be less than"),
            "{msg}"
        );
        let msg = err_of(&with_raft("heartbeat_interval_ms = 0"));
        assert!(
            msg.contains("key `raft.heartbeat_interval_ms`: must be greater than 0"),
            "{msg}"
        );
        let msg = err_of(&with_raft("snapshot_after_logs = 0"));
        assert!(
            msg.contains("key `raft.snapshot_after_logs`: must be greater than 0"),
            "{msg}"
        );
    }

    #[test]
    fn line_col_handles_edges() {
        assert_eq!(line_col("", 5), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 1), (1, 1));
    }
}
