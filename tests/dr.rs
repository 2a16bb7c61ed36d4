//! Disaster recovery between two in-process sites on 127.0.0.1, each its own cluster with its
//! own CA: the standby mirrors the active site's devices and services and runs nothing;
//! writes on it are refused; a switchover moves the active role without losing a write; a
//! failover promotes a standby whose peer is gone; the returning old active site hears the
//! higher epoch, demotes itself and mirrors.

use std::time::Duration;

use anyhow::{Result, bail};
use spaced_fabric::{DeviceMode, NewDevice, ServiceScope, ServiceSpec, SiteRole};
use spaced_node::admin::client::AdminClient;
use spaced_node::admin::{AdminReply, AdminRequest, DrAction};
use spaced_tests::{Cluster, devices, free_udp_port};

const T: Duration = Duration::from_secs(30);

/// Two one-node sites (see [`spaced_tests::dr_sites`]).
fn two_sites() -> Result<(Cluster, Cluster)> {
    two_sites_with(&[], false)
}

/// [`two_sites`] with these witnesses, and, with `cut`, a west whose link to east goes
/// nowhere (the inter-site link is down from the start; both reach the witnesses).
fn two_sites_with(witnesses: &[String], cut: bool) -> Result<(Cluster, Cluster)> {
    let mut sites = spaced_tests::dr_sites(witnesses)?;
    if cut && let Some(dr) = sites.west.configs.get_mut(&1).and_then(|c| c.dr.as_mut()) {
        dr.peers = vec![format!("127.0.0.1:{}", sites.spare_port)];
    }
    Ok((sites.east, sites.west))
}

fn role(c: &Cluster) -> Option<(SiteRole, u64)> {
    c.fabric_of(1).map(|f| (f.site.role, f.site.epoch))
}

fn owner(c: &Cluster, placement: &str) -> Option<u64> {
    c.fabric_of(1)
        .and_then(|f| f.placements.get(placement).and_then(|p| p.owner))
}

async fn dr(admin: &mut AdminClient, action: DrAction) -> Result<AdminReply> {
    Ok(admin.call_leader(&AdminRequest::Dr(action)).await?)
}

async fn status(admin: &mut AdminClient) -> Result<spaced_replication::DrStatus> {
    match dr(admin, DrAction::Status).await? {
        AdminReply::DrStatus(s) => Ok(s),
        other => bail!("dr status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_mirrors_runs_nothing_switches_over_fails_over_and_the_old_site_follows()
-> Result<()> {
    let (mut east, mut west) = two_sites()?;
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    east.wait_for(T, "east active at epoch 1", |c| {
        role(c) == Some((SiteRole::Active, 1))
    })
    .await?;
    west.wait_for(T, "west standby", |c| {
        role(c) == Some((SiteRole::Standby, 0))
    })
    .await?;
    let mut ea = east.admin(1).await?;
    let mut wa = west.admin(1).await?;

    // Work written on the active site: devices and a singleton.
    match ea
        .call_leader(&AdminRequest::AddDevices(devices("dev", 40)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add devices: {other:?}"),
    }
    let poller = ServiceSpec {
        command: vec!["sleep".into(), "300".into()],
        scope: ServiceScope::Singleton,
        health_check: None,
        roles: ["app".to_string()].into(),
    };
    match ea
        .call_leader(&AdminRequest::Write(spaced_fabric::Command::PutService {
            name: "poller".into(),
            spec: poller.clone(),
        }))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("put service: {other:?}"),
    }
    east.wait_for(T, "east runs its VIP and singleton", |c| {
        owner(c, "cluster") == Some(1) && owner(c, "poller") == Some(1)
    })
    .await?;

    // The standby mirrors it, and runs none of it.
    west.wait_for(T, "west mirrored east", |c| {
        c.fabric_of(1).is_some_and(|f| {
            f.devices.len() == 40
                && f.services.get("poller") == Some(&poller)
                && f.placements.contains_key("poller")
                && f.site.mirror.as_ref().is_some_and(|m| m.site == "east")
        })
    })
    .await?;
    let f = west.fabric_of(1).expect("west runs");
    assert!(
        f.devices.values().all(|d| d.owner.is_none()),
        "a standby holds no device"
    );
    assert_eq!(owner(&west, "cluster"), None, "a standby holds no VIP");
    assert_eq!(owner(&west, "poller"), None, "a standby runs no singleton");
    let s = status(&mut wa).await?;
    assert_eq!(
        (s.role, s.peer_role),
        (SiteRole::Standby, Some(SiteRole::Active))
    );
    assert!(s.peer_reachable, "{s:?}");
    assert!(
        s.lag_entries.is_some() && s.mirrored_index.is_some(),
        "{s:?}"
    );

    // Writes go to the active site only.
    match wa
        .call_leader(&AdminRequest::AddDevices(devices("west", 1)))
        .await?
    {
        AdminReply::Failed(e) => assert!(e.contains("standby"), "{e}"),
        other => bail!("a write on the standby: {other:?}"),
    }
    // A failover while the active site answers is refused: that is a switchover.
    match dr(&mut wa, DrAction::Failover { force: false }).await? {
        AdminReply::Failed(e) => assert!(e.contains("switchover"), "{e}"),
        other => bail!("failover with the peer up: {other:?}"),
    }

    // Switchover: east steps down, west mirrors everything, then west is active above it.
    match ea
        .call_leader(&AdminRequest::AddDevices(devices("late", 5)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add devices: {other:?}"),
    }
    match dr(&mut wa, DrAction::Switchover).await? {
        AdminReply::DrActive { epoch } => assert_eq!(epoch, 2),
        other => bail!("switchover: {other:?}"),
    }
    assert_eq!(
        west.fabric_of(1).map(|f| f.devices.len()),
        Some(45),
        "a write acknowledged before the switchover is on the new active site"
    );
    east.wait_for(T, "east standby, its VIP and singleton let go", |c| {
        role(c) == Some((SiteRole::Standby, 1))
            && owner(c, "cluster").is_none()
            && owner(c, "poller").is_none()
    })
    .await?;
    west.wait_for(T, "west runs the VIP and the singleton", |c| {
        owner(c, "cluster") == Some(1) && owner(c, "poller") == Some(1)
    })
    .await?;
    // The old active site now mirrors the new one.
    match wa
        .call_leader(&AdminRequest::AddDevices(devices("new", 3)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add devices on west: {other:?}"),
    }
    east.wait_for(T, "east mirrors west", |c| {
        c.fabric_of(1).is_some_and(|f| f.devices.len() == 48)
    })
    .await?;

    // West is lost; east fails over once it has stopped hearing from it.
    wa.close().await;
    west.stop_node(1).await;
    let deadline = tokio::time::Instant::now() + T;
    let epoch = loop {
        match dr(&mut ea, DrAction::Failover { force: false }).await? {
            AdminReply::DrActive { epoch } => break epoch,
            AdminReply::Failed(e) if e.contains("answered") => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "west never counted as lost: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => bail!("failover: {other:?}"),
        }
    };
    assert_eq!(epoch, 3, "above every epoch seen (west's 2)");
    east.wait_for(T, "east runs the VIP again", |c| {
        owner(c, "cluster") == Some(1)
    })
    .await?;

    // West returns: it hears east active at a higher epoch and demotes itself; no failback.
    // In one process the stopped node's tasks may hold its port a moment longer.
    let deadline = tokio::time::Instant::now() + T;
    while let Err(e) = west.start_node(1, false).await {
        if tokio::time::Instant::now() > deadline {
            return Err(e.context("restart west on its port"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    west.wait_for(T, "west demoted to standby at east's epoch", |c| {
        role(c) == Some((SiteRole::Standby, 3)) && owner(c, "cluster").is_none()
    })
    .await?;
    assert_eq!(role(&east), Some((SiteRole::Active, 3)));
    ea.close().await;
    east.stop_all().await;
    west.stop_all().await;
    Ok(())
}

/// A `spaced witness` process with a certificate of east's CA, trusting both sites' CAs;
/// killed when dropped.
struct WitnessProcess(std::process::Child);

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn witness(east: &Cluster, west: &Cluster, port: u16) -> Result<WitnessProcess> {
    // Started before any lease was granted: no grace needed.
    witness_with(east, west, port, &["--grace-ms", "0"])
}

/// A witness with these extra arguments (its certificate issued once, reused on restarts).
fn witness_with(
    east: &Cluster,
    west: &Cluster,
    port: u16,
    args: &[&str],
) -> Result<WitnessProcess> {
    let cert = east.pki_dir().join("w1.pem");
    let files = if cert.exists() {
        spaced_raft::pki::IssuedFiles {
            cert,
            key: east.pki_dir().join("w1.key"),
        }
    } else {
        spaced_raft::pki::issue(&east.pki_dir(), "w1", false)?
    };
    let child = std::process::Command::new(spaced_tests::binary("spaced")?)
        .args([
            "witness",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cert",
        ])
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .arg("--ca")
        .arg(east.pki_dir().join("ca.pem"))
        .arg("--ca")
        .arg(west.pki_dir().join("ca.pem"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(east.dir.path().join("witness.log"))?,
        )
        .spawn()?;
    Ok(WitnessProcess(child))
}

/// With a witness: while the active site renews its role there, a standby that cannot reach
/// it does not take over; once the active site is gone and its lease has run out at the
/// witness, the standby takes over by itself; an active site that loses the witness demotes
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_witness_a_standby_takes_over_only_from_a_site_that_is_gone() -> Result<()> {
    let port = free_udp_port();
    let (mut east, mut west) = two_sites_with(&[format!("127.0.0.1:{port}")], true)?;
    // West, once active, will lose the witness: it then waits before taking over again.
    if let Some(dr) = west.configs.get_mut(&1).and_then(|c| c.dr.as_mut()) {
        dr.isolation_wait_ms = 600_000;
    }
    let w = witness(&east, &west, port)?;
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    east.wait_for(T, "east active", |c| role(c) == Some((SiteRole::Active, 1)))
        .await?;
    let mut wa = west.admin(1).await?;
    let mut ea = east.admin(1).await?;
    // West cannot reach east, and says so; east holds the role at the witness.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = status(&mut wa).await?;
        if !s.peer_reachable && s.failures_in_row >= 2 && s.witnesses_granting.is_some() {
            assert_eq!(s.witnesses_granting, Some((0, 1)), "{s:?}");
            assert!(s.automatic_failover);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "west never lost east: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two leases long: the link is down, both reach the witness: nothing happens.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        role(&west),
        Some((SiteRole::Standby, 0)),
        "west took over from a live east"
    );
    assert_eq!(role(&east), Some((SiteRole::Active, 1)));
    assert_eq!(status(&mut ea).await?.witnesses_granting, Some((1, 1)));
    // A manual failover is refused by the witness too (unless forced).
    match dr(&mut wa, DrAction::Failover { force: false }).await? {
        AdminReply::Failed(e) => assert!(e.contains("witnesses grant"), "{e}"),
        other => bail!("failover against the witness: {other:?}"),
    }

    // East is gone: once its lease runs out at the witness, west takes over by itself.
    ea.close().await;
    east.crash_node(1).await;
    west.wait_for(T, "west active by automatic failover", |c| {
        role(c) == Some((SiteRole::Active, 2))
    })
    .await?;
    west.wait_for(T, "west holds its VIP", |c| owner(c, "cluster") == Some(1))
        .await?;

    // The witness is gone: west cannot renew and demotes itself within half a lease.
    drop(w);
    west.wait_for(
        T,
        "west demoted itself, its automatic failover off for the wait",
        |c| {
            role(c) == Some((SiteRole::Standby, 2))
                && owner(c, "cluster").is_none()
                && c.fabric_of(1)
                    .is_some_and(|f| f.site.automatic_failover_off_until.is_some())
        },
    )
    .await?;
    let s = status(&mut wa).await?;
    assert!(
        !s.automatic_failover && s.automatic_failover_off_until.is_some(),
        "{s:?}"
    );
    // An operator turns it back on.
    match dr(&mut wa, DrAction::AutomaticFailover { off_for_ms: None }).await? {
        AdminReply::DrStatus(s) => assert!(s.automatic_failover, "{s:?}"),
        other => bail!("automatic-failover --enable: {other:?}"),
    }
    wa.close().await;
    west.stop_all().await;
    Ok(())
}

/// With a witness, a switchover moves the active role there too: the active site hands over,
/// gives its ticket back once its workload leases ran out, and the standby claims it; the new
/// active site then holds it (it is not overtaken by its peer's old ticket), runs the VIP,
/// and the old one stays standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_witness_a_switchover_moves_the_ticket_and_the_new_active_site_keeps_it()
-> Result<()> {
    let port = free_udp_port();
    let (mut east, mut west) = two_sites_with(&[format!("127.0.0.1:{port}")], false)?;
    let _w = witness(&east, &west, port)?;
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    east.wait_for(T, "east active and holding its VIP", |c| {
        role(c) == Some((SiteRole::Active, 1)) && owner(c, "cluster") == Some(1)
    })
    .await?;
    let mut wa = west.admin(1).await?;
    let ea = east.admin(1).await?;
    let deadline = tokio::time::Instant::now() + T;
    while !status(&mut wa).await?.peer_reachable {
        assert!(
            tokio::time::Instant::now() < deadline,
            "west never reached east"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match dr(&mut wa, DrAction::Switchover).await? {
        AdminReply::DrActive { epoch } => assert_eq!(epoch, 2),
        other => bail!("switchover: {other:?}"),
    }
    west.wait_for(T, "west holds its VIP", |c| owner(c, "cluster") == Some(1))
        .await?;
    // Two witness leases later west still holds the role (it renews its own ticket) and
    // east is standby without its VIP.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(role(&west), Some((SiteRole::Active, 2)));
    assert_eq!(owner(&west, "cluster"), Some(1));
    assert_eq!(role(&east).map(|r| r.0), Some(SiteRole::Standby));
    assert_eq!(owner(&east, "cluster"), None);
    assert_eq!(status(&mut wa).await?.witnesses_granting, Some((1, 1)));
    wa.close().await;
    ea.close().await;
    east.stop_all().await;
    west.stop_all().await;
    Ok(())
}

/// `[dr.backup]`: the active site backs its declared configuration files up (at once, and
/// on `dr backup`) and ships them to the standby, which keeps them and, promoted, writes the
/// newest back before its services start; a standby takes no backup itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_files_are_backed_up_shipped_and_restored_at_promotion() -> Result<()> {
    let (mut east, mut west) = two_sites()?;
    let conf = east.dir.path().join("app").join("app.conf");
    std::fs::create_dir_all(conf.parent().expect("a directory"))?;
    std::fs::write(&conf, "v1")?;
    for site in [&mut east, &mut west] {
        if let Some(dr) = site.configs.get_mut(&1).and_then(|c| c.dr.as_mut()) {
            dr.backup.files = vec![conf.clone()];
        }
    }
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    let mut ea = east.admin(1).await?;
    let mut wa = west.admin(1).await?;
    // East takes a first backup as soon as it leads, and west receives it.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = status(&mut wa).await?;
        if s.last_backup
            .is_some_and(|(_, files, bytes)| (files, bytes) == (1, 2))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "west never received a backup: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match dr(&mut wa, DrAction::Backup).await? {
        AdminReply::Failed(e) => assert!(e.contains("standby"), "{e}"),
        other => bail!("a backup on the standby: {other:?}"),
    }
    // A changed file, backed up on demand, reaches west too.
    std::fs::write(&conf, "v2 changed")?;
    let taken = match dr(&mut ea, DrAction::Backup).await? {
        AdminReply::DrBackup {
            taken_at,
            files: 1,
            bytes: 10,
        } => taken_at,
        other => bail!("dr backup: {other:?}"),
    };
    let deadline = tokio::time::Instant::now() + T;
    while status(&mut wa).await?.last_backup.map(|b| b.0) != Some(taken) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "west never received backup {taken}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // West's host lacks the file; east is lost and west fails over: the file is back.
    std::fs::remove_dir_all(conf.parent().expect("a directory"))?;
    ea.close().await;
    east.crash_node(1).await;
    let deadline = tokio::time::Instant::now() + T;
    while status(&mut wa).await?.peer_reachable {
        assert!(
            tokio::time::Instant::now() < deadline,
            "west never lost east"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match dr(&mut wa, DrAction::Failover { force: false }).await? {
        AdminReply::DrActive { epoch } => assert_eq!(epoch, 2),
        other => bail!("failover: {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + T;
    while std::fs::read_to_string(&conf).ok().as_deref() != Some("v2 changed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} not restored",
            conf.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wa.close().await;
    west.stop_all().await;
    Ok(())
}

/// A witness with `--state` restarted on the same boot goes on from its saved tickets: the
/// active site renews at once and stays active, although the witness's grace (60 s) would
/// otherwise have it refuse everything for longer than half a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_restarted_with_its_state_keeps_the_active_site_active() -> Result<()> {
    let port = free_udp_port();
    let (mut east, mut west) = two_sites_with(&[format!("127.0.0.1:{port}")], false)?;
    let state = east.dir.path().join("witness-state.json");
    let state_arg = state.to_str().expect("UTF-8 path").to_string();
    let args = ["--grace-ms", "60000", "--state", state_arg.as_str()];
    // The first start has no state yet: no lease to outwait.
    let w = witness_with(
        &east,
        &west,
        port,
        &["--grace-ms", "0", "--state", &state_arg],
    )?;
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    east.wait_for(T, "east active holding its VIP", |c| {
        role(c) == Some((SiteRole::Active, 1)) && owner(c, "cluster") == Some(1)
    })
    .await?;
    let mut ea = east.admin(1).await?;
    let deadline = tokio::time::Instant::now() + T;
    while status(&mut ea).await?.witnesses_granting != Some((1, 1)) || !state.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the witness never granted east"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(w);
    let _w = witness_with(&east, &west, port, &args)?;
    // Two witness leases (3 s each): east renews at the restarted witness all along.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let log = || std::fs::read_to_string(east.dir.path().join("witness.log")).unwrap_or_default();
    assert_eq!(
        role(&east),
        Some((SiteRole::Active, 1)),
        "east demoted itself; the witness said:\n{}",
        log()
    );
    assert_eq!(owner(&east, "cluster"), Some(1));
    assert_eq!(status(&mut ea).await?.witnesses_granting, Some((1, 1)));
    ea.close().await;
    east.stop_all().await;
    west.stop_all().await;
    Ok(())
}

/// A failure-detection script replaces the built-in decision once the peer is lost: its bad
/// output is named and changes nothing; its `beActive` promotes the standby, its `beStandby`
/// demotes the active site, and its `wait` holds later verdicts back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_detection_script_decides_once_the_peer_is_lost() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (mut east, mut west) = two_sites_with(&[], true)?;
    // The script prints whatever the test put in `verdict`, after reading its input.
    let verdict = west.dir.path().join("verdict");
    std::fs::write(&verdict, "not json")?;
    let script = west.dir.path().join("decide.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat > /dev/null\ncat {}\n", verdict.display()),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    if let Some(dr) = west.configs.get_mut(&1).and_then(|c| c.dr.as_mut()) {
        dr.failure_detection_script = Some(script);
    }
    spaced_tests::start_site(&mut east).await?;
    spaced_tests::start_site(&mut west).await?;
    let mut wa = west.admin(1).await?;
    // West cannot reach east: the script runs, and its garbage changes nothing.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = status(&mut wa).await?;
        if let Some(note) = &s.script_note {
            assert!(note.contains("not the expected JSON"), "{note}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the script never ran: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(role(&west), Some((SiteRole::Standby, 0)));
    std::fs::write(
        &verdict,
        r#"{"state":"standby","action":"beActive","description":"east is gone"}"#,
    )?;
    west.wait_for(T, "west active on the script's word", |c| {
        role(c) == Some((SiteRole::Active, 1))
    })
    .await?;
    let s = status(&mut wa).await?;
    assert!(
        s.script_note
            .as_deref()
            .is_some_and(|n| n.contains("east is gone") && n.contains("became active")),
        "{s:?}"
    );
    // `beStandby` demotes the active site.
    std::fs::write(
        &verdict,
        r#"{"state":"active","action":"beStandby","description":"hand back"}"#,
    )?;
    west.wait_for(T, "west standby on the script's word", |c| {
        role(c) == Some((SiteRole::Standby, 1))
    })
    .await?;
    // `wait` holds every later verdict back for its time: a `beActive` written meanwhile is
    // not carried out.
    std::fs::write(
        &verdict,
        r#"{"state":"standby","action":"wait","description":"hold on","payload":{"waitTime":"60s"}}"#,
    )?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = status(&mut wa).await?;
        if s.script_note
            .as_deref()
            .is_some_and(|n| n.contains("waits 60s"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the wait never came: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(
        &verdict,
        r#"{"state":"standby","action":"beActive","description":"too soon"}"#,
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        role(&west),
        Some((SiteRole::Standby, 1)),
        "the wait was not kept"
    );
    assert!(
        status(&mut wa)
            .await?
            .script_note
            .is_some_and(|n| n.contains("waits 60s")),
        "the script ran again during its wait"
    );
    wa.close().await;
    east.stop_all().await;
    west.stop_all().await;
    Ok(())
}

/// A projection larger than a link frame (16 MiB) reaches a standby that starts empty, in
/// pages from one snapshot, and the standby follows by difference afterwards. (Sent whole,
/// the reply could not be framed and the standby never caught up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_larger_than_a_frame_reaches_the_standby_in_pages() -> Result<()> {
    let (mut east, mut west) = two_sites()?;
    spaced_tests::start_site(&mut east).await?;
    east.wait_for(T, "east active", |c| role(c) == Some((SiteRole::Active, 1)))
        .await?;
    let mut ea = east.admin(1).await?;
    // 150,000 devices with long ids: about 20 MB on the wire. Device-initiated, so that east
    // does not dial them.
    const N: usize = 150_000;
    let pad = "x".repeat(110);
    for chunk in (0..N).collect::<Vec<_>>().chunks(5_000) {
        let batch: Vec<NewDevice> = chunk
            .iter()
            .map(|i| NewDevice {
                id: format!("big-{i:07}-{pad}"),
                addr: format!("10.{}.{}.{}:830", i / 65_536, (i / 256) % 256, i % 256),
                mode: DeviceMode::DeviceInitiated,
            })
            .collect();
        match ea.call_leader(&AdminRequest::AddDevices(batch)).await? {
            AdminReply::Applied(_) => {}
            other => bail!("add devices: {other:?}"),
        }
    }
    let weight = east
        .fabric_of(1)
        .map(|f| spaced_replication::projection::Projection::of(&f).weight())
        .unwrap_or(0);
    assert!(weight > 16 << 20, "the projection is only {weight} bytes");

    spaced_tests::start_site(&mut west).await?;
    west.wait_for(
        Duration::from_secs(120),
        "west mirrored every device",
        |c| c.fabric_of(1).is_some_and(|f| f.devices.len() == N),
    )
    .await?;
    // Then by difference: one more device arrives.
    match ea
        .call_leader(&AdminRequest::AddDevices(devices("after", 1)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add devices: {other:?}"),
    }
    west.wait_for(T, "west mirrored the next device", |c| {
        c.fabric_of(1)
            .is_some_and(|f| f.devices.len() == N + 1 && f.devices.contains_key("after-0"))
    })
    .await?;
    let mut wa = west.admin(1).await?;
    let s = status(&mut wa).await?;
    assert!(s.peer_reachable && s.not_mirrored.is_empty(), "{s:?}");
    ea.close().await;
    wa.close().await;
    east.stop_all().await;
    west.stop_all().await;
    Ok(())
}
