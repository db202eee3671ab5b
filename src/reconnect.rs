//! A registry's own pool (etcd's, the xDS control plane's) and the backoff between its
//! reconnects (etcd's watches and leases, the xDS stream).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{Builder, Error, ErrorKind, Pool};

/// Builds a registry's pool, named `prefix`, then `prefix-2`, ... (`clients` numbers them)
/// past names the application's pools hold. Its builder comes with reconnects at most 5 s
/// apart: a registry that was away is wanted back soon (the pool's default goes to 120 s).
pub(crate) fn registry_pool(
    prefix: &str,
    clients: &AtomicUsize,
    build: impl Fn(Builder) -> Result<Pool, Error>,
) -> Result<Pool, Error> {
    loop {
        let n = clients.fetch_add(1, Ordering::Relaxed) + 1;
        let name = if n == 1 { prefix.to_owned() } else { format!("{prefix}-{n}") };
        let mut backoff = crate::BackoffConfig::default();
        backoff.base = Duration::from_millis(200);
        backoff.max = Duration::from_secs(5);
        match build(Pool::builder().name(&name).backoff(backoff)) {
            Ok(pool) => return Ok(pool),
            // A pool of the application's holds that name: take the next.
            Err(e) if e.kind() == ErrorKind::Config && e.to_string().contains("`name`") && n < 1 << 20 => {}
            Err(e) => return Err(e),
        }
    }
}

/// Backoff between reconnects: `min` doubling to `max`, with +/-20% jitter (the pool's own
/// backoff arithmetic, [`BackoffConfig::delay`](crate::BackoffConfig::delay)).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    policy: crate::BackoffConfig,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let mut policy = crate::BackoffConfig::default();
        (policy.base, policy.multiplier, policy.jitter, policy.max) = (min, 2.0, 0.2, max);
        Backoff { policy, failures: 0 }
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// The wait before the next try; the one after is twice as long, up to `max`.
    pub(crate) fn next_wait(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.delay(self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(300));
        let waits: Vec<Duration> = (0..4).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(80) && waits[0] <= Duration::from_millis(120));
        assert!(waits[3] >= Duration::from_millis(240) && waits[3] <= Duration::from_millis(360));
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(120));
    }
}
