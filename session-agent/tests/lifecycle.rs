//! How a session ends: shell exit, idle timeout, SIGTERM drain; and the binary's flags.

mod common;

use common::*;
use tether_protocol::client::Event;
use tether_protocol::{CloseCode, Mode, Size};
use tether_session_agent::Outcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_exit_is_reported_to_clients_and_in_the_termination_message() {
    let mut agent = TestAgent::start(&[]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut t, "$ ").await;
    t.send_input(b"exit 7\r").await.unwrap();
    let exit = tokio::time::timeout(STEP, async {
        loop {
            match t.next_event().await.unwrap() {
                Event::Exit { code, .. } => return code,
                Event::Output { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(exit, 7);
    assert_eq!(close_code(&mut t).await, Some(CloseCode::NORMAL));
    assert_eq!(agent.outcome().await, Outcome::ShellExited { code: 7 });
    let msg = agent.termination_message();
    assert_eq!(
        (msg["reason"].as_str(), msg["exitCode"].as_i64()),
        (Some("ShellExited"), Some(7))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unattended_quiet_session_exits_after_the_idle_timeout() {
    let mut agent = TestAgent::start(&["--idle-timeout-seconds=1"]).await;
    assert_eq!(agent.outcome().await, Outcome::IdleTimeout);
    assert_eq!(agent.termination_message()["reason"], "IdleTimeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_client_keeps_the_session_from_idling_out() {
    let mut agent = TestAgent::start(&["--idle-timeout-seconds=1"]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut t, "$ ").await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    t.send_input(b"echo alive\r").await.unwrap();
    read_until(&mut t, "alive\r\n").await;
    drop(t);
    assert_eq!(agent.outcome().await, Outcome::IdleTimeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_going_away() {
    let mut agent = TestAgent::start(&[]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut t, "$ ").await;
    let stop = tokio::spawn(async move {
        let outcome = agent.stop().await;
        (outcome, agent.termination_message())
    });
    assert_eq!(close_code(&mut t).await, Some(CloseCode::GOING_AWAY));
    let (outcome, msg) = stop.await.unwrap();
    assert_eq!(outcome, Outcome::Terminated);
    assert_eq!(msg["reason"], "Terminated");
}

/// The binary itself: flags with env fallbacks, TETHER_COMMAND, exit code 0 on a clean end.
#[test]
fn the_binary_exits_cleanly_with_a_termination_message() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = tether_protocol::ticket::generate_keypair();
    let term = dir.path().join("termination-log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tether-session-agent"))
        .env("TETHER_LISTEN", "127.0.0.1:0")
        .env("TETHER_SESSION", "ns/name")
        .env("TETHER_SESSION_UID", "uid")
        .env("TETHER_TICKET_PUBLIC_KEY", public)
        .env("TETHER_STATE_DIR", dir.path().join("state"))
        .env("TETHER_TERMINATION_MESSAGE_PATH", &term)
        .env("TETHER_COMMAND", r#"["sh", "-c", "sleep 0.3; exit 3"]"#)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: an agent that never exits fails the test instead of hanging it.
    let deadline = std::time::Instant::now() + STEP;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&term).unwrap().trim()).unwrap();
    assert_eq!(
        (msg["reason"].as_str(), msg["exitCode"].as_i64()),
        (Some("ShellExited"), Some(3))
    );

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tether-session-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--session",
        "--session-uid",
        "--ticket-public-key",
        "--ticket-public-key-file",
        "--idle-timeout-seconds",
        "--termination-message-path",
        "--state-dir",
        "--cols",
        "--rows",
        "--recording-dir",
        "TETHER_LISTEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_is_an_asciicast_of_the_output() {
    let rec = tempfile::tempdir().unwrap();
    let mut agent = TestAgent::start(&[&format!("--recording-dir={}", rec.path().display())]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut t, "$ ").await;
    t.send_input(b"echo recorded-$((7*6))\r").await.unwrap();
    read_until(&mut t, "recorded-42").await;
    agent.stop().await;
    let file = std::fs::read_dir(rec.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        file.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("team-a_dev_")
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        (
            header["version"].as_i64(),
            header["width"].as_i64(),
            header["height"].as_i64()
        ),
        (Some(2), Some(80), Some(24))
    );
    let output: String = lines
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .inspect(|e| assert_eq!(e[1], "o"))
        .map(|e| e[2].as_str().unwrap().to_owned())
        .collect();
    assert!(output.contains("recorded-42"), "{output:?}");
}

/// The session's environment (spec.env, as the operator hands it over) reaches the shell and
/// nothing else: not the tmux server the agent starts, and a `tmux` earlier in the session's
/// PATH is never run by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_environment_reaches_the_shell_only() {
    let bin = tempfile::tempdir().unwrap();
    let ran = bin.path().join("fake-tmux-ran");
    let fake = bin.path().join("tmux");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\ntouch {}\nexec /usr/bin/tmux \"$@\"\n",
            ran.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = serde_json::json!([
        {"name": "LD_PRELOAD", "value": "/nonexistent/tether-evil.so"},
        {"name": "MARKER", "value": "from-spec"},
        {"name": "PATH", "value": format!("{}:/usr/bin:/bin", bin.path().display())},
    ]);
    let agent = TestAgent::start(&[&format!("--shell-env={env}")]).await;
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut t, "$ ").await;
    t.send_input(b"echo \"[$LD_PRELOAD][$MARKER][${PATH%%:*}]\" 2>/dev/null\r")
        .await
        .unwrap();
    let seen = read_until(&mut t, "[from-spec]").await;
    assert!(
        strip_ansi(&seen).contains(&format!(
            "[/nonexistent/tether-evil.so][from-spec][{}]",
            bin.path().display()
        )),
        "the shell has the session's environment: {seen:?}"
    );
    let pid: u32 = agent
        .tmux(&["display-message", "-p", "#{pid}"])
        .trim()
        .parse()
        .unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for leaked in ["LD_PRELOAD", "MARKER"] {
        assert!(
            !environ.contains(leaked),
            "{leaked} reached the tmux server: {environ:?}"
        );
    }
    assert!(
        !ran.exists(),
        "the agent ran the tmux on the session's PATH"
    );
}

#[test]
fn tmux_must_be_named_by_absolute_path_and_the_shell_env_must_be_well_formed() {
    use clap::Parser;
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "tether-session-agent",
            "--session=team-a/dev",
            "--session-uid=u",
            "--ticket-public-key=k",
        ];
        argv.extend_from_slice(extra);
        tether_session_agent::config::Args::try_parse_from(argv)
            .unwrap()
            .into_config()
            .map(drop)
            .map_err(|e| e.to_string())
    };
    assert!(parse(&[]).is_ok());
    assert!(
        parse(&["--tmux=tmux"])
            .unwrap_err()
            .contains("absolute path")
    );
    assert!(
        parse(&["--shell-env={}"])
            .unwrap_err()
            .contains("JSON array")
    );
    let reserved = parse(&[r#"--shell-env=[{"name":"TETHER_TICKET_PUBLIC_KEY","value":"x"}]"#]);
    assert!(reserved.unwrap_err().contains("not a usable variable name"));
    assert!(parse(&[r#"--shell-env=[{"name":"1X","value":"x"}]"#]).is_err());
}

/// tmux drops output still queued for control clients when the pane's process exits (measured:
/// `LAST` lost in 13 of 15 runs on 3.3a). The pane wrapper reports the status in the stream and
/// keeps the pane until the agent has it, so the last line always arrives before `EXIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_output_before_the_shell_exits_is_never_lost() {
    for run in 0..5 {
        let mut agent = TestAgent::start(&[]).await;
        let mut t = agent.open(Mode::Attach, Size::default()).await;
        read_until(&mut t, "$ ").await;
        t.send_input(b"seq 1 100000; echo LAST-$((40+2)); exit 3\r")
            .await
            .unwrap();
        let mut tail = String::new();
        let code = tokio::time::timeout(STEP, async {
            loop {
                match t.next_event().await.unwrap() {
                    Event::Output { data, .. } => {
                        tail.push_str(&String::from_utf8_lossy(&data));
                        let cut = tail.len().saturating_sub(64);
                        tail.drain(..tail.floor_char_boundary(cut));
                    }
                    Event::Exit { code, .. } => return code,
                    _ => {}
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(code, 3, "run {run}");
        assert!(
            strip_ansi(&tail).contains("LAST-42"),
            "run {run}: the last line was lost; the stream ended with {tail:?}"
        );
        assert_eq!(agent.outcome().await, Outcome::ShellExited { code: 3 });
    }
}
