//! The admin protocol (ALPN `spaced-admin/7`, [`spaced_raft::pki::ALPN_ADMIN`]): requests from `spacectl`, replies from a node.
//!
//! Each request travels as a [`SignedRequest`]: the encoded [`AdminRequest`] with the admin's
//! signature over it (see [`spaced_raft::proof`]), so that a node forwarding it to the leader
//! can neither forge nor alter it.
//!
//! A forwarded request and its reply travel between nodes inside the Raft protocol
//! (`RaftRpc::Admin`), where a node of the previous data format may be at the other end during
//! a rolling upgrade: new requests and replies are appended to [`AdminRequest`] and
//! [`AdminReply`], never inserted, so the ones both builds know read the same in both.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use spaced_fabric::{AdminState, DeviceMode, DeviceStatus, NewDevice};
use spaced_raft::{Command, NodeId, Outcome};

pub use crate::devices::report::{NodeDevices, RebalanceReport};
pub use crate::lb::report::{LbBackendRow, LbListenerRow, LbReport};
pub use crate::placement::report::{RefusalRow, SingletonRow, VipRow};

/// Largest admin frame (a device list of 100k devices fits comfortably).
pub const MAX_ADMIN_FRAME: usize = 64 << 20;

/// What `spacectl` sends on a stream: an encoded [`AdminRequest`] and the admin's proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedRequest {
    /// The encoded request, exactly as signed.
    #[serde(with = "serde_bytes")]
    pub request: Vec<u8>,
    /// The admin's clock when it signed (Unix ms).
    pub at_ms: u64,
    /// A random number, never used twice.
    pub nonce: u64,
    /// The admin certificate's key over [`spaced_raft::proof::message`] of the above.
    pub signature: spaced_raft::proof::Signature,
}

/// One admin call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Cluster overview; answered best by the leader (it knows last contacts).
    Status,
    /// Propose a fabric command (leader only).
    Write(Command),
    /// Register devices in one command (leader only).
    AddDevices(Vec<NewDevice>),
    /// Add a node: learner, catch up, then voter while voters < 5 (leader only).
    AddNode {
        /// Raft id of the new node.
        id: NodeId,
        /// Its name (must match its certificate and config).
        name: String,
        /// Its QUIC address.
        addr: String,
        /// Roles; `None` asks the node for the roles in its config.
        roles: Option<BTreeSet<String>>,
    },
    /// Remove a node by id or name (leader only).
    RemoveNode(String),
    /// Hand leadership to a node given by id or name (leader only).
    TransferLeader(String),
    /// All devices as this node has applied them.
    ListDevices,
    /// The revoked certificates, as this node has applied them.
    ListRevoked,
    /// Create a VIP placement (leader only).
    VipAdd {
        /// Placement name.
        name: String,
        /// Address with prefix.
        address: String,
        /// Interface.
        interface: String,
        /// Eligible roles.
        roles: Vec<String>,
    },
    /// VIPs with owner, epoch and lease (leader's view when asked on the leader).
    VipList,
    /// The service specs and this node's supervisor state of each service it runs.
    ServiceStatus,
    /// Singleton placements with owner and epoch.
    SingletonList,
    /// Move a VIP to a node (by id or name) gracefully (leader only).
    VipMove {
        /// VIP name.
        name: String,
        /// Target node, id or name.
        to: String,
    },
    /// Even out the devices of the live `app` nodes with the fewest moves (leader only).
    DeviceRebalance {
        /// Stop after this many moves; `None`: as many as needed.
        max_moves: Option<u64>,
    },
    /// Drain a node (it hands its devices off and takes nothing new) or make it active again,
    /// by id or name (leader only).
    SetAdminState {
        /// Node id or name.
        node: String,
        /// Active or draining.
        state: AdminState,
    },
    /// This node's load balancer: its listeners, whether each accepts, its backends.
    LbStatus,
    /// Remove a VIP; its owner fences and releases it first (leader only).
    VipRemove(String),
    /// Set a node's roles (leader only).
    SetRoles {
        /// Node id or name.
        node: String,
        /// The new roles.
        roles: BTreeSet<String>,
    },
    /// Remove devices by id, in as few commands as the batch limit allows (leader only); the
    /// reply names the ids that did not exist.
    RemoveDevices(Vec<String>),
    /// A consistent backup of the fabric, taken on the leader after a read barrier (leader
    /// only): the bytes of a snapshot file ([`spaced_raft::backup`]).
    Snapshot,
    /// Disaster recovery, on this site's leader (leader only).
    Dr(DrAction),
    /// Change a VIP's address, interface or roles; `None` keeps it (leader only). The owner
    /// fences and releases it first unless only the roles change and it keeps one.
    VipSet {
        /// VIP name.
        name: String,
        /// New address with prefix.
        address: Option<String>,
        /// New interface.
        interface: Option<String>,
        /// New eligible roles.
        roles: Option<Vec<String>>,
    },
    /// Change a device's address or mode; `None` keeps it (leader only). Its owner keeps it
    /// and connects anew.
    DeviceSet {
        /// Device id.
        id: String,
        /// New `host` or `host:port`.
        addr: Option<String>,
        /// New mode.
        mode: Option<spaced_fabric::DeviceMode>,
    },
    /// Change a service's spec; `None` keeps a field (leader only). Every node running it
    /// restarts it with the new spec.
    ServiceSet {
        /// Service name.
        name: String,
        /// New program and arguments.
        command: Option<Vec<String>>,
        /// New roles.
        roles: Option<BTreeSet<String>>,
        /// New health check (`Some(None)`: none any more).
        health_check: Option<Option<Vec<String>>>,
    },
    /// Read this node's config file again and apply what can change while running, as
    /// SIGHUP does (`spacectl node reload`); served by the node asked, never forwarded.
    Reload,
    /// All devices, read linearizably (leader only): after a read barrier (this node still
    /// leads, and has applied everything committed before the request), so the answer holds
    /// every write acknowledged before it was asked, unlike `ListDevices` (this node's applied
    /// view, which may lag). Answered with `Devices`. Appended last: a node of an older build
    /// cannot decode it and says so.
    ReadDevices,
}

/// What `spacectl dr` asks of the site's leader.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum DrAction {
    /// The site's DR state and its link to the peer.
    Status,
    /// Make this standby site active (refused while the active peer answers, unless `force`).
    Failover {
        /// Promote even though the active peer answers (it demotes when it hears of it).
        force: bool,
    },
    /// Have the active peer demote itself, mirror everything, then become active.
    Switchover,
    /// Make this active site standby.
    Demote,
    /// Turn automatic failover off for a while (`Some(ms)`; `Some(0)`: until turned on) or
    /// on (`None`).
    AutomaticFailover {
        /// How long it stays off, in ms.
        off_for_ms: Option<u64>,
    },
    /// Back the declared configuration files up now (active site); the standby receives the
    /// backup at the next heartbeat.
    Backup,
}

/// One node's answer to `service list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServicesReport {
    /// The answering node.
    pub node: String,
    /// The fabric's service specs, by name.
    pub specs: std::collections::BTreeMap<String, spaced_fabric::ServiceSpec>,
    /// What this node's supervisor runs.
    pub running: Vec<crate::services::supervisor::ServiceStatus>,
}

/// How a node describes one member in `Status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// Raft id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// QUIC address.
    pub addr: String,
    /// Management IP from the fabric (where the balancer reaches its app servers), if set.
    pub mgmt_ip: Option<std::net::IpAddr>,
    /// Roles from the fabric.
    pub roles: Vec<String>,
    /// Voter (true) or learner (false).
    pub voter: bool,
    /// Milliseconds since the leader last heard from it (leader's view; `None` if unknown).
    pub last_contact_ms: Option<u64>,
    /// Active or draining.
    pub admin_state: Option<AdminState>,
    /// Devices it owns.
    pub devices: u64,
    /// The build it runs, as it recorded it in the fabric (`None` until it has).
    pub version: Option<String>,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// Node that produced the report.
    pub served_by: NodeId,
    /// Current leader, if known.
    pub leader: Option<NodeId>,
    /// QUIC address of the leader, if known.
    pub leader_addr: Option<String>,
    /// Current term.
    pub term: u64,
    /// Last log index applied on the reporting node.
    pub last_applied: Option<u64>,
    /// Members.
    pub nodes: Vec<NodeStatus>,
    /// Registered devices.
    pub devices: u64,
    /// VIPs.
    pub vips: Vec<VipRow>,
    /// Bytes the reporting node's data dir holds (log, fabric, snapshots), if it could be read.
    pub db_bytes: Option<u64>,
}

/// One device row for `device list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRow {
    /// Device id.
    pub id: String,
    /// Address.
    pub addr: String,
    /// Connection mode.
    pub mode: DeviceMode,
    /// Owning node.
    pub owner: Option<NodeId>,
    /// State.
    pub status: DeviceStatus,
    /// Since when (ms since the epoch).
    pub since: u64,
    /// Owning node's name, so operators need not map ids.
    pub owner_name: Option<String>,
}

/// A node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminReply {
    /// Answer to `Status`.
    Status(StatusReport),
    /// A command was committed and applied.
    Applied(Outcome),
    /// A node joined.
    NodeAdded {
        /// Whether it was promoted to voter.
        voter: bool,
    },
    /// Done, nothing to report.
    Done,
    /// How many devices were removed, and the ids that did not exist.
    DevicesRemoved {
        /// How many went.
        removed: u64,
        /// Ids not found.
        missing: Vec<String>,
    },
    /// The revoked certificates by serial.
    Revoked(Vec<(String, spaced_fabric::Revocation)>),
    /// A node was removed; `revoked` is the serial of its certificate, now revoked, or `None`
    /// when the node could not be reached to read it.
    NodeRemoved {
        /// The revoked serial.
        revoked: Option<String>,
    },
    /// Answer to `ListDevices` and `ReadDevices`.
    Devices(Vec<DeviceRow>),
    /// Answer to `VipList`.
    Vips(Vec<VipRow>),
    /// Answer to `ServiceStatus`.
    Services(ServicesReport),
    /// Answer to `SingletonList`.
    Singletons(Vec<SingletonRow>),
    /// A VIP moved; its new epoch.
    Moved(u64),
    /// A VIP was added. Some eligible nodes may not be able to hold it.
    VipAdded {
        /// Nodes (name, reason) that said they cannot hold it: it is not placed there.
        cannot: Vec<(String, String)>,
        /// Nodes (name, why) that were not asked (not live) or did not answer: if one of them
        /// is granted the VIP and cannot hold it, it gives the VIP back.
        unchecked: Vec<(String, String)>,
    },
    /// Only the leader does that; here is where it is.
    NotLeader {
        /// Leader id, if known.
        leader: Option<NodeId>,
        /// Leader QUIC address, if known.
        addr: Option<String>,
    },
    /// The operation failed; one line why.
    Failed(String),
    /// Answer to `DeviceRebalance`.
    Rebalanced(RebalanceReport),
    /// Answer to `SetAdminState`: the node's new state and the devices it still held.
    AdminStateSet {
        /// Raft id.
        id: NodeId,
        /// Name.
        name: String,
        /// The state now committed.
        state: AdminState,
        /// Devices it owned when the change committed (a draining node hands them off next).
        devices: u64,
    },
    /// Answer to `LbStatus`.
    Lb(LbReport),
    /// Answer to `Snapshot`: the file's bytes.
    Snapshot(Vec<u8>),
    /// Answer to `Dr(Status)`.
    DrStatus(spaced_replication::DrStatus),
    /// Answer to `Dr(Backup)`: when it was taken, its files and bytes.
    DrBackup {
        /// When (ms since the Unix epoch).
        taken_at: u64,
        /// Files in it.
        files: usize,
        /// Their bytes.
        bytes: u64,
    },
    /// Answer to `Dr(Failover)` and `Dr(Switchover)`: the site is active at this epoch.
    DrActive {
        /// The site epoch it was promoted with.
        epoch: u64,
    },
    /// A `vip set` changed the VIP (`changed`), or found nothing to change. Some eligible
    /// nodes may not be able to hold it, as for [`AdminReply::VipAdded`].
    VipChanged {
        /// Whether anything changed.
        changed: bool,
        /// Nodes (name, reason) that said they cannot hold it.
        cannot: Vec<(String, String)>,
        /// Nodes (name, why) that were not asked or did not answer.
        unchecked: Vec<(String, String)>,
    },
    /// Answer to `Reload`: one line per change applied, and per key that needs a restart.
    Reloaded(Vec<String>),
}
