//! A cheap monotonic clock for the timestamps taken on every read and every checkout.
//!
//! `Instant::now()` plus the subtraction that turns it into a duration costs ~150
//! instructions, and a unary call took three of them (the checkout's "last used" stamp and
//! one "last read" stamp per read of the socket): about 1% of the whole call. Those stamps
//! only ever answer "quiet for how long", in keepalive times and idle timeouts that are
//! milliseconds at the least, so on Linux they read `CLOCK_MONOTONIC_COARSE`, which returns
//! the kernel's last tick (1-4 ms resolution) without reading the hardware counter.

/// Nanoseconds on a monotonic clock with a resolution of a few milliseconds. Only
/// differences between two readings mean anything.
#[cfg(target_os = "linux")]
pub(crate) fn coarse_now_nanos() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec, and CLOCK_MONOTONIC_COARSE exists on
    // every Linux since 2.6.32; the call cannot fail with these arguments.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(now.tv_nsec as u64)
}

/// Nanoseconds on a monotonic clock. Only differences between two readings mean anything.
#[cfg(not(target_os = "linux"))]
pub(crate) fn coarse_now_nanos() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Time from the reading `earlier` to now; zero if the clock reads behind it.
pub(crate) fn since(earlier: u64) -> std::time::Duration {
    std::time::Duration::from_nanos(coarse_now_nanos().saturating_sub(earlier))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_do_not_go_backwards_and_follow_real_time() {
        let first = coarse_now_nanos();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let second = coarse_now_nanos();
        assert!(second >= first);
        // The coarse clock lags by at most a tick (4 ms at HZ=250; 10 ms at HZ=100).
        let elapsed = std::time::Duration::from_nanos(second - first);
        assert!(elapsed >= std::time::Duration::from_millis(20), "{elapsed:?}");
    }
}
