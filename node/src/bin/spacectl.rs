//! `spacectl`: the admin CLI of a spaced fabric.

use std::process::ExitCode;

use spaced_node::ctl::{Cli, run};

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader goes, as other
    // command-line tools do, instead of panicking on the next write.
    // SAFETY: at the start of main, before any thread exists; SIG_DFL takes no handler.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli: Cli = spaced_node::parse_args();
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
        // A --dry-run's plan.
        Err(e) if e.code == 0 => {
            println!("{}", e.message);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spacectl: {}", e.message);
            ExitCode::from(e.code as u8)
        }
    }
}
