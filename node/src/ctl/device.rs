//! `spacectl device`: list, add, import (CSV), change, remove, rebalance.

use super::common::*;
use super::mutate::{dry_run, mutate};
use super::render::*;

/// Devices per `AddDevices` command during import: large enough for speed, small enough to keep Raft responsive.
pub const IMPORT_BATCH: usize = 1000;

/// `spacectl device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Register one device.
    Add {
        /// Unique device id.
        #[arg(long)]
        id: String,
        /// `host` or `host:port`.
        #[arg(long)]
        addr: String,
        /// space-initiated (default) or device-initiated.
        #[arg(long, default_value = "space-initiated")]
        mode: DeviceMode,
    },
    /// Register devices from a CSV file: `id,addr[,mode]` per line (`#` comments, optional header).
    Import {
        /// The CSV file.
        file: PathBuf,
    },
    /// List devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Read through the leader after a read barrier (like etcdctl's default
        /// `--consistency=l`): the list holds every write acknowledged before it was asked.
        /// Without it, the node asked answers from what it has applied, which may lag.
        #[arg(long)]
        linearizable: bool,
        /// Show it again every SECONDS (default 2) until interrupted, like `watch`.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Remove devices by id (their connections close), and/or those listed in a file (one id
    /// per line, or the CSV of `import`: its first column).
    Remove {
        /// Device ids.
        ids: Vec<String>,
        /// A file of ids.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Change a device's address or mode: its owner keeps it and connects anew.
    Set {
        /// Device id.
        id: String,
        /// New `host` or `host:port`.
        #[arg(long)]
        addr: Option<String>,
        /// New mode: space-initiated or device-initiated.
        #[arg(long)]
        mode: Option<DeviceMode>,
    },
    /// Even out the devices of the live `app` nodes with the fewest moves.
    Rebalance {
        /// Move at most this many devices.
        #[arg(long)]
        max_moves: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// One parse problem in an import file.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
}

/// Parses an import file: `id,addr[,mode]` per line; blank lines, `#` comments and an
/// `id,addr[,mode]` header are skipped. Returns every bad line, not just the first.
pub fn parse_import(text: &str) -> Result<Vec<(usize, NewDevice)>, Vec<LineError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = l.split(',').map(str::trim).collect();
        if out.is_empty()
            && errors.is_empty()
            && fields.first() == Some(&"id")
            && fields.get(1) == Some(&"addr")
        {
            continue;
        }
        let mut err = |problem: String| errors.push(LineError { line, problem });
        if !(2..=3).contains(&fields.len()) {
            err(format!(
                "expected id,addr[,mode], found {} fields",
                fields.len()
            ));
            continue;
        }
        let mode = match fields.get(2) {
            None | Some(&"") => DeviceMode::SpaceInitiated,
            Some(m) => match m.parse() {
                Ok(m) => m,
                Err(e) => {
                    err(e);
                    continue;
                }
            },
        };
        if let Err(e) = check_device_id(fields[0]) {
            err(e.to_string());
            continue;
        }
        if let Err(e) = check_device_addr(fields[1]) {
            err(e.to_string());
            continue;
        }
        if let Some(first) = seen.insert(fields[0].to_string(), line) {
            err(format!("device id {:?} already on line {first}", fields[0]));
            continue;
        }
        out.push((
            line,
            NewDevice {
                id: fields[0].into(),
                addr: fields[1].into(),
                mode,
            },
        ));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The device ids of a file: the first column of each line, skipping blank lines, `#`
/// comments and an `id,...` header.
fn ids_of_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split(',').next().unwrap_or("").trim())
        .filter(|id| !id.is_empty() && !id.starts_with('#') && *id != "id")
        .map(str::to_string)
        .collect()
}

/// `spacectl device ...`
pub(super) async fn run(cli: &Target, action: &DeviceCmd) -> Result<(), CtlError> {
    match action {
        DeviceCmd::Add { id, addr, mode } => {
            check_device_id(id).map_err(|e| usage(e.to_string()))?;
            check_device_addr(addr).map_err(|e| usage(e.to_string()))?;
            let dev = NewDevice {
                id: id.clone(),
                addr: addr.clone(),
                mode: *mode,
            };
            match mutate(&cli, AdminRequest::AddDevices(vec![dev])).await? {
                AdminReply::Applied(_) => {
                    println!("device {id} added");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        DeviceCmd::Import { file } => import(&cli, file).await,
        DeviceCmd::List {
            json,
            watch,
            linearizable,
        } => {
            watching(*watch, || async {
                let mut c = connect(cli).await?;
                let reply = if *linearizable {
                    c.call_leader(&AdminRequest::ReadDevices).await
                } else {
                    c.call(&AdminRequest::ListDevices).await
                };
                let target = c.target().to_string();
                c.close().await;
                let devices = match reply? {
                    AdminReply::Devices(d) => d,
                    other => return Err(unexpected(&target, &other).into()),
                };
                Ok(if structured(*json) {
                    format!(
                        "{}\n",
                        emit(
                            *json,
                            &serde_json::Value::Array(devices.iter().map(device_json).collect())
                        )
                    )
                } else {
                    render_devices(&devices, crate::now_millis())
                })
            })
            .await
        }
        DeviceCmd::Remove { ids, file } => {
            let mut all = ids.clone();
            if let Some(path) = file {
                let text = read_input(path).map_err(|e| usage(e.message))?;
                all.extend(ids_of_file(&text));
            }
            if all.is_empty() {
                return Err(usage("device remove: give device ids or --file"));
            }
            match mutate(&cli, AdminRequest::RemoveDevices(all)).await? {
                AdminReply::DevicesRemoved { removed, missing } => {
                    println!("removed {removed} device(s)");
                    for id in &missing {
                        eprintln!("not removed: no device {id:?}");
                    }
                    if missing.is_empty() {
                        Ok(())
                    } else {
                        Err(failed(format!("{} device(s) not found", missing.len())))
                    }
                }
                other => Err(odd(other)),
            }
        }
        DeviceCmd::Set { id, addr, mode } => {
            if addr.is_none() && mode.is_none() {
                return Err(usage("device set: say what changes (--addr, --mode)"));
            }
            if let Some(a) = addr {
                spaced_fabric::check_device_addr(a).map_err(|e| usage(e.to_string()))?;
            }
            let req = AdminRequest::DeviceSet {
                id: id.clone(),
                addr: addr.clone(),
                mode: *mode,
            };
            match mutate(cli, req).await? {
                AdminReply::Applied(_) => {
                    println!("device {id} changed");
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
        DeviceCmd::Rebalance { max_moves, json } => {
            let req = AdminRequest::DeviceRebalance {
                max_moves: *max_moves,
            };
            match mutate(&cli, req).await? {
                AdminReply::Rebalanced(r) => {
                    if structured(*json) {
                        println!("{}", emit(*json, &rebalance_json(&r)));
                    } else {
                        print!("{}", render_rebalance(&r));
                    }
                    Ok(())
                }
                other => Err(odd(other)),
            }
        }
    }
}

/// The text of `file`, or of standard input when it is `-` (a script can pipe thousands of
/// ids into one call instead of making one call each).
fn read_input(file: &Path) -> Result<String, CtlError> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| failed(format!("standard input: {e}")))?;
        return Ok(text);
    }
    std::fs::read_to_string(file).map_err(|e| failed(format!("{}: {e}", file.display())))
}

pub(crate) async fn import(cli: &Target, file: &Path) -> Result<(), CtlError> {
    let text = read_input(file)?;
    let devices = parse_import(&text).map_err(|errs| {
        let shown: Vec<String> = errs
            .iter()
            .take(10)
            .map(|e| format!("line {}: {}", e.line, e.problem))
            .collect();
        let more = if errs.len() > 10 {
            format!("; and {} more", errs.len() - 10)
        } else {
            String::new()
        };
        failed(format!(
            "{}: {} bad line(s), nothing imported: {}{more}",
            file.display(),
            errs.len(),
            shown.join("; ")
        ))
    })?;
    if devices.is_empty() {
        return Err(failed(format!("{}: no devices in file", file.display())));
    }
    let mut c = connect(cli).await?;
    // Refuse ids the fabric already has up front, so the import is all or nothing in the usual case.
    let existing: HashSet<String> = match c.call(&AdminRequest::ListDevices).await? {
        AdminReply::Devices(d) => d.into_iter().map(|d| d.id).collect(),
        other => return Err(unexpected(c.target(), &other).into()),
    };
    let dups: Vec<String> = devices
        .iter()
        .filter(|(_, d)| existing.contains(&d.id))
        .take(10)
        .map(|(line, d)| format!("line {line}: device {:?} already registered", d.id))
        .collect();
    if !dups.is_empty() {
        return Err(failed(format!(
            "{}: nothing imported: {}",
            file.display(),
            dups.join("; ")
        )));
    }
    if cli.dry_run {
        c.close().await;
        let all = devices.iter().map(|(_, d)| d.clone()).collect();
        return dry_run(cli, AdminRequest::AddDevices(all)).await;
    }
    let total = devices.len();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} devices {per_sec} eta {eta}",
        ) {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut done = 0usize;
    for chunk in devices.chunks(IMPORT_BATCH) {
        let batch: Vec<NewDevice> = chunk.iter().map(|(_, d)| d.clone()).collect();
        let first_line = chunk.first().map(|(l, _)| *l).unwrap_or(0);
        let res = c.call_leader(&AdminRequest::AddDevices(batch)).await;
        let err = match res {
            Ok(AdminReply::Applied(_)) => None,
            Ok(other) => Some(unexpected(c.target(), &other).to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = err {
            bar.abandon();
            return Err(failed(format!(
                "{}: imported {done} of {total} devices (lines before {first_line}); the batch starting at line {first_line} failed: {e}",
                file.display()
            )));
        }
        done += chunk.len();
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    println!("imported {total} devices from {}", file.display());
    c.close().await;
    Ok(())
}
