//! Resume without loss, and the snapshot when the bytes are gone.

mod common;

use common::*;
use rand::Rng;
use tether_protocol::client::{Event, TerminalClient};
use tether_protocol::frame::Start;
use tether_protocol::{Mode, Size};

/// Numbers a person would read in the transcript, line by line.
fn numbers(transcript: &[u8]) -> Vec<u64> {
    strip_ansi(&String::from_utf8_lossy(transcript))
        .split('\n')
        .filter_map(|l| {
            let l = l.trim();
            (!l.is_empty() && l.bytes().all(|b| b.is_ascii_digit())).then(|| l.parse().unwrap())
        })
        .collect()
}

fn screen_lines(s: &str) -> Vec<String> {
    let mut lines: Vec<String> = s.lines().map(|l| l.trim_end().to_owned()).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// Cuts the connection (no close frame, like a network failure) at random points while `seq`
/// streams, resumes each time from the last offset held, and checks that the client receives the
/// program's own output: every number from 1 to N exactly once and in order, and a screen that
/// is tmux's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cuts_during_seq_lose_and_duplicate_nothing() {
    const N: u64 = 300_000;
    // A small window, so the sender pauses during the cuts too; a log that holds the whole run,
    // so every resume is a replay.
    let agent = TestAgent::start(&[
        "--window-bytes=65536",
        "--buffer-bytes=67108864",
        "--catch-up-bytes=67108864",
    ])
    .await;
    let size = Size::new(80, 24).unwrap();
    let mut t = agent.open(Mode::Attach, size).await;
    let Event::Snapshot(first) = t.next_event().await.unwrap() else {
        panic!("a new client starts with a snapshot");
    };
    let mut transcript: Vec<u8> = first.data.to_vec();
    if !String::from_utf8_lossy(&first.data).contains("$ ") {
        transcript.extend_from_slice(read_until(&mut t, "$ ").await.as_bytes());
    }
    let from = transcript.len();
    t.send_input(format!("seq 1 {N}; echo END-$((40+2))\r").as_bytes())
        .await
        .unwrap();

    let mut rng = rand::rng();
    let mut cuts = 0;
    let mut next_cut = t.offset() + rng.random_range(20_000..150_000u64);
    let mut t = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        loop {
            match t.next_event().await.unwrap() {
                Event::Output { data, .. } => transcript.extend_from_slice(&data),
                Event::Size(_) => {}
                other => panic!("unexpected {other:?}"),
            }
            let tail = &transcript[transcript.len().saturating_sub(64 * 1024)..];
            if tail.windows(6).any(|w| w == b"END-42") {
                break;
            }
            if t.offset() >= next_cut && cuts < 20 {
                cuts += 1;
                next_cut = t.offset() + rng.random_range(20_000..150_000u64);
                let state = t.resume_state();
                drop(t.into_inner()); // no close frame
                if rng.random_bool(0.5) {
                    // Sometimes stay away long enough for the window to fill.
                    tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(1..50)))
                        .await;
                }
                let ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
                let (resumed, welcome) = TerminalClient::resume(ws, state, size).await.unwrap();
                assert_eq!(
                    (welcome.start, welcome.offset),
                    (Start::Replay, state.offset)
                );
                t = resumed;
            }
        }
        t
    })
    .await
    .expect("seq finished in time");

    // Every line of the program's output, once, in order.
    let got = numbers(&transcript[from..]);
    let missing = (1..=N).filter(|n| got.binary_search(n).is_err()).count();
    assert_eq!(got.len() as u64, N, "{missing} missing, {cuts} cuts");
    assert!(
        got.iter().copied().eq(1..=N),
        "out of order after {cuts} cuts"
    );
    // And the screen the client draws from it is tmux's.
    transcript
        .extend_from_slice(&read_until_quiet(&mut t, std::time::Duration::from_millis(300)).await);
    let mut screen = vt100::Parser::new(size.rows, size.cols, 0);
    screen.process(&transcript);
    assert_eq!(
        screen_lines(&screen.screen().contents()),
        screen_lines(&agent.tmux(&["capture-pane", "-p"]))
    );
    assert!(cuts >= 5, "only {cuts} cuts in {} bytes", transcript.len());
    assert!(agent.metric("tether_agent_resumes_total").await >= cuts as f64);
}
