//! Zero-copy relay: splice(2) bytes between two TCP streams through one pooled pipe per direction.
//!
//! # Copy first, splice for bulk
//!
//! Splice does not pay for small messages: moving a 200-byte request and its
//! answer through a pipe costs more than a read and a write through a
//! user-space buffer (`benches/hot_path.rs`, `round_trip_200B`: about 8%
//! slower per round trip on loopback). So each direction starts by copying:
//! it reads into a [`COPY_BUFFER`]-byte buffer (pooled like the pipes, so a
//! connection neither allocates nor zeroes one) and writes what it read. The
//! first read that fills the buffer marks a bulk stream; once those bytes
//! are written the direction splices for good (no byte is ever in both the
//! buffer and the pipe, so order is kept). A short read empties the socket,
//! so it clears the read readiness at once, as tokio's own reads do.
//!
//! # How one direction works
//!
//! Each direction owns one pipe and counts the bytes sitting in it
//! (`Pipe::len`). A loop alternates two non-blocking splices:
//!
//! * **in**: `splice(src socket → pipe)`, only while the pipe has room;
//! * **out**: `splice(pipe → dst socket)`, only while the pipe holds bytes.
//!
//! Readiness is edge-triggered (tokio/epoll), so clearing it by mistake means
//! waiting for an edge that already happened — a hang. `EAGAIN` is ambiguous:
//! from the *in* splice it means "socket empty" **or** "pipe full" (a pipe
//! full of small socket fragments can run out of slots before its byte
//! capacity is reached), from the *out* splice "socket full" **or** "pipe
//! empty". The byte count removes the ambiguity where it can:
//!
//! * *out* runs only with bytes in the pipe, so its `EAGAIN` always means
//!   "socket full": it goes through `try_io(WRITABLE)`, which clears tokio's
//!   write readiness, and we then wait on `writable()`.
//! * *in* always goes through `try_io(READABLE)`, and tokio clears the
//!   socket's read readiness when the closure reports `EAGAIN`; after that
//!   tokio will not even call the closure until a new edge arrives. With an
//!   **empty** pipe `EAGAIN` is exact ("socket empty"). With a **non-empty**
//!   pipe it may be "pipe out of slots" (a pipe full of small socket
//!   fragments runs out of its page slots long before its byte capacity),
//!   and clearing readiness then would be fatal: the bytes still queued in
//!   the socket raise no new edge, so a sender that wrote a message and now
//!   waits for the answer would wait forever. So in that case the closure
//!   asks the socket (a one-byte `MSG_PEEK`): nothing queued → report
//!   `EAGAIN` (clear, correct); bytes queued → report "slots full", keep the
//!   readiness, and wait only for the destination to drain the pipe.
//! * A *short* in splice (fewer bytes than asked) into an empty pipe, of
//!   fewer bytes than the pipe has slots, cannot have run out of slots, so
//!   it emptied the socket: the closure then clears the read readiness
//!   itself, as tokio's own reads do after a short read, which saves the
//!   `EAGAIN` splice that would otherwise follow every message.
//! * With room in the pipe and an empty socket, we wait for the
//!   destination's `writable()` **or** the source's `readable()`, whichever
//!   comes first: while the destination is busy, newly arrived source bytes
//!   are pulled into the pipe's free room at once instead of piling up in the
//!   socket and closing the sender's TCP window.
//! * TCP urgent data (`MSG_OOB`): splice stops at an urgent mark and returns
//!   `EAGAIN` there for good, bytes queued behind it. So an `EAGAIN` into an
//!   empty pipe is checked like the ambiguous one above: bytes queued means
//!   the mark, and one `recv` (which passes it, leaving the urgent byte out
//!   as every reader without `SO_OOBINLINE` does) moves them; then splicing
//!   goes on. A read that stops short at the mark looks like one that
//!   emptied the socket, so the bytes behind a mark wait for the sender's
//!   next bytes (a new edge), or, if it sends none, the idle timeout; only
//!   with urgent data.
//!
//! When the *in* splice returns 0 the source sent FIN: the loop drains the
//! pipe, then `shutdown(SHUT_WR)` the destination, and that direction ends
//! while the other keeps flowing. The direction that ends last skips the
//! `shutdown`: both sockets are closed right after, and a `close` of a
//! socket read to its end sends the same FIN.
//!
//! A server that answers and closes at once (HTTP `Connection: close`) sends
//! its last bytes and its FIN together, and epoll reports them together
//! (`EPOLLRDHUP` with `EPOLLIN`). When a copy-phase read empties the socket
//! with the FIN already seen, the read that finds the EOF is made before the
//! bytes are written, and they are written with `MSG_MORE`: the `shutdown`
//! (or `close`) that follows at once then puts the FIN on the same segment
//! (the kernel adds a FIN to an unsent tail), one packet and one ACK fewer
//! per connection, as the server itself did. Only a read that confirms the
//! EOF holds the tail back, so no byte waits for anything but the FIN.
//!
//! Splicing into a reset socket may raise `SIGPIPE`; Rust programs ignore it
//! by default (std sets `SIG_IGN` at start-up), so it surfaces as `EPIPE`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{MsgFlags, Shutdown, recv, send, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes a direction reads at a time while it copies; the first read that
/// fills this many switches it to splice (module docs). Requests and small
/// answers fit; anything larger is a stream worth splicing.
pub const COPY_BUFFER: usize = 8 * 1024;

/// Pipe capacity assumed when the kernel will not tell us (one page). Only
/// an upper bound for how much one *in* splice asks for, so being low is safe.
const FALLBACK_PIPE_CAPACITY: usize = 4096;

/// Bytes moved by one finished relay, for accounting and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes read from the client and written to the backend.
    pub client_to_backend: u64,
    /// Bytes read from the backend and written to the client.
    pub backend_to_client: u64,
}

/// Which way bytes were flowing when something went wrong, so an error
/// names the broken side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client socket → pipe → backend socket.
    ClientToBackend,
    /// Backend socket → pipe → client socket.
    BackendToClient,
}

impl Direction {
    /// The socket bytes are read from in this direction.
    fn source(self) -> &'static str {
        match self {
            Direction::ClientToBackend => "client",
            Direction::BackendToClient => "backend",
        }
    }

    /// The socket bytes are written to in this direction.
    fn destination(self) -> &'static str {
        match self {
            Direction::ClientToBackend => "backend",
            Direction::BackendToClient => "client",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.source(), self.destination())
    }
}

/// Why a relay ended early. Every variant means both sockets were closed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// No pipe could be created (fd or memory exhaustion); the connection
    /// cannot be relayed at all.
    #[error("creating a pipe for the relay: {source}")]
    Pipe {
        /// The `pipe2(2)` failure.
        #[source]
        source: Errno,
    },
    /// Reading from the source socket failed (typically a reset peer).
    #[error("relay {direction}: reading from the {} failed after {moved} bytes: {source}", direction.source())]
    Read {
        /// The direction that broke.
        direction: Direction,
        /// Bytes this direction had delivered before the failure.
        moved: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing to the destination socket failed (peer reset or gone).
    #[error("relay {direction}: writing to the {} failed after {moved} bytes: {source}", direction.destination())]
    Write {
        /// The direction that broke.
        direction: Direction,
        /// Bytes this direction had delivered before the failure.
        moved: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Forwarding a half-close (`shutdown(SHUT_WR)`) failed.
    #[error("relay {direction}: forwarding EOF (shutdown write) to the {} failed: {source}", direction.destination())]
    Shutdown {
        /// The direction whose EOF could not be forwarded.
        direction: Direction,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// Nothing moved either way for the idle period; both sides were closed
    /// so dead peers do not pin fds and pipes forever.
    #[error("relay idle: no byte moved either way for {idle:?} (moved {} client->backend, {} backend->client)", stats.client_to_backend, stats.backend_to_client)]
    Idle {
        /// The configured idle timeout that expired.
        idle: Duration,
        /// What had moved before the connection went quiet.
        stats: RelayStats,
    },
}

impl RelayError {
    /// Whether the relay ended because a peer went away (reset, broken pipe, or a socket no
    /// longer connected when its half-close was forwarded): routine at teardown, for example
    /// when a load generator stops with connections open, not a fault of the relay.
    pub fn is_peer_gone(&self) -> bool {
        match self {
            RelayError::Read { source, .. } | RelayError::Write { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::NotConnected
            ),
            RelayError::Shutdown { source, .. } => {
                matches!(source, Errno::ENOTCONN | Errno::ECONNRESET | Errno::EPIPE)
            }
            RelayError::Pipe { .. } | RelayError::Idle { .. } => false,
        }
    }
}

/// A non-blocking kernel pipe used as the splice buffer for one direction.
///
/// Tracks how many bytes it holds because the kernel's `EAGAIN` cannot tell
/// "pipe full/empty" from "socket empty/full" (see the module docs).
#[derive(Debug)]
pub struct Pipe {
    /// Read end, spliced into the destination socket.
    read: OwnedFd,
    /// Write end, filled from the source socket.
    write: OwnedFd,
    /// Capacity reported by `F_GETPIPE_SZ`, the most one *in* splice asks for.
    capacity: usize,
    /// Page slots: the most buffers the pipe can hold, whatever their size.
    slots: usize,
    /// Bytes spliced in and not yet spliced out.
    len: usize,
}

impl Pipe {
    /// Creates a `O_NONBLOCK | O_CLOEXEC` pipe and tries to grow it to
    /// `size` bytes; a refused resize (e.g. above `pipe-max-size` or the
    /// per-user pipe quota) just keeps the default size.
    fn create(size: usize) -> Result<Self, Errno> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if size > 0 {
            let want = i32::try_from(size).unwrap_or(i32::MAX);
            if let Err(errno) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(want)) {
                tracing::debug!(%errno, size, "F_SETPIPE_SZ refused; keeping the default pipe size");
            }
        }
        let capacity = match fcntl(&write, FcntlArg::F_GETPIPE_SZ) {
            Ok(n) if n > 0 => usize::try_from(n).unwrap_or(FALLBACK_PIPE_CAPACITY),
            Ok(_) => FALLBACK_PIPE_CAPACITY,
            Err(errno) => {
                tracing::debug!(%errno, "F_GETPIPE_SZ failed; assuming one page");
                FALLBACK_PIPE_CAPACITY
            }
        };
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(FALLBACK_PIPE_CAPACITY);
        Ok(Pipe {
            read,
            write,
            capacity,
            slots: (capacity / page).max(1),
            len: 0,
        })
    }

    /// Capacity in bytes, as reported by the kernel after resizing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the relay has spliced in and not yet out.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the relay's count says the pipe is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The write end, so tests and diagnostics can put bytes in directly.
    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// The read end, so tests and diagnostics can look at the content.
    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Whether a one-byte non-blocking read finds nothing: a check of the
    /// byte count, for debug builds. It may consume a byte, but only from a
    /// pipe whose count was wrong and which is then closed.
    fn probe_empty(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(
            nix::unistd::read(&self.read, &mut probe),
            Err(Errno::EAGAIN)
        )
    }
}

/// A bounded free list of empty pipes, shared by all relays of a listener,
/// so each connection does not pay two `pipe2` + `fcntl` calls; and likewise
/// of copy buffers, so each connection does not allocate and zero two
/// [`COPY_BUFFER`]-byte buffers for its first messages.
///
/// Only empty pipes are kept: a pipe that still holds bytes (the relay
/// failed mid-transfer) would leak one connection's data into the next, so
/// it is closed instead. "Empty" is the relay's byte count, which is exact
/// (every splice's return value goes into it); debug builds also probe the
/// pipe, so a counting bug fails the tests instead of leaking data.
#[derive(Debug)]
pub struct PipePool {
    /// Empty pipes ready for reuse.
    idle: Mutex<Vec<Pipe>>,
    /// Copy buffers ready for reuse. What a buffer still holds is never sent: a
    /// direction only writes out the bytes its own last read put there.
    buffers: Mutex<Vec<Box<[u8]>>>,
    /// Most pipes kept idle; extra returned pipes are closed to bound fds.
    max_idle: usize,
    /// Requested pipe size in bytes for newly created pipes.
    size: usize,
}

impl PipePool {
    /// A pool keeping at most `max_idle` idle pipes, creating new ones with
    /// a requested capacity of `size` bytes (e.g. 1 MiB; 0 keeps the kernel
    /// default).
    pub fn new(max_idle: usize, size: usize) -> Self {
        PipePool {
            idle: Mutex::new(Vec::new()),
            buffers: Mutex::new(Vec::new()),
            max_idle,
            size,
        }
    }

    /// Takes an idle copy buffer of [`COPY_BUFFER`] bytes or allocates one.
    fn take_buffer(&self) -> Box<[u8]> {
        crate::lock(&self.buffers)
            .pop()
            .unwrap_or_else(|| vec![0u8; COPY_BUFFER].into_boxed_slice())
    }

    /// Keeps a copy buffer for the next connection, up to as many as pipes are kept.
    fn give_back_buffer(&self, buffer: Box<[u8]>) {
        let mut buffers = crate::lock(&self.buffers);
        if buffers.len() < self.max_idle {
            buffers.push(buffer);
        }
    }

    /// Takes an idle pipe or creates a new one.
    pub fn take(&self) -> Result<Pipe, RelayError> {
        if let Some(pipe) = self.lock().pop() {
            return Ok(pipe);
        }
        Pipe::create(self.size).map_err(|source| RelayError::Pipe { source })
    }

    /// Returns a pipe to the pool. It is kept only if its count says it is
    /// empty and the pool has room; otherwise it is closed. Returns whether
    /// it was kept.
    pub fn give_back(&self, pipe: Pipe) -> bool {
        if !pipe.is_empty() {
            tracing::debug!(
                len = pipe.len,
                "closing a pipe that still holds data instead of reusing it"
            );
            return false;
        }
        if cfg!(debug_assertions) && !pipe.probe_empty() {
            debug_assert!(false, "a pipe the relay counted as empty holds bytes");
            return false;
        }
        let mut idle = self.lock();
        if idle.len() >= self.max_idle {
            return false;
        }
        idle.push(pipe);
        true
    }

    /// Number of idle pipes currently kept.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Locks the free list of pipes.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        crate::lock(&self.idle)
    }
}

/// A copy buffer borrowed from the pool for one direction's copy phase; goes back on drop,
/// whatever way the phase ended.
struct BufferLease<'p> {
    /// Where the buffer goes back to.
    pool: &'p PipePool,
    /// [`COPY_BUFFER`] bytes.
    buffer: Box<[u8]>,
}

impl<'p> BufferLease<'p> {
    /// A copy buffer from `pool`, going back to it on drop.
    fn take(pool: &'p PipePool) -> Self {
        BufferLease {
            pool,
            buffer: pool.take_buffer(),
        }
    }
}

impl Drop for BufferLease<'_> {
    fn drop(&mut self) {
        self.pool.give_back_buffer(std::mem::take(&mut self.buffer));
    }
}

/// A pipe borrowed from the pool for one relay direction; goes back (or is
/// closed) on drop, whatever way the relay ended.
struct Lease<'p> {
    /// Where the pipe goes back to.
    pool: &'p PipePool,
    /// Always `Some` until drop.
    pipe: Option<Pipe>,
}

impl<'p> Lease<'p> {
    /// Takes a pipe from `pool`.
    fn take(pool: &'p PipePool) -> Result<Self, RelayError> {
        Ok(Lease {
            pool,
            pipe: Some(pool.take()?),
        })
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.give_back(pipe);
        }
    }
}

/// What both directions and the idle watchdog share: the last time any byte
/// moved, and how many directions have finished.
struct Activity {
    /// Reference point for `last_nanos`.
    base: Instant,
    /// Nanoseconds after `base` of the last movement.
    last_nanos: AtomicU64,
    /// Directions that have forwarded their EOF (0, 1 or 2).
    finished: AtomicU8,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_nanos: AtomicU64::new(0),
            finished: AtomicU8::new(0),
        }
    }

    /// Records that bytes moved now.
    fn touch(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`; never completes if the
    /// deadline is beyond what `Instant` can represent.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.base + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
            let Some(deadline) = last.checked_add(idle) else {
                return std::future::pending().await;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One non-blocking splice of up to `len` bytes, as an `io::Result` so it can
/// run inside tokio's `try_io`. `EINTR` is retried.
fn splice_io(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    loop {
        match splice(
            from,
            None,
            to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Moves one direction until the source's EOF has been forwarded, or fails.
/// Adds delivered bytes to `moved` as they go so the caller can report them
/// even when the other direction fails.
async fn pump(way: Way<'_>, pipe: &mut Pipe) -> Result<(), RelayError> {
    let Way {
        src,
        dst,
        direction,
        tally,
        activity,
        ..
    } = way;
    let moved = tally.moved;
    let read_err = |source| way.read_error(source);
    let write_err = |source| way.write_error(source);
    let mut eof = copy_phase(way).await?;
    // The last *in* splice found the pipe out of slots with bytes still queued
    // in the socket (read readiness kept); cleared once the *out* splice frees room.
    let mut slots_full = false;
    loop {
        let mut progressed = false;

        if !eof && !slots_full && pipe.len < pipe.capacity {
            let room = pipe.capacity - pipe.len;
            let pipe_was_empty = pipe.len == 0;
            let (from, to) = (src.as_fd(), pipe.write.as_fd());
            let mut drained = None;
            let result = src.try_io(Interest::READABLE, || {
                match splice_io(from, to, room) {
                    Ok(n) if n > 0 && n < room && pipe_was_empty && n < pipe.slots => {
                        // The socket is empty (module docs): WouldBlock clears readiness.
                        drained = Some(n);
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                    Ok(n) => Ok(In::Moved(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Ambiguous; see the module docs. WouldBlock clears readiness.
                        if !socket_has_bytes(from)? {
                            Err(e)
                        } else if pipe_was_empty {
                            Ok(In::UrgentMark)
                        } else {
                            Ok(In::SlotsFull)
                        }
                    }
                    Err(e) => Err(e),
                }
            });
            let result = match (result, drained) {
                (Err(_), Some(n)) => Ok(In::Moved(n)),
                (result, _) => result,
            };
            match result {
                Ok(In::Moved(0)) => {
                    eof = true;
                    progressed = true;
                }
                Ok(In::Moved(n)) => {
                    pipe.len += n;
                    progressed = true;
                    activity.touch();
                }
                Ok(In::SlotsFull) => slots_full = true,
                Ok(In::UrgentMark) => {
                    // The pipe is empty, so these bytes keep their place in the stream.
                    eof = step_over_urgent_mark(way).await?;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(read_err(e)),
            }
        }

        if pipe.len > 0 {
            let (from, to, len) = (pipe.read.as_fd(), dst.as_fd(), pipe.len);
            // Non-empty pipe: EAGAIN means "socket full", clear readiness.
            match dst.try_io(Interest::WRITABLE, || splice_io(from, to, len)) {
                Ok(n) => {
                    pipe.len -= n;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    tally.spliced.fetch_add(n as u64, Ordering::Relaxed);
                    if n > 0 {
                        progressed = true;
                        slots_full = false;
                    }
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(write_err(e)),
            }
        }

        if eof && pipe.len == 0 {
            // Both directions run in one task, so this count is not raced.
            if activity.finished.fetch_add(1, Ordering::Relaxed) == 0 {
                shutdown(dst.as_raw_fd(), Shutdown::Write)
                    .map_err(|source| RelayError::Shutdown { direction, source })?;
            }
            tracing::trace!(%direction, moved = moved.load(Ordering::Relaxed), "forwarded EOF");
            return Ok(());
        }

        if progressed {
            // Let the other direction and other tasks run on a hot stream.
            tokio::task::consume_budget().await;
            continue;
        }

        if pipe.len == 0 {
            src.readable().await.map_err(read_err)?;
        } else if eof || slots_full || pipe.len >= pipe.capacity {
            dst.writable().await.map_err(write_err)?;
        } else {
            tokio::select! {
                biased;
                ready = dst.writable() => ready.map_err(write_err)?,
                ready = src.readable() => ready.map_err(read_err)?,
            }
        }
    }
}

/// What one *in* splice found.
enum In {
    /// Bytes moved into the pipe (0: the source's EOF).
    Moved(usize),
    /// Bytes queued but the pipe is out of slots: wait for the *out* splice.
    SlotsFull,
    /// Bytes queued, an empty pipe, and still `EAGAIN`: the socket is stopped
    /// at TCP urgent data. splice never passes an urgent mark (it returns
    /// `EAGAIN` there for good); a `recv` does.
    UrgentMark,
}

/// Moves the bytes queued past a TCP urgent mark with one `recv` and writes
/// them out; after that the direction splices again. Like any reader without
/// `SO_OOBINLINE`, the `recv` leaves the urgent byte out, so the destination
/// gets the stream a direct connection would have given it. Returns `true`
/// when the source's EOF was reached.
async fn step_over_urgent_mark(way: Way<'_>) -> Result<bool, RelayError> {
    let mut lease = BufferLease::take(way.pool);
    let buf = &mut lease.buffer[..];
    let n = match recv_io(way.src.as_fd(), buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(source) => return Err(way.read_error(source)),
    };
    tracing::debug!(direction = %way.direction, bytes = n, "stepped over a TCP urgent mark");
    if n == 0 {
        return Ok(true);
    }
    way.activity.touch();
    send_all(way, &buf[..n], false).await?;
    Ok(false)
}

/// Writes all of `buf` to the destination, waiting for room as needed, counting it as copied.
/// `last`: the source's EOF follows these bytes, and the caller shuts the destination's
/// writing down (or closes it) right after: the tail is held back (`MSG_MORE`) so that the
/// FIN leaves in the same segment.
async fn send_all(way: Way<'_>, buf: &[u8], last: bool) -> Result<(), RelayError> {
    let Way {
        dst,
        tally,
        activity,
        ..
    } = way;
    let to = dst.as_fd();
    let mut sent = 0;
    while sent < buf.len() {
        match dst.try_io(Interest::WRITABLE, || send_io(to, &buf[sent..], last)) {
            Ok(k) => {
                sent += k;
                tally.moved.fetch_add(k as u64, Ordering::Relaxed);
                tally.copied.fetch_add(k as u64, Ordering::Relaxed);
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dst.writable()
                    .await
                    .map_err(|source| way.write_error(source))?;
            }
            Err(source) => return Err(way.write_error(source)),
        }
    }
    Ok(())
}

/// Where one direction adds up the bytes it delivers.
#[derive(Clone, Copy)]
struct Tally<'a> {
    /// This relay's total for the direction, both ways of moving.
    moved: &'a AtomicU64,
    /// Shared running total of bytes spliced this way.
    spliced: &'a AtomicU64,
    /// Shared running total of bytes copied this way.
    copied: &'a AtomicU64,
}

/// One direction of a relay: what its pump and the copy and urgent-data
/// steps it takes share.
#[derive(Clone, Copy)]
struct Way<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    direction: Direction,
    tally: Tally<'a>,
    activity: &'a Activity,
    pool: &'a PipePool,
}

impl Way<'_> {
    /// A read failure of this direction, with the bytes it had delivered.
    fn read_error(&self, source: io::Error) -> RelayError {
        RelayError::Read {
            direction: self.direction,
            moved: self.tally.moved.load(Ordering::Relaxed),
            source,
        }
    }

    /// A write failure of this direction, with the bytes it had delivered.
    fn write_error(&self, source: io::Error) -> RelayError {
        RelayError::Write {
            direction: self.direction,
            moved: self.tally.moved.load(Ordering::Relaxed),
            source,
        }
    }
}

/// The copy phase of one direction (module docs): reads into a buffer and
/// writes out what it read. Returns `true` when the source's EOF arrived
/// (not yet forwarded), `false` once a read filled the buffer and all of it
/// was written: the direction splices from then on.
async fn copy_phase(way: Way<'_>) -> Result<bool, RelayError> {
    let Way { src, activity, .. } = way;
    let read_err = |source| way.read_error(source);
    let mut lease = BufferLease::take(way.pool);
    let buf = &mut lease.buffer[..];
    let from = src.as_fd();
    loop {
        // Waits for an edge only when tokio's readiness was cleared (no syscall otherwise).
        let ready = src.ready(Interest::READABLE).await.map_err(read_err)?;
        let mut n = match recv_clearing(src, buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(read_err(e)),
        };
        if n == 0 {
            return Ok(true);
        }
        activity.touch();
        // The source's FIN had arrived when these bytes were read (epoll saw EPOLLRDHUP with
        // them, as when a server answers and closes at once): the read that would find the
        // EOF is made now, before the bytes go out, so that they leave with the FIN in one
        // segment (module docs).
        let mut eof = false;
        if n < COPY_BUFFER && ready.is_read_closed() {
            match recv_io(from, &mut buf[n..]) {
                Ok(0) => eof = true,
                Ok(more) => n += more,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(read_err(e)),
            }
        }
        send_all(way, &buf[..n], eof).await?;
        if eof {
            return Ok(true);
        }
        if n == COPY_BUFFER {
            return Ok(false);
        }
    }
}

/// One `recv` into `buf` through tokio's read readiness. A short read (fewer bytes than `buf`
/// holds) emptied the socket, so it clears the readiness, as tokio's own reads do: that saves
/// the `EAGAIN` read that would follow every message. `WouldBlock`: nothing was queued.
pub(crate) fn recv_clearing(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let (from, len) = (src.as_fd(), buf.len());
    let mut drained = None;
    let result = src.try_io(Interest::READABLE, || match recv_io(from, buf) {
        Ok(n) if n > 0 && n < len => {
            // WouldBlock clears readiness.
            drained = Some(n);
            Err(io::ErrorKind::WouldBlock.into())
        }
        other => other,
    });
    match drained {
        Some(n) => Ok(n),
        None => result,
    }
}

/// One non-blocking `recv` into `buf`; `EINTR` is retried.
pub(crate) fn recv_io(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match recv(socket.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// One non-blocking `send` of `buf` (no `SIGPIPE`: a closed peer is `EPIPE`);
/// `EINTR` is retried. `more`: `MSG_MORE`, the tail waits for what follows (the FIN).
fn send_io(socket: BorrowedFd<'_>, buf: &[u8], more: bool) -> io::Result<usize> {
    let mut flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    if more {
        // nix names no MSG_MORE.
        flags |= MsgFlags::from_bits_retain(nix::libc::MSG_MORE);
    }
    loop {
        match send(socket.as_raw_fd(), buf, flags) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Whether bytes (or a FIN) are queued in the socket's receive queue: a
/// one-byte `MSG_PEEK`, consuming nothing.
fn socket_has_bytes(socket: BorrowedFd<'_>) -> io::Result<bool> {
    let mut probe = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    loop {
        match recv(socket.as_raw_fd(), &mut probe, flags) {
            // 0 is a pending FIN: the next splice reports it.
            Ok(_) => return Ok(true),
            Err(Errno::EAGAIN) => return Ok(false),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
}

/// Running byte totals shared by many relays (e.g. a listener's counters),
/// updated as bytes move rather than when a connection ends, so long-lived
/// streams show up in metrics while they flow.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Bytes delivered client → backend.
    pub client_to_backend: AtomicU64,
    /// Bytes delivered backend → client.
    pub backend_to_client: AtomicU64,
}

/// Moves bytes both ways between two connected TCP streams, copying small
/// messages and splicing bulk through one pipe per direction (module docs),
/// until both directions are closed.
///
/// Propagates half-close: when one side reads EOF, the other side gets
/// `shutdown(Write)` once that direction's pipe drained, and the other
/// direction keeps flowing. If no byte moves either way for `idle`, both are
/// closed ([`RelayError::Idle`]); an error on either side (e.g. a reset)
/// closes both and is returned. Both sockets are closed when this returns.
/// Returns the bytes moved each way.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    pool: &PipePool,
    idle: Duration,
) -> Result<RelayStats, RelayError> {
    let (spliced, copied) = (RelayCounters::default(), RelayCounters::default());
    relay_counted(client, backend, pool, idle, &spliced, &copied).await
}

/// [`relay`], also adding every delivered byte to `spliced` or `copied`, by
/// how it moved, as it moves.
pub async fn relay_counted(
    client: TcpStream,
    backend: TcpStream,
    pool: &PipePool,
    idle: Duration,
    spliced: &RelayCounters,
    copied: &RelayCounters,
) -> Result<RelayStats, RelayError> {
    let mut up = Lease::take(pool)?;
    let mut down = Lease::take(pool)?;
    let up_moved = AtomicU64::new(0);
    let down_moved = AtomicU64::new(0);
    let activity = Activity::new();

    let outcome = {
        let (Some(up_pipe), Some(down_pipe)) = (up.pipe.as_mut(), down.pipe.as_mut()) else {
            // A fresh lease always holds its pipe; report rather than panic if that ever breaks.
            return Err(RelayError::Pipe {
                source: Errno::EBADF,
            });
        };
        let up_way = Way {
            src: &client,
            dst: &backend,
            direction: Direction::ClientToBackend,
            tally: Tally {
                moved: &up_moved,
                spliced: &spliced.client_to_backend,
                copied: &copied.client_to_backend,
            },
            activity: &activity,
            pool,
        };
        let down_way = Way {
            src: &backend,
            dst: &client,
            direction: Direction::BackendToClient,
            tally: Tally {
                moved: &down_moved,
                spliced: &spliced.backend_to_client,
                copied: &copied.backend_to_client,
            },
            activity: &activity,
            pool,
        };
        let both = async { tokio::try_join!(pump(up_way, up_pipe), pump(down_way, down_pipe)) };
        tokio::select! {
            result = both => result.map(|_| true),
            () = activity.idle_for(idle) => Ok(false),
        }
    };

    let stats = RelayStats {
        client_to_backend: up_moved.load(Ordering::Relaxed),
        backend_to_client: down_moved.load(Ordering::Relaxed),
    };
    // Sockets close when `client`/`backend` drop at return; pipes go back
    // to the pool (or are closed if they still hold bytes) via the leases.
    match outcome {
        Ok(true) => {
            tracing::debug!(?stats, "relay finished");
            Ok(stats)
        }
        Ok(false) => {
            tracing::debug!(?stats, ?idle, "relay idle; closing both sides");
            Err(RelayError::Idle { idle, stats })
        }
        Err(error) => {
            tracing::debug!(%error, ?stats, "relay failed; closing both sides");
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_went_away_is_told_apart_from_a_relay_fault() {
        let io_err = |kind: io::ErrorKind| RelayError::Write {
            direction: Direction::BackendToClient,
            moved: 0,
            source: kind.into(),
        };
        let shutdown = |e: Errno| RelayError::Shutdown {
            direction: Direction::BackendToClient,
            source: e,
        };
        assert!(io_err(io::ErrorKind::ConnectionReset).is_peer_gone());
        assert!(io_err(io::ErrorKind::BrokenPipe).is_peer_gone());
        assert!(io_err(io::ErrorKind::NotConnected).is_peer_gone());
        assert!(!io_err(io::ErrorKind::PermissionDenied).is_peer_gone());
        assert!(shutdown(Errno::ENOTCONN).is_peer_gone());
        assert!(!shutdown(Errno::EBADF).is_peer_gone());
        assert!(
            !RelayError::Pipe {
                source: Errno::EMFILE
            }
            .is_peer_gone()
        );
    }

    #[test]
    fn pipe_with_leftover_data_is_not_pooled() {
        let pool = PipePool::new(4, 1 << 20);
        let clean = pool.take().unwrap();
        assert!(clean.capacity() >= 4096);
        // The relay's count says the pipe holds bytes: closed, not pooled.
        let mut dirty = pool.take().unwrap();
        nix::unistd::write(dirty.write_end(), b"lef").unwrap();
        dirty.len = 3;
        assert!(
            !pool.give_back(dirty),
            "a pipe holding bytes must be closed"
        );
        assert_eq!(pool.idle_count(), 0);
        assert!(pool.give_back(clean));
        assert_eq!(pool.idle_count(), 1);
    }

    /// A counting bug (bytes in a pipe counted as empty) fails loudly in
    /// debug builds, where the tests run.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "counted as empty holds bytes")]
    fn a_miscounted_pipe_fails_debug_builds() {
        let pool = PipePool::new(4, 1 << 20);
        let miscounted = pool.take().unwrap();
        nix::unistd::write(miscounted.write_end(), b"leftover").unwrap();
        pool.give_back(miscounted);
    }

    #[test]
    fn copy_buffers_are_reused_and_bounded() {
        let pool = PipePool::new(1, 0);
        let mut a = pool.take_buffer();
        assert_eq!(a.len(), COPY_BUFFER);
        a[0] = 7;
        let b = pool.take_buffer();
        pool.give_back_buffer(a);
        pool.give_back_buffer(b);
        assert_eq!(crate::lock(&pool.buffers).len(), 1, "kept beyond the bound");
        // The kept buffer is handed out again as it is; the relay only sends what it reads.
        let again = pool.take_buffer();
        assert_eq!((again.len(), again[0]), (COPY_BUFFER, 7));
    }

    #[test]
    fn pool_bounds_idle_pipes() {
        let pool = PipePool::new(1, 0);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(pool.give_back(a));
        assert!(!pool.give_back(b));
        assert_eq!(pool.idle_count(), 1);
    }
}
