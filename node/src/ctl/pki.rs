//! `spacectl pki`: the cluster CA and node and admin certificates.

use super::common::*;
use super::mutate::mutate;
use super::render;

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
    /// Revoke a certificate (node or admin) by its file: every node refuses it from then on,
    /// also on connections already open. `node remove` revokes the removed node's own.
    Revoke {
        /// The certificate file (PEM).
        cert: PathBuf,
        /// Why, kept with the revocation.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the revoked certificates.
    Revoked,
}

/// `spacectl pki ...`
pub(super) async fn run(cli: &Target, action: &PkiCmd) -> Result<(), CtlError> {
    match action {
        PkiCmd::Init { dir } => {
            spaced_raft::pki::init_ca(dir).map_err(|e| failed(e.to_string()))?;
            println!("created cluster CA in {}", dir.display());
            Ok(())
        }
        PkiCmd::Issue { dir, name, admin } => {
            let files =
                spaced_raft::pki::issue(dir, name, *admin).map_err(|e| failed(e.to_string()))?;
            println!(
                "issued {} certificate {} (key {})",
                if *admin { "admin" } else { "node" },
                files.cert.display(),
                files.key.display()
            );
            Ok(())
        }
        PkiCmd::Revoke { cert, reason } => {
            let (serial, identity) =
                spaced_raft::pki::describe_cert_file(cert).map_err(|e| usage(e.to_string()))?;
            let cmd = spaced_fabric::Command::RevokeCertificate {
                serial: serial.clone(),
                identity: identity.to_string(),
                reason: reason.clone(),
                at: crate::now_millis(),
            };
            match mutate(cli, AdminRequest::Write(cmd)).await? {
                AdminReply::Applied(_) => {
                    println!("revoked the certificate of {identity} (serial {serial})");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        PkiCmd::Revoked => {
            let mut c = connect(cli).await?;
            let reply = c.call(&AdminRequest::ListRevoked).await;
            c.close().await;
            match reply? {
                AdminReply::Revoked(rows) => {
                    let now = crate::now_millis();
                    let rows: Vec<Vec<String>> = rows
                        .into_iter()
                        .map(|(serial, r)| {
                            vec![
                                serial,
                                r.identity,
                                format!("{} ago", render::age(now, r.at)),
                                r.reason,
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        render::table(&["SERIAL", "IDENTITY", "REVOKED", "REASON"], &rows)
                    );
                    Ok(())
                }
                AdminReply::Failed(e) => Err(failed(e)),
                other => Err(odd(other)),
            }
        }
    }
}
