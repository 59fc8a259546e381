//! `tether-gateway`: runs in-cluster or with KUBECONFIG.
#![forbid(unsafe_code)]

use std::sync::Arc;

use clap::Parser;
use tether_gateway::authn::KubeTokenReview;
use tether_gateway::authz::KubeAccessReview;
use tether_gateway::{Args, Backends, Error, Gateway, audit::AuditLog, index};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .json()
        .init();
    let config = Args::parse().into_config()?;
    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let audit = AuditLog::open(config.args.audit_log.as_deref()).map_err(Error::Audit)?;
    if let Some(pod) = &config.args.pod_name {
        let ledger = tether_gateway::ledger::Ledger::start(
            client.clone(),
            &config.args.session_namespace,
            pod,
            config.args.attach_ledger_interval,
            audit.clone(),
        )
        .await;
        audit.set_ledger(ledger);
    }
    let listener = tokio::net::TcpListener::bind(config.args.listen)
        .await
        .map_err(Error::Listen)?;
    let admin = tokio::net::TcpListener::bind(config.args.admin_listen)
        .await
        .map_err(Error::Listen)?;
    let idx = index::Index::shared();
    let sessions: tether_gateway::sessions::SharedStore = match config.args.session_store.as_str() {
        "memory" => Arc::new(tether_gateway::sessions::MemoryStore::default()),
        _ => Arc::new(tether_gateway::sessions::SecretStore::start(
            client.clone(),
            &config.args.session_namespace,
        )),
    };
    tokio::spawn(index::run_watch(client.clone(), idx.clone()));
    let gw = Gateway::new(
        config,
        Backends {
            index: idx,
            access: Arc::new(KubeAccessReview(client.clone())),
            token_review: Some(Arc::new(KubeTokenReview(client))),
            sessions,
        },
        audit,
    );
    tether_gateway::run(gw, listener, admin, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
