//! WebSocket close codes the agent uses, each with the reason text it sends.
//!
//! Codes in `4000..=4999` are private to this protocol. Most mirror the HTTP status a person
//! would expect (`4401` no ticket, `4403` bad ticket, `4413` too large …) so they read well in
//! logs. A client shows the reason text to the user.

use crate::frame::DecodeError;

/// A close code with a fixed meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $reason:literal;)*) => {
        impl CloseCode {
            $($(#[$doc])* pub const $name: CloseCode = CloseCode($code);)*

            /// Every code this protocol defines.
            pub const ALL: &'static [CloseCode] = &[$(CloseCode::$name),*];

            /// The reason text sent with the code.
            pub fn reason(self) -> &'static str {
                match self.0 {
                    $($code => $reason,)*
                    _ => "unknown close code",
                }
            }

            /// A stable name for logs and metric labels.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($code => stringify!($name),)*
                    _ => "UNKNOWN",
                }
            }
        }
    };
}

codes! {
    /// The session ended (an `EXIT` frame was sent first).
    NORMAL = 1000, "session ended";
    /// The agent is shutting down (SIGTERM). Reconnect later or elsewhere.
    GOING_AWAY = 1001, "agent shutting down";
    /// Another connection resumed this client; this one is closed.
    TAKEN_OVER = 4000, "client resumed by another connection";
    /// Neither a frame nor a WebSocket pong arrived for the keep-alive timeout.
    KEEPALIVE_TIMEOUT = 4002, "keep-alive timeout";
    /// A frame was malformed: truncated, padded, unknown type, text message, or out of order.
    BAD_FRAME = 4400, "malformed frame";
    /// The upgrade request carried no `Authorization: Bearer` ticket.
    TICKET_REQUIRED = 4401, "attach ticket required";
    /// The ticket failed verification: signature, algorithm, issuer, audience, claims, lifetime.
    TICKET_INVALID = 4403, "attach ticket invalid";
    /// `RESUME` named a client the agent no longer has (grace period over); send `OPEN`.
    UNKNOWN_CLIENT = 4404, "unknown client, open a new one";
    /// The first frame (`OPEN`/`RESUME`) did not arrive in time.
    HANDSHAKE_TIMEOUT = 4408, "no OPEN or RESUME in time";
    /// The ticket's `jti` was already used.
    TICKET_REPLAYED = 4409, "attach ticket already used";
    /// The ticket has expired.
    TICKET_EXPIRED = 4410, "attach ticket expired";
    /// Gateway only: checked again during the connection, RBAC no longer allows this user this
    /// mode on the session. The reason names the verb and what the API server said.
    REVOKED = 4411, "access revoked";
    /// Gateway only: the credential the connection was admitted with (browser sign-in, ID token,
    /// Kubernetes token) expired or was signed out. Sign in again, then `RESUME`.
    SIGNED_OUT = 4440, "sign-in ended";
    /// The ticket is for another session (`sid` or `suid` mismatch), or a resume by another user.
    WRONG_SESSION = 4412, "attach ticket is for another session";
    /// A frame exceeded the size limit.
    FRAME_TOO_LARGE = 4413, "frame too large";
    /// A terminal size outside `1..=1000`.
    BAD_RESIZE = 4416, "terminal size out of range";
    /// An `ACK` ahead of what was sent or going backwards, or a `RESUME` offset ahead of the output.
    BAD_OFFSET = 4417, "offset out of range";
    /// An observer sent input or a resize.
    READ_ONLY = 4423, "read-only observer may not send input or resize";
    /// The agent's client limit is reached.
    TOO_MANY_CLIENTS = 4429, "too many clients";
    /// The agent failed (for example tmux could not attach).
    INTERNAL = 4500, "internal error";
}

impl CloseCode {
    /// Codes only the gateway sends, never an agent: a gateway relays an agent's close with one
    /// of these as [`CloseCode::INTERNAL`], so an agent cannot speak for the gateway.
    pub const GATEWAY_ONLY: &'static [CloseCode] = &[CloseCode::REVOKED, CloseCode::SIGNED_OUT];

    /// The close code for a frame the decoder rejected.
    pub fn for_decode_error(e: &DecodeError) -> CloseCode {
        match e {
            DecodeError::TooLarge { .. } => CloseCode::FRAME_TOO_LARGE,
            DecodeError::BadSize { .. } => CloseCode::BAD_RESIZE,
            _ => CloseCode::BAD_FRAME,
        }
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.0, self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_have_reasons() {
        let mut seen = std::collections::HashSet::new();
        for c in CloseCode::ALL {
            assert!(seen.insert(c.0), "duplicate {}", c.0);
            assert_ne!(c.reason(), "unknown close code");
            assert!(
                c.reason().len() < 123,
                "close reasons must fit a control frame"
            );
        }
    }
}
