//! Keeping the fence guard out of the daemon's cgroup.
//!
//! A process group of its own protects the guard from a signal to the daemon's group, but
//! not from what a service manager does to the daemon's whole cgroup: `systemctl kill -s KILL
//! spaced`, a stop that times out, or `cgroup.kill` SIGKILL every process in it, and a frozen
//! cgroup (`cgroup.freeze`, `systemctl freeze`) stops every one of them. The guard would go
//! (or stop) with the daemon and leave the VIP's address up on a host nobody fences.
//!
//! So the guard is moved, right after it starts, into a cgroup v2 of its own outside the
//! daemon's: `fence_cgroup` in the config, a path under the cgroup2 mount (default
//! `spaced-fence`; `none` leaves it where it is). On a host without cgroup v2, or with the
//! daemon in the root cgroup, there is nothing to escape and nothing is moved.

use std::path::PathBuf;

use crate::ops::config::FenceCgroup;

/// Why the guard could not be moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    /// The daemon itself runs inside the fence cgroup, so moving the guard there changes nothing.
    #[error("the daemon's own cgroup {own} is inside the fence cgroup {fence}")]
    Inside {
        /// The daemon's cgroup.
        own: String,
        /// The configured fence cgroup.
        fence: String,
    },
    /// The daemon is in a cgroup v2, but no cgroup2 filesystem is mounted where it can see it.
    #[error(
        "no cgroup2 filesystem is mounted in this process's view (mount one at /sys/fs/cgroup)"
    )]
    NotMounted,
    /// Creating the cgroup or moving the process failed.
    #[error("{what} {path}: {error}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        error: String,
    },
}

/// What became of one move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// The process now runs in this cgroup directory.
    Moved(PathBuf),
    /// Nothing to do, and why.
    Stays(&'static str),
}

/// Moves `pid` into the fence cgroup, creating it if needed.
pub fn move_out(fence: &FenceCgroup, pid: u32) -> Result<Placed, CgroupError> {
    let FenceCgroup::Under(rel) = fence else {
        return Ok(Placed::Stays("fence_cgroup is none"));
    };
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| CgroupError::Io {
            what: "read",
            path: PathBuf::from(path),
            error: e.to_string(),
        })
    };
    let Some(own) = own_cgroup(&read("/proc/self/cgroup")?) else {
        return Ok(Placed::Stays("this host has no cgroup v2 hierarchy"));
    };
    if !placement(&own, rel)? {
        return Ok(Placed::Stays("the daemon runs in the root cgroup"));
    }
    // In a cgroup but with no cgroup2 filesystem in sight (`ip netns exec` mounts a fresh
    // /sys without it, and so do some containers): say so rather than stay silently.
    let mount = cgroup2_mount(&read("/proc/self/mountinfo")?).ok_or(CgroupError::NotMounted)?;
    let dir = mount.join(rel);
    std::fs::create_dir_all(&dir).map_err(|e| CgroupError::Io {
        what: "create",
        path: dir.clone(),
        error: e.to_string(),
    })?;
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|e| CgroupError::Io {
        what: "move the guard into",
        path: procs,
        error: e.to_string(),
    })?;
    Ok(Placed::Moved(dir))
}

/// Whether a guard of a daemon in cgroup `own` should move to `fence` (both relative to the
/// mount, `own` with its leading `/`): not from the root (no cgroup-wide kill reaches it), and
/// never when the daemon is inside the fence cgroup itself.
fn placement(own: &str, fence: &str) -> Result<bool, CgroupError> {
    let own_rel = own.trim_start_matches('/');
    if own_rel.is_empty() {
        return Ok(false);
    }
    if own_rel == fence || own_rel.starts_with(&format!("{fence}/")) {
        return Err(CgroupError::Inside {
            own: own.to_string(),
            fence: fence.to_string(),
        });
    }
    Ok(true)
}

/// Where this process sees the cgroup2 filesystem mounted, if anywhere (also for the test
/// lab, which puts its processes in cgroups of their own).
pub fn mounted_cgroup2() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The cgroup2 mount point in a `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(left.split_whitespace().nth(4)?)))
    })
}

/// The process's cgroup v2 path in a `/proc/self/cgroup` text (the `0::` line).
fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_moves_unless_the_daemon_is_in_the_root_or_the_fence_cgroup() {
        assert_eq!(
            placement("/system.slice/spaced.service", "spaced-fence"),
            Ok(true)
        );
        assert_eq!(placement("/spaced-fenced", "spaced-fence"), Ok(true));
        assert_eq!(placement("/", "spaced-fence"), Ok(false));
        assert!(placement("/spaced-fence", "spaced-fence").is_err());
        assert!(placement("/spaced-fence/x", "spaced-fence").is_err());
    }

    #[test]
    fn the_mount_and_own_cgroup_are_read_from_proc() {
        let mountinfo = "\
25 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 25 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 25 0:36 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(cgroup2_mount("25 30 0:22 / /x rw - tmpfs tmpfs rw\n"), None);
        let cgroup = "4:memory:/x\n0::/system.slice/spaced.service\n";
        assert_eq!(
            own_cgroup(cgroup).as_deref(),
            Some("/system.slice/spaced.service")
        );
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }
}
