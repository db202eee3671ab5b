//! Outlier ejection, as Envoy's outlier detection: an endpoint whose calls fail again and
//! again is taken out of routing for a while, even if its health checks (if any) still pass.
//!
//! Calls count how they ended on the hot path with one atomic per endpoint; the call that
//! reaches the threshold asks the pool (by a message: see `EndpointShared::record_outcome`)
//! to eject the endpoint. This module only decides; it knows nothing of the pool.

use std::sync::Arc;
use std::time::Duration;

use crate::sync::atomic::{AtomicU32, Ordering};

/// When an endpoint is ejected, and for how long.
///
/// A call fails, for outlier detection, when its connection breaks under it, when the server
/// resets its stream with an error (not `REFUSED_STREAM` or `CANCEL`, which say nothing of
/// the endpoint's health), or when it ends with `grpc-status` `UNAVAILABLE`. Any other end,
/// errors of the application included, is a success and starts the count again.
///
/// ```
/// use std::time::Duration;
/// let mut outliers = grpc_pool_core::OutlierDetection::default();
/// outliers.consecutive_failures = 3;
/// outliers.base_ejection_time = Duration::from_secs(10);
/// assert_eq!(outliers.max_ejection_percent, 10);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct OutlierDetection {
    /// Failed calls in a row that eject an endpoint (1 to 10,000). Default 5.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; the n-th lasts n times as long, up to
    /// `max_ejection_time` (each `base_ejection_time` spent back in service takes one off n).
    /// Default 30 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub base_ejection_time: Duration,
    /// Longest ejection. Default 300 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub max_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent of all (0 to 100). One may always be
    /// ejected when the pool has two or more, as in Envoy, and the last one never is.
    /// Default 10.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// The settings every endpoint of a pool with outlier detection shares, and the decisions
/// made from them.
#[derive(Debug)]
pub(crate) struct Outliers {
    pub(crate) config: OutlierDetection,
}

impl Outliers {
    pub(crate) fn new(config: OutlierDetection) -> Arc<Outliers> {
        Arc::new(Outliers { config })
    }

    /// Counts one call's end in its endpoint's `failures_in_a_row`; returns the count when
    /// it has reached the threshold, which means: eject the endpoint.
    pub(crate) fn count(&self, failures_in_a_row: &AtomicU32, failed: bool) -> Option<u32> {
        if !failed {
            // Only write when there is something to reset: most calls succeed, and a store
            // on every one would bounce the cache line between threads.
            if failures_in_a_row.load(Ordering::Relaxed) != 0 {
                failures_in_a_row.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let failures = failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
        (failures >= self.config.consecutive_failures).then_some(failures)
    }

    /// How long the ejection after `times` ejections (this one included) lasts.
    pub(crate) fn ejection_time(&self, times: u32) -> Duration {
        self.config.base_ejection_time.saturating_mul(times.max(1)).min(self.config.max_ejection_time)
    }

    /// How many of `endpoints` may be ejected at once.
    pub(crate) fn max_ejected(&self, endpoints: usize) -> usize {
        if endpoints < 2 {
            return 0;
        }
        let by_percent = endpoints * self.config.max_ejection_percent as usize / 100;
        by_percent.max(1).min(endpoints - 1)
    }
}

/// Whether an `h2` failure of a call counts against its endpoint: `Some(true)` if it does,
/// `None` if it says nothing either way (a refused or cancelled stream, a graceful GOAWAY,
/// a failure of our own making).
pub(crate) fn is_failure(err: &h2::Error) -> Option<bool> {
    if err.is_io() {
        return Some(true);
    }
    match err.reason() {
        Some(h2::Reason::REFUSED_STREAM | h2::Reason::CANCEL | h2::Reason::NO_ERROR) => None,
        Some(_) if err.is_remote() => Some(true),
        _ => None,
    }
}

/// Whether a response's `grpc-status` (in its headers, for a trailers-only answer, or in its
/// trailers) says `UNAVAILABLE`; `None` when there is none.
pub(crate) fn unavailable(headers: &http::HeaderMap) -> Option<bool> {
    headers.get("grpc-status").map(|status| status.as_bytes() == b"14")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejections_grow_with_their_number_up_to_the_maximum() {
        let outliers = Outliers::new(OutlierDetection {
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(100),
            ..Default::default()
        });
        assert_eq!(outliers.ejection_time(1), Duration::from_secs(30));
        assert_eq!(outliers.ejection_time(3), Duration::from_secs(90));
        assert_eq!(outliers.ejection_time(4), Duration::from_secs(100));
    }

    #[test]
    fn one_endpoint_may_always_be_ejected_but_never_the_last() {
        let outliers = Outliers::new(OutlierDetection { max_ejection_percent: 10, ..Default::default() });
        assert_eq!(outliers.max_ejected(1), 0);
        assert_eq!(outliers.max_ejected(2), 1);
        assert_eq!(outliers.max_ejected(30), 3);
        let all = Outliers::new(OutlierDetection { max_ejection_percent: 100, ..Default::default() });
        assert_eq!(all.max_ejected(4), 3);
    }

    #[test]
    fn the_failure_that_reaches_the_threshold_says_eject_and_a_success_starts_again() {
        let outliers = Outliers::new(OutlierDetection { consecutive_failures: 3, ..Default::default() });
        let count = AtomicU32::new(0);
        assert_eq!(outliers.count(&count, true), None);
        assert_eq!(outliers.count(&count, true), None);
        assert_eq!(outliers.count(&count, false), None);
        assert_eq!(outliers.count(&count, true), None);
        assert_eq!(outliers.count(&count, true), None);
        assert_eq!(outliers.count(&count, true), Some(3));
        assert_eq!(outliers.count(&count, true), Some(4), "each failure past it says so again");
    }

    #[test]
    fn only_unavailable_counts_among_statuses() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(unavailable(&headers), None);
        headers.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(unavailable(&headers), Some(true));
        headers.insert("grpc-status", "2".parse().unwrap());
        assert_eq!(unavailable(&headers), Some(false));
    }
}
