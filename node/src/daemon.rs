//! One running spaced node: Raft over QUIC, the admin API, metrics, and an orderly shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use spaced_fabric::Command;
use spaced_raft::network::{NodeDescription, QuicNetwork, RaftReply, RaftRpc, RaftService};
use spaced_raft::pki::{self, ALPN_ADMIN, ALPN_RAFT, Identity, TlsMaterial, TlsPaths};
use spaced_raft::store::{self, FabricView};
use spaced_raft::types::StoredMembership;
use spaced_raft::{Member, NodeId, Outcome, Raft, Response};
use tokio::sync::watch;

use crate::admin::{
    AdminReply, AdminRequest, DeviceRow, MAX_ADMIN_FRAME, NodeStatus, StatusReport,
};
use crate::config::NodeConfig;
use crate::metrics::NodeMetrics;

/// Most voters the fabric keeps; further nodes stay learners (as etcd advises, 5 tolerates 2 failures).
pub const MAX_VOTERS: usize = 5;

/// How long a node waits for the leader to carry out an admin request it forwarded; below
/// spacectl's own call timeout, so spacectl hears the outcome (or the leader's address).
const ADMIN_FORWARD_TIMEOUT: Duration = Duration::from_secs(50);

/// Why a node could not start. `key` names the config key at fault, when one is.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    /// One line: config file, key and problem.
    pub message: String,
    /// Whether the operator's input is at fault (exit 2) rather than the system (exit 1).
    pub bad_input: bool,
}

impl StartError {
    fn input(cfg: &NodeConfig, key: &str, problem: impl std::fmt::Display) -> Self {
        StartError {
            message: format!("config {}: key `{key}`: {problem}", cfg.source.display()),
            bad_input: true,
        }
    }
    fn system(problem: impl std::fmt::Display) -> Self {
        StartError {
            message: problem.to_string(),
            bad_input: false,
        }
    }
}

/// QUIC transport settings: a dead peer is noticed within about a second.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(250)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        1_000,
    ))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    Arc::new(t)
}

/// Current wall clock in ms since the epoch, for stamping commands.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running node.
pub struct Node {
    /// Shared state used by the admin handler and the tasks.
    inner: Arc<NodeInner>,
    /// Signals every task to stop.
    shutdown_tx: watch::Sender<bool>,
    /// Background tasks to await on shutdown.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The balancer's task, awaited (not aborted) on shutdown so open connections drain.
    lb_task: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) struct NodeInner {
    /// This node's id.
    pub(crate) id: NodeId,
    /// This node's name.
    pub(crate) name: String,
    /// Roles from the config (registered in the fabric when the node joins).
    pub(crate) roles: BTreeSet<String>,
    /// Raft handle.
    pub(crate) raft: Raft,
    /// Applied fabric.
    pub(crate) view: FabricView,
    /// Dialer for node-to-node calls.
    pub(crate) network: QuicNetwork,
    /// The QUIC endpoint.
    pub(crate) endpoint: quinn::Endpoint,
    /// Bound QUIC address.
    pub(crate) listen: SocketAddr,
    /// The address other nodes dial (`advertise`, else `listen`).
    pub(crate) advertise: SocketAddr,
    /// Prometheus metrics.
    pub(crate) metrics: NodeMetrics,
    /// The load balancer on the cluster VIP, if `[lb]` is configured.
    pub(crate) lb: Option<Arc<crate::lb_service::LbService>>,
    /// Leases, VIP agent, leader's renewal book.
    pub(crate) placements: crate::placement::Placements,
    /// The device agent: connections of the devices this node owns.
    pub(crate) devices: Arc<crate::devices::DeviceAgent>,
}

impl Node {
    /// Starts a node from its config. With `bootstrap`, initialises a one-node cluster on an empty data dir.
    pub async fn start(cfg: NodeConfig, bootstrap: bool) -> Result<Node, StartError> {
        let roles: BTreeSet<String> = cfg.roles.iter().cloned().collect();
        let tls = TlsMaterial::load(&TlsPaths {
            ca: cfg.tls.ca.clone(),
            cert: cfg.tls.cert.clone(),
            key: cfg.tls.key.clone(),
        })
        .map_err(|e| StartError::input(&cfg, "tls", e))?;
        match tls.identity() {
            Identity::Node(n) if *n == cfg.name => {}
            other => {
                return Err(StartError::input(
                    &cfg,
                    "tls.cert",
                    format!("certificate is for {other:?}, not node {:?}", cfg.name),
                ));
            }
        }

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

        let transport = transport_config();
        let server_cfg = tls
            .server_config(transport.clone())
            .map_err(StartError::system)?;
        let client_cfg = tls
            .client_config(ALPN_RAFT, transport)
            .map_err(StartError::system)?;
        let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen).map_err(|e| {
            StartError::input(
                &cfg,
                "listen",
                format!("cannot bind UDP {}: {e}", cfg.listen),
            )
        })?;
        let listen = endpoint.local_addr().map_err(StartError::system)?;
        let advertise = cfg.advertise.unwrap_or(listen);

        let network = QuicNetwork::new(cfg.node_id, endpoint.clone(), client_cfg);
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

        let metrics = NodeMetrics::new();
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
                let prebind = cfg.takeover == crate::config::TakeoverMode::Netlink;
                Some(crate::lb_service::LbService::new(
                    section, vip_ip, prebind, fd_limit,
                ))
            }
            None => None,
        };
        let devices = crate::devices::DeviceAgent::new(cfg.node_id, &cfg.devices).map_err(|e| {
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
        let inner = Arc::new(NodeInner {
            id: cfg.node_id,
            name: cfg.name.clone(),
            roles,
            raft: raft.clone(),
            view,
            network,
            endpoint: endpoint.clone(),
            listen,
            advertise,
            metrics,
            lb: lb.clone(),
            placements: crate::placement::Placements::new(&cfg, recorder)
                .await
                .map_err(|e| StartError {
                    message: e,
                    bad_input: true,
                })?,
            devices: Arc::new(devices),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        if let Some(addr) = cfg.metrics {
            let mut rx = shutdown_rx.clone();
            let state: Arc<dyn crate::http::HttpState> = Arc::new(HttpView(inner.clone()));
            let (_, h) = crate::http::serve(addr, state, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| StartError::input(&cfg, "metrics", e))?;
            tasks.push(h);
        }

        tasks.push(tokio::spawn(crate::placement::agent_loop(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::placement::controller_loop(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::placement::register_config_vips(
            inner.clone(),
            cfg.vips.clone(),
        )));
        tasks.push(tokio::spawn(crate::placement::record_mgmt_ip(
            inner.clone(),
            cfg.mgmt_ip,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(accept_loop(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(metrics_loop(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::services::services_loop(
            inner.clone(),
            inner.placements.supervisor.clone(),
            inner.placements.services_wake.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::devices::run(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::device_control::planner_loop(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        let lb_task = lb.map(|service| {
            tokio::spawn(crate::lb_service::run(
                inner.clone(),
                service,
                shutdown_rx.clone(),
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
            tasks.push(tokio::spawn(register_self(inner.clone())));
        }
        tracing::info!(node = cfg.node_id, name = %cfg.name, %listen, bootstrap, "node started");
        Ok(Node {
            inner,
            shutdown_tx,
            tasks,
            lb_task,
        })
    }

    /// The Raft handle (tests and the demo watch its metrics).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Read access to the applied fabric.
    pub fn fabric(&self) -> &FabricView {
        &self.inner.view
    }

    /// The bound QUIC address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// The address other nodes and spacectl dial: `advertise`, else the bound address.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.inner.advertise
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Where devices in device-initiated mode connect to this node, if it listens.
    pub fn device_listen_addr(&self) -> Option<SocketAddr> {
        self.inner.devices.listen_addr()
    }

    /// Devices this node holds a connection task for (connected or still trying).
    pub fn held_devices(&self) -> usize {
        self.inner.devices.held_count()
    }

    /// Proposes a command through this node (must be leader) and records commit latency.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, String> {
        self.inner.propose(cmd).await
    }

    /// A cloneable handle for proposing commands from many tasks.
    pub fn proposer(&self) -> Proposer {
        Proposer {
            inner: self.inner.clone(),
        }
    }

    /// Stops serving, shuts Raft down and waits for the tasks.
    pub async fn shutdown(self) {
        // Hand VIPs over first (fence, release, let the leader re-grant), then leadership.
        crate::placement::hand_over(&self.inner).await;
        let _ = self.shutdown_tx.send(true);
        // Every service stopped (SIGTERM, grace, SIGKILL) before the node goes.
        self.inner.placements.supervisor.shutdown().await;
        if let Some(lb) = self.lb_task {
            // Bounded by the drain grace: open connections finish or are cut.
            let _ = lb.await;
        }
        let _ = self.inner.raft.shutdown().await;
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        self.inner.endpoint.wait_idle().await;
    }
}

impl Node {
    /// Stops at once, as close to a crash as one process allows: no hand-over of VIPs or
    /// leadership, no goodbye to the leader; device connections and QUIC just drop. Peers notice
    /// only by silence. For failover tests and benchmarks.
    pub async fn crash(self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks.into_iter().chain(self.lb_task) {
            t.abort();
            let _ = t.await;
        }
        let _ = self.inner.raft.shutdown().await;
        self.inner.endpoint.close(0u32.into(), b"crash");
    }
}

/// Proposes commands through one node (benchmarks, tests, later the controller).
#[derive(Clone)]
pub struct Proposer {
    inner: Arc<NodeInner>,
}

impl Proposer {
    /// Proposes `cmd` (this node must lead); returns the applied outcome.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, String> {
        self.inner.propose(cmd).await
    }
}

/// Why a proposal was not applied, so callers can redirect.
pub(crate) enum ProposeError {
    /// This node does not lead; the leader's id and address, if known.
    NotLeader(Option<NodeId>, Option<String>),
    /// Raft failed (shutting down, fatal error).
    Failed(String),
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::NotLeader(l, _) => write!(f, "not the leader (leader: {l:?})"),
            ProposeError::Failed(e) => f.write_str(e),
        }
    }
}

impl NodeInner {
    /// The Raft membership this node knows now (effective, possibly not yet committed).
    pub(crate) fn membership(&self) -> Arc<StoredMembership> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone()
    }

    /// How to reach member `id`, if it is one.
    pub(crate) fn member(&self, id: NodeId) -> Option<Member> {
        self.membership().membership().get_node(&id).cloned()
    }

    /// Whether `id` is a voter.
    pub(crate) fn is_voter(&self, id: NodeId) -> bool {
        self.membership().membership().voter_ids().any(|v| v == id)
    }

    /// On the leader: time since it last heard from each peer (`None`: never). Empty elsewhere.
    pub(crate) fn contacts(&self) -> BTreeMap<NodeId, Option<Duration>> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.heartbeat
            .as_ref()
            .map(|hb| {
                hb.iter()
                    .map(|(id, t)| (*id, t.as_ref().map(|t| t.elapsed())))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let leader = self.raft.metrics().borrow_watched().current_leader;
        (leader, leader.and_then(|l| self.member(l)).map(|n| n.addr))
    }

    /// Commits `cmd` through this node (it must lead) and returns its applied result, refused
    /// commands included; records the commit latency.
    pub(crate) async fn commit(&self, cmd: Command) -> Result<Response, ProposeError> {
        let started = Instant::now();
        match self.raft.client_write(cmd).await {
            Ok(resp) => {
                self.metrics.commit_latency(started.elapsed());
                Ok(resp.response().clone())
            }
            Err(e) => match e.forward_to_leader() {
                Some(fwd) => Err(ProposeError::NotLeader(
                    fwd.leader_id,
                    fwd.leader_node.as_ref().map(|n| n.addr.clone()),
                )),
                None => Err(ProposeError::Failed(e.to_string())),
            },
        }
    }

    /// Like [`commit`](Self::commit), with a refused command as an error too.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<Outcome, String> {
        match self.commit(cmd).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("node {}: {e}", self.id)),
        }
    }

    /// Hands an admin request that only the leader can carry out (`request`, as it came from
    /// spacectl) to the leader and returns its reply, so spacectl may talk to any node. The
    /// leader carries it out or, if it no longer leads, says where the leader is; it does not
    /// forward again. If the leader cannot be reached, spacectl gets the leader's address
    /// (`addr`) to try itself. If this node learns of another leader meanwhile (the one asked
    /// died, say), it stops waiting: it carries the request out itself if it now leads, else
    /// names the new leader. (So a request the old leader carried out just before it lost the
    /// lead may be carried out twice; operations refuse a duplicate or repeat harmlessly.)
    pub(crate) async fn forward_admin(
        &self,
        leader: NodeId,
        addr: Option<String>,
        admin: &str,
        request: Vec<u8>,
    ) -> AdminReply {
        let not_leader = |addr| AdminReply::NotLeader {
            leader: Some(leader),
            addr,
        };
        let Some(member) = self.member(leader) else {
            return not_leader(addr);
        };
        let rpc = RaftRpc::Admin {
            admin: admin.to_string(),
            request: request.clone(),
        };
        let call = self
            .network
            .call(leader, &member, rpc, ADMIN_FORWARD_TIMEOUT);
        let wait = self.raft.wait(None);
        // A new leader known, not an election under way: the leader asked may be waiting for
        // a vote itself (a leader transfer it was asked to make, say) and answer shortly.
        let leader_moved = wait.metrics(
            |m| m.current_leader.is_some_and(|l| l != leader),
            "another leader",
        );
        let answer = tokio::select! {
            answer = call => answer,
            _ = leader_moved => {
                tracing::debug!(leader, "the leader changed while a forwarded admin request waited");
                if let Some(elsewhere) = self.not_leader() {
                    return elsewhere;
                }
                return match decode_admin_request(&request) {
                    Ok(req) => self.handle(req).await,
                    Err(e) => AdminReply::Failed(e),
                };
            }
        };
        match answer {
            Ok(RaftReply::Admin(reply)) => spaced_raft::codec::decode::<AdminReply>(&reply)
                .unwrap_or_else(|e| {
                    AdminReply::Failed(format!("the leader's reply is undecodable: {e}"))
                }),
            Ok(other) => AdminReply::Failed(format!("the leader answered {other:?}")),
            Err(e) => {
                tracing::debug!(leader, error = %e, "could not forward an admin request to the leader");
                not_leader(addr)
            }
        }
    }

    /// An admin request another node forwarded (see [`forward_admin`](Self::forward_admin)):
    /// carried out here, not forwarded again; the encoded reply.
    pub(crate) async fn serve_forwarded_admin(
        &self,
        from: NodeId,
        admin: String,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let req = decode_admin_request(&request)?;
        tracing::debug!(from, %admin, ?req, "admin request forwarded by a node");
        let reply = self.handle(req).await;
        encode_admin_reply(&reply).ok_or_else(|| "cannot encode the admin reply".to_string())
    }

    fn not_leader(&self) -> Option<AdminReply> {
        if self.raft.is_leader() {
            return None;
        }
        let (leader, addr) = self.leader();
        Some(AdminReply::NotLeader { leader, addr })
    }

    fn resolve_node(&self, who: &str) -> Result<NodeId, String> {
        let membership = self.membership();
        let membership = membership.membership();
        if let Ok(id) = who.parse::<NodeId>()
            && membership.get_node(&id).is_some()
        {
            return Ok(id);
        }
        membership
            .nodes()
            .find(|(_, n)| n.name == who)
            .map(|(id, _)| *id)
            .ok_or_else(|| format!("no node {who:?} in the cluster"))
    }

    async fn handle(&self, req: AdminRequest) -> AdminReply {
        match req {
            AdminRequest::Status => AdminReply::Status(self.status()),
            AdminRequest::ListDevices => AdminReply::Devices(self.view.read(|f| {
                f.devices
                    .iter()
                    .map(|(id, d)| DeviceRow {
                        id: id.clone(),
                        addr: d.addr.clone(),
                        mode: d.mode,
                        owner: d.owner,
                        status: d.status,
                        since: d.since,
                        owner_name: d
                            .owner
                            .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone())),
                    })
                    .collect()
            })),
            AdminRequest::VipList => AdminReply::Vips(crate::placement::vip_rows(self)),
            AdminRequest::Write(cmd) => self.write(cmd).await,
            AdminRequest::LbStatus => AdminReply::Lb(crate::admin::LbReport {
                node: self.name.clone(),
                vip: self.lb.as_ref().map(|lb| lb.vip().to_string()),
                listeners: self.lb.as_ref().map(|lb| lb.report()).unwrap_or_default(),
                problems: self.lb.as_ref().map(|lb| lb.problems()).unwrap_or_default(),
            }),
            AdminRequest::ServiceStatus => AdminReply::Services(crate::admin::ServicesReport {
                node: self.name.clone(),
                specs: self.view.read(|f| f.services.clone()),
                running: self.placements.supervisor.status(),
            }),
            AdminRequest::SingletonList => AdminReply::Singletons(self.view.read(|f| {
                let now = now_millis();
                f.placements
                    .iter()
                    .filter_map(|(name, p)| match &p.kind {
                        spaced_fabric::PlacementKind::Singleton { service } => {
                            Some(crate::admin::SingletonRow {
                                name: name.clone(),
                                service: service.clone(),
                                roles: p.eligible_roles.iter().cloned().collect(),
                                owner: p.owner,
                                owner_name: p
                                    .owner
                                    .and_then(|o| f.nodes.get(&o).map(|n| n.name.clone())),
                                epoch: p.epoch,
                                refused: crate::admin::RefusalRow::of(f, p, now),
                            })
                        }
                        _ => None,
                    })
                    .collect()
            })),
            AdminRequest::AddDevices(devices) => {
                self.write(Command::AddDevices {
                    devices,
                    at: now_millis(),
                })
                .await
            }
            leader_only => {
                if let Some(r) = self.not_leader() {
                    return r;
                }
                self.leader_op(leader_only)
                    .await
                    .unwrap_or_else(AdminReply::Failed)
            }
        }
    }

    /// The admin operations only the leader carries out.
    async fn leader_op(&self, req: AdminRequest) -> Result<AdminReply, String> {
        Ok(match req {
            AdminRequest::AddNode {
                id,
                name,
                addr,
                roles,
            } => AdminReply::NodeAdded {
                voter: self.add_node(id, name, addr, roles).await?,
            },
            AdminRequest::RemoveNode(who) => {
                self.remove_node(&who).await?;
                AdminReply::Done
            }
            AdminRequest::TransferLeader(who) => {
                self.transfer_leader(&who).await?;
                AdminReply::Done
            }
            AdminRequest::VipAdd {
                name,
                address,
                interface,
                roles,
            } => {
                let (cannot, unchecked) =
                    crate::placement::vip_add(self, name, address, interface, roles).await?;
                AdminReply::VipAdded { cannot, unchecked }
            }
            AdminRequest::VipMove { name, to } => {
                let to = self.resolve_node(&to)?;
                AdminReply::Moved(crate::placement::vip_move(self, &name, to).await?)
            }
            AdminRequest::DeviceRebalance { max_moves } => {
                AdminReply::Rebalanced(crate::device_control::rebalance(self, max_moves).await?)
            }
            AdminRequest::SetAdminState { node, state } => {
                let id = self.resolve_node(&node)?;
                let (name, devices) =
                    crate::device_control::set_admin_state(self, id, state).await?;
                AdminReply::AdminStateSet {
                    id,
                    name,
                    state,
                    devices,
                }
            }
            other => return Err(format!("not a leader operation: {other:?}")),
        })
    }

    async fn write(&self, cmd: Command) -> AdminReply {
        match self.commit(cmd).await {
            Ok(Ok(o)) => AdminReply::Applied(o),
            Ok(Err(e)) => AdminReply::Failed(e.to_string()),
            Err(ProposeError::NotLeader(leader, addr)) => AdminReply::NotLeader { leader, addr },
            Err(ProposeError::Failed(e)) => AdminReply::Failed(e),
        }
    }

    fn status(&self) -> StatusReport {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let contacts = self.contacts();
        let (records, counts, devices) = self
            .view
            .read(|f| (f.nodes.clone(), f.device_counts(), f.devices.len() as u64));
        let nodes = membership
            .nodes()
            .map(|(id, member)| {
                let rec = records.get(id);
                let last_contact_ms = if *id == self.id && m.state == ServerState::Leader {
                    Some(0)
                } else {
                    contacts
                        .get(id)
                        .copied()
                        .flatten()
                        .map(|d| d.as_millis() as u64)
                };
                NodeStatus {
                    id: *id,
                    name: member.name.clone(),
                    addr: member.addr.clone(),
                    mgmt_ip: rec.and_then(|r| r.mgmt_ip),
                    roles: rec
                        .map(|r| r.roles.iter().cloned().collect())
                        .unwrap_or_default(),
                    voter: membership.voter_ids().any(|v| v == *id),
                    last_contact_ms,
                    admin_state: rec.map(|r| r.admin_state),
                    devices: counts.get(id).copied().unwrap_or(0),
                }
            })
            .collect();
        StatusReport {
            served_by: self.id,
            leader: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index()),
            nodes,
            devices,
            vips: crate::placement::vip_rows(self),
        }
    }

    async fn add_node(
        &self,
        id: NodeId,
        name: String,
        addr: String,
        roles: Option<BTreeSet<String>>,
    ) -> Result<bool, String> {
        spaced_fabric::check_name("node name", &name).map_err(|e| e.to_string())?;
        let member = Member {
            name: name.clone(),
            addr: addr.clone(),
        };
        let membership = self.membership();
        if membership.membership().get_node(&id).is_some() {
            return Err(format!("node {id} is already a member"));
        }
        if let Some((other, _)) = membership
            .membership()
            .nodes()
            .find(|(_, n)| n.name == name)
        {
            return Err(format!("name {name:?} is already used by node {other}"));
        }
        // Ask the node who it is before trusting it with the log.
        let desc = match self
            .network
            .call(id, &member, RaftRpc::Describe, Duration::from_secs(3))
            .await
        {
            Ok(RaftReply::Describe(d)) => d,
            Ok(other) => return Err(format!("node at {addr}: unexpected reply {other:?}")),
            Err(e) => return Err(format!("cannot reach node {name} at {addr}: {e}")),
        };
        if desc.id != id || desc.name != name {
            return Err(format!(
                "the node at {addr} is id {} named {:?}, not id {id} named {name:?}",
                desc.id, desc.name
            ));
        }
        let roles = roles.unwrap_or(desc.roles);
        self.raft
            .add_learner(id, member, true)
            .await
            .map_err(|e| format!("add learner {id}: {e}"))?;
        let register = Command::RegisterNode {
            id,
            name,
            raft_addr: addr,
            mgmt_ip: None,
            roles,
            at: now_millis(),
        };
        if let Err(e) = self.propose(register).await {
            return Err(format!(
                "node {id} joined as learner but was not registered in the fabric: {e}"
            ));
        }
        let voters = self.membership().membership().voter_ids().count();
        if voters >= MAX_VOTERS {
            return Ok(false);
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| format!("node {id} joined as learner; promotion to voter failed: {e}"))?;
        Ok(true)
    }

    async fn remove_node(&self, who: &str) -> Result<(), String> {
        let id = self.resolve_node(who)?;
        let is_voter = self.is_voter(id);
        if is_voter {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| format!("remove voter {id}: {e}"))?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(|e| format!("remove node {id}: {e}"))?;
        let known = self.view.read(|f| f.nodes.contains_key(&id));
        if known && let Err(e) = self.propose(Command::RemoveNode { id }).await {
            // Membership already excludes it; the fabric record is cleaned on the next try.
            return Err(format!(
                "node {id} left the cluster but its fabric record stays: {e}"
            ));
        }
        Ok(())
    }

    async fn transfer_leader(&self, who: &str) -> Result<(), String> {
        let to = self.resolve_node(who)?;
        if to == self.id {
            return Ok(());
        }
        let voter = self.is_voter(to);
        if !voter {
            return Err(format!("node {to} is a learner; only voters can lead"));
        }
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| e.to_string())?;
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if rx.borrow_watched().current_leader == Some(to) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(format!("node {to} did not take over leadership within 5 s")),
            }
        }
    }
}

/// Registers the bootstrap node in the fabric once it leads its one-node cluster.
async fn register_self(inner: Arc<NodeInner>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if inner.view.read(|f| f.nodes.contains_key(&inner.id)) {
            return;
        }
        if inner.raft.is_leader() {
            let cmd = Command::RegisterNode {
                id: inner.id,
                name: inner.name.clone(),
                raft_addr: inner.advertise.to_string(),
                mgmt_ip: None,
                roles: inner.roles.clone(),
                at: now_millis(),
            };
            match inner.propose(cmd).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "registering the bootstrap node failed; retrying")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::error!(
        node = inner.id,
        "bootstrap node could not register itself in the fabric"
    );
}

async fn accept_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let svc = RaftService {
        hooks: Some(Arc::new(crate::placement::Hooks(inner.clone()))),
        raft: inner.raft.clone(),
        local: NodeDescription {
            id: inner.id,
            name: inner.name.clone(),
            roles: inner.roles.clone(),
        },
    };
    // Connection tasks die with the loop (dropping a JoinSet aborts its tasks), so a stopped
    // node leaves nothing holding its Raft handle or storage.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = inner.endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let svc = svc.clone();
        let inner = inner.clone();
        conns.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) if pki::is_protocol_mismatch(&e) => {
                    tracing::warn!(
                        %remote,
                        error = %e,
                        raft = %String::from_utf8_lossy(ALPN_RAFT),
                        admin = %String::from_utf8_lossy(ALPN_ADMIN),
                        "refused connection: the peer speaks neither of our protocol versions; \
                         it runs another spaced build"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused connection: handshake failed");
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            let identity = match pki::peer_identity(&conn) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused connection: no usable certificate");
                    conn.close(1u32.into(), b"certificate");
                    return;
                }
            };
            match (alpn.as_deref(), identity) {
                (Some(ALPN_RAFT), Identity::Node(name)) => svc.serve_connection(conn, name).await,
                (Some(ALPN_ADMIN), Identity::Admin(name)) => serve_admin(inner, conn, name).await,
                (alpn, identity) => {
                    tracing::warn!(%remote, ?identity, alpn = ?alpn.map(String::from_utf8_lossy), "refused connection: wrong certificate for protocol");
                    conn.close(1u32.into(), b"wrong certificate for protocol");
                }
            }
        });
    }
}

/// Decodes an admin request from the wire (from spacectl, or forwarded by a node).
fn decode_admin_request(bytes: &[u8]) -> Result<AdminRequest, String> {
    spaced_raft::codec::decode(bytes).map_err(|e| format!("undecodable admin request: {e}"))
}

/// Encodes an admin reply for the wire; a reply over the admin frame limit becomes a `Failed`
/// that says so. `None` only if even that cannot be encoded (logged).
pub(crate) fn encode_admin_reply(reply: &AdminReply) -> Option<Vec<u8>> {
    let encoded = spaced_raft::codec::encode(reply).and_then(|b| {
        if b.len() <= MAX_ADMIN_FRAME {
            return Ok(b);
        }
        spaced_raft::codec::encode(&AdminReply::Failed(format!(
            "reply of {} bytes exceeds the admin frame limit",
            b.len()
        )))
    });
    match encoded {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode admin reply");
            None
        }
    }
}

async fn serve_admin(inner: Arc<NodeInner>, conn: quinn::Connection, admin: String) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let inner = inner.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            let bytes = match spaced_raft::frame::read_frame(&mut recv, MAX_ADMIN_FRAME).await {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%admin, error = %e, "admin stream refused");
                    let _ = send.reset(1u32.into());
                    return;
                }
            };
            let reply = match decode_admin_request(&bytes) {
                Ok(req) => {
                    tracing::debug!(%admin, ?req, "admin request");
                    match inner.handle(req).await {
                        AdminReply::NotLeader {
                            leader: Some(leader),
                            addr,
                        } if leader != inner.id => {
                            inner.forward_admin(leader, addr, &admin, bytes).await
                        }
                        reply => reply,
                    }
                }
                Err(e) => AdminReply::Failed(e),
            };
            if let Some(b) = encode_admin_reply(&reply) {
                let _ = spaced_raft::frame::write_frame(&mut send, &b).await;
            }
            let _ = send.finish();
        });
    }
}

async fn metrics_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let m = inner.raft.metrics().borrow_watched().clone();
        let names: BTreeMap<NodeId, String> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.name.clone()))
            .collect();
        let contacts = inner
            .contacts()
            .into_iter()
            .filter(|(id, _)| *id != inner.id)
            .map(|(id, t)| {
                let name = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
                (name, t.map(|d| d.as_secs_f64()))
            })
            .collect();
        inner.metrics.update(
            m.current_term,
            m.current_leader,
            m.last_applied.map(|l| l.index()),
            m.state == ServerState::Leader,
            contacts,
        );
    }
}

/// Adapts the node to the HTTP server's view.
struct HttpView(Arc<NodeInner>);

impl crate::http::HttpState for HttpView {
    fn metrics_text(&self) -> String {
        let mut text = self.0.metrics.render();
        if let Some(lb) = &self.0.lb {
            lb.render(&mut text);
        }
        text
    }

    fn health(&self) -> (bool, String) {
        let m = self.0.raft.metrics();
        let m = m.borrow_watched();
        if let Err(e) = &m.running_state {
            return (false, format!("raft stopped: {e}"));
        }
        match m.current_leader {
            Some(l) => (
                true,
                format!("{:?}, leader {l}, term {}", m.state, m.current_term),
            ),
            None => (
                false,
                format!("{:?}, no leader known, term {}", m.state, m.current_term),
            ),
        }
    }
}
