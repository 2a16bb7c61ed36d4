//! Tests of `Fabric::apply`: validation, fencing epochs, devices, services, determinism.

/// The bincode configuration spaced's log and snapshots use (the raft crate's `codec`), so the
/// round trips below are the ones the store makes.
mod codec {
    use serde::{Serialize, de::DeserializeOwned};

    fn config() -> impl bincode::config::Config {
        bincode::config::standard().with_limit::<{ 1 << 30 }>()
    }
    pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
        bincode::serde::encode_to_vec(v, config())
    }
    pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(b, config()).map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use crate::*;
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    fn roles(r: &[&str]) -> BTreeSet<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    fn register(id: NodeId, name: &str, r: &[&str]) -> Command {
        Command::RegisterNode {
            id,
            name: name.into(),
            raft_addr: format!("127.0.0.1:{}", 7000 + id),
            mgmt_ip: None,
            roles: roles(r),
            at: 1,
        }
    }

    fn dev(id: &str, addr: &str) -> NewDevice {
        NewDevice {
            id: id.into(),
            addr: addr.into(),
            mode: DeviceMode::SpaceInitiated,
        }
    }

    fn vip(name: &str, addr: &str, r: &[&str]) -> Command {
        Command::AddPlacement {
            name: name.into(),
            kind: PlacementKind::Vip {
                address: addr.into(),
                interface: "eth0".into(),
            },
            eligible_roles: roles(r),
        }
    }

    /// A fabric with two nodes (1: ha+app, 2: db), a cluster VIP and a db VIP.
    fn base() -> Fabric {
        let mut f = Fabric::default();
        for c in [
            register(1, "n1", &["ha", "app"]),
            register(2, "n2", &["db"]),
            vip("cluster", "10.0.0.100/24", &["ha"]),
            vip("db", "10.0.0.101/24", &["db"]),
        ] {
            f.apply(&c).unwrap();
        }
        f
    }

    /// Applies a command expected to fail and checks the fabric did not change.
    fn refused(f: &mut Fabric, c: Command) -> CommandError {
        let before = f.clone();
        let err = f.apply(&c).expect_err("command should be refused");
        assert_eq!(*f, before, "a refused command changed the fabric: {c:?}");
        err
    }

    #[test]
    fn register_node_validation() {
        let mut f = base();
        assert!(matches!(
            refused(&mut f, register(1, "n9", &[])),
            CommandError::Exists { .. }
        ));
        assert!(matches!(
            refused(&mut f, register(9, "n1", &[])),
            CommandError::Exists { .. }
        ));
        assert!(matches!(
            refused(&mut f, register(9, "N9", &[])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, register(9, "n9", &["Bad Role"])),
            CommandError::Invalid { .. }
        ));
        let mut c = register(9, "n9", &[]);
        if let Command::RegisterNode { raft_addr, .. } = &mut c {
            raft_addr.clear();
        }
        assert!(matches!(refused(&mut f, c), CommandError::Invalid { .. }));
        f.apply(&register(9, "n9", &["app"])).unwrap();
        assert_eq!(f.nodes[&9].roles, roles(&["app"]));
    }

    #[test]
    fn remove_node_releases_devices_but_not_leased_placements() {
        let mut f = base();
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 0,
        })
        .unwrap();
        f.apply(&Command::AddDevices {
            devices: vec![dev("d1", "10.1.0.1")],
            at: 5,
        })
        .unwrap();
        f.devices.get_mut("d1").unwrap().owner = Some(1);
        refused(&mut f, Command::RemoveNode { id: 42 });
        f.apply(&Command::RemoveNode { id: 1 }).unwrap();
        assert_eq!(
            f.placements["cluster"].owner,
            Some(1),
            "lease expiry, not removal, frees a placement"
        );
        assert_eq!(f.placements["cluster"].epoch, 1);
        assert_eq!(f.devices["d1"].owner, None);
        assert_eq!(f.devices["d1"].status, DeviceStatus::Unassigned);
    }

    #[test]
    fn roles_and_admin_state_validation() {
        let mut f = base();
        refused(
            &mut f,
            Command::SetRoles {
                id: 7,
                roles: roles(&["app"]),
            },
        );
        refused(
            &mut f,
            Command::SetRoles {
                id: 1,
                roles: roles(&["-x"]),
            },
        );
        refused(
            &mut f,
            Command::SetAdminState {
                id: 7,
                state: AdminState::Draining,
            },
        );
        f.apply(&Command::SetAdminState {
            id: 1,
            state: AdminState::Draining,
        })
        .unwrap();
        let err = refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 0,
            },
        );
        assert!(matches!(err, CommandError::NotEligible { .. }), "{err}");
    }

    #[test]
    fn mgmt_ip_is_set_cleared_and_checked() {
        let mut f = base();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        f.apply(&Command::SetMgmtIp {
            id: 1,
            mgmt_ip: Some(ip),
        })
        .unwrap();
        assert_eq!(f.nodes[&1].mgmt_ip, Some(ip));
        // Unknown node, and addresses no connection can go to: refused, nothing changed.
        refused(
            &mut f,
            Command::SetMgmtIp {
                id: 7,
                mgmt_ip: Some(ip),
            },
        );
        for bad in ["0.0.0.0", "::", "224.0.0.1"] {
            let err = refused(
                &mut f,
                Command::SetMgmtIp {
                    id: 1,
                    mgmt_ip: Some(bad.parse().unwrap()),
                },
            );
            assert!(err.to_string().contains("management IP"), "{err}");
        }
        assert_eq!(f.nodes[&1].mgmt_ip, Some(ip));
        f.apply(&Command::SetMgmtIp {
            id: 1,
            mgmt_ip: None,
        })
        .unwrap();
        assert_eq!(f.nodes[&1].mgmt_ip, None);
    }

    #[test]
    fn add_placement_validation() {
        let mut f = base();
        assert!(matches!(
            refused(&mut f, vip("cluster", "10.0.0.9/24", &["ha"])),
            CommandError::Exists { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("other", "10.0.0.100/16", &["ha"])),
            CommandError::InUse { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "10.0.0.9", &["ha"])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "10.0.0.9/33", &["ha"])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "nope/24", &["ha"])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "10.0.0.9/24", &[])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("V!", "10.0.0.9/24", &["ha"])),
            CommandError::Invalid { .. }
        ));
        let bad_if = Command::AddPlacement {
            name: "v".into(),
            kind: PlacementKind::Vip {
                address: "10.0.0.9/24".into(),
                interface: "".into(),
            },
            eligible_roles: roles(&["ha"]),
        };
        assert!(matches!(
            refused(&mut f, bad_if),
            CommandError::Invalid { .. }
        ));
        f.apply(&vip("v6", "fd00::100/64", &["ha"])).unwrap();
        f.apply(&Command::AddPlacement {
            name: "poller".into(),
            kind: PlacementKind::Singleton {
                service: "job-poller".into(),
            },
            eligible_roles: roles(&["app"]),
        })
        .unwrap();
    }

    #[test]
    fn grant_and_release_fence_with_epochs() {
        let mut f = base();
        // Ineligible: node 2 has only `db`.
        let err = refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 2,
                expected_epoch: 0,
            },
        );
        assert!(matches!(err, CommandError::NotEligible { .. }));
        refused(
            &mut f,
            Command::GrantPlacement {
                name: "nope".into(),
                to: 1,
                expected_epoch: 0,
            },
        );
        refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 9,
                expected_epoch: 0,
            },
        );
        assert_eq!(
            f.apply(&Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 0
            }),
            Ok(Outcome::Epoch(1))
        );
        // A proposer that looked before the grant loses the compare-and-set.
        let err = refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 0,
            },
        );
        assert!(matches!(err, CommandError::StaleEpoch { current: 1, .. }));
        // Granting to the current owner again is refused.
        refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 1,
            },
        );
        // Release with an old epoch is refused; with the current one it works and bumps the epoch.
        refused(
            &mut f,
            Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 0,
            },
        );
        assert_eq!(
            f.apply(&Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 1
            }),
            Ok(Outcome::Epoch(2))
        );
        refused(
            &mut f,
            Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 2,
            },
        );
        refused(
            &mut f,
            Command::RemovePlacement {
                name: "nope".into(),
            },
        );
        f.apply(&Command::GrantPlacement {
            name: "db".into(),
            to: 2,
            expected_epoch: 0,
        })
        .unwrap();
        assert!(matches!(
            refused(&mut f, Command::RemovePlacement { name: "db".into() }),
            CommandError::InUse { .. }
        ));
        f.apply(&Command::RemovePlacement {
            name: "cluster".into(),
        })
        .unwrap();
    }

    #[test]
    fn a_refused_placement_is_released_and_remembers_who_refused() {
        let mut f = base();
        let refuse = |node: NodeId, epoch: u64, reason: &str| Command::RefusePlacement {
            name: "cluster".into(),
            node,
            epoch,
            reason: reason.into(),
            at: 1_000,
        };
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 0,
        })
        .unwrap();
        // Only the owner, at its epoch, may refuse.
        assert!(matches!(
            refused(&mut f, refuse(2, 1, "x")),
            CommandError::NotEligible { node: 2, .. }
        ));
        assert!(matches!(
            refused(&mut f, refuse(1, 0, "x")),
            CommandError::StaleEpoch { current: 1, .. }
        ));
        let long = format!("interface eth9 does not exist {}", "é".repeat(400));
        assert_eq!(f.apply(&refuse(1, 1, &long)), Ok(Outcome::Epoch(2)));
        let p = &f.placements["cluster"];
        assert_eq!(p.owner, None);
        let r = &p.refused[&1];
        assert_eq!(r.at, 1_000);
        assert!(r.reason.starts_with("interface eth9 does not exist"));
        assert!(r.reason.len() <= MAX_REFUSAL_REASON && r.reason.len() > 250);
        // Nothing to refuse any more.
        refused(&mut f, refuse(1, 2, "x"));
        // A new grant to the node is a new try: its old refusal goes.
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 2,
        })
        .unwrap();
        assert!(f.placements["cluster"].refused.is_empty());
        assert_eq!(f.apply(&refuse(1, 3, "  ")), Ok(Outcome::Epoch(4)));
        assert_eq!(
            f.placements["cluster"].refused[&1].reason,
            "no reason given"
        );
        // Removing the node forgets its refusals.
        f.apply(&Command::RemoveNode { id: 1 }).unwrap();
        assert!(f.placements["cluster"].refused.is_empty());
    }

    #[test]
    fn add_devices_is_all_or_nothing() {
        let mut f = base();
        let ok = vec![
            dev("d1", "10.1.0.1"),
            dev("d2", "10.1.0.2:830"),
            dev("d3", "router-3.lab:22"),
        ];
        assert_eq!(
            f.apply(&Command::AddDevices { devices: ok, at: 7 }),
            Ok(Outcome::DevicesAdded(3))
        );
        assert_eq!(f.devices["d2"].since, 7);
        // One bad device in a batch: nothing of the batch lands.
        for bad in [
            dev("d1", "10.1.0.9"),
            dev("d 9", "10.1.0.9"),
            dev("", "10.1.0.9"),
            dev("d9", "10.1.0.9:0"),
            dev("d9", "10.1.0.9:99999"),
            dev("d9", "bad host"),
            dev("d9", ""),
        ] {
            refused(
                &mut f,
                Command::AddDevices {
                    devices: vec![dev("d8", "10.1.0.8"), bad],
                    at: 8,
                },
            );
        }
        refused(
            &mut f,
            Command::AddDevices {
                devices: vec![dev("d8", "10.1.0.8"), dev("d8", "10.1.0.8")],
                at: 8,
            },
        );
        refused(
            &mut f,
            Command::AddDevices {
                devices: vec![],
                at: 8,
            },
        );
        let too_many = (0..=MAX_DEVICES_PER_COMMAND)
            .map(|i| dev(&format!("x{i}"), "10.2.0.1"))
            .collect();
        refused(
            &mut f,
            Command::AddDevices {
                devices: too_many,
                at: 8,
            },
        );
        f.apply(&Command::AddDevices {
            devices: vec![dev("v6", "[fd00::1]:22"), dev("v6b", "fd00::2")],
            at: 9,
        })
        .unwrap();
        refused(&mut f, Command::RemoveDevice { id: "nope".into() });
        f.apply(&Command::RemoveDevice { id: "d1".into() }).unwrap();
        assert_eq!(f.devices.len(), 4);
    }

    #[test]
    fn service_validation() {
        let mut f = base();
        let spec = |cmd: &[&str], scope: ServiceScope| ServiceSpec {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            scope,
            health_check: None,
            roles: BTreeSet::new(),
        };
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: spec(&[], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: spec(&[""], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "Web".into(),
                spec: spec(&["x"], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: spec(&["x"], ServiceScope::Vip("nope".into())),
            },
        );
        let mut hc = spec(&["x"], ServiceScope::EveryNode);
        hc.health_check = Some(vec![]);
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: hc,
            },
        );
        f.apply(&Command::PutService {
            name: "web".into(),
            spec: spec(&["x"], ServiceScope::Vip("cluster".into())),
        })
        .unwrap();
        // A singleton needs eligible roles; with them, its placement comes with it.
        refused(
            &mut f,
            Command::PutService {
                name: "job-poller".into(),
                spec: spec(&["p"], ServiceScope::Singleton),
            },
        );
        let mut single = spec(&["p"], ServiceScope::Singleton);
        single.roles = roles(&["app"]);
        f.apply(&Command::PutService {
            name: "job-poller".into(),
            spec: single.clone(),
        })
        .unwrap();
        let own = &f.placements["job-poller"];
        assert_eq!(
            own.kind,
            PlacementKind::Singleton {
                service: "job-poller".into()
            }
        );
        assert_eq!(own.eligible_roles, roles(&["app"]));
        assert_eq!(own.owner, None);
        // Scope changes to or from singleton are refused.
        refused(
            &mut f,
            Command::PutService {
                name: "job-poller".into(),
                spec: spec(&["p"], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: single.clone(),
            },
        );
        f.apply(&Command::AddPlacement {
            name: "poller".into(),
            kind: PlacementKind::Singleton {
                service: "job-poller".into(),
            },
            eligible_roles: roles(&["app"]),
        })
        .unwrap();
        assert!(matches!(
            refused(
                &mut f,
                Command::RemoveService {
                    name: "job-poller".into()
                }
            ),
            CommandError::InUse { .. }
        ));
        refused(
            &mut f,
            Command::RemoveService {
                name: "nope".into(),
            },
        );
        f.apply(&Command::RemoveService { name: "web".into() })
            .unwrap();
        // Once the other placement is gone, removing the service removes its own placement.
        f.apply(&Command::RemovePlacement {
            name: "poller".into(),
        })
        .unwrap();
        f.apply(&Command::RemoveService {
            name: "job-poller".into(),
        })
        .unwrap();
        assert!(!f.placements.contains_key("job-poller"));
        assert!(f.services.is_empty());
    }

    /// A singleton's service cannot be removed while a node holds the singleton: its
    /// placement would go, and a service declared again under that name would be granted at
    /// once, while the old owner may still run it until its lease ends.
    #[test]
    fn a_held_singleton_is_released_before_its_service_is_removed() {
        let mut f = base();
        f.apply(&Command::PutService {
            name: "poller".into(),
            spec: ServiceSpec {
                command: vec!["/bin/sleep".into(), "1000".into()],
                scope: ServiceScope::Singleton,
                health_check: None,
                roles: roles(&["app"]),
            },
        })
        .unwrap();
        let epoch = f.placements["poller"].epoch;
        let owner = *f.nodes.keys().next().unwrap();
        f.apply(&Command::GrantPlacement {
            name: "poller".into(),
            to: owner,
            expected_epoch: epoch,
        })
        .unwrap();
        let before = f.clone();
        let e = refused(
            &mut f,
            Command::RemoveService {
                name: "poller".into(),
            },
        );
        assert!(e.to_string().contains("release it first"), "{e}");
        assert_eq!(f, before);
        f.apply(&Command::ReleasePlacement {
            name: "poller".into(),
            epoch: epoch + 1,
        })
        .unwrap();
        f.apply(&Command::RemoveService {
            name: "poller".into(),
        })
        .unwrap();
        assert!(!f.placements.contains_key("poller"));
    }

    #[test]
    fn devices_are_removed_in_batches_and_missing_ones_named() {
        let mut f = base();
        f.apply(&Command::AddDevices {
            devices: vec![
                dev("a", "192.0.2.1"),
                dev("b", "192.0.2.2"),
                dev("c", "192.0.2.3"),
            ],
            at: 1,
        })
        .unwrap();
        let out = f
            .apply(&Command::RemoveDevices {
                ids: vec!["a".into(), "zz".into(), "c".into()],
            })
            .unwrap();
        assert_eq!(
            out,
            Outcome::DevicesRemoved {
                removed: 2,
                missing: vec!["zz".into()]
            }
        );
        assert_eq!(f.devices.keys().collect::<Vec<_>>(), vec!["b"]);
        let e = refused(
            &mut f,
            Command::RemoveDevices {
                ids: vec!["b".into(), "b".into()],
            },
        );
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = refused(
            &mut f,
            Command::RemoveDevices {
                ids: (0..=MAX_DEVICES_PER_COMMAND)
                    .map(|i| format!("d{i}"))
                    .collect(),
            },
        );
        assert!(e.to_string().contains("device id list"), "{e}");
    }

    /// `base()` with both nodes on data format `format`.
    fn on_format(format: u32) -> Fabric {
        let mut f = base();
        for id in [1, 2] {
            f.apply(&Command::SetVersion {
                id,
                version: format!("0.1.0 (abc); data format {format}"),
            })
            .unwrap();
        }
        f
    }

    fn set_vip(name: &str, addr: &str, r: &[&str]) -> Command {
        Command::SetPlacement {
            name: name.into(),
            kind: PlacementKind::Vip {
                address: addr.into(),
                interface: "eth1".into(),
            },
            eligible_roles: roles(r),
        }
    }

    #[test]
    fn set_commands_wait_until_every_node_runs_the_format_that_brought_them() {
        assert_eq!(recorded_format("0.1.0 (abc); data format 6"), Some(6));
        assert_eq!(recorded_format("0.1.0; data format 12 (x)"), Some(12));
        assert_eq!(recorded_format("0.1.0"), None);
        assert_eq!(recorded_format(""), None);
        let set_device = Command::SetDevice {
            device: dev("d1", "10.9.0.1:830"),
            at: 5,
        };
        // No version recorded yet, then one node still on format 6: refused, naming it.
        let mut f = base();
        f.apply(&Command::AddDevices {
            devices: vec![dev("d1", "10.9.0.1")],
            at: 1,
        })
        .unwrap();
        let e = refused(&mut f, set_vip("cluster", "10.0.0.110/24", &["ha"]));
        assert!(
            e.to_string()
                .contains("n1 (node 1) has recorded no version yet"),
            "{e}"
        );
        for (id, format) in [(1, SET_COMMANDS_FORMAT), (2, SET_COMMANDS_FORMAT - 1)] {
            f.apply(&Command::SetVersion {
                id,
                version: format!("0.1.0 (abc); data format {format}"),
            })
            .unwrap();
        }
        for c in [
            set_vip("cluster", "10.0.0.110/24", &["ha"]),
            set_device.clone(),
        ] {
            let e = refused(&mut f, c);
            assert!(
                e.to_string().contains("n2 (node 2) runs data format 6")
                    && !e.to_string().contains("n1"),
                "{e}"
            );
        }
        // The last node upgraded: both apply.
        f.apply(&Command::SetVersion {
            id: 2,
            version: format!("0.1.0 (def); data format {SET_COMMANDS_FORMAT}"),
        })
        .unwrap();
        f.apply(&set_vip("cluster", "10.0.0.110/24", &["ha"]))
            .unwrap();
        f.apply(&set_device).unwrap();
        assert_eq!(f.devices["d1"].addr, "10.9.0.1:830");
    }

    #[test]
    fn a_vips_spec_is_set_only_while_nobody_holds_it() {
        let mut f = on_format(SET_COMMANDS_FORMAT);
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: f.placements["cluster"].epoch,
        })
        .unwrap();
        let e = refused(&mut f, set_vip("cluster", "10.0.0.110/24", &["ha", "db"]));
        assert!(e.to_string().contains("held by node 1; release"), "{e}");
        // Held: the roles change while the owner keeps one, not otherwise.
        let same = |r: &[&str]| Command::SetPlacement {
            name: "cluster".into(),
            kind: f.placements["cluster"].kind.clone(),
            eligible_roles: roles(r),
        };
        let (app, db) = (same(&["app"]), same(&["db"]));
        f.apply(&app).unwrap();
        assert_eq!(f.placements["cluster"].eligible_roles, roles(&["app"]));
        let e = refused(&mut f, db);
        assert!(e.to_string().contains("none of the roles"), "{e}");
        let epoch = f.placements["cluster"].epoch;
        f.apply(&Command::RefusePlacement {
            name: "cluster".into(),
            node: 1,
            epoch,
            reason: "no eth1".into(),
            at: 3,
        })
        .unwrap();
        assert!(!f.placements["cluster"].refused.is_empty());
        let epoch = f.placements["cluster"].epoch;
        f.apply(&set_vip("cluster", "10.0.0.110/24", &["ha", "db"]))
            .unwrap();
        let p = &f.placements["cluster"];
        assert_eq!(
            p.kind,
            PlacementKind::Vip {
                address: "10.0.0.110/24".into(),
                interface: "eth1".into()
            }
        );
        assert_eq!(p.eligible_roles, roles(&["ha", "db"]));
        assert_eq!(p.epoch, epoch, "the epoch stays: no owner changed");
        assert!(
            p.refused.is_empty(),
            "refusals of the old spec are forgotten"
        );
        // Its own address again is fine; another VIP's, a bad one, no roles, a singleton or
        // an unknown name are refused and change nothing.
        f.apply(&set_vip("cluster", "10.0.0.110/24", &["ha"]))
            .unwrap();
        for (c, why) in [
            (
                set_vip("cluster", "10.0.0.101/24", &["ha"]),
                "placement \"db\" has it",
            ),
            (set_vip("cluster", "10.0.0.300/24", &["ha"]), "10.0.0.300"),
            (
                set_vip("cluster", "10.0.0.111/24", &[]),
                "at least one role",
            ),
            (set_vip("nope", "10.0.0.111/24", &["ha"]), "nope"),
            (
                Command::SetPlacement {
                    name: "cluster".into(),
                    kind: PlacementKind::Singleton {
                        service: "x".into(),
                    },
                    eligible_roles: roles(&["ha"]),
                },
                "only a VIP",
            ),
        ] {
            let e = refused(&mut f, c);
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn a_devices_new_address_is_reconnected_by_its_owner() {
        let mut f = on_format(SET_COMMANDS_FORMAT);
        f.apply(&Command::AddDevices {
            devices: vec![dev("d1", "10.9.0.1"), dev("d2", "10.9.0.2")],
            at: 1,
        })
        .unwrap();
        f.apply(&Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d1".into(),
                from: None,
                to: Some(1),
            }],
            at: 2,
        })
        .unwrap();
        let set = |id: &str, addr: &str, mode| Command::SetDevice {
            device: NewDevice {
                id: id.into(),
                addr: addr.into(),
                mode,
            },
            at: 9,
        };
        f.apply(&set("d1", "10.9.0.9:830", DeviceMode::SpaceInitiated))
            .unwrap();
        let d = &f.devices["d1"];
        assert_eq!((d.addr.as_str(), d.owner), ("10.9.0.9:830", Some(1)));
        assert_eq!((d.status, d.since), (DeviceStatus::Connecting, 9));
        // Unowned: the address changes, the state stays.
        f.apply(&set("d2", "10.9.0.2", DeviceMode::DeviceInitiated))
            .unwrap();
        assert_eq!(f.devices["d2"].mode, DeviceMode::DeviceInitiated);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Unassigned);
        for (c, why) in [
            (set("d9", "10.9.0.3", DeviceMode::SpaceInitiated), "d9"),
            (set("d1", "", DeviceMode::SpaceInitiated), "address"),
        ] {
            let e = refused(&mut f, c);
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn a_node_records_its_version() {
        let mut f = base();
        let set = |id, v: &str| Command::SetVersion {
            id,
            version: v.into(),
        };
        f.apply(&set(1, "0.1.0 (abc, built 2026-12-02); data format 5"))
            .unwrap();
        assert!(f.nodes[&1].version.ends_with("data format 5"));
        for (id, v, why) in [
            (1, "", "1 to 200 printable"),
            (1, "bad\nline", "1 to 200 printable"),
            (9, "0.1.0", "no node"),
        ] {
            let e = refused(&mut f, set(id, v));
            assert!(e.to_string().contains(why), "{v:?}: {e}");
        }
    }

    #[test]
    fn certificates_are_revoked_by_serial_once_and_checked() {
        let mut f = base();
        let revoke = |serial: &str, reason: &str| Command::RevokeCertificate {
            serial: serial.into(),
            identity: "node n3".into(),
            reason: reason.into(),
            at: 5,
        };
        f.apply(&revoke("1f3a", "removed")).unwrap();
        assert_eq!(f.revoked["1f3a"].identity, "node n3");
        // Again: nothing changes (the first reason and time stay).
        f.apply(&revoke("1f3a", "again")).unwrap();
        assert_eq!(f.revoked["1f3a"].reason, "removed");
        for (serial, reason, why) in [
            ("", "x", "1 to 40 lowercase hex"),
            ("1F3A", "x", "1 to 40 lowercase hex"),
            ("xyz", "x", "1 to 40 lowercase hex"),
            (&"a".repeat(41), "x", "1 to 40 lowercase hex"),
            ("01f3a", "x", "must not start with 0"),
            ("2b", &"r".repeat(301), "longer than 300"),
        ] {
            let e = refused(&mut f, revoke(serial, reason));
            assert!(e.to_string().contains(why), "{serial}: {e}");
        }
        f.apply(&revoke("0", "serial zero")).unwrap();
        assert_eq!(f.revoked.len(), 2);
    }

    /// A placement removed and added again never repeats an epoch (a lease, renewal or guard
    /// of the old one would otherwise pass for the new one): VIPs and singletons alike.
    #[test]
    fn epochs_never_repeat_across_remove_and_add_again() {
        let mut f = Fabric::default();
        let mut index = 0;
        let mut apply = |f: &mut Fabric, c: Command| {
            index += 1;
            f.apply_at(index, &c)
                .unwrap_or_else(|e| panic!("entry {index} {c:?}: {e}"))
        };
        apply(&mut f, register(1, "n1", &["ha", "app"]));
        apply(&mut f, register(2, "n2", &["ha", "app"]));
        let singleton = ServiceSpec {
            command: vec!["/bin/sleep".into(), "1000".into()],
            scope: ServiceScope::Singleton,
            health_check: None,
            roles: roles(&["app"]),
        };
        let mut seen = BTreeSet::new();
        for round in 0..3 {
            apply(&mut f, vip("cluster", "10.0.0.100/24", &["ha"]));
            apply(
                &mut f,
                Command::PutService {
                    name: "poller".into(),
                    spec: singleton.clone(),
                },
            );
            for name in ["cluster", "poller"] {
                // Two owner changes and a release, as a failover and a stop would make.
                for to in [1, 2] {
                    let expected_epoch = f.placements[name].epoch;
                    apply(
                        &mut f,
                        Command::GrantPlacement {
                            name: name.into(),
                            to,
                            expected_epoch,
                        },
                    );
                    let epoch = f.placements[name].epoch;
                    assert!(
                        seen.insert((name, epoch)),
                        "round {round}: {name} granted at epoch {epoch} again"
                    );
                }
                let epoch = f.placements[name].epoch;
                apply(
                    &mut f,
                    Command::ReleasePlacement {
                        name: name.into(),
                        epoch,
                    },
                );
            }
            apply(
                &mut f,
                Command::RemovePlacement {
                    name: "cluster".into(),
                },
            );
            apply(
                &mut f,
                Command::RemoveService {
                    name: "poller".into(),
                },
            );
        }
    }

    /// A pseudo-random command log (fixed seed) applied twice gives the same fabric, and the
    /// serialized fabric round-trips.
    #[test]
    fn apply_is_deterministic_and_snapshot_round_trips() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut log = Vec::new();
        for i in 0..3000u64 {
            let c = match next() % 7 {
                0 => register(next() % 8, &format!("n{}", next() % 8), &["ha", "app"]),
                1 => vip(
                    &format!("v{}", next() % 5),
                    &format!("10.0.{}.1/24", next() % 5),
                    &["ha"],
                ),
                2 => Command::GrantPlacement {
                    name: format!("v{}", next() % 5),
                    to: next() % 8,
                    expected_epoch: next() % 4,
                },
                3 => Command::ReleasePlacement {
                    name: format!("v{}", next() % 5),
                    epoch: next() % 4,
                },
                4 => Command::AddDevices {
                    devices: vec![dev(&format!("d{}", next() % 500), "10.9.0.1")],
                    at: i,
                },
                5 => Command::RefusePlacement {
                    name: format!("v{}", next() % 5),
                    node: next() % 8,
                    epoch: next() % 4,
                    reason: "eth0 is missing".into(),
                    at: i,
                },
                _ => Command::RemoveNode { id: next() % 8 },
            };
            log.push(c);
        }
        let run = |log: &[Command]| {
            let mut f = Fabric::default();
            let results: Vec<_> = log.iter().map(|c| f.apply(c)).collect();
            (f, results)
        };
        let (a, ra) = run(&log);
        let (b, rb) = run(&log);
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert!(ra.iter().any(|r| r.is_ok()) && ra.iter().any(|r| r.is_err()));
        let bytes = super::codec::encode(&a).unwrap();
        let back: Fabric = super::codec::decode(&bytes).unwrap();
        assert_eq!(a, back);
    }

    fn site_role(role: SiteRole, epoch: u64) -> Command {
        Command::SetSiteRole { role, epoch, at: 5 }
    }

    fn service(cmd: &str, scope: ServiceScope, r: &[&str]) -> ServiceSpec {
        ServiceSpec {
            command: vec![cmd.into()],
            scope,
            health_check: None,
            roles: roles(r),
        }
    }

    #[test]
    fn site_epochs_never_go_down_and_a_standby_is_promoted_only_above_its_epoch() {
        let mut f = base();
        assert_eq!(f.site.role, SiteRole::Standalone);
        f.apply(&site_role(SiteRole::Active, 1)).unwrap();
        assert_eq!(
            (f.site.role, f.site.epoch, f.site.since),
            (SiteRole::Active, 1, 5)
        );
        // Demoting adopts the peer's higher epoch; a lower one is refused.
        assert!(matches!(
            refused(&mut f, site_role(SiteRole::Standby, 0)),
            CommandError::SiteRole(_)
        ));
        f.apply(&site_role(SiteRole::Standby, 2)).unwrap();
        // Promotion needs an epoch above the standby's own.
        let e = refused(&mut f, site_role(SiteRole::Active, 2));
        assert!(e.to_string().contains("above its 2"), "{e}");
        f.apply(&site_role(SiteRole::Active, 3)).unwrap();
        assert_eq!((f.site.role, f.site.epoch), (SiteRole::Active, 3));
    }

    #[test]
    fn a_standby_site_grants_nothing_and_takes_devices_and_services_only_mirrored() {
        let mut f = base();
        f.apply(&Command::AddDevices {
            devices: vec![dev("d1", "10.1.0.1")],
            at: 1,
        })
        .unwrap();
        f.apply(&Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d1".into(),
                from: None,
                to: Some(1),
            }],
            at: 2,
        })
        .unwrap();
        f.apply(&site_role(SiteRole::Standby, 1)).unwrap();
        for c in [
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: f.placements["cluster"].epoch,
            },
            Command::AddDevices {
                devices: vec![dev("d2", "10.1.0.2")],
                at: 3,
            },
            Command::RemoveDevices {
                ids: vec!["d1".into()],
            },
            Command::PutService {
                name: "web".into(),
                spec: service("/bin/web", ServiceScope::EveryNode, &[]),
            },
            Command::AssignDevices {
                assignments: vec![DeviceAssignment {
                    device: "d1".into(),
                    from: Some(1),
                    to: Some(2),
                }],
                at: 3,
            },
        ] {
            let e = refused(&mut f, c.clone());
            assert!(
                matches!(e, CommandError::SiteRole(_)),
                "{c}: {e} should be a site refusal"
            );
        }
        // Letting a device go is allowed: a standby holds no connections.
        f.apply(&Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d1".into(),
                from: Some(1),
                to: None,
            }],
            at: 3,
        })
        .unwrap();
        // Mirrored changes apply; a refused one is named and the rest still apply.
        let position = |index| {
            Some(MirrorPosition {
                site: "east".into(),
                index,
                sent_at: 9,
            })
        };
        let out = f
            .apply(&Command::Mirror {
                changes: vec![
                    Command::AddDevices {
                        devices: vec![dev("d2", "10.1.0.2")],
                        at: 3,
                    },
                    Command::PutService {
                        name: "web".into(),
                        spec: service("/bin/web", ServiceScope::Vip("ghost".into()), &[]),
                    },
                    Command::PutService {
                        name: "poller".into(),
                        spec: service("/bin/poller", ServiceScope::Singleton, &["app"]),
                    },
                ],
                position: position(40),
            })
            .unwrap();
        let Outcome::Mirrored {
            applied,
            refused: why,
        } = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(applied, 2);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("put-service web"), "{why:?}");
        assert!(f.devices.contains_key("d2") && f.services.contains_key("poller"));
        assert!(
            f.placements.contains_key("poller"),
            "the singleton's placement comes with it"
        );
        assert_eq!(f.site.mirror, position(40).clone());
        // Positions never go back; only mirrorable commands are carried.
        let e = refused(
            &mut f,
            Command::Mirror {
                changes: vec![],
                position: position(39),
            },
        );
        assert!(e.to_string().contains("behind"), "{e}");
        let e = refused(
            &mut f,
            Command::Mirror {
                changes: vec![register(3, "n3", &["ha"])],
                position: None,
            },
        );
        assert!(e.to_string().contains("only devices and services"), "{e}");
        // An active site mirrors nothing.
        f.apply(&site_role(SiteRole::Active, 2)).unwrap();
        assert!(matches!(
            refused(
                &mut f,
                Command::Mirror {
                    changes: vec![],
                    position: position(41),
                }
            ),
            CommandError::SiteRole(_)
        ));
        // Demoted again, it follows its peer afresh.
        f.apply(&site_role(SiteRole::Standby, 3)).unwrap();
        assert_eq!(f.site.mirror, None);
    }

    #[test]
    fn name_and_address_checks() {
        assert!(check_name("n", "a").is_ok());
        assert!(check_name("n", &"a".repeat(63)).is_ok());
        assert!(check_name("n", &"a".repeat(64)).is_err());
        assert!(check_name("n", "a_b").is_err());
        assert!(check_device_addr("[fd00::1]:830").is_ok());
        assert!(check_device_addr("host-1.example").is_ok());
        assert!(check_device_addr("host_1").is_err());
        assert!(check_device_addr(":22").is_err());
    }

    #[test]
    fn a_probe_changes_nothing_and_one_too_large_is_refused() {
        let mut f = base();
        let before = f.clone();
        let probe = Command::Probe {
            bytes: vec![7; crate::MAX_PROBE_BYTES],
        };
        assert_eq!(f.apply_at(42, &probe), Ok(Outcome::Done));
        assert_eq!(f, before);
        let big = Command::Probe {
            bytes: vec![7; crate::MAX_PROBE_BYTES + 1],
        };
        assert!(matches!(
            refused(&mut f, big),
            CommandError::Invalid { what, .. } if what == "probe"
        ));
    }
}

#[cfg(test)]
mod device_tests {
    use crate::*;
    use std::collections::BTreeMap;

    fn node(id: NodeId, roles: &[&str]) -> Command {
        Command::RegisterNode {
            id,
            name: format!("n{id}"),
            raft_addr: format!("127.0.0.1:{}", 7000 + id),
            mgmt_ip: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            at: 1,
        }
    }

    fn add(ids: &[&str]) -> Command {
        Command::AddDevices {
            devices: ids
                .iter()
                .map(|id| NewDevice {
                    id: id.to_string(),
                    addr: "10.1.0.1".into(),
                    mode: DeviceMode::SpaceInitiated,
                })
                .collect(),
            at: 2,
        }
    }

    fn mv(device: &str, from: Option<NodeId>, to: Option<NodeId>) -> DeviceAssignment {
        DeviceAssignment {
            device: device.into(),
            from,
            to,
        }
    }

    fn assign(assignments: Vec<DeviceAssignment>, at: Millis) -> Command {
        Command::AssignDevices { assignments, at }
    }

    fn report(node: NodeId, r: &[(&str, DeviceStatus)], at: Millis) -> Command {
        Command::ReportDeviceStatus {
            node,
            reports: r
                .iter()
                .map(|(d, s)| DeviceReport {
                    device: d.to_string(),
                    status: *s,
                })
                .collect(),
            at,
        }
    }

    /// Nodes 1, 2: app; 3: db only; 4: app but draining. Devices d1..d3, unassigned.
    fn fabric() -> Fabric {
        let mut f = Fabric::default();
        for c in [
            node(1, &["app"]),
            node(2, &["ha", "app"]),
            node(3, &["db"]),
            node(4, &["app"]),
            Command::SetAdminState {
                id: 4,
                state: AdminState::Draining,
            },
            add(&["d1", "d2", "d3"]),
        ] {
            f.apply(&c).unwrap();
        }
        f
    }

    #[test]
    fn assign_devices_sets_owner_status_and_since() {
        let mut f = fabric();
        assert_eq!(
            f.apply(&assign(
                vec![mv("d1", None, Some(1)), mv("d2", None, Some(2))],
                10
            )),
            Ok(Outcome::DevicesAssigned(2))
        );
        assert_eq!(f.devices["d1"].owner, Some(1));
        assert_eq!(f.devices["d1"].status, DeviceStatus::Connecting);
        assert_eq!(f.devices["d1"].since, 10);
        assert_eq!(f.devices["d3"].status, DeviceStatus::Unassigned);
        assert_eq!(f.devices["d3"].since, 2, "untouched device keeps its time");
        // Moving on and taking back.
        f.apply(&assign(
            vec![mv("d1", Some(1), Some(2)), mv("d2", Some(2), None)],
            11,
        ))
        .unwrap();
        assert_eq!(f.devices["d1"].owner, Some(2));
        assert_eq!(f.devices["d2"].owner, None);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Unassigned);
        assert_eq!(f.devices["d2"].since, 11);
        assert_eq!(
            f.device_counts(),
            BTreeMap::from([(1, 0), (2, 1), (3, 0), (4, 0)])
        );
    }

    /// Each bad batch is refused whole: the good assignment next to the bad one does not land
    /// either, and the error names the device and the node.
    #[test]
    fn assign_devices_is_all_or_nothing() {
        let mut base = fabric();
        base.apply(&assign(vec![mv("d3", None, Some(2))], 5))
            .unwrap();
        let good = mv("d1", None, Some(1));
        let too_many = (0..=MAX_DEVICES_PER_COMMAND)
            .map(|_| mv("d1", None, Some(1)))
            .collect();
        type Case = (&'static str, Vec<DeviceAssignment>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "unknown device",
                vec![good.clone(), mv("nope", None, Some(1))],
                "no device \"nope\"",
            ),
            (
                "unknown node",
                vec![good.clone(), mv("d2", None, Some(9))],
                "node 9 may not hold device \"d2\": not a registered node",
            ),
            (
                "db-only node",
                vec![good.clone(), mv("d2", None, Some(3))],
                "node 3 may not hold device \"d2\": needs the role \"app\"",
            ),
            (
                "draining node",
                vec![good.clone(), mv("d2", None, Some(4))],
                "node 4 may not hold device \"d2\": node is draining",
            ),
            (
                "device twice",
                vec![good.clone(), mv("d1", None, Some(2))],
                "\"d1\": device listed twice",
            ),
            (
                "stale owner",
                vec![good.clone(), mv("d3", Some(1), Some(1))],
                "device \"d3\" changed owner since the proposer looked: held by node 2, expected node 1",
            ),
            (
                "stale unowned",
                vec![good.clone(), mv("d3", None, Some(1))],
                "device \"d3\" changed owner since the proposer looked: held by node 2, expected no node",
            ),
            (
                "no change",
                vec![good.clone(), mv("d3", Some(2), Some(2))],
                "\"d3\": already held by node 2",
            ),
            (
                "unassign unassigned",
                vec![good.clone(), mv("d2", None, None)],
                "\"d2\": already unassigned",
            ),
            ("empty", vec![], "invalid assignment list"),
            ("too many", too_many, "at most 10000 devices per command"),
        ];
        for (what, assignments, message) in cases {
            let mut f = base.clone();
            let err = f.apply(&assign(assignments, 6)).expect_err(what);
            assert_eq!(f, base, "case {what}: a refused command changed the fabric");
            assert!(
                err.to_string().contains(message),
                "case {what}: {err} lacks {message:?}"
            );
        }
    }

    #[test]
    fn only_the_current_owner_reports_status() {
        let mut f = fabric();
        f.apply(&assign(
            vec![mv("d1", None, Some(1)), mv("d2", None, Some(1))],
            10,
        ))
        .unwrap();
        assert_eq!(
            f.apply(&report(
                1,
                &[("d1", DeviceStatus::Up), ("d2", DeviceStatus::Down)],
                20
            )),
            Ok(Outcome::DevicesReported {
                changed: 2,
                stale: 0
            })
        );
        assert_eq!(f.devices["d1"].status, DeviceStatus::Up);
        assert_eq!(f.devices["d1"].since, 20);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Down);
        // A repeated status is no change: `since` keeps the time of the real change.
        assert_eq!(
            f.apply(&report(1, &[("d1", DeviceStatus::Up)], 30)),
            Ok(Outcome::DevicesReported {
                changed: 0,
                stale: 0
            })
        );
        assert_eq!(f.devices["d1"].since, 20);
        // d1 moves to node 2; node 1's report was made before it learned that.
        f.apply(&assign(vec![mv("d1", Some(1), Some(2))], 40))
            .unwrap();
        f.apply(&Command::RemoveDevice { id: "d2".into() }).unwrap();
        let before = f.clone();
        assert_eq!(
            f.apply(&report(
                1,
                &[("d1", DeviceStatus::Down), ("d2", DeviceStatus::Up)],
                41
            )),
            Ok(Outcome::DevicesReported {
                changed: 0,
                stale: 2
            })
        );
        assert_eq!(f, before, "stale reports change nothing");
        // The new owner's report counts, next to a stale one in the same batch.
        assert_eq!(
            f.apply(&report(
                2,
                &[("d1", DeviceStatus::Up), ("d3", DeviceStatus::Up)],
                42
            )),
            Ok(Outcome::DevicesReported {
                changed: 1,
                stale: 1
            })
        );
        assert_eq!(f.devices["d1"].status, DeviceStatus::Up);
        assert_eq!(f.devices["d3"].status, DeviceStatus::Unassigned);
        // A report from a node that is not even registered is stale too.
        assert_eq!(
            f.apply(&report(9, &[("d1", DeviceStatus::Down)], 43)),
            Ok(Outcome::DevicesReported {
                changed: 0,
                stale: 1
            })
        );
    }

    #[test]
    fn malformed_status_reports_are_refused() {
        let mut f = fabric();
        f.apply(&assign(vec![mv("d1", None, Some(1))], 10)).unwrap();
        let before = f.clone();
        for (what, c) in [
            (
                "connecting is set by assignment",
                report(1, &[("d1", DeviceStatus::Connecting)], 11),
            ),
            (
                "unassigned is set by assignment",
                report(1, &[("d1", DeviceStatus::Unassigned)], 11),
            ),
            (
                "device twice",
                report(
                    1,
                    &[("d1", DeviceStatus::Up), ("d1", DeviceStatus::Down)],
                    11,
                ),
            ),
            ("empty", report(1, &[], 11)),
        ] {
            assert!(f.apply(&c).is_err(), "{what}");
            assert_eq!(f, before, "{what}");
        }
    }

    #[test]
    fn removing_a_node_unassigns_its_devices_and_a_draining_node_keeps_them() {
        let mut f = fabric();
        f.apply(&assign(
            vec![mv("d1", None, Some(1)), mv("d2", None, Some(2))],
            10,
        ))
        .unwrap();
        // Draining changes no owner by itself: the planner hands the devices off.
        f.apply(&Command::SetAdminState {
            id: 1,
            state: AdminState::Draining,
        })
        .unwrap();
        assert_eq!(f.devices["d1"].owner, Some(1));
        assert!(!f.nodes[&1].may_hold_devices());
        f.apply(&Command::RemoveNode { id: 2 }).unwrap();
        assert_eq!(f.devices["d2"].owner, None);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Unassigned);
    }

    /// A pseudo-random log of device commands (fixed seed), valid and stale ones mixed, applied
    /// twice gives the same fabric and results; fabric, commands and outcomes round-trip the codec.
    #[test]
    fn device_commands_are_deterministic_and_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let statuses = [
            DeviceStatus::Up,
            DeviceStatus::Down,
            DeviceStatus::Connecting,
            DeviceStatus::Unassigned,
        ];
        let mut log = vec![node(1, &["app"]), node(2, &["app"]), node(3, &["db"])];
        for i in 0..3000u64 {
            let c = match next() % 6 {
                0 => add(&[&format!("d{}", next() % 50)]),
                1 | 2 => assign(
                    (0..1 + next() % 4)
                        .map(|_| {
                            let pick = |n: u64| (!n.is_multiple_of(5)).then_some(n % 5);
                            mv(&format!("d{}", next() % 50), pick(next()), pick(next()))
                        })
                        .collect(),
                    i,
                ),
                3 | 4 => report(
                    1 + next() % 3,
                    &[(
                        &format!("d{}", next() % 50),
                        statuses[(next() % 4) as usize],
                    )],
                    i,
                ),
                _ => match next() % 3 {
                    0 => Command::RemoveDevice {
                        id: format!("d{}", next() % 50),
                    },
                    1 => Command::SetAdminState {
                        id: 1 + next() % 2,
                        state: if next() % 2 == 0 {
                            AdminState::Active
                        } else {
                            AdminState::Draining
                        },
                    },
                    _ => node(1 + next() % 2, &["app"]),
                },
            };
            log.push(c);
        }
        let run = |log: &[Command]| {
            let mut f = Fabric::default();
            let results: Vec<_> = log.iter().map(|c| f.apply(c)).collect();
            (f, results)
        };
        let (a, ra) = run(&log);
        let (b, rb) = run(&log);
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        for want in ["assigned", "reported with stale", "refused"] {
            let seen = ra.iter().any(|r| match want {
                "assigned" => matches!(r, Ok(Outcome::DevicesAssigned(_))),
                "reported with stale" => {
                    matches!(r, Ok(Outcome::DevicesReported { stale: 1.., .. }))
                }
                _ => r.is_err(),
            });
            assert!(seen, "the log never produced: {want}");
        }
        let back: Fabric = super::codec::decode(&super::codec::encode(&a).unwrap()).unwrap();
        assert_eq!(a, back);
        let back: Vec<Command> =
            super::codec::decode(&super::codec::encode(&log).unwrap()).unwrap();
        assert_eq!(log, back);
        let back: Vec<Result<Outcome, CommandError>> =
            super::codec::decode(&super::codec::encode(&ra).unwrap()).unwrap();
        assert_eq!(ra, back);
    }
}
