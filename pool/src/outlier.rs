//! Outlier ejection, as Envoy's outlier detection: an endpoint whose calls fail again and
//! again is taken out of routing for a while, even if its health checks (if any) still pass.
//!
//! Two ways, either or both: failures in a row (calls count how they ended on the hot path
//! with one atomic per endpoint; the call that reaches the threshold asks the pool, by a
//! message, to eject the endpoint: see `EndpointShared::record_outcome`), and, every
//! `interval`, gRFC A50's success-rate and failure-percentage algorithms over the calls of
//! the interval (the pool's sweep, `PoolInner::sweep_outliers`). This module only decides;
//! it knows nothing of the pool.
//!
//! The settings can change while the pool runs (`Pool::override_outlier_detection`: an xDS
//! cluster's `outlier_detection` while it has one), so they are read through a swap.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

// The failures in a row are counted with the hand-off's atomics (loom's under the model);
// the rest are the standard ones.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as Std};

use crate::sync::atomic::{AtomicU32, Ordering};

/// When an endpoint is ejected, and for how long.
///
/// A call fails, for outlier detection, when its connection breaks under it, when the server
/// resets its stream with an error (not `REFUSED_STREAM` or `CANCEL`, which say nothing of
/// the endpoint's health), or when it ends with `grpc-status` `UNAVAILABLE`. Any other end,
/// errors of the application included, is a success and starts the count again.
///
/// `consecutive_failures` ejects at once on failures in a row; `success_rate` and
/// `failure_percentage` (off unless set) judge every `interval` by the calls of the interval,
/// as gRFC A50 specifies them (and Envoy before it).
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
    /// Failed calls in a row that eject an endpoint (1 to 10,000; 0: not by failures in a
    /// row). Default 5.
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
    /// How often `success_rate` and `failure_percentage` judge the calls since the last
    /// time (10 ms to a day). Default 10 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub interval: Duration,
    /// Ejects endpoints whose success rate over an interval is far below the others'.
    /// Default: off.
    pub success_rate: Option<SuccessRateEjection>,
    /// Ejects endpoints whose calls failed more than a threshold over an interval.
    /// Default: off.
    pub failure_percentage: Option<FailurePercentageEjection>,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            interval: Duration::from_secs(10),
            success_rate: None,
            failure_percentage: None,
        }
    }
}

impl OutlierDetection {
    /// Settings that eject nothing: for a pool whose outlier detection is set at run time
    /// only (an xDS pool before its cluster has any).
    pub fn off() -> OutlierDetection {
        OutlierDetection { consecutive_failures: 0, ..OutlierDetection::default() }
    }

    pub(crate) fn judges_intervals(&self) -> bool {
        self.success_rate.is_some() || self.failure_percentage.is_some()
    }
}

/// gRFC A50's success-rate ejection: every interval, of the endpoints with at least
/// `request_volume` calls (when there are `minimum_hosts` of them), those whose success rate
/// is below the mean by more than `stdev_factor / 1000` standard deviations are ejected, each
/// with a chance of `enforcement_percentage`.
///
/// ```
/// let rate = grpc_pool_core::SuccessRateEjection::default();
/// assert_eq!((rate.stdev_factor, rate.minimum_hosts, rate.request_volume), (1900, 5, 100));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct SuccessRateEjection {
    /// Standard deviations below the mean, in thousandths. Default 1900.
    pub stdev_factor: u32,
    /// Percent chance an outlier found is ejected (0 to 100). Default 100.
    pub enforcement_percentage: u32,
    /// Endpoints with enough calls needed to judge at all. Default 5.
    pub minimum_hosts: u32,
    /// Calls in the interval for an endpoint to be judged. Default 100.
    pub request_volume: u32,
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        SuccessRateEjection {
            stdev_factor: 1900,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 100,
        }
    }
}

/// gRFC A50's failure-percentage ejection: every interval, when the pool has
/// `minimum_hosts` endpoints, those with at least `request_volume` calls of which more than
/// `threshold` percent failed are ejected, each with a chance of `enforcement_percentage`.
///
/// ```
/// let failures = grpc_pool_core::FailurePercentageEjection::default();
/// assert_eq!((failures.threshold, failures.minimum_hosts, failures.request_volume), (85, 5, 50));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct FailurePercentageEjection {
    /// Percent of calls failed above which an endpoint is ejected (0 to 100). Default 85.
    pub threshold: u32,
    /// Percent chance an outlier found is ejected (0 to 100). Default 100.
    pub enforcement_percentage: u32,
    /// Endpoints the pool needs for this to judge at all. Default 5.
    pub minimum_hosts: u32,
    /// Calls in the interval for an endpoint to be judged. Default 50.
    pub request_volume: u32,
}

impl Default for FailurePercentageEjection {
    fn default() -> Self {
        FailurePercentageEjection {
            threshold: 85,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

/// One endpoint's calls over an interval, for the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IntervalCalls {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
}

impl IntervalCalls {
    fn total(&self) -> u64 {
        self.succeeded + self.failed
    }
}

/// An endpoint's calls counted for the interval algorithms, while they are on.
#[derive(Debug, Default)]
pub(crate) struct CallCounter {
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl CallCounter {
    /// The calls since the last take, and a new count from zero.
    pub(crate) fn take(&self) -> IntervalCalls {
        IntervalCalls {
            succeeded: self.succeeded.swap(0, Std::Relaxed),
            failed: self.failed.swap(0, Std::Relaxed),
        }
    }
}

/// The settings every endpoint of a pool with outlier detection shares, and the decisions
/// made from them.
#[derive(Debug)]
pub(crate) struct Outliers {
    /// The pool's own settings, from its configuration.
    own: OutlierDetection,
    /// The settings in force: the pool's own, or an override's.
    config: ArcSwap<OutlierDetection>,
    /// Whether the settings in force judge intervals, so calls count for them.
    counting: AtomicBool,
    /// Wakes the sweep when the settings change: a new interval starts at once.
    pub(crate) changed: tokio::sync::Notify,
}

impl Outliers {
    pub(crate) fn new(config: OutlierDetection) -> Arc<Outliers> {
        Arc::new(Outliers {
            counting: AtomicBool::new(config.judges_intervals()),
            config: ArcSwap::from_pointee(config.clone()),
            own: config,
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The settings in force.
    pub(crate) fn config(&self) -> Arc<OutlierDetection> {
        self.config.load_full()
    }

    /// Puts `settings` in force, or, with `None`, the pool's own back.
    pub(crate) fn set(&self, settings: Option<OutlierDetection>) {
        let settings = settings.unwrap_or_else(|| self.own.clone());
        self.counting.store(settings.judges_intervals(), Std::Relaxed);
        self.config.store(Arc::new(settings));
        self.changed.notify_one();
    }

    /// Counts one call's end in its endpoint's `failures_in_a_row` (and, while the interval
    /// algorithms are on, in its interval count); returns the failures in a row when they
    /// have reached the threshold, which means: eject the endpoint.
    pub(crate) fn count(
        &self,
        failures_in_a_row: &AtomicU32,
        calls: &CallCounter,
        failed: bool,
    ) -> Option<u32> {
        if self.counting.load(Std::Relaxed) {
            let counter = if failed { &calls.failed } else { &calls.succeeded };
            counter.fetch_add(1, Std::Relaxed);
        }
        if !failed {
            // Only write when there is something to reset: most calls succeed, and a store
            // on every one would bounce the cache line between threads.
            if failures_in_a_row.load(Ordering::Relaxed) != 0 {
                failures_in_a_row.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let failures = failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
        let threshold = self.config.load().consecutive_failures;
        (threshold > 0 && failures >= threshold).then_some(failures)
    }

    /// How long the ejection after `times` ejections (this one included) lasts.
    pub(crate) fn ejection_time(&self, times: u32) -> Duration {
        let config = self.config.load();
        config
            .base_ejection_time
            .saturating_mul(times.max(1))
            .min(config.max_ejection_time.max(config.base_ejection_time))
    }

    /// How many of `endpoints` may be ejected at once.
    pub(crate) fn max_ejected(&self, endpoints: usize) -> usize {
        if endpoints < 2 {
            return 0;
        }
        let by_percent = endpoints * self.config.load().max_ejection_percent as usize / 100;
        by_percent.max(1).min(endpoints - 1)
    }
}

/// gRFC A50's interval algorithms over one interval's calls of every endpoint not ejected
/// (`calls`, by index): the indices to eject, in order, and why. `ejected` are ejected
/// already, of `endpoints` in all; `draw` is a percent draw (0 to 99) for the enforcement
/// chance. The max_ejection_percent cap is the pool's to keep as it ejects.
pub(crate) fn judge(
    config: &OutlierDetection,
    calls: &[(usize, IntervalCalls)],
    endpoints: usize,
    mut draw: impl FnMut() -> u32,
) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    if let Some(rate) = &config.success_rate {
        let judged: Vec<(usize, f64)> = calls
            .iter()
            .filter(|(_, c)| c.total() >= u64::from(rate.request_volume.max(1)))
            .map(|(i, c)| (*i, c.succeeded as f64 / c.total() as f64))
            .collect();
        if judged.len() >= rate.minimum_hosts as usize && !judged.is_empty() {
            let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / judged.len() as f64;
            let variance = judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / judged.len() as f64;
            let floor = mean - variance.sqrt() * f64::from(rate.stdev_factor) / 1000.0;
            for (i, r) in judged {
                if r < floor && draw() < rate.enforcement_percentage {
                    out.push((
                        i,
                        format!(
                            "success rate {:.1}% below {:.1}% (mean {:.1}%)",
                            r * 100.0,
                            floor * 100.0,
                            mean * 100.0
                        ),
                    ));
                }
            }
        }
    }
    if let Some(failures) = &config.failure_percentage {
        if endpoints >= failures.minimum_hosts as usize {
            for (i, c) in calls {
                if c.total() < u64::from(failures.request_volume.max(1)) || out.iter().any(|(j, _)| j == i) {
                    continue;
                }
                let percent = c.failed as f64 * 100.0 / c.total() as f64;
                if percent > f64::from(failures.threshold) && draw() < failures.enforcement_percentage {
                    out.push((
                        *i,
                        format!(
                            "{percent:.1}% of {} calls failed (threshold {}%)",
                            c.total(),
                            failures.threshold
                        ),
                    ));
                }
            }
        }
    }
    out
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
        let (count, calls) = (AtomicU32::new(0), CallCounter::default());
        assert_eq!(outliers.count(&count, &calls, true), None);
        assert_eq!(outliers.count(&count, &calls, true), None);
        assert_eq!(outliers.count(&count, &calls, false), None);
        assert_eq!(outliers.count(&count, &calls, true), None);
        assert_eq!(outliers.count(&count, &calls, true), None);
        assert_eq!(outliers.count(&count, &calls, true), Some(3));
        assert_eq!(outliers.count(&count, &calls, true), Some(4), "each failure past it says so again");
        assert_eq!(
            calls.take(),
            IntervalCalls { succeeded: 0, failed: 0 },
            "no interval algorithm: not counted"
        );
        // Overridden: off in a row, failure percentage on; then the pool's own again.
        outliers.set(Some(OutlierDetection {
            failure_percentage: Some(FailurePercentageEjection::default()),
            ..OutlierDetection::off()
        }));
        assert_eq!(outliers.count(&count, &calls, true), None);
        assert_eq!(calls.take(), IntervalCalls { succeeded: 0, failed: 1 });
        outliers.set(None);
        assert_eq!(outliers.count(&count, &calls, true), Some(6));
    }

    fn calls(list: &[(u64, u64)]) -> Vec<(usize, IntervalCalls)> {
        list.iter()
            .enumerate()
            .map(|(i, (ok, failed))| (i, IntervalCalls { succeeded: *ok, failed: *failed }))
            .collect()
    }

    #[test]
    fn failure_percentage_ejects_above_the_threshold_with_enough_calls_and_hosts() {
        let config = OutlierDetection {
            failure_percentage: Some(FailurePercentageEjection {
                minimum_hosts: 3,
                request_volume: 10,
                ..Default::default()
            }),
            ..OutlierDetection::off()
        };
        // 90% failed: out; 50%: in; 100% of 5 calls: too few to judge.
        let ejected = judge(&config, &calls(&[(1, 9), (5, 5), (0, 5), (10, 0)]), 4, || 0);
        assert_eq!(ejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0]);
        assert!(ejected[0].1.contains("90.0% of 10 calls failed"), "{ejected:?}");
        assert!(
            judge(&config, &calls(&[(1, 9), (5, 5)]), 2, || 0).is_empty(),
            "fewer hosts than minimum_hosts"
        );
        let mut half = config.clone();
        half.failure_percentage.as_mut().unwrap().enforcement_percentage = 50;
        assert!(
            judge(&half, &calls(&[(1, 9), (5, 5), (10, 0)]), 3, || 50).is_empty(),
            "a draw of 50 is past 50%"
        );
        assert_eq!(
            judge(&half, &calls(&[(1, 9), (5, 5), (10, 0)]), 3, || 49).len(),
            1,
            "a draw of 49 is within"
        );
    }

    #[test]
    fn success_rate_ejects_what_falls_far_below_the_mean() {
        let config = OutlierDetection {
            success_rate: Some(SuccessRateEjection {
                minimum_hosts: 5,
                request_volume: 100,
                stdev_factor: 1900,
                ..Default::default()
            }),
            ..OutlierDetection::off()
        };
        // Five at 100% and one at 50%: mean 91.7%, sd 18.6%, floor 56.3%.
        let list = [(100, 0), (100, 0), (100, 0), (100, 0), (100, 0), (50, 50)];
        let ejected = judge(&config, &calls(&list), 6, || 0);
        assert_eq!(ejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![5]);
        // Four judged (one with too few calls): below minimum_hosts, nobody.
        let list = [(100, 0), (100, 0), (100, 0), (50, 50), (5, 5)];
        assert!(judge(&config, &calls(&list), 5, || 0).is_empty());
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
