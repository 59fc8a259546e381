//! Browser sessions, kept on the server.
//!
//! A browser that signed in holds one cookie: a random 256-bit session ID, encrypted with the
//! gateway's session key (so a forged or altered cookie is refused before any lookup). The
//! session itself (who, until when, the refresh token) lives on the server, in a Kubernetes
//! Secret in the gateway's namespace named after the SHA-256 of the ID; every replica watches
//! those Secrets, so a sign-in on one replica is known to the others and a sign-out (the
//! Secret deleted) makes a copied cookie useless everywhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use crate::authn::{UserInfo, Via};

/// Label on every browser-session Secret (the watch selects on it).
pub const SESSION_LABEL: &str = "tether.dev/browser-session";
/// Key of the session's JSON in the Secret.
const DATA_KEY: &str = "session.json";
/// The Secret type of a browser session.
pub const SECRET_TYPE: &str = "tether.dev/browser-session";

/// What the server knows about a signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrowserSession {
    pub user: UserInfo,
    pub via: Via,
    /// The provider's subject (`sub`); a refreshed ID token must name the same one.
    #[serde(default)]
    pub subject: Option<String>,
    /// Seconds since the epoch: the session ends here unless refreshed (never later than the
    /// ID token it was made from).
    pub expires_at: u64,
    /// Seconds since the epoch: no refresh carries the session past this.
    pub absolute_end: u64,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// For the provider's sign-out (`id_token_hint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    unix_secs(SystemTime::now())
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

impl BrowserSession {
    pub fn expires(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.expires_at)
    }

    pub fn is_expired(&self) -> bool {
        now_secs() >= self.expires_at
    }
}

/// The store's name for a session: hex SHA-256 of its ID. The ID itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey(pub String);

impl SessionKey {
    pub fn of(sid: &str) -> Self {
        use sha2::Digest as _;
        SessionKey(hex::encode(sha2::Sha256::digest(sid.as_bytes())))
    }

    fn secret_name(&self) -> String {
        format!("tether-signin-{}", &self.0[..40])
    }
}

/// A stored session and the version it was read at (for compare-and-swap updates).
#[derive(Debug, Clone)]
pub struct Versioned {
    pub session: BrowserSession,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the session changed meanwhile")]
    Conflict,
    #[error("cannot reach the session store: {0}")]
    Unavailable(String),
}

/// Where browser sessions live.
pub trait SessionStore: std::fmt::Debug + Send + Sync + 'static {
    fn create<'a>(
        &'a self,
        key: &'a SessionKey,
        session: &'a BrowserSession,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn get<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>>;
    /// Replaces the session if it is still at `version`.
    fn update<'a>(
        &'a self,
        key: &'a SessionKey,
        session: &'a BrowserSession,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Deleting a session that is not there is not an error.
    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The session as the store has it now, bypassing any cache (before a refresh).
    fn get_fresh<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        self.get(key)
    }
    /// Deletes the session only if it is still at `version` (a refresh elsewhere wins).
    fn delete_if<'a>(
        &'a self,
        key: &'a SessionKey,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl BrowserSession {
    /// Whether nothing can make this session valid again: past its end with no refresh left.
    pub fn is_over(&self, now: u64) -> bool {
        now >= self.absolute_end || (now >= self.expires_at && self.refresh_token.is_none())
    }
}

/// Sessions in this process only: for tests and a single gateway without Kubernetes.
#[derive(Debug, Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<SessionKey, (u64, BrowserSession)>>,
}

impl SessionStore for MemoryStore {
    fn create<'a>(
        &'a self,
        key: &'a SessionKey,
        session: &'a BrowserSession,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(key.clone(), (1, session.clone()));
        Box::pin(async { Ok(()) })
    }

    fn get<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.get(key).map(|(v, s)| Versioned {
            session: s.clone(),
            version: v.to_string(),
        });
        Box::pin(async { Ok(v) })
    }

    fn update<'a>(
        &'a self,
        key: &'a SessionKey,
        session: &'a BrowserSession,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let r = match m.get_mut(key) {
            Some((v, s)) if v.to_string() == version => {
                *v += 1;
                *s = session.clone();
                Ok(())
            }
            _ => Err(StoreError::Conflict),
        };
        Box::pin(async { r })
    }

    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<(), StoreError>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        Box::pin(async { Ok(()) })
    }

    fn delete_if<'a>(
        &'a self,
        key: &'a SessionKey,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let r = match m.get(key) {
            Some((v, _)) if v.to_string() != version => Err(StoreError::Conflict),
            _ => {
                m.remove(key);
                Ok(())
            }
        };
        Box::pin(async { r })
    }
}

/// Sessions as Secrets in the gateway's namespace, read from a watch-fed cache.
#[derive(Clone)]
pub struct SecretStore {
    api: Api<Secret>,
    cache: Store<Secret>,
    namespace: String,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore")
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl SecretStore {
    /// Starts the watch of session Secrets in `namespace` (and a sweep of expired ones).
    pub fn start(client: Client, namespace: &str) -> Self {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let (cache, writer) = reflector::store();
        let config = watcher::Config::default().labels(SESSION_LABEL);
        let stream = reflector::reflector(writer, watcher(api.clone(), config))
            .default_backoff()
            .applied_objects();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            let mut stream = std::pin::pin!(stream);
            while let Some(r) = stream.next().await {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "watching browser sessions");
                }
            }
        });
        let store = Self {
            api,
            cache,
            namespace: namespace.to_owned(),
        };
        let sweeper = store.clone();
        tokio::spawn(async move { sweeper.sweep_forever().await });
        store
    }

    /// Deletes sessions that ended (every replica does it; a second delete is harmless).
    async fn sweep_forever(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(300));
        loop {
            tick.tick().await;
            let now = now_secs();
            for s in self.cache.state() {
                let parsed = parse(&s);
                if !parsed.as_ref().is_none_or(|v| v.session.is_over(now)) {
                    continue;
                }
                let Some(name) = s.metadata.name.as_deref() else {
                    continue;
                };
                // Only the version we judged: a refresh elsewhere meanwhile keeps it.
                let dp = DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        resource_version: s.metadata.resource_version.clone(),
                        uid: None,
                    }),
                    ..Default::default()
                };
                let _ = self.api.delete(name, &dp).await;
            }
        }
    }
}

fn parse(secret: &Secret) -> Option<Versioned> {
    let bytes = secret.data.as_ref()?.get(DATA_KEY)?;
    let session = serde_json::from_slice(&bytes.0).ok()?;
    Some(Versioned {
        session,
        version: secret.metadata.resource_version.clone().unwrap_or_default(),
    })
}

fn secret_for(key: &SessionKey, session: &BrowserSession, version: Option<&str>) -> Secret {
    let json = serde_json::to_vec(session).unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            name: Some(key.secret_name()),
            labels: Some(
                [
                    (SESSION_LABEL.to_owned(), "true".to_owned()),
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "tether-gateway".to_owned(),
                    ),
                ]
                .into(),
            ),
            resource_version: version.map(str::to_owned),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some([(DATA_KEY.to_owned(), ByteString(json))].into()),
        ..Default::default()
    }
}

fn unavailable(e: kube::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SessionStore for SecretStore {
    fn create<'a>(
        &'a self,
        key: &'a SessionKey,
        session: &'a BrowserSession,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.api
                .create(&PostParams::default(), &secret_for(key, session, None))
                .await
                .map(drop)
                .map_err(unavailable)
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        Box::pin(async move {
            let name = key.secret_name();
            let r = ObjectRef::new(&name).within(&self.namespace);
            if let Some(s) = self.cache.get(&r) {
                return Ok(parse(&s));
            }
            // Made a moment ago by another replica, before its watch event arrived here.
            Ok(self
                .api
                .get_opt(&name)
                .await
                .map_err(unavailable)?
                .as_ref()
                .and_then(parse))
        })
    }

    fn update<'a>(
        &'a self,
        key: &'a SessionKey,
        session: &'a BrowserSession,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let name = key.secret_name();
            match self
                .api
                .replace(
                    &name,
                    &PostParams::default(),
                    &secret_for(key, session, Some(version)),
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self
                .api
                .delete(&key.secret_name(), &DeleteParams::default())
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn get_fresh<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .api
                .get_opt(&key.secret_name())
                .await
                .map_err(unavailable)?
                .as_ref()
                .and_then(parse))
        })
    }

    fn delete_if<'a>(
        &'a self,
        key: &'a SessionKey,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dp = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    resource_version: Some(version.to_owned()),
                    uid: None,
                }),
                ..Default::default()
            };
            match self.api.delete(&key.secret_name(), &dp).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Err(StoreError::Conflict),
                Err(e) => Err(unavailable(e)),
            }
        })
    }
}

/// A shared store.
pub type SharedStore = Arc<dyn SessionStore>;

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> BrowserSession {
        BrowserSession {
            user: UserInfo {
                user: "a@x.test".into(),
                groups: vec!["devs".into()],
            },
            via: Via::Oidc,
            subject: Some("123".into()),
            expires_at: now_secs() + 60,
            absolute_end: now_secs() + 3600,
            created_at: now_secs(),
            refresh_token: Some("r".into()),
            id_token: None,
        }
    }

    #[test]
    fn the_secret_is_named_by_the_hash_and_never_holds_the_id() {
        let key = SessionKey::of("the-session-id");
        let secret = secret_for(&key, &session(), None);
        let name = secret.metadata.name.clone().unwrap();
        assert!(
            name.starts_with("tether-signin-") && name.len() <= 63,
            "{name}"
        );
        let text = serde_json::to_string(&secret).unwrap();
        assert!(!text.contains("the-session-id"));
        assert_eq!(parse(&secret).unwrap().session, session());
    }

    #[tokio::test]
    async fn updates_are_compare_and_swap() {
        let store = MemoryStore::default();
        let key = SessionKey::of("x");
        store.create(&key, &session()).await.unwrap();
        let v = store.get(&key).await.unwrap().unwrap();
        store.update(&key, &session(), &v.version).await.unwrap();
        assert!(matches!(
            store.update(&key, &session(), &v.version).await,
            Err(StoreError::Conflict)
        ));
        store.delete(&key).await.unwrap();
        assert!(store.get(&key).await.unwrap().is_none());
    }
}
