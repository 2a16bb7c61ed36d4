//! Limits on the unauthenticated device port (7804): hellos in flight, in all and per source
//! address, and how soon a device that is up on another node may be claimed from it. Pure:
//! time is passed in.
//!
//! A device proves nothing but its id (the model's devices call in with a plain hello), so
//! anyone who knows an id can claim it. These limits bound what that costs: a source cannot
//! hold more than a few half-open hellos, and a device that came up on a node cannot be taken
//! from it again before [`CLAIM_HOLD_MS`], so a claim war costs one Raft write and one dropped
//! connection per device every two seconds, not as many as a loop can send.
//!
//! The hold is checked twice: by the node that read the hello (on its own view, to answer at
//! once) and by the leader when the claim reaches it ([`claim_held_elsewhere`] on the leader's
//! view), since a follower's view may not yet show that the device came up elsewhere.

use std::collections::HashMap;
use std::net::IpAddr;

use spaced_fabric::{Command, DeviceStatus, Fabric, Millis, NodeId};

/// Hellos being read at once, from every source together.
pub const HELLOS_IN_FLIGHT: usize = 512;
/// Hellos being read at once from one source address.
pub const HELLOS_PER_SOURCE: usize = 16;
/// A device up on another node for less than this (by its `since`) is not claimed from it.
pub const CLAIM_HOLD_MS: Millis = 2_000;

/// Why a connection to the device port is turned away before its hello is read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    /// Too many hellos are being read from everywhere.
    #[error("busy: {0} device hellos in flight; try again")]
    Busy(usize),
    /// Too many hellos are being read from this source.
    #[error("busy: {count} device hellos in flight from {from}; try again")]
    BusySource {
        /// The source address.
        from: IpAddr,
        /// Its hellos in flight.
        count: usize,
    },
}

/// Counts the hellos in flight.
#[derive(Debug, Default)]
pub struct HelloGate {
    in_flight: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl HelloGate {
    /// Admits one more hello from `source`, or says why not. Every admitted hello must be
    /// [`done`](Self::done) once.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), GateRefusal> {
        if self.in_flight >= HELLOS_IN_FLIGHT {
            return Err(GateRefusal::Busy(self.in_flight));
        }
        let count = self.per_source.entry(source).or_default();
        if *count >= HELLOS_PER_SOURCE {
            return Err(GateRefusal::BusySource {
                from: source,
                count: *count,
            });
        }
        *count += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// A hello admitted from `source` ended (read, refused or timed out).
    pub fn done(&mut self, source: IpAddr) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// Whether a device that is `up` on another node since `since` may be claimed at `now`;
/// `Err` is how long to wait.
pub fn may_take_over(up_elsewhere_since: Option<Millis>, now: Millis) -> Result<(), Millis> {
    match up_elsewhere_since {
        Some(since) if now.saturating_sub(since) < CLAIM_HOLD_MS => {
            Err(CLAIM_HOLD_MS - now.saturating_sub(since))
        }
        _ => Ok(()),
    }
}

/// A claim the hold refuses: `device` came up on `node` too recently; retry in `wait_ms`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device:?} came up on node {node} less than 2 s ago; try again in {wait_ms} ms")]
pub struct HeldElsewhere {
    /// The device.
    pub device: String,
    /// The node it is up on.
    pub node: NodeId,
    /// How long to wait.
    pub wait_ms: Millis,
}

/// Whether `claimer` may take `device` at `now` as `fabric` sees it: `Err` when the device is
/// up on another node since less than [`CLAIM_HOLD_MS`]. Unknown devices pass (the fabric
/// refuses them itself).
pub fn device_held_elsewhere(
    fabric: &Fabric,
    device: &str,
    claimer: NodeId,
    now: Millis,
) -> Result<(), HeldElsewhere> {
    let Some(d) = fabric.devices.get(device) else {
        return Ok(());
    };
    match d.owner {
        Some(node) if node != claimer => {
            let up_since = (d.status == DeviceStatus::Up).then_some(d.since);
            may_take_over(up_since, now).map_err(|wait_ms| HeldElsewhere {
                device: device.to_string(),
                node,
                wait_ms,
            })
        }
        _ => Ok(()),
    }
}

/// The leader's check of a node's claim (`AssignDevices` to the proposer, forwarded to it):
/// every device it takes from another node must be past its hold.
pub fn claim_held_elsewhere(
    fabric: &Fabric,
    claimer: NodeId,
    cmd: &Command,
    now: Millis,
) -> Result<(), HeldElsewhere> {
    if let Command::AssignDevices { assignments, .. } = cmd {
        for a in assignments.iter().filter(|a| a.to == Some(claimer)) {
            device_held_elsewhere(fabric, &a.device, claimer, now)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_are_bounded_in_all_and_per_source() {
        let mut gate = HelloGate::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..HELLOS_PER_SOURCE {
            gate.admit(a).unwrap();
        }
        assert!(matches!(
            gate.admit(a),
            Err(GateRefusal::BusySource {
                count: HELLOS_PER_SOURCE,
                ..
            })
        ));
        // Another source still gets in, and a finished hello frees a place.
        gate.admit(b).unwrap();
        gate.done(a);
        gate.admit(a).unwrap();
        // The total bound holds across sources.
        let mut gate = HelloGate::default();
        for i in 0..HELLOS_IN_FLIGHT {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            gate.admit(ip).unwrap();
        }
        assert!(matches!(gate.admit(b), Err(GateRefusal::Busy(_))));
    }

    #[test]
    fn a_device_just_up_elsewhere_is_not_taken_over() {
        assert_eq!(may_take_over(None, 10_000), Ok(()));
        assert_eq!(may_take_over(Some(9_500), 10_000), Err(1_500));
        assert_eq!(may_take_over(Some(8_000), 10_000), Ok(()));
        // A clock behind the stamp waits the whole hold, no more.
        assert_eq!(may_take_over(Some(12_000), 10_000), Err(CLAIM_HOLD_MS));
    }

    #[test]
    fn the_leader_refuses_a_claim_of_a_device_just_up_elsewhere() {
        use spaced_fabric::{Device, DeviceAssignment, DeviceMode};
        let mut f = Fabric::default();
        let device = |owner, status, since| Device {
            addr: "192.0.2.1".into(),
            mode: DeviceMode::DeviceInitiated,
            owner,
            status,
            since,
        };
        let claim = |from| Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d".into(),
                from,
                to: Some(3),
            }],
            at: 0,
        };
        // Up on node 2 for 500 ms: node 3's claim (made from a view where node 2 had not
        // reported it up yet) is refused for the remaining 1.5 s.
        f.devices
            .insert("d".into(), device(Some(2), DeviceStatus::Up, 10_000));
        assert_eq!(
            claim_held_elsewhere(&f, 3, &claim(Some(2)), 10_500),
            Err(HeldElsewhere {
                device: "d".into(),
                node: 2,
                wait_ms: 1_500
            })
        );
        // Past the hold, or not up (connecting, down), or unassigned: the claim may go on.
        assert_eq!(claim_held_elsewhere(&f, 3, &claim(Some(2)), 12_000), Ok(()));
        for (owner, status) in [
            (Some(2), DeviceStatus::Connecting),
            (Some(2), DeviceStatus::Down),
            (None, DeviceStatus::Connecting),
        ] {
            f.devices.insert("d".into(), device(owner, status, 10_000));
            assert_eq!(claim_held_elsewhere(&f, 3, &claim(owner), 10_500), Ok(()));
        }
        // A node's own device is not held from it.
        f.devices
            .insert("d".into(), device(Some(3), DeviceStatus::Up, 10_000));
        assert_eq!(device_held_elsewhere(&f, "d", 3, 10_500), Ok(()));
    }
}
