//! What the node shows on its HTTP endpoint: `/metrics` (refreshed from Raft's metrics every
//! half second) and `/healthz`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use spaced_raft::NodeId;
use tokio::sync::watch;

use spaced_fabric::PlacementKind;

use crate::admin::server::AdminServer;
use crate::cluster::Cluster;
use crate::lb::service::LbService;
use crate::ops::events::Events;
use crate::ops::metrics::{FabricFigures, NodeMetrics};
use crate::placement::agent::Agent;

/// Refreshes the gauges until shutdown: Raft's, and what the fabric and the VIP agent say.
pub(super) async fn metrics_loop(
    inner: Cluster,
    metrics: Arc<NodeMetrics>,
    agent: Arc<Agent>,
    events: Arc<Events>,
    dr: Option<Arc<spaced_replication::Watchdog>>,
    site_gate: Arc<spaced_replication::site_lease::SiteGate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        metrics.upkeep();
        let m = inner.raft.metrics().borrow_watched().clone();
        if let Some(dr) = &dr {
            let status = dr.status();
            let hold = (status.role == spaced_fabric::SiteRole::Active
                && site_gate.has_witnesses())
            .then(|| site_gate.remaining(status.epoch))
            .flatten();
            metrics.dr(
                &status,
                m.state == ServerState::Leader,
                hold,
                crate::now_millis(),
            );
        }
        let names: BTreeMap<NodeId, String> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.name.clone()))
            .collect();
        let contacts = inner
            .contacts()
            .into_iter()
            .filter(|(id, _)| *id != inner.id)
            .map(|(id, t)| {
                let name = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
                (name, t.map(|d| d.as_secs_f64()))
            })
            .collect();
        metrics.update(
            m.current_term,
            m.current_leader,
            m.last_applied.map(|l| l.index()),
            m.state == ServerState::Leader,
            contacts,
        );
        metrics.update_raft(
            m.current_leader,
            m.last_log_index,
            m.last_applied.map(|l| l.index()),
        );
        let (owners, leader_name) = inner.view.read(|f| {
            let name = |id: Option<u64>| id.and_then(|o| f.nodes.get(&o).map(|n| n.name.clone()));
            let owners: BTreeMap<String, Option<String>> = f
                .placements
                .iter()
                .map(|(n, p)| (n.clone(), name(p.owner)))
                .collect();
            (owners, name(m.current_leader))
        });
        let revoked = inner.view.read(|f| f.revoked.len());
        events.observe(
            crate::now_millis(),
            m.current_leader,
            leader_name,
            owners,
            revoked,
        );
        let figures = inner.view.read(|f| FabricFigures {
            vips: f
                .placements
                .iter()
                .filter(|(_, p)| matches!(p.kind, PlacementKind::Vip { .. }))
                .map(|(name, p)| (name.clone(), p.owner, p.epoch))
                .collect(),
            devices: f.devices.values().fold(BTreeMap::new(), |mut acc, d| {
                let owner = d
                    .owner
                    .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone()))
                    .unwrap_or_else(|| "none".into());
                *acc.entry((owner, d.status.to_string())).or_insert(0) += 1;
                acc
            }),
            revoked: f.revoked.len(),
        });
        let now = std::time::Instant::now();
        let held: Vec<(String, Duration)> = agent
            .active_names()
            .into_iter()
            .map(|n| {
                let left = agent.lease_remaining(&n, now);
                (n, left)
            })
            .collect();
        metrics.update_fabric(inner.id, figures, &held);
        if let Some((running, starts)) = agent.guard_state() {
            metrics.guard(running, starts);
        }
    }
}

/// Adapts the node to the HTTP server's view.
pub(super) struct HttpView {
    cluster: Cluster,
    metrics: Arc<NodeMetrics>,
    lb: Option<Arc<LbService>>,
    admin: Arc<AdminServer>,
    events: Arc<Events>,
}

impl HttpView {
    pub(super) fn new(
        cluster: Cluster,
        metrics: Arc<NodeMetrics>,
        lb: Option<Arc<LbService>>,
        admin: Arc<AdminServer>,
        events: Arc<Events>,
    ) -> Self {
        HttpView {
            cluster,
            metrics,
            lb,
            admin,
            events,
        }
    }
}

impl crate::ops::http::HttpState for HttpView {
    fn metrics_text(&self) -> String {
        let mut text = self.metrics.render();
        if let Some(lb) = &self.lb {
            lb.render(&mut text);
        }
        text
    }

    fn status_json(&self) -> Option<String> {
        let mut v = crate::ctl::render::status_json(&self.admin.status());
        let (singletons, devices) = self.cluster.view.read(|f| {
            let name = |id: Option<u64>| id.and_then(|o| f.nodes.get(&o).map(|n| n.name.clone()));
            let singletons: Vec<serde_json::Value> = f
                .placements
                .iter()
                .filter(|(_, p)| matches!(p.kind, PlacementKind::Singleton { .. }))
                .map(|(n, p)| {
                    serde_json::json!({"name": n, "owner": p.owner,
                        "owner_name": name(p.owner), "epoch": p.epoch})
                })
                .collect();
            let mut devices: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            for d in f.devices.values() {
                let owner = name(d.owner).unwrap_or_else(|| "none".into());
                *devices
                    .entry(owner)
                    .or_default()
                    .entry(d.status.to_string())
                    .or_default() += 1;
            }
            (singletons, devices)
        });
        let lb: Vec<serde_json::Value> = self
            .lb
            .as_ref()
            .map(|lb| lb.report())
            .unwrap_or_default()
            .iter()
            .map(|l| {
                serde_json::json!({"listen": l.listen, "accepting": l.accepting,
                    "active": l.active, "backends": l.backends.len(),
                    "backends_up": l.backends.iter().filter(|b| b.up).count()})
            })
            .collect();
        v["singletons"] = serde_json::Value::Array(singletons);
        v["devices_by_node"] = serde_json::json!(devices);
        v["lb"] = serde_json::Value::Array(lb);
        v["version"] = serde_json::json!(crate::VERSION);
        Some(v.to_string())
    }

    fn events_json(&self) -> Option<String> {
        serde_json::to_string(&self.events.list()).ok()
    }

    fn health(&self) -> (bool, String) {
        let m = self.cluster.raft.metrics();
        let m = m.borrow_watched();
        if let Err(e) = &m.running_state {
            return (false, format!("raft stopped: {e}"));
        }
        match m.current_leader {
            Some(l) => (
                true,
                format!("{:?}, leader {l}, term {}", m.state, m.current_term),
            ),
            None => (
                false,
                format!("{:?}, no leader known, term {}", m.state, m.current_term),
            ),
        }
    }
}
