//! The QUIC endpoint's accept loop, and the node RPCs peers call (renewals, silence,
//! proposals, release, VIP checks, forwarded admin requests).
//!
//! Errors cross the wire as text (`Result<_, String>` in [`NodeHooks`]): the peer only logs
//! or relays them, and a typed error would tie both builds to one enum.

use std::sync::Arc;

use spaced_fabric::{Command, CommandError, Fabric, Millis};
use spaced_raft::frame::FrameBudget;
use spaced_raft::network::{
    BoxFuture, LeaseTerms, NodeDescription, NodeHooks, RAFT_FRAME_BUDGET, RaftService,
};
use spaced_raft::pki::{self, ALPN_ADMIN, ALPN_RAFT, ALPN_RAFT_PREVIOUS, Identity, Revoked};
use spaced_raft::{NodeId, Response};
use tokio::sync::watch;

use crate::admin::server::{AdminServer, serve_admin};
use crate::cluster::Cluster;
use crate::devices::gate::claim_held_elsewhere;
use crate::now_millis;
use crate::placement::Placements;
use crate::placement::lease::{Held, LeaseKey};

/// Whether every node of `fabric` has recorded this build's data format: from then on, nodes
/// of the previous one are refused (both ways: see `QuicNetwork::refuse_previous`).
pub(super) fn every_node_upgraded(fabric: &spaced_fabric::Fabric) -> bool {
    !fabric.nodes.is_empty()
        && fabric
            .nodes_below_format(spaced_raft::store::DATA_FORMAT)
            .is_empty()
}

/// Accepts QUIC connections until shutdown: a node certificate with the Raft ALPN gets the
/// Raft service (with `hooks`), an admin certificate with the admin ALPN the admin server.
pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    cluster: Cluster,
    hooks: Arc<Hooks>,
    admin: Arc<AdminServer>,
    revoked: Revoked,
    mut shutdown: watch::Receiver<bool>,
) {
    let lease = hooks.placements.lease.terms();
    let svc = RaftService {
        revoked,
        hooks: Some(hooks),
        budget: FrameBudget::new(RAFT_FRAME_BUDGET),
        raft: cluster.raft.clone(),
        local: NodeDescription {
            id: cluster.id,
            name: cluster.name.clone(),
            roles: cluster.roles.clone(),
            lease,
        },
    };
    // Connection tasks die with the loop (dropping a JoinSet aborts its tasks), so a stopped
    // node leaves nothing holding its Raft handle or storage.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let svc = svc.clone();
        let admin = admin.clone();
        let cluster = cluster.clone();
        conns.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) if pki::is_protocol_mismatch(&e) => {
                    tracing::warn!(
                        %remote,
                        error = %e,
                        raft = %String::from_utf8_lossy(ALPN_RAFT),
                        admin = %String::from_utf8_lossy(ALPN_ADMIN),
                        "refused connection: the peer speaks neither of our protocol versions; \
                         it runs another spaced build"
                    );
                    return;
                }
                Err(e) if spaced_raft::network::abandoned_by_dialer(&e) => {
                    tracing::debug!(%remote, "a spare dial attempt given up by the peer");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused connection: handshake failed");
                    return;
                }
            };
            let alpn = spaced_raft::network::negotiated(&conn);
            let identity = match pki::peer_identity(&conn) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused connection: no usable certificate");
                    conn.close(1u32.into(), b"certificate");
                    return;
                }
            };
            match (alpn.as_deref(), identity) {
                (Some(ALPN_RAFT), Identity::Node(name)) => svc.serve_connection(conn, name).await,
                // A node of the previous data format, during a rolling upgrade; refused once
                // every node has recorded this build's (the log may hold what it cannot read).
                (Some(ALPN_RAFT_PREVIOUS), Identity::Node(name)) => {
                    if cluster.view.read(every_node_upgraded) {
                        tracing::warn!(
                            %remote,
                            node = %name,
                            "refused connection: the node runs data format {} (it speaks only {}), and every node of this cluster has recorded data format {}: upgrade it to this build",
                            spaced_raft::store::PREVIOUS_FORMAT,
                            String::from_utf8_lossy(ALPN_RAFT_PREVIOUS),
                            spaced_raft::store::DATA_FORMAT
                        );
                        conn.close(
                            spaced_raft::network::PREVIOUS_FORMAT_CLOSE.into(),
                            b"previous data format",
                        );
                    } else {
                        svc.serve_connection(conn, name).await
                    }
                }
                (Some(ALPN_ADMIN), Identity::Admin(name)) => serve_admin(admin, conn, name).await,
                (alpn, identity) => {
                    tracing::warn!(%remote, ?identity, alpn = ?alpn.map(String::from_utf8_lossy), "refused connection: wrong certificate for protocol");
                    conn.close(1u32.into(), b"wrong certificate for protocol");
                }
            }
        });
    }
}

/// The RPC handlers this node offers its peers.
pub(super) struct Hooks {
    /// Renewals, silence, release and VIP checks.
    placements: Arc<Placements>,
    /// Admin requests other nodes forward.
    admin: Arc<AdminServer>,
    /// Peers and terms a lease-terms mismatch was logged for (once each).
    mismatches: std::sync::Mutex<std::collections::BTreeSet<(NodeId, LeaseTerms)>>,
    /// The DR watchdog, which answers how long the site holds the active role.
    watchdog: Option<Arc<spaced_replication::Watchdog>>,
}

impl Hooks {
    pub(super) fn new(
        placements: Arc<Placements>,
        admin: Arc<AdminServer>,
        watchdog: Option<Arc<spaced_replication::Watchdog>>,
    ) -> Self {
        Hooks {
            placements,
            admin,
            watchdog,
            mismatches: std::sync::Mutex::default(),
        }
    }

    /// A voter answers lease RPCs only from a node counting with its own lease terms: an owner
    /// with longer leases than the leader's silence assumes could keep a VIP that was granted
    /// elsewhere. A mismatch is logged as an error once per peer and terms.
    fn same_terms(&self, from: NodeId, terms: LeaseTerms, what: &str) -> Result<(), String> {
        let mine = self.placements.lease.terms();
        if terms == mine {
            return Ok(());
        }
        let why = format!(
            "lease terms differ: node {from} counts with {terms}, this node with {mine}; \
             every node of a cluster needs the same [lease] settings"
        );
        if crate::lock(&self.mismatches).insert((from, terms)) {
            tracing::error!(peer = from, "{what} refused: {why}");
        }
        Err(why)
    }
}

impl NodeHooks for Hooks {
    fn renew(
        &self,
        from: NodeId,
        held: Vec<Held>,
        terms: LeaseTerms,
    ) -> BoxFuture<'static, Result<Vec<Held>, String>> {
        let answer = self
            .same_terms(from, terms, "renewal")
            .map(|()| self.placements.record_renewal(from, held));
        Box::pin(async move { answer })
    }

    fn silence(
        &self,
        from: NodeId,
        keys: Vec<LeaseKey>,
        terms: LeaseTerms,
    ) -> BoxFuture<'static, Result<Vec<u64>, String>> {
        let answer = self.same_terms(from, terms, "silence question").map(|()| {
            self.placements
                .local_silence(&keys)
                .into_iter()
                .map(|d| d.as_millis() as u64)
                .collect()
        });
        Box::pin(async move { answer })
    }

    fn propose(
        &self,
        from: NodeId,
        mut cmd: Command,
    ) -> BoxFuture<'static, Result<Response, String>> {
        let cluster = self.placements.cluster.clone();
        if !cluster.raft.is_leader() {
            // A follower's fabric may lag the leader's (a node that has just restarted): it
            // judges nothing and says who leads, so the proposer asks the leader, which does.
            // Nothing is committed here either way.
            let (leader, addr) = cluster.leader();
            let why = crate::cluster::ProposeError::NotLeader(leader, addr).to_string();
            return Box::pin(async move { Err(why) });
        }
        if let Err(why) = cluster.view.read(|f| node_may_propose(f, from, &cmd)) {
            tracing::warn!(peer = from, command = %cmd, %why, "a node's proposal refused");
            return Box::pin(async move { Err(why.to_string()) });
        }
        let now = now_millis();
        // The claimer checked the hold on its own view, which may lag; the leader's is the
        // freshest there is.
        if let Err(held) = cluster
            .view
            .read(|f| claim_held_elsewhere(f, from, &cmd, now))
        {
            tracing::info!(peer = from, %held, "a node's device claim refused");
            let refusal = CommandError::DeviceOwnerNotEligible {
                device: held.device.clone(),
                node: from,
                why: held.to_string(),
            };
            return Box::pin(async move { Ok(Err(refusal)) });
        }
        stamp_with_leader_clock(&mut cmd, now);
        Box::pin(async move { cluster.commit(cmd).await.map_err(|e| e.to_string()) })
    }

    fn leaving(&self, from: NodeId) {
        self.placements.cluster.leaving(from);
    }

    fn release(&self, name: String, epoch: u64) -> BoxFuture<'static, Result<(), String>> {
        let placements = self.placements.clone();
        Box::pin(async move {
            placements
                .agent
                .fence_and_hold(&name, epoch)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn site_hold(&self) -> Option<(u64, u64)> {
        let (epoch, left) = self.watchdog.as_ref()?.site_hold()?;
        Some((epoch, left.as_millis() as u64))
    }

    fn check_vip(&self, address: String, interface: String) -> BoxFuture<'static, Option<String>> {
        self.placements.check_vip_here(address, interface)
    }

    fn admin(
        &self,
        from: NodeId,
        chain: Vec<Vec<u8>>,
        request: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let server = self.admin.clone();
        Box::pin(async move {
            server
                .serve_forwarded_admin(from, chain, request)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Keeps `revoked` (which this node's TLS verifiers and connection loops consult) equal to
/// the fabric's revoked serials, until shutdown.
pub(super) async fn follow_revocations(
    cluster: Cluster,
    revoked: Revoked,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = cluster.view.changes();
    loop {
        let serials = cluster.view.read(|f| {
            f.revoked
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        });
        let count = serials.len();
        if revoked.replace(serials) {
            tracing::info!(revoked = count, "revoked certificates updated");
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// What a node may propose through the leader (RPC `Propose`): only what nodes do on their
/// own behalf — give back or release what it holds, claim a device for itself, report its
/// devices, record its management IP, register a VIP from its config. Anything else (a grant,
/// membership, another node's devices) is the leader's or an admin's to do, so a member
/// node's certificate carries no more power than its own work needs. `Err` is the refusal,
/// sent to the node as text.
pub(super) fn node_may_propose(
    fabric: &Fabric,
    from: NodeId,
    cmd: &Command,
) -> Result<(), NotANodeProposal> {
    let ok = match cmd {
        Command::RefusePlacement { node, .. } => *node == from,
        Command::ReleasePlacement { name, epoch } => fabric
            .placements
            .get(name)
            .is_some_and(|p| p.owner == Some(from) && p.epoch == *epoch),
        Command::AssignDevices { assignments, .. } => {
            assignments.iter().all(|a| a.to == Some(from))
        }
        Command::ReportDeviceStatus { node, .. } => *node == from,
        Command::SetMgmtIp { id, .. } | Command::SetVersion { id, .. } => *id == from,
        Command::AddPlacement { .. } => true,
        // A site may always step down (a switchover's hand-over, served by any node); it
        // never steps up this way: promotion is an admin's, on the leader.
        Command::SetSiteRole { role, epoch, .. } => {
            *role == spaced_fabric::SiteRole::Standby && *epoch == fabric.site.epoch
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(NotANodeProposal {
            node: from,
            command: cmd.to_string(),
        })
    }
}

/// A command a node may not propose through the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node {node} may not propose {command}: a node proposes only its own releases, claims, \
     reports and settings"
)]
pub(super) struct NotANodeProposal {
    node: NodeId,
    command: String,
}

/// A refusal a peer sent to the leader carries the time the leader received it, not the
/// peer's clock: the planner, on the leader, measures its hold and retry periods against its
/// own clock, so a peer's clock skew must not stretch or cancel them.
fn stamp_with_leader_clock(cmd: &mut Command, now: Millis) {
    if let Command::RefusePlacement { at, .. } = cmd {
        *at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_sent_to_the_leader_is_stamped_with_the_leaders_clock() {
        let refusal = |at| Command::RefusePlacement {
            name: "vip".into(),
            node: 2,
            epoch: 7,
            reason: "no such interface".into(),
            at,
        };
        // The peer's clock runs an hour ahead; the leader's time replaces it.
        let mut cmd = refusal(5_000_000);
        stamp_with_leader_clock(&mut cmd, 1_400_000);
        assert_eq!(cmd, refusal(1_400_000));
        // Other commands keep the proposer's times.
        let other = || Command::AddDevices {
            devices: Vec::new(),
            at: 5_000_000,
        };
        let mut cmd = other();
        stamp_with_leader_clock(&mut cmd, 1_400_000);
        assert_eq!(cmd, other());
    }

    #[test]
    fn a_node_proposes_only_for_itself() {
        use spaced_fabric::{DeviceAssignment, PlacementKind};
        let mut f = Fabric::default();
        for cmd in [
            Command::RegisterNode {
                id: 1,
                name: "n1".into(),
                raft_addr: "127.0.0.1:1".into(),
                mgmt_ip: None,
                roles: ["ha".to_string()].into(),
                at: 0,
            },
            Command::RegisterNode {
                id: 2,
                name: "n2".into(),
                raft_addr: "127.0.0.1:2".into(),
                mgmt_ip: None,
                roles: ["ha".to_string()].into(),
                at: 0,
            },
            Command::AddPlacement {
                name: "vip".into(),
                kind: PlacementKind::Vip {
                    address: "10.0.0.1/24".into(),
                    interface: "eth0".into(),
                },
                eligible_roles: ["ha".to_string()].into(),
            },
            Command::GrantPlacement {
                name: "vip".into(),
                to: 2,
                expected_epoch: 0,
            },
        ] {
            f.apply(&cmd).unwrap();
        }
        let release = Command::ReleasePlacement {
            name: "vip".into(),
            epoch: 1,
        };
        let claim = |to| Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d1".into(),
                from: Some(1),
                to: Some(to),
            }],
            at: 0,
        };
        let grant = Command::GrantPlacement {
            name: "vip".into(),
            to: 1,
            expected_epoch: 1,
        };
        let site = |role, epoch| Command::SetSiteRole { role, epoch, at: 0 };
        // (what, proposer, command, allowed)
        let cases: Vec<(&str, NodeId, Command, bool)> = vec![
            ("the owner releases", 2, release.clone(), true),
            ("another node releases it", 1, release, false),
            ("a claim for itself", 2, claim(2), true),
            ("a claim for another node", 2, claim(1), false),
            ("a grant", 1, grant, false),
            ("a removal", 1, Command::RemoveNode { id: 2 }, false),
            (
                "its own IP",
                1,
                Command::SetMgmtIp {
                    id: 1,
                    mgmt_ip: None,
                },
                true,
            ),
            (
                "another's IP",
                1,
                Command::SetMgmtIp {
                    id: 2,
                    mgmt_ip: None,
                },
                false,
            ),
            (
                "the site steps down at its epoch",
                1,
                site(spaced_fabric::SiteRole::Standby, 0),
                true,
            ),
            (
                "the site steps down raising its epoch",
                1,
                site(spaced_fabric::SiteRole::Standby, u64::MAX),
                false,
            ),
            (
                "the site steps up",
                1,
                site(spaced_fabric::SiteRole::Active, 1),
                false,
            ),
            (
                "a mirror",
                1,
                Command::Mirror {
                    changes: vec![],
                    position: None,
                },
                false,
            ),
        ];
        for (what, from, cmd, allowed) in cases {
            assert_eq!(node_may_propose(&f, from, &cmd).is_ok(), allowed, "{what}");
        }
    }
}
