//! `--dry-run`: what a mutation would change, read from the cluster as it is now, with nothing
//! sent to the leader. The leader may still refuse the real one, or find the cluster changed.

use super::common::*;
use super::render::scope_text;

/// What the cluster holds now, as far as a plan needs it.
struct Now {
    status: StatusReport,
    devices: Option<Vec<DeviceRow>>,
    services: Option<std::collections::BTreeMap<String, spaced_fabric::ServiceSpec>>,
}

impl Now {
    async fn read(cli: &Target, devices: bool, services: bool) -> Result<Now, CtlError> {
        let mut c = connect(cli).await?;
        let status = c.status().await;
        let mut device_rows = None;
        let mut specs = None;
        let mut asked = Ok(());
        if devices {
            asked = ask(&mut c, AdminRequest::ListDevices).await.map(|r| {
                if let AdminReply::Devices(d) = r {
                    device_rows = Some(d);
                }
            });
        }
        if services && asked.is_ok() {
            asked = ask(&mut c, AdminRequest::ServiceStatus).await.map(|r| {
                if let AdminReply::Services(r) = r {
                    specs = Some(r.specs);
                }
            });
        }
        c.close().await;
        asked?;
        Ok(Now {
            status: status?,
            devices: device_rows,
            services: specs,
        })
    }

    /// The member `node` names (id or name).
    fn node(&self, node: &str) -> Option<&crate::admin::NodeStatus> {
        self.status
            .nodes
            .iter()
            .find(|n| n.name == node || n.id.to_string() == node)
    }

    fn node_name(&self, id: Option<u64>) -> String {
        match id {
            Some(id) => self
                .status
                .nodes
                .iter()
                .find(|n| n.id == id)
                .map_or_else(|| format!("node {id}"), |n| n.name.clone()),
            None => "no node".into(),
        }
    }
}

/// `request`'s reply, if it is of the kind a read of it gives (`Devices` for `ListDevices`,
/// `Services` for `ServiceStatus`); another reply is an error naming the node.
async fn ask(c: &mut AdminClient, request: AdminRequest) -> Result<AdminReply, CtlError> {
    let reply = c.call(&request).await?;
    match (&request, &reply) {
        (AdminRequest::ListDevices, AdminReply::Devices(_))
        | (AdminRequest::ServiceStatus, AdminReply::Services(_)) => Ok(reply),
        _ => Err(unexpected(c.target(), &reply).into()),
    }
}

fn list(items: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

fn roles_text(roles: &std::collections::BTreeSet<String>) -> String {
    if roles.is_empty() {
        "(none)".into()
    } else {
        roles.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

/// What `request` would change, if it is a mutation `--dry-run` covers; `None` for requests
/// that change nothing (they run as usual).
pub(super) async fn plan(cli: &Target, request: &AdminRequest) -> Result<Option<String>, CtlError> {
    use spaced_raft::Command;
    let lines: Vec<String> = match request {
        AdminRequest::AddDevices(new) => {
            let now = Now::read(cli, true, false).await?;
            let have: HashSet<&str> = now
                .devices
                .iter()
                .flatten()
                .map(|d| d.id.as_str())
                .collect();
            let (exist, add): (Vec<_>, Vec<_>) =
                new.iter().partition(|d| have.contains(d.id.as_str()));
            let mut lines = vec![format!(
                "would add {} device(s): {}",
                add.len(),
                list(
                    &add.iter()
                        .map(|d| format!("{} ({})", d.id, d.addr))
                        .collect::<Vec<_>>()
                )
            )];
            if !exist.is_empty() {
                lines.push(format!(
                    "already registered, would be refused: {}",
                    list(&exist.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
                ));
            }
            lines
        }
        AdminRequest::RemoveDevices(ids) => {
            let now = Now::read(cli, true, false).await?;
            let rows: BTreeMap<&str, &DeviceRow> = now
                .devices
                .iter()
                .flatten()
                .map(|d| (d.id.as_str(), d))
                .collect();
            let (found, missing): (Vec<_>, Vec<_>) =
                ids.iter().partition(|id| rows.contains_key(id.as_str()));
            let mut lines = vec![format!(
                "would remove {} device(s) (their connections close): {}",
                found.len(),
                list(
                    &found
                        .iter()
                        .map(|id| format!("{id} (on {})", now.node_name(rows[id.as_str()].owner)))
                        .collect::<Vec<_>>()
                )
            )];
            if !missing.is_empty() {
                lines.push(format!(
                    "not registered: {}",
                    list(&missing.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                ));
            }
            lines
        }
        AdminRequest::DeviceRebalance { max_moves } => {
            let now = Now::read(cli, false, false).await?;
            let counts: Vec<String> = now
                .status
                .nodes
                .iter()
                .filter(|n| n.roles.iter().any(|r| r == "app"))
                .map(|n| format!("{} {}", n.name, n.devices))
                .collect();
            vec![format!(
                "would even out the devices of the live app nodes (now: {}){}; the leader picks the moves",
                list(&counts),
                max_moves.map_or(String::new(), |m| format!(", at most {m} moves"))
            )]
        }
        AdminRequest::VipAdd {
            name,
            address,
            interface,
            roles,
        } => {
            let now = Now::read(cli, false, false).await?;
            match now.status.vips.iter().find(|v| &v.name == name) {
                Some(v) => vec![format!(
                    "VIP {name} exists ({} on {}): the leader would refuse it",
                    v.address, v.interface
                )],
                None => {
                    let eligible: Vec<String> = now
                        .status
                        .nodes
                        .iter()
                        .filter(|n| n.roles.iter().any(|r| roles.contains(r)))
                        .map(|n| n.name.clone())
                        .collect();
                    vec![format!(
                        "would add VIP {name} ({address} on {interface}, roles {}); nodes that may hold it: {}",
                        roles.join(","),
                        if eligible.is_empty() {
                            "none yet".into()
                        } else {
                            list(&eligible)
                        }
                    )]
                }
            }
        }
        AdminRequest::VipRemove(name) => {
            let now = Now::read(cli, false, false).await?;
            match now.status.vips.iter().find(|v| &v.name == name) {
                Some(v) => vec![format!(
                    "would remove VIP {name} ({} on {}); {} would remove the address first",
                    v.address,
                    v.interface,
                    now.node_name(v.owner)
                )],
                None => vec![format!("no VIP {name}: the leader would refuse it")],
            }
        }
        AdminRequest::VipMove { name, to } => {
            let now = Now::read(cli, false, false).await?;
            match (
                now.status.vips.iter().find(|v| &v.name == name),
                now.node(to),
            ) {
                (_, None) => vec![format!("no member {to}: the leader would refuse it")],
                // A singleton (or a name the leader does not know, which it refuses).
                (None, Some(n)) => vec![format!(
                    "would move {name} to {} (the owner stops it first; the leader refuses a name it does not place)",
                    n.name
                )],
                (Some(v), Some(n)) => vec![format!(
                    "would move VIP {name} ({}) from {} to {} (epoch {} -> {}); the owner releases it first",
                    v.address,
                    now.node_name(v.owner),
                    n.name,
                    v.epoch,
                    v.epoch + 1
                )],
            }
        }
        AdminRequest::AddNode {
            id,
            name,
            addr,
            roles,
        } => {
            let now = Now::read(cli, false, false).await?;
            let voters = now.status.nodes.iter().filter(|n| n.voter).count();
            match now
                .status
                .nodes
                .iter()
                .find(|n| n.id == *id || &n.name == name)
            {
                Some(n) => vec![format!(
                    "a member is already {} (id {}): the leader would refuse it",
                    n.name, n.id
                )],
                None => vec![format!(
                    "would add node {name} (id {id}, {addr}) as a learner, then a voter{}; roles {}",
                    if voters >= 5 {
                        " (not: 5 voters already)"
                    } else {
                        ""
                    },
                    roles
                        .as_ref()
                        .map_or("from its own config".into(), roles_text)
                )],
            }
        }
        AdminRequest::RemoveNode(node) => {
            let now = Now::read(cli, false, false).await?;
            match now.node(node) {
                Some(n) => {
                    let held: Vec<String> = now
                        .status
                        .vips
                        .iter()
                        .filter(|v| v.owner == Some(n.id))
                        .map(|v| v.name.clone())
                        .collect();
                    vec![format!(
                        "would remove {} (id {}, {}) from the cluster and revoke its certificate; it holds {} device(s){}",
                        n.name,
                        n.id,
                        if n.voter { "voter" } else { "learner" },
                        n.devices,
                        if held.is_empty() {
                            String::new()
                        } else {
                            format!(" and the VIPs {}, which would move", list(&held))
                        }
                    )]
                }
                None => vec![format!("no member {node}: the leader would refuse it")],
            }
        }
        AdminRequest::SetRoles { node, roles } => {
            let now = Now::read(cli, false, false).await?;
            match now.node(node) {
                Some(n) => {
                    let old: std::collections::BTreeSet<String> = n.roles.iter().cloned().collect();
                    if &old == roles {
                        vec![format!(
                            "{} has the roles {} already: nothing would change",
                            n.name,
                            roles_text(roles)
                        )]
                    } else {
                        vec![format!(
                            "roles of {}: {} -> {} (placements the new roles exclude would move)",
                            n.name,
                            roles_text(&old),
                            roles_text(roles)
                        )]
                    }
                }
                None => vec![format!("no member {node}: the leader would refuse it")],
            }
        }
        AdminRequest::SetAdminState { node, state } => {
            let now = Now::read(cli, false, false).await?;
            match now.node(node) {
                Some(n) => vec![format!(
                    "{}: {} -> {}{}",
                    n.name,
                    n.admin_state
                        .map_or("-".into(), crate::ctl::render::admin_state_name),
                    crate::ctl::render::admin_state_name(*state),
                    if *state == spaced_fabric::AdminState::Draining {
                        format!(" (its {} device(s) would move)", n.devices)
                    } else {
                        String::new()
                    }
                )],
                None => vec![format!("no member {node}: the leader would refuse it")],
            }
        }
        AdminRequest::TransferLeader(to) => {
            let now = Now::read(cli, false, false).await?;
            match now.node(to) {
                Some(n) => vec![format!(
                    "would hand the leadership from {} to {}",
                    now.node_name(now.status.leader),
                    n.name
                )],
                None => vec![format!("no member {to}: the leader would refuse it")],
            }
        }
        AdminRequest::Write(Command::PutService { name, spec }) => {
            let now = Now::read(cli, false, true).await?;
            let describe = |s: &spaced_fabric::ServiceSpec| {
                format!(
                    "{}, roles {}, command {:?}",
                    scope_text(&s.scope),
                    roles_text(&s.roles),
                    s.command.join(" ")
                )
            };
            match now.services.as_ref().and_then(|s| s.get(name)) {
                Some(old) if old == spec => {
                    vec![format!(
                        "service {name} is declared so already: nothing would change"
                    )]
                }
                Some(old) => vec![
                    format!("would replace service {name}"),
                    format!("  now:   {}", describe(old)),
                    format!("  after: {}", describe(spec)),
                ],
                None => vec![format!("would declare service {name} ({})", describe(spec))],
            }
        }
        AdminRequest::Write(Command::RemoveService { name }) => {
            let now = Now::read(cli, false, true).await?;
            match now.services.as_ref().and_then(|s| s.get(name)) {
                Some(spec) => vec![format!(
                    "would remove service {name} ({}; every instance stops)",
                    scope_text(&spec.scope)
                )],
                None => vec![format!("no service {name}: nothing would change")],
            }
        }
        AdminRequest::VipSet {
            name,
            address,
            interface,
            roles,
        } => {
            let now = Now::read(cli, false, false).await?;
            match now.status.vips.iter().find(|v| &v.name == name) {
                None => vec![format!("no VIP {name}: the leader would refuse it")],
                Some(v) => vip_set_plan(&now, v, address, interface, roles),
            }
        }
        AdminRequest::DeviceSet { id, addr, mode } => {
            let now = Now::read(cli, true, false).await?;
            match now.devices.iter().flatten().find(|d| &d.id == id) {
                None => vec![format!("no device {id}: the leader would refuse it")],
                Some(d) => {
                    let addr = addr.clone().unwrap_or_else(|| d.addr.clone());
                    let mode = mode.unwrap_or(d.mode);
                    if addr == d.addr && mode == d.mode {
                        vec![format!("device {id} already is so: nothing would change")]
                    } else {
                        vec![format!(
                            "would change device {id}: {} {:?} -> {addr} {mode:?}; {}",
                            d.addr,
                            d.mode,
                            match d.owner {
                                Some(o) => format!("{} would connect anew", now.node_name(Some(o))),
                                None => "no node holds it".into(),
                            }
                        )]
                    }
                }
            }
        }
        AdminRequest::ServiceSet {
            name,
            command,
            roles,
            health_check,
        } => {
            let now = Now::read(cli, false, true).await?;
            match now.services.as_ref().and_then(|s| s.get(name)) {
                None => vec![format!("no service {name}: the leader would refuse it")],
                Some(spec) => {
                    let mut changes = Vec::new();
                    if let Some(c) = command.as_ref().filter(|c| **c != spec.command) {
                        changes.push(format!(
                            "command {:?} -> {:?}",
                            spec.command.join(" "),
                            c.join(" ")
                        ));
                    }
                    if let Some(r) = roles.as_ref().filter(|r| **r != spec.roles) {
                        changes.push(format!(
                            "roles {} -> {}",
                            roles_text(&spec.roles),
                            roles_text(r)
                        ));
                    }
                    if let Some(h) = health_check.as_ref().filter(|h| **h != spec.health_check) {
                        let text = |h: &Option<Vec<String>>| {
                            h.as_ref()
                                .map_or("none".to_string(), |h| format!("{:?}", h.join(" ")))
                        };
                        changes.push(format!(
                            "health check {} -> {}",
                            text(&spec.health_check),
                            text(h)
                        ));
                    }
                    if changes.is_empty() {
                        vec![format!(
                            "service {name} already is so: nothing would change"
                        )]
                    } else {
                        vec![format!(
                            "would change service {name} ({}): {}; every instance restarts with it",
                            scope_text(&spec.scope),
                            changes.join(", ")
                        )]
                    }
                }
            }
        }
        AdminRequest::Write(cmd) => vec![format!("would commit {cmd:?}")],
        AdminRequest::Dr(crate::admin::DrAction::Status) => return Ok(None),
        AdminRequest::Dr(action) => {
            vec![format!(
                "would ask this site's leader for the DR action {action:?}"
            )]
        }
        _ => return Ok(None),
    };
    let mut text = lines.join("\n");
    text.push_str("\ndry run: nothing was changed");
    Ok(Some(text))
}

/// What `vip set` would do to VIP `v`: the change, and whether its owner lets it go first.
fn vip_set_plan(
    now: &Now,
    v: &crate::admin::VipRow,
    address: &Option<String>,
    interface: &Option<String>,
    roles: &Option<Vec<String>>,
) -> Vec<String> {
    let old_roles: std::collections::BTreeSet<String> = v.roles.iter().cloned().collect();
    let address = address.clone().unwrap_or_else(|| v.address.clone());
    let interface = interface.clone().unwrap_or_else(|| v.interface.clone());
    let new_roles: std::collections::BTreeSet<String> = match roles {
        Some(r) => r.iter().cloned().collect(),
        None => old_roles.clone(),
    };
    if address == v.address && interface == v.interface && new_roles == old_roles {
        return vec![format!(
            "VIP {} already is so: nothing would change",
            v.name
        )];
    }
    let owner_keeps = v.owner.is_some_and(|o| {
        now.status
            .nodes
            .iter()
            .find(|n| n.id == o)
            .is_some_and(|n| n.roles.iter().any(|r| new_roles.contains(r)))
    });
    let how = if v.owner.is_none() {
        "nobody holds it; the leader places it with the new spec".to_string()
    } else if address == v.address && interface == v.interface && owner_keeps {
        format!("{} keeps it: changed in place", now.node_name(v.owner))
    } else {
        format!(
            "{} would remove {} and release it first, then the leader places it again",
            now.node_name(v.owner),
            v.address
        )
    };
    vec![format!(
        "would change VIP {}: {} on {} (roles {}) -> {address} on {interface} (roles {}); {how}",
        v.name,
        v.address,
        v.interface,
        roles_text(&old_roles),
        roles_text(&new_roles),
    )]
}
