//! `docs/walkthrough.md` as a test (issue 20): the package is built (`contrib/deb/build`, as
//! `tests/package.rs` builds it), unpacked into a scratch root that stands in for `apt
//! install`, and every other shell block of the page runs as written, in order, in one
//! `bash`: three namespaces, certificates, configs, the nodes, `node add`, a VIP, a SIGKILL
//! of its owner. The test checks what the page says happens (three voters, the VIP on one
//! node, then on another), and runs the page's clean-up block whatever happened.
//!
//! Root and network namespaces are needed: under `CI=true` their absence fails the test,
//! elsewhere it skips and says why.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The page's shell blocks (```sh ... ```), in order.
fn shell_blocks(page: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Removes what the page makes if its own clean-up could not run.
struct Namespaces;

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in ["spaced-n1", "spaced-n2", "spaced-n3", "spaced-sw"] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn the_walkthrough_runs_as_written() -> Result<()> {
    let root_ok = nix::unistd::geteuid().is_root();
    let netns_ok = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    let deb_ok = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    for (ok, what) in [
        (root_ok, "root"),
        (netns_ok, "ip netns (iproute2)"),
        (deb_ok, "cargo-deb"),
    ] {
        if !ok {
            ensure!(!ci(), "the walkthrough needs {what}; .ci/run provides it");
            println!("skipped: the walkthrough needs {what}");
            return Ok(());
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?
        .to_path_buf();
    let page = std::fs::read_to_string(workspace.join("docs/walkthrough.md"))?;
    let blocks = shell_blocks(&page);
    ensure!(
        blocks.len() >= 8,
        "the page has {} shell blocks",
        blocks.len()
    );
    ensure!(
        blocks[0].trim() == "apt install ./spaced_*.deb",
        "the first block installs the package: {:?}",
        blocks[0]
    );
    let cleanup = blocks.last().context("a clean-up block")?.clone();
    ensure!(cleanup.contains("ip netns del"), "{cleanup}");

    let deb = spaced_tests::build_package(&workspace)?;
    let scratch = tempfile::Builder::new().prefix("spaced-walk-").tempdir()?;
    let root = scratch.path().join("root");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .output()?;
    ensure!(out.status.success(), "dpkg-deb -x: {out:?}");

    // In place of `apt install`: the unpacked package's binaries first on the PATH.
    let mut script = format!(
        "export PATH={}:$PATH\nexport WALK={}\n",
        root.join("usr/bin").display(),
        scratch.path().join("walk").display()
    );
    for b in &blocks[1..blocks.len() - 1] {
        script.push_str(b);
    }
    let _namespaces = Namespaces;
    let run = Command::new("timeout")
        .arg("300")
        .args(["bash", "-c", &script])
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    let logs: String = (1..=3)
        .map(|i| {
            let p = scratch.path().join(format!("walk/n{i}.log"));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            format!(
                "--- n{i}.log (last lines) ---\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect();
    let cleaned = Command::new("bash")
        .args([
            "-c",
            &format!(
                "export WALK={}\n{cleanup}",
                scratch.path().join("walk").display()
            ),
        ])
        .output()?;
    let said = format!("stdout:\n{stdout}\nstderr:\n{stderr}\n{logs}");
    ensure!(
        run.status.success(),
        "the walkthrough failed ({}):\n{said}",
        run.status
    );
    ensure!(cleaned.status.success(), "the clean-up failed: {cleaned:?}");

    // What the page says happens.
    ensure!(
        stdout.contains("spaced ") && stdout.contains("data format"),
        "{said}"
    );
    // `status` after `node add`: n1 leads, n2 and n3 are voters.
    for (node, raft) in [("n1", "leader"), ("n2", "voter"), ("n3", "voter")] {
        ensure!(
            stdout.lines().any(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.len() > 4 && cells[1] == node && cells[4] == raft
            }),
            "{node} is not a {raft} in `status`: {said}"
        );
    }
    let on = stdout
        .lines()
        .find_map(|l| l.strip_prefix("the VIP is on "))
        .with_context(|| format!("no owner: {said}"))?;
    ensure!(["n1", "n2", "n3"].contains(&on), "{said}");
    let moved = stdout
        .lines()
        .find_map(|l| l.strip_prefix("the VIP moved from "))
        .with_context(|| format!("no failover: {said}"))?;
    let (from, to) = moved.split_once(" to ").context("from/to")?;
    ensure!(
        from == on && ["n1", "n2", "n3"].contains(&to) && to != from,
        "the VIP did not move to a survivor: {said}"
    );
    // The page's clean-up left nothing behind.
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    let left = String::from_utf8_lossy(&left.stdout);
    ensure!(
        !left
            .lines()
            .any(|l| l.starts_with("spaced-n") || l.starts_with("spaced-sw")),
        "namespaces left: {left}"
    );
    Ok(())
}
