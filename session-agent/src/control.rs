//! tmux control mode (`tmux -C`), the pieces that do not need a running server: the decoder of
//! what a control client reads, the session-wide output log it feeds, and the encoder of the
//! input it sends.
//!
//! One control client per session reads the pane's output as `%output %<pane> <data>` lines,
//! where `data` is the program's bytes with every byte below 0x20 and `\` written as `\ooo`
//! (three octal digits) and everything else, bytes ≥ 0x80 included, raw: the stream is bytes,
//! never text. Command replies come as `%begin <time> <number> <flags>` … `%end`/`%error` with
//! the same three fields, and tmux queues them behind the `%output` already queued, so a reply
//! is pinned to the output offset at which its `%begin` arrives.

use std::collections::VecDeque;
use std::fmt::Write as _;

/// The longest line a control client accepts: tmux batches output into lines of a few KiB and
/// a history capture is one reply line per terminal line, so anything this long is broken.
pub const MAX_LINE: usize = 4 << 20;

/// The most a reply body may hold (a history capture of 10,000 wide, colourful lines fits).
pub const MAX_REPLY: usize = 64 << 20;

/// What the control client read, one event per line or per reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes the program in pane `pane` wrote, decoded.
    Output { pane: u32, data: Vec<u8> },
    /// The whole reply to one command: its body lines and whether it ended in `%end`. `ours`
    /// when the command came from this client (flags 1), not from tmux itself (the attach).
    Reply {
        number: u64,
        ours: bool,
        ok: bool,
        lines: Vec<Vec<u8>>,
    },
    /// tmux ended the control client, with its reason when it gave one.
    Exit(Option<String>),
    /// Any other notification (`%window-add`, `%layout-change`, …): its name and the rest.
    Notification { name: String, rest: Vec<u8> },
}

/// A line that is not control-mode protocol: tmux or whatever stands in its place is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a control-mode line of more than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("a command reply of more than {MAX_REPLY} bytes")]
    ReplyTooLong,
    #[error("not a control-mode line: {0:?}")]
    Unexpected(String),
    #[error("a malformed {0} line: {1:?}")]
    Malformed(&'static str, String),
}

/// Splits a control client's output into [`Event`]s. Feed it whatever `read` returned.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Vec<u8>,
    reply: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    guard: Vec<u8>,
    number: u64,
    ours: bool,
    lines: Vec<Vec<u8>>,
    size: usize,
}

fn lossy(line: &[u8]) -> String {
    let shown = &line[..line.len().min(120)];
    String::from_utf8_lossy(shown).into_owned()
}

impl Decoder {
    /// Decodes every complete line in `input` (and what earlier calls left), appending the
    /// events to `out`. After an error the decoder must not be used again.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Event>) -> Result<(), DecodeError> {
        let mut rest = input;
        while let Some(at) = memchr(b'\n', rest) {
            let (head, tail) = rest.split_at(at);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(head, out)?;
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                // `line` refuses it when too long.
                self.line(&line, out)?;
            }
        }
        if self.partial.len() + rest.len() > MAX_LINE {
            return Err(DecodeError::LineTooLong);
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), DecodeError> {
        if line.len() > MAX_LINE {
            return Err(DecodeError::LineTooLong);
        }
        if let Some(pending) = self.reply.as_mut() {
            // Inside a reply every line is body, unless it is the %end or %error that carries
            // the %begin's own time, number and flags.
            for (end, ok) in [(&b"%end "[..], true), (&b"%error "[..], false)] {
                if line.strip_prefix(end) == Some(&pending.guard[..]) {
                    let pending = self.reply.take().expect("a reply is pending");
                    out.push(Event::Reply {
                        number: pending.number,
                        ours: pending.ours,
                        ok,
                        lines: pending.lines,
                    });
                    return Ok(());
                }
            }
            pending.size += line.len() + 1;
            if pending.size > MAX_REPLY {
                return Err(DecodeError::ReplyTooLong);
            }
            pending.lines.push(line.to_vec());
            return Ok(());
        }
        if let Some(rest) = line.strip_prefix(b"%output ") {
            let (pane, data) = pane_and_rest(rest)
                .ok_or_else(|| DecodeError::Malformed("%output", lossy(line)))?;
            out.push(Event::Output {
                pane,
                data: unescape(data)
                    .ok_or_else(|| DecodeError::Malformed("%output", lossy(line)))?,
            });
        } else if let Some(rest) = line.strip_prefix(b"%extended-output ") {
            // `%extended-output %<pane> <age> ... : <data>`
            let (pane, after) = pane_and_rest(rest)
                .ok_or_else(|| DecodeError::Malformed("%extended-output", lossy(line)))?;
            let colon = find(after, b" : ")
                .ok_or_else(|| DecodeError::Malformed("%extended-output", lossy(line)))?;
            out.push(Event::Output {
                pane,
                data: unescape(&after[colon + 3..])
                    .ok_or_else(|| DecodeError::Malformed("%extended-output", lossy(line)))?,
            });
        } else if let Some(guard) = line.strip_prefix(b"%begin ") {
            let fields: Vec<&str> = std::str::from_utf8(guard)
                .map(|g| g.split(' ').collect())
                .unwrap_or_default();
            let (Some(number), Some(flags)) = (
                fields.get(1).and_then(|n| n.parse().ok()),
                fields.get(2).and_then(|f| f.parse::<u32>().ok()),
            ) else {
                return Err(DecodeError::Malformed("%begin", lossy(line)));
            };
            self.reply = Some(Pending {
                guard: guard.to_vec(),
                number,
                ours: flags & 1 == 1,
                lines: Vec::new(),
                size: 0,
            });
        } else if line == b"%exit" {
            out.push(Event::Exit(None));
        } else if let Some(reason) = line.strip_prefix(b"%exit ") {
            out.push(Event::Exit(Some(lossy(reason))));
        } else if line.first() == Some(&b'%') {
            let space = memchr(b' ', line).unwrap_or(line.len());
            let name = std::str::from_utf8(&line[1..space])
                .ok()
                .filter(|n| {
                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
                .ok_or_else(|| DecodeError::Unexpected(lossy(line)))?;
            out.push(Event::Notification {
                name: name.to_owned(),
                rest: line.get(space + 1..).unwrap_or_default().to_vec(),
            });
        } else {
            return Err(DecodeError::Unexpected(lossy(line)));
        }
        Ok(())
    }
}

fn memchr(byte: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == byte)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `%<digits> <rest>` → the pane number and the rest.
fn pane_and_rest(s: &[u8]) -> Option<(u32, &[u8])> {
    let s = s.strip_prefix(b"%")?;
    let space = memchr(b' ', s).unwrap_or(s.len());
    let pane = std::str::from_utf8(&s[..space]).ok()?.parse().ok()?;
    Some((pane, s.get(space + 1..).unwrap_or_default()))
}

/// Undoes tmux's `\ooo` escapes. `None` when a backslash is not followed by three octal digits.
pub fn unescape(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\\' => {
                let digits = data.get(i + 1..i + 4)?;
                let mut value: u32 = 0;
                for &d in digits {
                    if !(b'0'..=b'7').contains(&d) {
                        return None;
                    }
                    value = value * 8 + u32::from(d - b'0');
                }
                out.push(u8::try_from(value).ok()?);
                i += 4;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Where a reader of the [`OutputLog`] stands relative to what the log still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The bytes from the offset asked for (at most as many as asked), and the offset after
    /// them.
    Bytes(Vec<u8>, u64),
    /// Nothing new yet: the offset is the log's end.
    UpToDate,
    /// The offset is older than the log's oldest byte (`oldest`): it needs a snapshot.
    Gone { oldest: u64 },
    /// The offset is beyond the log's end: the reader made it up.
    Ahead { end: u64 },
}

/// The session's output as one stream with absolute offsets: byte `n` is the n-th byte the
/// program wrote since the agent started. Only the last `capacity` bytes are kept.
#[derive(Debug)]
pub struct OutputLog {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// The offset of `bytes[0]`.
    start: u64,
}

impl OutputLog {
    /// A log that keeps at most `capacity` bytes (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            bytes: VecDeque::with_capacity(capacity.min(1 << 20)),
            capacity,
            start: 0,
        }
    }

    /// The oldest offset still held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The offset after the last byte written.
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// Appends the program's bytes, dropping the oldest beyond the capacity.
    pub fn append(&mut self, data: &[u8]) {
        let data = if data.len() > self.capacity {
            let skip = data.len() - self.capacity;
            self.start += self.bytes.len() as u64 + skip as u64;
            self.bytes.clear();
            &data[skip..]
        } else {
            data
        };
        let over = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..over);
        self.start += over as u64;
        self.bytes.extend(data);
    }

    /// Up to `max` bytes from `offset`.
    pub fn read(&self, offset: u64, max: usize) -> Read {
        if offset < self.start {
            return Read::Gone { oldest: self.start };
        }
        if offset > self.end() {
            return Read::Ahead { end: self.end() };
        }
        let from = usize::try_from(offset - self.start).expect("within the log");
        let n = (self.bytes.len() - from).min(max);
        if n == 0 {
            return Read::UpToDate;
        }
        let (a, b) = self.bytes.as_slices();
        let mut out = Vec::with_capacity(n);
        if from < a.len() {
            let take = (a.len() - from).min(n);
            out.extend_from_slice(&a[from..from + take]);
            out.extend_from_slice(&b[..n - take]);
        } else {
            out.extend_from_slice(&b[from - a.len()..from - a.len() + n]);
        }
        Read::Bytes(out, offset + n as u64)
    }
}

/// The most input bytes one `send-keys` command carries: tmux's parser fails past ~10,000
/// arguments, and one key per argument is what `-H` takes.
pub const MAX_KEYS_PER_COMMAND: usize = 1000;

/// A printable run at least this long goes as `send-keys -l`; shorter ones ride in the hex.
const MIN_LITERAL: usize = 16;

/// Control-mode commands, one a line (so each gets exactly one reply), that type `data` into
/// `target` exactly, byte for byte, with no key binding applied: runs of printable ASCII (but
/// `}`) as `send-keys -l` (single-quoted, so `;`, `$`, `#{` and `~` are only text), every other
/// byte (control characters, ESC, NUL, bytes ≥ 0x80) and short printable runs between them as
/// `send-keys -H` hex. Each command carries at most [`MAX_KEYS_PER_COMMAND`] bytes.
pub fn send_keys(target: &str, data: &[u8]) -> Vec<String> {
    let literal_run = |s: &[u8]| s.iter().take_while(|&&b| literal(b)).count();
    let mut lines = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let printable = literal_run(rest);
        let mut line = format!("send-keys -t {target} ");
        let taken = if printable >= MIN_LITERAL || printable == rest.len() {
            let n = printable.min(MAX_KEYS_PER_COMMAND);
            line.push_str("-l -- ");
            quote_into(&mut line, &rest[..n]);
            n
        } else {
            let mut n = 0;
            while n < rest.len() && n < MAX_KEYS_PER_COMMAND {
                let run = literal_run(&rest[n..]);
                if run >= MIN_LITERAL || (run > 0 && n + run == rest.len()) {
                    break;
                }
                n += run.max(1);
            }
            let n = n.clamp(1, MAX_KEYS_PER_COMMAND);
            line.push_str("-H");
            for b in &rest[..n] {
                let _ = write!(line, " {b:02x}");
            }
            n
        };
        rest = &rest[taken..];
        lines.push(line);
    }
    lines
}

/// Whether `send_keys` sends `b` as literal text: printable ASCII except `}`. A command line
/// that ends in `}'` crashes the tmux 3.3a server (its parser takes it for the end of a
/// `{ … }` block), so `}` always goes as hex.
fn literal(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'}'
}

/// Printable ASCII in tmux single quotes: inside them nothing is special but `'` itself, which
/// is closed, written as `"'"`, and reopened (adjacent quoted strings make one argument).
fn quote_into(out: &mut String, printable: &[u8]) {
    out.push('\'');
    for &b in printable {
        if b == b'\'' {
            out.push_str("'\"'\"'");
        } else {
            out.push(char::from(b));
        }
    }
    out.push('\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[&[u8]]) -> Vec<Event> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for chunk in input {
            d.feed(chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn output_is_unescaped_to_the_programs_bytes() {
        let events = decode(&[b"%output %3 a\\015\\012\\134b\xff\xc3\xa9\n"]);
        assert_eq!(
            events,
            [Event::Output {
                pane: 3,
                data: b"a\r\n\\b\xff\xc3\xa9".to_vec()
            }]
        );
    }

    #[test]
    fn lines_split_anywhere_across_reads_decode_the_same() {
        let whole: &[u8] = b"%output %1 one\\015\\012\n%begin 1 7 1\nbody %end 1 7 1\n%end 1 7 1\n%output %1 two\n";
        let expected = decode(&[whole]);
        assert_eq!(expected.len(), 3);
        for cut in 0..whole.len() {
            assert_eq!(
                decode(&[&whole[..cut], &whole[cut..]]),
                expected,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_reply_ends_only_at_its_own_guard_and_keeps_lines_that_look_like_protocol() {
        let events = decode(&[
            b"%begin 1700000000 42 1\n%output %1 not output\n%end 1 1 1\n\n%end 1700000000 42 1\n",
            b"%begin 1700000001 43 1\nno such pane\n%error 1700000001 43 1\n",
        ]);
        assert_eq!(
            events,
            [
                Event::Reply {
                    number: 42,
                    ours: true,
                    ok: true,
                    lines: vec![
                        b"%output %1 not output".to_vec(),
                        b"%end 1 1 1".to_vec(),
                        b"".to_vec()
                    ]
                },
                Event::Reply {
                    number: 43,
                    ours: true,
                    ok: false,
                    lines: vec![b"no such pane".to_vec()]
                }
            ]
        );
    }

    #[test]
    fn exit_extended_output_and_notifications() {
        let events = decode(&[
            b"%extended-output %2 17 : x\\033y\n%exit too far behind\n%exit\n%window-add @1\n%sessions-changed\n",
        ]);
        assert_eq!(
            events,
            [
                Event::Output {
                    pane: 2,
                    data: b"x\x1by".to_vec()
                },
                Event::Exit(Some("too far behind".into())),
                Event::Exit(None),
                Event::Notification {
                    name: "window-add".into(),
                    rest: b"@1".to_vec()
                },
                Event::Notification {
                    name: "sessions-changed".into(),
                    rest: vec![]
                },
            ]
        );
    }

    #[test]
    fn broken_input_is_an_error_that_names_it() {
        let bad: &[&[u8]] = &[
            b"hello\n",
            b"%output 3 x\n",
            b"%output %x y\n",
            b"%output %1 bad\\08\n",
            b"%output %1 short\\01\n",
            b"%output %1 big\\777\n",
            b"%begin nonsense\n",
            b"%\n",
            b"%we!rd\n",
        ];
        for line in bad {
            let mut d = Decoder::default();
            let err = d.feed(line, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(err, DecodeError::Unexpected(_) | DecodeError::Malformed(..)),
                "{line:?}: {err}"
            );
        }
        let mut d = Decoder::default();
        assert_eq!(
            d.feed(&vec![b'x'; MAX_LINE + 1], &mut Vec::new()),
            Err(DecodeError::LineTooLong)
        );
        let mut d = Decoder::default();
        let mut out = Vec::new();
        d.feed(b"%begin 1 1 1\n", &mut out).unwrap();
        let line = vec![b'y'; MAX_LINE - 1];
        let mut result = Ok(());
        for _ in 0..(MAX_REPLY / MAX_LINE + 1) {
            result = d
                .feed(&line, &mut out)
                .and_then(|()| d.feed(b"\n", &mut out));
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(DecodeError::ReplyTooLong));
    }

    #[test]
    fn every_byte_value_survives_escaping_and_unescaping() {
        // tmux's own escaping: bytes below 0x20 and the backslash as \ooo, the rest raw.
        let all: Vec<u8> = (0..=255u8).collect();
        let mut escaped = Vec::new();
        for &b in &all {
            if b < 0x20 || b == b'\\' {
                escaped.extend_from_slice(format!("\\{b:03o}").as_bytes());
            } else {
                escaped.push(b);
            }
        }
        assert_eq!(unescape(&escaped).unwrap(), all);
    }

    #[test]
    fn the_log_keeps_the_last_bytes_with_absolute_offsets() {
        let mut log = OutputLog::new(10);
        assert_eq!(log.read(0, 100), Read::UpToDate);
        log.append(b"0123456");
        assert_eq!(log.read(2, 3), Read::Bytes(b"234".to_vec(), 5));
        log.append(b"789abc");
        assert_eq!((log.start(), log.end()), (3, 13));
        assert_eq!(log.read(2, 100), Read::Gone { oldest: 3 });
        assert_eq!(log.read(3, 100), Read::Bytes(b"3456789abc".to_vec(), 13));
        assert_eq!(log.read(13, 100), Read::UpToDate);
        assert_eq!(log.read(14, 100), Read::Ahead { end: 13 });
        // A write larger than the whole log keeps its tail.
        log.append(b"ABCDEFGHIJKLMNOP");
        assert_eq!((log.start(), log.end()), (19, 29));
        assert_eq!(log.read(19, 100), Read::Bytes(b"GHIJKLMNOP".to_vec(), 29));
    }

    #[test]
    fn reads_across_the_rings_wrap_are_exact() {
        let mut log = OutputLog::new(7);
        let mut all = Vec::new();
        for i in 0..200u32 {
            let chunk: Vec<u8> = (0..(i % 5) as u8)
                .map(|k| (i as u8).wrapping_add(k))
                .collect();
            log.append(&chunk);
            all.extend_from_slice(&chunk);
            for from in log.start()..=log.end() {
                let expected = &all[from as usize..];
                match log.read(from, 100) {
                    Read::Bytes(got, next) => {
                        assert_eq!(got, expected);
                        assert_eq!(next, log.end());
                    }
                    Read::UpToDate => assert!(expected.is_empty()),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn send_keys_carries_any_bytes_and_quotes_what_tmux_would_interpret() {
        let lines = send_keys("%0", b"echo $HOME; ls #{x} ~ 'q'\r\x02\x00\xffok\r");
        assert_eq!(
            lines,
            [
                "send-keys -t %0 -l -- 'echo $HOME; ls #{x'",
                // A short printable run between control bytes rides in the hex.
                "send-keys -t %0 -H 7d 20 7e 20 27 71 27 0d 02 00 ff 6f 6b 0d",
            ]
        );
        assert_eq!(
            send_keys("%0", b"it's"),
            ["send-keys -t %0 -l -- 'it'\"'\"'s'"]
        );
        // Long input is split so that no line carries more than the limit of keys.
        let long = vec![b'a'; 2500];
        let lines = send_keys("%0", &long);
        assert_eq!(lines.len(), 3);
        let carried: usize = lines.iter().map(|l| l.matches('a').count()).sum();
        assert_eq!(carried, 2500);
        assert!(send_keys("%0", b"").is_empty());
    }
}
