//! The agent's answer to a `RESUME`, as a pure function of what it holds: whose client the id
//! names, and which offsets its output still has.

use tether_protocol::frame::Start;
use tether_protocol::{CloseCode, Mode};

/// The client a `RESUME` names, as the agent holds it.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// The user the client was opened by.
    pub user: &'a str,
    pub mode: Mode,
    /// The oldest offset whose bytes are still held, and the offset after the newest.
    pub start: u64,
    pub end: u64,
}

/// What the connection does: start sending from `offset`, `Replay` (the bytes after what the
/// client holds) or `Snapshot` (they are gone: a snapshot at `end`, then the output after it).
/// Or close with a code and the words that say why.
pub fn decide(
    held: Option<Held<'_>>,
    user: &str,
    mode: Mode,
    offset: u64,
) -> Result<(Start, u64), (CloseCode, Option<String>)> {
    let Some(held) = held else {
        return Err((CloseCode::UNKNOWN_CLIENT, None));
    };
    if held.user != user || held.mode != mode {
        let why = "a client can only be resumed by its user in its mode".to_owned();
        return Err((CloseCode::WRONG_SESSION, Some(why)));
    }
    if offset > held.end {
        let why = format!(
            "resume offset {offset} is ahead of the output ({})",
            held.end
        );
        return Err((CloseCode::BAD_OFFSET, Some(why)));
    }
    if offset >= held.start {
        Ok((Start::Replay, offset))
    } else {
        Ok((Start::Snapshot, held.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(start: u64, end: u64) -> Option<Held<'static>> {
        Some(Held {
            user: "alice",
            mode: Mode::Attach,
            start,
            end,
        })
    }

    #[test]
    fn an_offset_still_held_replays_exactly_from_there() {
        for offset in [100, 150, 200] {
            assert_eq!(
                decide(held(100, 200), "alice", Mode::Attach, offset),
                Ok((Start::Replay, offset))
            );
        }
    }

    #[test]
    fn an_offset_whose_bytes_are_gone_gets_a_snapshot_at_the_end() {
        assert_eq!(
            decide(held(100, 200), "alice", Mode::Attach, 99),
            Ok((Start::Snapshot, 200))
        );
        assert_eq!(
            decide(held(100, 200), "alice", Mode::Attach, 0),
            Ok((Start::Snapshot, 200))
        );
    }

    #[test]
    fn unknown_foreign_or_made_up_resumes_are_refused_with_their_code() {
        let code = |r: Result<(Start, u64), (CloseCode, Option<String>)>| r.unwrap_err().0;
        assert_eq!(
            code(decide(None, "alice", Mode::Attach, 0)),
            CloseCode::UNKNOWN_CLIENT
        );
        assert_eq!(
            code(decide(held(0, 10), "mallory", Mode::Attach, 0)),
            CloseCode::WRONG_SESSION
        );
        // An observer cannot take over a driver's client, nor the other way round.
        assert_eq!(
            code(decide(held(0, 10), "alice", Mode::Observe, 0)),
            CloseCode::WRONG_SESSION
        );
        let (c, why) = decide(held(0, 10), "alice", Mode::Attach, 11).unwrap_err();
        assert_eq!(c, CloseCode::BAD_OFFSET);
        assert_eq!(
            why.as_deref(),
            Some("resume offset 11 is ahead of the output (10)")
        );
    }
}
