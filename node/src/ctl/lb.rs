//! `spacectl lb status`: every node's balancer, its listeners and backends.

use super::common::*;
use super::render::*;

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
pub(crate) fn listener_state(l: &crate::admin::LbListenerRow) -> &'static str {
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

/// `spacectl lb ...`
pub(super) async fn run(cli: &Target, action: &LbCmd) -> Result<(), CtlError> {
    match action {
        LbCmd::Status { json } => {
            let (reports, silent) =
                ask_everywhere(&cli, AdminRequest::LbStatus, |reply| match reply {
                    AdminReply::Lb(r) => Some(r),
                    _ => None,
                })
                .await?;
            if structured(*json) {
                println!(
                    "{}",
                    emit(*json, &json!({"nodes": reports, "unreachable": silent}))
                );
            } else {
                print!("{}", lb_status_text(&reports, &silent));
            }
            Ok(())
        }
    }
}
