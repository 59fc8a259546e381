//! The mission end to end on a real node (containerd, runc, kubelet; the chart installed by helm
//! from the images the Dockerfile builds): `kubectl apply` of the examples → the operator makes a
//! restricted pod → the kubelet runs the agent in a container → `kubectl wait --for=condition=Ready` →
//! headless Chromium signs in at the gateway as alice, types a command and sees its output,
//! bob (bound only to observe) watches without typing, and the gateway restarts mid-stream without losing or
//! repeating a line; deleting the TerminalSession ends both pages with a message that says so.
//! Around it: replacing the operator's pods disturbs no live session, an idle session reaches
//! Expired, a shell exit reaches Succeeded, and a command that does not exist ends Failed with
//! a reason naming it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use tether_e2e::{
    cluster::{ChartStack, Cluster},
    wait::{eventually, never_within},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use tether_api::{SessionPhase, TerminalSession};
use tether_e2e::idp::user as idp_user;
use tether_e2e::{binaries, binaries::repo_root, stack};

fn kubectl(stack: &ChartStack, args: &[&str]) -> (bool, String) {
    let bins = binaries::ensure().unwrap();
    let out = Command::new(&bins.kubectl)
        .args(args)
        .env("KUBECONFIG", stack.admin_kubeconfig())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn wait_phase(
    api: &Api<TerminalSession>,
    name: &str,
    want: SessionPhase,
    secs: u64,
) -> TerminalSession {
    eventually(
        &format!("session {name} reaches {want}"),
        Duration::from_secs(secs),
        || async {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            if s.status.as_ref().and_then(|st| st.phase) == Some(want) {
                Ok(s)
            } else {
                Err(serde_json::to_string_pretty(&s.status).unwrap_or_default())
            }
        },
    )
    .await
}

/// The page and the browser driver come from ws-gateway/web's lockfile. The page must exist
/// before the stack builds the gateway, which embeds it at compile time.
fn ensure_browser_tooling() {
    let web = repo_root().join("ws-gateway/web");
    let npm = |args: &[&str]| {
        let ok = Command::new("npm")
            .args(args)
            .current_dir(&web)
            .status()
            .unwrap()
            .success();
        assert!(ok, "npm {} in ws-gateway/web failed", args.join(" "));
    };
    if !web.join("node_modules").exists() {
        npm(&["ci", "--no-audit", "--no-fund"]);
    }
    if !web.join("dist/index.html").exists() {
        npm(&["run", "build"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_goes_from_kubectl_apply_to_a_browser_and_ends_honestly() {
    ensure_browser_tooling();
    let cluster = Cluster::shared().await;
    let cp = &cluster.cp;
    let stack = &cluster.stack;

    let examples = repo_root().join("examples");
    stack::kubectl_apply(
        stack.admin_kubeconfig(),
        &["-k", examples.to_str().unwrap()],
        None,
    )
    .expect("kubectl apply -k examples/");
    let (ok, out) = kubectl(
        stack,
        &[
            "wait",
            "-n",
            "tether-demo",
            "--for=condition=Ready",
            "ts/basic",
            "--timeout=120s",
        ],
    );
    assert!(
        ok,
        "kubectl wait Ready failed: {out}\n{}",
        tether_e2e::namespace::dump(&cp.admin_client().await, "tether-demo").await
    );

    let admin = cp.admin_client().await;
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), "tether-demo");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "tether-demo");
    let before = sessions.get("basic").await.unwrap().status.unwrap();
    let pod_uid = pods
        .get(before.pod_name.as_deref().unwrap())
        .await
        .unwrap()
        .metadata
        .uid;

    // Replacing the operator's pods disturbs no live session: once the new operator is up
    // (the rollout waits for it to be Ready, which it is once it leads and has synced), the
    // session keeps its pod and stays Ready while it reconciles.
    stack
        .delete_operator_pods()
        .await
        .expect("the operator's Deployment replaces its pods");
    never_within(
        "the live session changes after the operator is replaced",
        Duration::from_secs(10),
        || async {
            let after = sessions
                .get("basic")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            let pod = pods
                .get_opt(after.pod_name.as_deref().unwrap_or_default())
                .await
                .map_err(|e| e.to_string())?;
            let uid = pod.and_then(|p| p.metadata.uid);
            if after.phase != Some(SessionPhase::Ready)
                || after.pod_name != before.pod_name
                || uid != pod_uid
            {
                return Err(format!(
                    "phase {:?}, pod {:?} (uid {uid:?})",
                    after.phase, after.pod_name
                ));
            }
            Ok(())
        },
    )
    .await;

    // The browser: alice attaches, bob observes, the gateway restarts mid-stream. Both sign in
    // at the identity provider; bob is bound only to tether-viewer (examples/shared.yaml, as
    // the group oidc:tether-observers): he may observe, never type.
    let script = repo_root().join("ws-gateway/web/test/browser.mjs");
    let shots = stack.dir().join("browser");
    let mut node = Command::new("node")
        .arg(&script)
        .env("TETHER_URL", stack.url())
        // alice and bob sign in through Keycloak's own login form in Chromium.
        .env(
            "TETHER_TOKEN",
            format!("idp:alice:{}", idp_user("alice").unwrap().password),
        )
        .env("TETHER_EXPECT_USER_PREFIX", "alice@tether.test")
        .env("TETHER_SESSION", "tether-demo/basic")
        .env("TETHER_OBSERVE", "1")
        .env(
            "TETHER_OBSERVER_TOKEN",
            format!("idp:bob:{}", idp_user("bob").unwrap().password),
        )
        .env("TETHER_OBSERVER_CANNOT_ATTACH", "1")
        .env("TETHER_RESUME_LINES", "200")
        .env("TETHER_RESUME_DELAY", "0.02")
        .env("TETHER_RESTART_VIA_STDIO", "1")
        .env("TETHER_DELETE_VIA_STDIO", "1")
        .env("TETHER_SCREENSHOT_DIR", &shots)
        .env("TETHER_TIMEOUT_MS", "60000")
        .current_dir(repo_root().join("ws-gateway/web"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs the browser script");
    let mut stdin = node.stdin.take().unwrap();
    let stdout = BufReader::new(node.stdout.take().unwrap());
    let mut lines = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        println!("{line}");
        if line.contains("TETHER-BROWSER restart-gateway") {
            stack
                .restart_gateway()
                .expect("the gateway's rollout restart completes");
            writeln!(stdin, "restarted").unwrap();
        }
        if line.contains("TETHER-BROWSER delete-session") {
            let (ok, out) = kubectl(
                stack,
                &["delete", "-n", "tether-demo", "ts/basic", "--wait=false"],
            );
            if !ok {
                let _ = node.kill();
                panic!("kubectl delete ts/basic failed: {out}");
            }
            writeln!(stdin, "deleted").unwrap();
        }
        lines.push(line);
    }
    let status = node.wait().unwrap();
    assert!(
        status.success()
            && lines
                .last()
                .is_some_and(|l| l.contains("TETHER-BROWSER ok")),
        "the browser scenario failed ({status}); screenshots in {}\n{}",
        shots.display(),
        lines.join("\n")
    );

    // A shell that exits ends its session Succeeded; a session nobody uses ends Expired.
    let apply = |name: &str, spec: serde_json::Value| {
        let api = sessions.clone();
        let manifest = serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
            "metadata": {"name": name}, "spec": spec,
        });
        let name = name.to_string();
        async move {
            api.patch(&name, &PatchParams::apply("e2e"), &Patch::Apply(manifest))
                .await
                .unwrap();
        }
    };
    apply(
        "exits",
        serde_json::json!({"command": ["/bin/sh", "-c", "sleep 1; exit 0"]}),
    )
    .await;
    apply("idles", serde_json::json!({"idleTimeoutSeconds": 5})).await;
    let exited = wait_phase(&sessions, "exits", SessionPhase::Succeeded, 90).await;
    assert_eq!(exited.status.unwrap().exit_code, Some(0));
    let idled = wait_phase(&sessions, "idles", SessionPhase::Expired, 90).await;
    assert!(
        idled
            .status
            .unwrap()
            .message
            .unwrap_or_default()
            .to_lowercase()
            .contains("idle"),
        "the message says it was idle"
    );

    // A command that does not exist ends the session Failed, naming the command, as a Job's
    // pod would; it is not a shell that ran and exited 127.
    apply(
        "no-shell",
        serde_json::json!({"command": ["/bin/nonexistent-shell"]}),
    )
    .await;
    let failed = wait_phase(&sessions, "no-shell", SessionPhase::Failed, 90)
        .await
        .status
        .unwrap();
    assert_eq!(
        failed.reason.as_deref(),
        Some("CommandNotFound"),
        "{failed:?}"
    );
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("/bin/nonexistent-shell"),
        "the message names the command: {failed:?}"
    );
    assert_eq!(failed.exit_code, None);

    // The deleted session's pod is collected with it.
    let basic_pod = before.pod_name.unwrap();
    eventually(
        &format!("pod {basic_pod} goes with its deleted session"),
        Duration::from_secs(60),
        || async {
            match pods.get_opt(&basic_pod).await {
                Ok(None) => Ok(()),
                Ok(Some(p)) => Err(format!("still there: {:?}", p.status.and_then(|s| s.phase))),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
}

/// Not a test: the figure issue 6 asks for. `kubectl apply` of one session, then
/// `kubectl wait --for=condition=Ready`, timed on the client, for 20 sessions one after another
/// on the real node (TETHER_BENCH_SESSIONS changes the count). Prints p50/p99; asserts only
/// that every session became Ready. Each asks for 10m of CPU: with the operator's default
/// requests a two-core node schedules about 17 sessions beside the chart's pods, and the rest
/// would wait Unschedulable.
///
/// cargo test -p tether-e2e --test end_to_end -- --ignored --nocapture apply_to_ready
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn apply_to_ready() {
    let count: usize = std::env::var("TETHER_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    ensure_browser_tooling();
    let cluster = Cluster::shared().await;
    let stack = &cluster.stack;
    let ns = cluster.cp.namespace("bench").await;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("b{i:03}");
        let manifest = format!(
            "apiVersion: tether.dev/v1alpha1\nkind: TerminalSession\nmetadata:\n  name: {name}\n  namespace: {}\nspec:\n  idleTimeoutSeconds: 600\n  resources:\n    requests: {{cpu: 10m, memory: 32Mi}}\n    limits: {{cpu: 500m, memory: 256Mi}}\n",
            ns.name()
        );
        let t0 = std::time::Instant::now();
        stack::kubectl_apply(stack.admin_kubeconfig(), &["-f", "-"], Some(&manifest))
            .expect("kubectl apply");
        let (ok, out) = kubectl(
            stack,
            &[
                "wait",
                "-n",
                ns.name(),
                "--for=condition=Ready",
                &format!("ts/{name}"),
                "--timeout=120s",
            ],
        );
        assert!(ok, "{name} never became Ready: {out}");
        samples.push(t0.elapsed());
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "kubectl apply → Ready on the real node, {count} sessions one after another: \
         p50 {:.2} s, p99 {:.2} s, min {:.2} s, max {:.2} s",
        at(0.50).as_secs_f64(),
        at(0.99).as_secs_f64(),
        samples[0].as_secs_f64(),
        samples[samples.len() - 1].as_secs_f64(),
    );
}
