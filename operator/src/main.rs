//! `tether-operator`: reconciles TerminalSessions into session pods. See `--help`.
#![forbid(unsafe_code)]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use tether_operator::{
    config::Args,
    controller::{self, Context},
    leader::{Leadership, LeaseSettings, default_identity},
    metrics::Metrics,
    server::{self, ServerState},
};
use tokio::sync::watch;
use tracing::{error, info};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let settings = args.settings()?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let state = ServerState {
        registry: Arc::new(registry),
        ready: ready.clone(),
    };
    let (addr, serve) = server::bind(args.metrics_addr, state)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(serve);

    let stop = shutdown_signal();
    let identity = args
        .leader_identity
        .clone()
        .unwrap_or_else(default_identity);
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics.clone(),
        identity.clone(),
    ));
    let namespace = args.watch_namespace.as_deref();

    if !args.leader_election {
        controller::run(ctx, namespace, args.concurrency, ready, stopped(stop)).await;
        info!("stopped");
        return Ok(());
    }

    let (duration, grace) = args.lease_timing();
    let lease = LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity,
        duration,
        grace,
    };
    let mut leadership = Leadership::start(client, &lease).await?;
    // A standby is ready: it can take over.
    ready.store(true, Ordering::SeqCst);
    let mut stop_rx = stop.clone();
    tokio::select! {
        acquired = leadership.acquired() => if !acquired {
            anyhow::bail!("leader election ended before this replica was elected");
        },
        _ = stop_rx.wait_for(|s| *s) => {
            leadership.release().await;
            return Ok(());
        }
    }
    info!("elected leader; starting the controller");
    metrics.leader.set(1);
    ready.store(false, Ordering::SeqCst);
    let on_loss = leadership.lost();
    // On loss, leave at once rather than draining: a reconcile still in flight could write after
    // the lease expired, while a new leader acts. Every write is an idempotent apply, so a
    // reconcile cut short is finished by whoever leads next (as after a SIGKILL).
    tokio::spawn(async move {
        on_loss.await;
        error!("lost the leader lease; exiting at once so that only the new leader acts");
        std::process::exit(1);
    });
    controller::run(ctx, namespace, args.concurrency, ready, stopped(stop)).await;
    metrics.leader.set(0);
    leadership.release().await;
    info!("stopped");
    Ok(())
}

/// A flag that turns true on SIGTERM or SIGINT.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        let _ = tx.send(true);
    });
    rx
}

/// Resolves once `stop` turned true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn init_tracing(format: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_lease_manager=warn"));
    if format == "json" {
        fmt().json().with_env_filter(filter).init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        fmt().with_ansi(ansi).with_env_filter(filter).init();
    }
}
