//! The pool's counters: kept with relaxed atomics as things happen, read whole by
//! `Pool::state()` as [`Statistics`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::member::EvictionReason;

/// Counters behind `Pool::state().statistics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) checkouts_direct: AtomicU64,
    pub(crate) checkouts_waited: AtomicU64,
    pub(crate) checkout_timeouts: AtomicU64,
    pub(crate) checkout_wait_nanos: AtomicU64,
    pub(crate) connections_created: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) retries_by_reason: [AtomicU64; RetryReason::ALL.len()],
    pub(crate) ejections: AtomicU64,
    pub(crate) policy_retries: AtomicU64,
    pub(crate) retries_throttled: AtomicU64,
    pub(crate) hedges_sent: AtomicU64,
    pub(crate) hedges_won: AtomicU64,
    pub(crate) hedges_cancelled: AtomicU64,
    pub(crate) closed_by_reason: [AtomicU64; EvictionReason::ALL.len()],
}

impl Stats {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> Statistics {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Statistics {
            checkouts_direct: load(&self.checkouts_direct),
            checkouts_waited: load(&self.checkouts_waited),
            checkout_timeouts: load(&self.checkout_timeouts),
            checkout_wait_time: Duration::from_nanos(load(&self.checkout_wait_nanos)),
            connections_created: load(&self.connections_created),
            connect_failures: load(&self.connect_failures),
            retries: load(&self.retries),
            ejections: load(&self.ejections),
            policy_retries: load(&self.policy_retries),
            retries_throttled: load(&self.retries_throttled),
            hedges_sent: load(&self.hedges_sent),
            hedges_won: load(&self.hedges_won),
            hedges_cancelled: load(&self.hedges_cancelled),
            retries_by_reason: RetryReason::ALL
                .iter()
                .map(|r| (*r, load(&self.retries_by_reason[*r as usize])))
                .collect(),
            connections_closed: EvictionReason::ALL
                .iter()
                .map(|r| (*r, load(&self.closed_by_reason[r.index()])))
                .collect(),
        }
    }
}

/// Counters of a pool's life, in the manner of bb8's statistics.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Statistics {
    /// Checkouts that found a free slot at once.
    pub checkouts_direct: u64,
    /// Checkouts that waited, then got a slot.
    pub checkouts_waited: u64,
    /// Checkouts that gave up after `checkout_timeout`.
    pub checkout_timeouts: u64,
    /// Total time waited by the checkouts that waited.
    pub checkout_wait_time: Duration,
    /// Connections opened and put in service. One that ends between its handshake and
    /// its listing (the server closed it at once, or the pool closed) is not counted: it
    /// counts as a failed connect in the endpoint's backoff.
    pub connections_created: u64,
    /// Connect attempts that failed.
    pub connect_failures: u64,
    /// Calls sent again on another connection because the server never processed them.
    pub retries: u64,
    /// The same, by reason.
    pub retries_by_reason: Vec<(RetryReason, u64)>,
    /// Endpoints ejected by outlier detection.
    pub ejections: u64,
    /// Calls sent again by their service config's retry policy (not counted in `retries`).
    pub policy_retries: u64,
    /// Retryable failures not sent again because retry throttling was at or below half its
    /// tokens.
    pub retries_throttled: u64,
    /// Hedged copies sent after a call's first (service config `hedgingPolicy`).
    pub hedges_sent: u64,
    /// Hedged calls answered by a copy other than the first.
    pub hedges_won: u64,
    /// Hedged copies reset (`CANCEL`) because another copy answered first.
    pub hedges_cancelled: u64,
    /// Connections taken out of service, by reason.
    pub connections_closed: Vec<(EvictionReason, u64)>,
}

impl Statistics {
    /// Connections taken out of service for `reason`.
    pub fn closed(&self, reason: EvictionReason) -> u64 {
        self.connections_closed.iter().find(|(r, _)| *r == reason).map(|(_, n)| *n).unwrap_or(0)
    }

    /// Calls sent again for `reason`.
    pub fn retried(&self, reason: RetryReason) -> u64 {
        self.retries_by_reason.iter().find(|(r, _)| *r == reason).map(|(_, n)| *n).unwrap_or(0)
    }
}

/// Why a call was sent again. Each is a case where the server provably never processed it.
///
/// ```
/// assert_eq!(grpc_pool_core::RetryReason::Refused.as_str(), "refused");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryReason {
    /// The connection was going away or gone when the stream was to be opened: nothing
    /// was written.
    NotSent,
    /// The server reset the stream with `REFUSED_STREAM`.
    Refused,
    /// The stream was above the last stream id of the server's GOAWAY.
    GoAway,
    /// The member failed its PING before use; the call had not been sent.
    PingBeforeUse,
}

impl RetryReason {
    /// Every reason, in a fixed order.
    pub(crate) const ALL: [RetryReason; 4] =
        [RetryReason::NotSent, RetryReason::Refused, RetryReason::GoAway, RetryReason::PingBeforeUse];

    /// The reason as the `reason` label of the retries metric.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::NotSent => "not_sent",
            RetryReason::Refused => "refused",
            RetryReason::GoAway => "goaway",
            RetryReason::PingBeforeUse => "ping_before_use",
        }
    }
}
