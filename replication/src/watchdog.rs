//! The DR watchdog: on each site's leader, it contacts the peer site every heartbeat (a
//! standby long-polls it), mirrors the peer's data onto a standby, demotes an active site
//! that hears of a higher active peer, and carries out `dr failover`, `dr switchover` and
//! `dr demote`. Every node serves the peer's requests from its own applied fabric.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use spaced_fabric::{Command, Millis, MirrorPosition, Outcome, SiteRole};
use spaced_raft::store::FabricView;
use tokio::sync::watch;

use crate::backup::{Backup, BackupError, BackupStore, Kind};
use crate::config::DrSection;
use crate::decide::{SiteState, Verdict, on_peer, promotion_epoch};
use crate::link::{Link, Serve};
use crate::projection::{PAGE_BYTES, Projection, diff, mirror_commands};
use crate::protocol::{Changes, DrReply, DrRequest};

/// A boxed future, for the handle's proposals.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Longest a standby's long poll waits at the peer for something new.
const LONG_POLL: Duration = Duration::from_secs(2);
/// How often a standby records its position when nothing else changed.
const POSITION_EVERY: Duration = Duration::from_secs(5);
/// How long a pull that brings a whole projection may take (tens of thousands of devices
/// over a link with tens of ms of delay need some round trips to grow the window).
const FULL_TRANSFER: Duration = Duration::from_secs(30);
/// How long the active site may take to demote itself for a switchover and let its workload
/// leases run out.
const HAND_OVER_WITHIN: Duration = Duration::from_secs(10);
/// How long a switchover waits for the standby to have mirrored everything.
const SWITCHOVER_WITHIN: Duration = Duration::from_secs(30);

/// What the watchdog needs of its node besides its applied fabric.
pub trait SiteHandle: Send + Sync + 'static {
    /// Whether this node leads its site.
    fn is_leader(&self) -> bool;
    /// Commits `cmd` through the site's leader (from any node).
    fn propose(&self, cmd: Command) -> BoxFuture<Result<Outcome, ProposeError>>;
    /// The wall clock, in ms since the Unix epoch.
    fn now_millis(&self) -> Millis;
    /// How long after its site stopped confirming them the workload leases of its nodes have
    /// surely run out (the placement lease with drift and margin).
    fn workload_lease(&self) -> Duration;
}

/// Why a command the watchdog proposed was not committed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The site's fabric refused it.
    #[error(transparent)]
    Refused(#[from] spaced_fabric::CommandError),
    /// No leader is known to commit it (an election, or a site without a quorum).
    #[error("no leader known")]
    NoLeader,
    /// It did not reach a leader or was not committed (forwarding failed, Raft failed). Text:
    /// the node's own error for it lives in spaced-node, which this crate cannot name.
    #[error("{0}")]
    NotCommitted(String),
}

/// Why an operator's `dr failover`, `dr switchover`, `dr demote` or `dr backup` was refused
/// or failed.
#[derive(Debug, thiserror::Error)]
pub enum DrOpError {
    /// `dr failover` on a site that is not standby.
    #[error("site {site} is {role}, not standby")]
    NotStandby {
        /// This site.
        site: String,
        /// Its role.
        role: SiteRole,
    },
    /// `dr switchover` on a site that is not standby.
    #[error("site {site} is {role}: run `dr switchover` on the standby site")]
    SwitchoverNotOnStandby {
        /// This site.
        site: String,
        /// Its role.
        role: SiteRole,
    },
    /// `dr demote` on a site that is not active.
    #[error("site {site} is {role}, not active")]
    NotActive {
        /// This site.
        site: String,
        /// Its role.
        role: SiteRole,
    },
    /// `dr backup` on a site that is not active.
    #[error("site {site} is {role}: the active site backs up, a standby keeps what it receives")]
    BackupNotOnActive {
        /// This site.
        site: String,
        /// Its role.
        role: SiteRole,
    },
    /// `dr failover` without `--force` while the active peer answers.
    #[error(
        "the active site {peer_site} answered {ago_ms} ms ago: use `dr switchover` to move the \
         active role without losing writes, or `dr failover --force`"
    )]
    PeerActive {
        /// The peer site.
        peer_site: String,
        /// How long ago it last answered, in ms.
        ago_ms: u128,
    },
    /// `dr failover` without `--force`: no majority of the witnesses grants the active role.
    #[error(
        "{granted} of {total} witnesses grant this site the active role (a majority is \
         needed): {}; `dr failover --force` overrides them",
        .notes.join("; ")
    )]
    WitnessesRefuse {
        /// How many granted.
        granted: usize,
        /// Of how many.
        total: usize,
        /// What the others said.
        notes: Vec<String>,
    },
    /// `dr switchover`: no node of the peer site handed the active role over.
    #[error("the peer site did not hand over: {last}")]
    NoHandOver {
        /// What the last peer node asked said. Text: a refusal it sent over the wire, an
        /// unexpected reply or a [`LinkError`](crate::link::LinkError), whichever came last.
        last: String,
    },
    /// `dr switchover`: the peer handed over, but this site did not mirror all it had in time.
    #[error(
        "the peer site is standby now, but this site did not mirror up to its index {index} \
         within {within:?}: both sites are standby; `dr failover` when the link is back"
    )]
    NotMirrored {
        /// The peer's index at its demotion.
        index: u64,
        /// The time it had.
        within: Duration,
    },
    /// `dr switchover`: the peer handed over, but no majority of the witnesses grants this
    /// site the active role.
    #[error(
        "the peer site is standby now, but {granted} of {total} witnesses grant this site the \
         active role: {}; both sites are standby: `dr failover` once they do",
        .notes.join("; ")
    )]
    NotClaimed {
        /// How many granted.
        granted: usize,
        /// Of how many.
        total: usize,
        /// What the others said.
        notes: Vec<String>,
    },
    /// `dr backup` with no files declared.
    #[error("[dr.backup] declares no files")]
    NoBackupFiles,
    /// `dr backup`: the files could not be backed up.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The role change was not committed.
    #[error(transparent)]
    Propose(#[from] ProposeError),
}

/// What `spacectl dr status` shows (from the site's leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrStatus {
    /// This site.
    pub site: String,
    /// Its role.
    pub role: SiteRole,
    /// Its site epoch.
    pub epoch: u64,
    /// When the role last changed (ms since the Unix epoch).
    pub since: Millis,
    /// The peer site.
    pub peer_site: String,
    /// Whether the peer answered within its heartbeat retries.
    pub peer_reachable: bool,
    /// How long ago the peer last answered, in ms.
    pub last_contact_ms: Option<u64>,
    /// The peer's role and epoch when it last answered.
    pub peer_role: Option<SiteRole>,
    /// The peer's epoch.
    pub peer_epoch: Option<u64>,
    /// The peer's last applied index when it last answered.
    pub peer_index: Option<u64>,
    /// On a standby: the peer index mirrored.
    pub mirrored_index: Option<u64>,
    /// On a standby: entries of the peer not yet mirrored (`None`: unknown, the link is down).
    pub lag_entries: Option<u64>,
    /// On a standby: how long it has been behind its peer, in ms (0 in step; `None`: unknown).
    pub lag_ms: Option<u64>,
    /// Failed contacts in a row.
    pub failures_in_row: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// Mirrored changes this site refused, with why (e.g. a service bound to a VIP this site
    /// does not have).
    pub not_mirrored: Vec<String>,
    /// Whether this site takes over by itself (automatic failover on, witnesses configured).
    pub automatic_failover: bool,
    /// Automatic failover is off until then (ms since the Unix epoch; `u64::MAX`: until
    /// turned on), by an operator or after this site lost the witnesses.
    pub automatic_failover_off_until: Option<Millis>,
    /// The witnesses that granted this site's last hold or claim, of how many.
    pub witnesses_granting: Option<(usize, usize)>,
    /// What a witness said when it did not grant.
    pub witness_note: Option<String>,
    /// The failure-detection script's last verdict, or why it failed.
    pub script_note: Option<String>,
    /// The newest backup of the declared configuration files this node has (taken here on an
    /// active site, received on a standby): when it was taken, its files and bytes.
    pub last_backup: Option<(Millis, usize, u64)>,
    /// The last backup problem (a file that cannot be read, a standby node not reached).
    pub backup_note: Option<String>,
}

#[derive(Default)]
struct State {
    /// A standby leader's copy of the peer's projection and the peer index it is at.
    remote: Option<(u64, Projection)>,
    /// A projection coming in pages: the peer index it is at and the pages so far.
    staging: Option<(u64, Projection)>,
    /// Whose projection that is, and the peer's clock when it sent it.
    remote_from: Option<(String, Millis)>,
    /// The peer index this site has mirrored completely.
    mirrored: Option<u64>,
    last_contact: Option<Instant>,
    failures: u32,
    last_error: Option<String>,
    peer: Option<SiteState>,
    peer_index: Option<u64>,
    /// The highest epoch the peer has been seen with.
    peer_epoch_seen: Option<u64>,
    behind_since: Option<Instant>,
    not_mirrored: Vec<String>,
    next_peer: usize,
    position_at: Option<Instant>,
    warned_no_active: bool,
    /// Contacts in a row that found both sites standby.
    no_active: u32,
    /// A switchover is under way: mirror the peer although it is standby now.
    switching: bool,
    /// When this node started leading (the witness deadline of a new leader counts from it).
    leading_since: Option<Instant>,
    /// On an active site: when the last round that a majority of witnesses granted was sent.
    held_at: Option<Instant>,
    /// The witnesses that granted the last round, of how many.
    witnesses_granting: Option<(usize, usize)>,
    /// What the witnesses said when they did not grant.
    witness_note: Option<String>,
    /// The highest epoch a witness has said it granted.
    witness_epoch_seen: Option<u64>,
    /// The failure-detection script asked to wait until then.
    script_wait_until: Option<Instant>,
    /// The script's last verdict or failure.
    script_note: Option<String>,
    /// When this standby's leader last claimed the active role at the witnesses (claims go
    /// out at most once a heartbeat interval).
    claimed_at: Option<Instant>,
    /// When this leader handed the active role over to the peer (a switchover): for a while
    /// it does not claim the role back when it finds both sites standby.
    handed_over_at: Option<Instant>,
    /// On an active site's leader: the newest backup each standby node keeps (by address).
    shipped: std::collections::BTreeMap<String, Millis>,
    /// The last backup problem.
    backup_note: Option<String>,
}

/// The watchdog of one node.
pub struct Watchdog {
    cfg: DrSection,
    /// This node's applied fabric.
    view: FabricView,
    handle: Arc<dyn SiteHandle>,
    link: Arc<Link>,
    /// The link to the witnesses (trusting both sites' CAs), if there are any.
    witness_link: Option<Arc<Link>>,
    state: Mutex<State>,
    /// The last projection this node sent the peer, by index: a later pull from that index is
    /// answered with the difference.
    sent: Mutex<Option<(u64, Projection)>>,
    /// Wakes the mirroring task when a pull brought something.
    mirror_wake: tokio::sync::Notify,
    /// This node's backups of the declared configuration files.
    backups: Arc<BackupStore>,
}

impl Watchdog {
    /// A watchdog for this node's site, talking over `link`.
    pub fn new(
        cfg: DrSection,
        view: FabricView,
        handle: Arc<dyn SiteHandle>,
        link: Arc<Link>,
        witness_link: Option<Arc<Link>>,
        backups: Arc<BackupStore>,
    ) -> Arc<Self> {
        Arc::new(Watchdog {
            backups,
            cfg,
            view,
            handle,
            link,
            witness_link,
            state: Mutex::default(),
            sent: Mutex::default(),
            mirror_wake: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.cfg.heartbeat_interval_ms)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.heartbeat_timeout_ms)
    }

    /// This site as its fabric says.
    fn me(&self) -> SiteState {
        let site = self.cfg.site.clone();
        self.view.read_indexed(|_, f| SiteState {
            site,
            role: f.site.role,
            epoch: f.site.epoch,
        })
    }

    /// Serves the link and runs the leader's loop until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        /// Closes the link and stops serving when the loop ends, returns or is aborted (the
        /// serving tasks hold the node: they must not outlive it).
        struct Serving(Vec<tokio::task::JoinHandle<()>>, Arc<Link>);
        impl Drop for Serving {
            fn drop(&mut self) {
                self.1.close();
                for task in &self.0 {
                    task.abort();
                }
            }
        }
        let _serving = Serving(
            vec![
                tokio::spawn(self.link.clone().serve(self.clone())),
                tokio::spawn(self.clone().mirror_worker()),
            ],
            self.link.clone(),
        );
        loop {
            if *shutdown.borrow() {
                break;
            }
            let pause = if self.handle.is_leader() {
                self.leader_step().await
            } else {
                *self.state() = State::default();
                Duration::from_millis(200)
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }

    /// One round on the leader; returns how long to wait before the next.
    async fn leader_step(&self) -> Duration {
        let me = self.me();
        if me.role == SiteRole::Standalone {
            self.take_start_role().await;
            return Duration::from_millis(100);
        }
        self.state().leading_since.get_or_insert_with(Instant::now);
        if self.cfg.failure_detection_script.is_some() {
            self.ask_script(&me).await;
            if me.role == SiteRole::Active && self.witness_link.is_some() {
                self.hold_active_role(&me).await;
            }
        } else if self.witness_link.is_some() {
            match me.role {
                SiteRole::Active => self.hold_active_role(&me).await,
                SiteRole::Standby => self.take_over_if_lost(&me).await,
                SiteRole::Standalone => {}
            }
        }
        let me = self.me();
        if me.role == SiteRole::Active && !self.cfg.backup.files.is_empty() {
            self.back_up_and_ship().await;
        }
        let mirror = me.role == SiteRole::Standby;
        let (have, addr, paging) = {
            let st = self.state();
            let addr = self.cfg.peers[st.next_peer % self.cfg.peers.len()].clone();
            let paging = st
                .staging
                .as_ref()
                .and_then(|(i, p)| Some((*i, p.devices.keys().next_back()?.clone())));
            (st.remote.as_ref().map(|(i, _)| *i), addr, paging)
        };
        // Long polls only over a link that works: a peer in doubt is asked plainly, so that a
        // lost one counts as lost after `retries` timeouts, not long polls.
        let wait = if mirror && self.state().failures == 0 {
            LONG_POLL
        } else {
            Duration::ZERO
        };
        let request = match paging {
            // The next page, from the node that sent the previous ones.
            Some((index, after)) if mirror => DrRequest::PullPage {
                from: me.clone(),
                index,
                after,
            },
            _ => DrRequest::Pull {
                from: me.clone(),
                mirror,
                have,
                wait_ms: wait.as_millis() as u64,
            },
        };
        // A pull without a base brings the whole projection: room for its transfer.
        let reply = if mirror && have.is_none() {
            FULL_TRANSFER
        } else {
            self.timeout() + wait
        };
        match self
            .link
            .call_within(&addr, &request, self.timeout(), reply)
            .await
        {
            Ok(DrReply::State {
                site,
                index,
                sent_at,
                changes,
            }) => {
                self.heard(&me, site, index, sent_at, changes).await;
                if mirror {
                    Duration::ZERO
                } else {
                    self.interval()
                }
            }
            Ok(DrReply::Refused(why)) => self.failed(format!("{addr} refused: {why}")),
            Ok(other) => self.failed(format!("{addr}: unexpected reply {other:?}")),
            Err(e) => self.failed(e.to_string()),
        }
    }

    fn failed(&self, why: String) -> Duration {
        let mut st = self.state();
        st.failures += 1;
        st.next_peer += 1;
        if st.failures == self.cfg.heartbeat_retries {
            tracing::warn!(peer = %self.cfg.peer_site, error = %why, "DR: peer site lost");
        } else {
            tracing::debug!(peer = %self.cfg.peer_site, error = %why, "DR: peer did not answer");
        }
        st.last_error = Some(why);
        // The stream is down: what it had is of no use for differences any more.
        st.remote = None;
        st.staging = None;
        st.behind_since = None;
        self.interval()
    }

    /// Proposes this site's demotion to standby at `epoch`.
    async fn step_down(&self, epoch: u64) -> Result<(), ProposeError> {
        let cmd = Command::SetSiteRole {
            role: SiteRole::Standby,
            epoch,
            at: self.handle.now_millis(),
        };
        self.handle.propose(cmd).await.map(|_| ())
    }

    /// The configured starting role, once, while the fabric says standalone.
    async fn take_start_role(&self) {
        let Ok(role) = self.cfg.start_role() else {
            return;
        };
        let epoch = if role == SiteRole::Active { 1 } else { 0 };
        let cmd = Command::SetSiteRole {
            role,
            epoch,
            at: self.handle.now_millis(),
        };
        match self.handle.propose(cmd).await {
            Ok(_) => {
                tracing::info!(site = %self.cfg.site, %role, epoch, "DR: site role taken from the config")
            }
            Err(e) => tracing::warn!(error = %e, "DR: could not record the site's starting role"),
        }
    }

    async fn heard(
        &self,
        me: &SiteState,
        peer: SiteState,
        index: u64,
        sent_at: Millis,
        changes: Changes,
    ) {
        {
            let mut st = self.state();
            if st.failures >= self.cfg.heartbeat_retries {
                tracing::info!(peer = %peer.site, "DR: peer site reachable again");
            }
            st.failures = 0;
            st.last_error = None;
            st.last_contact = Some(Instant::now());
            st.peer_index = Some(index);
            st.peer_epoch_seen = Some(st.peer_epoch_seen.unwrap_or(0).max(peer.epoch));
            st.peer = Some(peer.clone());
            if peer.role != SiteRole::Standby || me.role != SiteRole::Standby {
                st.warned_no_active = false;
                st.no_active = 0;
            }
        }
        if peer.site != self.cfg.peer_site {
            self.failed(format!(
                "the peer says it is site {:?}, not {:?}",
                peer.site, self.cfg.peer_site
            ));
            return;
        }
        match on_peer(me, &peer) {
            Verdict::Demote { epoch } => {
                tracing::warn!(peer = %peer.site, peer_epoch = peer.epoch, epoch = me.epoch, "DR: the peer site is active with a higher claim: this site becomes standby");
                if let Err(e) = self.step_down(epoch).await {
                    tracing::error!(error = %e, "DR: could not demote this site");
                }
            }
            Verdict::Mirror => self.accept(&peer, index, sent_at, changes),
            // The peer stepped down for this site's switchover: its data is the last word.
            Verdict::NoActiveSite if self.state().switching => {
                self.accept(&peer, index, sent_at, changes)
            }
            Verdict::NoActiveSite => {
                let mut st = self.state();
                st.no_active += 1;
                // Not in passing (a switchover's moment between the two roles).
                if !st.warned_no_active && st.no_active > self.cfg.heartbeat_retries {
                    st.warned_no_active = true;
                    tracing::warn!(peer = %peer.site, "DR: both sites are standby: no site runs the workload (`spacectl dr failover` on one of them)");
                }
            }
            Verdict::Nothing => {}
        }
    }

    /// Takes a reply's data into this site's copy of the peer's projection and wakes the
    /// mirroring task; the next pull goes out at once, while that task commits.
    fn accept(&self, peer: &SiteState, index: u64, sent_at: Millis, changes: Changes) {
        let mut st = self.state();
        let have = st.remote.take();
        st.remote = match (changes, have) {
            (Changes::Full(p), _) => Some((index, p)),
            (Changes::Page(page), _) => {
                if page.first {
                    st.staging = Some((index, Projection::default()));
                }
                match st.staging.take() {
                    Some((at, mut p)) if at == index => {
                        let more = page.more;
                        p.extend(page);
                        if more {
                            st.staging = Some((at, p));
                            None
                        } else {
                            Some((at, p))
                        }
                    }
                    // A page of another transfer: start again.
                    _ => None,
                }
            }
            (Changes::Delta(d), Some((_, mut p))) => {
                p.apply(&d);
                Some((index, p))
            }
            (Changes::Unchanged, Some((_, p))) => Some((index, p)),
            (Changes::NotAsked, have) => have,
            // A difference or "unchanged" without a base: ask again for everything.
            (_, None) => None,
        };
        if st.remote.is_some() {
            st.remote_from = Some((peer.site.clone(), sent_at));
            if st.mirrored.is_none_or(|m| m < index) {
                st.behind_since.get_or_insert_with(Instant::now);
            }
            drop(st);
            self.mirror_wake.notify_one();
        }
    }

    /// Commits, on the leader, what the pulls brought: each time it is woken, until this
    /// site's fabric matches the latest copy of the peer's projection.
    async fn mirror_worker(self: Arc<Self>) {
        loop {
            self.mirror_wake.notified().await;
            loop {
                let latest = {
                    let st = self.state();
                    match (&st.remote, &st.remote_from) {
                        (Some((index, p)), Some((site, sent_at))) => {
                            Some((*index, p.clone(), site.clone(), *sent_at))
                        }
                        _ => None,
                    }
                };
                let Some((index, remote, site, sent_at)) = latest else {
                    break;
                };
                if !self.handle.is_leader() {
                    break;
                }
                self.catch_up(index, &remote, site, sent_at).await;
                let newer = self
                    .state()
                    .remote
                    .as_ref()
                    .is_some_and(|(i, _)| *i > index);
                if !newer {
                    break;
                }
            }
        }
    }

    /// Proposes the `Mirror` commands that bring this site's fabric to `remote` (the peer's
    /// projection at `index`), and records the position.
    async fn catch_up(&self, index: u64, remote: &Projection, site: String, sent_at: Millis) {
        let (own, recorded) = self
            .view
            .read_indexed(|_, f| (Projection::of(f), f.site.mirror.as_ref().map(|m| m.index)));
        let differs = own != *remote;
        {
            let mut st = self.state();
            let stale = st.position_at.is_none_or(|t| t.elapsed() > POSITION_EVERY);
            let record = differs || (stale && recorded != Some(index));
            if !record {
                st.mirrored = Some(index);
                st.behind_since = None;
                return;
            }
        }
        let position = MirrorPosition {
            site,
            index,
            sent_at,
        };
        let started = Instant::now();
        let cmds = mirror_commands(&own, remote, position, self.handle.now_millis());
        let proposed = cmds.len();
        tracing::debug!(
            commands = proposed,
            index,
            planned_ms = started.elapsed().as_millis() as u64,
            "DR: mirroring"
        );
        let mut refused = Vec::new();
        for cmd in cmds {
            match self.handle.propose(cmd).await {
                Ok(Outcome::Mirrored { refused: r, .. }) => refused.extend(r),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "DR: mirroring refused");
                    self.state().remote = None;
                    return;
                }
            }
        }
        let mut st = self.state();
        if !refused.is_empty() && refused != st.not_mirrored {
            tracing::warn!(count = refused.len(), first = %refused[0], "DR: some of the peer's changes cannot be mirrored here");
        }
        st.not_mirrored = refused;
        st.position_at = Some(Instant::now());
        st.mirrored = Some(index);
        if st.remote.as_ref().is_none_or(|(i, _)| *i <= index) {
            st.behind_since = None;
        }
        tracing::debug!(
            commands = proposed,
            index,
            took_ms = started.elapsed().as_millis() as u64,
            "DR: mirrored"
        );
    }

    /// Asks every witness to hold the pair's ticket for this site at `epoch`; returns how
    /// many granted, what the others said, and whether one said the peer site holds it or
    /// holds a higher epoch (this site was overtaken).
    async fn hold_at_witnesses(&self, epoch: u64) -> (usize, Vec<String>, bool) {
        let Some(link) = &self.witness_link else {
            return (0, Vec::new(), false);
        };
        let hold = crate::witness::Hold {
            pair: crate::witness::pair_of(&self.cfg.site, &self.cfg.peer_site),
            site: self.cfg.site.clone(),
            epoch,
            lease_ms: self.cfg.witness_lease_ms,
        };
        let asks = self.cfg.witnesses.iter().map(|w| {
            let req = DrRequest::Hold(hold.clone());
            async move { (w, link.call(w, &req, self.timeout()).await) }
        });
        let mut granted = 0;
        let mut notes = Vec::new();
        let mut overtaken = false;
        for (w, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(DrReply::Hold(crate::witness::HoldAnswer::Granted)) => granted += 1,
                Ok(DrReply::Hold(crate::witness::HoldAnswer::Refused {
                    why,
                    remaining_ms,
                    epoch: granted_before,
                    holder,
                })) => {
                    overtaken |= granted_before > epoch
                        || holder.as_deref().is_some_and(|h| h != self.cfg.site);
                    let epoch = granted_before;
                    let mut st = self.state();
                    st.witness_epoch_seen = Some(st.witness_epoch_seen.unwrap_or(0).max(epoch));
                    drop(st);
                    notes.push(format!("{w}: {why} ({remaining_ms} ms left)"))
                }
                Ok(other) => notes.push(format!("{w}: unexpected reply {other:?}")),
                Err(e) => notes.push(e.to_string()),
            }
        }
        (granted, notes, overtaken)
    }

    /// On an active site's leader: takes a backup when one is due (or when this node has
    /// none: a new leader), then ships the newest to every standby node that lacks it.
    async fn back_up_and_ship(&self) {
        let now = self.handle.now_millis();
        let newest = self.backups.list(Kind::Own).last().copied();
        if (newest.is_none() || self.cfg.backup.due(newest, now))
            && let Err(e) = self.back_up_now()
        {
            tracing::warn!(error = %e, "DR: configuration files not backed up");
        }
        let backup = match self.backups.newest(Kind::Own) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                self.state().backup_note = Some(e.to_string());
                return;
            }
        };
        for addr in &self.cfg.peers {
            if self.state().shipped.get(addr) == Some(&backup.taken_at) {
                continue;
            }
            let req = DrRequest::KeepBackup(backup.clone());
            match self.link.call(addr, &req, self.timeout()).await {
                Ok(DrReply::Kept) => {
                    tracing::info!(peer = %addr, taken_at = backup.taken_at, "DR: configuration backup shipped");
                    self.state().shipped.insert(addr.clone(), backup.taken_at);
                }
                Ok(other) => {
                    self.state().backup_note =
                        Some(format!("{addr} did not keep the backup: {other:?}"))
                }
                Err(e) => {
                    self.state().backup_note = Some(format!("{addr} did not keep the backup: {e}"))
                }
            }
        }
    }

    /// Backs the declared configuration files up now (`spacectl dr backup`, on the active
    /// site's leader); it is shipped to the standby at the next heartbeat.
    pub fn back_up_now(&self) -> Result<(Millis, usize, u64), DrOpError> {
        let me = self.me();
        if me.role != SiteRole::Active {
            return Err(DrOpError::BackupNotOnActive {
                site: me.site,
                role: me.role,
            });
        }
        if self.cfg.backup.files.is_empty() {
            return Err(DrOpError::NoBackupFiles);
        }
        let taken = Backup::take(
            &self.cfg.site,
            &self.cfg.backup.files,
            self.handle.now_millis(),
        )
        .and_then(|b| self.backups.keep(Kind::Own, &b).map(|()| b));
        match taken {
            Ok(b) => {
                self.state().backup_note = None;
                tracing::info!(
                    files = b.files.len(),
                    bytes = b.size(),
                    "DR: configuration files backed up"
                );
                Ok((b.taken_at, b.files.len(), b.size()))
            }
            Err(e) => {
                self.state().backup_note = Some(e.to_string());
                Err(e.into())
            }
        }
    }

    /// After a hand-over: once this site's workload leases have surely run out (its nodes
    /// confirm none on a standby), gives the active role back at the witnesses, so that the
    /// peer's claim need not wait out the lease. Best effort: a witness that does not hear
    /// it lets the lease run out instead.
    async fn release_at_witnesses(&self, epoch: u64) {
        let Some(link) = &self.witness_link else {
            return;
        };
        tokio::time::sleep(self.handle.workload_lease()).await;
        let release = crate::witness::Hold {
            pair: crate::witness::pair_of(&self.cfg.site, &self.cfg.peer_site),
            site: self.cfg.site.clone(),
            epoch,
            lease_ms: 0,
        };
        let asks = self.cfg.witnesses.iter().map(|w| {
            let req = DrRequest::Hold(release.clone());
            async move { (w, link.call(w, &req, self.timeout()).await) }
        });
        for (w, answer) in futures::future::join_all(asks).await {
            if !matches!(
                answer,
                Ok(DrReply::Hold(crate::witness::HoldAnswer::Granted))
            ) {
                tracing::info!(witness = %w, answer = ?answer, "DR: a witness did not take the active role back; its lease runs out instead");
            }
        }
    }

    /// On an active site's leader with witnesses: the site epoch and how long this site
    /// surely holds the active role (half a witness lease from when the last granted round
    /// was sent, as the demotion deadline counts). `None` elsewhere, and on a new leader until
    /// its first round is granted: the nodes keep what they learned from its predecessor.
    pub fn site_hold(&self) -> Option<(u64, Duration)> {
        if self.witness_link.is_none() || !self.handle.is_leader() {
            return None;
        }
        let me = self.me();
        if me.role != SiteRole::Active {
            return None;
        }
        let held_at = self.state().held_at?;
        let until = held_at + Duration::from_millis(self.cfg.witness_lease_ms / 2);
        Some((me.epoch, until.saturating_duration_since(Instant::now())))
    }

    fn majority(&self) -> usize {
        self.cfg.witnesses.len() / 2 + 1
    }

    /// On an active site's leader: renew the active role at the witnesses; demote this site
    /// when a majority has not renewed it for half a lease (it would run out at them, and the
    /// standby take over, half a lease later), or at once when another site holds it.
    async fn hold_active_role(&self, me: &SiteState) {
        let sent = Instant::now();
        let (granted, notes, overtaken) = self.hold_at_witnesses(me.epoch).await;
        let total = self.cfg.witnesses.len();
        let deadline = {
            let mut st = self.state();
            st.witnesses_granting = Some((granted, total));
            st.witness_note = notes.first().cloned();
            if granted >= self.majority() {
                st.held_at = Some(sent);
                return;
            }
            // A new leader knows no renewal of its predecessor's: it counts from when it
            // started leading.
            let from = st.held_at.or(st.leading_since).unwrap_or(sent);
            from + Duration::from_millis(self.cfg.witness_lease_ms / 2)
        };
        if overtaken || Instant::now() >= deadline {
            let why = if overtaken {
                "the peer site holds the active role at the witnesses"
            } else {
                "this site could not renew the active role at a majority of the witnesses"
            };
            tracing::warn!(granted, of = total, notes = ?notes, "DR: {why}: this site becomes standby");
            // Overtaken, it adopts the epoch the witnesses granted the peer.
            let epoch = me.epoch.max(self.state().witness_epoch_seen.unwrap_or(0));
            if let Err(e) = self.step_down(epoch).await {
                tracing::error!(error = %e, "DR: could not demote this site");
                return;
            }
            if !overtaken && self.cfg.isolation_wait_ms > 0 {
                // The model's wait rule: a site that lost the witnesses does not take the
                // active role back by itself for a while, even once they are back.
                let until = self
                    .handle
                    .now_millis()
                    .saturating_add(self.cfg.isolation_wait_ms);
                tracing::warn!(
                    wait_ms = self.cfg.isolation_wait_ms,
                    "DR: automatic failover is off for this site for the isolation wait (`spacectl dr automatic-failover --enable` ends it)"
                );
                let cmd = Command::SetAutoFailover {
                    off_until: Some(until),
                };
                if let Err(e) = self.handle.propose(cmd).await {
                    tracing::error!(error = %e, "DR: could not turn automatic failover off");
                }
            }
        }
    }

    /// On a standby's leader with automatic failover: once the peer is lost, or answers but
    /// has been standby too for a few contacts (it demoted itself, having lost the witnesses),
    /// claim the active role at the witnesses (they grant it only when the peer's lease has
    /// run out there, and to one site of two claiming) and become active with it.
    async fn take_over_if_lost(&self, me: &SiteState) {
        let seen = {
            let st = self.state();
            let lost = st.failures >= self.cfg.heartbeat_retries;
            // A site that just handed over leaves the role to the peer's switchover.
            let handed_over = st.handed_over_at.is_some_and(|t| {
                t.elapsed()
                    < HAND_OVER_WITHIN
                        + SWITCHOVER_WITHIN
                        + Duration::from_millis(self.cfg.witness_lease_ms)
            });
            let no_active =
                st.no_active > self.cfg.heartbeat_retries && !st.switching && !handed_over;
            let claimed_lately = st.claimed_at.is_some_and(|t| t.elapsed() < self.interval());
            if !self.automatic_failover_on() || !(lost || no_active) || claimed_lately {
                return;
            }
            st.peer_epoch_seen.max(st.witness_epoch_seen)
        };
        let epoch = promotion_epoch(me.epoch, seen);
        let sent = Instant::now();
        self.state().claimed_at = Some(sent);
        let (granted, notes, _) = self.hold_at_witnesses(epoch).await;
        {
            let mut st = self.state();
            st.witnesses_granting = Some((granted, self.cfg.witnesses.len()));
            st.witness_note = notes.first().cloned();
        }
        if granted < self.majority() {
            tracing::debug!(granted, notes = ?notes, "DR: peer lost, the witnesses do not grant the active role (yet)");
            return;
        }
        tracing::warn!(peer = %self.cfg.peer_site, granted, epoch, "DR: the peer site is lost or standby and the witnesses grant the active role: automatic failover");
        if let Err(e) = self.promote(epoch, sent).await {
            tracing::error!(error = %e, "DR: automatic failover could not promote this site");
        }
    }

    /// With a failure-detection script, once the peer is lost: runs it and carries out its
    /// verdict (instead of the built-in automatic failover). `beActive` is a `dr failover`
    /// without `--force` (the witnesses, if any, must agree); bad output counts as nothing.
    async fn ask_script(&self, me: &SiteState) {
        let Some(script) = &self.cfg.failure_detection_script else {
            return;
        };
        {
            let st = self.state();
            if st.failures < self.cfg.heartbeat_retries
                || st.script_wait_until.is_some_and(|t| Instant::now() < t)
                || !self.automatic_failover_allowed()
            {
                return;
            }
        }
        let input = serde_json::to_string(&self.status()).unwrap_or_default();
        let timeout = Duration::from_millis(self.cfg.script_timeout_ms);
        let verdict = crate::script::run_script(script, &input, timeout).await;
        let note = match verdict {
            Err(e) => {
                tracing::warn!(error = %e, "DR: the failure-detection script failed; doing nothing");
                format!("failed: {e}")
            }
            Ok(v) => {
                use crate::script::ScriptAction;
                let done = match (&v.action, me.role) {
                    (ScriptAction::BeActive, SiteRole::Standby) => match self.failover(false).await
                    {
                        Ok(epoch) => format!("became active at epoch {epoch}"),
                        Err(e) => format!("could not become active: {e}"),
                    },
                    (ScriptAction::BeStandby, SiteRole::Active) => match self.demote().await {
                        Ok(()) => "became standby".to_string(),
                        Err(e) => format!("could not become standby: {e}"),
                    },
                    (ScriptAction::Wait(d), _) => {
                        self.state().script_wait_until = Some(Instant::now() + *d);
                        format!("waits {d:?}")
                    }
                    _ => "nothing to do".to_string(),
                };
                tracing::info!(action = ?v.action, description = %v.description, %done, "DR: the failure-detection script decided");
                format!("{:?} ({}): {done}", v.action, v.description)
            }
        };
        self.state().script_note = Some(note);
    }

    /// Whether config and fabric let this site take over by itself (witnesses or not).
    fn automatic_failover_allowed(&self) -> bool {
        self.cfg.automatic_failover && self.automatic_failover_off_until().is_none()
    }

    /// When the fabric says automatic failover is off until, if it is off now.
    fn automatic_failover_off_until(&self) -> Option<Millis> {
        let now = self.handle.now_millis();
        self.view
            .read_indexed(|_, f| f.site.automatic_failover_off_until)
            .filter(|t| *t > now)
    }

    /// Whether this site takes over by itself now: witnesses configured, the config allows
    /// it, and no operator (or an isolation) turned it off.
    fn automatic_failover_on(&self) -> bool {
        self.automatic_failover_allowed()
            && (!self.cfg.witnesses.is_empty() || self.cfg.failure_detection_script.is_some())
    }

    /// What `spacectl dr status` shows.
    pub fn status(&self) -> DrStatus {
        let (role, epoch, since, recorded) = self.view.read_indexed(|_, f| {
            (
                f.site.role,
                f.site.epoch,
                f.site.since,
                f.site.mirror.as_ref().map(|m| m.index),
            )
        });
        let st = self.state();
        let reachable = self.peer_reachable(&st);
        let standby = role == SiteRole::Standby;
        let mirrored = st.mirrored.or(recorded);
        DrStatus {
            site: self.cfg.site.clone(),
            role,
            epoch,
            since,
            peer_site: self.cfg.peer_site.clone(),
            peer_reachable: reachable,
            last_contact_ms: st.last_contact.map(|t| t.elapsed().as_millis() as u64),
            peer_role: st.peer.as_ref().map(|p| p.role),
            peer_epoch: st.peer.as_ref().map(|p| p.epoch),
            peer_index: st.peer_index,
            mirrored_index: mirrored.filter(|_| standby),
            lag_entries: match (standby && reachable, st.peer_index, mirrored) {
                (true, Some(p), Some(m)) => Some(p.saturating_sub(m)),
                _ => None,
            },
            lag_ms: (standby && reachable && mirrored.is_some()).then(|| {
                st.behind_since
                    .map_or(0, |t| t.elapsed().as_millis() as u64)
            }),
            failures_in_row: st.failures,
            last_error: st.last_error.clone(),
            not_mirrored: st.not_mirrored.clone(),
            automatic_failover: self.automatic_failover_on(),
            automatic_failover_off_until: self.automatic_failover_off_until(),
            witnesses_granting: st.witnesses_granting,
            witness_note: st.witness_note.clone(),
            script_note: st.script_note.clone(),
            last_backup: self
                .backups
                .summary(if standby { Kind::Peer } else { Kind::Own }),
            backup_note: st.backup_note.clone(),
        }
    }

    fn peer_reachable(&self, st: &State) -> bool {
        let window = (self.interval() + self.timeout() + LONG_POLL) * self.cfg.heartbeat_retries;
        st.failures < self.cfg.heartbeat_retries
            && st.last_contact.is_some_and(|t| t.elapsed() < window)
    }

    /// `dr failover` on a standby's leader: this site becomes active with an epoch above
    /// every one seen. Refused while the active peer answers, unless `force` (then the peer
    /// demotes when it hears of this site).
    pub async fn failover(&self, force: bool) -> Result<u64, DrOpError> {
        let me = self.me();
        if me.role != SiteRole::Standby {
            return Err(DrOpError::NotStandby {
                site: me.site,
                role: me.role,
            });
        }
        let seen = {
            let st = self.state();
            if !force
                && self.peer_reachable(&st)
                && st.peer.as_ref().is_some_and(|p| p.role == SiteRole::Active)
            {
                return Err(DrOpError::PeerActive {
                    peer_site: self.cfg.peer_site.clone(),
                    ago_ms: st.last_contact.map_or(0, |t| t.elapsed().as_millis()),
                });
            }
            st.peer_epoch_seen.max(st.witness_epoch_seen)
        };
        let epoch = promotion_epoch(me.epoch, seen);
        // Forced, the operator's word stands in for the witnesses' for one hold's time.
        let sent = Instant::now();
        if self.witness_link.is_some() && !force {
            let (granted, notes, _) = self.hold_at_witnesses(epoch).await;
            if granted < self.majority() {
                return Err(DrOpError::WitnessesRefuse {
                    granted,
                    total: self.cfg.witnesses.len(),
                    notes,
                });
            }
        }
        Ok(self.promote(epoch, sent).await?)
    }

    /// Makes this site active at `epoch`, its hold at the witnesses counting from `held_at`
    /// (when the claim they granted was sent).
    async fn promote(&self, epoch: u64, held_at: Instant) -> Result<u64, ProposeError> {
        let cmd = Command::SetSiteRole {
            role: SiteRole::Active,
            epoch,
            at: self.handle.now_millis(),
        };
        self.handle.propose(cmd).await?;
        tracing::warn!(site = %self.cfg.site, epoch, "DR: this site is active");
        // It renews at the next round.
        self.state().held_at = Some(held_at);
        Ok(epoch)
    }

    /// `dr switchover` on a standby's leader: the active peer demotes itself, this site
    /// mirrors everything it had, then becomes active. Nothing acknowledged is lost.
    pub async fn switchover(&self) -> Result<u64, DrOpError> {
        let me = self.me();
        if me.role != SiteRole::Standby {
            return Err(DrOpError::SwitchoverNotOnStandby {
                site: me.site,
                role: me.role,
            });
        }
        self.state().switching = true;
        let result = self.switch_over(&me).await;
        self.state().switching = false;
        result
    }

    async fn switch_over(&self, me: &SiteState) -> Result<u64, DrOpError> {
        let mut last = String::from("no peer address");
        let mut handed = None;
        for addr in &self.cfg.peers {
            let req = DrRequest::HandOver { from: me.clone() };
            // The peer answers once it has demoted and its workload leases ran out.
            let reply = self.timeout() + HAND_OVER_WITHIN;
            match self
                .link
                .call_within(addr, &req, self.timeout(), reply)
                .await
            {
                Ok(DrReply::HandedOver { epoch, index }) => {
                    handed = Some((epoch, index));
                    break;
                }
                Ok(DrReply::Refused(why)) => last = format!("{addr} refused: {why}"),
                Ok(other) => last = format!("{addr}: unexpected reply {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        let (epoch, index) = handed.ok_or(DrOpError::NoHandOver { last })?;
        let deadline = Instant::now() + SWITCHOVER_WITHIN;
        loop {
            let caught_up = self.state().mirrored.is_some_and(|m| m >= index);
            if caught_up {
                break;
            }
            if Instant::now() > deadline {
                return Err(DrOpError::NotMirrored {
                    index,
                    within: SWITCHOVER_WITHIN,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let epoch = promotion_epoch(me.epoch, Some(epoch));
        let held_at = self.claim_for_switchover(epoch).await?;
        Ok(self.promote(epoch, held_at).await?)
    }

    /// With witnesses: claims the active role at `epoch` until a majority grants it (the peer
    /// gave it back, or its lease ran out); when the granted claim was sent. Without: now.
    async fn claim_for_switchover(&self, epoch: u64) -> Result<Instant, DrOpError> {
        if self.witness_link.is_none() {
            return Ok(Instant::now());
        }
        let deadline =
            Instant::now() + Duration::from_millis(self.cfg.witness_lease_ms) + 2 * self.timeout();
        loop {
            let sent = Instant::now();
            let (granted, notes, _) = self.hold_at_witnesses(epoch).await;
            if granted >= self.majority() {
                return Ok(sent);
            }
            if Instant::now() > deadline {
                return Err(DrOpError::NotClaimed {
                    granted,
                    total: self.cfg.witnesses.len(),
                    notes,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `dr demote` on an active site's leader: this site becomes standby (keeping its epoch).
    pub async fn demote(&self) -> Result<(), DrOpError> {
        let me = self.me();
        if me.role != SiteRole::Active {
            return Err(DrOpError::NotActive {
                site: me.site,
                role: me.role,
            });
        }
        Ok(self.step_down(me.epoch).await?)
    }

    /// This node's state and, for a mirroring peer, its data: by difference from `have` if
    /// that is what this node last sent, else whole, in pages when it is too large for one
    /// reply.
    fn state_reply(&self, mirror: bool, have: Option<u64>) -> DrReply {
        let site = self.cfg.site.clone();
        let (me, index, projection) = self.view.read_indexed(|i, f| {
            let me = SiteState {
                site,
                role: f.site.role,
                epoch: f.site.epoch,
            };
            (me, i, mirror.then(|| Projection::of(f)))
        });
        let changes = match projection {
            None => Changes::NotAsked,
            Some(p) => {
                let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                let delta = match (&*sent, have) {
                    (Some((at, old)), Some(h)) if *at == h => Some(diff(old, &p)),
                    _ => None,
                };
                let c = match delta {
                    Some(d) if d.is_empty() => Changes::Unchanged,
                    Some(d) if d.weight() <= PAGE_BYTES => Changes::Delta(d),
                    _ if p.weight() <= PAGE_BYTES => Changes::Full(p.clone()),
                    _ => Changes::Page(p.page(None, PAGE_BYTES)),
                };
                *sent = Some((index, p));
                c
            }
        };
        DrReply::State {
            site: me,
            index,
            sent_at: self.handle.now_millis(),
            changes,
        }
    }

    /// A refusal if `from` is not this site's peer.
    fn not_from_peer(&self, from: &SiteState) -> Option<DrReply> {
        (from.site != self.cfg.peer_site).then(|| {
            DrReply::Refused(format!(
                "this is site {}; its peer is {}, not {}",
                self.cfg.site, self.cfg.peer_site, from.site
            ))
        })
    }

    async fn answer(self: Arc<Self>, request: DrRequest) -> DrReply {
        match request {
            DrRequest::Pull {
                from,
                mirror,
                have,
                wait_ms,
            } => {
                if let Some(refused) = self.not_from_peer(&from) {
                    return refused;
                }
                let mut changes = self.view.changes();
                changes.borrow_and_update();
                let index_now = self.view.read_indexed(|i, _| i);
                if mirror && have == Some(index_now) && wait_ms > 0 {
                    let wait = Duration::from_millis(wait_ms).min(LONG_POLL);
                    let _ = tokio::time::timeout(wait, changes.changed()).await;
                }
                self.state_reply(mirror, have)
            }
            DrRequest::PullPage { from, index, after } => {
                if let Some(refused) = self.not_from_peer(&from) {
                    return refused;
                }
                let page = {
                    let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                    match &*sent {
                        Some((at, p)) if *at == index => Some(p.page(Some(&after), PAGE_BYTES)),
                        _ => None,
                    }
                };
                match page {
                    Some(page) => DrReply::State {
                        site: self.me(),
                        index,
                        sent_at: self.handle.now_millis(),
                        changes: Changes::Page(page),
                    },
                    // This node no longer has that projection (another transfer began, or it
                    // restarted): a new transfer from its current one.
                    None => self.state_reply(true, None),
                }
            }
            DrRequest::Hold(_) => DrReply::Refused("this is a site, not a witness".into()),
            DrRequest::KeepBackup(backup) => {
                let me = self.me();
                if me.role != SiteRole::Standby || backup.site != self.cfg.peer_site {
                    return DrReply::Refused(format!(
                        "site {} is {}: only a standby keeps its peer {}'s backups",
                        me.site, me.role, self.cfg.peer_site
                    ));
                }
                match self.backups.keep(Kind::Peer, &backup) {
                    Ok(()) => DrReply::Kept,
                    Err(e) => {
                        tracing::warn!(error = %e, "DR: the peer's configuration backup not kept");
                        DrReply::Refused(format!("not kept: {e}"))
                    }
                }
            }
            DrRequest::HandOver { from } => {
                if from.site != self.cfg.peer_site || from.role != SiteRole::Standby {
                    return DrReply::Refused(format!(
                        "only the standby site {} may ask this site to hand over",
                        self.cfg.peer_site
                    ));
                }
                // The leader: it must know it handed over (see `take_over_if_lost`).
                if !self.handle.is_leader() {
                    return DrReply::Refused(format!(
                        "this node does not lead site {}: ask another",
                        self.cfg.site
                    ));
                }
                self.state().handed_over_at = Some(Instant::now());
                let me = self.me();
                if me.role == SiteRole::Active {
                    if let Err(e) = self.step_down(me.epoch).await {
                        return DrReply::Refused(format!("could not demote: {e}"));
                    }
                    tracing::warn!(to = %from.site, "DR: switchover: this site is standby now");
                }
                // The index must be at least the demotion's, so that the peer waits for every
                // write committed before it: wait until this node has applied it.
                let mut changes = self.view.changes();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    changes.borrow_and_update();
                    let (role, epoch, index) = self
                        .view
                        .read_indexed(|i, f| (f.site.role, f.site.epoch, i));
                    if role == SiteRole::Standby {
                        self.release_at_witnesses(epoch).await;
                        return DrReply::HandedOver { epoch, index };
                    }
                    if !matches!(
                        tokio::time::timeout_at(deadline, changes.changed()).await,
                        Ok(Ok(()))
                    ) {
                        return DrReply::Refused(
                            "this node has not applied the demotion yet; ask again".into(),
                        );
                    }
                }
            }
        }
    }
}

impl Serve for Watchdog {
    fn serve(self: Arc<Self>, request: DrRequest) -> BoxFuture<DrReply> {
        Box::pin(self.answer(request))
    }
}
