//! Who gets one of the agent's client slots: a pure policy, so it is tested without sockets.
//!
//! A client holds a slot while a connection drives it (live) and, after the connection is lost,
//! for the resume grace period. The policy keeps anyone from hoarding slots:
//!
//! - a client whose connection ends with close code `1000` ("leaving for good") frees its slot
//!   at once; only a lost connection (any other close, a broken stream) keeps it for a resume;
//! - each user keeps at most [`Limits::grace_per_user`] clients in their grace period; a newer
//!   one replaces that user's oldest;
//! - an interactive (attach) client, the driver, is never refused while some slot is held by a
//!   client in its grace period or by an observer: the oldest such client is evicted for it;
//! - an observer may take a grace slot of its own user only, so observers cannot lock out a
//!   driver nor each other's live connections.
//!
//! Decisions and the insertion they lead to happen under one lock in the server, so two
//! connections cannot both take the last slot.

use std::time::Instant;

use tether_protocol::{ClientId, Mode};

/// What the policy needs to know of a client holding a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub id: ClientId,
    pub user: String,
    pub mode: Mode,
    /// `None` while a connection drives it; when its connection was lost otherwise.
    pub disconnected_at: Option<Instant>,
}

/// The limits of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Slots in all (`--max-clients`).
    pub max_clients: usize,
    /// Clients one user may keep in their grace period (`--max-grace-clients-per-user`).
    pub grace_per_user: usize,
}

/// The answer to a new client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Take a slot after removing these clients (possibly none).
    Admit { evict: Vec<ClientId> },
    /// Every slot is held by a client this one may not displace.
    Full,
}

/// Whether `user` may open a new client in `mode`, given the slots held (`pending` more are
/// being opened right now and count as held).
pub fn admit(
    holders: &[Holder],
    pending: usize,
    limits: Limits,
    user: &str,
    mode: Mode,
) -> Admission {
    if holders.len() + pending < limits.max_clients {
        return Admission::Admit { evict: vec![] };
    }
    // Full: displace the oldest client this one may displace.
    let oldest = |pick: &dyn Fn(&Holder) -> bool| {
        holders
            .iter()
            .filter(|h| pick(h))
            .min_by_key(|h| h.disconnected_at)
            .map(|h| h.id)
    };
    let grace = |h: &Holder| h.disconnected_at.is_some();
    let victim = match mode {
        Mode::Attach => oldest(&|h| grace(h) && h.user != user)
            .or_else(|| oldest(&|h| grace(h)))
            .or_else(|| {
                // No grace slot left: the oldest live observer makes room for a driver.
                holders
                    .iter()
                    .filter(|h| h.mode == Mode::Observe)
                    .map(|h| h.id)
                    .next()
            }),
        Mode::Observe => oldest(&|h| grace(h) && h.user == user),
    };
    match victim {
        Some(id) => Admission::Admit { evict: vec![id] },
        None => Admission::Full,
    }
}

/// The clients to remove once `user` has lost another connection: their oldest grace-period
/// clients beyond the per-user limit.
pub fn over_grace_limit(holders: &[Holder], limits: Limits, user: &str) -> Vec<ClientId> {
    let mut mine: Vec<&Holder> = holders
        .iter()
        .filter(|h| h.user == user && h.disconnected_at.is_some())
        .collect();
    mine.sort_by_key(|h| h.disconnected_at);
    let excess = mine.len().saturating_sub(limits.grace_per_user);
    mine.into_iter().take(excess).map(|h| h.id).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LIMITS: Limits = Limits {
        max_clients: 4,
        grace_per_user: 2,
    };

    fn holder(user: &str, mode: Mode, lost_secs_ago: Option<u64>) -> Holder {
        Holder {
            id: ClientId::random(),
            user: user.into(),
            mode,
            disconnected_at: lost_secs_ago.map(|s| Instant::now() - Duration::from_secs(s)),
        }
    }

    #[test]
    fn free_slots_are_taken_and_pending_openings_count() {
        let h = [holder("a", Mode::Attach, None)];
        assert_eq!(
            admit(&h, 0, LIMITS, "b", Mode::Observe),
            Admission::Admit { evict: vec![] }
        );
        assert_eq!(
            admit(&h, 3, LIMITS, "a", Mode::Observe),
            Admission::Full,
            "3 being opened fill it"
        );
    }

    #[test]
    fn an_observer_filling_every_slot_cannot_lock_out_the_driver() {
        // mallory opened and dropped connections until every slot was hers.
        let h: Vec<Holder> = (0..4)
            .map(|i| holder("mallory", Mode::Observe, Some(10 + i)))
            .collect();
        let oldest = h[3].id;
        assert_eq!(
            admit(&h, 0, LIMITS, "alice", Mode::Attach),
            Admission::Admit {
                evict: vec![oldest]
            }
        );
        // Another observer cannot take mallory's slots, but mallory can reuse her own.
        assert_eq!(admit(&h, 0, LIMITS, "bob", Mode::Observe), Admission::Full);
        assert_eq!(
            admit(&h, 0, LIMITS, "mallory", Mode::Observe),
            Admission::Admit {
                evict: vec![oldest]
            }
        );
    }

    #[test]
    fn live_observers_make_room_for_a_driver_but_live_drivers_are_never_displaced() {
        let observers: Vec<Holder> = (0..4).map(|_| holder("bob", Mode::Observe, None)).collect();
        assert!(
            matches!(admit(&observers, 0, LIMITS, "alice", Mode::Attach), Admission::Admit { evict } if evict.len() == 1)
        );
        let drivers: Vec<Holder> = (0..4)
            .map(|_| holder("alice", Mode::Attach, None))
            .collect();
        assert_eq!(
            admit(&drivers, 0, LIMITS, "carol", Mode::Attach),
            Admission::Full
        );
        assert_eq!(
            admit(&drivers, 0, LIMITS, "carol", Mode::Observe),
            Admission::Full
        );
    }

    #[test]
    fn a_driver_displaces_other_users_grace_slots_before_its_own() {
        let h = [
            holder("alice", Mode::Attach, Some(100)),
            holder("mallory", Mode::Observe, Some(1)),
            holder("bob", Mode::Attach, None),
            holder("carol", Mode::Attach, None),
        ];
        assert_eq!(
            admit(&h, 0, LIMITS, "alice", Mode::Attach),
            Admission::Admit {
                evict: vec![h[1].id]
            }
        );
    }

    #[test]
    fn each_user_keeps_at_most_the_limit_of_grace_clients_the_oldest_go() {
        let h = [
            holder("mallory", Mode::Observe, Some(30)),
            holder("mallory", Mode::Observe, Some(20)),
            holder("mallory", Mode::Observe, Some(10)),
            holder("mallory", Mode::Observe, None),
            holder("alice", Mode::Attach, Some(50)),
        ];
        assert_eq!(over_grace_limit(&h, LIMITS, "mallory"), vec![h[0].id]);
        assert!(over_grace_limit(&h, LIMITS, "alice").is_empty());
    }
}
