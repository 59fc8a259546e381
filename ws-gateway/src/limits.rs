//! Limits on who may open what, how often: the Origin allowlist, connections per user and the
//! handshake rate per source address.

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

/// Handshakes per second per source address, with a burst of twice that.
#[derive(Debug)]
pub struct HandshakeRate {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl HandshakeRate {
    pub fn new(per_second: u32) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(per_second.max(1).saturating_mul(2)).unwrap_or(rate);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    pub fn check(&self, ip: IpAddr) -> bool {
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).is_ok()
    }
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
