//! Many viewers of one session, late joiners, full-screen programs, exact input.

mod common;

use std::time::Duration;

use common::*;
use tether_protocol::client::Event;
use tether_protocol::{Mode, Size};

/// Replays a snapshot's bytes, then `more`, into a terminal emulator of the snapshot's size.
fn screen_of(snap: &tether_protocol::SnapshotFrame, more: &[u8]) -> vt100::Parser {
    let mut term = vt100::Parser::new(snap.size.rows, snap.size.cols, 0);
    term.process(&snap.data);
    term.process(more);
    term
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(|l| l.trim_end().to_owned()).collect();
    while v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

async fn first_snapshot(t: &mut Term) -> tether_protocol::SnapshotFrame {
    match tokio::time::timeout(STEP, t.next_event())
        .await
        .unwrap()
        .unwrap()
    {
        Event::Snapshot(s) => s,
        other => panic!("a new client starts with a snapshot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_observers_connect_and_every_one_sees_the_drivers_output() {
    const VIEWERS: usize = 1000;
    let agent = std::sync::Arc::new(TestAgent::start(&[]).await);
    let mut driver = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut driver, "$ ").await;
    // Each viewer connects, takes its snapshot and then keeps reading (so it answers the
    // agent's pings) until the driver's line arrives; 50 connect at a time.
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(VIEWERS);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    let tasks: Vec<_> = (0..VIEWERS)
        .map(|i| {
            let (agent, ready_tx, gate) = (agent.clone(), ready_tx.clone(), gate.clone());
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await.unwrap();
                let ticket = agent.ticket_for(&format!("viewer-{}", i % 50), Mode::Observe);
                let mut t = agent.open_with_ticket(&ticket).await;
                first_snapshot(&mut t).await;
                drop(permit);
                ready_tx.send(()).await.unwrap();
                tokio::time::timeout(
                    std::time::Duration::from_secs(120),
                    read_until(&mut t, "to-all-1000"),
                )
                .await
                .expect("the driver's line reaches every observer");
            })
        })
        .collect();
    drop(ready_tx);
    for _ in 0..VIEWERS {
        tokio::time::timeout(std::time::Duration::from_secs(120), ready.recv())
            .await
            .expect("observers connect")
            .expect("an observer task failed before it was ready");
    }
    assert_eq!(
        agent.metric("tether_agent_clients{mode=\"observe\"}").await,
        VIEWERS as f64
    );
    driver
        .send_input(b"echo to-all-$((500+500))\r")
        .await
        .unwrap();
    read_until(&mut driver, "to-all-1000").await;
    let mut seen = 0;
    for task in tasks {
        task.await.expect("every observer sees the output");
        seen += 1;
    }
    assert_eq!(seen, VIEWERS);
}

/// An observer that never reads: the driver's output is not held back by it, and the observer
/// is still served afterwards (from a snapshot, since it fell behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_that_does_not_read_never_delays_the_driver() {
    let agent = TestAgent::start(&["--window-bytes=65536"]).await;
    let mut driver = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut driver, "$ ").await;
    let mut stalled = agent.open(Mode::Observe, Size::default()).await;
    first_snapshot(&mut stalled).await;
    stalled.set_auto_ack(false);
    // 2 MB of output, thirty times the window, while the observer reads nothing.
    driver
        .send_input(b"seq 1 300000; echo END-$((40+2))\r")
        .await
        .unwrap();
    let mut got = 0u64;
    let mut skipped = false;
    tokio::time::timeout(STEP, async {
        let mut tail = String::new();
        loop {
            let event = driver.next_event().await.unwrap();
            skipped |= matches!(event, Event::Snapshot(_));
            if let Event::Output { data, .. } = event {
                got += data.len() as u64;
                tail.push_str(&String::from_utf8_lossy(&data));
                if tail.contains("END-42") {
                    return;
                }
                let cut = tail.len().saturating_sub(16);
                tail.drain(..tail.floor_char_boundary(cut));
            }
        }
    })
    .await
    .expect("the driver got all its output while an observer read nothing");
    // Every byte of it, unless this (debug-built) driver itself fell behind and was skipped.
    assert!(skipped || got > 2_000_000, "{got} bytes");
    // The stalled observer catches up to the present when it reads again.
    stalled.set_auto_ack(true);
    read_until(&mut stalled, "END-42").await;
}

/// A viewer that joins after 10,000 lines gets the screen tmux shows and the history before it:
/// every line from the first, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_joining_after_ten_thousand_lines_gets_the_screen_and_the_history() {
    let agent = TestAgent::start(&[]).await;
    let size = Size::new(80, 24).unwrap();
    let mut driver = agent.open(Mode::Attach, size).await;
    read_until(&mut driver, "$ ").await;
    driver
        .send_input(b"clear; seq 1 10000; echo JOIN-$((1+1))\r")
        .await
        .unwrap();
    read_until(&mut driver, "JOIN-2").await;
    read_until_quiet(&mut driver, Duration::from_millis(300)).await;

    let mut late = agent.open(Mode::Observe, size).await;
    let snap = first_snapshot(&mut late).await;
    assert!(!snap.truncated);
    let term = screen_of(&snap, &[]);
    assert_eq!(
        lines(&term.screen().contents()),
        lines(&agent.tmux(&["capture-pane", "-p"])),
        "the screen is tmux's"
    );
    let text = strip_ansi(&String::from_utf8_lossy(&snap.data));
    let numbers: Vec<u64> = text
        .split('\n')
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(numbers.len(), 10_000, "every line once");
    assert!(numbers.iter().copied().eq(1..=10_000), "in order");
    // The driver's output continues the snapshot on the late viewer.
    driver.send_input(b"echo next-$((3+4))\r").await.unwrap();
    read_until(&mut late, "next-7").await;
}

/// vim (the alternate screen) opened by the driver, a viewer joins while it runs, the driver
/// quits: the late viewer's terminal shows what tmux shows at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_viewer_renders_vim_and_the_screen_after_it_right() {
    let agent = TestAgent::start(&[]).await;
    let size = Size::new(80, 24).unwrap();
    let mut driver = agent.open(Mode::Attach, size).await;
    read_until(&mut driver, "$ ").await;
    driver
        .send_input(b"echo before-vim-$((2*3)); vim -u NONE -N -n\r")
        .await
        .unwrap();
    read_until(&mut driver, "before-vim-6").await;
    read_until_quiet(&mut driver, Duration::from_millis(500)).await;
    driver.send_input(b"iinside vim\x1b").await.unwrap();
    read_until_quiet(&mut driver, Duration::from_millis(500)).await;

    let mut late = agent.open(Mode::Observe, size).await;
    let snap = first_snapshot(&mut late).await;
    let mut term = screen_of(&snap, &[]);
    assert!(
        term.screen().alternate_screen(),
        "vim runs on the alternate screen"
    );
    assert_eq!(
        lines(&term.screen().contents()),
        lines(&agent.tmux(&["capture-pane", "-p"]))
    );

    driver.send_input(b":q!\r").await.unwrap();
    driver
        .send_input(b"echo after-vim-$((3*3))\r")
        .await
        .unwrap();
    read_until(&mut driver, "after-vim-9").await;
    let more = {
        let mut seen = read_until(&mut late, "after-vim-9").await.into_bytes();
        seen.extend(read_until_quiet(&mut late, Duration::from_millis(300)).await);
        seen
    };
    term.process(&more);
    assert!(
        !term.screen().alternate_screen(),
        "back on the normal screen"
    );
    assert_eq!(
        lines(&term.screen().contents()),
        lines(&agent.tmux(&["capture-pane", "-p"])),
        "the late viewer's screen after vim is tmux's"
    );
}

/// A 1 MB bracketed paste and Ctrl-B reach the program exactly: a program that reads its
/// terminal raw writes them to a file, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_bracketed_paste_and_ctrl_b_reach_the_program_exactly() {
    use rand::Rng;
    let agent = TestAgent::start(&[]).await;
    let mut driver = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut driver, "$ ").await;
    let file = agent.dir.path().join("pasted");
    // Printable text in lines, as a paste is; a NUL and control bytes would be typed, not pasted.
    let mut rng = rand::rng();
    let mut payload = Vec::with_capacity(1 << 20);
    while payload.len() < (1 << 20) - 100 {
        let line: String = (0..rng.random_range(1..120))
            .map(|_| rng.random_range(0x20u8..0x7f) as char)
            .collect();
        payload.extend_from_slice(line.as_bytes());
        payload.push(b'\r');
    }
    let mut expected = b"\x02".to_vec();
    expected.extend_from_slice(b"\x1b[200~");
    expected.extend_from_slice(&payload);
    expected.extend_from_slice(b"\x1b[201~");
    driver
        .send_input(
            format!(
                "stty raw -echo; head -c {} > {}; stty sane; echo got-$((20+22))\r",
                expected.len(),
                file.display()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    driver.send_input(&expected).await.unwrap();
    read_until(&mut driver, "got-42").await;
    let written = std::fs::read(&file).unwrap();
    assert_eq!(written.len(), expected.len());
    assert!(
        written == expected,
        "the program read other bytes than were sent"
    );
}
