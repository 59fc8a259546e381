//! Flow control and snapshots.

mod common;

use std::time::Duration;

use common::*;
use tether_protocol::client::{Event, ResumeState, TerminalClient};
use tether_protocol::frame::Start;
use tether_protocol::{Mode, Size};

const WINDOW: u64 = 65536;
/// The reader may overshoot the window by one read.
const READ_CHUNK: u64 = tether_session_agent::term::READ_CHUNK as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_stops_the_reader_and_an_ack_resumes_it() {
    let agent = TestAgent::start(&[&format!("--window-bytes={WINDOW}")]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    t.set_auto_ack(false);
    read_until(&mut t, "$ ").await;
    let acked = t.offset();
    t.ack(acked).await.unwrap();
    t.send_input(b"yes\r").await.unwrap();

    // Without acks the output stops at the window, however long `yes` runs.
    read_until_quiet(&mut t, Duration::from_millis(500)).await;
    let unacked = t.offset() - acked;
    assert!(
        (WINDOW - READ_CHUNK..=WINDOW + READ_CHUNK).contains(&unacked),
        "{unacked} bytes unacknowledged"
    );
    let pauses = agent.metric("tether_agent_flow_pauses_total").await;
    assert!(pauses >= 1.0);
    assert!(
        read_until_quiet(&mut t, Duration::from_millis(300))
            .await
            .is_empty()
    );

    // An ack opens the window again.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_past_the_buffer_gets_a_snapshot_that_matches_tmux() {
    let agent = TestAgent::start(&["--window-bytes=4096", "--buffer-bytes=4096"]).await;
    let size = Size::new(80, 24).unwrap();
    let mut t = agent.open(Mode::Attach, size).await;
    read_until(&mut t, "$ ").await;
    // Paced so that tmux draws every line: more than the buffer holds.
    t.send_input(b"for i in $(seq 1 200); do printf '%070d\\n' $i; sleep 0.002; done; printf '\\033[1;32mgreen\\033[0m SNAP-%s\\n' $((1+1))\r").await.unwrap();
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
    let screen = strip_ansi(&String::from_utf8_lossy(&snap.screen));
    let tmux = agent.tmux(&["capture-pane", "-p"]);
    assert_eq!(
        screen.lines().map(str::trim_end).collect::<Vec<_>>(),
        tmux.trim_end_matches('\n')
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
    );
    assert!(
        String::from_utf8_lossy(&snap.screen).contains("\x1b["),
        "colours kept"
    );
    let cursor = agent.tmux(&["display-message", "-p", "#{cursor_x} #{cursor_y}"]);
    assert_eq!(
        cursor.trim(),
        format!("{} {}", snap.cursor_x, snap.cursor_y)
    );
    assert!(!snap.alternate_screen);

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
    assert!(snap.alternate_screen);
    assert!(String::from_utf8_lossy(&snap.screen).contains("ALT-10"));
    assert!(agent.metric("tether_agent_snapshots_total").await >= 2.0);
}
