//! `cargo bench -p spaced-tests --bench chaos -- [--faults N] [--seed S] [--nodes N]
//! [--write-every-ms MS] [--churn N] [--only TEXT]`: seeded random faults against one cluster of real `spaced` processes
//! in the network lab (root) while a client writes, then the checkers and a summary table
//! (see `spaced_tests::chaos`). The client keeps its devices to N (default 1,000; 0: they
//! pile up), removing the oldest with each add past it. `--only TEXT` draws only the faults
//! whose kind, as the summary table names it, contains TEXT (`--only "(majority)"`: majority
//! partitions alone, to look at one kind's recovery). Exits 1 on a violation, printing the seed that replays it.
//!
//! `... --bench chaos -- --soak SECONDS [--no-stress]`: the soak instead: no faults, 1,000
//! devices and a steady churn of writes, connections through the balancer on the VIP every
//! 20 ms, every core busy with stress-ng, each node's memory
//! and descriptors sampled every 10 s; exits 1 if the VIP moved or two hosts held it.
//! `--load-rate N` adds N commits a second beside it (`spacectl check perf --rate N` from the
//! client's namespace, straight to the leader), reported at the end. `--snapshot-after N`
//! sets every node's `[raft] snapshot_after_logs` (default 10,000): a small N snapshots and
//! purges the log often, to see what that costs the leases. `--nice N` sets every node's
//! `nice` (default: the daemon's, -10). The summary counts each node's "async runtime
//! stalled" warnings by the cause each gives; `SPACED_LAB_KEEP=1` keeps the daemons' logs of
//! a run that passed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use spaced_tests::chaos::{self, Chaos, ChaosSettings};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut settings = ChaosSettings::default();
    let mut faults = 100;
    let mut soak_s = None;
    let mut stress = true;
    let mut load_rate = None;
    let mut seed = spaced_tests::sites::seed_from_env()?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> Result<u64> {
            let v = args.next().with_context(|| format!("{a} needs {what}"))?;
            v.parse().with_context(|| format!("{a} {v:?}: not {what}"))
        };
        match a.as_str() {
            "--faults" => faults = value("a count")? as usize,
            "--soak" => soak_s = Some(value("seconds")?),
            "--no-stress" => stress = false,
            "--load-rate" => load_rate = Some(value("writes a second")? as u32),
            "--seed" => seed = value("a number")?,
            "--snapshot-after" => settings.snapshot_after_logs = Some(value("a count")?),
            "--nice" => {
                let v = args.next().context("--nice needs a nice value")?;
                let n: i32 = v
                    .parse()
                    .with_context(|| format!("--nice {v:?}: not a number"))?;
                if !(-20..=19).contains(&n) {
                    bail!("--nice {n}: must be from -20 to 19");
                }
                settings.nice = Some(n);
            }
            "--only" => {
                let v = args.next().context("--only needs a fault kind's text")?;
                settings.only = Some(v);
            }
            "--nodes" => settings.nodes = value("a count")? as usize,
            "--churn" => settings.churn = Some(value("a count")? as usize).filter(|n| *n > 0),
            "--write-every-ms" => {
                settings.write_every = Duration::from_millis(value("milliseconds")?)
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !(3..=7).contains(&settings.nodes) {
        bail!("--nodes {}: 3 to 7", settings.nodes);
    }
    if let Some(only) = &settings.only {
        // Refused before the lab is built.
        chaos::draw_fault(&mut spaced_tests::sites::Rng::new(seed), Some(only))?;
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the network lab needs root");
    }
    // The tree's daemon, not whatever an earlier build left.
    spaced_tests::build_binaries()?;
    if let Some(secs) = soak_s {
        settings.churn = Some(1000);
        settings.balancer = true;
        println!("soak {secs} s, {settings:?}");
        let mut c = Chaos::start(settings)?.context("the lab could not be built")?;
        let s = chaos::soak(
            &mut c,
            Duration::from_secs(secs),
            Duration::from_secs(10),
            stress,
            load_rate,
        )?;
        println!("{}", s.summary());
        let vip_failed = s.spurious_moves() > 0 || s.watch.overlap_samples > 0;
        let singleton_failed = s.spurious_singleton_moves() > 0 || s.singleton.overlap_samples > 0;
        if vip_failed || singleton_failed {
            c.keep_logs();
        }
        if vip_failed {
            bail!("the VIP moved {} time(s) with no fault", s.spurious_moves());
        }
        if singleton_failed {
            bail!(
                "the singleton moved {} time(s) with no fault",
                s.spurious_singleton_moves()
            );
        }
        return Ok(());
    }
    println!("seed {seed}, {faults} faults, {settings:?}");
    let mut c = Chaos::start(settings)?.context("the lab could not be built")?;
    let campaign = chaos::campaign(&mut c, seed, faults)?;
    chaos::check(&c, &campaign, seed)
}
