//! Backups of declared configuration files (`[dr.backup]`): the active site's leader reads
//! them on a schedule (hours of the day and days of the week, UTC), keeps `max_count`, and
//! ships the newest to every node of the standby site, which keeps the last `max_count` it
//! received; when a site is promoted, each of its nodes writes the newest backup it received
//! back to the files' paths before its services start.
//!
//! The files are meant to be the same on every node of a site (an application's settings, a
//! license): each backup is one node's copies. Paths are absolute; each file may hold at most
//! [`MAX_FILE`] bytes and a backup at most [`MAX_BACKUP`].

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use spaced_fabric::Millis;

/// Largest file a backup takes.
pub const MAX_FILE: u64 = 1 << 20;
/// Largest backup (all its files together).
pub const MAX_BACKUP: u64 = 4 << 20;
/// Fewest backups kept (the model's floor for `maxCount`).
pub const MIN_COUNT: usize = 3;

const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// `[dr.backup]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    /// The files to back up (absolute paths); none: no backups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<PathBuf>,
    /// Hours of the day (0–23, UTC) a backup is taken in (the model's `hoursOfDay`); default
    /// every hour.
    #[serde(default = "every_hour")]
    pub hours_of_day: Vec<u8>,
    /// Days of the week (`sun` … `sat`) backups are taken on (`daysOfWeek`); default every day.
    #[serde(default = "every_day")]
    pub days_of_week: Vec<String>,
    /// How many backups each site keeps (`maxCount`, at least 3).
    #[serde(default = "default_count")]
    pub max_count: usize,
}

fn every_hour() -> Vec<u8> {
    (0..24).collect()
}
fn every_day() -> Vec<String> {
    DAYS.iter().map(|d| d.to_string()).collect()
}
fn default_count() -> usize {
    MIN_COUNT
}

impl Default for BackupSection {
    fn default() -> Self {
        BackupSection {
            files: Vec::new(),
            hours_of_day: every_hour(),
            days_of_week: every_day(),
            max_count: default_count(),
        }
    }
}

impl BackupSection {
    /// Checks the section: the key at fault and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, f) in self.files.iter().enumerate() {
            if !f.is_absolute() {
                return Err((
                    format!("dr.backup.files[{i}]"),
                    format!("{} is not an absolute path", f.display()),
                ));
            }
        }
        if let Some(h) = self.hours_of_day.iter().find(|h| **h > 23) {
            return Err((
                "dr.backup.hours_of_day".into(),
                format!("{h} is not an hour of the day (0–23)"),
            ));
        }
        if self.hours_of_day.is_empty() {
            return Err(("dr.backup.hours_of_day".into(), "names no hour".into()));
        }
        for d in &self.days_of_week {
            if day_index(d).is_none() {
                return Err((
                    "dr.backup.days_of_week".into(),
                    format!("{d:?} is not a day (sun, mon, tue, wed, thu, fri, sat)"),
                ));
            }
        }
        if self.days_of_week.is_empty() {
            return Err(("dr.backup.days_of_week".into(), "names no day".into()));
        }
        if self.max_count < MIN_COUNT {
            return Err((
                "dr.backup.max_count".into(),
                format!("{} is below {MIN_COUNT}", self.max_count),
            ));
        }
        Ok(())
    }

    /// The start of the hour `now` falls in, if backups are taken in it.
    pub fn slot(&self, now: Millis) -> Option<Millis> {
        const HOUR: u64 = 3_600_000;
        let hour = ((now / HOUR) % 24) as u8;
        // 1970-01-01 was a Thursday.
        let weekday = ((now / (24 * HOUR) + 4) % 7) as usize;
        let day_ok = self
            .days_of_week
            .iter()
            .any(|d| day_index(d) == Some(weekday));
        (day_ok && self.hours_of_day.contains(&hour)).then_some(now - now % HOUR)
    }

    /// Whether a backup is due at `now`, the newest taken at `newest`.
    pub fn due(&self, newest: Option<Millis>, now: Millis) -> bool {
        !self.files.is_empty()
            && self
                .slot(now)
                .is_some_and(|slot| newest.is_none_or(|n| n < slot))
    }
}

fn day_index(d: &str) -> Option<usize> {
    DAYS.iter().position(|x| x.eq_ignore_ascii_case(d))
}

/// Why a backup could not be taken, kept, read back or restored; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file or directory could not be read, written or created.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file to back up is not a regular file.
    #[error("{}: not a regular file", .path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// A file to back up is larger than [`MAX_FILE`].
    #[error("{}: {len} bytes, above the {MAX_FILE} a backup takes", .path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The files together are larger than [`MAX_BACKUP`].
    #[error("the files come to more than {MAX_BACKUP} bytes (at {})", .at.display())]
    TooLarge {
        /// The file at which the sum went over.
        at: PathBuf,
    },
    /// A file to restore has no parent directory.
    #[error("{}: no directory", .path.display())]
    NoDirectory {
        /// The file.
        path: PathBuf,
    },
    /// A backup does not encode.
    #[error("encoding: {0}")]
    Encode(#[source] spaced_raft::codec::CodecError),
    /// A backup on disk does not decode.
    #[error("{}: {source}", .path.display())]
    Decode {
        /// The backup's file.
        path: PathBuf,
        /// Why.
        source: spaced_raft::codec::CodecError,
    },
}

/// `|source| BackupError::Io { path, source }`, for `map_err`.
fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackedFile {
    /// Where it lives.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// A backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// The site it was taken on.
    pub site: String,
    /// When (ms since the Unix epoch): also its name.
    pub taken_at: Millis,
    /// The files.
    pub files: Vec<BackedFile>,
}

impl Backup {
    /// Reads `files` now: the error names the file and the problem.
    pub fn take(site: &str, files: &[PathBuf], now: Millis) -> Result<Backup, BackupError> {
        use std::os::unix::fs::PermissionsExt;
        let mut taken = Vec::new();
        let mut total = 0;
        for path in files {
            let meta = std::fs::metadata(path).map_err(io_at(path))?;
            if !meta.is_file() {
                return Err(BackupError::NotAFile { path: path.clone() });
            }
            if meta.len() > MAX_FILE {
                return Err(BackupError::FileTooLarge {
                    path: path.clone(),
                    len: meta.len(),
                });
            }
            let data = std::fs::read(path).map_err(io_at(path))?;
            total += data.len() as u64;
            if total > MAX_BACKUP {
                return Err(BackupError::TooLarge { at: path.clone() });
            }
            taken.push(BackedFile {
                path: path.clone(),
                mode: meta.permissions().mode() & 0o7777,
                data,
            });
        }
        Ok(Backup {
            site: site.to_string(),
            taken_at: now,
            files: taken,
        })
    }

    /// Writes every file back to its path (each through a temporary file in its directory,
    /// synced, then renamed over it), creating missing directories.
    pub fn restore(&self) -> Result<(), BackupError> {
        use std::os::unix::fs::PermissionsExt;
        for f in &self.files {
            let dir = f.path.parent().ok_or_else(|| BackupError::NoDirectory {
                path: f.path.clone(),
            })?;
            std::fs::create_dir_all(dir).map_err(io_at(dir))?;
            let name = f.path.file_name().map(|n| n.to_string_lossy().into_owned());
            let tmp = dir.join(format!(".{}.spaced-restore", name.unwrap_or_default()));
            let write = || -> std::io::Result<()> {
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&f.data)?;
                file.set_permissions(std::fs::Permissions::from_mode(f.mode))?;
                file.sync_all()?;
                std::fs::rename(&tmp, &f.path)
            };
            if let Err(e) = write() {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_at(&f.path)(e));
            }
        }
        Ok(())
    }

    /// Bytes of all its files.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.data.len() as u64).sum()
    }
}

/// A backup as `dr status` shows it: when it was taken, its files and bytes.
pub type BackupSummary = (Millis, usize, u64);

/// Which backups: those this site took, or those its peer sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Taken here (while active).
    Own = 0,
    /// Received from the peer (while standby).
    Peer = 1,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Own => "own",
            Kind::Peer => "peer",
        }
    }
}

/// A node's backups on disk: `<dir>/own/<taken_at>.backup`, `<dir>/peer/<taken_at>.backup`,
/// and `<dir>/restored` (the site epoch and backup last restored).
#[derive(Debug)]
pub struct BackupStore {
    dir: PathBuf,
    keep: usize,
    /// The newest backup's (time, files, bytes) of each kind, once read.
    summaries: std::sync::Mutex<[Option<Option<BackupSummary>>; 2]>,
}

impl BackupStore {
    /// A store under `dir` keeping `keep` backups of each kind.
    pub fn new(dir: PathBuf, keep: usize) -> Self {
        BackupStore {
            dir,
            keep: keep.max(MIN_COUNT),
            summaries: std::sync::Mutex::default(),
        }
    }

    /// The newest backup of a kind: when it was taken, its files and bytes (read once, then
    /// kept up to date by [`keep`](Self::keep)).
    pub fn summary(&self, kind: Kind) -> Option<BackupSummary> {
        let mut cache = self.summaries.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut cache[kind as usize];
        if slot.is_none() {
            let newest = self.newest(kind).ok().flatten();
            *slot = Some(newest.map(|b| (b.taken_at, b.files.len(), b.size())));
        }
        slot.flatten()
    }

    fn kind_dir(&self, kind: Kind) -> PathBuf {
        self.dir.join(kind.dir())
    }

    /// The backups of a kind, oldest first (their times).
    pub fn list(&self, kind: Kind) -> Vec<Millis> {
        let Ok(entries) = std::fs::read_dir(self.kind_dir(kind)) else {
            return Vec::new();
        };
        let mut times: Vec<Millis> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".backup")?
                    .parse()
                    .ok()
            })
            .collect();
        times.sort_unstable();
        times
    }

    /// Keeps `backup` as a backup of `kind` (synced, renamed into place), then drops the
    /// oldest beyond the count kept. Keeping one already kept changes nothing.
    pub fn keep(&self, kind: Kind, backup: &Backup) -> Result<(), BackupError> {
        let dir = self.kind_dir(kind);
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let path = dir.join(format!("{}.backup", backup.taken_at));
        if !path.exists() {
            let bytes = spaced_raft::codec::encode(backup).map_err(BackupError::Encode)?;
            let tmp = dir.join(format!(".{}.tmp", backup.taken_at));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(&dir)?.sync_all()
            };
            write().map_err(io_at(&path))?;
        }
        let times = self.list(kind);
        for t in &times[..times.len().saturating_sub(self.keep)] {
            let _ = std::fs::remove_file(dir.join(format!("{t}.backup")));
        }
        // Read again at the next look (the one kept may not be the newest).
        self.summaries.lock().unwrap_or_else(|p| p.into_inner())[kind as usize] = None;
        Ok(())
    }

    /// The newest backup of a kind, read back.
    pub fn newest(&self, kind: Kind) -> Result<Option<Backup>, BackupError> {
        let Some(t) = self.list(kind).last().copied() else {
            return Ok(None);
        };
        let path = self.kind_dir(kind).join(format!("{t}.backup"));
        let bytes = std::fs::read(&path).map_err(io_at(&path))?;
        spaced_raft::codec::decode(&bytes)
            .map(Some)
            .map_err(|source| BackupError::Decode { path, source })
    }

    fn marker(&self) -> PathBuf {
        self.dir.join("restored")
    }

    /// (site epoch, backup time) last restored.
    fn restored(&self) -> (u64, Millis) {
        std::fs::read_to_string(self.marker())
            .ok()
            .and_then(|s| {
                let (e, t) = s.trim().split_once(' ')?;
                Some((e.parse().ok()?, t.parse().ok()?))
            })
            .unwrap_or((0, 0))
    }

    /// Called whenever the node looks at its site's role: once per promotion to `epoch`,
    /// writes the newest backup received from the peer back to its files (unless it was
    /// restored before). `Some` says what happened, for the log.
    pub fn on_active(&self, epoch: u64) -> Option<Result<Backup, BackupError>> {
        let (done_epoch, done_backup) = self.restored();
        if done_epoch >= epoch {
            return None;
        }
        let newest = match self.newest(Kind::Peer) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        let outcome = match newest {
            Some(b) if b.taken_at > done_backup => Some(b.restore().map(|()| b)),
            _ => None,
        };
        let restored = match &outcome {
            Some(Ok(b)) => b.taken_at,
            _ => done_backup,
        };
        // A failed restore is tried again at the next look.
        if !matches!(outcome, Some(Err(_))) {
            let _ = std::fs::create_dir_all(&self.dir);
            let marker = self.marker();
            if let Err(e) = std::fs::write(&marker, format!("{epoch} {restored}\n")) {
                return Some(Err(io_at(&marker)(e)));
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn backups_are_due_once_per_scheduled_hour() {
        // 2026-12-03 was a Thursday; 10:15 UTC.
        let thu_1015 = 1_796_292_900_000;
        assert_eq!(thu_1015 / HOUR % 24, 10);
        let mut s = BackupSection {
            files: vec!["/etc/x".into()],
            ..BackupSection::default()
        };
        let slot = thu_1015 - 15 * 60_000;
        assert_eq!(s.slot(thu_1015), Some(slot));
        assert!(s.due(None, thu_1015));
        assert!(s.due(Some(slot - 1), thu_1015));
        assert!(!s.due(Some(slot), thu_1015), "taken in this hour already");
        s.hours_of_day = vec![2, 14];
        assert!(!s.due(None, thu_1015), "10:00 is not a backup hour");
        assert!(s.due(None, thu_1015 + 4 * HOUR));
        s.hours_of_day = vec![10];
        s.days_of_week = vec!["mon".into(), "Fri".into()];
        assert!(!s.due(None, thu_1015), "not on a Thursday");
        assert!(s.due(None, thu_1015 + 24 * HOUR), "on the Friday");
        s.files.clear();
        assert!(!s.due(None, thu_1015 + 24 * HOUR), "nothing to back up");
    }

    #[test]
    fn a_bad_backup_section_names_the_key() {
        let bad = |f: fn(&mut BackupSection)| {
            let mut s = BackupSection::default();
            f(&mut s);
            s.validate().unwrap_err().0
        };
        assert_eq!(
            bad(|s| s.files = vec!["rel/x".into()]),
            "dr.backup.files[0]"
        );
        assert_eq!(bad(|s| s.hours_of_day = vec![24]), "dr.backup.hours_of_day");
        assert_eq!(
            bad(|s| s.days_of_week = vec!["funday".into()]),
            "dr.backup.days_of_week"
        );
        assert_eq!(bad(|s| s.max_count = 2), "dr.backup.max_count");
        assert!(BackupSection::default().validate().is_ok());
    }

    #[test]
    fn a_store_keeps_the_newest_and_restores_once_per_promotion() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("etc/app.conf");
        std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
        std::fs::write(&conf, "v1").unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).unwrap();
        let missing = Backup::take("east", &[tmp.path().join("nope")], 1)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");

        let store = BackupStore::new(tmp.path().join("backups"), 3);
        for t in 1..=5 {
            std::fs::write(&conf, format!("v{t}")).unwrap();
            let b = Backup::take("east", std::slice::from_ref(&conf), t).unwrap();
            store.keep(Kind::Peer, &b).unwrap();
        }
        assert_eq!(
            store.list(Kind::Peer),
            vec![3, 4, 5],
            "the 3 newest are kept"
        );
        assert_eq!(store.summary(Kind::Peer), Some((5, 1, 2)));
        assert_eq!(store.summary(Kind::Own), None);
        assert_eq!(store.list(Kind::Own), Vec::<Millis>::new());

        std::fs::remove_dir_all(tmp.path().join("etc")).unwrap();
        let restored = store.on_active(2).expect("restores").unwrap();
        assert_eq!(restored.taken_at, 5);
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "v5");
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        // Once per promotion: a later look at the same epoch changes nothing.
        std::fs::write(&conf, "edited").unwrap();
        assert!(store.on_active(2).is_none());
        // Promoted again later with no newer backup received: the files stay as they are.
        assert!(store.on_active(4).is_none());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "edited");
        // A newer one received meanwhile is restored at the next promotion.
        std::fs::write(&conf, "v6").unwrap();
        store
            .keep(
                Kind::Peer,
                &Backup::take("east", std::slice::from_ref(&conf), 6).unwrap(),
            )
            .unwrap();
        std::fs::write(&conf, "edited").unwrap();
        assert_eq!(store.on_active(5).unwrap().unwrap().taken_at, 6);
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "v6");
    }
}
