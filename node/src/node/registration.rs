//! The node's own record in the fabric: the bootstrap node registers itself, and every node
//! records the management IP of its config and the version of its build.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use spaced_fabric::{Command, NodeRecord};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::now_millis;

/// Registers the bootstrap node in the fabric once it leads its one-node cluster.
pub(super) async fn register_self(inner: Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if inner.view.read(|f| f.nodes.contains_key(&inner.id)) {
            return;
        }
        if inner.raft.is_leader() {
            let cmd = Command::RegisterNode {
                id: inner.id,
                name: inner.name.clone(),
                raft_addr: inner.advertise.to_string(),
                mgmt_ip: None,
                roles: inner.roles.clone(),
                at: now_millis(),
            };
            match inner.propose(cmd).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "registering the bootstrap node failed; retrying")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::error!(
        node = inner.id,
        "bootstrap node could not register itself in the fabric"
    );
}

/// Records this node's management IP from its config in the fabric, once it is registered
/// there (at start, or when it joins later), if the fabric has another (or none); `None` in
/// the config clears it. Stops when the fabric agrees, or refuses (logged), or at shutdown.
pub(super) async fn record_mgmt_ip(
    inner: Cluster,
    want: Option<IpAddr>,
    shutdown: watch::Receiver<bool>,
) {
    let id = inner.id;
    record_own(
        inner,
        "management IP",
        move |n| n.mgmt_ip == want,
        move || Command::SetMgmtIp { id, mgmt_ip: want },
        shutdown,
    )
    .await
}

/// Records this build's version ([`crate::VERSION`] and the data format) in the fabric, as
/// [`record_mgmt_ip`] does the management IP, so `spacectl status` shows every node's.
pub(super) async fn record_version(inner: Cluster, shutdown: watch::Receiver<bool>) {
    let id = inner.id;
    let version = format!(
        "{}; data format {}",
        crate::VERSION,
        spaced_raft::store::DATA_FORMAT
    );
    let want = version.clone();
    record_own(
        inner,
        "version",
        move |n| n.version == want,
        move || Command::SetVersion {
            id,
            version: version.clone(),
        },
        shutdown,
    )
    .await
}

/// Once every node has recorded this build's data format (the last node of a rolling upgrade
/// restarted on it), peers that speak only the previous format's protocol are refused when
/// dialed, as the accept loop refuses them (`peer::every_node_upgraded`): the log may from then
/// on hold commands they cannot decode. Logged the first time.
pub(super) async fn follow_format(inner: Cluster, mut shutdown: watch::Receiver<bool>) {
    let mut changes = inner.view.changes();
    let mut refused = false;
    let mut said = false;
    loop {
        changes.borrow_and_update();
        let upgraded = inner.view.read(super::peer::every_node_upgraded);
        if upgraded != refused {
            inner.network.refuse_previous(upgraded);
            // Once: a node joining has recorded no version for a moment, which is no news.
            if upgraded && !std::mem::replace(&mut said, true) {
                tracing::info!(
                    format = spaced_raft::store::DATA_FORMAT,
                    "every node runs data format {}: nodes of format {} are refused from now on",
                    spaced_raft::store::DATA_FORMAT,
                    spaced_raft::store::PREVIOUS_FORMAT
                );
            }
            refused = upgraded;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Proposes `cmd()` until this node's fabric record satisfies `recorded` (once it is
/// registered, at start or when it joins later); stops when it does, when the fabric refuses
/// (logged), or at shutdown.
async fn record_own(
    inner: Cluster,
    what: &'static str,
    recorded: impl Fn(&NodeRecord) -> bool,
    cmd: impl Fn() -> Command,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fabric_changed = inner.view.changes();
    loop {
        fabric_changed.borrow_and_update();
        let state = inner
            .view
            .read(|f| f.nodes.get(&inner.id).map(|n| recorded(n)));
        match state {
            Some(true) => return,
            Some(false) => match inner.propose_anywhere(cmd()).await {
                Ok(Ok(_)) => {
                    tracing::info!("{what} recorded in the fabric");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "{what} refused by the fabric");
                    return;
                }
                // No leader yet, or it did not answer: try again shortly.
                Err(_) => {}
            },
            // Not registered yet: wait for the fabric to change.
            None => {}
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = fabric_changed.changed(), if state.is_none() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(100)), if state.is_some() => {}
        }
    }
}
