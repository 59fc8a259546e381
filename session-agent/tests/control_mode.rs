//! The session's control client against a real tmux (the machine's, 3.3a or later): every
//! byte a program writes arrives once and in order in the output log, every byte typed reaches
//! the program exactly (Ctrl-B included), and a reply is pinned to the output before it.

use std::path::PathBuf;

use tether_session_agent::control::Read;
use tether_session_agent::control_client::{ControlClient, ControlError};
use tether_session_agent::snapshot::Snapshot;

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
            .args([
                "-f",
                "/dev/null",
                "set-option",
                "-g",
                "history-limit",
                "20000",
                ";",
            ])
            .args(["new-session", "-d", "-s", "t"])
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

/// The snapshot written into a fresh terminal emulator of its size.
fn replay(snapshot: &Snapshot) -> vt100::Parser {
    let mut term = vt100::Parser::new(snapshot.height, snapshot.width, 50_000);
    term.process(&snapshot.to_ansi());
    term
}

fn rows(term: &vt100::Parser) -> Vec<String> {
    let screen = term.screen();
    screen.rows(0, screen.size().1).collect()
}

#[tokio::test]
async fn a_late_viewer_gets_the_screen_tmux_shows_and_the_history_before_it() {
    let server = Server::start("seq 1 10000; printf '\\033[31mRED\\033[0m end\\n'");
    let client = server.attach().await;
    client.type_bytes(b"go\r").await.unwrap();
    output_until(&client, b"end\r\n").await;
    let snapshot = Snapshot::capture(&client).await.unwrap();
    assert_eq!((snapshot.width, snapshot.height), (120, 40));
    let Read::Bytes(_, end) = client.read(0, usize::MAX) else {
        panic!("no output")
    };
    assert_eq!(
        snapshot.offset, end,
        "the pane is quiet: the snapshot is at the log's end"
    );

    let mut term = replay(&snapshot);
    let shown = client.command("capture-pane -p").await.unwrap();
    let expected: Vec<String> = shown
        .lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .collect();
    let got: Vec<String> = rows(&term)
        .iter()
        .map(|r| r.trim_end().to_string())
        .collect();
    assert_eq!(got, expected, "the replayed screen differs from tmux's");
    assert_eq!(
        term.screen().cursor_position(),
        (snapshot.cursor_y, snapshot.cursor_x)
    );
    // Colours: the R of RED is red.
    let (row, _) = got
        .iter()
        .enumerate()
        .find(|(_, r)| r.starts_with("RED end"))
        .expect("the red line on the screen");
    let cell = term.screen().cell(row as u16, 0).unwrap();
    assert_eq!(cell.fgcolor(), vt100::Color::Idx(1));
    // History: everything before the screen, from the echo of "go" on.
    assert!(
        snapshot.history.len() >= 10_000 - 40,
        "{}",
        snapshot.history.len()
    );
    term.screen_mut().set_scrollback(usize::MAX);
    let top = rows(&term);
    assert_eq!(top[0].trim_end(), "go");
    assert_eq!(top[1].trim_end(), "1");
    assert_eq!(top[2].trim_end(), "2");
}

#[tokio::test]
async fn a_full_screen_program_is_restored_with_its_modes_and_the_screen_it_hides() {
    let server = Server::start(
        "echo NORMAL-LINE; printf '\\033[?1049h\\033[?1h\\033[?1000h\\033[?1006h\\033[2J\\033[5;10HALT-SCREEN'",
    );
    let client = server.attach().await;
    client.type_bytes(b"go\r").await.unwrap();
    output_until(&client, b"ALT-SCREEN").await;
    let snapshot = Snapshot::capture(&client).await.unwrap();
    assert!(snapshot.modes.alternate, "{snapshot:?}");
    assert!(snapshot.modes.application_cursor && snapshot.modes.mouse_standard);
    assert!(snapshot.modes.mouse_sgr && !snapshot.modes.mouse_all);
    assert_eq!((snapshot.cursor_x, snapshot.cursor_y), (19, 4));

    let mut term = replay(&snapshot);
    let screen = term.screen();
    assert!(screen.alternate_screen());
    assert!(screen.application_cursor());
    assert_eq!(
        screen.mouse_protocol_mode(),
        vt100::MouseProtocolMode::PressRelease
    );
    assert_eq!(
        screen.mouse_protocol_encoding(),
        vt100::MouseProtocolEncoding::Sgr
    );
    assert_eq!(screen.cursor_position(), (4, 19));
    assert_eq!(rows(&term)[4].trim_end(), "         ALT-SCREEN");
    // When the program leaves, the screen it hid comes back.
    term.process(b"\x1b[?1049l");
    assert!(rows(&term).iter().any(|r| r.trim_end() == "NORMAL-LINE"));
}
