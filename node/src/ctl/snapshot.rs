//! `spacectl snapshot`: backups of the fabric (`save` from the leader, `inspect` offline).
//! `spaced restore` seeds a new cluster from such a file.

use spaced_raft::backup::{BackupBody, file_digest};

use super::common::*;
use super::mutate::mutate;

/// `spacectl snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Save a consistent snapshot of the fabric, taken on the leader, to a file (written
    /// whole or not at all; an existing file is replaced).
    Save {
        /// Where to write it.
        file: PathBuf,
    },
    /// Check a snapshot file (format, length, checksum) and say what it holds.
    Inspect {
        /// The file.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `spacectl snapshot ...`
pub(super) async fn run(cli: &Target, action: &SnapshotCmd) -> Result<(), CtlError> {
    match action {
        SnapshotCmd::Save { file } => {
            let bytes = match mutate(cli, AdminRequest::Snapshot).await? {
                AdminReply::Snapshot(bytes) => bytes,
                other => return Err(odd(other)),
            };
            // What the leader sent must read back before it replaces anything.
            let body = BackupBody::decode(&bytes)
                .map_err(|e| failed(format!("the leader's snapshot does not check: {e}")))?;
            write_whole(file, &bytes)
                .map_err(|e| failed(format!("snapshot file {}: {e}", file.display())))?;
            println!(
                "saved snapshot at index {} (term {}) from {} to {}: {} bytes, sha256 {}",
                body.last_applied.index(),
                body.last_applied.committed_leader_id().term,
                body.taken_by,
                file.display(),
                bytes.len(),
                file_digest(&bytes)
            );
            println!("{}", counts(&body).join(", "));
            Ok(())
        }
        SnapshotCmd::Inspect { file, json } => {
            let bytes = std::fs::read(file)
                .map_err(|e| usage(format!("snapshot file {}: {e}", file.display())))?;
            let body = BackupBody::decode(&bytes)
                .map_err(|e| usage(format!("snapshot file {}: {e}", file.display())))?;
            if structured(*json) {
                println!("{}", emit(*json, &inspect_json(&body, &bytes)));
            } else {
                print!("{}", inspect_table(&body, &bytes));
            }
            Ok(())
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and
/// syncs the directory: a crash leaves the old file or the new one, never half of one.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// How many of each thing the snapshot holds, as `N things` phrases.
fn counts(b: &BackupBody) -> Vec<String> {
    let f = &b.fabric;
    let vips = f
        .placements
        .values()
        .filter(|p| matches!(p.kind, spaced_fabric::PlacementKind::Vip { .. }))
        .count();
    vec![
        format!("{} nodes", f.nodes.len()),
        format!("{vips} VIPs"),
        format!("{} singletons", f.placements.len() - vips),
        format!("{} services", f.services.len()),
        format!("{} devices", f.devices.len()),
        format!("{} revoked certificates", f.revoked.len()),
    ]
}

fn inspect_table(b: &BackupBody, bytes: &[u8]) -> String {
    let mut out = String::new();
    let members: Vec<String> = b
        .members
        .iter()
        .map(|(id, m, voter)| {
            format!(
                "{id} {}@{}{}",
                m.name,
                m.addr,
                if *voter { "" } else { " (learner)" }
            )
        })
        .collect();
    for (k, v) in [
        ("format", spaced_raft::store::DATA_FORMAT.to_string()),
        ("index", b.last_applied.index().to_string()),
        (
            "term",
            b.last_applied.committed_leader_id().term.to_string(),
        ),
        ("taken by", b.taken_by.clone()),
        ("taken at (ms)", b.taken_at.to_string()),
        ("members", members.join(", ")),
        ("holds", counts(b).join(", ")),
        ("size", format!("{} bytes", bytes.len())),
        ("sha256", file_digest(bytes)),
        ("checksum", "ok".into()),
    ] {
        out.push_str(&format!("{k:<14} {v}\n"));
    }
    out
}

fn inspect_json(b: &BackupBody, bytes: &[u8]) -> serde_json::Value {
    let f = &b.fabric;
    json!({
        "format": spaced_raft::store::DATA_FORMAT,
        "index": b.last_applied.index(),
        "term": b.last_applied.committed_leader_id().term,
        "taken_by": b.taken_by,
        "taken_at_ms": b.taken_at,
        "members": b.members.iter().map(|(id, m, voter)| json!({
            "id": id, "name": m.name, "addr": m.addr, "voter": voter,
        })).collect::<Vec<_>>(),
        "nodes": f.nodes.values().map(|n| n.name.clone()).collect::<Vec<_>>(),
        "vips": f.placements.iter().filter_map(|(name, p)| match &p.kind {
            spaced_fabric::PlacementKind::Vip { address, interface } => Some(json!({
                "name": name, "address": address, "interface": interface, "epoch": p.epoch,
            })),
            _ => None,
        }).collect::<Vec<_>>(),
        "singletons": f.placements.iter().filter_map(|(name, p)| match &p.kind {
            spaced_fabric::PlacementKind::Singleton { service } => Some(json!({
                "name": name, "service": service, "epoch": p.epoch,
            })),
            _ => None,
        }).collect::<Vec<_>>(),
        "services": f.services.keys().collect::<Vec<_>>(),
        "devices": f.devices.len(),
        "revoked": f.revoked.len(),
        "bytes": bytes.len(),
        "sha256": file_digest(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_file_is_replaced_whole_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        write_whole(&path, b"one").unwrap();
        write_whole(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.snap")]);
        let err = write_whole(&dir.path().join("missing/s.snap"), b"x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
