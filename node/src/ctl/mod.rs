//! `spacectl`: one file per command group, as commands with tables or JSON.
//!
//! [`pki`], [`node`] (status, membership, leadership), [`vip`], [`device`], [`service`]
//! (services and singletons), [`lb`], [`snapshot`] (backups), [`dr`] (disaster recovery);
//! [`render`] draws the tables and JSON.

mod check;
mod common;
mod device;
mod dr;
mod dryrun;
mod endpoint;
mod lb;
mod mutate;
mod node;
mod pki;
pub(crate) mod render;
mod service;
mod snapshot;
mod vip;
mod yaml;

pub use check::*;
use clap::{Parser, Subcommand};
pub use common::{CtlError, Output, Target};
pub use device::*;
pub use dr::*;
pub use endpoint::*;
pub use lb::*;
pub use node::*;
pub use pki::*;
pub use render::*;
pub use service::*;
pub use snapshot::*;
pub use vip::*;

use common::failed;

/// spacectl — administer a spaced fabric.
#[derive(Debug, Parser)]
#[command(name = "spacectl", version, about = "Administer a spaced fabric")]
pub struct Cli {
    /// The node to talk to and the admin certificate to use.
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cluster CA and certificates.
    Pki {
        /// PKI action.
        #[command(subcommand)]
        action: PkiCmd,
    },
    /// Leader, term and members.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show it again every SECONDS (default 2) until interrupted, like `watch`.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Each node's health and what it says of itself, like etcdctl's `endpoint` (`--endpoint`
    /// may name several nodes, comma-separated).
    Endpoint {
        /// Endpoint action.
        #[command(subcommand)]
        action: EndpointCmd,
    },
    /// Cluster membership.
    Node {
        /// Membership action.
        #[command(subcommand)]
        action: NodeCmd,
    },
    /// Performance checks, like etcdctl's: the cluster's writes per second and latency at a
    /// load shape (`check perf`), the data disk's fdatasync latency (`check datadir`).
    Check {
        /// Check to run.
        #[command(subcommand)]
        action: CheckCmd,
    },
    /// Leadership.
    Leader {
        /// Leadership action.
        #[command(subcommand)]
        action: LeaderCmd,
    },
    /// Managed devices.
    Device {
        /// Device action.
        #[command(subcommand)]
        action: DeviceCmd,
    },
    /// Virtual IPs.
    Vip {
        /// VIP action.
        #[command(subcommand)]
        action: VipCmd,
    },
    /// Supervised services.
    Service {
        /// Service action.
        #[command(subcommand)]
        action: ServiceCmd,
    },
    /// Cluster-wide singleton services.
    Singleton {
        /// Singleton action.
        #[command(subcommand)]
        action: SingletonCmd,
    },
    /// The load balancer on the VIP.
    Lb {
        /// Balancer action.
        #[command(subcommand)]
        action: LbCmd,
    },
    /// Backups of the fabric (`spaced restore` seeds a new cluster from one).
    Snapshot {
        /// Snapshot action.
        #[command(subcommand)]
        action: SnapshotCmd,
    },
    /// Disaster recovery between two sites: status, failover, switchover, demote.
    Dr {
        /// DR action.
        #[command(subcommand)]
        action: DrCmd,
    },
    /// Print a shell completion script (`source <(spacectl completion bash)`).
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: crate::Shell,
    },
    /// Print the man page (roff): `spacectl man > spacectl.1`.
    Man,
}

/// Runs one spacectl command, printing its output; returns the error to report.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    common::set_output(cli.target.output);
    let Some(within) = cli.target.command_timeout else {
        return run_command(&cli).await;
    };
    match tokio::time::timeout(within, run_command(&cli)).await {
        Ok(r) => r,
        Err(_) => Err(failed(format!(
            "no answer within {} s (--command-timeout); a change this command asked for may \
             or may not have been made: read it back",
            within.as_secs_f64()
        ))),
    }
}

/// The command itself.
async fn run_command(cli: &Cli) -> Result<(), CtlError> {
    match &cli.command {
        Cmd::Pki { action } => pki::run(&cli.target, action).await,
        Cmd::Status { json, watch } => node::status(&cli.target, json, *watch).await,
        Cmd::Endpoint { action } => endpoint::run(&cli.target, action).await,
        Cmd::Node { action } => node::run(&cli.target, action).await,
        Cmd::Check { action } => check::run(&cli.target, action).await,
        Cmd::Leader { action } => node::leader(&cli.target, action).await,
        Cmd::Device { action } => device::run(&cli.target, action).await,
        Cmd::Vip { action } => vip::run(&cli.target, action).await,
        Cmd::Service { action } => service::run(&cli.target, action).await,
        Cmd::Singleton { action } => service::singleton(&cli.target, action).await,
        Cmd::Lb { action } => lb::run(&cli.target, action).await,
        Cmd::Snapshot { action } => snapshot::run(&cli.target, action).await,
        Cmd::Dr { action } => dr::run(&cli.target, action).await,
        Cmd::Completion { shell } => crate::write_completion::<Cli>(*shell, &mut std::io::stdout())
            .map_err(|e| failed(format!("write the completion script: {e}"))),
        Cmd::Man => crate::write_man::<Cli>(&mut std::io::stdout())
            .map_err(|e| failed(format!("write the man page: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::common::*;
    use super::*;

    #[test]
    fn import_parsing_reports_every_bad_line() {
        let text = "id,addr,mode\n# comment\n\nd1,10.0.0.1\nd2,10.0.0.2:830,device-initiated\nd3\nd1,10.0.0.9\nd4,bad host\nd5,10.0.0.5,sideways\n";
        let errs = parse_import(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![6, 7, 8, 9]);
        assert!(
            errs[1].problem.contains("already on line 4"),
            "{:?}",
            errs[1]
        );
        let ok = parse_import("d1,10.0.0.1\nd2,h2:22,space-initiated\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].1.mode, DeviceMode::SpaceInitiated);
    }

    #[test]
    fn refusals_are_listed_under_the_table_with_age_and_hold() {
        use crate::admin::RefusalRow;
        let now = 1_000_000_000;
        let rows = [
            RefusalRow {
                node: 2,
                node_name: Some("n2".into()),
                reason: "interface \"side0\" does not exist".into(),
                at: now - 12_000,
                holding: true,
            },
            RefusalRow {
                node: 7,
                node_name: None,
                reason: "4 failures in a row".into(),
                at: now - 125_000,
                holding: false,
            },
        ];
        assert_eq!(render_refusals([("cluster", &rows[..0])], now), "");
        assert_eq!(
            render_refusals([("cluster", &rows[..1]), ("poller", &rows[1..])], now),
            "could not be held:\n  cluster: refused by n2 (2) 12s ago, passed over for now: \
             interface \"side0\" does not exist\n  poller: refused by 7 2m5s ago, may be tried \
             again: 4 failures in a row\n"
        );
    }

    #[test]
    fn device_list_shows_owner_names_status_and_age() {
        let row = |id: &str, owner: Option<(u64, &str)>, status, since| DeviceRow {
            id: id.into(),
            addr: "10.0.0.1".into(),
            mode: DeviceMode::SpaceInitiated,
            owner: owner.map(|o| o.0),
            status,
            since,
            owner_name: owner.map(|o| o.1.to_string()),
        };
        use spaced_fabric::DeviceStatus::{Unassigned, Up};
        let now = 1_800_000_000_000;
        let text = render_devices(
            &[
                row("d1", Some((2, "n2")), Up, now - 75_000),
                row("d2", None, Unassigned, 0),
            ],
            now,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["ID", "ADDR", "MODE", "OWNER", "STATUS", "SINCE"]
        );
        assert!(
            lines[1].contains("n2 (2)") && lines[1].contains(" up ") && lines[1].ends_with("1m15s"),
            "{text}"
        );
        assert!(
            lines[2].contains("unassigned") && lines[2].ends_with('-'),
            "{text}"
        );
        for (ms, expected) in [
            (0, "0s"),
            (59_999, "59s"),
            (3_600_000, "1h0m"),
            (90_000_000, "1d1h"),
        ] {
            assert_eq!(age(now, now - ms), expected);
        }
        assert_eq!(age(now, now + 5), "-", "a clock behind the proposer's");
    }

    fn lb_report(node: &str, listeners: Vec<(&str, bool, u64)>) -> crate::admin::LbReport {
        crate::admin::LbReport {
            node: node.into(),
            vip: Some("cluster".into()),
            problems: Vec::new(),
            listeners: listeners
                .into_iter()
                .map(|(listen, accepting, active)| crate::admin::LbListenerRow {
                    listen: listen.into(),
                    accepting,
                    active,
                    total: 7,
                    refused: 0,
                    no_backend: 0,
                    relay_errors: 0,
                    bytes_in: 2_000,
                    bytes_out: 3_000_000,
                    backends: vec![crate::admin::LbBackendRow {
                        name: "n2".into(),
                        addr: "10.0.0.2:8080".into(),
                        up: !accepting,
                        active: 1,
                        total: 5,
                        connect_errors: 0,
                        transitions: 2,
                    }],
                })
                .collect(),
        }
    }

    #[test]
    fn lb_status_names_states_and_warns_about_accepting_twice_or_never() {
        let mut bare = lb_report("n4", vec![]);
        bare.vip = None;
        let reports = [
            lb_report(
                "n1",
                vec![("10.0.0.100:80", true, 3), ("10.0.0.100:443", false, 0)],
            ),
            lb_report(
                "n2",
                vec![("10.0.0.100:80", true, 0), ("10.0.0.100:443", false, 2)],
            ),
            bare,
        ];
        let text = lb_status_text(&reports, &["n3".to_string()]);
        let lines: Vec<&str> = text.lines().collect();
        let row = |node: &str, listen: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(node) && l.contains(listen) && !l.contains("10.0.0.2:"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(row("n1", ":80 ")[2..5], ["accepting", "3", "7"], "{text}");
        assert_eq!(row("n1", ":443")[2], "standby", "{text}");
        assert_eq!(row("n2", ":443")[2], "draining", "{text}");
        assert!(
            row("n1", ":80 ").join(" ").ends_with("2.00 kB 3.00 MB"),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("n1")
                && l.contains("10.0.0.100:80 ")
                && l.split_whitespace().collect::<Vec<_>>()[2..5]
                    == ["n2", "10.0.0.2:8080", "down"]),
            "{text}"
        );
        assert!(
            text.contains("warning: 2 nodes accept on 10.0.0.100:80: n1, n2"),
            "{text}"
        );
        assert!(
            text.contains("warning: no node accepts on 10.0.0.100:443"),
            "{text}"
        );
        assert!(text.contains("no balancer on: n4"), "{text}");
        assert!(text.ends_with("not answering: n3\n"), "{text}");
        // One node accepting per listener: no warning.
        let calm = [lb_report("n1", vec![("10.0.0.100:80", true, 0)])];
        assert!(!lb_status_text(&calm, &[]).contains("warning"));
        // A node's problems are named with it.
        let mut troubled = lb_report("n2", vec![("10.0.0.100:80", false, 0)]);
        troubled.problems = vec!["cannot bind 10.0.0.100:80: Permission denied".into()];
        assert!(
            lb_status_text(&[troubled], &[])
                .contains("problem on n2: cannot bind 10.0.0.100:80: Permission denied\n")
        );
        // Nobody has a balancer.
        let mut none = lb_report("n1", vec![]);
        none.vip = None;
        assert_eq!(
            lb_status_text(&[none], &[]),
            "no node runs a balancer (no [lb] section)\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "y".into()],
                vec!["z".into(), "w".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  y\nz     w\n");
    }
}
