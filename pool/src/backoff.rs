//! Exponential reconnect backoff with jitter, as in gRPC's connection-backoff spec. The
//! arithmetic is [`BackoffConfig::delay`] (public, so the etcd client's reconnects use it
//! too); this is the pool's name for it, and its tests.

use std::time::Duration;

use crate::config::BackoffConfig;

/// The delay before reconnect attempt number `failures + 1`, after `failures` consecutive
/// failed attempts: `base * multiplier^(failures - 1)`, capped at `max`, then spread by
/// `+/- jitter`. Zero failures means no delay.
pub(crate) fn delay(config: &BackoffConfig, failures: u32) -> Duration {
    config.delay(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc_defaults() -> BackoffConfig {
        BackoffConfig::default()
    }

    #[test]
    fn follows_the_grpc_spec_defaults() {
        let config = grpc_defaults();
        assert_eq!(delay(&config, 0), Duration::ZERO);
        for _ in 0..1_000 {
            let first = delay(&config, 1).as_secs_f64();
            assert!((0.8..=1.2).contains(&first), "{first}");
            let third = delay(&config, 3).as_secs_f64();
            assert!((2.56 * 0.8..=2.56 * 1.2).contains(&third), "{third}");
            let late = delay(&config, 40).as_secs_f64();
            assert!((96.0..=144.0).contains(&late), "{late}");
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let config = grpc_defaults();
        let delays: std::collections::HashSet<_> = (0..50).map(|_| delay(&config, 2)).collect();
        assert!(delays.len() > 40, "jitter should spread delays, got {}", delays.len());
    }
}
