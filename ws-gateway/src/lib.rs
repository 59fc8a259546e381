//! The Tether gateway: where a person meets a terminal session.
//!
//! It authenticates the browser or CLI ([`authn`]), asks Kubernetes RBAC whether they may attach
//! or observe ([`authz`]), finds the session's agent in an index fed by a watch ([`index`]),
//! mints the agent's attach ticket and proxies the terminal protocol ([`proxy`]) within the
//! configured [`limits`], writing an [`audit`] record per attach and [`metrics`] throughout.
//! [`server`] is the HTTP surface; [`run`] wires it together and drains on shutdown.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authn;
pub mod authz;
pub mod config;
pub mod index;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod sessions;
pub mod signin;
#[cfg(feature = "test-support")]
pub mod test_backend;

use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config};

use crate::audit::AuditLog;
use crate::authn::{Authenticator, Oidc, TokenReviewer};
use crate::authz::{AccessReviewer, Authorizer};
use crate::index::SharedIndex;
use crate::limits::{ConnectionLimiter, HandshakeRate};
use crate::metrics::Metrics;
use crate::sessions::SharedStore;
use crate::signin::SignIn;

/// Everything that can stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    #[error("audit log: {0}")]
    Audit(#[source] std::io::Error),
    #[error("listening: {0}")]
    Listen(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the gateway talks to, injected so tests can run without a cluster.
pub struct Backends {
    /// The session index (fed by [`index::run_watch`] in production).
    pub index: SharedIndex,
    pub access: Arc<dyn AccessReviewer>,
    /// `None` disables Kubernetes tokens.
    pub token_review: Option<Arc<dyn TokenReviewer>>,
    /// Where browser sessions live.
    pub sessions: SharedStore,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").finish_non_exhaustive()
    }
}

/// The shared state of a running gateway.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub authn: Authenticator,
    pub authz: Authorizer,
    /// Browser sign-in with the OIDC provider, when configured.
    pub signin: Option<SignIn>,
    pub sessions: SharedStore,
    /// One lock per browser session being refreshed on this replica.
    refreshing: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub index: SharedIndex,
    pub conns: ConnectionLimiter,
    pub rate: HandshakeRate,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    /// Cancelled on shutdown: every proxied connection is told to reconnect elsewhere.
    pub shutdown: CancellationToken,
    /// Proxied connections, awaited while draining.
    pub tasks: TaskTracker,
}

impl Gateway {
    pub fn new(config: Config, backends: Backends, audit: AuditLog) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let authn = Authenticator::new(
            config.dev_tokens.clone(),
            config.oidc.clone().map(|o| Oidc::new(o, metrics.clone())),
            backends.token_review,
            config.token_review.clone(),
        );
        let signin = config.signin.clone().map(SignIn::new);
        let authz = Authorizer::new(
            backends.access,
            config.args.authz_cache_ttl,
            metrics.clone(),
            backends.index.clone(),
        );
        Arc::new(Self {
            conns: ConnectionLimiter::new(config.args.max_connections_per_user),
            rate: HandshakeRate::new(config.args.handshake_rate),
            config,
            authn,
            authz,
            signin,
            sessions: backends.sessions,
            refreshing: Default::default(),
            index: backends.index,
            metrics,
            audit,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }
}

impl Gateway {
    /// The lock that serializes refreshes of one browser session here.
    pub fn refresh_lock(&self, key: &sessions::SessionKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for are dropped, so the map stays as small as the set
        // of refreshes in flight.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key.0.clone()).or_default().clone()
    }
}

/// Serves `listener` (the public port) and `admin` (metrics and probes) until `shutdown`
/// resolves, then tells every client to reconnect and drains.
pub async fn run(
    gw: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    tracing::info!(addr = ?admin.local_addr().ok(), "admin listening");
    let admin_task = tokio::spawn(
        axum::serve(admin, server::admin_router(gw.clone()))
            .with_graceful_shutdown(gw.shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let app = server::router(gw.clone());
    // HTTP connections (not yet upgraded) are finished gracefully on shutdown.
    let http_conns = TaskTracker::new();
    let stop_http = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gw.config.args.handshake_timeout);
    tokio::pin!(shutdown);
    tracing::info!(addr = ?listener.local_addr().ok(), "gateway listening");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let svc = tower::ServiceExt::map_request(app.clone(), move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(server::Peer(peer));
                    req
                });
                let conn = http
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .with_upgrades();
                let stop = stop_http.clone();
                http_conns.spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = stop.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!(
        connections = gw.tasks.len(),
        "shutting down: telling clients to reconnect"
    );
    gw.shutdown.cancel();
    stop_http.cancel();
    gw.tasks.close();
    http_conns.close();
    let drain = gw.config.args.drain_timeout;
    let _ = tokio::time::timeout(drain, async {
        tokio::join!(gw.tasks.wait(), http_conns.wait());
    })
    .await;
    admin_task.abort();
    Ok(())
}
