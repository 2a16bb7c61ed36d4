//! The leader's placement planner: which placements to grant or take back, as a pure function.

use std::collections::{BTreeMap, BTreeSet};

use crate::NodeId;
use crate::plan::devices as assign;
use crate::{AdminState, Command, Fabric, Millis, Placement};

/// Whether `node` may hold `p`: registered, active, and one of the eligible roles.
pub fn eligible(fabric: &Fabric, p: &Placement, node: NodeId) -> bool {
    fabric.nodes.get(&node).is_some_and(|n| {
        n.admin_state == AdminState::Active && !p.eligible_roles.is_disjoint(&n.roles)
    })
}

/// How long a node that refused a placement (see [`Command::RefusePlacement`]) is passed over for
/// it while another eligible node is free. After that it is tried again, so a host fixed by its
/// operator takes the placement back without a restart, at the cost of one grant and refusal per
/// minute while it is still broken.
pub const REFUSAL_HOLD_MS: Millis = 60_000;

/// When every eligible live node refused a placement recently, the one that refused longest ago
/// is tried again once its refusal is this old: a placement that could only live on nodes that
/// all failed (one `db` node whose takeover failed once, say) is retried every few seconds
/// instead of staying down for the whole hold, and still does not cycle.
pub const RETRY_ALL_REFUSED_MS: Millis = 5_000;

/// Whether `node` refused `p` less than [`REFUSAL_HOLD_MS`] before `now`.
pub fn refused_recently(p: &Placement, node: NodeId, now: Millis) -> bool {
    p.refused
        .get(&node)
        .is_some_and(|r| now.saturating_sub(r.at) < REFUSAL_HOLD_MS)
}

/// The best holder for `p` among `live` nodes, excluding `not` and nodes that refused it recently:
/// fewest placements held, then a
/// node other than the Raft leader (a crash then costs one failover, not an election plus one),
/// then the lowest id. When every such node refused recently, the one that refused longest ago,
/// once that is [`RETRY_ALL_REFUSED_MS`] past.
fn choose(
    fabric: &Fabric,
    p: &Placement,
    live: &BTreeSet<NodeId>,
    leader: NodeId,
    not: Option<NodeId>,
    now: Millis,
) -> Option<NodeId> {
    let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
    for q in fabric.placements.values() {
        if let Some(o) = q.owner {
            *load.entry(o).or_default() += 1;
        }
    }
    let candidates: Vec<NodeId> = live
        .iter()
        .copied()
        .filter(|n| Some(*n) != not && eligible(fabric, p, *n))
        .collect();
    let fresh = candidates
        .iter()
        .copied()
        .filter(|n| !refused_recently(p, *n, now))
        .min_by_key(|n| (load.get(n).copied().unwrap_or(0), *n == leader, *n));
    fresh.or_else(|| {
        candidates
            .iter()
            .filter_map(|n| p.refused.get(n).map(|r| (r.at, *n)))
            .filter(|(at, _)| now.saturating_sub(*at) >= RETRY_ALL_REFUSED_MS)
            .min()
            .map(|(_, n)| n)
    })
}

/// What the leader should propose now.
///
/// - unowned placement → grant to the best live eligible node;
/// - owner whose lease has certainly run out (`expired`, from a silent majority) → grant elsewhere, or
///   take it back (owner none) when nobody else is eligible;
/// - a live owner keeps its placement: no automatic failback;
/// - a node that refused a placement less than [`REFUSAL_HOLD_MS`] before `now` is passed over;
///   when every eligible live node has, the placement stays unowned until the oldest of those
///   refusals is [`RETRY_ALL_REFUSED_MS`] old, and that node is tried again;
/// - `prefer` names the node an operator asked a placement to move to (a recent refusal does not
///   stop that: the operator asks for a new try).
pub fn plan(
    fabric: &Fabric,
    live: &BTreeSet<NodeId>,
    leader: NodeId,
    expired: &BTreeSet<String>,
    prefer: &BTreeMap<String, NodeId>,
    now: Millis,
) -> Vec<Command> {
    let mut out = Vec::new();
    let standby = fabric.site.role == crate::SiteRole::Standby;
    for (name, p) in &fabric.placements {
        match p.owner {
            // A standby site grants nothing (its state machine would refuse it).
            None if standby => {}
            None => {
                // An operator's `vip move` target wins while it is live and eligible.
                let preferred = prefer
                    .get(name)
                    .copied()
                    .filter(|n| live.contains(n) && eligible(fabric, p, *n));
                if let Some(to) = preferred.or_else(|| choose(fabric, p, live, leader, None, now)) {
                    out.push(Command::GrantPlacement {
                        name: name.clone(),
                        to,
                        expected_epoch: p.epoch,
                    });
                }
            }
            Some(owner) => {
                // Even an owner that left the fabric may still hold a running lease: only a
                // silent majority of voters (see `lease`) frees the placement.
                if !expired.contains(name) {
                    continue;
                }
                let next = if standby {
                    None
                } else {
                    choose(fabric, p, live, leader, Some(owner), now)
                };
                match next {
                    Some(to) => out.push(Command::GrantPlacement {
                        name: name.clone(),
                        to,
                        expected_epoch: p.epoch,
                    }),
                    None => out.push(Command::ReleasePlacement {
                        name: name.clone(),
                        epoch: p.epoch,
                    }),
                }
            }
        }
    }
    out
}

/// Device commands the leader should propose now, `batch` assignments per command: devices that
/// are unassigned (just registered, or their owner was removed) or whose owner is not live or no
/// longer eligible go to the least-loaded live, active `app` nodes (see [`assign::reassign_lost`]).
/// Devices on eligible nodes stay put: no automatic failback or rebalance, as in the model.
///
/// Each command carries the owners it was planned from, so a plan that a committed change has
/// overtaken is refused whole and simply planned again from the newer view on the next tick.
pub fn plan_devices(
    fabric: &Fabric,
    live: &BTreeSet<NodeId>,
    at: Millis,
    batch: usize,
) -> Vec<Command> {
    if fabric.site.role == crate::SiteRole::Standby {
        // A standby site holds no device connections: every assigned device is let go.
        let release = fabric
            .devices
            .iter()
            .filter_map(|(id, d)| {
                d.owner.map(|o| crate::DeviceAssignment {
                    device: id.clone(),
                    from: Some(o),
                    to: None,
                })
            })
            .collect();
        return assign::assign_commands(release, batch, at);
    }
    assign::assign_commands(assign::reassign_lost(fabric, live), batch, at)
}

#[cfg(test)]
mod tests {
    use crate::PlacementKind;

    use super::*;

    fn fabric(
        nodes: &[(NodeId, &[&str])],
        vips: &[(&str, &[&str], Option<NodeId>, u64)],
    ) -> Fabric {
        let mut f = Fabric::default();
        for (id, roles) in nodes {
            f.apply(&Command::RegisterNode {
                id: *id,
                name: format!("n{id}"),
                raft_addr: "a".into(),
                mgmt_ip: None,
                roles: roles.iter().map(|r| r.to_string()).collect(),
                at: 0,
            })
            .unwrap();
        }
        for (i, (name, roles, owner, epoch)) in vips.iter().enumerate() {
            f.placements.insert(
                name.to_string(),
                Placement {
                    kind: PlacementKind::Vip {
                        address: format!("10.0.0.{}/24", 100 + i),
                        interface: "eth0".into(),
                    },
                    eligible_roles: roles.iter().map(|r| r.to_string()).collect(),
                    owner: *owner,
                    epoch: *epoch,
                    refused: BTreeMap::new(),
                },
            );
        }
        f
    }

    fn live(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn grant(name: &str, to: NodeId, e: u64) -> Command {
        Command::GrantPlacement {
            name: name.into(),
            to,
            expected_epoch: e,
        }
    }

    /// Table of cases: (nodes, vips, live, leader, advance past lease?, expected commands).
    #[test]
    fn planner_table() {
        let ha_app: &[&str] = &["ha", "app"];
        let db: &[&str] = &["db"];
        type Case<'a> = (
            &'a str,
            Vec<(NodeId, &'a [&'a str])>,
            Vec<(&'a str, &'a [&'a str], Option<NodeId>, u64)>,
            Vec<NodeId>,
            NodeId,
            bool,
            Vec<Command>,
        );
        let cases: Vec<Case> = vec![
            (
                "unowned goes to a non-leader",
                vec![(1, ha_app), (2, ha_app), (3, ha_app)],
                vec![("cluster", &["ha"], None, 0)],
                vec![1, 2, 3],
                1,
                false,
                vec![grant("cluster", 2, 0)],
            ),
            (
                "only eligible roles",
                vec![(1, ha_app), (2, ha_app), (3, db)],
                vec![("db", &["db"], None, 4)],
                vec![1, 2, 3],
                3,
                false,
                vec![grant("db", 3, 4)],
            ),
            (
                "nobody eligible: nothing",
                vec![(1, ha_app)],
                vec![("db", &["db"], None, 0)],
                vec![1],
                1,
                false,
                vec![],
            ),
            (
                "dead nodes are not chosen",
                vec![(1, ha_app), (2, ha_app), (3, ha_app)],
                vec![("cluster", &["ha"], None, 0)],
                vec![1, 3],
                1,
                false,
                vec![grant("cluster", 3, 0)],
            ),
            (
                "live owner keeps it while the lease may run",
                vec![(1, ha_app), (2, ha_app)],
                vec![("cluster", &["ha"], Some(2), 1)],
                vec![1],
                1,
                false,
                vec![],
            ),
            (
                "expired owner is replaced",
                vec![(1, ha_app), (2, ha_app), (3, ha_app)],
                vec![("cluster", &["ha"], Some(2), 1)],
                vec![1, 3],
                1,
                true,
                vec![grant("cluster", 3, 1)],
            ),
            (
                "expired, no one else: taken back",
                vec![(1, db), (2, ha_app)],
                vec![("cluster", &["ha"], Some(2), 5)],
                vec![1],
                1,
                true,
                vec![Command::ReleasePlacement {
                    name: "cluster".into(),
                    epoch: 5,
                }],
            ),
            (
                "spread over nodes",
                vec![(1, ha_app), (2, ha_app), (3, ha_app)],
                vec![("a", &["ha"], Some(2), 1), ("b", &["ha"], None, 0)],
                vec![1, 2, 3],
                1,
                false,
                vec![grant("b", 3, 0)],
            ),
        ];
        for (what, nodes, vips, alive, leader, expire, expected) in cases {
            let f = fabric(&nodes, &vips);
            let expired: BTreeSet<String> = if expire {
                vips.iter().map(|(n, ..)| n.to_string()).collect()
            } else {
                BTreeSet::new()
            };
            assert_eq!(
                plan(&f, &live(&alive), leader, &expired, &BTreeMap::new(), 0),
                expected,
                "case: {what}"
            );
        }
    }

    #[test]
    fn a_standby_site_grants_nothing_and_takes_back_expired_placements() {
        let mut f = fabric(
            &[(1, &["ha"]), (2, &["ha"])],
            &[
                ("cluster", &["ha"], None, 0),
                ("db", &["ha"], Some(1), 4),
                ("web", &["ha"], Some(2), 6),
            ],
        );
        f.site.role = crate::SiteRole::Standby;
        let expired: BTreeSet<String> = ["db".to_string()].into();
        assert_eq!(
            plan(&f, &live(&[1, 2]), 1, &expired, &BTreeMap::new(), 0),
            vec![Command::ReleasePlacement {
                name: "db".into(),
                epoch: 4
            }],
            "no grant of the free VIP, no move of the expired one, the live owner keeps its own"
        );
    }

    #[test]
    fn removed_owner_waits_for_its_lease_and_draining_nodes_get_nothing() {
        let none = BTreeSet::new();
        let expired: BTreeSet<String> = ["cluster".to_string()].into();
        let mut f = fabric(
            &[(1, &["ha"]), (2, &["ha"])],
            &[("cluster", &["ha"], Some(9), 3)],
        );
        assert_eq!(
            plan(&f, &live(&[1, 2]), 1, &none, &BTreeMap::new(), 0),
            vec![]
        );
        assert_eq!(
            plan(&f, &live(&[1, 2]), 1, &expired, &BTreeMap::new(), 0),
            vec![grant("cluster", 2, 3)]
        );
        f.apply(&Command::SetAdminState {
            id: 2,
            state: AdminState::Draining,
        })
        .unwrap();
        assert_eq!(
            plan(&f, &live(&[1, 2]), 1, &expired, &BTreeMap::new(), 0),
            vec![grant("cluster", 1, 3)]
        );
        // An operator's move target wins over the usual choice.
        f.apply(&Command::SetAdminState {
            id: 2,
            state: AdminState::Active,
        })
        .unwrap();
        f.placements.get_mut("cluster").unwrap().owner = None;
        let prefer: BTreeMap<String, NodeId> = [("cluster".to_string(), 1)].into();
        assert_eq!(
            plan(&f, &live(&[1, 2]), 2, &none, &prefer, 0),
            vec![grant("cluster", 1, 3)]
        );
    }
}

#[cfg(test)]
mod refusal_tests {
    use crate::{PlacementKind, Refusal};

    use super::*;

    #[test]
    fn a_node_that_refused_is_passed_over_until_the_hold_ends() {
        let mut f = Fabric::default();
        for id in 1..=3 {
            f.apply(&Command::RegisterNode {
                id,
                name: format!("n{id}"),
                raft_addr: format!("127.0.0.1:{}", 7000 + id),
                mgmt_ip: None,
                roles: ["ha".to_string()].into(),
                at: 0,
            })
            .unwrap();
        }
        f.apply(&Command::AddPlacement {
            name: "cluster".into(),
            kind: PlacementKind::Vip {
                address: "10.0.0.100/24".into(),
                interface: "eth0".into(),
            },
            eligible_roles: ["ha".to_string()].into(),
        })
        .unwrap();
        let live: BTreeSet<NodeId> = [1, 2, 3].into();
        let none = BTreeSet::new();
        let grant = |to: NodeId, e: u64| Command::GrantPlacement {
            name: "cluster".into(),
            to,
            expected_epoch: e,
        };
        let refuse = |f: &mut Fabric, node: NodeId, at: Millis| {
            let epoch = f.placements["cluster"].epoch;
            f.apply(&grant(node, epoch)).unwrap();
            f.apply(&Command::RefusePlacement {
                name: "cluster".into(),
                node,
                epoch: epoch + 1,
                reason: "no eth0 here".into(),
                at,
            })
            .unwrap();
        };
        let t0: Millis = 1_000_000;
        // Node 1 (lowest id) would be chosen; once it refused, node 2 is.
        assert_eq!(
            plan(&f, &live, 3, &none, &BTreeMap::new(), t0),
            vec![grant(1, 0)]
        );
        refuse(&mut f, 1, t0);
        assert_eq!(
            plan(&f, &live, 3, &none, &BTreeMap::new(), t0),
            vec![grant(2, 2)]
        );
        // Every eligible node refused: the placement stays unowned instead of cycling, until
        // the oldest refusal is RETRY_ALL_REFUSED_MS old (node 1's: tried again first).
        refuse(&mut f, 2, t0 + 10);
        refuse(&mut f, 3, t0 + 20);
        let at = |ms: Millis| plan(&f, &live, 3, &none, &BTreeMap::new(), t0 + ms);
        assert_eq!(at(30), vec![]);
        assert_eq!(at(RETRY_ALL_REFUSED_MS - 1), vec![]);
        assert_eq!(at(RETRY_ALL_REFUSED_MS), vec![grant(1, 6)]);
        // Without node 1, node 2 refused longest ago.
        let without_1: BTreeSet<NodeId> = [2, 3].into();
        let late = t0 + RETRY_ALL_REFUSED_MS + 10;
        assert_eq!(
            plan(&f, &without_1, 3, &none, &BTreeMap::new(), late),
            vec![grant(2, 6)]
        );
        let p = &f.placements["cluster"];
        assert_eq!(p.owner, None);
        assert_eq!(
            p.refused.get(&2),
            Some(&Refusal {
                reason: "no eth0 here".into(),
                at: t0 + 10
            })
        );
        // An operator's move is a new try, refusal or not.
        let prefer: BTreeMap<String, NodeId> = [("cluster".to_string(), 3)].into();
        assert_eq!(
            plan(&f, &live, 3, &none, &prefer, t0 + 30),
            vec![grant(3, 6)]
        );
        // While a node that did not refuse is free, the refusers wait out the whole hold;
        // after it, the usual choice (lowest id among the least loaded) may pick them again.
        f.apply(&Command::RegisterNode {
            id: 4,
            name: "n4".into(),
            raft_addr: "127.0.0.1:7004".into(),
            mgmt_ip: None,
            roles: ["ha".to_string()].into(),
            at: 0,
        })
        .unwrap();
        let four: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let hold = t0 + REFUSAL_HOLD_MS;
        assert_eq!(
            plan(&f, &four, 3, &none, &BTreeMap::new(), hold - 1),
            vec![grant(4, 6)]
        );
        assert_eq!(
            plan(&f, &four, 3, &none, &BTreeMap::new(), hold),
            vec![grant(1, 6)]
        );
        // An owner whose lease ran out is replaced only by a node that has not refused.
        f.apply(&grant(1, 6)).unwrap();
        let expired: BTreeSet<String> = ["cluster".to_string()].into();
        assert_eq!(
            plan(&f, &live, 3, &expired, &BTreeMap::new(), t0 + 40),
            vec![Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 7
            }]
        );
    }
}

#[cfg(test)]
mod device_tests {
    use crate::{DeviceMode, DeviceStatus, MAX_DEVICES_PER_COMMAND, NewDevice};

    use super::*;

    fn fabric(app_nodes: NodeId, devices: usize) -> Fabric {
        let mut f = Fabric::default();
        for id in 1..=app_nodes {
            f.apply(&Command::RegisterNode {
                id,
                name: format!("n{id}"),
                raft_addr: "a".into(),
                mgmt_ip: None,
                roles: ["app".to_string()].into(),
                at: 0,
            })
            .unwrap();
        }
        let all: Vec<NewDevice> = (0..devices)
            .map(|i| NewDevice {
                id: format!("d{i:05}"),
                addr: "10.1.0.1".into(),
                mode: DeviceMode::SpaceInitiated,
            })
            .collect();
        for chunk in all.chunks(MAX_DEVICES_PER_COMMAND) {
            f.apply(&Command::AddDevices {
                devices: chunk.to_vec(),
                at: 1,
            })
            .unwrap();
        }
        f
    }

    fn live(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_standby_site_lets_every_device_go() {
        let mut f = fabric(3, 2_500);
        for c in plan_devices(&f, &live(&[1, 2, 3]), 5, 1_000) {
            f.apply(&c).unwrap();
        }
        f.apply(&Command::SetSiteRole {
            role: crate::SiteRole::Standby,
            epoch: 1,
            at: 6,
        })
        .unwrap();
        let cmds = plan_devices(&f, &live(&[1, 2, 3]), 7, 1_000);
        assert_eq!(cmds.len(), 3, "2,500 releases in commands of 1,000");
        for c in &cmds {
            f.apply(c).unwrap();
        }
        assert!(f.devices.values().all(|d| d.owner.is_none()));
        assert_eq!(plan_devices(&f, &live(&[1, 2, 3]), 8, 1_000), vec![]);
    }

    /// Registration, node loss and a stale plan, driven through the state machine the way the
    /// controller loop would: plan, propose, apply.
    #[test]
    fn registered_devices_are_assigned_and_a_lost_nodes_devices_move() {
        let mut f = fabric(3, 10_000);
        let cmds = plan_devices(&f, &live(&[1, 2, 3]), 5, assign::ASSIGN_BATCH);
        assert_eq!(
            cmds.len(),
            10,
            "10,000 registrations → 10 commands of 1,000"
        );
        for c in &cmds {
            f.apply(c).unwrap();
        }
        assert_eq!(
            f.device_counts(),
            BTreeMap::from([(1, 3334), (2, 3333), (3, 3333)])
        );
        assert!(
            f.devices
                .values()
                .all(|d| d.status == DeviceStatus::Connecting && d.since == 5)
        );
        assert_eq!(plan_devices(&f, &live(&[1, 2, 3]), 6, 1000), vec![]);

        // Node 3 is lost; the plan is made, but node 1 is lost too before it commits.
        let stale = plan_devices(&f, &live(&[1, 2]), 7, 1000);
        let fresh = plan_devices(&f, &live(&[2]), 7, 1000);
        for c in &fresh {
            f.apply(c).unwrap();
        }
        let before = f.clone();
        for c in &stale {
            assert!(
                f.apply(c).is_err(),
                "{c} planned from an old view must be refused"
            );
        }
        assert_eq!(f, before);
        assert_eq!(
            f.device_counts(),
            BTreeMap::from([(1, 0), (2, 10_000), (3, 0)])
        );
        assert_eq!(plan_devices(&f, &live(&[2]), 8, 1000), vec![]);
    }

    #[test]
    fn no_app_node_alive_leaves_devices_unassigned() {
        let mut f = fabric(2, 4);
        for c in plan_devices(&f, &live(&[1, 2]), 5, 1000) {
            f.apply(&c).unwrap();
        }
        let cmds = plan_devices(&f, &live(&[]), 6, 1000);
        assert_eq!(cmds.len(), 1);
        for c in &cmds {
            f.apply(c).unwrap();
        }
        assert!(
            f.devices
                .values()
                .all(|d| d.owner.is_none() && d.status == DeviceStatus::Unassigned)
        );
        assert_eq!(plan_devices(&f, &live(&[]), 7, 1000), vec![]);
    }
}
