//! Waiting for conditions instead of sleeping: [`eventually`] polls until a check passes or a
//! deadline ends the test with the last thing it saw; [`never_within`] polls for a whole period
//! and fails the moment a check that must stay false turns true. A fixed sleep followed by an
//! assertion passes when the system is merely slow to break; these do not.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// How often both helpers look.
pub const POLL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Ok(value)`, and returns the value. `check` returns
/// `Err(description)` of what it saw while the condition does not hold yet; after `timeout`
/// this panics with `what` and the last description.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Polls `check` for the whole of `period`; panics with `what` and the description as soon as
/// `check` returns `Err(description)` (the thing that must never happen happened).
pub async fn never_within<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        if let Err(seen) = check().await {
            panic!("{what}: happened within {period:?}: {seen}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn eventually_returns_once_the_check_passes() {
        let n = AtomicU32::new(0);
        let got = eventually("count reaches 3", Duration::from_secs(5), || async {
            let v = n.fetch_add(1, Ordering::SeqCst) + 1;
            if v >= 3 {
                Ok(v)
            } else {
                Err(format!("count {v}"))
            }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "never true: not within")]
    async fn eventually_fails_with_what_it_saw() {
        eventually("never true", Duration::from_millis(300), || async {
            Err::<(), _>("still false".to_string())
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "turns bad: happened within")]
    async fn never_within_fails_when_the_check_turns() {
        let n = AtomicU32::new(0);
        never_within("turns bad", Duration::from_secs(5), || async {
            if n.fetch_add(1, Ordering::SeqCst) >= 2 {
                Err("bad".to_string())
            } else {
                Ok(())
            }
        })
        .await;
    }

    #[tokio::test]
    async fn never_within_passes_when_nothing_happens() {
        never_within("nothing", Duration::from_millis(500), || async { Ok(()) }).await;
    }
}
