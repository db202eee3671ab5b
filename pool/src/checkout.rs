//! Checkout: choosing a slot (power of two choices between endpoints by `Balance`, then the least
//! loaded member), waiting for one in the FIFO queue, growing the pool for the waiters, and
//! failing fast when no endpoint can take a call (gRPC's transient failure).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::endpoint::EndpointShared;
use crate::error::Error;
use crate::inner::PoolInner;
use crate::internals::EndpointEntry;
use crate::member::{Member, MemberState, Slot};
use crate::metrics as names;

/// What a waiting checkout needs to know of its call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckoutWait {
    /// Wait for an endpoint to come back rather than fail fast (gRPC's `wait_for_ready`).
    pub(crate) wait_for_ready: bool,
    /// The call has a deadline, which bounds the wait in its stead for `wait_for_ready`.
    pub(crate) has_deadline: bool,
}

impl PoolInner {
    /// A free slot, without waiting: power of two choices between endpoints by the pool's
    /// `Balance` (streams in flight, or latency times streams in flight), then the least
    /// loaded member of the chosen one; the other endpoints if it is full. Lock-free.
    pub(crate) fn try_checkout(&self) -> Option<Slot> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        let usable = |i: usize| endpoints[i].is_routable();
        // Least loaded: calls in flight. Latency-aware: latency times (calls in flight + 1),
        // on one reading of the clock for both endpoints drawn.
        let latency_aware = match self.config.balance {
            crate::Balance::PeakEwma { decay } if n > 1 => Some((Instant::now(), decay)),
            _ => None,
        };
        let load = |i: usize| -> u64 {
            if !usable(i) {
                return u64::MAX;
            }
            let entry = &endpoints[i];
            match latency_aware {
                Some((now, decay)) if entry.has_members() => {
                    entry.shared.latency.cost(now, entry.in_flight(), decay)
                }
                _ => entry.load() as u64,
            }
        };
        let first = match n {
            0 => return None,
            1 => 0,
            _ => {
                let weights = self.weighted.load(Ordering::Acquire).then(|| self.weights.load());
                if let Some(weights) = weights.filter(|w| w.apply_to(Arc::as_ptr(&endpoints) as usize, n)) {
                    // Weighted: both drawn in proportion to their weights, and the one with
                    // less load per unit of weight taken; on a tie (an idle pool), the first
                    // drawn, so that light traffic splits by weight too.
                    let a = weights.draw();
                    // The second, drawn by weight too; should `a` weigh so much that four
                    // draws give it again, any other at random (not `a`'s neighbour, which
                    // would take every call when `a` cannot).
                    let b = (0..4).map(|_| weights.draw()).find(|b| *b != a).unwrap_or_else(|| {
                        let b = fastrand::usize(..n - 1);
                        if b >= a {
                            b + 1
                        } else {
                            b
                        }
                    });
                    let (wa, wb) = (u128::from(weights.weight(a)), u128::from(weights.weight(b)));
                    if u128::from(load(b)) * wa < u128::from(load(a)) * wb {
                        b
                    } else {
                        a
                    }
                } else {
                    let a = fastrand::usize(..n);
                    let mut b = fastrand::usize(..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    if load(b) < load(a) {
                        b
                    } else {
                        a
                    }
                }
            }
        };
        if usable(first) {
            if let Some(slot) = endpoints[first].try_acquire() {
                return Some(slot);
            }
        }
        // The chosen one is full: the others, from a random place so no endpoint is always
        // the first fallback.
        let offset = fastrand::usize(..n);
        (0..n)
            .map(|i| (offset + i) % n)
            .filter(|i| *i != first && usable(*i))
            .find_map(|i| endpoints[i].try_acquire())
    }

    /// Whether a call may start under the pool's cap on calls in flight (circuit breaking);
    /// if not, the error it fails with at once, counted as a checkout with result
    /// `over_limit`.
    pub(crate) fn admit(&self) -> Result<(), Error> {
        if self.requests.admits() {
            return Ok(());
        }
        Err(self.over_limit())
    }

    /// The error of a call refused by the cap on calls in flight, counted as a checkout with
    /// result `over_limit`.
    pub(crate) fn over_limit(&self) -> Error {
        let limit = self.requests.limit().unwrap_or(0);
        metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "over_limit").increment(1);
        Error::over_limit(self.name(), limit)
    }

    /// Whether the pool has endpoints and every one is marked unhealthy.
    pub(crate) fn all_unhealthy(&self) -> bool {
        let n = self.endpoints.load().len();
        n > 0 && self.unhealthy.load(Ordering::Acquire) >= n
    }

    /// Every endpoint and why it is unhealthy, for the fail-fast error.
    pub(crate) fn unhealthy_summary(&self) -> Vec<(String, String)> {
        self.endpoints
            .load()
            .iter()
            .map(|e| {
                (
                    e.label().to_owned(),
                    e.lock().health_reason.clone().unwrap_or_else(|| "unhealthy".to_owned()),
                )
            })
            .collect()
    }

    /// The fast path: a slot now, if one is free and nobody is queued before us.
    pub(crate) fn checkout_now(&self) -> Option<Slot> {
        if self.waiters.has_waiters() || self.is_closed() {
            return None;
        }
        let slot = self.try_checkout()?;
        self.stats.checkouts_direct.fetch_add(1, Ordering::Relaxed);
        self.hot.checkouts_direct.increment(1);
        Some(slot)
    }

    /// A free slot on any routable endpoint but `avoid`, for a call sent again after `avoid`
    /// refused or lost it. Ignores the queue: the call was already admitted once.
    pub(crate) fn checkout_elsewhere(&self, avoid: &Arc<EndpointShared>) -> Option<Slot> {
        if self.is_closed() {
            return None;
        }
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let offset = fastrand::usize(..n);
        (0..n)
            .map(|i| &endpoints[(offset + i) % n])
            .filter(|e| e.is_routable() && !Arc::ptr_eq(&e.shared, avoid))
            .find_map(|e| e.try_acquire())
    }

    /// The slow path: queue, make room if the pool may grow, and wait up to
    /// `checkout_timeout`.
    pub(crate) async fn checkout_wait(self: Arc<Self>, wait: CheckoutWait) -> Result<Slot, Error> {
        // A span for the checkouts that wait (the fast path has nothing to trace and must
        // stay cheap): what a waiting call waited for shows up under it.
        let span = tracing::debug_span!("checkout", pool = %self.name(), waiters = self.waiters.len());
        tracing::Instrument::instrument(self.checkout_wait_in_span(wait), span).await
    }

    pub(crate) async fn checkout_wait_in_span(self: Arc<Self>, wait: CheckoutWait) -> Result<Slot, Error> {
        let started = Instant::now();
        let mut waiting = self.waiters.enqueue(wait.wait_for_ready);
        // A slot freed, or a close, between our fast path and joining the queue was not
        // handed to us: look again. A slot found goes to the oldest waiter, which is us only
        // if nobody queued before us.
        if self.is_closed() {
            metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "closed").increment(1);
            return Err(Error::pool_closed(self.name()));
        }
        let found = self.try_checkout().map(|slot| self.waiters.hand_on::<Arc<Member>>(slot)).is_some();
        let result = match waiting.slot.try_recv() {
            Ok(result) => result,
            Err(_)
                if !found
                    && !wait.wait_for_ready
                    && self.all_in_transient_failure()
                    && !self.pull_attempts() =>
            {
                // Nothing can serve the call now, and it asked not to wait (gRPC's default);
                // no endpoint's next attempt could be pulled forward for it to wait for.
                drop(waiting);
                let (error, result) = self.hopeless_error();
                metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => result).increment(1);
                return Err(error);
            }
            Err(_) => {
                self.grow();
                // A wait-for-ready call with a deadline waits as long as its deadline lets it
                // (the call's future enforces that); any other waits `checkout_timeout` at most.
                let bound = match wait.wait_for_ready && wait.has_deadline {
                    true => Duration::MAX,
                    false => self.config.checkout_timeout,
                };
                let timed = async {
                    match bound {
                        Duration::MAX => Ok((&mut waiting.slot).await),
                        bound => tokio::time::timeout(bound, &mut waiting.slot).await,
                    }
                };
                match timed.await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(Error::pool_closed(self.name())),
                    Err(_) => match waiting.slot.try_recv() {
                        Ok(result) => result,
                        Err(_) => {
                            drop(waiting);
                            self.stats.checkout_timeouts.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "timeout").increment(1);
                            let outage = self.all_in_transient_failure();
                            return Err(Error::checkout_timeout(
                                self.name(),
                                started.elapsed(),
                                &if outage { self.outage_summary() } else { self.busy_summary() },
                                outage,
                            ));
                        }
                    },
                }
            }
        };
        drop(waiting);
        match &result {
            Ok(_) => {
                let waited = started.elapsed();
                self.stats.checkouts_waited.fetch_add(1, Ordering::Relaxed);
                self.stats.checkout_wait_nanos.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "waited").increment(1);
                metrics::histogram!(names::CHECKOUT_WAIT, names::LABEL_POOL => self.config.name.clone())
                    .record(waited.as_secs_f64());
            }
            Err(_) => {
                metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "closed").increment(1);
            }
        }
        result
    }

    /// What every endpoint looked like when a checkout gave up.
    pub(crate) fn busy_summary(&self) -> String {
        let budget = match self.config.max_total_connections {
            Some(max) if self.budget.is_exhausted() => {
                format!("max_total_connections ({max}) reached, so the pool opens no more; ")
            }
            _ => String::new(),
        };
        budget + &self.busy_endpoints()
    }

    /// `busy_summary`'s endpoints.
    fn busy_endpoints(&self) -> String {
        let endpoints = self.endpoints.load();
        if endpoints.is_empty() {
            return format!("{} waiter(s) queued; the pool has no endpoints", self.waiters.len());
        }
        let parts: Vec<String> = endpoints
            .iter()
            .map(|entry| {
                let members = entry.members();
                let ready = members.iter().filter(|m| m.state() == MemberState::Ready).count();
                let streams: u32 = members.iter().map(|m| m.in_flight()).sum();
                let capacity: u32 = members
                    .iter()
                    .filter(|m| m.state() == MemberState::Ready)
                    .map(|m| m.max_streams())
                    .sum();
                let locked = entry.lock();
                let mut text = format!(
                    "{}: {ready} ready member(s) of max_connections {}, {streams}/{capacity} streams busy, {} connecting",
                    entry.label(),
                    self.config.max_connections,
                    locked.connecting,
                );
                if let Some(error) = &locked.last_error {
                    text.push_str(&format!(", last connect error: {error}"));
                }
                text
            })
            .collect();
        format!("{} waiter(s) queued; {}", self.waiters.len(), parts.join("; "))
    }

    /// Starts a connect where it adds capacity for queued waiters, unless the connects under
    /// way already cover the queue. Endpoints whose connects are failing are tried only when
    /// no healthy endpoint has room, and their connects in backoff count for nothing.
    pub(crate) fn grow(self: &Arc<Self>) {
        let waiting = self.waiters.len();
        if waiting == 0 || self.is_closed() {
            return;
        }
        let mut incoming = 0;
        // (entry, failing, members + connecting): the best candidate so far.
        let mut best: Option<(&Arc<EndpointEntry>, bool, usize)> = None;
        let endpoints = self.endpoints.load();
        for entry in endpoints.iter() {
            if !entry.is_routable() {
                continue;
            }
            let members = entry.members();
            let locked = entry.lock();
            let failing = locked.consecutive_failures > 0;
            if !failing {
                let per_member = members
                    .iter()
                    .map(|m| m.max_streams())
                    .max()
                    .unwrap_or(self.config.max_concurrent_streams) as usize;
                incoming += locked.connecting * per_member;
            }
            let total = members.len() + locked.connecting;
            if total >= self.config.max_connections {
                continue;
            }
            let better = match best {
                None => true,
                Some((_, best_failing, best_total)) => (failing, total) < (best_failing, best_total),
            };
            if better {
                best = Some((entry, failing, total));
            }
        }
        if incoming >= waiting {
            return;
        }
        if let Some((entry, _, _)) = best {
            self.spawn_connect(entry.clone());
        }
    }

    /// Whether no endpoint can take a call now: the pool has endpoints and every one is in
    /// transient failure (see `EndpointEntry::in_transient_failure`).
    pub(crate) fn all_in_transient_failure(&self) -> bool {
        let endpoints = self.endpoints.load();
        !endpoints.is_empty() && endpoints.iter().all(|e| e.in_transient_failure())
    }

    /// Why no endpoint can take a call, for the fail-fast error: each endpoint and its state.
    pub(crate) fn outage_summary(&self) -> String {
        let parts: Vec<String> = self
            .endpoints
            .load()
            .iter()
            .map(|entry| {
                let locked = entry.lock();
                let why = if entry.is_removed() {
                    "removed".to_owned()
                } else if entry.is_ejected() {
                    "ejected by outlier detection".to_owned()
                } else if !entry.is_healthy() {
                    locked.health_reason.clone().unwrap_or_else(|| "unhealthy".to_owned())
                } else {
                    let retry = locked
                        .next_attempt
                        .map(|at| {
                            format!(", next attempt in {:?}", at.saturating_duration_since(Instant::now()))
                        })
                        .unwrap_or_default();
                    format!(
                        "unreachable ({} failed connect round(s){retry}), last connect error: {}",
                        locked.consecutive_failures,
                        locked.last_error.as_deref().unwrap_or("none yet")
                    )
                };
                format!("{}: {why}", entry.label())
            })
            .collect();
        parts.join("; ")
    }

    /// Why no endpoint can take a call, for a call that fails fast, with its `result` label:
    /// every endpoint unhealthy (`unhealthy`), or unreachable, ejected or removed
    /// (`unavailable`).
    fn hopeless_error(&self) -> (Error, &'static str) {
        if self.all_unhealthy() {
            (Error::all_unhealthy(self.name(), &self.unhealthy_summary()), "unhealthy")
        } else {
            (Error::outage(self.name(), &self.outage_summary()), "unavailable")
        }
    }

    /// The calls queued that fail fast give up as soon as nothing can serve them: every
    /// endpoint in transient failure. `wait_for_ready` calls keep waiting.
    pub(crate) fn release_hopeless_waiters(&self) {
        if !self.waiters.has_waiters() || !self.all_in_transient_failure() {
            return;
        }
        let (error, _) = self.hopeless_error();
        let failed = self.waiters.fail_fast_ones(|| error.clone());
        if failed > 0 {
            tracing::debug!(pool = %self.name(), failed, "queued calls failed fast: no endpoint can take them");
        }
    }
}
