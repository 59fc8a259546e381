//! Limits on who may open what, how often: the Origin allowlist, connections per user, the
//! handshake rate per client address (before authentication) and per user (after), and the
//! client address itself, through `--trusted-proxies`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Exact-match Origin check. A missing Origin, `null`, or anything not byte-for-byte in the list
/// is refused: `https://allowed.example.evil.example` is not `https://allowed.example`.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        None | Some("null") => false,
        Some(o) => allowed.iter().any(|a| a == o),
    }
}

/// Counts open connections per user.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    max: usize,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// Holds one of a user's connection slots until dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    user: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl ConnectionLimiter {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    /// A slot, or `None` when the user already holds `max`.
    pub fn acquire(&self, user: &str) -> Option<ConnectionSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(user.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            user: user.to_owned(),
            counts: self.counts.clone(),
        })
    }

    pub fn count(&self, user: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(user).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

/// Whose budget a request spends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    /// Not (yet) authenticated: the client's address.
    Addr(IpAddr),
    /// Authenticated: the user, wherever they connect from.
    User(String),
}

/// Handshakes per second per client address and, separately, per authenticated user, with a
/// burst of twice that: a flood without a credential spends its address's budget, never a
/// signed-in user's.
#[derive(Debug)]
pub struct HandshakeRate {
    limiter: DefaultKeyedRateLimiter<RateKey>,
}

impl HandshakeRate {
    pub fn new(per_second: u32) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(per_second.max(1).saturating_mul(2)).unwrap_or(rate);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    /// Spends one of the address's handshakes (for requests not authenticated).
    pub fn check(&self, ip: IpAddr) -> bool {
        self.check_key(RateKey::Addr(ip))
    }

    /// Spends one of the user's handshakes (once authenticated).
    pub fn check_user(&self, user: &str) -> bool {
        self.check_key(RateKey::User(user.to_owned()))
    }

    fn check_key(&self, key: RateKey) -> bool {
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&key).is_ok()
    }
}

/// The client's address: the TCP peer, unless the peer is one of the `trusted` proxies; then
/// the rightmost `X-Forwarded-For` address that is not itself a trusted proxy (each proxy
/// appends the address it saw, so everything left of that could have been written by the
/// client). An unparsable entry ends the walk at the last trusted hop.
pub fn client_address(peer: IpAddr, forwarded_for: &[&str], trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = forwarded_for
        .iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly() {
        let allowed = vec!["https://allowed.example".to_owned()];
        assert!(origin_allowed(Some("https://allowed.example"), &allowed));
        for bad in [
            "https://evil.example",
            "null",
            "https://allowed.example.evil.example",
            "https://allowed.example:443",
            "http://allowed.example",
            "https://ALLOWED.example",
            "https://allowed.example/",
        ] {
            assert!(!origin_allowed(Some(bad), &allowed), "{bad}");
        }
        assert!(!origin_allowed(None, &allowed));
    }

    #[test]
    fn a_user_gets_at_most_max_slots_and_dropping_frees_one() {
        let l = ConnectionLimiter::new(2);
        let a = l.acquire("alice").unwrap();
        let _b = l.acquire("alice").unwrap();
        assert!(l.acquire("alice").is_none());
        assert!(l.acquire("bob").is_some(), "other users are not affected");
        drop(a);
        assert_eq!(l.count("alice"), 1);
        assert!(l.acquire("alice").is_some());
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Not from a trusted proxy: the header is the client's own words.
        assert_eq!(
            client_address(ip("192.0.2.1"), &["203.0.113.9"], &trusted),
            ip("192.0.2.1")
        );
        // From the proxy: the rightmost address it did not add itself.
        assert_eq!(
            client_address(ip("10.1.1.1"), &["1.1.1.1, 203.0.113.9"], &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(
                ip("10.1.1.1"),
                &["1.1.1.1", "203.0.113.9, 10.2.2.2"],
                &trusted
            ),
            ip("203.0.113.9")
        );
        // No header, or garbage where the client would be.
        assert_eq!(
            client_address(ip("10.1.1.1"), &[], &trusted),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_address(ip("10.1.1.1"), &["nonsense, 10.2.2.2"], &trusted),
            ip("10.2.2.2")
        );
    }

    #[test]
    fn users_and_addresses_have_budgets_of_their_own() {
        let r = HandshakeRate::new(1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        while r.check(a) {}
        assert!(
            r.check_user("alice"),
            "an address's flood spends no user's budget"
        );
    }

    #[test]
    fn the_handshake_rate_is_per_address() {
        let r = HandshakeRate::new(1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(r.check(a));
        assert!(r.check(a));
        assert!(!r.check(a), "burst of two spent");
        assert!(r.check(b));
    }
}
