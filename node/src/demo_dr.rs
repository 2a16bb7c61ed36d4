//! `spaced demo --dr`: disaster recovery on loopback, without root — two one-node sites
//! (`east` active, `west` standby), each with its own CA, and a witness; devices and a
//! singleton written on east are mirrored to west, east is killed, west takes over by itself
//! once east's lease at the witness has run out, and east, restarted, comes back standby.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spaced_fabric::{Command, ServiceScope, ServiceSpec, SiteRole};
use spaced_raft::pki;
use spaced_replication::{DrSection, DrStatus};

use crate::admin::client::{AdminClient, AdminCredentials};
use crate::admin::{AdminReply, AdminRequest, DrAction};
use crate::demo::{
    DEMO_DEVICES, NodeProcess, connect_retry, free_tcp_port, free_udp_port, node_config,
    spawn_node, vip_answer, write_config,
};
use crate::ops::config::{TakeoverMode, VipSection};

/// One site of the demo: its directory, PKI, node process and admin credentials.
struct Site {
    name: &'static str,
    pki: PathBuf,
    node: NodeProcess,
    vip: SocketAddr,
}

/// A `spaced witness` child, killed when dropped.
struct WitnessProcess(Child);

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the DR demo in a temp dir (kept with `keep`).
pub async fn run(keep: bool) -> Result<()> {
    crate::demo::in_temp_dir(
        "spaced-demo-dr-",
        keep,
        |dir| async move { run_in(&dir).await },
    )
    .await
}

async fn dr(admin: &mut AdminClient, action: DrAction) -> Result<AdminReply> {
    Ok(admin.call_leader(&AdminRequest::Dr(action)).await?)
}

async fn status(admin: &mut AdminClient) -> Result<DrStatus> {
    match dr(admin, DrAction::Status).await? {
        AdminReply::DrStatus(s) => Ok(s),
        other => bail!("dr status: {other:?}"),
    }
}

/// Asks `admin`'s site for its DR status every 50 ms until `done` holds, or fails after
/// `within`. Errors on the way (a leader not elected yet) count as not yet.
async fn wait_status(
    admin: &mut AdminClient,
    within: Duration,
    what: &str,
    done: impl Fn(&DrStatus) -> bool,
) -> Result<DrStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = status(admin).await
            && done(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn line(s: &DrStatus) -> String {
    let lag = match (s.lag_entries, s.lag_ms) {
        (Some(e), Some(ms)) => format!(", lag {e} entries / {ms} ms"),
        _ if s.role == SiteRole::Standby => ", lag unknown".into(),
        _ => String::new(),
    };
    let witnesses = s
        .witnesses_granting
        .map(|(g, of)| format!(", witnesses {g}/{of}"))
        .unwrap_or_default();
    format!(
        "{}: {} at site epoch {}, peer {}{lag}{witnesses}",
        s.site,
        s.role,
        s.epoch,
        if s.peer_reachable { "up" } else { "down" }
    )
}

async fn run_in(dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("locate the spaced binary")?;
    let vip_port = free_tcp_port()?;
    let (east_dr, west_dr, witness_port) = (free_udp_port()?, free_udp_port()?, free_udp_port()?);
    // Each site: its own CA, an admin, one node named after the site (e1, w1).
    let mut plans = Vec::new();
    for (name, node, vip, role, listen, peer_port) in [
        ("east", "e1", "127.0.0.100", "active", east_dr, west_dr),
        ("west", "w1", "127.0.0.101", "standby", west_dr, east_dr),
    ] {
        let site_dir = dir.join(name);
        let pki_dir = site_dir.join("pki");
        pki::init_ca(&pki_dir)?;
        pki::issue(&pki_dir, "demo", true)?;
        pki::issue(&pki_dir, node, false)?;
        plans.push((name, node, vip, role, listen, peer_port, site_dir, pki_dir));
    }
    let witness_files = pki::issue(&plans[0].7, "witness", false)?;
    let witness_addr = format!("127.0.0.1:{witness_port}");
    let witness = WitnessProcess(
        Process::new(&exe)
            .args(["witness", "--listen", &witness_addr, "--cert"])
            .arg(&witness_files.cert)
            .arg("--key")
            .arg(&witness_files.key)
            .arg("--ca")
            .arg(plans[0].7.join("ca.pem"))
            .arg("--ca")
            .arg(plans[1].7.join("ca.pem"))
            // Started before any site asked: no lease to outwait.
            .args(["--grace-ms", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("witness.log"))?)
            .spawn()
            .context("start the witness")?,
    );
    let mut sites = Vec::new();
    for (i, (name, node, vip, role, listen, peer_port, site_dir, pki_dir)) in
        plans.iter().enumerate()
    {
        let peer_pki = &plans[1 - i].7;
        let mut cfg = node_config(site_dir, pki_dir, 1, &["ha", "app"])?;
        cfg.name = node.to_string();
        cfg.tls.cert = pki_dir.join(format!("{node}.pem"));
        cfg.tls.key = pki_dir.join(format!("{node}.key"));
        cfg.source = site_dir.join(format!("{node}.toml"));
        cfg.takeover = TakeoverMode::Loopback;
        cfg.vips = vec![VipSection {
            name: "cluster".into(),
            address: format!("{vip}/8"),
            interface: "lo".into(),
            roles: vec!["ha".into()],
            port: Some(vip_port),
        }];
        cfg.dr = Some(DrSection {
            site: name.to_string(),
            role: role.to_string(),
            listen: format!("127.0.0.1:{listen}").parse()?,
            peer_site: plans[1 - i].0.to_string(),
            peers: vec![format!("127.0.0.1:{peer_port}")],
            peer_ca: peer_pki.join("ca.pem"),
            heartbeat_interval_ms: 200,
            heartbeat_timeout_ms: 500,
            heartbeat_retries: 3,
            witnesses: vec![witness_addr.clone()],
            witness_lease_ms: 3_000,
            automatic_failover: true,
            isolation_wait_ms: 0,
            failure_detection_script: None,
            script_timeout_ms: 10_000,
            backup: Default::default(),
        });
        let config = write_config(&cfg)?;
        let child = spawn_node(&exe, site_dir, &config, true)?;
        sites.push(Site {
            name,
            pki: pki_dir.clone(),
            node: NodeProcess {
                id: 1,
                name: node.to_string(),
                listen: cfg.listen,
                config,
                child: Some(child),
            },
            vip: format!("{vip}:{vip_port}").parse()?,
        });
    }
    println!(
        "started two sites on 127.0.0.1, each one spaced process with its own CA: east \
         (active, VIP {}) and west (standby, VIP {}), and a witness (work dir {})",
        sites[0].vip.ip(),
        sites[1].vip.ip(),
        dir.display()
    );
    let connect = |site: &Site| {
        let addr = site.node.listen.to_string();
        let pki = site.pki.clone();
        async move {
            let creds = AdminCredentials::load(&pki, None)?;
            connect_retry(&addr, &creds, Duration::from_secs(15)).await
        }
    };
    let mut east = connect(&sites[0]).await?;
    let mut west = connect(&sites[1]).await?;
    for (admin, want) in [
        (&mut east, SiteRole::Active),
        (&mut west, SiteRole::Standby),
    ] {
        wait_status(
            admin,
            Duration::from_secs(20),
            "the sites take their roles",
            |s| s.role == want && s.peer_reachable,
        )
        .await?;
    }
    println!("{}", line(&status(&mut east).await?));
    println!("{}", line(&status(&mut west).await?));

    // Work written on the active site.
    let device_addr = crate::demo::simulate_devices().await?;
    let devices: Vec<spaced_fabric::NewDevice> = (0..DEMO_DEVICES)
        .map(|i| spaced_fabric::NewDevice {
            id: format!("dev-{i:04}"),
            addr: device_addr.to_string(),
            mode: Default::default(),
        })
        .collect();
    match east.call_leader(&AdminRequest::AddDevices(devices)).await? {
        AdminReply::Applied(_) => {}
        other => bail!("add devices on east: {other:?}"),
    }
    let poller = ServiceSpec {
        command: vec!["sleep".into(), "3600".into()],
        scope: ServiceScope::Singleton,
        health_check: None,
        roles: ["app".to_string()].into(),
    };
    match east
        .call_leader(&AdminRequest::Write(Command::PutService {
            name: "poller".into(),
            spec: poller,
        }))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add the singleton on east: {other:?}"),
    }
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mirrored = loop {
        let w = west.status().await?;
        let s = status(&mut west).await?;
        if w.devices == DEMO_DEVICES as u64 && s.lag_entries == Some(0) {
            break w;
        }
        if Instant::now() > deadline {
            bail!("west did not mirror east within 20 s: {}", line(&s));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "east: {DEMO_DEVICES} devices and the singleton \"poller\" written; west mirrored them in \
         {} ms and runs none of it (VIP owner on west: {})",
        t.elapsed().as_millis(),
        mirrored
            .vips
            .iter()
            .find(|v| v.name == "cluster")
            .and_then(|v| v.owner)
            .map_or("none".to_string(), |o| o.to_string())
    );
    match west
        .call_leader(&AdminRequest::AddDevices(vec![spaced_fabric::NewDevice {
            id: "written-on-west".into(),
            addr: "127.0.0.1:1".into(),
            mode: Default::default(),
        }]))
        .await?
    {
        AdminReply::Failed(e) => println!("a write on west is refused: {e}"),
        other => bail!("a write on the standby was not refused: {other:?}"),
    }
    println!(
        "the VIP answers on east: {}",
        vip_answer(sites[0].vip).await.unwrap_or("nothing".into())
    );

    // East is lost.
    println!("\nkilling east's only node (SIGKILL)");
    east.close().await;
    sites[0].node.kill(nix::sys::signal::Signal::SIGKILL)?;
    let killed = Instant::now();
    let promoted = wait_status(&mut west, Duration::from_secs(30), "west takes over", |s| {
        s.role == SiteRole::Active
    })
    .await?;
    let promoted_after = killed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if let Some(a) = vip_answer(sites[1].vip).await {
            break a;
        }
        if Instant::now() > deadline {
            bail!("west's VIP did not answer within 20 s of its promotion");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "west became active by itself {} ms after the kill (east's lease at the witness ran out; \
         site epoch {}), and its VIP {} answers: {answer} ({} ms after the kill)",
        promoted_after.as_millis(),
        promoted.epoch,
        sites[1].vip.ip(),
        killed.elapsed().as_millis()
    );
    println!("{}", line(&promoted));

    // East returns: no failback.
    println!("\nrestarting east");
    let child = spawn_node(&exe, &dir.join("east"), &sites[0].node.config, false)?;
    if let Some(mut old) = sites[0].node.child.replace(child) {
        let _ = old.wait();
    }
    let mut east = connect(&sites[0]).await?;
    let back = wait_status(
        &mut east,
        Duration::from_secs(30),
        "east comes back standby",
        |s| s.role == SiteRole::Standby && s.lag_entries == Some(0),
    )
    .await?;
    println!(
        "east heard west active at a higher epoch, stayed standby and mirrors it: {}",
        line(&back)
    );
    east.close().await;
    west.close().await;
    for site in &mut sites {
        site.node.stop();
    }
    drop(witness);
    println!(
        "\ndemo finished: {} and {} stopped",
        sites[0].name, sites[1].name
    );
    Ok(())
}
