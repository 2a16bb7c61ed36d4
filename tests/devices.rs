//! Device connections on in-process clusters of real nodes: registration assigns, every device
//! gets exactly one connection, a crashed node's devices reconnect from the survivors (and no
//! other device moves), drain and rebalance, device-initiated claims, bad input.
//!
//! The devices are a farm of fake ones (`spaced_tests::device_farm`): one listener, one loopback
//! address per device. `SPACED_TEST_DEVICES` sets the device count of the crash test (default
//! 1,000; 10,000 runs the farm in a child process for want of descriptors).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spaced_fabric::{AdminState, Command, DeviceMode, DeviceStatus, Fabric, NewDevice};
use spaced_node::admin::{AdminReply, AdminRequest};
use spaced_node::ops::config::RaftTimings;
use spaced_raft::NodeId;
use spaced_tests::Cluster;
use spaced_tests::device_farm::Farm;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

fn timings() -> RaftTimings {
    RaftTimings::default()
}

/// Devices in the crash test: `SPACED_TEST_DEVICES`, default 1,000.
fn device_count() -> usize {
    std::env::var("SPACED_TEST_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// A farm for `n` devices: in this process while descriptors allow, else in a child.
async fn farm_for(n: usize) -> Result<Farm> {
    if n <= 2_000 {
        Farm::local().await
    } else {
        Farm::spawn(std::process::Command::new(env!(
            "CARGO_BIN_EXE_device-farm"
        )))
    }
}

/// Id of farm device `i` (ids sort like the indices).
fn dev_id(i: usize) -> String {
    format!("dev-{i:06}")
}

/// Farm device number of a device id.
fn dev_index(id: &str) -> Option<usize> {
    id.strip_prefix("dev-")?.parse().ok()
}

/// Registers farm devices `0..n` through node `via`, 1,000 per command.
async fn register(c: &Cluster, via: NodeId, farm: &Farm, n: usize) -> Result<()> {
    let mut admin = c.admin(via).await?;
    for start in (0..n).step_by(1_000) {
        let batch: Vec<NewDevice> = (start..(start + 1_000).min(n))
            .map(|i| NewDevice {
                id: dev_id(i),
                addr: farm.device_addr(i),
                mode: DeviceMode::SpaceInitiated,
            })
            .collect();
        match admin.call_leader(&AdminRequest::AddDevices(batch)).await? {
            AdminReply::Applied(_) => {}
            other => bail!("registering devices {start}..: {other:?}"),
        }
    }
    admin.close().await;
    Ok(())
}

/// Devices per owner among the farm's devices.
fn owner_counts(f: &Fabric) -> BTreeMap<NodeId, u64> {
    let mut counts = BTreeMap::new();
    for d in f.devices.values() {
        if let Some(o) = d.owner {
            *counts.entry(o).or_default() += 1;
        }
    }
    counts
}

/// Whether farm devices `0..n` are all `up` in `f`, held by `owners`, with exactly one open
/// connection each. Says what is missing when not.
fn all_up_once(
    f: &Fabric,
    farm: &Farm,
    n: usize,
    owners: &BTreeSet<NodeId>,
) -> Result<Option<String>> {
    let not_up = f
        .devices
        .iter()
        .filter(|(id, d)| {
            dev_index(id).is_some_and(|i| i < n)
                && !(d.status == DeviceStatus::Up && d.owner.is_some_and(|o| owners.contains(&o)))
        })
        .count();
    if not_up > 0 {
        return Ok(Some(format!("{not_up} devices not up on {owners:?}")));
    }
    let conns = farm.counts(n)?;
    let wrong: Vec<(usize, u32)> = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.live != 1)
        .map(|(i, c)| (i, c.live))
        .take(5)
        .collect();
    if wrong.is_empty() {
        Ok(None)
    } else {
        Ok(Some(format!(
            "devices with other than one open connection (device, open): {wrong:?}"
        )))
    }
}

/// Waits until [`all_up_once`] holds in node `via`'s fabric.
async fn wait_all_up(
    c: &Cluster,
    via: NodeId,
    farm: &Farm,
    n: usize,
    owners: &BTreeSet<NodeId>,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let f = c.fabric_of(via).context("node not running")?;
        let missing = all_up_once(&f, farm, n, owners)?;
        let Some(missing) = missing else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!("after {within:?}: {missing}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the counts of `nodes` differ by at most one.
fn assert_balanced(counts: &BTreeMap<NodeId, u64>, nodes: &BTreeSet<NodeId>) {
    let of: Vec<u64> = nodes
        .iter()
        .map(|n| counts.get(n).copied().unwrap_or(0))
        .collect();
    let (lo, hi) = (of.iter().min(), of.iter().max());
    assert!(
        hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
        "unbalanced: {counts:?} over {nodes:?}"
    );
}

/// How a node goes away.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// At once, no goodbye ([`Cluster::crash_node`]).
    Crash,
    /// Gracefully: it tells the leader it is leaving ([`Cluster::stop_node`]).
    Graceful,
}

/// Stops one node of a running 3-node cluster with `n` devices up, and checks its devices
/// reconnect from the survivors, once each, balanced, while no other device moves. Returns
/// (reassigned, reconnected) times after the stop began.
async fn crash_and_check(
    c: &mut Cluster,
    farm: &Farm,
    n: usize,
    victim: NodeId,
    how: Stop,
) -> Result<(Duration, Duration)> {
    let survivors: BTreeSet<NodeId> = c.nodes.keys().copied().filter(|i| *i != victim).collect();
    let watcher = *survivors.first().context("no survivor")?;
    let before = c.fabric_of(watcher).context("fabric")?;
    let crashed = Instant::now();
    match how {
        Stop::Crash => c.crash_node(victim).await,
        // Its devices may move while it is still stopping: watch from another task.
        Stop::Graceful => {
            let node = c.nodes.remove(&victim).context("victim running")?;
            tokio::spawn(node.shutdown());
        }
    }
    let deadline = crashed + T + Duration::from_millis(n as u64 * 5);
    loop {
        let f = c.fabric_of(watcher).context("fabric")?;
        if f.devices.values().all(|d| d.owner != Some(victim)) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "devices of crashed node {victim} not reassigned: {:?}",
                owner_counts(&f)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reassigned = crashed.elapsed();
    let left = deadline.saturating_duration_since(Instant::now());
    wait_all_up(c, watcher, farm, n, &survivors, left).await?;
    let reconnected = crashed.elapsed();

    let after = c.fabric_of(watcher).context("fabric")?;
    assert_balanced(&owner_counts(&after), &survivors);
    let conns = farm.counts(n)?;
    for (id, d) in &before.devices {
        let Some(i) = dev_index(id) else { continue };
        let expected = if d.owner == Some(victim) { 2 } else { 1 };
        assert_eq!(
            conns[i].accepted, expected,
            "{id}: held by {:?} before the crash, by {:?} after",
            d.owner, after.devices[id].owner
        );
        if d.owner != Some(victim) {
            assert_eq!(
                after.devices[id].owner, d.owner,
                "{id} moved off a live node"
            );
        }
    }
    Ok((reassigned, reconnected))
}

/// A 3-node cluster with `n` farm devices registered and all of them up: (farm, cluster,
/// leader, node ids).
async fn three_nodes_with_devices_up(
    n: usize,
) -> Result<(Farm, Cluster, NodeId, BTreeSet<NodeId>)> {
    let farm = farm_for(n).await?;
    let c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    c.wait_converged(T).await?;
    register(&c, leader, &farm, n).await?;
    let all: BTreeSet<NodeId> = [1, 2, 3].into();
    wait_all_up(&c, leader, &farm, n, &all, T).await?;
    Ok((farm, c, leader, all))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_once_balanced_and_survive_a_crash() -> Result<()> {
    let n = device_count();
    let farm = farm_for(n).await?;
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    c.wait_converged(T).await?;
    let started = Instant::now();
    register(&c, leader, &farm, n).await?;
    let registered = started.elapsed();
    let all: BTreeSet<NodeId> = [1, 2, 3].into();
    let within = T + Duration::from_millis(n as u64 * 5);
    wait_all_up(&c, leader, &farm, n, &all, within).await?;
    let up = started.elapsed();
    let f = c.fabric_of(leader).context("fabric")?;
    assert_balanced(&owner_counts(&f), &all);
    for id in &all {
        assert_eq!(
            c.nodes[id].held_devices() as u64,
            owner_counts(&f).get(id).copied().unwrap_or(0),
            "node {id} holds exactly the devices it owns"
        );
    }

    let victim = *all.iter().find(|i| **i != leader).context("a follower")?;
    let (reassigned, reconnected) = crash_and_check(&mut c, &farm, n, victim, Stop::Crash).await?;
    println!(
        "{n} devices: registered in {registered:?}, all up once in {up:?}; follower {victim} crashed: its devices reassigned after {reassigned:?}, all up again after {reconnected:?}"
    );
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leaders_devices_move_and_no_other_device_does() -> Result<()> {
    let n = 300;
    let (farm, mut c, leader, _) = three_nodes_with_devices_up(n).await?;
    // The new leader starts with an empty contact table: it must not take the devices of the
    // node it has not heard from *yet* (checked inside: nothing moves off a survivor).
    let (reassigned, reconnected) = crash_and_check(&mut c, &farm, n, leader, Stop::Crash).await?;
    println!(
        "leader {leader} crashed: its devices reassigned after {reassigned:?}, all up again after {reconnected:?}"
    );
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_hands_its_devices_over_without_waiting_to_be_lost() -> Result<()> {
    let n = 300;
    let (farm, mut c, leader, all) = three_nodes_with_devices_up(n).await?;
    let victim = *all.iter().find(|i| **i != leader).context("a follower")?;
    let (reassigned, reconnected) =
        crash_and_check(&mut c, &farm, n, victim, Stop::Graceful).await?;
    println!(
        "follower {victim} stopped: its devices reassigned after {reassigned:?}, all up again after {reconnected:?}"
    );
    // The leader was told: no need to wait `lost_after` (800 ms) of silence.
    assert!(reassigned < Duration::from_millis(700), "{reassigned:?}");
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_hands_devices_off_and_rebalance_evens_them_out() -> Result<()> {
    let n = 300;
    let (farm, mut c, leader, all) = three_nodes_with_devices_up(n).await?;
    let drained: NodeId = 3;
    let mut admin = c.admin(leader).await?;

    let reply = admin
        .call_leader(&AdminRequest::SetAdminState {
            node: "n3".into(),
            state: AdminState::Draining,
        })
        .await?;
    match reply {
        AdminReply::AdminStateSet { id, devices, .. } => {
            assert_eq!(id, drained);
            assert_eq!(devices, 100);
        }
        other => bail!("drain: {other:?}"),
    }
    let rest: BTreeSet<NodeId> = [1, 2].into();
    wait_all_up(&c, leader, &farm, n, &rest, T).await?;
    let f = c.fabric_of(leader).context("fabric")?;
    assert_eq!(owner_counts(&f), BTreeMap::from([(1, 150), (2, 150)]));
    assert_eq!(
        c.nodes[&drained].held_devices(),
        0,
        "the drained node closed its connections"
    );
    let moved: u32 = farm.counts(n)?.iter().map(|c| c.accepted - 1).sum();
    assert_eq!(moved, 100, "only the drained node's devices reconnected");

    // Active again: nothing comes back by itself (no failback)...
    match admin
        .call_leader(&AdminRequest::SetAdminState {
            node: drained.to_string(),
            state: AdminState::Active,
        })
        .await?
    {
        AdminReply::AdminStateSet { devices: 0, .. } => {}
        other => bail!("activate: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let f = c.fabric_of(leader).context("fabric")?;
    assert_eq!(owner_counts(&f).get(&drained), None);

    // ...until a rebalance, which takes the fewest moves: 50 from each of the others.
    let report = match admin
        .call_leader(&AdminRequest::DeviceRebalance { max_moves: None })
        .await?
    {
        AdminReply::Rebalanced(r) => r,
        other => bail!("rebalance: {other:?}"),
    };
    assert_eq!((report.planned, report.moved), (100, 100), "{report:?}");
    let counts: Vec<(NodeId, u64)> = report.nodes.iter().map(|n| (n.id, n.devices)).collect();
    assert_eq!(counts, vec![(1, 100), (2, 100), (3, 100)]);
    wait_all_up(&c, leader, &farm, n, &all, T).await?;
    let moved: u32 = farm.counts(n)?.iter().map(|c| c.accepted - 1).sum();
    assert_eq!(
        moved, 200,
        "the rebalance reconnected exactly the 100 devices it moved"
    );
    match admin
        .call_leader(&AdminRequest::DeviceRebalance { max_moves: None })
        .await?
    {
        AdminReply::Rebalanced(r) => assert_eq!(r.moved, 0, "balanced already: {r:?}"),
        other => bail!("rebalance: {other:?}"),
    }

    // A removed device's connection is closed by its owner.
    let removed = dev_id(0);
    match admin
        .call_leader(&AdminRequest::Write(Command::RemoveDevice {
            id: removed.clone(),
        }))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("remove {removed}: {other:?}"),
    }
    let deadline = Instant::now() + T;
    while farm.counts(1)?[0].live != 0 {
        if Instant::now() > deadline {
            bail!("the connection of removed device {removed} stayed open");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held: usize = c.nodes.values().map(|n| n.held_devices()).sum();
    assert_eq!(held, n - 1);
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

/// A fake device-initiated device: connects to `port`, names itself, returns the node's answer.
async fn device_hello(
    port: std::net::SocketAddr,
    id: &str,
) -> Result<(BufReader<TcpStream>, String)> {
    let mut s = TcpStream::connect(port).await?;
    s.write_all(format!("{id}\n").as_bytes()).await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await??;
    Ok((r, line.trim_end().to_string()))
}

/// Waits until `id` is `up` and owned by `owner` in node `via`'s fabric.
async fn wait_owned_up(c: &Cluster, via: NodeId, id: &str, owner: NodeId) -> Result<()> {
    c.wait_for(T, &format!("{id} up on node {owner}"), |c| {
        c.fabric_of(via).is_some_and(|f| {
            f.devices
                .get(id)
                .is_some_and(|d| d.owner == Some(owner) && d.status == DeviceStatus::Up)
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_initiated_devices_are_claimed_by_the_node_they_connect_to() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    c.wait_converged(T).await?;
    let mut admin = c.admin(leader).await?;
    let batch = vec![
        NewDevice {
            id: "di-1".into(),
            addr: "192.0.2.10".into(),
            mode: DeviceMode::DeviceInitiated,
        },
        NewDevice {
            id: "si-1".into(),
            // Never reached: nothing listens on port 1.
            addr: "127.0.0.1:1".into(),
            mode: DeviceMode::SpaceInitiated,
        },
    ];
    match admin.call_leader(&AdminRequest::AddDevices(batch)).await? {
        AdminReply::Applied(_) => {}
        other => bail!("add: {other:?}"),
    }
    // The leader assigns it at once; it stays `connecting` until the device calls in.
    c.wait_for(T, "di-1 assigned", |c| {
        c.fabric_of(leader)
            .is_some_and(|f| f.devices.get("di-1").is_some_and(|d| d.owner.is_some()))
    })
    .await?;
    let assigned = c.fabric_of(leader).context("fabric")?.devices["di-1"]
        .owner
        .context("owner")?;
    let port = |id: NodeId| c.nodes[&id].device_listen_addr().context("device port");

    // It calls a node other than the one it was assigned to: that node claims it.
    let first = if assigned == 1 { 2 } else { 1 };
    let (mut conn1, answer) = device_hello(port(first)?, "di-1").await?;
    assert_eq!(answer, format!("OK n{first}"));
    wait_owned_up(&c, leader, "di-1", first).await?;

    // It calls another node: at once, that is refused (the device port is not authenticated:
    // a device just up somewhere is not taken from it for 2 s, so a claim war cannot churn);
    // then the claim moves, and the first node closes its connection. The second node's view
    // may not show yet that the device came up: then the leader refuses the claim.
    let second = (1..=3)
        .find(|n| *n != first && *n != assigned)
        .context("a third node")?;
    let (_refused, answer) = device_hello(port(second)?, "di-1").await?;
    assert!(
        answer.starts_with("ERR ")
            && answer.contains(&format!(
                "device \"di-1\" came up on node {first} less than 2 s ago"
            )),
        "{answer}"
    );
    assert_eq!(
        c.fabric_of(leader).context("fabric")?.devices["di-1"].owner,
        Some(first)
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (_conn2, answer) = device_hello(port(second)?, "di-1").await?;
    assert_eq!(answer, format!("OK n{second}"));
    wait_owned_up(&c, leader, "di-1", second).await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), conn1.read(&mut buf))
        .await
        .context("the first node kept the connection of a device it no longer owns")??;
    assert_eq!(n, 0, "expected EOF from the first node");

    // Unknown ids, space-initiated ids and garbage are refused and closed.
    for (hello, expected) in [
        ("nope", "ERR unknown device \"nope\""),
        (
            "si-1",
            "ERR device \"si-1\" is registered as space-initiated",
        ),
        ("bad id with spaces", "ERR bad hello"),
    ] {
        let (mut r, answer) = device_hello(port(first)?, hello).await?;
        assert!(answer.starts_with(expected), "{hello}: {answer}");
        let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await??;
        assert_eq!(n, 0, "{hello}: connection left open");
    }
    let f = c.fabric_of(leader).context("fabric")?;
    assert_eq!(f.devices["di-1"].owner, Some(second));
    assert!(!f.devices.contains_key("nope"));

    // Hellos in flight are bounded per source: 16 silent connections from here hold their
    // places, and the next one is turned away at once.
    let mut silent = Vec::new();
    for _ in 0..spaced_node::devices::gate::HELLOS_PER_SOURCE {
        silent.push(TcpStream::connect(port(first)?).await?);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut r = BufReader::new(TcpStream::connect(port(first)?).await?);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line))
        .await
        .context("an extra hello was not turned away at once")??;
    assert!(line.starts_with("ERR busy"), "{line}");
    // A place freed is taken again.
    drop(silent.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_r, answer) = device_hello(port(first)?, "nope").await?;
    assert!(answer.starts_with("ERR unknown device"), "{answer}");
    drop(silent);
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_device_address_is_refused_at_registration() -> Result<()> {
    let mut c = Cluster::start(1, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let mut admin = c.admin(leader).await?;
    for addr in ["bad host", "router:0", "10.0.0.1:99999", ""] {
        let dev = NewDevice {
            id: "d1".into(),
            addr: addr.into(),
            mode: DeviceMode::SpaceInitiated,
        };
        match admin
            .call_leader(&AdminRequest::AddDevices(vec![dev]))
            .await?
        {
            AdminReply::Failed(e) => assert!(e.contains("device address"), "{addr:?}: {e}"),
            other => bail!("{addr:?} accepted: {other:?}"),
        }
    }
    assert!(c.fabric_of(leader).context("fabric")?.devices.is_empty());
    admin.close().await;
    c.stop_all().await;
    Ok(())
}
