//! The leader's side of devices (DESIGN §8): assigns registered, orphaned and draining nodes'
//! devices every tick, and carries out `device rebalance` and `node drain` / `node activate`.
//!
//! A node is live for devices when the leader heard from it within `[devices] lost_after_ms`
//! (800 ms by default; placements use the same rule with 1 s, see
//! `placement::live_set`) and it is not stopping. A new leader's contact table starts
//! empty, so for its first `lost_after` it moves no device at all unless it has heard from
//! every registered node by then: a node it has not heard from *yet* is not lost, and its
//! devices' connections must not be torn down for the new leader's ignorance.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use spaced_fabric::plan::devices::{self as assign, ASSIGN_BATCH};
use spaced_fabric::{AdminState, Command};
use spaced_raft::{NodeId, Outcome};
use tokio::sync::watch;

use super::report::{NodeDevices, RebalanceReport};
use crate::cluster::{Cluster, OpError, ProposeError};
use crate::now_millis;
use spaced_fabric::plan::placements::plan_devices;

/// How often the leader plans device assignments: new registrations wait at most this long.
const PLAN_DEVICES_EVERY: Duration = Duration::from_millis(100);

/// Whether a leader that has led for `leading` may move devices now: once it has led for
/// `lost_after` (a node it has not heard from by then is lost), or earlier if it has `heard`
/// from every `registered` node already. `Err` says how much longer to wait.
pub fn may_move_devices(
    leading: Duration,
    lost_after: Duration,
    mut registered: impl Iterator<Item = NodeId>,
    heard: &BTreeSet<NodeId>,
) -> Result<(), Duration> {
    if leading >= lost_after || registered.all(|n| heard.contains(&n)) {
        Ok(())
    } else {
        Err(lost_after - leading)
    }
}

/// The live set, once the leader knows enough to act on it (see [`may_move_devices`]). A node
/// that told the leader it is stopping has been heard from, though it is not live for new work.
fn settled_live_set(inner: &Cluster, lost_after: Duration) -> Result<BTreeSet<NodeId>, Duration> {
    let heard = inner.live_nodes(lost_after);
    let live = inner.live_set(lost_after);
    let leading = inner.tenure.leading_for().unwrap_or_default();
    inner
        .view
        .read(|f| may_move_devices(leading, lost_after, f.nodes.keys().copied(), &heard))?;
    Ok(live)
}

/// Commits device commands one after another (each a batch of at most [`ASSIGN_BATCH`]), so
/// other proposals interleave. Returns the devices moved; a refused batch (a plan a newer change
/// overtook) is skipped, the rest still go; losing leadership stops it.
async fn commit_batches(inner: &Cluster, cmds: Vec<Command>) -> Result<u64, ProposeError> {
    let mut moved = 0;
    for cmd in cmds {
        match inner.commit(cmd).await {
            Ok(Ok(Outcome::DevicesAssigned(n))) => moved += n,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "device assignment refused; planning again")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(moved)
}

/// On the leader, every [`PLAN_DEVICES_EVERY`]: give unassigned devices and those of lost,
/// stopping or draining nodes to the least-loaded live `app` nodes.
pub async fn planner_loop(
    inner: Cluster,
    lost_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PLAN_DEVICES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_logged = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !inner.raft.is_leader() {
            waiting_logged = false;
            continue;
        }
        let live = match settled_live_set(&inner, lost_after) {
            Ok(live) => live,
            Err(left) => {
                if !waiting_logged {
                    tracing::info!(wait = ?left, "new leader: not moving devices until it has heard from every node or the wait is over");
                    waiting_logged = true;
                }
                continue;
            }
        };
        let started = Instant::now();
        let cmds = inner
            .view
            .read(|f| plan_devices(f, &live, now_millis(), ASSIGN_BATCH));
        if cmds.is_empty() {
            continue;
        }
        let commands = cmds.len();
        match commit_batches(&inner, cmds).await {
            Ok(moved) => tracing::info!(
                moved,
                commands,
                live = ?live,
                ms = started.elapsed().as_millis() as u64,
                "devices assigned"
            ),
            // Leadership moved on; the new leader plans from here.
            Err(e @ ProposeError::NotLeader(..)) => {
                tracing::debug!(error = %e, "device assignment interrupted")
            }
            Err(e) => tracing::warn!(error = %e, "device assignment interrupted"),
        }
    }
}

/// Device counts of the nodes that may hold devices now.
fn eligible_counts(inner: &Cluster, live: &BTreeSet<NodeId>) -> Vec<NodeDevices> {
    inner.view.read(|f| {
        let counts = f.device_counts();
        assign::eligible_device_nodes(f, live)
            .into_iter()
            .map(|id| NodeDevices {
                id,
                name: f.nodes.get(&id).map(|n| n.name.clone()).unwrap_or_default(),
                devices: counts.get(&id).copied().unwrap_or(0),
            })
            .collect()
    })
}

/// `device rebalance` on the leader: the fewest moves that bring the live `app` nodes within one
/// device of each other (at most `max_moves`), committed in batches.
pub async fn rebalance(
    inner: &Cluster,
    lost_after: Duration,
    max_moves: Option<u64>,
) -> Result<RebalanceReport, OpError> {
    let live = settled_live_set(inner, lost_after).map_err(|left| {
        OpError::Refused(format!(
            "this node just became leader; try again in {} ms",
            left.as_millis()
        ))
    })?;
    let max_moves = max_moves.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    let plan = inner.view.read(|f| assign::rebalance(f, &live, max_moves));
    let planned = plan.len() as u64;
    let cmds = assign::assign_commands(plan, ASSIGN_BATCH, now_millis());
    let moved = commit_batches(inner, cmds).await?;
    tracing::info!(planned, moved, "devices rebalanced");
    Ok(RebalanceReport {
        planned,
        moved,
        nodes: eligible_counts(inner, &live),
    })
}

/// `node drain` / `node activate` on the leader: commits the admin state; a draining node's
/// devices then move on the planner's next tick. Returns the devices the node held.
pub async fn set_admin_state(
    inner: &Cluster,
    id: NodeId,
    state: AdminState,
) -> Result<(String, u64), OpError> {
    let name = inner
        .view
        .read(|f| f.nodes.get(&id).map(|n| n.name.clone()))
        .ok_or_else(|| OpError::Refused(format!("node {id} is not registered in the fabric")))?;
    inner.propose(Command::SetAdminState { id, state }).await?;
    let held = inner
        .view
        .read(|f| f.device_counts().get(&id).copied().unwrap_or(0));
    tracing::info!(node = id, name = %name, ?state, devices = held, "admin state set");
    Ok((name, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (what, led for ms, registered nodes, nodes heard from, expected: Ok or ms left to wait).
    #[test]
    fn a_new_leader_moves_devices_only_once_it_knows_who_is_lost() {
        let ms = Duration::from_millis;
        let full = 800;
        type Case = (
            &'static str,
            u64,
            &'static [NodeId],
            &'static [NodeId],
            Result<(), u64>,
        );
        let cases: &[Case] = &[
            (
                "just elected, heard from nobody",
                0,
                &[1, 2, 3],
                &[1],
                Err(full),
            ),
            (
                "one node not heard from yet",
                100,
                &[1, 2, 3],
                &[1, 2],
                Err(full - 100),
            ),
            (
                "heard from everyone: no need to wait",
                30,
                &[1, 2, 3],
                &[1, 2, 3],
                Ok(()),
            ),
            (
                "the wait is over: the silent node is lost",
                full,
                &[1, 2, 3],
                &[1, 2],
                Ok(()),
            ),
            ("long-standing leader", 60_000, &[1, 2, 3], &[3], Ok(())),
            (
                "live but unregistered nodes do not matter",
                0,
                &[1],
                &[1, 7],
                Ok(()),
            ),
        ];
        for (what, led, registered, heard, expected) in cases {
            let heard: BTreeSet<NodeId> = heard.iter().copied().collect();
            let got = may_move_devices(ms(*led), ms(full), registered.iter().copied(), &heard);
            assert_eq!(got, expected.map_err(ms), "case: {what}");
        }
    }
}
