//! VIP operations: rows for `vip list` and `status`, `vip add` (asking the nodes first),
//! `vip move` (the owner releases first), registering the config's VIPs, and the graceful
//! hand-over of a stopping node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use spaced_fabric::plan::placements::eligible;
use spaced_fabric::{Command, PlacementKind};
use spaced_raft::NodeId;
use spaced_raft::network::{BoxFuture, RaftReply, RaftRpc};

use super::report::{RefusalRow, VipRow};
use super::{LIVE_WITHIN, Placements};
use crate::cluster::OpError;
use crate::ops::config::VipSection;
use crate::{lock, now_millis};

/// How long `vip add` waits for each node's answer to whether it could hold the VIP.
const CHECK_VIP_WITHIN: Duration = Duration::from_secs(2);

/// Nodes (name, reason) that said they cannot hold a VIP, and nodes (name, why) that were not
/// asked or did not answer.
pub type NodeAnswers = (Vec<(String, String)>, Vec<(String, String)>);

impl Placements {
    /// Registers the config's VIPs in the fabric (once; the first node to declare a name wins).
    /// While it cannot propose yet (no leader, not yet a member) a node looks again at every
    /// apply: a VIP that shows up meanwhile (another node registered it) is registered, and if
    /// an admin removes it afterwards it stays removed until this node's next start.
    pub async fn register_config_vips(self: Arc<Self>, vips: Vec<VipSection>) {
        let inner = &self.cluster;
        // Subscribed before the first look, so that every apply after it wakes the retry wait.
        let mut changes = inner.view.changes();
        for v in vips {
            let cmd = Command::AddPlacement {
                name: v.name.clone(),
                kind: PlacementKind::Vip {
                    address: v.address.clone(),
                    interface: v.interface.clone(),
                },
                eligible_roles: v.roles.iter().cloned().collect(),
            };
            loop {
                let known = inner
                    .view
                    .read(|f| f.placements.get(&v.name).map(|p| p.kind.clone()));
                match known {
                    Some(PlacementKind::Vip { address, .. }) if address == v.address => break,
                    Some(other) => {
                        tracing::error!(vip = %v.name, fabric = ?other, config = %v.address, "VIP in this node's config differs from the fabric's; the fabric's is kept");
                        break;
                    }
                    None => {}
                }
                match inner.propose_anywhere(cmd.clone()).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) => {
                        tracing::error!(vip = %v.name, error = %e, "VIP from config refused by the fabric");
                        break;
                    }
                    // Not proposable yet (no leader, not yet a member): look again at the
                    // next apply, which may bring the VIP from another node, or in 100 ms.
                    Err(_) => {
                        let wait = Duration::from_millis(100);
                        if let Ok(Err(_)) = tokio::time::timeout(wait, changes.changed()).await {
                            // The store is gone (the node stops): no busy loop meanwhile.
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
        }
    }

    /// Whether node `id` (this one or a peer) could hold a VIP: `Ok(None)` yes, `Ok(Some(why))`
    /// no, `Err` no answer.
    async fn check_vip_on(
        &self,
        id: NodeId,
        address: String,
        interface: String,
    ) -> Result<Option<String>, OpError> {
        let inner = &self.cluster;
        if id == inner.id {
            return Ok(self.check_vip_here(address, interface).await);
        }
        let member = inner
            .member(id)
            .ok_or_else(|| OpError::Peer("not a member".into()))?;
        let rpc = RaftRpc::CheckVip { address, interface };
        match inner.call(id, &member, rpc, CHECK_VIP_WITHIN).await {
            Ok(RaftReply::VipChecked(answer)) => Ok(answer),
            Ok(other) => Err(OpError::Peer(format!("unexpected reply {other:?}"))),
            Err(e) => Err(OpError::Peer(format!("no answer: {e}"))),
        }
    }

    /// Whether this node could hold a VIP (`None`) or why not.
    pub fn check_vip_here(
        &self,
        address: String,
        interface: String,
    ) -> BoxFuture<'static, Option<String>> {
        let spec = super::agent::VipSpec {
            name: String::new(),
            address,
            interface,
            service: None,
        };
        let check = self.backend.check(spec);
        Box::pin(async move { check.await.err().map(|e| e.to_string()) })
    }

    /// Rows for `vip list` / `status`, with the leader's view of lease time left.
    pub fn vip_rows(&self) -> Vec<VipRow> {
        let inner = &self.cluster;
        let span = self.lease.reassign_after();
        let known = self.lease_keys();
        let silences: BTreeMap<String, Duration> = known
            .iter()
            .map(|k| k.0.clone())
            .zip(self.shown_silence(&known))
            .collect();
        let now = now_millis();
        inner.view.read(|f| {
            f.placements
                .iter()
                .filter_map(|(name, p)| match &p.kind {
                    PlacementKind::Vip { address, interface } => Some(VipRow {
                        name: name.clone(),
                        address: address.clone(),
                        interface: interface.clone(),
                        roles: p.eligible_roles.iter().cloned().collect(),
                        owner: p.owner,
                        owner_name: p
                            .owner
                            .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone())),
                        epoch: p.epoch,
                        // Time until this node's witness would count the owner as silent.
                        lease_ms: p
                            .owner
                            .and(silences.get(name))
                            .map(|d| span.saturating_sub(*d).as_millis() as u64),
                        refused: RefusalRow::of(f, p, now),
                    }),
                    PlacementKind::Singleton { .. } => None,
                })
                .collect()
        })
    }

    /// `vip add` on the leader: asks every live node with one of the roles whether it could hold
    /// the VIP (interface present, address inside one of its subnets, capabilities) and refuses a
    /// VIP none of them can hold, naming each node's reason; nothing is added then. When some can,
    /// returns the nodes (name, reason) that said they cannot, and those (name, why) that were not
    /// asked or did not answer.
    pub async fn vip_add(
        &self,
        name: String,
        address: String,
        interface: String,
        roles: Vec<String>,
    ) -> Result<NodeAnswers, OpError> {
        let roles: BTreeSet<String> = roles.into_iter().collect();
        let answers = self
            .check_candidates(&name, &address, &interface, &roles, "added")
            .await?;
        let cmd = Command::AddPlacement {
            name,
            kind: PlacementKind::Vip { address, interface },
            eligible_roles: roles,
        };
        self.cluster.propose(cmd).await?;
        Ok(answers)
    }

    /// Asks every live node with one of `roles` whether it could hold the VIP; refuses (the
    /// VIP not `done`) when none can, naming each node's reason, else returns the nodes that
    /// cannot and those not asked or that did not answer.
    async fn check_candidates(
        &self,
        name: &str,
        address: &str,
        interface: &str,
        roles: &BTreeSet<String>,
        done: &str,
    ) -> Result<NodeAnswers, OpError> {
        let inner = &self.cluster;
        let candidates: Vec<(NodeId, String)> = inner.view.read(|f| {
            f.nodes
                .iter()
                .filter(|(_, n)| !n.roles.is_disjoint(&roles))
                .map(|(id, n)| (*id, n.name.clone()))
                .collect()
        });
        if candidates.is_empty() {
            return Err(OpError::Refused(format!(
                "no node has any of the roles {roles:?}; VIP {name:?} could never be placed"
            )));
        }
        let live = &inner.live_set(LIVE_WITHIN);
        let answers = futures::future::join_all(candidates.iter().map(|(id, node)| {
            let (address, interface) = (address.to_string(), interface.to_string());
            async move {
                let answer = if live.contains(id) {
                    self.check_vip_on(*id, address, interface).await
                } else {
                    Err(OpError::Peer("not live, so not asked".to_string()))
                };
                (node.clone(), answer)
            }
        }))
        .await;
        let mut can = 0;
        let mut cannot = Vec::new();
        let mut unknown = Vec::new();
        for (node, answer) in answers {
            match answer {
                Ok(None) => can += 1,
                Ok(Some(why)) => cannot.push((node, why)),
                Err(why) => unknown.push((node, why.to_string())),
            }
        }
        if can == 0 {
            let all: Vec<String> = cannot
                .iter()
                .chain(&unknown)
                .map(|(node, why)| format!("{node}: {why}"))
                .collect();
            return Err(OpError::Refused(format!(
                "VIP {name:?} ({address} on {interface}) not {done}: no node with one of the \
                 roles {roles:?} can hold it ({})",
                all.join("; ")
            )));
        }
        Ok((cannot, unknown))
    }

    /// `vip set` on the leader: a new address, interface or roles for VIP `name` (`None`
    /// keeps the current one). The nodes are asked as for `vip add`. Only the roles changing,
    /// and the owner keeping one of them: changed in place, the address stays up. Otherwise
    /// the owner fences the address and releases the VIP first (the planner may not grant it
    /// meanwhile), then the spec changes and the planner places it again. Nothing is
    /// released when the change would be refused. `Ok(None)`: nothing to change.
    pub async fn vip_set(
        &self,
        name: &str,
        address: Option<String>,
        interface: Option<String>,
        roles: Option<Vec<String>>,
    ) -> Result<Option<NodeAnswers>, OpError> {
        let inner = &self.cluster;
        let (current, owner, epoch) = inner.view.read(|f| match f.placements.get(name) {
            None => Err(OpError::Refused(format!("no VIP {name:?}"))),
            Some(p) => match &p.kind {
                PlacementKind::Vip { address, interface } => Ok((
                    (address.clone(), interface.clone(), p.eligible_roles.clone()),
                    p.owner,
                    p.epoch,
                )),
                PlacementKind::Singleton { .. } => Err(OpError::Refused(format!(
                    "{name:?} is a singleton service: its roles are the service's (`service set`)"
                ))),
            },
        })?;
        let address = address.unwrap_or_else(|| current.0.clone());
        let interface = interface.unwrap_or_else(|| current.1.clone());
        let roles: BTreeSet<String> = match roles {
            Some(r) => r.into_iter().collect(),
            None => current.2.clone(),
        };
        if (&address, &interface, &roles) == (&current.0, &current.1, &current.2) {
            return Ok(None);
        }
        let cmd = Command::SetPlacement {
            name: name.to_string(),
            kind: PlacementKind::Vip {
                address: address.clone(),
                interface: interface.clone(),
            },
            eligible_roles: roles.clone(),
        };
        // Would the fabric take it once the VIP is free? Asked before anything is released.
        inner
            .view
            .read(|f| {
                let mut free = f.clone();
                if let Some(p) = free.placements.get_mut(name) {
                    p.owner = None;
                }
                free.apply(&cmd)
            })
            .map_err(|e| OpError::Refused(e.to_string()))?;
        let answers = self
            .check_candidates(name, &address, &interface, &roles, "changed")
            .await?;
        let in_place = (&address, &interface) == (&current.0, &current.1)
            && owner.is_some_and(|o| {
                inner.view.read(|f| {
                    f.nodes
                        .get(&o)
                        .is_some_and(|n| !n.roles.is_disjoint(&roles))
                })
            });
        let held = if in_place {
            None
        } else {
            owner.map(|o| (o, epoch))
        };
        self.release_then(name, held, cmd).await?;
        Ok(Some(answers))
    }

    /// `vip move` on the leader: the owner fences and the release commits before the target is granted.
    pub async fn vip_move(&self, name: &str, to: NodeId) -> Result<u64, OpError> {
        let inner = &self.cluster;
        let (owner, epoch, ok, vip) = inner.view.read(|f| {
            let p = f
                .placements
                .get(name)
                .ok_or_else(|| OpError::Refused(format!("no VIP {name:?}")))?;
            let vip = match &p.kind {
                PlacementKind::Vip { address, interface } => {
                    Some((address.clone(), interface.clone()))
                }
                PlacementKind::Singleton { .. } => None,
            };
            Ok::<_, OpError>((p.owner, p.epoch, eligible(f, p, to), vip))
        })?;
        if !ok {
            return Err(OpError::Refused(format!(
                "node {to} is not eligible for {name:?} (roles or draining)"
            )));
        }
        if !inner.live_nodes(LIVE_WITHIN).contains(&to) {
            return Err(OpError::Refused(format!(
                "node {to} is not reachable from the leader"
            )));
        }
        if owner == Some(to) {
            return Err(OpError::Refused(format!(
                "{name:?} is already on node {to}"
            )));
        }
        // Ask the target before the owner lets go: a VIP it cannot hold would be given straight back.
        if let Some((address, interface)) = vip {
            match self.check_vip_on(to, address, interface).await {
                Ok(None) => {}
                Ok(Some(why)) => {
                    return Err(OpError::Refused(format!(
                        "node {to} cannot hold {name:?}: {why}"
                    )));
                }
                Err(e) => {
                    return Err(OpError::Refused(format!(
                        "node {to} did not say whether it can hold {name:?}: {e}"
                    )));
                }
            }
        }
        lock(&self.moves).insert(name.to_string(), to);
        let result = async {
            if let Some(o) = owner {
                self.release_from(name, o, epoch).await?;
            }
            // The planner grants it to `to` (preferred) on its next pass; wait for that.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let now_owner = inner
                    .view
                    .read(|f| f.placements.get(name).map(|p| (p.owner, p.epoch)));
                if let Some((Some(o), e)) = now_owner
                    && o == to
                {
                    return Ok(e);
                }
                if Instant::now() > deadline {
                    return Err(OpError::Refused(format!(
                        "{name:?} was released but not granted to node {to} within 3 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        .await;
        lock(&self.moves).remove(name);
        result
    }

    /// An operator's release of `name` held by `owner` at `epoch`: the owner fences (here or
    /// through the `Release` RPC), then the release commits. Nothing is released if the owner
    /// does not confirm that it fenced.
    pub(super) async fn release_from(
        &self,
        name: &str,
        owner: NodeId,
        epoch: u64,
    ) -> Result<(), OpError> {
        let inner = &self.cluster;
        if owner == inner.id {
            self.agent
                .fence_and_hold(name, epoch)
                .await
                .map_err(|e| OpError::Refused(e.to_string()))?;
        } else {
            let member = inner
                .member(owner)
                .ok_or_else(|| OpError::Refused(format!("owner {owner} is not a member")))?;
            let rpc = RaftRpc::Release {
                name: name.to_string(),
                epoch,
            };
            match inner
                .call(owner, &member, rpc, Duration::from_secs(2))
                .await
            {
                Ok(RaftReply::Released) => {}
                Ok(other) => {
                    return Err(OpError::Peer(format!(
                        "owner {owner}: unexpected reply {other:?}"
                    )));
                }
                Err(e) => {
                    return Err(OpError::Peer(format!(
                        "owner {owner} did not release {name:?}: {e}"
                    )));
                }
            }
        }
        inner
            .propose(Command::ReleasePlacement {
                name: name.to_string(),
                epoch,
            })
            .await?;
        Ok(())
    }

    /// `service remove` on the leader: a singleton held by a node is stopped there and
    /// released first (the planner may not grant it meanwhile), so its service can go; the
    /// fabric refuses to remove it while held.
    pub async fn remove_service(&self, name: &str) -> Result<(), OpError> {
        let held = self.cluster.view.read(|f| {
            f.placements
                .get(name)
                .and_then(|p| match (&p.kind, p.owner) {
                    (PlacementKind::Singleton { service }, Some(o)) if service == name => {
                        Some((o, p.epoch))
                    }
                    _ => None,
                })
        });
        let remove = Command::RemoveService {
            name: name.to_string(),
        };
        self.release_then(name, held, remove).await
    }

    /// `vip remove` on the leader: the owner, if any, fences the address and releases it
    /// first (the planner may not grant it meanwhile), then the VIP goes; the fabric refuses
    /// to remove a held placement.
    pub async fn vip_remove(&self, name: &str) -> Result<(), OpError> {
        let held = self.cluster.view.read(|f| match f.placements.get(name) {
            None => Err(OpError::Refused(format!("no VIP {name:?}"))),
            Some(p) => match &p.kind {
                PlacementKind::Vip { .. } => Ok(p.owner.map(|o| (o, p.epoch))),
                PlacementKind::Singleton { .. } => Err(OpError::Refused(format!(
                    "{name:?} is a singleton service: use `service remove`"
                ))),
            },
        })?;
        let remove = Command::RemovePlacement {
            name: name.to_string(),
        };
        self.release_then(name, held, remove).await
    }

    /// Withholds placement `name` from the planner, has its owner (`held`: owner and epoch)
    /// fence and release it, then proposes `remove`.
    async fn release_then(
        &self,
        name: &str,
        held: Option<(NodeId, u64)>,
        remove: Command,
    ) -> Result<(), OpError> {
        lock(&self.withheld).insert(name.to_string());
        let result = async {
            if let Some((owner, epoch)) = held {
                self.release_from(name, owner, epoch).await?;
            }
            self.cluster.propose(remove).await?;
            Ok(())
        }
        .await;
        lock(&self.withheld).remove(name);
        result
    }

    /// Tells the leader (or this node's own planner, when it leads) not to grant this node
    /// anything back while it stops. Best effort: without it a re-grant just lapses.
    async fn tell_leader_leaving(&self) {
        let inner = &self.cluster;
        let leader = inner.raft.metrics().borrow_watched().current_leader;
        match leader {
            Some(l) if l == inner.id => {
                inner.leaving(inner.id);
            }
            Some(l) => {
                let Some(member) = inner.member(l) else {
                    return;
                };
                if let Err(e) = inner
                    .call(l, &member, RaftRpc::Leaving, Duration::from_secs(1))
                    .await
                {
                    tracing::warn!(leader = l, error = %e, "could not tell the leader this node is leaving");
                }
            }
            None => {}
        }
    }

    /// Graceful stop: fence and release every VIP, let the leader re-grant them, and hand
    /// leadership to another voter if this node leads.
    pub async fn hand_over(&self) {
        let inner = &self.cluster;
        let held = self.agent.stop().await;
        self.tell_leader_leaving().await;
        for (name, epoch) in &held {
            match inner
                .propose_anywhere(Command::ReleasePlacement {
                    name: name.clone(),
                    epoch: *epoch,
                })
                .await
            {
                Ok(Ok(_)) => tracing::info!(vip = %name, epoch, "released for hand-over"),
                Ok(Err(e)) => tracing::warn!(vip = %name, error = %e, "release refused"),
                Err(e) => {
                    tracing::warn!(vip = %name, error = %e, "release not delivered; the lease will run out")
                }
            }
        }
        if !inner.raft.is_leader() {
            return;
        }
        // Let this node's planner grant the released placements elsewhere before it stops leading.
        let deadline = Instant::now() + Duration::from_secs(1);
        let names: Vec<String> = held.iter().map(|(n, _)| n.clone()).collect();
        while Instant::now() < deadline {
            let done = inner.view.read(|f| {
                names.iter().all(|n| {
                    f.placements
                        .get(n)
                        .is_none_or(|p| p.owner.is_some_and(|o| o != inner.id))
                })
            });
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The voter heard from most recently is the best placed to lead.
        let contacts = inner.contacts();
        let target = inner
            .voters()
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| *v != inner.id)
            .min_by_key(|v| contacts.get(v).copied().flatten().unwrap_or(Duration::MAX));
        if let Some(to) = target {
            if let Err(e) = inner.raft.trigger().transfer_leader(to).await {
                tracing::warn!(to, error = %e, "leadership transfer on shutdown failed");
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline && inner.raft.is_leader() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tracing::info!(to, "leadership handed over");
        }
    }
}
