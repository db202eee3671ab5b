//! Circuit breaking: a cap on the calls the pool has in flight (`Pool::set_max_requests`,
//! an xDS cluster's `circuit_breakers`), past which a new call fails at once with
//! `UNAVAILABLE` instead of queueing (gRFC A32's `max_requests`).
//!
//! Counted per stream slot taken for a call through the pool, while a cap is set: each slot
//! remembers whether it was counted, so setting or lifting the cap while calls are in flight
//! leaves the count right. Without a cap a slot reads one flag and counts nothing.
//!
//! A call is admitted when fewer than the cap are in flight, and counted when it takes its
//! stream; one that finds the count past the cap then (it waited for its stream while others
//! took theirs, or raced another to the last place) gives the stream back and fails too. So
//! the count passes the cap only between a stream's taking and its giving back.

use std::sync::atomic::{AtomicU64, Ordering};

/// The cap and the count, shared by the pool and every endpoint's slots.
#[derive(Debug)]
pub(crate) struct RequestLimit {
    /// `NO_CAP`: none.
    limit: AtomicU64,
    /// Slots taken for calls while a cap was set, not yet given back.
    active: AtomicU64,
}

const NO_CAP: u64 = u64::MAX;

impl Default for RequestLimit {
    fn default() -> Self {
        RequestLimit { limit: AtomicU64::new(NO_CAP), active: AtomicU64::new(0) }
    }
}

impl RequestLimit {
    /// `Some(0)` refuses every call, as Envoy's and gRPC's `max_requests` of 0 do.
    pub(crate) fn set(&self, limit: Option<u32>) {
        self.limit.store(limit.map_or(NO_CAP, u64::from), Ordering::Relaxed);
    }

    pub(crate) fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|l| *l != NO_CAP)
    }

    /// Whether another call may start: no cap, or fewer in flight than it.
    pub(crate) fn admits(&self) -> bool {
        self.limit().is_none_or(|limit| self.active.load(Ordering::Relaxed) < limit)
    }

    /// Whether more calls are counted than the cap allows.
    pub(crate) fn over(&self) -> bool {
        self.limit().is_some_and(|limit| self.active.load(Ordering::Relaxed) > limit)
    }

    /// Counts a slot taken for a call, if a cap is set; returns whether it did.
    #[inline]
    pub(crate) fn count(&self) -> bool {
        if self.limit.load(Ordering::Relaxed) == NO_CAP {
            return false;
        }
        self.active.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Gives back a slot `count` counted.
    #[inline]
    pub(crate) fn uncount(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_stays_right_when_the_cap_changes_under_calls_in_flight() {
        let limit = RequestLimit::default();
        assert!(!limit.count(), "no cap: nothing counted");
        limit.set(Some(2));
        let (a, b) = (limit.count(), limit.count());
        assert!(a && b && !limit.admits());
        limit.set(None);
        assert!(limit.admits());
        limit.uncount();
        limit.uncount();
        assert_eq!(limit.active(), 0);
    }
}
