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

use crate::link::{Link, LinkError, Serve};
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

/// What a witness keeps on disk (`--state`): its tickets, with their ends on CLOCK_BOOTTIME,
/// and the highest epoch granted per pair, written (synced, renamed into place) on every
/// grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTickets {
    /// The boot the ticket ends count on (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// (pair, site, epoch, end in CLOCK_BOOTTIME ns).
    pub held: Vec<((String, String), String, u64, u64)>,
    /// The highest epoch granted per pair.
    pub epochs: Vec<((String, String), u64)>,
}

impl Tickets {
    /// The tickets as they would be saved, at `now` = `now_boot` (CLOCK_BOOTTIME ns).
    pub fn save(&self, boot_id: &str, now: Instant, now_boot: u64) -> SavedTickets {
        let mut held: Vec<_> = self
            .held
            .iter()
            .map(|(pair, t)| {
                let left = t.until.saturating_duration_since(now).as_nanos() as u64;
                (
                    pair.clone(),
                    t.site.clone(),
                    t.epoch,
                    now_boot.saturating_add(left),
                )
            })
            .collect();
        held.sort();
        let mut epochs: Vec<_> = self.epochs.iter().map(|(p, e)| (p.clone(), *e)).collect();
        epochs.sort();
        SavedTickets {
            boot_id: boot_id.to_string(),
            held,
            epochs,
        }
    }

    /// The tickets of a witness (re)started at `now` (= `now_boot`) from what it saved. On the
    /// same boot, the tickets go on where they were and nothing needs waiting out; after a
    /// reboot (the ends are on another clock), the epochs are kept and nothing is granted for
    /// `grace`, as without a saved state.
    pub fn restored(
        saved: &SavedTickets,
        boot_id: &str,
        now: Instant,
        now_boot: u64,
        grace: Duration,
    ) -> Self {
        let epochs = saved.epochs.iter().cloned().collect();
        let same_boot = saved.boot_id == boot_id;
        // After a reboot a ticket's end means nothing: it counts as run out, but who held it
        // at which epoch still decides what the other site needs.
        let held = saved
            .held
            .iter()
            .map(|(pair, site, epoch, end)| {
                let left = if same_boot {
                    Duration::from_nanos(end.saturating_sub(now_boot))
                } else {
                    Duration::ZERO
                };
                let ticket = Ticket {
                    site: site.clone(),
                    epoch: *epoch,
                    until: now + left,
                };
                (pair.clone(), ticket)
            })
            .collect();
        Tickets {
            held,
            epochs,
            quiet_until: (!same_boot).then(|| now + grace),
        }
    }
}

/// This boot's id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CLOCK_BOOTTIME in ns (goes on during a suspension, like the leases it bounds).
fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Why a witness's saved tickets could not be loaded; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WitnessStateError {
    /// The file exists but cannot be read.
    #[error("witness state {}: {source}", .path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold saved tickets.
    #[error("witness state {}: {source} (remove it to start afresh, with the grace)", .path.display())]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// Why a witness stopped before serving.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// Its saved tickets could not be loaded.
    #[error(transparent)]
    State(#[from] WitnessStateError),
    /// Its link could not be bound.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Reads a witness's saved tickets: `None` when the file does not exist; an error naming the
/// file when it cannot be read or parsed.
pub fn load_state(path: &std::path::Path) -> Result<Option<SavedTickets>, WitnessStateError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| WitnessStateError::Parse {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(WitnessStateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_state(path: &std::path::Path, saved: &SavedTickets) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(saved).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A running witness.
pub struct Witness {
    tickets: Mutex<Tickets>,
    /// Where it saves its tickets, if anywhere.
    state: Option<std::path::PathBuf>,
    boot_id: String,
}

impl Serve for Witness {
    fn serve(self: Arc<Self>, request: DrRequest) -> BoxFuture<DrReply> {
        let reply = match request {
            DrRequest::Hold(h) => {
                let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let mut answer = tickets.hold(&h, now);
                // A grant counts once it is on disk: a witness restarted after answering must
                // still know it.
                if answer == HoldAnswer::Granted
                    && let Some(path) = &self.state
                {
                    let saved = tickets.save(&self.boot_id, now, boottime_ns());
                    if let Err(e) = write_state(path, &saved) {
                        tracing::error!(state = %path.display(), error = %e, "witness state not saved: the grant is refused");
                        answer = HoldAnswer::Refused {
                            holder: None,
                            epoch: 0,
                            remaining_ms: 0,
                            why: format!("this witness cannot save its state: {e}"),
                        };
                    }
                }
                drop(tickets);
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
/// With `state`, it saves its tickets there on every grant and, restarted on the same boot,
/// goes on from them without the grace.
pub async fn run(
    listen: SocketAddr,
    material: &TlsMaterial,
    grace: Duration,
    state: Option<std::path::PathBuf>,
) -> Result<(), WitnessError> {
    let boot_id = boot_id();
    // Boot time first, the monotonic clock after: whatever passes between the two reads (a
    // preemption) makes a restored ticket end later, never earlier than it did.
    let now_boot = boottime_ns();
    let now = Instant::now();
    let tickets = match state.as_deref().map(load_state).transpose()?.flatten() {
        Some(saved) => {
            let t = Tickets::restored(&saved, &boot_id, now, now_boot, grace);
            let same_boot = saved.boot_id == boot_id;
            tracing::info!(
                tickets = saved.held.len(),
                same_boot,
                "witness state restored"
            );
            t
        }
        None => Tickets::starting(now, grace),
    };
    let quiet = tickets
        .quiet_until
        .map_or(0, |u| u.saturating_duration_since(now).as_millis() as u64);
    let link = Link::bind(listen, material)?;
    tracing::info!(listen = %link.local_addr().map(|a| a.to_string()).unwrap_or_default(), grace_ms = quiet, "witness serving");
    link.serve(Arc::new(Witness {
        tickets: Mutex::new(tickets),
        state,
        boot_id,
    }))
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tickets_go_on_after_a_restart_on_the_same_boot_and_only_epochs_after_a_reboot() {
        let t0 = Instant::now();
        let s = |n: u64| Duration::from_secs(n);
        let mut t = Tickets::default();
        assert_eq!(t.hold(&hold("east", 3, 10_000), t0), HoldAnswer::Granted);
        // Saved at t0 + 2 s, when CLOCK_BOOTTIME read 1,000 s: 8 s left.
        let saved = t.save("boot-a", t0 + s(2), 1_000_000_000_000);
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<SavedTickets>(&json).unwrap(), saved);

        // Restarted on the same boot 3 s later: 5 s left, no grace; west's claim waits.
        let now = t0 + s(30);
        let mut r = Tickets::restored(&saved, "boot-a", now, 1_003_000_000_000, s(60));
        assert!(matches!(
            r.hold(&hold("west", 4, 10_000), now + s(4)),
            HoldAnswer::Refused {
                remaining_ms: 1000,
                ..
            }
        ));
        assert_eq!(
            r.hold(&hold("east", 3, 10_000), now + s(4)),
            HoldAnswer::Granted
        );
        let mut r = Tickets::restored(&saved, "boot-a", now, 1_003_000_000_000, s(60));
        assert_eq!(
            r.hold(&hold("west", 4, 10_000), now + s(6)),
            HoldAnswer::Granted
        );
        // Epochs are remembered: east's old epoch is refused now.
        assert!(matches!(
            r.hold(&hold("east", 3, 10_000), now + s(30)),
            HoldAnswer::Refused { .. }
        ));

        // After a reboot the ends mean nothing: the grace, but the epochs stay.
        let mut r = Tickets::restored(&saved, "boot-b", now, 5_000_000_000, s(10));
        assert!(matches!(
            r.hold(&hold("east", 3, 10_000), now + s(9)),
            HoldAnswer::Refused { .. }
        ));
        assert!(
            matches!(
                r.hold(&hold("west", 3, 10_000), now + s(11)),
                HoldAnswer::Refused { .. }
            ),
            "epoch 3 was granted before: west needs 4"
        );
        assert_eq!(
            r.hold(&hold("west", 4, 10_000), now + s(11)),
            HoldAnswer::Granted
        );
    }

    #[test]
    fn a_bad_state_file_is_named_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.json");
        assert_eq!(load_state(&path).unwrap(), None);
        std::fs::write(&path, "{not json").unwrap();
        let e = load_state(&path).unwrap_err().to_string();
        assert!(e.contains("witness.json"), "{e}");
        let saved = Tickets::default().save("b", Instant::now(), 1);
        write_state(&path, &saved).unwrap();
        assert_eq!(load_state(&path).unwrap(), Some(saved));
    }

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
