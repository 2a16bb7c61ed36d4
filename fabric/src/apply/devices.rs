//! Commands on devices: add, remove, assign (compare-and-set on the owner), status reports.
//! Each validates the whole batch first, then changes; never panics.

use std::collections::BTreeSet;

use crate::NodeId;
use crate::command::{CommandError, Outcome};
use crate::model::{
    AdminState, DEVICE_ROLE, Device, DeviceAssignment, DeviceReport, DeviceStatus, Fabric,
    MAX_DEVICES_PER_COMMAND, Millis, NewDevice,
};
use crate::validate::{check_device_addr, check_device_id, exists, invalid, not_found};

impl Fabric {
    pub(super) fn add_devices(
        &mut self,
        devices: &[NewDevice],
        at: &Millis,
    ) -> Result<Outcome, CommandError> {
        if devices.is_empty() {
            return Err(invalid("device list", "", "empty"));
        }
        if devices.len() > MAX_DEVICES_PER_COMMAND {
            return Err(invalid(
                "device list",
                &devices.len().to_string(),
                &format!("at most {MAX_DEVICES_PER_COMMAND} devices per command"),
            ));
        }
        let mut seen = BTreeSet::new();
        for d in devices {
            check_device_id(&d.id)?;
            check_device_addr(&d.addr)?;
            if self.devices.contains_key(&d.id) || !seen.insert(d.id.as_str()) {
                return Err(exists("device", &d.id));
            }
        }
        for d in devices {
            self.devices.insert(
                d.id.clone(),
                Device {
                    addr: d.addr.clone(),
                    mode: d.mode,
                    owner: None,
                    status: DeviceStatus::Unassigned,
                    since: *at,
                },
            );
        }
        Ok(Outcome::DevicesAdded(devices.len() as u64))
    }

    /// `device set`: a new address or mode; the owner keeps the device and connects anew.
    pub(super) fn set_device(
        &mut self,
        new: &NewDevice,
        at: &Millis,
    ) -> Result<Outcome, CommandError> {
        check_device_addr(&new.addr)?;
        let d = self
            .devices
            .get_mut(&new.id)
            .ok_or_else(|| not_found("device", &new.id))?;
        if d.addr == new.addr && d.mode == new.mode {
            return Ok(Outcome::Done);
        }
        d.addr = new.addr.clone();
        d.mode = new.mode;
        if d.owner.is_some() {
            d.status = DeviceStatus::Connecting;
            d.since = *at;
        }
        Ok(Outcome::Done)
    }

    pub(super) fn remove_device(&mut self, id: &String) -> Result<Outcome, CommandError> {
        self.devices
            .remove(id)
            .ok_or_else(|| not_found("device", id))?;
        Ok(Outcome::Done)
    }

    pub(super) fn remove_devices(&mut self, ids: &[String]) -> Result<Outcome, CommandError> {
        check_device_batch("device id list", ids.len())?;
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(id.as_str()) {
                return Err(invalid("device id list", id, "device listed twice"));
            }
        }
        let mut removed = 0;
        let mut missing = Vec::new();
        for id in ids {
            if self.devices.remove(id).is_some() {
                removed += 1;
            } else {
                missing.push(id.clone());
            }
        }
        Ok(Outcome::DevicesRemoved { removed, missing })
    }

    pub(super) fn assign_devices(
        &mut self,
        assignments: &[DeviceAssignment],
        at: Millis,
    ) -> Result<Outcome, CommandError> {
        check_device_batch("assignment list", assignments.len())?;
        let mut seen = BTreeSet::new();
        for a in assignments {
            let device = self
                .devices
                .get(&a.device)
                .ok_or_else(|| not_found("device", &a.device))?;
            if !seen.insert(a.device.as_str()) {
                return Err(invalid("assignment list", &a.device, "device listed twice"));
            }
            if device.owner != a.from {
                return Err(CommandError::DeviceOwnerChanged {
                    device: a.device.clone(),
                    expected: a.from,
                    current: device.owner,
                });
            }
            if a.to == a.from {
                let why = match a.to {
                    Some(n) => format!("already held by node {n}"),
                    None => "already unassigned".into(),
                };
                return Err(invalid("device assignment", &a.device, &why));
            }
            if let Some(to) = a.to {
                let refuse = |why: &str| CommandError::DeviceOwnerNotEligible {
                    device: a.device.clone(),
                    node: to,
                    why: why.into(),
                };
                let node = self
                    .nodes
                    .get(&to)
                    .ok_or_else(|| refuse("not a registered node"))?;
                if node.admin_state != AdminState::Active {
                    return Err(refuse("node is draining"));
                }
                if !node.roles.contains(DEVICE_ROLE) {
                    return Err(refuse(&format!("needs the role {DEVICE_ROLE:?}")));
                }
            }
        }
        for a in assignments {
            if let Some(d) = self.devices.get_mut(&a.device) {
                d.owner = a.to;
                d.status = match a.to {
                    Some(_) => DeviceStatus::Connecting,
                    None => DeviceStatus::Unassigned,
                };
                d.since = at;
            }
        }
        Ok(Outcome::DevicesAssigned(assignments.len() as u64))
    }

    pub(super) fn report_device_status(
        &mut self,
        node: NodeId,
        reports: &[DeviceReport],
        at: Millis,
    ) -> Result<Outcome, CommandError> {
        check_device_batch("status report", reports.len())?;
        let mut seen = BTreeSet::new();
        for r in reports {
            if !matches!(r.status, DeviceStatus::Up | DeviceStatus::Down) {
                return Err(invalid(
                    "device status",
                    &r.status.to_string(),
                    &format!("a node reports only up or down (device {:?})", r.device),
                ));
            }
            if !seen.insert(r.device.as_str()) {
                return Err(invalid("status report", &r.device, "device listed twice"));
            }
        }
        let (mut changed, mut stale) = (0u64, 0u64);
        for r in reports {
            match self.devices.get_mut(&r.device) {
                Some(d) if d.owner == Some(node) => {
                    if d.status != r.status {
                        d.status = r.status;
                        d.since = at;
                        changed += 1;
                    }
                }
                _ => stale += 1,
            }
        }
        Ok(Outcome::DevicesReported { changed, stale })
    }
}

/// Refuses an empty batch or one over [`MAX_DEVICES_PER_COMMAND`].
fn check_device_batch(what: &str, len: usize) -> Result<(), CommandError> {
    if len == 0 {
        return Err(invalid(what, "", "empty"));
    }
    if len > MAX_DEVICES_PER_COMMAND {
        return Err(invalid(
            what,
            &len.to_string(),
            &format!("at most {MAX_DEVICES_PER_COMMAND} devices per command"),
        ));
    }
    Ok(())
}
