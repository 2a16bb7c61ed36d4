//! `spacectl vip`: list, add, change, move and remove virtual IPs.

use super::common::*;
use super::mutate::mutate;
use super::render::*;

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
        /// Show it again every SECONDS (default 2) until interrupted, like `watch`.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Remove a VIP: its owner removes the address and releases it first. (A VIP declared
    /// in a node's config comes back when that node starts: remove it there too.)
    Remove {
        /// VIP name.
        name: String,
    },
    /// Move a VIP to another node: the owner releases first, then the target takes it.
    Move {
        /// VIP name.
        name: String,
        /// Target node (name or id).
        #[arg(long)]
        to: String,
    },
    /// Change a VIP's address, interface or roles. A new address or interface: the owner
    /// removes the old address and releases the VIP first, then the leader places it again.
    /// Only the roles, with the owner keeping one: changed in place. (A VIP declared in a
    /// node's config is declared again when that node starts: change it there too.)
    Set {
        /// VIP name.
        name: String,
        /// New address with prefix.
        #[arg(long)]
        address: Option<String>,
        /// New interface.
        #[arg(long)]
        interface: Option<String>,
        /// New eligible roles, comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
    },
}

/// Warns of the eligible nodes that said they cannot hold a VIP, and of those not asked.
fn warn_unplaceable(cannot: &[(String, String)], unchecked: &[(String, String)]) {
    for (node, why) in cannot {
        eprintln!("spacectl: warning: node {node} cannot hold it ({why}); it is not placed there");
    }
    for (node, why) in unchecked {
        eprintln!(
            "spacectl: warning: node {node} was not checked ({why}); if it is granted the VIP and cannot hold it, it gives it back"
        );
    }
}

/// `spacectl vip ...`
pub(super) async fn run(cli: &Target, action: &VipCmd) -> Result<(), CtlError> {
    match action {
        VipCmd::Add {
            name,
            address,
            interface,
            roles,
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
                    warn_unplaceable(&cannot, &unchecked);
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        VipCmd::Remove { name } => match mutate(&cli, AdminRequest::VipRemove(name.clone())).await?
        {
            AdminReply::Done => {
                println!("VIP {name} removed");
                Ok(())
            }
            other => Err(odd(other)),
        },
        VipCmd::Move { name, to } => {
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
        VipCmd::Set {
            name,
            address,
            interface,
            roles,
        } => {
            if address.is_none() && interface.is_none() && roles.is_none() {
                return Err(usage(
                    "vip set: say what changes (--address, --interface, --roles)",
                ));
            }
            if let Some(a) = address {
                spaced_fabric::check_vip_address(a).map_err(|e| usage(e.to_string()))?;
            }
            let roles = roles.as_ref().map(|r| {
                r.iter()
                    .map(|r| r.trim().to_string())
                    .filter(|r| !r.is_empty())
                    .collect::<Vec<_>>()
            });
            if roles.as_ref().is_some_and(Vec::is_empty) {
                return Err(usage("--roles: at least one role"));
            }
            let req = AdminRequest::VipSet {
                name: name.clone(),
                address: address.clone(),
                interface: interface.clone(),
                roles,
            };
            match mutate(cli, req).await? {
                AdminReply::VipChanged {
                    changed,
                    cannot,
                    unchecked,
                } => {
                    if changed {
                        println!("VIP {name} changed");
                    } else {
                        println!("VIP {name} unchanged: it already is so");
                    }
                    warn_unplaceable(&cannot, &unchecked);
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        VipCmd::List { json, watch } => {
            watching(*watch, || async {
                let mut c = connect(cli).await?;
                // The leader knows the lease times; status already prefers it.
                let vips = c.status().await;
                c.close().await;
                let vips = vips?.vips;
                Ok(if structured(*json) {
                    format!(
                        "{}\n",
                        emit(
                            *json,
                            &serde_json::Value::Array(vips.iter().map(vip_json).collect())
                        )
                    )
                } else {
                    render_vips(&vips)
                })
            })
            .await
        }
    }
}
