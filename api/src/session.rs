//! `TerminalSession` spec and status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Upper bound of `idleTimeoutSeconds`: a week.
pub const MAX_IDLE_TIMEOUT_SECONDS: i64 = 7 * 24 * 3600;
/// Upper bound of `maxLifetimeSeconds`: thirty days.
pub const MAX_LIFETIME_SECONDS: i64 = 30 * 24 * 3600;
/// Largest terminal the protocol and the schema accept, in columns.
pub const MAX_COLS: u16 = 1000;
/// Largest terminal the protocol and the schema accept, in rows.
pub const MAX_ROWS: u16 = 500;

/// A terminal session: a sandboxed pod running a tmux session that browsers attach to.
///
/// The spec is immutable once created, like a Job's template: a running shell cannot be
/// reconfigured in place, so a change means a new session.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "TerminalSession",
    plural = "terminalsessions",
    singular = "terminalsession",
    shortname = "ts",
    category = "tether",
    namespaced,
    status = "TerminalSessionStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the session is in its life"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether a browser can attach now"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason","description":"Why the session is in its phase"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName","priority":1,"description":"The session pod"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1,"description":"What happened, in words"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: delete the session and create a new one"))]
#[x_kube(validation = Rule::new("!has(self.idleTimeoutSeconds) || !has(self.maxLifetimeSeconds) || self.idleTimeoutSeconds <= self.maxLifetimeSeconds").message("idleTimeoutSeconds must not exceed maxLifetimeSeconds").field_path(".idleTimeoutSeconds"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TerminalSessionSpec {
    /// Name of the cluster-scoped TerminalSessionClass whose defaults and limits apply to this
    /// session, the way storageClassName selects a StorageClass. Omit it for the operator's
    /// defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub class_name: Option<String>,

    /// Container image of the session pod. It must contain the tether session agent and tmux.
    /// Defaults to the image the operator is configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("!self.matches('\\\\s')").message("image must not contain whitespace"))]
    pub image: Option<String>,

    /// The shell to run inside tmux, as an argument vector (no shell parsing). Defaults to the
    /// operator's default shell, a login bash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 4096)))]
    pub command: Option<Vec<String>>,

    /// Environment variables for the shell. Names starting with TETHER_ are reserved for the
    /// session agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<SessionEnvVar>,

    /// Absolute path the shell starts in. Defaults to the session user's home directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub working_dir: Option<String>,

    /// CPU, memory and ephemeral storage for the session pod. Omitted amounts come from the
    /// class or the operator's defaults; every session pod has requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SessionResources>,

    /// End the session (phase Expired) after this many seconds with no browser attached and no
    /// output. Between 5 seconds and 7 days; defaults to the operator's idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 604800))]
    pub idle_timeout_seconds: Option<i64>,

    /// End the session (phase Expired) this many seconds after its pod started, attached or
    /// not. Between 10 seconds and 30 days; defaults to the operator's maximum lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 2592000))]
    pub max_lifetime_seconds: Option<i64>,

    /// Delete this TerminalSession this many seconds after it finished (Succeeded, Expired or
    /// Failed), like a Job's ttlSecondsAfterFinished. Omit it to keep finished sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2592000))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Record the session's output in asciicast v2 format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<Recording>,

    /// Terminal size tmux starts with, before the first browser reports its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_size: Option<TerminalSize>,
}

/// One environment variable of the shell.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionEnvVar {
    /// Variable name: letters, digits and underscores, not starting with a digit or TETHER_.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    #[x_kube(validation = Rule::new("!self.startsWith('TETHER_')").message("names starting with TETHER_ are reserved for the session agent"))]
    pub name: String,
    /// Variable value.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Resource requests and limits of the session pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.requests) || !has(self.limits) || ((!has(self.requests.cpu) || !has(self.limits.cpu) || quantity(self.requests.cpu).compareTo(quantity(self.limits.cpu)) <= 0) && (!has(self.requests.memory) || !has(self.limits.memory) || quantity(self.requests.memory).compareTo(quantity(self.limits.memory)) <= 0) && (!has(self.requests.ephemeralStorage) || !has(self.limits.ephemeralStorage) || quantity(self.requests.ephemeralStorage).compareTo(quantity(self.limits.ephemeralStorage)) <= 0))").message("requests must not exceed limits"))]
pub struct SessionResources {
    /// Guaranteed amounts, used for scheduling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,
    /// Hard caps enforced by the kubelet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// Amounts of CPU, memory and ephemeral storage, as Kubernetes quantities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceAmounts {
    /// CPU, from 10m to 64 cores (for example "500m" or "2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('10m')) >= 0 && quantity(self).compareTo(quantity('64')) <= 0").message("cpu must be a quantity from 10m to 64"))]
    pub cpu: Option<String>,
    /// Memory, from 16Mi to 256Gi (for example "512Mi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('16Mi')) >= 0 && quantity(self).compareTo(quantity('256Gi')) <= 0").message("memory must be a quantity from 16Mi to 256Gi"))]
    pub memory: Option<String>,
    /// Ephemeral storage for the home directory and /tmp, from 1Mi to 1Ti (for example "1Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1Mi')) >= 0 && quantity(self).compareTo(quantity('1Ti')) <= 0").message("ephemeralStorage must be a quantity from 1Mi to 1Ti"))]
    pub ephemeral_storage: Option<String>,
}

/// Session recording.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Recording {
    /// Record everything the shell prints, with timing, as asciicast v2 in the pod's recording
    /// volume.
    #[serde(default)]
    pub enabled: bool,
}

/// A terminal size in character cells.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TerminalSize {
    /// Columns, from 1 to 1000.
    #[schemars(range(min = 1, max = 1000))]
    pub cols: u16,
    /// Rows, from 1 to 500.
    #[schemars(range(min = 1, max = 500))]
    pub rows: u16,
}

impl Default for TerminalSize {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

/// Where a session is in its life. `Succeeded`, `Expired` and `Failed` are final.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SessionPhase {
    /// Accepted; the operator has not created the pod yet, or the pod is not scheduled.
    #[default]
    Pending,
    /// The pod is scheduled and the agent is starting.
    Starting,
    /// The agent is ready: browsers can attach.
    Ready,
    /// The shell exited.
    Succeeded,
    /// The session ended because it sat idle or reached its maximum lifetime.
    Expired,
    /// The session could not start or its pod failed.
    Failed,
}

impl SessionPhase {
    /// Every phase, in life order.
    pub const ALL: [SessionPhase; 6] = [
        Self::Pending,
        Self::Starting,
        Self::Ready,
        Self::Succeeded,
        Self::Expired,
        Self::Failed,
    ];

    /// A final phase never changes again.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Expired | Self::Failed)
    }

    /// The name written to `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Starting => "Starting",
            Self::Ready => "Ready",
            Self::Succeeded => "Succeeded",
            Self::Expired => "Expired",
            Self::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for SessionPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator observed of the session. Written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TerminalSessionStatus {
    /// Where the session is in its life: Pending, Starting, Ready, Succeeded, Expired or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// A CamelCase word saying why the session is in its phase (for example IdleTimeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened, in words a user can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Standard conditions; `Ready` is True while browsers can attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Name of the session pod, in the session's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// host:port of the session agent, which the gateway dials. Set only while Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// When the session pod started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the session first became Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<Time>,
    /// When the session reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// Exit status of the shell, once it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Names of the conditions and reasons the operator writes, so readers match on constants.
pub mod conditions {
    /// Browsers can attach.
    pub const READY: &str = "Ready";
    /// The session pod exists, or existed. False with the API server's own reason (Forbidden,
    /// Invalid...) while the cluster refuses it.
    pub const POD_CREATED: &str = "PodCreated";
    /// The session reached a final phase (Succeeded, Expired or Failed); its reason says why.
    pub const FINISHED: &str = "Finished";

    // Reasons: `status.reason`, the reasons of the conditions above and of Events.

    /// Pending: the operator is creating the session pod.
    pub const REASON_CREATING_POD: &str = "CreatingPod";
    /// Pending: the API server refused the session pod (quota, admission, unknown
    /// RuntimeClass...); the message quotes it and the operator retries with backoff.
    pub const REASON_POD_REJECTED: &str = "PodRejected";
    /// Pending: a pod with the session pod's name exists and belongs to something else.
    pub const REASON_POD_NAME_CONFLICT: &str = "PodNameConflict";
    /// PodCreated: the session pod exists.
    pub const REASON_POD_CREATED: &str = "PodCreated";
    /// Pending: waiting for the scheduler.
    pub const REASON_SCHEDULING: &str = "Scheduling";
    /// Pending: the scheduler found no node for the pod; the message says why.
    pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
    /// Starting: the pod is on a node, its container is being created.
    pub const REASON_CONTAINER_CREATING: &str = "ContainerCreating";
    /// Starting: the agent runs but does not answer its readiness probe yet.
    pub const REASON_AGENT_STARTING: &str = "AgentStarting";
    /// Starting: the pod's node stopped reporting.
    pub const REASON_POD_UNKNOWN: &str = "PodUnknown";
    /// Ready: browsers can attach.
    pub const REASON_AGENT_READY: &str = "AgentReady";
    /// Succeeded: the shell exited; `status.exitCode` has its status.
    pub const REASON_SHELL_EXITED: &str = "ShellExited";
    /// Expired: nobody attached and nothing happened for the idle timeout.
    pub const REASON_IDLE_TIMEOUT: &str = "IdleTimeout";
    /// Expired: the session reached its maximum lifetime (the pod's activeDeadlineSeconds).
    pub const REASON_MAX_LIFETIME_EXCEEDED: &str = "MaxLifetimeExceeded";
    /// Failed: the agent was stopped from outside (pod deleted, node drained).
    pub const REASON_TERMINATED: &str = "Terminated";
    /// Failed: the session pod was deleted while the session was live. The operator does not
    /// recreate it: the shell and its state are gone, and a fresh shell under the old name
    /// would pretend otherwise.
    pub const REASON_POD_DELETED: &str = "PodDeleted";
    /// Failed: the node evicted the pod (memory or disk pressure).
    pub const REASON_EVICTED: &str = "Evicted";
    /// Failed: the session container ran out of memory.
    pub const REASON_OOM_KILLED: &str = "OOMKilled";
    /// Failed: the session's command does not exist or cannot be executed in the image.
    pub const REASON_COMMAND_NOT_FOUND: &str = "CommandNotFound";
    /// Failed: the agent exited without saying why (crash, bad image...).
    pub const REASON_AGENT_FAILED: &str = "AgentFailed";
}
