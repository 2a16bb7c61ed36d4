//! A short libFuzzer run of every target (about five seconds each) through `fuzz/run`, as CI
//! does: with `CI=true` (or `SPACED_FUZZ=1`) it must run and find nothing; elsewhere it
//! skips, saying why (the instrumented release build takes minutes the first time).

use std::path::Path;
use std::process::Command;

fn wanted() -> bool {
    let on = |k: &str| std::env::var(k).is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    on("CI") || on("SPACED_FUZZ")
}

#[test]
fn a_short_fuzz_run_of_every_target_finds_nothing() {
    if !wanted() {
        println!(
            "skipped: set SPACED_FUZZ=1 (CI=true does) for a short libFuzzer run of every target"
        );
        return;
    }
    let scratch = std::env::temp_dir().join(format!("spaced-fuzz-{}", std::process::id()));
    for (i, (target, data)) in spaced_fuzz_targets::seeds().into_iter().enumerate() {
        let dir = scratch.join(target);
        std::fs::create_dir_all(&dir).expect("scratch corpus dir");
        std::fs::write(dir.join(format!("seed-{i}")), data).expect("write a seed");
    }
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("../run");
    let out = Command::new("bash")
        .arg(&run)
        .args(["--seconds", "5", "--scratch"])
        .arg(&scratch)
        .env("SPACED_FUZZ_NO_SEEDS", "1")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("start fuzz/run");
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "fuzz/run failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let targets = spaced_fuzz_targets::TARGETS.len();
    let lines = stdout.lines().filter(|l| l.ends_with(" ok")).count();
    assert_eq!(lines, targets, "every target ran:\n{stdout}");
    assert!(stdout.contains("total runs: "), "{stdout}");
}
