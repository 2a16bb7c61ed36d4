//! `cargo bench -p spaced-tests --bench chaos -- [--faults N] [--seed S] [--nodes N]
//! [--write-every-ms MS]`: seeded random faults against one cluster of real `spaced` processes
//! in the network lab (root) while a client writes, then the checkers and a summary table
//! (see `spaced_tests::chaos`). Exits 1 on a violation, printing the seed that replays it.

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
    let mut seed = spaced_tests::sites::seed_from_env()?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> Result<u64> {
            let v = args.next().with_context(|| format!("{a} needs {what}"))?;
            v.parse().with_context(|| format!("{a} {v:?}: not {what}"))
        };
        match a.as_str() {
            "--faults" => faults = value("a count")? as usize,
            "--seed" => seed = value("a number")?,
            "--nodes" => settings.nodes = value("a count")? as usize,
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
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the network lab needs root");
    }
    println!("seed {seed}, {faults} faults, {settings:?}");
    let mut c = Chaos::start(settings)?.context("the lab could not be built")?;
    let campaign = chaos::campaign(&mut c, seed, faults)?;
    chaos::check(&c, &campaign, seed)
}
