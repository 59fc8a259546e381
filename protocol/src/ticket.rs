//! Attach tickets: short-lived, single-use JWTs signed by the gateway with Ed25519 (`EdDSA`) and
//! verified by the session agent with the gateway's public key.
//!
//! The agent trusts nothing else: a ticket names the user (`sub`), the session (`sid`
//! `namespace/name` and `suid` the resource UID, so a recreated session of the same name does
//! not accept old tickets), the mode, and expires at most [`MAX_LIFETIME_SECS`] after it was
//! issued. Its `jti` is remembered until it expires so it cannot be used twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{CloseCode, Mode};

/// `iss` of every ticket.
pub const ISSUER: &str = "tether-gateway";
/// `aud` of every ticket.
pub const AUDIENCE: &str = "tether-agent";
/// A ticket may live at most this long (`exp - iat`).
pub const MAX_LIFETIME_SECS: u64 = 60;
/// Clock skew tolerated between gateway and agent.
pub const LEEWAY_SECS: u64 = 5;

/// The claims of an attach ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The user, as the gateway authenticated them.
    pub sub: String,
    /// The session, `namespace/name`.
    pub sid: String,
    /// The session's resource UID.
    pub suid: String,
    /// The UID of the session pod the gateway dials (`status.podUID`). An agent that knows its
    /// own pod's UID refuses a ticket for any other pod, and one without this claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub mode: TicketMode,
    pub iat: u64,
    pub exp: u64,
    /// Random, single use.
    pub jti: String,
}

/// `mode` as it appears in the JSON claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TicketMode {
    Attach,
    Observe,
}

impl From<TicketMode> for Mode {
    fn from(m: TicketMode) -> Mode {
        match m {
            TicketMode::Attach => Mode::Attach,
            TicketMode::Observe => Mode::Observe,
        }
    }
}

impl From<Mode> for TicketMode {
    fn from(m: Mode) -> TicketMode {
        match m {
            Mode::Attach => TicketMode::Attach,
            Mode::Observe => TicketMode::Observe,
        }
    }
}

/// Why a ticket was refused.
#[derive(Debug, Error)]
pub enum TicketError {
    #[error("no attach ticket")]
    Missing,
    #[error("invalid key: {0}")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("ticket rejected: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("ticket lifetime {0}s exceeds {MAX_LIFETIME_SECS}s")]
    LifetimeTooLong(u64),
    #[error("ticket expired")]
    Expired,
    #[error("ticket is for session {sid} ({suid})")]
    WrongSession { sid: String, suid: String },
    #[error("ticket is for pod {pod:?}, not this one")]
    WrongPod { pod: String },
    #[error("ticket already used")]
    Replayed,
    #[error("could not sign ticket: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

impl TicketError {
    /// The close code a connection presenting this ticket is closed with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            TicketError::Missing => CloseCode::TICKET_REQUIRED,
            TicketError::Expired => CloseCode::TICKET_EXPIRED,
            TicketError::WrongSession { .. } | TicketError::WrongPod { .. } => {
                CloseCode::WRONG_SESSION
            }
            TicketError::Replayed => CloseCode::TICKET_REPLAYED,
            TicketError::Key(_) | TicketError::Sign(_) => CloseCode::INTERNAL,
            TicketError::Invalid(_) | TicketError::LifetimeTooLong(_) => CloseCode::TICKET_INVALID,
        }
    }
}

pub type Result<T, E = TicketError> = std::result::Result<T, E>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the gateway puts in a ticket.
#[derive(Debug, Clone)]
pub struct TicketRequest<'a> {
    pub user: &'a str,
    /// `namespace/name`.
    pub session: &'a str,
    pub session_uid: &'a str,
    /// The session pod's UID (`status.podUID`), when the status records one.
    pub pod_uid: Option<&'a str>,
    pub mode: Mode,
    /// Seconds until expiry, capped at [`MAX_LIFETIME_SECS`].
    pub ttl_secs: u64,
}

/// Signs tickets with the gateway's Ed25519 private key.
pub struct Signer {
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// From a PKCS#8 PEM Ed25519 private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(private_key_pem: &str) -> Result<Self> {
        Ok(Self {
            key: EncodingKey::from_ed_pem(private_key_pem.as_bytes()).map_err(TicketError::Key)?,
        })
    }

    /// Mints a ticket valid from now.
    pub fn mint(&self, req: &TicketRequest<'_>) -> Result<String> {
        self.mint_at(req, now_secs())
    }

    /// Mints a ticket as if issued at `iat` (seconds since the epoch); for tests of expiry.
    pub fn mint_at(&self, req: &TicketRequest<'_>, iat: u64) -> Result<String> {
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: req.user.into(),
            sid: req.session.into(),
            suid: req.session_uid.into(),
            pod: req.pod_uid.map(Into::into),
            mode: req.mode.into(),
            iat,
            exp: iat + req.ttl_secs.min(MAX_LIFETIME_SECS),
            jti: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(rand::random::<[u8; 16]>()),
        };
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims, unchecked; for tests that need a bad ticket.
    pub fn sign_claims(&self, claims: &Claims) -> Result<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.key)
            .map_err(TicketError::Sign)
    }
}

/// Mints one ticket with a PEM private key; see [`Signer`] to sign many.
pub fn mint(private_key_pem: &str, req: &TicketRequest<'_>) -> Result<String> {
    Signer::from_pem(private_key_pem)?.mint(req)
}

/// Verifies tickets for one session. Cheap to share behind an `Arc`.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    session: String,
    session_uid: String,
    /// This agent's pod UID, when it knows it (the downward API in a session pod).
    pod_uid: Option<String>,
    /// jti → exp; entries are dropped once the ticket could no longer pass the expiry check.
    seen: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("session", &self.session)
            .field("session_uid", &self.session_uid)
            .finish()
    }
}

impl Verifier {
    /// From the gateway's PEM public key (`-----BEGIN PUBLIC KEY-----`) and the session this agent
    /// serves.
    pub fn new(public_key_pem: &str, session: &str, session_uid: &str) -> Result<Self> {
        let key = DecodingKey::from_ed_pem(public_key_pem.as_bytes()).map_err(TicketError::Key)?;
        // The algorithm is pinned: a token whose header names anything else is refused.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        Ok(Self {
            key,
            validation,
            session: session.into(),
            session_uid: session_uid.into(),
            pod_uid: None,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Accept only tickets naming this pod UID in `pod`.
    pub fn for_pod(mut self, pod_uid: Option<String>) -> Self {
        self.pod_uid = pod_uid.filter(|u| !u.is_empty());
        self
    }

    /// Verifies a ticket and marks it used.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        self.verify_at(token, now_secs())
    }

    fn verify_at(&self, token: &str, now: u64) -> Result<Claims> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TicketError::Expired,
                _ => TicketError::Invalid(e),
            },
        )?;
        let claims = data.claims;
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if claims.exp < claims.iat || lifetime > MAX_LIFETIME_SECS {
            return Err(TicketError::LifetimeTooLong(lifetime));
        }
        if claims.iat > now + LEEWAY_SECS {
            // Issued in the future: a clock far off or a forged lifetime; either way refuse.
            return Err(TicketError::LifetimeTooLong(lifetime));
        }
        if claims.sid != self.session || claims.suid != self.session_uid {
            return Err(TicketError::WrongSession {
                sid: claims.sid,
                suid: claims.suid,
            });
        }
        if let Some(mine) = &self.pod_uid
            && claims.pod.as_deref() != Some(mine.as_str())
        {
            return Err(TicketError::WrongPod {
                pod: claims.pod.unwrap_or_default(),
            });
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, exp| *exp + LEEWAY_SECS >= now);
        if seen.insert(claims.jti.clone(), claims.exp).is_some() {
            return Err(TicketError::Replayed);
        }
        Ok(claims)
    }

    /// How many used tickets are remembered (for tests and metrics).
    pub fn remembered(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Extracts the ticket from an `Authorization` header value (`Bearer <jwt>`).
pub fn from_authorization(value: Option<&str>) -> Result<&str> {
    let v = value.ok_or(TicketError::Missing)?.trim();
    let (scheme, token) = v.split_once(' ').ok_or(TicketError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(TicketError::Missing);
    }
    Ok(token.trim())
}

/// A fresh Ed25519 key pair as PEM `(private PKCS#8, public SPKI)`; for tests and development
/// setups (production keys come from a Secret).
pub fn generate_keypair() -> (String, String) {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
    let signing = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let private = signing
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encode ed25519 private key")
        .to_string();
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("encode ed25519 public key");
    (private, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(mode: Mode) -> TicketRequest<'static> {
        TicketRequest {
            user: "alice",
            session: "team-a/dev",
            session_uid: "uid-1",
            pod_uid: None,
            mode,
            ttl_secs: 30,
        }
    }

    #[test]
    fn an_agent_that_knows_its_pod_accepts_only_tickets_for_that_pod() {
        let (private, public) = generate_keypair();
        let signer = Signer::from_pem(&private).unwrap();
        let mine = Verifier::new(&public, "team-a/dev", "uid-1")
            .unwrap()
            .for_pod(Some("pod-1".into()));
        let for_pod = |pod| {
            signer
                .mint(&TicketRequest {
                    pod_uid: pod,
                    ..req(Mode::Attach)
                })
                .unwrap()
        };
        assert_eq!(
            mine.verify(&for_pod(Some("pod-1"))).unwrap().pod.as_deref(),
            Some("pod-1")
        );
        for other in [Some("squatter-pod"), None] {
            let e = mine.verify(&for_pod(other)).unwrap_err();
            assert!(matches!(e, TicketError::WrongPod { .. }), "{other:?}: {e}");
            assert_eq!(e.close_code(), CloseCode::WRONG_SESSION);
        }
        // An agent that does not know its pod (outside Kubernetes) checks the session only.
        let anywhere = Verifier::new(&public, "team-a/dev", "uid-1").unwrap();
        assert!(anywhere.verify(&for_pod(Some("pod-1"))).is_ok());
    }

    #[test]
    fn a_minted_ticket_verifies_once() {
        let (private, public) = generate_keypair();
        let token = mint(&private, &req(Mode::Observe)).unwrap();
        let v = Verifier::new(&public, "team-a/dev", "uid-1").unwrap();
        let claims = v.verify(&token).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.mode),
            ("alice", TicketMode::Observe)
        );
        assert_eq!(
            v.verify(&token).unwrap_err().close_code(),
            CloseCode::TICKET_REPLAYED
        );
    }

    #[test]
    fn expired_forged_and_wrong_session_tickets_are_refused() {
        let (private, public) = generate_keypair();
        let (other_private, _) = generate_keypair();
        let signer = Signer::from_pem(&private).unwrap();
        let v = Verifier::new(&public, "team-a/dev", "uid-1").unwrap();

        let old = signer
            .mint_at(&req(Mode::Attach), now_secs() - 120)
            .unwrap();
        assert_eq!(
            v.verify(&old).unwrap_err().close_code(),
            CloseCode::TICKET_EXPIRED
        );

        let forged = mint(&other_private, &req(Mode::Attach)).unwrap();
        assert_eq!(
            v.verify(&forged).unwrap_err().close_code(),
            CloseCode::TICKET_INVALID
        );

        let other = Verifier::new(&public, "team-a/dev", "uid-2").unwrap();
        let t = signer.mint(&req(Mode::Attach)).unwrap();
        assert_eq!(
            other.verify(&t).unwrap_err().close_code(),
            CloseCode::WRONG_SESSION
        );

        let mut long = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "a".into(),
            sid: "team-a/dev".into(),
            suid: "uid-1".into(),
            pod: None,
            mode: TicketMode::Attach,
            iat: now_secs(),
            exp: now_secs() + 3600,
            jti: "x".into(),
        };
        let t = signer.sign_claims(&long).unwrap();
        assert_eq!(
            v.verify(&t).unwrap_err().close_code(),
            CloseCode::TICKET_INVALID
        );

        long.exp = long.iat + 10;
        long.aud = "someone-else".into();
        let t = signer.sign_claims(&long).unwrap();
        assert_eq!(
            v.verify(&t).unwrap_err().close_code(),
            CloseCode::TICKET_INVALID
        );

        // alg=none / HS256 with the public key as secret: the pinned algorithm refuses both.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &long,
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            v.verify(&hs).unwrap_err().close_code(),
            CloseCode::TICKET_INVALID
        );
        assert_eq!(
            v.verify("garbage").unwrap_err().close_code(),
            CloseCode::TICKET_INVALID
        );
    }

    #[test]
    fn used_tickets_are_forgotten_after_expiry() {
        let (private, public) = generate_keypair();
        let signer = Signer::from_pem(&private).unwrap();
        let v = Verifier::new(&public, "team-a/dev", "uid-1").unwrap();
        let now = now_secs();
        let t = signer.mint(&req(Mode::Attach)).unwrap();
        v.verify_at(&t, now).unwrap();
        assert_eq!(v.remembered(), 1);
        // Any later verification prunes entries that can no longer pass the expiry check.
        let t2 = signer.mint(&req(Mode::Attach)).unwrap();
        let _ = v.verify_at(&t2, now + 200);
        assert_eq!(v.remembered(), 1);
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(from_authorization(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(from_authorization(Some("bearer  abc ")).unwrap(), "abc");
        assert!(from_authorization(Some("Basic abc")).is_err());
        assert!(from_authorization(Some("Bearer ")).is_err());
        assert!(from_authorization(None).is_err());
    }
}
