//! The balancer on the cluster VIP: bound before takeover, accepting only while this node holds the VIP, backends from the fabric.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spaced_fabric::{AdminState, Fabric, PlacementKind, vip_ip};
use spaced_lb::backend::BackendSpec;
use spaced_lb::balancer::{Balancer, bind_listeners, conns_within_fd_limit};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::report::{LbBackendRow, LbListenerRow};
use crate::ops::config::{LbPort, LbSection};
use crate::placement::agent::Agent;
use spaced_raft::store::FabricView;

/// The service acts when the VIPs up on this node change or the fabric applies entries (it
/// is told; it does not poll). While a bind is failing (the previous listener still
/// closing), it retries this often at first, backing off to [`IDLE_LOOK`].
const RETRY: Duration = Duration::from_millis(20);

/// Without news, it still looks this often (a safety net, not the way it learns of changes).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// Listen backlog: connections queued while the service notices a takeover.
const BACKLOG: i32 = 4096;

/// The node's balancers, one per configured port, all following one VIP.
pub struct LbService {
    /// The VIP the balancers follow (a reload cannot change it).
    vip: String,
    /// The VIP's address (from the node's `[[vip]]` entry).
    vip_ip: IpAddr,
    /// Bind with `IP_FREEBIND` ahead of takeover (netlink mode); in loopback
    /// mode every node shares 127/8, so a listener is bound only while active.
    prebind: bool,
    /// The node's open-files limit, which caps each port's `max_conns`.
    fd_limit: Option<u64>,
    /// The section in force and its balancers; a reload replaces both.
    ports: std::sync::RwLock<Ports>,
    /// Bumped by every reload, so `run` looks at once.
    reloaded: watch::Sender<u64>,
    /// What keeps it from serving as configured, as of the last pass (for `lb status`).
    problems: std::sync::Mutex<Vec<String>>,
}

/// The `[lb]` section in force and one balancer per port, in `section.ports` order.
struct Ports {
    section: LbSection,
    balancers: Vec<(LbPort, Arc<Balancer>)>,
}

impl LbService {
    /// Builds the balancers; nothing is bound until `run` starts. With the
    /// node's open-files limit known, each port's `max_conns` is lowered (with
    /// a warning) to its share of half that limit; the other half is kept for
    /// devices, Raft and admin connections.
    pub fn new(
        section: &LbSection,
        vip_ip: IpAddr,
        prebind: bool,
        fd_limit: Option<u64>,
    ) -> Arc<Self> {
        let config = capped_config(section, fd_limit);
        let balancers = section
            .ports
            .iter()
            .map(|port| {
                let label = SocketAddr::new(vip_ip, port.listen).to_string();
                (*port, Balancer::new(label, config.clone()))
            })
            .collect();
        Arc::new(LbService {
            vip: section.vip.clone(),
            vip_ip,
            prebind,
            fd_limit,
            ports: std::sync::RwLock::new(Ports {
                section: section.clone(),
                balancers,
            }),
            reloaded: watch::Sender::new(0),
            problems: std::sync::Mutex::default(),
        })
    }

    fn ports(&self) -> std::sync::RwLockReadGuard<'_, Ports> {
        self.ports
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a changed `[lb]` section while running (SIGHUP), without dropping a connection:
    /// a port kept keeps its balancer (its open connections, counters and backends' health)
    /// and takes the new settings for the connections it accepts from now on; a new port gets
    /// a balancer that listens once this node holds the VIP; a removed port stops accepting
    /// and its connections drain (`drain_grace_s`). The backends follow `backend_role` and the
    /// ports' `backend` at once. `threads` applies when a port's listeners are next bound (the
    /// VIP moves here again, or a new port). Returns one line per change; a changed `vip` is
    /// refused (it needs a restart) and nothing is applied.
    pub fn reconfigure(&self, section: &LbSection) -> Result<Vec<String>, String> {
        if section.vip != self.vip {
            return Err(format!(
                "lb.vip: changed from {:?} to {:?}; the balancer keeps following {:?} until spaced restarts (nothing else in [lb] was applied)",
                self.vip, section.vip, self.vip
            ));
        }
        let config = capped_config(section, self.fd_limit);
        let mut lines = Vec::new();
        {
            let mut ports = self
                .ports
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ports.section == *section {
                return Ok(lines);
            }
            let changed = changed_keys(&ports.section, section);
            let mut balancers = Vec::new();
            for port in &section.ports {
                let kept = ports
                    .balancers
                    .iter()
                    .find(|(p, _)| p.listen == port.listen)
                    .map(|(_, b)| b.clone());
                let balancer = match kept {
                    Some(b) => {
                        b.reconfigure(config.clone());
                        b
                    }
                    None => {
                        lines.push(format!("lb: port {} added", port.listen));
                        let label = SocketAddr::new(self.vip_ip, port.listen).to_string();
                        Balancer::new(label, config.clone())
                    }
                };
                balancers.push((*port, balancer));
            }
            for (old, _) in &ports.balancers {
                if !section.ports.iter().any(|p| p.listen == old.listen) {
                    lines.push(format!(
                        "lb: port {} removed; its open connections drain",
                        old.listen
                    ));
                }
            }
            if !changed.is_empty() {
                lines.insert(
                    0,
                    format!(
                        "lb: applied ({}); open connections kept",
                        changed.join(", ")
                    ),
                );
            }
            *ports = Ports {
                section: section.clone(),
                balancers,
            };
        }
        self.reloaded.send_modify(|n| *n += 1);
        Ok(lines)
    }

    /// What keeps the balancer from serving as configured (see [`LbReport::problems`]).
    ///
    /// [`LbReport::problems`]: super::report::LbReport::problems
    pub fn problems(&self) -> Vec<String> {
        crate::lock(&self.problems).clone()
    }

    fn set_problems(&self, problems: Vec<String>) {
        *crate::lock(&self.problems) = problems;
    }

    /// The balancers, for metrics and status.
    pub fn balancers(&self) -> Vec<Arc<Balancer>> {
        self.ports()
            .balancers
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// The VIP the balancers follow.
    pub fn vip(&self) -> &str {
        &self.vip
    }

    /// Each port's state and counters, for `spacectl lb status`.
    pub fn report(&self) -> Vec<LbListenerRow> {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        self.balancers()
            .iter()
            .map(|b| {
                let s = b.stats();
                LbListenerRow {
                    listen: b.label().to_string(),
                    accepting: b.is_accepting(),
                    active: load(&s.active),
                    total: load(&s.accepted),
                    refused: load(&s.refused_limit),
                    no_backend: load(&s.no_backend),
                    relay_errors: load(&s.relay_errors),
                    bytes_in: load(&s.spliced.client_to_backend)
                        + load(&s.copied.client_to_backend),
                    bytes_out: load(&s.spliced.backend_to_client)
                        + load(&s.copied.backend_to_client),
                    backends: b
                        .backends()
                        .snapshot()
                        .iter()
                        .map(|be| LbBackendRow {
                            name: be.name().to_string(),
                            addr: be.spec.addr.to_string(),
                            up: be.is_up(),
                            active: be.active(),
                            total: be.total(),
                            connect_errors: be.connect_errors(),
                            transitions: be.transitions(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Prometheus text for all ports.
    pub fn render(&self, out: &mut String) {
        let balancers = self.balancers();
        let rendered: Vec<_> = balancers.iter().map(|b| b.rendered()).collect();
        spaced_lb::stats::render_prometheus(&rendered, out);
    }
}

/// The balancer settings of `section`, `max_conns` lowered to each port's share of half the
/// open-files limit.
fn capped_config(section: &LbSection, fd_limit: Option<u64>) -> spaced_lb::balancer::LbConfig {
    let mut config = section.balancer_config();
    if let Some(limit) = fd_limit {
        let ports = section.ports.len().max(1) as u64;
        let fit = (conns_within_fd_limit(limit, limit / 2) / ports).max(1);
        config.cap_max_conns(
            fit,
            "lb.max_conns",
            &format!("each port's share of half the open-files limit ({limit})"),
        );
    }
    config
}

/// The `[lb]` keys whose values differ, as `key` (`ports` for any change of the port list).
fn changed_keys(old: &LbSection, new: &LbSection) -> Vec<String> {
    let table = |s: &LbSection| match toml::Value::try_from(s) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::map::Map::new(),
    };
    let (old, new) = (table(old), table(new));
    new.iter()
        .filter(|(k, v)| old.get(k.as_str()) != Some(v))
        .map(|(k, _)| format!("lb.{k}"))
        .collect()
}

/// The backends the fabric names for `port`: active nodes with the backend
/// role, at their management IP (or their Raft address's IP).
pub fn fabric_backends(fabric: &Fabric, role: &str, port: u16) -> Vec<BackendSpec> {
    fabric
        .nodes
        .values()
        .filter(|n| n.admin_state == AdminState::Active && n.roles.contains(role))
        .filter_map(|n| {
            let ip = n
                .mgmt_ip
                .or_else(|| n.raft_addr.parse::<SocketAddr>().ok().map(|a| a.ip()))?;
            Some(BackendSpec {
                name: n.name.clone(),
                addr: SocketAddr::new(ip, port),
            })
        })
        .collect()
}

/// Whether the balancer may serve while this node holds its VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipCheck {
    /// The fabric's address for the VIP is the one this node's config gave.
    Agrees,
    /// The fabric has no VIP of that name (yet: it is registered at start).
    Missing,
    /// The fabric's VIP differs from this node's `[[vip]]` (the fabric's wins for the VIP
    /// itself, so a listener on the config's address would be unreachable); the reason.
    Differs(String),
}

/// Checks the `[lb]` VIP named `vip`, whose address this node's config says is `config_ip`,
/// against the fabric.
pub fn check_vip(fabric: &Fabric, vip: &str, config_ip: IpAddr) -> VipCheck {
    match fabric.placements.get(vip).map(|p| &p.kind) {
        Some(PlacementKind::Vip { address, .. }) => match vip_ip(address) {
            Some(ip) if ip == config_ip => VipCheck::Agrees,
            _ => VipCheck::Differs(format!(
                "the fabric's VIP {vip:?} is {address}, but this node's [[vip]] says {config_ip}"
            )),
        },
        Some(_) => VipCheck::Differs(format!("{vip:?} in the fabric is not a VIP")),
        None => VipCheck::Missing,
    }
}

/// Bind failures by port, each logged when it first happens and again only when it changes,
/// with retries backing off from [`RETRY`] to [`IDLE_LOOK`] while any persists.
#[derive(Default)]
struct BindFailures {
    /// Port → the last error.
    by_port: BTreeMap<u16, String>,
    /// The next retry's delay.
    backoff: Option<Duration>,
}

impl BindFailures {
    /// Records a failure to bind `addr`; logs it if it is new for that port.
    fn failed(&mut self, addr: SocketAddr, vip: &str, holding: bool, error: &std::io::Error) {
        let text = error.to_string();
        if self.by_port.get(&addr.port()) != Some(&text) {
            if holding {
                tracing::error!(%vip, %addr, error = %text, "balancer cannot listen; retrying");
            } else {
                tracing::warn!(%vip, %addr, error = %text, "balancer cannot bind ahead of takeover; retrying");
            }
        }
        self.by_port.insert(addr.port(), text);
    }

    /// One line per failing port, for `lb status`.
    fn describe(&self, vip_ip: IpAddr) -> impl Iterator<Item = String> + '_ {
        self.by_port.iter().map(move |(port, error)| {
            format!("cannot bind {}: {error}", SocketAddr::new(vip_ip, *port))
        })
    }

    /// `port` is bound now, or needs no binding.
    fn clear(&mut self, port: u16) {
        if self.by_port.remove(&port).is_some() && self.by_port.is_empty() {
            self.backoff = None;
        }
    }

    /// How long until the next pass: backing off while binds fail, `RETRY` when a bind is
    /// merely pending (a previous listener closing), else `IDLE_LOOK`.
    fn next_wait(&mut self, pending: bool) -> Duration {
        if self.by_port.is_empty() {
            self.backoff = None;
            return if pending { RETRY } else { IDLE_LOOK };
        }
        let wait = self.backoff.unwrap_or(RETRY);
        self.backoff = Some((wait * 2).min(IDLE_LOOK));
        wait
    }
}

/// One port's listener state.
enum PortState {
    /// Not holding the VIP; maybe listeners bound ahead of takeover (one per thread).
    Standby(Option<Vec<std::net::TcpListener>>),
    /// Accepting; the sender stops every `serve` loop of the port, which then drain in the
    /// background.
    Active(watch::Sender<bool>),
}

impl PortState {
    /// Stops accepting (listeners closed); an active port's connections drain.
    fn stop(self) {
        if let PortState::Active(stop) = self {
            let _ = stop.send(true);
        }
    }
}

/// Follows VIP ownership, the fabric and reloads until shutdown, then drains.
pub async fn run(
    view: FabricView,
    vips: Arc<Agent>,
    service: Arc<LbService>,
    mut shutdown: watch::Receiver<bool>,
) {
    // By listen port: the balancer the state belongs to and the state.
    let mut states: BTreeMap<u16, (Arc<Balancer>, PortState)> = BTreeMap::new();
    let mut draining: Vec<JoinHandle<()>> = Vec::new();
    let mut last_backends: Option<Vec<Vec<BackendSpec>>> = None;
    let mut binds = BindFailures::default();
    let mut last_check = VipCheck::Missing;
    let mut vips_changed = vips.changes();
    let mut fabric_changed = view.changes();
    let mut reloaded = service.reloaded.subscribe();
    let vip = service.vip.clone();
    // The first pass runs at once.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Ok(()) = vips_changed.changed() => {}
            Ok(()) = fabric_changed.changed() => {}
            Ok(()) = reloaded.changed() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        // Mark each as seen: this pass reads the current state of all.
        vips_changed.borrow_and_update();
        fabric_changed.borrow_and_update();
        reloaded.borrow_and_update();
        draining.retain(|h| !h.is_finished());

        let (section, ports) = {
            let p = service.ports();
            (p.section.clone(), p.balancers.clone())
        };
        // Ports a reload removed (or gave a new balancer) stop; their connections drain.
        states.retain(|listen, (balancer, state)| {
            let kept = ports
                .iter()
                .any(|(p, b)| p.listen == *listen && Arc::ptr_eq(b, balancer));
            if !kept {
                std::mem::replace(state, PortState::Standby(None)).stop();
                binds.clear(*listen);
                tracing::info!(%vip, port = listen, "balancer port removed by a reload");
            }
            kept
        });
        for (port, balancer) in &ports {
            states
                .entry(port.listen)
                .or_insert_with(|| (balancer.clone(), PortState::Standby(None)));
        }

        let backends: Vec<Vec<BackendSpec>> = view.read(|f| {
            ports
                .iter()
                .map(|(port, _)| fabric_backends(f, &section.backend_role, port.backend))
                .collect()
        });
        if last_backends.as_ref() != Some(&backends) {
            for ((_, balancer), specs) in ports.iter().zip(&backends) {
                balancer.set_backends(specs);
            }
            last_backends = Some(backends);
        }

        let check = view.read(|f| check_vip(f, &vip, service.vip_ip));
        if check != last_check {
            match &check {
                VipCheck::Missing => {
                    tracing::info!(%vip, "the fabric has no VIP of this name yet; the balancer waits")
                }
                VipCheck::Differs(problem) => {
                    tracing::error!(%vip, "{problem}; the balancer does not serve until they agree")
                }
                VipCheck::Agrees if last_check != VipCheck::Missing => {
                    tracing::info!(%vip, addr = %service.vip_ip, "the fabric's VIP agrees with this node's config again")
                }
                VipCheck::Agrees => {}
            }
            last_check = check.clone();
        }
        let holding = check == VipCheck::Agrees && vips.active_names().iter().any(|n| n == &vip);
        let threads = section.threads.max(1);
        for (listen, (balancer, state)) in states.iter_mut() {
            let addr = SocketAddr::new(service.vip_ip, *listen);
            match (holding, &mut *state) {
                (true, PortState::Standby(bound)) => {
                    let listeners = match bound.take() {
                        Some(l) => Ok(l),
                        None => bind_listeners(addr, service.prebind, BACKLOG, threads),
                    };
                    match listeners {
                        Ok(listeners) => {
                            binds.clear(*listen);
                            let (stop_tx, stop_rx) = watch::channel(false);
                            for listener in listeners {
                                let balancer = balancer.clone();
                                let mut stop = stop_rx.clone();
                                draining.push(tokio::spawn(async move {
                                    match TcpListener::from_std(listener) {
                                        Ok(listener) => {
                                            balancer
                                                .serve(listener, async move {
                                                    let _ = stop.wait_for(|s| *s).await;
                                                })
                                                .await
                                        }
                                        Err(error) => {
                                            tracing::error!(lb = %balancer.label(), %error, "cannot register a balancer listener")
                                        }
                                    }
                                }));
                            }
                            tracing::info!(%vip, %addr, threads, "balancer active");
                            *state = PortState::Active(stop_tx);
                        }
                        Err(error) => binds.failed(addr, &vip, true, &error),
                    }
                }
                (false, PortState::Active(_)) => {
                    std::mem::replace(state, PortState::Standby(None)).stop();
                    tracing::info!(%vip, %addr, "VIP lost; balancer draining");
                }
                (false, PortState::Standby(bound)) if bound.is_none() && service.prebind => {
                    // The previous listener may still be closing: then the next tries succeed.
                    match bind_listeners(addr, true, BACKLOG, threads) {
                        Ok(listeners) => {
                            *bound = Some(listeners);
                            binds.clear(*listen);
                        }
                        Err(error) => binds.failed(addr, &vip, false, &error),
                    }
                }
                (false, PortState::Standby(_)) => binds.clear(*listen),
                _ => {}
            }
        }
        let pending = service.prebind
            && states
                .values()
                .any(|(_, s)| matches!(s, PortState::Standby(None)));
        wait = binds.next_wait(pending);
        let mut problems: Vec<String> = Vec::new();
        if let VipCheck::Differs(why) = &check {
            problems.push(format!("{why}: not serving until they agree"));
        }
        problems.extend(binds.describe(service.vip_ip));
        service.set_problems(problems);
    }
    for (_, (_, state)) in states {
        state.stop();
    }
    for handle in draining {
        let _ = handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spaced_fabric::NodeRecord;

    fn node(
        name: &str,
        raft: &str,
        mgmt: Option<&str>,
        roles: &[&str],
        state: AdminState,
    ) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            raft_addr: raft.into(),
            mgmt_ip: mgmt.map(|m| m.parse().unwrap()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            admin_state: state,
            joined_at: 0,
            version: String::new(),
        }
    }

    #[test]
    fn the_balancer_serves_only_when_the_fabrics_vip_is_the_configured_one() {
        use spaced_fabric::Command;
        let mut f = Fabric::default();
        let ip: IpAddr = "10.0.0.100".parse().unwrap();
        assert_eq!(check_vip(&f, "cluster", ip), VipCheck::Missing);
        f.apply(&Command::RegisterNode {
            id: 1,
            name: "n1".into(),
            raft_addr: "10.0.0.1:7000".into(),
            mgmt_ip: None,
            roles: ["ha".to_string()].into(),
            at: 0,
        })
        .unwrap();
        for (name, address) in [("cluster", "10.0.0.100/24"), ("other", "10.0.0.101/24")] {
            f.apply(&Command::AddPlacement {
                name: name.into(),
                kind: PlacementKind::Vip {
                    address: address.into(),
                    interface: "eth0".into(),
                },
                eligible_roles: ["ha".to_string()].into(),
            })
            .unwrap();
        }
        assert_eq!(check_vip(&f, "cluster", ip), VipCheck::Agrees);
        // Another node registered "other" first, at .101: this node's config says .100.
        let VipCheck::Differs(why) = check_vip(&f, "other", ip) else {
            panic!("a different address must not agree");
        };
        assert!(
            why.contains("10.0.0.101/24") && why.contains("10.0.0.100"),
            "{why}"
        );
    }

    #[test]
    fn bind_failures_back_off_and_clear() {
        let mut b = BindFailures::default();
        assert_eq!(b.next_wait(false), IDLE_LOOK);
        assert_eq!(b.next_wait(true), RETRY);
        let addr: SocketAddr = "10.0.0.100:80".parse().unwrap();
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        b.failed(addr, "cluster", false, &denied);
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait(true)).collect();
        assert_eq!(waits[0], RETRY);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), IDLE_LOOK);
        // Bound (or no longer needed): back to the quick pace at once.
        b.clear(80);
        assert_eq!(b.next_wait(true), RETRY);
        b.failed(addr, "cluster", true, &denied);
        assert_eq!(b.next_wait(false), RETRY);
    }

    #[test]
    fn backends_are_active_app_nodes_at_their_management_ip() {
        let mut f = Fabric::default();
        f.nodes.insert(
            1,
            node(
                "n1",
                "10.0.0.1:7000",
                None,
                &["ha", "app"],
                AdminState::Active,
            ),
        );
        f.nodes.insert(
            2,
            node(
                "n2",
                "10.0.0.2:7000",
                Some("192.168.0.2"),
                &["app"],
                AdminState::Active,
            ),
        );
        f.nodes.insert(
            3,
            node("n3", "10.0.0.3:7000", None, &["app"], AdminState::Draining),
        );
        f.nodes.insert(
            4,
            node("n4", "10.0.0.4:7000", None, &["db"], AdminState::Active),
        );
        f.nodes.insert(
            5,
            node(
                "n5",
                "node5.example:7000",
                None,
                &["app"],
                AdminState::Active,
            ),
        );
        let got = fabric_backends(&f, "app", 8080);
        assert_eq!(
            got,
            vec![
                BackendSpec {
                    name: "n1".into(),
                    addr: "10.0.0.1:8080".parse().unwrap()
                },
                BackendSpec {
                    name: "n2".into(),
                    addr: "192.168.0.2:8080".parse().unwrap()
                },
            ]
        );
    }
}
