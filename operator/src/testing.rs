//! Fixtures for unit and mocked-API tests: sessions and pods in any state, built fluently.

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, Pod, PodCondition, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::api::ObjectMeta;
use tether_api::{
    Recording, ResourceAmounts, SessionEnvVar, SessionResources, TerminalSession,
    TerminalSessionSpec, TerminalSessionStatus, TerminalSize,
};

use crate::{config::Settings, pod::build_pod};

/// The fixed "now" of the tests.
pub fn t0() -> Timestamp {
    "2026-11-22T13:00:00Z".parse().unwrap()
}

/// Fluent construction of test sessions.
pub trait SessionExt: Sized {
    /// `team-a/dev`, UID `0f1e2d3c-…`, generation 1, empty spec.
    fn test() -> Self;
    fn with_name(self, name: &str) -> Self;
    fn with_uid(self, uid: &str) -> Self;
    fn with_command(self, argv: &[&str]) -> Self;
    fn with_env(self, name: &str, value: &str) -> Self;
    fn with_working_dir(self, dir: &str) -> Self;
    fn with_idle_timeout(self, seconds: i64) -> Self;
    fn with_max_lifetime(self, seconds: i64) -> Self;
    fn with_ttl(self, seconds: i64) -> Self;
    fn with_size(self, cols: u16, rows: u16) -> Self;
    fn with_recording(self) -> Self;
    fn with_resources(
        self,
        requests: Option<ResourceAmounts>,
        limits: Option<ResourceAmounts>,
    ) -> Self;
    fn with_status(self, status: TerminalSessionStatus) -> Self;
    /// The pod the operator builds for this session with default settings, no status.
    fn test_pod(&self) -> Pod;
}

impl SessionExt for TerminalSession {
    fn test() -> Self {
        let mut s = TerminalSession::new("dev", TerminalSessionSpec::default());
        s.metadata = ObjectMeta {
            name: Some("dev".into()),
            namespace: Some("team-a".into()),
            uid: Some("0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f0".into()),
            generation: Some(1),
            resource_version: Some("100".into()),
            creation_timestamp: Some(Time(t0() - std::time::Duration::from_secs(10))),
            ..Default::default()
        };
        s
    }
    fn with_name(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self
    }
    fn with_uid(mut self, uid: &str) -> Self {
        self.metadata.uid = Some(uid.into());
        self
    }
    fn with_command(mut self, argv: &[&str]) -> Self {
        self.spec.command = Some(argv.iter().map(|s| s.to_string()).collect());
        self
    }
    fn with_env(mut self, name: &str, value: &str) -> Self {
        self.spec.env.push(SessionEnvVar {
            name: name.into(),
            value: value.into(),
        });
        self
    }
    fn with_working_dir(mut self, dir: &str) -> Self {
        self.spec.working_dir = Some(dir.into());
        self
    }
    fn with_idle_timeout(mut self, seconds: i64) -> Self {
        self.spec.idle_timeout_seconds = Some(seconds);
        self
    }
    fn with_max_lifetime(mut self, seconds: i64) -> Self {
        self.spec.max_lifetime_seconds = Some(seconds);
        self
    }
    fn with_ttl(mut self, seconds: i64) -> Self {
        self.spec.ttl_seconds_after_finished = Some(seconds);
        self
    }
    fn with_size(mut self, cols: u16, rows: u16) -> Self {
        self.spec.initial_size = Some(TerminalSize { cols, rows });
        self
    }
    fn with_recording(mut self) -> Self {
        self.spec.recording = Some(Recording { enabled: true });
        self
    }
    fn with_resources(
        mut self,
        requests: Option<ResourceAmounts>,
        limits: Option<ResourceAmounts>,
    ) -> Self {
        self.spec.resources = Some(SessionResources { requests, limits });
        self
    }
    fn with_status(mut self, status: TerminalSessionStatus) -> Self {
        self.status = Some(status);
        self
    }
    fn test_pod(&self) -> Pod {
        let mut pod = build_pod(self, &Settings::default(), "dev-0f1e2d3c").unwrap();
        pod.metadata.uid = Some("pod-uid-1".into());
        pod.metadata.resource_version = Some("200".into());
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        pod
    }
}

/// Pod states as a kubelet and scheduler would write them.
pub trait PodExt: Sized {
    fn scheduled(self) -> Self;
    fn unschedulable(self, message: &str) -> Self;
    fn waiting(self, reason: &str, message: &str) -> Self;
    fn running(self, ip: &str, ready: bool) -> Self;
    fn terminated(self, message: &str, exit_code: i32) -> Self;
    fn terminated_with_reason(self, reason: &str, exit_code: i32) -> Self;
    fn failed(self, reason: &str, message: &str) -> Self;
    fn deleting(self) -> Self;
    fn phase(self, phase: &str) -> Self;
}

fn status_mut(pod: &mut Pod) -> &mut PodStatus {
    pod.status.get_or_insert_with(Default::default)
}

fn set_condition(
    pod: &mut Pod,
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let conds = status_mut(pod).conditions.get_or_insert_with(Vec::new);
    conds.retain(|c| c.type_ != type_);
    conds.push(PodCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        last_transition_time: Some(Time(t0() - std::time::Duration::from_secs(5))),
        ..Default::default()
    });
}

fn set_container(pod: &mut Pod, state: ContainerState, ready: bool) {
    status_mut(pod).container_statuses = Some(vec![ContainerStatus {
        name: crate::pod::CONTAINER_NAME.into(),
        image: "img".into(),
        image_id: String::new(),
        ready,
        restart_count: 0,
        state: Some(state),
        ..Default::default()
    }]);
}

impl PodExt for Pod {
    fn scheduled(mut self) -> Self {
        set_condition(&mut self, "PodScheduled", true, None, None);
        self.spec.as_mut().unwrap().node_name = Some("node-1".into());
        status_mut(&mut self).start_time = Some(Time(t0() - std::time::Duration::from_secs(8)));
        set_container(
            &mut self,
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
            false,
        );
        self
    }
    fn unschedulable(mut self, message: &str) -> Self {
        set_condition(
            &mut self,
            "PodScheduled",
            false,
            Some("Unschedulable"),
            Some(message),
        );
        self
    }
    fn waiting(mut self, reason: &str, message: &str) -> Self {
        set_container(
            &mut self,
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                }),
                ..Default::default()
            },
            false,
        );
        self
    }
    fn running(mut self, ip: &str, ready: bool) -> Self {
        let st = status_mut(&mut self);
        st.phase = Some("Running".into());
        st.pod_ip = Some(ip.into());
        set_container(
            &mut self,
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(t0())),
                }),
                ..Default::default()
            },
            ready,
        );
        set_condition(&mut self, "ContainersReady", ready, None, None);
        set_condition(&mut self, "Ready", ready, None, None);
        self
    }
    fn terminated(mut self, message: &str, exit_code: i32) -> Self {
        let phase = if exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        };
        status_mut(&mut self).phase = Some(phase.into());
        set_container(
            &mut self,
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
                    message: Some(message.into()),
                    finished_at: Some(Time(t0() - std::time::Duration::from_secs(1))),
                    ..Default::default()
                }),
                ..Default::default()
            },
            false,
        );
        set_condition(&mut self, "Ready", false, Some("PodCompleted"), None);
        self
    }
    fn terminated_with_reason(mut self, reason: &str, exit_code: i32) -> Self {
        status_mut(&mut self).phase = Some("Failed".into());
        set_container(
            &mut self,
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    reason: Some(reason.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            false,
        );
        self
    }
    fn failed(mut self, reason: &str, message: &str) -> Self {
        let st = status_mut(&mut self);
        st.phase = Some("Failed".into());
        st.reason = Some(reason.into());
        st.message = Some(message.into());
        self
    }
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(Time(t0()));
        self
    }
    fn phase(mut self, phase: &str) -> Self {
        status_mut(&mut self).phase = Some(phase.into());
        self
    }
}
