//! The custom failure-detection script (the model's): once the peer is lost, it replaces the
//! built-in decision. It reads the site's DR status as JSON on stdin and prints one JSON
//! object: `{"state": "active"|"standby", "action": "beActive"|"beStandby"|"nothing"|"wait",
//! "description": "...", "payload": {"waitTime": "30s", "details": {...}}}`. Bad output, a
//! non-zero exit or a time-out is logged and counts as `nothing`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{DurationError, parse_duration_ms};

/// What the script asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptAction {
    /// Become active (as `dr failover` without `--force`).
    BeActive,
    /// Become standby.
    BeStandby,
    /// Nothing now.
    Nothing,
    /// Nothing, and do not ask again for this long.
    Wait(Duration),
}

/// The script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptVerdict {
    /// What to do.
    pub action: ScriptAction,
    /// Its words.
    pub description: String,
}

#[derive(Deserialize)]
struct Output {
    #[serde(default)]
    #[allow(dead_code)]
    state: Option<String>,
    action: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    payload: Option<Payload>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default, rename = "waitTime")]
    wait_time: Option<serde_json::Value>,
}

/// Why the script's output is not a verdict.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// Not the JSON object expected.
    #[error("its output is not the expected JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// `action` is none of those known.
    #[error("unknown action {0:?} (beActive, beStandby, nothing or wait)")]
    UnknownAction(String),
    /// `wait` without `payload.waitTime`.
    #[error("action \"wait\" without payload.waitTime")]
    NoWaitTime,
    /// `waitTime` as a string that is not a duration.
    #[error(transparent)]
    WaitTime(#[from] DurationError),
    /// `waitTime` as a number that is not a whole number of seconds (or too large).
    #[error("waitTime {0} is not a number of seconds")]
    WaitSeconds(serde_json::Number),
    /// `waitTime` as neither a string nor a number.
    #[error("waitTime {0} is not a duration")]
    WaitNotDuration(serde_json::Value),
}

/// Why running the script gave no verdict; each names the script.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// It could not be started.
    #[error("{}: cannot start: {source}", .script.display())]
    Start {
        /// The script.
        script: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Its output could not be read.
    #[error("{}: read its output: {source}", .script.display())]
    Read {
        /// The script.
        script: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for it to end failed.
    #[error("{}: wait: {source}", .script.display())]
    Wait {
        /// The script.
        script: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It exited with a failure.
    #[error("{}: exited with {status}", .script.display())]
    Exited {
        /// The script.
        script: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// Its output is not a verdict.
    #[error("{}: {source}", .script.display())]
    Verdict {
        /// The script.
        script: PathBuf,
        /// What is wrong with the output.
        source: VerdictError,
    },
    /// It did not answer in time and was killed.
    #[error("{}: no answer within {timeout:?} (killed)", .script.display())]
    TimedOut {
        /// The script.
        script: PathBuf,
        /// The time it had.
        timeout: Duration,
    },
}

/// Reads the script's standard output.
pub fn parse_verdict(stdout: &str) -> Result<ScriptVerdict, VerdictError> {
    let out: Output = serde_json::from_str(stdout.trim()).map_err(VerdictError::NotJson)?;
    let action = match out.action.as_str() {
        "beActive" => ScriptAction::BeActive,
        "beStandby" => ScriptAction::BeStandby,
        "nothing" => ScriptAction::Nothing,
        "wait" => {
            let wait = match out.payload.and_then(|p| p.wait_time) {
                Some(serde_json::Value::String(s)) => parse_duration_ms(&s)?,
                Some(serde_json::Value::Number(n)) => n
                    .as_u64()
                    .and_then(|s| s.checked_mul(1_000))
                    .ok_or(VerdictError::WaitSeconds(n))?,
                Some(other) => return Err(VerdictError::WaitNotDuration(other)),
                None => return Err(VerdictError::NoWaitTime),
            };
            ScriptAction::Wait(Duration::from_millis(wait))
        }
        other => return Err(VerdictError::UnknownAction(other.to_string())),
    };
    Ok(ScriptVerdict {
        action,
        description: out.description,
    })
}

/// Runs `script` with `input` on stdin, within `timeout` (then it is killed).
pub async fn run_script(
    script: &Path,
    input: &str,
    timeout: Duration,
) -> Result<ScriptVerdict, ScriptError> {
    let path = || script.to_path_buf();
    let mut child = tokio::process::Command::new(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ScriptError::Start {
            script: path(),
            source,
        })?;
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let run = async {
        if let Some(stdin) = stdin.as_mut() {
            // A script that does not read its input is fine.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        drop(stdin.take());
        let mut out = String::new();
        if let Some(stdout) = stdout.as_mut() {
            stdout
                .take(64 << 10)
                .read_to_string(&mut out)
                .await
                .map_err(|source| ScriptError::Read {
                    script: path(),
                    source,
                })?;
        }
        let status = child.wait().await.map_err(|source| ScriptError::Wait {
            script: path(),
            source,
        })?;
        if !status.success() {
            return Err(ScriptError::Exited {
                script: path(),
                status,
            });
        }
        parse_verdict(&out).map_err(|source| ScriptError::Verdict {
            script: path(),
            source,
        })
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ScriptError::TimedOut {
            script: path(),
            timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_and_bad_output_is_named() {
        let v = parse_verdict(
            r#"{"state":"standby","action":"beActive","description":"east is gone","payload":{"details":{}}}"#,
        )
        .unwrap();
        assert_eq!(v.action, ScriptAction::BeActive);
        assert_eq!(v.description, "east is gone");
        assert_eq!(
            parse_verdict(r#"{"action":"wait","payload":{"waitTime":"2m"}}"#)
                .unwrap()
                .action,
            ScriptAction::Wait(Duration::from_secs(120))
        );
        assert_eq!(
            parse_verdict(r#"{"action":"wait","payload":{"waitTime":30}}"#)
                .unwrap()
                .action,
            ScriptAction::Wait(Duration::from_secs(30))
        );
        assert_eq!(
            parse_verdict(" {\"action\":\"nothing\"}\n").unwrap().action,
            ScriptAction::Nothing
        );
        for (bad, says) in [
            ("hello", "not the expected JSON"),
            (r#"{"action":"promote"}"#, "unknown action \"promote\""),
            (r#"{"action":"wait"}"#, "without payload.waitTime"),
            (
                r#"{"action":"wait","payload":{"waitTime":"soon"}}"#,
                "not a duration",
            ),
        ] {
            let e = parse_verdict(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_script_runs_with_the_status_on_stdin_and_failures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        // It answers from what it read.
        let echo = write(
            "echo.sh",
            "#!/bin/sh\nread line\ncase \"$line\" in *standby*) echo '{\"action\":\"beActive\",\"description\":\"read standby\"}';; *) echo '{\"action\":\"nothing\"}';; esac\n",
        );
        let v = run_script(&echo, "{\"role\":\"standby\"}\n", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(v.action, ScriptAction::BeActive);
        let fail = write("fail.sh", "#!/bin/sh\nexit 3\n");
        let e = run_script(&fail, "{}", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exited with"), "{e}");
        let slow = write("slow.sh", "#!/bin/sh\nsleep 30\n");
        let e = run_script(&slow, "{}", Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer within"), "{e}");
        let e = run_script(&dir.path().join("missing"), "{}", Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot start"), "{e}");
    }
}
