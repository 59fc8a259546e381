//! The status of a session, computed from what the operator observed of its pod.
//!
//! Pure: the same session, observation and clock give the same status, so the reconciler can
//! compare it with the stored status and write only when something changed. A final status
//! (Succeeded, Expired, Failed) is never recomputed: the pod it came from is deleted.

use k8s_openapi::{
    api::core::v1::{ContainerStateTerminated, Pod, PodCondition},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::ResourceExt;
use serde::Deserialize;
use tether_api::{SessionPhase, TerminalSession, TerminalSessionStatus, conditions as c};

use crate::pod::{AGENT_PORT, CONTAINER_NAME};

/// What the operator found where the session pod should be.
#[derive(Clone, Copy, Debug)]
pub enum PodState<'a> {
    /// No pod, and none was ever observed: it is about to be created.
    NotCreated,
    /// The API server refused to create the pod.
    Rejected(&'a Rejection),
    /// The session's pod.
    Present(&'a Pod),
    /// The pod was observed before (`status.podName`) and is gone.
    Gone,
}

/// The API server's refusal of the session pod or of what must precede it (its network
/// policy), as its `Status` said it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// What was refused, in words: "session pod", "network policy tether-sessions".
    pub object: String,
    /// HTTP code: 403 for quota and admission, 422 for an invalid pod.
    pub code: u16,
    /// The Status reason, a CamelCase word such as `Forbidden` or `Invalid`.
    pub reason: String,
    /// The Status message, naming the quota or the admission plugin.
    pub message: String,
}

impl Rejection {
    /// The refusal in `status`, when it is one: the server understood the request and said no.
    /// Other failures (throttling, server errors, conflicts) are transient and retried.
    pub fn from_status(object: &str, status: &kube::core::Status) -> Option<Self> {
        matches!(status.code, 400 | 403 | 404 | 422).then(|| Self {
            object: object.into(),
            code: status.code,
            reason: if status.reason.is_empty() {
                "Rejected".into()
            } else {
                status.reason.clone()
            },
            message: status.message.clone(),
        })
    }
}

/// The agent's termination message: one line of JSON saying why it exited.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    /// `ShellExited`, `IdleTimeout` or `Terminated`.
    pub reason: String,
    /// The shell's exit status, for `ShellExited`.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Words for the user.
    #[serde(default)]
    pub message: Option<String>,
}

impl TerminationMessage {
    /// Parses the first non-empty line; `None` when the agent died before writing one.
    pub fn parse(text: &str) -> Option<Self> {
        let line = text.lines().find(|l| !l.trim().is_empty())?;
        serde_json::from_str(line.trim()).ok()
    }
}

/// Longest message we store; a termination message or an admission error can be long.
const MAX_MESSAGE: usize = 1024;

/// What one observation says, before it becomes a status.
struct Outcome {
    phase: SessionPhase,
    reason: String,
    message: String,
    /// PodCreated condition: status, reason, message.
    created: (bool, String, String),
    pod_name: Option<String>,
    pod_uid: Option<String>,
    endpoint: Option<String>,
    start_time: Option<Time>,
    ready_since: Option<Time>,
    finished_at: Option<Time>,
    exit_code: Option<i32>,
}

impl Outcome {
    fn new(phase: SessionPhase, reason: &str, message: impl Into<String>) -> Self {
        Self {
            phase,
            reason: reason.into(),
            message: message.into(),
            created: (
                true,
                c::REASON_POD_CREATED.into(),
                "The session pod exists.".into(),
            ),
            pod_name: None,
            pod_uid: None,
            endpoint: None,
            start_time: None,
            ready_since: None,
            finished_at: None,
            exit_code: None,
        }
    }
}

/// The status `session` should have, given what was observed of its pod at `now`.
pub fn desired_status(
    session: &TerminalSession,
    observed: PodState<'_>,
    now: Timestamp,
) -> TerminalSessionStatus {
    let old = session.status.clone().unwrap_or_default();
    let generation = session.metadata.generation;
    if old.phase.is_some_and(SessionPhase::is_finished) {
        return TerminalSessionStatus {
            observed_generation: generation,
            ..old
        };
    }
    // The API server stores seconds; a finer clock would make every comparison differ.
    let now = Time(Timestamp::from_second(now.as_second()).unwrap_or(now));

    let o = match observed {
        PodState::NotCreated => {
            let mut o = Outcome::new(
                SessionPhase::Pending,
                c::REASON_CREATING_POD,
                "Creating the session pod.",
            );
            o.created = (false, c::REASON_CREATING_POD.into(), o.message.clone());
            o
        }
        PodState::Rejected(r) => {
            let message = format!(
                "The cluster refused the {} ({}): {}. The operator retries with backoff; an \
                 administrator may need to raise a quota or fix the operator's settings or \
                 permissions.",
                r.object, r.reason, r.message
            );
            let mut o = Outcome::new(SessionPhase::Pending, c::REASON_POD_REJECTED, message);
            o.created = (false, r.reason.clone(), o.message.clone());
            o
        }
        PodState::Gone => {
            let mut o = Outcome::new(
                SessionPhase::Failed,
                c::REASON_POD_DELETED,
                "The session pod was deleted while the session was live, and its shell with \
                 it. Create a new session.",
            );
            o.pod_name = old.pod_name.clone();
            o.pod_uid = old.pod_uid.clone();
            o
        }
        PodState::Present(pod) => from_pod(session, pod),
    };

    let finished = o.phase.is_finished();
    let ready = o.phase == SessionPhase::Ready;
    let message = truncate(&o.message);
    let mut conditions = vec![
        condition(&old, c::READY, ready, &o.reason, &message, generation, &now),
        condition(
            &old,
            c::POD_CREATED,
            o.created.0,
            &o.created.1,
            &truncate(&o.created.2),
            generation,
            &now,
        ),
    ];
    if finished {
        conditions.push(condition(
            &old,
            c::FINISHED,
            true,
            &o.reason,
            &message,
            generation,
            &now,
        ));
    }
    TerminalSessionStatus {
        phase: Some(o.phase),
        reason: Some(o.reason),
        message: Some(message),
        conditions,
        observed_generation: generation,
        pod_name: o.pod_name,
        pod_uid: o.pod_uid,
        endpoint: o.endpoint,
        start_time: old.start_time.or(o.start_time),
        ready_time: old.ready_time.or(if ready {
            o.ready_since.or(Some(now.clone()))
        } else {
            None
        }),
        finish_time: if finished {
            o.finished_at.or(Some(now))
        } else {
            None
        },
        exit_code: o.exit_code,
    }
}

fn from_pod(session: &TerminalSession, pod: &Pod) -> Outcome {
    use SessionPhase::*;
    let status = pod.status.clone().unwrap_or_default();
    let container = status
        .container_statuses
        .iter()
        .flatten()
        .find(|cs| cs.name == CONTAINER_NAME);
    let state = container
        .and_then(|cs| cs.state.clone())
        .unwrap_or_default();
    let pod_phase = status.phase.as_deref().unwrap_or("Pending");

    let mut o = if status.reason.as_deref() == Some("DeadlineExceeded") {
        let limit = pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .map(|s| format!(" of {s} seconds"))
            .unwrap_or_default();
        Outcome::new(
            Expired,
            c::REASON_MAX_LIFETIME_EXCEEDED,
            format!("The session reached its maximum lifetime{limit}."),
        )
    } else if let Some(t) = &state.terminated {
        from_termination(session, t)
    } else if pod_phase == "Failed" {
        let (reason, what) = if status.reason.as_deref() == Some("Evicted") {
            (c::REASON_EVICTED, "The node evicted the session pod")
        } else {
            (c::REASON_AGENT_FAILED, "The session pod failed")
        };
        let detail = status
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        Outcome::new(Failed, reason, format!("{what}{detail}."))
    } else if pod_phase == "Succeeded" {
        Outcome::new(Succeeded, c::REASON_SHELL_EXITED, "The shell exited.")
    } else if pod.metadata.deletion_timestamp.is_some() {
        Outcome::new(
            Failed,
            c::REASON_POD_DELETED,
            "The session pod is being deleted while the session was live, and its shell with \
             it. Create a new session.",
        )
    } else if pod_phase == "Unknown" {
        Outcome::new(
            Starting,
            c::REASON_POD_UNKNOWN,
            "The node running the session pod stopped reporting; browsers cannot attach.",
        )
    } else if pod_condition(&status.conditions, "PodScheduled").is_none_or(|pc| pc.status != "True")
    {
        let scheduled = pod_condition(&status.conditions, "PodScheduled");
        if scheduled.and_then(|pc| pc.reason.as_deref()) == Some("Unschedulable") {
            let why = scheduled
                .and_then(|pc| pc.message.clone())
                .unwrap_or_default();
            Outcome::new(
                Pending,
                c::REASON_UNSCHEDULABLE,
                format!("No node can run the session pod: {why}"),
            )
        } else {
            Outcome::new(
                Pending,
                c::REASON_SCHEDULING,
                "Waiting for the scheduler to place the session pod.",
            )
        }
    } else if let (true, Some(ip)) = (
        pod_condition(&status.conditions, "Ready").is_some_and(|pc| pc.status == "True"),
        status.pod_ip.as_deref().filter(|ip| !ip.is_empty()),
    ) {
        let mut o = Outcome::new(
            Ready,
            c::REASON_AGENT_READY,
            "The session is ready to attach.",
        );
        o.endpoint = Some(endpoint(ip));
        o.ready_since = pod_condition(&status.conditions, "Ready")
            .and_then(|pc| pc.last_transition_time.clone());
        o
    } else if let Some(w) = &state.waiting {
        let reason = w
            .reason
            .clone()
            .unwrap_or_else(|| c::REASON_CONTAINER_CREATING.into());
        let message = match w.message.as_deref() {
            Some(m) if !m.is_empty() => format!("The session container is waiting ({reason}): {m}"),
            _ => format!("The session container is waiting ({reason})."),
        };
        // A kubelet reason such as ImagePullBackOff is the most useful word for the user.
        Outcome::new(Starting, &reason, message)
    } else if state.running.is_some() {
        Outcome::new(
            Starting,
            c::REASON_AGENT_STARTING,
            "The session agent is starting.",
        )
    } else {
        Outcome::new(
            Starting,
            c::REASON_CONTAINER_CREATING,
            "The session pod is on a node; its container is being created.",
        )
    };
    o.pod_name = Some(pod.name_any());
    o.pod_uid = pod.uid();
    o.start_time = status.start_time.clone();
    o
}

fn from_termination(session: &TerminalSession, t: &ContainerStateTerminated) -> Outcome {
    use SessionPhase::*;
    let parsed = t.message.as_deref().and_then(TerminationMessage::parse);
    let said = |m: &TerminationMessage| {
        m.message
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| format!(" The agent said: {s}"))
            .unwrap_or_default()
    };
    let mut o = match parsed {
        Some(m) if m.reason == c::REASON_SHELL_EXITED => {
            let code = m.exit_code.unwrap_or(t.exit_code);
            let mut o = Outcome::new(
                Succeeded,
                c::REASON_SHELL_EXITED,
                format!("The shell exited with status {code}."),
            );
            o.exit_code = Some(code);
            o
        }
        Some(m) if m.reason == c::REASON_IDLE_TIMEOUT => {
            let timeout = session
                .spec
                .idle_timeout_seconds
                .map(|s| format!(" ({s} seconds)"))
                .unwrap_or_default();
            Outcome::new(
                Expired,
                c::REASON_IDLE_TIMEOUT,
                format!(
                    "The session sat idle longer than its idle timeout{timeout} and ended.{}",
                    said(&m)
                ),
            )
        }
        Some(m) if m.reason == c::REASON_COMMAND_NOT_FOUND => Outcome::new(
            Failed,
            c::REASON_COMMAND_NOT_FOUND,
            format!(
                "The session's command could not be started, so there was no shell.{}",
                said(&m)
            ),
        ),
        Some(m) if m.reason == c::REASON_TERMINATED => Outcome::new(
            Failed,
            c::REASON_TERMINATED,
            format!(
                "The session agent was stopped from outside (pod deleted or node drained).{}",
                said(&m)
            ),
        ),
        _ => {
            let kubelet_reason = t.reason.as_deref().unwrap_or("Error");
            let reason = if kubelet_reason == "OOMKilled" {
                c::REASON_OOM_KILLED
            } else {
                c::REASON_AGENT_FAILED
            };
            let detail = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            Outcome::new(
                Failed,
                reason,
                format!(
                    "The session agent exited with code {} ({kubelet_reason}){detail}",
                    t.exit_code
                ),
            )
        }
    };
    o.finished_at = t.finished_at.clone();
    o
}

/// The address the gateway dials.
pub fn endpoint(pod_ip: &str) -> String {
    if pod_ip.contains(':') {
        format!("[{pod_ip}]:{AGENT_PORT}")
    } else {
        format!("{pod_ip}:{AGENT_PORT}")
    }
}

fn pod_condition<'a>(
    conditions: &'a Option<Vec<PodCondition>>,
    type_: &str,
) -> Option<&'a PodCondition> {
    conditions.iter().flatten().find(|pc| pc.type_ == type_)
}

/// A condition that keeps its lastTransitionTime while its status stays the same.
/// Adds the `ForeignPods` condition to `status` when pods other than the session's own carry
/// its labels: someone created them (a squatter, or a pod of ours whose creation was never
/// recorded because the operator stopped right after). They are never used, and named here so
/// the owner and an administrator see them; garbage collection removes them with the session.
pub fn report_foreign_pods(
    status: &mut TerminalSessionStatus,
    old: &TerminalSessionStatus,
    foreign: &[String],
    generation: Option<i64>,
    now: Timestamp,
) {
    if foreign.is_empty() || status.phase.is_some_and(SessionPhase::is_finished) {
        return;
    }
    let message = truncate(&format!(
        "Pods not created by the operator claim to be this session's and are never used: {}. \
         Delete them, and find out who created them.",
        foreign.join(", ")
    ));
    let now = Time(now);
    status.conditions.push(condition(
        old,
        c::FOREIGN_PODS,
        true,
        c::REASON_FOREIGN_POD,
        &message,
        generation,
        &now,
    ));
}

fn condition(
    old: &TerminalSessionStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = old
        .conditions
        .iter()
        .find(|oc| oc.type_ == type_ && oc.status == status)
        .map(|oc| oc.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{PodExt, SessionExt, t0};

    fn status(s: &TerminalSession, o: PodState<'_>) -> TerminalSessionStatus {
        desired_status(s, o, t0())
    }

    fn cond<'a>(st: &'a TerminalSessionStatus, t: &str) -> Option<&'a Condition> {
        st.conditions.iter().find(|c| c.type_ == t)
    }

    #[test]
    fn a_new_session_is_pending_while_its_pod_is_created() {
        let st = status(&TerminalSession::test(), PodState::NotCreated);
        assert_eq!(st.phase, Some(SessionPhase::Pending));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_CREATING_POD));
        assert_eq!(cond(&st, c::READY).unwrap().status, "False");
        assert_eq!(cond(&st, c::POD_CREATED).unwrap().status, "False");
        assert!(cond(&st, c::FINISHED).is_none());
        assert_eq!(st.observed_generation, Some(1));
        assert!(st.endpoint.is_none() && st.pod_name.is_none());
    }

    #[test]
    fn a_refused_pod_shows_the_api_servers_reason_and_message() {
        let r = Rejection {
            object: "session pod".into(),
            code: 403,
            reason: "Forbidden".into(),
            message: "pods \"dev-0f1e2d3c\" is forbidden: exceeded quota: q, requested: pods=1"
                .into(),
        };
        let st = status(&TerminalSession::test(), PodState::Rejected(&r));
        assert_eq!(st.phase, Some(SessionPhase::Pending));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_POD_REJECTED));
        assert!(st.message.as_ref().unwrap().contains("exceeded quota"));
        let created = cond(&st, c::POD_CREATED).unwrap();
        assert_eq!(
            (created.status.as_str(), created.reason.as_str()),
            ("False", "Forbidden")
        );
    }

    #[test]
    fn an_unscheduled_pod_is_pending_and_says_why_when_unschedulable() {
        let s = TerminalSession::test();
        let pod = s.test_pod();
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Pending));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_SCHEDULING));
        assert_eq!(st.pod_name.as_deref(), Some("dev-0f1e2d3c"));
        assert_eq!(cond(&st, c::POD_CREATED).unwrap().status, "True");

        let pod = s
            .test_pod()
            .unschedulable("0/3 nodes are available: 3 Insufficient cpu.");
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_UNSCHEDULABLE));
        assert!(st.message.unwrap().contains("Insufficient cpu"));
    }

    #[test]
    fn a_scheduled_pod_is_starting_with_the_kubelets_waiting_reason() {
        let s = TerminalSession::test();
        let st = status(&s, PodState::Present(&s.test_pod().scheduled()));
        assert_eq!(st.phase, Some(SessionPhase::Starting));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_CONTAINER_CREATING));

        let pod = s
            .test_pod()
            .scheduled()
            .waiting("ImagePullBackOff", "Back-off pulling image");
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Starting));
        assert_eq!(st.reason.as_deref(), Some("ImagePullBackOff"));
        assert!(st.message.unwrap().contains("Back-off pulling image"));

        let pod = s.test_pod().scheduled().running("10.0.0.7", false);
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Starting));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_AGENT_STARTING));
        assert!(st.endpoint.is_none());
        assert!(st.start_time.is_some());
    }

    #[test]
    fn a_ready_pod_makes_the_session_ready_with_its_endpoint() {
        let s = TerminalSession::test();
        let pod = s.test_pod().scheduled().running("10.0.0.7", true);
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Ready));
        assert_eq!(st.endpoint.as_deref(), Some("10.0.0.7:7681"));
        assert_eq!(cond(&st, c::READY).unwrap().status, "True");
        assert_eq!(cond(&st, c::READY).unwrap().reason, c::REASON_AGENT_READY);
        assert!(st.ready_time.is_some());
    }

    #[test]
    fn an_ipv6_endpoint_is_bracketed() {
        assert_eq!(endpoint("fd00::7"), "[fd00::7]:7681");
    }

    #[test]
    fn a_ready_pod_that_loses_readiness_takes_the_session_back_to_starting() {
        let s = TerminalSession::test();
        let ready = status(
            &s,
            PodState::Present(&s.test_pod().scheduled().running("10.0.0.7", true)),
        );
        let s = s.with_status(ready.clone());
        let later = desired_status(
            &s,
            PodState::Present(&s.test_pod().scheduled().running("10.0.0.7", false)),
            t0() + std::time::Duration::from_secs(30),
        );
        assert_eq!(later.phase, Some(SessionPhase::Starting));
        assert!(later.endpoint.is_none());
        assert_eq!(cond(&later, c::READY).unwrap().status, "False");
        assert_ne!(
            cond(&later, c::READY).unwrap().last_transition_time,
            cond(&ready, c::READY).unwrap().last_transition_time
        );
        // The first time it became ready is kept.
        assert_eq!(later.ready_time, ready.ready_time);
    }

    #[test]
    fn an_unchanged_observation_gives_an_identical_status() {
        let s = TerminalSession::test();
        let pod = s.test_pod().scheduled().running("10.0.0.7", true);
        let first = status(&s, PodState::Present(&pod));
        let s = s.with_status(first.clone());
        let again = desired_status(
            &s,
            PodState::Present(&pod),
            t0() + std::time::Duration::from_secs(99),
        );
        assert_eq!(first, again);
    }

    #[test]
    fn the_shell_exiting_succeeds_with_its_exit_code() {
        let s = TerminalSession::test();
        let pod = s.test_pod().scheduled().terminated(
            r#"{"reason":"ShellExited","exitCode":3,"message":"exit"}"#,
            0,
        );
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Succeeded));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_SHELL_EXITED));
        assert_eq!(st.exit_code, Some(3));
        assert!(st.finish_time.is_some());
        assert!(st.endpoint.is_none());
        let finished = cond(&st, c::FINISHED).unwrap();
        assert_eq!(
            (finished.status.as_str(), finished.reason.as_str()),
            ("True", "ShellExited")
        );
    }

    #[test]
    fn an_idle_timeout_expires_the_session() {
        let s = TerminalSession::test().with_idle_timeout(300);
        let pod = s.test_pod().scheduled().terminated(
            r#"{"reason":"IdleTimeout","exitCode":0,"message":"idle for 300s"}"#,
            0,
        );
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Expired));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_IDLE_TIMEOUT));
        assert!(
            st.message.as_ref().unwrap().contains("300 seconds"),
            "{:?}",
            st.message
        );
        assert_eq!(st.exit_code, None);
    }

    #[test]
    fn the_maximum_lifetime_expires_the_session_whatever_the_agent_said() {
        let s = TerminalSession::test().with_max_lifetime(60);
        let pod = s
            .test_pod()
            .scheduled()
            .terminated(r#"{"reason":"Terminated","exitCode":143}"#, 143)
            .failed(
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline",
            );
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Expired));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_MAX_LIFETIME_EXCEEDED));
        assert!(st.message.unwrap().contains("60 seconds"));
    }

    #[test]
    fn an_agent_terminated_from_outside_fails_the_session() {
        let s = TerminalSession::test();
        let pod = s
            .test_pod()
            .scheduled()
            .terminated(r#"{"reason":"Terminated","exitCode":143}"#, 143);
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_TERMINATED));
    }

    #[test]
    fn a_command_that_cannot_start_fails_the_session_naming_it() {
        let s = TerminalSession::test();
        let pod = s.test_pod().scheduled().terminated(
            r#"{"reason":"CommandNotFound","message":"the session command \"/bin/nonexistent-shell\" cannot be started: /bin/nonexistent-shell: No such file or directory (os error 2)"}"#,
            1,
        );
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_COMMAND_NOT_FOUND));
        assert!(st.message.unwrap().contains("/bin/nonexistent-shell"));
        assert_eq!(
            st.exit_code, None,
            "no shell ran, so there is no exit status"
        );
    }

    #[test]
    fn an_agent_crash_without_a_message_fails_with_the_exit_code() {
        let s = TerminalSession::test();
        let pod = s.test_pod().scheduled().terminated("", 2);
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_AGENT_FAILED));
        assert!(st.message.unwrap().contains("code 2"));

        let pod = s
            .test_pod()
            .scheduled()
            .terminated_with_reason("OOMKilled", 137);
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_OOM_KILLED));
    }

    #[test]
    fn an_evicted_pod_fails_the_session() {
        let s = TerminalSession::test();
        let pod = s
            .test_pod()
            .scheduled()
            .failed("Evicted", "The node was low on resource: memory.");
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_EVICTED));
        assert!(st.message.unwrap().contains("low on resource"));
    }

    #[test]
    fn a_pod_deleted_under_a_live_session_fails_it_and_never_leaves_it_ready() {
        let s = TerminalSession::test();
        let ready = status(
            &s,
            PodState::Present(&s.test_pod().scheduled().running("10.0.0.7", true)),
        );
        let s = s.with_status(ready);
        let st = status(
            &s,
            PodState::Present(
                &s.test_pod()
                    .scheduled()
                    .running("10.0.0.7", true)
                    .deleting(),
            ),
        );
        assert_eq!(st.phase, Some(SessionPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_POD_DELETED));
        assert!(st.endpoint.is_none());
        assert_eq!(cond(&st, c::READY).unwrap().status, "False");

        let st = status(&s, PodState::Gone);
        assert_eq!(st.phase, Some(SessionPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(c::REASON_POD_DELETED));
        assert_eq!(st.pod_name.as_deref(), Some("dev-0f1e2d3c"));
        assert!(st.endpoint.is_none());
    }

    #[test]
    fn foreign_pods_are_named_in_a_condition_and_not_used() {
        let s = TerminalSession::test();
        let mut st = status(&s, PodState::NotCreated);
        let old = st.clone();
        report_foreign_pods(&mut st, &old, &[], None, t0());
        assert!(
            cond(&st, c::FOREIGN_PODS).is_none(),
            "no foreign pods, no condition"
        );
        report_foreign_pods(&mut st, &old, &["dev-squat".into()], None, t0());
        let f = cond(&st, c::FOREIGN_PODS).expect("reported");
        assert_eq!(
            (f.status.as_str(), f.reason.as_str()),
            ("True", c::REASON_FOREIGN_POD)
        );
        assert!(f.message.contains("dev-squat"), "{}", f.message);
        assert!(st.pod_name.is_none() && st.endpoint.is_none(), "never used");
    }

    #[test]
    fn an_unknown_pod_is_not_ready() {
        let s = TerminalSession::test();
        let pod = s
            .test_pod()
            .scheduled()
            .running("10.0.0.7", true)
            .phase("Unknown");
        let st = status(&s, PodState::Present(&pod));
        assert_eq!(st.phase, Some(SessionPhase::Starting));
        assert!(st.endpoint.is_none());
    }

    #[test]
    fn a_final_status_never_changes_again() {
        let s = TerminalSession::test();
        let done = status(
            &s,
            PodState::Present(
                &s.test_pod()
                    .scheduled()
                    .terminated(r#"{"reason":"ShellExited","exitCode":0}"#, 0),
            ),
        );
        let s = s.with_status(done.clone());
        assert_eq!(status(&s, PodState::Gone), done);
        assert_eq!(status(&s, PodState::NotCreated), done);
    }

    #[test]
    fn long_messages_are_cut() {
        let r = Rejection {
            object: "session pod".into(),
            code: 403,
            reason: "Forbidden".into(),
            message: "é".repeat(5000),
        };
        let st = status(&TerminalSession::test(), PodState::Rejected(&r));
        assert!(st.message.unwrap().len() <= MAX_MESSAGE + 4);
    }

    #[test]
    fn termination_messages_parse_and_garbage_does_not() {
        let m =
            TerminationMessage::parse("\n{\"reason\":\"IdleTimeout\",\"exitCode\":0}\n").unwrap();
        assert_eq!(m.reason, "IdleTimeout");
        assert!(TerminationMessage::parse("panic: oops").is_none());
        assert!(TerminationMessage::parse("").is_none());
    }

    #[test]
    fn only_refusals_become_rejections() {
        let st = |code| kube::core::Status::failure("m", "Forbidden").with_code(code);
        assert!(Rejection::from_status("session pod", &st(403)).is_some());
        assert!(Rejection::from_status("session pod", &st(422)).is_some());
        assert!(Rejection::from_status("session pod", &st(500)).is_none());
        assert!(Rejection::from_status("session pod", &st(409)).is_none());
        assert!(Rejection::from_status("session pod", &st(429)).is_none());
    }
}
