//! `spaced`: run a fabric node, or a self-contained demo cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::IsTerminal;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use spaced_node::node::Node;
use spaced_node::ops::config::NodeConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

#[derive(Debug, Parser)]
#[command(name = "spaced", about = "spaced fabric daemon")]
struct Cli {
    /// Log line format: `text` (coloured only on a terminal) or `json` (one object per
    /// line, for journald or a log shipper).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SPACED_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log filter (`info`, `debug`, `warn,spaced_node::placement=debug`); overrides
    /// `SPACED_LOG` and the config's `log_level`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node.
    Run {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Initialise a one-node cluster (only on an empty data dir).
        #[arg(long)]
        bootstrap: bool,
    },
    /// Check a node's config and host as `run` would (keys, certificate, data dir, ports,
    /// VIP interfaces, subnets and capabilities), without starting: exit 0 if it would
    /// start, 2 with the same message as `run` if not.
    Check {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Seed this node's empty data dir from a snapshot (`spacectl snapshot save`): started
    /// afterwards without `--bootstrap`, it leads a new one-node cluster holding the
    /// snapshot's VIPs, singletons, services, devices and revocations, which the other nodes
    /// join with empty data dirs (`spacectl node add`).
    Restore {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The snapshot file.
        #[arg(long)]
        snapshot: PathBuf,
    },
    /// Print a shell completion script (`source <(spaced completion bash)`).
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: spaced_node::Shell,
    },
    /// Print the man page (roff): `spaced man > spaced.1`.
    Man,
    /// Run only the TCP load balancer, with backends from flags.
    Lb(spaced_node::lb::standalone::LbArgs),
    /// Run a disaster-recovery witness: both sites of a pair reach it, the active site
    /// holds its role there as a lease, a standby that lost its peer claims it.
    Witness {
        /// UDP address to serve on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The witness's certificate (issued by either site's CA: `spacectl pki issue`).
        #[arg(long)]
        cert: PathBuf,
        /// Its key.
        #[arg(long)]
        key: PathBuf,
        /// A site's CA certificate; give both sites' (the first must have issued `--cert`).
        #[arg(long, required = true)]
        ca: Vec<PathBuf>,
        /// After starting, grant nothing for this long (ms): at least the sites'
        /// `witness_lease_ms`, since a restarted witness has forgotten the leases it granted.
        #[arg(long, default_value_t = 10_000)]
        grace_ms: u64,
        /// Keep the tickets in this file (written on every grant): restarted on the same boot,
        /// the witness goes on from them without the grace (after a reboot it keeps the epochs
        /// and waits the grace).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
    /// Internal: the fence guard child of `spaced run` (removes VIPs if spaced dies or stalls).
    #[command(hide = true)]
    Guard,
    /// Start a 3-node cluster on 127.0.0.1, register devices, kill the leader, show the failover.
    Demo {
        /// Keep the temp dir (configs, PKI, data, logs) afterwards.
        #[arg(long)]
        keep: bool,
        /// Show disaster recovery instead: two sites and a witness, the active site killed,
        /// the standby taking over by itself, the old site coming back standby.
        #[arg(long)]
        dr: bool,
    },
}

/// What a one-shot command on a node's config (`check`, `restore`) starts with: the config
/// (exit 2 if it does not load), logging at `warn` unless told otherwise, and a runtime.
fn one_shot(
    cli: &Cli,
    config: &std::path::Path,
) -> Result<(NodeConfig, tokio::runtime::Runtime), ExitCode> {
    let cfg = NodeConfig::load(config).map_err(|e| {
        eprintln!("spaced: {e}");
        ExitCode::from(2)
    })?;
    init_tracing_or_exit(cli, cfg.log_level.as_deref(), "warn")?;
    Ok((cfg, runtime()?))
}

/// Changes the log filter of a running process (on SIGHUP, from the config's `log_level`).
type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Where the log filter came from, which decides whether a reload may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterSource {
    /// `--log-level` or `SPACED_LOG`: fixed for the process.
    Operator,
    /// The config's `log_level`, or the default: a reload applies the config's.
    Config,
}

/// Installs the logger: the filter from `--log-level`, else `SPACED_LOG`, else `config`
/// (the config's `log_level`), else `default`. `Err` names a bad filter.
fn init_tracing(
    cli: &Cli,
    config: Option<&str>,
    default: &str,
) -> Result<(LogHandle, FilterSource), BadFilter> {
    let (text, source, what) = if let Some(l) = &cli.log_level {
        (l.clone(), FilterSource::Operator, "--log-level")
    } else if let Ok(l) = std::env::var("SPACED_LOG") {
        (l, FilterSource::Operator, "SPACED_LOG")
    } else if let Some(l) = config {
        (l.to_string(), FilterSource::Config, "log_level")
    } else {
        (
            default.to_string(),
            FilterSource::Config,
            "the default filter",
        )
    };
    let filter = EnvFilter::try_new(&text).map_err(|source| BadFilter {
        from: what,
        text: text.clone(),
        source,
    })?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = spaced_node::LOG_FORMAT.set(match cli.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    });
    let _ = match cli.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    Ok((handle, source))
}

/// A log filter that does not parse: where it came from, its text, and the parser's word.
#[derive(Debug, thiserror::Error)]
#[error("{from} {text:?}: {source}")]
struct BadFilter {
    from: &'static str,
    text: String,
    source: tracing_subscriber::filter::ParseError,
}

/// `init_tracing`, or the exit code after saying why not.
fn init_tracing_or_exit(
    cli: &Cli,
    config: Option<&str>,
    default: &str,
) -> Result<(LogHandle, FilterSource), ExitCode> {
    init_tracing(cli, config, default).map_err(|e| {
        eprintln!("spaced: bad log filter: {e}");
        ExitCode::from(2)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .event_interval(spaced_node::lb::standalone::EVENT_INTERVAL)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("spaced: cannot start the async runtime: {e}");
            ExitCode::from(1)
        })
}

const RUN_DEFAULT_FILTER: &str = "info,openraft=warn,openraft::core::heartbeat=error";

fn main() -> ExitCode {
    let cli: Cli = spaced_node::parse_args();
    match &cli.command {
        Cmd::Run { config, bootstrap } => {
            let cfg = match NodeConfig::load(config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("spaced: {e}");
                    return ExitCode::from(2);
                }
            };
            let (log, source) =
                match init_tracing_or_exit(&cli, cfg.log_level.as_deref(), RUN_DEFAULT_FILTER) {
                    Ok(l) => l,
                    Err(c) => return c,
                };
            tracing::info!(version = spaced_node::VERSION, "spaced starting");
            // Before the runtime starts its threads, so that they all inherit it.
            spaced_node::ops::priority::set_for_daemon(cfg.nice);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            };
            let bootstrap = *bootstrap;
            let path = config.clone();
            rt.block_on(async move {
                // Listen for SIGTERM and SIGHUP before starting: one that arrives during
                // start-up then stops the node cleanly (or is taken as a reload) instead of
                // killing the process.
                let stop = stop_signal();
                let mut hangup =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                        Ok(h) => h,
                        Err(e) => {
                            eprintln!("spaced: cannot listen for SIGHUP: {e}");
                            return ExitCode::from(1);
                        }
                    };
                let node = match Node::start(cfg, bootstrap).await {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("spaced: {e}");
                        return ExitCode::from(if e.bad_input() { 2 } else { 1 });
                    }
                };
                // systemd's Type=notify: ready once the node is (see `Node::ready`), watchdog
                // pings from this loop while Raft runs, stopping and reloading said.
                let notifier = spaced_node::ops::sdnotify::Notifier::from_env();
                let watchdog = spaced_node::ops::sdnotify::watchdog_every();
                let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
                tokio::pin!(stop);
                let mut reloads = node.reload_requests();
                {
                    let ready = node.ready();
                    tokio::pin!(ready);
                    let mut readied = false;
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            _ = hangup.recv() => {
                                notifier.notify("RELOADING=1");
                                tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
                                let _ = reload(&node, &path, &log, source);
                                notifier.notify("READY=1");
                            }
                            Some(ask) = async { reloads.as_mut()?.recv().await }, if reloads.is_some() => {
                                notifier.notify("RELOADING=1");
                                tracing::info!(config = %path.display(), "spacectl node reload: reloading the config");
                                let _ = ask.send(reload(&node, &path, &log, source));
                                notifier.notify("READY=1");
                            }
                            status = &mut ready, if !readied => {
                                readied = true;
                                tracing::info!(%status, "ready");
                                notifier.notify(&format!("READY=1\nSTATUS={status}"));
                            }
                            _ = ping.tick(), if watchdog.is_some() => {
                                if node.raft_running() {
                                    notifier.notify("WATCHDOG=1");
                                }
                            }
                        }
                    }
                }
                tracing::info!("shutting down");
                notifier.notify("STOPPING=1\nSTATUS=handing over and stopping");
                node.shutdown().await;
                ExitCode::SUCCESS
            })
        }
        Cmd::Check { config } => {
            let (cfg, rt) = match one_shot(&cli, config) {
                Ok(loaded) => loaded,
                Err(c) => return c,
            };
            match rt.block_on(spaced_node::node::check(&cfg)) {
                Ok(done) => {
                    for line in done {
                        println!("ok  {line}");
                    }
                    println!("{}: config OK", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("spaced: {e}");
                    ExitCode::from(if e.bad_input() { 2 } else { 1 })
                }
            }
        }
        Cmd::Restore { config, snapshot } => {
            let (cfg, rt) = match one_shot(&cli, config) {
                Ok(loaded) => loaded,
                Err(c) => return c,
            };
            match rt.block_on(spaced_node::node::restore(&cfg, snapshot)) {
                Ok(done) => {
                    println!("{done}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("spaced: {e}");
                    ExitCode::from(if e.bad_input() { 2 } else { 1 })
                }
            }
        }
        Cmd::Witness {
            listen,
            cert,
            key,
            ca,
            grace_ms,
            state,
        } => {
            if let Err(c) = init_tracing_or_exit(&cli, None, "info") {
                return c;
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            };
            let paths = spaced_raft::pki::TlsPaths {
                ca: ca[0].clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            let cas: Vec<&std::path::Path> = ca.iter().map(|p| p.as_path()).collect();
            let material = match spaced_raft::pki::TlsMaterial::load(&paths)
                .and_then(|m| m.trusting_all(&cas))
            {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("spaced witness: {e}");
                    return ExitCode::from(2);
                }
            };
            let grace = std::time::Duration::from_millis(*grace_ms);
            match rt.block_on(spaced_replication::witness::run(
                *listen,
                &material,
                grace,
                state.clone(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("spaced witness: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Completion { shell } => {
            match spaced_node::write_completion::<Cli>(*shell, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("spaced: write the completion script: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Man => match spaced_node::write_man::<Cli>(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spaced: write the man page: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Lb(args) => {
            if let Err(c) = init_tracing_or_exit(&cli, None, "info") {
                return c;
            }
            let args = args.clone();
            if let Err(e) = args.validate() {
                eprintln!("spaced lb: {e}");
                return ExitCode::from(2);
            }
            let built = spaced_node::lb::standalone::thread_runtime();
            let rt = match built {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("spaced lb: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(spaced_node::lb::standalone::run(args, wait_for_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("spaced lb: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Guard => {
            if let Err(c) = init_tracing_or_exit(&cli, None, "info") {
                return c;
            }
            // Signals meant for spaced (a terminal's ^C reaches the whole group) must not stop
            // the guard before its parent: it ends when its stdin closes.
            // SAFETY: setting SIG_IGN installs no handler code; done before any thread starts.
            unsafe {
                let _ = nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGINT,
                    nix::sys::signal::SigHandler::SigIgn,
                );
                let _ = nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::SigHandler::SigIgn,
                );
            }
            spaced_node::takeover::guard::run_in_real_time();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("spaced guard: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(spaced_node::takeover::guard::run_guard(
                spaced_node::node::report_fenced,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("spaced guard: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Demo { keep, dr } => {
            let (keep, dr) = (*keep, *dr);
            if let Err(c) = init_tracing_or_exit(&cli, None, "warn,openraft=error") {
                return c;
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            };
            let demo = async move {
                if dr {
                    spaced_node::demo_dr::run(keep).await
                } else {
                    spaced_node::demo::run(keep).await
                }
            };
            match rt.block_on(demo) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("spaced demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// SIGHUP and `spacectl node reload`: reads the config file again and applies what can change
/// while running (the log level, the certificate, `[lb]`); names each changed key that needs a
/// restart. Returns the report's lines (each also logged), or why nothing was applied: a config
/// that does not load changes nothing, and a reload never stops the node.
fn reload(
    node: &Node,
    path: &std::path::Path,
    log: &LogHandle,
    source: FilterSource,
) -> Result<Vec<String>, String> {
    let cfg = match NodeConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the config does not load; nothing changed");
            return Err(format!(
                "reload refused: the config does not load; nothing changed: {e}"
            ));
        }
    };
    let mut lines = Vec::new();
    if source == FilterSource::Config {
        let text = cfg.log_level.as_deref().unwrap_or(RUN_DEFAULT_FILTER);
        match EnvFilter::try_new(text)
            .map_err(|e| e.to_string())
            .and_then(|f| log.reload(f).map_err(|e| e.to_string()))
        {
            Ok(()) => lines.push(format!("log level applied ({text})")),
            Err(e) => lines.push(format!("log level not applied: {e}")),
        }
    } else {
        lines.push("log level kept (set by --log-level or SPACED_LOG)".to_string());
    }
    match node.reload(&cfg) {
        Ok(report) => lines.extend(report),
        Err(e) => {
            tracing::error!(error = %e, "reload: not applied; the node keeps running as it was");
            return Err(format!(
                "reload not applied; the node keeps running as it was: {e}"
            ));
        }
    }
    for line in &lines {
        tracing::info!("reload: {line}");
    }
    Ok(lines)
}

async fn wait_for_signal() {
    stop_signal().await
}

/// Registers for SIGTERM and SIGINT now and returns a future that completes on the first.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let registered = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match registered {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
