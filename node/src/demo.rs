//! `spaced demo`: a real 3-process cluster on loopback — bootstrap, join, register devices, balance
//! through the VIP, kill the VIP owner, a singleton's node and the leader, watch it heal.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spaced_fabric::{AdminState, Command, DeviceMode, NewDevice, ServiceScope, ServiceSpec};
use spaced_raft::pki;

use crate::admin::client::{AdminClient, AdminCredentials, unexpected};
use crate::admin::{AdminReply, AdminRequest};
use crate::ctl::render_status;
use crate::ops::config::{
    DevicesSection, LbPort, LbSection, NodeConfig, RaftTimings, TakeoverMode, TlsSection,
    VipSection,
};

/// Devices the demo registers.
pub const DEMO_DEVICES: usize = 1000;

/// A child `spaced` process that is killed if the demo fails half-way.
pub(crate) struct NodeProcess {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) listen: SocketAddr,
    pub(crate) config: PathBuf,
    pub(crate) child: Option<Child>,
}

impl NodeProcess {
    pub(crate) fn kill(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, signal)
                .with_context(|| format!("signal {} to {}", signal, self.name))?;
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Free UDP port on loopback (QUIC), found by binding port 0.
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Free TCP port on loopback (metrics).
pub fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes a node config into `dir` and returns its path.
pub fn write_node_config(
    dir: &Path,
    pki_dir: &Path,
    id: u64,
    roles: &[&str],
) -> Result<(PathBuf, SocketAddr)> {
    let cfg = node_config(dir, pki_dir, id, roles)?;
    let listen = cfg.listen;
    Ok((write_config(&cfg)?, listen))
}

/// A node config on 127.0.0.1 with free ports, files under `dir`, certificates in `pki_dir`.
pub fn node_config(dir: &Path, pki_dir: &Path, id: u64, roles: &[&str]) -> Result<NodeConfig> {
    let name = format!("n{id}");
    Ok(NodeConfig {
        node_id: id,
        name: name.clone(),
        data_dir: dir.join(format!("data-{name}")),
        listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
        advertise: None,
        mgmt_ip: None,
        metrics: Some(format!("127.0.0.1:{}", free_tcp_port()?).parse()?),
        log_level: None,
        roles: roles.iter().map(|r| r.to_string()).collect(),
        timing: Default::default(),
        tls: TlsSection {
            ca: pki_dir.join("ca.pem"),
            cert: pki_dir.join(format!("{name}.pem")),
            key: pki_dir.join(format!("{name}.key")),
        },
        raft: RaftTimings::default(),
        lease: Default::default(),
        takeover: Default::default(),
        vips: Vec::new(),
        garp_refresh_s: 0,
        nice: None,
        fence_cgroup: None,
        lb: None,
        // Three nodes share the host: each takes its own device port.
        devices: DevicesSection {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..DevicesSection::default()
        },
        services: Default::default(),
        dr: None,
        source: dir.join(format!("{name}.toml")),
    })
}

/// Writes `cfg` to its `source` path.
pub fn write_config(cfg: &NodeConfig) -> Result<PathBuf> {
    std::fs::write(&cfg.source, cfg.to_toml())
        .with_context(|| format!("write {}", cfg.source.display()))?;
    Ok(cfg.source.clone())
}

pub(crate) fn spawn_node(exe: &Path, dir: &Path, config: &Path, bootstrap: bool) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!(
        "{}.log",
        config.file_stem().and_then(|s| s.to_str()).unwrap_or("node")
    )))?;
    let mut cmd = Process::new(exe);
    cmd.arg("run").arg("--config").arg(config);
    if bootstrap {
        cmd.arg("--bootstrap");
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn()
        .with_context(|| format!("start {}", exe.display()))
}

/// The loopback address the demo's cluster VIP lives on.
pub const DEMO_VIP: &str = "127.0.0.100";

/// Connections the demo opens through the balancer each time it shows the spread.
const LB_PROBES: usize = 30;

/// Node `id`'s own loopback address in the demo (127.0.0.11, .12, ...), so that the balancer's
/// backends, the app nodes at their Raft address's IP, are told apart.
fn demo_node_ip(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + (id as u8))
}

/// A TCP port free on every one of `ips` (the nodes' stand-in app servers share one port).
fn free_tcp_port_on_all(ips: &[Ipv4Addr]) -> Result<u16> {
    let Some((first_ip, rest)) = ips.split_first() else {
        bail!("no address to find a free port on");
    };
    for _ in 0..50 {
        let first = TcpListener::bind((*first_ip, 0))?;
        let port = first.local_addr()?.port();
        if rest.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no TCP port free on all of {ips:?} in 50 tries")
}

/// Stand-in application server of one node: answers every connection on `addr` with the
/// node's name and closes it. Aborting the task closes the listener (the host went down).
async fn app_server(addr: SocketAddr, name: String) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the stand-in app server of {name} on {addr}"))?;
    Ok(crate::placement::agent::answer_with_name(listener, name))
}

/// Opens `LB_PROBES` connections one after another through the balancer at `addr` and counts
/// which app server answered each, as `n1 10, n2 10, n3 10` (`None`: none answered).
async fn lb_spread(addr: SocketAddr) -> Option<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..LB_PROBES {
        if let Some(name) = vip_answer(addr).await {
            *seen.entry(name).or_default() += 1;
        }
    }
    let missed = LB_PROBES - seen.values().sum::<usize>();
    let mut text = seen
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    if missed > 0 {
        text.push_str(&format!(", {missed} not answered"));
    }
    (!seen.is_empty()).then_some(text)
}

/// Waits until the `cluster` VIP has an owner and returns it.
async fn wait_vip_owner(admin: &mut AdminClient, within: Duration) -> Result<u64> {
    let t = Instant::now();
    loop {
        let s = admin.status().await?;
        if let Some(o) = s
            .vips
            .iter()
            .find(|v| v.name == "cluster")
            .and_then(|v| v.owner)
        {
            return Ok(o);
        }
        if t.elapsed() > within {
            bail!("the cluster VIP was not placed within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects to the VIP and returns the name its holder answers with.
pub(crate) async fn vip_answer(addr: SocketAddr) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_millis(200), s.read_to_string(&mut buf))
        .await
        .ok()?
        .ok()?;
    let name = buf.trim().to_string();
    (!name.is_empty()).then_some(name)
}

pub(crate) async fn connect_retry(
    addr: &str,
    creds: &AdminCredentials,
    within: Duration,
) -> Result<AdminClient> {
    let deadline = Instant::now() + within;
    loop {
        match AdminClient::connect(addr, creds).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Reaps the killed node `id`; if the admin client was talking to it, reconnects to a live node.
async fn reap_and_reconnect(
    nodes: &mut [NodeProcess],
    id: u64,
    admin: &mut AdminClient,
    creds: &AdminCredentials,
) -> Result<()> {
    let node = nodes
        .iter_mut()
        .find(|n| n.id == id)
        .context("not a demo node")?;
    if let Some(mut c) = node.child.take() {
        let _ = c.wait();
    }
    if node.listen.to_string() == admin.target() {
        let survivor = nodes
            .iter()
            .find(|n| n.id != id && n.child.is_some())
            .map(|n| n.listen.to_string())
            .context("no surviving node")?;
        *admin = connect_retry(&survivor, creds, Duration::from_secs(5)).await?;
    }
    Ok(())
}

/// Restarts the killed node `id` and waits until the leader hears from it; returns its name.
async fn restart_and_rejoin(
    exe: &Path,
    dir: &Path,
    nodes: &mut [NodeProcess],
    id: u64,
    admin: &mut AdminClient,
) -> Result<String> {
    let node = nodes
        .iter_mut()
        .find(|n| n.id == id)
        .context("not a demo node")?;
    node.child = Some(spawn_node(exe, dir, &node.config, false)?);
    let t = Instant::now();
    loop {
        let s = admin.status().await?;
        if s.nodes
            .iter()
            .any(|n| n.id == id && n.last_contact_ms.is_some_and(|ms| ms < 500))
        {
            return Ok(node.name.clone());
        }
        if t.elapsed() > Duration::from_secs(15) {
            bail!("{} did not rejoin within 15 s", node.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stand-in devices: a loopback listener that accepts every connection and holds it open until
/// the other side closes it. Returns its address.
pub(crate) async fn simulate_devices() -> Result<SocketAddr> {
    // A deep accept queue: a thousand "devices" share it, and a dropped SYN costs a 1 s retry.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket
        .listen(4096)
        .context("bind the simulated devices' port")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 64];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok(addr)
}

/// Waits until every device is `up` on a node other than `lost` and prints how long that took
/// since `since`.
async fn wait_devices_up(
    admin: &mut AdminClient,
    lost: Option<u64>,
    since: Instant,
    within: Duration,
) -> Result<()> {
    loop {
        let up = match admin.call(&AdminRequest::ListDevices).await? {
            AdminReply::Devices(d) => d
                .iter()
                .filter(|d| d.status == spaced_fabric::DeviceStatus::Up && d.owner != lost)
                .count(),
            other => return Err(unexpected(admin.target(), &other).into()),
        };
        if up == DEMO_DEVICES {
            match lost {
                None => println!(
                    "all {DEMO_DEVICES} devices connected and up {} ms after that",
                    since.elapsed().as_millis()
                ),
                Some(n) => println!(
                    "node {n}'s devices reconnected from the survivors: all {DEMO_DEVICES} up {} ms after the kill",
                    since.elapsed().as_millis()
                ),
            }
            return Ok(());
        }
        if since.elapsed() > within {
            bail!("only {up} of {DEMO_DEVICES} devices up after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the demo; `keep` leaves the temp dir (configs, PKI, data, logs) in place.
pub async fn run(keep: bool) -> Result<()> {
    in_temp_dir(
        "spaced-demo-",
        keep,
        |dir| async move { run_in(&dir).await },
    )
    .await
}

/// Runs a demo in a fresh temp dir, removed afterwards unless `keep` (then its path is
/// printed).
pub(crate) async fn in_temp_dir<F, Fut>(prefix: &str, keep: bool, demo: F) -> Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("create temp dir")?;
    let result = demo(tmp.path().to_path_buf()).await;
    if keep {
        let kept = tmp.keep();
        println!(
            "\nkept {} (configs, PKIs, data dirs, node logs)",
            kept.display()
        );
    }
    result
}

async fn run_in(dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("locate the spaced binary")?;
    let pki_dir = dir.join("pki");
    pki::init_ca(&pki_dir)?;
    pki::issue(&pki_dir, "demo", true)?;
    let mut nodes = Vec::new();
    // The cluster VIP in loopback mode: its owner answers TCP on 127.0.0.100:<port> with its name.
    let vip_port = free_tcp_port()?;
    let vip_addr: SocketAddr = format!("{DEMO_VIP}:{vip_port}").parse()?;
    // The balancer on the VIP's owner spreads connections to its port over every app node's
    // stand-in app server (this process runs them, one per node address, on one port).
    let lb_port = free_tcp_port()?;
    let lb_addr: SocketAddr = format!("{DEMO_VIP}:{lb_port}").parse()?;
    let ips: Vec<Ipv4Addr> = (1..=3).map(demo_node_ip).collect();
    let app_port = free_tcp_port_on_all(&ips)?;
    let mut apps = BTreeMap::new();
    for id in 1..=3u64 {
        let addr = SocketAddr::new(IpAddr::V4(demo_node_ip(id)), app_port);
        apps.insert(id, app_server(addr, format!("n{id}")).await?);
    }
    for id in 1..=3u64 {
        pki::issue(&pki_dir, &format!("n{id}"), false)?;
        let mut cfg = node_config(dir, &pki_dir, id, &["ha", "app"])?;
        let ip = demo_node_ip(id);
        cfg.listen = SocketAddr::new(
            IpAddr::V4(ip),
            UdpSocket::bind((ip, 0))?.local_addr()?.port(),
        );
        cfg.lb = Some(LbSection {
            connect_timeout_ms: 500,
            health_interval_ms: 200,
            fall: 2,
            drain_grace_s: 1,
            ..LbSection::new(
                "cluster",
                vec![LbPort {
                    listen: lb_port,
                    backend: app_port,
                }],
            )
        });
        cfg.takeover = TakeoverMode::Loopback;
        cfg.vips = vec![VipSection {
            name: "cluster".into(),
            address: format!("{DEMO_VIP}/8"),
            interface: "lo".into(),
            roles: vec!["ha".into()],
            port: Some(vip_port),
        }];
        let config = write_config(&cfg)?;
        let listen = cfg.listen;
        let child = spawn_node(&exe, dir, &config, id == 1)?;
        nodes.push(NodeProcess {
            id,
            name: format!("n{id}"),
            listen,
            config,
            child: Some(child),
        });
    }
    println!(
        "started 3 spaced processes on 127.0.0.11-13 (work dir {})",
        dir.display()
    );

    let creds = AdminCredentials::load(&pki_dir, None)?;
    let n1 = nodes[0].listen.to_string();
    let mut admin = connect_retry(&n1, &creds, Duration::from_secs(15)).await?;
    // Wait until the bootstrap node leads and has registered itself.
    let t0 = Instant::now();
    loop {
        let s = admin.status().await?;
        if s.leader == Some(1) && s.nodes.iter().any(|n| n.id == 1 && !n.roles.is_empty()) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            bail!("n1 did not become leader of its one-node cluster within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("n1 bootstrapped a one-node cluster");
    for n in &nodes[1..] {
        let t = Instant::now();
        let req = AdminRequest::AddNode {
            id: n.id,
            name: n.name.clone(),
            addr: n.listen.to_string(),
            roles: None,
        };
        match admin.call_leader(&req).await? {
            AdminReply::NodeAdded { voter } => println!(
                "added {} as {} in {} ms",
                n.name,
                if voter { "voter" } else { "learner" },
                t.elapsed().as_millis()
            ),
            other => return Err(unexpected(admin.target(), &other).into()),
        }
    }

    // The devices are stand-ins: one listener on loopback that holds whatever connects to it.
    let device_addr = simulate_devices().await?;
    let devices: Vec<NewDevice> = (0..DEMO_DEVICES)
        .map(|i| NewDevice {
            id: format!("dev-{i:04}"),
            addr: device_addr.to_string(),
            mode: DeviceMode::SpaceInitiated,
        })
        .collect();
    let t = Instant::now();
    match admin
        .call_leader(&AdminRequest::AddDevices(devices))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => return Err(unexpected(admin.target(), &other).into()),
    }
    println!(
        "registered {DEMO_DEVICES} devices in {} ms",
        t.elapsed().as_millis()
    );
    wait_devices_up(&mut admin, None, t, Duration::from_secs(15)).await?;
    println!();
    // Let every follower apply and the leader see fresh heartbeats before showing status.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = admin.status().await?;
    print!("{}", render_status(&status));

    // Act 1: the cluster VIP. Kill its owner; time until a client is served by the new owner.
    let mut owner = wait_vip_owner(&mut admin, Duration::from_secs(10)).await?;
    // A leader holding the VIP hands leadership to another voter once the cluster is settled,
    // so that losing one node costs a lease span, not an election plus a lease span.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        let s = admin.status().await?;
        owner = s
            .vips
            .iter()
            .find(|v| v.name == "cluster")
            .and_then(|v| v.owner)
            .unwrap_or(owner);
        if s.leader.is_some_and(|l| l != owner) {
            println!(
                "\nleader n{} and VIP owner n{owner} are different nodes",
                s.leader.unwrap_or(0)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = vip_answer(vip_addr)
        .await
        .context("the VIP does not answer")?;
    println!("\nVIP cluster ({vip_addr}) is served by {answer}");
    let spread = lb_spread(lb_addr)
        .await
        .context("the balancer on the VIP does not answer")?;
    println!("balancer on the VIP ({lb_addr}), {LB_PROBES} connections: {spread}");
    let victim = nodes
        .iter_mut()
        .find(|n| n.id == owner)
        .context("VIP owner is not a demo node")?;
    println!(
        "killing the VIP owner {} (SIGKILL) and its app server...",
        victim.name
    );
    victim.kill(nix::sys::signal::Signal::SIGKILL)?;
    let killed_at = Instant::now();
    if let Some(app) = apps.remove(&owner) {
        app.abort();
    }
    let new_answer = loop {
        if let Some(a) = vip_answer(vip_addr).await
            && a != answer
        {
            break a;
        }
        if killed_at.elapsed() > Duration::from_secs(10) {
            bail!("nobody served the VIP within 10 s of killing its owner");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!(
        "{new_answer} serves the VIP {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
    while vip_answer(lb_addr).await.is_none() {
        if killed_at.elapsed() > Duration::from_secs(10) {
            bail!("the balancer did not answer on the VIP within 10 s of killing its owner");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let lb_back = killed_at.elapsed();
    let spread = lb_spread(lb_addr)
        .await
        .context("the balancer on the new owner stopped answering")?;
    println!(
        "the balancer on {new_answer} answers {} ms after the kill; {LB_PROBES} connections: {spread}",
        lb_back.as_millis()
    );
    reap_and_reconnect(&mut nodes, owner, &mut admin, &creds).await?;
    let addr = SocketAddr::new(IpAddr::V4(demo_node_ip(owner)), app_port);
    apps.insert(owner, app_server(addr, format!("n{owner}")).await?);
    let back = restart_and_rejoin(&exe, dir, &mut nodes, owner, &mut admin).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = vip_answer(vip_addr).await.unwrap_or_default();
    println!("{back} restarted and rejoined as standby; the VIP stays on {still} (no failback)");

    // Act 2: a singleton service. Exactly one node runs it; kill that node and time until
    // another runs it, at a higher epoch (the fencing token it gets as SPACED_EPOCH).
    let starts = dir.join("poller-starts.log");
    let script = format!(
        "echo \"$SPACED_NODE $SPACED_EPOCH\" >> {}; exec sleep 100000",
        starts.display()
    );
    let put = AdminRequest::Write(Command::PutService {
        name: "poller".into(),
        spec: ServiceSpec {
            command: vec!["/bin/sh".into(), "-c".into(), script],
            scope: ServiceScope::Singleton,
            health_check: None,
            roles: ["app".to_string()].into(),
        },
    });
    match admin.call_leader(&put).await? {
        AdminReply::Applied(_) => {}
        other => return Err(unexpected(admin.target(), &other).into()),
    }
    let read_starts = || -> Vec<(String, u64)> {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (node, epoch) = l.split_once(' ')?;
                Some((node.to_string(), epoch.trim().parse().ok()?))
            })
            .collect()
    };
    let t = Instant::now();
    let (holder, epoch) = loop {
        if let Some(first) = read_starts().first() {
            break first.clone();
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the singleton did not start within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("\nsingleton poller runs on {holder} (epoch {epoch})");
    let victim = nodes
        .iter_mut()
        .find(|n| n.name == holder)
        .context("singleton holder is not a demo node")?;
    println!("killing {holder} (SIGKILL)...");
    victim.kill(nix::sys::signal::Signal::SIGKILL)?;
    let killed_at = Instant::now();
    let (next, next_epoch) = loop {
        if let Some(second) = read_starts().get(1) {
            break second.clone();
        }
        if killed_at.elapsed() > Duration::from_secs(10) {
            bail!("nobody ran the singleton within 10 s of killing its holder");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!(
        "{next} runs poller (epoch {next_epoch}) {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
    let holder_id = victim.id;
    reap_and_reconnect(&mut nodes, holder_id, &mut admin, &creds).await?;
    restart_and_rejoin(&exe, dir, &mut nodes, holder_id, &mut admin).await?;
    println!("{holder} restarted and rejoined; poller stays on {next} (no failback)");

    // Act 3: the Raft leader. First let the cluster settle: a leader that holds a placement
    // hands leadership on, and a kill during that hand-off would time a transfer, not a failover.
    let t = Instant::now();
    let mut stable: Option<(u64, Instant)> = None;
    let leader = loop {
        let status = admin.status().await?;
        let singletons = match admin.call(&AdminRequest::SingletonList).await? {
            AdminReply::Singletons(rows) => rows,
            other => return Err(unexpected(admin.target(), &other).into()),
        };
        // No leader for a moment (an election or a hand-off in flight): not settled yet.
        let Some(leader) = status.leader else {
            if t.elapsed() > Duration::from_secs(15) {
                bail!("no leader for 15 s");
            }
            stable = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let holds = status.vips.iter().any(|v| v.owner == Some(leader))
            || singletons.iter().any(|r| r.owner == Some(leader));
        if t.elapsed() > Duration::from_secs(10) {
            break leader;
        }
        match stable {
            Some((l, since)) if l == leader && !holds => {
                if since.elapsed() > Duration::from_millis(500) {
                    break leader;
                }
            }
            _ => stable = Some((leader, Instant::now())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let victim = nodes
        .iter_mut()
        .find(|n| n.id == leader)
        .context("leader is not one of the demo nodes")?;
    println!("\nkilling the leader {} (SIGKILL)...", victim.name);
    victim.kill(nix::sys::signal::Signal::SIGKILL)?;
    let killed_at = Instant::now();
    let survivors: Vec<(u64, String)> = nodes
        .iter()
        .filter(|n| n.id != leader)
        .map(|n| (n.id, n.listen.to_string()))
        .collect();
    admin.close().await;

    // "Serving" = a write committed by the new leader. Ask every survivor at once, directly
    // (no redirects, whose dial of the dead leader would add its timeout to the figure); a
    // follower that still takes the dead node for the leader spends up to a second trying to
    // forward the write there, so the first survivor to answer is taken.
    let mut probes = futures::stream::FuturesUnordered::new();
    for (id, addr) in &survivors {
        let mut c = connect_retry(addr, &creds, Duration::from_secs(5)).await?;
        let id = *id;
        probes.push(async move {
            loop {
                let probe = AdminRequest::Write(Command::SetAdminState {
                    id,
                    state: AdminState::Active,
                });
                if let Ok(AdminReply::Applied(_)) = c.call(&probe).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    let deadline = Duration::from_secs(30).saturating_sub(killed_at.elapsed());
    let mut client =
        match tokio::time::timeout(deadline, futures::StreamExt::next(&mut probes)).await {
            Ok(Some(c)) => c,
            _ => bail!("no surviving node served a write within 30 s of the kill"),
        };
    drop(probes);
    let failover = killed_at.elapsed();
    let status = client.status().await?;
    println!(
        "new leader: node {} (term {}), serving writes {} ms after the kill",
        status
            .leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "?".into()),
        status.term,
        failover.as_millis()
    );
    let count = match client.call(&AdminRequest::ListDevices).await? {
        AdminReply::Devices(d) => d.len(),
        other => return Err(unexpected(client.target(), &other).into()),
    };
    if count != DEMO_DEVICES {
        bail!("after failover the fabric holds {count} devices, expected {DEMO_DEVICES}");
    }
    println!("all {count} devices are still registered");
    wait_devices_up(
        &mut client,
        Some(leader),
        killed_at,
        Duration::from_secs(15),
    )
    .await?;
    println!();
    tokio::time::sleep(Duration::from_millis(300)).await;
    print!("{}", render_status(&client.status().await?));
    client.close().await;

    for n in &mut nodes {
        n.stop();
    }
    println!("\nstopped all nodes");
    Ok(())
}
