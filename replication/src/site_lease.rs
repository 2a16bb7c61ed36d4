//! The site lease: whether this node may confirm the leases of its site's workload (VIPs and
//! singletons) because its site surely still holds the active role at the witnesses.
//!
//! An active site holds its role at the witnesses on its leader's watchdog, and demotes itself
//! when it cannot renew it for half a witness lease. That alone leaves a hole: a leader that
//! stalls (SIGSTOP, a long pause) cannot demote anything, and its site's nodes renew their
//! placement leases among themselves as before, while the witnesses' lease runs out and the
//! standby takes over. So every node asks its leader, by round trip, how long the last
//! witness renewal lasts, and counts that from when it *asked* (never from a message it may
//! have read late). A voter confirms a placement renewal only while this covers the
//! placement lease it would grant; the owner's lease, and with it its fence guard's deadline,
//! then ends before the witnesses' lease does, whatever stalls. Pure: time is passed in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use spaced_fabric::SiteRole;

/// What one node knows of its site's hold on the active role.
#[derive(Debug, Default)]
pub struct SiteLease {
    /// The hold surely lasts until then, on this node's clock.
    until: Option<Instant>,
}

impl SiteLease {
    /// The leader answered a question sent at `asked_at`: its last witness renewal lasts
    /// `remaining` more. Counted from the question, the bound is never later than the truth;
    /// an earlier, longer bound is kept (each one holds on its own).
    pub fn learned(&mut self, asked_at: Instant, remaining: Duration) {
        let until = asked_at + remaining;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// Forgets what was learned (the site changed role or epoch).
    pub fn forget(&mut self) {
        self.until = None;
    }

    /// Whether the hold lasts at least `span` beyond `now`.
    pub fn covers(&self, now: Instant, span: Duration) -> bool {
        self.until.is_some_and(|u| u >= now + span)
    }

    /// How long the hold lasts beyond `now` (zero once over, `None` if never learned).
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until.map(|u| u.saturating_duration_since(now))
    }
}

/// Whether a node of a site in `role` may confirm a placement lease of `span` now: a standby
/// runs nothing; an active site with witnesses only while its hold covers the lease; a site
/// without witnesses (or not in DR) as before.
pub fn may_confirm(
    role: SiteRole,
    witnesses: bool,
    lease: &SiteLease,
    now: Instant,
    span: Duration,
) -> bool {
    match role {
        SiteRole::Standalone => true,
        SiteRole::Standby => false,
        SiteRole::Active => !witnesses || lease.covers(now, span),
    }
}

/// A node's site lease with its config (shared by the placement voter and the poller).
#[derive(Debug)]
pub struct SiteGate {
    /// Whether the site has witnesses (only then is the active role a lease).
    witnesses: bool,
    /// (site epoch it was learned at, the lease).
    lease: Mutex<(u64, SiteLease)>,
}

impl SiteGate {
    /// A gate for a site with or without witnesses; nothing learned yet.
    pub fn new(witnesses: bool) -> Self {
        SiteGate {
            witnesses,
            lease: Mutex::new((0, SiteLease::default())),
        }
    }

    /// A gate that never closes for an active or standalone site (no DR, or DR without
    /// witnesses).
    pub fn open() -> Self {
        Self::new(false)
    }

    /// Whether the site's hold needs asking for.
    pub fn has_witnesses(&self) -> bool {
        self.witnesses
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, SiteLease)> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader answered, for site epoch `epoch`, a question sent at `asked_at`. A lease of
    /// another epoch is forgotten first: a hold of an earlier tenure says nothing of this one.
    pub fn learned(&self, epoch: u64, asked_at: Instant, remaining: Duration) {
        let mut l = self.lock();
        if l.0 != epoch {
            *l = (epoch, SiteLease::default());
        }
        l.1.learned(asked_at, remaining);
    }

    /// Whether this node may confirm a placement lease of `span` now, its site being `role`
    /// at `epoch`.
    pub fn may_confirm(&self, role: SiteRole, epoch: u64, span: Duration) -> bool {
        let l = self.lock();
        let empty = SiteLease::default();
        let lease = if l.0 == epoch { &l.1 } else { &empty };
        may_confirm(role, self.witnesses, lease, Instant::now(), span)
    }

    /// How long the hold lasts as this node knows it, at site epoch `epoch`.
    pub fn remaining(&self, epoch: u64) -> Option<Duration> {
        let l = self.lock();
        (l.0 == epoch)
            .then(|| l.1.remaining(Instant::now()))
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_hold_counts_from_the_question_and_keeps_the_longest_bound() {
        let t0 = Instant::now();
        let mut l = SiteLease::default();
        assert!(
            !l.covers(t0, Duration::ZERO),
            "nothing learned covers nothing"
        );
        // Asked at t0, answered (whenever) with 5 s left: good until t0 + 5 s, not later.
        l.learned(t0, 5000 * MS);
        assert!(l.covers(t0 + 4700 * MS, 300 * MS));
        assert!(!l.covers(t0 + 4701 * MS, 300 * MS));
        // A late answer to an older question with less left does not shorten it.
        l.learned(t0, 1000 * MS);
        assert_eq!(l.remaining(t0), Some(5000 * MS));
        // A newer question extends it.
        l.learned(t0 + 3000 * MS, 5000 * MS);
        assert_eq!(l.remaining(t0 + 7000 * MS), Some(1000 * MS));
        assert_eq!(l.remaining(t0 + 9000 * MS), Some(Duration::ZERO));
        l.forget();
        assert_eq!(l.remaining(t0), None);
    }

    #[test]
    fn an_active_site_with_witnesses_confirms_only_under_its_hold_and_a_standby_never() {
        let now = Instant::now();
        let span = 300 * MS;
        let mut held = SiteLease::default();
        held.learned(now, 2000 * MS);
        let none = SiteLease::default();
        assert!(may_confirm(SiteRole::Active, true, &held, now, span));
        assert!(!may_confirm(SiteRole::Active, true, &none, now, span));
        assert!(
            !may_confirm(SiteRole::Active, true, &held, now + 1701 * MS, span),
            "the placement lease would outlast the hold"
        );
        assert!(may_confirm(SiteRole::Active, false, &none, now, span));
        assert!(may_confirm(SiteRole::Standalone, true, &none, now, span));
        assert!(!may_confirm(SiteRole::Standby, true, &held, now, span));
        assert!(!may_confirm(SiteRole::Standby, false, &held, now, span));
    }

    #[test]
    fn a_gate_forgets_a_hold_of_another_epoch() {
        let g = SiteGate::new(true);
        let span = 300 * MS;
        g.learned(3, Instant::now(), 5000 * MS);
        assert!(g.may_confirm(SiteRole::Active, 3, span));
        assert!(
            !g.may_confirm(SiteRole::Active, 4, span),
            "epoch 4 is another tenure"
        );
        g.learned(4, Instant::now(), 100 * MS);
        assert!(
            !g.may_confirm(SiteRole::Active, 4, span),
            "100 ms do not cover 300"
        );
        assert!(
            !g.may_confirm(SiteRole::Active, 3, span),
            "epoch 3's hold is gone"
        );
        assert!(SiteGate::open().may_confirm(SiteRole::Active, 9, span));
    }
}
