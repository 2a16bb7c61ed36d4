//! The composition root: [`Node::start`] builds every subsystem in one place, hands each only
//! the handles it uses, spawns its tasks, and stops them in order. Nothing but the binaries,
//! the demo's tests and the benchmarks import it.
//!
//! * [`peer`] — the QUIC endpoint's accept loop (Raft or admin, by certificate and ALPN) and
//!   the node RPCs peers call (renewals, silence, proposals, release, VIP checks, forwarded
//!   admin requests).
//! * [`registration`] — the node's own record in the fabric (bootstrap, management IP).
//! * [`observe`] — `/metrics` and `/healthz`.

mod dr;
mod error;
mod guard_report;
mod observe;
mod peer;
mod registration;
mod restore;
mod tls;

pub use guard_report::report_fenced;

pub use error::StartError;
pub use restore::{RestoreError, restore};
use tls::{load_tls, quic_configs};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::SnapshotPolicy;
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::Command;
use spaced_raft::network::QuicNetwork;
use spaced_raft::store::{self, FabricView};
use spaced_raft::{Member, NodeId, Outcome, Raft};
use spaced_replication::backup::BackupStore;
use spaced_replication::site_lease::SiteGate;
use tokio::sync::watch;

use crate::admin::server::AdminServer;
use crate::cluster::{Cluster, LeaderTenure, ProposeError};
use crate::devices::agent::DeviceAgent;
use crate::ops::config::{NodeConfig, TakeoverMode};
use crate::ops::metrics::NodeMetrics;
use crate::placement::Placements;
use crate::placement::agent::{Agent, LoopbackBackend, VipBackend};
use crate::placement::lease::LeaseConfig;
use crate::services::desired::PlacementBackend;
use crate::services::supervisor::{Supervisor, SupervisorConfig};
use crate::takeover::guard::GuardCell;

/// A running node.
pub struct Node {
    /// The config it started with (a reload compares against it).
    config: NodeConfig,
    /// The revoked serials its verifiers refuse (kept when certificates are reloaded).
    revoked: spaced_raft::pki::Revoked,
    /// The cluster handle the subsystems share.
    cluster: Cluster,
    /// The node's Prometheus metrics (the certificate's expiry is set again on a reload).
    metrics: Arc<NodeMetrics>,
    /// Placements: handed over first on shutdown.
    placements: Arc<Placements>,
    /// The supervisor: every service stopped before the node goes.
    supervisor: Supervisor,
    /// The device agent (its counts for tests).
    devices: Arc<DeviceAgent>,
    /// The QUIC endpoint, closed last.
    endpoint: quinn::Endpoint,
    /// Bound QUIC address.
    listen: SocketAddr,
    /// Signals every task to stop.
    shutdown_tx: watch::Sender<bool>,
    /// Background tasks to await on shutdown.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The balancer's task, awaited (not aborted) on shutdown so open connections drain.
    lb_task: Option<tokio::task::JoinHandle<()>>,
    /// The balancer service, which a reload reconfigures.
    lb: Option<Arc<crate::lb::service::LbService>>,
    /// Started with `--bootstrap`: a member as soon as Raft has applied its initialisation.
    bootstrapped: bool,
    /// `spacectl node reload` requests, until the binary takes them.
    reloads: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::admin::server::ReloadAsk>>>,
}

/// The VIP agent's backend for the configured takeover mode; checks the config's VIPs
/// against the host (interface present, address inside its subnet, capabilities) first, and
/// removes what a predecessor killed with its guard left up of any VIP (this node holds none
/// yet).
/// Also returns the backend's fence guard, when it has one.
async fn vip_backend(
    cfg: &NodeConfig,
    fabric_vips: &[(String, String, String)],
) -> Result<(Arc<dyn VipBackend>, Option<Arc<GuardCell>>), StartError> {
    Ok(match cfg.takeover {
        TakeoverMode::Loopback => {
            let ports = cfg
                .vips
                .iter()
                .filter_map(|v| v.port.map(|p| (v.name.clone(), p)))
                .collect();
            (
                Arc::new(LoopbackBackend::new(cfg.name.clone(), ports)),
                None,
            )
        }
        TakeoverMode::Netlink => {
            let backend = crate::takeover::backend::NetlinkBackend::new(cfg.fence_cgroup())
                .await
                .map_err(|e| StartError::system(format!("takeover: {e}")))?;
            check_vips(cfg, &backend).await?;
            for v in &cfg.vips {
                // This node holds nothing yet: an address of a VIP up here now was left by a
                // predecessor killed with its guard, and must not answer for whoever holds it.
                match backend.remove_leftover(&v.address, &v.interface).await {
                    Ok(true) => {
                        tracing::warn!(vip = %v.name, address = %v.address, interface = %v.interface, "removed the VIP's address left over from a previous run")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        return Err(StartError::system(format!(
                            "cannot remove the leftover address of VIP {} ({}): {e}",
                            v.name, v.address
                        )));
                    }
                }
            }
            for (name, address, interface) in fabric_vips {
                if cfg.vips.iter().any(|v| &v.name == name) {
                    continue;
                }
                // Not this node's to check: an interface it lacks holds nothing to remove.
                if let Ok(true) = backend.remove_leftover(address, interface).await {
                    tracing::warn!(vip = %name, %address, %interface, "removed the VIP's address left over from a previous run");
                }
            }
            let guard = backend.guard_cell();
            (Arc::new(backend), Some(guard))
        }
    })
}

/// The config's VIPs checked against the host: capabilities, then each VIP's interface and
/// subnet.
async fn check_vips(
    cfg: &NodeConfig,
    backend: &crate::takeover::backend::NetlinkBackend,
) -> Result<(), StartError> {
    if !cfg.vips.is_empty() {
        crate::takeover::check_capabilities().map_err(|e| {
            StartError::input(cfg, "vip", format!("this node cannot hold VIPs: {e}"))
        })?;
    }
    for (i, v) in cfg.vips.iter().enumerate() {
        backend
            .check(&v.address, &v.interface)
            .await
            .map_err(|e| StartError::input(cfg, &format!("vip[{i}]"), e))?;
    }
    Ok(())
}

/// Unix seconds now.
fn now_unix() -> i64 {
    (crate::now_millis() / 1000) as i64
}

/// What the fence guards need to report their fence when spaced dies: this node's id and key
/// files, and the members as Raft has them now.
/// Every second, tells the fence guards the members again if they changed (a guard that
/// holds nothing is told nothing otherwise, and could not say its daemon died).
async fn refresh_guard_members(
    guards: Vec<Arc<crate::takeover::guard::GuardCell>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for g in &guards {
            g.refresh_members();
        }
    }
}

fn guard_reporting(cfg: &NodeConfig, cluster: &Cluster) -> crate::takeover::guard::Reporting {
    let c = cluster.clone();
    crate::takeover::guard::Reporting {
        identity: crate::takeover::report::Identity {
            node: cfg.node_id,
            ca: cfg.tls.ca.clone(),
            cert: cfg.tls.cert.clone(),
            key: cfg.tls.key.clone(),
        },
        members: Arc::new(move || {
            c.membership()
                .membership()
                .nodes()
                .map(|(id, m)| crate::takeover::report::Peer {
                    id: *id,
                    name: m.name.clone(),
                    addr: m.addr.clone(),
                })
                .collect()
        }),
    }
}

/// Every check `spaced run` makes of its config and host before it changes anything, without
/// starting (`spaced check`): keys and certificate, data dir (and its data format, unless a
/// running node holds it), the QUIC and metrics ports, and each VIP's interface, subnet and
/// the capabilities to hold it. `Ok` lists what was checked, one line each; `Err` is the
/// first problem, as `spaced run` would report it.
pub async fn check(cfg: &NodeConfig) -> Result<Vec<String>, StartError> {
    let mut done = Vec::new();
    let tls = load_tls(cfg)?;
    done.push(format!(
        "tls: {} under the CA in {}",
        tls.identity(),
        cfg.tls.ca.display()
    ));
    let dir = &cfg.data_dir;
    if dir.join("db").exists() {
        match store::open(dir) {
            Ok(_) => done.push(format!(
                "data_dir: {} holds dir format {} (data format {})",
                dir.display(),
                store::DIR_FORMAT,
                store::DATA_FORMAT
            )),
            Err(store::StoreError::Locked { .. }) => done.push(format!(
                "data_dir: {} is in use by a running spaced (not checked further)",
                dir.display()
            )),
            Err(e) => return Err(StartError::input(cfg, "data_dir", e)),
        }
    } else {
        let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
        nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK).map_err(|e| {
            StartError::input(
                cfg,
                "data_dir",
                format!(
                    "{}: cannot create it: {} is not writable: {e}",
                    dir.display(),
                    existing.display()
                ),
            )
        })?;
        done.push(format!("data_dir: {} will be created", dir.display()));
    }
    std::net::UdpSocket::bind(cfg.listen).map_err(|e| {
        StartError::input(
            cfg,
            "listen",
            format!("cannot bind UDP {}: {e}", cfg.listen),
        )
    })?;
    done.push(format!("listen: UDP {} is free", cfg.listen));
    if let Some(m) = cfg.metrics {
        std::net::TcpListener::bind(m)
            .map_err(|e| StartError::input(cfg, "metrics", format!("cannot bind TCP {m}: {e}")))?;
        done.push(format!("metrics: TCP {m} is free"));
    }
    match cfg.takeover {
        TakeoverMode::Netlink if !cfg.vips.is_empty() => {
            let backend = crate::takeover::backend::NetlinkBackend::new(cfg.fence_cgroup())
                .await
                .map_err(|e| StartError::system(format!("takeover: {e}")))?;
            check_vips(cfg, &backend).await?;
            for v in &cfg.vips {
                done.push(format!(
                    "vip {}: {} can be held on {}",
                    v.name, v.address, v.interface
                ));
            }
        }
        _ => done.push(format!(
            "vips: {} (no host check in this takeover mode)",
            cfg.vips.len()
        )),
    }
    Ok(done)
}

impl Node {
    /// Starts a node from its config. With `bootstrap`, initialises a one-node cluster on an empty data dir.
    pub async fn start(cfg: NodeConfig, bootstrap: bool) -> Result<Node, StartError> {
        let roles: BTreeSet<String> = cfg.roles.iter().cloned().collect();
        let tls = load_tls(&cfg)?;

        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            StartError::input(&cfg, "data_dir", format!("{}: {e}", cfg.data_dir.display()))
        })?;
        let (log_store, sm_store) =
            store::open(&cfg.data_dir).map_err(|e| StartError::input(&cfg, "data_dir", e))?;
        let empty =
            store::is_empty(&log_store).map_err(|e| StartError::input(&cfg, "data_dir", e))?;
        if bootstrap && !empty {
            return Err(StartError::input(
                &cfg,
                "data_dir",
                format!(
                    "--bootstrap refused: {} already holds Raft state (restart without --bootstrap to resume)",
                    cfg.data_dir.display()
                ),
            ));
        }
        let view = sm_store.view();

        let (server_cfg, client_cfg) = quic_configs(&tls)?;
        let endpoint = spaced_raft::udp::endpoint(cfg.listen, Some(server_cfg)).map_err(|e| {
            StartError::input(
                &cfg,
                "listen",
                format!("cannot bind UDP {}: {e}", cfg.listen),
            )
        })?;
        let listen = endpoint.local_addr().map_err(StartError::system)?;
        let advertise = cfg.advertise.unwrap_or(listen);

        let revoked = tls.revoked().clone();
        // An append of entries waits for the follower's fsync: it may take as long as a
        // follower waits for its leader before it stands for election.
        let mut network = QuicNetwork::new(cfg.node_id, endpoint.clone(), client_cfg)
            .with_revoked(revoked.clone())
            .with_append_timeout(Duration::from_millis(cfg.raft.election_timeout_max_ms));
        // A dial that goes unanswered has the host ask for the peer's link-layer address again
        // (docs/architecture.md, Transport and identity).
        match crate::takeover::neighbours::NeighbourProbe::new() {
            Ok(probe) => network = network.with_path_probe(probe.into_path_probe()),
            Err(error) => tracing::warn!(
                %error,
                "no netlink socket: a peer's address left unresolved after a partition is asked \
                 for again only on the kernel's timer"
            ),
        }
        let raft_config = openraft::Config {
            cluster_name: "spaced".into(),
            heartbeat_interval: cfg.raft.heartbeat_interval_ms,
            election_timeout_min: cfg.raft.election_timeout_min_ms,
            election_timeout_max: cfg.raft.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_after_logs),
            max_in_snapshot_log_to_keep: cfg.raft.logs_kept_after_snapshot,
            install_snapshot_timeout: 10_000,
            // A node cut off by a partition must not raise the term and depose a healthy leader when it returns.
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::input(&cfg, "raft", e))?;
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(raft_config),
            network.clone(),
            log_store,
            sm_store,
        )
        .await
        .map_err(|e| StartError::system(format!("raft: {e}")))?;

        let metrics = Arc::new(NodeMetrics::new());
        let recorder = metrics.recorder();
        let fd_limit = match crate::raise_fd_limit() {
            Ok(limit) => Some(limit),
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-files limit; fewer devices can be held");
                None
            }
        };
        let lb = match &cfg.lb {
            Some(section) => {
                let vip_ip = cfg
                    .vips
                    .iter()
                    .find(|v| v.name == section.vip)
                    .and_then(|v| spaced_fabric::vip_ip(&v.address))
                    .ok_or_else(|| {
                        StartError::input(
                            &cfg,
                            "lb.vip",
                            "no [[vip]] with a usable address of that name",
                        )
                    })?;
                let prebind = cfg.takeover == crate::ops::config::TakeoverMode::Netlink;
                Some(crate::lb::service::LbService::new(
                    section, vip_ip, prebind, fd_limit,
                ))
            }
            None => None,
        };
        let devices = DeviceAgent::new(cfg.node_id, &cfg.devices).map_err(|e| {
            let addr = cfg
                .devices
                .listen
                .map(|a| a.to_string())
                .unwrap_or_default();
            StartError::input(
                &cfg,
                "devices.listen",
                format!("cannot bind TCP {addr}: {e}"),
            )
        })?;
        let devices = Arc::new(devices);
        let cluster = Cluster::new(
            cfg.node_id,
            cfg.name.clone(),
            roles,
            advertise,
            raft.clone(),
            view,
            network,
            metrics.commit_latency_histogram(),
        );

        // Placements, services and the takeover backend, wired through the agent's backend.
        let lease = LeaseConfig {
            duration: Duration::from_millis(cfg.lease.duration_ms),
            renew_every: Duration::from_millis(cfg.lease.renew_every_ms),
            margin: Duration::from_millis(cfg.lease.margin_ms),
            drift: cfg.lease.drift,
        };
        // VIPs added at run time are in the fabric, not the config: their leftovers go too.
        let fabric_vips: Vec<(String, String, String)> = cluster.view.read(|f| {
            f.placements
                .iter()
                .filter_map(|(name, p)| match &p.kind {
                    spaced_fabric::PlacementKind::Vip { address, interface } => {
                        Some((name.clone(), address.clone(), interface.clone()))
                    }
                    spaced_fabric::PlacementKind::Singleton { .. } => None,
                })
                .collect()
        });
        let (takeover, vip_guard) = vip_backend(&cfg, &fabric_vips).await?;
        let supervisor = Supervisor::start_with_recorder(
            SupervisorConfig {
                log_limits: (&cfg.services).into(),
                ..SupervisorConfig::new(cfg.data_dir.join("service-logs"))
            },
            recorder,
        )
        .map_err(|e| StartError::input(&cfg, "data_dir", format!("service supervisor: {e}")))?;
        let services_wake = Arc::new(tokio::sync::Notify::new());
        let placement_backend = Arc::new(PlacementBackend::new(
            takeover,
            supervisor.clone(),
            services_wake.clone(),
            cfg.fence_cgroup(),
        ));
        // Both fence guards report their fence as this node when spaced dies.
        let reporting = guard_reporting(&cfg, &cluster);
        for cell in vip_guard
            .iter()
            .chain(placement_backend.guard_cell().iter())
        {
            cell.set_reporting(reporting.clone());
            // Started now rather than at the first takeover: starting a guard process costs
            // 10-20 ms, which a failover onto this node would otherwise wait for.
            if let Err(e) = cell.get() {
                tracing::warn!(error = %e, "fence guard not started; trying again at the first takeover");
            }
        }
        let agent = Agent::new(cfg.node_id, lease.clone(), placement_backend.clone());
        agent
            .set_refresh((cfg.garp_refresh_s > 0).then(|| Duration::from_secs(cfg.garp_refresh_s)));
        let site_gate = Arc::new(match &cfg.dr {
            Some(section) => SiteGate::new(!section.witnesses.is_empty()),
            None => SiteGate::open(),
        });
        let placements = Placements::new(
            cluster.clone(),
            lease,
            Arc::new(agent),
            placement_backend.clone(),
            site_gate.clone(),
        );
        let device_lost_after = devices.settings().lost_after;
        let backups = cfg.dr.as_ref().map(|d| {
            Arc::new(BackupStore::new(
                cfg.data_dir.join("dr-backups"),
                d.backup.max_count,
            ))
        });
        let watchdog = match (&cfg.dr, &backups) {
            (Some(section), Some(backups)) => Some(dr::watchdog(
                &cfg,
                section,
                &tls,
                &cluster,
                placements.lease.reassign_after(),
                backups.clone(),
            )?),
            _ => None,
        };
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let admin = AdminServer::new(
            cluster.clone(),
            placements.clone(),
            supervisor.clone(),
            lb.clone(),
            device_lost_after,
            tls.clone(),
            watchdog.clone(),
            cfg.data_dir.clone(),
            reload_tx,
        );

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let events = Arc::new(crate::ops::events::Events::default());
        if let Some(addr) = cfg.metrics {
            let mut rx = shutdown_rx.clone();
            let state: Arc<dyn crate::ops::http::HttpState> = Arc::new(observe::HttpView::new(
                cluster.clone(),
                metrics.clone(),
                lb.clone(),
                admin.clone(),
                events.clone(),
            ));
            let (_, h) = crate::ops::http::serve(addr, state, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| StartError::input(&cfg, "metrics", e))?;
            tasks.push(h);
        }

        let stop = || shutdown_rx.clone();
        let guards: Vec<_> = vip_guard
            .iter()
            .chain(placement_backend.guard_cell().iter())
            .cloned()
            .collect();
        tasks.push(tokio::spawn(refresh_guard_members(guards, stop())));
        tasks.push(tokio::spawn(LeaderTenure::track(cluster.clone(), stop())));
        tasks.push(tokio::spawn(placements.clone().agent_loop(stop())));
        tasks.push(tokio::spawn(placements.clone().controller_loop(stop())));
        tasks.push(tokio::spawn(
            placements.clone().register_config_vips(cfg.vips.clone()),
        ));
        if let Some(w) = &watchdog {
            tasks.push(tokio::spawn(w.clone().run(stop())));
            if site_gate.has_witnesses() {
                tasks.push(tokio::spawn(dr::follow_site_hold(
                    cluster.clone(),
                    w.clone(),
                    site_gate.clone(),
                    stop(),
                )));
            }
        }
        tasks.push(tokio::spawn(registration::record_mgmt_ip(
            cluster.clone(),
            cfg.mgmt_ip,
            stop(),
        )));
        tasks.push(tokio::spawn(registration::record_version(
            cluster.clone(),
            stop(),
        )));
        tasks.push(tokio::spawn(registration::follow_format(
            cluster.clone(),
            stop(),
        )));
        let hooks = Arc::new(peer::Hooks::new(
            placements.clone(),
            admin.clone(),
            watchdog.clone(),
        ));
        tasks.push(tokio::spawn(peer::accept_loop(
            endpoint.clone(),
            cluster.clone(),
            hooks,
            admin,
            revoked.clone(),
            stop(),
        )));
        tasks.push(tokio::spawn(peer::follow_revocations(
            cluster.clone(),
            revoked,
            stop(),
        )));
        if let Some(not_after) = tls.not_after() {
            metrics.cert_expires(not_after, now_unix());
        }
        tasks.push(tokio::spawn(observe::metrics_loop(
            cluster.clone(),
            metrics.clone(),
            placements.agent().clone(),
            events.clone(),
            watchdog.clone(),
            site_gate.clone(),
            stop(),
        )));
        tasks.push(tokio::spawn(crate::ops::stall::probe(
            metrics.clone(),
            stop(),
        )));
        tasks.push(tokio::spawn(fence_on_raft_failure(
            cluster.clone(),
            placements.clone(),
            devices.clone(),
            stop(),
        )));
        tasks.push(tokio::spawn(crate::services::desired::services_loop(
            placements.clone(),
            placement_backend,
            supervisor.clone(),
            services_wake,
            backups,
            stop(),
        )));
        tasks.push(tokio::spawn(crate::devices::agent::run(
            cluster.clone(),
            devices.clone(),
            stop(),
        )));
        tasks.push(tokio::spawn(crate::devices::leader::planner_loop(
            cluster.clone(),
            device_lost_after,
            stop(),
        )));
        let lb_service = lb.clone();
        let lb_task = lb.map(|service| {
            tokio::spawn(crate::lb::service::run(
                cluster.view.clone(),
                placements.agent().clone(),
                service,
                stop(),
            ))
        });

        if bootstrap {
            let me = Member {
                name: cfg.name.clone(),
                addr: advertise.to_string(),
            };
            raft.initialize(BTreeMap::from([(cfg.node_id, me)]))
                .await
                .map_err(|e| StartError::system(format!("bootstrap: {e}")))?;
            tasks.push(tokio::spawn(registration::register_self(cluster.clone())));
        }
        tracing::info!(node = cfg.node_id, name = %cfg.name, %listen, bootstrap, "node started");
        Ok(Node {
            config: cfg,
            revoked: tls.revoked().clone(),
            cluster,
            metrics,
            placements,
            supervisor,
            devices,
            endpoint,
            listen,
            shutdown_tx,
            tasks,
            lb_task,
            lb: lb_service,
            bootstrapped: bootstrap,
            reloads: std::sync::Mutex::new(Some(reload_rx)),
        })
    }

    /// The `spacectl node reload` requests this node receives, once (the binary takes them
    /// and answers each as it handles SIGHUP; nobody else reloads a config file).
    pub fn reload_requests(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<crate::admin::server::ReloadAsk>> {
        crate::lock(&self.reloads).take()
    }

    /// Applies what can change while running from `cfg` (the config file read again, on
    /// SIGHUP): the node's certificate and key (rotation: new connections use them, open
    /// ones keep theirs), the VIP announcements (`garp_refresh_s`) and the balancer's `[lb]`
    /// section (open connections kept; see
    /// [`LbService::reconfigure`]). Every other key takes effect at the next start.
    ///
    /// [`LbService::reconfigure`]: crate::lb::service::LbService::reconfigure Returns one line
    /// per change: what was applied, and each key that changed but needs a restart. The log
    /// level is the binary's to apply (`log_level`).
    pub fn reload(&self, cfg: &NodeConfig) -> Result<Vec<String>, StartError> {
        let mut report = Vec::new();
        let tls = load_tls(cfg)?.with_revoked(self.revoked.clone());
        let (server, client) = quic_configs(&tls)?;
        self.endpoint.set_server_config(Some(server));
        self.cluster.network.set_client_config(client);
        if let Some(not_after) = tls.not_after() {
            self.metrics.cert_expires(not_after, now_unix());
        }
        report.push(format!(
            "tls: certificate and key reloaded ({}, serial {})",
            tls.identity(),
            tls.serial().unwrap_or_else(|e| e.to_string())
        ));
        let old = &self.config;
        if old.garp_refresh_s != cfg.garp_refresh_s {
            let every = (cfg.garp_refresh_s > 0).then(|| Duration::from_secs(cfg.garp_refresh_s));
            self.placements.agent().set_refresh(every);
            report.push(match every {
                Some(e) => format!(
                    "garp_refresh_s: applied (held VIPs announced again every {} s)",
                    e.as_secs()
                ),
                None => "garp_refresh_s: applied (no announcements after the first burst)".into(),
            });
        }
        match (&self.lb, &cfg.lb) {
            (Some(service), Some(section)) => match service.reconfigure(section) {
                Ok(lines) => report.extend(lines),
                Err(line) => report.push(line),
            },
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => report
                .push("lb: section added or removed; takes effect when spaced restarts".into()),
        }
        let restart_keys: [(&str, bool); 18] = [
            ("node_id", old.node_id != cfg.node_id),
            ("name", old.name != cfg.name),
            ("data_dir", old.data_dir != cfg.data_dir),
            ("listen", old.listen != cfg.listen),
            ("advertise", old.advertise != cfg.advertise),
            ("mgmt_ip", old.mgmt_ip != cfg.mgmt_ip),
            ("metrics", old.metrics != cfg.metrics),
            ("roles", old.roles != cfg.roles),
            ("tls.ca", old.tls.ca != cfg.tls.ca),
            ("raft", old.raft != cfg.raft),
            ("lease", old.lease != cfg.lease),
            ("takeover", old.takeover != cfg.takeover),
            ("fence_cgroup", old.fence_cgroup != cfg.fence_cgroup),
            ("nice", old.nice != cfg.nice),
            ("vip", old.vips != cfg.vips),
            ("devices", old.devices != cfg.devices),
            ("services", old.services != cfg.services),
            ("dr", old.dr != cfg.dr),
        ];
        for (key, changed) in restart_keys {
            if changed {
                report.push(format!("{key}: changed; takes effect when spaced restarts"));
            }
        }
        Ok(report)
    }

    /// Resolves once the node is ready to be counted on, with a status line for the service
    /// manager: a member that knows its cluster's leader and has applied the log it had when it
    /// learned of it; or, at once, a node no cluster has added yet (it waits for `node add`).
    pub async fn ready(&self) -> String {
        let mut caught_up_to: Option<u64> = None;
        let mut metrics = self.cluster.raft.metrics();
        loop {
            let m = metrics.borrow_watched().clone();
            let member = m
                .membership_config
                .membership()
                .get_node(&self.cluster.id)
                .is_some();
            if !member && !self.bootstrapped {
                return "waiting to be added to a cluster (spacectl node add)".into();
            }
            if member && let Some(leader) = m.current_leader {
                let target = *caught_up_to.get_or_insert(m.last_log_index.unwrap_or(0));
                let applied = m.last_applied.map(|l| l.index()).unwrap_or(0);
                if applied >= target {
                    return format!(
                        "member of a cluster led by node {leader}, applied up to {applied}"
                    );
                }
            }
            // Looked at again when Raft's metrics change; a Raft that stopped is never ready.
            if metrics.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether Raft still runs (it stops for good on a storage failure): what the service
    /// manager's watchdog is fed on.
    pub fn raft_running(&self) -> bool {
        self.cluster
            .raft
            .metrics()
            .borrow_watched()
            .running_state
            .is_ok()
    }

    /// The Raft handle (tests and the demo watch its metrics).
    pub fn raft(&self) -> &Raft {
        &self.cluster.raft
    }

    /// Read access to the applied fabric.
    pub fn fabric(&self) -> &FabricView {
        &self.cluster.view
    }

    /// The bound QUIC address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address other nodes and spacectl dial: `advertise`, else the bound address.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.cluster.advertise
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cluster.id
    }

    /// Where devices in device-initiated mode connect to this node, if it listens.
    pub fn device_listen_addr(&self) -> Option<SocketAddr> {
        self.devices.listen_addr()
    }

    /// Devices this node holds a connection task for (connected or still trying).
    pub fn held_devices(&self) -> usize {
        self.devices.held_count()
    }

    /// Proposes a command through this node (must be leader) and records commit latency.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        self.cluster.propose(cmd).await
    }

    /// A cloneable handle for proposing commands from many tasks.
    pub fn proposer(&self) -> Proposer {
        Proposer {
            cluster: self.cluster.clone(),
        }
    }

    /// Stops serving, shuts Raft down and waits for the tasks.
    pub async fn shutdown(self) {
        // Hand VIPs over first (fence, release, let the leader re-grant), then leadership.
        self.placements.hand_over().await;
        let _ = self.shutdown_tx.send(true);
        // Every service stopped (SIGTERM, grace, SIGKILL) before the node goes.
        self.supervisor.shutdown().await;
        if let Some(lb) = self.lb_task {
            // Bounded by the drain grace: open connections finish or are cut.
            let _ = lb.await;
        }
        let _ = self.cluster.raft.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutdown");
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        self.endpoint.wait_idle().await;
    }

    /// Stops at once, as close to a crash as one process allows: no hand-over of VIPs or
    /// leadership, no goodbye to the leader; device connections and QUIC just drop. Peers notice
    /// only by silence. For failover tests and benchmarks.
    pub async fn crash(self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks.into_iter().chain(self.lb_task) {
            t.abort();
            let _ = t.await;
        }
        let _ = self.cluster.raft.shutdown().await;
        self.endpoint.close(0u32.into(), b"crash");
    }
}

/// Fences everything once Raft stops on a fatal error (a store that cannot write: a full or
/// failing disk). Such a node no longer follows the fabric, so it must not keep VIPs,
/// singletons or device connections it can no longer be told to give up; it says why, and
/// `/healthz` reports it. It is not restarted: the operator frees the disk and restarts it.
async fn fence_on_raft_failure(
    cluster: Cluster,
    placements: Arc<Placements>,
    devices: Arc<DeviceAgent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut metrics = cluster.raft.metrics();
    loop {
        if let Some(why) = cluster.raft_failure() {
            tracing::error!(error = %why, "raft stopped: fencing every VIP and singleton and closing every device connection");
            let fenced = placements.agent().stop().await;
            devices.stop_all();
            tracing::error!(
                fenced = fenced.len(),
                "fenced after a raft failure; free the data dir's disk and restart this node"
            );
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                return;
            },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Proposes commands through one node (benchmarks, tests).
#[derive(Clone)]
pub struct Proposer {
    cluster: Cluster,
}

impl Proposer {
    /// Proposes `cmd` (this node must lead); returns the applied outcome.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        self.cluster.propose(cmd).await
    }
}
