//! `spacectl pki`: the cluster CA and node and admin certificates.

use super::*;

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
}

/// `spacectl pki ...`
pub(super) async fn run(action: &PkiCmd) -> Result<(), CtlError> {
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
    }
}
