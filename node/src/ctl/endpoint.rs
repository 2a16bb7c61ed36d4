//! `spacectl endpoint health|status`, as etcdctl's: is each node answering with a leader
//! known, how long it took, and what each node says of itself (build, leader, term, applied
//! index). `--endpoint` may name several nodes (comma-separated); `--cluster` asks every
//! member the first one knows.

use std::time::{Duration, Instant};

use super::common::*;

/// How long one node may take to answer before it counts as unhealthy.
const WITHIN: Duration = Duration::from_secs(5);

/// `spacectl endpoint ...`
#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Whether each node answers and knows a leader, and how long it took; exit 1 if one does not.
    Health {
        /// Every member the (first) endpoint knows, not only the endpoints given.
        #[arg(long)]
        cluster: bool,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// What each node says of itself: id, name, build, whether it leads, term, applied index.
    Status {
        /// Every member the (first) endpoint knows, not only the endpoints given.
        #[arg(long)]
        cluster: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// One node's answer (or why there was none).
struct Answer {
    endpoint: String,
    took: Duration,
    report: Result<StatusReport, String>,
}

impl Answer {
    /// Healthy: it answered and knows a leader.
    fn problem(&self) -> Option<String> {
        match &self.report {
            Err(e) => Some(e.clone()),
            Ok(r) if r.leader.is_none() => Some("no leader known".into()),
            Ok(_) => None,
        }
    }
}

pub(super) async fn run(cli: &Target, action: &EndpointCmd) -> Result<(), CtlError> {
    let (cluster, json) = match action {
        EndpointCmd::Health { cluster, json } | EndpointCmd::Status { cluster, json } => {
            (*cluster, *json)
        }
    };
    let answers = ask(cli, cluster).await?;
    match action {
        EndpointCmd::Health { .. } => health(&answers, json),
        EndpointCmd::Status { .. } => status(&answers, json),
    }
}

/// The endpoints given (comma-separated), or with `cluster` every member the first one that
/// answers knows; each asked for its status at once.
async fn ask(cli: &Target, cluster: bool) -> Result<Vec<Answer>, CtlError> {
    let given: Vec<String> = cli
        .endpoint
        .as_deref()
        .ok_or_else(|| usage("--endpoint (or SPACED_ENDPOINT) is required"))?
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if given.is_empty() {
        return Err(usage("--endpoint names no node"));
    }
    let creds = credentials(cli)?;
    let mut endpoints = given.clone();
    if cluster {
        let mut members = None;
        let mut last = String::new();
        for e in &given {
            match one(e, &creds).await.report {
                Ok(r) => {
                    members = Some(r.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>());
                    break;
                }
                Err(err) => last = err,
            }
        }
        endpoints = members.ok_or_else(|| {
            failed(format!(
                "no endpoint answered, so the members are unknown: {last}"
            ))
        })?;
    }
    Ok(futures::future::join_all(endpoints.iter().map(|e| one(e, &creds))).await)
}

async fn one(endpoint: &str, creds: &AdminCredentials) -> Answer {
    let started = Instant::now();
    let call = async {
        let mut c = AdminClient::connect(endpoint, creds)
            .await
            .map_err(|e| e.to_string())?;
        // The node's own view (`AdminClient::status` would follow it to the leader's).
        let report = match c.call(&AdminRequest::Status).await {
            Ok(AdminReply::Status(r)) => Ok(r),
            Ok(other) => Err(unexpected(endpoint, &other).to_string()),
            Err(e) => Err(e.to_string()),
        };
        c.close().await;
        report
    };
    let report = match tokio::time::timeout(WITHIN, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {WITHIN:?}")),
    };
    Answer {
        endpoint: endpoint.to_string(),
        took: started.elapsed(),
        report,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

fn health(answers: &[Answer], json: bool) -> Result<(), CtlError> {
    let unhealthy = answers.iter().filter(|a| a.problem().is_some()).count();
    if structured(json) {
        let rows: Vec<_> = answers
            .iter()
            .map(|a| {
                json!({
                    "endpoint": a.endpoint,
                    "health": a.problem().is_none(),
                    "took_ms": a.took.as_secs_f64() * 1000.0,
                    "error": a.problem(),
                })
            })
            .collect();
        println!("{}", emit(json, &serde_json::Value::Array(rows)));
    } else {
        for a in answers {
            match a.problem() {
                None => println!("{} is healthy: took = {}", a.endpoint, ms(a.took)),
                Some(p) => println!("{} is unhealthy: took = {}: {p}", a.endpoint, ms(a.took)),
            }
        }
    }
    if unhealthy > 0 {
        return Err(failed(format!(
            "unhealthy: {unhealthy} of {} endpoints",
            answers.len()
        )));
    }
    Ok(())
}

/// One row of `endpoint status`.
fn row(a: &Answer) -> serde_json::Value {
    let Ok(r) = &a.report else {
        return json!({ "endpoint": a.endpoint, "error": a.problem() });
    };
    let me = r.nodes.iter().find(|n| n.id == r.served_by);
    json!({
        "endpoint": a.endpoint,
        "id": r.served_by,
        "name": me.map(|n| n.name.clone()),
        "version": me.and_then(|n| n.version.clone()),
        "is_leader": r.leader == Some(r.served_by),
        "leader": r.leader,
        "term": r.term,
        "applied_index": r.last_applied,
        "db_bytes": r.db_bytes,
        "voter": me.map(|n| n.voter),
        "took_ms": a.took.as_secs_f64() * 1000.0,
        "error": a.problem(),
    })
}

fn status(answers: &[Answer], json: bool) -> Result<(), CtlError> {
    let rows: Vec<serde_json::Value> = answers.iter().map(row).collect();
    if structured(json) {
        println!("{}", emit(json, &serde_json::Value::Array(rows)));
    } else {
        print!("{}", status_table(&rows));
    }
    if answers.iter().any(|a| a.report.is_err()) {
        return Err(failed("some endpoints did not answer"));
    }
    Ok(())
}

/// The table `endpoint status` prints, from its JSON rows.
fn status_table(rows: &[serde_json::Value]) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let leader = match r["is_leader"].as_bool() {
                Some(true) => "yes".to_string(),
                Some(false) => format!("no ({})", text(&r["leader"])),
                None => "-".to_string(),
            };
            vec![
                text(&r["endpoint"]),
                text(&r["id"]),
                text(&r["name"]),
                r["version"]
                    .as_str()
                    .map_or("-".to_string(), super::render::short_version),
                leader,
                text(&r["term"]),
                text(&r["applied_index"]),
                r["db_bytes"].as_u64().map_or("-".to_string(), size),
                text(&r["error"]),
            ]
        })
        .collect();
    super::render::table(
        &[
            "ENDPOINT", "ID", "NAME", "VERSION", "LEADER", "TERM", "APPLIED", "DB SIZE", "ERROR",
        ],
        &cells,
    )
}

/// A size as etcdctl prints its DB SIZE: `836 B`, `20 kB`, `1.2 MB` (powers of 1,000).
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_a_leader_or_an_answer_is_unhealthy_and_named() {
        let report = |leader| StatusReport {
            served_by: 2,
            leader,
            leader_addr: None,
            term: 4,
            last_applied: Some(17),
            db_bytes: Some(1_234_567),
            nodes: Vec::new(),
            devices: 0,
            vips: Vec::new(),
        };
        let a = |report| Answer {
            endpoint: "10.0.0.2:7000".into(),
            took: Duration::from_micros(1500),
            report,
        };
        assert_eq!(a(Ok(report(Some(1)))).problem(), None);
        assert_eq!(
            a(Ok(report(None))).problem().as_deref(),
            Some("no leader known")
        );
        assert_eq!(
            a(Err("connection refused".into())).problem().as_deref(),
            Some("connection refused")
        );
        let table = status_table(&[row(&a(Ok(report(Some(1))))), row(&a(Err("gone".into())))]);
        assert_eq!(
            table,
            "ENDPOINT       ID  NAME  VERSION  LEADER  TERM  APPLIED  DB SIZE  ERROR\n\
             10.0.0.2:7000  2   -     -        no (1)  4     17       1.2 MB   -\n\
             10.0.0.2:7000  -   -     -        -       -     -        -        gone\n"
        );
    }

    #[test]
    fn sizes_read_as_etcdctl_prints_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1000), "1.0 kB");
        assert_eq!(size(20_480), "20 kB");
        assert_eq!(size(1_234_567), "1.2 MB");
        assert_eq!(size(u64::MAX), "18446744 TB");
    }
}
