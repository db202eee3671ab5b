//! The pool's logic: choosing a slot, waiting for one, opening and replacing members, and
//! reacting to what connections report (GOAWAY, close).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use tokio::sync::{mpsc, Notify};

use crate::api::RetryReason;
use crate::backoff;
use crate::config::{AllUnhealthy, Config};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::internals::{EndpointEntry, EndpointInternals, EndpointShared, WaitQueue};
use crate::member::{EvictionReason, Member, MemberState, Slot};
use crate::metrics as names;
use crate::monitor::{MemberHandle, PoolEvent};
use crate::outlier::Outliers;
use crate::proto::h2::client::{self, Connection};
use crate::proto::h2::frames::ConnSignals;

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
    pub(crate) closed_by_reason: [AtomicU64; EvictionReason::ALL.len()],
}

/// Pre-registered handles for the metrics touched on every call.
struct HotMetrics {
    checkouts_direct: metrics::Counter,
}

/// Tells background tasks that the pool is gone.
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    flag: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    pub(crate) fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(crate) async fn triggered(&self) {
        crate::notify::until(&self.notify, || self.is_triggered()).await
    }
}

/// Counts live connection driver tasks, so that `close()` can wait for the last one.
#[derive(Debug, Default)]
pub(crate) struct LiveConnections {
    count: AtomicUsize,
    zero: Notify,
}

impl LiveConnections {
    fn enter(self: &Arc<Self>) -> LiveGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self.clone())
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub(crate) async fn all_closed(&self) {
        crate::notify::until(&self.zero, || self.count() == 0).await
    }
}

struct LiveGuard(Arc<LiveConnections>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// Counts a connect task out of its endpoint's `connecting` when the task ends, and gives up
/// the retrier's role if it had it.
struct ConnectingGuard {
    entry: Arc<EndpointEntry>,
    retrier: bool,
}

impl Drop for ConnectingGuard {
    fn drop(&mut self) {
        let mut locked = self.entry.lock();
        locked.connecting = locked.connecting.saturating_sub(1);
        if self.retrier {
            locked.retrier = false;
        }
    }
}

/// How long a connect task waiting out its backoff sleeps between looks at whether it is
/// still wanted, so that a retry nobody needs any more is dropped rather than made.
const BACKOFF_RECHECK: Duration = Duration::from_millis(250);

/// Aborts a spawned task when dropped, unless disarmed.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// The stream id of a member's last stream before it retires: client stream ids are odd, so
/// stream number `n` has id `2n - 1`.
fn retire_at_stream_id(max_streams: Option<u64>) -> u32 {
    let max =
        max_streams.unwrap_or(crate::config::MAX_LIFETIME_STREAMS).min(crate::config::MAX_LIFETIME_STREAMS);
    (2 * max - 1) as u32
}

/// What a waiting checkout needs to know of its call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckoutWait {
    /// Wait for an endpoint to come back rather than fail fast (gRPC's `wait_for_ready`).
    pub(crate) wait_for_ready: bool,
    /// The call has a deadline, which bounds the wait in its stead for `wait_for_ready`.
    pub(crate) has_deadline: bool,
}

/// A member that closes sooner than this after connecting counts as a failed connect.
const SHORT_LIFE: Duration = Duration::from_secs(1);

pub(crate) struct PoolInner {
    pub(crate) config: Config,
    /// The endpoints now, replaced whole when one is added or removed; checkouts read it
    /// without a lock.
    endpoints: ArcSwap<Vec<Arc<EndpointEntry>>>,
    /// Held while the endpoint list or the endpoints' routing changes.
    membership: Mutex<()>,
    /// Outlier detection, when configured; every endpoint shares it.
    pub(crate) outliers: Option<Arc<Outliers>>,
    /// The TLS client for `https://` endpoints: loaded at build when the configuration has
    /// one or an endpoint needs it, else on the first `https://` connect (system roots).
    pub(crate) tls: std::sync::OnceLock<Arc<crate::proto::tls::Tls>>,
    pub(crate) waiters: Arc<WaitQueue>,
    pub(crate) stats: Stats,
    pub(crate) shutdown: Arc<Shutdown>,
    pub(crate) live: Arc<LiveConnections>,
    closed: AtomicBool,
    /// Endpoints marked unhealthy now.
    unhealthy: AtomicUsize,
    next_member_id: AtomicU64,
    hot: HotMetrics,
    /// Subscribers to membership events (the health task).
    subscribers: Mutex<Vec<mpsc::UnboundedSender<PoolEvent>>>,
}

impl PoolInner {
    pub(crate) fn new(config: Config, endpoints: Vec<Endpoint>) -> PoolInner {
        let hot = HotMetrics {
            checkouts_direct: metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => config.name.clone(), names::LABEL_RESULT => "direct"),
        };
        let outliers = config.outlier_detection.clone().map(Outliers::new);
        PoolInner {
            endpoints: ArcSwap::from_pointee(
                endpoints
                    .into_iter()
                    .map(|e| EndpointEntry::new(e, config.max_concurrent_connects, outliers.clone()))
                    .collect(),
            ),
            membership: Mutex::new(()),
            outliers,
            tls: std::sync::OnceLock::new(),
            config,
            waiters: Arc::new(WaitQueue::default()),
            stats: Stats::default(),
            shutdown: Arc::new(Shutdown::default()),
            live: Arc::new(LiveConnections::default()),
            closed: AtomicBool::new(false),
            unhealthy: AtomicUsize::new(0),
            next_member_id: AtomicU64::new(1),
            hot,
            subscribers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The endpoints now.
    pub(crate) fn endpoints(&self) -> arc_swap::Guard<Arc<Vec<Arc<EndpointEntry>>>> {
        self.endpoints.load()
    }

    /// The entry of `endpoint`, if the pool has it now.
    pub(crate) fn entry(&self, endpoint: &Endpoint) -> Option<Arc<EndpointEntry>> {
        self.endpoints.load().iter().find(|e| e.endpoint() == endpoint).cloned()
    }

    fn lock_membership(&self) -> std::sync::MutexGuard<'_, ()> {
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----- events -----

    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<PoolEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    fn emit(&self, event: impl Fn() -> PoolEvent) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|tx| tx.send(event()).is_ok());
    }

    // ----- checkout -----

    /// A free slot, without waiting: power of two choices between endpoints by streams in
    /// flight, then the least loaded member of the chosen one; the other endpoints if it is
    /// full. Lock-free.
    pub(crate) fn try_checkout(&self) -> Option<Slot> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        let usable = |i: usize| endpoints[i].is_routable();
        let load = |i: usize| if usable(i) { endpoints[i].load() } else { usize::MAX };
        let first = match n {
            0 => return None,
            1 => 0,
            _ => {
                let a = crate::rand::below(n);
                let mut b = crate::rand::below(n - 1);
                if b >= a {
                    b += 1;
                }
                if load(b) < load(a) {
                    b
                } else {
                    a
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
        let offset = crate::rand::below(n);
        (0..n)
            .map(|i| (offset + i) % n)
            .filter(|i| *i != first && usable(*i))
            .find_map(|i| endpoints[i].try_acquire())
    }

    /// Whether the pool has endpoints and every one is marked unhealthy.
    fn all_unhealthy(&self) -> bool {
        let n = self.endpoints.load().len();
        n > 0 && self.unhealthy.load(Ordering::Acquire) >= n
    }

    /// Sets which endpoints take new streams: the healthy ones that are not ejected, or, when
    /// all are unhealthy and the pool routes to all then, every one not ejected. Call with the
    /// membership lock held.
    fn update_routing(&self, _membership: &std::sync::MutexGuard<'_, ()>) {
        let route_all = self.config.all_unhealthy == AllUnhealthy::RouteToAll && self.all_unhealthy();
        for e in self.endpoints.load().iter() {
            let routable = !e.is_removed() && !e.is_ejected() && (e.is_healthy() || route_all);
            e.shared.routable.store(routable, Ordering::Release);
        }
    }

    /// Outlier detection: `failures` calls in a row failed on `entry`. Ejects it unless it
    /// is ejected already or the cap on ejected endpoints is reached.
    pub(crate) fn eject(self: &Arc<Self>, entry: &Arc<EndpointEntry>, failures: u32) {
        let Some(outliers) = self.outliers.clone() else { return };
        let duration = {
            let membership = self.lock_membership();
            if entry.is_removed() || entry.is_ejected() {
                return;
            }
            let endpoints = self.endpoints.load();
            let ejected = endpoints.iter().filter(|e| e.is_ejected()).count();
            if ejected >= outliers.max_ejected(endpoints.len()) {
                tracing::debug!(pool = %self.name(), endpoint = %entry.label(), failures, ejected, "not ejected: max_ejection_percent reached");
                return;
            }
            let mut locked = entry.lock();
            // Time back in service earns the multiplier down again.
            if let Some(back) = locked.back_since {
                let base = outliers.config.base_ejection_time.as_nanos().max(1);
                let earned = (back.elapsed().as_nanos() / base).min(u128::from(u32::MAX)) as u32;
                locked.ejections = locked.ejections.saturating_sub(earned);
            }
            locked.ejections = locked.ejections.saturating_add(1);
            let duration = outliers.ejection_time(locked.ejections);
            locked.ejected_until = Some(Instant::now() + duration);
            drop(locked);
            entry.set_ejected(true);
            entry.shared.failures_in_a_row.store(0, Ordering::Relaxed);
            self.update_routing(&membership);
            duration
        };
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::EJECTIONS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).increment(1);
        metrics::gauge!(names::ENDPOINT_EJECTED, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).set(1.0);
        tracing::warn!(pool = %self.name(), endpoint = %entry.label(), failures, ejected_for = ?duration, "endpoint ejected: its calls failed {failures} times in a row; no new streams go there until the ejection ends");
        self.release_hopeless_waiters();
        let (pool, entry) = (Arc::downgrade(self), Arc::downgrade(entry));
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = shutdown.triggered() => return,
            }
            if let (Some(pool), Some(entry)) = (pool.upgrade(), entry.upgrade()) {
                pool.end_ejection(&entry);
            }
        });
    }

    /// An ejection's time is up: the endpoint takes new streams again, once its health
    /// checks (if any) pass.
    fn end_ejection(self: &Arc<Self>, entry: &Arc<EndpointEntry>) {
        {
            let membership = self.lock_membership();
            let mut locked = entry.lock();
            locked.ejected_until = None;
            locked.back_since = Some(Instant::now());
            drop(locked);
            entry.set_ejected(false);
            entry.shared.failures_in_a_row.store(0, Ordering::Relaxed);
            self.update_routing(&membership);
        }
        metrics::gauge!(names::ENDPOINT_EJECTED, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).set(0.0);
        if entry.is_healthy() {
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "ejection over; the endpoint takes new streams again");
        } else {
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "ejection over; the endpoint takes new streams once its health checks pass");
        }
        self.serve_waiters_everywhere();
    }

    /// Members that became routable take queued callers now.
    fn serve_waiters_everywhere(self: &Arc<Self>) {
        for e in self.endpoints.load().iter().filter(|e| e.is_routable()) {
            for member in e.members().iter() {
                self.serve_waiters(member);
            }
        }
    }

    /// The health task's verdict on an endpoint.
    pub(crate) fn set_endpoint_health(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        healthy: bool,
        reason: Option<String>,
    ) {
        {
            let membership = self.lock_membership();
            if entry.is_removed() || !entry.set_healthy(healthy, reason.clone()) {
                return;
            }
            if healthy {
                self.unhealthy.fetch_sub(1, Ordering::AcqRel);
            } else {
                self.unhealthy.fetch_add(1, Ordering::AcqRel);
            }
            self.update_routing(&membership);
        }
        self.serve_waiters_everywhere();
        self.release_hopeless_waiters();
        if healthy {
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "endpoint healthy again; it takes new streams");
        } else {
            tracing::warn!(pool = %self.name(), endpoint = %entry.label(), reason = reason.as_deref().unwrap_or(""), "endpoint unhealthy; no new streams go there");
        }
        metrics::gauge!(names::ENDPOINT_HEALTHY, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).set(if healthy { 1.0 } else { 0.0 });
    }

    /// Every endpoint and why it is unhealthy, for the fail-fast error.
    fn unhealthy_summary(&self) -> Vec<(String, String)> {
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
        let offset = crate::rand::below(n);
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

    async fn checkout_wait_in_span(self: Arc<Self>, wait: CheckoutWait) -> Result<Slot, Error> {
        if self.config.all_unhealthy == AllUnhealthy::FailFast && self.all_unhealthy() {
            metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "unhealthy").increment(1);
            return Err(Error::all_unhealthy(self.name(), &self.unhealthy_summary()));
        }
        let started = Instant::now();
        let mut waiting = self.waiters.enqueue(wait.wait_for_ready);
        // A slot freed, or a close, between our fast path and joining the queue was not
        // handed to us: look again.
        if self.is_closed() {
            metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "closed").increment(1);
            return Err(Error::pool_closed(self.name()));
        }
        let result = match self.try_checkout() {
            Some(slot) => Ok(slot),
            None if !wait.wait_for_ready && self.all_in_transient_failure() => {
                // Nothing can serve the call now, and it asked not to wait (gRPC's default).
                drop(waiting);
                metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => "unavailable").increment(1);
                return Err(Error::outage(self.name(), &self.outage_summary()));
            }
            None => {
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

    // ----- members -----

    /// Whether new streams may go to `member`'s endpoint now.
    pub(crate) fn member_usable(&self, member: &Member) -> bool {
        member.endpoint.routable.load(Ordering::Acquire)
    }

    /// Keeps `min_connections` per endpoint, counting connects under way.
    pub(crate) fn replenish(self: &Arc<Self>, entry: &Arc<EndpointEntry>) {
        if self.is_closed() || self.shutdown.is_triggered() || entry.is_removed() {
            return;
        }
        let missing = {
            let locked = entry.lock();
            self.config.min_connections.saturating_sub(entry.members().len() + locked.connecting)
        };
        for _ in 0..missing {
            self.spawn_connect(entry.clone());
        }
    }

    /// Starts a task that opens one member of `entry`, retrying with backoff while the pool
    /// still wants it. An endpoint whose connects are failing gets no second task: the one
    /// under way retries for everybody, one attempt at a time.
    pub(crate) fn spawn_connect(self: &Arc<Self>, entry: Arc<EndpointEntry>) {
        {
            let mut locked = entry.lock();
            if entry.members().len() + locked.connecting >= self.config.max_connections {
                return;
            }
            if locked.consecutive_failures > 0 && locked.connecting > 0 {
                return;
            }
            locked.connecting += 1;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            // Counted out however the task ends: done, cancelled by shutdown, or panicked.
            let mut guard = ConnectingGuard { entry: entry.clone(), retrier: false };
            let shutdown = pool.shutdown.clone();
            let listed = tokio::select! {
                listed = pool.connect_loop(&entry, &mut guard) => listed,
                _ = shutdown.triggered() => false,
            };
            let retried = guard.retrier;
            drop(guard);
            if listed && retried {
                // While the endpoint failed, this was its only connect: open the rest of
                // `min_connections` now. (Queued callers grow the pool themselves, as the new
                // member serves them.)
                pool.replenish(&entry);
            }
        });
    }

    /// Whether a connect task of `entry` is still wanted: the endpoint is below
    /// `min_connections` without it, or callers are waiting.
    fn connect_wanted(&self, entry: &EndpointEntry, locked: &EndpointInternals) -> bool {
        let others = (entry.members().len() + locked.connecting).saturating_sub(1);
        others < self.config.min_connections || self.waiters.has_waiters()
    }

    /// Opens one member of `entry`, waiting out the endpoint's backoff before each attempt;
    /// returns whether it listed one. While the endpoint is failing, only the task holding
    /// the retrier's role goes on; the others end.
    async fn connect_loop(self: &Arc<Self>, entry: &Arc<EndpointEntry>, guard: &mut ConnectingGuard) -> bool {
        loop {
            if entry.is_removed() {
                return false;
            }
            let (round, wait) = {
                let mut locked = entry.lock();
                if locked.consecutive_failures > 0 && !guard.retrier {
                    if locked.retrier {
                        return false;
                    }
                    locked.retrier = true;
                    guard.retrier = true;
                }
                let wait = locked.next_attempt.map(|at| at.saturating_duration_since(Instant::now()));
                (locked.failure_round, wait.unwrap_or_default())
            };
            if !wait.is_zero() && !self.wait_backoff(entry, wait).await {
                return false;
            }
            let listed = match self.open_member(entry, round).await {
                Ok(member) => {
                    let listed = self.add_member(entry, member.clone());
                    if !listed {
                        // It ended before it could serve: as good as a failed connect.
                        self.note_failure(entry, round, "the connection ended as soon as it opened");
                    }
                    listed
                }
                Err(_) => false,
            };
            if listed || self.is_closed() {
                return listed;
            }
            if !self.connect_wanted(entry, &entry.lock()) {
                return false;
            }
        }
    }

    /// Sleeps out a backoff `wait` (plus a little spread), looking every
    /// [`BACKOFF_RECHECK`] whether the attempt is still wanted; false if it is not.
    async fn wait_backoff(&self, entry: &EndpointEntry, wait: Duration) -> bool {
        // A little spread of its own, so that pools started together do not reconnect in
        // lockstep.
        let spread = wait.mul_f64(0.1 * (crate::rand::symmetric_unit() + 1.0) / 2.0);
        let until = tokio::time::Instant::now() + wait + spread;
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                return true;
            }
            tokio::time::sleep_until(until.min(now + BACKOFF_RECHECK)).await;
            if entry.is_removed() || !self.connect_wanted(entry, &entry.lock()) {
                return false;
            }
        }
    }

    /// Opens one connection and waits for the server's SETTINGS; records the outcome in the
    /// endpoint's backoff state, metrics and logs.
    /// `round` is the endpoint's `failure_round` when the attempt was decided: a failure is
    /// counted in the backoff only if no other attempt's failure was counted since.
    pub(crate) async fn open_member(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        round: u64,
    ) -> Result<Arc<Member>, Error> {
        // Paced per endpoint; the wait for a turn is not part of the connect's time.
        let _permit = entry.connect_permits.acquire().await;
        let started = Instant::now();
        let span = tracing::debug_span!("connect", pool = %self.name(), endpoint = %entry.label());
        let attempt = async {
            let tls = match entry.endpoint().is_tls() {
                true => Some(self.tls_client()?),
                false => None,
            };
            let hs = client::handshake(
                &entry.shared.endpoint,
                &self.config.h2,
                self.config.tcp_user_timeout,
                tls.as_deref(),
            )
            .await?;
            let id = self.next_member_id.fetch_add(1, Ordering::Relaxed);
            let member = Arc::new(Member::new(
                id,
                entry.shared.clone(),
                hs.send,
                hs.signals.clone(),
                hs.pinger,
                self.waiters.clone(),
                self.config.max_concurrent_streams,
                retire_at_stream_id(self.config.max_streams_per_connection),
            ));
            let driver = tokio::spawn(drive(
                hs.connection,
                hs.signals.clone(),
                Arc::downgrade(&member),
                Arc::downgrade(self),
                self.live.clone(),
                entry.shared.clone(),
            ));
            member.set_driver(driver.abort_handle());
            let abort = AbortOnDrop(Some(driver.abort_handle()));
            if !hs.signals.settings_or_closed().await {
                let what = match hs.signals.close_error() {
                    Some(error) => format!("the connection failed before the server's HTTP/2 SETTINGS: {error}"),
                    None => "the server closed the connection before sending HTTP/2 SETTINGS (is it an HTTP/2 server?)"
                        .to_owned(),
                };
                return Err(Error::connect(entry.label(), &what, None));
            }
            abort.disarm();
            Ok(member)
        };
        let result = match tokio::time::timeout(
            self.config.connect_timeout,
            tracing::Instrument::instrument(attempt, span),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Error::connect(
                entry.label(),
                &format!("no HTTP/2 SETTINGS within connect_timeout ({:?})", self.config.connect_timeout),
                None,
            )),
        };
        let elapsed = started.elapsed();
        let pool_label = self.config.name.clone();
        let endpoint_label = entry.label().to_owned();
        match &result {
            Ok(member) => {
                // The backoff is reset only once the member is listed (`add_member`): a
                // server that sends GOAWAY with its SETTINGS must not reset it every time.
                self.stats.connections_created.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CONNECTS, names::LABEL_POOL => pool_label.clone(), names::LABEL_ENDPOINT => endpoint_label.clone(), names::LABEL_RESULT => "ok").increment(1);
                metrics::histogram!(names::CONNECT_DURATION, names::LABEL_POOL => pool_label, names::LABEL_ENDPOINT => endpoint_label).record(elapsed.as_secs_f64());
                tracing::debug!(pool = %self.name(), endpoint = %entry.label(), member = member.id, elapsed = ?elapsed, "connection established");
            }
            Err(error) => {
                let (failures, delay) = self.count_failure(entry, round, &error.to_string());
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CONNECTS, names::LABEL_POOL => pool_label, names::LABEL_ENDPOINT => endpoint_label, names::LABEL_RESULT => "error").increment(1);
                tracing::warn!(pool = %self.name(), endpoint = %entry.label(), failures, retry_in = ?delay, error = %error, "connect failed");
                self.release_hopeless_waiters();
            }
        }
        result
    }

    /// Puts a freshly connected member in service and gives its slots to waiters. Returns
    /// false if it could not be listed (the pool closed, or the connection already ended or
    /// got a GOAWAY).
    pub(crate) fn add_member(self: &Arc<Self>, entry: &Arc<EndpointEntry>, member: Arc<Member>) -> bool {
        {
            // Under the endpoint's lock, so that a close or the connection's end cannot slip
            // in between the checks and the listing.
            let mut locked = entry.lock();
            let gone = self.is_closed()
                || entry.is_removed()
                || member.signals.is_closed()
                || member.signals.goaway_seen();
            if gone || !member.set_ready() {
                member.set_closed();
                return false; // dropping it closes the connection
            }
            entry.insert(&mut locked, member.clone());
            locked.consecutive_failures = 0;
            locked.next_attempt = None;
            locked.last_error = None;
        }
        if member.max_streams() == 0 {
            tracing::warn!(pool = %self.name(), endpoint = %entry.label(), member = member.id, "server allows 0 concurrent streams on this connection; it carries no calls until it raises the limit");
        }
        tracing::info!(pool = %self.name(), endpoint = %entry.label(), member = member.id, state = "ready", max_streams = member.max_streams(), "member ready");
        self.emit(|| PoolEvent::MemberReady(MemberHandle::new(self, &member)));
        self.serve_waiters(&member);
        true
    }

    /// Gives free slots of `member` to queued waiters; if some remain, grows the pool.
    pub(crate) fn serve_waiters(self: &Arc<Self>, member: &Arc<Member>) {
        if self.waiters.has_waiters() && self.member_usable(member) {
            self.waiters.serve(member);
            self.grow();
        }
    }

    /// Takes a member out of service with `reason`: no new streams; the ones in flight
    /// finish, and the connection closes once the last slot is returned. Returns whether
    /// this call made the change.
    pub(crate) fn evict(
        self: &Arc<Self>,
        member: &Arc<Member>,
        reason: EvictionReason,
        detail: &str,
    ) -> bool {
        if !member.set_draining() {
            return false;
        }
        let entry = self.unlist(member);
        self.count_eviction(member, reason, MemberState::Draining, detail);
        if let Some(entry) = entry {
            self.replace(&entry);
        }
        true
    }

    /// Takes a member out of service and closes its connection now: streams in flight on it
    /// fail at once (`UNAVAILABLE`) instead of hanging on a dead peer.
    pub(crate) fn kill(self: &Arc<Self>, member: &Arc<Member>, reason: EvictionReason, detail: &str) -> bool {
        let before = member.set_closed();
        if before == MemberState::Closed {
            return false;
        }
        member.signals.mark_closed();
        member.abort_connection();
        let entry = self.unlist(member);
        if before != MemberState::Draining {
            self.count_eviction(member, reason, MemberState::Closed, detail);
        }
        if let Some(entry) = entry {
            self.replace(&entry);
        }
        true
    }

    /// The connection of `member` ended (its driver task is finishing).
    fn on_connection_closed(self: &Arc<Self>, member: &Arc<Member>, result: Result<(), h2::Error>) {
        let before = member.set_closed();
        let entry = self.unlist(member);
        match before {
            MemberState::Ready => {
                let (reason, detail) = match &result {
                    Err(e) if e.is_io() => (EvictionReason::IoError, e.to_string()),
                    Err(e) if e.is_go_away() && e.is_remote() => (EvictionReason::GoAway, e.to_string()),
                    Err(e) => (EvictionReason::IoError, e.to_string()),
                    Ok(()) => (EvictionReason::ClosedByPeer, "connection closed".to_owned()),
                };
                self.count_eviction(member, reason, MemberState::Closed, &detail);
            }
            MemberState::Draining => {
                tracing::debug!(pool = %self.name(), endpoint = %member.endpoint.label, member = member.id, state = "closed", "drained member closed");
            }
            MemberState::Connecting | MemberState::Closed => {}
        }
        if let Some(entry) = entry {
            if before == MemberState::Ready {
                self.note_short_life(&entry, member);
            }
            self.replace(&entry);
        }
    }

    /// Takes `member` off its endpoint's list; returns the endpoint.
    fn unlist(&self, member: &Member) -> Option<Arc<EndpointEntry>> {
        let entry = self.entry_of(member)?;
        let mut locked = entry.lock();
        entry.remove(&mut locked, member.id);
        drop(locked);
        Some(entry)
    }

    /// After a member left: keep `min_connections`, and grow if callers are waiting.
    fn replace(self: &Arc<Self>, entry: &Arc<EndpointEntry>) {
        self.replenish(entry);
        if self.waiters.has_waiters() {
            self.grow();
        }
    }

    /// A member that dies young without having carried a call (a server that accepts and
    /// then closes or sends an error GOAWAY at once) counts as a failed connect, so its
    /// replacements back off instead of looping. One that carried calls had a working
    /// server: a short `max_connection_age` is not a failure, and backing off from it would
    /// leave callers with no connection at all when members age out together. Nor is one
    /// the server closed with a GOAWAY after it was in service, however young: the server
    /// worked and said goodbye (an idle or age limit; the gRPC C core's idle limit says so
    /// with `INTERNAL_ERROR` "connection idle", so the code is no guide), and the next call
    /// must not wait out a backoff for it. (A GOAWAY that comes with the server's SETTINGS,
    /// before the member was listed, is a failed connect all the same: `connect_loop`.)
    fn note_short_life(&self, entry: &EndpointEntry, member: &Member) {
        if member.age() < SHORT_LIFE && member.streams_opened() == 0 && !member.signals.goaway_seen() {
            let round = entry.lock().failure_round;
            self.note_failure(entry, round, &format!("connection closed {:?} after it opened", member.age()));
        }
    }

    /// Counts a failure in the endpoint's reconnect backoff.
    fn note_failure(&self, entry: &EndpointEntry, round: u64, what: &str) {
        self.count_failure(entry, round, what);
        self.release_hopeless_waiters();
    }

    /// Records a failed attempt decided at `round`: the backoff grows by one round only if no
    /// other attempt's failure was counted since (attempts under way together fail as one).
    /// Returns the failures in a row and the delay before the next attempt.
    fn count_failure(&self, entry: &EndpointEntry, round: u64, what: &str) -> (u32, Duration) {
        let mut locked = entry.lock();
        locked.last_error = Some(what.to_owned());
        if locked.failure_round == round {
            locked.failure_round += 1;
            locked.consecutive_failures = locked.consecutive_failures.saturating_add(1);
            let delay = backoff::delay(&self.config.backoff, locked.consecutive_failures);
            locked.next_attempt = Some(Instant::now() + delay);
        }
        let delay = locked.next_attempt.map(|at| at.saturating_duration_since(Instant::now()));
        (locked.consecutive_failures, delay.unwrap_or_default())
    }

    /// Whether no endpoint can take a call now: the pool has endpoints and every one is in
    /// transient failure (see `EndpointEntry::in_transient_failure`).
    fn all_in_transient_failure(&self) -> bool {
        let endpoints = self.endpoints.load();
        !endpoints.is_empty() && endpoints.iter().all(|e| e.in_transient_failure())
    }

    /// Why no endpoint can take a call, for the fail-fast error: each endpoint and its state.
    fn outage_summary(&self) -> String {
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

    /// The calls queued that fail fast give up as soon as nothing can serve them: every
    /// endpoint in transient failure. `wait_for_ready` calls keep waiting.
    pub(crate) fn release_hopeless_waiters(&self) {
        if !self.waiters.has_waiters() || !self.all_in_transient_failure() {
            return;
        }
        let summary = self.outage_summary();
        let all_unhealthy = self.all_unhealthy();
        let failed = self.waiters.fail_fast_ones(|| {
            if all_unhealthy {
                Error::all_unhealthy(self.name(), &self.unhealthy_summary())
            } else {
                Error::outage(self.name(), &summary)
            }
        });
        if failed > 0 {
            tracing::debug!(pool = %self.name(), failed, "queued calls failed fast: no endpoint can take them");
        }
    }

    fn count_eviction(&self, member: &Member, reason: EvictionReason, to: MemberState, detail: &str) {
        self.stats.closed_by_reason[reason.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::EVICTIONS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => member.endpoint.label.clone(), names::LABEL_REASON => reason.as_str()).increment(1);
        let level_warn = matches!(
            reason,
            EvictionReason::IoError | EvictionReason::PingTimeout | EvictionReason::HealthFailed
        );
        if level_warn {
            tracing::warn!(pool = %self.name(), endpoint = %member.endpoint.label, member = member.id, reason = reason.as_str(), state = to.as_str(), in_flight = member.in_flight(), detail, "member evicted");
        } else {
            tracing::info!(pool = %self.name(), endpoint = %member.endpoint.label, member = member.id, reason = reason.as_str(), state = to.as_str(), in_flight = member.in_flight(), detail, "member evicted");
        }
    }

    fn entry_of(&self, member: &Member) -> Option<Arc<EndpointEntry>> {
        member.endpoint.entry.upgrade()
    }

    /// A call found the member's connection unusable before sending anything.
    pub(crate) fn on_send_failed(self: &Arc<Self>, member: &Arc<Member>, error: &h2::Error) {
        let reason = if error.is_go_away() { EvictionReason::GoAway } else { EvictionReason::IoError };
        self.evict(member, reason, &error.to_string());
    }

    pub(crate) fn count_retry(&self, reason: RetryReason) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.stats.retries_by_reason[reason as usize].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::RETRIES, names::LABEL_POOL => self.config.name.clone(), names::LABEL_REASON => reason.as_str()).increment(1);
    }

    // ----- endpoints coming and going -----

    /// Adds `endpoint` (if the pool does not have it yet) and opens its `min_connections`;
    /// returns whether it was added.
    pub(crate) fn add_endpoint(self: &Arc<Self>, endpoint: Endpoint) -> bool {
        if self.is_closed() {
            return false;
        }
        let entry = {
            let membership = self.lock_membership();
            let current = self.endpoints.load();
            if current.iter().any(|e| e.endpoint() == &endpoint) {
                return false;
            }
            let entry = EndpointEntry::new(
                endpoint.clone(),
                self.config.max_concurrent_connects,
                self.outliers.clone(),
            );
            let mut list = Vec::clone(&current);
            list.push(entry.clone());
            self.endpoints.store(Arc::new(list));
            // A healthy newcomer ends "all unhealthy", or joins the others in it.
            self.update_routing(&membership);
            entry
        };
        tracing::info!(pool = %self.name(), endpoint = %entry.label(), "endpoint added");
        self.emit(|| PoolEvent::EndpointAdded(endpoint.clone()));
        self.replenish(&entry);
        if self.waiters.has_waiters() {
            self.grow();
        }
        true
    }

    /// Removes `endpoint`: it takes no new streams and opens no connection; its members
    /// drain (the streams on them finish) and close. Returns whether the pool had it.
    pub(crate) fn remove_endpoint(self: &Arc<Self>, endpoint: &Endpoint) -> bool {
        let entry = {
            let membership = self.lock_membership();
            let current = self.endpoints.load();
            let Some(entry) = current.iter().find(|e| e.endpoint() == endpoint).cloned() else {
                return false;
            };
            let rest: Vec<_> = current.iter().filter(|e| !Arc::ptr_eq(e, &entry)).cloned().collect();
            self.endpoints.store(Arc::new(rest));
            entry.set_removed();
            if !entry.is_healthy() {
                self.unhealthy.fetch_sub(1, Ordering::AcqRel);
            }
            self.update_routing(&membership);
            entry
        };
        let draining =
            self.drain_all(&entry, EvictionReason::EndpointRemoved, "endpoint removed from the pool");
        tracing::info!(pool = %self.name(), endpoint = %entry.label(), draining, "endpoint removed; its connections drain");
        self.emit(|| PoolEvent::EndpointRemoved(endpoint.clone()));
        // Removing the last unhealthy endpoint may leave only healthy ones with room; removing
        // the last healthy one may leave nothing to wait for.
        self.serve_waiters_everywhere();
        self.release_hopeless_waiters();
        if self.waiters.has_waiters() {
            self.grow();
        }
        true
    }

    /// Unlists every member of `entry` and drains it (its streams finish, then it closes);
    /// returns how many there were. Under the entry's lock, so a connect finishing meanwhile
    /// either sees why (closed, removed) and is not listed, or is taken here.
    fn drain_all(&self, entry: &EndpointEntry, reason: EvictionReason, detail: &str) -> usize {
        let members = {
            let mut locked = entry.lock();
            entry.take_all(&mut locked)
        };
        for member in members.iter() {
            if member.set_draining() {
                self.count_eviction(member, reason, MemberState::Draining, detail);
            }
        }
        members.len()
    }

    /// The TLS client, loading the default one (system roots) on first use.
    fn tls_client(&self) -> Result<Arc<crate::proto::tls::Tls>, Error> {
        if let Some(tls) = self.tls.get() {
            return Ok(tls.clone());
        }
        let tls = Arc::new(crate::proto::tls::Tls::new(&Default::default(), self.name())?);
        Ok(self.tls.get_or_init(|| tls).clone())
    }

    // ----- gauges -----

    /// Sets the pool's gauges from its state now: connections per endpoint by state, and
    /// streams in flight. Sampled rather than kept up to date on every change, so calls pay
    /// nothing for them.
    pub(crate) fn sample_gauges(&self) {
        let pool = self.config.name.clone();
        for entry in self.endpoints.load().iter() {
            let members = entry.members();
            let ready = members.iter().filter(|m| m.state() == MemberState::Ready).count();
            let open = entry.shared.open_connections.load(Ordering::Relaxed);
            let connecting = entry.lock().connecting;
            let endpoint = entry.label().to_owned();
            for (state, count) in
                [("ready", ready), ("draining", open.saturating_sub(ready)), ("connecting", connecting)]
            {
                metrics::gauge!(names::CONNECTIONS, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint.clone(), names::LABEL_STATE => state).set(count as f64);
            }
            metrics::gauge!(names::IN_FLIGHT, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint).set(entry.in_flight() as f64);
        }
        metrics::gauge!(names::WAITERS, names::LABEL_POOL => pool).set(self.waiters.len() as f64);
    }

    /// Samples the gauges every `interval` until the pool closes.
    pub(crate) fn spawn_gauge_sampler(self: &Arc<Self>, interval: Duration) {
        let (pool, shutdown) = (Arc::downgrade(self), self.shutdown.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = shutdown.triggered() => return,
                }
                match pool.upgrade() {
                    Some(pool) => pool.sample_gauges(),
                    None => return,
                }
            }
        });
    }

    // ----- shutdown -----

    /// Stops taking calls; every member drains (in-flight streams finish). Returns at once;
    /// `live.all_closed()` tells when the last connection is gone.
    pub(crate) fn close(self: &Arc<Self>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shutdown.trigger();
        let name = self.config.name.clone();
        self.waiters.fail_all(|| Error::pool_closed(&name));
        for entry in self.endpoints.load().iter() {
            self.drain_all(entry, EvictionReason::PoolClosed, "pool closed");
        }
        tracing::info!(pool = %self.name(), "pool closed");
    }
}

/// Counts a connection open on its endpoint for as long as its driver task runs.
struct OpenConnection(Arc<EndpointShared>);

impl OpenConnection {
    fn enter(endpoint: Arc<EndpointShared>) -> OpenConnection {
        endpoint.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(endpoint)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A member's connection task: polls the `h2` connection until it ends, and tells the pool
/// at once when the server sends GOAWAY and when the connection closes. Holds only weak
/// references, so a dropped pool is not kept alive by its connections.
async fn drive(
    mut connection: Connection,
    signals: Arc<ConnSignals>,
    member: Weak<Member>,
    pool: Weak<PoolInner>,
    live: Arc<LiveConnections>,
    endpoint: Arc<EndpointShared>,
) {
    let _live = live.enter();
    let _open = OpenConnection::enter(endpoint);
    let mut goaway_reported = false;
    let result = poll_fn(|cx| {
        let result = Pin::new(&mut connection).poll(cx);
        if signals.take_limit_raised() {
            if let (Some(pool), Some(member)) = (pool.upgrade(), member.upgrade()) {
                pool.serve_waiters(&member);
            }
        }
        if !goaway_reported && signals.goaway_seen() {
            goaway_reported = true;
            if let (Some(pool), Some(member)) = (pool.upgrade(), member.upgrade()) {
                if let Some(goaway) = signals.goaway() {
                    pool.emit(|| PoolEvent::GoAway {
                        member: MemberHandle::new(&pool, &member),
                        reason: goaway.reason(),
                        debug_data: goaway.debug_data.clone(),
                    });
                }
                let detail = signals
                    .goaway()
                    .map(|g| {
                        format!(
                            "GOAWAY {:?} last_stream_id={} debug={:?}",
                            g.reason(),
                            g.last_stream_id,
                            String::from_utf8_lossy(&g.debug_data)
                        )
                    })
                    .unwrap_or_default();
                pool.evict(&member, EvictionReason::GoAway, &detail);
            }
        }
        result
    })
    .await;
    if let Err(error) = &result {
        signals.set_close_error(error.to_string());
    }
    signals.mark_closed();
    if let (Some(pool), Some(member)) = (pool.upgrade(), member.upgrade()) {
        pool.on_connection_closed(&member, result);
    }
}
