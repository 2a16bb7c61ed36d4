//! `spaced restore`: seeds an empty data dir from a backup (`spacectl snapshot save`), so that
//! the node, started without `--bootstrap`, leads a new one-node cluster holding the backup's
//! fabric (see [`spaced_fabric::Fabric::restored_for`] for what is kept). The other nodes then
//! join with empty data dirs, as new ones (`spacectl node add`).

use std::path::Path;

use spaced_fabric::{AdminState, NodeRecord};
use spaced_raft::Member;
use spaced_raft::backup::BackupBody;
use spaced_raft::store::{self, SeedError};

use super::error::StartError;
use super::tls::load_tls;
use crate::ops::config::NodeConfig;

/// Why a restore was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot file cannot be read or does not check (exit 2).
    #[error("snapshot file {file}: {problem}")]
    Snapshot {
        /// The file.
        file: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The config, its certificate or the data dir (as for `run`).
    #[error(transparent)]
    Start(#[from] StartError),
}

impl RestoreError {
    /// Whether the operator's input is at fault (exit 2) rather than the system (exit 1).
    pub fn bad_input(&self) -> bool {
        match self {
            RestoreError::Snapshot { .. } => true,
            RestoreError::Start(e) => e.bad_input(),
        }
    }
}

/// Restores `file` into `cfg`'s data dir, which must be empty; returns what was restored.
pub async fn restore(cfg: &NodeConfig, file: &Path) -> Result<String, RestoreError> {
    let snapshot_err = |problem: String| RestoreError::Snapshot {
        file: file.display().to_string(),
        problem,
    };
    let tls = load_tls(cfg)?;
    let bytes = std::fs::read(file).map_err(|e| snapshot_err(e.to_string()))?;
    let body = BackupBody::decode(&bytes).map_err(|e| snapshot_err(e.to_string()))?;
    let serial = tls.serial().map_err(StartError::system)?;
    if let Some(r) = body.fabric.revoked.get(&serial) {
        return Err(StartError::input(
            cfg,
            "tls.cert",
            format!(
                "this node's certificate (serial {serial}, {}) is revoked in the snapshot: issue the node a new one",
                r.identity
            ),
        )
        .into());
    }
    let addr = cfg.advertise.unwrap_or(cfg.listen);
    if addr.port() == 0 {
        return Err(StartError::input(
            cfg,
            "listen",
            "a restored node is dialled at its configured address: give a port other than 0",
        )
        .into());
    }
    let record = NodeRecord {
        name: cfg.name.clone(),
        raft_addr: addr.to_string(),
        mgmt_ip: cfg.mgmt_ip,
        roles: cfg.roles.iter().cloned().collect(),
        admin_state: AdminState::Active,
        joined_at: crate::now_millis(),
        version: String::new(),
    };
    let fabric = body.fabric.restored_for(cfg.node_id, record);
    let held = format!(
        "{} VIPs and singletons, {} services, {} devices, {} revoked certificates",
        fabric.placements.len(),
        fabric.services.len(),
        fabric.devices.len(),
        fabric.revoked.len()
    );
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        StartError::input(cfg, "data_dir", format!("{}: {e}", cfg.data_dir.display()))
    })?;
    let member = Member {
        name: cfg.name.clone(),
        addr: addr.to_string(),
    };
    store::seed(
        &cfg.data_dir,
        fabric,
        body.last_applied,
        cfg.node_id,
        member,
    )
    .await
    .map_err(|e| match e {
        SeedError::Write { .. } => StartError::system(e),
        e => StartError::input(cfg, "data_dir", e),
    })?;
    Ok(format!(
        "restored the fabric at index {} (taken by {}) into {}: {held}; start this node without --bootstrap, then add the others with `spacectl node add`",
        body.last_applied.index(),
        body.taken_by,
        cfg.data_dir.display()
    ))
}
