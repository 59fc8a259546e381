//! How a non-browser client carries its token on the WebSocket upgrade: a second offered
//! subprotocol `tether.bearer.<base64url(token)>` beside [`crate::SUBPROTOCOL`]. Never a query
//! parameter (URLs end up in logs); the gateway's answer selects only `tether.v2`, so the token
//! is not echoed back.

use base64::Engine as _;

/// Prefix of the subprotocol that carries a bearer token for non-browser clients.
pub const BEARER_PROTOCOL_PREFIX: &str = "tether.bearer.";

/// The token from a `tether.bearer.<base64url>` subprotocol among the offered ones.
pub fn bearer_protocol_token(protocols: &[String]) -> Option<String> {
    let encoded = protocols
        .iter()
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The subprotocol that carries `token`, for clients.
pub fn bearer_protocol(token: &str) -> String {
    format!(
        "{BEARER_PROTOCOL_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_survives_the_subprotocol_both_ways() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln+/=";
        let p = bearer_protocol(jwt);
        assert!(p.starts_with(BEARER_PROTOCOL_PREFIX));
        // A subprotocol is an HTTP token: no '+', '/', '=' or spaces.
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{p}"
        );
        let offered = vec![crate::SUBPROTOCOL.to_owned(), p];
        assert_eq!(bearer_protocol_token(&offered).as_deref(), Some(jwt));
        // Padded input is accepted too; garbage is not a token.
        let padded = vec![format!("{BEARER_PROTOCOL_PREFIX}YWI=")];
        assert_eq!(bearer_protocol_token(&padded).as_deref(), Some("ab"));
        assert_eq!(
            bearer_protocol_token(&[format!("{BEARER_PROTOCOL_PREFIX}!!")]),
            None
        );
        assert_eq!(bearer_protocol_token(&["tether.v2".into()]), None);
    }
}
