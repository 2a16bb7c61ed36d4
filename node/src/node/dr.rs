//! The DR watchdog's hold on this node: its applied fabric, its leadership and proposals
//! through the leader; the link, bound with this node's certificate trusting only the peer
//! site's CA; and the site lease every node learns from its leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spaced_fabric::{Command, Millis, Outcome};
use spaced_raft::network::{RaftReply, RaftRpc};
use spaced_raft::pki::TlsMaterial;
use spaced_replication::link::Link;
use spaced_replication::site_lease::SiteGate;
use spaced_replication::watchdog::{BoxFuture, ProposeError};
use spaced_replication::{DrSection, SiteHandle, Watchdog};

use super::StartError;
use crate::cluster::Cluster;
use crate::ops::config::NodeConfig;

/// How often a node asks its leader how long the site holds the active role. Each answer
/// counts from its question, so a slow or lost one only shortens what this node vouches for.
const SITE_HOLD_EVERY: Duration = Duration::from_millis(100);

struct Site(Cluster, Duration);

impl SiteHandle for Site {
    fn is_leader(&self) -> bool {
        self.0.raft.is_leader()
    }

    fn propose(&self, cmd: Command) -> BoxFuture<Result<Outcome, ProposeError>> {
        let cluster = self.0.clone();
        Box::pin(async move {
            match cluster.propose_anywhere(cmd).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(refused)) | Err(crate::cluster::ProposeError::Refused(refused)) => {
                    Err(ProposeError::Refused(refused))
                }
                Err(crate::cluster::ProposeError::NoLeader) => Err(ProposeError::NoLeader),
                Err(e) => Err(ProposeError::NotCommitted(e.to_string())),
            }
        })
    }

    fn now_millis(&self) -> Millis {
        crate::now_millis()
    }

    fn workload_lease(&self) -> Duration {
        self.1
    }
}

/// The watchdog of a node whose config has a `[dr]` section, its link bound.
pub(super) fn watchdog(
    cfg: &NodeConfig,
    dr: &DrSection,
    tls: &TlsMaterial,
    cluster: &Cluster,
    workload_lease: Duration,
    backups: Arc<spaced_replication::backup::BackupStore>,
) -> Result<Arc<Watchdog>, StartError> {
    let material = tls
        .trusting(&dr.peer_ca)
        .map_err(|e| StartError::input(cfg, "dr.peer_ca", e.to_string()))?;
    let link =
        Link::bind(dr.listen, &material).map_err(|e| StartError::input(cfg, "dr.listen", e))?;
    // Witnesses carry a certificate of either site's CA.
    let witness_link = if dr.witnesses.is_empty() {
        None
    } else {
        let both = tls
            .trusting_all(&[cfg.tls.ca.as_path(), dr.peer_ca.as_path()])
            .map_err(|e| StartError::input(cfg, "dr.peer_ca", e.to_string()))?;
        let any_port = std::net::SocketAddr::new(dr.listen.ip(), 0);
        Some(Link::bind(any_port, &both).map_err(|e| StartError::input(cfg, "dr.witnesses", e))?)
    };
    Ok(Watchdog::new(
        dr.clone(),
        cluster.view.clone(),
        Arc::new(Site(cluster.clone(), workload_lease)),
        link,
        witness_link,
        backups,
    ))
}

/// Asks the leader (itself when it leads) every [`SITE_HOLD_EVERY`] how long the site holds the
/// active role at the witnesses, and tells `gate`, which this node's placement voter consults.
pub(super) async fn follow_site_hold(
    cluster: Cluster,
    watchdog: Arc<Watchdog>,
    gate: Arc<SiteGate>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let asked_at = Instant::now();
        let answer = if cluster.raft.is_leader() {
            watchdog.site_hold()
        } else {
            ask_leader(&cluster).await
        };
        if let Some((epoch, left)) = answer {
            gate.learned(epoch, asked_at, left);
        }
        tokio::select! {
            _ = tokio::time::sleep(SITE_HOLD_EVERY.saturating_sub(asked_at.elapsed())) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The leader's answer to `SiteHold`, if it gives one in time.
async fn ask_leader(cluster: &Cluster) -> Option<(u64, Duration)> {
    let (Some(leader), _) = cluster.leader() else {
        return None;
    };
    let member = cluster.member(leader)?;
    match cluster
        .call(leader, &member, RaftRpc::SiteHold, SITE_HOLD_EVERY * 5)
        .await
    {
        Ok(RaftReply::SiteHold(Some((epoch, ms)))) => Some((epoch, Duration::from_millis(ms))),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(leader, error = %e, "DR: the leader did not say how long the site holds the active role");
            None
        }
    }
}
