//! Leased placements (DESIGN §5): the owner's lease clock and the leader's renewal book; pure, time passed in.
//!
//! Safety argument, in one place: the owner's lease for a renewal *sent* at `s` ends at `s + L`
//! on its own clock. The leader answers a renewal only after confirming with a quorum that it
//! still leads, and records the *receipt* time `r >= s`. It reassigns only after
//! `L·(1+ρ) + margin` without a receipt; a new leader first waits the same span after winning,
//! because it cannot know what its predecessor confirmed. With clock rates within `ρ`, the old
//! owner's lease has run out (and it has fenced itself) before anyone else is granted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spaced_raft::NodeId;

/// Lease timing, from the `[lease]` config section.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    /// `L`: how long a confirmed renewal lets the owner hold a placement.
    pub duration: Duration,
    /// How often the owner renews (default `L/4`).
    pub renew_every: Duration,
    /// Extra wait on the leader for scheduling and clock-step noise.
    pub margin: Duration,
    /// `ρ`: bound on clock rate difference between nodes (0.01 = 1%).
    pub drift: f64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            duration: Duration::from_millis(300),
            renew_every: Duration::from_millis(75),
            margin: Duration::from_millis(50),
            drift: 0.01,
        }
    }
}

impl LeaseConfig {
    /// How long the leader waits without a renewal before the lease has certainly run out.
    pub fn reassign_after(&self) -> Duration {
        self.duration.mul_f64(1.0 + self.drift.max(0.0)) + self.margin
    }
}

/// A placement held at one epoch: the fencing identity of a lease.
pub type Held = (String, u64);

/// A renewal request in flight: what it asks for and when it was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Renewal {
    /// Placements and epochs to renew.
    pub placements: Vec<Held>,
    /// Send time on the owner's clock; the lease runs from here, not from the answer.
    pub sent_at: Instant,
}

/// The owner's view: which placements it may act on, and until when.
#[derive(Debug)]
pub struct OwnerLeases {
    /// Timing.
    cfg: LeaseConfig,
    /// Placement name → (epoch granted, lease end if ever confirmed).
    held: BTreeMap<String, (u64, Option<Instant>)>,
    /// When the last renewal was sent, to pace them.
    last_sent: Option<Instant>,
}

impl OwnerLeases {
    /// No placements yet.
    pub fn new(cfg: LeaseConfig) -> Self {
        OwnerLeases {
            cfg,
            held: BTreeMap::new(),
            last_sent: None,
        }
    }

    /// Aligns with what the fabric says this node owns. Placements no longer owned (or owned at
    /// another epoch) are dropped and returned: the caller fences them at once.
    pub fn sync(&mut self, owned: &[Held]) -> Vec<Held> {
        let mut dropped = Vec::new();
        self.held.retain(|name, (epoch, _)| {
            let keep = owned.iter().any(|(n, e)| n == name && e == epoch);
            if !keep {
                dropped.push((name.clone(), *epoch));
            }
            keep
        });
        for (name, epoch) in owned {
            self.held.entry(name.clone()).or_insert((*epoch, None));
        }
        dropped
    }

    /// A renewal to send now, if one is due: immediately when something is unconfirmed,
    /// otherwise every `renew_every`.
    pub fn renewal_due(&mut self, now: Instant) -> Option<Renewal> {
        if self.held.is_empty() {
            return None;
        }
        let unconfirmed = self.held.values().any(|(_, until)| until.is_none());
        let due = match self.last_sent {
            None => true,
            // Even unconfirmed grants are retried at a bounded pace, not in a busy loop.
            Some(t) => {
                now >= t + if unconfirmed {
                    self.cfg.renew_every / 4
                } else {
                    self.cfg.renew_every
                }
            }
        };
        if !due {
            return None;
        }
        self.last_sent = Some(now);
        Some(Renewal {
            placements: self
                .held
                .iter()
                .map(|(n, (e, _))| (n.clone(), *e))
                .collect(),
            sent_at: now,
        })
    }

    /// The leader confirmed `confirmed` for a renewal sent at `renewal.sent_at`: their leases
    /// now end at `sent_at + L` (never earlier than before).
    pub fn confirmed(&mut self, renewal: &Renewal, confirmed: &[Held]) {
        let until = renewal.sent_at + self.cfg.duration;
        for (name, epoch) in confirmed {
            if let Some((e, end)) = self.held.get_mut(name)
                && e == epoch
            {
                *end = Some(end.map_or(until, |old| old.max(until)));
            }
        }
    }

    /// Placements this node may act on now (lease confirmed and not run out).
    pub fn valid(&self, now: Instant) -> Vec<Held> {
        self.held
            .iter()
            .filter(|(_, (_, until))| until.is_some_and(|u| now < u))
            .map(|(n, (e, _))| (n.clone(), *e))
            .collect()
    }

    /// Time left on a placement's lease (zero if none).
    pub fn remaining(&self, name: &str, now: Instant) -> Duration {
        self.held
            .get(name)
            .and_then(|(_, until)| *until)
            .map(|u| u.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// Everything currently held, confirmed or not (for graceful release).
    pub fn all(&self) -> Vec<Held> {
        self.held
            .iter()
            .map(|(n, (e, _))| (n.clone(), *e))
            .collect()
    }
}

/// The leader's book of renewals: when did it last hear from each placement's owner.
#[derive(Debug)]
pub struct RenewalBook {
    /// Timing.
    cfg: LeaseConfig,
    /// When this node became leader; `None` while it is not leader.
    leader_since: Option<Instant>,
    /// Placement → (owner, epoch, last receipt or grant time).
    last: BTreeMap<String, (NodeId, u64, Instant)>,
}

impl RenewalBook {
    /// An empty book of a node that does not lead.
    pub fn new(cfg: LeaseConfig) -> Self {
        RenewalBook {
            cfg,
            leader_since: None,
            last: BTreeMap::new(),
        }
    }

    /// This node won an election at `now`: it knows nothing its predecessor confirmed.
    pub fn became_leader(&mut self, now: Instant) {
        self.leader_since = Some(now);
        self.last.clear();
    }

    /// This node no longer leads.
    pub fn stepped_down(&mut self) {
        self.leader_since = None;
        self.last.clear();
    }

    /// When this node became leader (as far as the book knows).
    pub fn leader_since(&self) -> Option<Instant> {
        self.leader_since
    }

    /// Whether this node currently keeps the book as leader.
    pub fn is_leader(&self) -> bool {
        self.leader_since.is_some()
    }

    /// A renewal from `owner` for `name` at `epoch` arrived at `now` (after leadership was confirmed).
    pub fn renewed(&mut self, name: &str, owner: NodeId, epoch: u64, now: Instant) {
        if self.leader_since.is_some() {
            self.last.insert(name.to_string(), (owner, epoch, now));
        }
    }

    /// The leader granted `name` to `owner` at `epoch` at `now`: the new owner gets a full span to
    /// start renewing before it counts as failed.
    pub fn granted(&mut self, name: &str, owner: NodeId, epoch: u64, now: Instant) {
        self.renewed(name, owner, epoch, now);
    }

    /// Has the lease `owner` may hold on `name` at `epoch` certainly run out at `now`?
    /// Never true on a node that does not lead.
    pub fn expired(&self, name: &str, owner: NodeId, epoch: u64, now: Instant) -> bool {
        let Some(since) = self.leader_since else {
            return false;
        };
        let heard = match self.last.get(name) {
            Some((o, e, t)) if *o == owner && *e == epoch => (*t).max(since),
            _ => since,
        };
        now > heard + self.cfg.reassign_after()
    }

    /// Time until `expired` would turn true (zero if it already is, `None` when not leader).
    pub fn expires_in(
        &self,
        name: &str,
        owner: NodeId,
        epoch: u64,
        now: Instant,
    ) -> Option<Duration> {
        let since = self.leader_since?;
        let heard = match self.last.get(name) {
            Some((o, e, t)) if *o == owner && *e == epoch => (*t).max(since),
            _ => since,
        };
        Some((heard + self.cfg.reassign_after()).saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            duration: Duration::from_millis(400),
            renew_every: Duration::from_millis(100),
            margin: Duration::from_millis(50),
            drift: 0.01,
        }
    }

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    fn held(name: &str, epoch: u64) -> Held {
        (name.to_string(), epoch)
    }

    #[test]
    fn lease_runs_from_the_send_time_not_the_answer() {
        let t0 = Instant::now();
        let mut o = OwnerLeases::new(cfg());
        assert!(o.sync(&[held("vip", 1)]).is_empty());
        // Granted but unconfirmed: not valid yet.
        assert!(o.valid(t0).is_empty());
        let r = o.renewal_due(t0).expect("first renewal is due at once");
        // The answer arrives 150 ms later; the lease still ends at send + 400 ms.
        o.confirmed(&r, &[held("vip", 1)]);
        assert_eq!(o.valid(ms(t0, 150)), vec![held("vip", 1)]);
        assert_eq!(o.remaining("vip", ms(t0, 150)), Duration::from_millis(250));
        assert_eq!(o.valid(ms(t0, 399)), vec![held("vip", 1)]);
        assert!(
            o.valid(ms(t0, 400)).is_empty(),
            "self-fence exactly at send + L"
        );
    }

    #[test]
    fn renewals_are_paced_and_extend_the_lease() {
        let t0 = Instant::now();
        let mut o = OwnerLeases::new(cfg());
        o.sync(&[held("vip", 3)]);
        let r = o.renewal_due(t0).unwrap();
        o.confirmed(&r, &[held("vip", 3)]);
        assert!(o.renewal_due(ms(t0, 50)).is_none());
        let r2 = o.renewal_due(ms(t0, 100)).expect("due after renew_every");
        assert_eq!(r2.sent_at, ms(t0, 100));
        o.confirmed(&r2, &[held("vip", 3)]);
        assert_eq!(o.remaining("vip", ms(t0, 100)), Duration::from_millis(400));
        // A late answer to an older renewal never shortens the lease.
        o.confirmed(&r, &[held("vip", 3)]);
        assert_eq!(o.remaining("vip", ms(t0, 100)), Duration::from_millis(400));
        // Renewals stop being answered (partition): the lease ends 400 ms after the last confirmed send.
        let _unanswered = o.renewal_due(ms(t0, 200)).unwrap();
        assert!(!o.valid(ms(t0, 499)).is_empty());
        assert!(o.valid(ms(t0, 500)).is_empty());
    }

    #[test]
    fn confirmation_for_another_epoch_does_not_count() {
        let t0 = Instant::now();
        let mut o = OwnerLeases::new(cfg());
        o.sync(&[held("vip", 2)]);
        let r = o.renewal_due(t0).unwrap();
        o.confirmed(&r, &[held("vip", 1)]);
        assert!(o.valid(ms(t0, 1)).is_empty());
        // Unconfirmed grants are retried sooner than the normal pace.
        assert!(o.renewal_due(ms(t0, 25)).is_some());
    }

    #[test]
    fn losing_the_grant_fences_immediately() {
        let t0 = Instant::now();
        let mut o = OwnerLeases::new(cfg());
        o.sync(&[held("vip", 1), held("db", 4)]);
        let r = o.renewal_due(t0).unwrap();
        o.confirmed(&r, &[held("vip", 1), held("db", 4)]);
        // The fabric moved `vip` on (epoch 2, another owner): drop it even though the lease runs.
        let dropped = o.sync(&[held("db", 4)]);
        assert_eq!(dropped, vec![held("vip", 1)]);
        assert_eq!(o.valid(ms(t0, 10)), vec![held("db", 4)]);
        // Re-granted at a new epoch: starts unconfirmed.
        o.sync(&[held("db", 4), held("vip", 5)]);
        assert_eq!(o.valid(ms(t0, 10)), vec![held("db", 4)]);
    }

    #[test]
    fn leader_reassigns_only_after_the_lease_certainly_ran_out() {
        let t0 = Instant::now();
        let c = cfg();
        let wait = c.reassign_after();
        assert_eq!(wait, Duration::from_millis(454));
        let mut b = RenewalBook::new(c);
        // Not leader: never expired.
        assert!(!b.expired("vip", 1, 1, ms(t0, 10_000)));
        b.became_leader(t0);
        b.renewed("vip", 1, 1, ms(t0, 100));
        assert!(!b.expired("vip", 1, 1, ms(t0, 100) + wait));
        assert!(b.expired("vip", 1, 1, ms(t0, 101) + wait));
        assert_eq!(b.expires_in("vip", 1, 1, ms(t0, 100)), Some(wait));
        // A renewal for an old epoch or another owner does not keep the current one alive.
        b.renewed("vip", 2, 7, ms(t0, 400));
        assert!(b.expired("vip", 1, 1, ms(t0, 101) + wait));
    }

    #[test]
    fn new_leader_waits_a_full_span_after_winning() {
        let t0 = Instant::now();
        let c = cfg();
        let wait = c.reassign_after();
        let mut b = RenewalBook::new(c);
        b.became_leader(ms(t0, 1000));
        // Never heard from the owner: expires only a full span after the win.
        assert!(!b.expired("vip", 3, 9, ms(t0, 1000) + wait));
        assert!(b.expired("vip", 3, 9, ms(t0, 1001) + wait));
        // Stepping down forgets everything and expires nothing.
        b.stepped_down();
        assert!(!b.expired("vip", 3, 9, ms(t0, 100_000)));
        assert!(!b.is_leader());
    }

    /// Owner and leader together under virtual time: partition the owner after a confirmed
    /// renewal; the owner's lease ends strictly before the leader may reassign, with the
    /// owner's clock running slow by the full drift bound.
    #[test]
    fn owner_fences_before_the_leader_reassigns() {
        let t0 = Instant::now();
        let c = cfg();
        let mut owner = OwnerLeases::new(c.clone());
        let mut book = RenewalBook::new(c.clone());
        book.became_leader(t0);
        owner.sync(&[held("vip", 1)]);
        book.granted("vip", 1, 1, t0);
        let mut last_receipt = t0;
        let mut t = t0;
        for step in 0..20u64 {
            t = ms(t0, step * 100);
            if let Some(r) = owner.renewal_due(t) {
                // One-way delay 7 ms: the leader receives later than the owner sent.
                let receipt = r.sent_at + Duration::from_millis(7);
                book.renewed("vip", 1, 1, receipt);
                last_receipt = receipt;
                owner.confirmed(&r, &[held("vip", 1)]);
            }
        }
        // Partition: no more renewals reach the leader. Find when each side acts.
        let owner_end = t + c.duration; // send time of the last confirmed renewal + L
        // A slow owner clock stretches its lease in real time by (1+ρ).
        let owner_end_real = t + c.duration.mul_f64(1.0 + c.drift);
        let mut reassign_at = last_receipt;
        while !book.expired("vip", 1, 1, reassign_at) {
            reassign_at += Duration::from_millis(1);
        }
        assert!(owner.valid(owner_end).is_empty());
        assert!(
            owner_end_real < reassign_at,
            "owner still holds at {owner_end_real:?}, leader reassigns at {reassign_at:?}"
        );
    }
}
