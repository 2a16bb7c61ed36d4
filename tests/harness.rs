//! Test harness: in-process clusters of real nodes on 127.0.0.1 (real QUIC, real sled), plus
//! helpers to find the `spaced`/`spacectl` binaries for process-level tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::{DeviceMode, Fabric, NewDevice};
use spaced_node::admin::client::{AdminClient, AdminCredentials};
use spaced_node::admin::{AdminReply, AdminRequest};
use spaced_node::node::Node;
use spaced_node::ops::config::{DevicesSection, NodeConfig, RaftTimings, TlsSection};
use spaced_raft::NodeId;
use spaced_raft::pki;

/// Logs to stderr when `SPACED_TEST_LOG` is set (e.g. `SPACED_TEST_LOG=info`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("SPACED_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Creates a CA, an admin cert `admin-test` and node certs `n1..=nodes` in `dir`.
pub fn make_pki(dir: &Path, nodes: u64) -> Result<()> {
    pki::init_ca(dir)?;
    pki::issue(dir, "test", true)?;
    for id in 1..=nodes {
        pki::issue(dir, &format!("n{id}"), false)?;
    }
    Ok(())
}

/// A node config for node `id` with its files under `dir` and certs in `pki_dir`.
pub fn node_config(dir: &Path, pki_dir: &Path, id: NodeId, raft: RaftTimings) -> NodeConfig {
    let name = format!("n{id}");
    NodeConfig {
        node_id: id,
        name: name.clone(),
        data_dir: dir.join(format!("data-{name}")),
        listen: format!("127.0.0.1:{}", free_udp_port())
            .parse()
            .expect("loopback address"),
        advertise: None,
        mgmt_ip: None,
        metrics: None,
        log_level: None,
        roles: vec!["ha".into(), "app".into()],
        timing: Default::default(),
        tls: TlsSection {
            ca: pki_dir.join("ca.pem"),
            cert: pki_dir.join(format!("{name}.pem")),
            key: pki_dir.join(format!("{name}.key")),
        },
        raft,
        lease: Default::default(),
        takeover: Default::default(),
        vips: Vec::new(),
        garp_refresh_s: 0,
        nice: None,
        fence_cgroup: None,
        lb: None,
        // Several nodes share the host: each takes its own device port.
        devices: DevicesSection {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            ..DevicesSection::default()
        },
        services: Default::default(),
        dr: None,
        source: dir.join(format!("{name}.toml")),
    }
}

/// An address no device answers on: a loopback address, port 1, where nothing listens. The
/// nodes' device agents connect to every device they own, so test devices must not point at
/// real networks; a refused loopback connect costs next to nothing.
pub fn unreachable_device_addr(i: usize) -> String {
    format!(
        "127.{}.{}.{}:1",
        20 + (i / 65536) % 200,
        (i / 256) % 256,
        i % 256
    )
}

/// `n` devices with ids `prefix-0..`, at addresses nobody answers on.
pub fn devices(prefix: &str, n: usize) -> Vec<NewDevice> {
    (0..n)
        .map(|i| NewDevice {
            id: format!("{prefix}-{i}"),
            addr: unreachable_device_addr(i),
            mode: DeviceMode::SpaceInitiated,
        })
        .collect()
}

/// `f` without what the nodes change on their own while a test runs: device owners (the
/// leader's planner assigns them) and device status (their owners' agents report it).
/// What is left is what commands sent by a test can change.
pub fn without_device_state(f: Option<Fabric>) -> Option<Fabric> {
    f.map(|mut f| {
        for d in f.devices.values_mut() {
            d.owner = None;
            d.status = Default::default();
            d.since = 0;
        }
        f
    })
}

/// An in-process cluster of real nodes.
pub struct Cluster {
    /// Temp dir holding PKI, data dirs.
    pub dir: tempfile::TempDir,
    /// Running nodes.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Configs of every node ever started, so they can be restarted.
    pub configs: BTreeMap<NodeId, NodeConfig>,
    /// Raft timings used for new nodes.
    pub timings: RaftTimings,
}

impl Cluster {
    /// Where the PKI lives.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// An empty cluster with a PKI for up to `max_nodes` nodes; nothing started.
    pub fn empty(max_nodes: u64, timings: RaftTimings) -> Result<Cluster> {
        init_logging();
        let dir = tempfile::Builder::new().prefix("spaced-test-").tempdir()?;
        make_pki(&dir.path().join("pki"), max_nodes)?;
        Ok(Cluster {
            dir,
            nodes: BTreeMap::new(),
            configs: BTreeMap::new(),
            timings,
        })
    }

    /// Bootstraps node 1 and adds nodes 2..=n through the admin API.
    pub async fn start(n: u64, timings: RaftTimings) -> Result<Cluster> {
        let mut c = Cluster::empty(n.max(8), timings)?;
        c.start_node(1, true).await?;
        c.wait_for(Duration::from_secs(10), "node 1 registered", |c| {
            c.fabric_of(1).is_some_and(|f| f.nodes.contains_key(&1))
        })
        .await?;
        for id in 2..=n {
            c.start_node(id, false).await?;
            c.add_node(id).await?;
        }
        Ok(c)
    }

    /// Starts node `id` (a fresh config the first time, the same config on restart).
    pub async fn start_node(&mut self, id: NodeId, bootstrap: bool) -> Result<()> {
        let cfg = match self.configs.get(&id) {
            Some(c) => c.clone(),
            None => node_config(self.dir.path(), &self.pki_dir(), id, self.timings.clone()),
        };
        // A restarted node may find its UDP port taken by then; retry on a new one.
        let node = Node::start(cfg.clone(), bootstrap)
            .await
            .map_err(|e| anyhow::anyhow!("start node {id}: {e}"))?;
        self.configs.insert(id, cfg);
        self.nodes.insert(id, node);
        Ok(())
    }

    /// Stops node `id` gracefully (as a crash would, it just stops answering).
    pub async fn stop_node(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    /// Crashes node `id`: it stops at once, without hand-over (see [`Node::crash`]).
    pub async fn crash_node(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.crash().await;
        }
    }

    /// Stops every node.
    pub async fn stop_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }

    /// Admin credentials of the test PKI.
    pub fn credentials(&self) -> Result<AdminCredentials> {
        Ok(AdminCredentials::load(&self.pki_dir(), None)?)
    }

    /// An admin client connected to node `id`.
    pub async fn admin(&self, id: NodeId) -> Result<AdminClient> {
        let addr = self
            .nodes
            .get(&id)
            .context("no such running node")?
            .advertise_addr()
            .to_string();
        Ok(AdminClient::connect(&addr, &self.credentials()?).await?)
    }

    /// Adds a started node to the cluster via any running node.
    pub async fn add_node(&self, id: NodeId) -> Result<bool> {
        let via = *self
            .nodes
            .keys()
            .find(|k| **k != id)
            .context("no node to add through")?;
        let mut admin = self.admin(via).await?;
        let node = self.nodes.get(&id).context("node not started")?;
        let req = AdminRequest::AddNode {
            id,
            name: format!("n{id}"),
            addr: node.advertise_addr().to_string(),
            roles: None,
        };
        match admin.call_leader(&req).await? {
            AdminReply::NodeAdded { voter } => Ok(voter),
            other => bail!("add node {id}: {other:?}"),
        }
    }

    /// Current leader as seen by every running node, if they all agree.
    pub fn agreed_leader(&self) -> Option<NodeId> {
        let mut leader = None;
        for n in self.nodes.values() {
            let l = n.raft().metrics().borrow_watched().current_leader?;
            if leader.is_some_and(|x| x != l) || !self.nodes.contains_key(&l) {
                return None;
            }
            leader = Some(l);
        }
        leader
    }

    /// Waits until all running nodes agree on a running leader.
    pub async fn wait_leader(&self, within: Duration) -> Result<NodeId> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.agreed_leader()
                && self.nodes[&l].raft().is_leader()
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The applied fabric of node `id`.
    pub fn fabric_of(&self, id: NodeId) -> Option<Fabric> {
        self.nodes.get(&id).map(|n| n.fabric().read(|f| f.clone()))
    }

    /// Every running node's fabric at one moment when all have applied the same index. Nodes
    /// go on committing by themselves (device assignment and status), so a pair of plain reads
    /// can straddle a commit; this retries until it has a consistent cut. Equal indexes with
    /// different fabrics is a real divergence and fails at once.
    pub async fn agreed_fabric(&self, within: Duration) -> Result<Fabric> {
        let deadline = Instant::now() + within;
        loop {
            let cut: Vec<(NodeId, Option<u64>, Fabric, Option<u64>)> = self
                .nodes
                .iter()
                .map(|(id, n)| {
                    let before = n.fabric().last_applied_index();
                    let f = n.fabric().read(|f| f.clone());
                    (*id, before, f, n.fabric().last_applied_index())
                })
                .collect();
            let steady = cut.iter().all(|(_, a, _, b)| a == b);
            if let Some((first_id, first_at, first, _)) = cut.first()
                && steady
                && cut.iter().all(|(_, at, _, _)| at == first_at)
            {
                for (id, _, f, _) in &cut {
                    if f != first {
                        bail!("node {id} differs from node {first_id} at index {first_at:?}");
                    }
                }
                return Ok(first.clone());
            }
            if Instant::now() > deadline {
                bail!("nodes did not reach one applied index within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `cond` until true or `within` passes.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        cond: impl Fn(&Cluster) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        while !cond(self) {
            if Instant::now() > deadline {
                bail!("timed out after {within:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until every running node has applied the same log index as the leader and returns it.
    pub async fn wait_converged(&self, within: Duration) -> Result<u64> {
        let deadline = Instant::now() + within;
        loop {
            let applied: Vec<Option<u64>> = self
                .nodes
                .values()
                .map(|n| n.fabric().last_applied_index())
                .collect();
            if let Some(Some(first)) = applied.first()
                && applied.iter().all(|a| *a == Some(*first))
            {
                return Ok(*first);
            }
            if Instant::now() > deadline {
                bail!("nodes did not converge within {within:?}: applied {applied:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `f` every 50 ms until it is true; fails naming `what` after `within`.
pub fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a prepared `spacectl` command: its stdout, or an error with the exit code and stderr.
pub fn spacectl_stdout(mut cmd: std::process::Command, args: &[&str]) -> Result<String> {
    let out = cmd.args(args).stdin(std::process::Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "spacectl {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Ids of the nodes in the `refused` list of a `vip list --json` or `singleton list --json` row.
pub fn refusers(row: &serde_json::Value) -> Vec<u64> {
    row["refused"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["node"].as_u64()).collect())
        .unwrap_or_default()
}

/// Builds the Debian package with `contrib/deb/build` (release binaries in
/// `target/package`, a target dir of its own, since the `cargo test` that calls this holds the
/// usual one) and returns the `.deb`'s path, the build's last line.
pub fn build_package(workspace: &Path) -> Result<PathBuf> {
    let out = std::process::Command::new(workspace.join("contrib/deb/build"))
        .env("CARGO_TARGET_DIR", workspace.join("target/package"))
        .current_dir(workspace)
        .stdin(std::process::Stdio::null())
        .output()
        .context("contrib/deb/build")?;
    if !out.status.success() {
        anyhow::bail!(
            "contrib/deb/build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deb = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .context("the build printed nothing")?
            .trim(),
    );
    anyhow::ensure!(deb.exists(), "no package at {}", deb.display());
    Ok(deb)
}

/// target/<profile> of the running test or bench executable (which lives in
/// target/<profile>/deps), where cargo puts the workspace's binaries.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .context("locate the target profile dir")
}

/// Builds the daemon's binaries (`spaced`, `spacectl`) in the profile the running executable
/// was built in, for the benchmarks: `cargo bench` builds only the libraries a bench links, so
/// without this a bench would run whatever `spaced` an earlier build left in the target dir
/// (a fault campaign once ran a daemon two commits older than the tree it reported on).
pub fn build_binaries() -> Result<()> {
    let dir = profile_dir()?;
    let profile = dir
        .file_name()
        .and_then(|p| p.to_str())
        .context("name the target profile dir")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["build", "-q", "-p", "spaced-node", "--bins"]);
    // The dev profile builds into `debug`; every other profile into a dir of its name.
    if profile != "debug" {
        build.args(["--profile", profile]);
    }
    eprintln!("building spaced and spacectl ({profile}) so the run uses the tree's daemon");
    let status = build.status().context("running cargo build for spaced")?;
    anyhow::ensure!(
        status.success(),
        "cargo build -p spaced-node --bins ({profile}) failed: {status}"
    );
    Ok(())
}

/// Path of a workspace binary (`spaced`, `spacectl`). `cargo test --workspace` builds them
/// (spaced-node has integration tests of its own, which makes cargo build its binaries).
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = profile_dir()?.join(name);
    if !path.exists() {
        bail!(
            "binary {} not found: run the tests with `cargo test --workspace` (or `cargo build -p spaced-node` first)",
            path.display()
        );
    }
    Ok(path)
}
pub mod chaos;
pub mod device_farm;
pub mod lab;
pub mod sites;

/// Two one-node sites of a disaster-recovery pair, each its own in-process cluster with its
/// own CA (nothing started): `east` (starts active, loopback VIP 127.0.0.100) and `west`
/// (starts standby, VIP 127.0.0.101, same port), each `[dr]` pointing at the other's DR port
/// and trusting its CA, with a 200 ms heartbeat, 500 ms timeout, 2 retries, these witnesses
/// and a 3 s witness lease.
pub struct DrSites {
    /// The site that starts active.
    pub east: Cluster,
    /// The site that starts standby.
    pub west: Cluster,
    /// East's DR port.
    pub east_dr: u16,
    /// West's DR port.
    pub west_dr: u16,
    /// A UDP port none of them uses (for a link that goes nowhere).
    pub spare_port: u16,
}

/// See [`DrSites`].
pub fn dr_sites(witnesses: &[String]) -> Result<DrSites> {
    use spaced_node::ops::config::{TakeoverMode, VipSection};
    let mut east = Cluster::empty(2, RaftTimings::default())?;
    let mut west = Cluster::empty(2, RaftTimings::default())?;
    // Ports are found free and let go: the DR ports must differ from each other and from
    // the nodes' own (picked when their configs are made, below).
    let mut taken = std::collections::BTreeSet::new();
    let port_apart = |taken: &mut std::collections::BTreeSet<u16>| loop {
        let p = free_udp_port();
        if taken.insert(p) {
            return p;
        }
    };
    let (east_dr, west_dr) = (port_apart(&mut taken), port_apart(&mut taken));
    let spare_port = port_apart(&mut taken);
    let port = free_tcp_port();
    let (east_ca, west_ca) = (east.pki_dir().join("ca.pem"), west.pki_dir().join("ca.pem"));
    for (c, site, peer, role, listen, peer_port, peer_ca, vip) in [
        (
            &mut east,
            "east",
            "west",
            "active",
            east_dr,
            west_dr,
            west_ca,
            "127.0.0.100/8",
        ),
        (
            &mut west,
            "west",
            "east",
            "standby",
            west_dr,
            east_dr,
            east_ca,
            "127.0.0.101/8",
        ),
    ] {
        let mut cfg = node_config(c.dir.path(), &c.pki_dir(), 1, RaftTimings::default());
        // A clash gets another port, which `port_apart` has marked taken already (checking
        // it again in a `while` found it taken and spun for ever: a hang seen in CI).
        if !taken.insert(cfg.listen.port()) {
            cfg.listen.set_port(port_apart(&mut taken));
        }
        cfg.takeover = TakeoverMode::Loopback;
        cfg.vips = vec![VipSection {
            name: "cluster".into(),
            address: vip.into(),
            interface: "lo".into(),
            roles: vec!["ha".into()],
            port: Some(port),
        }];
        cfg.dr = Some(spaced_replication::DrSection {
            site: site.into(),
            role: role.into(),
            listen: format!("127.0.0.1:{listen}").parse()?,
            peer_site: peer.into(),
            peers: vec![format!("127.0.0.1:{peer_port}")],
            peer_ca,
            heartbeat_interval_ms: 200,
            heartbeat_timeout_ms: 500,
            heartbeat_retries: 2,
            witnesses: witnesses.to_vec(),
            witness_lease_ms: 3_000,
            automatic_failover: true,
            isolation_wait_ms: 0,
            failure_detection_script: None,
            script_timeout_ms: 10_000,
            backup: Default::default(),
        });
        c.configs.insert(1, cfg);
    }
    Ok(DrSites {
        east,
        west,
        east_dr,
        west_dr,
        spare_port,
    })
}

/// Bootstraps a one-node site; a listen port taken since it was found free (ports are found
/// free and let go) is replaced by another.
pub async fn start_site(c: &mut Cluster) -> Result<()> {
    for _ in 0..5 {
        match c.start_node(1, true).await {
            Err(e) if e.to_string().contains("key `listen`") => {
                let cfg = c.configs.get_mut(&1).context("config")?;
                cfg.listen.set_port(free_udp_port());
            }
            other => return other,
        }
    }
    bail!("no free UDP port for the node")
}
