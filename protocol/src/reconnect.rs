//! The one reconnect policy: what a client does after a close, and how long it waits before
//! trying again. `kubectl tether attach` follows it, and the page's copy in
//! `ws-gateway/web/src/protocol.ts` (`closeAction`, `BACKOFF_*`) is checked against it by a
//! test, so the two cannot drift.

use std::time::Duration;

use crate::CloseCode;

/// What a client does after its connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAction {
    /// Connect again after [`backoff`] and `RESUME` where it left off: a cut, a restart, a
    /// drain, a busy agent, a ticket that a fresh one mends.
    Reconnect,
    /// The agent forgot this client (grace period over): connect at once and `OPEN` anew.
    Reopen,
    /// The user's sign-in ended (gateway's 4440): keep the screen and offsets, stop retrying
    /// until the user has signed in again, then `RESUME` the same client.
    SignIn,
    /// Show the reason and stop.
    End,
}

/// What to do after a close with `code` (`None`: the connection dropped without a close
/// frame). After an `EXIT` frame every close ends.
pub fn close_action(code: Option<u16>, saw_exit: bool) -> CloseAction {
    if saw_exit {
        return CloseAction::End;
    }
    let Some(code) = code else {
        return CloseAction::Reconnect;
    };
    match CloseCode(code) {
        CloseCode::GOING_AWAY
        | CloseCode::KEEPALIVE_TIMEOUT
        | CloseCode::HANDSHAKE_TIMEOUT
        | CloseCode::TICKET_REPLAYED
        | CloseCode::TICKET_EXPIRED
        | CloseCode::TOO_MANY_CLIENTS
        | CloseCode::INTERNAL => CloseAction::Reconnect,
        // WebSocket's own: no status, abnormal closure (a cut), server error, service restart,
        // try again later.
        CloseCode(1005 | 1006 | 1011 | 1012 | 1013) => CloseAction::Reconnect,
        CloseCode::UNKNOWN_CLIENT => CloseAction::Reopen,
        CloseCode::SIGNED_OUT => CloseAction::SignIn,
        _ => CloseAction::End,
    }
}

/// The first retry's wait before jitter.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// The longest wait before jitter.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Each wait is its base times a uniform factor in `1 ± BACKOFF_JITTER`, so clients cut by one
/// restart do not come back in step.
pub const BACKOFF_JITTER: f64 = 0.25;
/// A connection that stayed live this long starts the next backoff from the first wait.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);

/// The wait before retry number `attempt` (0 for the first), before jitter: the first wait
/// doubling to the longest.
pub fn backoff_base(attempt: u32) -> Duration {
    (BACKOFF_FIRST * 2u32.pow(attempt.min(6))).min(BACKOFF_MAX)
}

/// The wait before retry number `attempt`, with `unit` (uniform in `0..1`) as the jitter.
pub fn backoff(attempt: u32, unit: f64) -> Duration {
    let factor = 1.0 - BACKOFF_JITTER + 2.0 * BACKOFF_JITTER * unit.clamp(0.0, 1.0);
    backoff_base(attempt).mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_restarts_and_busy_agents_reconnect_and_mistakes_end() {
        assert_eq!(close_action(None, false), CloseAction::Reconnect);
        assert_eq!(close_action(Some(1006), false), CloseAction::Reconnect);
        assert_eq!(close_action(Some(1001), false), CloseAction::Reconnect);
        assert_eq!(close_action(Some(4429), false), CloseAction::Reconnect);
        assert_eq!(close_action(Some(4404), false), CloseAction::Reopen);
        assert_eq!(close_action(Some(4440), false), CloseAction::SignIn);
        for end in [
            1000, 4000, 4400, 4401, 4403, 4411, 4412, 4413, 4416, 4417, 4423, 4999,
        ] {
            assert_eq!(close_action(Some(end), false), CloseAction::End, "{end}");
        }
        assert_eq!(close_action(Some(1006), true), CloseAction::End);
    }

    #[test]
    fn backoff_doubles_to_its_cap_within_its_jitter() {
        let ms = |d: Duration| d.as_millis();
        assert_eq!(
            (0..8).map(|a| ms(backoff_base(a))).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]
        );
        assert_eq!(ms(backoff(0, 0.0)), 187);
        assert_eq!(ms(backoff(0, 1.0)), 312);
        assert_eq!(ms(backoff(u32::MAX, 0.5)), 10_000);
    }

    /// The page's copy of the policy (`ws-gateway/web/src/protocol.ts`) says the same.
    #[test]
    fn the_pages_policy_is_this_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ws-gateway/web/src/protocol.ts"
        );
        let ts = std::fs::read_to_string(path).expect("the page's protocol.ts");
        let body = ts
            .split("export function closeAction(")
            .nth(1)
            .and_then(|rest| rest.split("\n}\n").next())
            .expect("closeAction in protocol.ts");
        assert!(
            body.contains("if (sawExit) return 'end';"),
            "the page must end after EXIT"
        );
        let mut cases: Vec<(u16, CloseAction)> = Vec::new();
        let mut pending: Vec<u16> = Vec::new();
        let mut default = None;
        for line in body.lines().map(str::trim) {
            if let Some(case) = line.strip_prefix("case ") {
                let label = case.split(':').next().unwrap().trim();
                let code = match label {
                    "CLOSE_SIGNED_OUT" => CloseCode::SIGNED_OUT.0,
                    n => n
                        .parse()
                        .unwrap_or_else(|_| panic!("case {n} in protocol.ts")),
                };
                pending.push(code);
            } else if line == "default:" {
                default = Some(());
            } else if let Some(action) = line.strip_prefix("return '") {
                let action = match action.trim_end_matches("';") {
                    "reconnect" => CloseAction::Reconnect,
                    "reopen" => CloseAction::Reopen,
                    "signin" => CloseAction::SignIn,
                    "end" => CloseAction::End,
                    other => panic!("unknown action {other:?} in protocol.ts"),
                };
                if default.take().is_some() {
                    assert_eq!(action, CloseAction::End, "the page's default");
                    assert!(pending.is_empty());
                }
                cases.extend(pending.drain(..).map(|c| (c, action)));
            }
        }
        assert!(
            cases.len() > 5,
            "parsed too little of closeAction: {cases:?}"
        );
        for &(code, action) in &cases {
            assert_eq!(
                action,
                close_action(Some(code), false),
                "the page on {code}"
            );
        }
        // Every code the Rust policy does not end on is in the page's table too.
        for code in (1000..=1015).chain(4000..=4999) {
            let rust = close_action(Some(code), false);
            let page = cases
                .iter()
                .find(|(c, _)| *c == code)
                .map_or(CloseAction::End, |(_, a)| *a);
            assert_eq!(page, rust, "the page and the policy differ on {code}");
        }
        let constant = |name: &str| -> f64 {
            let line = ts
                .lines()
                .find(|l| l.starts_with(&format!("export const {name} = ")))
                .unwrap_or_else(|| panic!("{name} in protocol.ts"));
            line.split(" = ")
                .nth(1)
                .unwrap()
                .trim_end_matches(';')
                .replace('_', "")
                .parse()
                .unwrap()
        };
        assert_eq!(
            constant("BACKOFF_FIRST_MS"),
            BACKOFF_FIRST.as_millis() as f64
        );
        assert_eq!(constant("BACKOFF_MAX_MS"), BACKOFF_MAX.as_millis() as f64);
        assert_eq!(constant("BACKOFF_JITTER"), BACKOFF_JITTER);
        assert_eq!(
            constant("BACKOFF_RESET_AFTER_MS"),
            BACKOFF_RESET_AFTER.as_millis() as f64
        );
    }
}
