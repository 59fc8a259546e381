//! The session's control client against a real tmux (the machine's, 3.3a or later): every
//! byte a program writes arrives once and in order in the output log, every byte typed reaches
//! the program exactly (Ctrl-B included), and a reply is pinned to the output before it.

use std::path::PathBuf;

use tether_session_agent::control::Read;
use tether_session_agent::control_client::{ControlClient, ControlError};

const TMUX: &str = "/usr/bin/tmux";

fn env() -> Vec<(&'static str, String)> {
    vec![
        ("PATH", "/usr/bin:/bin".into()),
        ("TERM", "xterm-256color".into()),
    ]
}

/// A private tmux server whose only pane runs `script` after a line of input.
struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Server {
    fn start(script: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let status = std::process::Command::new(TMUX)
            .arg("-S")
            .arg(&socket)
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", "120", "-y", "40", "--", "sh", "-c"])
            .arg(format!("read go; {script}; sleep 600"))
            .env_clear()
            .envs(env())
            .status()
            .unwrap();
        assert!(status.success(), "tmux new-session failed");
        Server { _dir: dir, socket }
    }

    async fn attach(&self) -> ControlClient {
        ControlClient::attach(TMUX.as_ref(), &self.socket, &env(), "t", 64 << 20)
            .await
            .expect("attached")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new(TMUX)
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Everything in the log from 0 once `marker` is in it.
async fn output_until(client: &ControlClient, marker: &[u8]) -> Vec<u8> {
    let mut end = client.end();
    loop {
        if let Read::Bytes(all, _) = client.read(0, usize::MAX)
            && all.windows(marker.len()).any(|w| w == marker)
        {
            return all;
        }
        tokio::select! {
            changed = end.changed() => changed.expect("the client is alive"),
            why = client.ended() => panic!("{why}"),
        }
    }
}

#[tokio::test]
async fn every_line_of_a_fast_program_arrives_once_and_in_order() {
    let server = Server::start("seq 1 300000; echo END-OF-SEQ");
    let client = server.attach().await;
    client.type_bytes(b"go\r").await.unwrap();
    let output = output_until(&client, b"END-OF-SEQ\r\n").await;
    let text = String::from_utf8(output).unwrap();
    let mut lines = text.split("\r\n");
    assert_eq!(
        lines.next(),
        Some("go"),
        "the pty's echo of the input comes first"
    );
    for n in 1..=300_000 {
        assert_eq!(lines.next(), Some(n.to_string().as_str()), "line {n}");
    }
    assert_eq!(lines.next(), Some("END-OF-SEQ"));
}

#[tokio::test]
async fn typed_bytes_reach_the_program_exactly_ctrl_b_included() {
    // The pane reads 512 raw bytes (no echo, no line discipline) and prints them in hex.
    let server = Server::start(
        "stty raw -echo; echo RAW-READY; head -c 512 | od -An -v -tx1 | tr -d ' \\n'; echo; echo END-OF-OD",
    );
    let client = server.attach().await;
    client.type_bytes(b"go\r").await.unwrap();
    // Before the line discipline is raw, a typed Ctrl-C would kill the shell.
    output_until(&client, b"RAW-READY").await;
    // Every byte value twice, and tmux's own syntax in between.
    let mut typed: Vec<u8> = (0..=255u8).collect();
    typed.splice(100..100, b"; $HOME #{q} ~ '\"".iter().copied());
    typed.extend((0..=255u8).rev());
    typed.truncate(512);
    client.type_bytes(&typed).await.unwrap();
    let output = output_until(&client, b"END-OF-OD").await;
    let text = String::from_utf8_lossy(&output);
    let hex: String = typed.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        text.contains(&hex),
        "the program read something else than was typed:\n{text}\nexpected {hex}"
    );
}

#[tokio::test]
async fn a_reply_is_pinned_to_the_output_before_it() {
    // While the pane writes numbered lines as fast as it can, each capture of the cursor's
    // line must show a line the log already holds at the reply's offset, never a later one.
    let server = Server::start("seq 1 200000; echo END-OF-SEQ");
    let client = server.attach().await;
    client.type_bytes(b"go\r").await.unwrap();
    let mut checked = 0;
    loop {
        let reply = client
            .command("display-message -p '#{cursor_y}'")
            .await
            .unwrap();
        let y: i32 = String::from_utf8_lossy(&reply.lines[0])
            .trim()
            .parse()
            .unwrap();
        let row = client
            .command(&format!("capture-pane -p -S {} -E {}", y - 1, y - 1))
            .await
            .unwrap();
        let shown = String::from_utf8_lossy(&row.lines[0]).trim().to_string();
        let Read::Bytes(log, _) = client.read(0, usize::MAX) else {
            continue;
        };
        let before = String::from_utf8_lossy(&log[..row.offset as usize]);
        if let Ok(n) = shown.parse::<u32>() {
            assert!(
                before.contains(&format!("\r\n{n}\r\n")),
                "the capture showed line {n}, which the log did not hold yet at offset {}",
                row.offset
            );
            checked += 1;
        }
        if before.contains("END-OF-SEQ") {
            break;
        }
    }
    assert!(
        checked > 3,
        "only {checked} captures landed while the output ran"
    );
}

#[tokio::test]
async fn bad_commands_are_refused_and_the_client_keeps_serving() {
    let server = Server::start("true");
    let client = server.attach().await;
    assert_eq!(client.command("").await, Err(ControlError::BadCommand));
    assert_eq!(
        client.command("display -p a\ndetach").await,
        Err(ControlError::BadCommand)
    );
    let refused = client.command("no-such-command").await.unwrap();
    assert!(!refused.ok, "{refused:?}");
    let ok = client.command("display-message -p fine").await.unwrap();
    assert_eq!((ok.ok, ok.lines), (true, vec![b"fine".to_vec()]));
}

#[tokio::test]
async fn a_killed_server_ends_the_client_with_a_reason() {
    let server = Server::start("true");
    let client = server.attach().await;
    std::process::Command::new(TMUX)
        .arg("-S")
        .arg(&server.socket)
        .arg("kill-server")
        .status()
        .unwrap();
    let why = client.ended().await;
    assert!(matches!(why, ControlError::Exited(_)), "{why}");
    assert!(client.command("display -p x").await.is_err());
}

#[tokio::test]
async fn a_command_list_is_answered_at_one_offset_and_stops_at_its_first_failure() {
    let server = Server::start("seq 1 100000");
    let client = server.attach().await;
    client.type_bytes(b"go\r").await.unwrap();
    let replies = client
        .commands(&[
            "display-message -p one",
            "display-message -p two",
            "display-message -p three",
        ])
        .await
        .unwrap();
    let texts: Vec<_> = replies.iter().map(|r| r.lines.concat()).collect();
    assert_eq!(texts, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
    assert!(
        replies.iter().all(|r| r.offset == replies[0].offset),
        "{replies:?}"
    );
    let failed = client
        .commands(&[
            "display-message -p before",
            "capture-pane -p -t %999",
            "display-message -p never",
        ])
        .await
        .unwrap();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed[0].ok && !failed[1].ok);
    // A line tmux cannot parse runs nothing and is one %error.
    let unparsed = client
        .commands(&["display-message -p a", "no-such-command"])
        .await
        .unwrap();
    assert_eq!(unparsed.len(), 1, "{unparsed:?}");
    assert!(!unparsed[0].ok);
    // The line after still gets its own answer.
    let after = client.command("display-message -p after").await.unwrap();
    assert_eq!(after.lines, [b"after".to_vec()]);
}
