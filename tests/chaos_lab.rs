//! A few faults of the fault campaign (`spaced_tests::chaos`, run at length by `cargo bench
//! -p spaced-tests --bench chaos`) in the network lab, so the campaign and its checkers keep
//! working: no acknowledged write lost, never two VIP holders, recovery after every heal, no
//! flap. `SPACED_CHAOS_FAULTS` and `SPACED_CHAOS_SEED` change the run.

use anyhow::Result;
use spaced_tests::chaos::{self, Chaos, ChaosSettings};

#[test]
fn a_short_fault_campaign_keeps_every_promise() -> Result<()> {
    let faults: usize = std::env::var("SPACED_CHAOS_FAULTS")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or(8);
    let seed = spaced_tests::sites::seed_from_env()?;
    let Some(mut c) = Chaos::start(ChaosSettings::default())? else {
        return Ok(());
    };
    println!("seed {seed}, {faults} faults");
    let campaign = chaos::campaign(&mut c, seed, faults)?;
    assert_eq!(campaign.outcomes.len(), faults, "every fault ran");
    assert!(
        campaign
            .writes
            .iter()
            .any(|w| w.result == chaos::WriteResult::Acked),
        "the client's writes were acknowledged"
    );
    chaos::check(&c, &campaign, seed)
}
