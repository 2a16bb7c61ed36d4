//! The replicated state (`Fabric`) and the commands that change it; pure, deterministic, never panics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

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
}

/// A change to the fabric, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register a node that joined Raft membership.
    RegisterNode {
        /// Raft node id.
        id: NodeId,
        /// Unique name.
        name: String,
        /// QUIC address.
        raft_addr: String,
        /// Optional management address.
        mgmt_ip: Option<IpAddr>,
        /// Roles.
        roles: BTreeSet<String>,
        /// Proposer's clock.
        at: Millis,
    },
    /// Forget a node; its devices become unassigned (its placements move when their lease runs out).
    RemoveNode {
        /// Raft node id.
        id: NodeId,
    },
    /// Replace a node's roles.
    SetRoles {
        /// Raft node id.
        id: NodeId,
        /// New roles.
        roles: BTreeSet<String>,
    },
    /// Mark a node active or draining.
    SetAdminState {
        /// Raft node id.
        id: NodeId,
        /// New state.
        state: AdminState,
    },
    /// Create a VIP or singleton placement, unowned.
    AddPlacement {
        /// Unique placement name.
        name: String,
        /// What it places.
        kind: PlacementKind,
        /// Roles eligible to hold it; must not be empty.
        eligible_roles: BTreeSet<String>,
    },
    /// Delete an unowned placement.
    RemovePlacement {
        /// Placement name.
        name: String,
    },
    /// Give a placement to a node, if its epoch is still `expected_epoch` (compare-and-set).
    GrantPlacement {
        /// Placement name.
        name: String,
        /// New owner.
        to: NodeId,
        /// Epoch the proposer based its decision on.
        expected_epoch: u64,
    },
    /// Owner gives a placement up, if `epoch` is still current.
    ReleasePlacement {
        /// Placement name.
        name: String,
        /// Epoch the releasing owner was granted.
        epoch: u64,
    },
    /// The owner gives a placement back because it cannot hold it (a VIP it cannot add, a
    /// singleton it cannot keep running); it has already fenced it. Like `ReleasePlacement`, but
    /// the node is recorded in the placement's `refused` with `reason`, so that the planner does
    /// not grant it straight back.
    RefusePlacement {
        /// Placement name.
        name: String,
        /// The refusing owner.
        node: NodeId,
        /// Epoch it was granted.
        epoch: u64,
        /// What went wrong.
        reason: String,
        /// When: the leader's clock (it restamps a refusal a node sends it).
        at: Millis,
    },
    /// Register devices; all or none.
    AddDevices {
        /// Devices to add.
        devices: Vec<NewDevice>,
        /// Proposer's clock.
        at: Millis,
    },
    /// Forget a device.
    RemoveDevice {
        /// Device id.
        id: String,
    },
    /// Create or replace a service spec.
    PutService {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ServiceSpec,
    },
    /// Delete a service spec that no placement refers to.
    RemoveService {
        /// Service name.
        name: String,
    },
    /// Change the owners of a batch of devices; all or none. Every device must exist and still
    /// have the owner `from`, and every new owner must be a registered, active `app` node.
    /// A moved device is `Connecting` (or `Unassigned` without owner) from `at` on.
    ///
    /// Registration does not assign: `AddDevices` lands devices unassigned and the leader, which
    /// alone knows which nodes are live, follows with this command (see `assign`).
    AssignDevices {
        /// Owner changes, at most [`MAX_DEVICES_PER_COMMAND`], each device at most once.
        assignments: Vec<DeviceAssignment>,
        /// Proposer's clock.
        at: Millis,
    },
    /// A node reports the connection state of devices it holds. Reports about devices it no
    /// longer holds (moved or removed since it looked) are skipped and counted, not refused: they
    /// carry no news, and refusing would drop the node's other, current reports with them.
    ReportDeviceStatus {
        /// Reporting node; only a device's current owner is heeded.
        node: NodeId,
        /// Reports, at most [`MAX_DEVICES_PER_COMMAND`], each device at most once.
        reports: Vec<DeviceReport>,
        /// Proposer's clock.
        at: Millis,
    },
    /// Set or clear a node's management IP, where the balancer reaches its application
    /// servers (without one, the IP of its Raft address). A node proposes it from its config.
    SetMgmtIp {
        /// Raft node id.
        id: NodeId,
        /// The new address; `None` clears it.
        mgmt_ip: Option<IpAddr>,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::RegisterNode { id, name, .. } => write!(f, "register-node {id} {name}"),
            Command::RemoveNode { id } => write!(f, "remove-node {id}"),
            Command::SetRoles { id, roles } => write!(f, "set-roles {id} {roles:?}"),
            Command::SetAdminState { id, state } => write!(f, "set-admin-state {id} {state:?}"),
            Command::AddPlacement { name, .. } => write!(f, "add-placement {name}"),
            Command::RemovePlacement { name } => write!(f, "remove-placement {name}"),
            Command::GrantPlacement {
                name,
                to,
                expected_epoch,
            } => {
                write!(
                    f,
                    "grant-placement {name} to {to} at epoch {expected_epoch}"
                )
            }
            Command::ReleasePlacement { name, epoch } => {
                write!(f, "release-placement {name} epoch {epoch}")
            }
            Command::RefusePlacement {
                name, node, epoch, ..
            } => write!(f, "refuse-placement {name} by {node} epoch {epoch}"),
            Command::AddDevices { devices, .. } => write!(f, "add-devices x{}", devices.len()),
            Command::RemoveDevice { id } => write!(f, "remove-device {id}"),
            Command::PutService { name, .. } => write!(f, "put-service {name}"),
            Command::RemoveService { name } => write!(f, "remove-service {name}"),
            Command::AssignDevices { assignments, .. } => {
                write!(f, "assign-devices x{}", assignments.len())
            }
            Command::ReportDeviceStatus { node, reports, .. } => {
                write!(f, "report-device-status from {node} x{}", reports.len())
            }
            Command::SetMgmtIp { id, mgmt_ip } => match mgmt_ip {
                Some(ip) => write!(f, "set-mgmt-ip {id} {ip}"),
                None => write!(f, "set-mgmt-ip {id} none"),
            },
        }
    }
}

/// What a successfully applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; nothing to report.
    Done,
    /// A placement changed owner; this is its new epoch.
    Epoch(u64),
    /// This many devices were added.
    DevicesAdded(u64),
    /// This many devices changed owner.
    DevicesAssigned(u64),
    /// A status report was applied.
    DevicesReported {
        /// Devices whose status changed (unchanged ones keep their `since`).
        changed: u64,
        /// Reports skipped because the reporter does not hold the device (any more).
        stale: u64,
    },
}

/// Why a command was refused; the fabric is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// A name or id does not have the required shape.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// Which field.
        what: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// Something with this key exists already.
    #[error("{what} {key:?} already exists")]
    Exists {
        /// Kind of thing.
        what: String,
        /// Its key.
        key: String,
    },
    /// Nothing with this key exists.
    #[error("no {what} {key:?}")]
    NotFound {
        /// Kind of thing.
        what: String,
        /// Its key.
        key: String,
    },
    /// A compare-and-set lost: the placement moved on since the proposer looked.
    #[error("placement {name:?} is at epoch {current}, not {expected}")]
    StaleEpoch {
        /// Placement.
        name: String,
        /// Epoch the proposer expected.
        expected: u64,
        /// Actual epoch.
        current: u64,
    },
    /// The target node may not hold the placement.
    #[error("node {node} is not eligible for placement {name:?}: {why}")]
    NotEligible {
        /// Placement.
        name: String,
        /// Node.
        node: NodeId,
        /// Why not.
        why: String,
    },
    /// The thing is still referenced.
    #[error("{what} {key:?} is in use: {why}")]
    InUse {
        /// Kind of thing.
        what: String,
        /// Its key.
        key: String,
        /// By what.
        why: String,
    },
    /// The target node may not hold device connections.
    #[error("node {node} may not hold device {device:?}: {why}")]
    DeviceOwnerNotEligible {
        /// Device.
        device: String,
        /// Node.
        node: NodeId,
        /// Why not.
        why: String,
    },
    /// A compare-and-set lost: the device changed owner since the proposer looked.
    #[error("device {device:?} changed owner since the proposer looked: held by {}, expected {}", holder(.current), holder(.expected))]
    DeviceOwnerChanged {
        /// Device.
        device: String,
        /// Owner the proposer expected.
        expected: Option<NodeId>,
        /// Actual owner.
        current: Option<NodeId>,
    },
}

/// Placement `name`, if its epoch is still `epoch` (the compare of a compare-and-set).
fn placement_at<'a>(
    placements: &'a mut BTreeMap<String, Placement>,
    name: &str,
    epoch: u64,
) -> Result<&'a mut Placement, CommandError> {
    let p = placements
        .get_mut(name)
        .ok_or_else(|| not_found("placement", name))?;
    if p.epoch != epoch {
        return Err(CommandError::StaleEpoch {
            name: name.to_string(),
            expected: epoch,
            current: p.epoch,
        });
    }
    Ok(p)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut_at_char(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn holder(owner: &Option<NodeId>) -> String {
    match owner {
        Some(n) => format!("node {n}"),
        None => "no node".into(),
    }
}

/// A management IP must be one a backend connection can go to.
pub fn check_mgmt_ip(ip: &IpAddr) -> Result<(), CommandError> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(
            "management IP",
            &ip.to_string(),
            "must be a unicast address",
        ));
    }
    Ok(())
}

fn invalid(what: &str, value: &str, why: &str) -> CommandError {
    CommandError::Invalid {
        what: what.into(),
        value: value.into(),
        why: why.into(),
    }
}
fn exists(what: &str, key: impl ToString) -> CommandError {
    CommandError::Exists {
        what: what.into(),
        key: key.to_string(),
    }
}
fn not_found(what: &str, key: impl ToString) -> CommandError {
    CommandError::NotFound {
        what: what.into(),
        key: key.to_string(),
    }
}

/// Checks a node, role, placement or service name: 1..=63 of `[a-z0-9-]`, no leading/trailing `-`.
pub fn check_name(what: &str, name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(what, name, "must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(what, name, "only a-z, 0-9 and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid(what, name, "must not start or end with '-'"));
    }
    Ok(())
}

/// Checks a device id: 1..=128 printable characters without spaces or commas.
pub fn check_device_id(id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > 128 {
        return Err(invalid("device id", id, "must be 1 to 128 characters"));
    }
    if !id.chars().all(|c| c.is_ascii_graphic() && c != ',') {
        return Err(invalid(
            "device id",
            id,
            "only printable ASCII without spaces or commas",
        ));
    }
    Ok(())
}

/// Checks a device address: `ip`, `ip:port`, `[v6]:port`, `host` or `host:port` with a non-zero port.
pub fn check_device_addr(addr: &str) -> Result<(), CommandError> {
    if addr.parse::<IpAddr>().is_ok() || addr.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (addr, None),
    };
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(invalid("device address", addr, "port must be 1..65535")),
            Ok(_) => {}
        }
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !host_ok {
        return Err(invalid(
            "device address",
            addr,
            "expected ip, ip:port, host or host:port",
        ));
    }
    Ok(())
}

/// Checks `ip/prefix` with a prefix valid for the address family.
pub fn check_vip_address(address: &str) -> Result<(), CommandError> {
    let Some((ip, prefix)) = address.split_once('/') else {
        return Err(invalid("VIP address", address, "expected ip/prefix"));
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| invalid("VIP address", address, "not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => Ok(()),
        _ => Err(invalid(
            "VIP address",
            address,
            &format!("prefix must be 0..={max}"),
        )),
    }
}

/// The bare IP of a VIP address written `ip/prefix`.
pub fn vip_ip(address: &str) -> Option<IpAddr> {
    address.split_once('/').and_then(|(ip, _)| ip.parse().ok())
}

impl Fabric {
    /// Validates `cmd` against the current state and applies it; on error nothing changed.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, CommandError> {
        match cmd {
            Command::RegisterNode {
                id,
                name,
                raft_addr,
                mgmt_ip,
                roles,
                at,
            } => {
                check_name("node name", name)?;
                roles.iter().try_for_each(|r| check_name("role", r))?;
                if raft_addr.is_empty() {
                    return Err(invalid("node address", raft_addr, "must not be empty"));
                }
                if let Some(ip) = mgmt_ip {
                    check_mgmt_ip(ip)?;
                }
                if self.nodes.contains_key(id) {
                    return Err(exists("node", id));
                }
                if self.nodes.values().any(|n| &n.name == name) {
                    return Err(exists("node name", name));
                }
                self.nodes.insert(
                    *id,
                    NodeRecord {
                        name: name.clone(),
                        raft_addr: raft_addr.clone(),
                        mgmt_ip: *mgmt_ip,
                        roles: roles.clone(),
                        admin_state: AdminState::Active,
                        joined_at: *at,
                    },
                );
                Ok(Outcome::Done)
            }
            Command::RemoveNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return Err(not_found("node", id));
                }
                for p in self.placements.values_mut() {
                    p.refused.remove(id);
                }
                // Placements keep their owner: it may still hold a running lease, and only the
                // leader's lease book knows when that has certainly run out.
                for d in self.devices.values_mut() {
                    if d.owner == Some(*id) {
                        d.owner = None;
                        d.status = DeviceStatus::Unassigned;
                    }
                }
                Ok(Outcome::Done)
            }
            Command::SetRoles { id, roles } => {
                roles.iter().try_for_each(|r| check_name("role", r))?;
                self.node_mut(*id)?.roles = roles.clone();
                Ok(Outcome::Done)
            }
            Command::SetAdminState { id, state } => {
                self.node_mut(*id)?.admin_state = *state;
                Ok(Outcome::Done)
            }
            Command::SetMgmtIp { id, mgmt_ip } => {
                if let Some(ip) = mgmt_ip {
                    check_mgmt_ip(ip)?;
                }
                self.node_mut(*id)?.mgmt_ip = *mgmt_ip;
                Ok(Outcome::Done)
            }
            Command::AddPlacement {
                name,
                kind,
                eligible_roles,
            } => {
                check_name("placement name", name)?;
                if eligible_roles.is_empty() {
                    return Err(invalid(
                        "eligible roles",
                        "",
                        "at least one role is required",
                    ));
                }
                eligible_roles
                    .iter()
                    .try_for_each(|r| check_name("role", r))?;
                if self.placements.contains_key(name) {
                    return Err(exists("placement", name));
                }
                match kind {
                    PlacementKind::Vip { address, interface } => {
                        check_vip_address(address)?;
                        if interface.is_empty()
                            || interface.len() > 15
                            || interface.contains(['/', ' '])
                        {
                            return Err(invalid(
                                "interface",
                                interface,
                                "not a Linux interface name",
                            ));
                        }
                        let ip = vip_ip(address);
                        let taken = self.placements.iter().find(|(_, p)| match &p.kind {
                            PlacementKind::Vip { address: other, .. } => vip_ip(other) == ip,
                            _ => false,
                        });
                        if let Some((other, _)) = taken {
                            return Err(CommandError::InUse {
                                what: "VIP address".into(),
                                key: address.clone(),
                                why: format!("placement {other:?} has it"),
                            });
                        }
                    }
                    PlacementKind::Singleton { service } => check_name("service name", service)?,
                }
                self.placements.insert(
                    name.clone(),
                    Placement {
                        kind: kind.clone(),
                        eligible_roles: eligible_roles.clone(),
                        owner: None,
                        epoch: 0,
                        refused: BTreeMap::new(),
                    },
                );
                Ok(Outcome::Done)
            }
            Command::RemovePlacement { name } => {
                let p = self
                    .placements
                    .get(name)
                    .ok_or_else(|| not_found("placement", name))?;
                if let Some(owner) = p.owner {
                    return Err(CommandError::InUse {
                        what: "placement".into(),
                        key: name.clone(),
                        why: format!("held by node {owner}; release it first"),
                    });
                }
                self.placements.remove(name);
                Ok(Outcome::Done)
            }
            Command::GrantPlacement {
                name,
                to,
                expected_epoch,
            } => {
                let node = self.nodes.get(to).ok_or_else(|| not_found("node", to))?;
                let p = placement_at(&mut self.placements, name, *expected_epoch)?;
                if node.admin_state != AdminState::Active {
                    return Err(CommandError::NotEligible {
                        name: name.clone(),
                        node: *to,
                        why: "node is draining".into(),
                    });
                }
                if p.eligible_roles.is_disjoint(&node.roles) {
                    return Err(CommandError::NotEligible {
                        name: name.clone(),
                        node: *to,
                        why: format!("needs one of the roles {:?}", p.eligible_roles),
                    });
                }
                if p.owner == Some(*to) {
                    return Err(exists("owner of placement", format!("{name} on {to}")));
                }
                p.owner = Some(*to);
                p.epoch += 1;
                // A new try: the node refuses again if it still cannot hold it.
                p.refused.remove(to);
                Ok(Outcome::Epoch(p.epoch))
            }
            Command::ReleasePlacement { name, epoch } => {
                let p = placement_at(&mut self.placements, name, *epoch)?;
                if p.owner.is_none() {
                    return Err(not_found("owner of placement", name));
                }
                p.owner = None;
                p.epoch += 1;
                Ok(Outcome::Epoch(p.epoch))
            }
            Command::RefusePlacement {
                name,
                node,
                epoch,
                reason,
                at,
            } => {
                let p = placement_at(&mut self.placements, name, *epoch)?;
                if p.owner != Some(*node) {
                    return Err(CommandError::NotEligible {
                        name: name.clone(),
                        node: *node,
                        why: format!("cannot refuse it: it is held by {}", holder(&p.owner)),
                    });
                }
                let reason = match reason.trim() {
                    "" => "no reason given".to_string(),
                    r => cut_at_char(r, MAX_REFUSAL_REASON).to_string(),
                };
                p.owner = None;
                p.epoch += 1;
                p.refused.insert(*node, Refusal { reason, at: *at });
                Ok(Outcome::Epoch(p.epoch))
            }
            Command::AddDevices { devices, at } => {
                if devices.is_empty() {
                    return Err(invalid("device list", "", "empty"));
                }
                if devices.len() > MAX_DEVICES_PER_COMMAND {
                    return Err(invalid(
                        "device list",
                        &devices.len().to_string(),
                        &format!("at most {MAX_DEVICES_PER_COMMAND} devices per command"),
                    ));
                }
                let mut seen = BTreeSet::new();
                for d in devices {
                    check_device_id(&d.id)?;
                    check_device_addr(&d.addr)?;
                    if self.devices.contains_key(&d.id) || !seen.insert(d.id.as_str()) {
                        return Err(exists("device", &d.id));
                    }
                }
                for d in devices {
                    self.devices.insert(
                        d.id.clone(),
                        Device {
                            addr: d.addr.clone(),
                            mode: d.mode,
                            owner: None,
                            status: DeviceStatus::Unassigned,
                            since: *at,
                        },
                    );
                }
                Ok(Outcome::DevicesAdded(devices.len() as u64))
            }
            Command::RemoveDevice { id } => {
                self.devices
                    .remove(id)
                    .ok_or_else(|| not_found("device", id))?;
                Ok(Outcome::Done)
            }
            Command::PutService { name, spec } => {
                check_name("service name", name)?;
                if spec.command.first().is_none_or(|p| p.is_empty()) {
                    return Err(invalid("service command", name, "must name a program"));
                }
                if let Some(hc) = &spec.health_check
                    && hc.first().is_none_or(|p| p.is_empty())
                {
                    return Err(invalid("health check", name, "must name a program"));
                }
                if let ServiceScope::Vip(vip) = &spec.scope {
                    match self.placements.get(vip) {
                        Some(Placement {
                            kind: PlacementKind::Vip { .. },
                            ..
                        }) => {}
                        _ => return Err(not_found("VIP", vip)),
                    }
                }
                spec.roles.iter().try_for_each(|r| check_name("role", r))?;
                let singleton = spec.scope == ServiceScope::Singleton;
                if let Some(old) = self.services.get(name)
                    && (old.scope == ServiceScope::Singleton) != singleton
                {
                    return Err(invalid(
                        "service scope",
                        name,
                        "cannot change to or from singleton; remove the service first",
                    ));
                }
                if singleton {
                    if spec.roles.is_empty() {
                        return Err(invalid(
                            "service roles",
                            name,
                            "a singleton needs at least one eligible role",
                        ));
                    }
                    match self.placements.get(name) {
                        None => {}
                        Some(Placement {
                            kind: PlacementKind::Singleton { service },
                            ..
                        }) if service == name => {}
                        Some(_) => return Err(exists("placement", name)),
                    }
                    // The singleton's placement has the service's name; a changed role set
                    // applies to the next grant (the current owner keeps it: no failback).
                    let placement = self.placements.entry(name.clone()).or_insert(Placement {
                        kind: PlacementKind::Singleton {
                            service: name.clone(),
                        },
                        eligible_roles: BTreeSet::new(),
                        owner: None,
                        epoch: 0,
                        refused: BTreeMap::new(),
                    });
                    placement.eligible_roles = spec.roles.clone();
                    // A changed spec may well run where the old one could not.
                    placement.refused.clear();
                }
                self.services.insert(name.clone(), spec.clone());
                Ok(Outcome::Done)
            }
            Command::RemoveService { name } => {
                if !self.services.contains_key(name) {
                    return Err(not_found("service", name));
                }
                // Its own singleton placement goes with it; another placement running it blocks.
                let user = self.placements.iter().find(|(pname, p)| {
                    *pname != name
                        && matches!(&p.kind, PlacementKind::Singleton { service } if service == name)
                });
                if let Some((pname, _)) = user {
                    return Err(CommandError::InUse {
                        what: "service".into(),
                        key: name.clone(),
                        why: format!("singleton placement {pname:?} runs it"),
                    });
                }
                if matches!(
                    self.placements.get(name),
                    Some(Placement { kind: PlacementKind::Singleton { service }, .. }) if service == name
                ) {
                    self.placements.remove(name);
                }
                self.services.remove(name);
                Ok(Outcome::Done)
            }
            Command::AssignDevices { assignments, at } => self.assign_devices(assignments, *at),
            Command::ReportDeviceStatus { node, reports, at } => {
                self.report_device_status(*node, reports, *at)
            }
        }
    }

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

/// Refuses an empty batch or one over [`MAX_DEVICES_PER_COMMAND`].
fn check_device_batch(what: &str, len: usize) -> Result<(), CommandError> {
    if len == 0 {
        return Err(invalid(what, "", "empty"));
    }
    if len > MAX_DEVICES_PER_COMMAND {
        return Err(invalid(
            what,
            &len.to_string(),
            &format!("at most {MAX_DEVICES_PER_COMMAND} devices per command"),
        ));
    }
    Ok(())
}

// Device assignment and status: validate the whole batch first, then change; never panic.
impl Fabric {
    /// The registered node `id`, for a command that changes it.
    fn node_mut(&mut self, id: NodeId) -> Result<&mut NodeRecord, CommandError> {
        self.nodes.get_mut(&id).ok_or_else(|| not_found("node", id))
    }

    fn assign_devices(
        &mut self,
        assignments: &[DeviceAssignment],
        at: Millis,
    ) -> Result<Outcome, CommandError> {
        check_device_batch("assignment list", assignments.len())?;
        let mut seen = BTreeSet::new();
        for a in assignments {
            let device = self
                .devices
                .get(&a.device)
                .ok_or_else(|| not_found("device", &a.device))?;
            if !seen.insert(a.device.as_str()) {
                return Err(invalid("assignment list", &a.device, "device listed twice"));
            }
            if device.owner != a.from {
                return Err(CommandError::DeviceOwnerChanged {
                    device: a.device.clone(),
                    expected: a.from,
                    current: device.owner,
                });
            }
            if a.to == a.from {
                let why = match a.to {
                    Some(n) => format!("already held by node {n}"),
                    None => "already unassigned".into(),
                };
                return Err(invalid("device assignment", &a.device, &why));
            }
            if let Some(to) = a.to {
                let refuse = |why: &str| CommandError::DeviceOwnerNotEligible {
                    device: a.device.clone(),
                    node: to,
                    why: why.into(),
                };
                let node = self
                    .nodes
                    .get(&to)
                    .ok_or_else(|| refuse("not a registered node"))?;
                if node.admin_state != AdminState::Active {
                    return Err(refuse("node is draining"));
                }
                if !node.roles.contains(DEVICE_ROLE) {
                    return Err(refuse(&format!("needs the role {DEVICE_ROLE:?}")));
                }
            }
        }
        for a in assignments {
            if let Some(d) = self.devices.get_mut(&a.device) {
                d.owner = a.to;
                d.status = match a.to {
                    Some(_) => DeviceStatus::Connecting,
                    None => DeviceStatus::Unassigned,
                };
                d.since = at;
            }
        }
        Ok(Outcome::DevicesAssigned(assignments.len() as u64))
    }

    fn report_device_status(
        &mut self,
        node: NodeId,
        reports: &[DeviceReport],
        at: Millis,
    ) -> Result<Outcome, CommandError> {
        check_device_batch("status report", reports.len())?;
        let mut seen = BTreeSet::new();
        for r in reports {
            if !matches!(r.status, DeviceStatus::Up | DeviceStatus::Down) {
                return Err(invalid(
                    "device status",
                    &r.status.to_string(),
                    &format!("a node reports only up or down (device {:?})", r.device),
                ));
            }
            if !seen.insert(r.device.as_str()) {
                return Err(invalid("status report", &r.device, "device listed twice"));
            }
        }
        let (mut changed, mut stale) = (0u64, 0u64);
        for r in reports {
            match self.devices.get_mut(&r.device) {
                Some(d) if d.owner == Some(node) => {
                    if d.status != r.status {
                        d.status = r.status;
                        d.since = at;
                        changed += 1;
                    }
                }
                _ => stale += 1,
            }
        }
        Ok(Outcome::DevicesReported { changed, stale })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(r: &[&str]) -> BTreeSet<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    fn register(id: NodeId, name: &str, r: &[&str]) -> Command {
        Command::RegisterNode {
            id,
            name: name.into(),
            raft_addr: format!("127.0.0.1:{}", 7000 + id),
            mgmt_ip: None,
            roles: roles(r),
            at: 1,
        }
    }

    fn dev(id: &str, addr: &str) -> NewDevice {
        NewDevice {
            id: id.into(),
            addr: addr.into(),
            mode: DeviceMode::SpaceInitiated,
        }
    }

    fn vip(name: &str, addr: &str, r: &[&str]) -> Command {
        Command::AddPlacement {
            name: name.into(),
            kind: PlacementKind::Vip {
                address: addr.into(),
                interface: "eth0".into(),
            },
            eligible_roles: roles(r),
        }
    }

    /// A fabric with two nodes (1: ha+app, 2: db), a cluster VIP and a db VIP.
    fn base() -> Fabric {
        let mut f = Fabric::default();
        for c in [
            register(1, "n1", &["ha", "app"]),
            register(2, "n2", &["db"]),
            vip("cluster", "10.0.0.100/24", &["ha"]),
            vip("db", "10.0.0.101/24", &["db"]),
        ] {
            f.apply(&c).unwrap();
        }
        f
    }

    /// Applies a command expected to fail and checks the fabric did not change.
    fn refused(f: &mut Fabric, c: Command) -> CommandError {
        let before = f.clone();
        let err = f.apply(&c).expect_err("command should be refused");
        assert_eq!(*f, before, "a refused command changed the fabric: {c:?}");
        err
    }

    #[test]
    fn register_node_validation() {
        let mut f = base();
        assert!(matches!(
            refused(&mut f, register(1, "n9", &[])),
            CommandError::Exists { .. }
        ));
        assert!(matches!(
            refused(&mut f, register(9, "n1", &[])),
            CommandError::Exists { .. }
        ));
        assert!(matches!(
            refused(&mut f, register(9, "N9", &[])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, register(9, "n9", &["Bad Role"])),
            CommandError::Invalid { .. }
        ));
        let mut c = register(9, "n9", &[]);
        if let Command::RegisterNode { raft_addr, .. } = &mut c {
            raft_addr.clear();
        }
        assert!(matches!(refused(&mut f, c), CommandError::Invalid { .. }));
        f.apply(&register(9, "n9", &["app"])).unwrap();
        assert_eq!(f.nodes[&9].roles, roles(&["app"]));
    }

    #[test]
    fn remove_node_releases_devices_but_not_leased_placements() {
        let mut f = base();
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 0,
        })
        .unwrap();
        f.apply(&Command::AddDevices {
            devices: vec![dev("d1", "10.1.0.1")],
            at: 5,
        })
        .unwrap();
        f.devices.get_mut("d1").unwrap().owner = Some(1);
        refused(&mut f, Command::RemoveNode { id: 42 });
        f.apply(&Command::RemoveNode { id: 1 }).unwrap();
        assert_eq!(
            f.placements["cluster"].owner,
            Some(1),
            "lease expiry, not removal, frees a placement"
        );
        assert_eq!(f.placements["cluster"].epoch, 1);
        assert_eq!(f.devices["d1"].owner, None);
        assert_eq!(f.devices["d1"].status, DeviceStatus::Unassigned);
    }

    #[test]
    fn roles_and_admin_state_validation() {
        let mut f = base();
        refused(
            &mut f,
            Command::SetRoles {
                id: 7,
                roles: roles(&["app"]),
            },
        );
        refused(
            &mut f,
            Command::SetRoles {
                id: 1,
                roles: roles(&["-x"]),
            },
        );
        refused(
            &mut f,
            Command::SetAdminState {
                id: 7,
                state: AdminState::Draining,
            },
        );
        f.apply(&Command::SetAdminState {
            id: 1,
            state: AdminState::Draining,
        })
        .unwrap();
        let err = refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 0,
            },
        );
        assert!(matches!(err, CommandError::NotEligible { .. }), "{err}");
    }

    #[test]
    fn mgmt_ip_is_set_cleared_and_checked() {
        let mut f = base();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        f.apply(&Command::SetMgmtIp {
            id: 1,
            mgmt_ip: Some(ip),
        })
        .unwrap();
        assert_eq!(f.nodes[&1].mgmt_ip, Some(ip));
        // Unknown node, and addresses no connection can go to: refused, nothing changed.
        refused(
            &mut f,
            Command::SetMgmtIp {
                id: 7,
                mgmt_ip: Some(ip),
            },
        );
        for bad in ["0.0.0.0", "::", "224.0.0.1"] {
            let err = refused(
                &mut f,
                Command::SetMgmtIp {
                    id: 1,
                    mgmt_ip: Some(bad.parse().unwrap()),
                },
            );
            assert!(err.to_string().contains("management IP"), "{err}");
        }
        assert_eq!(f.nodes[&1].mgmt_ip, Some(ip));
        f.apply(&Command::SetMgmtIp {
            id: 1,
            mgmt_ip: None,
        })
        .unwrap();
        assert_eq!(f.nodes[&1].mgmt_ip, None);
    }

    #[test]
    fn add_placement_validation() {
        let mut f = base();
        assert!(matches!(
            refused(&mut f, vip("cluster", "10.0.0.9/24", &["ha"])),
            CommandError::Exists { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("other", "10.0.0.100/16", &["ha"])),
            CommandError::InUse { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "10.0.0.9", &["ha"])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "10.0.0.9/33", &["ha"])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "nope/24", &["ha"])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("v", "10.0.0.9/24", &[])),
            CommandError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&mut f, vip("V!", "10.0.0.9/24", &["ha"])),
            CommandError::Invalid { .. }
        ));
        let bad_if = Command::AddPlacement {
            name: "v".into(),
            kind: PlacementKind::Vip {
                address: "10.0.0.9/24".into(),
                interface: "".into(),
            },
            eligible_roles: roles(&["ha"]),
        };
        assert!(matches!(
            refused(&mut f, bad_if),
            CommandError::Invalid { .. }
        ));
        f.apply(&vip("v6", "fd00::100/64", &["ha"])).unwrap();
        f.apply(&Command::AddPlacement {
            name: "poller".into(),
            kind: PlacementKind::Singleton {
                service: "job-poller".into(),
            },
            eligible_roles: roles(&["app"]),
        })
        .unwrap();
    }

    #[test]
    fn grant_and_release_fence_with_epochs() {
        let mut f = base();
        // Ineligible: node 2 has only `db`.
        let err = refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 2,
                expected_epoch: 0,
            },
        );
        assert!(matches!(err, CommandError::NotEligible { .. }));
        refused(
            &mut f,
            Command::GrantPlacement {
                name: "nope".into(),
                to: 1,
                expected_epoch: 0,
            },
        );
        refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 9,
                expected_epoch: 0,
            },
        );
        assert_eq!(
            f.apply(&Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 0
            }),
            Ok(Outcome::Epoch(1))
        );
        // A proposer that looked before the grant loses the compare-and-set.
        let err = refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 0,
            },
        );
        assert!(matches!(err, CommandError::StaleEpoch { current: 1, .. }));
        // Granting to the current owner again is refused.
        refused(
            &mut f,
            Command::GrantPlacement {
                name: "cluster".into(),
                to: 1,
                expected_epoch: 1,
            },
        );
        // Release with an old epoch is refused; with the current one it works and bumps the epoch.
        refused(
            &mut f,
            Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 0,
            },
        );
        assert_eq!(
            f.apply(&Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 1
            }),
            Ok(Outcome::Epoch(2))
        );
        refused(
            &mut f,
            Command::ReleasePlacement {
                name: "cluster".into(),
                epoch: 2,
            },
        );
        refused(
            &mut f,
            Command::RemovePlacement {
                name: "nope".into(),
            },
        );
        f.apply(&Command::GrantPlacement {
            name: "db".into(),
            to: 2,
            expected_epoch: 0,
        })
        .unwrap();
        assert!(matches!(
            refused(&mut f, Command::RemovePlacement { name: "db".into() }),
            CommandError::InUse { .. }
        ));
        f.apply(&Command::RemovePlacement {
            name: "cluster".into(),
        })
        .unwrap();
    }

    #[test]
    fn a_refused_placement_is_released_and_remembers_who_refused() {
        let mut f = base();
        let refuse = |node: NodeId, epoch: u64, reason: &str| Command::RefusePlacement {
            name: "cluster".into(),
            node,
            epoch,
            reason: reason.into(),
            at: 1_000,
        };
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 0,
        })
        .unwrap();
        // Only the owner, at its epoch, may refuse.
        assert!(matches!(
            refused(&mut f, refuse(2, 1, "x")),
            CommandError::NotEligible { node: 2, .. }
        ));
        assert!(matches!(
            refused(&mut f, refuse(1, 0, "x")),
            CommandError::StaleEpoch { current: 1, .. }
        ));
        let long = format!("interface eth9 does not exist {}", "é".repeat(400));
        assert_eq!(f.apply(&refuse(1, 1, &long)), Ok(Outcome::Epoch(2)));
        let p = &f.placements["cluster"];
        assert_eq!(p.owner, None);
        let r = &p.refused[&1];
        assert_eq!(r.at, 1_000);
        assert!(r.reason.starts_with("interface eth9 does not exist"));
        assert!(r.reason.len() <= MAX_REFUSAL_REASON && r.reason.len() > 250);
        // Nothing to refuse any more.
        refused(&mut f, refuse(1, 2, "x"));
        // A new grant to the node is a new try: its old refusal goes.
        f.apply(&Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 2,
        })
        .unwrap();
        assert!(f.placements["cluster"].refused.is_empty());
        assert_eq!(f.apply(&refuse(1, 3, "  ")), Ok(Outcome::Epoch(4)));
        assert_eq!(
            f.placements["cluster"].refused[&1].reason,
            "no reason given"
        );
        // Removing the node forgets its refusals.
        f.apply(&Command::RemoveNode { id: 1 }).unwrap();
        assert!(f.placements["cluster"].refused.is_empty());
    }

    #[test]
    fn add_devices_is_all_or_nothing() {
        let mut f = base();
        let ok = vec![
            dev("d1", "10.1.0.1"),
            dev("d2", "10.1.0.2:830"),
            dev("d3", "router-3.lab:22"),
        ];
        assert_eq!(
            f.apply(&Command::AddDevices { devices: ok, at: 7 }),
            Ok(Outcome::DevicesAdded(3))
        );
        assert_eq!(f.devices["d2"].since, 7);
        // One bad device in a batch: nothing of the batch lands.
        for bad in [
            dev("d1", "10.1.0.9"),
            dev("d 9", "10.1.0.9"),
            dev("", "10.1.0.9"),
            dev("d9", "10.1.0.9:0"),
            dev("d9", "10.1.0.9:99999"),
            dev("d9", "bad host"),
            dev("d9", ""),
        ] {
            refused(
                &mut f,
                Command::AddDevices {
                    devices: vec![dev("d8", "10.1.0.8"), bad],
                    at: 8,
                },
            );
        }
        refused(
            &mut f,
            Command::AddDevices {
                devices: vec![dev("d8", "10.1.0.8"), dev("d8", "10.1.0.8")],
                at: 8,
            },
        );
        refused(
            &mut f,
            Command::AddDevices {
                devices: vec![],
                at: 8,
            },
        );
        let too_many = (0..=MAX_DEVICES_PER_COMMAND)
            .map(|i| dev(&format!("x{i}"), "10.2.0.1"))
            .collect();
        refused(
            &mut f,
            Command::AddDevices {
                devices: too_many,
                at: 8,
            },
        );
        f.apply(&Command::AddDevices {
            devices: vec![dev("v6", "[fd00::1]:22"), dev("v6b", "fd00::2")],
            at: 9,
        })
        .unwrap();
        refused(&mut f, Command::RemoveDevice { id: "nope".into() });
        f.apply(&Command::RemoveDevice { id: "d1".into() }).unwrap();
        assert_eq!(f.devices.len(), 4);
    }

    #[test]
    fn service_validation() {
        let mut f = base();
        let spec = |cmd: &[&str], scope: ServiceScope| ServiceSpec {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            scope,
            health_check: None,
            roles: BTreeSet::new(),
        };
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: spec(&[], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: spec(&[""], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "Web".into(),
                spec: spec(&["x"], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: spec(&["x"], ServiceScope::Vip("nope".into())),
            },
        );
        let mut hc = spec(&["x"], ServiceScope::EveryNode);
        hc.health_check = Some(vec![]);
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: hc,
            },
        );
        f.apply(&Command::PutService {
            name: "web".into(),
            spec: spec(&["x"], ServiceScope::Vip("cluster".into())),
        })
        .unwrap();
        // A singleton needs eligible roles; with them, its placement comes with it.
        refused(
            &mut f,
            Command::PutService {
                name: "job-poller".into(),
                spec: spec(&["p"], ServiceScope::Singleton),
            },
        );
        let mut single = spec(&["p"], ServiceScope::Singleton);
        single.roles = roles(&["app"]);
        f.apply(&Command::PutService {
            name: "job-poller".into(),
            spec: single.clone(),
        })
        .unwrap();
        let own = &f.placements["job-poller"];
        assert_eq!(
            own.kind,
            PlacementKind::Singleton {
                service: "job-poller".into()
            }
        );
        assert_eq!(own.eligible_roles, roles(&["app"]));
        assert_eq!(own.owner, None);
        // Scope changes to or from singleton are refused.
        refused(
            &mut f,
            Command::PutService {
                name: "job-poller".into(),
                spec: spec(&["p"], ServiceScope::EveryNode),
            },
        );
        refused(
            &mut f,
            Command::PutService {
                name: "web".into(),
                spec: single.clone(),
            },
        );
        f.apply(&Command::AddPlacement {
            name: "poller".into(),
            kind: PlacementKind::Singleton {
                service: "job-poller".into(),
            },
            eligible_roles: roles(&["app"]),
        })
        .unwrap();
        assert!(matches!(
            refused(
                &mut f,
                Command::RemoveService {
                    name: "job-poller".into()
                }
            ),
            CommandError::InUse { .. }
        ));
        refused(
            &mut f,
            Command::RemoveService {
                name: "nope".into(),
            },
        );
        f.apply(&Command::RemoveService { name: "web".into() })
            .unwrap();
        // Once the other placement is gone, removing the service removes its own placement.
        f.apply(&Command::RemovePlacement {
            name: "poller".into(),
        })
        .unwrap();
        f.apply(&Command::RemoveService {
            name: "job-poller".into(),
        })
        .unwrap();
        assert!(!f.placements.contains_key("job-poller"));
        assert!(f.services.is_empty());
    }

    /// A pseudo-random command log (fixed seed) applied twice gives the same fabric, and the
    /// serialized fabric round-trips.
    #[test]
    fn apply_is_deterministic_and_snapshot_round_trips() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut log = Vec::new();
        for i in 0..3000u64 {
            let c = match next() % 7 {
                0 => register(next() % 8, &format!("n{}", next() % 8), &["ha", "app"]),
                1 => vip(
                    &format!("v{}", next() % 5),
                    &format!("10.0.{}.1/24", next() % 5),
                    &["ha"],
                ),
                2 => Command::GrantPlacement {
                    name: format!("v{}", next() % 5),
                    to: next() % 8,
                    expected_epoch: next() % 4,
                },
                3 => Command::ReleasePlacement {
                    name: format!("v{}", next() % 5),
                    epoch: next() % 4,
                },
                4 => Command::AddDevices {
                    devices: vec![dev(&format!("d{}", next() % 500), "10.9.0.1")],
                    at: i,
                },
                5 => Command::RefusePlacement {
                    name: format!("v{}", next() % 5),
                    node: next() % 8,
                    epoch: next() % 4,
                    reason: "eth0 is missing".into(),
                    at: i,
                },
                _ => Command::RemoveNode { id: next() % 8 },
            };
            log.push(c);
        }
        let run = |log: &[Command]| {
            let mut f = Fabric::default();
            let results: Vec<_> = log.iter().map(|c| f.apply(c)).collect();
            (f, results)
        };
        let (a, ra) = run(&log);
        let (b, rb) = run(&log);
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert!(ra.iter().any(|r| r.is_ok()) && ra.iter().any(|r| r.is_err()));
        let bytes = crate::codec::encode(&a).unwrap();
        let back: Fabric = crate::codec::decode(&bytes).unwrap();
        assert_eq!(a, back);
    }

    #[test]
    fn name_and_address_checks() {
        assert!(check_name("n", "a").is_ok());
        assert!(check_name("n", &"a".repeat(63)).is_ok());
        assert!(check_name("n", &"a".repeat(64)).is_err());
        assert!(check_name("n", "a_b").is_err());
        assert!(check_device_addr("[fd00::1]:830").is_ok());
        assert!(check_device_addr("host-1.example").is_ok());
        assert!(check_device_addr("host_1").is_err());
        assert!(check_device_addr(":22").is_err());
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    fn node(id: NodeId, roles: &[&str]) -> Command {
        Command::RegisterNode {
            id,
            name: format!("n{id}"),
            raft_addr: format!("127.0.0.1:{}", 7000 + id),
            mgmt_ip: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            at: 1,
        }
    }

    fn add(ids: &[&str]) -> Command {
        Command::AddDevices {
            devices: ids
                .iter()
                .map(|id| NewDevice {
                    id: id.to_string(),
                    addr: "10.1.0.1".into(),
                    mode: DeviceMode::SpaceInitiated,
                })
                .collect(),
            at: 2,
        }
    }

    fn mv(device: &str, from: Option<NodeId>, to: Option<NodeId>) -> DeviceAssignment {
        DeviceAssignment {
            device: device.into(),
            from,
            to,
        }
    }

    fn assign(assignments: Vec<DeviceAssignment>, at: Millis) -> Command {
        Command::AssignDevices { assignments, at }
    }

    fn report(node: NodeId, r: &[(&str, DeviceStatus)], at: Millis) -> Command {
        Command::ReportDeviceStatus {
            node,
            reports: r
                .iter()
                .map(|(d, s)| DeviceReport {
                    device: d.to_string(),
                    status: *s,
                })
                .collect(),
            at,
        }
    }

    /// Nodes 1, 2: app; 3: db only; 4: app but draining. Devices d1..d3, unassigned.
    fn fabric() -> Fabric {
        let mut f = Fabric::default();
        for c in [
            node(1, &["app"]),
            node(2, &["ha", "app"]),
            node(3, &["db"]),
            node(4, &["app"]),
            Command::SetAdminState {
                id: 4,
                state: AdminState::Draining,
            },
            add(&["d1", "d2", "d3"]),
        ] {
            f.apply(&c).unwrap();
        }
        f
    }

    #[test]
    fn assign_devices_sets_owner_status_and_since() {
        let mut f = fabric();
        assert_eq!(
            f.apply(&assign(
                vec![mv("d1", None, Some(1)), mv("d2", None, Some(2))],
                10
            )),
            Ok(Outcome::DevicesAssigned(2))
        );
        assert_eq!(f.devices["d1"].owner, Some(1));
        assert_eq!(f.devices["d1"].status, DeviceStatus::Connecting);
        assert_eq!(f.devices["d1"].since, 10);
        assert_eq!(f.devices["d3"].status, DeviceStatus::Unassigned);
        assert_eq!(f.devices["d3"].since, 2, "untouched device keeps its time");
        // Moving on and taking back.
        f.apply(&assign(
            vec![mv("d1", Some(1), Some(2)), mv("d2", Some(2), None)],
            11,
        ))
        .unwrap();
        assert_eq!(f.devices["d1"].owner, Some(2));
        assert_eq!(f.devices["d2"].owner, None);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Unassigned);
        assert_eq!(f.devices["d2"].since, 11);
        assert_eq!(
            f.device_counts(),
            BTreeMap::from([(1, 0), (2, 1), (3, 0), (4, 0)])
        );
    }

    /// Each bad batch is refused whole: the good assignment next to the bad one does not land
    /// either, and the error names the device and the node.
    #[test]
    fn assign_devices_is_all_or_nothing() {
        let mut base = fabric();
        base.apply(&assign(vec![mv("d3", None, Some(2))], 5))
            .unwrap();
        let good = mv("d1", None, Some(1));
        let too_many = (0..=MAX_DEVICES_PER_COMMAND)
            .map(|_| mv("d1", None, Some(1)))
            .collect();
        type Case = (&'static str, Vec<DeviceAssignment>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "unknown device",
                vec![good.clone(), mv("nope", None, Some(1))],
                "no device \"nope\"",
            ),
            (
                "unknown node",
                vec![good.clone(), mv("d2", None, Some(9))],
                "node 9 may not hold device \"d2\": not a registered node",
            ),
            (
                "db-only node",
                vec![good.clone(), mv("d2", None, Some(3))],
                "node 3 may not hold device \"d2\": needs the role \"app\"",
            ),
            (
                "draining node",
                vec![good.clone(), mv("d2", None, Some(4))],
                "node 4 may not hold device \"d2\": node is draining",
            ),
            (
                "device twice",
                vec![good.clone(), mv("d1", None, Some(2))],
                "\"d1\": device listed twice",
            ),
            (
                "stale owner",
                vec![good.clone(), mv("d3", Some(1), Some(1))],
                "device \"d3\" changed owner since the proposer looked: held by node 2, expected node 1",
            ),
            (
                "stale unowned",
                vec![good.clone(), mv("d3", None, Some(1))],
                "device \"d3\" changed owner since the proposer looked: held by node 2, expected no node",
            ),
            (
                "no change",
                vec![good.clone(), mv("d3", Some(2), Some(2))],
                "\"d3\": already held by node 2",
            ),
            (
                "unassign unassigned",
                vec![good.clone(), mv("d2", None, None)],
                "\"d2\": already unassigned",
            ),
            ("empty", vec![], "invalid assignment list"),
            ("too many", too_many, "at most 10000 devices per command"),
        ];
        for (what, assignments, message) in cases {
            let mut f = base.clone();
            let err = f.apply(&assign(assignments, 6)).expect_err(what);
            assert_eq!(f, base, "case {what}: a refused command changed the fabric");
            assert!(
                err.to_string().contains(message),
                "case {what}: {err} lacks {message:?}"
            );
        }
    }

    #[test]
    fn only_the_current_owner_reports_status() {
        let mut f = fabric();
        f.apply(&assign(
            vec![mv("d1", None, Some(1)), mv("d2", None, Some(1))],
            10,
        ))
        .unwrap();
        assert_eq!(
            f.apply(&report(
                1,
                &[("d1", DeviceStatus::Up), ("d2", DeviceStatus::Down)],
                20
            )),
            Ok(Outcome::DevicesReported {
                changed: 2,
                stale: 0
            })
        );
        assert_eq!(f.devices["d1"].status, DeviceStatus::Up);
        assert_eq!(f.devices["d1"].since, 20);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Down);
        // A repeated status is no change: `since` keeps the time of the real change.
        assert_eq!(
            f.apply(&report(1, &[("d1", DeviceStatus::Up)], 30)),
            Ok(Outcome::DevicesReported {
                changed: 0,
                stale: 0
            })
        );
        assert_eq!(f.devices["d1"].since, 20);
        // d1 moves to node 2; node 1's report was made before it learned that.
        f.apply(&assign(vec![mv("d1", Some(1), Some(2))], 40))
            .unwrap();
        f.apply(&Command::RemoveDevice { id: "d2".into() }).unwrap();
        let before = f.clone();
        assert_eq!(
            f.apply(&report(
                1,
                &[("d1", DeviceStatus::Down), ("d2", DeviceStatus::Up)],
                41
            )),
            Ok(Outcome::DevicesReported {
                changed: 0,
                stale: 2
            })
        );
        assert_eq!(f, before, "stale reports change nothing");
        // The new owner's report counts, next to a stale one in the same batch.
        assert_eq!(
            f.apply(&report(
                2,
                &[("d1", DeviceStatus::Up), ("d3", DeviceStatus::Up)],
                42
            )),
            Ok(Outcome::DevicesReported {
                changed: 1,
                stale: 1
            })
        );
        assert_eq!(f.devices["d1"].status, DeviceStatus::Up);
        assert_eq!(f.devices["d3"].status, DeviceStatus::Unassigned);
        // A report from a node that is not even registered is stale too.
        assert_eq!(
            f.apply(&report(9, &[("d1", DeviceStatus::Down)], 43)),
            Ok(Outcome::DevicesReported {
                changed: 0,
                stale: 1
            })
        );
    }

    #[test]
    fn malformed_status_reports_are_refused() {
        let mut f = fabric();
        f.apply(&assign(vec![mv("d1", None, Some(1))], 10)).unwrap();
        let before = f.clone();
        for (what, c) in [
            (
                "connecting is set by assignment",
                report(1, &[("d1", DeviceStatus::Connecting)], 11),
            ),
            (
                "unassigned is set by assignment",
                report(1, &[("d1", DeviceStatus::Unassigned)], 11),
            ),
            (
                "device twice",
                report(
                    1,
                    &[("d1", DeviceStatus::Up), ("d1", DeviceStatus::Down)],
                    11,
                ),
            ),
            ("empty", report(1, &[], 11)),
        ] {
            assert!(f.apply(&c).is_err(), "{what}");
            assert_eq!(f, before, "{what}");
        }
    }

    #[test]
    fn removing_a_node_unassigns_its_devices_and_a_draining_node_keeps_them() {
        let mut f = fabric();
        f.apply(&assign(
            vec![mv("d1", None, Some(1)), mv("d2", None, Some(2))],
            10,
        ))
        .unwrap();
        // Draining changes no owner by itself: the planner hands the devices off.
        f.apply(&Command::SetAdminState {
            id: 1,
            state: AdminState::Draining,
        })
        .unwrap();
        assert_eq!(f.devices["d1"].owner, Some(1));
        assert!(!f.nodes[&1].may_hold_devices());
        f.apply(&Command::RemoveNode { id: 2 }).unwrap();
        assert_eq!(f.devices["d2"].owner, None);
        assert_eq!(f.devices["d2"].status, DeviceStatus::Unassigned);
    }

    /// A pseudo-random log of device commands (fixed seed), valid and stale ones mixed, applied
    /// twice gives the same fabric and results; fabric, commands and outcomes round-trip the codec.
    #[test]
    fn device_commands_are_deterministic_and_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let statuses = [
            DeviceStatus::Up,
            DeviceStatus::Down,
            DeviceStatus::Connecting,
            DeviceStatus::Unassigned,
        ];
        let mut log = vec![node(1, &["app"]), node(2, &["app"]), node(3, &["db"])];
        for i in 0..3000u64 {
            let c = match next() % 6 {
                0 => add(&[&format!("d{}", next() % 50)]),
                1 | 2 => assign(
                    (0..1 + next() % 4)
                        .map(|_| {
                            let pick = |n: u64| (!n.is_multiple_of(5)).then_some(n % 5);
                            mv(&format!("d{}", next() % 50), pick(next()), pick(next()))
                        })
                        .collect(),
                    i,
                ),
                3 | 4 => report(
                    1 + next() % 3,
                    &[(
                        &format!("d{}", next() % 50),
                        statuses[(next() % 4) as usize],
                    )],
                    i,
                ),
                _ => match next() % 3 {
                    0 => Command::RemoveDevice {
                        id: format!("d{}", next() % 50),
                    },
                    1 => Command::SetAdminState {
                        id: 1 + next() % 2,
                        state: if next() % 2 == 0 {
                            AdminState::Active
                        } else {
                            AdminState::Draining
                        },
                    },
                    _ => node(1 + next() % 2, &["app"]),
                },
            };
            log.push(c);
        }
        let run = |log: &[Command]| {
            let mut f = Fabric::default();
            let results: Vec<_> = log.iter().map(|c| f.apply(c)).collect();
            (f, results)
        };
        let (a, ra) = run(&log);
        let (b, rb) = run(&log);
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        for want in ["assigned", "reported with stale", "refused"] {
            let seen = ra.iter().any(|r| match want {
                "assigned" => matches!(r, Ok(Outcome::DevicesAssigned(_))),
                "reported with stale" => {
                    matches!(r, Ok(Outcome::DevicesReported { stale: 1.., .. }))
                }
                _ => r.is_err(),
            });
            assert!(seen, "the log never produced: {want}");
        }
        let back: Fabric = crate::codec::decode(&crate::codec::encode(&a).unwrap()).unwrap();
        assert_eq!(a, back);
        let back: Vec<Command> =
            crate::codec::decode(&crate::codec::encode(&log).unwrap()).unwrap();
        assert_eq!(log, back);
        let back: Vec<Result<Outcome, CommandError>> =
            crate::codec::decode(&crate::codec::encode(&ra).unwrap()).unwrap();
        assert_eq!(ra, back);
    }
}
