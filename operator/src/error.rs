//! The one error type of the operator, and how each error is counted and retried.

use std::time::Duration;

/// Everything that can go wrong in the operator.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A request to the API server failed (network, timeout, 5xx, conflict...).
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),

    /// The object lacks a field the API server always sets; it cannot be reconciled.
    #[error("the object has no {0}")]
    MissingObjectKey(&'static str),

    /// The operator's own configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),

    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(#[source] kube_lease_manager::LeaseManagerError),
}

/// `Result` with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The `reason` label of `tether_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 429 => "TooManyRequests",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "Forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code >= 500 => "ServerError",
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "Connection",
            Error::MissingObjectKey(_) => "MissingObjectKey",
            Error::Config(_) => "Config",
            Error::Lease(_) => "Lease",
        }
    }

    /// Whether retrying the same request may succeed. A permanent error waits for a change of
    /// the object instead of retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => !matches!(s.code, 400 | 404 | 422),
            Error::Kube(_) | Error::Lease(_) => true,
            Error::MissingObjectKey(_) | Error::Config(_) => false,
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

/// Exponential backoff: `base * 2^attempt`, capped at `max`. Written out because the rule is
/// one line and the state (an attempt count per session) lives in the reconciler's map.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure("x", "Reason")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn server_errors_and_throttling_are_transient() {
        for code in [409, 429, 500, 503, 403] {
            assert!(api(code).is_transient(), "{code}");
        }
    }

    #[test]
    fn invalid_requests_and_missing_keys_are_permanent() {
        assert!(!api(422).is_transient());
        assert!(!api(400).is_transient());
        assert!(!Error::MissingObjectKey("metadata.uid").is_transient());
    }

    #[test]
    fn every_error_names_its_metric_label() {
        assert_eq!(api(409).metric_label(), "Conflict");
        assert_eq!(api(503).metric_label(), "ServerError");
        assert_eq!(
            Error::MissingObjectKey("x").metric_label(),
            "MissingObjectKey"
        );
    }

    #[test]
    fn backoff_doubles_and_stops_at_the_cap() {
        let b = |n| backoff(n, Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(b(0), Duration::from_secs(1));
        assert_eq!(b(3), Duration::from_secs(8));
        assert_eq!(b(9), Duration::from_secs(300));
        assert_eq!(b(u32::MAX), Duration::from_secs(300));
    }
}
