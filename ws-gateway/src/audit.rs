//! The audit log: one JSON line when an attach starts and exactly one when it ends (saying who
//! ended it), and one for every refused attempt.
//!
//! The end record is written by [`AuditRecord`]'s `Drop` if the connection task did not write it,
//! so a panic or a cancelled task still leaves one.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::authn::UserInfo;

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditLog {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    /// Where open attaches are kept so that a killed gateway's are closed by another
    /// ([`crate::ledger`]); unset without Kubernetes (tests, `--pod-name` unset).
    ledger: Arc<std::sync::OnceLock<crate::ledger::Ledger>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Arc::new(Mutex::new(out)),
            ledger: Arc::default(),
        }
    }

    /// `-` for stdout, a path to append to, or nothing for no audit log.
    pub fn open(spec: Option<&str>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match spec {
            None => Box::new(std::io::sink()),
            Some("-") => Box::new(std::io::stdout()),
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Ok(Self::new(out))
    }

    fn write(&self, value: serde_json::Value) {
        let mut line = value.to_string();
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Writes a refused attempt: the HTTP status and reason label of the refusal, the words the
    /// client read, who (when authenticated) and from where.
    #[allow(clippy::too_many_arguments)]
    pub fn refused(
        &self,
        user: Option<&UserInfo>,
        session: &str,
        mode: &str,
        source: &str,
        status: u16,
        reason: &str,
        error: &str,
    ) {
        self.write(json!({
            "event": "refused",
            "time": now_millis(),
            "user": user.map(|u| u.user.as_str()),
            "groups": user.map(|u| &u.groups),
            "session": session,
            "mode": mode,
            "source": source,
            "status": status,
            "reason": reason,
            "error": error,
        }));
    }

    /// Keeps open attaches in `ledger` from now on.
    pub fn set_ledger(&self, ledger: crate::ledger::Ledger) {
        let _ = self.ledger.set(ledger);
    }

    /// The end record of an attach whose gateway ended without writing it (from the ledger).
    pub fn orphan_end(&self, id: &str, start: &serde_json::Value, reason: &str) {
        self.write(json!({
            "event": "detach",
            "time": now_millis(),
            "id": id,
            "user": start["user"],
            "groups": start["groups"],
            "session": start["session"],
            "mode": start["mode"],
            "source": start["source"],
            "durationMs": (now_millis() as u64).saturating_sub(start["time"].as_u64().unwrap_or(0)),
            "endedBy": "gateway-crash",
            "closeCode": 1006,
            "closeReason": reason,
        }));
    }

    /// Writes the start record (after entering it in the ledger, when there is one) and
    /// returns the guard that writes the end record.
    pub async fn start(
        &self,
        user: &UserInfo,
        session: &str,
        mode: &'static str,
        source: &str,
    ) -> AuditRecord {
        let id = format!("{:032x}", rand::random::<u128>());
        let start = json!({
            "event": "attach",
            "time": now_millis(),
            "id": id,
            "user": user.user,
            "groups": user.groups,
            "session": session,
            "mode": mode,
            "source": source,
        });
        let ledger = self.ledger.get().cloned();
        if let Some(l) = &ledger {
            l.open(&id, start.clone()).await;
        }
        self.write(start);
        AuditRecord {
            ledger,
            log: self.clone(),
            id,
            user: user.clone(),
            session: session.into(),
            mode,
            source: source.into(),
            started: Instant::now(),
            bytes_to_agent: 0,
            bytes_to_client: 0,
            done: false,
        }
    }
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// One attach in progress.
#[derive(Debug)]
pub struct AuditRecord {
    ledger: Option<crate::ledger::Ledger>,
    log: AuditLog,
    id: String,
    user: UserInfo,
    session: String,
    mode: &'static str,
    source: String,
    started: Instant,
    pub bytes_to_agent: u64,
    pub bytes_to_client: u64,
    done: bool,
}

impl AuditRecord {
    /// Writes the end record (once). `ended_by` says who ended it: `client`, `agent`,
    /// `gateway-revoke`, `gateway-sign-out`, `gateway-shutdown`, `gateway-protocol`.
    pub fn finish(mut self, ended_by: &str, close_code: u16, close_reason: &str) {
        self.end(ended_by, close_code, close_reason);
    }

    fn end(&mut self, ended_by: &str, close_code: u16, close_reason: &str) {
        if self.done {
            return;
        }
        self.done = true;
        self.log.write(json!({
            "event": "detach",
            "time": now_millis(),
            "id": self.id,
            "user": self.user.user,
            "groups": self.user.groups,
            "session": self.session,
            "mode": self.mode,
            "source": self.source,
            "bytesToAgent": self.bytes_to_agent,
            "bytesToClient": self.bytes_to_client,
            "durationMs": self.started.elapsed().as_millis(),
            "endedBy": ended_by,
            "closeCode": close_code,
            "closeReason": close_reason,
        }));
        if let Some(l) = &self.ledger {
            l.close(&self.id);
        }
    }
}

impl Drop for AuditRecord {
    fn drop(&mut self) {
        self.end("gateway-error", 1011, "connection task ended unexpectedly");
    }
}
