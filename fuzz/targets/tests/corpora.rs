//! Replays every committed fuzz input through its target: the seeds, `fuzz/corpus/<target>/`
//! (what libFuzzer kept) and `fuzz/regressions/<target>/` (inputs that once crashed a target,
//! each fixed since). A target that panics on one fails the test and names the file.

use std::path::{Path, PathBuf};

use spaced_fuzz_targets::{TARGETS, seeds};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn run(name: &str, target: fn(&[u8]), what: &str, data: &[u8]) {
    let outcome = std::panic::catch_unwind(|| target(data));
    assert!(outcome.is_ok(), "fuzz target {name} panicked on {what}");
}

#[test]
fn every_seed_passes_its_target() {
    let seeds = seeds();
    for (name, target) in TARGETS {
        let mine: Vec<&Vec<u8>> = seeds
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, d)| d)
            .collect();
        assert!(!mine.is_empty(), "target {name} has no seed");
        for (i, data) in mine.into_iter().enumerate() {
            run(name, *target, &format!("seed {i}"), data);
        }
    }
}

#[test]
fn every_committed_input_passes_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for kind in ["corpus", "regressions"] {
            for file in inputs(&fuzz.join(kind).join(name)) {
                let data = std::fs::read(&file).expect("read a fuzz input");
                run(name, *target, &file.display().to_string(), &data);
                replayed += 1;
            }
        }
    }
    println!("replayed {replayed} committed inputs");
}

#[test]
fn the_targets_see_what_they_check() {
    // A target that accepts nothing checks nothing: each seed of these reaches the property.
    let seeds = seeds();
    let of = |n: &'static str| {
        seeds
            .iter()
            .filter(move |(t, _)| *t == n)
            .map(|(_, d)| d.as_slice())
    };
    let mut reader: &[u8] = of("device_hello").next().expect("a hello seed");
    let hello = futures::executor::block_on(spaced_node::devices::agent::read_hello(&mut reader));
    assert_eq!(hello.expect("the seed is a hello"), "d1");
    for d in of("proxy_v2") {
        assert!(matches!(spaced_lb::proxy_v2::decode(d), Ok(Some(_))));
    }
    for d in of("guard_line") {
        let line = std::str::from_utf8(d).expect("text");
        spaced_node::takeover::guard::parse_line(line).expect("a seed line parses");
    }
    let route = spaced_lb::peek::session_route(of("lb_peek").next().expect("a peek seed"));
    assert_eq!(route, spaced_lb::peek::Peeked::Route("n2".into()));
    // The fabric sequence's commands decode one after another and are applied, not refused.
    let seq = of("fabric_apply").last().expect("a sequence seed");
    let mut f = spaced_fuzz_targets::start_fabric().clone();
    let mut rest = seq;
    let mut applied = 0;
    while !rest.is_empty() {
        let (cmd, used) =
            spaced_raft::codec::decode_prefix::<spaced_fabric::Command>(rest).expect("a command");
        f.apply_at(200 + applied, &cmd)
            .expect("the seed's command applies");
        rest = &rest[used..];
        applied += 1;
    }
    assert_eq!(applied, 4);
    let cfg = of("config").next().expect("a config seed");
    spaced_node::ops::config::NodeConfig::parse_str(
        std::str::from_utf8(cfg).expect("text"),
        Path::new("/etc/spaced/spaced.toml"),
    )
    .expect("the example config parses");
}
