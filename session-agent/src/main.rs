//! `tether-session-agent`: see `--help` and `session-agent/README.md`.
#![forbid(unsafe_code)]

use clap::Parser;
use tether_session_agent::{Args, Outcome, TerminationMessage, bind_and_run};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let termination_path = args.termination_message_path.clone();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            TerminationMessage::error(&e).write(&termination_path);
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = async {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    match bind_and_run(config, shutdown).await {
        Ok(Outcome::ShellExited { .. } | Outcome::IdleTimeout | Outcome::Terminated) => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            // `run` writes it too once tmux is up; this covers failures before (e.g. bind).
            TerminationMessage::error(&e).write(&termination_path);
            std::process::ExitCode::FAILURE
        }
    }
}
