//! The pool's shared state (`PoolInner`), and the member lifecycle: listing a connected
//! member, draining and killing members, reacting to a connection's end, and closing the pool.
//!
//! The rest of the pool's logic is spread by concern over sibling modules, each an
//! `impl PoolInner` of its own: `checkout` (slots, the wait queue, fail-fast), `connect`
//! (opening members, backoff), `routing` (health, ejection, endpoints coming and going),
//! `gauges`, and `driver` (each connection's task).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::ConnectionBudget;
use crate::config::Config;
use crate::endpoint::{EjectionRequest, Endpoint, EndpointShared, OutlierReports};
use crate::error::Error;
use crate::events::{MemberEvent, PoolEvent, PoolEvents, EVENT_BUFFER};
use crate::internals::{EndpointEntry, Subsetting};
use crate::member::{EvictionReason, Member, MemberState, Slot};
use crate::metrics::{self as names, PoolName};
use crate::outlier::Outliers;
use crate::service_config::{code_name, RetryTokens};
use crate::stats::{RetryReason, Stats};
use crate::subset::Subsetter;
use crate::wait_queue::WaitQueue;

/// Pre-registered handles for the metrics touched on every call.
pub(crate) struct HotMetrics {
    pub(crate) checkouts_direct: metrics::Counter,
}

pub(crate) struct PoolInner {
    pub(crate) config: Config,
    /// The endpoints now, replaced whole when one is added or removed; checkouts read it
    /// without a lock.
    pub(crate) endpoints: ArcSwap<Vec<Arc<EndpointEntry>>>,
    /// `endpoints` by endpoint, replaced with it (under `membership`): the health task looks
    /// endpoints up by name, once per endpoint added, and a scan of the list would make a
    /// pool of 10,000 endpoints cost 10^8 comparisons to start.
    pub(crate) index: ArcSwap<HashMap<Endpoint, Arc<EndpointEntry>>>,
    /// The weights of `endpoints` when they differ, replaced with it (under `membership`)
    /// and when a weight changes.
    pub(crate) weights: ArcSwap<crate::balance::Weights>,
    /// Whether `weights` has any (not every endpoint weighs the same): checkouts of a pool
    /// without weights read this flag, not the weights.
    pub(crate) weighted: std::sync::atomic::AtomicBool,
    /// The cap on calls in flight (circuit breaking), and their count while it is set.
    pub(crate) requests: Arc<crate::circuit::RequestLimit>,
    /// Held while the endpoint list or the endpoints' routing changes.
    pub(crate) membership: Mutex<()>,
    /// Connects under way and connections open, against `max_total_connections`.
    pub(crate) budget: Arc<ConnectionBudget>,
    /// With subsetting: every known endpoint, and which of them are live (`endpoints`).
    /// Taken before `membership`, never after.
    pub(crate) subset: Option<Mutex<Subsetting>>,
    /// Outlier detection, when configured: every endpoint shares its settings, and sends
    /// its ejection requests to the pool's ejector task.
    pub(crate) outliers: Option<OutlierReports>,
    /// The TLS client for `https://` endpoints: loaded at build when the configuration has
    /// one or an endpoint needs it, else on the first `https://` connect (system roots).
    pub(crate) tls: std::sync::OnceLock<Arc<crate::proto::tls::Tls>>,
    pub(crate) waiters: Arc<WaitQueue<Slot>>,
    pub(crate) stats: Stats,
    /// Cancelled when the pool closes: its background tasks end.
    pub(crate) shutdown: CancellationToken,
    /// The connections' driver tasks, counted while they run (`State::open_connections`);
    /// closed with the pool, so that `Pool::close` can wait for the last one.
    pub(crate) live: TaskTracker,
    pub(crate) closed: AtomicBool,
    /// Endpoints marked unhealthy now.
    pub(crate) unhealthy: AtomicUsize,
    pub(crate) next_member_id: AtomicU64,
    pub(crate) hot: HotMetrics,
    /// Subscribers to membership events (the health task).
    pub(crate) subscribers: Mutex<Vec<mpsc::UnboundedSender<MemberEvent>>>,
    /// The users' event stream (`Pool::events`).
    pub(crate) events: broadcast::Sender<PoolEvent>,
    /// The pool's hold on its name, given back when the pool closes so the name (and its
    /// metric series) can serve another pool.
    pub(crate) name_claim: Mutex<Option<PoolName>>,
    /// The retry throttle, when the service config sets `retryThrottling`.
    pub(crate) retry_tokens: Option<Arc<RetryTokens>>,
    /// The `user-agent` header of calls that carry none, made once.
    pub(crate) user_agent: http::HeaderValue,
    /// The `:scheme` and `:authority` of every call, when set apart from the endpoints'.
    pub(crate) origin: Option<(http::uri::Scheme, http::uri::Authority)>,
}

/// The weights of `list`, as checkouts draw by them.
fn weights_of(list: &Arc<Vec<Arc<EndpointEntry>>>) -> crate::balance::Weights {
    let weights = list.iter().map(|e| e.shared.weight.load(std::sync::atomic::Ordering::Relaxed));
    crate::balance::Weights::of(Arc::as_ptr(list) as usize, weights)
}

/// Each endpoint of `list` to its entry.
fn index_of(list: &[Arc<EndpointEntry>]) -> HashMap<Endpoint, Arc<EndpointEntry>> {
    list.iter().map(|e| (e.endpoint().clone(), e.clone())).collect()
}

impl PoolInner {
    /// The pool's shared state, and, with outlier detection, the receiving end of its
    /// endpoints' ejection requests (for `spawn_ejector`).
    pub(crate) fn new(
        config: Config,
        endpoints: Vec<Endpoint>,
        name_claim: PoolName,
    ) -> (PoolInner, Option<mpsc::UnboundedReceiver<EjectionRequest>>) {
        let hot = HotMetrics {
            checkouts_direct: metrics::counter!(names::CHECKOUTS, names::LABEL_POOL => config.name.clone(), names::LABEL_RESULT => "direct"),
        };
        let (outliers, ejections) = match config.outlier_detection.clone() {
            Some(settings) => {
                let (ejections, requests) = mpsc::unbounded_channel();
                (Some(OutlierReports { outliers: Outliers::new(settings), ejections }), Some(requests))
            }
            None => (None, None),
        };
        for ignored in config.service_config.iter().flat_map(|c| c.ignored()) {
            tracing::warn!(pool = %config.name, field = %ignored, "service config field ignored");
        }
        let config_tokens = config
            .service_config
            .as_ref()
            .and_then(|c| c.retry_throttling.as_ref())
            .map(|t| Arc::new(RetryTokens::new(t)));
        let user_agent = config.user_agent_header();
        let origin = config.origin_parts();
        // With subsetting, the endpoints given are known, and the subset of them live.
        let (subset, endpoints) = match config.subset.clone() {
            Some(settings) => {
                let mut subset = Subsetter::new(settings);
                for endpoint in endpoints {
                    subset.insert(endpoint);
                }
                let live = subset.rebalance(tokio::time::Instant::now()).add;
                (Some(Mutex::new(Subsetting { choice: subset, histories: Default::default() })), live)
            }
            None => (None, endpoints),
        };
        let requests = Arc::new(crate::circuit::RequestLimit::default());
        let list: Vec<Arc<EndpointEntry>> = endpoints
            .into_iter()
            .map(|e| {
                EndpointEntry::new(e, config.max_concurrent_connects, outliers.clone(), requests.clone())
            })
            .collect();
        let inner = PoolInner {
            user_agent,
            origin,
            index: ArcSwap::from_pointee(index_of(&list)),
            weights: ArcSwap::from_pointee(crate::balance::Weights::default()),
            weighted: std::sync::atomic::AtomicBool::new(false),
            requests,
            endpoints: ArcSwap::from_pointee(list),
            membership: Mutex::new(()),
            budget: ConnectionBudget::new(config.max_total_connections),
            subset,
            outliers,
            tls: std::sync::OnceLock::new(),
            config,
            waiters: Arc::new(WaitQueue::default()),
            stats: Stats::default(),
            shutdown: CancellationToken::new(),
            live: TaskTracker::new(),
            closed: AtomicBool::new(false),
            unhealthy: AtomicUsize::new(0),
            next_member_id: AtomicU64::new(1),
            hot,
            subscribers: Mutex::new(Vec::new()),
            events: broadcast::channel(EVENT_BUFFER).0,
            name_claim: Mutex::new(Some(name_claim)),
            retry_tokens: config_tokens,
        };
        (inner, ejections)
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// Runs `work` every `interval` (the first at once) until the pool closes or is
    /// dropped. The task holds the pool only while `work` runs.
    pub(crate) fn spawn_periodic(self: &Arc<Self>, interval: std::time::Duration, work: fn(&Arc<PoolInner>)) {
        let (pool, shutdown) = (Arc::downgrade(self), self.shutdown.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                match pool.upgrade() {
                    Some(pool) => work(&pool),
                    None => return,
                }
            }
        });
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
        self.index.load().get(endpoint).cloned()
    }

    /// Makes `list` the pool's endpoints, and its index with it. Call with the membership
    /// lock held.
    pub(crate) fn set_endpoints(
        &self,
        list: Vec<Arc<EndpointEntry>>,
        _membership: &std::sync::MutexGuard<'_, ()>,
    ) {
        self.index.store(Arc::new(index_of(&list)));
        let list = Arc::new(list);
        self.store_weights(weights_of(&list));
        self.endpoints.store(list);
    }

    /// Sets the weights of the endpoints named (those the pool has); returns how many it
    /// has. Weights are 1 or more; the choice between endpoints draws by them.
    pub(crate) fn set_weights(&self, weights: &[(Endpoint, u32)]) -> usize {
        let membership = self.lock_membership();
        let index = self.index.load();
        let mut found = 0;
        for (endpoint, weight) in weights {
            if let Some(entry) = index.get(endpoint) {
                entry.shared.weight.store((*weight).max(1), std::sync::atomic::Ordering::Relaxed);
                found += 1;
            }
        }
        self.store_weights(weights_of(&self.endpoints.load_full()));
        drop(membership);
        found
    }

    fn store_weights(&self, weights: crate::balance::Weights) {
        self.weighted.store(!weights.is_uniform(), std::sync::atomic::Ordering::Release);
        self.weights.store(Arc::new(weights));
    }

    pub(crate) fn lock_membership(&self) -> std::sync::MutexGuard<'_, ()> {
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----- events -----

    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<MemberEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    pub(crate) fn emit(&self, event: impl Fn() -> MemberEvent) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|tx| tx.send(event()).is_ok());
    }

    pub(crate) fn events(&self) -> PoolEvents {
        PoolEvents::new(self.events.subscribe())
    }

    /// Sends a user event, built only when someone listens.
    pub(crate) fn publish(&self, event: impl FnOnce() -> PoolEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }

    // ----- members -----

    /// Whether new streams may go to `member`'s endpoint now.
    pub(crate) fn member_usable(&self, member: &Member) -> bool {
        member.endpoint.routable.load(Ordering::Acquire)
    }

    /// Puts a freshly connected member in service and gives its slots to waiters. Returns
    /// false if it could not be listed (the pool closed, or the connection already ended or
    /// got a GOAWAY). `round` is the endpoint's `failure_round` when the connect was
    /// decided: the success ends the endpoint's failing connects only if no failure was
    /// counted since. One that was (an attempt begun before the server went away, and done
    /// after another found it gone) says the server was up then, not now: its member
    /// serves, and the next attempts still wait out the backoff.
    pub(crate) fn add_member(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        member: Arc<Member>,
        round: u64,
    ) -> bool {
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
            // Counted here, not when the handshake ends: every connection counted is then
            // counted again when it leaves service (`count_eviction`), so the two add up.
            self.stats.connections_created.fetch_add(1, Ordering::Relaxed);
            if locked.failure_round == round {
                locked.consecutive_failures = 0;
                locked.next_attempt = None;
                locked.last_error = None;
                locked.refused = false;
                locked.pulled = false;
            }
            locked.demand = false;
        }
        if member.max_streams() == 0 {
            tracing::warn!(pool = %self.name(), endpoint = %entry.label(), member = member.id, "server allows 0 concurrent streams on this connection; it carries no calls until it raises the limit");
        }
        tracing::info!(pool = %self.name(), endpoint = %entry.label(), member = member.id, state = "ready", max_streams = member.max_streams(), "member ready");
        self.emit(|| MemberEvent::Ready(member.clone()));
        self.publish(|| PoolEvent::ConnectionOpened {
            endpoint: entry.endpoint().clone(),
            connection: member.id,
        });
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
    pub(crate) fn on_connection_closed(
        self: &Arc<Self>,
        member: &Arc<Member>,
        result: Result<(), h2::Error>,
    ) {
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
    pub(crate) fn unlist(&self, member: &Member) -> Option<Arc<EndpointEntry>> {
        let entry = self.entry_of(member)?;
        let mut locked = entry.lock();
        entry.remove(&mut locked, member.id);
        drop(locked);
        Some(entry)
    }

    /// After a member left: keep `min_connections`, and grow if callers are waiting.
    pub(crate) fn replace(self: &Arc<Self>, entry: &Arc<EndpointEntry>) {
        self.replenish(entry);
        if self.waiters.has_waiters() {
            self.grow();
        }
    }

    pub(crate) fn count_eviction(
        &self,
        member: &Member,
        reason: EvictionReason,
        to: MemberState,
        detail: &str,
    ) {
        self.stats.closed_by_reason[reason.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::EVICTIONS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => member.endpoint.label.clone(), names::LABEL_REASON => reason.as_str()).increment(1);
        self.publish(|| PoolEvent::ConnectionClosed {
            endpoint: member.endpoint.endpoint.clone(),
            connection: member.id,
            reason,
            detail: detail.to_owned(),
        });
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

    /// The entry `member` is listed under, if its endpoint is still in the pool (a removed
    /// endpoint's members were unlisted when it was removed).
    pub(crate) fn entry_of(&self, member: &Member) -> Option<Arc<EndpointEntry>> {
        self.entry_sharing(&member.endpoint)
    }

    /// The entry holding `shared`, if the pool has it now.
    pub(crate) fn entry_sharing(&self, shared: &Arc<EndpointShared>) -> Option<Arc<EndpointEntry>> {
        self.endpoints.load().iter().find(|e| Arc::ptr_eq(&e.shared, shared)).cloned()
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

    /// A call sent again by its retry policy after ending with `code`.
    pub(crate) fn count_policy_retry(&self, code: tonic::Code) {
        self.stats.policy_retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::POLICY_RETRIES, names::LABEL_POOL => self.config.name.clone(), names::LABEL_CODE => code_name(code)).increment(1);
    }

    /// A retryable failure not sent again: the retry throttle was at or below half.
    pub(crate) fn count_throttled_retry(&self) {
        self.stats.retries_throttled.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::RETRIES_THROTTLED, names::LABEL_POOL => self.config.name.clone())
            .increment(1);
    }

    /// Hedged copies: `sent`, `won` (a copy after the first answered first), `cancelled`
    /// (a copy reset because another answered).
    pub(crate) fn count_hedges(&self, result: &'static str, n: u64) {
        let counter = match result {
            "sent" => &self.stats.hedges_sent,
            "won" => &self.stats.hedges_won,
            _ => &self.stats.hedges_cancelled,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(names::HEDGES, names::LABEL_POOL => self.config.name.clone(), names::LABEL_RESULT => result).increment(n);
    }

    /// A PING after a call's deadline (`call::attempt::ping_after_deadline`) was answered or not.
    pub(crate) fn count_deadline_ping(&self, member: &Member, result: &'static str) {
        metrics::counter!(names::DEADLINE_PINGS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => member.endpoint.label.clone(), names::LABEL_RESULT => result).increment(1);
    }

    /// The attempts of a call under a retry policy, once it is over.
    pub(crate) fn record_call_attempts(&self, attempts: u32) {
        metrics::histogram!(names::CALL_ATTEMPTS, names::LABEL_POOL => self.config.name.clone())
            .record(f64::from(attempts));
    }

    // ----- shutdown -----

    /// Stops taking calls; every member drains (in-flight streams finish). Returns at once;
    /// `live.wait()` tells when the last connection is gone.
    pub(crate) fn close(self: &Arc<Self>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shutdown.cancel();
        self.live.close();
        // The name is free for another pool from now on.
        drop(self.name_claim.lock().unwrap_or_else(|e| e.into_inner()).take());
        let name = self.config.name.clone();
        self.waiters.fail_all(|| Error::pool_closed(&name));
        for entry in self.endpoints.load().iter() {
            self.drain_all(entry, EvictionReason::PoolClosed, "pool closed");
        }
        tracing::info!(pool = %self.name(), "pool closed");
    }
}
