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

/// `value` as a YAML document (block style, two-space indent, keys in the order `--json` prints
/// them), as
/// `spacectl -o yaml` prints it. Strings stay plain where YAML would read them back as the
/// same string, else they are double-quoted (JSON's escapes are YAML's).
pub fn yaml(value: &serde_json::Value) -> String {
    let mut out = String::new();
    yaml_node(value, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn yaml_scalar(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    Some(match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => return None,
    })
}

/// A string plain if that reads back as itself, else double-quoted.
fn yaml_string(s: &str) -> String {
    const WORDS: [&str; 12] = [
        "null", "true", "false", "yes", "no", "on", "off", "y", "n", "~", ".nan", ".inf",
    ];
    let plain = !s.is_empty()
        && !WORDS.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err()
        && !s.starts_with(|c: char| " -?:,[]{}#&*!|>'\"%@`.".contains(c))
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && !s.contains(" #")
        && s.chars().all(|c| !c.is_control());
    if plain {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

fn yaml_node(value: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match value {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                out.push_str(&pad);
                out.push_str(&yaml_string(k));
                out.push(':');
                // A list under a key sits at the key's indent, as kubectl prints it.
                let inner = if v.is_array() { indent } else { indent + 2 };
                yaml_child(v, inner, out, false);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for v in a {
                out.push_str(&pad);
                out.push('-');
                yaml_child(v, indent + 2, out, true);
            }
        }
        scalar => {
            out.push_str(&pad);
            out.push_str(&yaml_scalar(scalar).unwrap_or_default());
            out.push('\n');
        }
    }
}

/// What follows a key's colon or an item's dash: a scalar on the same line, else the nested
/// block at `indent`, on the next line (a key's) or starting on the same line (an item's:
/// its first line follows the dash, the rest align under it).
fn yaml_child(v: &serde_json::Value, indent: usize, out: &mut String, item: bool) {
    match yaml_scalar(v) {
        Some(s) => {
            out.push(' ');
            out.push_str(&s);
            out.push('\n');
        }
        None if item => {
            let mut block = String::new();
            yaml_node(v, indent, &mut block);
            out.push(' ');
            out.push_str(block.trim_start_matches(' '));
        }
        None => {
            out.push('\n');
            yaml_node(v, indent, out);
        }
    }
}

#[cfg(test)]
mod yaml_tests {
    use super::yaml;
    use serde_json::json;

    #[test]
    fn maps_lists_and_scalars_in_block_style() {
        let v = json!({
            "leader": 1,
            "nodes": [
                {"id": 1, "name": "n1", "roles": ["ha", "app"], "voter": true},
                {"id": 2, "name": "n2", "roles": [], "mgmt_ip": null}
            ],
            "lease": {"epoch": 3, "owner": "n1"},
            "empty": {}
        });
        assert_eq!(
            yaml(&v),
            "empty: {}\nleader: 1\nlease:\n  epoch: 3\n  owner: n1\nnodes:\n- id: 1\n  name: n1\n  roles:\n\
             \x20 - ha\n  - app\n  voter: true\n- id: 2\n  mgmt_ip: null\n  name: n2\n  roles: []\n"
        );
    }

    #[test]
    fn strings_yaml_would_misread_are_quoted() {
        let v = json!([
            "true",
            "no",
            "12",
            "1.5",
            "",
            "-x",
            ": x",
            "a: b",
            "a #b",
            "x\ny",
            "10.0.0.1:830",
            "127.0.0.1",
            "n1",
            "up since 3s",
            "*",
            "[x]"
        ]);
        assert_eq!(
            yaml(&v),
            "- \"true\"\n- \"no\"\n- \"12\"\n- \"1.5\"\n- \"\"\n- \"-x\"\n- \": x\"\n- \"a: b\"\n\
             - \"a #b\"\n- \"x\\ny\"\n- 10.0.0.1:830\n- 127.0.0.1\n- n1\n- up since 3s\n- \"*\"\n- \"[x]\"\n"
        );
        assert_eq!(yaml(&json!("plain")), "plain\n");
        assert_eq!(
            yaml(&json!([[1, 2], {"a": [{"b": 1}]}])),
            "- - 1\n  - 2\n- a:\n  - b: 1\n"
        );
    }
}
