//! tokio's paused clock, held still while real sockets carry the test's calls.
//!
//! A paused clock advances by itself whenever the runtime has nothing to do, to the next
//! timer, and a runtime waiting for a socket has nothing to do: a PING's or a connect's
//! timeout could fire before the answer already on its way over loopback is read. A
//! [`HeldClock`] stops that. While it lives, a blocking task is running, and tokio never
//! auto-advances the clock of a current-thread runtime while one runs; time moves only when
//! the test calls [`HeldClock::advance`]. Sockets work in real time meanwhile, so a test
//! can let every answer arrive before it moves the clock on, and the pool's timers (health
//! task, idle and lifetime eviction, backoff, ejection, checkout and call deadlines) fire
//! at the instants the configuration names, however slow the machine.
//!
//! Use it in `#[tokio::test(start_paused = true)]` (a current-thread runtime). Waits on
//! state go through [`HeldClock::wait_until`], which waits in real time: `wait_until` and
//! `tokio::time::sleep` never end while the clock is held.

use std::time::Duration;

/// How long [`HeldClock::settle`] lets the runtime run, in real time: answers over loopback
/// arrive in microseconds; this is for the scheduler of a busy machine.
const SETTLE: Duration = Duration::from_millis(2);

/// How long [`HeldClock::advance_until`] waits in real time for what the timers started:
/// loopback I/O and the pool's own tasks, on a machine however busy.
pub const REAL_WAIT: Duration = Duration::from_secs(15);

/// Holds the paused clock still until dropped.
#[derive(Debug)]
pub struct HeldClock {
    /// Dropped with the clock: the holding task's wait ends, and with it the hold.
    _release: std::sync::mpsc::Sender<()>,
}

impl HeldClock {
    /// Holds the clock. Panics unless the runtime is current-thread with its clock paused.
    pub fn hold() -> HeldClock {
        assert_eq!(
            tokio::runtime::Handle::current().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread,
            "tokio holds a paused clock still only on a current-thread runtime"
        );
        let before = tokio::time::Instant::now();
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(tokio::time::Instant::now(), before, "the clock is not paused: use start_paused = true");
        let (release, held) = std::sync::mpsc::channel::<()>();
        // From its spawn to its end, this task keeps the clock from advancing by itself.
        drop(tokio::task::spawn_blocking(move || {
            let _ = held.recv();
        }));
        HeldClock { _release: release }
    }

    /// Moves the clock on by `by`, firing the timers due by then, and lets the runtime run
    /// what they woke ([`HeldClock::settle`]).
    pub async fn advance(&self, by: Duration) {
        tokio::time::advance(by).await;
        self.settle().await;
    }

    /// Moves the clock on by `by` in steps of `step`, letting the runtime run after each, so
    /// that what one timer starts (a PING, a connect) happens at its own instant and not
    /// at the end of the whole stretch; stops early, and returns `true`, as soon as `done`
    /// holds after a step.
    pub async fn advance_in_steps(
        &self,
        by: Duration,
        step: Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        assert!(!step.is_zero(), "a zero step never gets anywhere");
        let until = tokio::time::Instant::now() + by;
        while tokio::time::Instant::now() < until {
            let left = until - tokio::time::Instant::now();
            self.advance(step.min(left)).await;
            if done() {
                return true;
            }
        }
        false
    }

    /// Moves the clock on in steps of `step`, as [`HeldClock::advance_in_steps`], until
    /// `done` holds, by `by` at most; then, the clock standing there, waits in real time
    /// (up to [`REAL_WAIT`]) for what the last timers started (a call on a new connection, a
    /// health check's answer) to end. Panics with `what` if `done` never holds; returns how
    /// far the clock moved, which is at most `by`.
    pub async fn advance_until(
        &self,
        by: Duration,
        step: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Duration {
        let start = tokio::time::Instant::now();
        if !self.advance_in_steps(by, step, &mut done).await {
            self.wait_until(REAL_WAIT, &format!("{what} (the clock moved on by {by:?})"), done).await;
        }
        start.elapsed()
    }

    /// Lets the runtime run for a moment of real time (reading what the sockets brought, and
    /// the tasks that wakes), the clock standing still.
    pub async fn settle(&self) {
        tokio::task::spawn_blocking(|| std::thread::sleep(SETTLE)).await.expect("a real-time pause");
    }

    /// Waits in real time, the clock standing still, until `condition` holds; panics with
    /// `what` if it does not within `limit` (real time).
    pub async fn wait_until<F>(&self, limit: Duration, what: &str, mut condition: F)
    where
        F: FnMut() -> bool,
    {
        let deadline = std::time::Instant::now() + limit;
        while !condition() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {limit:?} (real time, the clock held) waiting until {what}"
            );
            self.settle().await;
        }
    }
}
