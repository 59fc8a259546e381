//! The network policy around session pods: ingress only from the gateway, egress as the
//! administrator allows.
//!
//! One policy per namespace, not one per session. Its content depends only on the operator's
//! settings, never on a session, so N sessions would mean N identical objects; a single policy
//! selecting every session pod by label costs one object per tenant namespace, and because it
//! exists before the second session's pod is created, no pod runs a moment unprotected. It is
//! applied (Server-Side Apply, idempotent) before each session pod is created, so a settings
//! change reaches a namespace with its next session. It has no owner: it outlives its sessions
//! but selects nothing once they are gone; `app.kubernetes.io/managed-by=tether-operator`
//! finds it for cleanup.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::api::ObjectMeta;

use crate::{
    config::Settings,
    pod::{AGENT_PORT, labels},
};

/// Name of the policy in each namespace with sessions.
pub const NETWORK_POLICY_NAME: &str = "tether-sessions";

/// The policy protecting every session pod of `namespace`.
pub fn build_network_policy(namespace: &str, settings: &Settings) -> NetworkPolicy {
    let session_pods = BTreeMap::from([
        (labels::NAME.to_string(), labels::NAME_VALUE.to_string()),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
    ]);
    // Namespace AND pod selector in one peer: gateway pods in the gateway namespace only, not
    // any pod there nor any namespace's pods with the gateway's labels.
    let gateway = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                settings.gateway.namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(settings.gateway.pod_labels.clone()),
            ..Default::default()
        }),
        ip_block: None,
    };
    let mut egress = Vec::new();
    if settings.egress.dns {
        egress.push(NetworkPolicyEgressRule {
            ports: Some(vec![port(53, "UDP"), port(53, "TCP")]),
            to: None,
        });
    }
    if !settings.egress.cidrs.is_empty() {
        egress.push(NetworkPolicyEgressRule {
            ports: None,
            to: Some(
                settings
                    .egress
                    .cidrs
                    .iter()
                    .map(|cidr| NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: cidr.clone(),
                            except: None,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        });
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(NETWORK_POLICY_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(session_pods),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![gateway]),
                ports: Some(vec![port(AGENT_PORT, "TCP")]),
            }]),
            egress: Some(egress),
        }),
    }
}

fn port(port: i32, protocol: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some(protocol.into()),
        end_port: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Egress;

    #[test]
    fn ingress_comes_only_from_gateway_pods_in_the_gateway_namespace_on_the_agent_port() {
        let np = build_network_policy("team-a", &Settings::default());
        let spec = np.spec.unwrap();
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        let from = ingress[0].from.as_ref().unwrap();
        assert_eq!(
            from.len(),
            1,
            "one peer holding both selectors, not two peers"
        );
        let ns = from[0]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(ns["kubernetes.io/metadata.name"], "tether-system");
        let pods = from[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(pods["app.kubernetes.io/name"], "tether-gateway");
        let ports = ingress[0].ports.as_ref().unwrap();
        assert_eq!(ports[0].port, Some(IntOrString::Int(7681)));
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(np.metadata.namespace.as_deref(), Some("team-a"));
    }

    #[test]
    fn the_policy_selects_every_session_pod_and_nothing_else() {
        let spec = build_network_policy("a", &Settings::default())
            .spec
            .unwrap();
        let sel = spec.pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(sel["app.kubernetes.io/name"], "tether-session");
        assert_eq!(sel["app.kubernetes.io/managed-by"], "tether-operator");
        assert_eq!(spec.policy_types.unwrap(), vec!["Ingress", "Egress"]);
    }

    #[test]
    fn default_egress_is_dns_only() {
        let egress = build_network_policy("a", &Settings::default())
            .spec
            .unwrap()
            .egress
            .unwrap();
        assert_eq!(egress.len(), 1);
        assert!(egress[0].to.is_none());
        let ports = egress[0].ports.as_ref().unwrap();
        assert_eq!(ports.len(), 2);
        assert!(ports.iter().all(|p| p.port == Some(IntOrString::Int(53))));
    }

    #[test]
    fn configured_cidrs_are_allowed_on_any_port_and_no_egress_means_deny_all() {
        let settings = Settings {
            egress: Egress {
                dns: false,
                cidrs: vec!["10.0.0.0/8".into()],
            },
            ..Settings::default()
        };
        let egress = build_network_policy("a", &settings)
            .spec
            .unwrap()
            .egress
            .unwrap();
        assert_eq!(egress.len(), 1);
        assert!(egress[0].ports.is_none());
        let to = egress[0].to.as_ref().unwrap();
        assert_eq!(to[0].ip_block.as_ref().unwrap().cidr, "10.0.0.0/8");

        let settings = Settings {
            egress: Egress {
                dns: false,
                cidrs: vec![],
            },
            ..Settings::default()
        };
        let spec = build_network_policy("a", &settings).spec.unwrap();
        assert_eq!(spec.egress, Some(vec![]));
        assert!(spec.policy_types.unwrap().contains(&"Egress".to_string()));
    }
}
