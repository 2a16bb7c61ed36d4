//! Durable commits through a real 3-node cluster on loopback (QUIC + sled, flushed on a majority).
//!
//! Criterion groups `commit/1_proposer` and `commit/64_proposers` measure throughput in commits;
//! each iteration runs a fixed number of proposals split across the concurrent proposers, on one
//! cluster kept for the whole group. Afterwards a latency report (outside criterion's timing)
//! takes individual commit latencies over several rounds and prints p50/p99/max and the median
//! throughput of the rounds.
//!
//! Run: `cargo bench -p spaced-benches --bench commit`. A filter argument that does not match
//! `latency` skips the report; `cargo test --benches` (no `--bench` flag) runs a short smoke version.

use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use spaced_benches::{BenchCluster, RunResult, Summary, run_commits, table};
use tokio::runtime::Runtime;

/// Nodes in the cluster.
const NODES: u64 = 3;

/// A criterion benchmark: `commit/<name>` with `proposers` concurrent tasks, `per_iter` commits each iteration.
struct Load {
    name: &'static str,
    proposers: u64,
    per_iter: u64,
}

const LOADS: [Load; 2] = [
    Load {
        name: "1_proposer",
        proposers: 1,
        per_iter: 50,
    },
    Load {
        name: "64_proposers",
        proposers: 64,
        per_iter: 640,
    },
];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn criterion_groups(c: &mut Criterion, rt: &Runtime, filters: &[&String]) {
    for load in &LOADS {
        let id = format!("commit/{}", load.name);
        if !filters.is_empty() && !filters.iter().any(|f| id.contains(f.as_str())) {
            continue;
        }
        let bc = rt
            .block_on(BenchCluster::start(NODES))
            .expect("start cluster");
        let proposer = bc.proposer.clone();
        // Warm the connections and the leader's pipeline before criterion's own warm-up.
        rt.block_on(run_commits(&proposer, 200, load.proposers, false))
            .expect("warm-up commits");

        let mut group = c.benchmark_group("commit");
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(12))
            .throughput(Throughput::Elements(load.per_iter));
        group.bench_function(load.name, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let proposer = proposer.clone();
                let (per_iter, proposers) = (load.per_iter, load.proposers);
                async move {
                    let r = run_commits(&proposer, iters * per_iter, proposers, false)
                        .await
                        .expect("commits");
                    r.elapsed
                }
            })
        });
        group.finish();
        rt.block_on(bc.stop());
    }
}

/// Rounds of individual latencies per configuration: (proposers, commits per round).
const REPORT: [(u64, u64); 2] = [(1, 500), (64, 5_120)];
const ROUNDS: usize = 5;

fn latency_report(rt: &Runtime, smoke: bool) {
    let (rounds, scale) = if smoke { (1, 50) } else { (ROUNDS, 1) };
    let summaries: Vec<Summary> = rt.block_on(async {
        let bc = BenchCluster::start(NODES).await.expect("start cluster");
        let mut out = Vec::new();
        for (proposers, per_round) in REPORT {
            let per_round = (per_round / scale).max(proposers);
            run_commits(&bc.proposer, per_round / 5, proposers, false)
                .await
                .expect("warm-up commits");
            let mut results: Vec<RunResult> = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                results.push(
                    run_commits(&bc.proposer, per_round, proposers, true)
                        .await
                        .expect("commits"),
                );
            }
            out.push(Summary::of(proposers, &results));
        }
        bc.stop().await;
        out
    });

    println!();
    println!(
        "== commit latency report: {NODES} nodes on loopback, QUIC + sled, flushed on a majority before ack =="
    );
    print!("{}", table(&summaries));
    for s in &summaries {
        println!("{}", s.line());
    }
    if smoke {
        println!("(smoke run without --bench: too few commits to be a measurement)");
        println!();
        return;
    }
    if let Some(s) = summaries.iter().find(|s| s.proposers == 1) {
        let ok = s.p99 <= Duration::from_millis(10);
        println!(
            "target p99 <= 10 ms at 1 proposer: {} ({})",
            if ok { "met" } else { "MISSED" },
            spaced_benches::ms(s.p99)
        );
    }
    if let Some(s) = summaries.iter().find(|s| s.proposers == 64) {
        let ok = s.throughput() >= 10_000.0;
        println!(
            "target >= 10000 commits/s at 64 proposers: {} ({:.0} commits/s)",
            if ok { "met" } else { "MISSED" },
            s.throughput()
        );
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; without it (cargo test --benches) criterion runs each benchmark once.
    let smoke = !args.iter().any(|a| a == "--bench");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let want_report = filters.is_empty() || filters.iter().any(|f| "latency".contains(f.as_str()));
    let want_criterion =
        filters.is_empty() || filters.iter().any(|f| !"latency".contains(f.as_str()));

    let rt = runtime();
    let mut c = Criterion::default().configure_from_args();
    // The report runs first: the criterion groups leave large sled logs behind whose deletion
    // and writeback would disturb it.
    if want_report {
        latency_report(&rt, smoke);
    }
    if want_criterion {
        criterion_groups(&mut c, &rt, &filters);
    }
    c.final_summary();
}
