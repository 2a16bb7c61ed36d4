//! `spaced lb`: the balancer alone, with backends from flags, for users who want only it and for benchmarks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spaced_lb::backend::{BackendSpec, Policy};
use spaced_lb::balancer::{
    Balancer, FDS_PER_CONN, HealthConfig, LbConfig, bind_listener, conns_within_fd_limit,
};

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
    /// Worker threads (1 = a single-threaded event loop, like one HAProxy thread).
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
}

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

/// Serves until `stop` completes, then drains. Errors name what failed (bind, metrics).
pub async fn run(
    args: LbArgs,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), LbRunError> {
    let listener = bind_listener(args.listen, args.freebind, 4096).map_err(LbRunError::Bind)?;
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
    if let Some(addr) = args.metrics {
        let mut rx = stop_rx.clone();
        let state: Arc<dyn crate::ops::http::HttpState> = Arc::new(LbHttp(balancer.clone()));
        crate::ops::http::serve(addr, state, async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .map_err(LbRunError::Metrics)?;
    }
    tracing::info!(listen = %args.listen, backends = args.backends.len(), policy = %args.policy, threads = args.threads, "spaced lb started");
    balancer.serve(listener, stop).await;
    let _ = stop_tx.send(true);
    Ok(())
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
