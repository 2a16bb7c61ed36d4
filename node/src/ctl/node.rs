//! `spacectl status`, `node` and `leader`: the members, membership changes, drain and
//! activate, and leadership.

use super::common::*;
use super::mutate::mutate;
use super::render::*;

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
    /// Have a node read its config file again and apply what can change while running, as
    /// SIGHUP does (log level, certificates, `[lb]`); prints what it applied and each changed
    /// key that needs a restart.
    Reload {
        /// Name or id.
        node: String,
    },
    /// Set a node's roles (replacing them). Placements it holds stay until they move.
    SetRoles {
        /// Name or id.
        node: String,
        /// Roles, comma-separated (empty: none).
        #[arg(value_delimiter = ',')]
        roles: Vec<String>,
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

/// `spacectl status`
pub(super) async fn status(cli: &Target, json: &bool, watch: Option<f64>) -> Result<(), CtlError> {
    watching(watch, || async {
        let mut c = connect(cli).await?;
        let s = c.status().await;
        c.close().await;
        let s = s?;
        Ok(if structured(*json) {
            format!("{}\n", emit(*json, &status_json(&s)))
        } else {
            render_status(&s)
        })
    })
    .await
}

/// `spacectl node ...`
pub(super) async fn run(cli: &Target, action: &NodeCmd) -> Result<(), CtlError> {
    match action {
        NodeCmd::List { json } => {
            let mut c = connect(&cli).await?;
            let s = c.status().await?;
            if structured(*json) {
                println!("{}", emit(*json, &status_json(&s)["nodes"]));
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
        NodeCmd::Add {
            id,
            name,
            addr,
            roles,
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
        NodeCmd::Remove { node } => {
            match mutate(&cli, AdminRequest::RemoveNode(node.clone())).await? {
                AdminReply::NodeRemoved {
                    revoked: Some(serial),
                } => {
                    println!("node {node} removed; its certificate (serial {serial}) is revoked");
                    Ok(())
                }
                AdminReply::NodeRemoved { revoked: None } => {
                    println!(
                        "node {node} removed; its certificate is NOT revoked (the node could not                          be reached to read it): run `spacectl pki revoke <its .pem>`"
                    );
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        NodeCmd::Drain { node } => set_admin_state(&cli, node, AdminState::Draining).await,
        NodeCmd::Activate { node } => set_admin_state(&cli, node, AdminState::Active).await,
        NodeCmd::Reload { node } => {
            let mut c = connect(cli).await?;
            let status = c.status().await;
            c.close().await;
            let status = status?;
            let member = status
                .nodes
                .iter()
                .find(|n| n.name == *node || n.id.to_string() == *node)
                .ok_or_else(|| failed(format!("no member {node:?}")))?;
            if cli.dry_run {
                return Err(CtlError {
                    message: format!(
                        "would have {} ({}) read its config file again and apply what can change while running\ndry run: nothing was changed",
                        member.name, member.addr
                    ),
                    code: 0,
                });
            }
            let mut c = AdminClient::connect(&member.addr, &credentials(cli)?).await?;
            let reply = c.call(&AdminRequest::Reload).await;
            c.close().await;
            match reply? {
                AdminReply::Reloaded(lines) => {
                    println!("{} reloaded its config:", member.name);
                    for l in lines {
                        println!("  {l}");
                    }
                    Ok(())
                }
                AdminReply::Failed(e) => Err(failed(format!("{}: {e}", member.name))),
                other => Err(odd(other)),
            }
        }
        NodeCmd::SetRoles { node, roles } => {
            let roles: BTreeSet<String> = roles
                .iter()
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty())
                .collect();
            let req = AdminRequest::SetRoles {
                node: node.clone(),
                roles: roles.clone(),
            };
            match mutate(&cli, req).await? {
                AdminReply::Done => {
                    let list: Vec<&str> = roles.iter().map(String::as_str).collect();
                    println!("node {node} now has roles [{}]", list.join(","));
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
    }
}

/// `spacectl leader ...`
pub(super) async fn leader(cli: &Target, action: &LeaderCmd) -> Result<(), CtlError> {
    match action {
        LeaderCmd::Transfer { to } => {
            match mutate(&cli, AdminRequest::TransferLeader(to.clone())).await? {
                AdminReply::Done => {
                    println!("leadership transferred to {to}");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
    }
}

pub(crate) async fn set_admin_state(
    cli: &Target,
    node: &str,
    state: AdminState,
) -> Result<(), CtlError> {
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
