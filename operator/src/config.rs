//! What the administrator decides for every session: defaults, limits, the gateway's identity
//! and the egress policy. The builders read only [`Settings`]; the command line ([`Args`]) is
//! one way to fill it, tests build it directly.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::{Error, Result};

/// Requests or limits of CPU, memory and ephemeral storage, as Kubernetes quantities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Amounts {
    /// CPU, for example `100m`.
    pub cpu: String,
    /// Memory, for example `256Mi`.
    pub memory: String,
    /// Ephemeral storage (home directory, /tmp, recordings, logs), for example `1Gi`.
    pub ephemeral_storage: String,
}

/// Which pods may open connections to session agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySelector {
    /// Namespace the gateway runs in.
    pub namespace: String,
    /// Labels every gateway pod carries.
    pub pod_labels: BTreeMap<String, String>,
}

/// Where session pods may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    /// Allow DNS (UDP and TCP port 53) to any address, so names resolve.
    pub dns: bool,
    /// Address blocks the shell may reach on any port, for example `10.0.0.0/8` or `0.0.0.0/0`.
    pub cidrs: Vec<String>,
}

/// Everything the pure builders need beyond the session itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Image of session pods whose spec names none.
    pub image: String,
    /// Shell argv of sessions whose spec names none.
    pub command: Vec<String>,
    /// Idle timeout of sessions whose spec sets none.
    pub idle_timeout_seconds: i64,
    /// Maximum lifetime of sessions whose spec sets none; becomes `activeDeadlineSeconds`.
    pub max_lifetime_seconds: i64,
    /// Requests of sessions that set neither a request nor a limit for a resource.
    pub requests: Amounts,
    /// Limits of sessions that set neither a request nor a limit for a resource.
    pub limits: Amounts,
    /// RuntimeClass of every session pod (gVisor, Kata...), when the cluster has one.
    pub runtime_class_name: Option<String>,
    /// PEM text of the gateway's Ed25519 public key; the agent verifies attach tickets with it.
    pub ticket_public_key: String,
    /// Non-root user and group the shell runs as.
    pub run_as_user: i64,
    /// Gateway pods, the only ones allowed to reach session agents.
    pub gateway: GatewaySelector,
    /// Egress of session pods.
    pub egress: Egress,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            command: vec!["/bin/bash".into(), "-l".into()],
            idle_timeout_seconds: 3600,
            max_lifetime_seconds: 86400,
            requests: Amounts {
                cpu: "100m".into(),
                memory: "128Mi".into(),
                ephemeral_storage: "256Mi".into(),
            },
            limits: Amounts {
                cpu: "1".into(),
                memory: "512Mi".into(),
                ephemeral_storage: "1Gi".into(),
            },
            runtime_class_name: None,
            ticket_public_key: String::new(),
            run_as_user: 1000,
            gateway: GatewaySelector {
                namespace: "tether-system".into(),
                pod_labels: BTreeMap::from([(
                    "app.kubernetes.io/name".into(),
                    "tether-gateway".into(),
                )]),
            },
            egress: Egress {
                dns: true,
                cidrs: Vec::new(),
            },
        }
    }
}

/// The image tag follows the operator's own version, so one chart version pins both.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/tether-dev/tether:", env!("CARGO_PKG_VERSION"));

/// Reconciles TerminalSessions into sandboxed session pods.
///
/// Every flag can also be set through the environment variable named in brackets.
#[derive(Parser, Debug, Clone)]
#[command(name = "tether-operator", version, about, long_about = None)]
pub struct Args {
    /// Address of the HTTP server for /metrics, /healthz and /readyz. Port 0 picks a free port,
    /// which is logged.
    #[arg(long, env = "TETHER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// File holding the PEM Ed25519 public key of the gateway; session agents verify attach
    /// tickets with it. It is public: it goes into the pod spec.
    #[arg(long, env = "TETHER_TICKET_PUBLIC_KEY_FILE")]
    pub ticket_public_key_file: PathBuf,

    /// Image of session pods whose spec sets none.
    #[arg(long, env = "TETHER_SESSION_IMAGE", default_value = DEFAULT_IMAGE)]
    pub session_image: String,

    /// Shell of sessions whose spec sets none, as a JSON array.
    #[arg(
        long,
        env = "TETHER_DEFAULT_COMMAND",
        default_value = r#"["/bin/bash","-l"]"#
    )]
    pub default_command: String,

    /// Idle timeout of sessions whose spec sets none, in seconds.
    #[arg(long, env = "TETHER_DEFAULT_IDLE_TIMEOUT_SECONDS", default_value_t = 3600,
          value_parser = clap::value_parser!(i64).range(5..=tether_api::MAX_IDLE_TIMEOUT_SECONDS))]
    pub default_idle_timeout_seconds: i64,

    /// Maximum lifetime of sessions whose spec sets none, in seconds.
    #[arg(long, env = "TETHER_DEFAULT_MAX_LIFETIME_SECONDS", default_value_t = 86400,
          value_parser = clap::value_parser!(i64).range(10..=tether_api::MAX_LIFETIME_SECONDS))]
    pub default_max_lifetime_seconds: i64,

    /// Default CPU request of session pods.
    #[arg(long, env = "TETHER_DEFAULT_CPU_REQUEST", default_value = "100m")]
    pub default_cpu_request: String,
    /// Default CPU limit of session pods.
    #[arg(long, env = "TETHER_DEFAULT_CPU_LIMIT", default_value = "1")]
    pub default_cpu_limit: String,
    /// Default memory request of session pods.
    #[arg(long, env = "TETHER_DEFAULT_MEMORY_REQUEST", default_value = "128Mi")]
    pub default_memory_request: String,
    /// Default memory limit of session pods.
    #[arg(long, env = "TETHER_DEFAULT_MEMORY_LIMIT", default_value = "512Mi")]
    pub default_memory_limit: String,
    /// Default ephemeral-storage request of session pods (home, /tmp and recordings live there).
    #[arg(
        long,
        env = "TETHER_DEFAULT_EPHEMERAL_STORAGE_REQUEST",
        default_value = "256Mi"
    )]
    pub default_ephemeral_storage_request: String,
    /// Default ephemeral-storage limit of session pods.
    #[arg(
        long,
        env = "TETHER_DEFAULT_EPHEMERAL_STORAGE_LIMIT",
        default_value = "1Gi"
    )]
    pub default_ephemeral_storage_limit: String,

    /// RuntimeClass of every session pod (for example gvisor). Unset: the cluster default.
    #[arg(long, env = "TETHER_RUNTIME_CLASS_NAME")]
    pub runtime_class_name: Option<String>,

    /// Non-root UID (and GID) the shell runs as.
    #[arg(long, env = "TETHER_RUN_AS_USER", default_value_t = 1000,
          value_parser = clap::value_parser!(i64).range(1..=2147483647))]
    pub run_as_user: i64,

    /// Namespace of the gateway pods, the only pods allowed to reach session agents.
    #[arg(
        long,
        env = "TETHER_GATEWAY_NAMESPACE",
        default_value = "tether-system"
    )]
    pub gateway_namespace: String,

    /// A label of gateway pods, as key=value; repeat the flag for several (comma-separated in
    /// the environment).
    #[arg(long = "gateway-pod-label", env = "TETHER_GATEWAY_POD_LABELS", value_delimiter = ',',
          default_value = "app.kubernetes.io/name=tether-gateway", value_parser = parse_label)]
    pub gateway_pod_labels: Vec<(String, String)>,

    /// Allow session pods DNS (port 53) to any address.
    #[arg(long, env = "TETHER_EGRESS_DNS", default_value_t = true, action = clap::ArgAction::Set)]
    pub egress_dns: bool,

    /// An address block session pods may reach on any port (for example 0.0.0.0/0 for the
    /// internet); repeat the flag for several (comma-separated in the environment).
    #[arg(
        long = "egress-cidr",
        env = "TETHER_EGRESS_CIDRS",
        value_delimiter = ','
    )]
    pub egress_cidrs: Vec<String>,

    /// Watch sessions in this namespace only. Unset: every namespace.
    #[arg(long, env = "TETHER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Sessions reconciled at the same time.
    #[arg(long, env = "TETHER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Take part in leader election, so only one replica acts at a time.
    #[arg(long, env = "TETHER_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(long, env = "TETHER_LEASE_NAME", default_value = "tether-operator")]
    pub lease_name: String,

    /// Namespace of the Lease; in a pod, its own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tether-system")]
    pub lease_namespace: String,

    /// Identity of this replica in the Lease. A restarted container keeps its pod's name and so
    /// takes its lease back at once; two live replicas must differ. Default: hostname and a
    /// random suffix.
    #[arg(long, env = "POD_NAME")]
    pub leader_identity: Option<String>,

    /// Seconds a leader's lease stays valid without renewal: how long a crashed leader's
    /// replacement waits.
    #[arg(long, env = "TETHER_LEASE_DURATION_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration_seconds: u64,

    /// Seconds before expiry at which the leader renews; also the clock skew tolerated.
    #[arg(long, env = "TETHER_LEASE_GRACE_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub lease_grace_seconds: u64,

    /// Log format: text or json.
    #[arg(long, env = "TETHER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not a key=value label")),
    }
}

impl Args {
    /// The builders' settings, reading the ticket key file.
    pub fn settings(&self) -> Result<Settings> {
        let key = std::fs::read_to_string(&self.ticket_public_key_file).map_err(|e| {
            Error::Config(format!(
                "cannot read --ticket-public-key-file {}: {e}",
                self.ticket_public_key_file.display()
            ))
        })?;
        if !key.contains("-----BEGIN PUBLIC KEY-----") {
            return Err(Error::Config(format!(
                "{} holds no PEM public key (-----BEGIN PUBLIC KEY-----)",
                self.ticket_public_key_file.display()
            )));
        }
        let command: Vec<String> = serde_json::from_str(&self.default_command).map_err(|e| {
            Error::Config(format!(
                "--default-command must be a JSON array of strings: {e}"
            ))
        })?;
        if command.is_empty() {
            return Err(Error::Config("--default-command must not be empty".into()));
        }
        Ok(Settings {
            image: self.session_image.clone(),
            command,
            idle_timeout_seconds: self.default_idle_timeout_seconds,
            max_lifetime_seconds: self.default_max_lifetime_seconds,
            requests: Amounts {
                cpu: self.default_cpu_request.clone(),
                memory: self.default_memory_request.clone(),
                ephemeral_storage: self.default_ephemeral_storage_request.clone(),
            },
            limits: Amounts {
                cpu: self.default_cpu_limit.clone(),
                memory: self.default_memory_limit.clone(),
                ephemeral_storage: self.default_ephemeral_storage_limit.clone(),
            },
            runtime_class_name: self.runtime_class_name.clone().filter(|s| !s.is_empty()),
            ticket_public_key: key,
            run_as_user: self.run_as_user,
            gateway: GatewaySelector {
                namespace: self.gateway_namespace.clone(),
                pod_labels: self.gateway_pod_labels.iter().cloned().collect(),
            },
            egress: Egress {
                dns: self.egress_dns,
                cidrs: self.egress_cidrs.clone(),
            },
        })
    }

    /// How long a leader's lease lasts and how early it renews.
    pub fn lease_timing(&self) -> (Duration, Duration) {
        (
            Duration::from_secs(self.lease_duration_seconds),
            Duration::from_secs(self.lease_grace_seconds),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_into_settings_equal_to_the_builtin_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "tether-operator",
            "--ticket-public-key-file",
            key.to_str().unwrap(),
        ])
        .unwrap();
        let settings = args.settings().unwrap();
        let expected = Settings {
            ticket_public_key: settings.ticket_public_key.clone(),
            ..Settings::default()
        };
        assert_eq!(settings, expected);
        assert!(args.leader_election);
    }

    #[test]
    fn gateway_labels_and_egress_cidrs_repeat() {
        let args = Args::try_parse_from([
            "tether-operator",
            "--ticket-public-key-file=/k",
            "--gateway-pod-label=app=gw",
            "--gateway-pod-label=tier=edge",
            "--egress-cidr=10.0.0.0/8",
            "--egress-cidr=192.168.0.0/16",
            "--egress-dns=false",
        ])
        .unwrap();
        assert_eq!(
            args.gateway_pod_labels,
            vec![("app".into(), "gw".into()), ("tier".into(), "edge".into())]
        );
        assert_eq!(args.egress_cidrs, vec!["10.0.0.0/8", "192.168.0.0/16"]);
        assert!(!args.egress_dns);
    }

    #[test]
    fn a_label_without_equals_sign_is_refused() {
        assert!(
            Args::try_parse_from([
                "x",
                "--ticket-public-key-file=/k",
                "--gateway-pod-label=app"
            ])
            .is_err()
        );
    }

    #[test]
    fn a_key_file_without_pem_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let args =
            Args::try_parse_from(["x", "--ticket-public-key-file", key.to_str().unwrap()]).unwrap();
        let err = args.settings().unwrap_err().to_string();
        assert!(err.contains("key.pem"), "{err}");
    }
}
