//! Backups of the fabric: the file `spacectl snapshot save` writes, `spacectl snapshot inspect`
//! reads, and `spaced restore` seeds a new cluster from (see [`crate::store::seed`]).
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! "spaced-snapshot\n"   16 bytes, the magic
//! format                u32, the data format of the body (crate::store::DATA_FORMAT)
//! length                u64, bytes of body
//! body                  the encoded BackupBody (crate::codec)
//! SHA-256               32 bytes, of everything before it
//! ```
//!
//! The format comes before the body so that a file of another build is refused by name
//! before anything is decoded; the checksum catches a file cut short or damaged.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::store::DATA_FORMAT;
use crate::types::{LogId, Member, NodeId};
use spaced_fabric::Fabric;

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 16] = b"spaced-snapshot\n";
const HEADER: usize = 16 + 4 + 8;
const DIGEST: usize = 32;

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupBody {
    /// The last log entry applied to `fabric`: a restored cluster's log continues after it, so
    /// its fencing epochs and indexes never go back.
    pub last_applied: LogId,
    /// The Raft voters and learners when it was taken.
    pub members: Vec<(NodeId, Member, bool)>,
    /// When it was taken (the leader's clock, ms since the Unix epoch).
    pub taken_at: u64,
    /// The node that took it (the leader).
    pub taken_by: String,
    /// The fabric as applied at `last_applied`.
    pub fabric: Fabric,
}

/// Why a backup file was refused.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Shorter than a header and a checksum.
    #[error("{0} bytes is too short for a spaced snapshot")]
    TooShort(usize),
    /// Does not start with [`MAGIC`].
    #[error("not a spaced snapshot (the file does not start with {:?})", String::from_utf8_lossy(MAGIC).trim_end())]
    NotASnapshot,
    /// Written by a build of another data format.
    #[error("the snapshot holds data format {found}, and this spaced reads format {expected} only")]
    Format {
        /// The file's format.
        found: u32,
        /// This build's.
        expected: u32,
    },
    /// The length field and the file size disagree.
    #[error(
        "the snapshot says its body is {said} bytes, and the file holds {held}: cut short or damaged"
    )]
    Length {
        /// The length field.
        said: u64,
        /// What is there.
        held: usize,
    },
    /// The SHA-256 does not match.
    #[error("the snapshot's checksum does not match its contents: damaged")]
    Checksum,
    /// The body does not decode.
    #[error("the snapshot's body does not decode: {0}")]
    Body(codec::CodecError),
    /// Encoding failed (a bug; nothing to do with the input).
    #[error("encode the snapshot: {0}")]
    Encode(codec::CodecError),
}

fn sha256(bytes: &[u8]) -> [u8; DIGEST] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; DIGEST];
    out.copy_from_slice(d.as_ref());
    out
}

/// The hex SHA-256 of a whole backup file (what `inspect` prints, to compare copies).
pub fn file_digest(bytes: &[u8]) -> String {
    sha256(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl BackupBody {
    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        let body = codec::encode(self).map_err(BackupError::Encode)?;
        let mut out = Vec::with_capacity(HEADER + body.len() + DIGEST);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&DATA_FORMAT.to_be_bytes());
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        out.extend_from_slice(&body);
        let digest = sha256(&out);
        out.extend_from_slice(&digest);
        Ok(out)
    }

    /// Reads a file's bytes: magic, format, length and checksum first, the body last.
    pub fn decode(bytes: &[u8]) -> Result<Self, BackupError> {
        if bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] != MAGIC {
            return Err(BackupError::NotASnapshot);
        }
        if bytes.len() < HEADER + DIGEST {
            return Err(BackupError::TooShort(bytes.len()));
        }
        let mut format = [0u8; 4];
        format.copy_from_slice(&bytes[16..20]);
        let found = u32::from_be_bytes(format);
        // The previous format's backups read the same (format 7 only added commands).
        if found != DATA_FORMAT && found != crate::store::PREVIOUS_FORMAT {
            return Err(BackupError::Format {
                found,
                expected: DATA_FORMAT,
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[20..28]);
        let said = u64::from_be_bytes(len);
        let held = bytes.len() - HEADER - DIGEST;
        if said != held as u64 {
            return Err(BackupError::Length { said, held });
        }
        let (signed, digest) = bytes.split_at(bytes.len() - DIGEST);
        if sha256(signed) != digest {
            return Err(BackupError::Checksum);
        }
        codec::decode(&signed[HEADER..]).map_err(BackupError::Body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spaced_fabric::{AdminState, NodeRecord};

    fn body() -> BackupBody {
        let mut fabric = Fabric::default();
        fabric.nodes.insert(
            1,
            NodeRecord {
                name: "n1".into(),
                raft_addr: "10.0.0.1:7000".into(),
                mgmt_ip: None,
                roles: ["ha".to_string()].into(),
                admin_state: AdminState::Active,
                joined_at: 1,
                version: String::new(),
            },
        );
        BackupBody {
            last_applied: LogId::new(
                openraft::impls::leader_id_adv::LeaderId {
                    term: 3,
                    node_id: 1,
                },
                42,
            ),
            members: vec![(
                1,
                Member {
                    name: "n1".into(),
                    addr: "10.0.0.1:7000".into(),
                },
                true,
            )],
            taken_at: 7,
            taken_by: "n1".into(),
            fabric,
        }
    }

    #[test]
    fn a_backup_reads_back_as_written() {
        let b = body();
        let bytes = b.encode().unwrap();
        assert_eq!(&bytes[..16], MAGIC);
        assert_eq!(BackupBody::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn a_backup_of_the_previous_format_reads_back() {
        let b = body();
        let mut bytes = b.encode().unwrap();
        bytes.truncate(bytes.len() - DIGEST);
        bytes[16..20].copy_from_slice(&crate::store::PREVIOUS_FORMAT.to_be_bytes());
        let digest = sha256(&bytes);
        bytes.extend_from_slice(&digest);
        assert_eq!(BackupBody::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn damage_of_every_kind_is_named() {
        let bytes = body().encode().unwrap();
        let err = |b: &[u8]| BackupBody::decode(b).unwrap_err().to_string();
        assert!(
            err(b"hello, world").contains("too short"),
            "{}",
            err(b"hello")
        );
        assert!(err(&[b'x'; 100]).contains("not a spaced snapshot"));
        // Every single flipped bit past the header is caught by the checksum (or the length).
        for i in [30, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(err(&b).contains("checksum"), "byte {i}: {}", err(&b));
        }
        let cut = &bytes[..bytes.len() - 5];
        assert!(err(cut).contains("cut short"), "{}", err(cut));
        let mut other = bytes.clone();
        other[16..20].copy_from_slice(&(DATA_FORMAT + 1).to_be_bytes());
        assert!(
            err(&other).contains(&format!("data format {}", DATA_FORMAT + 1)),
            "{}",
            err(&other)
        );
    }
}
