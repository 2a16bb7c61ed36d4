//! A few faults of the fault campaign (`spaced_tests::chaos`, run at length by `cargo bench
//! -p spaced-tests --bench chaos`) in the network lab, so the campaign and its checkers keep
//! working: no acknowledged write lost, linearizable reads, never two VIP holders, recovery after every heal, no
//! flap. `SPACED_CHAOS_FAULTS` and `SPACED_CHAOS_SEED` change the run.

use std::time::Duration;

use anyhow::Result;
use spaced_tests::chaos::{self, Chaos, ChaosSettings};

/// One lab at a time: two 3-node clusters on a 2-core machine would measure the scheduler.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_short_fault_campaign_keeps_every_promise() -> Result<()> {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let faults: usize = std::env::var("SPACED_CHAOS_FAULTS")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or(8);
    let seed = spaced_tests::sites::seed_from_env()?;
    // Few enough devices that the client also removes some, which the checkers then read.
    let settings = ChaosSettings {
        churn: Some(300),
        ..ChaosSettings::default()
    };
    let Some(mut c) = Chaos::start(settings)? else {
        return Ok(());
    };
    println!("seed {seed}, {faults} faults");
    let campaign = chaos::campaign(&mut c, seed, faults)?;
    chaos::check(&c, &campaign, seed)?;
    assert_eq!(campaign.outcomes.len(), faults, "every fault ran");
    assert!(
        campaign
            .writes
            .iter()
            .any(|w| w.result == chaos::WriteResult::Acked),
        "the client's writes were acknowledged"
    );
    assert!(
        campaign
            .writes
            .iter()
            .any(|w| w.op == chaos::Op::Remove && w.result == chaos::WriteResult::Acked),
        "the client's removals were acknowledged"
    );
    assert!(
        campaign.reads.iter().any(|r| r.seen.is_ok()),
        "the linearizable reads were answered"
    );
    Ok(())
}

#[test]
fn a_short_soak_samples_every_node_and_keeps_the_vip_in_place() -> Result<()> {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let settings = ChaosSettings {
        churn: Some(100),
        balancer: true,
        ..ChaosSettings::default()
    };
    let Some(mut c) = Chaos::start(settings)? else {
        return Ok(());
    };
    let s = chaos::soak(
        &mut c,
        Duration::from_secs(15),
        Duration::from_secs(3),
        false,
        // Light: the lab runs debug builds, whose leader a heavier load can starve of CPU.
        Some(50),
    )?;
    println!("{}", s.summary());
    // The commit load beside it ran and was answered.
    let load: serde_json::Value = serde_json::from_str(s.load.as_deref().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("check perf's report {:?}: {e}", s.load))?;
    assert!(load["acknowledged"].as_u64() > Some(0), "{load}");
    assert!(s.samples.len() >= 5, "{} samples", s.samples.len());
    for sample in &s.samples {
        assert!(
            sample.rss_kib.iter().all(|r| *r > 0) && sample.fds.iter().all(|f| *f > 0),
            "every node's memory and descriptors were read: {sample:?}"
        );
    }
    assert!(
        s.writes
            .iter()
            .any(|w| w.result == chaos::WriteResult::Acked)
    );
    // Connections went through the balancer on the VIP to the nodes' servers.
    let ok = s.balanced.iter().filter(|r| r.is_ok()).count();
    assert!(ok > 0, "no connection through the balancer was answered");
    assert!(
        s.balancer_failures() * 100 <= s.balanced.len(),
        "{} of {} connections through the balancer failed",
        s.balancer_failures(),
        s.balanced.len()
    );
    assert_eq!(s.spurious_moves(), 0, "the VIP moved with no fault");
    assert_eq!(s.watch.overlap_samples, 0);
    assert_eq!(
        s.spurious_singleton_moves(),
        0,
        "the singleton moved with no fault"
    );
    assert_eq!(s.singleton.overlap_samples, 0);
    assert!(s.singleton.samples > 0);
    Ok(())
}
