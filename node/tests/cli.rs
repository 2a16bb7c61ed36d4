//! The binaries' command-line contracts: exit codes and one-line errors for bad input.

use std::process::Command;

fn spaced() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spaced"))
}
fn spacectl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spacectl"))
}

#[test]
fn usage_errors_exit_2() {
    let out = spacectl()
        .args(["node", "add", "--id", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = spacectl()
        .env_remove("SPACED_ENDPOINT")
        .args(["status"])
        .env("SPACED_PKI", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));
    let out = spaced().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "node_id = \"one\"\nname = \"n1\"\n").unwrap();
    let out = spaced()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("node_id"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = spaced()
        .args(["run", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}
