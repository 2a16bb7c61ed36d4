//! Self-tests of the network lab (tests/lab.rs) with real namespaces; skipped without root.

use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use spaced_tests::lab::{AddressWatch, Host, Lab, WatchReport, lab_or_skip, netns_list};

/// Port of the probe service every test host runs (namespaces are separate, so no clashes).
const PORT: u16 = 7070;
const SHORT: Duration = Duration::from_millis(500);

/// Whether `program` is on PATH (ping is not installed everywhere).
fn have_program(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Every host answers its own name on its IPv4 and IPv6 address.
fn serve_names(lab: &Lab, nodes: &[Host]) -> Result<()> {
    for h in nodes {
        lab.serve_in(
            &h.ns,
            SocketAddr::new(h.ip.into(), PORT),
            h.name.clone().into_bytes(),
        )?;
        lab.serve_in(
            &h.ns,
            SocketAddr::new(h.ip6.into(), PORT),
            h.name.clone().into_bytes(),
        )?;
    }
    Ok(())
}

/// Asks whoever serves `ip` for its name.
fn who_answers(lab: &Lab, from: &Host, ip: IpAddr, timeout: Duration) -> Result<String> {
    let reply = lab.tcp_exchange(&from.ns, SocketAddr::new(ip, PORT), b"who?", timeout)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Retries `f` until it succeeds or `limit` passes (links need a moment after changes).
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e).context("gave up retrying"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn addr_add(lab: &Lab, ns: &str, ip: IpAddr) -> Result<()> {
    let prefix = if ip.is_ipv4() {
        lab.subnet_prefix()
    } else {
        64
    };
    lab.run_in(
        ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    Ok(())
}

fn addr_del(lab: &Lab, ns: &str, ip: IpAddr) -> Result<()> {
    let prefix = if ip.is_ipv4() {
        lab.subnet_prefix()
    } else {
        64
    };
    lab.run_in(
        ns,
        &[
            "ip",
            "addr",
            "del",
            &format!("{ip}/{prefix}"),
            "dev",
            "eth0",
        ],
    )?;
    Ok(())
}

/// Namespaces of one lab that still exist.
fn remaining_namespaces(id: &str) -> Result<Vec<String>> {
    let prefix = format!("slab-{id}-");
    Ok(netns_list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

#[test]
fn all_nodes_reach_each_other() -> Result<()> {
    let Some(lab) = lab_or_skip(3)? else {
        return Ok(());
    };
    let mut nodes = lab.hosts().to_vec();
    nodes.push(lab.client().clone());
    let ping = have_program("ping");
    if !ping {
        serve_names(&lab, &nodes)?;
    }
    for from in &nodes {
        for to in nodes.iter().filter(|n| *n != from) {
            for ip in [IpAddr::V4(to.ip), IpAddr::V6(to.ip6)] {
                if ping {
                    lab.run_in(&from.ns, &["ping", "-c1", "-W1", &ip.to_string()])
                        .with_context(|| format!("{} pinging {} at {ip}", from.name, to.name))?;
                } else {
                    let name = who_answers(&lab, from, ip, Duration::from_secs(2))
                        .with_context(|| format!("{} reaching {} at {ip}", from.name, to.name))?;
                    assert_eq!(name, to.name, "{} at {ip} answered as {name}", to.name);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn addresses_sees_added_address() -> Result<()> {
    let Some(lab) = lab_or_skip(2)? else {
        return Ok(());
    };
    let (h1, h2) = (lab.host(1), lab.host(2));
    let before = lab.addresses(&h2.ns)?;
    assert!(
        before.contains(&h2.ip.into()) && before.contains(&h2.ip6.into()),
        "{before:?}"
    );

    let vip = IpAddr::V4(lab.free_ip(5));
    let vip6 = IpAddr::V6(lab.free_ip6(5));
    assert!(!before.contains(&vip) && !before.contains(&vip6));
    addr_add(&lab, &h2.ns, vip)?;
    addr_add(&lab, &h2.ns, vip6)?;
    let after = lab.addresses(&h2.ns)?;
    assert!(after.contains(&vip) && after.contains(&vip6), "{after:?}");
    let other = lab.addresses(&h1.ns)?;
    assert!(
        !other.contains(&vip) && !other.contains(&vip6),
        "h1 has {other:?}"
    );

    addr_del(&lab, &h2.ns, vip)?;
    assert!(!lab.addresses(&h2.ns)?.contains(&vip));
    Ok(())
}

#[test]
fn partition_cuts_host_off_and_heal_restores_it() -> Result<()> {
    let Some(lab) = lab_or_skip(2)? else {
        return Ok(());
    };
    let (h1, h2, client) = (
        lab.host(1).clone(),
        lab.host(2).clone(),
        lab.client().clone(),
    );
    serve_names(&lab, &[h1.clone(), h2.clone()])?;
    assert_eq!(who_answers(&lab, &client, h1.ip.into(), SHORT)?, "h1");

    lab.partition(&h1)?;
    for ip in [IpAddr::V4(h1.ip), IpAddr::V6(h1.ip6)] {
        let r = who_answers(&lab, &client, ip, Duration::from_millis(300));
        assert!(
            r.is_err(),
            "client still reaches partitioned h1 at {ip}: {r:?}"
        );
        let r = who_answers(&lab, &h2, ip, Duration::from_millis(300));
        assert!(r.is_err(), "h2 still reaches partitioned h1 at {ip}: {r:?}");
    }
    // The rest of the lab is unaffected, and h1 keeps its interface and addresses.
    assert_eq!(who_answers(&lab, &client, h2.ip.into(), SHORT)?, "h2");
    assert!(lab.addresses(&h1.ns)?.contains(&h1.ip.into()));

    lab.heal(&h1)?;
    for ip in [IpAddr::V4(h1.ip), IpAddr::V6(h1.ip6)] {
        let name = eventually(Duration::from_secs(5), || {
            who_answers(&lab, &client, ip, SHORT)
        })?;
        assert_eq!(name, "h1");
    }

    // Host-side link down/up: unreachable while down, back (with its IPv6 address) once up.
    lab.host_eth_down(&h2)?;
    assert!(who_answers(&lab, &client, h2.ip.into(), Duration::from_millis(300)).is_err());
    lab.host_eth_up(&h2)?;
    for ip in [IpAddr::V4(h2.ip), IpAddr::V6(h2.ip6)] {
        let name = eventually(Duration::from_secs(5), || {
            who_answers(&lab, &client, ip, SHORT)
        })?;
        assert_eq!(name, "h2");
    }
    Ok(())
}

#[test]
fn neighbour_reflects_entries() -> Result<()> {
    let Some(lab) = lab_or_skip(2)? else {
        return Ok(());
    };
    let (h1, client) = (lab.host(1).clone(), lab.client().clone());
    serve_names(&lab, std::slice::from_ref(&h1))?;
    assert_eq!(
        lab.neighbour(&client.ns, h1.ip.into())?,
        None,
        "fresh lab, no entry yet"
    );

    who_answers(&lab, &client, h1.ip.into(), SHORT)?;
    who_answers(&lab, &client, h1.ip6.into(), SHORT)?;
    assert_eq!(lab.neighbour(&client.ns, h1.ip.into())?, Some(h1.mac));
    assert_eq!(lab.neighbour(&client.ns, h1.ip6.into())?, Some(h1.mac));
    // h1 learned the client the same way.
    assert_eq!(lab.neighbour(&h1.ns, client.ip.into())?, Some(client.mac));

    // Nobody has this address: resolution fails, which must read as "no entry".
    let nobody = IpAddr::V4(lab.free_ip(7));
    assert!(who_answers(&lab, &client, nobody, Duration::from_millis(300)).is_err());
    assert_eq!(lab.neighbour(&client.ns, nobody)?, None);
    Ok(())
}

/// Holder names over time, with namespace names shortened to host names.
fn timeline(lab: &Lab, report: &WatchReport) -> Vec<Vec<String>> {
    let short = |ns: &String| {
        lab.hosts()
            .iter()
            .find(|h| &h.ns == ns)
            .map_or(ns.clone(), |h| h.name.clone())
    };
    report
        .holders_over_time
        .iter()
        .map(|(_, hs)| hs.iter().map(short).collect())
        .collect()
}

#[test]
fn address_watch_sees_overlap_and_clean_move() -> Result<()> {
    let Some(lab) = lab_or_skip(2)? else {
        return Ok(());
    };
    let (h1, h2) = (lab.host(1).ns.clone(), lab.host(2).ns.clone());
    let period = Duration::from_millis(2);
    let settle = Duration::from_millis(60);

    for vip in [IpAddr::V4(lab.free_ip(1)), IpAddr::V6(lab.free_ip6(1))] {
        // Both hold it at once: must be reported.
        let watch = AddressWatch::start(&lab, &lab.host_namespaces(), vip, period)?;
        addr_add(&lab, &h1, vip)?;
        addr_add(&lab, &h2, vip)?;
        std::thread::sleep(settle);
        addr_del(&lab, &h1, vip)?;
        addr_del(&lab, &h2, vip)?;
        std::thread::sleep(settle);
        let report = watch.stop();
        println!("{vip} overlap: {report:?}");
        assert_eq!(report.max_holders, 2, "{report:?}");
        assert!(
            !report.overlaps.is_empty() && report.overlap_samples > 5,
            "{report:?}"
        );
        assert_eq!(report.errors, 0);
        assert!(report.samples > 20, "too few samples: {report:?}");

        // Moved with a gap: never two holders.
        let watch = AddressWatch::start(&lab, &lab.host_namespaces(), vip, period)?;
        addr_add(&lab, &h1, vip)?;
        std::thread::sleep(settle);
        addr_del(&lab, &h1, vip)?;
        std::thread::sleep(settle);
        addr_add(&lab, &h2, vip)?;
        std::thread::sleep(settle);
        addr_del(&lab, &h2, vip)?;
        std::thread::sleep(settle);
        let report = watch.stop();
        println!("{vip} move: {report:?}");
        assert_eq!(report.max_holders, 1, "{report:?}");
        assert!(report.overlaps.is_empty(), "{report:?}");
        let expected: Vec<Vec<String>> = [&[][..], &["h1"], &[], &["h2"], &[]]
            .iter()
            .map(|s| s.iter().map(|n| n.to_string()).collect())
            .collect();
        assert_eq!(timeline(&lab, &report), expected, "{report:?}");
    }
    Ok(())
}

#[test]
fn spawned_process_signal_wait_and_log() -> Result<()> {
    let Some(lab) = lab_or_skip(1)? else {
        return Ok(());
    };
    let h1 = lab.host(1);
    let script = "echo started in $(ip -br addr show eth0); exec sleep 1000";
    let p = lab.spawn_in(&h1.ns, Path::new("/bin/sh"), &["-c", script], "sh.log")?;
    assert!(p.log_path().starts_with(lab.dir()));
    let log = eventually(Duration::from_secs(5), || {
        let log = p.read_log();
        if log.contains("started") {
            Ok(log)
        } else {
            bail!("log so far: {log:?}")
        }
    })?;
    assert!(
        log.contains(&h1.ip.to_string()),
        "not in h1's namespace? {log}"
    );
    assert!(p.is_running());
    assert_eq!(p.wait(Duration::from_millis(50))?, None);
    p.signal(Signal::SIGTERM)?;
    let status = p
        .wait(Duration::from_secs(5))?
        .context("sleep ignored SIGTERM")?;
    assert!(!status.success());
    assert!(
        p.signal(Signal::SIGTERM).is_err(),
        "signalling a reaped process must fail"
    );
    Ok(())
}

#[test]
fn drop_removes_namespaces_and_processes() -> Result<()> {
    let Some(lab) = lab_or_skip(2)? else {
        return Ok(());
    };
    let id = lab.id().to_string();
    assert_eq!(remaining_namespaces(&id)?.len(), 4, "sw, h1, h2, client");
    let p = lab.spawn_in(
        &lab.host(1).ns,
        Path::new("/bin/sleep"),
        &["1000"],
        "sleep.log",
    )?;
    lab.serve_in(
        &lab.host(2).ns,
        SocketAddr::new(lab.free_ip(3).into(), PORT),
        b"x".to_vec(),
    )?;
    let dir = lab.dir().to_path_buf();
    drop(lab);
    assert_eq!(remaining_namespaces(&id)?, Vec::<String>::new());
    assert!(!p.is_running(), "spawned process survived the lab");
    assert!(!dir.exists(), "temp dir left behind after a passing test");
    Ok(())
}

#[test]
fn drop_removes_namespaces_after_panic() -> Result<()> {
    // Only to learn whether we can build labs at all (skip without root).
    let Some(probe) = lab_or_skip(1)? else {
        return Ok(());
    };
    drop(probe);
    let id = Mutex::new(None::<String>);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new(2).expect("building the lab");
        *id.lock().unwrap() = Some(lab.id().to_string());
        lab.spawn_in(
            &lab.host(1).ns,
            Path::new("/bin/sleep"),
            &["1000"],
            "sleep.log",
        )
        .expect("spawn");
        panic!("deliberate panic inside a lab test (expected)");
    }));
    assert!(result.is_err());
    let id = id
        .into_inner()
        .unwrap()
        .context("the closure never built its lab")?;
    ensure!(
        remaining_namespaces(&id)?.is_empty(),
        "namespaces of lab {id} left after panic: {:?}",
        remaining_namespaces(&id)?
    );
    Ok(())
}
