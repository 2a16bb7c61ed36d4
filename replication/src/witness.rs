//! `spaced witness`: a small process at a third location that both sites of a pair reach
//! (booth's arbitrator, the model's arbiter devices). It holds one *ticket* per pair — the
//! active role — as a lease: the active site's leader renews it every heartbeat; a standby
//! that has lost its peer claims it, and gets it only once the active site's lease has run
//! out here. An active site that cannot renew at a majority of witnesses demotes itself well
//! before its leases can run out, so a standby can never hold a majority while the active
//! site still runs: never two active sites.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use spaced_raft::pki::TlsMaterial;

use crate::link::{Link, Serve};
use crate::protocol::{DrReply, DrRequest};
use crate::watchdog::BoxFuture;

/// Longest lease a witness grants.
pub const MAX_LEASE: Duration = Duration::from_secs(300);

/// A site's request to hold (or keep holding) its pair's ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The pair: its two site names, in order (see [`pair_of`]).
    pub pair: (String, String),
    /// The asking site.
    pub site: String,
    /// Its site epoch (a standby asks with the epoch it would be promoted with).
    pub epoch: u64,
    /// How long the ticket is to last from now, in ms.
    pub lease_ms: u64,
}

/// The pair of sites `a` and `b`, in the order every witness keys it.
pub fn pair_of(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// A witness's answer to a [`Hold`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldAnswer {
    /// Held for `lease_ms` from when the witness received the request.
    Granted,
    /// Held by another site (for this long yet), or refused for a stale epoch.
    Refused {
        /// The site holding it, if any.
        holder: Option<String>,
        /// Its epoch.
        epoch: u64,
        /// How long its lease runs yet, in ms.
        remaining_ms: u64,
        /// Why, in words.
        why: String,
    },
}

#[derive(Debug, Clone)]
struct Ticket {
    site: String,
    epoch: u64,
    until: Instant,
}

/// The tickets of every pair this witness serves (pure: the time is an argument).
#[derive(Debug, Default)]
pub struct Tickets {
    held: HashMap<(String, String), Ticket>,
    /// The highest epoch granted per pair: a lower one is a site that was overtaken.
    epochs: HashMap<(String, String), u64>,
    /// A witness that (re)started grants nothing before then: it has forgotten the leases it
    /// granted before, and one may still run.
    quiet_until: Option<Instant>,
}

impl Tickets {
    /// The tickets of a witness started at `now` that grants nothing for `grace` (at least the
    /// longest lease the sites ask for).
    pub fn starting(now: Instant, grace: Duration) -> Self {
        Tickets {
            quiet_until: Some(now + grace),
            ..Tickets::default()
        }
    }

    /// Grants `h` if the pair's ticket is free, ran out, or is the asker's own; never to an
    /// epoch below one granted before; nothing during the grace after a start.
    pub fn hold(&mut self, h: &Hold, now: Instant) -> HoldAnswer {
        if let Some(until) = self.quiet_until.filter(|u| now < *u) {
            return HoldAnswer::Refused {
                holder: None,
                epoch: 0,
                remaining_ms: (until - now).as_millis() as u64,
                why: "this witness started lately and grants nothing until the leases it may \
                      have granted before have run out"
                    .into(),
            };
        }
        if h.site != h.pair.0 && h.site != h.pair.1 {
            return HoldAnswer::Refused {
                holder: None,
                epoch: 0,
                remaining_ms: 0,
                why: format!("site {} is not of pair {}/{}", h.site, h.pair.0, h.pair.1),
            };
        }
        let seen = self.epochs.get(&h.pair).copied().unwrap_or(0);
        let current = self.held.get(&h.pair).filter(|t| t.until > now);
        let refuse = |why: String, t: Option<&Ticket>| HoldAnswer::Refused {
            holder: t.map(|t| t.site.clone()),
            epoch: t.map_or(seen, |t| t.epoch),
            remaining_ms: t.map_or(0, |t| (t.until - now).as_millis() as u64),
            why,
        };
        // Another site than the last holder needs an epoch above every one granted (its
        // promotion's), the last holder at least its own.
        let last = self.held.get(&h.pair).map(|t| t.site.as_str());
        let needed = if last.is_some_and(|l| l != h.site) {
            seen + 1
        } else {
            seen
        };
        if h.epoch < needed {
            return refuse(
                format!(
                    "epoch {} is below {needed} (epoch {seen} was granted before)",
                    h.epoch
                ),
                current,
            );
        }
        if let Some(t) = current
            && t.site != h.site
        {
            return refuse(format!("site {} holds it", t.site), current);
        }
        let lease = Duration::from_millis(h.lease_ms).min(MAX_LEASE);
        self.held.insert(
            h.pair.clone(),
            Ticket {
                site: h.site.clone(),
                epoch: h.epoch,
                until: now + lease,
            },
        );
        self.epochs.insert(h.pair.clone(), h.epoch);
        HoldAnswer::Granted
    }
}

/// A running witness.
pub struct Witness {
    tickets: Mutex<Tickets>,
}

impl Serve for Witness {
    fn serve(self: Arc<Self>, request: DrRequest) -> BoxFuture<DrReply> {
        let reply = match request {
            DrRequest::Hold(h) => {
                let answer = self
                    .tickets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .hold(&h, Instant::now());
                if answer == HoldAnswer::Granted {
                    tracing::debug!(site = %h.site, epoch = h.epoch, "ticket held");
                } else {
                    tracing::info!(site = %h.site, epoch = h.epoch, answer = ?answer, "ticket refused");
                }
                DrReply::Hold(answer)
            }
            _ => DrReply::Refused("this is a witness: it only holds tickets".into()),
        };
        Box::pin(async move { reply })
    }
}

/// Binds a witness on `listen` with `material` (its certificate, trusting both sites' CAs)
/// and serves until the process ends, granting nothing for the first `grace` (set it to at
/// least the sites' `witness_lease_ms`: a restarted witness has forgotten what it granted).
pub async fn run(
    listen: SocketAddr,
    material: &TlsMaterial,
    grace: Duration,
) -> Result<(), String> {
    let link = Link::bind(listen, material)?;
    tracing::info!(listen = %link.local_addr().map(|a| a.to_string()).unwrap_or_default(), grace_ms = grace.as_millis() as u64, "witness serving");
    link.serve(Arc::new(Witness {
        tickets: Mutex::new(Tickets::starting(Instant::now(), grace)),
    }))
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(site: &str, epoch: u64, lease_ms: u64) -> Hold {
        Hold {
            pair: pair_of("west", "east"),
            site: site.into(),
            epoch,
            lease_ms,
        }
    }

    #[test]
    fn the_ticket_goes_to_another_site_only_once_its_lease_ran_out() {
        let mut t = Tickets::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(t.hold(&hold("east", 1, 10_000), t0), HoldAnswer::Granted);
        // Renewed by its holder.
        assert_eq!(
            t.hold(&hold("east", 1, 10_000), t0 + s(5)),
            HoldAnswer::Granted
        );
        // The standby's claim waits for the lease to run out, and needs a higher epoch.
        match t.hold(&hold("west", 1, 10_000), t0 + s(20)) {
            HoldAnswer::Refused { epoch, why, .. } => {
                assert_eq!(epoch, 1);
                assert!(why.contains("below 2"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        match t.hold(&hold("west", 2, 10_000), t0 + s(14)) {
            HoldAnswer::Refused {
                holder,
                remaining_ms,
                ..
            } => {
                assert_eq!(holder.as_deref(), Some("east"));
                assert_eq!(remaining_ms, 1_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            t.hold(&hold("west", 2, 10_000), t0 + s(15)),
            HoldAnswer::Granted
        );
        // The overtaken site cannot take it back, even once west's lease runs out.
        assert!(matches!(
            t.hold(&hold("east", 1, 10_000), t0 + s(40)),
            HoldAnswer::Refused { .. }
        ));
        assert_eq!(
            t.hold(&hold("east", 3, 10_000), t0 + s(40)),
            HoldAnswer::Granted
        );
        // A site of another pair is refused; leases are capped.
        assert!(matches!(
            t.hold(&hold("north", 9, 10_000), t0 + s(60)),
            HoldAnswer::Refused { .. }
        ));
        assert_eq!(pair_of("west", "east"), pair_of("east", "west"));
    }

    #[test]
    fn a_restarted_witness_grants_nothing_while_an_old_lease_may_run() {
        // East held the ticket at this witness, which then restarted and forgot it: west's
        // claim must wait until east's lease (10 s) has surely run out.
        let t0 = Instant::now();
        let mut t = Tickets::starting(t0, Duration::from_secs(10));
        match t.hold(&hold("west", 2, 10_000), t0 + Duration::from_secs(3)) {
            HoldAnswer::Refused {
                holder,
                remaining_ms,
                ..
            } => {
                assert_eq!(holder, None);
                assert_eq!(remaining_ms, 7_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            t.hold(&hold("west", 2, 10_000), t0 + Duration::from_secs(10)),
            HoldAnswer::Granted
        );
    }
}
