//! Flow control, catching up, and snapshots.

mod common;

use std::time::Duration;

use common::*;
use tether_protocol::client::{Event, ResumeState, TerminalClient};
use tether_protocol::frame::Start;
use tether_protocol::{Mode, Size};

const WINDOW: u64 = 65536;

/// Replays a snapshot's bytes into a terminal emulator of its size.
fn replay(snap: &tether_protocol::SnapshotFrame) -> vt100::Parser {
    let mut term = vt100::Parser::new(snap.size.rows, snap.size.cols, 0);
    term.process(&snap.data);
    term
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(|l| l.trim_end().to_owned()).collect();
    while v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_stops_sending_and_an_ack_resumes_it() {
    // No catching up in this test: a client that does not acknowledge just waits.
    let agent = TestAgent::start(&[
        &format!("--window-bytes={WINDOW}"),
        "--catch-up-bytes=1073741824",
    ])
    .await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    t.set_auto_ack(false);
    read_until(&mut t, "$ ").await;
    let acked = t.offset();
    t.ack(acked).await.unwrap();
    t.send_input(b"yes\r").await.unwrap();

    // Without acks the output stops at the window exactly, however long `yes` runs.
    read_until_quiet(&mut t, Duration::from_millis(500)).await;
    assert_eq!(t.offset() - acked, WINDOW, "bytes unacknowledged");
    assert!(agent.metric("tether_agent_flow_pauses_total").await >= 1.0);
    assert!(
        read_until_quiet(&mut t, Duration::from_millis(300))
            .await
            .is_empty()
    );

    // An ack opens the window again, exactly where the output stopped.
    let at = t.offset();
    t.ack(at).await.unwrap();
    let more = tokio::time::timeout(STEP, t.next_event())
        .await
        .expect("output after the ack")
        .unwrap();
    assert!(
        matches!(more, Event::Output { offset, .. } if offset == at),
        "{more:?}"
    );

    // Ctrl-C goes through while the window is full, and the shell answers once acks flow.
    t.send_input(b"\x03").await.unwrap();
    t.set_auto_ack(true);
    let at = t.offset();
    t.ack(at).await.unwrap();
    t.send_input(b"echo stopped-$((3*3))\r").await.unwrap();
    read_until(&mut t, "stopped-9").await;
}

/// A viewer that reads slowly during `yes` is skipped forward to snapshots instead of being
/// sent everything `yes` wrote; after Ctrl-C the prompt reaches it with a bounded number of bytes
/// before it, and a fast driver is not held back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_viewer_is_skipped_forward_and_sees_the_prompt_after_ctrl_c() {
    const CATCH_UP: u64 = 256 * 1024;
    let agent = TestAgent::start(&[
        "--window-bytes=32768",
        &format!("--catch-up-bytes={CATCH_UP}"),
    ])
    .await;
    let mut driver = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut driver, "$ ").await;
    let mut slow = agent.open(Mode::Observe, Size::default()).await;
    assert!(matches!(
        slow.next_event().await.unwrap(),
        Event::Snapshot(_)
    ));
    driver.send_input(b"yes\r").await.unwrap();

    // The slow viewer: 2 ms per frame, so it falls behind `yes` at once.
    let mut skipped = 0;
    let mut received = 0u64;
    tokio::time::timeout(STEP, async {
        while skipped < 2 {
            match slow.next_event().await.unwrap() {
                Event::Snapshot(_) => skipped += 1,
                Event::Output { data, .. } => received += data.len() as u64,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the slow viewer was skipped forward");
    assert!(agent.metric("tether_agent_catch_ups_total").await >= 2.0);

    // Meanwhile the driver kept reading at its own pace: far more than the slow viewer.
    let driven = read_until_quiet(&mut driver, Duration::from_millis(1))
        .await
        .len() as u64;
    driver.send_input(b"\x03").await.unwrap();
    driver.send_input(b"echo after-$((6*7))\r").await.unwrap();
    read_until(&mut driver, "after-42").await;
    assert!(driven > 0);

    // The slow viewer reaches the prompt; what it was sent after Ctrl-C is bounded by the
    // catch-up distance, the window and a snapshot, not by how much `yes` wrote.
    let mut after = 0u64;
    let mut seen = String::new();
    tokio::time::timeout(STEP, async {
        loop {
            match slow.next_event().await.unwrap() {
                Event::Snapshot(s) => {
                    after += s.data.len() as u64;
                    seen = String::from_utf8_lossy(&s.data).into_owned();
                }
                Event::Output { data, .. } => {
                    after += data.len() as u64;
                    seen.push_str(&String::from_utf8_lossy(&data));
                }
                _ => {}
            }
            if seen.contains("after-42") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the slow viewer sees the prompt");
    let bound = CATCH_UP + 32768 + 4 * 1024 * 1024;
    assert!(
        after <= bound,
        "{after} bytes after Ctrl-C (bound {bound}), {received} before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_past_the_log_gets_a_snapshot_that_matches_tmux() {
    let agent = TestAgent::start(&[
        "--window-bytes=4096",
        "--buffer-bytes=4096",
        "--catch-up-bytes=4096",
    ])
    .await;
    let size = Size::new(80, 24).unwrap();
    let mut t = agent.open(Mode::Attach, size).await;
    read_until(&mut t, "$ ").await;
    t.send_input(b"for i in $(seq 1 200); do printf '%070d\\n' $i; done; printf '\\033[1;32mgreen\\033[0m SNAP-%s\\n' $((1+1))\r").await.unwrap();
    read_until(&mut t, "SNAP-2").await;
    read_until_quiet(&mut t, Duration::from_millis(300)).await;
    let state = t.resume_state();
    drop(t.into_inner());

    // A client that lost everything (a reloaded page) resumes from 0: those bytes are gone.
    let ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
    let (mut t, welcome) = TerminalClient::resume(ws, ResumeState { offset: 0, ..state }, size)
        .await
        .unwrap();
    assert_eq!(welcome.start, Start::Snapshot);
    let Event::Snapshot(snap) = t.next_event().await.unwrap() else {
        panic!("expected a snapshot")
    };
    assert_eq!(snap.offset, welcome.offset);
    assert_eq!(snap.size, size);
    let term = replay(&snap);
    assert_eq!(
        lines(&term.screen().contents()),
        lines(&agent.tmux(&["capture-pane", "-p"]))
    );
    assert!(
        String::from_utf8_lossy(&snap.data).contains("\x1b[1m\x1b[32mgreen")
            || String::from_utf8_lossy(&snap.data).contains("\x1b[1;32mgreen"),
        "colours kept"
    );
    let cursor = agent.tmux(&["display-message", "-p", "#{cursor_x} #{cursor_y}"]);
    let (row, col) = term.screen().cursor_position();
    assert_eq!(cursor.trim(), format!("{col} {row}"));
    assert!(!term.screen().alternate_screen());
    // The history before the screen came with it: the first lines scrolled off long ago.
    let mut history = vt100::Parser::new(size.rows, size.cols, 10_000);
    history.process(&snap.data);
    history.screen_mut().set_scrollback(10_000);
    assert!(
        history.screen().contents().contains(&format!("{:070}", 1)),
        "line 1 is in the snapshot's scrollback"
    );

    // Output continues after the snapshot.
    t.send_input(b"tput smcup; echo ALT-$((5+5)); read x\r")
        .await
        .unwrap();
    read_until(&mut t, "ALT-10").await;
    read_until_quiet(&mut t, Duration::from_millis(300)).await;
    let state = t.resume_state();
    drop(t.into_inner());
    let ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
    let (mut t, welcome) = TerminalClient::resume(ws, ResumeState { offset: 0, ..state }, size)
        .await
        .unwrap();
    assert_eq!(welcome.start, Start::Snapshot);
    let Event::Snapshot(snap) = t.next_event().await.unwrap() else {
        panic!("expected a snapshot")
    };
    let term = replay(&snap);
    assert!(term.screen().alternate_screen());
    assert!(term.screen().contents().contains("ALT-10"));
    assert!(agent.metric("tether_agent_snapshots_total").await >= 2.0);
}
