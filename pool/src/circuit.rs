//! Circuit breaking: a cap on the calls the pool has in flight (`Pool::set_max_requests`,
//! an xDS cluster's `circuit_breakers`), past which a new call fails at once with
//! `UNAVAILABLE` instead of queueing (gRFC A32's `max_requests`).
//!
//! Counted per stream slot taken for a call through the pool, while a cap is set: each slot
//! remembers whether it was counted, so setting or lifting the cap while calls are in flight
//! leaves the count right. Without a cap a slot reads one flag and counts nothing.

use std::sync::atomic::{AtomicU64, Ordering};

/// The cap and the count, shared by the pool and every endpoint's slots.
#[derive(Debug, Default)]
pub(crate) struct RequestLimit {
    /// 0: no cap.
    limit: AtomicU64,
    /// Slots taken for calls while a cap was set, not yet given back.
    active: AtomicU64,
}

impl RequestLimit {
    pub(crate) fn set(&self, limit: Option<u32>) {
        self.limit.store(limit.map_or(0, u64::from), Ordering::Relaxed);
    }

    pub(crate) fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|l| *l > 0)
    }

    /// Whether another call may start: no cap, or fewer in flight than it.
    pub(crate) fn admits(&self) -> bool {
        self.limit().is_none_or(|limit| self.active.load(Ordering::Relaxed) < limit)
    }

    /// Counts a slot taken for a call, if a cap is set; returns whether it did.
    #[inline]
    pub(crate) fn count(&self) -> bool {
        if self.limit.load(Ordering::Relaxed) == 0 {
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
