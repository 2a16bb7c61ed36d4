//! What every spacectl command shares: the node to talk to and the admin certificate to use
//! (the global flags), the error a command returns, the calls that connect and send, and the
//! imports the command files use.

pub(super) use std::collections::{BTreeMap, BTreeSet, HashSet};
pub(super) use std::io::IsTerminal;
pub(super) use std::path::{Path, PathBuf};

pub(super) use clap::Subcommand;
pub(super) use serde_json::json;
pub(super) use spaced_fabric::{
    AdminState, DeviceMode, NewDevice, check_device_addr, check_device_id,
};

pub(super) use crate::admin::client::{AdminClient, AdminCredentials, ClientError, unexpected};
pub(super) use crate::admin::{AdminReply, AdminRequest, DeviceRow, RebalanceReport, StatusReport};

/// The global flags: which node to talk to, as which admin.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Node to talk to (`host:port` of its QUIC listener); any node works.
    #[arg(long, global = true, env = "SPACED_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Directory with `ca.pem` and an `admin-<name>.pem`/`.key` pair.
    #[arg(long, global = true, env = "SPACED_PKI")]
    pub pki: Option<PathBuf>,
    /// Which admin certificate in the PKI directory to use (default: the only or first one).
    /// (Not `--admin`: that is `pki issue`'s flag for an admin certificate.)
    #[arg(
        long = "admin-name",
        id = "admin_name",
        global = true,
        env = "SPACED_ADMIN"
    )]
    pub admin: Option<String>,
    /// Mutations: print what would change (read from the cluster now) and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Output of the commands that print data: `table`, `json` or `yaml` (`--json` is `-o json`).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Give up on the whole command after SECONDS (etcdctl's `--command-timeout`); a change
    /// cut off this way may or may not have been made. Default: each call waits up to 60 s.
    #[arg(
        long,
        global = true,
        env = "SPACED_COMMAND_TIMEOUT",
        value_name = "SECONDS",
        value_parser = parse_command_timeout
    )]
    pub command_timeout: Option<std::time::Duration>,
}

/// `secs` as a duration if it is a number of seconds above 0 and at most a day (the bounds of
/// `--watch` and `--command-timeout`).
fn up_to_a_day(secs: f64) -> Option<std::time::Duration> {
    (secs.is_finite() && secs > 0.0 && secs <= 86_400.0)
        .then(|| std::time::Duration::from_secs_f64(secs))
}

/// `--command-timeout`: seconds, more than 0 and at most a day.
pub fn parse_command_timeout(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    up_to_a_day(secs).ok_or_else(|| format!("{s} s: must be more than 0 and at most 86400"))
}

/// How commands print what they read (etcdctl's `-w`, kubectl's `-o`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and lines for people.
    #[default]
    Table,
    /// One JSON document.
    Json,
    /// One YAML document (the JSON's fields, block style).
    Yaml,
}

/// The `-o` of this run, set once at start.
static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// Records the run's `-o` (the first call wins).
pub fn set_output(output: Output) {
    let _ = OUTPUT.set(output);
}

/// Whether a command prints data rather than a table: its `--json`, or `-o json|yaml`.
pub(super) fn structured(json_flag: bool) -> bool {
    json_flag || OUTPUT.get().is_some_and(|o| *o != Output::Table)
}

/// `value` printed as `-o` asks (JSON for a command's `--json`), without a final newline.
pub(super) fn emit(json_flag: bool, value: &serde_json::Value) -> String {
    if !json_flag && OUTPUT.get() == Some(&Output::Yaml) {
        let mut text = super::yaml::yaml(value);
        text.pop();
        text
    } else {
        value.to_string()
    }
}

/// A failure: message and exit code (2 usage, 1 operation); code 0 is the plan of a
/// `--dry-run`, printed on stdout.
#[derive(Debug)]
pub struct CtlError {
    /// One line for stderr.
    pub message: String,
    /// Process exit code.
    pub code: i32,
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> Self {
        CtlError {
            message: e.to_string(),
            code: 1,
        }
    }
}

pub(super) fn usage(msg: impl Into<String>) -> CtlError {
    CtlError {
        message: msg.into(),
        code: 2,
    }
}

pub(super) fn failed(msg: impl Into<String>) -> CtlError {
    CtlError {
        message: msg.into(),
        code: 1,
    }
}

pub(super) async fn connect(cli: &Target) -> Result<AdminClient, CtlError> {
    let endpoint = cli
        .endpoint
        .as_deref()
        .ok_or_else(|| usage("--endpoint (or SPACED_ENDPOINT) is required"))?;
    let creds = credentials(cli)?;
    Ok(AdminClient::connect(endpoint, &creds).await?)
}

/// The admin certificate `--pki`/`--admin-name` name.
pub(super) fn credentials(cli: &Target) -> Result<AdminCredentials, CtlError> {
    let pki = cli
        .pki
        .as_deref()
        .ok_or_else(|| usage("--pki (or SPACED_PKI) is required"))?;
    Ok(AdminCredentials::load(pki, cli.admin.as_deref())?)
}

/// `--watch [SECONDS]`: without it, prints `view` once. With it, prints it again every
/// `SECONDS` until interrupted (Ctrl-C, SIGTERM), as `watch` or `crm_mon` do: on a terminal
/// the screen is cleared before each view; otherwise a line with the time separates them. A
/// view that fails is shown as its error and tried again at the next turn.
pub(super) async fn watching<F, Fut>(every: Option<f64>, mut view: F) -> Result<(), CtlError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, CtlError>>,
{
    let Some(secs) = every else {
        print!("{}", view().await?);
        return Ok(());
    };
    let every = up_to_a_day(secs).ok_or_else(|| {
        usage(format!(
            "--watch {secs}: must be a number of seconds above 0 (at most a day)"
        ))
    })?;
    let terminal = std::io::stdout().is_terminal();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| failed(format!("cannot listen for SIGTERM: {e}")))?;
    loop {
        let shown = match view().await {
            Ok(text) => text,
            Err(e) => format!("{}\n", e.message),
        };
        let stamp = clock_utc(std::time::SystemTime::now());
        if terminal {
            // Clear the screen, cursor home.
            print!("\x1b[2J\x1b[H");
            println!("every {secs}s, {stamp} (Ctrl-C ends)\n");
        } else {
            println!("--- {stamp}");
        }
        print!("{shown}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
    }
}

/// The time of day of `t` in UTC, `HH:MM:SS UTC` (a watch's header).
fn clock_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A reply of the wrong kind for the request.
pub(super) fn odd(reply: AdminReply) -> CtlError {
    failed(format!("unexpected reply from spaced: {reply:?}"))
}

/// Asks every member at once for `request`, keeping the replies `pick` accepts (in membership
/// order); nodes that do not answer (or answer something else) are named, not fatal.
pub(crate) async fn ask_everywhere<T>(
    cli: &Target,
    request: AdminRequest,
    pick: fn(AdminReply) -> Option<T>,
) -> Result<(Vec<T>, Vec<String>), CtlError> {
    let mut c = connect(cli).await?;
    let status = c.status().await?;
    c.close().await;
    let creds = credentials(cli)?;
    let answers = futures::future::join_all(status.nodes.iter().map(|n| {
        let (creds, request) = (&creds, &request);
        async move {
            let mut c = AdminClient::connect(&n.addr, creds).await.ok()?;
            let reply = c.call(request).await.ok();
            c.close().await;
            pick(reply?)
        }
    }))
    .await;
    let mut reports = Vec::new();
    let mut silent = Vec::new();
    for (n, answer) in status.nodes.iter().zip(answers) {
        match answer {
            Some(r) => reports.push(r),
            None => silent.push(n.name.clone()),
        }
    }
    Ok((reports, silent))
}
