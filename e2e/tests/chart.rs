//! The Helm chart: it lints, its rendering validates strictly against the schemas of the very
//! API server the tests run (and of our CRD), and the API server accepts it server-side.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};
use tether_e2e::{ControlPlane, binaries, binaries::repo_root};

fn chart() -> PathBuf {
    repo_root().join("charts/tether")
}

fn run(
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
    kubeconfig: Option<&Path>,
) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    binaries::Binaries::isolate_helm(&mut cmd);
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn render(namespace: &str, extra: &[&str]) -> String {
    let bins = binaries::ensure().unwrap();
    let chart = chart();
    let mut args = vec![
        "template",
        "tether",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
        "--include-crds",
        "--kube-version",
        binaries::KUBERNETES_VERSION,
    ];
    args.extend_from_slice(extra);
    let (ok, out) = run(&bins.helm, &args, None, None);
    assert!(ok, "helm template failed:\n{out}");
    out
}

#[test]
fn the_chart_crd_is_the_generated_one() {
    let generated =
        std::fs::read_to_string(repo_root().join("crds/terminalsessions.yaml")).unwrap();
    let in_chart = std::fs::read_to_string(chart().join("crds/terminalsessions.yaml")).unwrap();
    assert!(
        generated == in_chart,
        "charts/tether/crds/ is stale: cp crds/terminalsessions.yaml charts/tether/crds/"
    );
}

#[test]
fn helm_lint_passes_strictly() {
    let bins = binaries::ensure().unwrap();
    let (ok, out) = run(
        &bins.helm,
        &["lint", "--strict", chart().to_str().unwrap()],
        None,
        None,
    );
    assert!(ok, "helm lint --strict failed:\n{out}");
}

#[test]
fn the_chart_renders_the_operator_role_from_its_rules_file() {
    let rendered = render("tether-system", &[]);
    let rules: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart().join("files/operator-rules.yaml")).unwrap(),
    )
    .unwrap();
    let role = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "tether-operator")
        .expect("the operator ClusterRole is rendered");
    assert_eq!(
        role["rules"], rules,
        "the chart's operator role is exactly files/operator-rules.yaml"
    );
    for name in ["tether-admin", "tether-user", "tether-viewer"] {
        let role = documents(&rendered)
            .into_iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{name} is rendered"));
        let verbs = role["rules"][0]["verbs"].as_array().unwrap();
        assert!(verbs.contains(&json!("observe")), "{name} may observe");
        assert_eq!(
            verbs.contains(&json!("attach")),
            name != "tether-viewer",
            "{name} attach"
        );
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| {
            serde_json::to_value(
                <serde_yaml_ng::Value as serde::Deserialize>::deserialize(d).unwrap(),
            )
            .unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Writes one strict JSON schema per kind, named `<group>_<version>_<kind>.json`, from the API
/// server's own OpenAPI document and from our CRD: no schema download, and exactly the
/// Kubernetes version the chart is applied to.
async fn write_schemas(cp: &ControlPlane, dir: &Path) {
    let client = cp.admin_client().await;
    let req = http::Request::get("/openapi/v2").body(Vec::new()).unwrap();
    let doc: Value = serde_json::from_str(&client.request_text(req).await.unwrap()).unwrap();
    let mut definitions = doc["definitions"].as_object().unwrap().clone();
    // Fields that YAML may write as numbers or strings.
    for loose in [
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
        "io.k8s.apimachinery.pkg.api.resource.Quantity",
    ] {
        definitions.insert(
            loose.into(),
            json!({"oneOf": [{"type": "string"}, {"type": "number"}]}),
        );
    }
    let mut definitions = Value::Object(definitions);
    strict(&mut definitions);
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    for (name, def) in definitions.as_object().unwrap() {
        for gvk in def["x-kubernetes-group-version-kind"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let group = gvk["group"].as_str().unwrap_or("");
            let version = gvk["version"].as_str().unwrap();
            let kind = gvk["kind"].as_str().unwrap().to_lowercase();
            let group = if group.is_empty() { version } else { group };
            kinds.insert(format!("{group}_{version}_{kind}.json"), name.clone());
        }
    }
    for (file, name) in kinds {
        let schema = json!({"$ref": format!("#/definitions/{name}"), "definitions": definitions});
        std::fs::write(dir.join(file), schema.to_string()).unwrap();
    }
    let crd: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("crds/terminalsessions.yaml")).unwrap(),
    )
    .unwrap();
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    // The API server supplies these for every custom resource; the CRD does not list them.
    for (field, ty) in [
        ("apiVersion", "string"),
        ("kind", "string"),
        ("metadata", "object"),
    ] {
        schema["properties"][field] = json!({"type": ty});
    }
    strict(&mut schema);
    std::fs::write(
        dir.join("tether.dev_v1alpha1_terminalsession.json"),
        schema.to_string(),
    )
    .unwrap();
}

/// Closes every object schema that lists its properties, so an unknown field is an error.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for v in map.values_mut() {
                strict(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

fn kubeconform(schemas: &Path, manifests: &str, skip: &str) -> (bool, String) {
    let bins = binaries::ensure().unwrap();
    let location = format!(
        "{}/{{{{ .Group }}}}_{{{{ .ResourceAPIVersion }}}}_{{{{ .ResourceKind }}}}.json",
        schemas.display()
    );
    let mut args = vec!["-strict", "-summary", "-schema-location", location.as_str()];
    if !skip.is_empty() {
        args.extend(["-skip", skip]);
    }
    args.push("-");
    run(&bins.kubeconform, &args, Some(manifests), None)
}

#[tokio::test]
async fn the_rendered_chart_and_the_examples_validate_strictly_and_apply_server_side() {
    let cp = ControlPlane::shared().await;
    cp.install_crds().await;
    let schemas = tempfile::tempdir().unwrap();
    write_schemas(cp, schemas.path()).await;

    let defaults = render("tether-system", &[]);
    let (ok, out) = kubeconform(schemas.path(), &defaults, "");
    assert!(ok, "kubeconform refused the default rendering:\n{out}");
    let everything = render(
        "tether-system",
        &[
            "--set",
            "gateway.ingress.enabled=true",
            "--set",
            "gateway.ingress.tlsSecretName=tls",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "operator.runtimeClassName=gvisor",
            "--set",
            "operator.egressCIDRs={0.0.0.0/0}",
            "--set",
            "gateway.oidc.issuer=https://id.example.com",
            "--set",
            "gateway.oidc.audiences={tether-gateway,kubectl-tether}",
            "--set",
            "gateway.oidc.externalURL=https://tether.example.com",
            "--set",
            "gateway.oidc.clientSecretSecret=tether-oidc",
            // A value ending in `:` is a YAML mapping unless the chart quotes it.
            "--set",
            "gateway.oidc.groupsPrefix=oidc:",
            "--set",
            "gateway.oidc.usernamePrefix=-",
        ],
    );
    assert!(
        everything.contains("\"--oidc-groups-prefix=oidc:\""),
        "the groups prefix reaches the gateway as one argument"
    );
    // ServiceMonitor's CRD belongs to the Prometheus Operator, which this cluster lacks.
    let (ok, out) = kubeconform(schemas.path(), &everything, "ServiceMonitor");
    assert!(ok, "kubeconform refused the full rendering:\n{out}");

    // A wrong field must fail: the check can fail.
    let broken = defaults.replacen("replicas:", "replicaz:", 1);
    let (ok, out) = kubeconform(schemas.path(), &broken, "");
    assert!(!ok, "kubeconform accepted an unknown field:\n{out}");

    let mut examples = String::new();
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().unwrap() != "kustomization.yaml"
        {
            examples.push_str("---\n");
            examples.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    let (ok, out) = kubeconform(schemas.path(), &examples, "");
    assert!(ok, "kubeconform refused examples/:\n{out}");

    let ns = cp.namespace("chart").await;
    let rendered = render(ns.name(), &[]);
    let bins = binaries::ensure().unwrap();
    let (ok, out) = run(
        &bins.kubectl,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=helm-test",
            "-f",
            "-",
        ],
        Some(&rendered),
        Some(cp.admin_kubeconfig()),
    );
    assert!(ok, "the API server refused the chart:\n{out}");
    assert!(
        out.contains("deployment.apps/tether-operator serverside-applied"),
        "{out}"
    );
    assert!(
        out.contains("clusterrole.rbac.authorization.k8s.io/tether-viewer serverside-applied"),
        "{out}"
    );
}
