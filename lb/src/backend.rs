//! The balancer's backends: their live state (health, connections) and the choice of one per connection.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::maglev::{Maglev, hash_ip};

/// How a connection's backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each new connection goes to the next healthy backend in turn (the model's default).
    #[default]
    RoundRobin,
    /// The healthy backend with the fewest active connections; ties go round-robin.
    LeastConn,
    /// HTTP session stickiness: a `JSESSIONID` whose route suffix names a healthy
    /// backend goes there; anything else round-robin.
    Sticky,
    /// Source-address affinity through a Maglev consistent-hash table over the healthy backends.
    Source,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rr" | "roundrobin" | "round-robin" => Ok(Policy::RoundRobin),
            "leastconn" | "least-conn" => Ok(Policy::LeastConn),
            "sticky" | "jsessionid" => Ok(Policy::Sticky),
            "source" | "maglev" => Ok(Policy::Source),
            other => Err(format!(
                "unknown balancing policy {other:?} (expected rr, leastconn, sticky or source)"
            )),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "rr",
            Policy::LeastConn => "leastconn",
            Policy::Sticky => "sticky",
            Policy::Source => "source",
        })
    }
}

/// A backend as configured: a name (the session route that selects it) and an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    /// Route name: a `JSESSIONID` ending in `.<name>` sticks to this backend.
    pub name: String,
    /// Where connections go.
    pub addr: SocketAddr,
}

impl std::str::FromStr for BackendSpec {
    type Err = String;
    /// `NAME=ADDR` or just `ADDR` (then the name is the address).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, addr) = match s.split_once('=') {
            Some((name, addr)) => (name.trim(), addr.trim()),
            None => (s.trim(), s.trim()),
        };
        if name.is_empty() {
            return Err(format!("backend {s:?}: empty name before '='"));
        }
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("backend {s:?}: {addr:?} is not an IP:port address ({e})"))?;
        if addr.port() == 0 {
            return Err(format!(
                "backend {s:?}: port 0 is not a usable backend port"
            ));
        }
        Ok(BackendSpec {
            name: name.to_string(),
            addr,
        })
    }
}

/// One backend's live state, shared by the connections using it and its health checker.
#[derive(Debug)]
pub struct Backend {
    /// Name and address.
    pub spec: BackendSpec,
    /// Whether the health checker currently considers it up; down backends get no new connections.
    up: AtomicBool,
    /// Connections currently relayed to it (least-connections and metrics).
    active: AtomicU64,
    /// Connections ever relayed to it.
    total: AtomicU64,
    /// Failed connection attempts from the data path (each one was redispatched).
    connect_errors: AtomicU64,
    /// Failed connection attempts from the data path since the last one that succeeded.
    error_streak: AtomicU32,
    /// Health-check transitions (up→down and down→up), for metrics.
    transitions: AtomicU64,
    /// Set once the backend left the configured set, so its health checker stops.
    retired: AtomicBool,
    /// Bumped by every health checker started on it; an older checker seeing a newer number
    /// stops (a backend re-added while its old checker still runs gets only one).
    checkers: AtomicU64,
}

impl Backend {
    fn new(spec: BackendSpec) -> Self {
        Backend {
            spec,
            up: AtomicBool::new(true),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            error_streak: AtomicU32::new(0),
            transitions: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            checkers: AtomicU64::new(0),
        }
    }

    /// Route name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether it takes new connections.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Connections relayed to it right now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections ever relayed to it.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Failed data-path connection attempts.
    pub fn connect_errors(&self) -> u64 {
        self.connect_errors.load(Ordering::Relaxed)
    }

    /// Up/down transitions seen by the health checker.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// Whether it has been removed from the set.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Registers a new health checker; it runs while [`Self::checker_current`] says so.
    pub(crate) fn start_checker(&self) -> u64 {
        self.checkers.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether checker `me` should go on: the backend is in the set and no newer checker started.
    pub(crate) fn checker_current(&self, me: u64) -> bool {
        !self.is_retired() && self.checkers.load(Ordering::Relaxed) == me
    }

    /// Counts a failed connect on live traffic; returns how many failed in a row now.
    pub(crate) fn count_connect_error(&self) -> u32 {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        self.error_streak.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A connect on live traffic succeeded: the streak of failures ends.
    pub(crate) fn count_connected(&self) {
        if self.error_streak.load(Ordering::Relaxed) != 0 {
            self.error_streak.store(0, Ordering::Relaxed);
        }
    }

    /// Marks one connection as using this backend until the guard drops,
    /// from the moment it is assigned (before its connect completes), so
    /// that leastconn sees connections still connecting: a burst spreads.
    pub(crate) fn claim(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Holds one active connection on a backend; decrements on drop, however the connection ended.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    /// The backend accepted the connection: it counts in the backend's total.
    pub(crate) fn connected(&self) {
        self.0.total.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the health checker does with one probe result: the rise/fall rule
/// (a down backend needs `rise` successes in a row to come up, an up one
/// `fall` failures in a row to go down). Pure, so it is tested without sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCounter {
    /// Current verdict.
    pub up: bool,
    /// Consecutive probe results that disagree with `up`.
    streak: u32,
}

impl HealthCounter {
    /// Starts in `up` state with no evidence either way.
    pub fn new(up: bool) -> Self {
        HealthCounter { up, streak: 0 }
    }

    /// Feeds one probe result; returns the new verdict if it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise }.max(1);
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// Cached Maglev table, rebuilt when the set of up backends changes.
#[derive(Debug)]
struct SourceTable {
    /// Indices (into the backend list of `generation`) the table's entries refer to.
    members: Vec<usize>,
    /// Lookup table over `members`.
    maglev: Maglev,
    /// The backend-set generation and up-set the table was built for.
    built_for: (u64, Vec<bool>),
}

/// The backend set of one balancer: replaced as a whole when the
/// configuration or the fabric changes, while connections keep the
/// `Arc<Backend>` they were given, so an update never drops a connection.
#[derive(Debug, Default)]
pub struct Backends {
    /// Current backends, sorted by name (a stable order for round-robin and Maglev).
    list: RwLock<Arc<Vec<Arc<Backend>>>>,
    /// Bumped on every set change, so cached tables notice.
    generation: AtomicU64,
    /// Round-robin position.
    cursor: AtomicUsize,
    /// Maglev table for [`Policy::Source`].
    source: Mutex<Option<SourceTable>>,
    /// Removed backends that still carry connections: one added again is revived from here,
    /// so its open connections count for leastconn and in its metrics.
    retiring: Mutex<Vec<Arc<Backend>>>,
}

impl Backends {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current backends, in name order.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Backend>>> {
        match self.list.read() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the set with `specs`. A backend with an unchanged name and
    /// address keeps its state (health, active connections); removed ones are
    /// retired; added ones start up (the first failed checks take them down),
    /// except one removed earlier whose connections are still open: it comes
    /// back with its state and its connections. Returns the backends that are
    /// (back) in the set now, for the caller to start health checks on.
    pub fn update(&self, specs: &[BackendSpec]) -> Vec<Arc<Backend>> {
        let wanted: BTreeSet<&BackendSpec> = specs.iter().collect();
        let mut list = match self.list.write() {
            Ok(list) => list,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut retiring = crate::lock(&self.retiring);
        retiring.retain(|b| b.active() > 0);
        let mut next = Vec::with_capacity(wanted.len());
        let mut added = Vec::new();
        for spec in &wanted {
            if let Some(existing) = list.iter().find(|b| &&b.spec == spec) {
                next.push(existing.clone());
                continue;
            }
            let backend = match retiring.iter().position(|b| &&b.spec == spec) {
                Some(i) => {
                    let revived = retiring.swap_remove(i);
                    revived.retired.store(false, Ordering::Relaxed);
                    revived
                }
                None => Arc::new(Backend::new((*spec).clone())),
            };
            added.push(backend.clone());
            next.push(backend);
        }
        for old in list.iter() {
            if !wanted.contains(&old.spec) {
                old.retired.store(true, Ordering::Relaxed);
                if old.active() > 0 {
                    retiring.push(old.clone());
                }
            }
        }
        drop(retiring);
        *list = Arc::new(next);
        self.generation.fetch_add(1, Ordering::Relaxed);
        added
    }

    /// Records a health verdict change for `backend`.
    pub(crate) fn set_up(&self, backend: &Backend, up: bool) {
        if backend.up.swap(up, Ordering::Relaxed) != up {
            backend.transitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Chooses a backend for a new connection, skipping those in `tried`
    /// (already failed for this connection). `route` is the session route
    /// from the peeked request, `client` the client's address. Returns
    /// `None` when no up backend is left.
    pub fn choose(
        &self,
        policy: Policy,
        route: Option<&str>,
        client: IpAddr,
        tried: &[Arc<Backend>],
    ) -> Option<Arc<Backend>> {
        let list = self.snapshot();
        let usable = |b: &Arc<Backend>| b.is_up() && !tried.iter().any(|t| Arc::ptr_eq(t, b));
        match policy {
            Policy::RoundRobin => self.round_robin(&list, usable),
            Policy::LeastConn => self.least_conn(&list, usable),
            Policy::Sticky => route
                .and_then(|r| list.iter().find(|b| b.name() == r && usable(b)).cloned())
                .or_else(|| self.round_robin(&list, usable)),
            Policy::Source => self
                .by_source(&list, client)
                .filter(|b| usable(b))
                .or_else(|| self.round_robin(&list, usable)),
        }
    }

    /// The list once around, starting one further than last time, so choices rotate.
    fn rotation<'a>(&self, list: &'a [Arc<Backend>]) -> impl Iterator<Item = &'a Arc<Backend>> {
        let n = list.len();
        let start = if n == 0 {
            0
        } else {
            self.cursor.fetch_add(1, Ordering::Relaxed)
        };
        (0..n).map(move |i| &list[(start + i) % n])
    }

    /// Turns taken over the usable backends only, so they share evenly while others are down
    /// (rotating over the whole list and skipping a down backend would hand its turns to the
    /// one after it: 1/3 and 2/3 between two survivors of three).
    fn round_robin(
        &self,
        list: &[Arc<Backend>],
        usable: impl Fn(&Arc<Backend>) -> bool,
    ) -> Option<Arc<Backend>> {
        let count = list.iter().filter(|b| usable(b)).count();
        if count == 0 {
            return None;
        }
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed) % count;
        list.iter()
            .filter(|b| usable(b))
            .nth(turn)
            // A backend went down between the two looks: any usable one.
            .or_else(|| list.iter().find(|b| usable(b)))
            .cloned()
    }

    /// Fewest active connections; the rotating start spreads equal loads instead of piling
    /// them on the first backend.
    fn least_conn(
        &self,
        list: &[Arc<Backend>],
        usable: impl Fn(&Arc<Backend>) -> bool,
    ) -> Option<Arc<Backend>> {
        self.rotation(list)
            .filter(|b| usable(b))
            .min_by_key(|b| b.active())
            .cloned()
    }

    /// The Maglev choice among the up backends, rebuilding the table if the up-set changed.
    fn by_source(&self, list: &[Arc<Backend>], client: IpAddr) -> Option<Arc<Backend>> {
        let generation = self.generation.load(Ordering::Relaxed);
        let ups: Vec<bool> = list.iter().map(|b| b.is_up()).collect();
        let mut cache = crate::lock(&self.source);
        let stale = cache
            .as_ref()
            .is_none_or(|t| t.built_for.0 != generation || t.built_for.1 != ups);
        if stale {
            let members: Vec<usize> = (0..list.len()).filter(|&i| ups[i]).collect();
            let names: Vec<&str> = members.iter().map(|&i| list[i].name()).collect();
            match Maglev::new(&names, Maglev::DEFAULT_SIZE) {
                Ok(maglev) => {
                    *cache = Some(SourceTable {
                        members,
                        maglev,
                        built_for: (generation, ups),
                    })
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot build the source-affinity table; using round-robin");
                    *cache = None;
                    return None;
                }
            }
        }
        let table = cache.as_ref()?;
        let slot = table.maglev.lookup(hash_ip(client))?;
        let index = *table.members.get(slot)?;
        list.get(index).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn specs(names: &[&str]) -> Vec<BackendSpec> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| BackendSpec {
                name: n.to_string(),
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            })
            .collect()
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn pick(b: &Backends, p: Policy, route: Option<&str>, c: IpAddr) -> Option<String> {
        b.choose(p, route, c, &[]).map(|b| b.name().to_string())
    }

    #[test]
    fn backend_spec_parses_and_names_bad_input() {
        let s: BackendSpec = "n2=127.0.0.1:8080".parse().unwrap();
        assert_eq!(s.name, "n2");
        let s: BackendSpec = "10.0.0.1:80".parse().unwrap();
        assert_eq!(s.name, "10.0.0.1:80");
        for bad in ["n2=nowhere", "=1.2.3.4:5", "1.2.3.4", "1.2.3.4:0"] {
            let err = bad.parse::<BackendSpec>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        assert!("bogus".parse::<Policy>().unwrap_err().contains("bogus"));
        for p in ["rr", "leastconn", "sticky", "source"] {
            assert_eq!(p.parse::<Policy>().unwrap().to_string(), p);
        }
    }

    #[test]
    fn round_robin_is_even_and_skips_down_backends() {
        let b = Backends::new();
        b.update(&specs(&["n1", "n2", "n3"]));
        let mut counts = BTreeMap::<String, u32>::new();
        for i in 0..300 {
            *counts
                .entry(pick(&b, Policy::RoundRobin, None, client(i)).unwrap())
                .or_default() += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![100; 3]);

        let n2 = b.snapshot()[1].clone();
        b.set_up(&n2, false);
        let mut counts = BTreeMap::<String, u32>::new();
        for i in 0..30 {
            let chosen = pick(&b, Policy::RoundRobin, None, client(i)).unwrap();
            assert_ne!(chosen, "n2");
            *counts.entry(chosen).or_default() += 1;
        }
        // The survivors share evenly; the down backend's turns do not all go to its successor.
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![15, 15]);
        for backend in b.snapshot().iter() {
            b.set_up(backend, false);
        }
        assert_eq!(pick(&b, Policy::RoundRobin, None, client(0)), None);
    }

    #[test]
    fn least_conn_prefers_the_idlest_up_backend() {
        let b = Backends::new();
        b.update(&specs(&["n1", "n2", "n3"]));
        let list = b.snapshot();
        let _g1 = list[0].claim();
        let _g2 = list[0].claim();
        let _g3 = list[2].claim();
        for i in 0..10 {
            assert_eq!(pick(&b, Policy::LeastConn, None, client(i)).unwrap(), "n2");
        }
        b.set_up(&list[1], false);
        for i in 0..10 {
            assert_eq!(pick(&b, Policy::LeastConn, None, client(i)).unwrap(), "n3");
        }
        drop(_g3);
        assert_eq!(list[2].active(), 0);
    }

    #[test]
    fn sticky_route_wins_while_up_and_falls_back_when_down() {
        let b = Backends::new();
        b.update(&specs(&["n1", "n2", "n3"]));
        for i in 0..20 {
            assert_eq!(
                pick(&b, Policy::Sticky, Some("n2"), client(i)).unwrap(),
                "n2"
            );
        }
        b.set_up(&b.snapshot()[1], false);
        for i in 0..20 {
            let got = pick(&b, Policy::Sticky, Some("n2"), client(i)).unwrap();
            assert_ne!(got, "n2");
        }
        // Unknown route: normal round-robin over all three names' up members.
        let got = pick(&b, Policy::Sticky, Some("n9"), client(0)).unwrap();
        assert!(got == "n1" || got == "n3");
    }

    #[test]
    fn source_affinity_is_stable_and_moves_only_the_lost_backends_clients() {
        let b = Backends::new();
        b.update(&specs(&["n1", "n2", "n3"]));
        let before: Vec<String> = (0..3000)
            .map(|i| pick(&b, Policy::Source, None, client(i)).unwrap())
            .collect();
        let again: Vec<String> = (0..3000)
            .map(|i| pick(&b, Policy::Source, None, client(i)).unwrap())
            .collect();
        assert_eq!(before, again, "same client, same backend");
        for name in ["n1", "n2", "n3"] {
            let share = before.iter().filter(|n| *n == name).count();
            assert!((800..=1200).contains(&share), "{name}: {share} of 3000");
        }
        b.set_up(&b.snapshot()[2], false);
        let after: Vec<String> = (0..3000)
            .map(|i| pick(&b, Policy::Source, None, client(i)).unwrap())
            .collect();
        for (was, now) in before.iter().zip(&after) {
            assert_ne!(now, "n3");
            if was != "n3" {
                assert_eq!(was, now, "a client of a surviving backend must not move");
            }
        }
    }

    #[test]
    fn a_backend_added_again_while_its_connections_are_open_comes_back_with_them() {
        let b = Backends::new();
        b.update(&specs(&["n1", "n2"]));
        let n1 = b.snapshot()[0].clone();
        let guard = n1.claim();
        // n1 leaves (drained) and comes back while its connection is open.
        b.update(&specs(&["n1", "n2"])[1..]);
        assert!(n1.is_retired());
        let added = b.update(&specs(&["n1", "n2"]));
        assert_eq!(added.len(), 1);
        assert!(
            Arc::ptr_eq(&added[0], &n1),
            "a fresh n1 forgets its connection"
        );
        assert!(!n1.is_retired());
        assert_eq!(n1.active(), 1);
        // So leastconn still sees it: n2 (no connection) is chosen.
        let any: IpAddr = "192.0.2.1".parse().unwrap();
        let chosen = b.choose(Policy::LeastConn, None, any, &[]).unwrap();
        assert_eq!(chosen.name(), "n2");
        // Without open connections a removed backend is gone for good: re-added, it is new.
        drop(guard);
        b.update(&specs(&["n1", "n2"])[1..]);
        b.update(&specs(&["n2"]));
        let added = b.update(&specs(&["n1", "n2"]));
        assert!(!Arc::ptr_eq(&added[0], &n1));
        // A backend's older health checker gives way to a newer one (a revived backend gets one).
        let fresh = &added[0];
        let old = fresh.start_checker();
        assert!(fresh.checker_current(old));
        let new = fresh.start_checker();
        assert!(!fresh.checker_current(old) && fresh.checker_current(new));
    }

    #[test]
    fn update_keeps_state_of_unchanged_backends_and_retires_removed_ones() {
        let b = Backends::new();
        let added = b.update(&specs(&["n1", "n2"]));
        assert_eq!(added.len(), 2);
        let n1 = b.snapshot()[0].clone();
        let guard = n1.claim();
        let n2 = b.snapshot()[1].clone();
        let added = b.update(&specs(&["n1", "n3"])[..1]);
        assert!(added.is_empty());
        assert!(Arc::ptr_eq(&b.snapshot()[0], &n1));
        assert_eq!(n1.active(), 1);
        assert!(n2.is_retired());
        drop(guard);
        assert_eq!(n1.active(), 0);
    }

    #[test]
    fn tried_backends_are_skipped() {
        let b = Backends::new();
        b.update(&specs(&["n1", "n2"]));
        let list = b.snapshot();
        for policy in [
            Policy::RoundRobin,
            Policy::LeastConn,
            Policy::Sticky,
            Policy::Source,
        ] {
            let got = b.choose(policy, Some("n1"), client(7), &[list[0].clone()]);
            assert_eq!(got.unwrap().name(), "n2", "{policy}");
            assert!(b.choose(policy, None, client(7), &list).is_none());
        }
    }

    #[test]
    fn health_counter_follows_rise_and_fall() {
        let mut h = HealthCounter::new(true);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None, "a success resets the streak");
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(false));
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), Some(true));
        assert!(h.up);
        let mut zero = HealthCounter::new(true);
        assert_eq!(zero.observe(false, 0, 0), Some(false), "0 acts as 1");
    }
}
