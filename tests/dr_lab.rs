//! Disaster recovery in the network lab: two 3-node sites of real `spaced` processes on
//! their own subnets, joined by a router, and three witnesses (see `spaced_tests::sites`).
//! A site whose leader stalls while it is cut off from the witnesses loses its VIP before the
//! standby takes over; a whole site stalled and resumed does not take its VIP up again; the
//! model's scenarios (standby lost, automatic failover off, both sites without witnesses)
//! end as it says; then randomized inter-site fault schedules (`SPACED_DR_SCHEDULES`,
//! default 6; seed printed, `SPACED_CHAOS_SEED` replays) never leave two sites active, on
//! the sites' own epochs and on the VIPs. `cargo bench -p spaced-tests --bench dr-chaos`
//! runs hundreds.

use std::time::Duration;

use anyhow::{Result, bail};
use spaced_fabric::SiteRole;
use spaced_tests::sites::{self, Fault, Sites, SitesSettings};

#[test]
fn a_stalled_site_never_overlaps_the_standby_and_random_inter_site_faults_keep_one_active_site()
-> Result<()> {
    let Some(s) = Sites::start(SitesSettings::default())? else {
        return Ok(());
    };
    // East's leader stalls while east is cut off from west and from every witness. Its VIP's
    // owner is another node (a stalled owner's own fence guard drops its VIP at its lease's
    // end): east's nodes stop confirming that lease within half a witness lease of the last
    // renewal, before the lease runs out at the witnesses and west takes over. (Without that
    // the owner kept the VIP until east's next leader, elected a second or two later, had
    // waited half a witness lease itself and demoted east: west was active by then.)
    let owner = s.vip_holders(0)?[0];
    if s.leader(0) == Some(owner) {
        let to = ((owner + 1) % 3 + 1).to_string();
        s.ctl(
            0,
            &s.endpoint(0, owner),
            &["leader", "transfer", "--to", &to],
        )?;
        s.wait(Duration::from_secs(10), "east's leadership moved", |s| {
            Ok(s.leader(0).is_some_and(|l| l != owner))
        })?;
        // The new leader's first rounds at the witnesses.
        std::thread::sleep(Duration::from_secs(1));
    }
    let watch = s.watch_vips(Duration::from_millis(2))?;
    let cut = s.apply(&Fault::Witnesses {
        site: 0,
        which: vec![0, 1, 2],
        both_ways: true,
    })?;
    let cut = cut.and(s.apply(&Fault::CutBoth)?);
    let stopped = s.apply(&Fault::StopLeader { site: 0 })?;
    s.wait(
        Duration::from_secs(30),
        "west active at epoch 2 holding its VIP",
        |s| {
            Ok(s.latest(1)
                .is_some_and(|r| (r.role, r.epoch) == (SiteRole::Active, 2))
                && s.vip_holders(1)?.len() == 1)
        },
    )?;
    assert!(s.vip_holders(0)?.is_empty(), "east still holds its VIP");
    s.heal(cut.and(stopped))?;
    // East comes back, hears of west's higher epoch, and stays standby without its VIP.
    standby_again(&s, 0)?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(s.vip_holders(0)?.is_empty(), "east took its VIP up again");
    no_overlap(&s, watch, "the stalled leader")?;

    // Every daemon of west stalls for two witness leases (their fence guards run on and drop
    // west's VIP at its lease's end), east takes over, and west resumes: its nodes must not
    // confirm the VIP's lease again, although their fabric still says west is active — the
    // hold they learned from their leader ran out while they stood still.
    let watch = s.watch_vips(Duration::from_millis(2))?;
    let stopped = s.apply(&Fault::StopSite { site: 1 })?;
    s.wait(
        Duration::from_secs(30),
        "east active at epoch 3 holding its VIP",
        |s| {
            Ok(s.latest(0)
                .is_some_and(|r| (r.role, r.epoch) == (SiteRole::Active, 3))
                && s.vip_holders(0)?.len() == 1)
        },
    )?;
    s.heal(stopped)?;
    standby_again(&s, 1)?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(s.vip_holders(1)?.is_empty(), "west took its VIP up again");
    no_overlap(&s, watch, "the stalled site")?;

    // The model's other scenarios, one by one.
    let watch = s.watch_vips(Duration::from_millis(2))?;
    let lease = Duration::from_millis(SitesSettings::default().witness_lease_ms);
    // The standby is lost: nothing happens; the active site keeps its VIP where it was.
    let holder = s.vip_holders(0)?;
    let stopped = s.apply(&Fault::StopSite { site: 1 })?;
    std::thread::sleep(2 * lease);
    assert_eq!(
        s.vip_holders(0)?,
        holder,
        "east's VIP moved while west was lost"
    );
    assert!(
        s.latest(0)
            .is_some_and(|r| (r.role, r.epoch) == (SiteRole::Active, 3))
    );
    s.heal(stopped)?;
    // Automatic failover off on the standby: the active site lost, nothing happens; an
    // operator's failover works once the witnesses let the old lease go.
    s.admin(
        1,
        &["dr", "automatic-failover", "--disable"],
        Duration::from_secs(20),
    )?;
    let stopped = s.apply(&Fault::StopSite { site: 0 })?;
    std::thread::sleep(3 * lease);
    assert!(
        s.latest(1).is_some_and(|r| r.role == SiteRole::Standby),
        "west took over with automatic failover off"
    );
    s.failover(1)?;
    s.wait(
        Duration::from_secs(20),
        "west active at epoch 4 holding its VIP",
        |s| {
            Ok(s.latest(1)
                .is_some_and(|r| (r.role, r.epoch) == (SiteRole::Active, 4))
                && s.vip_holders(1)?.len() == 1)
        },
    )?;
    s.heal(stopped)?;
    standby_again(&s, 0)?;
    s.admin(
        1,
        &["dr", "automatic-failover", "--enable"],
        Duration::from_secs(20),
    )?;
    // Both sites lose the witnesses: west demotes itself and east cannot claim: both are
    // standby and no VIP is held, until the witnesses are back and one site claims.
    let mut cut = s.apply(&Fault::Witnesses {
        site: 0,
        which: vec![0, 1, 2],
        both_ways: true,
    })?;
    cut = cut.and(s.apply(&Fault::Witnesses {
        site: 1,
        which: vec![0, 1, 2],
        both_ways: true,
    })?);
    s.wait(Duration::from_secs(20), "west standby", |s| {
        Ok(s.latest(1).is_some_and(|r| r.role == SiteRole::Standby))
    })?;
    std::thread::sleep(2 * lease);
    assert!(
        s.latest(0).is_some_and(|r| r.role == SiteRole::Standby)
            && s.latest(1).is_some_and(|r| r.role == SiteRole::Standby),
        "a site took the active role without the witnesses"
    );
    assert!(s.vip_holders(0)?.is_empty() && s.vip_holders(1)?.is_empty());
    s.heal(cut)?;
    s.wait(
        Duration::from_secs(30),
        "one site active again with its VIP",
        |s| {
            let active: Vec<usize> = (0..2)
                .filter(|k| s.latest(*k).is_some_and(|r| r.role == SiteRole::Active))
                .collect();
            Ok(active.len() == 1 && s.vip_holders(active[0])?.len() == 1)
        },
    )?;
    no_overlap(&s, watch, "the model's scenarios")?;

    let schedules = match std::env::var("SPACED_DR_SCHEDULES") {
        Ok(n) => n.parse()?,
        Err(_) => 6,
    };
    let seed = sites::seed_from_env()?;
    println!("seed {seed} (SPACED_CHAOS_SEED={seed} replays it)");
    let campaign = sites::campaign(&s, seed, schedules)?;
    sites::check(&s, &campaign, seed)
}

/// Fails if the watch saw two hosts hold a VIP at once.
fn no_overlap(s: &Sites, watch: spaced_tests::lab::AddressWatch, during: &str) -> Result<()> {
    let report = watch.stop();
    if !report.overlaps.is_empty() {
        bail!(
            "two hosts held a VIP at once during {during}: {:?} (logs in {})",
            report.overlaps,
            s.dir().display()
        );
    }
    Ok(())
}

/// Waits until site `k`'s leader, asked afresh, says it is standby.
fn standby_again(s: &Sites, k: usize) -> Result<()> {
    s.wait(Duration::from_secs(30), "the site standby again", |s| {
        Ok(s.latest(k).is_some_and(|r| {
            r.role == SiteRole::Standby && r.at.elapsed() < Duration::from_millis(500)
        }))
    })
}
