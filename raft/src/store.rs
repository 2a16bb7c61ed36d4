//! Durable Raft storage in sled: log (one tree per segment of indexes: [`crate::segments`]),
//! vote and markers (`meta` tree) and the fabric snapshot (`sm`).
//!
//! The fabric itself lives in memory; it is made durable through snapshots plus the log. After a
//! restart openraft re-applies the committed entries after the last snapshot, which is why the
//! committed marker is saved.
//!
//! Log entries and the snapshot are stored in chunks ([`crate::chunked`]) so that sled never
//! writes one to a blob file, which it does not fsync: every acknowledged byte is in sled's
//! main file, which is fsynced before an acknowledgement.

use std::fmt::Debug;
use std::io;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};

use crate::chunked;
use crate::codec;
use crate::segments::{Segments, key_index, segment_of};
use crate::types::{
    Entry, LogId, Member, NodeId, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use spaced_fabric::{Fabric, Outcome};

/// Snapshot as openraft sees it.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_FORMAT: &[u8] = b"format";

/// The encoding of what this build keeps in a data dir and sends to its peers (log entries,
/// snapshots, markers). Raised whenever that encoding changes. A data dir records its
/// [`DIR_FORMAT`], which names this encoding and how the dir lays it out. It is also the Raft protocol's version
/// ([`crate::pki::ALPN_RAFT`]), since log entries and snapshots travel in this encoding. 2:
/// placements record the nodes that refused them (dirs written before formats were recorded
/// have no marker). 3: the `SetMgmtIp` command, appended to the commands (format 2 data reads
/// unchanged, so a format 2 dir is upgraded in place: see [`UPGRADES_FROM`]). 4: the node
/// RPCs carry the sender's lease terms (the stored data is format 3's, upgraded in place). 5:
/// log entries and the snapshot are stored in chunks (see [`crate::chunked`]), and a
/// placement's first epoch is the index of the entry that created it, so epochs never repeat
/// (a log replayed by an older build gives other epochs: not upgradable in place).
/// 6: the fabric records the site's disaster-recovery role, epoch and mirror position, with
/// the `SetSiteRole` and `Mirror` commands (a format 5 dir is upgraded in place: its snapshot,
/// if any, is read as a standalone site's and stored again in format 6).
/// 7: the `SetPlacement` and `SetDevice` commands, appended (a format 6 dir reads unchanged and
/// is upgraded in place; a format 7 node speaks format 6's protocol to nodes not yet upgraded:
/// see [`PREVIOUS_FORMAT`]).
pub const DATA_FORMAT: u32 = 7;

/// The format before [`DATA_FORMAT`], whose nodes this build still talks to
/// ([`crate::pki::ALPN_RAFT_PREVIOUS`]) and whose backups it restores: its log entries,
/// snapshots and messages read the same in both, so a cluster is upgraded one node at a time.
pub const PREVIOUS_FORMAT: u32 = 6;

/// What a data dir records as its format, when it is first used, and what every open checks, so
/// that a dir written by another build is refused by name instead of failing to decode halfway
/// through. Up to 7 it was the [`DATA_FORMAT`] itself. 8: format 7's encoding, with the log in
/// one sled tree per segment of indexes ([`crate::segments`]) instead of one tree, so a purge
/// drops whole trees. A build of format 7 would find no log in such a dir, so the number is
/// raised and it refuses the dir by name.
pub const DIR_FORMAT: u32 = 8;

/// Dir formats whose data this build reads (only additions since, a snapshot it converts, and
/// the log it moves into segments): a dir of one of them is upgraded and re-marked with
/// [`DIR_FORMAT`] when opened, after which older builds refuse it by name. Formats 5 to 7
/// (formats 2 to 4 were, up to format 4).
pub const UPGRADES_FROM: &[u32] = &[5, PREVIOUS_FORMAT, DATA_FORMAT];

/// The one tree dirs of formats up to 7 keep the whole log in; moved into segments when such a
/// dir is opened.
const LEGACY_LOG: &str = "log";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (permissions, corruption, another process holds the lock).
    #[error("data dir {dir}: {source}")]
    Sled {
        /// The data directory.
        dir: String,
        /// What sled said.
        source: sled::Error,
    },
    /// Another process (or node) has the data dir open.
    #[error("data dir {dir} is in use by another spaced process")]
    Locked {
        /// The data directory.
        dir: String,
    },
    /// The data dir was written by a build with another dir format.
    #[error("data dir {dir} holds dir format {}, and this spaced reads dir format {expected} (and upgrades {} in place) only: give this node an empty data dir and add it to the cluster again (it catches up from its peers), or run the spaced that wrote it", found.map(|f| f.to_string()).unwrap_or_else(|| "from before formats were recorded".into()), UPGRADES_FROM.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", "))]
    Format {
        /// The data directory.
        dir: String,
        /// The format recorded in it (`None`: written before formats were recorded).
        found: Option<u32>,
        /// The dir format this build reads and writes.
        expected: u32,
    },
    /// A stored value's chunks cannot be read or do not make a value.
    #[error("data dir {dir}: stored {what}: {source}")]
    Chunks {
        /// The data directory.
        dir: String,
        /// Which value.
        what: &'static str,
        /// What failed.
        source: chunked::ReadError,
    },
    /// A stored value does not decode.
    #[error("data dir {dir}: stored {what} is corrupt: {source}")]
    Corrupt {
        /// The data directory.
        dir: String,
        /// Which value.
        what: &'static str,
        /// Decoder error.
        source: codec::CodecError,
    },
}

fn io_err(context: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{context}: {e}"))
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The persisted form of a snapshot: metadata plus the serialized `FabricState`.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// What a snapshot's data holds.
#[derive(Serialize, Deserialize, Default, Clone)]
struct FabricState {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    fabric: Fabric,
}

/// A snapshot's data in this format, or in format 5's (a fabric without its site, read as a
/// standalone site): the state, and whether it was the old format.
fn decode_state(data: &[u8]) -> Result<(FabricState, bool), codec::CodecError> {
    match codec::decode::<FabricState>(data) {
        Ok(state) => Ok((state, false)),
        Err(e) => match codec::decode::<v5::FabricState>(data) {
            Ok(old) => Ok((old.into(), true)),
            Err(_) => Err(e),
        },
    }
}

/// Format 5's snapshot data, read when a format 5 dir is upgraded in place.
mod v5 {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use spaced_fabric::{Device, NodeRecord, Placement, Revocation, ServiceSpec};

    use super::{LogId, StoredMembership};

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct FabricState {
        pub(super) last_applied: Option<LogId>,
        pub(super) last_membership: StoredMembership,
        pub(super) fabric: Fabric,
    }

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct Fabric {
        pub(super) nodes: BTreeMap<crate::NodeId, NodeRecord>,
        pub(super) placements: BTreeMap<String, Placement>,
        pub(super) devices: BTreeMap<String, Device>,
        pub(super) services: BTreeMap<String, ServiceSpec>,
        pub(super) revoked: BTreeMap<String, Revocation>,
    }

    impl From<FabricState> for super::FabricState {
        fn from(old: FabricState) -> Self {
            let f = old.fabric;
            super::FabricState {
                last_applied: old.last_applied,
                last_membership: old.last_membership,
                fabric: spaced_fabric::Fabric {
                    nodes: f.nodes,
                    placements: f.placements,
                    devices: f.devices,
                    services: f.services,
                    revoked: f.revoked,
                    site: Default::default(),
                },
            }
        }
    }
}

/// sled's page cache (its default is 1 GiB, far beyond what a node reads back: the log's
/// recent entries and the fabric's state). Not the whole of the memory a node gains under a
/// steady commit load: with this bound, 44 to 76–95 MiB after a minute at 8,000 commits/s.
const SLED_CACHE_BYTES: u64 = 16 << 20;

/// Opens (or creates) the sled database in `dir` and returns the two halves openraft needs.
pub fn open(dir: &Path) -> Result<(LogStore, FabricStore), StoreError> {
    let dir_s = dir.display().to_string();
    let sled_err = |source| StoreError::Sled {
        dir: dir_s.clone(),
        source,
    };
    // Every write that matters is flushed explicitly, so sled's background flusher is not needed.
    let config = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(SLED_CACHE_BYTES)
        .flush_every_ms(None);
    // A node restarted in the same process may find the previous handle still releasing its lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let db = loop {
        match config.open() {
            Ok(db) => break db,
            Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) if is_lock_error(&e) => return Err(StoreError::Locked { dir: dir_s.clone() }),
            Err(e) => return Err(sled_err(e)),
        }
    };
    // sled writes its `conf` file (segment size, version) when it creates a dir, without an
    // fsync, and never syncs the dir: a power cut soon after would leave a dir it will not
    // open. Sync both before anything is acknowledged.
    for path in [dir.join("conf"), dir.to_path_buf()] {
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::Sled {
                dir: dir_s.clone(),
                source: sled::Error::Io(io::Error::new(
                    e.kind(),
                    format!("fsync {}: {e}", path.display()),
                )),
            })?;
    }
    let legacy = if db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == LEGACY_LOG.as_bytes())
    {
        Some(db.open_tree(LEGACY_LOG).map_err(sled_err)?)
    } else {
        None
    };
    let log = Segments::open(&db).map_err(sled_err)?;
    let meta = db.open_tree("meta").map_err(sled_err)?;
    let sm = db.open_tree("sm").map_err(sled_err)?;
    let db_file = std::fs::File::open(dir.join("db")).map_err(|e| StoreError::Sled {
        dir: dir_s.clone(),
        source: sled::Error::Io(e),
    })?;
    let durably = |what: &str, r: Result<(), io::Error>| {
        r.map_err(|e| StoreError::Sled {
            dir: dir_s.clone(),
            source: sled::Error::Io(io::Error::new(e.kind(), format!("{what}: {e}"))),
        })
    };
    // A marker that is not 4 bytes reads as format 0: refused like any other format.
    let found = meta.get(KEY_FORMAT).map_err(sled_err)?.map(|v| {
        <[u8; 4]>::try_from(v.as_ref())
            .map(u32::from_be_bytes)
            .unwrap_or(0)
    });
    let legacy_used = legacy.as_ref().is_some_and(|t| !t.is_empty());
    let used = legacy_used || !log.is_empty() || !sm.is_empty() || !meta.is_empty();
    match found {
        Some(f) if f == DIR_FORMAT || UPGRADES_FROM.contains(&f) => {
            // The log of an older dir moves into segments before the dir is marked, and the
            // old tree goes only once the mark is durable: a crash on the way leaves either
            // an older dir with its log (and copies an older build never reads), or a marked
            // one whose old tree was copied in full before the mark; never a dir without a
            // log. (A marked dir with the old tree still there is such a crash's: the tree is
            // only dropped.) An unmarked dir's segments are an interrupted move's copies, and
            // an older build may have truncated its log since (a rollback): they go before the
            // copy starts, or entries truncated since would come back.
            if let Some(old) = legacy.as_ref().filter(|_| f != DIR_FORMAT) {
                let stale = log.drop_all().map_err(|e| sled_err(sled::Error::Io(e)))?;
                if stale > 0 {
                    tracing::info!(dir = %dir_s, segments = stale, "copies of an interrupted log move dropped");
                }
                let moved = move_legacy_log(old, &log).map_err(sled_err)?;
                durably("move the log into segments", flush_now(&db, &db_file))?;
                if moved > 0 {
                    tracing::info!(dir = %dir_s, keys = moved, "log moved into segment trees");
                }
            }
            if f != DIR_FORMAT {
                meta.insert(KEY_FORMAT, &DIR_FORMAT.to_be_bytes())
                    .map_err(sled_err)?;
                durably("mark the dir format", flush_now(&db, &db_file))?;
                tracing::info!(dir = %dir_s, from = f, to = DIR_FORMAT, "data dir upgraded in place");
            }
            if legacy.is_some() {
                drop(legacy);
                db.drop_tree(LEGACY_LOG).map_err(sled_err)?;
                durably("drop the moved log", flush_now(&db, &db_file))?;
            }
        }
        None if !used => {
            meta.insert(KEY_FORMAT, &DIR_FORMAT.to_be_bytes())
                .map_err(sled_err)?;
            db.flush().map_err(sled_err)?;
        }
        found => {
            return Err(StoreError::Format {
                dir: dir_s.clone(),
                found,
                expected: DIR_FORMAT,
            });
        }
    }

    let mut state = FabricState::default();
    let snapshot = chunked::get(&sm, KEY_SNAPSHOT).map_err(|e| StoreError::Chunks {
        dir: dir_s.clone(),
        what: "snapshot",
        source: e,
    })?;
    if let Some(bytes) = snapshot {
        let snap: StoredSnapshot = codec::decode(&bytes).map_err(|source| StoreError::Corrupt {
            dir: dir_s.clone(),
            what: "snapshot",
            source,
        })?;
        let (decoded, old) = decode_state(&snap.data).map_err(|source| StoreError::Corrupt {
            dir: dir_s.clone(),
            what: "snapshot data",
            source,
        })?;
        state = decoded;
        if old {
            // Stored again in this format, so that a follower sent it can read it.
            let data = codec::encode(&state).map_err(|source| StoreError::Corrupt {
                dir: dir_s.clone(),
                what: "snapshot data",
                source,
            })?;
            let stored = StoredSnapshot {
                meta: snap.meta,
                data,
            };
            let bytes = codec::encode(&stored).map_err(|source| StoreError::Corrupt {
                dir: dir_s.clone(),
                what: "snapshot",
                source,
            })?;
            let count = chunked::count(&sm, KEY_SNAPSHOT).map_err(sled_err)?;
            let mut batch = sled::Batch::default();
            chunked::put(&mut batch, KEY_SNAPSHOT, &bytes, count);
            sm.apply_batch(batch).map_err(sled_err)?;
            db.flush().map_err(sled_err)?;
            tracing::info!(dir = %dir_s, "snapshot stored again in data format {DATA_FORMAT}");
        }
    }
    let db_file = Arc::new(db_file);
    let purged: Option<LogId> = match meta.get(KEY_PURGED).map_err(sled_err)? {
        Some(v) => Some(
            codec::decode::<LogId>(&v).map_err(|source| StoreError::Corrupt {
                dir: dir_s.clone(),
                what: "purge marker",
                source,
            })?,
        ),
        None => None,
    };
    let floor = purged.map(|l| l.index() + 1).unwrap_or(0);
    let log_store = LogStore {
        db: db.clone(),
        db_file: db_file.clone(),
        log: Arc::new(log),
        meta,
        floor: Arc::new(AtomicU64::new(floor)),
        purging: Arc::default(),
        drops_pending: Arc::default(),
    };
    let sm_store = FabricStore {
        db,
        db_file,
        sm,
        state: Arc::new(RwLock::new(state)),
        changes: Arc::new(tokio::sync::watch::Sender::new(())),
    };
    Ok((log_store, sm_store))
}

/// Why [`seed`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The data dir could not be opened.
    #[error(transparent)]
    Open(#[from] StoreError),
    /// The data dir is in use already: a restore starts a new cluster from an empty one.
    #[error("data dir {0} already holds Raft state: restore into an empty data dir")]
    NotEmpty(String),
    /// Writing failed.
    #[error("data dir {dir}: write the restored state: {source}")]
    Write {
        /// The data directory.
        dir: String,
        /// What failed.
        source: io::Error,
    },
}

/// Seeds an empty data dir with a backup's fabric as if it had been received as a Raft
/// snapshot at `last`: a cluster whose only voter is `me` (`member`), with its log purged up to
/// `last` and a vote of `last`'s term, so that the node, started without `--bootstrap`, elects
/// itself and its log goes on after `last` (indexes and fencing epochs never go back). The
/// other nodes join it as new ones.
pub async fn seed(
    dir: &Path,
    fabric: Fabric,
    last: LogId,
    me: NodeId,
    member: Member,
) -> Result<(), SeedError> {
    let dir_s = dir.display().to_string();
    let (mut log, sm) = open(dir)?;
    let write = |source| SeedError::Write {
        dir: dir_s.clone(),
        source,
    };
    let has_snapshot =
        chunked::count(&sm.sm, KEY_SNAPSHOT).map_err(|e| write(io_err("read snapshot", e)))? > 0;
    if !is_empty(&log).map_err(write)? || has_snapshot {
        return Err(SeedError::NotEmpty(dir_s));
    }
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([me])],
        std::collections::BTreeMap::from([(me, member)]),
    )
    .map_err(|e| write(io_err("membership", e)))?;
    let last_membership = StoredMembership::new(Some(last), membership);
    let state = FabricState {
        last_applied: Some(last),
        last_membership: last_membership.clone(),
        fabric,
    };
    let data = codec::encode(&state).map_err(|e| write(io_err("encode the fabric", e)))?;
    let meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership,
    };
    sm.persist_snapshot(&meta, &data).await.map_err(write)?;
    log.put_meta(KEY_PURGED, &last).await.map_err(write)?;
    log.put_meta(KEY_COMMITTED, &Some(last))
        .await
        .map_err(write)?;
    let term = last.committed_leader_id().term;
    log.save_vote(&Vote::new(term, me)).await.map_err(write)?;
    Ok(())
}

/// Copies every key of a format 7 (or older) dir's one log tree into the segment trees, each
/// segment's keys in one batch; how many keys. The segments must be empty (a copy over an
/// earlier one would keep keys the old tree no longer holds).
fn move_legacy_log(old: &sled::Tree, segments: &Segments) -> Result<usize, sled::Error> {
    let mut moved = 0;
    let mut current: Option<(u64, sled::Batch)> = None;
    let apply = |segment: u64, batch: sled::Batch| -> Result<(), sled::Error> {
        let tree = segments.tree(segment).map_err(sled::Error::Io)?;
        tree.apply_batch(batch)
    };
    for item in old.iter() {
        let (k, v) = item?;
        let Some(index) = key_index(&k) else {
            return Err(sled::Error::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the old log tree holds a key of {} bytes, not an index",
                    k.len()
                ),
            )));
        };
        let segment = segment_of(index);
        match &mut current {
            Some((s, batch)) if *s == segment => batch.insert(k, v),
            _ => {
                if let Some((s, batch)) = current.take() {
                    apply(s, batch)?;
                }
                let mut batch = sled::Batch::default();
                batch.insert(k, v);
                current = Some((segment, batch));
            }
        }
        moved += 1;
    }
    if let Some((s, batch)) = current {
        apply(s, batch)?;
    }
    Ok(moved)
}

/// sled reports a held file lock as an `Other` IO error carrying the OS `WouldBlock`.
fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
}

/// True when `dir` holds no Raft state yet (used to refuse `--bootstrap` on a used data dir).
pub fn is_empty(log: &LogStore) -> Result<bool, io::Error> {
    Ok(log.log.is_empty()
        && log
            .meta
            .get(KEY_VOTE)
            .map_err(|e| io_err("read vote", e))?
            .is_none())
}

/// Raft log and hard state in sled.
#[derive(Clone)]
pub struct LogStore {
    /// The database, for flushes.
    db: sled::Db,
    /// sled's data file: sled's own flush uses `sync_file_range`, which does not reach the
    /// disk's cache or metadata, so durability needs an explicit `fdatasync` on it.
    db_file: Arc<std::fs::File>,
    /// Entries keyed by big-endian index (then chunk), one tree per segment of indexes.
    log: Arc<Segments>,
    /// Vote, committed and purged markers.
    meta: sled::Tree,
    /// First index not purged. Purged segments are dropped in the background; reads skip
    /// purged entries.
    floor: Arc<AtomicU64>,
    /// Serializes background drops.
    purging: Arc<tokio::sync::Mutex<()>>,
    /// Purges whose drops have not finished yet.
    drops_pending: Arc<AtomicU64>,
}

/// Runs `f`, sled work, on a blocking thread, never on an async worker. A sled call can block:
/// every read waits while another thread's batch write holds sled's process-wide lock, and the
/// call that fills one of sled's 512 KiB log segments allocates the next with a `mmap` of its
/// own, which waits whenever another thread holds the process's memory map (sled's I/O threads
/// unmap a written segment's buffer about 12 times a second at 1,000 commits a second). An
/// async worker blocked there can hold up the whole runtime, lease renewals included: a soak
/// saw a 4 s stall when a worker's `mmap` waited behind such an `munmap`.
async fn off_worker<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, io::Error> + Send + 'static,
) -> Result<T, io::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(what, e))?
}

/// A marker of the `meta` tree, decoded (on the calling thread: call it off the workers).
fn read_meta<T: serde::de::DeserializeOwned>(
    meta: &sled::Tree,
    key: &[u8],
) -> Result<Option<T>, io::Error> {
    match meta.get(key).map_err(|e| io_err("read meta", e))? {
        None => Ok(None),
        Some(v) => codec::decode(&v)
            .map(Some)
            .map_err(|e| io_err("decode meta", e)),
    }
}

impl LogStore {
    async fn get_meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static [u8],
    ) -> Result<Option<T>, io::Error> {
        let meta = self.meta.clone();
        off_worker("read meta", move || read_meta(&meta, key)).await
    }

    async fn put_meta<T: Serialize>(&self, key: &'static [u8], value: &T) -> Result<(), io::Error> {
        let bytes = codec::encode(value).map_err(|e| io_err("encode meta", e))?;
        let meta = self.meta.clone();
        off_worker("write meta", move || {
            meta.insert(key, bytes)
                .map(|_| ())
                .map_err(|e| io_err("write meta", e))
        })
        .await
    }

    async fn flush(&self) -> Result<(), io::Error> {
        flush_durably(&self.db, &self.db_file).await
    }

    /// Waits until the segment drops of every purge so far are done: they run in the background
    /// after [`RaftLogStorage::purge`] returns.
    pub async fn settle_purges(&self) {
        while self.drops_pending.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// sled flush, then `fdatasync` of its data file: only then is a write acknowledged. Both on
/// one blocking thread (sled's `flush_async` would hand the flush to a thread of its own first).
async fn flush_durably(db: &sled::Db, file: &Arc<std::fs::File>) -> Result<(), io::Error> {
    let (db, file) = (db.clone(), file.clone());
    off_worker("flush", move || flush_now(&db, &file)).await
}

/// [`flush_durably`] on the calling (blocking) thread: for a write that is already off the
/// async workers, so that it and its flush take one hop, not two.
fn flush_now(db: &sled::Db, file: &std::fs::File) -> Result<(), io::Error> {
    db.flush().map_err(|e| io_err("flush", e))?;
    file.sync_data().map_err(|e| io_err("fdatasync", e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let floor = self.floor.load(Ordering::SeqCst);
        // Keys are `index ++ chunk`: a range of indexes is the keys from the first index's
        // prefix (inclusive) to the prefix of the index after the last (exclusive).
        let first = match range.start_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(i) => i.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let Some(first) = first.map(|i| i.max(floor)) else {
            return Ok(Vec::new());
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|e| e <= first) {
            return Ok(Vec::new());
        }
        let trees = self
            .log
            .from(segment_of(first), end.map(|e| segment_of(e - 1)));
        let start = Bound::Included(index_key(first));
        let end = end.map_or(Bound::Unbounded, |e| Bound::Excluded(index_key(e)));
        off_worker("read log", move || {
            let mut out = Vec::new();
            for tree in trees {
                for item in chunked::Assemble::new(tree.range::<[u8; 8], _>((start, end)), 8) {
                    let (_, v) = item.map_err(|e| io_err("read log", e))?;
                    out.push(codec::decode(&v).map_err(|e| io_err("decode log entry", e))?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let floor = self.floor.load(Ordering::SeqCst);
        let (log, meta) = (self.log.clone(), self.meta.clone());
        let (last_purged, last) = off_worker("read log", move || {
            let last_purged: Option<LogId> = read_meta(&meta, KEY_PURGED)?;
            let last = match log.last_key()? {
                Some((tree, k)) if k.as_ref() >= index_key(floor).as_slice() && k.len() >= 8 => {
                    let v = chunked::get(&tree, &k[..8])
                        .map_err(|e| io_err("read log", e))?
                        .ok_or_else(|| io_err("read log", "the last entry vanished"))?;
                    let e: Entry = codec::decode(&v).map_err(|e| io_err("decode log entry", e))?;
                    Some(e.log_id())
                }
                _ => last_purged,
            };
            Ok((last_purged, last))
        })
        .await?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, vote).await?;
        self.flush().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not flushed on its own: a stale marker after a crash only means re-applying less, and
        // the next log flush carries it anyway.
        self.put_meta(KEY_COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self
            .get_meta::<Option<LogId>>(KEY_COMMITTED)
            .await?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let (log, db, file) = (self.log.clone(), self.db.clone(), self.db_file.clone());
        // The batch and its flush in one hop off the async workers. Acknowledged only once
        // durable.
        // Entries crossing into the next segment go in one batch per segment, in log order;
        // none is acknowledged before the flush after the last.
        let res = off_worker("append log", move || {
            let mut current: Option<(u64, Arc<sled::Tree>, sled::Batch)> = None;
            for entry in &entries {
                let bytes = codec::encode(entry).map_err(|e| io_err("encode log entry", e))?;
                let segment = segment_of(entry.index());
                if current.as_ref().is_none_or(|(s, _, _)| *s != segment) {
                    if let Some((_, tree, batch)) = current.take() {
                        tree.apply_batch(batch)
                            .map_err(|e| io_err("append log", e))?;
                    }
                    current = Some((segment, log.tree(segment)?, sled::Batch::default()));
                }
                let Some((_, tree, batch)) = current.as_mut() else {
                    unreachable!("set just above");
                };
                let key = index_key(entry.index());
                let old = chunked::count(tree, &key).map_err(|e| io_err("read log", e))?;
                chunked::put(batch, &key, &bytes, old);
            }
            if let Some((_, tree, batch)) = current {
                tree.apply_batch(batch)
                    .map_err(|e| io_err("append log", e))?;
            }
            flush_now(&db, &file)
        })
        .await;
        let ack = res
            .as_ref()
            .map(|_| ())
            .map_err(|e| io::Error::new(e.kind(), e.to_string()));
        callback.io_completed(ack);
        res
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let start = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        let (log, db, file) = (self.log.clone(), self.db.clone(), self.db_file.clone());
        // The last segment first: a crash half-way leaves a shorter log, never a hole.
        off_worker("truncate log", move || {
            for tree in log.from(segment_of(start), None).iter().rev() {
                let mut batch = sled::Batch::default();
                for item in tree.range(index_key(start)..) {
                    let (k, _) = item.map_err(|e| io_err("read log", e))?;
                    batch.remove(k);
                }
                tree.apply_batch(batch)
                    .map_err(|e| io_err("truncate log", e))?;
            }
            flush_now(&db, &file)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Marker first: a crash before the drops leaves extra entries, never a hole.
        self.put_meta(KEY_PURGED, &log_id).await?;
        self.flush().await?;
        self.floor.fetch_max(log_id.index() + 1, Ordering::SeqCst);
        let log = self.log.clone();
        let purging = self.purging.clone();
        let floor = log_id.index() + 1;
        let pending = self.drops_pending.clone();
        pending.fetch_add(1, Ordering::SeqCst);
        // In the background, one purge at a time, off the async workers: a drop waits for
        // readers still holding one of its segments. A failed drop leaves the segment's
        // entries (read past, as below any floor); the next purge drops it.
        tokio::spawn(async move {
            let _one_at_a_time = purging.lock().await;
            let dropped = tokio::task::spawn_blocking(move || log.drop_below(floor)).await;
            if let Ok(Err(e)) = dropped {
                tracing::warn!(error = %e, "dropping purged log segments failed; retried at the next purge");
            }
            pending.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }
}

/// The fabric state machine: in memory, snapshotted to sled.
#[derive(Clone)]
pub struct FabricStore {
    /// The database, for flushes.
    db: sled::Db,
    /// sled's data file, for `fdatasync` after a snapshot is written.
    db_file: Arc<std::fs::File>,
    /// Holds the latest snapshot.
    sm: sled::Tree,
    /// Applied state, shared with readers through [`FabricView`].
    state: Arc<RwLock<FabricState>>,
    /// Told of every applied batch and installed snapshot, so readers can wait for a change.
    changes: Arc<tokio::sync::watch::Sender<()>>,
}

/// Read access to the applied fabric for the admin API and agents.
#[derive(Clone)]
pub struct FabricView {
    state: Arc<RwLock<FabricState>>,
    changes: Arc<tokio::sync::watch::Sender<()>>,
}

impl FabricView {
    /// Runs `f` on the applied fabric.
    pub fn read<R>(&self, f: impl FnOnce(&Fabric) -> R) -> R {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&guard.fabric)
    }

    /// Runs `f` on the applied fabric and the index of the last entry applied to it (0
    /// before any), read at one instant.
    pub fn read_indexed<R>(&self, f: impl FnOnce(u64, &Fabric) -> R) -> R {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(guard.last_applied.map_or(0, |l| l.index()), &guard.fabric)
    }

    /// A receiver that is told each time entries were applied or a snapshot installed, from
    /// now on; what changed is for the reader to look up.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// The applied fabric with the log id it was applied up to and the membership then, read
    /// at one instant (for a backup).
    pub fn backup(&self) -> (Option<LogId>, StoredMembership, Fabric) {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        (
            guard.last_applied,
            guard.last_membership.clone(),
            guard.fabric.clone(),
        )
    }

    /// Index of the last applied log entry.
    pub fn last_applied_index(&self) -> Option<u64> {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        guard.last_applied.map(|l| l.index())
    }
}

impl FabricStore {
    /// A read handle on the applied fabric.
    pub fn view(&self) -> FabricView {
        FabricView {
            state: self.state.clone(),
            changes: self.changes.clone(),
        }
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, FabricState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    async fn persist_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), io::Error> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.to_vec(),
        };
        let sm = self.sm.clone();
        // Encoding and writing a snapshot are long synchronous work: off the async workers.
        off_worker("write snapshot", move || {
            let bytes = codec::encode(&stored).map_err(|e| io_err("encode snapshot", e))?;
            let old = chunked::count(&sm, KEY_SNAPSHOT).map_err(|e| io_err("read snapshot", e))?;
            let mut batch = sled::Batch::default();
            chunked::put(&mut batch, KEY_SNAPSHOT, &bytes, old);
            sm.apply_batch(batch)
                .map_err(|e| io_err("write snapshot", e))
        })
        .await?;
        flush_durably(&self.db, &self.db_file).await?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for FabricStore {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // A copy, taken under the read lock, is encoded on a blocking thread: encoding under
        // the lock would hold up `apply`'s write lock, and every reader queued behind it (the
        // voters' lease confirmations among them), for the whole encoding.
        let (copy, meta) = {
            let st = self.state.read().unwrap_or_else(|p| p.into_inner());
            (
                st.clone(),
                SnapshotMeta {
                    last_log_id: st.last_applied,
                    last_membership: st.last_membership.clone(),
                },
            )
        };
        let data = tokio::task::spawn_blocking(move || codec::encode(&copy))
            .await
            .map_err(|e| io_err("encode fabric", e))?
            .map_err(|e| io_err("encode fabric", e))?;
        self.persist_snapshot(&meta, &data).await?;
        tracing::info!(bytes = data.len(), last = ?meta.last_log_id.map(|l| l.index()), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for FabricStore {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        Ok((st.last_applied, st.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut st = self.write_state();
                st.last_applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => Ok(Outcome::Done),
                    EntryPayload::Normal(cmd) => st.fabric.apply_at(entry.log_id.index, cmd),
                    EntryPayload::Membership(m) => {
                        st.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Ok(Outcome::Done)
                    }
                }
            };
            if let Some(r) = responder {
                r.send(response);
            }
        }
        self.changes.send_replace(());
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let new_state: FabricState =
            codec::decode(&data).map_err(|e| io_err("decode received snapshot", e))?;
        self.persist_snapshot(meta, &data).await?;
        *self.write_state() = new_state;
        self.changes.send_replace(());
        tracing::info!(bytes = data.len(), last = ?meta.last_log_id.map(|l| l.index()), "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let sm = self.sm.clone();
        let Some(stored) = off_worker("read snapshot", move || {
            let Some(bytes) =
                chunked::get(&sm, KEY_SNAPSHOT).map_err(|e| io_err("read snapshot", e))?
            else {
                return Ok(None);
            };
            codec::decode::<StoredSnapshot>(&bytes)
                .map(Some)
                .map_err(|e| io_err("decode snapshot", e))
        })
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;

    /// `sled::open`, waiting (as [`open`] does) while a handle just dropped still releases
    /// the dir's lock in the background: under load that took long enough to fail a test.
    fn sled_open(dir: &Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::open(dir) {
                Ok(db) => return db,
                Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("sled::open {}: {e}", dir.display()),
            }
        }
    }

    /// Builds stores on fresh temp dirs; the guard keeps the dir alive for the test.
    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, FabricStore, tempfile::TempDir> for SledBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, FabricStore), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().map_err(|e| {
                StorageError::read(openraft::errors::ErrorSource::from_string(e.to_string()))
            })?;
            let (log, sm) = open(dir.path()).map_err(|e| {
                StorageError::read(openraft::errors::ErrorSource::from_string(e.to_string()))
            })?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage conformance suite against the sled store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(SledBuilder).await.expect("storage suite");
    }

    /// A data dir of another format, or from before formats were recorded, is refused by name
    /// and left as it was; a fresh one gets this build's format.
    #[test]
    fn a_data_dir_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        drop(open(dir.path()).unwrap());
        let set_format = |format: Option<u32>| {
            let db = sled_open(dir.path());
            let meta = db.open_tree("meta").unwrap();
            match format {
                Some(f) => meta.insert(KEY_FORMAT, &f.to_be_bytes()).unwrap(),
                None => meta.remove(KEY_FORMAT).unwrap(),
            };
            meta.insert(KEY_VOTE, b"x".as_slice()).unwrap();
            db.flush().unwrap();
        };
        set_format(Some(DIR_FORMAT + 1));
        let err = open(dir.path())
            .err()
            .expect("another format is refused")
            .to_string();
        assert!(
            err.contains(&format!("holds dir format {}", DIR_FORMAT + 1))
                && err.contains(&format!("reads dir format {DIR_FORMAT}")),
            "{err}"
        );
        set_format(None);
        let err = open(dir.path())
            .err()
            .expect("no marker on a used dir is refused")
            .to_string();
        assert!(err.contains("from before formats were recorded"), "{err}");
        // Refusing changed nothing: still no marker.
        let err = open(dir.path()).err().expect("still refused").to_string();
        assert!(err.contains("from before formats were recorded"), "{err}");
    }

    /// A dir of a format this build reads as it is gets this build's marker, and its data.
    #[test]
    fn a_data_dir_of_an_upgradable_format_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let format = || {
            let db = sled_open(dir.path());
            let meta = db.open_tree("meta").unwrap();
            let v = meta.get(KEY_FORMAT).unwrap().unwrap();
            u32::from_be_bytes(<[u8; 4]>::try_from(v.as_ref()).unwrap())
        };
        for old in UPGRADES_FROM {
            {
                let db = sled_open(dir.path());
                let meta = db.open_tree("meta").unwrap();
                meta.insert(KEY_FORMAT, &old.to_be_bytes()).unwrap();
                db.flush().unwrap();
            }
            assert_eq!(format(), *old);
            drop(open(dir.path()).expect("an upgradable format opens"));
            assert_eq!(format(), DIR_FORMAT);
        }
    }

    /// A format 5 dir's snapshot (a fabric without its site) is read as a standalone site's
    /// and stored again in this format, so that followers sent it can read it.
    #[tokio::test]
    async fn a_format_5_snapshot_is_read_and_stored_again() {
        use openraft::storage::RaftSnapshotBuilder;
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, mut sm) = open(dir.path()).unwrap();
            let built = sm.build_snapshot().await.unwrap();
            let mut node_fabric = Fabric::default();
            node_fabric
                .apply(&spaced_fabric::Command::RegisterNode {
                    id: 1,
                    name: "n1".into(),
                    raft_addr: "127.0.0.1:7000".into(),
                    mgmt_ip: None,
                    roles: ["ha".to_string()].into(),
                    at: 0,
                })
                .unwrap();
            let old = v5::FabricState {
                last_applied: None,
                last_membership: StoredMembership::default(),
                fabric: v5::Fabric {
                    nodes: node_fabric.nodes.clone(),
                    placements: Default::default(),
                    devices: Default::default(),
                    services: Default::default(),
                    revoked: Default::default(),
                },
            };
            let data = codec::encode(&old).unwrap();
            assert!(
                codec::decode::<FabricState>(&data).is_err(),
                "format 5 data must not read as this format's"
            );
            let stored = codec::encode(&StoredSnapshot {
                meta: built.meta,
                data,
            })
            .unwrap();
            let count = chunked::count(&sm.sm, KEY_SNAPSHOT).unwrap();
            let mut batch = sled::Batch::default();
            chunked::put(&mut batch, KEY_SNAPSHOT, &stored, count);
            sm.sm.apply_batch(batch).unwrap();
            let meta = sm.db.open_tree("meta").unwrap();
            meta.insert(KEY_FORMAT, &5u32.to_be_bytes()).unwrap();
            sm.db.flush().unwrap();
        }
        let (_log, sm) = open(dir.path()).expect("a format 5 dir opens");
        sm.view().read(|f| {
            assert_eq!(f.nodes[&1].name, "n1");
            assert_eq!(f.site, spaced_fabric::Site::default());
        });
        let bytes = chunked::get(&sm.sm, KEY_SNAPSHOT).unwrap().unwrap();
        let stored: StoredSnapshot = codec::decode(&bytes).unwrap();
        let (state, old) = decode_state(&stored.data).unwrap();
        assert!(!old, "the snapshot was not stored again in this format");
        assert_eq!(state.fabric.nodes[&1].name, "n1");
    }

    /// Readers waiting on the view are told once applied entries are visible in it.
    #[tokio::test]
    async fn the_view_tells_of_applied_entries() {
        use openraft::storage::RaftStateMachine;
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        let view = sm.view();
        let mut changes = view.changes();
        assert!(!changes.has_changed().unwrap());
        let entry = Entry::new_blank(openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            1,
        ));
        let entries = futures::stream::iter(vec![Ok((entry, None))]);
        sm.apply(entries).await.unwrap();
        assert!(changes.has_changed().unwrap(), "not told of the apply");
        changes.borrow_and_update();
        assert_eq!(view.last_applied_index(), Some(1));
        assert!(!changes.has_changed().unwrap());
    }

    /// Vote, log and snapshot survive closing and reopening the database.
    #[tokio::test]
    async fn state_survives_reopen() {
        use openraft::storage::RaftLogStorageExt;
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new(3, 1);
        {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            assert!(is_empty(&log).unwrap());
            log.save_vote(&vote).await.unwrap();
            let entries: Vec<Entry> = (1..=5)
                .map(|i| {
                    Entry::new_blank(openraft::LogId::new(
                        openraft::impls::leader_id_adv::LeaderId {
                            term: 3,
                            node_id: 1,
                        },
                        i,
                    ))
                })
                .collect();
            log.blocking_append(entries).await.unwrap();
            sm.build_snapshot().await.unwrap();
        }
        let (mut log, mut sm) = open(dir.path()).unwrap();
        assert!(!is_empty(&log).unwrap());
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(
            log.get_log_state()
                .await
                .unwrap()
                .last_log_id
                .map(|l| l.index()),
            Some(5)
        );
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
    }

    fn blank(index: u64) -> Entry {
        Entry::new_blank(openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 3,
                node_id: 1,
            },
            index,
        ))
    }

    async fn indexes(log: &mut LogStore, range: std::ops::Range<u64>) -> Vec<u64> {
        log.try_get_log_entries(range)
            .await
            .unwrap()
            .iter()
            .map(|e| e.index())
            .collect()
    }

    /// One blank entry's log keys and value in `batch`.
    fn put_blank(batch: &mut sled::Batch, i: u64) {
        chunked::put(batch, &index_key(i), &codec::encode(&blank(i)).unwrap(), 0);
    }

    /// Writes an older dir's one-tree log (entries 1..=`last`), marked `format`, as an older
    /// build leaves it.
    fn write_old_log(db: &sled::Db, last: u64, format: u32) {
        let old = db.open_tree(LEGACY_LOG).unwrap();
        let mut batch = sled::Batch::default();
        for i in 1..=last {
            put_blank(&mut batch, i);
        }
        old.apply_batch(batch).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert(KEY_FORMAT, &format.to_be_bytes()).unwrap();
    }

    async fn last_index(log: &mut LogStore) -> Option<u64> {
        log.get_log_state()
            .await
            .unwrap()
            .last_log_id
            .map(|l| l.index())
    }

    fn segment_names(dir: &Path) -> Vec<String> {
        let db = sled_open(dir);
        let mut names: Vec<String> = db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| n.starts_with("log"))
            .collect();
        names.sort();
        names
    }

    /// Appends that cross segments read back whole and in order, a truncation across a
    /// segment boundary leaves no hole, and a purge drops exactly the segments wholly below its
    /// floor, durably: after a reopen the dropped trees are gone and every entry from the
    /// floor on is there.
    #[tokio::test]
    async fn the_log_spans_segments_and_a_purge_drops_whole_ones() {
        use crate::segments::SEGMENT;
        use openraft::storage::RaftLogStorageExt;
        let dir = tempfile::tempdir().unwrap();
        let last = 3 * SEGMENT + 10;
        {
            let (mut log, _sm) = open(dir.path()).unwrap();
            // Batches of 1,000 straddle every boundary.
            let mut next = 1;
            while next <= last {
                let to = (next + 999).min(last);
                log.blocking_append((next..=to).map(blank)).await.unwrap();
                next = to + 1;
            }
            assert_eq!(
                indexes(&mut log, 1..last + 1).await,
                (1..=last).collect::<Vec<_>>()
            );
            let across = SEGMENT - 2..SEGMENT + 3;
            assert_eq!(
                indexes(&mut log, across.clone()).await,
                across.collect::<Vec<_>>()
            );
            // Truncation across a boundary, then the log goes on.
            log.truncate_after(Some(blank(2 * SEGMENT - 3).log_id()))
                .await
                .unwrap();
            assert_eq!(last_index(&mut log).await, Some(2 * SEGMENT - 3));
            log.blocking_append((2 * SEGMENT - 2..=last).map(blank))
                .await
                .unwrap();
            // Purge into segment 2: segments 0 and 1 are dropped (in the background).
            let floor = 2 * SEGMENT + 7;
            log.purge(blank(floor - 1).log_id()).await.unwrap();
            log.settle_purges().await;
            assert!(
                log.log.from(0, Some(1)).is_empty(),
                "segments 0 and 1 not dropped"
            );
            assert_eq!(
                indexes(&mut log, 0..last + 1).await,
                (floor..=last).collect::<Vec<_>>()
            );
        }
        let names = segment_names(dir.path());
        assert_eq!(
            names,
            ["log.0000000000000002", "log.0000000000000003"],
            "{names:?}"
        );
        let (mut log, _sm) = open(dir.path()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(
            state.last_purged_log_id.map(|l| l.index()),
            Some(2 * SEGMENT + 6)
        );
        assert_eq!(state.last_log_id.map(|l| l.index()), Some(last));
        assert_eq!(
            indexes(&mut log, 0..last + 1).await,
            (2 * SEGMENT + 7..=last).collect::<Vec<_>>()
        );
    }

    /// A move cut short before the mark leaves copies in segments; an older build rolled back
    /// onto the dir may truncate its log after that. The next move starts from its log, not
    /// from the copies.
    #[tokio::test]
    async fn an_interrupted_move_rolled_back_does_not_bring_truncated_entries_back() {
        use crate::segments::{SEGMENT, Segments, segment_of};
        let dir = tempfile::tempdir().unwrap();
        let (copied, kept) = (SEGMENT + 20, SEGMENT - 10);
        {
            let db = sled_open(dir.path());
            let segments = Segments::open(&db).unwrap();
            for i in 1..=copied {
                let mut batch = sled::Batch::default();
                put_blank(&mut batch, i);
                segments
                    .tree(segment_of(i))
                    .unwrap()
                    .apply_batch(batch)
                    .unwrap();
            }
            write_old_log(&db, kept, DATA_FORMAT);
            db.flush().unwrap();
        }
        {
            let (mut log, _sm) = open(dir.path()).unwrap();
            assert_eq!(
                last_index(&mut log).await,
                Some(kept),
                "the log the older build left, not the stale copy"
            );
            assert_eq!(
                indexes(&mut log, 0..copied + 1).await,
                (1..=kept).collect::<Vec<_>>()
            );
        }
        assert_eq!(segment_names(dir.path()), ["log.0000000000000000"]);
    }

    /// A format 7 dir keeps its log in one tree: opened, the log moves into segments and reads
    /// the same, the old tree is gone and the dir is marked 8. A move cut short after the
    /// marking (the old tree still there) is finished at the next open.
    #[tokio::test]
    async fn a_format_7_log_moves_into_segments() {
        use crate::segments::SEGMENT;
        let dir = tempfile::tempdir().unwrap();
        let last = SEGMENT + 20;
        let write_format_7 = |marker: u32| {
            let db = sled_open(dir.path());
            write_old_log(&db, last, marker);
            db.open_tree("meta")
                .unwrap()
                .insert(KEY_VOTE, codec::encode(&Vote::new(3, 1)).unwrap())
                .unwrap();
            db.flush().unwrap();
        };
        write_format_7(DATA_FORMAT);
        for round in ["format 7", "a move cut short"] {
            {
                let (mut log, _sm) = open(dir.path()).expect(round);
                assert_eq!(last_index(&mut log).await, Some(last), "{round}");
                assert_eq!(
                    indexes(&mut log, 0..last + 1).await,
                    (1..=last).collect::<Vec<_>>(),
                    "{round}"
                );
                assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
            }
            assert_eq!(
                segment_names(dir.path()),
                ["log.0000000000000000", "log.0000000000000001"],
                "{round}: the old tree is gone"
            );
            let db = sled_open(dir.path());
            let v = db
                .open_tree("meta")
                .unwrap()
                .get(KEY_FORMAT)
                .unwrap()
                .unwrap();
            assert_eq!(v.as_ref(), DIR_FORMAT.to_be_bytes(), "{round}");
            drop(db);
            // A crash after the marking, before the old tree was dropped.
            write_format_7(DIR_FORMAT);
        }
    }
}
