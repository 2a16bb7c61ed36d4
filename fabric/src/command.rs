//! The commands that change the fabric, what an applied one reports, and why one is refused.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::model::{
    AdminState, DeviceAssignment, DeviceReport, Millis, MirrorPosition, NewDevice, PlacementKind,
    ServiceSpec, SiteRole,
};

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
    /// Remove devices by id, at most [`MAX_DEVICES_PER_COMMAND`]: those that exist go, those
    /// that do not are named in the outcome (removing is idempotent).
    RemoveDevices {
        /// Device ids, each at most once.
        ids: Vec<String>,
    },
    /// Record the build a node runs (its version and data format, as text), for `status`.
    /// A node proposes it at every start.
    SetVersion {
        /// Raft node id.
        id: NodeId,
        /// The build, as the node describes it (at most 200 bytes).
        version: String,
    },
    /// Revoke a certificate by serial: every node refuses it from then on. Revoking one
    /// already revoked changes nothing.
    RevokeCertificate {
        /// Serial number: the number in lowercase hex, without leading zeros.
        serial: String,
        /// The identity it carries (`node n3`, `admin ops`).
        identity: String,
        /// Why.
        reason: String,
        /// Proposer's clock.
        at: Millis,
    },
    /// Change this site's disaster-recovery role. The epoch never goes down, and a standby
    /// becomes active only with a higher one (see [`crate::Site::epoch`]).
    SetSiteRole {
        /// The new role.
        role: SiteRole,
        /// The site epoch that goes with it.
        epoch: u64,
        /// Proposer's clock.
        at: Millis,
    },
    /// On a standby site: site-neutral changes taken from the active peer (only `AddDevices`,
    /// `RemoveDevices`, `PutService` and `RemoveService`), each applied on its own, and the
    /// peer's position they bring this site to (none on all but the last of a batch).
    Mirror {
        /// The changes, at most [`MAX_MIRROR_CHANGES`] commands.
        changes: Vec<Command>,
        /// Where the peer stood once these are applied.
        position: Option<MirrorPosition>,
    },
    /// Turn this site's automatic failover off until a time (`u64::MAX`: until turned on
    /// again), or on (`None`).
    SetAutoFailover {
        /// Off until then (ms since the Unix epoch), or on.
        off_until: Option<Millis>,
    },
    /// A write that changes nothing: logged, replicated and made durable like any other
    /// entry, then applied as a no-op. `spacectl check perf` measures the commit path with it
    /// (the fabric has no free key space to fill, as etcd's check does).
    Probe {
        /// Payload (at most [`MAX_PROBE_BYTES`]), to give the entry a size.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Change a VIP's address, interface or eligible roles (`vip set`). A new address or
    /// interface needs the VIP unowned (the owner fences and releases it first, so no host
    /// ever holds the old address under the new spec); a held VIP's roles change only while
    /// its owner keeps one of them. Its epoch stays; its refusals are forgotten (they were
    /// about the old spec).
    /// Data format [`SET_COMMANDS_FORMAT`]: refused until every node runs it.
    SetPlacement {
        /// Placement name.
        name: String,
        /// The new VIP (a singleton's placement follows its service, and is refused here).
        kind: PlacementKind,
        /// Roles eligible to hold it; must not be empty.
        eligible_roles: BTreeSet<String>,
    },
    /// Change a registered device's address or mode (`device set`). Its owner keeps it and
    /// connects anew: the device is `Connecting` from `at`. Data format
    /// [`SET_COMMANDS_FORMAT`]: refused until every node runs it.
    SetDevice {
        /// The device (by id) with its new address and mode.
        device: NewDevice,
        /// Proposer's clock.
        at: Millis,
    },
}

/// The data format that brought [`Command::SetPlacement`] and [`Command::SetDevice`]. A build
/// of an older format cannot decode them, so the fabric refuses both while any node's recorded
/// version (its `SetVersion`, which ends in `data format N`) names an older format or none:
/// during a rolling upgrade they wait until the last node runs the new build.
pub const SET_COMMANDS_FORMAT: u32 = 7;

/// Largest payload a [`Command::Probe`] may carry.
pub const MAX_PROBE_BYTES: usize = 64 * 1024;

/// Most commands one `Mirror` may carry.
pub const MAX_MIRROR_CHANGES: usize = 1_000;

impl Command {
    /// Whether a standby site may take this command from its peer (in a `Mirror`): the
    /// site-neutral data, never nodes, placements or owners.
    pub fn is_mirrorable(&self) -> bool {
        matches!(
            self,
            Command::AddDevices { .. }
                | Command::RemoveDevices { .. }
                | Command::PutService { .. }
                | Command::RemoveService { .. }
        )
    }
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
            Command::RevokeCertificate {
                serial, identity, ..
            } => write!(f, "revoke-certificate {serial} ({identity})"),
            Command::SetVersion { id, version } => write!(f, "set-version {id} {version}"),
            Command::RemoveDevices { ids } => write!(f, "remove-devices x{}", ids.len()),
            Command::SetSiteRole { role, epoch, .. } => {
                write!(f, "set-site-role {role} epoch {epoch}")
            }
            Command::SetAutoFailover { off_until } => match off_until {
                None => write!(f, "set-auto-failover on"),
                Some(u64::MAX) => write!(f, "set-auto-failover off"),
                Some(t) => write!(f, "set-auto-failover off until {t}"),
            },
            Command::Probe { bytes } => write!(f, "probe of {} bytes", bytes.len()),
            Command::SetPlacement { name, .. } => write!(f, "set-placement {name}"),
            Command::SetDevice { device, .. } => write!(f, "set-device {}", device.id),
            Command::Mirror { changes, position } => match position {
                Some(p) => write!(f, "mirror x{} up to {} {}", changes.len(), p.site, p.index),
                None => write!(f, "mirror x{}", changes.len()),
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
    /// Devices removed, and the ids asked for that did not exist.
    DevicesRemoved {
        /// How many went.
        removed: u64,
        /// Ids not found.
        missing: Vec<String>,
    },
    /// A status report was applied.
    DevicesReported {
        /// Devices whose status changed (unchanged ones keep their `since`).
        changed: u64,
        /// Reports skipped because the reporter does not hold the device (any more).
        stale: u64,
    },
    /// Mirrored changes applied: how many, and why the others were refused.
    Mirrored {
        /// Changes applied.
        applied: u64,
        /// Each refused change and why (the site mirrors the rest).
        refused: Vec<String>,
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
    /// Not what a site in its disaster-recovery role may do.
    #[error("{0}")]
    SiteRole(String),
}

pub(crate) fn holder(owner: &Option<NodeId>) -> String {
    match owner {
        Some(n) => format!("node {n}"),
        None => "no node".into(),
    }
}
