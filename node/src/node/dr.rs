//! The DR watchdog's hold on this node: its applied fabric, its leadership and proposals
//! through the leader; and the link, bound with this node's certificate trusting only the
//! peer site's CA.

use std::sync::Arc;

use spaced_fabric::{Command, Millis, Outcome};
use spaced_raft::pki::TlsMaterial;
use spaced_replication::link::Link;
use spaced_replication::watchdog::BoxFuture;
use spaced_replication::{DrSection, SiteHandle, Watchdog};

use super::StartError;
use crate::cluster::Cluster;
use crate::ops::config::NodeConfig;

struct Site(Cluster);

impl SiteHandle for Site {
    fn is_leader(&self) -> bool {
        self.0.raft.is_leader()
    }

    fn propose(&self, cmd: Command) -> BoxFuture<Result<Outcome, String>> {
        let cluster = self.0.clone();
        Box::pin(async move {
            match cluster.propose_anywhere(cmd).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(refused)) => Err(refused.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn now_millis(&self) -> Millis {
        crate::now_millis()
    }
}

/// The watchdog of a node whose config has a `[dr]` section, its link bound.
pub(super) fn watchdog(
    cfg: &NodeConfig,
    dr: &DrSection,
    tls: &TlsMaterial,
    cluster: &Cluster,
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
        Arc::new(Site(cluster.clone())),
        link,
        witness_link,
    ))
}
