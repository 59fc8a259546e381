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
/// reconfigured in place, so a change means a new session. Only `spec.sharing` changes.
///
/// Who owns a session is its annotation tether.dev/owner, checked at admission against the
/// user who creates it (the chart's ValidatingAdmissionPolicy), so nobody can forge it.
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
// Every field but `sharing` is immutable (written out: CEL cannot compare "all but one").
#[x_kube(validation = Rule::new("has(self.className) == has(oldSelf.className) && (!has(self.className) || self.className == oldSelf.className) && has(self.image) == has(oldSelf.image) && (!has(self.image) || self.image == oldSelf.image) && has(self.command) == has(oldSelf.command) && (!has(self.command) || self.command == oldSelf.command) && has(self.env) == has(oldSelf.env) && (!has(self.env) || self.env == oldSelf.env) && has(self.workingDir) == has(oldSelf.workingDir) && (!has(self.workingDir) || self.workingDir == oldSelf.workingDir) && has(self.resources) == has(oldSelf.resources) && (!has(self.resources) || self.resources == oldSelf.resources) && has(self.idleTimeoutSeconds) == has(oldSelf.idleTimeoutSeconds) && (!has(self.idleTimeoutSeconds) || self.idleTimeoutSeconds == oldSelf.idleTimeoutSeconds) && has(self.maxLifetimeSeconds) == has(oldSelf.maxLifetimeSeconds) && (!has(self.maxLifetimeSeconds) || self.maxLifetimeSeconds == oldSelf.maxLifetimeSeconds) && has(self.ttlSecondsAfterFinished) == has(oldSelf.ttlSecondsAfterFinished) && (!has(self.ttlSecondsAfterFinished) || self.ttlSecondsAfterFinished == oldSelf.ttlSecondsAfterFinished) && has(self.recording) == has(oldSelf.recording) && (!has(self.recording) || self.recording == oldSelf.recording) && has(self.initialSize) == has(oldSelf.initialSize) && (!has(self.initialSize) || self.initialSize == oldSelf.initialSize)").message("spec is immutable except spec.sharing: delete the session and create a new one"))]
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

    /// People and groups besides the owner who may use this session, each as driver (attach)
    /// or observer (observe). The only field that may change after creation, and only by the
    /// owner or someone who may `administer` terminalsessions in the namespace. Names are
    /// compared with the user and groups the gateway maps from a sign-in, exactly as
    /// kube-apiserver would name them (with the same prefixes), like a RoleBinding's subjects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub sharing: Vec<Share>,
}

/// One grant of access to a session: exactly one of `user` or `group`, and a mode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.user) != has(self.group)").message("a share names exactly one of user or group"))]
pub struct Share {
    /// A user name as Kubernetes sees it (for example alice@example.com, or
    /// https://issuer#1234 for a non-email username claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub user: Option<String>,
    /// A group name as Kubernetes sees it (for example oidc:developers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub group: Option<String>,
    /// attach (type into the shell; implies observe) or observe (read only).
    pub mode: ShareMode,
}

/// What a share allows.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Type into the shell; implies observe.
    Attach,
    /// Watch read-only.
    #[default]
    Observe,
}

/// The annotation naming the user who owns a session: the user who created it, as the API
/// server authenticated them. The chart's ValidatingAdmissionPolicy refuses a value other than
/// the creator's own name (unless the creator may `administer` sessions in the namespace), and
/// any change to it later. A session without it, or owned by a service account (GitOps), is
/// reached through RBAC's `attach` and `observe` verbs instead.
pub const OWNER_ANNOTATION: &str = "tether.dev/owner";

/// The RBAC verb that grants namespace-wide access to every session: attach or observe any of
/// them, change anyone's sharing, delete anyone's session, create a session for someone else.
pub const ADMINISTER_VERB: &str = "administer";

/// Who may use a session, read from its metadata and spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Owned by a person: the owner, the shares and `administer` decide.
    Person(String),
    /// Owned by a service account or by nobody recorded (GitOps, or created by an
    /// administrator): RBAC's `attach`/`observe` verbs decide, as do `administer` and the shares.
    Rbac,
}

impl Ownership {
    /// The ownership a session's owner annotation describes.
    pub fn of(session: &TerminalSession) -> Self {
        use kube::ResourceExt;
        match session.annotations().get(OWNER_ANNOTATION) {
            Some(owner) if !owner.is_empty() && !owner.starts_with("system:serviceaccount:") => {
                Self::Person(owner.clone())
            }
            _ => Self::Rbac,
        }
    }
}

/// The mode `sharing` gives this user with these groups: attach if any share gives it.
pub fn shared_mode(sharing: &[Share], user: &str, groups: &[String]) -> Option<ShareMode> {
    let mut best = None;
    for s in sharing {
        let matches =
            s.user.as_deref() == Some(user) || s.group.as_ref().is_some_and(|g| groups.contains(g));
        if !matches {
            continue;
        }
        if s.mode == ShareMode::Attach {
            return Some(ShareMode::Attach);
        }
        best = Some(ShareMode::Observe);
    }
    best
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
    /// UID of the session pod, recorded when the operator created it. The operator, the
    /// gateway's attach tickets and the agent trust only the pod with this UID: a pod that merely
    /// carries the name and an owner reference is somebody else's.
    #[serde(default, rename = "podUID", skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
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
    /// Pods other than the session's own claim to be its pod (labels, owner reference); the
    /// message names them. They are never used.
    pub const FOREIGN_PODS: &str = "ForeignPods";
    /// The session reached a final phase (Succeeded, Expired or Failed); its reason says why.
    pub const FINISHED: &str = "Finished";

    // Reasons: `status.reason`, the reasons of the conditions above and of Events.

    /// Pending: the operator is creating the session pod.
    pub const REASON_CREATING_POD: &str = "CreatingPod";
    /// Pending: the API server refused the session pod (quota, admission, unknown
    /// RuntimeClass...); the message quotes it and the operator retries with backoff.
    pub const REASON_POD_REJECTED: &str = "PodRejected";
    /// Warning event: a pod claims to be this session's (its owner reference names the
    /// session) but the operator did not create it; it is never used.
    pub const REASON_FOREIGN_POD: &str = "ForeignPod";
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
