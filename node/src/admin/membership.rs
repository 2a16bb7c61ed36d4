//! Membership changes on the leader: `node add` (asks the node who it is, adds it as a
//! learner, registers it, promotes it while there are fewer than [`MAX_VOTERS`] voters),
//! `node remove` and `leader transfer`.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::Command;
use spaced_raft::network::{RaftReply, RaftRpc};
use spaced_raft::{Member, NodeId};

use super::server::AdminServer;
use crate::cluster::{OpError, ProposeError};
use crate::now_millis;

/// A membership change Raft did not carry out: when this node no longer leads (it lost an
/// election while the change waited, say), the leader it knows of (or none), so that the
/// admin's client asks again there or waits out the election; else `what` failed.
fn membership_error<E>(
    e: openraft::error::RaftError<spaced_raft::TypeConfig, E>,
    what: impl FnOnce() -> String,
) -> OpError
where
    E: openraft::TryAsRef<openraft::error::ForwardToLeader<spaced_raft::TypeConfig>>
        + std::error::Error,
{
    match crate::cluster::not_leader(&e) {
        Some(redirect) => OpError::Propose(redirect),
        None => OpError::Raft(format!("{}: {e}", what())),
    }
}

/// Most voters the fabric keeps; further nodes stay learners (as etcd advises, 5 tolerates 2 failures).
pub const MAX_VOTERS: usize = 5;

impl AdminServer {
    pub(super) async fn add_node(
        &self,
        id: NodeId,
        name: String,
        addr: String,
        roles: Option<BTreeSet<String>>,
    ) -> Result<bool, OpError> {
        spaced_fabric::check_name("node name", &name)
            .map_err(|e| OpError::Refused(e.to_string()))?;
        let member = Member {
            name: name.clone(),
            addr: addr.clone(),
        };
        let membership = self.cluster.membership();
        // A learner that an earlier `node add` of the same node left so (leadership moved
        // before it was registered or promoted): the same command finishes the join.
        let learner = match membership.membership().get_node(&id) {
            None => false,
            Some(existing)
                if existing.name == name
                    && existing.addr == addr
                    && !membership.membership().voter_ids().any(|v| v == id) =>
            {
                true
            }
            Some(_) => return Err(OpError::Refused(format!("node {id} is already a member"))),
        };
        if let Some((other, _)) = membership
            .membership()
            .nodes()
            .find(|(other, n)| n.name == name && **other != id)
        {
            return Err(OpError::Refused(format!(
                "name {name:?} is already used by node {other}"
            )));
        }
        // Ask the node who it is before trusting it with the log.
        let desc = match self
            .cluster
            .call(id, &member, RaftRpc::Describe, Duration::from_secs(3))
            .await
        {
            Ok(RaftReply::Describe(d)) => d,
            Ok(other) => {
                return Err(OpError::Refused(format!(
                    "node at {addr}: unexpected reply {other:?}"
                )));
            }
            Err(e) => {
                return Err(OpError::Refused(format!(
                    "cannot reach node {name} at {addr}: {e}"
                )));
            }
        };
        if desc.id != id || desc.name != name {
            return Err(OpError::Refused(format!(
                "the node at {addr} is id {} named {:?}, not id {id} named {name:?}",
                desc.id, desc.name
            )));
        }
        let mine = self.placements.lease.terms();
        if desc.lease != mine {
            return Err(OpError::Refused(format!(
                "node {name} counts leases with {}, this cluster with {mine}: it could hold a \
                 VIP longer than the others assume; give it the same [lease] settings",
                desc.lease
            )));
        }
        let roles = roles.unwrap_or(desc.roles);
        if !learner {
            self.cluster
                .raft
                .add_learner(id, member, true)
                .await
                .map_err(|e| membership_error(e, || format!("add learner {id}")))?;
        }
        if self.cluster.view.read(|f| f.nodes.contains_key(&id)) {
            return self.promote(id).await;
        }
        let register = Command::RegisterNode {
            id,
            name,
            raft_addr: addr,
            mgmt_ip: None,
            roles,
            at: now_millis(),
        };
        if let Err(e) = self.cluster.propose(register).await {
            return Err(OpError::Refused(format!(
                "node {id} joined as learner but was not registered in the fabric: {e}"
            )));
        }
        self.promote(id).await
    }

    /// Makes learner `id` a voter, unless the cluster has [`MAX_VOTERS`] already (then `false`).
    async fn promote(&self, id: NodeId) -> Result<bool, OpError> {
        let voters = self.cluster.membership().membership().voter_ids().count();
        if voters >= MAX_VOTERS {
            return Ok(false);
        }
        self.cluster
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| {
                OpError::Raft(format!(
                    "node {id} joined as learner; promotion to voter failed: {e}"
                ))
            })?;
        Ok(true)
    }

    /// Removes a node from the membership and the fabric, and revokes the certificate it
    /// presents (read from this node's connection to it, dialed if need be, before it leaves),
    /// so that it cannot come back with it: `Ok` carries the revoked serial, `None` when the
    /// node could not be reached to read it (then `spacectl pki revoke` its certificate file).
    ///
    /// A leader asked to remove itself hands leadership to the voter furthest along first and
    /// answers "not the leader", naming the new one, which the client asks again: once its
    /// followers applied the new membership they would refuse it as a stranger, so it could
    /// commit nothing more (the fabric record and the revocation would never come).
    pub(super) async fn remove_node(&self, who: &str) -> Result<Option<String>, OpError> {
        let id = self.resolve_node(who)?;
        if id == self.cluster.id && self.cluster.raft.is_leader() {
            let to = self.successor().ok_or_else(|| {
                OpError::Refused(format!(
                    "node {id} is the only voter: a cluster cannot remove its last voter"
                ))
            })?;
            tracing::info!(
                node = id,
                to,
                "asked to remove itself while leading: handing leadership over first"
            );
            self.transfer_leader(&to.to_string()).await?;
            let (leader, addr) = self.cluster.leader();
            return Err(OpError::Propose(ProposeError::NotLeader(leader, addr)));
        }
        let member = self.cluster.member(id);
        let serial = match &member {
            Some(m) if id != self.cluster.id => {
                self.cluster
                    .peer_serial(id, m, Duration::from_secs(2))
                    .await
            }
            _ => None,
        };
        let is_voter = self.cluster.is_voter(id);
        if is_voter {
            self.cluster
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| membership_error(e, || format!("remove voter {id}")))?;
        }
        self.cluster
            .raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(|e| membership_error(e, || format!("remove node {id}")))?;
        let known = self.cluster.view.read(|f| f.nodes.contains_key(&id));
        if known && let Err(e) = self.cluster.propose(Command::RemoveNode { id }).await {
            // Membership already excludes it; the fabric record is cleaned on the next try.
            return Err(OpError::Refused(format!(
                "node {id} left the cluster but its fabric record stays: {e}"
            )));
        }
        let Some(serial) = serial else {
            tracing::warn!(
                node = id,
                "removed node's certificate not revoked: it could not be reached to read it"
            );
            return Ok(None);
        };
        let name = member.map(|m| m.name).unwrap_or_else(|| id.to_string());
        let revoke = Command::RevokeCertificate {
            serial: serial.clone(),
            identity: format!("node {name}"),
            reason: "node removed".into(),
            at: crate::now_millis(),
        };
        match self.cluster.propose(revoke).await {
            Ok(_) => Ok(Some(serial)),
            Err(e) => Err(OpError::Refused(format!(
                "node {id} left the cluster but its certificate (serial {serial}) is not revoked: \
                 {e}; revoke it with `spacectl pki revoke`"
            ))),
        }
    }

    /// On the leader: the other voter whose log is furthest along (the lowest id of those
    /// level), to lead in its place; `None` when it is the only voter.
    fn successor(&self) -> Option<NodeId> {
        let m = self.cluster.raft.metrics();
        let m = m.borrow_watched();
        let matched = m.replication.clone().unwrap_or_default();
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.cluster.id)
            .max_by_key(|v| {
                (
                    matched.get(v).copied().flatten().map(|l| l.index),
                    std::cmp::Reverse(*v),
                )
            })
    }

    pub(super) async fn transfer_leader(&self, who: &str) -> Result<(), OpError> {
        let to = self.resolve_node(who)?;
        if to == self.cluster.id {
            return Ok(());
        }
        let voter = self.cluster.is_voter(to);
        if !voter {
            return Err(OpError::Refused(format!(
                "node {to} is a learner; only voters can lead"
            )));
        }
        self.cluster
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| OpError::Raft(e.to_string()))?;
        let mut rx = self.cluster.raft.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if rx.borrow_watched().current_leader == Some(to) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(OpError::Refused(format!(
                        "node {to} did not take over leadership within 5 s"
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ProposeError;
    use openraft::error::{ClientWriteError, ForwardReason, ForwardToLeader, RaftError};
    use spaced_raft::TypeConfig;

    type WriteError = RaftError<TypeConfig, ClientWriteError<TypeConfig>>;

    #[test]
    fn a_membership_change_refused_for_want_of_the_lead_names_the_leader_to_ask() {
        // A leader whose quorum lease ran out (a loaded host) knows no leader: the client
        // is to wait and ask again, not to give up.
        let lapsed: WriteError = RaftError::APIError(ClientWriteError::ForwardToLeader(
            ForwardToLeader::empty().with_reason(ForwardReason::LeaseExpired),
        ));
        assert!(matches!(
            membership_error(lapsed, || "remove voter 3".into()),
            OpError::Propose(ProposeError::NotLeader(None, None))
        ));
        let elsewhere: WriteError =
            RaftError::APIError(ClientWriteError::ForwardToLeader(ForwardToLeader::new(
                2,
                Member {
                    name: "n2".into(),
                    addr: "10.0.0.2:7000".into(),
                },
            )));
        match membership_error(elsewhere, || "remove voter 3".into()) {
            OpError::Propose(ProposeError::NotLeader(Some(2), Some(addr))) => {
                assert_eq!(addr, "10.0.0.2:7000")
            }
            other => panic!("expected a redirect to node 2, got {other:?}"),
        }
    }

    #[test]
    fn a_membership_change_refused_for_another_reason_says_what_failed() {
        let fatal: WriteError = RaftError::Fatal(openraft::error::Fatal::Stopped);
        match membership_error(fatal, || "remove voter 3".into()) {
            OpError::Raft(text) => assert!(text.starts_with("remove voter 3: "), "{text}"),
            other => panic!("expected a Raft error, got {other:?}"),
        }
    }
}
