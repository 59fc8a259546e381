//! The HTTP server beside the controller: `/metrics` (Prometheus text), `/healthz` (the
//! process serves) and `/readyz` (this replica can do its job: a standby is ready to take
//! over, a leader once its watch caches have synced).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct ServerState {
    /// The metrics to expose.
    pub registry: Arc<Registry>,
    /// `/readyz` answers 200 while this is true.
    pub ready: Arc<AtomicBool>,
}

/// The routes.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr` and returns the bound address (port 0 picks one) and the server future.
pub async fn bind(
    addr: SocketAddr,
    state: ServerState,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((
        local,
        async move { axum::serve(listener, router(state)).await },
    ))
}

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

async fn readyz(State(state): State<ServerState>) -> impl IntoResponse {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: watch caches syncing\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_answer_on_a_free_port() {
        let mut registry = Registry::default();
        let metrics = crate::metrics::Metrics::new(&mut registry);
        metrics.reconciliations.inc();
        let ready = Arc::new(AtomicBool::new(false));
        let state = ServerState {
            registry: Arc::new(registry),
            ready: ready.clone(),
        };
        let (addr, server) = bind("127.0.0.1:0".parse().unwrap(), state).await.unwrap();
        tokio::spawn(server);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("tether_operator_reconciliations_total 1"), "{m}");
    }
}
