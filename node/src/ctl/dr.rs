//! `spacectl dr`: disaster recovery between two sites, on this site's leader: status,
//! failover, switchover, demote.

use spaced_replication::DrStatus;

use super::*;
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
}

/// `spacectl dr ...`
pub(super) async fn run(cli: &Cli, action: &DrCmd) -> Result<(), CtlError> {
    let (what, yes, request) = match action {
        DrCmd::Status { json } => {
            let status = match mutate(cli, AdminRequest::Dr(DrAction::Status)).await? {
                AdminReply::DrStatus(s) => s,
                other => return Err(odd(other)),
            };
            if *json {
                println!("{}", dr_status_json(&status));
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

/// `dr status --json`.
pub fn dr_status_json(s: &DrStatus) -> String {
    serde_json::to_string_pretty(&json!({
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
    }))
    .unwrap_or_default()
}
