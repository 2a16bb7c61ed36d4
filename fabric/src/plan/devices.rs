//! Device assignment planner: which live `app` node should hold each device's connection; pure, no clock, no IO.
//!
//! The leader calls these with its view of the fabric and the nodes it hears from, and proposes
//! the result as `AssignDevices` commands, [`ASSIGN_BATCH`] moves each. Every choice is
//! deterministic: the least-loaded node wins, ties go to the lowest node id, and devices are
//! visited in id order, so two planners with the same input make the same plan.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use crate::NodeId;
use crate::{Command, DeviceAssignment, DeviceStatus, Fabric, MAX_DEVICES_PER_COMMAND, Millis};

/// Moves per `AssignDevices` command: one log entry stays small (tens of kB) so heartbeats and
/// placement changes are not stuck behind a 10,000-device reshuffle.
pub const ASSIGN_BATCH: usize = 1_000;

/// Nodes that may be given devices now, in id order: live, registered, active and with role `app`.
pub fn eligible_device_nodes(fabric: &Fabric, live: &BTreeSet<NodeId>) -> Vec<NodeId> {
    fabric
        .nodes
        .iter()
        .filter(|(id, n)| live.contains(id) && n.may_hold_devices())
        .map(|(id, _)| *id)
        .collect()
}

/// Device counts of the eligible nodes, least-loaded (then lowest id) on top.
struct Loads(BinaryHeap<Reverse<(u64, NodeId)>>);

impl Loads {
    /// Counts the devices each of `eligible` holds now.
    fn new(fabric: &Fabric, eligible: &[NodeId]) -> Self {
        let mut counts: BTreeMap<NodeId, u64> = eligible.iter().map(|n| (*n, 0)).collect();
        for d in fabric.devices.values() {
            if let Some(c) = d.owner.and_then(|o| counts.get_mut(&o)) {
                *c += 1;
            }
        }
        Loads(counts.into_iter().map(|(n, c)| Reverse((c, n))).collect())
    }

    /// Puts one more device on the least-loaded node and names it; `None` without nodes.
    fn take_one(&mut self) -> Option<NodeId> {
        let mut top = self.0.peek_mut()?;
        let Reverse((count, node)) = *top;
        *top = Reverse((count + 1, node));
        Some(node)
    }
}

/// Assigns the listed devices that exist and have no owner, each to the least-loaded eligible
/// node, counting the devices given out so far. Ids that are unknown, already owned or repeated
/// are skipped; with no eligible node the plan is empty (the devices wait, unassigned).
///
/// This is what registration uses: after `AddDevices` commits, the leader proposes this plan.
pub fn assign_new<'a>(
    fabric: &Fabric,
    live: &BTreeSet<NodeId>,
    device_ids: impl IntoIterator<Item = &'a str>,
) -> Vec<DeviceAssignment> {
    let mut loads = Loads::new(fabric, &eligible_device_nodes(fabric, live));
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for id in device_ids {
        let unowned = fabric.devices.get(id).is_some_and(|d| d.owner.is_none());
        if !unowned || !seen.insert(id) {
            continue;
        }
        let Some(to) = loads.take_one() else {
            break;
        };
        out.push(DeviceAssignment {
            device: id.to_string(),
            from: None,
            to: Some(to),
        });
    }
    out
}

/// Finds a home for every device without a usable owner: unassigned ones (never assigned, or their
/// owner was removed) and those whose owner is not live or no longer eligible (draining, lost the
/// role `app`). They fill the least-loaded eligible nodes first, so survivors that were balanced
/// stay balanced (counts differ by at most 1). Devices already on eligible nodes do not move.
///
/// With no eligible node at all, a device whose owner is gone (not live or not registered) is
/// taken back to unassigned, so its status no longer claims a connection nobody holds; a device
/// on a live but ineligible node (say, the last `app` node is draining) stays put, because a held
/// connection is better than none.
pub fn reassign_lost(fabric: &Fabric, live: &BTreeSet<NodeId>) -> Vec<DeviceAssignment> {
    let eligible = eligible_device_nodes(fabric, live);
    let mut loads = Loads::new(fabric, &eligible);
    let mut out = Vec::new();
    for (id, d) in &fabric.devices {
        if d.owner.is_some_and(|o| eligible.binary_search(&o).is_ok()) {
            continue;
        }
        let to = match loads.take_one() {
            Some(to) => Some(to),
            None => match d.owner {
                // Unassigned already, or held by a live node that only may not take new devices.
                None => continue,
                Some(o) if live.contains(&o) && fabric.nodes.contains_key(&o) => continue,
                Some(_) => None,
            },
        };
        out.push(DeviceAssignment {
            device: id.clone(),
            from: d.owner,
            to,
        });
    }
    out
}

/// How much a device's current state argues for leaving it where it is: a live connection is
/// costly to move; a device its owner cannot reach may fare better from another node.
fn stay_weight(status: DeviceStatus) -> u8 {
    match status {
        DeviceStatus::Down => 0,
        DeviceStatus::Unassigned => 1,
        DeviceStatus::Connecting => 2,
        DeviceStatus::Up => 3,
    }
}

/// The fewest moves that bring the device counts of the eligible nodes within 1 of each other,
/// at most `max_moves` of them (`None`: no limit).
///
/// One device at a time goes from the most-loaded node (ties: highest id) to the least-loaded
/// (ties: lowest id); no node both gives and takes, so no device moves twice and the number of
/// moves is the minimum. From a node it gives first its `Down` devices, then `Connecting`, then
/// `Up` ones, highest device id first within each. Devices on ineligible nodes are not counted
/// and not moved: that is [`reassign_lost`]'s job, which should run first.
///
/// There is no automatic failback (as in the model): the controller does not call this on its
/// own; an operator's `device rebalance` does.
pub fn rebalance(
    fabric: &Fabric,
    live: &BTreeSet<NodeId>,
    max_moves: Option<usize>,
) -> Vec<DeviceAssignment> {
    let mut held: BTreeMap<NodeId, Vec<(&String, DeviceStatus)>> =
        eligible_device_nodes(fabric, live)
            .into_iter()
            .map(|n| (n, Vec::new()))
            .collect();
    for (id, d) in &fabric.devices {
        if let Some(v) = d.owner.and_then(|o| held.get_mut(&o)) {
            v.push((id, d.status));
        }
    }
    // The device to give away first goes last, where `pop` takes it.
    for v in held.values_mut() {
        v.sort_by_key(|(id, status)| (Reverse(stay_weight(*status)), *id));
    }
    let mut counts: BTreeSet<(usize, NodeId)> = held.iter().map(|(n, v)| (v.len(), *n)).collect();
    let limit = max_moves.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    while out.len() < limit {
        let (Some(&(low, to)), Some(&(high, from))) = (counts.first(), counts.last()) else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        let Some((device, _)) = held.get_mut(&from).and_then(|v| v.pop()) else {
            break;
        };
        counts.remove(&(low, to));
        counts.remove(&(high, from));
        counts.insert((low + 1, to));
        counts.insert((high - 1, from));
        out.push(DeviceAssignment {
            device: device.clone(),
            from: Some(from),
            to: Some(to),
        });
    }
    out
}

/// Splits `items` into consecutive batches of `size` (the last may be shorter; a `size` of 0
/// counts as 1).
pub fn batches<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let size = size.max(1);
    let mut out = Vec::with_capacity(items.len().div_ceil(size));
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        out.push(rest.by_ref().take(size).collect());
    }
    out
}

/// `AssignDevices` commands for a plan, `batch` assignments each (clamped to
/// 1..=[`MAX_DEVICES_PER_COMMAND`]), all stamped `at`.
pub fn assign_commands(
    assignments: Vec<DeviceAssignment>,
    batch: usize,
    at: Millis,
) -> Vec<Command> {
    batches(assignments, batch.min(MAX_DEVICES_PER_COMMAND))
        .into_iter()
        .map(|assignments| Command::AssignDevices { assignments, at })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{AdminState, Device, DeviceMode};

    const APP: &[&str] = &["app"];
    const DB: &[&str] = &["db"];

    /// A fabric with the given nodes (id, roles, draining?) and no devices.
    fn nodes(spec: &[(NodeId, &[&str], bool)]) -> Fabric {
        let mut f = Fabric::default();
        for (id, roles, draining) in spec {
            f.apply(&Command::RegisterNode {
                id: *id,
                name: format!("n{id}"),
                raft_addr: format!("127.0.0.1:{}", 7000 + id),
                mgmt_ip: None,
                roles: roles.iter().map(|r| r.to_string()).collect(),
                at: 0,
            })
            .unwrap();
            if *draining {
                f.apply(&Command::SetAdminState {
                    id: *id,
                    state: AdminState::Draining,
                })
                .unwrap();
            }
        }
        f
    }

    /// `n` app nodes 1..=n, all active.
    fn app_nodes(n: NodeId) -> Fabric {
        let spec: Vec<(NodeId, &[&str], bool)> = (1..=n).map(|id| (id, APP, false)).collect();
        nodes(&spec)
    }

    /// Adds `n` devices held by `owner` (`Up`) or unassigned, with fresh ids that sort in order.
    fn place(f: &mut Fabric, owner: Option<NodeId>, n: usize) {
        for _ in 0..n {
            let id = format!("d{:06}", f.devices.len());
            f.devices.insert(
                id,
                Device {
                    addr: "10.1.0.1".into(),
                    mode: DeviceMode::SpaceInitiated,
                    owner,
                    status: if owner.is_some() {
                        DeviceStatus::Up
                    } else {
                        DeviceStatus::Unassigned
                    },
                    since: 0,
                },
            );
        }
    }

    fn live(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    /// Device counts of `ids`, in that order.
    fn counts(f: &Fabric, ids: &[NodeId]) -> Vec<u64> {
        let c = f.device_counts();
        ids.iter().map(|n| c.get(n).copied().unwrap_or(0)).collect()
    }

    /// Proposes a plan the way the controller does and checks the state machine takes all of it.
    fn apply_plan(f: &mut Fabric, plan: Vec<DeviceAssignment>) -> usize {
        let cmds = assign_commands(plan, ASSIGN_BATCH, 99);
        let n = cmds.len();
        for c in cmds {
            f.apply(&c).unwrap_or_else(|e| panic!("plan refused: {e}"));
        }
        n
    }

    fn unassigned_ids(f: &Fabric) -> Vec<String> {
        f.devices
            .iter()
            .filter(|(_, d)| d.owner.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    #[test]
    fn only_live_active_app_nodes_are_eligible() {
        // 1 app; 2 db only; 3 app but draining; 4 app but not live; 5 ha+app; 6 live, unregistered.
        let mut f = nodes(&[
            (1, APP, false),
            (2, DB, false),
            (3, APP, true),
            (4, APP, false),
            (5, &["ha", "app"], false),
        ]);
        let alive = live(&[1, 2, 3, 5, 6]);
        assert_eq!(eligible_device_nodes(&f, &alive), vec![1, 5]);
        place(&mut f, None, 20);
        let ids = unassigned_ids(&f);
        let plan = assign_new(&f, &alive, ids.iter().map(String::as_str));
        assert_eq!(plan.len(), 20);
        apply_plan(&mut f, plan);
        assert_eq!(counts(&f, &[1, 2, 3, 4, 5]), vec![10, 0, 0, 0, 10]);
        assert_eq!(rebalance(&f, &alive, None), vec![]);
        assert_eq!(reassign_lost(&f, &alive), vec![]);
    }

    /// (what, devices already held by nodes 1..=3, new devices, expected owner of each new one).
    #[test]
    fn new_devices_go_to_the_least_loaded_node_ties_to_the_lowest_id() {
        let cases: &[(&str, [usize; 3], usize, &[NodeId])] = &[
            (
                "empty nodes: round robin from 1",
                [0, 0, 0],
                4,
                &[1, 2, 3, 1],
            ),
            ("fills the emptiest first", [2, 0, 1], 3, &[2, 2, 3]),
            (
                "tie between 2 and 3 goes to 2",
                [5, 1, 1],
                5,
                &[2, 3, 2, 3, 2],
            ),
            ("single new device", [3, 3, 2], 1, &[3]),
            ("no new devices", [1, 2, 3], 0, &[]),
        ];
        for (what, held, new, expected) in cases {
            let mut f = app_nodes(3);
            for (i, n) in held.iter().enumerate() {
                place(&mut f, Some(i as NodeId + 1), *n);
            }
            let first_new = f.devices.len();
            place(&mut f, None, *new);
            let ids: Vec<String> = (first_new..f.devices.len())
                .map(|i| format!("d{i:06}"))
                .collect();
            let plan = assign_new(&f, &live(&[1, 2, 3]), ids.iter().map(String::as_str));
            let owners: Vec<NodeId> = plan.iter().filter_map(|a| a.to).collect();
            assert_eq!(owners, *expected, "case: {what}");
            assert!(plan.iter().all(|a| a.from.is_none()), "case: {what}");
        }
    }

    #[test]
    fn assign_new_skips_unknown_owned_and_repeated_ids() {
        let mut f = app_nodes(2);
        place(&mut f, Some(1), 1); // d000000, owned
        place(&mut f, None, 1); // d000001
        let plan = assign_new(
            &f,
            &live(&[1, 2]),
            ["d000000", "nope", "d000001", "d000001"],
        );
        assert_eq!(
            plan,
            vec![DeviceAssignment {
                device: "d000001".into(),
                from: None,
                to: Some(2),
            }]
        );
        assert_eq!(assign_new(&f, &live(&[]), ["d000001"]), vec![]);
    }

    #[test]
    fn thousand_new_devices_over_three_nodes_split_334_333_333() {
        let mut f = app_nodes(3);
        place(&mut f, None, 1000);
        let ids = unassigned_ids(&f);
        let plan = assign_new(&f, &live(&[1, 2, 3]), ids.iter().map(String::as_str));
        assert_eq!(apply_plan(&mut f, plan), 1, "1,000 moves fit one command");
        assert_eq!(counts(&f, &[1, 2, 3]), vec![334, 333, 333]);
        assert!(
            f.devices
                .values()
                .all(|d| d.status == DeviceStatus::Connecting)
        );
    }

    #[test]
    fn a_lost_nodes_devices_spread_over_the_survivors_balanced() {
        let mut f = app_nodes(3);
        place(&mut f, None, 10_000);
        let ids = unassigned_ids(&f);
        let plan = assign_new(&f, &live(&[1, 2, 3]), ids.iter().map(String::as_str));
        assert_eq!(apply_plan(&mut f, plan), 10, "10,000 moves → 10 commands");
        assert_eq!(counts(&f, &[1, 2, 3]), vec![3334, 3333, 3333]);
        let before = f.clone();

        // Node 2 stops answering.
        let plan = reassign_lost(&f, &live(&[1, 3]));
        assert_eq!(plan.len(), 3333, "exactly node 2's devices move");
        let mut moved = BTreeSet::new();
        for a in &plan {
            assert_eq!(a.from, Some(2), "{} was not on the lost node", a.device);
            assert!(
                matches!(a.to, Some(1 | 3)),
                "{} went to {:?}",
                a.device,
                a.to
            );
            assert!(moved.insert(a.device.as_str()), "{} moved twice", a.device);
        }
        apply_plan(&mut f, plan);
        let after = counts(&f, &[1, 3]);
        assert_eq!(after.iter().sum::<u64>(), 10_000);
        assert!(after[0].abs_diff(after[1]) <= 1, "{after:?}");
        assert_eq!(counts(&f, &[2]), vec![0]);
        for (id, d) in &before.devices {
            if d.owner != Some(2) {
                assert_eq!(f.devices[id].owner, d.owner, "{id} moved without need");
            }
        }
        // Nothing left to do, and node 2 coming back gets nothing by itself (no failback).
        assert_eq!(reassign_lost(&f, &live(&[1, 3])), vec![]);
        assert_eq!(reassign_lost(&f, &live(&[1, 2, 3])), vec![]);
    }

    /// Survivors with unequal loads: the lost devices fill the emptiest first.
    #[test]
    fn lost_devices_level_unequal_survivors() {
        let mut f = app_nodes(4);
        place(&mut f, Some(1), 10);
        place(&mut f, Some(2), 2);
        place(&mut f, Some(3), 6);
        place(&mut f, Some(4), 12);
        let plan = reassign_lost(&f, &live(&[1, 2, 3]));
        apply_plan(&mut f, plan);
        assert_eq!(counts(&f, &[1, 2, 3, 4]), vec![10, 10, 10, 0]);
    }

    #[test]
    fn a_draining_node_or_one_without_app_hands_all_its_devices_off() {
        for change in [
            Command::SetAdminState {
                id: 1,
                state: AdminState::Draining,
            },
            Command::SetRoles {
                id: 1,
                roles: ["db".to_string()].into(),
            },
        ] {
            let mut f = app_nodes(3);
            place(&mut f, Some(1), 9);
            place(&mut f, Some(2), 3);
            place(&mut f, Some(3), 3);
            f.apply(&change).unwrap();
            let plan = reassign_lost(&f, &live(&[1, 2, 3]));
            assert_eq!(plan.len(), 9, "{change}");
            assert!(plan.iter().all(|a| a.from == Some(1)), "{change}");
            apply_plan(&mut f, plan);
            assert_eq!(counts(&f, &[1, 2, 3]), vec![0, 8, 7], "{change}");
        }
    }

    #[test]
    fn unassigned_devices_are_placed_with_the_lost_ones() {
        // Registration committed but its assignment did not (leader crashed in between).
        let mut f = app_nodes(2);
        place(&mut f, Some(1), 4);
        place(&mut f, None, 3);
        place(&mut f, Some(9), 3); // owner no longer registered
        let plan = reassign_lost(&f, &live(&[1, 2]));
        apply_plan(&mut f, plan);
        assert_eq!(counts(&f, &[1, 2]), vec![5, 5]);
        assert!(unassigned_ids(&f).is_empty());
    }

    #[test]
    fn with_no_eligible_node_gone_owners_lose_their_devices_live_ones_keep_them() {
        let mut f = nodes(&[(1, APP, false), (2, APP, true), (3, DB, false)]);
        place(&mut f, Some(1), 2); // node 1 is dead
        place(&mut f, Some(2), 2); // node 2 is draining but live
        place(&mut f, None, 2);
        let alive = live(&[2, 3]);
        let plan = reassign_lost(&f, &alive);
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|a| a.from == Some(1) && a.to.is_none()));
        apply_plan(&mut f, plan);
        assert_eq!(counts(&f, &[1, 2]), vec![0, 2]);
        assert_eq!(unassigned_ids(&f).len(), 4);
        assert!(
            f.devices
                .values()
                .filter(|d| d.owner.is_none())
                .all(|d| d.status == DeviceStatus::Unassigned)
        );
        assert_eq!(
            reassign_lost(&f, &alive),
            vec![],
            "a second pass has nothing to do"
        );
        // An app node comes back: everything without a usable owner goes to it.
        let plan = reassign_lost(&f, &live(&[1, 2, 3]));
        assert_eq!(plan.len(), 6);
        assert!(plan.iter().all(|a| a.to == Some(1)));
    }

    /// Moves `rebalance` must need to level `held`: the surplus over a target where the +1s of an
    /// uneven split go to the most-loaded nodes.
    fn fewest_moves(held: &[usize]) -> usize {
        let k = held.len();
        if k == 0 {
            return 0;
        }
        let total: usize = held.iter().sum();
        let mut sorted = held.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sorted
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(total / k + usize::from(i < total % k)))
            .sum()
    }

    /// (what, devices on app nodes 1.., max_moves, expected counts after, expected moves).
    #[test]
    fn rebalance_table() {
        type Case = (
            &'static str,
            &'static [usize],
            Option<usize>,
            &'static [u64],
            usize,
        );
        let cases: &[Case] = &[
            ("10/0/0", &[10, 0, 0], None, &[4, 3, 3], 6),
            ("already balanced", &[3, 3, 3], None, &[3, 3, 3], 0),
            ("within one", &[4, 3, 3], None, &[4, 3, 3], 0),
            ("max_moves stops early", &[10, 0, 0], Some(2), &[8, 1, 1], 2),
            ("max_moves 0", &[10, 0, 0], Some(0), &[10, 0, 0], 0),
            (
                "max_moves above need",
                &[10, 0, 0],
                Some(100),
                &[4, 3, 3],
                6,
            ),
            ("two full, one new", &[5, 5, 0], None, &[4, 3, 3], 3),
            (
                "uneven split keeps the +1 on the givers",
                &[7, 0, 0, 0],
                None,
                &[2, 2, 2, 1],
                5,
            ),
            ("giver of highest id first", &[5, 0, 5], None, &[4, 3, 3], 3),
            ("one node", &[9], None, &[9], 0),
            ("two nodes off by two", &[2, 0], None, &[1, 1], 1),
        ];
        for (what, held, max_moves, expected, moves) in cases {
            let ids: Vec<NodeId> = (1..=held.len() as NodeId).collect();
            let mut f = app_nodes(held.len() as NodeId);
            for (id, n) in ids.iter().zip(held.iter()) {
                place(&mut f, Some(*id), *n);
            }
            let plan = rebalance(&f, &live(&ids), *max_moves);
            assert_eq!(plan.len(), *moves, "case: {what}");
            if max_moves.is_none() {
                assert_eq!(plan.len(), fewest_moves(held), "case: {what}");
            }
            let moved: BTreeSet<&str> = plan.iter().map(|a| a.device.as_str()).collect();
            assert_eq!(moved.len(), plan.len(), "case {what}: a device moved twice");
            apply_plan(&mut f, plan);
            assert_eq!(counts(&f, &ids), *expected, "case: {what}");
        }
    }

    #[test]
    fn rebalance_takes_the_fewest_moves_on_random_loads() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let k = 1 + (next() % 6) as usize;
            let held: Vec<usize> = (0..k).map(|_| (next() % 40) as usize).collect();
            let ids: Vec<NodeId> = (1..=k as NodeId).collect();
            let mut f = app_nodes(k as NodeId);
            for (id, n) in ids.iter().zip(&held) {
                place(&mut f, Some(*id), *n);
            }
            let plan = rebalance(&f, &live(&ids), None);
            assert_eq!(plan.len(), fewest_moves(&held), "round {round}: {held:?}");
            apply_plan(&mut f, plan);
            let after = counts(&f, &ids);
            let (lo, hi) = (after.iter().min(), after.iter().max());
            assert!(
                hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
                "round {round}: {held:?} → {after:?}"
            );
        }
    }

    #[test]
    fn rebalance_gives_away_down_devices_first_then_the_highest_ids() {
        let mut f = app_nodes(2);
        place(&mut f, Some(1), 6);
        let status = [
            DeviceStatus::Up,
            DeviceStatus::Down,
            DeviceStatus::Up,
            DeviceStatus::Connecting,
            DeviceStatus::Down,
            DeviceStatus::Up,
        ];
        for (d, s) in f.devices.values_mut().zip(status) {
            d.status = s;
        }
        let plan: Vec<String> = rebalance(&f, &live(&[1, 2]), None)
            .into_iter()
            .map(|a| a.device)
            .collect();
        assert_eq!(plan, vec!["d000004", "d000001", "d000003"]);
    }

    #[test]
    fn rebalance_ignores_ineligible_nodes_and_their_devices() {
        let mut f = nodes(&[
            (1, APP, false),
            (2, APP, false),
            (3, APP, true),
            (4, DB, false),
        ]);
        place(&mut f, Some(1), 6);
        place(&mut f, Some(3), 50);
        place(&mut f, Some(4), 50);
        let plan = rebalance(&f, &live(&[1, 2, 3, 4]), None);
        assert_eq!(plan.len(), 3);
        assert!(plan.iter().all(|a| a.from == Some(1) && a.to == Some(2)));
        // Node 2 not live: alone, node 1 is balanced.
        assert_eq!(rebalance(&f, &live(&[1, 3, 4]), None), vec![]);
    }

    #[test]
    fn batches_split_in_order() {
        let cases: &[(usize, usize, &[usize])] = &[
            (10, 3, &[3, 3, 3, 1]),
            (10, 5, &[5, 5]),
            (3, 0, &[1, 1, 1]),
            (0, 4, &[]),
            (2, 100, &[2]),
        ];
        for (n, size, expected) in cases {
            let items: Vec<usize> = (0..*n).collect();
            let out = batches(items.clone(), *size);
            let sizes: Vec<usize> = out.iter().map(Vec::len).collect();
            assert_eq!(sizes, *expected, "{n} in batches of {size}");
            assert_eq!(out.concat(), items, "{n} in batches of {size}: order kept");
        }
        let plan = |n: usize| -> Vec<DeviceAssignment> {
            (0..n)
                .map(|i| DeviceAssignment {
                    device: format!("d{i}"),
                    from: None,
                    to: Some(1),
                })
                .collect()
        };
        assert_eq!(assign_commands(plan(10_000), ASSIGN_BATCH, 5).len(), 10);
        assert_eq!(
            assign_commands(plan(25_000), usize::MAX, 5).len(),
            3,
            "clamped to the command limit"
        );
        assert_eq!(assign_commands(plan(0), ASSIGN_BATCH, 5), vec![]);
    }

    /// Not a pass/fail test: prints how long planning takes at scale. Run with
    /// `cargo test --release -p spaced-raft --lib assign -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn planning_time_at_scale() {
        for (devices, nodes) in [(10_000, 3), (100_000, 3), (100_000, 20)] {
            let mut f = app_nodes(nodes);
            let per = devices / nodes as usize;
            for n in 1..=nodes {
                place(&mut f, Some(n), per);
            }
            let survivors: Vec<NodeId> = (2..=nodes).collect();
            let started = Instant::now();
            let lost = reassign_lost(&f, &live(&survivors));
            let t_lost = started.elapsed();
            let cmds = assign_commands(lost, ASSIGN_BATCH, 1);
            let t_cmds = started.elapsed();
            let mut g = app_nodes(nodes);
            place(&mut g, Some(1), devices);
            let all: Vec<NodeId> = (1..=nodes).collect();
            let started = Instant::now();
            let moves = rebalance(&g, &live(&all), None);
            let t_rebalance = started.elapsed();
            let mut h = app_nodes(nodes);
            place(&mut h, None, devices);
            let ids = unassigned_ids(&h);
            let started = Instant::now();
            let fresh = assign_new(&h, &live(&all), ids.iter().map(String::as_str));
            let t_new = started.elapsed();
            assert_eq!(fresh.len(), devices);
            println!(
                "{devices} devices on {nodes} nodes: assign_new of all {t_new:?}; reassign_lost {t_lost:?} ({} commands incl. batching {t_cmds:?}); rebalance from one node {t_rebalance:?} ({} moves)",
                cmds.len(),
                moves.len()
            );
        }
    }
}
