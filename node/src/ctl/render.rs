//! Tables and JSON for what nodes report: status, VIPs, devices, rebalances.

use super::common::*;

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

pub(crate) fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Roles as one table cell.
pub(crate) fn roles_cell(roles: &[String]) -> String {
    if roles.is_empty() {
        "-".into()
    } else {
        roles.join(",")
    }
}

/// `active` or `draining`.
pub(crate) fn admin_state_name(a: spaced_fabric::AdminState) -> String {
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
                n.version
                    .as_deref()
                    .map(short_version)
                    .unwrap_or_else(|| "-".into()),
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
            "VERSION",
        ],
        &rows,
    ));
    if !s.vips.is_empty() {
        out.push('\n');
        out.push_str(&render_vips(&s.vips));
    }
    out
}

/// A node's recorded build for a table cell: `0.1.0 (3f2a9c1d0b7e, built 2026-12-02); data
/// format 5` as `0.1.0 3f2a9c1d0b7e f5`; anything else as it is.
pub fn short_version(v: &str) -> String {
    let parsed = (|| {
        let (version, rest) = v.split_once(" (")?;
        let (commit, rest) = rest.split_once(", built ")?;
        let (_, format) = rest.split_once("; data format ")?;
        Some(format!("{version} {commit} f{format}"))
    })();
    parsed.unwrap_or_else(|| v.to_string())
}

pub(crate) fn vip_json(v: &crate::admin::VipRow) -> serde_json::Value {
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
pub(crate) fn owner_cell(name: Option<&str>, id: Option<u64>) -> String {
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
            "version": n.version,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn device_json(d: &DeviceRow) -> serde_json::Value {
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

pub(crate) fn scope_text(scope: &spaced_fabric::ServiceScope) -> String {
    use spaced_fabric::ServiceScope;
    match scope {
        ServiceScope::EveryNode => "every-node".into(),
        ServiceScope::Vip(v) => format!("vip:{v}"),
        ServiceScope::Singleton => "singleton".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_version_is_shortened_for_the_table() {
        assert_eq!(
            short_version("0.1.0 (3f2a9c1d0b7e, built 2026-12-02); data format 5"),
            "0.1.0 3f2a9c1d0b7e f5"
        );
        assert_eq!(short_version("something else"), "something else");
    }
}
