//! Which services this node runs, from the fabric and the placements it holds, handed to the supervisor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use spaced_fabric::{Fabric, ServiceScope};
use tokio::sync::watch;

use crate::placement::Placements;
use crate::placement::agent::{HoldError, VipBackend, VipSpec};
use crate::placement::lease::Held;
use crate::services::supervisor::{DesiredService, ServiceState, ServiceStatus, Supervisor};
use crate::takeover::guard::{GuardCell, GuardError};

/// How often the desired set is recomputed and running singletons are re-guarded (a held
/// placement also triggers a pass at once).
const PASS_EVERY: Duration = Duration::from_millis(100);

/// A singleton that failed this many times in a row here (failed starts, exits or restarts for
/// ill health, each without a healthy run long enough to reset its backoff) is given back for
/// another node to try: with the default backoff that is about 1.4 s of retries plus run time.
pub const SINGLETON_GIVE_UP_AFTER: u32 = 4;

/// Why this node cannot keep a singleton's service running, judged from its status: rejected by
/// the supervisor, or [`SINGLETON_GIVE_UP_AFTER`] failures in a row. `None` while it runs, starts
/// or has failed fewer times.
pub fn cannot_keep_running(status: &ServiceStatus) -> Option<String> {
    let last = status.last_error.as_deref().unwrap_or("no error recorded");
    match status.state {
        ServiceState::Rejected => Some(format!("rejected by the supervisor: {last}")),
        ServiceState::FailedToStart | ServiceState::Backoff
            if status.failures >= SINGLETON_GIVE_UP_AFTER =>
        {
            Some(format!(
                "{} failures in a row; last: {last}",
                status.failures
            ))
        }
        _ => None,
    }
}

/// What this node should run now, from [`desired_services`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// Every service to run, with its environment.
    pub services: Vec<DesiredService>,
    /// The singletons among them as (placement, service), for the fence guard.
    pub singletons: Vec<(String, String)>,
}

/// The services this node should run now.
///
/// - `every-node`: when the node has one of the service's roles (or it names none);
/// - `vip:<name>`: while this node holds that VIP (`held`, with the epoch it holds);
/// - `singleton`: while this node holds the service's placement.
///
/// Each gets `SPACED_NODE`, `SPACED_EPOCH` (the fencing token; 0 for `every-node`) and
/// `SPACED_PLACEMENT` (empty for `every-node`).
pub fn desired_services(
    fabric: &Fabric,
    node_name: &str,
    roles: &BTreeSet<String>,
    held: &BTreeMap<String, u64>,
) -> Desired {
    let mut singletons = Vec::new();
    let placement_of = |service: &str| -> Option<String> {
        fabric
            .placements
            .iter()
            .find_map(|(name, p)| match &p.kind {
                spaced_fabric::PlacementKind::Singleton { service: s } if s == service => {
                    Some(name.clone())
                }
                _ => None,
            })
    };
    let services = fabric
        .services
        .iter()
        .filter_map(|(name, spec)| {
            let (placement, epoch) = match &spec.scope {
                ServiceScope::EveryNode => {
                    // A standby site runs no workload (its VIPs and singletons are not granted).
                    if fabric.site.role == spaced_fabric::SiteRole::Standby {
                        return None;
                    }
                    if !spec.roles.is_empty() && spec.roles.is_disjoint(roles) {
                        return None;
                    }
                    (String::new(), 0)
                }
                ServiceScope::Vip(vip) => (vip.clone(), *held.get(vip)?),
                ServiceScope::Singleton => {
                    let placement = placement_of(name)?;
                    let epoch = *held.get(&placement)?;
                    singletons.push((placement.clone(), name.clone()));
                    (placement, epoch)
                }
            };
            let env = BTreeMap::from([
                ("SPACED_NODE".to_string(), node_name.to_string()),
                ("SPACED_EPOCH".to_string(), epoch.to_string()),
                ("SPACED_PLACEMENT".to_string(), placement),
            ]);
            Some(DesiredService {
                name: name.clone(),
                command: spec.command.clone(),
                health_check: spec.health_check.clone(),
                env,
            })
        })
        .collect();
    Desired {
        services,
        singletons,
    }
}

/// On a site just promoted (DR), writes the configuration files of the newest backup received
/// from the peer back before any service of the new tenure starts (once per site epoch; a
/// failed restore is logged and tried again at the next pass).
fn restore_before_workload(
    cluster: &crate::cluster::Cluster,
    store: &spaced_replication::backup::BackupStore,
    seen: &mut Option<u64>,
) {
    let (role, epoch) = cluster.view.read(|f| (f.site.role, f.site.epoch));
    if role != spaced_fabric::SiteRole::Active || *seen == Some(epoch) {
        return;
    }
    match store.on_active(epoch) {
        None => *seen = Some(epoch),
        Some(Ok(b)) => {
            *seen = Some(epoch);
            tracing::warn!(
                files = b.files.len(),
                from = %b.site,
                taken_at = b.taken_at,
                epoch,
                "DR: this site is active: configuration files restored from the peer's newest backup"
            );
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "DR: configuration files not restored; trying again")
        }
    }
}

/// The agent's backend for all placements: VIPs go to the takeover backend, singletons to the
/// supervisor. Losing a singleton's lease kills its process group at once (the fence); a
/// graceful release (move, shutdown) stops it with SIGTERM and the grace period.
pub struct PlacementBackend {
    /// Netlink or loopback takeover.
    vips: Arc<dyn VipBackend>,
    /// Runs the singletons.
    supervisor: Supervisor,
    /// Wakes the services loop when a singleton is acquired, so it starts without waiting a pass.
    wake: Arc<tokio::sync::Notify>,
    /// The fence guard that SIGKILLs a singleton's group at its lease end even if spaced is
    /// stopped or killed, and every service's group when spaced dies; started on first use
    /// (and again if it dies), only when running as the `spaced` binary (a test process cannot
    /// be re-executed as `guard`).
    guard: Option<Arc<GuardCell>>,
    /// The guard generation the services' process groups were last registered with.
    services_guarded_by: std::sync::Mutex<u64>,
    /// Counts singleton leases acquired (each lifts the supervisor's fence on the service).
    /// A lease lost and won back at the same epoch between two passes of the services loop
    /// leaves its desired set unchanged; this tells the loop to hand it to the supervisor
    /// again all the same, since the fence had taken the service out of the supervisor's.
    unfenced: Arc<std::sync::atomic::AtomicU64>,
}

impl PlacementBackend {
    /// A live guard, if this process has one.
    fn guard(&self) -> Option<Arc<crate::takeover::guard::GuardHandle>> {
        match self.guard.as_ref()?.get() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::error!(error = %e, "no fence guard for singletons and services");
                None
            }
        }
    }

    /// Tells the guard something through its cell, which first tells a guard the members it
    /// must report its fence to (without them a guard whose daemon died fences but cannot say
    /// so, and the singleton waits out its lease) and starts a new guard if the last one died.
    fn tell_guard(
        &self,
        op: impl Fn(&crate::takeover::guard::GuardHandle) -> Result<(), GuardError>,
    ) -> Option<Result<(), GuardError>> {
        Some(self.guard.as_ref()?.send(op))
    }

    /// Registers the process groups of the singletons running here with the guard right away
    /// (rather than at the next renewal), each until the end of its lease here.
    pub(crate) fn guard_running(
        &self,
        singletons: &[(String, String)],
        agent: &crate::placement::agent::Agent,
    ) {
        let statuses = self.supervisor.status();
        for (placement, service) in singletons {
            let Some(pgid) = process_group(&statuses, service) else {
                continue;
            };
            let remaining = agent.lease_remaining(placement, Instant::now());
            if remaining.is_zero() {
                continue;
            }
            let Some(epoch) = agent.held_epoch(placement) else {
                continue;
            };
            let until = Instant::now() + remaining;
            let Some(sent) = self.tell_guard(|g| g.hold_group(placement, pgid, epoch, until))
            else {
                return;
            };
            if let Err(e) = sent {
                tracing::error!(singleton = %placement, error = %e, "fence guard unreachable");
            }
        }
    }

    /// Registers the process group of every running service that is not a singleton with the
    /// guard, to be killed when spaced dies, and forgets the ones that stopped. `registered`
    /// (service → process group) is what the guard was last told, so a pass that changes
    /// nothing sends nothing. Guard names are `service/<name>`: a placement name has no `/`.
    pub(crate) fn guard_services(
        &self,
        singletons: &[(String, String)],
        registered: &mut BTreeMap<String, i32>,
    ) {
        let statuses = self.supervisor.status();
        let running: BTreeMap<&str, i32> = statuses
            .iter()
            .filter(|s| !singletons.iter().any(|(_, service)| *service == s.name))
            .filter_map(|s| Some((s.name.as_str(), process_group(&statuses, &s.name)?)))
            .collect();
        if running.is_empty() && registered.is_empty() {
            return;
        }
        if self.guard().is_none() {
            return;
        }
        // A new guard (the last one died) knows nothing: register everything again.
        let generation = self.guard.as_ref().map_or(0, |c| c.generation());
        let mut guarded_by = crate::lock(&self.services_guarded_by);
        if *guarded_by != generation {
            registered.clear();
            *guarded_by = generation;
        }
        drop(guarded_by);
        let mut failure = None;
        let mut note = |sent: Result<(), GuardError>| {
            if let Err(e) = sent {
                failure = Some(e);
            }
        };
        registered.retain(|service, _| {
            let keep = running.contains_key(service.as_str());
            if !keep {
                let name = format!("service/{service}");
                note(self.tell_guard(|g| g.drop_vip(&name)).unwrap_or(Ok(())));
            }
            keep
        });
        for (service, pgid) in running {
            if registered.get(service) != Some(&pgid) {
                let name = format!("service/{service}");
                note(
                    self.tell_guard(|g| g.hold_group_while_spaced_lives(&name, pgid))
                        .unwrap_or(Ok(())),
                );
                registered.insert(service.to_string(), pgid);
            }
        }
        if let Some(e) = failure {
            tracing::error!(error = %e, "fence guard unreachable: what services forked may outlive a killed spaced");
        }
    }

    /// Tells the guard the singleton is no longer held here.
    fn unguard(&self, name: &str) {
        if let Some(g) = self.guard.as_ref().and_then(|c| c.started())
            && let Err(e) = g.drop_vip(name)
        {
            tracing::error!(singleton = %name, error = %e, "fence guard unreachable");
        }
    }
}

impl PlacementBackend {
    /// The fence guard of the singletons and services, when there is one (the root tells it
    /// how to report its fence).
    pub fn guard_cell(&self) -> Option<Arc<GuardCell>> {
        self.guard.clone()
    }

    /// Routes VIPs to `vips` and singletons to `supervisor`; the services' fence guard is
    /// moved into `fence`.
    pub fn new(
        vips: Arc<dyn VipBackend>,
        supervisor: Supervisor,
        wake: Arc<tokio::sync::Notify>,
        fence: crate::ops::config::FenceCgroup,
    ) -> Self {
        let is_spaced = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n == "spaced"))
            .unwrap_or(false);
        if !is_spaced {
            tracing::debug!("not running as spaced: singletons and services have no fence guard");
        }
        PlacementBackend {
            vips,
            supervisor,
            wake,
            guard: is_spaced.then(|| Arc::new(GuardCell::new("singletons and services", fence))),
            services_guarded_by: std::sync::Mutex::new(0),
            unfenced: Arc::default(),
        }
    }
}

/// The process group of a running service: each leads its own, so its pid is the group id.
fn process_group(
    statuses: &[crate::services::supervisor::ServiceStatus],
    service: &str,
) -> Option<i32> {
    statuses
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.pid)
        .and_then(|p| i32::try_from(p).ok())
}

impl VipBackend for PlacementBackend {
    fn check(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        match vip.service {
            None => self.vips.check(vip),
            Some(_) => Box::pin(async { Ok(()) }),
        }
    }

    fn prepare(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        match vip.service {
            None => self.vips.prepare(vip),
            Some(_) => Box::pin(async { Ok(()) }),
        }
    }

    fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        match vip.service {
            None => self.vips.acquire(vip),
            Some(service) => {
                let supervisor = self.supervisor.clone();
                let wake = self.wake.clone();
                let unfenced = self.unfenced.clone();
                Box::pin(async move {
                    supervisor.unfence(&service).await;
                    // Counted once the fence is lifted: a pass that sees the count hands the
                    // supervisor a desired set it now accepts.
                    unfenced.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    wake.notify_one();
                    tracing::info!(singleton = %vip.name, %service, "singleton lease held: starting");
                    Ok(())
                })
            }
        }
    }

    fn announce(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        match vip.service {
            None => self.vips.announce(vip),
            Some(_) => Box::pin(async { Ok(()) }),
        }
    }

    fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        match vip.service {
            None => self.vips.release(vip),
            Some(service) => {
                let supervisor = self.supervisor.clone();
                self.unguard(&vip.name);
                Box::pin(async move {
                    supervisor.kill_now(&service).await;
                    tracing::warn!(singleton = %vip.name, %service, "singleton lease lost: killed");
                    Ok(())
                })
            }
        }
    }

    fn release_gracefully(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        match vip.service {
            None => self.vips.release_gracefully(vip),
            Some(service) => {
                let supervisor = self.supervisor.clone();
                let guard = self.guard.clone();
                let name = vip.name.clone();
                Box::pin(async move {
                    // The guard must not fire at the old deadline during a long graceful stop.
                    if let Some(g) = guard.as_ref().and_then(|c| c.started()) {
                        let _ = g.drop_vip(&name);
                    }
                    // Stop gracefully and fence in one step, so no desired set revives it
                    // without a lease.
                    supervisor.stop_and_fence(&service).await;
                    tracing::info!(singleton = %vip.name, %service, "singleton released");
                    Ok(())
                })
            }
        }
    }

    fn announce_schedule(&self) -> Vec<Duration> {
        self.vips.announce_schedule()
    }

    /// A VIP's address, as the VIP backend finds it (a singleton's process is the
    /// supervisor's to watch). Without this the agent could not tell an address removed
    /// behind its back (its fence guard's deadline passed before a late renewal reached it) and
    /// renewed a lease on a VIP nobody served, for as long as it lived (found by the fault
    /// campaign).
    fn is_up(&self, vip: VipSpec) -> BoxFuture<'static, Option<bool>> {
        match vip.service {
            None => self.vips.is_up(vip),
            Some(_) => Box::pin(async { None }),
        }
    }

    /// The VIPs' fence guard (the `spaced_guard_*` metrics).
    fn guard_state(&self) -> Option<(Option<bool>, u64)> {
        self.vips.guard_state()
    }

    fn hold_until(&self, vip: &VipSpec, epoch: u64, until: Instant) {
        let Some(service) = &vip.service else {
            self.vips.hold_until(vip, epoch, until);
            return;
        };
        let pid = process_group(&self.supervisor.status(), service);
        tracing::debug!(singleton = %vip.name, ?pid, "singleton guarded until the lease end");
        let Some(sent) = self.tell_guard(|g| match pid {
            Some(pgid) => g.hold_group(&vip.name, pgid, epoch, until),
            None => g.drop_vip(&vip.name),
        }) else {
            return;
        };
        if let Err(e) = sent {
            tracing::error!(singleton = %vip.name, error = %e, "fence guard unreachable");
        }
    }
}

/// Whether `spec` may start now: a service bound to a placement (`SPACED_PLACEMENT` set) only
/// while this node holds that placement at the service's epoch with a lease running.
fn lease_lets_start(placements: &Placements, spec: &DesiredService) -> bool {
    let Some(placement) = spec.env.get("SPACED_PLACEMENT").filter(|p| !p.is_empty()) else {
        return true;
    };
    let epoch = spec
        .env
        .get("SPACED_EPOCH")
        .and_then(|e| e.parse::<u64>().ok());
    let agent = placements.agent();
    epoch.is_some()
        && agent.held_epoch(placement) == epoch
        && !agent.lease_remaining(placement, Instant::now()).is_zero()
}

/// Keeps the supervisor's desired set equal to [`desired_services`] until shutdown, then stops
/// every service.
pub async fn services_loop(
    placements: Arc<Placements>,
    backend: Arc<PlacementBackend>,
    supervisor: Supervisor,
    wake: Arc<tokio::sync::Notify>,
    backups: Option<Arc<spaced_replication::backup::BackupStore>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // A service bound to a placement (a singleton, or a VIP's service) starts, or restarts
    // after a crash, only while this node holds that placement's lease at that epoch.
    // Weak: the supervisor is reached from the placements (the agent's backend runs the
    // singletons), and a strong handle here would keep the node (its sockets) alive after it
    // stops. A node on its way out starts nothing.
    let gate_placements = Arc::downgrade(&placements);
    supervisor.set_start_gate(Arc::new(move |spec: &DesiredService| {
        gate_placements
            .upgrade()
            .is_some_and(|p| lease_lets_start(&p, spec))
    }));
    let mut last: Option<Vec<DesiredService>> = None;
    let mut last_unfenced = 0;
    // The site epoch whose configuration restore (DR) has been looked at.
    let mut restore_seen = None;
    let mut guarded = BTreeMap::new();
    let mut giving_up = BTreeSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PASS_EVERY) => {}
            _ = wake.notified() => {}
            // A restarted service has a new process group: the guard learns it now, not at
            // the next pass (a spaced stopped in between would leave a restarted singleton
            // unfenced, running past its lease).
            () = supervisor.started() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        let cluster = &placements.cluster;
        if let Some(store) = &backups {
            restore_before_workload(cluster, store, &mut restore_seen);
        }
        // Read before the desired set: an acquisition after this read is seen at the next pass.
        let unfenced = backend.unfenced.load(std::sync::atomic::Ordering::SeqCst);
        let held = placements.agent().active_epochs();
        let Desired {
            services: desired,
            singletons,
        } = cluster
            .view
            .read(|f| desired_services(f, &cluster.name, &cluster.roles, &held));
        if last.as_ref() != Some(&desired) || unfenced != last_unfenced {
            last_unfenced = unfenced;
            if let Err(e) = supervisor.set_desired(desired.clone()).await {
                tracing::warn!(error = %e, "some services were not accepted by the supervisor");
            }
            // Singletons just started are guarded as soon as they have a pid, not at the next
            // renewal: a spaced stopped in between would leave them running past the lease.
            for _ in 0..50 {
                let statuses = supervisor.status();
                let all_up = singletons.iter().all(|(_, service)| {
                    statuses
                        .iter()
                        .any(|s| &s.name == service && s.pid.is_some())
                });
                if all_up {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last = Some(desired);
        }
        // Every pass: a restarted service has a new process group.
        if !singletons.is_empty() {
            backend.guard_running(&singletons, placements.agent());
        }
        backend.guard_services(&singletons, &mut guarded);
        give_up_failing_singletons(&placements, &supervisor, &singletons, &held, &mut giving_up);
    }
    supervisor.shutdown().await;
}

/// Gives back each singleton held here that this node cannot keep running: stopped and held
/// down here first, then refused in the fabric so the leader tries another node. `giving_up`
/// remembers what was already handed back, so that each (placement, epoch) goes once.
fn give_up_failing_singletons(
    placements: &Arc<Placements>,
    supervisor: &Supervisor,
    singletons: &[(String, String)],
    held: &BTreeMap<String, u64>,
    giving_up: &mut BTreeSet<Held>,
) {
    giving_up.retain(|(name, epoch)| held.get(name) == Some(epoch));
    if singletons.is_empty() {
        return;
    }
    let statuses = supervisor.status();
    for (placement, service) in singletons {
        let Some(&epoch) = held.get(placement) else {
            continue;
        };
        let Some(reason) = statuses
            .iter()
            .find(|s| &s.name == service)
            .and_then(cannot_keep_running)
        else {
            continue;
        };
        if !giving_up.insert((placement.clone(), epoch)) {
            continue;
        }
        tracing::warn!(singleton = %placement, epoch, %reason, "cannot keep the singleton running here; giving it back");
        placements.give_back((placement.clone(), epoch), reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spaced_fabric::{Placement, PlacementKind, ServiceSpec};

    fn roles(r: &[&str]) -> BTreeSet<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    fn fabric() -> Fabric {
        let mut f = Fabric::default();
        let spec = |scope: ServiceScope, r: &[&str]| ServiceSpec {
            command: vec!["/bin/true".into()],
            scope,
            health_check: None,
            roles: roles(r),
        };
        f.services
            .insert("httpd".into(), spec(ServiceScope::EveryNode, &[]));
        f.services
            .insert("jboss".into(), spec(ServiceScope::EveryNode, &["app"]));
        f.services.insert(
            "netmon".into(),
            spec(ServiceScope::Vip("cluster".into()), &[]),
        );
        f.services
            .insert("poller".into(), spec(ServiceScope::Singleton, &["app"]));
        f.placements.insert(
            "poller".into(),
            Placement {
                kind: PlacementKind::Singleton {
                    service: "poller".into(),
                },
                eligible_roles: roles(&["app"]),
                owner: Some(1),
                epoch: 4,
                refused: BTreeMap::new(),
            },
        );
        f
    }

    fn names(d: &[DesiredService]) -> Vec<&str> {
        d.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_singleton_is_given_up_after_enough_failures_in_a_row() {
        let status = |state: ServiceState, failures: u32| {
            let mut s = ServiceStatus::new("poller", state, 0);
            s.failures = failures;
            s.last_error = Some("service poller exited (exit code 3)".into());
            s
        };
        let n = SINGLETON_GIVE_UP_AFTER;
        assert_eq!(
            cannot_keep_running(&status(ServiceState::Backoff, n - 1)),
            None
        );
        assert_eq!(
            cannot_keep_running(&status(ServiceState::FailedToStart, n - 1)),
            None
        );
        // Still failing, but running right now (or starting): not yet.
        assert_eq!(
            cannot_keep_running(&status(ServiceState::Running, n + 5)),
            None
        );
        assert_eq!(
            cannot_keep_running(&status(ServiceState::Starting, n + 5)),
            None
        );
        let why = cannot_keep_running(&status(ServiceState::Backoff, n)).unwrap();
        assert!(
            why.contains(&format!("{n} failures in a row")) && why.contains("exit code 3"),
            "{why}"
        );
        assert!(cannot_keep_running(&status(ServiceState::FailedToStart, n)).is_some());
        let why = cannot_keep_running(&status(ServiceState::Rejected, 0)).unwrap();
        assert!(why.starts_with("rejected"), "{why}");
    }

    #[test]
    fn scopes_decide_where_services_run() {
        let f = fabric();
        let none = BTreeMap::new();
        // A db node holding nothing: only the role-less every-node service.
        assert_eq!(
            names(&desired_services(&f, "n3", &roles(&["db"]), &none).services),
            ["httpd"]
        );
        // An app node holding nothing.
        assert_eq!(
            names(&desired_services(&f, "n2", &roles(&["app"]), &none).services),
            ["httpd", "jboss"]
        );
        // The VIP owner runs the VIP-bound service; the singleton's holder runs the singleton.
        let held = BTreeMap::from([("cluster".to_string(), 7), ("poller".to_string(), 4)]);
        let all = desired_services(&f, "n1", &roles(&["app", "ha"]), &held);
        assert_eq!(
            all.singletons,
            [("poller".to_string(), "poller".to_string())]
        );
        let d = all.services;
        assert_eq!(names(&d), ["httpd", "jboss", "netmon", "poller"]);
        let env = |name: &str| d.iter().find(|s| s.name == name).unwrap().env.clone();
        assert_eq!(env("netmon")["SPACED_EPOCH"], "7");
        assert_eq!(env("netmon")["SPACED_PLACEMENT"], "cluster");
        assert_eq!(env("poller")["SPACED_EPOCH"], "4");
        assert_eq!(env("poller")["SPACED_NODE"], "n1");
        assert_eq!(env("httpd")["SPACED_EPOCH"], "0");
    }

    #[test]
    fn a_standby_site_runs_no_every_node_service() {
        let mut f = fabric();
        f.site.role = spaced_fabric::SiteRole::Standby;
        let none = BTreeMap::new();
        assert!(
            desired_services(&f, "n2", &roles(&["app"]), &none)
                .services
                .is_empty()
        );
    }
}
