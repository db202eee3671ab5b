//! The health task's supervisor: it restarts a task that panicked, so keepalive and health
//! checks never stop silently for the rest of a pool's life.

use super::*;

/// Starts the health task of the pool behind `monitor`, supervised: should it panic, the
/// panic is logged as an error and counted in
/// [`HEALTH_TASK_RESTARTS`](grpc_pool_core::metrics::HEALTH_TASK_RESTARTS), and the task
/// starts again a second later (so one that panics at once cannot spin), tracking the pool's
/// members and endpoints afresh. Without that, keepalive and health checks would stop for the
/// pool's lifetime and nothing would say so. It ends by itself when the pool closes or its
/// last handle is dropped; aborting the returned handle ends the task too.
pub fn spawn(monitor: PoolMonitor, config: HealthConfig) -> JoinHandle<()> {
    tokio::spawn(supervise(monitor, config))
}

/// How long a panicked health task stays down before it starts again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

async fn supervise(monitor: PoolMonitor, config: HealthConfig) {
    loop {
        // Aborting the supervisor aborts the task it watches.
        let task = AbortOnDropHandle::new(tokio::spawn(Task::new(monitor.clone(), config.clone()).run()));
        let panic = match task.await {
            Ok(()) => return,
            Err(error) if error.is_panic() => error.into_panic(),
            Err(_) => return, // cancelled: the runtime is shutting down
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        metrics::counter!(names::HEALTH_TASK_RESTARTS, names::LABEL_POOL => monitor.name().to_owned())
            .increment(1);
        tracing::error!(pool = %monitor.name(), panic = %what, restart_in = ?RESTART_DELAY, "the health task panicked; keepalive and health checks are down until it restarts");
        tokio::select! {
            biased;
            _ = tokio::time::sleep(RESTART_DELAY) => {}
            _ = monitor.closed() => return,
        }
    }
}

/// For tests of the supervision only: not part of the API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod __test {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;

    static REQUESTED: AtomicBool = AtomicBool::new(false);
    static TAKEN: AtomicU64 = AtomicU64::new(0);
    static POOLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Makes the health task of the pool named `pool` panic at its next turn.
    pub fn panic_health_task(pool: &str) {
        POOLS.lock().unwrap_or_else(|e| e.into_inner()).push(pool.to_owned());
        REQUESTED.store(true, Ordering::Release);
    }

    /// Panics asked for and taken so far, over all pools.
    pub fn panics_taken() -> u64 {
        TAKEN.load(Ordering::Acquire)
    }

    /// Panics if a test asked the task of `pool` to; one load otherwise.
    pub(crate) fn maybe_panic(pool: &str) {
        if !REQUESTED.load(Ordering::Acquire) {
            return;
        }
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = pools.iter().position(|p| p == pool) {
            pools.remove(at);
            REQUESTED.store(!pools.is_empty(), Ordering::Release);
            drop(pools);
            TAKEN.fetch_add(1, Ordering::AcqRel);
            panic!("a test asked the health task of pool `{pool}` to panic");
        }
    }
}
