//! The agent with real tmux and real WebSockets: echo, resize, sharing, observers.

mod common;

use common::*;
use tether_protocol::{CloseCode, Mode, Size};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_is_echoed_by_the_shell() {
    let agent = TestAgent::start(&[]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    t.send_input(b"echo hello-$((6*7))\r").await.unwrap();
    read_until(&mut t, "hello-42").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_is_visible_to_the_shell() {
    let agent = TestAgent::start(&[]).await;
    let mut t = agent.open(Mode::Attach, Size::new(80, 24).unwrap()).await;
    read_until(&mut t, "$ ").await;
    t.resize(Size::new(132, 41).unwrap()).await.unwrap();
    // The shell sees the new size once tmux has resized the window; poll rather than sleep.
    tokio::time::timeout(STEP, async {
        loop {
            t.send_input(b"echo size=$(tput cols)x$(tput lines)\r")
                .await
                .unwrap();
            let seen = read_until(&mut t, "size=").await + &read_until(&mut t, "\n").await;
            if seen.contains("size=132x41") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("tput reports the new size");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_see_the_same_screen() {
    let agent = TestAgent::start(&[]).await;
    let size = Size::new(100, 30).unwrap();
    let mut a = agent.open(Mode::Attach, size).await;
    let mut b = agent.open(Mode::Attach, size).await;
    let mut screens = [
        vt100::Parser::new(30, 100, 0),
        vt100::Parser::new(30, 100, 0),
    ];
    a.send_input(b"echo shared-$((20+1))\r").await.unwrap();
    for (t, s) in [&mut a, &mut b].into_iter().zip(&mut screens) {
        s.process(read_until(t, "shared-21").await.as_bytes());
        s.process(&read_until_quiet(t, std::time::Duration::from_millis(300)).await);
    }
    let tmux = agent.tmux(&["capture-pane", "-p"]);
    for s in &screens {
        assert_eq!(trimmed(&s.screen().contents()), trimmed(&tmux));
    }
}

fn trimmed(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(|l| l.trim_end().to_owned()).collect();
    while v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_sees_output_but_its_input_and_resize_are_refused() {
    let agent = TestAgent::start(&[]).await;
    let marker = agent.dir.path().join("observer-was-here");
    let mut user = agent.open(Mode::Attach, Size::default()).await;
    let mut observer = agent.open(Mode::Observe, Size::default()).await;
    user.send_input(b"echo from-user-$((1+1))\r").await.unwrap();
    read_until(&mut observer, "from-user-2").await;

    observer
        .send_input(format!("touch {}\r", marker.display()).as_bytes())
        .await
        .unwrap();
    assert_eq!(close_code(&mut observer).await, Some(CloseCode::READ_ONLY));

    let mut observer = agent.open(Mode::Observe, Size::default()).await;
    observer.resize(Size::new(40, 10).unwrap()).await.unwrap();
    assert_eq!(close_code(&mut observer).await, Some(CloseCode::READ_ONLY));

    // The shell never got the keystrokes, and the user is still served.
    user.send_input(b"echo still-$((2+2))\r").await.unwrap();
    read_until(&mut user, "still-4").await;
    assert!(!marker.exists());
    assert_eq!(
        agent.metric("tether_agent_clients{mode=\"attach\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served() {
    let agent = TestAgent::start(&[]).await;
    assert_eq!(agent.http_get("/healthz").await.0, 200);
    assert_eq!(agent.http_get("/readyz").await.0, 200);
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    t.send_input(b"echo metric-$((1+1))\r").await.unwrap();
    read_until(&mut t, "metric-2").await;
    let (status, body) = agent.http_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "tether_agent_clients",
        "tether_agent_output_bytes_total",
        "tether_agent_resumes_total",
        "tether_agent_snapshots_total",
        "tether_agent_flow_pauses_total",
        "tether_agent_catch_ups_total",
    ] {
        assert!(body.contains(name), "{name} missing from {body}");
    }
    assert!(agent.metric("tether_agent_output_bytes_total").await > 0.0);
    assert_eq!(agent.metric("tether_agent_snapshots_total").await, 1.0);
}
