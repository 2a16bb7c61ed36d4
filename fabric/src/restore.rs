//! A fabric restored from a backup into a new cluster (`spaced restore`).
//!
//! The backup's cluster is gone, and the new one starts with one node: the one restoring. What
//! the operator declared stays (VIPs, singletons, services, devices, revoked certificates);
//! what belonged to the old cluster's running nodes goes. Every placement and device loses
//! its owner (a placement's epoch moves on, as at every owner change), and every node record
//! but the restoring node's is dropped: the other nodes join the new cluster as new ones, and
//! the leader grants and assigns again once they are up.

use crate::NodeId;
use crate::model::{DeviceStatus, Fabric, NodeRecord};

impl Fabric {
    /// This fabric as the first state of a new cluster whose only node is `me` (`record`).
    pub fn restored_for(mut self, me: NodeId, record: NodeRecord) -> Fabric {
        self.nodes.clear();
        self.nodes.insert(me, record);
        for p in self.placements.values_mut() {
            if p.owner.take().is_some() {
                p.epoch += 1;
            }
            p.refused.clear();
        }
        for d in self.devices.values_mut() {
            d.owner = None;
            d.status = DeviceStatus::Unassigned;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::model::*;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            raft_addr: format!("{name}:7000"),
            mgmt_ip: None,
            roles: ["ha".to_string()].into(),
            admin_state: AdminState::Active,
            joined_at: 1,
            version: String::new(),
        }
    }

    #[test]
    fn a_restored_fabric_keeps_what_was_declared_and_drops_who_held_it() {
        let mut f = Fabric::default();
        f.nodes.insert(1, node("a"));
        f.nodes.insert(2, node("b"));
        f.placements.insert(
            "web".into(),
            Placement {
                kind: PlacementKind::Vip {
                    address: "10.0.0.9/24".into(),
                    interface: "eth0".into(),
                },
                eligible_roles: ["ha".to_string()].into(),
                owner: Some(2),
                epoch: 41,
                refused: BTreeMap::from([(
                    1,
                    Refusal {
                        reason: "no eth0".into(),
                        at: 5,
                    },
                )]),
            },
        );
        f.placements.insert(
            "idle".into(),
            Placement {
                kind: PlacementKind::Singleton {
                    service: "cron".into(),
                },
                eligible_roles: ["ha".to_string()].into(),
                owner: None,
                epoch: 7,
                refused: BTreeMap::new(),
            },
        );
        f.devices.insert(
            "d1".into(),
            Device {
                addr: "192.0.2.1:830".into(),
                mode: DeviceMode::SpaceInitiated,
                owner: Some(2),
                status: DeviceStatus::Up,
                since: 9,
            },
        );
        f.revoked.insert(
            "0a".into(),
            Revocation {
                identity: "old.node.spaced".into(),
                reason: "removed".into(),
                at: 3,
            },
        );
        let r = f.clone().restored_for(3, node("c"));
        assert_eq!(r.nodes.keys().collect::<Vec<_>>(), vec![&3]);
        assert_eq!(r.nodes[&3].name, "c");
        let web = &r.placements["web"];
        assert_eq!(
            (web.owner, web.epoch),
            (None, 42),
            "an owner change moves the epoch on"
        );
        assert!(web.refused.is_empty());
        assert_eq!(r.placements["idle"].epoch, 7, "no owner, no change");
        let d = &r.devices["d1"];
        assert_eq!((d.owner, d.status), (None, DeviceStatus::Unassigned));
        assert_eq!(d.addr, "192.0.2.1:830");
        assert_eq!(r.revoked, f.revoked);
        assert_eq!(r.services, f.services);
    }
}
