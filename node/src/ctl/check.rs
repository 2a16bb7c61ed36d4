//! `spacectl check perf|datadir`, as etcdctl's `check perf` and the disk check etcd's docs
//! ask for: how many writes a second the cluster commits at a steady offered load, how slow
//! the slowest was; and how long an fdatasync takes on the data disk.
//!
//! `check perf` offers writes at the rate of a load shape (etcdctl's: `s` 150/s by 50
//! clients, `m` 1,000/s by 200, `l` 8,000/s by 500, `xl` 15,000/s by 1,000) for a minute, to
//! the leader, each a [`Command::Probe`] of 1,280 bytes (the size of etcdctl's key and value)
//! that Raft logs, replicates and makes durable like any other write and the fabric applies
//! as a no-op; so it leaves nothing to clean up. It prints etcdctl's verdict lines: the
//! throughput must reach 90 % of the offered rate, the slowest request 0.5 s at most, the
//! standard deviation 0.1 s at most, and no request may fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use spaced_fabric::Command;

use super::common::*;
use crate::admin::client::Caller;

/// `spacectl check ...`
#[derive(Debug, Subcommand)]
pub enum CheckCmd {
    /// Offer writes at a load shape's rate for a while and judge throughput and latency, like
    /// `etcdctl check perf`; exit 1 on FAIL.
    Perf {
        /// s (150 writes/s, 50 clients), m (1,000/s, 200), l (8,000/s, 500) or xl (15,000/s,
        /// 1,000); also small, medium, large, xLarge.
        #[arg(long, default_value = "s")]
        load: String,
        /// How long to offer the load, in seconds (etcdctl: 60).
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Writes offered per second instead of the load shape's (the verdict judges against it).
        #[arg(long)]
        rate: Option<u32>,
        /// Concurrent clients instead of the load shape's.
        #[arg(long)]
        clients: Option<u32>,
        /// Also write every acknowledged write to FILE as CSV: seconds into the run it was
        /// sent, seconds it took (to find when the slow ones were sent).
        #[arg(long, value_name = "FILE")]
        latencies: Option<PathBuf>,
        /// Print JSON instead of the verdict lines.
        #[arg(long)]
        json: bool,
    },
    /// Time fdatasync on a data disk (write 2,300-byte blocks, each followed by fdatasync, as
    /// etcd's disk check with fio does); PASS when the 99th percentile is under 10 ms.
    Datadir {
        /// The data directory to test (a file is written there and removed).
        #[arg(long, default_value = "/var/lib/spaced")]
        dir: PathBuf,
        /// How many synced writes.
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Print JSON instead of the verdict lines.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(cli: &Target, action: &CheckCmd) -> Result<(), CtlError> {
    match action {
        CheckCmd::Perf {
            load,
            duration,
            rate,
            clients,
            latencies,
            json,
        } => {
            let mut shape = load_shape(load).ok_or_else(|| {
                usage(format!(
                    "--load {load:?}: unknown load shape (s, m, l, xl; or small, medium, large, \
                     xLarge)"
                ))
            })?;
            if let Some(rate) = rate {
                if !(1..=1_000_000).contains(rate) {
                    return Err(usage(format!(
                        "--rate {rate}: 1 to 1,000,000 writes a second"
                    )));
                }
                shape.rate = *rate;
            }
            if let Some(clients) = clients {
                if !(1..=10_000).contains(clients) {
                    return Err(usage(format!("--clients {clients}: 1 to 10,000")));
                }
                shape.clients = *clients;
            }
            perf(cli, shape, *duration, latencies.as_deref(), *json).await
        }
        CheckCmd::Datadir { dir, count, json } => datadir(dir, *count, *json).await,
    }
}

/// A load shape: writes offered per second, by how many concurrent clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Its name (s, m, l, xl).
    pub name: &'static str,
    /// Writes offered per second.
    pub rate: u32,
    /// Concurrent clients.
    pub clients: u32,
}

/// etcdctl's load shapes, under their names and aliases.
pub fn load_shape(name: &str) -> Option<Load> {
    let (name, rate, clients) = match name {
        "s" | "small" => ("s", 150, 50),
        "m" | "medium" => ("m", 1_000, 200),
        "l" | "large" => ("l", 8_000, 500),
        "xl" | "xLarge" | "xlarge" => ("xl", 15_000, 1_000),
        _ => return None,
    };
    Some(Load {
        name,
        rate,
        clients,
    })
}

/// Bytes each write carries: etcdctl's 256-byte key and 1,024-byte value.
const WRITE_BYTES: usize = 1_280;
/// Concurrent requests one connection carries before another is opened.
const CLIENTS_PER_CONNECTION: u32 = 64;
/// The most connections `check perf` opens.
const MAX_CONNECTIONS: u32 = 16;

/// What a run measured.
#[derive(Debug, Default)]
pub struct PerfResult {
    /// Seconds each acknowledged write took.
    pub latencies: Vec<f64>,
    /// Seconds into the run each acknowledged write was sent, in the order of `latencies`.
    pub sent_at: Vec<f64>,
    /// Failed writes by error.
    pub errors: BTreeMap<String, u64>,
    /// Refusals ("not the leader": a leader that stepped down or let its lease lapse) and
    /// closed connections after which the write was sent again and then acknowledged or
    /// failed for another reason.
    pub retried: u64,
    /// From the first write offered to the last answered.
    pub elapsed: Duration,
}

/// The summary and etcdctl's verdicts.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Acknowledged writes per second.
    pub throughput: f64,
    /// Slowest acknowledged write, s.
    pub slowest: f64,
    /// Standard deviation of the latencies, s.
    pub stddev: f64,
    /// Mean, s.
    pub mean: f64,
    /// Median, s.
    pub p50: f64,
    /// 99th percentile, s.
    pub p99: f64,
    /// Writes acknowledged.
    pub acknowledged: u64,
    /// Writes failed.
    pub failed: u64,
    /// The lines etcdctl would print, and whether all passed.
    pub lines: Vec<String>,
    /// Whether every check passed.
    pub pass: bool,
}

/// The `p` quantile (0 to 1, nearest rank) of ascending `sorted`; 0 when it is empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Judges a run at `load` as etcdctl does.
pub fn judge(load: &Load, r: &PerfResult) -> Verdict {
    let n = r.latencies.len();
    let secs = r.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let throughput = n as f64 / secs;
    let mut sorted = r.latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = if n == 0 {
        0.0
    } else {
        sorted.iter().sum::<f64>() / n as f64
    };
    let stddev = if n == 0 {
        0.0
    } else {
        (sorted.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    let slowest = sorted.last().copied().unwrap_or(0.0);
    let failed: u64 = r.errors.values().sum();
    let mut lines = Vec::new();
    let mut pass = true;
    if failed > 0 {
        lines.push("FAIL: too many errors".to_string());
        for (e, count) in &r.errors {
            lines.push(format!("FAIL: ERROR({e}) -> {count}"));
        }
        pass = false;
    }
    if throughput / f64::from(load.rate) <= 0.9 {
        lines.push(format!(
            "FAIL: Throughput too low: {} writes/s",
            throughput as u64 + 1
        ));
        pass = false;
    } else {
        lines.push(format!(
            "PASS: Throughput is {} writes/s",
            throughput as u64 + 1
        ));
    }
    if n == 0 || slowest > 0.5 {
        lines.push(format!(
            "FAIL: Slowest request took too long: {slowest:.6}s"
        ));
        pass = false;
    } else {
        lines.push(format!("PASS: Slowest request took {slowest:.6}s"));
    }
    if stddev > 0.1 {
        lines.push(format!("FAIL: Stddev too high: {stddev:.6}s"));
        pass = false;
    } else {
        lines.push(format!("PASS: Stddev is {stddev:.6}s"));
    }
    lines.push(if pass { "PASS" } else { "FAIL" }.to_string());
    Verdict {
        throughput,
        slowest,
        stddev,
        mean,
        p50: percentile(&sorted, 0.5),
        p99: percentile(&sorted, 0.99),
        acknowledged: n as u64,
        failed,
        lines,
        pass,
    }
}

async fn perf(
    cli: &Target,
    shape: Load,
    duration: f64,
    latencies: Option<&Path>,
    json: bool,
) -> Result<(), CtlError> {
    if !(duration.is_finite() && (0.1..=86_400.0).contains(&duration)) {
        return Err(usage(format!(
            "--duration {duration}: must be seconds from 0.1 to 86400"
        )));
    }
    // Made before the run, so a path that cannot be written fails at once, not after it.
    let mut latencies_file = match latencies {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| {
                usage(format!(
                    "--latencies {}: cannot create it: {e}",
                    path.display()
                ))
            })?,
        )),
        None => None,
    };
    let creds = credentials(cli)?;
    let mut first = connect(cli).await?;
    // Straight to the leader: a follower would hand each write on to it.
    let status = first.status().await?;
    if status.leader != Some(status.served_by) {
        return Err(failed(format!(
            "no leader to measure: {} knows of none it can reach",
            first.target()
        )));
    }
    // One write checks that this admin may write.
    let probe = AdminRequest::Write(Command::Probe {
        bytes: vec![0; WRITE_BYTES],
    });
    match first.call_leader(&probe).await? {
        AdminReply::Applied(_) => {}
        other => return Err(unexpected(first.target(), &other).into()),
    }
    let leader = first.target().to_string();
    let connections = shape
        .clients
        .div_ceil(CLIENTS_PER_CONNECTION)
        .clamp(1, MAX_CONNECTIONS) as usize;
    let pool = Arc::new(Pool {
        creds: Arc::new(creds),
        connections,
        current: tokio::sync::RwLock::new(Current {
            target: leader.clone(),
            callers: Vec::new(),
        }),
        opened: std::sync::Mutex::new(Vec::new()),
        leader_changes: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        reopen_failed: std::sync::Mutex::new(None),
        following: tokio::sync::Mutex::new(()),
    });
    pool.open(&leader, Some(first)).await?;
    let bar = progress(duration, json);
    let result = offer(pool.clone(), shape, Duration::from_secs_f64(duration), &bar).await;
    bar.finish_and_clear();
    let opened = std::mem::take(&mut *pool.opened.lock().unwrap_or_else(|p| p.into_inner()));
    for c in opened {
        c.close().await;
    }
    let leader_changes = pool.leader_changes.load(Ordering::Relaxed);
    let reconnects = pool.reconnects.load(Ordering::Relaxed);
    let v = judge(&shape, &result);
    if let (Some(file), Some(path)) = (latencies_file.as_mut(), latencies) {
        write_latencies(file, &result)
            .map_err(|e| failed(format!("--latencies {}: {e}", path.display())))?;
    }
    if structured(json) {
        println!(
            "{}",
            emit(
                json,
                &json!({
                    "load": shape.name,
                    "offered_per_s": shape.rate,
                    "clients": shape.clients,
                    "leader": leader,
                    "leader_changes": leader_changes,
                    "reconnects": reconnects,
                    "seconds": result.elapsed.as_secs_f64(),
                    "acknowledged": v.acknowledged,
                    "failed": v.failed,
                    "errors": result.errors,
                    "retried": result.retried,
                    "writes_per_s": v.throughput,
                    "slowest_s": v.slowest,
                    "stddev_s": v.stddev,
                    "mean_s": v.mean,
                    "p50_s": v.p50,
                    "p99_s": v.p99,
                    "pass": v.pass,
                })
            )
        );
    } else {
        println!(
            "{} writes acknowledged in {:.1} s at load {} ({} writes/s offered by {} clients, \
             leader {leader}): mean {:.2} ms, median {:.2} ms, p99 {:.2} ms",
            v.acknowledged,
            result.elapsed.as_secs_f64(),
            shape.name,
            shape.rate,
            shape.clients,
            v.mean * 1e3,
            v.p50 * 1e3,
            v.p99 * 1e3
        );
        if leader_changes > 0 {
            println!(
                "the leader changed {leader_changes} time(s) during the run; the writes followed it"
            );
        }
        if reconnects > 0 {
            println!(
                "the connections closed and were opened again {reconnects} time(s); the writes on them were sent again"
            );
        }
        if result.retried > 0 {
            println!(
                "{} time(s) a write was refused (not the leader, or its connection closed) and sent again",
                result.retried
            );
        }
        for line in &v.lines {
            println!("{line}");
        }
    }
    if v.pass {
        Ok(())
    } else {
        Err(failed("check perf: FAIL"))
    }
}

/// Writes `sent_s,latency_s` lines, one per acknowledged write, in the order they were sent.
fn write_latencies(out: &mut impl std::io::Write, result: &PerfResult) -> std::io::Result<()> {
    let mut rows: Vec<(f64, f64)> = result
        .sent_at
        .iter()
        .copied()
        .zip(result.latencies.iter().copied())
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    writeln!(out, "sent_s,latency_s")?;
    for (sent, took) in rows {
        writeln!(out, "{sent:.6},{took:.6}")?;
    }
    out.flush()
}

/// The connections to the leader the workers write through, opened again at a new leader.
struct Pool {
    creds: Arc<AdminCredentials>,
    /// How many connections to open to a leader.
    connections: usize,
    current: tokio::sync::RwLock<Current>,
    /// Every connection opened, to close at the end.
    opened: std::sync::Mutex<Vec<AdminClient>>,
    leader_changes: AtomicU64,
    /// Times the connections were opened again after they closed.
    reconnects: AtomicU64,
    /// When opening them again last failed (written under `following`).
    reopen_failed: std::sync::Mutex<Option<Instant>>,
    /// Held by the worker that opens connections to a new leader or opens them again.
    following: tokio::sync::Mutex<()>,
}

/// The node written to and the connections to it.
struct Current {
    target: String,
    callers: Vec<Caller>,
}

impl Pool {
    /// Opens the connections to `target` (`first` one of them, if open already) and makes
    /// them the ones written through.
    async fn open(&self, target: &str, first: Option<AdminClient>) -> Result<(), ClientError> {
        let mut clients: Vec<AdminClient> = first.into_iter().collect();
        while clients.len() < self.connections {
            clients.push(AdminClient::connect(target, &self.creds).await?);
        }
        // Straight to the leader: no signature to make per write (see `Caller::unsigned`).
        let callers = clients.iter().map(|c| c.caller().unsigned()).collect();
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(clients);
        *self.current.write().await = Current {
            target: target.to_string(),
            callers,
        };
        Ok(())
    }

    /// The caller for worker `i`.
    async fn caller(&self, i: usize) -> Caller {
        let c = self.current.read().await;
        c.callers[i % c.callers.len()].clone()
    }

    /// A write to `from` was answered "not the leader, `leader` is": write there from now on
    /// (once, whichever worker heard it first).
    async fn follow(&self, from: &str, leader: &str) {
        if self.current.read().await.target != from || from == leader {
            return;
        }
        // Held while connecting, so that only one worker opens the new connections.
        let _one = self.following.lock().await;
        if self.current.read().await.target != from {
            return;
        }
        if self.open(leader, None).await.is_ok() {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Worker `i`'s connection has closed (the node restarted, or stalled past the idle
    /// time-out): opens new connections to the same node, once, whichever worker saw it
    /// first. If the node is gone for good the writes fail; its successor, once it
    /// answers, names itself in a refusal and the pool follows it.
    async fn reopen(&self, i: usize) {
        let _one = self.following.lock().await;
        let target = {
            let c = self.current.read().await;
            if !c.callers[i % c.callers.len()].is_closed() {
                return;
            }
            c.target.clone()
        };
        // A node that did not answer a moment ago is not dialled again by every worker in
        // turn, each waiting out the connect time-out.
        let failed_at = || self.reopen_failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed_at().is_some_and(|t| t.elapsed() < REOPEN_BACKOFF) {
            return;
        }
        let opened = self.open(&target, None).await.is_ok();
        if opened {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        *failed_at() = (!opened).then(Instant::now);
    }
}

/// How long after a failed attempt to open the connections again the next may start.
const REOPEN_BACKOFF: Duration = Duration::from_millis(500);

/// How long a write refused with "not the leader" is sent again before it counts as failed
/// (spacectl's mutations wait out an election for up to 10 s; a benchmark gives up sooner).
const RETRY_FOR: Duration = Duration::from_secs(2);

/// A seconds bar on a terminal (nothing otherwise, or with JSON).
fn progress(duration: f64, json: bool) -> indicatif::ProgressBar {
    if structured(json) || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(duration.ceil() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:60} {pos}/{len} s") {
        bar.set_style(style);
    }
    bar
}

/// Offers `load.rate` writes a second for `duration` through `callers`: a pacer hands out
/// permits at the rate (at most `load.clients` waiting, as etcdctl's queue of that size),
/// and `load.clients` tasks each take one, write, and record the time it took.
async fn offer(
    pool: Arc<Pool>,
    load: Load,
    duration: Duration,
    bar: &indicatif::ProgressBar,
) -> PerfResult {
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let answered_last = Arc::new(AtomicU64::new(0));
    let pacer = {
        let permits = permits.clone();
        let bar = bar.clone();
        let rate = f64::from(load.rate);
        let queue = load.clients as usize;
        tokio::spawn(async move {
            let mut issued = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < deadline {
                tick.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                while issued < due && permits.available_permits() < queue {
                    permits.add_permits(1);
                    issued += 1;
                }
                // Writes not offered because the queue was full are not owed later.
                issued = issued.max(due.saturating_sub(queue as u64));
                bar.set_position(started.elapsed().as_secs());
            }
            permits.close();
        })
    };
    let mut workers = Vec::with_capacity(load.clients as usize);
    for i in 0..load.clients as usize {
        let pool = pool.clone();
        let permits = permits.clone();
        let answered_last = answered_last.clone();
        workers.push(tokio::spawn(async move {
            let write = AdminRequest::Write(Command::Probe {
                bytes: vec![0; WRITE_BYTES],
            });
            let mut latencies = Vec::new();
            let mut sent_at = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut retried = 0u64;
            while let Ok(permit) = permits.acquire().await {
                permit.forget();
                // A refused write was not carried out: like any client (and spacectl's own
                // mutations), send it again, to the new leader if one is named, for up to
                // RETRY_FOR. Its time counts from the first attempt.
                let t = Instant::now();
                let outcome = loop {
                    let caller = pool.caller(i).await;
                    match caller.call(&write).await {
                        Ok(AdminReply::NotLeader { addr, .. }) if t.elapsed() < RETRY_FOR => {
                            retried += 1;
                            match addr {
                                Some(addr) => pool.follow(caller.target(), &addr).await,
                                // An election or a lapsed lease: give it a moment.
                                None => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                        // A closed connection carried nothing: open it again and resend.
                        Err(ClientError::Unreachable { .. })
                            if caller.is_closed() && t.elapsed() < RETRY_FOR =>
                        {
                            retried += 1;
                            pool.reopen(i).await;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        other => break other,
                    }
                };
                let took = t.elapsed().as_secs_f64();
                answered_last.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                match outcome {
                    Ok(AdminReply::Applied(_)) => {
                        latencies.push(took);
                        sent_at.push(t.duration_since(started).as_secs_f64());
                    }
                    Ok(AdminReply::NotLeader { leader, .. }) => {
                        *errors
                            .entry(format!(
                                "not the leader (leader: {leader:?}) for {} s of retries",
                                RETRY_FOR.as_secs()
                            ))
                            .or_default() += 1;
                    }
                    Ok(other) => *errors.entry(format!("{other:?}")).or_default() += 1,
                    Err(e) => *errors.entry(e.to_string()).or_default() += 1,
                }
            }
            (latencies, sent_at, errors, retried)
        }));
    }
    let _ = pacer.await;
    let mut result = PerfResult::default();
    for w in workers {
        if let Ok((latencies, sent_at, errors, retried)) = w.await {
            result.latencies.extend(latencies);
            result.sent_at.extend(sent_at);
            result.retried += retried;
            for (e, n) in errors {
                *result.errors.entry(e).or_default() += n;
            }
        }
    }
    result.elapsed = Duration::from_micros(answered_last.load(Ordering::Relaxed)).max(duration);
    result
}

/// `check datadir`: `count` writes of 2,300 bytes to a new file in `dir`, each followed by
/// fdatasync, timed; the file is removed.
async fn datadir(dir: &Path, count: u32, json: bool) -> Result<(), CtlError> {
    if count == 0 {
        return Err(usage("--count 0: at least one write"));
    }
    let dir = dir.to_path_buf();
    let timings = tokio::task::spawn_blocking(move || sync_timings(&dir, count))
        .await
        .map_err(|e| failed(format!("check datadir: {e}")))??;
    let mut sorted = timings;
    sorted.sort_by(f64::total_cmp);
    let [p50, p99, max] = [0.5, 0.99, 1.0].map(|p| percentile(&sorted, p));
    let pass = p99 < 0.010;
    if structured(json) {
        println!(
            "{}",
            emit(
                json,
                &json!({
                    "writes": count,
                    "fdatasync_p50_ms": p50 * 1e3,
                    "fdatasync_p99_ms": p99 * 1e3,
                    "fdatasync_max_ms": max * 1e3,
                    "pass": pass,
                })
            )
        );
    } else {
        println!(
            "{count} writes of 2300 bytes, each followed by fdatasync: median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            p50 * 1e3,
            p99 * 1e3,
            max * 1e3
        );
        if pass {
            println!(
                "PASS: 99th percentile of fdatasync is {:.3} ms (under 10 ms)",
                p99 * 1e3
            );
            println!("PASS");
        } else {
            println!(
                "FAIL: 99th percentile of fdatasync is {:.3} ms (etcd asks under 10 ms of its disks; Raft's log waits for it on every commit)",
                p99 * 1e3
            );
            println!("FAIL");
        }
    }
    if pass {
        Ok(())
    } else {
        Err(failed("check datadir: FAIL"))
    }
}

/// Seconds each fdatasync took.
fn sync_timings(dir: &Path, count: u32) -> Result<Vec<f64>, CtlError> {
    use std::io::Write as _;
    let meta = std::fs::metadata(dir)
        .map_err(|e| failed(format!("check datadir {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(failed(format!(
            "check datadir {}: not a directory",
            dir.display()
        )));
    }
    let path = dir.join(format!(".spacectl-check-datadir-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| failed(format!("check datadir: create {}: {e}", path.display())))?;
        let block = [0x5au8; 2300];
        let mut timings = Vec::with_capacity(count as usize);
        for _ in 0..count {
            file.write_all(&block)
                .map_err(|e| failed(format!("check datadir: write {}: {e}", path.display())))?;
            let t = Instant::now();
            file.sync_data()
                .map_err(|e| failed(format!("check datadir: fdatasync {}: {e}", path.display())))?;
            timings.push(t.elapsed().as_secs_f64());
        }
        Ok(timings)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_shapes_are_etcdctls() {
        assert_eq!(
            load_shape("large"),
            Some(Load {
                name: "l",
                rate: 8_000,
                clients: 500
            })
        );
        assert_eq!(load_shape("xLarge").map(|l| l.rate), Some(15_000));
        assert_eq!(load_shape("xxl"), None);
    }

    #[test]
    fn the_verdicts_are_etcdctls() {
        let s = load_shape("s").unwrap();
        let fast = PerfResult {
            latencies: vec![0.002; 1_500],
            sent_at: Vec::new(),
            errors: BTreeMap::new(),
            retried: 0,
            elapsed: Duration::from_secs(10),
        };
        let v = judge(&s, &fast);
        assert!(v.pass, "{:?}", v.lines);
        assert_eq!(v.lines[0], "PASS: Throughput is 151 writes/s");
        // Too few writes, one too slow, and errors: three failures.
        let mut slow = PerfResult {
            latencies: vec![0.002; 1_000],
            sent_at: Vec::new(),
            errors: BTreeMap::from([("boom".to_string(), 2)]),
            retried: 0,
            elapsed: Duration::from_secs(10),
        };
        slow.latencies.push(0.75);
        let v = judge(&s, &slow);
        assert!(!v.pass);
        assert_eq!(v.failed, 2);
        assert!(v.lines.iter().any(|l| l == "FAIL: ERROR(boom) -> 2"));
        assert!(
            v.lines
                .iter()
                .any(|l| l.starts_with("FAIL: Throughput too low: 101"))
        );
        assert!(
            v.lines
                .iter()
                .any(|l| l.starts_with("FAIL: Slowest request took too long: 0.75"))
        );
        assert_eq!(v.lines.last().map(String::as_str), Some("FAIL"));
        assert!((v.p50 - 0.002).abs() < 1e-12);
    }
}
