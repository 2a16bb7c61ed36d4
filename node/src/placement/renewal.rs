//! The VIP agent's loop on every node — renew with every voter, reconcile the host, give back
//! what it cannot hold — and a voter's side of renewals: record them, report silence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spaced_fabric::Command;
use spaced_raft::NodeId;
use spaced_raft::network::{RaftReply, RaftRpc};
use tokio::sync::watch;

use super::Placements;
use super::agent::{MAX_GAP, MIN_GAP, owned_vips};
use super::lease::{Held, LeaseKey, SuspendWatch, joint_majority};
use crate::{lock, now_millis};

/// An agent with nothing granted and nothing up waits for a fabric change, but looks at least
/// this often anyway (a safety net, not the way it learns of grants).
const AGENT_IDLE_LOOK: Duration = Duration::from_secs(1);
/// How often the agent forgets witnessed leases of placements that moved on.
const WITNESS_PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How often the agent checks that the VIPs it holds still have their addresses
/// ([`crate::placement::agent::Agent::verify_up`]): one netlink look-up per held VIP.
const VERIFY_EVERY: Duration = Duration::from_millis(250);

/// At most one warning this often while renewals keep failing.
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(1);

/// Failed renewals in a row, for warnings that say when they start, while they go on (at
/// most one each [`FAILURE_WARN_EVERY`]) and when they end, instead of one line per renewal
/// (every few tens of milliseconds).
#[derive(Debug, Default)]
struct FailureStreak {
    failed: u64,
    warned: Option<Instant>,
}

impl FailureStreak {
    /// One more failure at `now`: the streak's length if it is time to warn.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failed += 1;
        let due = self
            .warned
            .is_none_or(|at| now.duration_since(at) >= FAILURE_WARN_EVERY);
        if due {
            self.warned = Some(now);
        }
        due.then_some(self.failed)
    }

    /// A renewal was confirmed: the length of the streak it ended, if there was one.
    fn succeeded(&mut self) -> Option<u64> {
        self.warned = None;
        Some(std::mem::take(&mut self.failed)).filter(|n| *n > 0)
    }
}

/// Why a renewal did not reach a quorum.
#[derive(Debug, thiserror::Error)]
#[error(
    "renewal answered by voters {answered:?}, not a majority of {configs:?} (last error: {last_error})"
)]
pub struct RenewalError {
    /// Voters that answered.
    pub answered: BTreeSet<NodeId>,
    /// The voter sets a majority of each was needed.
    pub configs: Vec<BTreeSet<NodeId>>,
    /// The last voter's problem.
    pub last_error: String,
}

/// Counts one renewal's answers: a placement's lease counts once voters holding a majority of
/// every voter set confirmed that placement at that epoch (voters confirm only what their own
/// fabric grants the owner). Pure: the loop feeds it answers as they come.
pub struct RenewalTally {
    configs: Vec<BTreeSet<NodeId>>,
    held: Vec<Held>,
    acks: BTreeMap<Held, BTreeSet<NodeId>>,
    answered: BTreeSet<NodeId>,
}

impl RenewalTally {
    /// A renewal of `held`, to be confirmed by a majority of each of `configs`.
    pub fn new(configs: Vec<BTreeSet<NodeId>>, held: Vec<Held>) -> Self {
        RenewalTally {
            configs,
            held,
            acks: BTreeMap::new(),
            answered: BTreeSet::new(),
        }
    }

    fn has_quorum(&self, h: &Held) -> bool {
        self.acks
            .get(h)
            .is_some_and(|by| joint_majority(&self.configs, by))
    }

    /// Voter `v` confirmed `confirmed`; true once every held placement has its quorum.
    pub fn answer(&mut self, v: NodeId, confirmed: Vec<Held>) -> bool {
        self.answered.insert(v);
        for h in confirmed {
            self.acks.entry(h).or_default().insert(v);
        }
        self.held.iter().all(|h| self.has_quorum(h))
    }

    /// After the last answer: the placements with a quorum, if a quorum answered at all.
    pub fn finish(self, last_error: String) -> Result<Vec<Held>, RenewalError> {
        if !joint_majority(&self.configs, &self.answered) {
            return Err(RenewalError {
                answered: self.answered,
                configs: self.configs,
                last_error,
            });
        }
        Ok(self
            .held
            .iter()
            .filter(|h| self.has_quorum(h))
            .cloned()
            .collect())
    }
}

impl Placements {
    /// The VIP agent's loop: reconcile when something falls due, the fabric changes or the
    /// agent is poked; renew with the voters.
    pub async fn agent_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let agent = self.agent.clone();
        let cluster = &self.cluster;
        let renewing = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(std::sync::Mutex::new(FailureStreak::default()));
        let mut fabric_changed = cluster.view.changes();
        let mut pruned = Instant::now();
        let mut verified = Instant::now();
        let mut next = tokio::time::Instant::now();
        let mut last_pass: Option<Instant> = None;
        let mut suspend = SuspendWatch::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                Ok(()) = fabric_changed.changed() => {}
                () = agent.poked() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            super::pace(&mut last_pass, MIN_GAP).await;
            let clocks = crate::ClockPair::read();
            if let Some(lost) = clocks.and_then(|c| suspend.look(c.before, c.boottime, c.after)) {
                tracing::error!(
                    suspended_ms = lost.as_millis() as u64,
                    "the host was suspended: every lease may have run out meanwhile; fencing all"
                );
                agent.suspended(Instant::now());
            }
            // Seen before reading: a grant applied from now on wakes the wait above.
            fabric_changed.borrow_and_update();
            let owned = cluster.view.read(|f| owned_vips(f, cluster.id));
            if pruned.elapsed() >= WITNESS_PRUNE_EVERY {
                pruned = Instant::now();
                // Keep the witness bounded: forget leases of placements that moved on.
                let current: BTreeMap<String, u64> = cluster.view.read(|f| {
                    f.placements
                        .iter()
                        .map(|(n, p)| (n.clone(), p.epoch))
                        .collect()
                });
                lock(&self.witness).retain(|(n, e, _)| current.get(n).is_some_and(|c| e >= c));
            }
            if verified.elapsed() >= VERIFY_EVERY {
                verified = Instant::now();
                agent.verify_up(verified).await;
            }
            let step = agent.plan_step(&owned, Instant::now());
            if let Some(renewal) = step.renewal.clone()
                && !renewing.swap(true, Ordering::SeqCst)
            {
                let placements = self.clone();
                let renewing = renewing.clone();
                let failures = failures.clone();
                tokio::spawn(async move {
                    match placements.renew(renewal.placements.clone()).await {
                        Ok(confirmed) => {
                            placements.agent.confirmed(&renewal, &confirmed);
                            if let Some(failed) = lock(&failures).succeeded() {
                                tracing::info!(failed, "lease renewals confirmed again");
                            }
                        }
                        Err(e) => {
                            if let Some(failed) = lock(&failures).failed(Instant::now()) {
                                tracing::warn!(error = %e, failed, "lease renewal failed (failed in a row so far)");
                            }
                        }
                    }
                    renewing.store(false, Ordering::SeqCst);
                });
            }
            for (held, error) in agent.execute(&step).await {
                let reason = self.cluster.view.read(|f| error.explain(f));
                self.give_back(held, reason);
            }
            // Sleep until the next thing falls due. With nothing granted here and nothing up,
            // nothing can before the fabric grants this node something (most nodes own nothing
            // most of the time), so only the fabric or the safety net wakes it.
            let now = Instant::now();
            let due = match agent.next_due(now) {
                Some(due) => due.min(now + MAX_GAP),
                None if owned.is_empty() => now + AGENT_IDLE_LOOK,
                None => now + MAX_GAP,
            };
            next = tokio::time::Instant::from_std(due);
        }
    }

    /// Gives a placement this node cannot hold back to the fabric, saying why (a VIP it could
    /// not add, a singleton it cannot keep running): fenced and held down here first (nothing
    /// more to do if that already happened), then refused. In the background and best effort:
    /// if the refusal does not commit, the lease, no longer renewed, lapses and the placement
    /// moves on anyway (only without the reason and the hold).
    pub fn give_back(self: &Arc<Self>, (name, epoch): Held, reason: String) {
        let placements = self.clone();
        tokio::spawn(async move {
            if let Err(e) = placements.agent.fence_and_hold(&name, epoch).await {
                tracing::error!(placement = %name, epoch, error = %e, "could not stop what it gives back");
            }
            let cmd = Command::RefusePlacement {
                name: name.clone(),
                node: placements.cluster.id,
                epoch,
                reason: reason.clone(),
                at: now_millis(),
            };
            for _ in 0..3 {
                match placements.cluster.propose_anywhere(cmd.clone()).await {
                    Ok(Ok(_)) => {
                        tracing::warn!(placement = %name, epoch, %reason, "placement refused: given back for another node");
                        return;
                    }
                    Ok(Err(e)) => {
                        // It moved on meanwhile (lease lapsed, re-granted): nothing to give back.
                        tracing::debug!(placement = %name, epoch, error = %e, "refusal not needed");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(placement = %name, epoch, error = %e, "refusal not delivered; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            tracing::warn!(placement = %name, epoch, "could not deliver the refusal; its lease will lapse");
        });
    }

    /// Sends one renewal to every voter; succeeds once voters holding a majority of every voter
    /// set (see [`joint_majority`]) recorded it.
    async fn renew(self: &Arc<Self>, held: Vec<Held>) -> Result<Vec<Held>, RenewalError> {
        use futures::StreamExt;
        let ttl = self.lease.renew_every.max(Duration::from_millis(50));
        let mut tally = RenewalTally::new(self.cluster.voter_configs(), held.clone());
        let mut calls = futures::stream::FuturesUnordered::new();
        for (v, member) in self.cluster.voters() {
            let placements = self.clone();
            let held = held.clone();
            calls.push(async move {
                let cluster = &placements.cluster;
                if v == cluster.id {
                    return (v, Ok(placements.record_renewal(cluster.id, held)));
                }
                let Some(member) = member else {
                    return (v, Err("voter not in membership".to_string()));
                };
                let rpc = RaftRpc::Renew {
                    held,
                    terms: placements.lease.terms(),
                };
                let reply = match cluster.call(v, &member, rpc, ttl).await {
                    Ok(RaftReply::Renewed(c)) => Ok(c),
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(e) => Err(e.to_string()),
                };
                (v, reply)
            });
        }
        let mut last_error = String::from("no voters");
        while let Some((v, r)) = calls.next().await {
            match r {
                Ok(confirmed) => {
                    if tally.answer(v, confirmed) {
                        return Ok(held);
                    }
                }
                Err(e) => last_error = e,
            }
        }
        tally.finish(last_error)
    }

    /// Every lease the fabric knows of now: (placement, epoch, owner).
    pub(super) fn lease_keys(&self) -> Vec<LeaseKey> {
        self.cluster.view.read(|f| {
            f.placements
                .iter()
                .filter_map(|(n, p)| p.owner.map(|o| (n.clone(), p.epoch, o)))
                .collect()
        })
    }

    /// A voter records a renewal from `from`. No leadership or ownership check is needed: the
    /// record is only ever used to *delay* a reassignment.
    /// A voter confirms only what its own applied fabric grants `from` at that epoch: a node
    /// acting on an old grant (restarted and still replaying its log, or back from a partition)
    /// gets no lease for a placement that has since moved on.
    /// A node that is no longer a voter in its own view (removed, its log ending with the
    /// change) confirms nothing: the leader no longer asks it whether the owner went silent.
    /// Nor does a node of a standby site, or of an active site whose hold on the active role
    /// at the DR witnesses it cannot vouch for beyond the lease it would grant (see
    /// [`spaced_replication::site_lease`]).
    pub fn record_renewal(&self, from: NodeId, held: Vec<Held>) -> Vec<Held> {
        if !self.cluster.is_voter(self.cluster.id) || self.cluster.raft_failure().is_some() {
            return Vec::new();
        }
        let now = Instant::now();
        let span = self.lease.reassign_after();
        let current: Vec<Held> = self.cluster.view.read(|f| {
            if !self.site.may_confirm(f.site.role, f.site.epoch, span) {
                return Vec::new();
            }
            held.into_iter()
                .filter(|(name, epoch)| {
                    f.placements
                        .get(name)
                        .is_some_and(|p| p.owner == Some(from) && p.epoch == *epoch)
                })
                .collect()
        });
        let mut w = lock(&self.witness);
        current
            .into_iter()
            .filter(|(name, epoch)| w.renewed((name.clone(), *epoch, from), now))
            .collect()
    }

    /// Silence per lease as this node's witness reports it to the leader (or, on the leader,
    /// counts it itself): a lease reported silent for a full span is never confirmed again.
    pub fn local_silence(&self, keys: &[LeaseKey]) -> Vec<Duration> {
        let now = Instant::now();
        let span = self.lease.reassign_after();
        let mut w = lock(&self.witness);
        keys.iter()
            .map(|k| w.report_silence(k, now, span))
            .collect()
    }

    /// Silence per lease as this node's witness sees it, for display: reports nothing.
    pub fn shown_silence(&self, keys: &[LeaseKey]) -> Vec<Duration> {
        let now = Instant::now();
        let mut w = lock(&self.witness);
        keys.iter().map(|k| w.silence(k, now)).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failed_renewals_warn_when_they_start_once_a_second_after_and_say_when_they_end() {
        let mut streak = super::FailureStreak::default();
        let t0 = std::time::Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        assert_eq!(streak.succeeded(), None, "no streak to end");
        assert_eq!(streak.failed(ms(0)), Some(1), "the first failure warns");
        assert_eq!(streak.failed(ms(50)), None);
        assert_eq!(streak.failed(ms(999)), None);
        assert_eq!(
            streak.failed(ms(1000)),
            Some(4),
            "a second later, with the count"
        );
        assert_eq!(streak.failed(ms(1050)), None);
        assert_eq!(streak.succeeded(), Some(5));
        assert_eq!(
            streak.failed(ms(1100)),
            Some(1),
            "a new streak warns at once"
        );
    }

    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }
    fn held(names: &[(&str, u64)]) -> Vec<Held> {
        names.iter().map(|(n, e)| (n.to_string(), *e)).collect()
    }

    #[test]
    fn a_renewal_counts_once_a_majority_confirmed_every_placement() {
        let mut t = RenewalTally::new(vec![set(&[1, 2, 3])], held(&[("vip", 4), ("db", 2)]));
        // The owner's own vote confirms both; not yet a majority.
        assert!(!t.answer(1, held(&[("vip", 4), ("db", 2)])));
        // Voter 2's fabric grants only `vip` at 4 (it has not applied `db`'s grant yet).
        assert!(!t.answer(2, held(&[("vip", 4)])));
        // Voter 3 confirms both: every placement has 2 of 3.
        assert!(t.answer(3, held(&[("vip", 4), ("db", 2)])));
    }

    #[test]
    fn a_majority_answering_confirms_only_what_a_majority_confirmed() {
        let mut t = RenewalTally::new(vec![set(&[1, 2, 3])], held(&[("vip", 4), ("db", 2)]));
        t.answer(1, held(&[("vip", 4), ("db", 2)]));
        t.answer(2, held(&[("vip", 4)]));
        // Voter 3 never answers: the renewal still counts for `vip`, not for `db`.
        assert_eq!(t.finish("timeout".into()).unwrap(), held(&[("vip", 4)]));
    }

    #[test]
    fn without_a_majority_answering_the_renewal_fails() {
        let mut t = RenewalTally::new(vec![set(&[1, 2, 3])], held(&[("vip", 4)]));
        t.answer(1, held(&[("vip", 4)]));
        let e = t.finish("node 2: no reply".into()).unwrap_err();
        assert_eq!(e.answered, set(&[1]));
        assert!(e.to_string().contains("node 2: no reply"), "{e}");
    }

    #[test]
    fn during_a_joint_change_both_voter_sets_must_confirm() {
        // Old set {1,2,3}, new set {3,4,5}: 1, 2 and 3 are a majority of the old set only.
        let configs = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        let mut t = RenewalTally::new(configs.clone(), held(&[("vip", 1)]));
        for v in [1, 2, 3] {
            assert!(!t.answer(v, held(&[("vip", 1)])));
        }
        assert!(t.answer(4, held(&[("vip", 1)])));
        let mut t = RenewalTally::new(configs, held(&[("vip", 1)]));
        for v in [1, 2, 3] {
            t.answer(v, held(&[("vip", 1)]));
        }
        assert!(t.finish(String::new()).is_err());
    }

    #[test]
    fn a_voter_that_confirms_nothing_still_counts_as_answering() {
        // Every voter answered but none confirmed `vip` at 4 (it moved on): the renewal
        // succeeds with nothing confirmed, so the owner's lease for it is not extended.
        let mut t = RenewalTally::new(vec![set(&[1, 2, 3])], held(&[("vip", 4)]));
        for v in [1, 2, 3] {
            t.answer(v, Vec::new());
        }
        assert_eq!(t.finish(String::new()).unwrap(), Vec::<Held>::new());
    }
}
