//! Shared pieces of the spaced benchmarks: a 3-node in-process cluster on loopback (real QUIC,
//! real sled with flushes), a load generator that runs proposals from concurrent tasks, and the
//! latency/throughput summary printed by `benches/commit.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::{Command, DeviceMode, NewDevice};
use spaced_node::node::Proposer;
use spaced_node::ops::config::RaftTimings;
use spaced_tests::Cluster;

/// Source of device ids: every proposal in the process registers a different device, since the
/// fabric refuses a duplicate id.
static NEXT_DEVICE: AtomicU64 = AtomicU64::new(0);

/// An `AddDevices` command registering one device with a never-used id.
pub fn add_device_command() -> Command {
    let n = NEXT_DEVICE.fetch_add(1, Ordering::Relaxed);
    Command::AddDevices {
        devices: vec![NewDevice {
            id: format!("bench-{n}"),
            // Nothing listens there: the device agents' connects are refused at once.
            addr: "127.0.0.1:1".into(),
            mode: DeviceMode::SpaceInitiated,
        }],
        at: 1,
    }
}

/// A running cluster and a proposer on its leader.
pub struct BenchCluster {
    /// The cluster; stop it with [`BenchCluster::stop`].
    pub cluster: Cluster,
    /// Leader's node id.
    pub leader: u64,
    /// Proposes through the leader.
    pub proposer: Proposer,
}

impl BenchCluster {
    /// Starts `nodes` nodes with default Raft timings and waits until they agree on a leader.
    pub async fn start(nodes: u64) -> Result<BenchCluster> {
        let cluster = Cluster::start(nodes, RaftTimings::default())
            .await
            .context("start cluster")?;
        let leader = cluster
            .wait_leader(Duration::from_secs(20))
            .await
            .context("elect a leader")?;
        // Followers join as learners and are promoted by membership changes; wait until every
        // node applied the same index so the measurement starts on a settled cluster.
        cluster
            .wait_converged(Duration::from_secs(20))
            .await
            .context("converge")?;
        let proposer = cluster.nodes[&leader].proposer();
        let voters = cluster.nodes[&leader]
            .raft()
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .count();
        anyhow::ensure!(
            voters as u64 == nodes,
            "cluster has {voters} voters, expected {nodes}"
        );
        Ok(BenchCluster {
            cluster,
            leader,
            proposer,
        })
    }

    /// Stops every node.
    pub async fn stop(mut self) {
        self.cluster.stop_all().await;
    }
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Wall time from the first proposal to the last commit.
    pub elapsed: Duration,
    /// Commits made.
    pub commits: u64,
    /// One latency per proposal (empty unless asked for).
    pub latencies: Vec<Duration>,
}

impl RunResult {
    /// Commits per second over the run.
    pub fn throughput(&self) -> f64 {
        self.commits as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `total` proposals split across `tasks` concurrent tokio tasks, each task proposing one
/// command at a time (a proposal returns once committed on a majority and applied). With
/// `record`, keeps every proposal's latency. Fails on the first refused or failed proposal.
pub async fn run_commits(
    proposer: &Proposer,
    total: u64,
    tasks: u64,
    record: bool,
) -> Result<RunResult> {
    let tasks = tasks.clamp(1, total.max(1));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks as usize);
    for t in 0..tasks {
        // Spread the remainder over the first tasks.
        let share = total / tasks + u64::from(t < total % tasks);
        let p = proposer.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(if record { share as usize } else { 0 });
            for _ in 0..share {
                let cmd = add_device_command();
                let t0 = Instant::now();
                p.propose(cmd)
                    .await
                    .map_err(|e| anyhow::anyhow!("proposal failed: {e}"))?;
                if record {
                    lat.push(t0.elapsed());
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(if record { total as usize } else { 0 });
    for h in handles {
        latencies.extend(h.await.context("proposer task panicked")??);
    }
    Ok(RunResult {
        elapsed: started.elapsed(),
        commits: total,
        latencies,
    })
}

/// The `q`-quantile (0 < q <= 1) of sorted samples by the nearest-rank method.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Latency percentiles and throughput of one configuration over several rounds.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Concurrent proposers.
    pub proposers: u64,
    /// Commits measured (all rounds).
    pub commits: usize,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Worst latency.
    pub max: Duration,
    /// Throughput of each round, commits/s.
    pub round_throughputs: Vec<f64>,
}

impl Summary {
    /// Summarises rounds of the same configuration.
    pub fn of(proposers: u64, rounds: &[RunResult]) -> Summary {
        let mut all: Vec<Duration> = rounds
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        all.sort_unstable();
        Summary {
            proposers,
            commits: all.len(),
            p50: quantile(&all, 0.50),
            p99: quantile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
            round_throughputs: rounds.iter().map(RunResult::throughput).collect(),
        }
    }

    /// Median throughput over the rounds.
    pub fn throughput(&self) -> f64 {
        median(&self.round_throughputs)
    }

    /// One line: `commit latency 1 proposer: p50 0.9 ms p99 2.1 ms max 5.0 ms; throughput 1100 commits/s`.
    pub fn line(&self) -> String {
        let who = if self.proposers == 1 {
            "1 proposer".to_string()
        } else {
            format!("{} proposers", self.proposers)
        };
        format!(
            "commit latency {who}: p50 {} p99 {} max {}; throughput {:.0} commits/s (median of {} rounds, {} commits)",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.throughput(),
            self.round_throughputs.len(),
            self.commits,
        )
    }
}

/// Milliseconds with 2 decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A table of summaries, with a header.
pub fn table(rows: &[Summary]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<12} {:>8} {:>10} {:>10} {:>10} {:>16}  {}\n",
        "proposers", "commits", "p50", "p99", "max", "commits/s (med)", "per-round commits/s"
    ));
    for s in rows {
        let rounds: Vec<String> = s
            .round_throughputs
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect();
        out.push_str(&format!(
            "{:<12} {:>8} {:>10} {:>10} {:>10} {:>16.0}  [{}]\n",
            s.proposers,
            s.commits,
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.throughput(),
            rounds.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn device_ids_are_unique() {
        let ids: std::collections::BTreeSet<String> = (0..100)
            .map(|_| match add_device_command() {
                Command::AddDevices { devices, .. } => devices[0].id.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ids.len(), 100);
    }
}
