//! `spacectl`: the admin CLI of a spaced fabric.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use spaced_node::ctl::{Cli, run};

fn main() -> ExitCode {
    let version: &'static str = Box::leak(spaced_node::long_version().into_boxed_str());
    let matches = Cli::command()
        .version(spaced_node::VERSION)
        .long_version(version)
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPACED_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spacectl: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spacectl: {}", e.message);
            ExitCode::from(e.code as u8)
        }
    }
}
