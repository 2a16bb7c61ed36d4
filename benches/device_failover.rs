//! Device failover on a real 3-node in-process cluster (QUIC + sled on loopback): register many
//! devices, let them be assigned (and, with connections, connected), crash one follower, and
//! time how long until its devices are
//!
//! - *detected*: the first of them is reassigned (the leader stops hearing from the node for
//!   `LIVE_WITHIN`, 1 s, then plans);
//! - *reassigned*: the last of them is reassigned in the state machine (the planner's batches of
//!   1,000 committed one after another);
//! - *up*: every device is `up` again on a survivor, with exactly one open connection each.
//!
//! Scenarios: 10,000 space-initiated devices with real TCP connections (the fake devices run in
//! a child process, for want of descriptors: 10,000 connections take 10,000 on each side); and
//! 100,000 device-initiated devices with no connections at all (100,000 connections need more
//! descriptors than this host allows one process), which times the state machine's side only.
//! Each scenario runs `SPACED_BENCH_ROUNDS` rounds (default 3) on a fresh cluster; medians are
//! printed.
//!
//! Run: `cargo bench -p spaced-benches --bench device_failover` (or pass `10k` / `100k` to run one).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spaced_fabric::{DeviceMode, DeviceStatus, NewDevice};
use spaced_node::admin::{AdminReply, AdminRequest};
use spaced_node::ops::config::RaftTimings;
use spaced_raft::NodeId;
use spaced_tests::Cluster;
use spaced_tests::device_farm::{Farm, serve_stdio};

/// Set in the child that serves the fake devices.
const FARM_ENV: &str = "SPACED_BENCH_DEVICE_FARM";

/// One scenario.
struct Scenario {
    /// Name on the command line and in the report.
    name: &'static str,
    /// Devices registered.
    devices: usize,
    /// With real TCP connections (space-initiated) or none (device-initiated, never calling).
    connect: bool,
}

const SCENARIOS: [Scenario; 2] = [
    Scenario {
        name: "10k",
        devices: 10_000,
        connect: true,
    },
    Scenario {
        name: "100k",
        devices: 100_000,
        connect: false,
    },
];

/// What one round measured, from the crash.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// First device of the crashed node reassigned.
    detected: Duration,
    /// Last device of the crashed node reassigned.
    reassigned: Duration,
    /// Every device up once on a survivor (`None` without connections).
    up: Option<Duration>,
    /// Devices the crashed node held.
    moved: usize,
}

/// Devices held by `owner` in node `via`'s fabric, read in place (no clone of 100k devices).
fn held_by(c: &Cluster, via: NodeId, owner: NodeId) -> usize {
    c.nodes[&via].fabric().read(|f| {
        f.devices
            .values()
            .filter(|d| d.owner == Some(owner))
            .count()
    })
}

/// Devices `up` on one of `owners` and devices with any owner, in node `via`'s fabric.
fn up_and_owned(c: &Cluster, via: NodeId, owners: &BTreeSet<NodeId>) -> (usize, usize) {
    c.nodes[&via].fabric().read(|f| {
        let up = f
            .devices
            .values()
            .filter(|d| {
                d.status == DeviceStatus::Up && d.owner.is_some_and(|o| owners.contains(&o))
            })
            .count();
        let owned = f.devices.values().filter(|d| d.owner.is_some()).count();
        (up, owned)
    })
}

async fn wait(what: &str, within: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + within;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        // Each look scans every device under the fabric's read lock: not too often.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn round(s: &Scenario, farm: Option<&Farm>) -> Result<Round> {
    let mut c = Cluster::start(3, RaftTimings::default()).await?;
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    c.wait_converged(Duration::from_secs(20)).await?;
    let mut admin = c.admin(leader).await?;
    let registering = Instant::now();
    for start in (0..s.devices).step_by(1_000) {
        let batch: Vec<NewDevice> = (start..(start + 1_000).min(s.devices))
            .map(|i| NewDevice {
                id: format!("dev-{i:06}"),
                addr: match farm {
                    Some(f) => f.device_addr(i),
                    None => "192.0.2.1".into(),
                },
                mode: if s.connect {
                    DeviceMode::SpaceInitiated
                } else {
                    DeviceMode::DeviceInitiated
                },
            })
            .collect();
        match admin.call_leader(&AdminRequest::AddDevices(batch)).await? {
            AdminReply::Applied(_) => {}
            other => bail!("register: {other:?}"),
        }
    }
    admin.close().await;
    let all: BTreeSet<NodeId> = [1, 2, 3].into();
    let n = s.devices;
    let settle = Duration::from_secs(120);
    if s.connect {
        wait("all devices up", settle, || {
            Ok(up_and_owned(&c, leader, &all).0 == n)
        })
        .await?;
        let farm = farm.context("farm")?;
        wait("one connection per device", settle, || {
            Ok(farm.counts(n)?.iter().all(|c| c.live == 1))
        })
        .await?;
    } else {
        wait("all devices assigned", settle, || {
            Ok(up_and_owned(&c, leader, &all).1 == n)
        })
        .await?;
    }
    eprintln!(
        "  {n} devices registered and {} in {:?}",
        if s.connect { "up" } else { "assigned" },
        registering.elapsed()
    );

    let victim = *all.iter().find(|i| **i != leader).context("a follower")?;
    let survivors: BTreeSet<NodeId> = all.iter().copied().filter(|i| *i != victim).collect();
    let moved = held_by(&c, leader, victim);
    let crashed = Instant::now();
    c.crash_node(victim).await;
    wait("the first reassignment", settle, || {
        Ok(held_by(&c, leader, victim) < moved)
    })
    .await?;
    let detected = crashed.elapsed();
    wait("the last reassignment", settle, || {
        Ok(held_by(&c, leader, victim) == 0)
    })
    .await?;
    let reassigned = crashed.elapsed();
    let up = if s.connect {
        wait("all devices up on the survivors", settle, || {
            Ok(up_and_owned(&c, leader, &survivors).0 == n)
        })
        .await?;
        let farm = farm.context("farm")?;
        wait("one connection per device", settle, || {
            Ok(farm.counts(n)?.iter().all(|c| c.live == 1))
        })
        .await?;
        Some(crashed.elapsed())
    } else {
        None
    };
    c.stop_all().await;
    Ok(Round {
        detected,
        reassigned,
        up,
        moved,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn main() -> Result<()> {
    if std::env::var_os(FARM_ENV).is_some() {
        return serve_stdio();
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds: usize = std::env::var("SPACED_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    spaced_node::raise_fd_limit()?;
    for s in &SCENARIOS {
        if !filters.is_empty() && !filters.iter().any(|f| f == s.name) {
            continue;
        }
        let farm = if s.connect {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.env(FARM_ENV, "1");
            Some(Farm::spawn(cmd)?)
        } else {
            None
        };
        let mut results = Vec::new();
        for r in 1..=rounds {
            eprintln!("device_failover/{} round {r}/{rounds}", s.name);
            // Each round uses fresh device ids on a fresh cluster; the farm's counts carry over,
            // so a round checks open connections only (`live`), not accepted totals.
            let one = rt.block_on(round(s, farm.as_ref()))?;
            eprintln!(
                "  crash of a follower holding {} devices: first reassigned {}, all reassigned {}, all up {}",
                one.moved,
                ms(one.detected),
                ms(one.reassigned),
                one.up.map(ms).unwrap_or_else(|| "-".into())
            );
            results.push(one);
        }
        let detected = median(results.iter().map(|r| r.detected).collect());
        let reassigned = median(results.iter().map(|r| r.reassigned).collect());
        let spread = median(results.iter().map(|r| r.reassigned - r.detected).collect());
        let up: Vec<Duration> = results.iter().filter_map(|r| r.up).collect();
        println!(
            "device_failover/{}: {} devices ({}), median of {rounds}: detected {}, all reassigned {} \
             (state machine: {} from first to last), all up {}",
            s.name,
            s.devices,
            if s.connect {
                "space-initiated, real TCP connections"
            } else {
                "device-initiated, no connections"
            },
            ms(detected),
            ms(reassigned),
            ms(spread),
            if up.is_empty() {
                "-".into()
            } else {
                ms(median(up))
            }
        );
    }
    Ok(())
}
