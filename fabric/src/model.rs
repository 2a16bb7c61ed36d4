//! The replicated state: nodes, placements, devices and service specs, as the state machine holds them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// Milliseconds since the Unix epoch, stamped by the proposer so that `apply` reads no clock.
pub type Millis = u64;

/// Largest number of devices one `AddDevices`, `AssignDevices` or `ReportDeviceStatus` command may
/// carry; keeps log entries small.
pub const MAX_DEVICES_PER_COMMAND: usize = 10_000;

/// The role a node needs to hold device connections (as the model's application nodes do).
pub const DEVICE_ROLE: &str = "app";

/// Whether a node takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AdminState {
    /// Takes placements and devices.
    #[default]
    Active,
    /// Hands its work off and takes nothing new.
    Draining,
}

/// A member of the fabric as the state machine knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Human name, unique in the fabric; also the name on the node's certificate.
    pub name: String,
    /// QUIC address for Raft and admin traffic.
    pub raft_addr: String,
    /// Management address the node's agents use for device connections, if different.
    pub mgmt_ip: Option<IpAddr>,
    /// Roles decide which placements and backends the node is eligible for.
    pub roles: BTreeSet<String>,
    /// Active or draining.
    pub admin_state: AdminState,
    /// When the node was registered (proposer's clock).
    pub joined_at: Millis,
    /// The build it runs (version, commit, data format), as it last recorded it; empty until
    /// it has.
    pub version: String,
}

impl NodeRecord {
    /// Whether the node may be given devices: active (not draining) and with the role [`DEVICE_ROLE`].
    /// Liveness is not part of it: the state machine cannot know it; planners add it.
    pub fn may_hold_devices(&self) -> bool {
        self.admin_state == AdminState::Active && self.roles.contains(DEVICE_ROLE)
    }
}

/// What a placement places.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementKind {
    /// A virtual IP address (`address` is `ip/prefix`) on an interface of its owner.
    Vip {
        /// Address with prefix length, e.g. `10.0.0.100/24`.
        address: String,
        /// Interface the owner adds the address to.
        interface: String,
    },
    /// A cluster-wide singleton service.
    Singleton {
        /// Name of the service spec it runs.
        service: String,
    },
}

/// Something exactly one node may hold at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VIP or singleton.
    pub kind: PlacementKind,
    /// A node must have one of these roles to be granted the placement.
    pub eligible_roles: BTreeSet<String>,
    /// Current holder, if any.
    pub owner: Option<NodeId>,
    /// Fencing token: incremented on every owner change.
    pub epoch: u64,
    /// Nodes that were granted the placement and could not hold it (a VIP they cannot add, a
    /// singleton they cannot keep running), with why and when. The leader's planner passes them
    /// over for a while; a new grant to the node, a changed service spec or the node's removal
    /// clears the entry.
    pub refused: BTreeMap<NodeId, Refusal>,
}

/// Why a node gave a placement back, and when (the leader's clock: a refusal a node sends to
/// the leader is stamped when the leader receives it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What went wrong on the node, at most [`MAX_REFUSAL_REASON`] bytes.
    pub reason: String,
    /// When it refused.
    pub at: Millis,
}

/// Longest refusal reason kept in the fabric; longer ones are cut at a character boundary.
pub const MAX_REFUSAL_REASON: usize = 300;

/// Who opens a device's management connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DeviceMode {
    /// The owning node connects to the device.
    #[default]
    SpaceInitiated,
    /// The device connects to any node, which claims it.
    DeviceInitiated,
}

impl std::str::FromStr for DeviceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "space-initiated" | "space" => Ok(DeviceMode::SpaceInitiated),
            "device-initiated" | "device" => Ok(DeviceMode::DeviceInitiated),
            other => Err(format!(
                "unknown device mode {other:?} (expected space-initiated or device-initiated)"
            )),
        }
    }
}

impl std::fmt::Display for DeviceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceMode::SpaceInitiated => "space-initiated",
            DeviceMode::DeviceInitiated => "device-initiated",
        })
    }
}

/// Connection state of a managed device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DeviceStatus {
    /// Registered, not yet assigned to a node.
    #[default]
    Unassigned,
    /// Assigned; the owner is connecting.
    Connecting,
    /// The owner holds a live connection.
    Up,
    /// No answer for longer than `down_after`.
    Down,
}

impl std::fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceStatus::Unassigned => "unassigned",
            DeviceStatus::Connecting => "connecting",
            DeviceStatus::Up => "up",
            DeviceStatus::Down => "down",
        })
    }
}

/// A managed network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// `host` or `host:port` the owner connects to.
    pub addr: String,
    /// Who opens the connection.
    pub mode: DeviceMode,
    /// Node holding the connection.
    pub owner: Option<NodeId>,
    /// Connection state.
    pub status: DeviceStatus,
    /// When `owner`/`status` last changed (proposer's clock).
    pub since: Millis,
}

/// A device as registered by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDevice {
    /// Unique device id.
    pub id: String,
    /// `host` or `host:port`.
    pub addr: String,
    /// Who opens the connection.
    pub mode: DeviceMode,
}

/// One device's change of owner, as the leader decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAssignment {
    /// Device id.
    pub device: String,
    /// Owner the proposer saw when it decided (compare-and-set): a plan made from a view the log
    /// has since overtaken is refused instead of moving a device twice or undoing an operator's move.
    pub from: Option<NodeId>,
    /// New owner; `None` leaves the device unassigned (nobody eligible can take it).
    pub to: Option<NodeId>,
}

/// An owner's report of one device's connection state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Device id.
    pub device: String,
    /// `Up` or `Down`; the other states are set by assignment only.
    pub status: DeviceStatus,
}

/// Where a supervised service runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceScope {
    /// On every node.
    EveryNode,
    /// On the owner of the named VIP.
    Vip(String),
    /// On exactly one node, placed by the leader.
    Singleton,
}

/// A service the per-node supervisor runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Where it runs.
    pub scope: ServiceScope,
    /// Optional command whose non-zero exit means unhealthy.
    pub health_check: Option<Vec<String>>,
    /// `every-node`: runs on nodes with one of these roles (empty: on every node).
    /// `singleton`: the roles eligible to hold it (at least one). `vip:`: unused.
    #[serde(default)]
    pub roles: BTreeSet<String>,
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fabric {
    /// Registered nodes.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// VIPs and singletons by name.
    pub placements: BTreeMap<String, Placement>,
    /// Managed devices by id.
    pub devices: BTreeMap<String, Device>,
    /// Supervised services by name.
    pub services: BTreeMap<String, ServiceSpec>,
    /// Revoked certificates by serial number (the number in lowercase hex, no leading zeros): refused
    /// by every node for Raft, node RPCs and admin requests.
    pub revoked: BTreeMap<String, Revocation>,
    /// This site's disaster-recovery role, its site epoch and how far it mirrors its peer.
    pub site: Site,
}

/// A site's part in disaster recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SiteRole {
    /// No peer site: the site runs its workload and mirrors nothing.
    #[default]
    Standalone,
    /// Runs the workload; a standby site mirrors it.
    Active,
    /// Runs no workload (no placements granted, no devices assigned, no services) and takes
    /// the site-neutral data (devices, services) only from its active peer.
    Standby,
}

impl std::fmt::Display for SiteRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SiteRole::Standalone => "standalone",
            SiteRole::Active => "active",
            SiteRole::Standby => "standby",
        })
    }
}

impl std::str::FromStr for SiteRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standalone" => Ok(SiteRole::Standalone),
            "active" => Ok(SiteRole::Active),
            "standby" => Ok(SiteRole::Standby),
            other => Err(format!(
                "unknown site role {other:?} (expected active, standby or standalone)"
            )),
        }
    }
}

/// The disaster-recovery state of a site, replicated inside the site like everything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Site {
    /// Active, standby or standalone.
    pub role: SiteRole,
    /// The site epoch: raised by every promotion to active, and adopted from an active peer
    /// whose epoch is higher by a site that demotes. Of two sites that both claim to be active,
    /// the one with the lower epoch is wrong and demotes as soon as it hears of the other.
    pub epoch: u64,
    /// When the role last changed (proposer's clock).
    pub since: Millis,
    /// On a standby: the peer's position this site has mirrored up to.
    pub mirror: Option<MirrorPosition>,
    /// Automatic failover is off until then (ms since the Unix epoch; `u64::MAX`: until an
    /// operator turns it on); `None`: on (as far as the site's config allows).
    pub automatic_failover_off_until: Option<Millis>,
}

/// How far a standby site has mirrored its active peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorPosition {
    /// The peer site's name.
    pub site: String,
    /// The last log index the peer had applied when it sent what is mirrored.
    pub index: u64,
    /// The peer's clock when it sent it.
    pub sent_at: Millis,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The identity it carried (`node n3`, `admin ops`), for operators.
    pub identity: String,
    /// Why, as the operator gave it.
    pub reason: String,
    /// When (proposer's clock).
    pub at: Millis,
}

/// Longest revocation reason kept.
pub const MAX_REVOCATION_REASON: usize = 300;

impl Fabric {
    /// Number of devices each node owns (nodes without devices included, as 0).
    pub fn device_counts(&self) -> BTreeMap<NodeId, u64> {
        let mut counts: BTreeMap<NodeId, u64> = self.nodes.keys().map(|id| (*id, 0)).collect();
        for d in self.devices.values() {
            if let Some(o) = d.owner {
                *counts.entry(o).or_default() += 1;
            }
        }
        counts
    }
}
