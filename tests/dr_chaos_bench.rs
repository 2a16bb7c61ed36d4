//! `cargo bench -p spaced-tests --bench dr-chaos -- [--schedules N] [--seed S] [--nodes N]
//! [--witnesses N] [--lease-ms MS]`: randomized inter-site fault schedules against two sites
//! of real `spaced` processes in the network lab (root), then the checks and a summary table
//! (see `spaced_tests::sites`). Exits 1 on a violation, printing the seed that replays it.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use spaced_tests::sites::{self, Sites, SitesSettings};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dr-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut settings = SitesSettings::default();
    let mut schedules = 200;
    let mut seed = sites::seed_from_env()?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> Result<u64> {
            let v = args.next().with_context(|| format!("{a} needs {what}"))?;
            v.parse().with_context(|| format!("{a} {v:?}: not {what}"))
        };
        match a.as_str() {
            "--schedules" => schedules = value("a count")? as usize,
            "--seed" => seed = value("a number")?,
            "--nodes" => settings.nodes = value("a count")? as usize,
            "--witnesses" => settings.witnesses = value("a count")? as usize,
            "--lease-ms" => settings.witness_lease_ms = value("milliseconds")?,
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the network lab needs root");
    }
    // The tree's daemon, not whatever an earlier build left.
    spaced_tests::build_binaries()?;
    println!("seed {seed}, {schedules} schedules, {settings:?}");
    let s = Sites::start(settings)?.context("the lab could not be built")?;
    let campaign = sites::campaign(&s, seed, schedules)?;
    sites::check(&s, &campaign, seed)
}
