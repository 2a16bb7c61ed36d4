//! `Fabric::apply`: validates a command against the current state and applies it, one file per
//! command group. Deterministic (no clock: the proposer stamps times), never panics, and a
//! refused command changes nothing.

mod devices;
mod nodes;
mod placements;
mod services;
mod site;

pub use nodes::recorded_format;

use crate::command::{Command, CommandError, Outcome};
use crate::model::Fabric;

impl Fabric {
    /// [`Fabric::apply_at`] as the first entry of a log (index 0): for tests and tools that
    /// build a fabric by hand. The replicated state machine applies with the entry's index.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, CommandError> {
        self.apply_at(0, cmd)
    }

    /// Validates `cmd`, the log entry at `index`, against the current state and applies it; on
    /// error nothing changed.
    ///
    /// The index makes fencing epochs unique for the life of the cluster: a placement created
    /// by the entry at index `i` starts at epoch `i`, and each of its owner changes (one entry
    /// each, so at an index past `i`) adds one, so every epoch it reaches is at most the index
    /// of the entry that set it. A placement removed and added again (a later entry) thus
    /// starts above every epoch the old one had, and a lease, renewal or guard of the old one
    /// can never be taken for the new one.
    pub fn apply_at(&mut self, index: u64, cmd: &Command) -> Result<Outcome, CommandError> {
        self.site_allows(cmd)?;
        self.apply_allowed(index, cmd)
    }

    /// [`Fabric::apply_at`] past the site's role check (a standby applies mirrored changes
    /// through it).
    fn apply_allowed(&mut self, index: u64, cmd: &Command) -> Result<Outcome, CommandError> {
        self.format_allows(cmd)?;
        match cmd {
            Command::RegisterNode {
                id,
                name,
                raft_addr,
                mgmt_ip,
                roles,
                at,
            } => self.register_node(id, name, raft_addr, mgmt_ip, roles, at),
            Command::RemoveNode { id } => self.remove_node(id),
            Command::SetRoles { id, roles } => self.set_roles(id, roles),
            Command::SetAdminState { id, state } => self.set_admin_state(id, state),
            Command::SetMgmtIp { id, mgmt_ip } => self.set_mgmt_ip(id, mgmt_ip),
            Command::SetVersion { id, version } => self.set_version(id, version),
            Command::RevokeCertificate {
                serial,
                identity,
                reason,
                at,
            } => self.revoke_certificate(serial, identity, reason, *at),
            Command::AddPlacement {
                name,
                kind,
                eligible_roles,
            } => self.add_placement(name, kind, eligible_roles, index),
            Command::RemovePlacement { name } => self.remove_placement(name),
            Command::GrantPlacement {
                name,
                to,
                expected_epoch,
            } => self.grant_placement(name, to, expected_epoch),
            Command::ReleasePlacement { name, epoch } => self.release_placement(name, epoch),
            Command::RefusePlacement {
                name,
                node,
                epoch,
                reason,
                at,
            } => self.refuse_placement(name, node, epoch, reason, at),
            Command::AddDevices { devices, at } => self.add_devices(devices, at),
            Command::RemoveDevice { id } => self.remove_device(id),
            Command::RemoveDevices { ids } => self.remove_devices(ids),
            Command::PutService { name, spec } => self.put_service(name, spec, index),
            Command::RemoveService { name } => self.remove_service(name),
            Command::AssignDevices { assignments, at } => self.assign_devices(assignments, *at),
            Command::ReportDeviceStatus { node, reports, at } => {
                self.report_device_status(*node, reports, *at)
            }
            Command::SetSiteRole { role, epoch, at } => self.set_site_role(*role, *epoch, *at),
            Command::Mirror { changes, position } => self.mirror(index, changes, position),
            Command::SetAutoFailover { off_until } => {
                self.site.automatic_failover_off_until = *off_until;
                Ok(Outcome::Done)
            }
            Command::Probe { bytes } if bytes.len() > crate::MAX_PROBE_BYTES => {
                Err(CommandError::Invalid {
                    what: "probe".into(),
                    value: format!("{} bytes", bytes.len()),
                    why: format!("at most {} bytes", crate::MAX_PROBE_BYTES),
                })
            }
            Command::Probe { .. } => Ok(Outcome::Done),
            Command::SetPlacement {
                name,
                kind,
                eligible_roles,
            } => self.set_placement(name, kind, eligible_roles),
            Command::SetDevice { device, at } => self.set_device(device, at),
        }
    }
}

#[cfg(test)]
mod tests;
