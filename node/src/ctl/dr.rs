//! `spacectl dr`: disaster recovery between two sites, on this site's leader: status,
//! failover, switchover, demote.

use spaced_replication::DrStatus;

use super::common::*;
use super::mutate::mutate;
use super::render;
use crate::admin::DrAction;

/// `spacectl dr ...`
#[derive(Debug, Subcommand)]
pub enum DrCmd {
    /// This site's role and epoch, and its link to the peer site: reachable, lag.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make this standby site active now (the active site is lost). Refused while the
    /// active site answers: use `switchover` then.
    Failover {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Promote even though the active site answers (it becomes standby when it hears of
        /// this site's higher epoch; what it acknowledged meanwhile is not mirrored).
        #[arg(long)]
        force: bool,
    },
    /// Move the active role to this standby site without losing writes: the active site
    /// becomes standby, this site mirrors everything it had, then becomes active.
    Switchover {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Make this active site standby (it stops its workload).
    Demote {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Back the files of `[dr.backup]` up now on this active site; the standby site receives
    /// the backup at the next heartbeat and restores it when it is promoted.
    Backup,
    /// Turn this site's automatic failover off (for a while, or until turned on) or on.
    AutomaticFailover {
        /// Turn it on again.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Turn it off for DURATION (`90s`, `30m`, `8h`, `2d`; `0`: until `--enable`).
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "0")]
        disable: Option<String>,
    },
}

pub use spaced_replication::config::parse_duration_ms;

/// `spacectl dr ...`
pub(super) async fn run(cli: &Target, action: &DrCmd) -> Result<(), CtlError> {
    let (what, yes, request) = match action {
        DrCmd::Status { json } => {
            let status = match mutate(cli, AdminRequest::Dr(DrAction::Status)).await? {
                AdminReply::DrStatus(s) => s,
                other => return Err(odd(other)),
            };
            if *json {
                println!("{}", dr_status_json(&status));
            } else if structured(false) {
                println!("{}", emit(false, &dr_status_value(&status)));
            } else {
                print!("{}", dr_status_table(&status, crate::now_millis()));
            }
            return Ok(());
        }
        DrCmd::Failover { yes, force } => (
            "make this site active",
            *yes,
            DrAction::Failover { force: *force },
        ),
        DrCmd::Switchover { yes } => (
            "move the active role to this site",
            *yes,
            DrAction::Switchover,
        ),
        DrCmd::Demote { yes } => ("make this site standby", *yes, DrAction::Demote),
        DrCmd::Backup => {
            match mutate(cli, AdminRequest::Dr(DrAction::Backup)).await? {
                AdminReply::DrBackup {
                    taken_at,
                    files,
                    bytes,
                } => println!(
                    "backed up {files} files ({bytes} bytes) as backup {taken_at} (ms since the Unix epoch); the standby receives it at the next heartbeat"
                ),
                other => return Err(odd(other)),
            }
            return Ok(());
        }
        DrCmd::AutomaticFailover { enable, disable } => {
            let off_for_ms = match (enable, disable) {
                (true, None) => None,
                (false, Some(d)) => Some(parse_duration_ms(d).map_err(|e| usage(e.to_string()))?),
                _ => return Err(usage("say --enable or --disable [DURATION]")),
            };
            let status = match mutate(
                cli,
                AdminRequest::Dr(DrAction::AutomaticFailover { off_for_ms }),
            )
            .await?
            {
                AdminReply::DrStatus(s) => s,
                other => return Err(odd(other)),
            };
            println!(
                "automatic failover: {}",
                auto_failover(&status, crate::now_millis())
            );
            return Ok(());
        }
    };
    if !yes {
        confirm(what)?;
    }
    match mutate(cli, AdminRequest::Dr(request)).await? {
        AdminReply::DrActive { epoch } => println!("this site is active, site epoch {epoch}"),
        AdminReply::Done => println!("this site is standby"),
        other => return Err(odd(other)),
    }
    Ok(())
}

/// Asks on the terminal; without one, `--yes` is needed.
fn confirm(what: &str) -> Result<(), CtlError> {
    if !std::io::stdin().is_terminal() {
        return Err(usage(format!(
            "this would {what}: add --yes to confirm (no terminal to ask on)"
        )));
    }
    eprint!("This will {what}. Type yes to go on: ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| failed(format!("read the answer: {e}")))?;
    if line.trim() != "yes" {
        return Err(failed("not confirmed: nothing done"));
    }
    Ok(())
}

fn opt<T: ToString>(v: Option<T>, none: &str) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| none.to_string())
}

/// `dr status` as a two-column table.
pub fn dr_status_table(s: &DrStatus, now_ms: u64) -> String {
    let peer = match (s.peer_role, s.peer_epoch) {
        (Some(r), Some(e)) => format!("{} ({r}, epoch {e})", s.peer_site),
        _ => format!("{} (never heard)", s.peer_site),
    };
    let link = if s.peer_reachable {
        format!(
            "up, last answer {} ms ago",
            s.last_contact_ms.unwrap_or_default()
        )
    } else {
        format!(
            "DOWN ({} failed in a row{})",
            s.failures_in_row,
            s.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    };
    let mut rows = vec![
        vec!["site".into(), s.site.clone()],
        vec!["role".into(), s.role.to_string()],
        vec!["site epoch".into(), s.epoch.to_string()],
        vec![
            "role since".into(),
            if s.since == 0 {
                "-".into()
            } else {
                format!("{} ago", render::age(now_ms, s.since))
            },
        ],
        vec!["peer".into(), peer],
        vec!["link".into(), link],
    ];
    rows.push(vec![
        "witnesses".into(),
        match s.witnesses_granting {
            Some((granted, of)) => format!(
                "{granted} of {of} grant this site the active role{}",
                s.witness_note
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ),
            None if s.automatic_failover => "not asked yet".into(),
            None => "none".into(),
        },
    ]);
    rows.push(vec!["automatic failover".into(), auto_failover(s, now_ms)]);
    if let Some(note) = &s.script_note {
        rows.push(vec!["failure-detection script".into(), note.clone()]);
    }
    if s.last_backup.is_some() || s.backup_note.is_some() {
        let newest = match s.last_backup {
            Some((at, files, bytes)) => format!(
                "{} ago, {files} files, {bytes} bytes ({})",
                render::age(now_ms, at),
                if s.role == spaced_fabric::SiteRole::Standby {
                    "received from the peer, restored at promotion"
                } else {
                    "taken here"
                }
            ),
            None => "none".into(),
        };
        let note = s
            .backup_note
            .as_ref()
            .map(|n| format!("; {n}"))
            .unwrap_or_default();
        rows.push(vec!["config backup".into(), format!("{newest}{note}")]);
    }
    if s.role == spaced_fabric::SiteRole::Standby {
        rows.push(vec![
            "mirrored".into(),
            format!(
                "peer index {} of {}",
                opt(s.mirrored_index, "none"),
                opt(s.peer_index, "unknown")
            ),
        ]);
        rows.push(vec![
            "lag".into(),
            match (s.lag_entries, s.lag_ms) {
                (Some(e), Some(ms)) => format!("{e} entries, {ms} ms"),
                _ => "unknown (the link is down)".into(),
            },
        ]);
    }
    let mut out = render::table(&["", ""], &rows);
    for n in &s.not_mirrored {
        out.push_str(&format!("not mirrored: {n}\n"));
    }
    out
}

/// Whether the site takes over by itself, and if not, why and until when.
fn auto_failover(s: &DrStatus, now_ms: u64) -> String {
    match s.automatic_failover_off_until {
        Some(u64::MAX) => "off until `dr automatic-failover --enable`".into(),
        Some(t) => format!(
            "off for {} more (`dr automatic-failover --enable` ends it)",
            render::age(t, now_ms)
        ),
        None if s.automatic_failover => "on".into(),
        None => "off (no witnesses, or automatic_failover = false in [dr])".into(),
    }
}

/// `dr status --json`.
pub fn dr_status_json(s: &DrStatus) -> String {
    serde_json::to_string_pretty(&dr_status_value(s)).unwrap_or_default()
}

/// The fields of `dr status --json` (and `-o yaml`).
fn dr_status_value(s: &DrStatus) -> serde_json::Value {
    json!({
        "site": s.site,
        "role": s.role.to_string(),
        "epoch": s.epoch,
        "since_ms": s.since,
        "peer_site": s.peer_site,
        "peer_reachable": s.peer_reachable,
        "last_contact_ms": s.last_contact_ms,
        "peer_role": s.peer_role.map(|r| r.to_string()),
        "peer_epoch": s.peer_epoch,
        "peer_index": s.peer_index,
        "mirrored_index": s.mirrored_index,
        "lag_entries": s.lag_entries,
        "lag_ms": s.lag_ms,
        "failures_in_row": s.failures_in_row,
        "last_error": s.last_error,
        "not_mirrored": s.not_mirrored,
        "automatic_failover": s.automatic_failover,
        "automatic_failover_off_until_ms": s.automatic_failover_off_until,
        "witnesses_granting": s.witnesses_granting.map(|(g, of)| json!({"granted": g, "of": of})),
        "witness_note": s.witness_note,
        "script_note": s.script_note,
        "last_backup": s.last_backup.map(|(at, files, bytes)| json!({"taken_at_ms": at, "files": files, "bytes": bytes})),
        "backup_note": s.backup_note,
    })
}

#[cfg(test)]
mod tests {
    use spaced_fabric::SiteRole;

    use super::*;

    fn standby() -> DrStatus {
        DrStatus {
            site: "west".into(),
            role: SiteRole::Standby,
            epoch: 1,
            since: 1_000,
            peer_site: "east".into(),
            peer_reachable: true,
            last_contact_ms: Some(40),
            peer_role: Some(SiteRole::Active),
            peer_epoch: Some(1),
            peer_index: Some(120),
            mirrored_index: Some(118),
            lag_entries: Some(2),
            lag_ms: Some(35),
            failures_in_row: 0,
            last_error: None,
            not_mirrored: vec!["put-service web: no VIP \"web\"".into()],
            automatic_failover: true,
            automatic_failover_off_until: None,
            witnesses_granting: Some((0, 3)),
            witness_note: Some("w1: site east holds it (8000 ms left)".into()),
            script_note: None,
            last_backup: Some((1_000, 2, 300)),
            backup_note: None,
        }
    }

    #[test]
    fn status_shows_the_link_the_lag_and_unknown_when_down() {
        let text = dr_status_table(&standby(), 61_000);
        for want in [
            "standby",
            "east (active, epoch 1)",
            "up, last answer 40 ms ago",
            "peer index 118 of 120",
            "2 entries, 35 ms",
            "0 of 3 grant this site the active role (w1: site east holds it",
            "not mirrored: put-service web",
            "1m0s ago",
            "2 files, 300 bytes (received from the peer, restored at promotion)",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
        let down = DrStatus {
            peer_reachable: false,
            failures_in_row: 4,
            last_error: Some("10.1.0.1:7443: no answer within 1s".into()),
            lag_entries: None,
            lag_ms: None,
            ..standby()
        };
        let text = dr_status_table(&down, 61_000);
        assert!(
            text.contains("DOWN (4 failed in a row: 10.1.0.1:7443"),
            "{text}"
        );
        assert!(text.contains("unknown (the link is down)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&dr_status_json(&down)).unwrap();
        assert_eq!(
            json["lag_ms"],
            serde_json::Value::Null,
            "unknown is null, never 0"
        );
        assert_eq!(json["witnesses_granting"]["of"], 3);
        let off = DrStatus {
            automatic_failover: false,
            automatic_failover_off_until: Some(61_000 + 2 * 3_600_000),
            ..standby()
        };
        assert!(
            dr_status_table(&off, 61_000).contains("off for 2h0m more"),
            "{}",
            dr_status_table(&off, 61_000)
        );
    }

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration_ms("0"), Ok(0));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("30m"), Ok(1_800_000));
        assert_eq!(parse_duration_ms("8h"), Ok(28_800_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_duration_ms("45"), Ok(45_000));
        assert!(parse_duration_ms("8 hours").is_err());
        assert!(parse_duration_ms("h").is_err());
        assert!(parse_duration_ms("99999999999999999999d").is_err());
    }
}
