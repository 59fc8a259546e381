//! A snapshot of the pane for a viewer that joins late or resumes past the log: the scrollback
//! history and the screen with their colours, the cursor, and the modes the program set, all
//! as of one exact log offset.
//!
//! Consistency: the captures are one command line on the session's control client. tmux runs
//! the commands of a line back to back without reading the pane in between, and queues their
//! replies behind the `%output` it had already queued, so every capture shows the pane after
//! exactly the output before the offset at which the replies arrive (the
//! [`Reply::offset`](crate::control_client::Reply)). A viewer that writes [`Snapshot::to_ansi`]
//! and then the log from that offset sees what the driver sees.

use crate::control_client::{ControlClient, ControlError};

/// The modes a program can set that a terminal must know to render what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Modes {
    /// The alternate screen is shown (a full-screen program runs).
    pub alternate: bool,
    pub cursor_visible: bool,
    /// DECCKM: cursor keys send `ESC O A` rather than `ESC [ A`.
    pub application_cursor: bool,
    /// DECKPAM: the keypad sends application sequences.
    pub application_keypad: bool,
    /// Mouse reporting: 1000 (clicks), 1002 (and drags), 1003 (all motion), 1006 (SGR form).
    pub mouse_standard: bool,
    pub mouse_button: bool,
    pub mouse_all: bool,
    pub mouse_sgr: bool,
    /// `None` when tmux cannot tell (before 3.7 it has no `bracket_paste_flag`).
    pub bracketed_paste: Option<bool>,
    /// DECAWM, on unless the program turned it off.
    pub wrap: bool,
    pub insert: bool,
    pub origin: bool,
}

/// The pane as of `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The log offset the snapshot stands for: the output that follows it starts here.
    pub offset: u64,
    pub width: u16,
    pub height: u16,
    /// Zero-based cursor column and row on the shown screen.
    pub cursor_x: u16,
    pub cursor_y: u16,
    /// The scroll region's first and last row (zero-based, inclusive).
    pub scroll_region: (u16, u16),
    pub modes: Modes,
    /// Scrollback lines, oldest first, with SGR sequences; a line the terminal wrapped is one
    /// line here.
    pub history: Vec<Vec<u8>>,
    /// The rows of the normal screen, with SGR sequences (while the alternate screen is shown:
    /// the screen it hides).
    pub screen: Vec<Vec<u8>>,
    /// The rows of the alternate screen while it is shown.
    pub alternate: Option<Vec<Vec<u8>>>,
    /// Where the normal screen's cursor was when the alternate screen was entered.
    pub saved_cursor: Option<(u16, u16)>,
}

const FIELDS: &str = "#{pane_width} #{pane_height} #{cursor_x} #{cursor_y} \
#{scroll_region_upper} #{scroll_region_lower} #{history_size} #{alternate_on} \
#{alternate_saved_x} #{alternate_saved_y} #{cursor_flag} #{keypad_cursor_flag} #{keypad_flag} \
#{mouse_standard_flag} #{mouse_button_flag} #{mouse_all_flag} #{mouse_sgr_flag} #{wrap_flag} \
#{insert_flag} #{origin_flag} #{bracket_paste_flag}";

/// The most rows or columns a pane may have here (as the protocol's size).
const MAX_SIDE: u16 = 1000;

fn refused(what: &str, why: impl Into<String>) -> ControlError {
    ControlError::Refused {
        command: what.into(),
        reason: why.into(),
    }
}

impl Snapshot {
    /// Captures pane `%pane` through `client` (see the module's note on consistency).
    pub async fn capture(client: &ControlClient) -> Result<Snapshot, ControlError> {
        let pane = format!("%{}", client.pane());
        let info = format!("display-message -p -t {pane} '{FIELDS}'");
        let screen = format!("capture-pane -p -e -N -t {pane}");
        let history = format!("capture-pane -p -e -J -S - -E -1 -t {pane}");
        // Last: without an alternate screen it fails (quietly), and tmux skips what follows.
        let hidden = format!("capture-pane -a -q -p -e -N -t {pane}");
        let replies = client
            .commands(&[&info, &screen, &history, &hidden])
            .await?;
        if replies.len() < 3 || replies[..3].iter().any(|r| !r.ok) {
            let why = replies
                .iter()
                .find(|r| !r.ok)
                .map(|r| String::from_utf8_lossy(&r.lines.concat()).into_owned())
                .unwrap_or_default();
            return Err(refused("capture-pane", why));
        }
        let fields = String::from_utf8_lossy(&replies[0].lines.concat()).into_owned();
        let n: Vec<Option<u16>> = fields.split(' ').map(|f| f.parse().ok()).collect();
        let get = |i: usize| n.get(i).copied().flatten();
        let flag = |i: usize| get(i) == Some(1);
        let (Some(width), Some(height), Some(cursor_x), Some(cursor_y)) =
            (get(0), get(1), get(2), get(3))
        else {
            return Err(refused("display-message", format!("pane info {fields:?}")));
        };
        if !(1..=MAX_SIDE).contains(&width) || !(1..=MAX_SIDE).contains(&height) {
            return Err(refused("display-message", format!("pane size {fields:?}")));
        }
        let alternate_on = flag(7);
        let history_size = usize::from(get(6).unwrap_or(0));
        let mut history = replies[2].lines.clone();
        // With no history tmux still answers one line; keep only what it holds.
        let keep = history.len().min(history_size);
        history.drain(..history.len() - keep);
        for line in &mut history {
            trim_blank_end(line);
        }
        let rows = |lines: &[Vec<u8>]| {
            let mut rows = lines.to_vec();
            rows.resize(usize::from(height), Vec::new());
            rows.iter_mut().for_each(trim_blank_end);
            rows
        };
        let mut shown = rows(&replies[1].lines);
        // The spaces a program wrote before the cursor on its row are kept (`$ ` stays `$ `).
        if let Some(row) = shown.get_mut(usize::from(cursor_y)) {
            let width = columns(row);
            if width < usize::from(cursor_x) {
                row.resize(row.len() + usize::from(cursor_x) - width, b' ');
            }
        }
        let (screen, alternate) = match replies.get(3) {
            Some(r) if alternate_on && r.ok => (rows(&r.lines), Some(shown)),
            _ => (shown, None),
        };
        Ok(Snapshot {
            offset: replies[0].offset,
            width,
            height,
            cursor_x: cursor_x.min(width - 1),
            cursor_y: cursor_y.min(height - 1),
            scroll_region: (
                get(4).unwrap_or(0).min(height - 1),
                get(5).unwrap_or(height - 1).min(height - 1),
            ),
            modes: Modes {
                alternate: alternate.is_some(),
                cursor_visible: flag(10),
                application_cursor: flag(11),
                application_keypad: flag(12),
                mouse_standard: flag(13),
                mouse_button: flag(14),
                mouse_all: flag(15),
                mouse_sgr: flag(16),
                wrap: get(17) != Some(0),
                insert: flag(18),
                origin: flag(19),
                bracketed_paste: get(20).map(|v| v == 1),
            },
            history,
            screen,
            saved_cursor: alternate
                .is_some()
                .then(|| (get(8).unwrap_or(0), get(9).unwrap_or(0))),
            alternate,
        })
    }

    /// Drops the oldest history lines until [`Snapshot::to_ansi`] is at most `max` bytes; says
    /// whether any were dropped. The screen itself is always kept.
    pub fn fit(&mut self, max: usize) -> bool {
        let len = self.to_ansi().len();
        if len <= max {
            return false;
        }
        let mut excess = len - max;
        let mut drop = 0;
        // Each history line costs its bytes plus the reset and line break after it.
        while excess > 0 && drop < self.history.len() {
            excess = excess.saturating_sub(self.history[drop].len() + 6);
            drop += 1;
        }
        self.history.drain(..drop);
        true
    }

    /// Bytes that, written to a fresh terminal of the snapshot's size, reproduce it: the
    /// history scrolls into the terminal's scrollback, the screen fills the rows, then the
    /// alternate screen (if shown), the scroll region, the cursor and the modes.
    pub fn to_ansi(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // A full reset first: a client that writes the bytes to a terminal that held something
        // (its own emulator, or a real one) starts from a blank screen with default modes.
        out.extend_from_slice(b"\x1bc\x1b[0m\x1b[H\x1b[2J");
        for line in &self.history {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\x1b[0m\r\n");
        }
        write_rows(&mut out, &self.screen);
        if let Some(rows) = &self.alternate {
            let (x, y) = self.saved_cursor.unwrap_or((0, 0));
            out.extend_from_slice(format!("\x1b[{};{}H", y + 1, x + 1).as_bytes());
            out.extend_from_slice(b"\x1b[?1049h\x1b[H\x1b[2J");
            write_rows(&mut out, rows);
        }
        let (top, bottom) = self.scroll_region;
        if (top, bottom) != (0, self.height - 1) {
            out.extend_from_slice(format!("\x1b[{};{}r", top + 1, bottom + 1).as_bytes());
        }
        let m = &self.modes;
        let mut set = |on: bool, code: &str| {
            if on {
                out.extend_from_slice(code.as_bytes());
            }
        };
        set(m.application_cursor, "\x1b[?1h");
        set(m.application_keypad, "\x1b=");
        set(m.mouse_standard, "\x1b[?1000h");
        set(m.mouse_button, "\x1b[?1002h");
        set(m.mouse_all, "\x1b[?1003h");
        set(m.mouse_sgr, "\x1b[?1006h");
        set(m.bracketed_paste == Some(true), "\x1b[?2004h");
        set(!m.wrap, "\x1b[?7l");
        set(m.insert, "\x1b[4h");
        let y = if m.origin {
            out.extend_from_slice(b"\x1b[?6h");
            self.cursor_y.saturating_sub(top)
        } else {
            self.cursor_y
        };
        out.extend_from_slice(format!("\x1b[{};{}H", y + 1, self.cursor_x + 1).as_bytes());
        out.extend_from_slice(if m.cursor_visible {
            b"\x1b[?25h"
        } else {
            b"\x1b[?25l"
        });
        out
    }
}

/// Drops the spaces at the end of a captured row when they are plain (no attribute in effect):
/// `capture-pane -N` keeps every space a program wrote, and a terminal that is sent them holds
/// them as written cells, which a blank never is (a prompt's line would end in spaces). Spaces
/// with a colour or an attribute stay: they are visible.
fn trim_blank_end(row: &mut Vec<u8>) {
    let text_end = row.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    if text_end == row.len() {
        return;
    }
    // The attributes in effect at the spaces: none if the row has no escape sequence, or if its
    // last one is a full reset.
    let plain = match row[..text_end].iter().rposition(|&b| b == 0x1b) {
        None => true,
        Some(esc) => {
            let seq = &row[esc..text_end];
            seq == b"\x1b[0m" || seq == b"\x1b[m"
        }
    };
    if plain {
        row.truncate(text_end);
    }
}

/// The columns a captured row fills: its characters, escape sequences left out (a wide
/// character counts as one, an approximation that only decides how many spaces to keep).
fn columns(row: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < row.len() {
        if row[i] == 0x1b {
            i += 1;
            if row.get(i) == Some(&b'[') {
                i += 1;
                while i < row.len() && !(0x40..=0x7e).contains(&row[i]) {
                    i += 1;
                }
            }
            i += 1;
            continue;
        }
        if row[i] & 0xc0 != 0x80 {
            n += 1;
        }
        i += 1;
    }
    n
}

/// The rows top to bottom, each with its colours reset at its end. A row as wide as the screen
/// leaves the cursor waiting to wrap; the `\r\n` after it cancels that, so no blank row comes.
fn write_rows(out: &mut Vec<u8>, rows: &[Vec<u8>]) {
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(row);
        out.extend_from_slice(b"\x1b[0m");
    }
}

#[cfg(test)]
mod tests {
    use super::trim_blank_end;

    #[test]
    fn plain_trailing_spaces_go_coloured_ones_stay() {
        let trim = |s: &[u8]| {
            let mut v = s.to_vec();
            trim_blank_end(&mut v);
            v
        };
        assert_eq!(trim(b"user@host:~$      "), b"user@host:~$".to_vec());
        assert_eq!(
            trim(b"\x1b[1mbold\x1b[0m   "),
            b"\x1b[1mbold\x1b[0m".to_vec()
        );
        assert_eq!(trim(b"\x1b[41mred   "), b"\x1b[41mred   ".to_vec());
        assert_eq!(trim(b"\x1b[7m   "), b"\x1b[7m   ".to_vec());
        assert_eq!(trim(b"     "), b"".to_vec());
        assert_eq!(trim(b"no spaces"), b"no spaces".to_vec());
    }

    #[test]
    fn columns_leave_escape_sequences_out() {
        assert_eq!(super::columns(b"\x1b[1;32mgreen\x1b[0m $"), 7);
        assert_eq!(super::columns("é€".as_bytes()), 2);
    }
}
