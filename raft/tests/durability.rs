//! Durability of the sled store: nothing it acknowledges may sit in a file it did not fsync.
//!
//! - `large_entries_and_snapshots_leave_nothing_in_blob_files`: a 10,000-device import, a run
//!   of middling entries and a snapshot leave sled's `blobs/` directory empty (sled 0.34.7
//!   never fsyncs the files there).
//! - `every_acknowledged_entry_survives_a_power_cut` (needs `strace`): a writer process is
//!   traced system call by system call; the test rebuilds, for many cut points, what a disk
//!   could hold after a power cut there (what was fsynced, plus any part of what was not), and
//!   checks that the store opens and holds every entry acknowledged before the cut. The
//!   writer's entries straddle two log segments, and a purge drops the first segment.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder};
use spaced_fabric::{Command, DeviceMode, NewDevice};
use spaced_raft::store::{self, LogStore};
use spaced_raft::types::{Entry, Vote};

/// Entry `i`'s content: every seventh is a 10,000-device import (about 600 KB encoded), the
/// others 1 to 40 KB, so that leaves of the log tree hold far more than sled's blob threshold.
fn entry(i: u64) -> Entry {
    entry_at(i, i)
}

/// Entry `i`'s content at log index `index`.
fn entry_at(i: u64, index: u64) -> Entry {
    let devices = if i % 7 == 3 {
        10_000
    } else {
        1 + (i as usize * 37) % 600
    };
    let cmd = Command::AddDevices {
        devices: (0..devices)
            .map(|d| NewDevice {
                id: format!("dev-{i}-{d:05}"),
                addr: format!("192.0.2.{}:{}", d % 250 + 1, 830 + d % 100),
                mode: DeviceMode::SpaceInitiated,
            })
            .collect(),
        at: i,
    };
    Entry::new_normal(
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        cmd,
    )
}

/// The `blobs/` files sled wrote in `dir`.
fn blob_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("blobs"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

async fn write_entries(log: &mut LogStore, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        log.blocking_append(vec![entry(i)]).await.expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_entries_and_snapshots_leave_nothing_in_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = store::open(dir.path()).expect("open");
        write_entries(&mut log, 1..=40).await;
        // The state machine's snapshot of a fabric with the 10,000 devices of entry 3.
        let entries = futures::stream::iter(
            [entry(3)]
                .into_iter()
                .map(|e| Ok((e, None)))
                .collect::<Vec<_>>(),
        );
        openraft::storage::RaftStateMachine::apply(&mut sm, entries)
            .await
            .unwrap();
        let snap = sm.build_snapshot().await.expect("snapshot");
        assert!(
            snap.snapshot.get_ref().len() > 200_000,
            "the snapshot should be large: {} bytes",
            snap.snapshot.get_ref().len()
        );
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        assert_eq!(blob_files(dir.path()), Vec::<PathBuf>::new());
    }
    // And everything reads back after a reopen.
    let (mut log, mut sm) = store::open(dir.path()).expect("reopen");
    let got = log.try_get_log_entries(1..=40).await.unwrap();
    assert_eq!(got.len(), 40);
    for (i, e) in (1..=40).zip(&got) {
        assert_eq!(*e, entry(i), "entry {i}");
    }
    assert!(
        openraft::storage::RaftStateMachine::get_current_snapshot(&mut sm)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(blob_files(dir.path()), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------------
// Power cut: a writer process traced with strace, its disk rebuilt at many cut points.

/// Entries the traced writer appends, one durable append each.
const WRITER_ENTRIES: u64 = 16;
/// After this entry the writer also builds and persists a snapshot.
const WRITER_SNAPSHOT_AT: u64 = 9;
/// After acknowledging this entry the writer purges the log up to entry [`WRITER_PURGED_TO`]
/// and prints `PURGED` once the purge and its segment drops are done.
const WRITER_PURGE_AFTER: u64 = 12;
/// The last entry the purge removes: the first segment lies wholly below it.
const WRITER_PURGED_TO: u64 = 10;

/// The log index of the writer's entry `i` (from 1): the 16 straddle the end of the first log
/// segment (`SEGMENT - 7` to `SEGMENT + 8`), so appends write two segment trees and the purge
/// drops the first.
fn writer_index(i: u64) -> u64 {
    spaced_raft::segments::SEGMENT - 8 + i
}

/// The writer's entry `i`, at its index.
fn writer_entry(i: u64) -> Entry {
    entry_at(i, writer_index(i))
}

/// Set in the traced child: the data dir it writes.
const WRITER_ENV: &str = "SPACED_POWER_CUT_WRITER";

/// The traced child: appends entries, printing `ACK i` once each is acknowledged, and `SNAP`
/// once the snapshot is.
async fn writer(dir: &Path) {
    let (mut log, mut sm) = store::open(dir).expect("open");
    let mut out = std::io::stdout();
    for i in 1..=WRITER_ENTRIES {
        log.blocking_append(vec![writer_entry(i)])
            .await
            .expect("append");
        writeln!(out, "ACK {i}").unwrap();
        out.flush().unwrap();
        if i == WRITER_PURGE_AFTER {
            log.purge(writer_entry(WRITER_PURGED_TO).log_id())
                .await
                .expect("purge");
            log.settle_purges().await;
            writeln!(out, "PURGED").unwrap();
            out.flush().unwrap();
        }
        if i == WRITER_SNAPSHOT_AT {
            let entries = futures::stream::iter(
                (1..=i)
                    .map(|n| Ok((writer_entry(n), None)))
                    .collect::<Vec<_>>(),
            );
            openraft::storage::RaftStateMachine::apply(&mut sm, entries)
                .await
                .unwrap();
            sm.build_snapshot().await.expect("snapshot");
            writeln!(out, "SNAP").unwrap();
            out.flush().unwrap();
        }
    }
}

/// One change to a file's bytes.
#[derive(Clone)]
enum Op {
    Write { at: u64, data: Vec<u8> },
    Truncate(u64),
}

/// A file as the trace built it: every change in order, and how many of them an fsync made
/// durable.
#[derive(Default, Clone)]
struct FileModel {
    ops: Vec<Op>,
    durable: usize,
}

/// The disk at one moment: which path is which file, and per file how many ops had happened
/// and how many were durable.
#[derive(Clone)]
struct Cut {
    line: usize,
    paths: BTreeMap<String, usize>,
    files: Vec<(usize, usize)>,
    dirs: BTreeSet<String>,
    acked: u64,
    snapshot_acked: bool,
    purge_acked: bool,
}

/// Replays an strace log (`-f -xx`) of the writer: file ops under `root`, and the `ACK` lines
/// it printed. Any call on a data-dir file this model does not know fails the test.
struct Trace {
    root: String,
    files: Vec<FileModel>,
    paths: BTreeMap<String, usize>,
    dirs: BTreeSet<String>,
    fds: BTreeMap<i64, (String, u64)>,
    /// fsyncs in flight per pid: (file, ops at entry).
    syncing: BTreeMap<String, (usize, usize)>,
    acked: u64,
    snapshot_acked: bool,
    purge_acked: bool,
    cuts: Vec<Cut>,
}

/// Decodes one `-xx` string literal (`"\x41\x42"`) at the start of `s`; returns it and the
/// rest after the closing quote.
fn string_arg(s: &str) -> (Vec<u8>, &str) {
    let s = s.trim_start();
    assert!(
        s.starts_with('"'),
        "not a string: {}",
        &s[..s.len().min(40)]
    );
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 1;
    while b[i] != b'"' {
        assert_eq!(&b[i..i + 2], b"\\x", "strace -xx escapes every byte");
        out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
        i += 4;
    }
    let rest = &s[i + 1..];
    assert!(
        !rest.starts_with("..."),
        "strace truncated a string: raise -s"
    );
    (out, rest)
}

/// Splits `a, b, c` at top-level commas (strings may hold none: they are all escaped).
fn args(s: &str) -> Vec<&str> {
    s.split(", ").collect()
}

fn num(s: &str) -> i64 {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x") {
        i64::from_str_radix(h, 16).unwrap()
    } else {
        s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
    }
}

impl Trace {
    fn new(root: &Path) -> Self {
        let root = root.display().to_string();
        Self {
            dirs: [root.clone()].into(),
            root,
            files: Vec::new(),
            paths: BTreeMap::new(),
            fds: BTreeMap::new(),
            syncing: BTreeMap::new(),
            acked: 0,
            snapshot_acked: false,
            purge_acked: false,
            cuts: Vec::new(),
        }
    }

    fn ours(&self, path: &str) -> bool {
        path == self.root || path.starts_with(&format!("{}/", self.root))
    }

    fn resolve(&self, dirfd: &str, path: &[u8]) -> String {
        let path = String::from_utf8(path.to_vec()).unwrap();
        if path.starts_with('/') || dirfd.trim() == "AT_FDCWD" {
            return path;
        }
        let base = &self.fds.get(&num(dirfd)).expect("dirfd is open").0;
        format!("{base}/{path}")
    }

    fn file_of(&self, fd: i64) -> Option<usize> {
        let (path, _) = self.fds.get(&fd)?;
        if !self.ours(path) {
            return None;
        }
        self.paths.get(path).copied()
    }

    fn cut(&mut self, line: usize) {
        self.cuts.push(Cut {
            line,
            paths: self.paths.clone(),
            files: self
                .files
                .iter()
                .map(|f| (f.ops.len(), f.durable))
                .collect(),
            dirs: self.dirs.clone(),
            acked: self.acked,
            snapshot_acked: self.snapshot_acked,
            purge_acked: self.purge_acked,
        });
    }

    /// One complete call: `name`, its argument text, its return value.
    fn call(&mut self, pid: &str, name: &str, a: &str, ret: i64, line: usize) {
        match name {
            "openat" | "open" => {
                if ret < 0 {
                    return;
                }
                let (dirfd, rest) = if name == "openat" {
                    a.split_once(", ").unwrap()
                } else {
                    ("AT_FDCWD", a)
                };
                let (p, rest) = string_arg(rest);
                let path = self.resolve(dirfd, &p);
                let flags = rest.trim_start_matches(", ");
                if self.ours(&path) && !flags.contains("O_DIRECTORY") && !self.dirs.contains(&path)
                {
                    let id = match self.paths.get(&path) {
                        Some(id) => *id,
                        None => {
                            assert!(flags.contains("O_CREAT"), "{path} opened but unknown");
                            self.files.push(FileModel::default());
                            self.paths.insert(path.clone(), self.files.len() - 1);
                            self.files.len() - 1
                        }
                    };
                    assert!(!flags.contains("O_APPEND"), "O_APPEND is not modelled");
                    if flags.contains("O_TRUNC") {
                        self.files[id].ops.push(Op::Truncate(0));
                    }
                }
                self.fds.insert(ret, (path, 0));
            }
            "close" => {
                self.fds.remove(&num(a));
            }
            "lseek" => {
                if let Some(fd) = self.fds.get_mut(&num(a.split(", ").next().unwrap())) {
                    fd.1 = ret as u64;
                }
            }
            "write" | "pwrite64" => {
                let (fd, rest) = a.split_once(", ").unwrap();
                let fd = num(fd);
                let (data, rest) = string_arg(rest);
                if fd == 1 {
                    for l in String::from_utf8_lossy(&data).lines() {
                        if let Some(n) = l.strip_prefix("ACK ") {
                            self.acked = n.trim().parse().unwrap();
                            self.cut(line);
                        } else if l == "SNAP" {
                            self.snapshot_acked = true;
                            self.cut(line);
                        } else if l == "PURGED" {
                            self.purge_acked = true;
                            self.cut(line);
                        }
                    }
                    return;
                }
                let Some(id) = self.file_of(fd) else { return };
                assert!(ret >= 0, "a failed write to {fd}");
                let data = data[..ret as usize].to_vec();
                let at = if name == "pwrite64" {
                    num(args(rest.trim_start_matches(", "))[1]) as u64
                } else {
                    let pos = &mut self.fds.get_mut(&fd).unwrap().1;
                    let at = *pos;
                    *pos += ret as u64;
                    at
                };
                self.files[id].ops.push(Op::Write { at, data });
                self.cut(line);
            }
            "ftruncate" => {
                let v = args(a);
                if let Some(id) = self.file_of(num(v[0])) {
                    self.files[id].ops.push(Op::Truncate(num(v[1]) as u64));
                }
            }
            "fsync" | "fdatasync" => {
                if let Some((id, mark)) = self.syncing.remove(pid)
                    && ret == 0
                {
                    let f = &mut self.files[id];
                    f.durable = f.durable.max(mark);
                    self.cut(line);
                }
            }
            "rename" | "renameat" | "renameat2" => {
                if ret != 0 {
                    return;
                }
                let (from, to) = if name == "rename" {
                    let (f, rest) = string_arg(a);
                    let (t, _) = string_arg(rest.trim_start_matches(", "));
                    (self.resolve("AT_FDCWD", &f), self.resolve("AT_FDCWD", &t))
                } else {
                    let (d1, rest) = a.split_once(", ").unwrap();
                    let (f, rest) = string_arg(rest);
                    let (d2, rest) = rest.trim_start_matches(", ").split_once(", ").unwrap();
                    let (t, _) = string_arg(rest);
                    (self.resolve(d1, &f), self.resolve(d2, &t))
                };
                if let Some(id) = self.paths.remove(&from) {
                    self.paths.insert(to, id);
                }
            }
            "unlink" | "unlinkat" => {
                if ret != 0 {
                    return;
                }
                let path = if name == "unlink" {
                    self.resolve("AT_FDCWD", &string_arg(a).0)
                } else {
                    let (d, rest) = a.split_once(", ").unwrap();
                    self.resolve(d, &string_arg(rest).0)
                };
                self.paths.remove(&path);
                self.dirs.remove(&path);
            }
            "mkdir" => {
                let path = self.resolve("AT_FDCWD", &string_arg(a).0);
                if ret == 0 && self.ours(&path) {
                    self.dirs.insert(path);
                }
            }
            "writev" | "pwritev" | "pwritev2" | "fallocate" | "dup" | "dup2" | "dup3" => {
                let fd = num(a.split(", ").next().unwrap());
                assert!(
                    self.file_of(fd).is_none(),
                    "{name} on a data-dir file is not modelled"
                );
            }
            _ => {}
        }
    }

    /// A call's entry: an fsync takes the ops that happened before it.
    fn enter(&mut self, pid: &str, name: &str, a: &str) {
        if name == "fsync" || name == "fdatasync" {
            let digits: String = a.chars().take_while(|c| c.is_ascii_digit()).collect();
            let fd = num(&digits);
            if let Some(id) = self.file_of(fd) {
                self.syncing
                    .insert(pid.to_string(), (id, self.files[id].ops.len()));
            }
        }
    }

    fn replay(root: &Path, log: &str) -> Self {
        let mut t = Trace::new(root);
        let mut pending: BTreeMap<String, String> = BTreeMap::new();
        for (n, line) in log.lines().enumerate() {
            let Some((pid, rest)) = line.trim_start().split_once(' ') else {
                continue;
            };
            let rest = rest.trim_start();
            let full = if let Some(r) = rest.strip_prefix("<... ") {
                let (_, tail) = r.split_once(" resumed>").expect("resumed line");
                match pending.remove(pid) {
                    Some(head) => format!("{head}{tail}"),
                    None => continue,
                }
            } else if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
                if let Some((name, a)) = head.split_once('(') {
                    t.enter(pid, name, a);
                }
                pending.insert(pid.to_string(), head.to_string());
                continue;
            } else {
                if let Some((name, a)) = rest.split_once('(') {
                    t.enter(pid, name, a);
                }
                rest.to_string()
            };
            let Some((name, tail)) = full.split_once('(') else {
                continue;
            };
            // `name(args) = ret`, strace pads before the `=`.
            let Some((a, ret)) = tail
                .rsplit_once(" = ")
                .and_then(|(l, r)| Some((l.trim_end().strip_suffix(')')?, r)))
            else {
                continue;
            };
            let ret = ret.split_whitespace().next().unwrap_or("-1");
            let ret = if ret == "?" { -1 } else { num(ret) };
            t.call(pid, name, a, ret, n);
        }
        t
    }
}

/// A small deterministic generator (xorshift), so a failing cut can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn apply_op(bytes: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Truncate(len) => bytes.resize(*len as usize, 0),
        Op::Write { at, data } => {
            let end = *at as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*at as usize..end].copy_from_slice(data);
        }
    }
}

/// Writes into `out` what the disk could hold after a power cut at `cut`: every durable op,
/// then each later op in full, torn (its first sectors only) or not at all, as `rng` picks.
fn materialize(trace: &Trace, cut: &Cut, rng: &mut Rng, out: &Path) {
    let rel = |p: &str| out.join(p.strip_prefix(&trace.root).unwrap().trim_start_matches('/'));
    for d in &cut.dirs {
        std::fs::create_dir_all(rel(d)).unwrap();
    }
    for (path, id) in &cut.paths {
        let (len, durable) = cut.files[*id];
        let ops = &trace.files[*id].ops;
        let mut bytes = Vec::new();
        for op in &ops[..durable.min(len)] {
            apply_op(&mut bytes, op);
        }
        for op in &ops[durable.min(len)..len] {
            match (rng.below(3), op) {
                (0, _) => apply_op(&mut bytes, op),
                (1, Op::Write { at, data }) if data.len() > 512 => {
                    let sectors = data.len() / 512;
                    let keep = 512 * rng.below(sectors as u64) as usize;
                    let torn = Op::Write {
                        at: *at,
                        data: data[..keep].to_vec(),
                    };
                    apply_op(&mut bytes, &torn);
                }
                _ => {}
            }
        }
        std::fs::write(rel(path), bytes).unwrap();
    }
}

/// What a store rebuilt after a cut must hold; `Err` says what is missing.
async fn check_cut(dir: &Path, cut: &Cut) -> Result<(), String> {
    let (mut log, mut sm) =
        store::open(dir).map_err(|e| format!("the store does not open: {e}"))?;
    let entries = log
        .try_get_log_entries(writer_index(1)..=writer_index(WRITER_ENTRIES))
        .await
        .map_err(|e| format!("the log does not read: {e}"))?;
    // The log reads from entry 1, or from the one after the purge once its marker is on disk
    // (it must be, once the purge was acknowledged).
    let first = match entries.first() {
        Some(e) if e.index() == writer_index(1) && !cut.purge_acked => 1,
        Some(e) if e.index() == writer_index(WRITER_PURGED_TO + 1) => WRITER_PURGED_TO + 1,
        Some(e) => {
            return Err(format!(
                "the log starts at index {} (purge acknowledged: {})",
                e.index(),
                cut.purge_acked
            ));
        }
        None => 1,
    };
    for (i, e) in (first..).zip(&entries) {
        if *e != writer_entry(i) {
            return Err(format!("entry {i} differs from what was written"));
        }
    }
    let last = first + entries.len() as u64 - 1;
    if last < cut.acked && !(entries.is_empty() && cut.acked == 0) {
        return Err(format!(
            "{} entries acknowledged, the log ends at entry {last}",
            cut.acked
        ));
    }
    let state = log
        .get_log_state()
        .await
        .map_err(|e| format!("the log state does not read: {e}"))?;
    if cut.acked > 0 && state.last_log_id.map(|l| l.index()) < Some(writer_index(cut.acked)) {
        return Err(format!(
            "{} entries acknowledged, the log state's last is {:?}",
            cut.acked, state.last_log_id
        ));
    }
    let snapshot = openraft::storage::RaftStateMachine::get_current_snapshot(&mut sm)
        .await
        .map_err(|e| format!("the snapshot does not read: {e}"))?;
    if cut.snapshot_acked && snapshot.is_none() {
        return Err("the acknowledged snapshot is gone".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_entry_survives_a_power_cut() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        writer(Path::new(&dir)).await;
        return;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let strace_here = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !strace_here {
        assert!(!ci, "strace is missing: .ci/run installs it");
        eprintln!("skipped: strace is not installed (apt-get install strace)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let trace_file = work.path().join("trace");
    let status = std::process::Command::new("strace")
        .args(["-f", "-qq", "-xx", "-s", "16777216", "-o"])
        .arg(&trace_file)
        .args([
            "-e",
            "trace=open,openat,close,lseek,write,pwrite64,writev,pwritev,pwritev2,ftruncate,\
             fallocate,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,mkdir,dup,dup2,dup3",
        ])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "every_acknowledged_entry_survives_a_power_cut",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WRITER_ENV, &data)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run strace");
    assert!(status.success(), "the traced writer failed: {status}");
    let log = std::fs::read_to_string(&trace_file).unwrap();
    let trace = Trace::replay(&data, &log);
    assert_eq!(trace.acked, WRITER_ENTRIES, "the trace shows every ACK");
    assert!(trace.purge_acked, "the trace shows the purge");
    assert!(
        trace.files.iter().any(|f| f.durable > 0),
        "the trace shows no fsync of the data dir: the model is blind"
    );
    // Every moment an acknowledgement was printed, every step of the purge, and every 7th other
    // step.
    let cuts: Vec<&Cut> = trace
        .cuts
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            i % 7 == 0
                || (c.acked == WRITER_PURGE_AFTER && !c.purge_acked)
                || trace.cuts.get(i + 1).is_some_and(|n| {
                    n.acked != c.acked
                        || n.snapshot_acked != c.snapshot_acked
                        || n.purge_acked != c.purge_acked
                })
        })
        .map(|(_, c)| c)
        .chain(trace.cuts.last())
        .collect();
    let mut rng = Rng(0x5eed_cafe);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (n, cut) in cuts.iter().enumerate() {
        for variant in 0..2 {
            let disk = work.path().join(format!("cut-{n}-{variant}"));
            materialize(&trace, cut, &mut rng, &disk);
            if let Err(e) = check_cut(&disk, cut).await {
                failures.push(format!(
                    "cut at trace line {} ({} acknowledged, variant {variant}): {e}",
                    cut.line + 1,
                    cut.acked
                ));
            }
            checked += 1;
            std::fs::remove_dir_all(&disk).unwrap();
        }
    }
    eprintln!(
        "power cut: {} trace steps, {checked} disks rebuilt, {} failed",
        trace.cuts.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
