//! `spacectl`: PKI, status, membership, leadership and devices, as commands with tables or JSON.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use serde_json::json;
use spaced_fabric::{AdminState, DeviceMode, NewDevice, check_device_addr, check_device_id};
use spaced_raft::pki;

use crate::admin::client::{AdminClient, AdminCredentials, ClientError, unexpected};
use crate::admin::{AdminReply, AdminRequest, DeviceRow, RebalanceReport, StatusReport};

/// Devices per `AddDevices` command during import: large enough for speed, small enough to keep Raft responsive.
pub const IMPORT_BATCH: usize = 1000;

/// spacectl — administer a spaced fabric.
#[derive(Debug, Parser)]
#[command(name = "spacectl", version, about = "Administer a spaced fabric")]
pub struct Cli {
    /// Node to talk to (`host:port` of its QUIC listener); any node works.
    #[arg(long, global = true, env = "SPACED_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Directory with `ca.pem` and an `admin-<name>.pem`/`.key` pair.
    #[arg(long, global = true, env = "SPACED_PKI")]
    pub pki: Option<PathBuf>,
    /// Which admin certificate in the PKI directory to use (default: the only or first one).
    /// (Not `--admin`: that is `pki issue`'s flag for an admin certificate.)
    #[arg(
        long = "admin-name",
        id = "admin_name",
        global = true,
        env = "SPACED_ADMIN"
    )]
    pub admin: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cluster CA and certificates.
    Pki {
        /// PKI action.
        #[command(subcommand)]
        action: PkiCmd,
    },
    /// Leader, term and members.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cluster membership.
    Node {
        /// Membership action.
        #[command(subcommand)]
        action: NodeCmd,
    },
    /// Leadership.
    Leader {
        /// Leadership action.
        #[command(subcommand)]
        action: LeaderCmd,
    },
    /// Managed devices.
    Device {
        /// Device action.
        #[command(subcommand)]
        action: DeviceCmd,
    },
    /// Virtual IPs.
    Vip {
        /// VIP action.
        #[command(subcommand)]
        action: VipCmd,
    },
    /// Supervised services.
    Service {
        /// Service action.
        #[command(subcommand)]
        action: ServiceCmd,
    },
    /// Cluster-wide singleton services.
    Singleton {
        /// Singleton action.
        #[command(subcommand)]
        action: SingletonCmd,
    },
    /// The load balancer on the VIP.
    Lb {
        /// Balancer action.
        #[command(subcommand)]
        action: LbCmd,
    },
}

/// `spacectl service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Declare (or replace) a service: `service add NAME --scope S [--roles r] -- PROGRAM ARGS...`.
    Add {
        /// Service name (1–63 of a-z 0-9 -).
        name: String,
        /// `every-node`, `vip:<name>` (on that VIP's owner) or `singleton` (exactly one node).
        #[arg(long)]
        scope: String,
        /// every-node: only nodes with one of these roles; singleton: the eligible roles (default app).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Health-check command, split on spaces; exit 0 = healthy.
        #[arg(long)]
        health_check: Option<String>,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove a service (a singleton's placement goes with it).
    Remove {
        /// Service name.
        name: String,
    },
    /// Every service with its state on every node (restarts, last exit, health).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `spacectl singleton ...`
#[derive(Debug, Subcommand)]
pub enum SingletonCmd {
    /// Singletons with owner and epoch.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a singleton to another node: the owner stops it first, then the target starts it.
    Move {
        /// Singleton (placement) name.
        name: String,
        /// Target node (name or id).
        #[arg(long)]
        to: String,
    },
}

/// Parses `--scope`.
fn parse_scope(scope: &str) -> Result<spaced_fabric::ServiceScope, CtlError> {
    use spaced_fabric::ServiceScope;
    match scope {
        "every-node" => Ok(ServiceScope::EveryNode),
        "singleton" => Ok(ServiceScope::Singleton),
        other => match other.strip_prefix("vip:") {
            Some(vip) if !vip.is_empty() => Ok(ServiceScope::Vip(vip.to_string())),
            _ => Err(usage(format!(
                "--scope: {other:?} is not every-node, vip:<name> or singleton"
            ))),
        },
    }
}

fn scope_text(scope: &spaced_fabric::ServiceScope) -> String {
    use spaced_fabric::ServiceScope;
    match scope {
        ServiceScope::EveryNode => "every-node".into(),
        ServiceScope::Vip(v) => format!("vip:{v}"),
        ServiceScope::Singleton => "singleton".into(),
    }
}

/// Asks every member at once for `request`, keeping the replies `pick` accepts (in membership
/// order); nodes that do not answer (or answer something else) are named, not fatal.
async fn ask_everywhere<T>(
    cli: &Cli,
    request: AdminRequest,
    pick: fn(AdminReply) -> Option<T>,
) -> Result<(Vec<T>, Vec<String>), CtlError> {
    let mut c = connect(cli).await?;
    let status = c.status().await?;
    c.close().await;
    let pki = cli
        .pki
        .as_deref()
        .ok_or_else(|| usage("--pki (or SPACED_PKI) is required"))?;
    let creds = AdminCredentials::load(pki, cli.admin.as_deref())?;
    let answers = futures::future::join_all(status.nodes.iter().map(|n| {
        let (creds, request) = (&creds, &request);
        async move {
            let mut c = AdminClient::connect(&n.addr, creds).await.ok()?;
            let reply = c.call(request).await.ok();
            c.close().await;
            pick(reply?)
        }
    }))
    .await;
    let mut reports = Vec::new();
    let mut silent = Vec::new();
    for (n, answer) in status.nodes.iter().zip(answers) {
        match answer {
            Some(r) => reports.push(r),
            None => silent.push(n.name.clone()),
        }
    }
    Ok((reports, silent))
}

/// Asks every member for its services.
async fn services_everywhere(
    cli: &Cli,
) -> Result<(Vec<crate::admin::ServicesReport>, Vec<String>), CtlError> {
    ask_everywhere(cli, AdminRequest::ServiceStatus, |reply| match reply {
        AdminReply::Services(r) => Some(r),
        _ => None,
    })
    .await
}

/// `spacectl lb ...`
#[derive(Debug, Subcommand)]
pub enum LbCmd {
    /// Every node's balancer: which accepts on the VIP, its connections, its backends' health.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

/// State word of one listener: `accepting`, `draining` (not accepting, connections still
/// open) or `standby`.
fn listener_state(l: &crate::admin::LbListenerRow) -> &'static str {
    match (l.accepting, l.active) {
        (true, _) => "accepting",
        (false, 0) => "standby",
        (false, _) => "draining",
    }
}

/// `lb status` as text: a table of listeners, a table of backends, then warnings (a listener
/// accepting on more than one node or on none, nodes without a balancer or silent).
pub fn lb_status_text(reports: &[crate::admin::LbReport], silent: &[String]) -> String {
    let mut listeners = Vec::new();
    let mut backends = Vec::new();
    let mut accepting: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in reports {
        for l in &r.listeners {
            let on = accepting.entry(&l.listen).or_default();
            if l.accepting {
                on.push(&r.node);
            }
            listeners.push(vec![
                r.node.clone(),
                l.listen.clone(),
                listener_state(l).into(),
                l.active.to_string(),
                l.total.to_string(),
                l.refused.to_string(),
                l.no_backend.to_string(),
                l.relay_errors.to_string(),
                indicatif::DecimalBytes(l.bytes_in).to_string(),
                indicatif::DecimalBytes(l.bytes_out).to_string(),
            ]);
            for b in &l.backends {
                backends.push(vec![
                    r.node.clone(),
                    l.listen.clone(),
                    b.name.clone(),
                    b.addr.clone(),
                    if b.up { "up" } else { "down" }.into(),
                    b.active.to_string(),
                    b.total.to_string(),
                    b.connect_errors.to_string(),
                    b.transitions.to_string(),
                ]);
            }
        }
    }
    let mut out = String::new();
    if listeners.is_empty() {
        out.push_str("no node runs a balancer (no [lb] section)\n");
    } else {
        out.push_str(&table(
            &[
                "NODE",
                "LISTENER",
                "STATE",
                "ACTIVE",
                "TOTAL",
                "REFUSED",
                "NO BACKEND",
                "ERRORS",
                "BYTES IN",
                "BYTES OUT",
            ],
            &listeners,
        ));
        out.push('\n');
        out.push_str(&table(
            &[
                "NODE",
                "LISTENER",
                "BACKEND",
                "ADDR",
                "HEALTH",
                "ACTIVE",
                "TOTAL",
                "CONNECT ERRORS",
                "UP/DOWN CHANGES",
            ],
            &backends,
        ));
    }
    for (listen, on) in &accepting {
        match on.len() {
            0 => out.push_str(&format!(
                "warning: no node accepts on {listen} (is its VIP placed? see `vip list`)\n"
            )),
            1 => {}
            n => out.push_str(&format!(
                "warning: {n} nodes accept on {listen}: {}\n",
                on.join(", ")
            )),
        }
    }
    let without: Vec<&str> = reports
        .iter()
        .filter(|r| r.vip.is_none())
        .map(|r| r.node.as_str())
        .collect();
    if !without.is_empty() && !listeners.is_empty() {
        out.push_str(&format!("no balancer on: {}\n", without.join(", ")));
    }
    for r in reports {
        for problem in &r.problems {
            out.push_str(&format!("problem on {}: {problem}\n", r.node));
        }
    }
    if !silent.is_empty() {
        out.push_str(&format!("not answering: {}\n", silent.join(", ")));
    }
    out
}

/// `spacectl vip ...`
#[derive(Debug, Subcommand)]
pub enum VipCmd {
    /// Create a VIP; the leader places it on an eligible node.
    Add {
        /// Unique name (e.g. `cluster`, `db`).
        #[arg(long)]
        name: String,
        /// Address with prefix, e.g. `10.0.0.100/24` or `fd00::100/64`.
        #[arg(long)]
        address: String,
        /// Interface the owner adds it to.
        #[arg(long)]
        interface: String,
        /// Eligible roles, comma-separated (e.g. `ha`, or `db`).
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
    },
    /// VIPs with owner, epoch and lease.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a VIP to another node: the owner releases first, then the target takes it.
    Move {
        /// VIP name.
        name: String,
        /// Target node (name or id).
        #[arg(long)]
        to: String,
    },
}

/// `spacectl pki ...`
#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create the cluster CA (`ca.pem`, `ca.key`) in a directory.
    Init {
        /// Directory to create it in.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (`<name>.pem`) or an admin one (`admin-<name>.pem`).
    Issue {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node or admin name.
        #[arg(long)]
        name: String,
        /// Issue an admin (client) certificate instead of a node certificate.
        #[arg(long)]
        admin: bool,
    },
}

/// `spacectl node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Add a node: it joins as learner, catches up, and becomes a voter while voters < 5.
    Add {
        /// Raft id of the node (its `node_id`).
        #[arg(long)]
        id: u64,
        /// Its name (its `name`, as on its certificate).
        #[arg(long)]
        name: String,
        /// Its QUIC address (`host:port`).
        #[arg(long)]
        addr: String,
        /// Roles, comma-separated; default: the roles in the node's own config.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
    },
    /// Remove a node (by name or id) from the cluster.
    Remove {
        /// Name or id.
        node: String,
    },
    /// List members.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drain a node: it hands its devices to the other `app` nodes and takes nothing new.
    Drain {
        /// Name or id.
        node: String,
    },
    /// Make a drained node active again (its devices do not come back by themselves; see
    /// `device rebalance`).
    Activate {
        /// Name or id.
        node: String,
    },
}

/// `spacectl leader ...`
#[derive(Debug, Subcommand)]
pub enum LeaderCmd {
    /// Hand leadership to another voter.
    Transfer {
        /// Name or id of the new leader.
        #[arg(long)]
        to: String,
    },
}

/// `spacectl device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Register one device.
    Add {
        /// Unique device id.
        #[arg(long)]
        id: String,
        /// `host` or `host:port`.
        #[arg(long)]
        addr: String,
        /// space-initiated (default) or device-initiated.
        #[arg(long, default_value = "space-initiated")]
        mode: DeviceMode,
    },
    /// Register devices from a CSV file: `id,addr[,mode]` per line (`#` comments, optional header).
    Import {
        /// The CSV file.
        file: PathBuf,
    },
    /// List devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Even out the devices of the live `app` nodes with the fewest moves.
    Rebalance {
        /// Move at most this many devices.
        #[arg(long)]
        max_moves: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A failure: message and exit code (2 usage, 1 operation).
#[derive(Debug)]
pub struct CtlError {
    /// One line for stderr.
    pub message: String,
    /// Process exit code.
    pub code: i32,
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> Self {
        CtlError {
            message: e.to_string(),
            code: 1,
        }
    }
}

fn usage(msg: impl Into<String>) -> CtlError {
    CtlError {
        message: msg.into(),
        code: 2,
    }
}
fn failed(msg: impl Into<String>) -> CtlError {
    CtlError {
        message: msg.into(),
        code: 1,
    }
}

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
    }
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Roles as one table cell.
fn roles_cell(roles: &[String]) -> String {
    if roles.is_empty() {
        "-".into()
    } else {
        roles.join(",")
    }
}

/// `active` or `draining`.
fn admin_state_name(a: spaced_fabric::AdminState) -> String {
    format!("{a:?}").to_lowercase()
}

/// The human form of `spacectl status`.
pub fn render_status(s: &StatusReport) -> String {
    let mut out = format!(
        "leader: {}   term: {}   devices: {}   (as seen by node {})\n\n",
        opt(s.leader),
        s.term,
        s.devices,
        s.served_by
    );
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.name.clone(),
                n.addr.clone(),
                roles_cell(&n.roles),
                if Some(n.id) == s.leader {
                    "leader".into()
                } else if n.voter {
                    "voter".into()
                } else {
                    "learner".into()
                },
                n.last_contact_ms
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_else(|| "-".into()),
                n.devices.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ID",
            "NAME",
            "ADDR",
            "ROLES",
            "RAFT",
            "LAST CONTACT",
            "DEVICES",
        ],
        &rows,
    ));
    if !s.vips.is_empty() {
        out.push('\n');
        out.push_str(&render_vips(&s.vips));
    }
    out
}

fn vip_json(v: &crate::admin::VipRow) -> serde_json::Value {
    json!({"name": v.name, "address": v.address, "interface": v.interface, "roles": v.roles,
           "owner": v.owner, "owner_name": v.owner_name, "epoch": v.epoch, "lease_ms": v.lease_ms,
           "refused": v.refused})
}

/// Lines under a placement table naming the nodes that gave a placement back, and why:
/// `  cluster: refused by n2 (2) 12s ago, passed over for now: <reason>`.
pub fn render_refusals<'a>(
    placements: impl IntoIterator<Item = (&'a str, &'a [crate::admin::RefusalRow])>,
    now_ms: u64,
) -> String {
    let mut out = String::new();
    for (name, refused) in placements {
        for r in refused {
            let state = if r.holding {
                "passed over for now"
            } else {
                "may be tried again"
            };
            out.push_str(&format!(
                "  {name}: refused by {} {} ago, {state}: {}\n",
                owner_cell(r.node_name.as_deref(), Some(r.node)),
                age(now_ms, r.at),
                r.reason
            ));
        }
    }
    if out.is_empty() {
        out
    } else {
        format!("could not be held:\n{out}")
    }
}

/// A placement's owner as one table cell: `name (id)`, the id alone, or `-`.
fn owner_cell(name: Option<&str>, id: Option<u64>) -> String {
    match (name, id) {
        (Some(n), Some(id)) => format!("{n} ({id})"),
        (None, Some(id)) => id.to_string(),
        _ => "-".into(),
    }
}

/// The human form of `spacectl vip list`.
pub fn render_vips(vips: &[crate::admin::VipRow]) -> String {
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.address.clone(),
                v.interface.clone(),
                v.roles.join(","),
                owner_cell(v.owner_name.as_deref(), v.owner),
                v.epoch.to_string(),
                v.lease_ms
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &["NAME", "ADDRESS", "IF", "ROLES", "OWNER", "EPOCH", "LEASE"],
        &rows,
    );
    out.push_str(&render_refusals(
        vips.iter().map(|v| (v.name.as_str(), v.refused.as_slice())),
        crate::now_millis(),
    ));
    out
}

/// The JSON form of `spacectl status`.
pub fn status_json(s: &StatusReport) -> serde_json::Value {
    json!({
        "leader": s.leader,
        "term": s.term,
        "served_by": s.served_by,
        "last_applied": s.last_applied,
        "vips": s.vips.iter().map(vip_json).collect::<Vec<_>>(),
        "devices": s.devices,
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id,
            "name": n.name,
            "addr": n.addr,
            "mgmt_ip": n.mgmt_ip,
            "roles": n.roles,
            "voter": n.voter,
            "leader": Some(n.id) == s.leader,
            "last_contact_ms": n.last_contact_ms,
            "admin_state": n.admin_state.map(admin_state_name),
            "devices": n.devices,
        })).collect::<Vec<_>>(),
    })
}

fn device_json(d: &DeviceRow) -> serde_json::Value {
    json!({"id": d.id, "addr": d.addr, "mode": d.mode.to_string(), "owner": d.owner,
           "owner_name": d.owner_name, "status": d.status.to_string(), "since": d.since})
}

/// How long ago `since` (ms since the epoch) was, as `4s`, `12m3s`, `5h2m` or `3d4h`.
pub fn age(now_ms: u64, since_ms: u64) -> String {
    if since_ms == 0 || since_ms > now_ms {
        return "-".into();
    }
    let s = (now_ms - since_ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The human form of `spacectl device list`.
pub fn render_devices(devices: &[DeviceRow], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.addr.clone(),
                d.mode.to_string(),
                match (&d.owner_name, d.owner) {
                    (Some(n), Some(id)) => format!("{n} ({id})"),
                    (None, Some(id)) => id.to_string(),
                    _ => "-".into(),
                },
                d.status.to_string(),
                age(now_ms, d.since),
            ]
        })
        .collect();
    table(&["ID", "ADDR", "MODE", "OWNER", "STATUS", "SINCE"], &rows)
}

/// The JSON form of `spacectl device rebalance`.
pub fn rebalance_json(r: &RebalanceReport) -> serde_json::Value {
    json!({
        "planned": r.planned,
        "moved": r.moved,
        "nodes": r.nodes.iter().map(|n| json!({"id": n.id, "name": n.name, "devices": n.devices})).collect::<Vec<_>>(),
    })
}

/// The human form of `spacectl device rebalance`.
pub fn render_rebalance(r: &RebalanceReport) -> String {
    let mut out = if r.moved == r.planned {
        format!("moved {} devices\n\n", r.moved)
    } else {
        format!(
            "moved {} of {} planned devices (the fabric changed meanwhile; run it again)\n\n",
            r.moved, r.planned
        )
    };
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| vec![n.id.to_string(), n.name.clone(), n.devices.to_string()])
        .collect();
    out.push_str(&table(&["ID", "NAME", "DEVICES"], &rows));
    out
}

/// One parse problem in an import file.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
}

/// Parses an import file: `id,addr[,mode]` per line; blank lines, `#` comments and an
/// `id,addr[,mode]` header are skipped. Returns every bad line, not just the first.
pub fn parse_import(text: &str) -> Result<Vec<(usize, NewDevice)>, Vec<LineError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = l.split(',').map(str::trim).collect();
        if out.is_empty()
            && errors.is_empty()
            && fields.first() == Some(&"id")
            && fields.get(1) == Some(&"addr")
        {
            continue;
        }
        let mut err = |problem: String| errors.push(LineError { line, problem });
        if !(2..=3).contains(&fields.len()) {
            err(format!(
                "expected id,addr[,mode], found {} fields",
                fields.len()
            ));
            continue;
        }
        let mode = match fields.get(2) {
            None | Some(&"") => DeviceMode::SpaceInitiated,
            Some(m) => match m.parse() {
                Ok(m) => m,
                Err(e) => {
                    err(e);
                    continue;
                }
            },
        };
        if let Err(e) = check_device_id(fields[0]) {
            err(e.to_string());
            continue;
        }
        if let Err(e) = check_device_addr(fields[1]) {
            err(e.to_string());
            continue;
        }
        if let Some(first) = seen.insert(fields[0].to_string(), line) {
            err(format!("device id {:?} already on line {first}", fields[0]));
            continue;
        }
        out.push((
            line,
            NewDevice {
                id: fields[0].into(),
                addr: fields[1].into(),
                mode,
            },
        ));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

async fn connect(cli: &Cli) -> Result<AdminClient, CtlError> {
    let endpoint = cli
        .endpoint
        .as_deref()
        .ok_or_else(|| usage("--endpoint (or SPACED_ENDPOINT) is required"))?;
    let pki = cli
        .pki
        .as_deref()
        .ok_or_else(|| usage("--pki (or SPACED_PKI) is required"))?;
    let creds = AdminCredentials::load(pki, cli.admin.as_deref())?;
    Ok(AdminClient::connect(endpoint, &creds).await?)
}

/// Sends a leader-only request (following redirects) and returns the reply; `Failed` becomes an error.
async fn mutate(cli: &Cli, req: AdminRequest) -> Result<AdminReply, CtlError> {
    let mut c = connect(cli).await?;
    let reply = c.call_leader(&req).await;
    c.close().await;
    match reply? {
        AdminReply::Failed(e) => Err(failed(e)),
        other => Ok(other),
    }
}

/// A reply of the wrong kind for the request.
fn odd(reply: AdminReply) -> CtlError {
    failed(format!("unexpected reply from spaced: {reply:?}"))
}

/// Runs one spacectl command, printing its output; returns the error to report.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    match &cli.command {
        Cmd::Pki {
            action: PkiCmd::Init { dir },
        } => {
            pki::init_ca(dir).map_err(|e| failed(e.to_string()))?;
            println!("created cluster CA in {}", dir.display());
            Ok(())
        }
        Cmd::Pki {
            action: PkiCmd::Issue { dir, name, admin },
        } => {
            let files = pki::issue(dir, name, *admin).map_err(|e| failed(e.to_string()))?;
            println!(
                "issued {} certificate {} (key {})",
                if *admin { "admin" } else { "node" },
                files.cert.display(),
                files.key.display()
            );
            Ok(())
        }
        Cmd::Status { json } => {
            let mut c = connect(&cli).await?;
            let s = c.status().await?;
            if *json {
                println!("{}", status_json(&s));
            } else {
                print!("{}", render_status(&s));
            }
            c.close().await;
            Ok(())
        }
        Cmd::Node {
            action: NodeCmd::List { json },
        } => {
            let mut c = connect(&cli).await?;
            let s = c.status().await?;
            if *json {
                println!("{}", status_json(&s)["nodes"]);
            } else {
                let rows: Vec<Vec<String>> = s
                    .nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.id.to_string(),
                            n.name.clone(),
                            n.addr.clone(),
                            roles_cell(&n.roles),
                            if n.voter {
                                "voter".into()
                            } else {
                                "learner".into()
                            },
                            opt(n.admin_state.map(admin_state_name)),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["ID", "NAME", "ADDR", "ROLES", "RAFT", "STATE"], &rows)
                );
            }
            c.close().await;
            Ok(())
        }
        Cmd::Node {
            action:
                NodeCmd::Add {
                    id,
                    name,
                    addr,
                    roles,
                },
        } => {
            let roles = roles.as_ref().map(|r| {
                r.iter()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect::<BTreeSet<_>>()
            });
            let req = AdminRequest::AddNode {
                id: *id,
                name: name.clone(),
                addr: addr.clone(),
                roles,
            };
            match mutate(&cli, req).await? {
                AdminReply::NodeAdded { voter } => {
                    println!(
                        "node {id} ({name}) joined as {}",
                        if voter {
                            "voter"
                        } else {
                            "learner (5 voters already)"
                        }
                    )
                }
                other => return Err(odd(other)),
            }
            Ok(())
        }
        Cmd::Node {
            action: NodeCmd::Remove { node },
        } => match mutate(&cli, AdminRequest::RemoveNode(node.clone())).await? {
            AdminReply::Done => {
                println!("node {node} removed");
                Ok(())
            }
            other => Err(odd(other)),
        },
        Cmd::Leader {
            action: LeaderCmd::Transfer { to },
        } => match mutate(&cli, AdminRequest::TransferLeader(to.clone())).await? {
            AdminReply::Done => {
                println!("leadership transferred to {to}");
                Ok(())
            }
            other => Err(odd(other)),
        },
        Cmd::Device {
            action: DeviceCmd::Add { id, addr, mode },
        } => {
            check_device_id(id).map_err(|e| usage(e.to_string()))?;
            check_device_addr(addr).map_err(|e| usage(e.to_string()))?;
            let dev = NewDevice {
                id: id.clone(),
                addr: addr.clone(),
                mode: *mode,
            };
            match mutate(&cli, AdminRequest::AddDevices(vec![dev])).await? {
                AdminReply::Applied(_) => {
                    println!("device {id} added");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Device {
            action: DeviceCmd::Import { file },
        } => import(&cli, file).await,
        Cmd::Vip {
            action:
                VipCmd::Add {
                    name,
                    address,
                    interface,
                    roles,
                },
        } => {
            spaced_fabric::check_name("VIP name", name).map_err(|e| usage(e.to_string()))?;
            spaced_fabric::check_vip_address(address).map_err(|e| usage(e.to_string()))?;
            let v = AdminRequest::VipAdd {
                name: name.clone(),
                address: address.clone(),
                interface: interface.clone(),
                roles: roles.clone(),
            };
            match mutate(&cli, v).await? {
                AdminReply::VipAdded { cannot, unchecked } => {
                    println!("VIP {name} ({address} on {interface}) added");
                    for (node, why) in cannot {
                        eprintln!(
                            "spacectl: warning: node {node} cannot hold it ({why}); it is not placed there"
                        );
                    }
                    for (node, why) in unchecked {
                        eprintln!(
                            "spacectl: warning: node {node} was not checked ({why}); if it is granted the VIP and cannot hold it, it gives it back"
                        );
                    }
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Vip {
            action: VipCmd::Move { name, to },
        } => {
            match mutate(
                &cli,
                AdminRequest::VipMove {
                    name: name.clone(),
                    to: to.clone(),
                },
            )
            .await?
            {
                AdminReply::Moved(epoch) => {
                    println!("VIP {name} moved to {to} (epoch {epoch})");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Service {
            action:
                ServiceCmd::Add {
                    name,
                    scope,
                    roles,
                    health_check,
                    command,
                },
        } => {
            spaced_fabric::check_name("service name", name).map_err(|e| usage(e.to_string()))?;
            let scope = parse_scope(scope)?;
            let mut roles: BTreeSet<String> = roles
                .iter()
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty())
                .collect();
            if roles.is_empty() && scope == spaced_fabric::ServiceScope::Singleton {
                roles.insert("app".into());
            }
            let health_check = health_check
                .as_deref()
                .map(|h| h.split_whitespace().map(str::to_string).collect::<Vec<_>>());
            if health_check.as_ref().is_some_and(|h| h.is_empty()) {
                return Err(usage("--health-check: empty command"));
            }
            let spec = spaced_fabric::ServiceSpec {
                command: command.clone(),
                scope,
                health_check,
                roles,
            };
            let cmd = spaced_raft::Command::PutService {
                name: name.clone(),
                spec,
            };
            match mutate(&cli, AdminRequest::Write(cmd)).await? {
                AdminReply::Applied(_) => {
                    println!("service {name} declared");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Service {
            action: ServiceCmd::Remove { name },
        } => {
            let cmd = spaced_raft::Command::RemoveService { name: name.clone() };
            match mutate(&cli, AdminRequest::Write(cmd)).await? {
                AdminReply::Applied(_) => {
                    println!("service {name} removed");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Service {
            action: ServiceCmd::List { json },
        } => {
            let (reports, silent) = services_everywhere(&cli).await?;
            let specs = reports.first().map(|r| r.specs.clone()).unwrap_or_default();
            if *json {
                let services: Vec<serde_json::Value> = specs
                    .iter()
                    .map(|(name, spec)| {
                        let on: Vec<serde_json::Value> = reports
                            .iter()
                            .filter_map(|r| {
                                let st = r.running.iter().find(|s| &s.name == name)?;
                                let mut v = serde_json::to_value(st).ok()?;
                                v["node"] = json!(r.node);
                                Some(v)
                            })
                            .collect();
                        json!({"name": name, "scope": scope_text(&spec.scope), "command": spec.command,
                               "roles": spec.roles, "health_check": spec.health_check, "instances": on})
                    })
                    .collect();
                println!("{}", json!({"services": services, "unreachable": silent}));
            } else {
                let mut rows = Vec::new();
                for (name, spec) in &specs {
                    let mut any = false;
                    for r in &reports {
                        if let Some(st) = r.running.iter().find(|s| &s.name == name) {
                            any = true;
                            let state = serde_json::to_value(st.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default();
                            rows.push(vec![
                                name.clone(),
                                scope_text(&spec.scope),
                                r.node.clone(),
                                state,
                                opt(st.pid),
                                st.restarts.to_string(),
                                st.last_exit.clone().unwrap_or_else(|| "-".into()),
                                st.healthy.map_or("-".into(), |h| {
                                    if h { "yes".into() } else { "no".into() }
                                }),
                            ]);
                        }
                    }
                    if !any {
                        rows.push(vec![
                            name.clone(),
                            scope_text(&spec.scope),
                            "-".into(),
                            "not running".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                        ]);
                    }
                }
                print!(
                    "{}",
                    table(
                        &[
                            "SERVICE",
                            "SCOPE",
                            "NODE",
                            "STATE",
                            "PID",
                            "RESTARTS",
                            "LAST EXIT",
                            "HEALTHY"
                        ],
                        &rows
                    )
                );
                if !silent.is_empty() {
                    println!("not answering: {}", silent.join(", "));
                }
            }
            Ok(())
        }
        Cmd::Lb {
            action: LbCmd::Status { json },
        } => {
            let (reports, silent) =
                ask_everywhere(&cli, AdminRequest::LbStatus, |reply| match reply {
                    AdminReply::Lb(r) => Some(r),
                    _ => None,
                })
                .await?;
            if *json {
                println!("{}", json!({"nodes": reports, "unreachable": silent}));
            } else {
                print!("{}", lb_status_text(&reports, &silent));
            }
            Ok(())
        }
        Cmd::Singleton {
            action: SingletonCmd::List { json },
        } => {
            let mut c = connect(&cli).await?;
            let rows = match c.call(&AdminRequest::SingletonList).await? {
                AdminReply::Singletons(r) => r,
                other => return Err(unexpected(c.target(), &other).into()),
            };
            c.close().await;
            if *json {
                println!("{}", serde_json::to_value(&rows).unwrap_or_default());
            } else {
                let table_rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.name.clone(),
                            r.service.clone(),
                            r.roles.join(","),
                            owner_cell(r.owner_name.as_deref(), r.owner),
                            r.epoch.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}{}",
                    table(&["NAME", "SERVICE", "ROLES", "OWNER", "EPOCH"], &table_rows),
                    render_refusals(
                        rows.iter().map(|r| (r.name.as_str(), r.refused.as_slice())),
                        crate::now_millis(),
                    )
                );
            }
            Ok(())
        }
        Cmd::Singleton {
            action: SingletonCmd::Move { name, to },
        } => {
            let req = AdminRequest::VipMove {
                name: name.clone(),
                to: to.clone(),
            };
            match mutate(&cli, req).await? {
                AdminReply::Moved(epoch) => {
                    println!("singleton {name} moved to {to} (epoch {epoch})");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Vip {
            action: VipCmd::List { json },
        } => {
            let mut c = connect(&cli).await?;
            // The leader knows the lease times; status already prefers it.
            let vips = c.status().await?.vips;
            if *json {
                println!(
                    "{}",
                    serde_json::Value::Array(vips.iter().map(vip_json).collect())
                );
            } else {
                print!("{}", render_vips(&vips));
            }
            c.close().await;
            Ok(())
        }
        Cmd::Device {
            action: DeviceCmd::List { json },
        } => {
            let mut c = connect(&cli).await?;
            let devices = match c.call(&AdminRequest::ListDevices).await? {
                AdminReply::Devices(d) => d,
                other => return Err(unexpected(c.target(), &other).into()),
            };
            if *json {
                println!(
                    "{}",
                    serde_json::Value::Array(devices.iter().map(device_json).collect())
                );
            } else {
                print!("{}", render_devices(&devices, crate::now_millis()));
            }
            c.close().await;
            Ok(())
        }
        Cmd::Device {
            action: DeviceCmd::Rebalance { max_moves, json },
        } => {
            let req = AdminRequest::DeviceRebalance {
                max_moves: *max_moves,
            };
            match mutate(&cli, req).await? {
                AdminReply::Rebalanced(r) => {
                    if *json {
                        println!("{}", rebalance_json(&r));
                    } else {
                        print!("{}", render_rebalance(&r));
                    }
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        Cmd::Node {
            action: NodeCmd::Drain { node },
        } => set_admin_state(&cli, node, AdminState::Draining).await,
        Cmd::Node {
            action: NodeCmd::Activate { node },
        } => set_admin_state(&cli, node, AdminState::Active).await,
    }
}

async fn set_admin_state(cli: &Cli, node: &str, state: AdminState) -> Result<(), CtlError> {
    let req = AdminRequest::SetAdminState {
        node: node.to_string(),
        state,
    };
    match mutate(cli, req).await? {
        AdminReply::AdminStateSet {
            id, name, devices, ..
        } => {
            match state {
                AdminState::Draining => println!(
                    "node {name} ({id}) is draining: its {devices} devices move to the other app nodes"
                ),
                AdminState::Active => println!(
                    "node {name} ({id}) is active; it holds {devices} devices (`spacectl device rebalance` evens them out)"
                ),
            }
            Ok(())
        }
        other => Err(odd(other)),
    }
}

async fn import(cli: &Cli, file: &Path) -> Result<(), CtlError> {
    let text =
        std::fs::read_to_string(file).map_err(|e| failed(format!("{}: {e}", file.display())))?;
    let devices = parse_import(&text).map_err(|errs| {
        let shown: Vec<String> = errs
            .iter()
            .take(10)
            .map(|e| format!("line {}: {}", e.line, e.problem))
            .collect();
        let more = if errs.len() > 10 {
            format!("; and {} more", errs.len() - 10)
        } else {
            String::new()
        };
        failed(format!(
            "{}: {} bad line(s), nothing imported: {}{more}",
            file.display(),
            errs.len(),
            shown.join("; ")
        ))
    })?;
    if devices.is_empty() {
        return Err(failed(format!("{}: no devices in file", file.display())));
    }
    let mut c = connect(cli).await?;
    // Refuse ids the fabric already has up front, so the import is all or nothing in the usual case.
    let existing: HashSet<String> = match c.call(&AdminRequest::ListDevices).await? {
        AdminReply::Devices(d) => d.into_iter().map(|d| d.id).collect(),
        other => return Err(unexpected(c.target(), &other).into()),
    };
    let dups: Vec<String> = devices
        .iter()
        .filter(|(_, d)| existing.contains(&d.id))
        .take(10)
        .map(|(line, d)| format!("line {line}: device {:?} already registered", d.id))
        .collect();
    if !dups.is_empty() {
        return Err(failed(format!(
            "{}: nothing imported: {}",
            file.display(),
            dups.join("; ")
        )));
    }
    let total = devices.len();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} devices {per_sec} eta {eta}",
        ) {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut done = 0usize;
    for chunk in devices.chunks(IMPORT_BATCH) {
        let batch: Vec<NewDevice> = chunk.iter().map(|(_, d)| d.clone()).collect();
        let first_line = chunk.first().map(|(l, _)| *l).unwrap_or(0);
        let res = c.call_leader(&AdminRequest::AddDevices(batch)).await;
        let err = match res {
            Ok(AdminReply::Applied(_)) => None,
            Ok(other) => Some(unexpected(c.target(), &other).to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = err {
            bar.abandon();
            return Err(failed(format!(
                "{}: imported {done} of {total} devices (lines before {first_line}); the batch starting at line {first_line} failed: {e}",
                file.display()
            )));
        }
        done += chunk.len();
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    println!("imported {total} devices from {}", file.display());
    c.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_parsing_reports_every_bad_line() {
        let text = "id,addr,mode\n# comment\n\nd1,10.0.0.1\nd2,10.0.0.2:830,device-initiated\nd3\nd1,10.0.0.9\nd4,bad host\nd5,10.0.0.5,sideways\n";
        let errs = parse_import(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![6, 7, 8, 9]);
        assert!(
            errs[1].problem.contains("already on line 4"),
            "{:?}",
            errs[1]
        );
        let ok = parse_import("d1,10.0.0.1\nd2,h2:22,space-initiated\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].1.mode, DeviceMode::SpaceInitiated);
    }

    #[test]
    fn refusals_are_listed_under_the_table_with_age_and_hold() {
        use crate::admin::RefusalRow;
        let now = 1_000_000_000;
        let rows = [
            RefusalRow {
                node: 2,
                node_name: Some("n2".into()),
                reason: "interface \"side0\" does not exist".into(),
                at: now - 12_000,
                holding: true,
            },
            RefusalRow {
                node: 7,
                node_name: None,
                reason: "4 failures in a row".into(),
                at: now - 125_000,
                holding: false,
            },
        ];
        assert_eq!(render_refusals([("cluster", &rows[..0])], now), "");
        assert_eq!(
            render_refusals([("cluster", &rows[..1]), ("poller", &rows[1..])], now),
            "could not be held:\n  cluster: refused by n2 (2) 12s ago, passed over for now: \
             interface \"side0\" does not exist\n  poller: refused by 7 2m5s ago, may be tried \
             again: 4 failures in a row\n"
        );
    }

    #[test]
    fn device_list_shows_owner_names_status_and_age() {
        let row = |id: &str, owner: Option<(u64, &str)>, status, since| DeviceRow {
            id: id.into(),
            addr: "10.0.0.1".into(),
            mode: DeviceMode::SpaceInitiated,
            owner: owner.map(|o| o.0),
            status,
            since,
            owner_name: owner.map(|o| o.1.to_string()),
        };
        use spaced_fabric::DeviceStatus::{Unassigned, Up};
        let now = 1_800_000_000_000;
        let text = render_devices(
            &[
                row("d1", Some((2, "n2")), Up, now - 75_000),
                row("d2", None, Unassigned, 0),
            ],
            now,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["ID", "ADDR", "MODE", "OWNER", "STATUS", "SINCE"]
        );
        assert!(
            lines[1].contains("n2 (2)") && lines[1].contains(" up ") && lines[1].ends_with("1m15s"),
            "{text}"
        );
        assert!(
            lines[2].contains("unassigned") && lines[2].ends_with('-'),
            "{text}"
        );
        for (ms, expected) in [
            (0, "0s"),
            (59_999, "59s"),
            (3_600_000, "1h0m"),
            (90_000_000, "1d1h"),
        ] {
            assert_eq!(age(now, now - ms), expected);
        }
        assert_eq!(age(now, now + 5), "-", "a clock behind the proposer's");
    }

    fn lb_report(node: &str, listeners: Vec<(&str, bool, u64)>) -> crate::admin::LbReport {
        crate::admin::LbReport {
            node: node.into(),
            vip: Some("cluster".into()),
            problems: Vec::new(),
            listeners: listeners
                .into_iter()
                .map(|(listen, accepting, active)| crate::admin::LbListenerRow {
                    listen: listen.into(),
                    accepting,
                    active,
                    total: 7,
                    refused: 0,
                    no_backend: 0,
                    relay_errors: 0,
                    bytes_in: 2_000,
                    bytes_out: 3_000_000,
                    backends: vec![crate::admin::LbBackendRow {
                        name: "n2".into(),
                        addr: "10.0.0.2:8080".into(),
                        up: !accepting,
                        active: 1,
                        total: 5,
                        connect_errors: 0,
                        transitions: 2,
                    }],
                })
                .collect(),
        }
    }

    #[test]
    fn lb_status_names_states_and_warns_about_accepting_twice_or_never() {
        let mut bare = lb_report("n4", vec![]);
        bare.vip = None;
        let reports = [
            lb_report(
                "n1",
                vec![("10.0.0.100:80", true, 3), ("10.0.0.100:443", false, 0)],
            ),
            lb_report(
                "n2",
                vec![("10.0.0.100:80", true, 0), ("10.0.0.100:443", false, 2)],
            ),
            bare,
        ];
        let text = lb_status_text(&reports, &["n3".to_string()]);
        let lines: Vec<&str> = text.lines().collect();
        let row = |node: &str, listen: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(node) && l.contains(listen) && !l.contains("10.0.0.2:"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(row("n1", ":80 ")[2..5], ["accepting", "3", "7"], "{text}");
        assert_eq!(row("n1", ":443")[2], "standby", "{text}");
        assert_eq!(row("n2", ":443")[2], "draining", "{text}");
        assert!(
            row("n1", ":80 ").join(" ").ends_with("2.00 kB 3.00 MB"),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("n1")
                && l.contains("10.0.0.100:80 ")
                && l.split_whitespace().collect::<Vec<_>>()[2..5]
                    == ["n2", "10.0.0.2:8080", "down"]),
            "{text}"
        );
        assert!(
            text.contains("warning: 2 nodes accept on 10.0.0.100:80: n1, n2"),
            "{text}"
        );
        assert!(
            text.contains("warning: no node accepts on 10.0.0.100:443"),
            "{text}"
        );
        assert!(text.contains("no balancer on: n4"), "{text}");
        assert!(text.ends_with("not answering: n3\n"), "{text}");
        // One node accepting per listener: no warning.
        let calm = [lb_report("n1", vec![("10.0.0.100:80", true, 0)])];
        assert!(!lb_status_text(&calm, &[]).contains("warning"));
        // A node's problems are named with it.
        let mut troubled = lb_report("n2", vec![("10.0.0.100:80", false, 0)]);
        troubled.problems = vec!["cannot bind 10.0.0.100:80: Permission denied".into()];
        assert!(
            lb_status_text(&[troubled], &[])
                .contains("problem on n2: cannot bind 10.0.0.100:80: Permission denied\n")
        );
        // Nobody has a balancer.
        let mut none = lb_report("n1", vec![]);
        none.vip = None;
        assert_eq!(
            lb_status_text(&[none], &[]),
            "no node runs a balancer (no [lb] section)\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "y".into()],
                vec!["z".into(), "w".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  y\nz     w\n");
    }
}
