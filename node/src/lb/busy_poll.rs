//! A short look at the sockets before a balancer thread sleeps, while connections arrive.
//!
//! A balancer thread that has run out of work parks in `epoll_wait` until the kernel wakes it.
//! Under a stream of short connections the next event is usually microseconds away, and
//! sleeping and being woken for it costs more than waiting for it awake: on a 2-core VM the
//! machine sat idle 14–20 % of a `Connection: close` run through `spaced lb`, against 5 %
//! through HAProxy, with the same CPU spent per connection (docs/benchmarks.md). So before a
//! thread parks it polls its runtime's epoll instance for up to `--busy-poll-us` and returns as
//! soon as an event is ready; the park that follows then finds it without sleeping.
//!
//! Only while connections arrive: the poll runs if the balancer accepted one within the last
//! [`RECENT`]. A long stream needs the CPU the poll would take: polling before every park cut
//! one iperf3 stream from 14.6–16.0 to 13.1–15.1 Gbit/s on 2 cores, where the proxy shares
//! the CPUs with the client and the server.
//!
//! Unlike HAProxy's `busy-polling`, which never sleeps (an idle HAProxy with it spins at 94 % of
//! a CPU), the poll is bounded: an idle balancer sleeps as before.
//!
//! tokio does not expose its epoll descriptor. [`attach`] finds it by the one thing that marks
//! it: the runtime registered the thread's listening socket in it, and `/proc/self/fdinfo` of
//! an epoll descriptor lists the descriptors registered in it. The hook then polls a duplicate
//! of that descriptor, which it owns: it stays valid however the runtime closes its own.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How recently a connection must have been accepted for a thread to poll before it parks.
pub const RECENT: Duration = Duration::from_millis(10);

/// Counts the connections a balancer has accepted (its `accepted` counter).
pub type Accepted = Box<dyn Fn() -> u64>;

/// A thread's armed poll.
struct Armed {
    /// A duplicate of a descriptor of the runtime's epoll instance.
    epoll: OwnedFd,
    /// The longest poll.
    window: Duration,
    /// Reads the balancer's accept count.
    accepted: Accepted,
    /// The count the hook last read, and when it last saw it change (`None`: not yet).
    seen: Cell<(u64, Option<Instant>)>,
}

thread_local! {
    /// This thread's armed poll, if any.
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
}

/// Installed with `on_thread_park` on every balancer runtime: if the balancer accepted a
/// connection within [`RECENT`], polls the epoll instance that [`attach`] found for this
/// thread, for at most its window, and returns once an event is ready. Does nothing on a
/// thread with none attached.
pub fn before_park() {
    ARMED.with_borrow(|armed| {
        let Some(armed) = armed else { return };
        let now = Instant::now();
        let (count, changed) = armed.seen.get();
        let current = (armed.accepted)();
        let changed = if current == count { changed } else { Some(now) };
        armed.seen.set((current, changed));
        if arriving(now, changed) {
            wait_ready(armed.epoll.as_fd(), armed.window);
        }
    });
}

/// Whether connections are arriving: one was accepted within [`RECENT`] of `now`.
fn arriving(now: Instant, last_accept: Option<Instant>) -> bool {
    last_accept.is_some_and(|at| now.saturating_duration_since(at) <= RECENT)
}

/// Polls `fd` without sleeping until it is readable or `window` has passed; whether it became
/// readable.
fn wait_ready(fd: BorrowedFd<'_>, window: Duration) -> bool {
    let end = Instant::now() + window;
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Arms this thread's hook: `registered` is a descriptor the thread's runtime has registered
/// (its listener), `window` the longest poll before a park (zero disarms), `accepted` the
/// balancer's count of accepted connections. The error says why the runtime's epoll
/// descriptor could not be found; the thread then parks at once, as without the setting.
pub fn attach(registered: RawFd, window: Duration, accepted: Accepted) -> io::Result<()> {
    let armed = if window.is_zero() {
        None
    } else {
        Some(Armed {
            epoll: epoll_holding(registered)?,
            window,
            seen: Cell::new((accepted(), None)),
            accepted,
        })
    };
    ARMED.with_borrow_mut(|slot| *slot = armed);
    Ok(())
}

/// A duplicate of a descriptor of the epoll instance of this process that has `registered` in
/// its interest list. An instance may have several descriptors (mio keeps a clone of its
/// own); more than one instance (the same socket in two runtimes) is refused: which one is
/// this thread's cannot be told.
fn epoll_holding(registered: RawFd) -> io::Result<OwnedFd> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            continue;
        }
        // The descriptor may close between the listing and this read: then it is not ours.
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        if interest_list(&info).any(|t| t == registered) {
            found.push((registrations(&info).collect::<Vec<_>>().join("\n"), fd));
        }
    }
    found.sort_unstable();
    found.dedup_by(|a, b| a.0 == b.0);
    match found[..] {
        [(_, fd)] => {
            // SAFETY: `fd` is open (its fdinfo was just read) and belongs to the runtime this
            // thread is running, which outlives this call; it is only borrowed to duplicate it.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            borrowed.try_clone_to_owned()
        }
        [] => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no epoll descriptor in /proc/self/fdinfo has descriptor {registered} registered"
            ),
        )),
        _ => Err(io::Error::other(format!(
            "{} epoll instances have descriptor {registered} registered (descriptors {:?})",
            found.len(),
            found.iter().map(|(_, fd)| fd).collect::<Vec<_>>()
        ))),
    }
}

/// The registrations an epoll instance's fdinfo text lists (its `tfd:` lines, without the
/// prefix). They also tell instances apart: each includes its user data, for tokio the
/// address of its own state, so descriptors of one instance show the same and two instances
/// differ; the `ino:` line cannot, as every epoll instance shares one anonymous inode.
fn registrations(fdinfo: &str) -> impl Iterator<Item = &str> {
    fdinfo.lines().filter_map(|line| line.strip_prefix("tfd:"))
}

/// The descriptors an epoll instance's fdinfo text lists as registered.
fn interest_list(fdinfo: &str) -> impl Iterator<Item = RawFd> + '_ {
    registrations(fdinfo).filter_map(|r| r.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_the_interest_list_of_an_epoll_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        9 events:       19 data:                0  pos:0 ino:2c sdev:9\n\
                    tfd:       12 events: 80002019 data:       7f00000001  pos:0 ino:2f sdev:9\n";
        assert_eq!(interest_list(info).collect::<Vec<_>>(), vec![9, 12]);
        assert_eq!(registrations(info).count(), 2);
        assert_eq!(registrations("pos:\t0\nino:\t26\n").count(), 0);
        assert_eq!(interest_list("pos:\t0\nflags:\t02\n").count(), 0);
        assert_eq!(interest_list("tfd: x events: 1\n").count(), 0);
    }

    /// The runtime's own epoll instance is found by its listener, and polling the duplicate
    /// sees the events the runtime will take: a connection arriving ends the wait early.
    #[test]
    fn finds_the_runtime_epoll_and_sees_its_events() -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let epoll = epoll_holding(listener.as_raw_fd())?;
            assert!(
                !wait_ready(epoll.as_fd(), Duration::from_millis(20)),
                "nothing has happened yet"
            );
            let mut client = std::net::TcpStream::connect(listener.local_addr()?)?;
            client.write_all(b"x")?;
            assert!(
                wait_ready(epoll.as_fd(), Duration::from_secs(5)),
                "a pending connection makes the runtime's epoll readable"
            );
            let (_conn, _) = listener.accept().await?;
            // A socket no runtime registered is in no epoll instance.
            let unregistered = std::net::TcpListener::bind("127.0.0.1:0")?;
            let err = epoll_holding(unregistered.as_raw_fd()).err();
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::NotFound));
            Ok(())
        })
    }

    #[test]
    fn polls_only_within_recent_of_an_accept() {
        let now = Instant::now();
        assert!(!arriving(now, None), "nothing accepted yet");
        assert!(arriving(now, Some(now)));
        assert!(arriving(now + RECENT, Some(now)));
        assert!(!arriving(
            now + RECENT + Duration::from_micros(1),
            Some(now)
        ));
    }

    #[test]
    fn a_zero_window_disarms() -> io::Result<()> {
        attach(-1, Duration::ZERO, Box::new(|| 0))?;
        assert!(ARMED.with_borrow(|a| a.is_none()));
        before_park();
        Ok(())
    }
}
