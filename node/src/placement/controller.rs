//! The leader's side of placements: every [`PLAN_EVERY`] it finds the leases a majority of
//! voters heard nothing of, plans grants and take-backs (the pure planner of `spaced-fabric`)
//! and proposes them; and it hands leadership away when it holds placements itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::Command;
use spaced_fabric::plan::placements::plan;
use spaced_raft::network::{RaftReply, RaftRpc};
use spaced_raft::{NodeId, Outcome};
use tokio::sync::watch;

use super::lease::{LeaseConfig, LeaseKey, quorum_silent};
use super::{LIVE_WITHIN, Placements};
use crate::{lock, now_millis};

/// How often the leader plans.
const PLAN_EVERY: Duration = Duration::from_millis(10);
/// The shortest time between two passes of the planner.
const PLAN_GAP: Duration = Duration::from_millis(2);
/// A leader that holds placements hands leadership away at most this often.
const STEP_ASIDE_EVERY: Duration = Duration::from_secs(5);
/// ... and only after it has led this long (the cluster is settled).
const STEP_ASIDE_AFTER: Duration = Duration::from_secs(2);

/// The leases a leader asks the other voters about: those its own witness finds silent for
/// longer than `span`.
pub fn suspects(keys: Vec<LeaseKey>, mine: Vec<Duration>, span: Duration) -> Vec<LeaseKey> {
    keys.into_iter()
        .zip(mine)
        .filter(|(_, d)| *d > span)
        .map(|(k, _)| k)
        .collect()
}

/// The placements among `suspects` that voters holding a majority of every voter set report
/// silent (`answers`: each voter's silence per suspect, in the suspects' order; a voter that
/// did not answer is absent).
pub fn silent_placements(
    lease: &LeaseConfig,
    configs: &[BTreeSet<NodeId>],
    suspects: Vec<LeaseKey>,
    answers: Vec<(NodeId, Vec<Duration>)>,
) -> BTreeSet<String> {
    let mut reports: Vec<Vec<(NodeId, Duration)>> = vec![Vec::new(); suspects.len()];
    for (v, answer) in answers {
        if answer.len() != suspects.len() {
            continue;
        }
        for (i, d) in answer.into_iter().enumerate() {
            reports[i].push((v, d));
        }
    }
    suspects
        .into_iter()
        .zip(reports)
        .filter(|(_, r)| quorum_silent(lease, configs, r))
        .map(|((name, ..), _)| name)
        .collect()
}

/// What a leader knows when it considers handing leadership away because it holds placements.
pub struct StepAsideView {
    /// The leader.
    pub me: NodeId,
    /// How long it has led.
    pub leading_for: Option<Duration>,
    /// How long the placements it owns (names and epochs) have been the same.
    pub holding_for: Duration,
    /// Nodes that own a placement.
    pub owners: BTreeSet<NodeId>,
    /// The voters.
    pub voters: Vec<NodeId>,
    /// Membership committed and not joint.
    pub stable: bool,
    /// Voters whose log matches the leader's.
    pub caught_up: BTreeSet<NodeId>,
    /// Nodes live for placements.
    pub live: BTreeSet<NodeId>,
    /// Whether a placement it owns has lapsed (a majority of voters found its lease silent).
    pub own_lapsed: bool,
}

/// A leader that also holds placements makes its own crash cost an election *and* a lease
/// span: the voter to hand leadership to, if any. Only in a settled cluster (leading for
/// [`STEP_ASIDE_AFTER`], holding the same placements for as long, membership committed and not
/// joint, at least three voters) and only to a live, caught-up voter that holds nothing.
///
/// Holding for as long: found by the fault campaign (3 flaps in 1,000 faults, each after a
/// heal). A leader granted itself the placements left free by the partition and handed
/// leadership away in its next pass; its first renewals then had to reach the new leader over
/// connections still being set up after the heal, and its leases ran out 230–460 ms after the
/// grant: the VIP and the singleton moved with no fault.
///
/// Not while a placement it owns has lapsed: the leader grants that one elsewhere in the same
/// pass, where a new leader would first wait out the old leases. Found by the fault campaign: a
/// leader that had owned the VIP from before a majority partition (self-fenced during it)
/// handed leadership away 130 ms after the heal; the new leader waited, and granted the VIP
/// 180 ms later, 341 ms after the heal.
pub fn step_aside_target(v: &StepAsideView) -> Option<NodeId> {
    if !v.owners.contains(&v.me) || v.own_lapsed {
        return None;
    }
    if !v.leading_for.is_some_and(|t| t > STEP_ASIDE_AFTER) || v.holding_for <= STEP_ASIDE_AFTER {
        return None;
    }
    if !v.stable || v.voters.len() < 3 {
        return None;
    }
    v.voters.iter().copied().find(|n| {
        *n != v.me && v.live.contains(n) && !v.owners.contains(n) && v.caught_up.contains(n)
    })
}

/// How recent a voter's refusal of the leader as a stranger must be to act on it, and how
/// often the leader hands leadership away for it.
const STRANGER_WITHIN: Duration = Duration::from_secs(3);
const STRANGER_HANDOFF_EVERY: Duration = Duration::from_secs(2);

/// A leader that voters `refusers` refuse as a stranger (they missed the change that added it,
/// and cannot learn it from a leader they do not know): the voter to hand leadership to, so
/// that they catch up. Only a live, caught-up voter that is neither the leader nor a refuser,
/// and that joined the fabric before the leader (one added after it is a stranger to them
/// too); of those, the first to join (`joined`: node → when it was registered).
pub fn stranger_handoff_target(
    me: NodeId,
    voters: &[NodeId],
    refusers: &BTreeSet<NodeId>,
    caught_up: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
    joined: &BTreeMap<NodeId, u64>,
) -> Option<NodeId> {
    if !refusers.iter().any(|r| voters.contains(r)) {
        return None;
    }
    let mine = joined.get(&me).copied().unwrap_or(u64::MAX);
    voters
        .iter()
        .copied()
        .filter(|n| *n != me && !refusers.contains(n) && live.contains(n) && caught_up.contains(n))
        .filter_map(|n| joined.get(&n).map(|j| (*j, n)))
        .filter(|(j, _)| *j < mine)
        .min()
        .map(|(_, n)| n)
}

/// On the leader: the followers whose log matches the leader's.
fn caught_up(m: &openraft::RaftMetrics<spaced_raft::TypeConfig>) -> BTreeSet<NodeId> {
    m.replication
        .iter()
        .flatten()
        .filter(|(_, l)| l.map(|l| l.index) == m.last_log_index)
        .map(|(v, _)| *v)
        .collect()
}

impl Placements {
    /// On the leader: a voter refuses it as a stranger: hands leadership to an older voter
    /// (see [`stranger_handoff_target`]). Whether it tried.
    async fn hand_off_to_a_known_leader(&self, live: &BTreeSet<NodeId>) -> bool {
        let cluster = &self.cluster;
        let refusers: BTreeSet<NodeId> = cluster
            .network
            .refused_as_stranger_by(STRANGER_WITHIN)
            .into_iter()
            .collect();
        if refusers.is_empty() {
            return false;
        }
        let (voters, caught_up) = {
            let m = cluster.raft.metrics();
            let m = m.borrow_watched();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            (voters, caught_up(&m))
        };
        let joined: BTreeMap<NodeId, u64> = cluster
            .view
            .read(|f| f.nodes.iter().map(|(id, n)| (*id, n.joined_at)).collect());
        let Some(to) =
            stranger_handoff_target(cluster.id, &voters, &refusers, &caught_up, live, &joined)
        else {
            return false;
        };
        tracing::warn!(
            to,
            refused_by = ?refusers,
            "voters that missed this node's joining refuse it as leader: handing leadership to a voter they know"
        );
        if let Err(e) = cluster.raft.trigger().transfer_leader(to).await {
            tracing::warn!(to, error = %e, "leadership transfer failed");
        }
        true
    }

    /// On the leader: the placements whose owner a majority of voters has not heard from for a
    /// full span. Asks the other voters only about leases its own witness finds silent.
    async fn expired_leases(self: &Arc<Self>) -> BTreeSet<String> {
        let keys = self.lease_keys();
        let mine = self.local_silence(&keys);
        let suspects = suspects(keys, mine, self.lease.reassign_after());
        if suspects.is_empty() {
            return BTreeSet::new();
        }
        let configs = self.cluster.voter_configs();
        let asks = self.cluster.voters().into_iter().map(|(v, member)| {
            let placements = self.clone();
            let suspects = suspects.clone();
            async move {
                let cluster = &placements.cluster;
                if v == cluster.id {
                    return Some((v, placements.local_silence(&suspects)));
                }
                let rpc = RaftRpc::Silence {
                    keys: suspects,
                    terms: placements.lease.terms(),
                };
                match cluster
                    .call(v, &member?, rpc, Duration::from_millis(100))
                    .await
                {
                    Ok(RaftReply::Silences(ms)) => {
                        Some((v, ms.into_iter().map(Duration::from_millis).collect()))
                    }
                    _ => None,
                }
            }
        });
        // Answers are counted as they come: once they already make every suspect silent by a
        // quorum, the voters still to answer cannot change that (a voter that does not answer
        // counts as not silent), so the leader does not wait out the time limit of a call to
        // the lost host itself, which is a voter too.
        let mut pending: futures::stream::FuturesUnordered<_> = asks.collect();
        let mut answers = Vec::new();
        let mut silent = BTreeSet::new();
        while let Some(answer) = pending.next().await {
            answers.extend(answer);
            silent = silent_placements(&self.lease, &configs, suspects.clone(), answers.clone());
            if silent.len() == suspects.len() {
                break;
            }
        }
        silent
    }

    /// On the leader: plan and propose grants and take-backs.
    pub async fn controller_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let cluster = self.cluster.clone();
        let mut tick = tokio::time::interval(PLAN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_step_aside: Option<Instant> = None;
        // The placements this node owns (name, epoch), and since when they have been those.
        let mut holding: (Vec<(String, u64)>, Instant) = (Vec::new(), Instant::now());
        let mut last_stranger_handoff: Option<Instant> = None;
        // Changes with the server state (leader, follower, candidate), the vote and membership,
        // not with every heartbeat: a follower sleeps on it instead of ticking.
        let mut server = cluster.raft.server_metrics();
        // A leader also plans as soon as the fabric changes (a release committed by a graceful
        // stop or a guard's report is granted elsewhere at once, not at the next tick), but at
        // most once per PLAN_GAP however fast commits come.
        let mut fabric_changed = cluster.view.changes();
        let mut last_plan: Option<Instant> = None;
        loop {
            let was_leading = server.borrow_watched().state.is_leader();
            let raft_gone = tokio::select! {
                _ = tick.tick(), if was_leading => false,
                Ok(()) = fabric_changed.changed(), if was_leading => false,
                changed = server.changed(), if !was_leading => changed.is_err(),
                _ = shutdown.wait_for(|s| *s) => return,
            };
            super::pace(&mut last_plan, PLAN_GAP).await;
            if raft_gone {
                // Raft has shut down: tick (and find no leadership) until shutdown.
                tick.tick().await;
            }
            let leading = cluster.raft.is_leader();
            cluster.tenure.observe(leading);
            if !leading {
                continue;
            }
            let live = cluster.live_set(LIVE_WITHIN);
            if !last_stranger_handoff.is_some_and(|t| t.elapsed() < STRANGER_HANDOFF_EVERY)
                && self.hand_off_to_a_known_leader(&live).await
            {
                last_stranger_handoff = Some(Instant::now());
                continue;
            }
            let held = self.held_here();
            if held != holding.0 {
                holding = (held, Instant::now());
            }
            let expired = self.expired_leases().await;
            let own_lapsed = holding.0.iter().any(|(name, _)| expired.contains(name));
            if !last_step_aside.is_some_and(|t| t.elapsed() < STEP_ASIDE_EVERY)
                && let Some(to) = self
                    .step_aside_view(&live, holding.1.elapsed(), own_lapsed)
                    .as_ref()
                    .and_then(step_aside_target)
            {
                last_step_aside = Some(Instant::now());
                tracing::info!(
                    to,
                    "leader holds placements: handing leadership to a voter that holds none"
                );
                if let Err(e) = cluster.raft.trigger().transfer_leader(to).await {
                    tracing::warn!(to, error = %e, "leadership transfer failed");
                }
            }
            self.let_go_on_standby();
            let prefer = lock(&self.moves).clone();
            let withheld = lock(&self.withheld).clone();
            let cmds: Vec<Command> = cluster
                .view
                .read(|f| plan(f, &live, cluster.id, &expired, &prefer, now_millis()))
                .into_iter()
                .filter(|c| !matches!(c, Command::GrantPlacement { name, .. } if withheld.contains(name)))
                .collect();
            for cmd in cmds {
                let desc = cmd.to_string();
                match cluster.propose(cmd.clone()).await {
                    Ok(Outcome::Epoch(epoch)) => {
                        if let Command::GrantPlacement { name, to, .. } = &cmd {
                            // The grant counts as hearing from the new owner: a full span to start renewing.
                            let _ = lock(&self.witness)
                                .renewed((name.clone(), epoch, *to), Instant::now());
                            tracing::info!(placement = %name, to, epoch, "placement granted");
                            // Tell the followers the commit now rather than at the next
                            // heartbeat: the new owner acts on the grant once it has applied
                            // it, and the voters confirm its lease only once they have.
                            if let Err(e) = cluster.raft.trigger().heartbeat().await {
                                tracing::debug!(error = %e, "heartbeat after a grant not sent");
                            }
                        } else {
                            tracing::warn!(command = %desc, epoch, "placement taken back: no eligible live node");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(command = %desc, error = %e, "placement change refused")
                    }
                }
            }
        }
    }

    /// On a standby site's leader: asks the owner of every held placement to fence it and
    /// let it go (as `vip move` does), one request per placement and epoch at a time, so a
    /// demoted site drops its VIPs and singletons at once instead of when their leases end.
    /// An owner that cannot be reached keeps its lease until a silent majority ends it; the
    /// planner then takes the placement back (a standby grants nothing).
    fn let_go_on_standby(self: &Arc<Self>) {
        let held: Vec<(String, NodeId, u64)> = self.cluster.view.read(|f| {
            if f.site.role != spaced_fabric::SiteRole::Standby {
                return Vec::new();
            }
            f.placements
                .iter()
                .filter_map(|(name, p)| p.owner.map(|o| (name.clone(), o, p.epoch)))
                .collect()
        });
        for (name, owner, epoch) in held {
            if !lock(&self.demoting).insert((name.clone(), epoch)) {
                continue;
            }
            let placements = self.clone();
            tokio::spawn(async move {
                match placements.release_from(&name, owner, epoch).await {
                    Ok(()) => {
                        tracing::info!(placement = %name, owner, epoch, "standby site: placement let go")
                    }
                    Err(e) => {
                        tracing::warn!(placement = %name, owner, epoch, error = %e, "standby site: the owner did not let go; asking again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                lock(&placements.demoting).remove(&(name, epoch));
            });
        }
    }

    /// What [`step_aside_target`] decides on, read from the fabric and Raft's metrics.
    /// The placements this node owns, by name, with their epochs.
    fn held_here(&self) -> Vec<(String, u64)> {
        let me = self.cluster.id;
        self.cluster.view.read(|f| {
            f.placements
                .iter()
                .filter(|(_, p)| p.owner == Some(me))
                .map(|(name, p)| (name.clone(), p.epoch))
                .collect()
        })
    }

    fn step_aside_view(
        &self,
        live: &BTreeSet<NodeId>,
        holding_for: Duration,
        own_lapsed: bool,
    ) -> Option<StepAsideView> {
        let cluster = &self.cluster;
        let owners: BTreeSet<NodeId> = cluster
            .view
            .read(|f| f.placements.values().filter_map(|p| p.owner).collect());
        if !owners.contains(&cluster.id) {
            return None;
        }
        let m = cluster.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        Some(StepAsideView {
            me: cluster.id,
            leading_for: cluster.tenure.leading_for(),
            holding_for,
            owners,
            voters: membership.voter_ids().collect(),
            stable: m.membership_config.log_id() == m.committed_membership_config.log_id()
                && membership.get_joint_config().len() == 1,
            caught_up: caught_up(&m),
            live: live.clone(),
            own_lapsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fault campaign: n4 was added while n1 was down and then led; n1, back,
    /// refused it as a stranger for good, and never caught up.
    #[test]
    fn a_leader_refused_as_a_stranger_hands_off_to_the_oldest_voter_it_can() {
        let joined: BTreeMap<NodeId, u64> = [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)].into();
        let voters = [1, 2, 3, 4];
        let all = set(&[1, 2, 3, 4]);
        // n4 leads; n1 refuses it: the oldest other voter, n2, is chosen.
        assert_eq!(
            stranger_handoff_target(4, &voters, &set(&[1]), &all, &all, &joined),
            Some(2)
        );
        // Not to a voter that lags or is not live.
        assert_eq!(
            stranger_handoff_target(4, &voters, &set(&[1]), &set(&[1, 3, 4]), &all, &joined),
            Some(3)
        );
        assert_eq!(
            stranger_handoff_target(4, &voters, &set(&[1]), &all, &set(&[1, 4]), &joined),
            None
        );
        // Not to a voter that joined after the leader: a stranger to the refuser too.
        let voters5 = [1, 3, 4, 5];
        assert_eq!(
            stranger_handoff_target(
                3,
                &voters5,
                &set(&[1]),
                &set(&[1, 3, 4, 5]),
                &set(&[1, 3, 4, 5]),
                &joined
            ),
            None
        );
        // A refusal from a node that is not a voter (any more) changes nothing.
        assert_eq!(
            stranger_handoff_target(4, &voters, &set(&[7]), &all, &all, &joined),
            None
        );
        // Nothing refused: nothing to do.
        assert_eq!(
            stranger_handoff_target(4, &voters, &set(&[]), &all, &all, &joined),
            None
        );
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settled_leader_owning_a_vip() -> StepAsideView {
        StepAsideView {
            me: 1,
            leading_for: Some(Duration::from_secs(3)),
            holding_for: Duration::from_secs(3),
            owners: set(&[1]),
            voters: vec![1, 2, 3],
            stable: true,
            caught_up: set(&[2, 3]),
            live: set(&[1, 2, 3]),
            own_lapsed: false,
        }
    }

    #[test]
    fn a_settled_leader_that_holds_a_placement_hands_over_to_a_free_voter() {
        assert_eq!(step_aside_target(&settled_leader_owning_a_vip()), Some(2));
    }

    #[test]
    fn no_step_aside_unless_every_condition_holds() {
        let base = settled_leader_owning_a_vip;
        let cases: Vec<(&str, StepAsideView)> = vec![
            (
                "holds nothing",
                StepAsideView {
                    owners: set(&[2]),
                    ..base()
                },
            ),
            (
                "just elected",
                StepAsideView {
                    leading_for: Some(ms(1_500)),
                    ..base()
                },
            ),
            (
                "just granted its placements (after a heal)",
                StepAsideView {
                    holding_for: ms(300),
                    ..base()
                },
            ),
            (
                "not leading",
                StepAsideView {
                    leading_for: None,
                    ..base()
                },
            ),
            (
                "membership changing",
                StepAsideView {
                    stable: false,
                    ..base()
                },
            ),
            (
                "two voters",
                StepAsideView {
                    voters: vec![1, 2],
                    ..base()
                },
            ),
            (
                "others lag",
                StepAsideView {
                    caught_up: set(&[]),
                    ..base()
                },
            ),
            (
                "others down",
                StepAsideView {
                    live: set(&[1]),
                    ..base()
                },
            ),
            (
                "its own placement lapsed (self-fenced in a partition): granted elsewhere first",
                StepAsideView {
                    own_lapsed: true,
                    ..base()
                },
            ),
            (
                "others own too",
                StepAsideView {
                    owners: set(&[1, 2, 3]),
                    ..base()
                },
            ),
        ];
        for (why, v) in cases {
            assert_eq!(step_aside_target(&v), None, "{why}");
        }
    }

    #[test]
    fn the_target_is_live_caught_up_and_free() {
        let v = StepAsideView {
            owners: set(&[1, 2]),
            caught_up: set(&[2, 3, 4]),
            live: set(&[1, 2, 3]),
            voters: vec![1, 2, 3, 4],
            ..settled_leader_owning_a_vip()
        };
        // 2 owns, 4 is not live: 3.
        assert_eq!(step_aside_target(&v), Some(3));
    }

    #[test]
    fn only_leases_the_leader_finds_silent_are_suspects() {
        let keys = vec![("a".to_string(), 1, 2), ("b".to_string(), 1, 3)];
        let got = suspects(keys, vec![ms(400), ms(100)], ms(350));
        assert_eq!(got, vec![("a".to_string(), 1, 2)]);
    }

    #[test]
    fn a_lease_expires_only_when_a_majority_reports_it_silent() {
        let lease = LeaseConfig::default();
        let span = lease.reassign_after();
        let long = span + ms(1);
        let short = ms(10);
        let configs = vec![set(&[1, 2, 3])];
        let suspects = vec![("a".to_string(), 1, 2), ("b".to_string(), 1, 3)];
        // 1 and 3 find `a` silent; 2 (its owner) is absent; `b` has only 1 silent report.
        let answers = vec![(1, vec![long, long]), (3, vec![long, short])];
        assert_eq!(
            silent_placements(&lease, &configs, suspects.clone(), answers),
            BTreeSet::from(["a".to_string()])
        );
        // One voter alone is not a majority.
        let answers = vec![(1, vec![long, long])];
        assert!(silent_placements(&lease, &configs, suspects.clone(), answers).is_empty());
        // A malformed answer (wrong length) is ignored, not misattributed.
        let answers = vec![(1, vec![long, long]), (3, vec![long])];
        assert!(silent_placements(&lease, &configs, suspects, answers).is_empty());
    }
}
