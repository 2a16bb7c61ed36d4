//! A supervised service's output, kept in files of bounded size and number (like Docker's
//! `json-file` driver with `max-size` and `max-file`): `<dir>/<name>.log` is written, and when
//! the next piece would take it over the limit it becomes `<name>.log.1`, the older ones move
//! up to `.2`, `.3`…, and the oldest beyond the count is deleted.
//!
//! The service writes into a pipe, not the file: a thread per running instance copies the
//! pipe into the file, so the supervisor decides where each byte goes and a rotation loses
//! nothing (a `copytruncate` from outside would lose what the service wrote meanwhile). The
//! thread ends when the last writer of the pipe (the service and anything it forked) has
//! closed it. A stopped (`SIGSTOP`) daemon stops the copying: a service that writes more than
//! the pipe holds (64 KiB) then waits, as it would behind journald.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ops::config::{MIN_SERVICE_LOG_BYTES as MIN_LOG_BYTES, ServicesSection};

/// The most bytes copied from the pipe at once: less than the smallest limit, so a file is
/// never larger than its limit.
const PIECE: usize = 8 * 1024;

/// How often a failing write is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Size and count of a service's log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A file is rotated before it would grow past this many bytes (at least
    /// [`MIN_LOG_BYTES`]).
    pub max_bytes: u64,
    /// Rotated files kept beside the current one (0: the current file starts over empty).
    pub files: u32,
}

impl From<&ServicesSection> for LogLimits {
    fn from(s: &ServicesSection) -> Self {
        LogLimits {
            max_bytes: s.log_max_bytes,
            files: s.log_files,
        }
    }
}

impl Default for LogLimits {
    /// `[services]`'s defaults.
    fn default() -> Self {
        LogLimits::from(&ServicesSection::default())
    }
}

/// One service's log file and its rotated predecessors.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    limits: LogLimits,
    file: File,
    size: u64,
    last_warning: Option<Instant>,
}

impl RotatingLog {
    /// Opens (creating it if need be) `path` for appending; what it already holds counts
    /// toward the limit.
    pub fn open(path: PathBuf, limits: LogLimits) -> io::Result<RotatingLog> {
        let file = append_to(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path,
            limits: LogLimits {
                max_bytes: limits.max_bytes.max(MIN_LOG_BYTES),
                ..limits
            },
            file,
            size,
            last_warning: None,
        })
    }

    /// Appends `bytes`, rotating first if they would take the file over the limit. A piece
    /// larger than the limit goes whole into a file of its own (the copying thread's pieces
    /// never are).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + bytes.len() as u64 > self.limits.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// `<name>.log.N`.
    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.limits.files == 0 {
            self.file.set_len(0)?;
        } else {
            for n in (1..self.limits.files).rev() {
                match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
            self.file = append_to(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }

    /// Copies `pipe` into the log until every writer has closed it. A failed write (a full
    /// disk) drops that piece and is logged at most once a minute; the service goes on.
    fn copy_from(log: &Mutex<RotatingLog>, pipe: OwnedFd, service: &str) {
        let mut pipe = File::from(pipe);
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(service, error = %e, "reading the service's output failed; it is no longer logged");
                    return;
                }
            };
            let mut log = crate::lock(log);
            if let Err(e) = log.write(&buf[..n]) {
                let now = Instant::now();
                if log.last_warning.is_none_or(|at| now - at >= WARN_EVERY) {
                    log.last_warning = Some(now);
                    tracing::warn!(service, file = %log.path.display(), error = %e, "cannot write the service's log; its output is dropped until this clears");
                }
            }
        }
    }
}

fn append_to(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The log files of every service a supervisor runs, one [`RotatingLog`] per name, shared by
/// the copying threads of that service's instances (an old instance's thread may still drain
/// its pipe when the next one starts).
#[derive(Debug)]
pub struct ServiceLogs {
    dir: PathBuf,
    limits: LogLimits,
    /// The logs some copying thread writes; a log leaves (its file closes) with the last one.
    open: Arc<Mutex<OpenLogs>>,
}

type OpenLogs = HashMap<String, Arc<Mutex<RotatingLog>>>;

impl ServiceLogs {
    /// Logs in `dir`, which must exist.
    pub fn new(dir: PathBuf, limits: LogLimits) -> ServiceLogs {
        ServiceLogs {
            dir,
            limits,
            open: Arc::default(),
        }
    }

    /// `<dir>/<service>.log`.
    pub fn path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.log"))
    }

    /// A pipe whose reading end a new thread copies into `service`'s log; the writing end, to
    /// be the service's stdout and stderr.
    pub fn attach(&self, service: &str) -> io::Result<OwnedFd> {
        let log = {
            let mut open = crate::lock(&self.open);
            match open.get(service) {
                Some(log) => log.clone(),
                None => {
                    let log = Arc::new(Mutex::new(RotatingLog::open(
                        self.path(service),
                        self.limits,
                    )?));
                    open.insert(service.to_string(), log.clone());
                    log
                }
            }
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (name, open) = (service.to_string(), self.open.clone());
        std::thread::Builder::new()
            .name(format!("log-{service}"))
            .spawn(move || {
                RotatingLog::copy_from(&log, read, &name);
                // The last thread of this service closes its file (a removed service holds no
                // descriptor); the map's lock orders this against a new instance's attach.
                let mut open = crate::lock(&open);
                if Arc::strong_count(&log) == 2 {
                    open.remove(&name);
                }
            })?;
        Ok(write)
    }

    /// How many services' log files are open now.
    pub fn open_files(&self) -> usize {
        crate::lock(&self.open).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_rotates_by_size_and_keeps_a_bounded_count_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let limits = LogLimits {
            max_bytes: MIN_LOG_BYTES,
            files: 2,
        };
        let mut log = RotatingLog::open(path.clone(), limits).unwrap();
        // 100 lines of 1,000 bytes each: 6 files' worth.
        let mut all = Vec::new();
        for i in 0..100 {
            let line = format!("{i:04}{}\n", "x".repeat(995));
            all.extend_from_slice(line.as_bytes());
            log.write(line.as_bytes()).unwrap();
        }
        let read = |p: &Path| std::fs::read(p).unwrap();
        let rotated = |n: u32| dir.path().join(format!("svc.log.{n}"));
        assert!(!rotated(3).exists(), "only 2 rotated files are kept");
        let (two, one, now) = (read(&rotated(2)), read(&rotated(1)), read(&path));
        for f in [&two, &one, &now] {
            assert!(f.len() as u64 <= MIN_LOG_BYTES, "{} bytes", f.len());
        }
        assert_eq!(
            one.len(),
            16_000,
            "rotated at a piece boundary under the limit"
        );
        // The three files are the stream's tail, in order, with nothing lost between them.
        let tail = [two, one, now].concat();
        assert!(
            all.ends_with(&tail),
            "the files are the stream's last bytes in order"
        );
        assert!(tail.starts_with(b"0"), "it starts at a line");
    }

    #[test]
    fn with_no_rotated_files_the_log_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        let limits = LogLimits {
            max_bytes: MIN_LOG_BYTES,
            files: 0,
        };
        let mut log = RotatingLog::open(path.clone(), limits).unwrap();
        // What the file held counts: 10,000 + 8,000 is over the limit.
        log.write(&[b'b'; 8_000]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'b'; 8_000]);
        assert!(!dir.path().join("svc.log.1").exists());
    }

    #[test]
    fn a_piece_larger_than_the_limit_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let limits = LogLimits {
            max_bytes: 1,
            files: 1,
        };
        let mut log = RotatingLog::open(path.clone(), limits).unwrap();
        log.write(b"small\n").unwrap();
        log.write(&[b'z'; 20_000]).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("svc.log.1")).unwrap(),
            b"small\n"
        );
        assert_eq!(std::fs::read(&path).unwrap().len(), 20_000);
    }

    #[test]
    fn a_pipes_output_reaches_the_log_once_its_writer_closes() {
        let dir = tempfile::tempdir().unwrap();
        let logs = ServiceLogs::new(dir.path().to_path_buf(), LogLimits::default());
        let mut w = File::from(logs.attach("svc").unwrap());
        w.write_all(b"hello\n").unwrap();
        drop(w);
        let path = logs.path("svc");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read(&path).unwrap_or_default() != b"hello\n" || logs.open_files() > 0 {
            assert!(
                Instant::now() < deadline,
                "the copy never arrived, or the file stayed open"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
