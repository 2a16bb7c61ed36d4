//! Disaster recovery between two in-process one-node sites with their own CAs, the DR link
//! relayed through a user-space UDP relay that delays every datagram (this kernel has no
//! netem), and an in-process witness:
//!
//! - **lag**: while the active site takes `SPACED_DR_RATE` writes/s (default 1,000, each one
//!   device), how long from a write's acknowledgement on east until the standby has it
//!   (p50, p99, max over every write);
//! - **RPO**: east is crashed under that load; how many acknowledged writes west lacks once it
//!   took over, and how old the oldest of them was at the crash;
//! - **RTO**: from the crash until west is active, runs its VIP and the singleton, and has
//!   every device assigned to its node (automatic failover through the witness);
//! - **catch-up**: west takes writes for `SPACED_DR_AWAY_S` seconds (default 60) while east is
//!   down; east restarts and comes back standby: how long until it has mirrored everything.
//!
//! The profile: heartbeat 200 ms, time-out 500 ms, 2 retries, witness lease 3 s (the
//! harness's `dr_sites`); one-way delay `SPACED_DR_DELAY_MS` (default 25).
//!
//! Run: `cargo bench -p spaced-benches --bench dr`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spaced_benches::{ms, quantile};
use spaced_fabric::{Command, DeviceMode, NewDevice, ServiceScope, ServiceSpec, SiteRole};
use spaced_node::admin::client::AdminClient;
use spaced_node::admin::{AdminReply, AdminRequest};
use spaced_tests::Cluster;
use tokio::net::UdpSocket;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Relays datagrams arriving on `listen` to `upstream` and the answers back, each after
/// `delay`, in the order they came (as a delay line does: netem without jitter keeps the
/// order too); one upstream socket per client address.
async fn relay(listen: Arc<UdpSocket>, upstream: SocketAddr, delay: Duration) {
    let mut clients: HashMap<SocketAddr, tokio::sync::mpsc::UnboundedSender<Delayed>> =
        HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        // An ICMP "port unreachable" from a peer that is down surfaces as an error here: the
        // relay goes on, as a router would.
        let Ok((n, from)) = listen.recv_from(&mut buf).await else {
            continue;
        };
        let up = match clients.get(&from) {
            Some(s) => s.clone(),
            None => {
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let s = Arc::new(s);
                let up = delay_line(s.clone(), upstream);
                clients.insert(from, up.clone());
                // Answers from upstream go back to this client, delayed too.
                let back = delay_line(listen.clone(), from);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    loop {
                        let Ok((n, _)) = s.recv_from(&mut buf).await else {
                            continue;
                        };
                        let due = tokio::time::Instant::now() + delay;
                        if back.send((due, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                });
                up
            }
        };
        let due = tokio::time::Instant::now() + delay;
        let _ = up.send((due, buf[..n].to_vec()));
    }
}

/// A datagram and when it is due.
type Delayed = (tokio::time::Instant, Vec<u8>);

/// A task that sends each datagram given to it from `socket` to `to` when it is due, in
/// order.
fn delay_line(
    socket: Arc<UdpSocket>,
    to: SocketAddr,
) -> tokio::sync::mpsc::UnboundedSender<Delayed> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delayed>();
    tokio::spawn(async move {
        while let Some((due, packet)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = socket.send_to(&packet, to).await;
        }
    });
    tx
}

async fn start_relay(upstream: SocketAddr, delay: Duration) -> Result<SocketAddr> {
    let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = listen.local_addr()?;
    tokio::spawn(relay(listen, upstream, delay));
    Ok(addr)
}

/// Writes one device each, `rate` per second over `clients` admin connections, until `stop`
/// or the site stops answering; records each acknowledgement.
async fn write_load(
    admins: Vec<AdminClient>,
    prefix: &'static str,
    rate: u64,
    acked: Arc<Mutex<BTreeMap<u64, Instant>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<AdminClient> {
    let n = admins.len() as u64;
    let tasks: Vec<_> = admins
        .into_iter()
        .enumerate()
        .map(|(k, mut admin)| {
            let acked = acked.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let every = Duration::from_secs_f64(n as f64 / rate as f64);
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut seq = k as u64;
                while !*stop.borrow() {
                    tick.tick().await;
                    let device = NewDevice {
                        id: format!("{prefix}-{seq:08}"),
                        addr: "127.0.0.1:1".into(),
                        mode: DeviceMode::DeviceInitiated,
                    };
                    match admin.call(&AdminRequest::AddDevices(vec![device])).await {
                        Ok(AdminReply::Applied(_)) => {
                            lock(&acked).insert(seq, Instant::now());
                        }
                        _ => break,
                    }
                    seq += n;
                }
                admin
            })
        })
        .collect();
    let mut back = Vec::new();
    for t in tasks {
        if let Ok(a) = t.await {
            back.push(a);
        }
    }
    back
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A write load running on a site: what it had acknowledged, and how to stop it.
struct Load {
    acked: Arc<Mutex<BTreeMap<u64, Instant>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<AdminClient>>,
}

impl Load {
    /// Starts writing devices `prefix-NNNNNNNN` to `site` at `rate` per second over 4
    /// admin connections.
    async fn start(site: &Cluster, prefix: &'static str, rate: u64) -> Result<Load> {
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(write_load(
            admins(site, 4).await?,
            prefix,
            rate,
            acked.clone(),
            stop_rx,
        ));
        Ok(Load { acked, stop, task })
    }

    /// Stops the writers and waits for them; returns every write acknowledged.
    async fn finish(self) -> BTreeMap<u64, Instant> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        lock(&self.acked).clone()
    }
}

fn role(c: &Cluster) -> Option<SiteRole> {
    c.nodes.get(&1).map(|n| n.fabric().read(|f| f.site.role))
}

fn has_device(c: &Cluster, id: &str) -> bool {
    c.nodes
        .get(&1)
        .is_some_and(|n| n.fabric().read(|f| f.devices.contains_key(id)))
}

async fn admins(c: &Cluster, n: usize) -> Result<Vec<AdminClient>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.admin(1).await?);
    }
    Ok(out)
}

async fn wait(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let rate = env_u64("SPACED_DR_RATE", 1_000);
    let delay = Duration::from_millis(env_u64("SPACED_DR_DELAY_MS", 25));
    let lag_s = env_u64("SPACED_DR_LAG_S", 10);
    let away_s = env_u64("SPACED_DR_AWAY_S", 60);
    let witness_port = spaced_tests::free_udp_port();
    let witness_addr: SocketAddr = format!("127.0.0.1:{witness_port}").parse()?;
    let mut sites = spaced_tests::dr_sites(&[witness_addr.to_string()])?;
    // The witness, in this process: a certificate of east's CA, trusting both.
    let files = spaced_raft::pki::issue(&sites.east.pki_dir(), "witness", false)?;
    let material = spaced_raft::pki::TlsMaterial::load(&spaced_raft::pki::TlsPaths {
        ca: sites.east.pki_dir().join("ca.pem"),
        cert: files.cert,
        key: files.key,
    })?
    .trusting_all(&[
        &sites.east.pki_dir().join("ca.pem"),
        &sites.west.pki_dir().join("ca.pem"),
    ])?;
    tokio::spawn(async move {
        if let Err(e) =
            spaced_replication::witness::run(witness_addr, &material, Duration::ZERO, None).await
        {
            eprintln!("witness: {e}");
        }
    });
    // Each site reaches the other through a delaying relay.
    let to_west = start_relay(format!("127.0.0.1:{}", sites.west_dr).parse()?, delay).await?;
    let to_east = start_relay(format!("127.0.0.1:{}", sites.east_dr).parse()?, delay).await?;
    for (c, via) in [(&mut sites.east, to_west), (&mut sites.west, to_east)] {
        let dr = c
            .configs
            .get_mut(&1)
            .and_then(|c| c.dr.as_mut())
            .context("[dr]")?;
        dr.peers = vec![via.to_string()];
    }
    let (mut east, mut west) = (sites.east, sites.west);
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    wait(Duration::from_secs(30), "east active, west standby", || {
        role(&east) == Some(SiteRole::Active) && role(&west) == Some(SiteRole::Standby)
    })
    .await?;
    let mut admin = east.admin(1).await?;
    match admin
        .call_leader(&AdminRequest::Write(Command::PutService {
            name: "poller".into(),
            spec: ServiceSpec {
                command: vec!["sleep".into(), "3600".into()],
                scope: ServiceScope::Singleton,
                health_check: None,
                roles: ["app".to_string()].into(),
            },
        }))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("put the singleton: {other:?}"),
    }
    println!(
        "two sites on 127.0.0.1, DR link through a relay delaying each datagram {} ms; {rate} \
         writes/s of one device each",
        delay.as_millis()
    );

    // Lag.
    let load = Load::start(&east, "lag", rate).await?;
    let mut lags = Vec::new();
    let mut seen = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(lag_s);
    let mut view = west.nodes[&1].fabric().changes();
    while Instant::now() < until || lags.len() < lock(&load.acked).len() {
        let _ = tokio::time::timeout(Duration::from_millis(5), view.changed()).await;
        if Instant::now() >= until {
            let _ = load.stop.send(true);
        }
        let pending: Vec<(u64, Instant)> = lock(&load.acked)
            .iter()
            .filter(|(s, _)| !seen.contains(*s))
            .map(|(s, t)| (*s, *t))
            .collect();
        let now = Instant::now();
        for (s, at) in pending {
            if has_device(&west, &format!("lag-{s:08}")) {
                seen.insert(s);
                lags.push(now.saturating_duration_since(at));
            }
        }
        if Instant::now() > until + Duration::from_secs(30) {
            bail!("west did not mirror every write within 30 s of the load's end");
        }
    }
    load.finish().await;
    lags.sort();
    println!(
        "lag over {} writes: p50 {}, p99 {}, max {}",
        lags.len(),
        ms(quantile(&lags, 0.5)),
        ms(quantile(&lags, 0.99)),
        ms(*lags.last().unwrap_or(&Duration::ZERO))
    );

    // RPO and RTO: east crashed under load.
    let load = Load::start(&east, "rpo", rate).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    admin.close().await;
    let crashed = Instant::now();
    east.crash_node(1).await;
    let acked = load.finish().await;
    wait(Duration::from_secs(60), "west active", || {
        role(&west) == Some(SiteRole::Active)
    })
    .await?;
    let active = crashed.elapsed();
    let owner = |c: &Cluster, p: &str| {
        c.nodes[&1]
            .fabric()
            .read(|f| f.placements.get(p).and_then(|p| p.owner))
    };
    wait(
        Duration::from_secs(60),
        "west runs its VIP and singleton",
        || owner(&west, "cluster").is_some() && owner(&west, "poller").is_some(),
    )
    .await?;
    let running = crashed.elapsed();
    wait(Duration::from_secs(60), "west holds every device", || {
        west.nodes[&1]
            .fabric()
            .read(|f| f.devices.values().all(|d| d.owner.is_some()))
    })
    .await?;
    let devices_held = crashed.elapsed();
    let missing: Vec<(u64, Instant)> = acked
        .iter()
        .filter(|(s, _)| !has_device(&west, &format!("rpo-{s:08}")))
        .map(|(s, t)| (*s, *t))
        .collect();
    let oldest = missing
        .iter()
        .map(|(_, t)| crashed.saturating_duration_since(*t))
        .max()
        .unwrap_or_default();
    println!(
        "RPO: {} of {} acknowledged writes missing on west after the failover, the oldest \
         acknowledged {} before the crash",
        missing.len(),
        acked.len(),
        ms(oldest)
    );
    println!(
        "RTO: west active {} after the crash; VIP and singleton running at {}; every \
         device assigned to west at {}",
        ms(active),
        ms(running),
        ms(devices_held)
    );

    // Catch-up of the returning old site.
    let load = Load::start(&west, "away", rate).await?;
    tokio::time::sleep(Duration::from_secs(away_s)).await;
    let written = load.finish().await.len();
    let total = west.nodes[&1].fabric().read(|f| f.devices.len());
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(60);
    while let Err(e) = east.start_node(1, false).await {
        if Instant::now() > deadline {
            return Err(e.context("restart east"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up = wait(Duration::from_secs(120), "east catches up", || {
        role(&east) == Some(SiteRole::Standby)
            && east.nodes[&1].fabric().read(|f| f.devices.len()) == total
    })
    .await?;
    println!(
        "catch-up: east, down while west took {written} writes ({away_s} s), back as standby \
         with all {total} devices {} after its restart",
        ms(caught_up)
    );
    east.stop_all().await;
    west.stop_all().await;
    Ok(())
}
