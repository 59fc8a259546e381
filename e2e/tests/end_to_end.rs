//! The mission end to end on one machine: `kubectl apply` of the examples → the operator makes a
//! restricted pod → the local node runs the agent → `kubectl wait --for=condition=Ready` →
//! headless Chromium signs in at the gateway as alice, types a command and sees its output,
//! bob (bound only to observe) watches without typing, and the gateway restarts mid-stream without losing or
//! repeating a line. Around it: an operator crash disturbs no live session, an idle session
//! reaches Expired, a shell exit reaches Succeeded.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use tether_api::{SessionPhase, TerminalSession};
use tether_e2e::{
    ControlPlane, binaries,
    binaries::repo_root,
    stack::{self, Stack, StackOptions},
};

fn kubectl(stack: &Stack, args: &[&str]) -> (bool, String) {
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
    let mut last = None;
    for _ in 0..secs * 5 {
        let s = api.get(name).await.unwrap();
        if s.status.as_ref().and_then(|st| st.phase) == Some(want) {
            return s;
        }
        last = Some(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "session {name} never reached {want}; status: {}",
        serde_json::to_string_pretty(&last.and_then(|s| s.status)).unwrap()
    );
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
    let cp = ControlPlane::shared().await;
    ensure_browser_tooling();
    let mut stack = Stack::start(
        cp,
        StackOptions {
            dir: cp.dir().join("stack"),
            gateway_port: 0,
            operator_args: vec![],
        },
    )
    .await
    .expect("the stack starts");

    let examples = repo_root().join("examples");
    stack::kubectl_apply(
        stack.admin_kubeconfig(),
        &["-k", examples.to_str().unwrap()],
        None,
    )
    .expect("kubectl apply -k examples/");
    let (ok, out) = kubectl(
        &stack,
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

    // An operator crash disturbs no live session: same pod, still Ready.
    stack.restart_operator().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = sessions.get("basic").await.unwrap().status.unwrap();
    assert_eq!(after.phase, Some(SessionPhase::Ready));
    assert_eq!(after.pod_name, before.pod_name);
    assert_eq!(
        pods.get(after.pod_name.as_deref().unwrap())
            .await
            .unwrap()
            .metadata
            .uid,
        pod_uid
    );

    // The browser: alice attaches, bob observes, the gateway restarts mid-stream.
    let alice = stack
        .users
        .iter()
        .find(|u| u.user == "alice")
        .unwrap()
        .token
        .clone();
    // bob is bound only to tether-viewer (examples/shared.yaml): he may observe, never type.
    let bob = stack
        .users
        .iter()
        .find(|u| u.user == "bob")
        .unwrap()
        .token
        .clone();
    let script = repo_root().join("ws-gateway/web/test/browser.mjs");
    let shots = stack.dir().join("browser");
    let mut node = Command::new("node")
        .arg(&script)
        .env("TETHER_URL", stack.url())
        .env("TETHER_TOKEN", &alice)
        .env("TETHER_SESSION", "tether-demo/basic")
        .env("TETHER_OBSERVE", "1")
        .env("TETHER_OBSERVER_TOKEN", &bob)
        .env("TETHER_RESUME_LINES", "200")
        .env("TETHER_RESUME_DELAY", "0.02")
        .env("TETHER_RESTART_VIA_STDIO", "1")
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
            stack.restart_gateway().await.expect("the gateway restarts");
            writeln!(stdin, "restarted").unwrap();
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
}
