//! Per-node Prometheus metrics: Raft term, leader, last applied, commit latency, peers' last contact.
//!
//! Each node owns its recorder (no process-global one), so several nodes in one process — as in
//! the in-process tests — keep separate figures.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const COMMIT_LATENCY: &str = "spaced_commit_latency_seconds";

/// Commit-latency histogram buckets (seconds): sub-millisecond to one second.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

fn meta() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

/// The node's metric handles and its renderer.
pub struct NodeMetrics {
    /// Owns the registry the handles write to; shared with the service supervisor.
    recorder: std::sync::Arc<PrometheusRecorder>,
    /// Renders the registry as Prometheus text.
    handle: PrometheusHandle,
    /// Current Raft term.
    term: Gauge,
    /// Current leader id (0 when none is known).
    leader: Gauge,
    /// 1 on the leader, 0 elsewhere.
    is_leader: Gauge,
    /// Last applied log index.
    last_applied: Gauge,
    /// Time from proposal to applied result, for proposals made on this node.
    commit_latency: Histogram,
    /// Seconds since the leader last heard from each peer, by peer name.
    peers: Mutex<BTreeMap<String, Gauge>>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    /// Creates a fresh registry with spaced's metrics.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        // The buckets are constant and valid; fall back to a summary rather than fail if not.
        let builder = match builder.set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let gauge = |name: &'static str, help: &'static str| {
            recorder.describe_gauge(name.into(), None, help.into());
            recorder.register_gauge(&Key::from_static_name(name), &meta())
        };
        let term = gauge("spaced_raft_term", "Current Raft term.");
        let leader = gauge(
            "spaced_raft_leader_id",
            "Current leader's node id; 0 when none is known.",
        );
        let is_leader = gauge("spaced_raft_is_leader", "1 if this node is the leader.");
        let last_applied = gauge(
            "spaced_raft_last_applied",
            "Index of the last applied log entry.",
        );
        recorder.describe_histogram(
            COMMIT_LATENCY.into(),
            Some(metrics::Unit::Seconds),
            "Time from proposing a command on this node until it was committed and applied.".into(),
        );
        let commit_latency =
            recorder.register_histogram(&Key::from_static_name(COMMIT_LATENCY), &meta());
        recorder.describe_gauge(
            "spaced_peer_last_contact_seconds".into(),
            Some(metrics::Unit::Seconds),
            "Seconds since the leader last heard from each peer (leader only).".into(),
        );
        NodeMetrics {
            recorder: std::sync::Arc::new(recorder),
            handle,
            term,
            leader,
            is_leader,
            last_applied,
            commit_latency,
            peers: Mutex::default(),
        }
    }

    /// The node's registry, for components that record through the `metrics` macros.
    pub fn recorder(&self) -> std::sync::Arc<dyn Recorder + Send + Sync> {
        self.recorder.clone()
    }

    /// Records one commit latency.
    pub fn commit_latency(&self, d: Duration) {
        self.commit_latency.record(d.as_secs_f64());
    }

    /// Refreshes the Raft gauges from a metrics snapshot.
    pub fn update(
        &self,
        term: u64,
        leader: Option<u64>,
        last_applied: Option<u64>,
        is_leader: bool,
        contacts: Vec<(String, Option<f64>)>,
    ) {
        self.term.set(term as f64);
        self.leader.set(leader.unwrap_or(0) as f64);
        self.is_leader.set(if is_leader { 1.0 } else { 0.0 });
        self.last_applied
            .set(last_applied.map(|i| i as f64).unwrap_or(-1.0));
        let mut peers = crate::lock(&self.peers);
        for (name, secs) in contacts {
            let g = peers.entry(name.clone()).or_insert_with(|| {
                let key = Key::from_parts(
                    "spaced_peer_last_contact_seconds",
                    vec![Label::new("peer", name)],
                );
                self.recorder.register_gauge(&key, &meta())
            });
            // Never heard from: report +Inf rather than a misleading small number.
            g.set(secs.unwrap_or(f64::INFINITY));
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_gauges_and_histogram() {
        let m = NodeMetrics::new();
        m.update(7, Some(2), Some(41), false, vec![("n3".into(), Some(0.25))]);
        m.commit_latency(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("spaced_raft_term 7"), "{text}");
        assert!(text.contains("spaced_raft_leader_id 2"), "{text}");
        assert!(text.contains("spaced_raft_last_applied 41"), "{text}");
        assert!(
            text.contains("spaced_peer_last_contact_seconds{peer=\"n3\"} 0.25"),
            "{text}"
        );
        assert!(
            text.contains("spaced_commit_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
    }
}
