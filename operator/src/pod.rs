//! The session pod: what a `TerminalSession` needs to run, decided without a client.
//!
//! Everything security-relevant is fixed here, not taken from the spec: the pod passes the
//! Pod Security `restricted` profile whatever the user writes.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
        HTTPGetAction, ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, Probe,
        ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt, api::ObjectMeta};
use tether_api::{ResourceAmounts, TerminalSession};

use crate::{Error, Result, config::Settings};

/// Port the session agent listens on.
pub const AGENT_PORT: i32 = 7681;
/// Name of the agent's container port.
pub const AGENT_PORT_NAME: &str = "agent";
/// Name of the only container of a session pod.
pub const CONTAINER_NAME: &str = "session";
/// Command of the session container.
pub const AGENT_COMMAND: &str = "tether-session-agent";
/// Where the agent writes why it exited.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// Home directory of the shell, an emptyDir.
pub const HOME_DIR: &str = "/home/tether";
/// Scratch space, an emptyDir; the agent keeps its state (tmux socket) under it.
pub const TMP_DIR: &str = "/tmp";
/// The agent's state directory.
pub const STATE_DIR: &str = "/tmp/tether";
/// Where recordings go when `spec.recording.enabled`, an emptyDir.
pub const RECORDING_DIR: &str = "/var/lib/tether/recordings";

/// Labels of session pods. `app.kubernetes.io/name` and `managed-by` select every session pod
/// (the network policy does); `session-uid` selects one.
pub mod labels {
    /// `app.kubernetes.io/name`.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// Value of [`NAME`] on session pods.
    pub const NAME_VALUE: &str = "tether-session";
    /// `app.kubernetes.io/managed-by`.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`] on everything the operator creates.
    pub const MANAGED_BY_VALUE: &str = "tether-operator";
    /// The session's name, when it fits in a label value (63 characters).
    pub const SESSION: &str = "tether.dev/session";
    /// The session's UID: always fits, and never names a namesake's pod.
    pub const SESSION_UID: &str = "tether.dev/session-uid";
    /// Label selector matching every session pod the operator manages.
    pub const SELECTOR: &str =
        "app.kubernetes.io/name=tether-session,app.kubernetes.io/managed-by=tether-operator";
}

/// Longest pod name we make: a DNS label, so the pod name is also a valid hostname.
const MAX_POD_NAME: usize = 63;

/// Characters of a pod name's random part: lowercase consonants and digits, like the API
/// server's `generateName` (no vowels, so no words).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
/// Length of the random part: 27^10 ≈ 2·10^14 names, so nobody can create the pod first.
const SUFFIX_LEN: usize = 10;

/// A new, unpredictable pod name for a session: its name and ten random characters.
///
/// Nobody can create a pod under this name before the operator does, so a pod that was not
/// created by the operator cannot be mistaken for the session's. The operator records the name
/// and UID of the pod it created in `status.podName` / `status.podUID` and uses only that pod
/// afterwards; a restarted operator finds it there. Long names are cut so the whole stays a DNS
/// label (the pod name is also its hostname).
pub fn fresh_pod_name(session: &TerminalSession) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let suffix: String = (0..SUFFIX_LEN)
        .map(|_| SUFFIX_ALPHABET[rng.random_range(0..SUFFIX_ALPHABET.len())] as char)
        .collect();
    let room = MAX_POD_NAME - SUFFIX_LEN - 1;
    // Session names are DNS subdomains: dots are allowed there but not in a hostname.
    let prefix: String = session
        .name_any()
        .replace('.', "-")
        .chars()
        .take(room)
        .collect();
    let prefix = prefix.trim_end_matches('-');
    format!("{prefix}-{suffix}")
}

/// Labels of the pod of `session`.
pub fn pod_labels(session: &TerminalSession) -> Result<BTreeMap<String, String>> {
    let uid = session
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let mut l = BTreeMap::from([
        (labels::NAME.to_string(), labels::NAME_VALUE.to_string()),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
        (labels::SESSION_UID.to_string(), uid),
    ]);
    let name = session.name_any();
    if name.len() <= 63 {
        l.insert(labels::SESSION.to_string(), name);
    }
    Ok(l)
}

/// Whether `pod` is controlled by `session` (its controller owner reference has the UID).
pub fn is_owned_by(pod: &Pod, session: &TerminalSession) -> bool {
    let uid = session.meta().uid.as_deref();
    uid.is_some()
        && pod
            .owner_references()
            .iter()
            .any(|r| r.controller == Some(true) && Some(r.uid.as_str()) == uid)
}

/// The pod that runs `session`.
pub fn build_pod(session: &TerminalSession, settings: &Settings, name: &str) -> Result<Pod> {
    let namespace = session
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let uid = session
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let mut owner = session
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    // Foreground deletion of a session waits for its pod, like a Job's.
    owner.block_owner_deletion = Some(true);
    let spec = &session.spec;

    let mut volumes = vec![empty_dir("home"), empty_dir("tmp")];
    let mut mounts = vec![mount("home", HOME_DIR), mount("tmp", TMP_DIR)];
    let recording = spec.recording.as_ref().is_some_and(|r| r.enabled);
    if recording {
        volumes.push(empty_dir("recordings"));
        mounts.push(mount("recordings", RECORDING_DIR));
    }

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.clone()),
            labels: Some(pod_labels(session)?),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            // The shell is the session: when it ends, the session ends; a fresh shell in its
            // place would pretend to be the old one.
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(
                spec.max_lifetime_seconds
                    .unwrap_or(settings.max_lifetime_seconds),
            ),
            automount_service_account_token: Some(false),
            // Service links would put every Service of the tenant's namespace into the
            // shell's environment.
            enable_service_links: Some(false),
            runtime_class_name: settings.runtime_class_name.clone(),
            termination_grace_period_seconds: Some(10),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(settings.run_as_user),
                run_as_group: Some(settings.run_as_user),
                fs_group: Some(settings.run_as_user),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: CONTAINER_NAME.into(),
                image: Some(spec.image.clone().unwrap_or_else(|| settings.image.clone())),
                command: Some(vec![AGENT_COMMAND.into()]),
                working_dir: Some(spec.working_dir.clone().unwrap_or_else(|| HOME_DIR.into())),
                env: Some(agent_env(session, settings, &namespace, &uid, recording)),
                ports: Some(vec![ContainerPort {
                    name: Some(AGENT_PORT_NAME.into()),
                    container_port: AGENT_PORT,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                readiness_probe: Some(http_probe("/readyz", 2, 3)),
                // Generous: a session under heavy load is better slow than killed.
                liveness_probe: Some(http_probe("/healthz", 10, 6)),
                resources: Some(resources(spec.resources.as_ref(), settings)),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    privileged: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: None,
                    }),
                    ..Default::default()
                }),
                termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
                termination_message_policy: Some("File".into()),
                volume_mounts: Some(mounts),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    })
}

/// An environment variable from the downward API.
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn agent_env(
    session: &TerminalSession,
    settings: &Settings,
    namespace: &str,
    uid: &str,
    recording: bool,
) -> Vec<EnvVar> {
    let spec = &session.spec;
    let size = spec.initial_size.unwrap_or_default();
    let command = spec
        .command
        .clone()
        .unwrap_or_else(|| settings.command.clone());
    let idle = spec
        .idle_timeout_seconds
        .unwrap_or(settings.idle_timeout_seconds);
    let mut env = vec![
        // The agent listens on the pod's own address, not 0.0.0.0: that is all the gateway
        // dials, and it lets pods that share one network namespace (the local node runs every
        // pod as a process on its own loopback address) use the same port side by side.
        field_env("TETHER_POD_IP", "status.podIP"),
        var("TETHER_LISTEN", format!("$(TETHER_POD_IP):{AGENT_PORT}")),
        // The agent accepts only tickets the gateway made for this very pod.
        field_env("TETHER_POD_NAME", "metadata.name"),
        field_env("TETHER_POD_UID", "metadata.uid"),
        var(
            "TETHER_SESSION",
            format!("{namespace}/{}", session.name_any()),
        ),
        var("TETHER_SESSION_UID", uid.to_string()),
        var(
            "TETHER_TICKET_PUBLIC_KEY",
            settings.ticket_public_key.clone(),
        ),
        var("TETHER_IDLE_TIMEOUT_SECONDS", idle.to_string()),
        var(
            "TETHER_TERMINATION_MESSAGE_PATH",
            TERMINATION_MESSAGE_PATH.into(),
        ),
        var("TETHER_STATE_DIR", STATE_DIR.into()),
        var("TETHER_COLS", size.cols.to_string()),
        var("TETHER_ROWS", size.rows.to_string()),
        var(
            "TETHER_COMMAND",
            serde_json::to_string(&command).expect("a list of strings serializes"),
        ),
    ];
    if recording {
        env.push(var("TETHER_RECORDING_DIR", RECORDING_DIR.into()));
    }
    // The agent's own HOME, the writable home volume; the shell inherits it unless spec.env
    // sets its own.
    env.push(var("HOME", HOME_DIR.into()));
    // spec.env is the shell's: it reaches the agent only as data, which the agent hands to tmux
    // for the shell (`new-session -e`). As the container's environment it would configure the
    // agent itself: LD_PRELOAD would load into it. The schema refuses TETHER_* names; skipping
    // them here too keeps an object written before that rule from reaching the agent.
    let shell_env: Vec<serde_json::Value> = spec
        .env
        .iter()
        .filter(|e| !e.name.starts_with("TETHER_"))
        // `$$`: Kubernetes expands `$(VAR)` in env values; the shell's values are data.
        .map(|e| serde_json::json!({"name": e.name, "value": e.value.replace('$', "$$")}))
        .collect();
    env.push(var(
        "TETHER_SHELL_ENV",
        serde_json::Value::Array(shell_env).to_string(),
    ));
    env
}

/// Requests and limits. Where the user set only one of the two for a resource, the other
/// copies it (Kubernetes does the same for a lone limit), so a request never exceeds its limit
/// without the operator having to compare quantities.
fn resources(
    user: Option<&tether_api::SessionResources>,
    settings: &Settings,
) -> ResourceRequirements {
    let none = ResourceAmounts::default();
    let req = user.and_then(|r| r.requests.as_ref()).unwrap_or(&none);
    let lim = user.and_then(|r| r.limits.as_ref()).unwrap_or(&none);
    let pick = |r: &Option<String>, l: &Option<String>, dr: &str, dl: &str| match (r, l) {
        (Some(r), Some(l)) => (r.clone(), l.clone()),
        (Some(r), None) => (r.clone(), r.clone()),
        (None, Some(l)) => (l.clone(), l.clone()),
        (None, None) => (dr.to_string(), dl.to_string()),
    };
    let (d_req, d_lim) = (&settings.requests, &settings.limits);
    let cpu = pick(&req.cpu, &lim.cpu, &d_req.cpu, &d_lim.cpu);
    let memory = pick(&req.memory, &lim.memory, &d_req.memory, &d_lim.memory);
    let storage = pick(
        &req.ephemeral_storage,
        &lim.ephemeral_storage,
        &d_req.ephemeral_storage,
        &d_lim.ephemeral_storage,
    );
    let map = |cpu: String, memory: String, storage: String| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu)),
            ("memory".to_string(), Quantity(memory)),
            ("ephemeral-storage".to_string(), Quantity(storage)),
        ])
    };
    ResourceRequirements {
        requests: Some(map(cpu.0, memory.0, storage.0)),
        limits: Some(map(cpu.1, memory.1, storage.1)),
        ..Default::default()
    }
}

fn var(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(AGENT_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SessionExt;

    fn container(pod: &Pod) -> &Container {
        &pod.spec.as_ref().unwrap().containers[0]
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        container(pod)
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn the_pod_satisfies_every_restricted_field() {
        let pod = build_pod(&TerminalSession::test(), &Settings::default(), "dev-x").unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(1000));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.host_network, None);
        assert_eq!(spec.host_pid, None);
        assert_eq!(spec.host_ipc, None);
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.containers.len(), 1);
        assert!(spec.init_containers.is_none());
        let sc = container(&pod).security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert!(caps.add.is_none());
        // Only emptyDir volumes: restricted forbids hostPath and friends.
        for v in spec.volumes.iter().flatten() {
            assert!(v.empty_dir.is_some(), "{} is not an emptyDir", v.name);
        }
    }

    #[test]
    fn home_and_tmp_are_writable_empty_dirs() {
        let pod = build_pod(&TerminalSession::test(), &Settings::default(), "dev-x").unwrap();
        let mounts: BTreeMap<_, _> = container(&pod)
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.clone(), m.name.clone()))
            .collect();
        assert_eq!(mounts.get(HOME_DIR).map(String::as_str), Some("home"));
        assert_eq!(mounts.get(TMP_DIR).map(String::as_str), Some("tmp"));
        assert!(!mounts.contains_key(RECORDING_DIR));
        assert_eq!(env_of(&pod)["HOME"], HOME_DIR);
        assert_eq!(container(&pod).working_dir.as_deref(), Some(HOME_DIR));
    }

    #[test]
    fn default_resources_set_requests_and_limits_including_ephemeral_storage() {
        let pod = build_pod(&TerminalSession::test(), &Settings::default(), "dev-x").unwrap();
        let r = container(&pod).resources.as_ref().unwrap();
        let req = r.requests.as_ref().unwrap();
        let lim = r.limits.as_ref().unwrap();
        for k in ["cpu", "memory", "ephemeral-storage"] {
            assert!(req.contains_key(k) && lim.contains_key(k), "{k}");
        }
        assert_eq!(req["cpu"].0, "100m");
        assert_eq!(lim["memory"].0, "512Mi");
        assert_eq!(lim["ephemeral-storage"].0, "1Gi");
    }

    #[test]
    fn a_lone_request_or_limit_is_copied_to_the_other() {
        let s = TerminalSession::test().with_resources(
            Some(ResourceAmounts {
                cpu: Some("2".into()),
                ..Default::default()
            }),
            Some(ResourceAmounts {
                memory: Some("2Gi".into()),
                ..Default::default()
            }),
        );
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        let r = container(&pod).resources.as_ref().unwrap();
        let (req, lim) = (r.requests.as_ref().unwrap(), r.limits.as_ref().unwrap());
        assert_eq!((req["cpu"].0.as_str(), lim["cpu"].0.as_str()), ("2", "2"));
        assert_eq!(
            (req["memory"].0.as_str(), lim["memory"].0.as_str()),
            ("2Gi", "2Gi")
        );
        assert_eq!(req["ephemeral-storage"].0, "256Mi");
    }

    #[test]
    fn max_lifetime_becomes_active_deadline_seconds() {
        let pod = build_pod(&TerminalSession::test(), &Settings::default(), "dev-x").unwrap();
        assert_eq!(
            pod.spec.as_ref().unwrap().active_deadline_seconds,
            Some(86400)
        );
        let s = TerminalSession::test().with_max_lifetime(120);
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        assert_eq!(
            pod.spec.as_ref().unwrap().active_deadline_seconds,
            Some(120)
        );
    }

    #[test]
    fn runtime_class_is_set_only_when_configured() {
        let s = TerminalSession::test();
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        assert_eq!(pod.spec.as_ref().unwrap().runtime_class_name, None);
        let settings = Settings {
            runtime_class_name: Some("gvisor".into()),
            ..Settings::default()
        };
        let pod = build_pod(&s, &settings, "dev-x").unwrap();
        assert_eq!(
            pod.spec.as_ref().unwrap().runtime_class_name.as_deref(),
            Some("gvisor")
        );
    }

    #[test]
    fn the_pod_is_controlled_by_its_session_and_labelled_to_select_it() {
        let s = TerminalSession::test();
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        let owners = pod.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "TerminalSession");
        assert_eq!(owners[0].api_version, "tether.dev/v1alpha1");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        assert!(is_owned_by(&pod, &s));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[labels::SESSION], "dev");
        assert_eq!(labels[labels::SESSION_UID], s.uid().unwrap());
        assert_eq!(labels[labels::NAME], labels::NAME_VALUE);
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
    }

    #[test]
    fn a_pod_owned_by_another_uid_is_not_ours() {
        let s = TerminalSession::test();
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        let namesake = TerminalSession::test().with_uid("99999999-0000-0000-0000-000000000000");
        assert!(!is_owned_by(&pod, &namesake));
    }

    #[test]
    fn pod_names_are_the_session_name_and_a_random_part_nobody_can_guess() {
        let s = TerminalSession::test();
        let (a, b) = (fresh_pod_name(&s), fresh_pod_name(&s));
        assert!(
            a.starts_with("dev-") && a.len() == "dev-".len() + SUFFIX_LEN,
            "{a}"
        );
        assert_ne!(a, b, "two names for one session must differ");
    }

    #[test]
    fn long_and_dotted_session_names_make_valid_pod_names() {
        let long = TerminalSession::test().with_name(&"a".repeat(200));
        let dotted = TerminalSession::test().with_name(&format!("{}.x", "b".repeat(53)));
        for n in [fresh_pod_name(&long), fresh_pod_name(&dotted)] {
            assert!(n.len() <= 63, "{n}");
            assert!(!n.contains('.') && !n.contains("--"), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
        }
    }

    #[test]
    fn the_container_runs_the_agent_with_the_contract_env() {
        let s = TerminalSession::test()
            .with_command(&["/bin/zsh", "-i"])
            .with_env("EDITOR", "vim")
            .with_working_dir("/home/tether/src")
            .with_idle_timeout(300)
            .with_size(120, 40);
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        let c = container(&pod);
        assert_eq!(c.name, CONTAINER_NAME);
        assert_eq!(
            c.command.as_deref(),
            Some(&["tether-session-agent".to_string()][..])
        );
        assert!(c.args.is_none());
        assert_eq!(c.working_dir.as_deref(), Some("/home/tether/src"));
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("agent"), 7681)
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        assert_eq!(probe.port, IntOrString::String("agent".into()));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(
            c.termination_message_path.as_deref(),
            Some("/dev/termination-log")
        );
        assert_eq!(c.termination_message_policy.as_deref(), Some("File"));
        let env = env_of(&pod);
        assert_eq!(env["TETHER_LISTEN"], "$(TETHER_POD_IP):7681");
        let pod_ip = container(&pod)
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "TETHER_POD_IP")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(pod_ip.as_deref(), Some("status.podIP"));
        assert_eq!(env["TETHER_SESSION"], "team-a/dev");
        assert_eq!(env["TETHER_SESSION_UID"], s.uid().unwrap());
        assert_eq!(env["TETHER_IDLE_TIMEOUT_SECONDS"], "300");
        assert_eq!(
            env["TETHER_TERMINATION_MESSAGE_PATH"],
            "/dev/termination-log"
        );
        assert_eq!(env["TETHER_STATE_DIR"], "/tmp/tether");
        assert_eq!(
            (env["TETHER_COLS"].as_str(), env["TETHER_ROWS"].as_str()),
            ("120", "40")
        );
        assert_eq!(env["TETHER_COMMAND"], r#"["/bin/zsh","-i"]"#);
        assert_eq!(
            env["TETHER_SHELL_ENV"],
            r#"[{"name":"EDITOR","value":"vim"}]"#
        );
        assert!(
            !env.contains_key("EDITOR"),
            "spec.env is the shell's, not the agent's"
        );
        assert!(!env.contains_key("TETHER_RECORDING_DIR"));
    }

    #[test]
    fn defaults_fill_what_the_spec_leaves_out() {
        let settings = Settings {
            ticket_public_key: "-----BEGIN PUBLIC KEY-----\nK\n-----END PUBLIC KEY-----\n".into(),
            ..Settings::default()
        };
        let pod = build_pod(&TerminalSession::test(), &settings, "dev-x").unwrap();
        let env = env_of(&pod);
        assert_eq!(env["TETHER_COMMAND"], r#"["/bin/bash","-l"]"#);
        assert_eq!(env["TETHER_IDLE_TIMEOUT_SECONDS"], "3600");
        assert_eq!(
            (env["TETHER_COLS"].as_str(), env["TETHER_ROWS"].as_str()),
            ("80", "24")
        );
        assert_eq!(env["TETHER_TICKET_PUBLIC_KEY"], settings.ticket_public_key);
        assert_eq!(
            container(&pod).image.as_deref(),
            Some(crate::config::DEFAULT_IMAGE)
        );
    }

    #[test]
    fn recording_adds_its_volume_and_directory() {
        let pod = build_pod(
            &TerminalSession::test().with_recording(),
            &Settings::default(),
            "dev-x",
        )
        .unwrap();
        assert_eq!(env_of(&pod)["TETHER_RECORDING_DIR"], RECORDING_DIR);
        assert!(
            container(&pod)
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == RECORDING_DIR && m.name == "recordings")
        );
    }

    #[test]
    fn spec_env_reaches_only_the_shell_never_the_agents_own_environment() {
        let s = TerminalSession::test()
            .with_env("TETHER_LISTEN", "0.0.0.0:1")
            .with_env("LD_PRELOAD", "/tmp/evil.so")
            .with_env("PATH", "/tmp/bin")
            .with_env("HOME", "/tmp/h")
            .with_env("PS1", "$(TETHER_COMMAND) $ ");
        let pod = build_pod(&s, &Settings::default(), "dev-x").unwrap();
        let names: Vec<_> = container(&pod)
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect();
        for n in &names {
            assert!(
                n.starts_with("TETHER_") || n == "HOME",
                "{n} in the agent's environment"
            );
        }
        assert_eq!(names.iter().filter(|n| *n == "TETHER_LISTEN").count(), 1);
        let env = env_of(&pod);
        assert_eq!(env["TETHER_LISTEN"], "$(TETHER_POD_IP):7681");
        assert_eq!(env["HOME"], HOME_DIR, "the agent's HOME is fixed");
        let shell: Vec<serde_json::Value> = serde_json::from_str(&env["TETHER_SHELL_ENV"]).unwrap();
        let shell: Vec<(&str, &str)> = shell
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v["value"].as_str().unwrap()))
            .collect();
        assert_eq!(
            shell,
            [
                ("LD_PRELOAD", "/tmp/evil.so"),
                ("PATH", "/tmp/bin"),
                ("HOME", "/tmp/h"),
                // Escaped, so the kubelet's $(VAR) expansion gives the shell exactly this.
                ("PS1", "$$(TETHER_COMMAND) $$ "),
            ],
            "the shell gets them, TETHER_* excepted"
        );
    }

    #[test]
    fn a_session_without_uid_cannot_be_built() {
        let mut s = TerminalSession::test();
        s.metadata.uid = None;
        assert!(matches!(
            build_pod(&s, &Settings::default(), "dev-x"),
            Err(Error::MissingObjectKey(_))
        ));
    }
}
