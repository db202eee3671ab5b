//! The timestamps taken on every read of a connection and every checkout, on tokio's clock.
//!
//! The pool and the health task read one clock, `tokio::time::Instant`, so that a test on
//! tokio's paused clock (`tokio::time::advance`) moves every age, idle time, backoff and
//! deadline together. Outside such tests it is the standard monotonic clock.
//!
//! These stamps are written from the hot path by whoever reads the socket or takes a slot,
//! and read by the health task, so they are kept lock-free: nanoseconds since a base
//! `Instant` in an `AtomicU64` (enough for 584 years).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A moment that can be moved to "now" from any thread without a lock.
#[derive(Debug)]
pub(crate) struct AtomicInstant {
    base: Instant,
    /// The moment, in nanoseconds since `base`.
    since_base: AtomicU64,
}

impl AtomicInstant {
    /// A stamp that reads now.
    pub(crate) fn now() -> AtomicInstant {
        AtomicInstant { base: Instant::now(), since_base: AtomicU64::new(0) }
    }

    fn nanos_now(&self) -> u64 {
        Instant::now().saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Moves the stamp to now.
    pub(crate) fn set_now(&self) {
        self.since_base.store(self.nanos_now(), Ordering::Relaxed);
    }

    /// Moves the stamp to now; returns the time since the moment it held before.
    pub(crate) fn swap_now(&self) -> Duration {
        let now = self.nanos_now();
        let before = self.since_base.swap(now, Ordering::Relaxed);
        Duration::from_nanos(now.saturating_sub(before))
    }

    /// Time since the stamp's moment; zero if another thread moved it past this reading.
    pub(crate) fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos_now().saturating_sub(self.since_base.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_tokio_time() {
        let stamp = AtomicInstant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(stamp.elapsed(), Duration::from_secs(3));
        assert_eq!(stamp.swap_now(), Duration::from_secs(3));
        assert_eq!(stamp.elapsed(), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(20)).await;
        stamp.set_now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(stamp.elapsed(), Duration::from_millis(5));
    }
}
