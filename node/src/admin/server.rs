//! The admin server: carries out what `spacectl` asks (status, lists, writes, and the
//! operations only the leader may run), or forwards it to the leader, so that `spacectl` may
//! talk to any node.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::Command;
use spaced_raft::NodeId;
use spaced_raft::frame::{FrameBudget, read_frame_within};
use spaced_raft::network::{RaftReply, RaftRpc};

use spaced_raft::pki::TlsMaterial;
use spaced_raft::proof::{self, ProofError, ReplayGuard};

use super::{
    AdminReply, AdminRequest, DeviceRow, MAX_ADMIN_FRAME, NodeStatus, SignedRequest, StatusReport,
};
use crate::cluster::{Cluster, OpError, ProposeError};
use crate::lb::service::LbService;
use crate::now_millis;
use crate::placement::Placements;
use crate::services::supervisor::Supervisor;

/// How long a node waits for the leader to carry out an admin request it forwarded; below
/// spacectl's own call timeout, so spacectl hears the outcome (or the leader's address).
const ADMIN_FORWARD_TIMEOUT: Duration = Duration::from_secs(50);

/// What the admin server reads and changes: the cluster, and the subsystems' handles whose
/// state `spacectl` shows or whose operations it runs.
pub struct AdminServer {
    /// The cluster: status, writes, membership.
    pub(super) cluster: Cluster,
    /// VIP rows and operations.
    pub(super) placements: Arc<Placements>,
    /// Services running here.
    pub(super) supervisor: Supervisor,
    /// The balancer on the cluster VIP, if configured.
    pub(super) lb: Option<Arc<LbService>>,
    /// The devices' `lost_after` (the leader waits that long before moving any after election).
    pub(super) device_lost_after: Duration,
    /// Memory the admin requests being received may hold at once, from every admin together.
    pub(super) budget: FrameBudget,
    /// Checks admins' signatures on requests (also those other nodes forward).
    pub(super) proofs: Proofs,
    /// The DR watchdog, on a node with a `[dr]` section.
    pub(super) dr: Option<Arc<spaced_replication::Watchdog>>,
    /// The node's data dir, whose size `status` reports.
    pub(super) data_dir: std::path::PathBuf,
    /// Where `Reload` requests go: the binary that runs the node reads the config file again
    /// and answers (see [`crate::node::Node::reload_requests`]).
    pub(super) reloads: tokio::sync::mpsc::Sender<ReloadAsk>,
}

/// A `Reload` request to the binary: it answers with the reload's report, or why nothing was
/// applied.
pub type ReloadAsk = tokio::sync::oneshot::Sender<Result<Vec<String>, String>>;

/// How long a `Reload` waits for the binary to answer.
const RELOAD_WITHIN: Duration = Duration::from_secs(10);

/// This node's check of admin request proofs: its TLS material (the CA) and the nonces seen.
pub struct Proofs {
    tls: TlsMaterial,
    seen: std::sync::Mutex<ReplayGuard>,
}

impl Proofs {
    /// Checks `signed` against the admin certificate `chain` (leaf first, DER): chain under
    /// the CA with an admin identity, signature, time and nonce. Returns the admin's name and
    /// the request.
    pub fn check(
        &self,
        chain: &[Vec<u8>],
        signed: &SignedRequest,
    ) -> Result<(String, AdminRequest), AdminError> {
        let msg = proof::message(signed.at_ms, signed.nonce, &signed.request);
        let admin = proof::verify(&self.tls, chain, &msg, &signed.signature)?;
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).admit(
            &admin,
            signed.at_ms,
            signed.nonce,
            now_millis(),
        )?;
        Ok((admin, decode_admin_request(&signed.request)?))
    }

    /// A request an admin sent on its own connection to this node (`chain`, the certificate
    /// TLS verified when it connected): the connection is the proof, as it is for etcd's
    /// clients, so neither the signature nor the nonce is checked here (a replay would need
    /// the admin's key to open the connection); the certificate must not have been revoked
    /// since. Checking the proof per request cost more than the write itself and capped an
    /// admin at the replay guard's few hundred requests a second. A request this node hands
    /// to the leader still carries its proof, which the leader checks in full.
    pub fn direct(
        &self,
        chain: &[Vec<u8>],
        signed: &SignedRequest,
    ) -> Result<AdminRequest, AdminError> {
        let leaf = chain.first().ok_or(ProofError::NoCertificate)?;
        if self.tls.revoked().is_revoked(leaf) {
            return Err(ProofError::Revoked.into());
        }
        decode_admin_request(&signed.request)
    }
}

/// What the admin requests a node is receiving may hold in memory at once (a 10,000-device
/// import is about 1 MB).
const ADMIN_FRAME_BUDGET: usize = 128 << 20;

/// Why an admin request could not be carried out here.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The bytes are not an admin request of this protocol version.
    #[error("undecodable admin request: {0}")]
    Undecodable(#[from] spaced_raft::codec::CodecError),
    /// The reply could not be encoded.
    #[error("cannot encode the admin reply")]
    Unencodable,
    /// The admin's proof was refused.
    #[error("admin request refused: {0}")]
    Proof(#[from] ProofError),
}

impl AdminServer {
    /// The server over the handles the root gives it.
    pub fn new(
        cluster: Cluster,
        placements: Arc<Placements>,
        supervisor: Supervisor,
        lb: Option<Arc<LbService>>,
        device_lost_after: Duration,
        tls: TlsMaterial,
        dr: Option<Arc<spaced_replication::Watchdog>>,
        data_dir: std::path::PathBuf,
        reloads: tokio::sync::mpsc::Sender<ReloadAsk>,
    ) -> Arc<Self> {
        Arc::new(AdminServer {
            cluster,
            placements,
            supervisor,
            lb,
            device_lost_after,
            budget: FrameBudget::new(ADMIN_FRAME_BUDGET),
            proofs: Proofs {
                tls,
                seen: Default::default(),
            },
            dr,
            data_dir,
            reloads,
        })
    }

    /// `Reload`: hands the request to the binary and waits for its report.
    async fn reload(&self) -> AdminReply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.reloads.try_send(tx).is_err() {
            return AdminReply::Failed(
                "this node takes no reload requests now (one is under way, or it does not run \
                 from the spaced binary)"
                    .into(),
            );
        }
        match tokio::time::timeout(RELOAD_WITHIN, rx).await {
            Ok(Ok(Ok(lines))) => AdminReply::Reloaded(lines),
            Ok(Ok(Err(e))) => AdminReply::Failed(e),
            Ok(Err(_)) | Err(_) => AdminReply::Failed(format!(
                "the node did not reload within {} s (it does not run from the spaced binary?)",
                RELOAD_WITHIN.as_secs()
            )),
        }
    }

    /// Hands an admin request that only the leader can carry out (`request`, the
    /// [`SignedRequest`] as it came from spacectl, and the admin's certificate `chain`) to the
    /// leader and returns its reply, so spacectl may talk to any node. The leader checks the
    /// admin's proof itself: this node's word carries no admin power. The
    /// leader carries it out or, if it no longer leads, says where the leader is; it does not
    /// forward again. If the leader cannot be reached, spacectl gets the leader's address
    /// (`addr`) to try itself. If this node learns of another leader meanwhile (the one asked
    /// died, say), it stops waiting: it carries the request out itself if it now leads, else
    /// names the new leader. (So a request the old leader carried out just before it lost the
    /// lead may be carried out twice; operations refuse a duplicate or repeat harmlessly.)
    async fn forward_admin(
        &self,
        leader: NodeId,
        addr: Option<String>,
        chain: Vec<Vec<u8>>,
        request: Vec<u8>,
        req: AdminRequest,
    ) -> AdminReply {
        let not_leader = |addr| AdminReply::NotLeader {
            leader: Some(leader),
            addr,
        };
        let Some(member) = self.cluster.member(leader) else {
            return not_leader(addr);
        };
        let rpc = RaftRpc::Admin { chain, request };
        let call = self
            .cluster
            .call(leader, &member, rpc, ADMIN_FORWARD_TIMEOUT);
        let wait = self.cluster.raft.wait(None);
        // A new leader known, not an election under way: the leader asked may be waiting for
        // a vote itself (a leader transfer it was asked to make, say) and answer shortly.
        let leader_moved = wait.metrics(
            |m| m.current_leader.is_some_and(|l| l != leader),
            "another leader",
        );
        let answer = tokio::select! {
            answer = call => answer,
            _ = leader_moved => {
                tracing::debug!(leader, "the leader changed while a forwarded admin request waited");
                if let Some(elsewhere) = self.not_leader() {
                    return elsewhere;
                }
                return self.handle(req).await;
            }
        };
        match answer {
            Ok(RaftReply::Admin(reply)) => spaced_raft::codec::decode::<AdminReply>(&reply)
                .unwrap_or_else(|e| {
                    AdminReply::Failed(format!("the leader's reply is undecodable: {e}"))
                }),
            Ok(other) => AdminReply::Failed(format!("the leader answered {other:?}")),
            Err(e) => {
                tracing::debug!(leader, error = %e, "could not forward an admin request to the leader");
                not_leader(addr)
            }
        }
    }

    /// An admin request another node forwarded (see [`forward_admin`](Self::forward_admin)):
    /// carried out here once the admin's proof checks out, not forwarded again; the encoded
    /// reply.
    pub async fn serve_forwarded_admin(
        &self,
        from: NodeId,
        chain: Vec<Vec<u8>>,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, AdminError> {
        let signed: SignedRequest = spaced_raft::codec::decode(&request)?;
        let (admin, req) = self.proofs.check(&chain, &signed).inspect_err(|e| {
            tracing::warn!(from, error = %e, "an admin request forwarded by a node refused");
        })?;
        tracing::debug!(from, %admin, ?req, "admin request forwarded by a node");
        let reply = self.handle(req).await;
        encode_admin_reply(&reply).ok_or(AdminError::Unencodable)
    }

    fn not_leader(&self) -> Option<AdminReply> {
        if self.cluster.raft.is_leader() {
            return None;
        }
        let (leader, addr) = self.cluster.leader();
        Some(AdminReply::NotLeader { leader, addr })
    }

    pub(super) fn resolve_node(&self, who: &str) -> Result<NodeId, OpError> {
        let membership = self.cluster.membership();
        let membership = membership.membership();
        if let Ok(id) = who.parse::<NodeId>()
            && membership.get_node(&id).is_some()
        {
            return Ok(id);
        }
        membership
            .nodes()
            .find(|(_, n)| n.name == who)
            .map(|(id, _)| *id)
            .ok_or_else(|| OpError::Refused(format!("no node {who:?} in the cluster")))
    }

    async fn handle(&self, req: AdminRequest) -> AdminReply {
        match req {
            AdminRequest::Status => AdminReply::Status(self.status()),
            AdminRequest::ListRevoked => AdminReply::Revoked(self.cluster.view.read(|f| {
                f.revoked
                    .iter()
                    .map(|(s, r)| (s.clone(), r.clone()))
                    .collect()
            })),
            AdminRequest::ListDevices => AdminReply::Devices(self.cluster.view.read(device_rows)),
            AdminRequest::VipList => AdminReply::Vips(self.placements.vip_rows()),
            // A held singleton is released before its service goes: the leader's operation.
            AdminRequest::Write(Command::RemoveService { name }) => {
                if let Some(r) = self.not_leader() {
                    return r;
                }
                match self.placements.remove_service(&name).await {
                    Ok(()) => AdminReply::Applied(spaced_raft::Outcome::Done),
                    Err(e) => redirect_or_failed(e),
                }
            }
            AdminRequest::Write(cmd) => match admin_may_write(&cmd) {
                Ok(()) => self.write(cmd).await,
                Err(why) => AdminReply::Failed(why.to_string()),
            },
            AdminRequest::LbStatus => AdminReply::Lb(super::LbReport {
                node: self.cluster.name.clone(),
                vip: self.lb.as_ref().map(|lb| lb.vip().to_string()),
                listeners: self.lb.as_ref().map(|lb| lb.report()).unwrap_or_default(),
                problems: self.lb.as_ref().map(|lb| lb.problems()).unwrap_or_default(),
            }),
            AdminRequest::Reload => self.reload().await,
            AdminRequest::ServiceStatus => AdminReply::Services(super::ServicesReport {
                node: self.cluster.name.clone(),
                specs: self.cluster.view.read(|f| f.services.clone()),
                running: self.supervisor.status(),
            }),
            AdminRequest::SingletonList => AdminReply::Singletons(self.cluster.view.read(|f| {
                let now = now_millis();
                f.placements
                    .iter()
                    .filter_map(|(name, p)| match &p.kind {
                        spaced_fabric::PlacementKind::Singleton { service } => {
                            Some(super::SingletonRow {
                                name: name.clone(),
                                service: service.clone(),
                                roles: p.eligible_roles.iter().cloned().collect(),
                                owner: p.owner,
                                owner_name: p
                                    .owner
                                    .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone())),
                                epoch: p.epoch,
                                refused: super::RefusalRow::of(f, p, now),
                            })
                        }
                        _ => None,
                    })
                    .collect()
            })),
            AdminRequest::AddDevices(devices) => {
                self.write(Command::AddDevices {
                    devices,
                    at: now_millis(),
                })
                .await
            }
            leader_only => {
                if let Some(r) = self.not_leader() {
                    return r;
                }
                let membership = matches!(
                    leader_only,
                    AdminRequest::AddNode { .. }
                        | AdminRequest::RemoveNode(_)
                        | AdminRequest::TransferLeader(_)
                );
                match self.leader_op(leader_only).await {
                    Ok(reply) => reply,
                    // This node lost the lead while Raft changed the membership: the client
                    // asks the new leader (removal and transfer repeat harmlessly; a repeated
                    // `node add` finds the node a member and says so).
                    Err(e) if membership => redirect_or_failed(e),
                    Err(e) => AdminReply::Failed(e.to_string()),
                }
            }
        }
    }

    /// The admin operations only the leader carries out.
    async fn leader_op(&self, req: AdminRequest) -> Result<AdminReply, OpError> {
        Ok(match req {
            AdminRequest::AddNode {
                id,
                name,
                addr,
                roles,
            } => AdminReply::NodeAdded {
                voter: self.add_node(id, name, addr, roles).await?,
            },
            AdminRequest::RemoveNode(who) => AdminReply::NodeRemoved {
                revoked: self.remove_node(&who).await?,
            },
            AdminRequest::TransferLeader(who) => {
                self.transfer_leader(&who).await?;
                AdminReply::Done
            }
            AdminRequest::VipAdd {
                name,
                address,
                interface,
                roles,
            } => {
                let (cannot, unchecked) = self
                    .placements
                    .vip_add(name, address, interface, roles)
                    .await?;
                AdminReply::VipAdded { cannot, unchecked }
            }
            AdminRequest::VipMove { name, to } => {
                let to = self.resolve_node(&to)?;
                AdminReply::Moved(self.placements.vip_move(&name, to).await?)
            }
            AdminRequest::VipRemove(name) => {
                self.placements.vip_remove(&name).await?;
                AdminReply::Done
            }
            AdminRequest::VipSet {
                name,
                address,
                interface,
                roles,
            } => match self
                .placements
                .vip_set(&name, address, interface, roles)
                .await?
            {
                Some((cannot, unchecked)) => AdminReply::VipChanged {
                    changed: true,
                    cannot,
                    unchecked,
                },
                None => AdminReply::VipChanged {
                    changed: false,
                    cannot: Vec::new(),
                    unchecked: Vec::new(),
                },
            },
            AdminRequest::DeviceSet { id, addr, mode } => {
                let device = self.cluster.view.read(|f| {
                    f.devices
                        .get(&id)
                        .map(|d| spaced_fabric::NewDevice {
                            id: id.clone(),
                            addr: addr.clone().unwrap_or_else(|| d.addr.clone()),
                            mode: mode.unwrap_or(d.mode),
                        })
                        .ok_or_else(|| OpError::Refused(format!("no device {id:?}")))
                })?;
                AdminReply::Applied(
                    self.cluster
                        .propose(Command::SetDevice {
                            device,
                            at: now_millis(),
                        })
                        .await?,
                )
            }
            AdminRequest::ServiceSet {
                name,
                command,
                roles,
                health_check,
            } => {
                let spec = self.cluster.view.read(|f| {
                    f.services
                        .get(&name)
                        .cloned()
                        .ok_or_else(|| OpError::Refused(format!("no service {name:?}")))
                })?;
                let new = spaced_fabric::ServiceSpec {
                    command: command.unwrap_or_else(|| spec.command.clone()),
                    roles: roles.unwrap_or_else(|| spec.roles.clone()),
                    health_check: health_check.unwrap_or_else(|| spec.health_check.clone()),
                    scope: spec.scope.clone(),
                };
                if new == spec {
                    AdminReply::Done
                } else {
                    AdminReply::Applied(
                        self.cluster
                            .propose(Command::PutService { name, spec: new })
                            .await?,
                    )
                }
            }
            AdminRequest::SetRoles { node, roles } => {
                let id = self.resolve_node(&node)?;
                self.cluster
                    .propose(Command::SetRoles { id, roles })
                    .await?;
                AdminReply::Done
            }
            AdminRequest::RemoveDevices(ids) => {
                // Each id once, in batches of what one command may carry.
                let mut seen = std::collections::HashSet::new();
                let ids: Vec<String> = ids.into_iter().filter(|i| seen.insert(i.clone())).collect();
                let mut removed = 0;
                let mut missing = Vec::new();
                for batch in ids.chunks(spaced_fabric::MAX_DEVICES_PER_COMMAND) {
                    let cmd = Command::RemoveDevices {
                        ids: batch.to_vec(),
                    };
                    match self.cluster.propose(cmd).await? {
                        spaced_raft::Outcome::DevicesRemoved {
                            removed: r,
                            missing: m,
                        } => {
                            removed += r;
                            missing.extend(m);
                        }
                        other => {
                            return Err(OpError::Refused(format!(
                                "device removal answered {other:?}"
                            )));
                        }
                    }
                }
                AdminReply::DevicesRemoved { removed, missing }
            }
            AdminRequest::DeviceRebalance { max_moves } => AdminReply::Rebalanced(
                crate::devices::leader::rebalance(&self.cluster, self.device_lost_after, max_moves)
                    .await?,
            ),
            AdminRequest::SetAdminState { node, state } => {
                let id = self.resolve_node(&node)?;
                let (name, devices) =
                    crate::devices::leader::set_admin_state(&self.cluster, id, state).await?;
                AdminReply::AdminStateSet {
                    id,
                    name,
                    state,
                    devices,
                }
            }
            AdminRequest::Snapshot => AdminReply::Snapshot(self.backup().await?),
            AdminRequest::ReadDevices => {
                self.read_barrier("the devices").await?;
                AdminReply::Devices(self.cluster.view.read(device_rows))
            }
            AdminRequest::Dr(action) => {
                let dr = self.dr.as_ref().ok_or_else(|| {
                    OpError::Refused(
                        "this site has no disaster recovery: its nodes' configs have no [dr] \
                         section"
                            .into(),
                    )
                })?;
                // The operator reads why in words (`AdminReply::Failed` carries text).
                let refused =
                    |e: spaced_replication::watchdog::DrOpError| OpError::Refused(e.to_string());
                match action {
                    super::DrAction::Status => AdminReply::DrStatus(dr.status()),
                    super::DrAction::Failover { force } => AdminReply::DrActive {
                        epoch: dr.failover(force).await.map_err(refused)?,
                    },
                    super::DrAction::Switchover => AdminReply::DrActive {
                        epoch: dr.switchover().await.map_err(refused)?,
                    },
                    super::DrAction::Demote => {
                        dr.demote().await.map_err(refused)?;
                        AdminReply::Done
                    }
                    super::DrAction::Backup => {
                        let (taken_at, files, bytes) = dr.back_up_now().map_err(refused)?;
                        AdminReply::DrBackup {
                            taken_at,
                            files,
                            bytes,
                        }
                    }
                    super::DrAction::AutomaticFailover { off_for_ms } => {
                        let off_until = off_for_ms.map(|ms| match ms {
                            0 => u64::MAX,
                            ms => now_millis().saturating_add(ms),
                        });
                        self.cluster
                            .propose(Command::SetAutoFailover { off_until })
                            .await?;
                        AdminReply::DrStatus(dr.status())
                    }
                }
            }
            other => {
                return Err(OpError::Refused(format!(
                    "not a leader operation: {other:?}"
                )));
            }
        })
    }

    /// Returns once this node has confirmed, with a majority, that it still leads, and has
    /// applied everything committed before the call: what it reads of its fabric next is
    /// linearizable. `what` names the read in the refusal.
    async fn read_barrier(&self, what: &str) -> Result<(), OpError> {
        self.cluster
            .raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| OpError::Refused(format!("no consistent read for {what}: {e}")))
    }

    /// A backup file of the fabric: after a read barrier (this node still leads, and has
    /// applied everything committed before the request), the applied fabric, its last log id
    /// and the membership, read at one instant.
    async fn backup(&self) -> Result<Vec<u8>, OpError> {
        self.read_barrier("the snapshot").await?;
        let (last, membership, fabric) = self.cluster.view.backup();
        let last_applied =
            last.ok_or_else(|| OpError::Refused("nothing has been applied yet".into()))?;
        let m = membership.membership();
        let members = m
            .nodes()
            .map(|(id, n)| (*id, n.clone(), m.voter_ids().any(|v| v == *id)))
            .collect();
        let body = spaced_raft::backup::BackupBody {
            last_applied,
            members,
            taken_at: now_millis(),
            taken_by: self.cluster.name.clone(),
            fabric,
        };
        let bytes = body.encode().map_err(|e| OpError::Refused(e.to_string()))?;
        // The reply travels in one frame, with room for its envelope.
        let limit = spaced_raft::frame::MAX_FRAME - 4096;
        if bytes.len() > limit {
            return Err(OpError::Refused(format!(
                "the snapshot is {} bytes, over the {limit} bytes one admin reply may carry",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    async fn write(&self, cmd: Command) -> AdminReply {
        match self.cluster.commit(cmd).await {
            Ok(Ok(o)) => AdminReply::Applied(o),
            Ok(Err(e)) => AdminReply::Failed(e.to_string()),
            Err(ProposeError::NotLeader(leader, addr)) => AdminReply::NotLeader { leader, addr },
            Err(e) => AdminReply::Failed(e.to_string()),
        }
    }

    /// The cluster as this node sees it (with the leader's last contacts when it leads).
    pub fn status(&self) -> StatusReport {
        let m = self.cluster.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let contacts = self.cluster.contacts();
        let (records, counts, devices) = self
            .cluster
            .view
            .read(|f| (f.nodes.clone(), f.device_counts(), f.devices.len() as u64));
        let nodes = membership
            .nodes()
            .map(|(id, member)| {
                let rec = records.get(id);
                let last_contact_ms = if *id == self.cluster.id && m.state == ServerState::Leader {
                    Some(0)
                } else {
                    contacts
                        .get(id)
                        .copied()
                        .flatten()
                        .map(|d| d.as_millis() as u64)
                };
                NodeStatus {
                    id: *id,
                    name: member.name.clone(),
                    addr: member.addr.clone(),
                    mgmt_ip: rec.and_then(|r| r.mgmt_ip),
                    roles: rec
                        .map(|r| r.roles.iter().cloned().collect())
                        .unwrap_or_default(),
                    voter: membership.voter_ids().any(|v| v == *id),
                    last_contact_ms,
                    admin_state: rec.map(|r| r.admin_state),
                    devices: counts.get(id).copied().unwrap_or(0),
                    version: rec.map(|r| r.version.clone()).filter(|v| !v.is_empty()),
                }
            })
            .collect();
        StatusReport {
            served_by: self.cluster.id,
            leader: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index()),
            nodes,
            devices,
            vips: self.placements.vip_rows(),
            db_bytes: dir_bytes(&self.data_dir).ok(),
        }
    }
}

/// Whether an admin may propose `cmd` as it is. Ownership and membership change only through
/// the operations that keep their invariants: a placement moves by `vip move` (the owner
/// fences first) or when its lease lapses, never by a raw grant or release, which could give
/// a VIP to a second node while the first still holds it; nodes join and leave by `node add`
/// and `node remove`; devices move by the leader's planner and `device rebalance`; nodes report
/// their own devices and management IP. `Err` says what to use instead, as the text of the
/// `AdminReply::Failed` that carries it to `spacectl`.
pub fn admin_may_write(cmd: &Command) -> Result<(), NotAnAdminWrite> {
    let instead = match cmd {
        Command::AddDevices { .. }
        | Command::RemoveDevice { .. }
        | Command::RemoveDevices { .. }
        | Command::PutService { .. }
        | Command::RemoveService { .. }
        | Command::SetAdminState { .. }
        | Command::SetRoles { .. }
        | Command::AddPlacement { .. }
        | Command::RemovePlacement { .. }
        | Command::RevokeCertificate { .. }
        | Command::SetDevice { .. }
        | Command::Probe { .. } => return Ok(()),
        Command::SetPlacement { .. } => {
            "`vip set` (the owner fences and releases the VIP before its spec changes)"
        }
        Command::GrantPlacement { .. }
        | Command::ReleasePlacement { .. }
        | Command::RefusePlacement { .. } => {
            "`vip move` (the owner fences before another node is granted it)"
        }
        Command::RegisterNode { .. } | Command::RemoveNode { .. } => "`node add` / `node remove`",
        Command::AssignDevices { .. } => "`device rebalance` or `node drain`",
        Command::ReportDeviceStatus { .. }
        | Command::SetMgmtIp { .. }
        | Command::SetVersion { .. } => "nothing: each node reports this itself",
        Command::SetSiteRole { .. } => {
            "`dr failover` / `dr demote` (they pick the site epoch and check the peer)"
        }
        Command::Mirror { .. } => "nothing: a standby site's leader mirrors its peer itself",
        Command::SetAutoFailover { .. } => "`dr automatic-failover`",
    };
    Err(NotAnAdminWrite {
        command: cmd.to_string(),
        instead,
    })
}

/// A raw command an admin may not write, and the operation to use instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{command} is not an admin operation: placements, membership and device owners change only \
     through operations that keep their invariants; use {instead}"
)]
pub struct NotAnAdminWrite {
    /// The command, as it prints.
    pub command: String,
    /// The operation that does it while keeping the invariants.
    pub instead: &'static str,
}

/// The reply to an operation that failed: "not the leader" (the client asks again there, or
/// waits out an election) when this node lost the lead on the way, else the failure.
/// Every device of `f`, as `device list` shows it.
fn device_rows(f: &spaced_fabric::Fabric) -> Vec<DeviceRow> {
    f.devices
        .iter()
        .map(|(id, d)| DeviceRow {
            id: id.clone(),
            addr: d.addr.clone(),
            mode: d.mode,
            owner: d.owner,
            status: d.status,
            since: d.since,
            owner_name: d
                .owner
                .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone())),
        })
        .collect()
}

fn redirect_or_failed(e: OpError) -> AdminReply {
    match e {
        OpError::Propose(ProposeError::NotLeader(leader, addr)) => {
            AdminReply::NotLeader { leader, addr }
        }
        e => AdminReply::Failed(e.to_string()),
    }
}

/// Decodes an admin request from the wire (from spacectl, or forwarded by a node).
fn decode_admin_request(bytes: &[u8]) -> Result<AdminRequest, AdminError> {
    Ok(spaced_raft::codec::decode(bytes)?)
}

/// Encodes an admin reply for the wire; a reply over the admin frame limit becomes a `Failed`
/// that says so. `None` only if even that cannot be encoded (logged).
pub fn encode_admin_reply(reply: &AdminReply) -> Option<Vec<u8>> {
    let encoded = spaced_raft::codec::encode(reply).and_then(|b| {
        if b.len() <= MAX_ADMIN_FRAME {
            return Ok(b);
        }
        spaced_raft::codec::encode(&AdminReply::Failed(format!(
            "reply of {} bytes exceeds the admin frame limit",
            b.len()
        )))
    });
    match encoded {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode admin reply");
            None
        }
    }
}

/// Serves one `spacectl` connection (admin certificate `admin`): one request per stream.
pub async fn serve_admin(server: Arc<AdminServer>, conn: quinn::Connection, admin: String) {
    let chain = match spaced_raft::pki::peer_chain(&conn) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%admin, error = %e, "admin connection without a certificate chain");
            return;
        }
    };
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let server = server.clone();
        let admin = admin.clone();
        let chain = chain.clone();
        tokio::spawn(async move {
            let frame = read_frame_within(&mut recv, MAX_ADMIN_FRAME, &server.budget).await;
            let bytes = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%admin, error = %e, "admin stream refused");
                    let _ = send.reset(1u32.into());
                    return;
                }
            };
            let checked = spaced_raft::codec::decode::<SignedRequest>(&bytes.bytes)
                .map_err(AdminError::from)
                .and_then(|signed| {
                    let req = server.proofs.direct(&chain, &signed)?;
                    Ok((req, signed.signature.bytes.is_empty()))
                });
            let reply = match checked {
                Ok((req, unsigned)) => {
                    tracing::debug!(%admin, ?req, unsigned, "admin request");
                    match server.handle(req.clone()).await {
                        // The leader would refuse a request without the admin's signature:
                        // the client asks the leader itself.
                        AdminReply::NotLeader {
                            leader: Some(leader),
                            addr,
                        } if leader != server.cluster.id && !unsigned => {
                            server
                                .forward_admin(leader, addr, chain, bytes.bytes.clone(), req)
                                .await
                        }
                        reply => reply,
                    }
                }
                Err(e) => {
                    tracing::warn!(%admin, error = %e, "admin request refused");
                    AdminReply::Failed(e.to_string())
                }
            };
            if let Some(b) = encode_admin_reply(&reply) {
                let _ = spaced_raft::frame::write_frame(&mut send, &b).await;
            }
            let _ = send.finish();
        });
    }
}

/// The bytes the files under `dir` hold (its subdirectories too), as `du --apparent-size`
/// counts them: the size of a node's data dir for `endpoint status`. Files that vanish while
/// it looks (sled replaces its snapshot files) are skipped.
pub fn dir_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spaced_fabric::AdminState;

    #[test]
    fn a_data_dirs_size_counts_the_files_of_its_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/a")).unwrap();
        std::fs::write(dir.path().join("blobs/a/1"), vec![0u8; 234]).unwrap();
        std::fs::write(dir.path().join("blobs/2"), b"").unwrap();
        assert_eq!(dir_bytes(dir.path()).unwrap(), 1234);
        assert!(dir_bytes(&dir.path().join("none")).is_err());
    }

    #[test]
    fn admins_cannot_move_owners_or_membership_with_raw_commands() {
        let refused = [
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 2,
                expected_epoch: 1,
            },
            Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 1,
            },
            Command::RefusePlacement {
                name: "cluster".into(),
                node: 1,
                epoch: 1,
                reason: String::new(),
                at: 0,
            },
            Command::RemoveNode { id: 2 },
            Command::AssignDevices {
                assignments: Vec::new(),
                at: 0,
            },
            Command::SetMgmtIp {
                id: 1,
                mgmt_ip: None,
            },
        ];
        for cmd in refused {
            let why = admin_may_write(&cmd)
                .expect_err("a raw command was allowed")
                .to_string();
            assert!(why.contains("not an admin operation"), "{why}");
        }
        let allowed = [
            Command::RemoveDevice { id: "d1".into() },
            Command::SetAdminState {
                id: 1,
                state: AdminState::Draining,
            },
            Command::RemoveService {
                name: "poller".into(),
            },
        ];
        for cmd in allowed {
            assert_eq!(admin_may_write(&cmd), Ok(()), "{cmd}");
        }
    }
}
