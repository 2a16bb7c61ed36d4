//! The Debian package (issue 20): built with `contrib/deb/build` (cargo-deb, release binaries
//! in a target dir of its own, since the `cargo test` that runs this holds the usual one),
//! installed with dpkg into an empty root, and checked there: the files and their modes, the
//! binaries run, the unit verifies, the example config parses.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_debian_package_installs_into_a_clean_root() -> Result<()> {
    let missing = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map_or(true, |o| !o.status.success())
    };
    let cargo_deb_missing = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map_or(true, |o| !o.status.success());
    for (absent, what) in [
        (cargo_deb_missing, "cargo-deb"),
        (missing("dpkg"), "dpkg"),
        (missing("systemd-analyze"), "systemd-analyze"),
    ] {
        if absent {
            ensure!(!ci(), "{what} is missing; .ci/run installs it");
            println!("skipped: {what} is not installed");
            return Ok(());
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?
        .to_path_buf();
    let deb = spaced_tests::build_package(&workspace)?;
    ensure!(
        deb.extension().is_some_and(|e| e == "deb") && deb.exists(),
        "not a package: {}",
        deb.display()
    );

    // An empty root with only dpkg's database: nothing of the host's is installed there.
    let root = tempfile::tempdir()?;
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info"))?;
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates"))?;
    std::fs::write(r.join("var/lib/dpkg/status"), "")?;
    run(
        Command::new("dpkg")
            .arg(format!("--root={}", r.display()))
            .args(["--force-depends", "--force-script-chrootless", "-i"])
            .arg(&deb),
        "dpkg -i",
    )?;
    let status = run(
        Command::new("dpkg")
            .arg(format!("--root={}", r.display()))
            .args(["-s", "spaced"]),
        "dpkg -s",
    )?;
    ensure!(status.contains("Status: install ok installed"), "{status}");
    ensure!(
        status.contains("Depends:") && status.contains("iproute2"),
        "{status}"
    );

    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        ("usr/bin/spaced", 0o755),
        ("usr/bin/spacectl", 0o755),
        ("lib/systemd/system/spaced.service", 0o644),
        ("etc/spaced/spaced.toml.example", 0o644),
        ("usr/share/man/man1/spaced.1.gz", 0o644),
        ("usr/share/man/man1/spacectl.1.gz", 0o644),
        ("usr/share/bash-completion/completions/spacectl", 0o644),
        ("usr/share/zsh/vendor-completions/_spacectl", 0o644),
        ("usr/share/fish/vendor_completions.d/spacectl.fish", 0o644),
        ("usr/share/doc/spaced/docs/operator-guide.md", 0o644),
        ("usr/share/doc/spaced/examples/prometheus-alerts.yml", 0o644),
    ] {
        let meta =
            std::fs::metadata(r.join(path)).with_context(|| format!("{path} not installed"))?;
        ensure!(
            meta.permissions().mode() & 0o777 == mode,
            "{path}: mode {:o}, not {mode:o}",
            meta.permissions().mode() & 0o777
        );
    }
    let example = r.join("etc/spaced/spaced.toml.example");
    let conffiles = std::fs::read_to_string(r.join("var/lib/dpkg/info/spaced.conffiles"))?;
    ensure!(
        conffiles.contains("/etc/spaced/spaced.toml.example"),
        "{conffiles}"
    );

    // The installed binaries run and name their build.
    let spaced = r.join("usr/bin/spaced");
    let version = run(Command::new(&spaced).arg("--version"), "spaced --version")?;
    ensure!(version.starts_with("spaced "), "{version}");
    ensure!(version.contains("data format"), "{version}");
    run(
        Command::new(r.join("usr/bin/spacectl")).arg("--version"),
        "spacectl --version",
    )?;

    // The example config parses: `check` gets as far as the certificate files it names.
    let out = Command::new(&spaced)
        .args(["check", "--config"])
        .arg(&example)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(
        err.contains("key `tls`") && err.contains("/etc/spaced/pki/ca.pem"),
        "{err}"
    );

    // The installed unit verifies against the installed binary and man pages.
    let unit = std::fs::read_to_string(r.join("lib/systemd/system/spaced.service"))?;
    let local_unit = r.join("spaced.service");
    std::fs::write(
        &local_unit,
        unit.replace("/usr/bin/spaced", &spaced.display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local_unit)
        .env("MANPATH", r.join("usr/share/man"))
        .output()?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
