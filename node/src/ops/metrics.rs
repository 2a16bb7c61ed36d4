//! Per-node Prometheus metrics: Raft term, leader, leader changes, last applied and apply lag,
//! commit latency, peers' last contact; per VIP its owner, epoch, whether this node holds it
//! and owner changes; devices by owner and state; revoked certificates; the build and the
//! node certificate's expiry; the disaster-recovery role, epoch, link, lag and witnesses.
//!
//! Each node owns its recorder (no process-global one), so several nodes in one process — as in
//! the in-process tests — keep separate figures.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const COMMIT_LATENCY: &str = "spaced_commit_latency_seconds";
const RUNTIME_LATENESS: &str = "spaced_runtime_lateness_seconds";

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
    /// How late the runtime probe ran ([`crate::ops::stall`]).
    runtime_lateness: Histogram,
    /// Seconds since the leader last heard from each peer, by peer name.
    peers: Mutex<BTreeMap<String, Gauge>>,
    /// Entries appended here but not applied yet.
    apply_lag: Gauge,
    /// Times this node saw the leader change (to another node, or to none).
    leader_changes: metrics::Counter,
    /// The leader last seen, to count changes.
    last_leader: Mutex<Option<Option<u64>>>,
    /// Per VIP: owner id, epoch, held here, owner changes; and the owner last seen.
    vips: Mutex<BTreeMap<String, VipGauges>>,
    /// Devices by (owner name, status).
    devices: Mutex<BTreeMap<(String, String), Gauge>>,
    /// Revoked certificates in the fabric.
    revoked: Gauge,
    /// Seconds until this node's certificate expires.
    cert_expiry: Gauge,
    /// 1 while the VIP fence guard runs, 0 when it has died and not been restarted yet.
    guard_up: Gauge,
    /// VIP fence guards started (a rise past 1 is a restart after a guard died).
    guard_starts: Gauge,
    /// Disaster recovery, on a node with `[dr]`: registered at the first report.
    dr: Mutex<Option<DrGauges>>,
}

/// The DR gauges of one site.
struct DrGauges {
    roles: Vec<(spaced_fabric::SiteRole, Gauge)>,
    epoch: Gauge,
    reachable: Gauge,
    lag_entries: Gauge,
    lag_seconds: Gauge,
    witnesses: Gauge,
    site_hold: Gauge,
    backup_age: Gauge,
}

/// One VIP's gauges.
struct VipGauges {
    owner: Gauge,
    epoch: Gauge,
    held: Gauge,
    lease: Gauge,
    changes: metrics::Counter,
    last_owner: Option<u64>,
}

/// What the fabric says, for [`NodeMetrics::update_fabric`]: per VIP (name, owner, epoch),
/// device counts by (owner name, status), revoked certificates.
pub struct FabricFigures {
    /// `(name, owner, epoch)` of each VIP.
    pub vips: Vec<(String, Option<u64>, u64)>,
    /// Devices by (owner name or `none`, status).
    pub devices: BTreeMap<(String, String), u64>,
    /// Revoked certificates.
    pub revoked: usize,
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
        let seconds_histogram = |name: &'static str, help: &'static str| {
            recorder.describe_histogram(name.into(), Some(metrics::Unit::Seconds), help.into());
            recorder.register_histogram(&Key::from_static_name(name), &meta())
        };
        let commit_latency = seconds_histogram(
            COMMIT_LATENCY,
            "Time from proposing a command on this node until it was committed and applied.",
        );
        let runtime_lateness = seconds_histogram(
            RUNTIME_LATENESS,
            "How late a task asking to wake every 20 ms ran: blocking work on the async runtime, or CPU starvation.",
        );
        recorder.describe_gauge(
            "spaced_peer_last_contact_seconds".into(),
            Some(metrics::Unit::Seconds),
            "Seconds since the leader last heard from each peer (leader only).".into(),
        );
        let apply_lag = gauge(
            "spaced_raft_apply_lag_entries",
            "Log entries appended on this node but not applied yet.",
        );
        recorder.describe_counter(
            "spaced_leader_changes_total".into(),
            None,
            "Times this node saw the leader change.".into(),
        );
        let leader_changes = recorder.register_counter(
            &Key::from_static_name("spaced_leader_changes_total"),
            &meta(),
        );
        for (name, help) in [
            ("spaced_vip_owner", "Node id owning each VIP; 0 when none."),
            ("spaced_vip_epoch", "Fencing epoch of each VIP."),
            (
                "spaced_vip_held",
                "1 if this node holds the VIP's lease and address.",
            ),
            (
                "spaced_vip_lease_remaining_seconds",
                "Time left on this node's lease of the VIP (0 when not held here).",
            ),
            ("spaced_devices", "Devices by owner node and state."),
        ] {
            recorder.describe_gauge(name.into(), None, help.into());
        }
        recorder.describe_counter(
            "spaced_vip_owner_changes_total".into(),
            None,
            "Owner changes of each VIP this node has seen applied.".into(),
        );
        let revoked = gauge(
            "spaced_revoked_certificates",
            "Certificates revoked in the fabric.",
        );
        let cert_expiry = gauge(
            "spaced_cert_expiry_seconds",
            "Seconds until this node's certificate expires.",
        );
        let guard_up = gauge(
            "spaced_fence_guard_up",
            "1 while the VIP fence guard runs; 0 when it died (it is restarted at the next hold).",
        );
        let guard_starts = gauge(
            "spaced_fence_guard_starts",
            "VIP fence guards started by this daemon; more than 1 means one died.",
        );
        recorder.describe_gauge(
            "spaced_build_info".into(),
            None,
            "This build: version, git commit and data format as labels; always 1.".into(),
        );
        recorder
            .register_gauge(
                &Key::from_parts(
                    "spaced_build_info",
                    vec![
                        Label::new("version", env!("CARGO_PKG_VERSION")),
                        Label::new("commit", env!("SPACED_GIT_COMMIT")),
                        Label::new("built", env!("SPACED_BUILD_DATE")),
                        Label::new("data_format", spaced_raft::store::DATA_FORMAT.to_string()),
                    ],
                ),
                &meta(),
            )
            .set(1.0);
        for (name, help) in [
            (
                "spaced_dr_role",
                "1 for this site's disaster-recovery role, 0 for the others.",
            ),
            ("spaced_dr_site_epoch", "This site's DR epoch."),
            (
                "spaced_dr_peer_reachable",
                "1 if the peer site answered within its heartbeat retries (the leader's view; NaN on other nodes).",
            ),
            (
                "spaced_dr_lag_entries",
                "On a standby's leader: peer log entries not mirrored yet; NaN when unknown (the link is down, or not the leader).",
            ),
            (
                "spaced_dr_lag_seconds",
                "On a standby's leader: how long it has been behind its peer; NaN when unknown.",
            ),
            (
                "spaced_dr_witnesses_granting",
                "Witnesses that granted this site's last hold or claim of the active role; NaN when not asked.",
            ),
            (
                "spaced_dr_site_hold_seconds",
                "On an active site with witnesses, every node: how long it may still confirm the site's VIP and singleton leases (its leader's last witness round, learned by round trip); NaN elsewhere.",
            ),
            (
                "spaced_dr_backup_age_seconds",
                "Age of the newest [dr.backup] backup this node has (taken on an active site, received on a standby); NaN when none.",
            ),
        ] {
            recorder.describe_gauge(name.into(), None, help.into());
        }
        NodeMetrics {
            dr: Mutex::default(),
            apply_lag,
            leader_changes,
            last_leader: Mutex::default(),
            vips: Mutex::default(),
            devices: Mutex::default(),
            revoked,
            cert_expiry,
            guard_up,
            guard_starts,
            recorder: std::sync::Arc::new(recorder),
            handle,
            term,
            leader,
            is_leader,
            last_applied,
            commit_latency,
            runtime_lateness,
            peers: Mutex::default(),
        }
    }

    /// The node's registry, for components that record through the `metrics` macros.
    pub fn recorder(&self) -> std::sync::Arc<dyn Recorder + Send + Sync> {
        self.recorder.clone()
    }

    /// The commit-latency histogram, for the `Cluster` handle that times its proposals.
    pub fn commit_latency_histogram(&self) -> Histogram {
        self.commit_latency.clone()
    }

    /// Moves the histogram samples recorded since the last call into their buckets. The
    /// recorder keeps each sample until a scrape or this drains it, so a node nobody scrapes
    /// grew by about 16 bytes a commit and a probe tick (`tests/metrics_memory.rs`); the
    /// metrics loop calls this every half second.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Records how late the runtime probe ran.
    pub fn runtime_lateness(&self, late: Duration) {
        self.runtime_lateness.record(late.as_secs_f64());
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

    /// Counts a leader change if `leader` differs from the one seen last, and records the
    /// apply lag (`last_log` appended, `last_applied` applied).
    pub fn update_raft(
        &self,
        leader: Option<u64>,
        last_log: Option<u64>,
        last_applied: Option<u64>,
    ) {
        let mut last = crate::lock(&self.last_leader);
        if last.is_some_and(|l| l != leader) {
            self.leader_changes.increment(1);
        }
        *last = Some(leader);
        let lag = last_log
            .unwrap_or(0)
            .saturating_sub(last_applied.unwrap_or(0));
        self.apply_lag.set(lag as f64);
    }

    /// Records what the applied fabric says; `me` is this node's id, `held` the VIPs it holds
    /// with the time left on each lease.
    pub fn update_fabric(&self, me: u64, figures: FabricFigures, held: &[(String, Duration)]) {
        let mut vips = crate::lock(&self.vips);
        let labelled = |name: &'static str, label: &str, value: &str| {
            Key::from_parts(name, vec![Label::new(label.to_string(), value.to_string())])
        };
        let present: std::collections::BTreeSet<&str> =
            figures.vips.iter().map(|(n, _, _)| n.as_str()).collect();
        for (name, owner, epoch) in &figures.vips {
            let g = vips.entry(name.clone()).or_insert_with(|| VipGauges {
                owner: self
                    .recorder
                    .register_gauge(&labelled("spaced_vip_owner", "vip", name), &meta()),
                epoch: self
                    .recorder
                    .register_gauge(&labelled("spaced_vip_epoch", "vip", name), &meta()),
                held: self
                    .recorder
                    .register_gauge(&labelled("spaced_vip_held", "vip", name), &meta()),
                lease: self.recorder.register_gauge(
                    &labelled("spaced_vip_lease_remaining_seconds", "vip", name),
                    &meta(),
                ),
                changes: self.recorder.register_counter(
                    &labelled("spaced_vip_owner_changes_total", "vip", name),
                    &meta(),
                ),
                last_owner: *owner,
            });
            if g.last_owner != *owner {
                g.changes.increment(1);
                g.last_owner = *owner;
            }
            g.owner.set(owner.unwrap_or(0) as f64);
            g.epoch.set(*epoch as f64);
            let lease = held
                .iter()
                .find(|(h, _)| h == name)
                .filter(|_| *owner == Some(me))
                .map(|(_, left)| *left);
            g.held.set(if lease.is_some() { 1.0 } else { 0.0 });
            g.lease.set(lease.map(|l| l.as_secs_f64()).unwrap_or(0.0));
        }
        // A VIP removed since: no owner, not held.
        for (name, g) in vips.iter_mut() {
            if !present.contains(name.as_str()) {
                g.owner.set(0.0);
                g.held.set(0.0);
                g.lease.set(0.0);
            }
        }
        let mut devices = crate::lock(&self.devices);
        for g in devices.values() {
            g.set(0.0);
        }
        for ((owner, status), n) in figures.devices {
            let g = devices
                .entry((owner.clone(), status.clone()))
                .or_insert_with(|| {
                    let key = Key::from_parts(
                        "spaced_devices",
                        vec![Label::new("owner", owner), Label::new("status", status)],
                    );
                    self.recorder.register_gauge(&key, &meta())
                });
            g.set(n as f64);
        }
        self.revoked.set(figures.revoked as f64);
    }

    /// Records the VIP fence guard's state: running (`None`: not started yet, shown as up: there
    /// is nothing to fence) and how many were started.
    pub fn guard(&self, running: Option<bool>, starts: u64) {
        self.guard_up
            .set(if running.unwrap_or(true) { 1.0 } else { 0.0 });
        self.guard_starts.set(starts as f64);
    }

    /// Records the DR state: the site's role and epoch (from the fabric, on every node), and
    /// the link, lag and witnesses as the leader sees them (`leader`: this node leads; on
    /// other nodes those read NaN, unknown here, rather than a misleading 0).
    /// `site_hold`: how long this node may still confirm its site's workload leases (an
    /// active site with witnesses; `None` elsewhere). `now_ms`: the wall clock, for the
    /// backup's age.
    pub fn dr(
        &self,
        s: &spaced_replication::DrStatus,
        leader: bool,
        site_hold: Option<Duration>,
        now_ms: u64,
    ) {
        use spaced_fabric::SiteRole;
        let mut dr = self.dr.lock().unwrap_or_else(|p| p.into_inner());
        let g = dr.get_or_insert_with(|| {
            let labels = |extra: Vec<Label>| {
                let mut l = vec![
                    Label::new("site", s.site.clone()),
                    Label::new("peer_site", s.peer_site.clone()),
                ];
                l.extend(extra);
                l
            };
            let gauge = |name: &'static str, extra: Vec<Label>| {
                self.recorder
                    .register_gauge(&Key::from_parts(name, labels(extra)), &meta())
            };
            DrGauges {
                roles: [SiteRole::Active, SiteRole::Standby, SiteRole::Standalone]
                    .into_iter()
                    .map(|r| {
                        (
                            r,
                            gauge("spaced_dr_role", vec![Label::new("role", r.to_string())]),
                        )
                    })
                    .collect(),
                epoch: gauge("spaced_dr_site_epoch", vec![]),
                reachable: gauge("spaced_dr_peer_reachable", vec![]),
                lag_entries: gauge("spaced_dr_lag_entries", vec![]),
                lag_seconds: gauge("spaced_dr_lag_seconds", vec![]),
                witnesses: gauge("spaced_dr_witnesses_granting", vec![]),
                site_hold: gauge("spaced_dr_site_hold_seconds", vec![]),
                backup_age: gauge("spaced_dr_backup_age_seconds", vec![]),
            }
        });
        for (role, gauge) in &g.roles {
            gauge.set(if *role == s.role { 1.0 } else { 0.0 });
        }
        g.epoch.set(s.epoch as f64);
        let known = |v: Option<f64>| {
            if leader {
                v.unwrap_or(f64::NAN)
            } else {
                f64::NAN
            }
        };
        g.reachable
            .set(known(Some(if s.peer_reachable { 1.0 } else { 0.0 })));
        g.lag_entries.set(known(s.lag_entries.map(|e| e as f64)));
        g.lag_seconds
            .set(known(s.lag_ms.map(|ms| ms as f64 / 1000.0)));
        g.witnesses
            .set(known(s.witnesses_granting.map(|(n, _)| n as f64)));
        g.site_hold
            .set(site_hold.map_or(f64::NAN, |d| d.as_secs_f64()));
        g.backup_age
            .set(s.last_backup.map_or(f64::NAN, |(at, _, _)| {
                now_ms.saturating_sub(at) as f64 / 1000.0
            }));
    }

    /// Records when this node's certificate expires (Unix seconds), against `now` (Unix seconds).
    pub fn cert_expires(&self, not_after: i64, now: i64) {
        self.cert_expiry.set((not_after - now) as f64);
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
        m.commit_latency_histogram().record(0.003);
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

    #[test]
    fn renders_vips_devices_leader_changes_and_build() {
        let m = NodeMetrics::new();
        let figures = |owner, epoch| FabricFigures {
            vips: vec![("cluster".into(), owner, epoch)],
            devices: [(("n1".to_string(), "up".to_string()), 7)].into(),
            revoked: 2,
        };
        let held = vec![("cluster".to_string(), Duration::from_millis(250))];
        m.update_fabric(1, figures(Some(1), 12), &held);
        m.update_fabric(1, figures(Some(2), 13), &[]);
        m.update_raft(Some(1), Some(10), Some(10));
        m.update_raft(Some(1), Some(12), Some(10));
        m.update_raft(None, Some(12), Some(12));
        m.update_raft(Some(3), Some(12), Some(12));
        m.cert_expires(1_000_500, 1_000_000);
        m.guard(Some(false), 2);
        let text = m.render();
        for line in [
            "spaced_vip_owner{vip=\"cluster\"} 2",
            "spaced_vip_epoch{vip=\"cluster\"} 13",
            "spaced_vip_held{vip=\"cluster\"} 0",
            "spaced_vip_owner_changes_total{vip=\"cluster\"} 1",
            "spaced_devices{owner=\"n1\",status=\"up\"} 7",
            "spaced_revoked_certificates 2",
            "spaced_leader_changes_total 2",
            "spaced_raft_apply_lag_entries 0",
            "spaced_cert_expiry_seconds 500",
            "spaced_fence_guard_up 0",
            "spaced_fence_guard_starts 2",
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        let format = format!("data_format=\"{}\"", spaced_raft::store::DATA_FORMAT);
        let mut status = spaced_replication::DrStatus {
            site: "west".into(),
            role: spaced_fabric::SiteRole::Standby,
            epoch: 2,
            since: 0,
            peer_site: "east".into(),
            peer_reachable: true,
            last_contact_ms: Some(10),
            peer_role: None,
            peer_epoch: None,
            peer_index: Some(10),
            mirrored_index: Some(7),
            lag_entries: Some(3),
            lag_ms: Some(250),
            failures_in_row: 0,
            last_error: None,
            not_mirrored: vec![],
            automatic_failover: false,
            automatic_failover_off_until: None,
            witnesses_granting: None,
            witness_note: None,
            script_note: None,
            last_backup: None,
            backup_note: None,
        };
        m.dr(&status, true, None, 0);
        let text = m.render();
        for line in [
            "spaced_dr_role{site=\"west\",peer_site=\"east\",role=\"standby\"} 1",
            "spaced_dr_role{site=\"west\",peer_site=\"east\",role=\"active\"} 0",
            "spaced_dr_site_epoch{site=\"west\",peer_site=\"east\"} 2",
            "spaced_dr_lag_entries{site=\"west\",peer_site=\"east\"} 3",
            "spaced_dr_lag_seconds{site=\"west\",peer_site=\"east\"} 0.25",
            "spaced_dr_witnesses_granting{site=\"west\",peer_site=\"east\"} NaN",
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        // The link down: the lag is unknown, not 0.
        status.lag_entries = None;
        status.lag_ms = None;
        status.last_backup = Some((10_000, 1, 5));
        m.dr(&status, true, Some(Duration::from_millis(4_500)), 70_000);
        let text = m.render();
        for line in [
            "spaced_dr_site_hold_seconds{site=\"west\",peer_site=\"east\"} 4.5",
            "spaced_dr_backup_age_seconds{site=\"west\",peer_site=\"east\"} 60",
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        assert!(
            m.render()
                .contains("spaced_dr_lag_seconds{site=\"west\",peer_site=\"east\"} NaN")
        );
        assert!(text.contains(&format), "no {format} in:\n{text}");
        // While held here: held 1 and the lease left.
        m.update_fabric(1, figures(Some(1), 14), &held);
        let text = m.render();
        assert!(
            text.contains("spaced_vip_held{vip=\"cluster\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("spaced_vip_lease_remaining_seconds{vip=\"cluster\"} 0.25"),
            "{text}"
        );
    }

    /// The Grafana dashboard and the Prometheus alert rules in `contrib/` name only metrics a
    /// node exports (as rendered once every family has a value).
    #[test]
    fn the_dashboard_and_alerts_use_exported_metrics() {
        let m = NodeMetrics::new();
        m.update(3, Some(1), Some(9), true, vec![("n2".into(), Some(0.1))]);
        m.update_raft(Some(1), Some(9), Some(9));
        m.commit_latency_histogram().record(0.002);
        m.cert_expires(2_000, 1_000);
        m.guard(Some(true), 1);
        m.dr(
            &spaced_replication::DrStatus {
                site: "east".into(),
                role: spaced_fabric::SiteRole::Active,
                epoch: 1,
                since: 0,
                peer_site: "west".into(),
                peer_reachable: true,
                last_contact_ms: None,
                peer_role: None,
                peer_epoch: None,
                peer_index: None,
                mirrored_index: None,
                lag_entries: None,
                lag_ms: None,
                failures_in_row: 0,
                last_error: None,
                not_mirrored: vec![],
                automatic_failover: true,
                automatic_failover_off_until: None,
                witnesses_granting: Some((1, 1)),
                witness_note: None,
                script_note: None,
                last_backup: None,
                backup_note: None,
            },
            true,
            None,
            0,
        );
        m.update_fabric(
            1,
            FabricFigures {
                vips: vec![("cluster".into(), Some(1), 4)],
                devices: [(("n1".to_string(), "down".to_string()), 1)].into(),
                revoked: 0,
            },
            &[("cluster".into(), Duration::from_millis(100))],
        );
        let exported: std::collections::BTreeSet<String> = m
            .render()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();
        let dashboard = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../contrib/grafana-dashboard.json"
        ));
        let alerts = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../contrib/prometheus-alerts.yml"
        ));
        let parsed: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard JSON");
        assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
        let mut used = std::collections::BTreeSet::new();
        for text in [dashboard, alerts] {
            let mut rest = text;
            while let Some(at) = rest.find("spaced_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
        assert!(used.len() >= 12, "{used:?}");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "contrib/ names metrics spaced does not export: {unknown:?}\nexported: {exported:?}"
        );
    }
}
