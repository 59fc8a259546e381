//! `kubectl-tether attach` as a process: keystrokes reach the session, output comes back, and
//! a refusal is reported in words with a failing exit status.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

fn cli(gw: &TestGateway, token: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-tether"));
    c.args(["attach", SESSION, "-n", NS, "--gateway"])
        .arg(format!("http://{}", gw.addr))
        .args(extra)
        .env("TETHER_TOKEN", token)
        .env_remove("TETHER_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn the_cli_attaches_types_and_detaches_at_end_of_input() {
    let gw = TestGateway::start(&[]).await;
    let mut child = cli(&gw, ALICE, &[]).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"hello-from-cli").await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("hello-from-cli") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "stdout closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the echo arrives");
    drop(stdin);
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_cli_reconnects_and_resumes_when_the_connection_is_lost() {
    let gw = TestGateway::start(&[]).await;
    let mut child = cli(&gw, ALICE, &[]).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    stdin.write_all(b"before").await.unwrap();
    wait_for(&mut stdout, "before").await;
    stdin
        .write_all(tether_gateway::test_backend::DROP_COMMAND)
        .await
        .unwrap();
    wait_for(&mut stderr, "resuming").await;
    stdin.write_all(b"after-the-drop").await.unwrap();
    wait_for(&mut stdout, "after-the-drop").await;
    drop(stdin);
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        gw.backend
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

async fn wait_for(out: &mut (impl AsyncReadExt + Unpin), text: &str) {
    let mut seen = Vec::new();
    tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(text) {
            let n = out.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {text:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{text:?} did not arrive: {}",
            String::from_utf8_lossy(&seen)
        )
    });
}

#[tokio::test]
async fn a_refused_attach_is_explained_and_fails() {
    let gw = TestGateway::start(&[]).await;
    let out = tokio::time::timeout(STEP, cli(&gw, BOB, &[]).output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") && err.contains("may not attach"),
        "{err}"
    );
}
