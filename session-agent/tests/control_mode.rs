//! The control-mode decoder, log and input encoder against a real tmux (the machine's, 3.3a
//! or later): every byte a program writes arrives once and in order, and every byte typed
//! reaches the program exactly, Ctrl-B included.

use std::path::Path;
use std::process::Stdio;

use tether_session_agent::control::{Decoder, Event, OutputLog, Read, send_keys};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const TMUX: &str = "/usr/bin/tmux";

/// A private tmux server running `script` in its only pane, which first waits for a line of
/// input, and a control client attached to it once its attach reply has come.
struct Server {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    client: Child,
    input: ChildStdin,
    output: ChildStdout,
    decoder: Decoder,
}

impl Server {
    async fn start(script: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let status = tmux(&socket)
            .args([
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                "120",
                "-y",
                "40",
                "--",
            ])
            .args(["sh", "-c", &format!("read go; {script}; sleep 600")])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "tmux new-session failed");
        let mut client = tmux(&socket)
            .args(["-C", "attach-session", "-t", "t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let input = client.stdin.take().unwrap();
        let output = client.stdout.take().unwrap();
        let mut server = Server {
            _dir: dir,
            socket,
            client,
            input,
            output,
            decoder: Decoder::default(),
        };
        // tmux 3.3a drops commands sent before the attach's own reply has ended.
        loop {
            if server
                .events()
                .await
                .iter()
                .any(|e| matches!(e, Event::Reply { .. }))
            {
                break;
            }
        }
        server
    }

    async fn events(&mut self) -> Vec<Event> {
        let mut buf = vec![0; 64 << 10];
        let n = self.output.read(&mut buf).await.unwrap();
        assert!(n > 0, "the control client ended");
        let mut events = Vec::new();
        self.decoder.feed(&buf[..n], &mut events).unwrap();
        events
    }

    async fn type_bytes(&mut self, data: &[u8]) {
        for line in send_keys("t", data) {
            self.input.write_all(line.as_bytes()).await.unwrap();
            self.input.write_all(b"\n").await.unwrap();
        }
        self.input.flush().await.unwrap();
    }

    /// Everything the pane writes until `marker` has arrived, through an [`OutputLog`].
    async fn output_until(&mut self, marker: &[u8]) -> Vec<u8> {
        let mut log = OutputLog::new(64 << 20);
        let mut seen: usize = 0;
        loop {
            for event in self.events().await {
                match event {
                    Event::Output { data, .. } => log.append(&data),
                    Event::Reply { ok, lines, .. } => assert!(ok, "a command failed: {lines:?}"),
                    Event::Exit(why) => panic!("tmux ended the control client: {why:?}"),
                    Event::Notification { .. } => {}
                }
            }
            let Read::Bytes(all, end) = log.read(0, usize::MAX) else {
                continue;
            };
            if all[seen.saturating_sub(marker.len())..]
                .windows(marker.len())
                .any(|w| w == marker)
            {
                return all;
            }
            seen = end as usize;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.client.start_kill();
        let _ = std::process::Command::new(TMUX)
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

fn tmux(socket: &Path) -> Command {
    let mut cmd = Command::new(TMUX);
    cmd.arg("-S").arg(socket).args(["-f", "/dev/null"]);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TERM", "xterm-256color");
    cmd
}

#[tokio::test]
async fn every_line_of_a_fast_program_arrives_once_and_in_order() {
    let mut server = Server::start("seq 1 300000; echo END-OF-SEQ").await;
    server.type_bytes(b"go\r").await;
    let output = server.output_until(b"END-OF-SEQ\r\n").await;
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
    let mut server = Server::start(
        "stty raw -echo; echo RAW-READY; head -c 512 | od -An -v -tx1 | tr -d ' \\n'; echo; echo END-OF-OD",
    )
    .await;
    server.type_bytes(b"go\r").await;
    // Before the line discipline is raw, a typed Ctrl-C would kill the shell.
    server.output_until(b"RAW-READY").await;
    // Every byte value twice, and tmux's own syntax in between.
    let mut typed: Vec<u8> = (0..=255u8).collect();
    typed.splice(100..100, b"; $HOME #{q} ~ '\"".iter().copied());
    typed.extend((0..=255u8).rev());
    typed.truncate(512);
    server.type_bytes(&typed).await;
    let output = server.output_until(b"END-OF-OD").await;
    let text = String::from_utf8_lossy(&output);
    let hex: String = typed.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        text.contains(&hex),
        "the program read something else than was typed:\n{text}\nexpected {hex}"
    );
}
