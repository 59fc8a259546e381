//! The program's own output through the gateway and a real session agent (real tmux, real
//! WebSockets): every line of `seq` exactly once across random TCP cuts, and random bytes as
//! base64 byte for byte.

mod common;

use std::time::Duration;

use clap::Parser;
use common::*;
use rand::Rng;
use tether_gateway::index::Index;
use tether_protocol::Size;
use tether_protocol::client::{Event, TerminalClient};
use tether_protocol::frame::Start;

/// A gateway whose session is served by an in-process agent running bash in tmux.
struct Stack {
    gw: TestGateway,
    dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        let index = Index::shared();
        let gw = TestGateway::start_with(Options {
            index: Some(index.clone()),
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = tether_session_agent::Args::try_parse_from([
            "tether-session-agent".to_owned(),
            "--listen=127.0.0.1:0".into(),
            format!("--session={NS}/{SESSION}"),
            format!("--session-uid={SESSION_UID}"),
            format!("--ticket-public-key={}", gw.public_key),
            format!("--state-dir={}", dir.path().join("state").display()),
            format!(
                "--termination-message-path={}",
                dir.path().join("term").display()
            ),
            // The log holds a whole run, so that every resume is a replay.
            "--buffer-bytes=67108864".into(),
            "--catch-up-bytes=67108864".into(),
            "--window-bytes=65536".into(),
            "--".into(),
            "env".into(),
            "PS1=$ ".into(),
            "HISTFILE=/dev/null".into(),
            "bash".into(),
            "--noprofile".into(),
            "--norc".into(),
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = listener.local_addr().unwrap();
        tokio::spawn(tether_session_agent::run(
            cfg,
            listener,
            std::future::pending(),
        ));
        {
            let mut i = index.write().unwrap();
            i.relist_begin();
            i.relist_apply(&ready_session(NS, SESSION, SESSION_UID, &agent.to_string()));
            i.relist_done();
        }
        Stack { gw, dir }
    }

    async fn connect(&self) -> Ws {
        self.gw
            .ws(
                &format!("/ws/{NS}/{SESSION}?mode=attach"),
                Some(ORIGIN),
                Some(ALICE),
            )
            .await
            .expect("upgrade")
            .0
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::process::Command::new("/usr/bin/tmux")
            .arg("-S")
            .arg(self.dir.path().join("state/tmux.sock"))
            .arg("kill-server")
            .output();
    }
}

/// Reads output into `into` until `needle`; panics on anything but output and sizes.
async fn until(t: &mut TerminalClient<Ws>, into: &mut Vec<u8>, needle: &[u8]) {
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match t.next_event().await.unwrap() {
                Event::Output { data, .. } => into.extend_from_slice(&data),
                Event::Size(_) | Event::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
            let from = into.len().saturating_sub(data_window(needle));
            if into[from..].windows(needle.len()).any(|w| w == needle) {
                return;
            }
        }
    })
    .await
    .expect("the marker arrived in time");
}

fn data_window(needle: &[u8]) -> usize {
    64 * 1024 + needle.len()
}

async fn open(stack: &Stack) -> (TerminalClient<Ws>, Vec<u8>) {
    let (mut t, _) = TerminalClient::open(stack.connect().await, Size::new(80, 24).unwrap())
        .await
        .unwrap();
    let Event::Snapshot(first) = t.next_event().await.unwrap() else {
        panic!("a new client starts with a snapshot");
    };
    let mut seen = first.data.to_vec();
    if !seen.windows(2).any(|w| w == b"$ ") {
        until(&mut t, &mut seen, b"$ ").await;
    }
    (t, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_arrives_line_for_line_through_the_gateway_across_twenty_cuts() {
    const N: u64 = 300_000;
    let stack = Stack::start().await;
    let (t, _) = open(&stack).await;
    let mut t = Some(t);
    let mut out = Vec::new();
    t.as_mut()
        .unwrap()
        .send_input(format!("seq 1 {N}; echo END-$((40+2))\r").as_bytes())
        .await
        .unwrap();
    let mut rng = rand::rng();
    let mut cuts = 0;
    let mut next_cut = rng.random_range(20_000..100_000u64);
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match t.as_mut().unwrap().next_event().await.unwrap() {
                Event::Output { data, .. } => out.extend_from_slice(&data),
                Event::Size(_) | Event::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
            let tail = &out[out.len().saturating_sub(4096)..];
            if tail.windows(6).any(|w| w == b"END-42") {
                return;
            }
            if out.len() as u64 >= next_cut && cuts < 20 {
                cuts += 1;
                next_cut = out.len() as u64 + rng.random_range(20_000..100_000u64);
                let old = t.take().unwrap();
                let state = old.resume_state();
                drop(old.into_inner()); // a TCP cut: no close frame
                if rng.random_bool(0.5) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1..50))).await;
                }
                let (resumed, welcome) = TerminalClient::resume(
                    stack.connect().await,
                    state,
                    Size::new(80, 24).unwrap(),
                )
                .await
                .unwrap();
                assert_eq!(
                    (welcome.start, welcome.offset),
                    (Start::Replay, state.offset)
                );
                t = Some(resumed);
            }
        }
    })
    .await
    .expect("seq finished in time");
    let text = String::from_utf8_lossy(&out);
    let numbers: Vec<u64> = text
        .split("\r\n")
        // What a terminal shows of the line: after its last carriage return (bash's
        // `ESC [?2004l \r` comes before the first line).
        .filter_map(|l| l.rsplit('\r').next()?.trim().parse().ok())
        .collect();
    let got: Vec<u64> = numbers
        .into_iter()
        .filter(|n| (1..=N).contains(n))
        .collect();
    if let Some(i) = (0..got.len()).find(|&i| got[i] != i as u64 + 1) {
        let needle = format!("\r\n{i}\r\n");
        let at = text.find(&needle).unwrap_or(0);
        panic!(
            "line {} is missing or out of place after {cuts} cuts; around it: {:?}",
            i + 1,
            &text[at..(at + 80).min(text.len())]
        );
    }
    assert_eq!(
        got.len() as u64,
        N,
        "every line once ({cuts} cuts); the output ended with {:?}",
        &text[text.len().saturating_sub(120)..]
    );
    assert!(got.iter().copied().eq(1..=N), "in order ({cuts} cuts)");
    assert_eq!(cuts, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_as_base64_arrive_byte_for_byte_through_the_gateway() {
    let stack = Stack::start().await;
    let (mut t, _) = open(&stack).await;
    let file = stack.dir.path().join("random");
    t.send_input(
        format!(
            "head -c 5000000 /dev/urandom > {f}; echo BEGIN-$((1+1)); base64 {f}; echo END-$((40+2))\r",
            f = file.display()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    until(&mut t, &mut out, b"END-42").await;
    let begin = out
        .windows(9)
        .position(|w| w == b"BEGIN-2\r\n")
        .expect("the begin marker")
        + 9;
    let end = out
        .windows(6)
        .rposition(|w| w == b"END-42")
        .expect("the end marker");
    // What the program wrote, through the pty's line discipline (\n becomes \r\n).
    let expected = std::process::Command::new("base64")
        .arg(&file)
        .output()
        .unwrap()
        .stdout;
    let expected: Vec<u8> = expected
        .iter()
        .flat_map(|&b| {
            if b == b'\n' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    assert_eq!(out[begin..end].len(), expected.len(), "every byte");
    assert!(out[begin..end] == expected[..], "byte for byte");
}
