//! Commands on nodes: register, remove, roles, admin state, management IP; certificate
//! revocation.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::NodeId;
use crate::command::{Command, CommandError, Outcome, SET_COMMANDS_FORMAT};
use crate::model::{
    AdminState, DeviceStatus, Fabric, MAX_REVOCATION_REASON, Millis, NodeRecord, Revocation,
};
use crate::validate::{check_mgmt_ip, check_name, exists, invalid, not_found};

/// The data format a node's recorded version names (it ends in `data format N`), if any.
pub fn recorded_format(version: &str) -> Option<u32> {
    let (_, after) = version.rsplit_once("data format ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Fabric {
    /// The nodes (id, name, recorded format) that do not yet run data format `format`: their
    /// recorded version names an older one, or none (not recorded yet).
    pub fn nodes_below_format(&self, format: u32) -> Vec<(NodeId, String, Option<u32>)> {
        self.nodes
            .iter()
            .map(|(id, n)| (*id, n.name.clone(), recorded_format(&n.version)))
            .filter(|(_, _, f)| f.is_none_or(|f| f < format))
            .collect()
    }

    /// Commands that an older build cannot decode wait until every node runs the format that
    /// brought them (during a rolling upgrade, until the last node is upgraded). The leader
    /// asks this before it proposes such a command: the log entry itself would reach the
    /// nodes that cannot decode it.
    pub fn format_allows(&self, cmd: &Command) -> Result<(), CommandError> {
        if !matches!(
            cmd,
            Command::SetPlacement { .. } | Command::SetDevice { .. }
        ) {
            return Ok(());
        }
        let behind = self.nodes_below_format(SET_COMMANDS_FORMAT);
        if behind.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = behind
            .iter()
            .map(|(id, name, f)| match f {
                Some(f) => format!("{name} (node {id}) runs data format {f}"),
                None => format!("{name} (node {id}) has recorded no version yet"),
            })
            .collect();
        Err(invalid(
            "data format",
            &SET_COMMANDS_FORMAT.to_string(),
            &format!(
                "{cmd} needs every node on data format {SET_COMMANDS_FORMAT} or later (finish \
                 the rolling upgrade first): {}",
                names.join(", ")
            ),
        ))
    }

    pub(super) fn set_version(
        &mut self,
        id: &NodeId,
        version: &str,
    ) -> Result<Outcome, CommandError> {
        if version.is_empty() || version.len() > 200 || version.chars().any(char::is_control) {
            return Err(invalid(
                "node version",
                &version[..version.floor_char_boundary(40)],
                "must be 1 to 200 printable characters",
            ));
        }
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| not_found("node", id))?;
        node.version = version.to_string();
        Ok(Outcome::Done)
    }

    pub(super) fn revoke_certificate(
        &mut self,
        serial: &str,
        identity: &str,
        reason: &str,
        at: Millis,
    ) -> Result<Outcome, CommandError> {
        let hex = serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if serial.is_empty() || serial.len() > 40 || !hex {
            return Err(invalid(
                "certificate serial",
                serial,
                "must be 1 to 40 lowercase hex digits",
            ));
        }
        if serial.len() > 1 && serial.starts_with('0') {
            return Err(invalid(
                "certificate serial",
                serial,
                "must not start with 0 (the number in hex, without padding)",
            ));
        }
        if identity.is_empty() || identity.len() > 80 {
            return Err(invalid(
                "certificate identity",
                identity,
                "must be 1 to 80 characters",
            ));
        }
        if reason.len() > MAX_REVOCATION_REASON {
            return Err(invalid(
                "revocation reason",
                &reason[..reason.floor_char_boundary(40)],
                &format!("longer than {MAX_REVOCATION_REASON} bytes"),
            ));
        }
        self.revoked
            .entry(serial.to_string())
            .or_insert_with(|| Revocation {
                identity: identity.to_string(),
                reason: reason.to_string(),
                at,
            });
        Ok(Outcome::Done)
    }

    pub(super) fn register_node(
        &mut self,
        id: &NodeId,
        name: &String,
        raft_addr: &String,
        mgmt_ip: &Option<IpAddr>,
        roles: &BTreeSet<String>,
        at: &Millis,
    ) -> Result<Outcome, CommandError> {
        check_name("node name", name)?;
        roles.iter().try_for_each(|r| check_name("role", r))?;
        if raft_addr.is_empty() {
            return Err(invalid("node address", raft_addr, "must not be empty"));
        }
        if let Some(ip) = mgmt_ip {
            check_mgmt_ip(ip)?;
        }
        if self.nodes.contains_key(id) {
            return Err(exists("node", id));
        }
        if self.nodes.values().any(|n| &n.name == name) {
            return Err(exists("node name", name));
        }
        self.nodes.insert(
            *id,
            NodeRecord {
                name: name.clone(),
                raft_addr: raft_addr.clone(),
                mgmt_ip: *mgmt_ip,
                roles: roles.clone(),
                admin_state: AdminState::Active,
                joined_at: *at,
                version: String::new(),
            },
        );
        Ok(Outcome::Done)
    }

    pub(super) fn remove_node(&mut self, id: &NodeId) -> Result<Outcome, CommandError> {
        if self.nodes.remove(id).is_none() {
            return Err(not_found("node", id));
        }
        for p in self.placements.values_mut() {
            p.refused.remove(id);
        }
        // Placements keep their owner: it may still hold a running lease, and only the
        // leader's lease book knows when that has certainly run out.
        for d in self.devices.values_mut() {
            if d.owner == Some(*id) {
                d.owner = None;
                d.status = DeviceStatus::Unassigned;
            }
        }
        Ok(Outcome::Done)
    }

    pub(super) fn set_roles(
        &mut self,
        id: &NodeId,
        roles: &BTreeSet<String>,
    ) -> Result<Outcome, CommandError> {
        roles.iter().try_for_each(|r| check_name("role", r))?;
        self.node_mut(*id)?.roles = roles.clone();
        Ok(Outcome::Done)
    }

    pub(super) fn set_admin_state(
        &mut self,
        id: &NodeId,
        state: &AdminState,
    ) -> Result<Outcome, CommandError> {
        self.node_mut(*id)?.admin_state = *state;
        Ok(Outcome::Done)
    }

    pub(super) fn set_mgmt_ip(
        &mut self,
        id: &NodeId,
        mgmt_ip: &Option<IpAddr>,
    ) -> Result<Outcome, CommandError> {
        if let Some(ip) = mgmt_ip {
            check_mgmt_ip(ip)?;
        }
        self.node_mut(*id)?.mgmt_ip = *mgmt_ip;
        Ok(Outcome::Done)
    }

    /// The registered node `id`, for a command that changes it.
    fn node_mut(&mut self, id: NodeId) -> Result<&mut NodeRecord, CommandError> {
        self.nodes.get_mut(&id).ok_or_else(|| not_found("node", id))
    }
}
