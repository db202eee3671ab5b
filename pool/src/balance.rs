//! Choosing between endpoints: what a checkout compares when it takes the better of two
//! endpoints drawn at random (power of two choices), and the latency estimate that the
//! latency-aware choice keeps per endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How a call chooses between the pool's endpoints. Either way it draws two endpoints at
/// random and takes the one that costs less (power of two choices), then the least loaded
/// connection of it.
///
/// ```
/// use std::time::Duration;
/// use grpc_pool_core::Balance;
/// assert_eq!(Balance::default(), Balance::LeastLoaded);
/// let latency_aware = Balance::PEAK_EWMA;
/// assert_eq!(latency_aware, Balance::PeakEwma { decay: Duration::from_millis(100) });
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Balance {
    /// Fewer calls in flight costs less. Needs no clock and no bookkeeping per call; a slow
    /// endpoint loses calls only as they pile up on it, so under light load it still takes
    /// its share of them (a quarter of the calls with four endpoints), and the tail
    /// latency with them.
    #[default]
    LeastLoaded,
    /// Latency-aware: an endpoint costs its recent latency (time to the response head, as
    /// a peak-sensitive moving average: a slower answer counts at once, faster ones bring
    /// the estimate down over `decay`, and an idle endpoint's estimate fades towards zero
    /// so that it is tried again) times its calls in flight plus one. As linkerd2-proxy and
    /// Finagle balance. Costs a clock reading per call and per checkout.
    PeakEwma {
        /// How fast the estimate forgets: the time constant of its moving average. 10 ms to
        /// 1 hour; [`Balance::PEAK_EWMA`] has 100 ms (linkerd's and Finagle's is 10 s, made
        /// for answers in tens of milliseconds: against answers in a fraction of one, the
        /// few-millisecond stalls every endpoint has now and then stay in a 10 s estimate
        /// and hide a slower endpoint among them; see the benchmarks page).
        #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
        decay: Duration,
    },
}

impl Balance {
    /// The latency-aware choice with a decay of 100 ms.
    pub const PEAK_EWMA: Balance = Balance::PeakEwma { decay: Duration::from_millis(100) };
}

/// The estimate a new endpoint starts from, and the least any estimate counts for: so that
/// an endpoint nobody has heard from yet is neither free (every call would go to it before
/// its first answer) nor shunned.
const FLOOR_NANOS: f64 = 100_000.0;

/// One endpoint's latency, peak-sensitive and decaying with time. Lock-free: written by the
/// calls that get an answer, read by every checkout; two answers at once may lose one of the
/// two updates, which an estimate can afford.
#[derive(Debug)]
pub(crate) struct LatencyEstimate {
    base: Instant,
    /// The estimate in nanoseconds, as `f64` bits; zero before the first answer.
    nanos: AtomicU64,
    /// When it was last updated, in nanoseconds since `base`.
    updated: AtomicU64,
}

impl LatencyEstimate {
    pub(crate) fn new() -> LatencyEstimate {
        LatencyEstimate { base: Instant::now(), nanos: AtomicU64::new(0), updated: AtomicU64::new(0) }
    }

    fn since_base(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// The estimate at `now`: the last one, faded towards zero by the time since.
    fn at(&self, now: u64, decay: Duration) -> f64 {
        let estimate = f64::from_bits(self.nanos.load(Ordering::Relaxed));
        if estimate == 0.0 {
            return FLOOR_NANOS;
        }
        let since = now.saturating_sub(self.updated.load(Ordering::Relaxed)) as f64;
        (estimate * (-since / decay.as_nanos() as f64).exp()).max(FLOOR_NANOS)
    }

    /// An answer that took `latency`: taken as the estimate if it is slower than the
    /// estimate now, else averaged in with a weight that grows with the time since the last
    /// update.
    pub(crate) fn observe(&self, latency: Duration, decay: Duration) {
        let now = self.since_base(Instant::now());
        let sample = latency.as_nanos() as f64;
        let last = f64::from_bits(self.nanos.load(Ordering::Relaxed));
        let next = if last == 0.0 {
            sample
        } else {
            let since = now.saturating_sub(self.updated.load(Ordering::Relaxed)) as f64;
            let keep = (-since / decay.as_nanos() as f64).exp();
            let current = last * keep;
            if sample >= current {
                sample
            } else {
                current + (sample - current) * (1.0 - keep)
            }
        };
        self.nanos.store(next.to_bits(), Ordering::Relaxed);
        self.updated.store(now, Ordering::Relaxed);
    }

    /// What choosing this endpoint costs at `now` with `in_flight` calls on it.
    pub(crate) fn cost(&self, now: Instant, in_flight: usize, decay: Duration) -> u64 {
        let estimate = self.at(self.since_base(now), decay);
        (estimate * (in_flight as f64 + 1.0)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_counts_at_once_and_fast_ones_bring_it_down_over_the_decay() {
        let estimate = LatencyEstimate::new();
        estimate.observe(Duration::from_micros(200), DECAY);
        let fast = estimate.cost(Instant::now(), 0, DECAY);
        assert_eq!(fast, 200_000);
        estimate.observe(Duration::from_millis(5), DECAY);
        assert_eq!(estimate.cost(Instant::now(), 0, DECAY), 5_000_000, "a peak is taken whole");
        // Fast answers a second apart: the estimate falls, by about 1/e over the decay.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            estimate.observe(Duration::from_micros(200), DECAY);
        }
        let later = estimate.cost(Instant::now(), 0, DECAY);
        assert!(later < 5_000_000 / 2 && later > 200_000, "{later}");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_multiply_the_cost_and_an_idle_estimate_fades() {
        let estimate = LatencyEstimate::new();
        assert_eq!(estimate.cost(Instant::now(), 0, DECAY), FLOOR_NANOS as u64, "no answer yet: the floor");
        estimate.observe(Duration::from_millis(2), DECAY);
        assert_eq!(estimate.cost(Instant::now(), 3, DECAY), 8_000_000);
        tokio::time::advance(DECAY * 10).await;
        assert_eq!(estimate.cost(Instant::now(), 0, DECAY), FLOOR_NANOS as u64, "faded to the floor");
    }
}

/// Endpoint weights as a checkout draws by them: the running sums of the weights of one
/// endpoint list, in its order. Empty when every endpoint weighs the same (the usual case:
/// weights come only from a control plane, `Pool::set_endpoint_weight` or a `Weighted`
/// discovery), and then endpoints are drawn uniformly as before.
#[derive(Debug, Default)]
pub(crate) struct Weights {
    /// The list these sums are of (its address), so that a checkout that loaded a newer
    /// list than these weights draws uniformly rather than by another list's weights.
    list: usize,
    sums: Vec<u64>,
}

impl Weights {
    /// The weights of the list at address `list`, in its order.
    pub(crate) fn of(list: usize, weights: impl Iterator<Item = u32>) -> Weights {
        let weights: Vec<u64> = weights.map(|w| u64::from(w.max(1))).collect();
        if weights.windows(2).all(|w| w[0] == w[1]) {
            return Weights::default();
        }
        let sums = weights
            .iter()
            .scan(0u64, |sum, w| {
                *sum += w;
                Some(*sum)
            })
            .collect();
        Weights { list, sums }
    }

    /// Whether every endpoint weighs the same.
    pub(crate) fn is_uniform(&self) -> bool {
        self.sums.is_empty()
    }

    /// Whether these are the weights of the list at `list`, of `len` endpoints, and not all
    /// equal.
    pub(crate) fn apply_to(&self, list: usize, len: usize) -> bool {
        !self.sums.is_empty() && self.list == list && self.sums.len() == len
    }

    /// An index drawn with a chance in proportion to its weight.
    pub(crate) fn draw(&self) -> usize {
        let total = self.sums.last().copied().unwrap_or(0);
        let r = fastrand::u64(..total.max(1));
        self.sums.partition_point(|sum| *sum <= r).min(self.sums.len().saturating_sub(1))
    }

    /// The weight of the endpoint at `index`.
    pub(crate) fn weight(&self, index: usize) -> u64 {
        let before = if index == 0 { 0 } else { self.sums[index - 1] };
        self.sums[index] - before
    }
}
