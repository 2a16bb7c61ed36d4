//! `spacectl service` and `singleton`: declare, list and remove supervised services and
//! singletons, as every node runs them.

use super::common::*;
use super::mutate::mutate;
use super::render::*;

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
    /// Change a service's program, roles or health check (its scope stays: remove and add
    /// it to change that). Every node running it restarts it with the new spec; a singleton's
    /// new roles apply to its next placement (the owner keeps it).
    Set {
        /// Service name.
        name: String,
        /// every-node: only nodes with one of these roles; singleton: the eligible roles.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        /// New health-check command, split on spaces; exit 0 = healthy.
        #[arg(long, conflicts_with = "no_health_check")]
        health_check: Option<String>,
        /// Drop the health check.
        #[arg(long)]
        no_health_check: bool,
        /// The new program and its arguments.
        #[arg(last = true)]
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
pub(crate) fn parse_scope(scope: &str) -> Result<spaced_fabric::ServiceScope, CtlError> {
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

/// Asks every member for its services.
pub(crate) async fn services_everywhere(
    cli: &Target,
) -> Result<(Vec<crate::admin::ServicesReport>, Vec<String>), CtlError> {
    ask_everywhere(cli, AdminRequest::ServiceStatus, |reply| match reply {
        AdminReply::Services(r) => Some(r),
        _ => None,
    })
    .await
}

/// `spacectl service ...`
pub(super) async fn run(cli: &Target, action: &ServiceCmd) -> Result<(), CtlError> {
    match action {
        ServiceCmd::Add {
            name,
            scope,
            roles,
            health_check,
            command,
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
        ServiceCmd::Set {
            name,
            roles,
            health_check,
            no_health_check,
            command,
        } => {
            let health_check = match (health_check, no_health_check) {
                (_, true) => Some(None),
                (Some(h), false) => {
                    let h: Vec<String> = h.split_whitespace().map(str::to_string).collect();
                    if h.is_empty() {
                        return Err(usage("--health-check: empty command"));
                    }
                    Some(Some(h))
                }
                (None, false) => None,
            };
            let roles = roles.as_ref().map(|r| {
                r.iter()
                    .map(|r| r.trim().to_string())
                    .filter(|r| !r.is_empty())
                    .collect::<BTreeSet<String>>()
            });
            let command = (!command.is_empty()).then(|| command.clone());
            if roles.is_none() && health_check.is_none() && command.is_none() {
                return Err(usage(
                    "service set: say what changes (--roles, --health-check, --no-health-check, -- PROGRAM ARGS...)",
                ));
            }
            let req = AdminRequest::ServiceSet {
                name: name.clone(),
                command,
                roles,
                health_check,
            };
            match mutate(cli, req).await? {
                AdminReply::Applied(_) => {
                    println!("service {name} changed");
                    Ok(())
                }
                AdminReply::Done => {
                    println!("service {name} unchanged: it already is so");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        ServiceCmd::Remove { name } => {
            let cmd = spaced_raft::Command::RemoveService { name: name.clone() };
            match mutate(&cli, AdminRequest::Write(cmd)).await? {
                AdminReply::Applied(_) => {
                    println!("service {name} removed");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        ServiceCmd::List { json } => {
            let (reports, silent) = services_everywhere(&cli).await?;
            let specs = reports.first().map(|r| r.specs.clone()).unwrap_or_default();
            if structured(*json) {
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
                println!(
                    "{}",
                    emit(*json, &json!({"services": services, "unreachable": silent}))
                );
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
    }
}

/// `spacectl singleton ...`
pub(super) async fn singleton(cli: &Target, action: &SingletonCmd) -> Result<(), CtlError> {
    match action {
        SingletonCmd::List { json } => {
            let mut c = connect(&cli).await?;
            let rows = match c.call(&AdminRequest::SingletonList).await? {
                AdminReply::Singletons(r) => r,
                other => return Err(unexpected(c.target(), &other).into()),
            };
            c.close().await;
            if structured(*json) {
                println!(
                    "{}",
                    emit(*json, &serde_json::to_value(&rows).unwrap_or_default())
                );
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
        SingletonCmd::Move { name, to } => {
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
    }
}
