//! `spaced lb`: the balancer alone, with backends from flags, for users who want only it and for benchmarks.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use spaced_lb::backend::{BackendSpec, Policy};
use spaced_lb::balancer::{
    Balancer, FDS_PER_CONN, HealthConfig, LbConfig, bind_listeners, conns_within_fd_limit,
};
use tokio::net::TcpListener;

/// Task polls between two looks at the sockets (tokio's default is 61). A
/// balancer's tasks are short (one splice or copy each), so looking more
/// often takes new events sooner: measured with `spaced lb --threads 1`
/// (wrk, `Connection: close`, 6 interleaved rounds): 9,632 connections/s at
/// 16 against 9,421 at 61, and no loss on iperf3 streams.
pub const EVENT_INTERVAL: u32 = 16;

/// A single-threaded runtime as each of the balancer's threads runs one.
pub fn thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .event_interval(EVENT_INTERVAL)
        .on_thread_park(super::busy_poll::before_park)
        .enable_all()
        .build()
}

/// Open files kept back from connections for the listener, `/metrics`, logs
/// and the runtime (one more per backend, for its health checks).
const RESERVED_FDS: u64 = 64;

/// Flags of `spaced lb`.
#[derive(Debug, Clone, clap::Args)]
pub struct LbArgs {
    /// Address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// A backend as [NAME=]IP:PORT; NAME is its session route (JSESSIONID suffix). Repeat for more.
    #[arg(long = "backend", required = true)]
    pub backends: Vec<BackendSpec>,
    /// Balancing policy: rr, leastconn, sticky (JSESSIONID route, else rr) or source (Maglev).
    #[arg(long, default_value = "rr")]
    pub policy: Policy,
    /// Threads, each with its own event loop and its own listening socket on the port
    /// (SO_REUSEPORT: the kernel spreads new connections over them), like HAProxy's
    /// `nbthread`; 1 = a single event loop, like one HAProxy thread.
    #[arg(long, default_value_t = default_threads())]
    pub threads: usize,
    /// Connections open at once; the excess is refused at accept.
    #[arg(long, default_value_t = 20_000)]
    pub max_conns: u64,
    /// Backend connect timeout in milliseconds (then the next backend is tried).
    #[arg(long, default_value_t = 3_000)]
    pub connect_timeout_ms: u64,
    /// Other backends tried when a connect fails.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Close a connection after this many seconds without a byte either way.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_s: u64,
    /// Longest wait (ms) for the first request when looking for a session route.
    #[arg(long, default_value_t = 1_000)]
    pub peek_timeout_ms: u64,
    /// Most bytes peeked for a session route.
    #[arg(long, default_value_t = spaced_lb::peek::DEFAULT_PEEK_BYTES)]
    pub peek_bytes: usize,
    /// Send a PROXY protocol v2 header to backends.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Requested relay pipe size in bytes (F_SETPIPE_SZ).
    #[arg(long, default_value_t = 1 << 20)]
    pub pipe_size: usize,
    /// Health-check interval in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub health_interval_ms: u64,
    /// Successful checks that bring a backend up.
    #[arg(long, default_value_t = 2)]
    pub rise: u32,
    /// Failed checks that take a backend down.
    #[arg(long, default_value_t = 3)]
    pub fall: u32,
    /// Connects in a row that fail on live traffic and take a backend down before its next
    /// check (passive health, HAProxy's `observe layer4`); 0 = only the checks decide.
    #[arg(long, default_value_t = spaced_lb::balancer::DEFAULT_ERROR_LIMIT)]
    pub error_limit: u32,
    /// Trust every backend: no health checks.
    #[arg(long)]
    pub no_health: bool,
    /// On SIGTERM/SIGINT, open connections get this many seconds to finish.
    #[arg(long, default_value_t = 10)]
    pub drain_grace_s: u64,
    /// Bind even if the address is not (yet) on this host (IP_FREEBIND).
    #[arg(long)]
    pub freebind: bool,
    /// Serve /metrics and /healthz on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Microseconds a thread that ran out of work polls its sockets before it sleeps: a
    /// connection arriving meanwhile is taken without a wake-up. Bounded, unlike HAProxy's
    /// `busy-polling`: an idle balancer sleeps as before. 0 = sleep at once.
    #[arg(long, default_value_t = DEFAULT_BUSY_POLL_US)]
    pub busy_poll_us: u64,
}

/// `--busy-poll-us` when not given.
pub const DEFAULT_BUSY_POLL_US: u64 = 50;

/// The longest `--busy-poll-us`: beyond it a thread would hold its core for the polls alone.
const MAX_BUSY_POLL_US: u64 = 1_000;

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A flag value clap accepted but the balancer cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct FlagError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong with its value.
    pub problem: String,
}

fn bad_flag(flag: &'static str, problem: impl Into<String>) -> Result<(), FlagError> {
    Err(FlagError {
        flag,
        problem: problem.into(),
    })
}

/// Why standalone `spaced lb` could not serve.
#[derive(Debug, thiserror::Error)]
pub enum LbRunError {
    /// The listening socket could not be bound.
    #[error("{0}")]
    Bind(std::io::Error),
    /// The open-files limit leaves no room for a single connection.
    #[error(
        "the open-files limit ({limit}) leaves no room for connections: the balancer keeps \
         {reserved} for itself and needs {FDS_PER_CONN} per connection (raise it with ulimit -n \
         or LimitNOFILE=)"
    )]
    NoDescriptors {
        /// The limit in force.
        limit: u64,
        /// Descriptors the balancer keeps for itself.
        reserved: u64,
    },
    /// The metrics endpoint could not be bound.
    #[error("{0}")]
    Metrics(std::io::Error),
    /// A balancer thread or its runtime could not be started.
    #[error("cannot start balancer thread {thread}: {error}")]
    Thread {
        /// Which (1 is the second; 0 is the main thread).
        thread: usize,
        /// Why.
        error: std::io::Error,
    },
}

impl LbArgs {
    /// Checks what clap cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), FlagError> {
        if self.threads == 0 {
            return bad_flag("--threads", "must be at least 1");
        }
        if self.max_conns == 0 {
            return bad_flag("--max-conns", "must be at least 1");
        }
        for (flag, v) in [
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--idle-timeout-s", self.idle_timeout_s),
            ("--peek-timeout-ms", self.peek_timeout_ms),
            ("--health-interval-ms", self.health_interval_ms),
        ] {
            if v == 0 {
                return bad_flag(flag, "must be greater than 0");
            }
        }
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            return bad_flag(
                "--busy-poll-us",
                format!("at most {MAX_BUSY_POLL_US} (a poll that long holds a core for itself)"),
            );
        }
        if self.rise == 0 || self.fall == 0 {
            return bad_flag("--rise/--fall", "must be at least 1");
        }
        let mut names = std::collections::BTreeSet::new();
        for b in &self.backends {
            if !names.insert(&b.name) {
                return bad_flag("--backend", format!("name {:?} given twice", b.name));
            }
        }
        Ok(())
    }

    /// The balancer settings the flags describe.
    pub fn config(&self) -> LbConfig {
        LbConfig {
            policy: self.policy,
            max_conns: self.max_conns,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            retries: self.retries,
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            peek_bytes: self.peek_bytes.max(1),
            peek_timeout: Duration::from_millis(self.peek_timeout_ms),
            proxy_protocol: self.proxy_protocol,
            pipe_size: self.pipe_size,
            health: (!self.no_health).then(|| HealthConfig {
                error_limit: self.error_limit,
                ..HealthConfig::every(
                    Duration::from_millis(self.health_interval_ms),
                    self.rise,
                    self.fall,
                )
            }),
            drain_grace: Duration::from_secs(self.drain_grace_s),
        }
    }
}

/// Serves until `stop` completes, then drains. Errors name what failed (bind, metrics, a
/// thread). Runs on a single-threaded runtime (health checks, metrics and the first listener's
/// loop); `--threads N` adds N-1 threads, each with a runtime and a listener of its own.
pub async fn run(
    args: LbArgs,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), LbRunError> {
    let listeners =
        bind_listeners(args.listen, args.freebind, 4096, args.threads).map_err(LbRunError::Bind)?;
    let mut config = args.config();
    match crate::raise_fd_limit() {
        Ok(limit) => {
            let reserved = RESERVED_FDS + args.backends.len() as u64;
            let fit = conns_within_fd_limit(limit, reserved);
            if fit == 0 {
                return Err(LbRunError::NoDescriptors { limit, reserved });
            }
            config.cap_max_conns(
                fit,
                "--max-conns",
                &format!("what the open-files limit ({limit}) allows"),
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let balancer = Balancer::new(args.listen.to_string(), config);
    balancer.set_backends(&args.backends);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(addr) = args.metrics {
        let state: Arc<dyn crate::ops::http::HttpState> = Arc::new(LbHttp(balancer.clone()));
        crate::ops::http::serve(addr, state, stopped(stop_rx.clone()))
            .await
            .map_err(LbRunError::Metrics)?;
    }
    let busy_poll = Duration::from_micros(args.busy_poll_us);
    let mut listeners = listeners.into_iter();
    let first = listeners
        .next()
        .map(|l| register(l, busy_poll, &balancer))
        .transpose()
        .map_err(|error| LbRunError::Thread { thread: 0, error })?
        .ok_or(LbRunError::Thread {
            thread: 0,
            error: std::io::Error::other("no listener"),
        })?;
    let mut threads = Vec::new();
    for (i, listener) in listeners.enumerate() {
        let thread = i + 1;
        let balancer = balancer.clone();
        let stop = stopped(stop_rx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("lb-{thread}"))
            .spawn(move || -> std::io::Result<()> {
                thread_runtime()?.block_on(async move {
                    balancer
                        .serve(register(listener, busy_poll, &balancer)?, stop)
                        .await;
                    Ok(())
                })
            });
        match spawned {
            Ok(handle) => threads.push((thread, handle)),
            Err(error) => {
                let _ = stop_tx.send(true);
                return Err(LbRunError::Thread { thread, error });
            }
        }
    }
    tracing::info!(listen = %args.listen, backends = args.backends.len(), policy = %args.policy, threads = args.threads, "spaced lb started");
    // Every loop stops accepting at once; each then drains its own connections.
    let stop_all = async move {
        stop.await;
        let _ = stop_tx.send(true);
    };
    balancer.serve(first, stop_all).await;
    let mut failed = None;
    for (thread, handle) in threads {
        let joined = tokio::task::spawn_blocking(move || handle.join()).await;
        let error = match joined {
            Ok(Ok(Ok(()))) => continue,
            Ok(Ok(Err(error))) => error,
            _ => std::io::Error::other("the thread panicked"),
        };
        tracing::error!(thread, %error, "balancer thread failed");
        failed.get_or_insert(LbRunError::Thread { thread, error });
    }
    failed.map_or(Ok(()), Err)
}

/// `listener` registered with this thread's runtime, whose busy poll it arms (a warning if
/// that cannot be done: the thread then sleeps at once, as with `--busy-poll-us 0`).
fn register(
    listener: std::net::TcpListener,
    busy_poll: Duration,
    balancer: &Arc<Balancer>,
) -> std::io::Result<TcpListener> {
    let listener = TcpListener::from_std(listener)?;
    let counted = balancer.clone();
    let accepted = Box::new(move || {
        counted
            .stats()
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    if let Err(error) = super::busy_poll::attach(listener.as_raw_fd(), busy_poll, accepted) {
        tracing::warn!(%error, "cannot find the balancer runtime's epoll descriptor: --busy-poll-us has no effect");
    }
    Ok(listener)
}

/// `/metrics` and `/healthz` of the standalone balancer.
struct LbHttp(Arc<Balancer>);

impl crate::ops::http::HttpState for LbHttp {
    fn metrics_text(&self) -> String {
        let mut text = String::new();
        spaced_lb::stats::render_prometheus(&[self.0.rendered()], &mut text);
        text
    }

    fn health(&self) -> (bool, String) {
        let backends = self.0.backends().snapshot();
        let up = backends.iter().filter(|b| b.is_up()).count();
        (up > 0, format!("{up} of {} backends up", backends.len()))
    }
}
