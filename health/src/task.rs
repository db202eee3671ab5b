//! The health task: one per pool, one timer queue for all its members.
//!
//! (`max_streams_per_connection` is enforced by the pool itself, on the call that reaches the
//! limit; the task handles the time-based rules.)
//!
//! Every member has one entry in a `DelayQueue`, due at the earliest moment something may
//! need doing to it: a keepalive PING (quiet for `time`), idle retirement, lifetime
//! retirement. When an entry fires, the member's state is read (a few atomics) and the entry
//! is put back for the next such moment; busy members just move their entry along. PINGs in
//! flight are futures polled by the same task, not tasks of their own.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use grpc_pool_core::metrics as names;
use grpc_pool_core::{
    Endpoint, Error, EvictionReason, MemberHandle, MemberState, MemberStatus, MonitorEvent, PoolMonitor,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tokio_util::time::delay_queue::{DelayQueue, Key};

use crate::checks::{self, Verdict, WatchEnd};
use crate::config::{CheckMode, HealthConfig, Keepalive};
use grpc_pool_core::call::EndpointChannel;

/// Longest keepalive time after `too_many_pings` doublings.
const MAX_KEEPALIVE_TIME: Duration = Duration::from_secs(2 * 60 * 60);
/// How often a member whose retirement must wait (another one of its endpoint is draining
/// for its lifetime) is looked at again.
const RETRY_RETIREMENT: Duration = Duration::from_millis(250);
/// A lifetime drain that has not finished after this long no longer holds back the next.
const DRAIN_HOLD: Duration = Duration::from_secs(30);
/// Entries are never due sooner than this after being looked at: bounds the work per member.
const MIN_RECHECK: Duration = Duration::from_millis(5);
/// Due times are rounded up to a multiple of this, so that the work of members falling due
/// close together is done in one wake-up of the task (and of the runtime's threads) rather
/// than one each.
const BATCH: Duration = Duration::from_millis(50);

/// A probe of one member, PING or health-check RPC: (member id, probe number, round trip).
/// Its deadline is the member's queue entry, not a timer of its own.
type Probe = Pin<Box<dyn Future<Output = (u64, u64, Result<Duration, String>)> + Send>>;
/// One `Check` of one endpoint (by its id in the task).
type Check = Pin<Box<dyn Future<Output = (u64, Verdict, Option<Duration>)> + Send>>;
/// One endpoint's `Watch` stream, running until it ends: its endpoint id, and how it ended.
type Watcher = Pin<Box<dyn Future<Output = (u64, Watched)> + Send>>;

/// How a `Watch` stream's future ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// The stream ended or failed (its last report said why), or its endpoint was removed.
    Ended,
    /// Only to move to another connection: it reopens at once, and reported nothing.
    Moving,
    /// The server has no `Watch`: the endpoint is polled with `Check` from now on.
    Unimplemented,
}

/// How often a `Watch` stream looks whether its connection still takes new streams.
const WATCH_RECHECK: Duration = Duration::from_millis(250);

/// What a queue entry is due for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Member(u64),
    /// An endpoint by its id in the task: ids are never reused, so an entry or a check
    /// result of a removed endpoint finds nothing and is dropped.
    Endpoint(u64),
}

/// One endpoint's health-check state.
struct EndpointHealth {
    endpoint: Endpoint,
    channel: Option<EndpointChannel>,
    /// Set when the pool removes the endpoint: its `Watch` stream, if any, ends.
    removed: Arc<AtomicBool>,
    healthy: bool,
    successes: u32,
    failures: u32,
    unimplemented_logged: bool,
    /// Its next check's entry in the queue; `None` while a check or `Watch` is under way.
    key: Option<Key>,
    /// Check again as soon as the one under way ends, unless it passes (a connection to the
    /// unhealthy endpoint became ready meanwhile).
    recheck: bool,
    /// The server answered `Watch` with `UNIMPLEMENTED`: it is polled with `Check` instead.
    poll_only: bool,
}

/// A uniformly distributed number in `[-1, 1)`, for symmetric jitter.
fn symmetric_unit() -> f64 {
    fastrand::f64() * 2.0 - 1.0
}

/// `interval` spread by +/-10%, differently on each call.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(1.0 + 0.1 * symmetric_unit())
}

/// `at`, rounded up to the next multiple of [`BATCH`] since `epoch`: members due within one
/// batch are looked at, and PINGed, in one turn of the task.
fn batched(epoch: Instant, at: Instant) -> Instant {
    let since = at.saturating_duration_since(epoch).as_nanos();
    let batch = BATCH.as_nanos();
    let rounded = since.div_ceil(batch) * batch;
    epoch + Duration::from_nanos(rounded as u64)
}

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
            _ = tokio::time::sleep(RESTART_DELAY) => {}
            _ = monitor.closed() => return,
        }
    }
}

/// For tests of the supervision only: not part of the API.
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

struct Tracked {
    member: MemberHandle,
    /// Its entry in the queue; `None` while it is being looked at (the entry fired).
    key: Option<Key>,
    /// This member's jittered `max_lifetime`.
    lifetime: Option<Duration>,
    /// The number of the probe in flight, if one is: its queue entry is then its deadline.
    probe: Option<u64>,
    /// How quiet it must be for its first keepalive PING: somewhere between half the
    /// keepalive time and all of it, so that connections opened together (a pool starting,
    /// an endpoint coming back) do not PING together ever after. Later PINGs wait the full
    /// keepalive time, which the server's PING policy may be tuned to.
    first_ping_after: Option<Duration>,
    /// PINGs sent since the server last sent DATA or HEADERS, and the member's count of such
    /// frames when that was looked at: servers forgive PINGs only once they have sent data.
    pings_without_data: u32,
    data_frames: u64,
}

struct Task {
    monitor: PoolMonitor,
    config: HealthConfig,
    queue: DelayQueue<Due>,
    members: HashMap<u64, Tracked>,
    by_endpoint: HashMap<Endpoint, HashSet<u64>>,
    probes: FuturesUnordered<Probe>,
    /// Endpoints by id, and ids by endpoint.
    endpoints: HashMap<u64, EndpointHealth>,
    endpoint_ids: HashMap<Endpoint, u64>,
    next_endpoint_id: u64,
    checks: FuturesUnordered<Check>,
    watchers: FuturesUnordered<Watcher>,
    /// `Watch` streams report here: (endpoint id, verdict).
    reports_tx: mpsc::UnboundedSender<(u64, Verdict)>,
    reports_rx: mpsc::UnboundedReceiver<(u64, Verdict)>,
    /// Endpoints that answered PINGs with `too_many_pings`: their idle members are probed
    /// with a health-check RPC (a real stream, which such servers accept) instead.
    ping_limited: HashSet<Endpoint>,
    /// Keepalive time per endpoint, raised after `too_many_pings`.
    keepalive_time: HashMap<Endpoint, Duration>,
    /// The member each endpoint last drained for its lifetime, when, and how many of the
    /// endpoint's members were ready then.
    lifetime_drain: HashMap<Endpoint, (MemberHandle, Instant, usize)>,
    /// The grid [`BATCH`] rounds to.
    epoch: Instant,
    /// Probes started so far; numbers them, so that a late answer is not taken for the
    /// current probe's.
    probes_started: u64,
    /// PING metrics per endpoint, labelled once.
    ping_metrics: HashMap<Endpoint, PingMetrics>,
}

/// One endpoint's PING counters and round-trip histogram.
struct PingMetrics {
    ok: metrics::Counter,
    error: metrics::Counter,
    timeout: metrics::Counter,
    rtt: metrics::Histogram,
}

impl PingMetrics {
    fn new(pool: &str, endpoint: &Endpoint) -> PingMetrics {
        let counter = |result: &'static str| metrics::counter!(names::PINGS, names::LABEL_POOL => pool.to_owned(), names::LABEL_ENDPOINT => endpoint.to_string(), names::LABEL_RESULT => result);
        PingMetrics {
            ok: counter("ok"),
            error: counter("error"),
            timeout: counter("timeout"),
            rtt: metrics::histogram!(names::PING_RTT, names::LABEL_POOL => pool.to_owned(), names::LABEL_ENDPOINT => endpoint.to_string()),
        }
    }
}

impl Task {
    fn new(monitor: PoolMonitor, config: HealthConfig) -> Task {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        Task {
            monitor,
            config,
            queue: DelayQueue::new(),
            members: HashMap::new(),
            by_endpoint: HashMap::new(),
            probes: FuturesUnordered::new(),
            endpoints: HashMap::new(),
            endpoint_ids: HashMap::new(),
            next_endpoint_id: 0,
            checks: FuturesUnordered::new(),
            watchers: FuturesUnordered::new(),
            reports_tx,
            reports_rx,
            ping_limited: HashSet::new(),
            keepalive_time: HashMap::new(),
            lifetime_drain: HashMap::new(),
            epoch: Instant::now(),
            probes_started: 0,
            ping_metrics: HashMap::new(),
        }
    }

    async fn run(mut self) {
        // Subscribe first, then list: a member may show up twice, never zero times.
        let mut events = self.monitor.subscribe();
        for member in self.monitor.members() {
            self.track(member);
        }
        for endpoint in self.monitor.endpoints() {
            self.add_endpoint(endpoint);
        }
        let monitor = self.monitor.clone();
        let closed = monitor.closed();
        tokio::pin!(closed);
        loop {
            __test::maybe_panic(monitor.name());
            tokio::select! {
                _ = &mut closed => break,
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
                Some(expired) = poll_fn(|cx| self.queue.poll_expired(cx)), if !self.queue.is_empty() => {
                    match expired.into_inner() {
                        Due::Member(id) => {
                            if let Some(tracked) = self.members.get_mut(&id) {
                                tracked.key = None;
                            }
                            self.check(id);
                        }
                        Due::Endpoint(id) => {
                            if let Some(health) = self.endpoints.get_mut(&id) {
                                health.key = None;
                            }
                            self.start_check(id);
                        }
                    }
                }
                Some((id, probe, result)) = self.probes.next(), if !self.probes.is_empty() => {
                    self.on_pong(id, probe, result);
                }
                Some((id, verdict, latency)) = self.checks.next(), if !self.checks.is_empty() => {
                    self.on_verdict(id, verdict, latency, false);
                    self.schedule_next_check(id);
                }
                Some((id, watched)) = self.watchers.next(), if !self.watchers.is_empty() => {
                    // Its last reports are queued already: apply them first, so that the
                    // next check is timed by the endpoint's health after them.
                    while let Ok((id, verdict)) = self.reports_rx.try_recv() {
                        self.on_verdict(id, verdict, None, true);
                    }
                    self.on_watch_end(id, watched);
                }
                Some((id, verdict)) = self.reports_rx.recv() => {
                    self.on_verdict(id, verdict, None, true);
                }
            }
        }
        tracing::debug!(pool = %self.monitor.name(), "health task ended");
    }

    fn keepalive(&self) -> Option<&Keepalive> {
        self.config.keepalive.as_ref()
    }

    fn keepalive_time(&self, endpoint: &Endpoint) -> Option<Duration> {
        let keepalive = self.keepalive()?;
        Some(self.keepalive_time.get(endpoint).copied().unwrap_or(keepalive.time))
    }

    fn track(&mut self, member: MemberHandle) {
        let id = member.id();
        if self.members.contains_key(&id) || member.state() == MemberState::Closed {
            return;
        }
        let lifetime = self.config.eviction.max_lifetime.map(jittered);
        self.by_endpoint.entry(member.endpoint().clone()).or_default().insert(id);
        let key = Some(self.queue.insert(Due::Member(id), MIN_RECHECK));
        let first_ping_after =
            self.keepalive_time(member.endpoint()).map(|time| time.mul_f64(0.75 + 0.25 * symmetric_unit()));
        self.members.insert(
            id,
            Tracked {
                member,
                key,
                lifetime,
                probe: None,
                first_ping_after,
                pings_without_data: 0,
                data_frames: 0,
            },
        );
        // Look at it right away (the entry is due at once), so a member that is already
        // old or quiet is handled on the next turn.
    }

    fn untrack(&mut self, id: u64) {
        if let Some(tracked) = self.members.remove(&id) {
            if let Some(key) = tracked.key {
                self.queue.remove(&key);
            }
            if let Some(ids) = self.by_endpoint.get_mut(tracked.member.endpoint()) {
                ids.remove(&id);
            }
        }
    }

    fn on_event(&mut self, event: MonitorEvent) {
        match event {
            MonitorEvent::MemberReady(member) => {
                let endpoint = member.endpoint().clone();
                self.track(member);
                self.recheck_if_unhealthy(&endpoint);
            }
            MonitorEvent::EndpointAdded(endpoint) => self.add_endpoint(endpoint),
            MonitorEvent::EndpointRemoved(endpoint) => self.remove_endpoint(&endpoint),
            MonitorEvent::GoAway { member, reason, debug_data } => {
                let too_many_pings =
                    reason == h2::Reason::ENHANCE_YOUR_CALM && debug_data.as_ref() == b"too_many_pings";
                if too_many_pings {
                    self.back_off_keepalive(member.endpoint());
                }
            }
            _ => {}
        }
    }

    /// Starts health-checking a new endpoint (once; the task may hear of it twice).
    fn add_endpoint(&mut self, endpoint: Endpoint) {
        if self.endpoint_ids.contains_key(&endpoint) {
            return;
        }
        let id = self.next_endpoint_id;
        self.next_endpoint_id += 1;
        self.endpoint_ids.insert(endpoint.clone(), id);
        // The pool's own verdict, for a task that starts over after a panic: a passing check
        // must still be able to bring an endpoint it had marked unhealthy back.
        let healthy = self.monitor.is_endpoint_healthy(&endpoint).unwrap_or(true);
        self.endpoints.insert(
            id,
            EndpointHealth {
                channel: self.monitor.endpoint_channel(&endpoint),
                removed: Arc::new(AtomicBool::new(false)),
                endpoint,
                healthy,
                successes: 0,
                failures: 0,
                unimplemented_logged: false,
                key: None,
                recheck: false,
                poll_only: false,
            },
        );
        self.schedule_check(id, Duration::ZERO);
    }

    /// Puts the endpoint's next check in the queue `after` from now, or moves it there.
    fn schedule_check(&mut self, id: u64, after: Duration) {
        if self.config.checks.is_none() {
            return;
        }
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        match &health.key {
            Some(key) => self.queue.reset(key, after),
            None => health.key = Some(self.queue.insert(Due::Endpoint(id), after)),
        }
    }

    /// After a check: the next one in `interval`, or the shorter `unhealthy_interval` while
    /// the endpoint is unhealthy (+/-10%); at once if a new connection came meanwhile and
    /// this check failed.
    fn schedule_next_check(&mut self, id: u64) {
        let (Some(checks), Some(health)) = (&self.config.checks, self.endpoints.get_mut(&id)) else {
            return;
        };
        let recheck = std::mem::take(&mut health.recheck) && !health.healthy && health.successes == 0;
        let after = if recheck {
            Duration::ZERO
        } else if health.healthy {
            jittered(checks.interval)
        } else {
            jittered(checks.unhealthy_interval.min(checks.interval))
        };
        self.schedule_check(id, after);
    }

    /// A `Watch` stream ended: reopen it on another connection at once if it only moved;
    /// after the (unhealthy) interval if it failed; fall back to `Check` polling, at once, if
    /// the server has no `Watch`.
    fn on_watch_end(&mut self, id: u64, watched: Watched) {
        let pool = self.monitor.name().to_owned();
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        match watched {
            Watched::Moving => self.schedule_check(id, Duration::ZERO),
            Watched::Ended => self.schedule_next_check(id),
            Watched::Unimplemented => {
                if !health.poll_only {
                    health.poll_only = true;
                    let interval = self.config.checks.as_ref().map(|c| c.interval).unwrap_or_default();
                    tracing::info!(pool = %pool, endpoint = %health.endpoint, "the server does not implement grpc.health.v1 Watch (UNIMPLEMENTED); polling it with Check every {interval:?} instead");
                }
                self.schedule_check(id, Duration::ZERO);
            }
        }
    }

    /// A connection to `endpoint` is ready: if the endpoint is unhealthy and no check has
    /// passed since its last failure, check it now rather than at its next check, so that a
    /// server back from an outage gets traffic as soon as it says it is serving. (A check
    /// under way is followed by another at once if it fails.) Once one has passed, the next
    /// waits `unhealthy_interval` as usual: connections opening together (a pool's connects
    /// all succeeding when the server is back) must not make `healthy_threshold` checks in a
    /// row within milliseconds.
    fn recheck_if_unhealthy(&mut self, endpoint: &Endpoint) {
        let Some(id) = self.endpoint_ids.get(endpoint).copied() else { return };
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        if health.healthy || health.successes > 0 || self.config.checks.is_none() {
            return;
        }
        if health.key.is_some() {
            self.schedule_check(id, Duration::ZERO);
        } else {
            health.recheck = true;
        }
    }

    /// Forgets an endpoint the pool removed. Its members drain and close on their own (the
    /// task stops tracking each as it closes); a check or `Watch` still under way for it
    /// reports to an id that is gone, and is dropped.
    fn remove_endpoint(&mut self, endpoint: &Endpoint) {
        if let Some(id) = self.endpoint_ids.remove(endpoint) {
            if let Some(health) = self.endpoints.remove(&id) {
                health.removed.store(true, Ordering::Relaxed);
                if let Some(key) = health.key {
                    self.queue.remove(&key);
                }
            }
        }
        self.ping_limited.remove(endpoint);
        self.keepalive_time.remove(endpoint);
        self.lifetime_drain.remove(endpoint);
        self.ping_metrics.remove(endpoint);
    }

    /// The server thinks it is PINGed too often: double this endpoint's keepalive time, as
    /// grpc-go does, and say which server setting to align.
    fn back_off_keepalive(&mut self, endpoint: &Endpoint) {
        let Some(current) = self.keepalive_time(endpoint) else { return };
        self.ping_limited.insert(endpoint.clone());
        let raised = (current * 2).min(MAX_KEEPALIVE_TIME);
        self.keepalive_time.insert(endpoint.clone(), raised);
        metrics::counter!(names::KEEPALIVE_BACKOFFS, names::LABEL_POOL => self.monitor.name().to_owned(), names::LABEL_ENDPOINT => endpoint.to_string()).increment(1);
        tracing::warn!(
            pool = %self.monitor.name(),
            endpoint = %endpoint,
            keepalive_time = ?raised,
            "server sent GOAWAY ENHANCE_YOUR_CALM \"too_many_pings\": keepalive time doubled. Align the \
             server's ping policy with the pool's keepalive (gRPC C core: \
             grpc.http2.min_ping_interval_without_data_ms and grpc.keepalive_permit_without_calls; \
             grpc-go: keepalive.EnforcementPolicy MinTime and PermitWithoutStream), or raise keepalive.time. \
             Idle connections to it are now probed with health-check calls instead of PINGs"
        );
    }

    /// Looks at one member whose entry fell due; acts, and puts the entry back.
    fn check(&mut self, id: u64) {
        let Some(tracked) = self.members.get(&id) else { return };
        let member = tracked.member.clone();
        let status = member.status();
        if matches!(status.state, MemberState::Closed | MemberState::Draining) {
            // Nothing more to do for it; the pool closes it when its streams end.
            self.untrack(id);
            return;
        }
        if tracked.probe.is_some() {
            // Its entry fired while a probe was out: the probe's deadline passed.
            self.on_probe_timeout(id, &member);
            return;
        }
        let (lifetime, first_ping_after) = (tracked.lifetime, tracked.first_ping_after);
        let MemberStatus { age, idle, in_flight, since_last_read: quiet, data_frames, .. } = status;

        if let Some(lifetime) = lifetime.filter(|l| age >= *l) {
            if self.may_retire_for_lifetime(member.endpoint()) {
                let ready = self.ready_members(member.endpoint());
                if member.drain(
                    EvictionReason::MaxLifetime,
                    &format!("age {age:?} reached max_lifetime {lifetime:?}"),
                ) {
                    self.lifetime_drain
                        .insert(member.endpoint().clone(), (member.clone(), Instant::now(), ready));
                }
                self.untrack(id);
                return;
            }
            self.reschedule(id, RETRY_RETIREMENT);
            return;
        }
        if let Some(idle_timeout) = self.config.eviction.idle_timeout.filter(|t| idle >= *t && in_flight == 0)
        {
            if self.ready_members(member.endpoint()) > self.monitor.min_connections() {
                member.drain(
                    EvictionReason::IdleTimeout,
                    &format!("no stream for {idle:?} (idle_timeout {idle_timeout:?})"),
                );
                self.untrack(id);
                return;
            }
        }

        let mut next = Duration::MAX;
        if let (Some(keepalive), Some(time)) =
            (self.keepalive().cloned(), self.keepalive_time(member.endpoint()))
        {
            let time = first_ping_after.map_or(time, |first| first.min(time));
            let permitted = (keepalive.permit_without_stream || in_flight > 0)
                && self.may_ping_without_data(id, data_frames, keepalive.max_pings_without_data);
            if quiet >= time && permitted {
                let rpc = in_flight == 0 && self.ping_limited.contains(member.endpoint());
                self.start_probe(id, &member, rpc);
                // The entry comes back at the probe's deadline.
                self.reschedule(id, keepalive.timeout);
                return;
            } else if permitted {
                next = next.min(time - quiet);
            } else {
                next = next.min(time); // look again in case streams start
            }
        }
        if let Some(lifetime) = lifetime {
            next = next.min(lifetime.saturating_sub(age));
        }
        if let Some(idle_timeout) = self.config.eviction.idle_timeout {
            next = next.min(idle_timeout.saturating_sub(idle).max(if in_flight > 0 {
                idle_timeout
            } else {
                Duration::ZERO
            }));
        }
        if next == Duration::MAX {
            next = Duration::from_secs(60);
        }
        self.reschedule(id, next);
    }

    /// An endpoint check fell due: a `Check` call (poll mode, or a server without `Watch`),
    /// or (re)opening its `Watch`.
    fn start_check(&mut self, id: u64) {
        let (Some(checks), Some((channel, endpoint, removed, poll_only))) = (
            self.config.checks.clone(),
            self.endpoints.get_mut(&id).and_then(|e| {
                // This check sees every connection ready now.
                e.recheck = false;
                e.channel.clone().map(|c| (c, e.endpoint.clone(), e.removed.clone(), e.poll_only))
            }),
        ) else {
            return;
        };
        let mode = if poll_only { CheckMode::Poll } else { checks.mode };
        match mode {
            CheckMode::Poll => {
                let span = tracing::debug_span!("health_check", pool = %self.monitor.name(), endpoint = %endpoint, mode = "check");
                self.checks.push(Box::pin(tracing::Instrument::instrument(
                    async move {
                        let (verdict, latency) = checks::check(channel, checks.service, checks.timeout).await;
                        (id, verdict, latency)
                    },
                    span,
                )));
            }
            CheckMode::Watch => {
                // A `Watch` stream never ends by itself, so the connection it rides must be
                // one that takes new streams: on a draining one (GOAWAY, max_lifetime, endpoint
                // removed) it would hold the connection open, and a server shutting down
                // gracefully would wait for it forever. So it rides a ready member, and moves
                // when that member stops being ready. With none ready yet, it goes through the
                // endpoint's channel (which connects) and moves once one is.
                let member = self.ready_member(&endpoint);
                let monitor = self.monitor.clone();
                let reports = self.reports_tx.clone();
                let report = move |verdict| {
                    let _ = reports.send((id, verdict));
                };
                let span = tracing::debug_span!("health_check", pool = %self.monitor.name(), endpoint = %endpoint, mode = "watch");
                let watcher = async move {
                    let watched = match member.as_ref().and_then(|m| m.channel().map(|c| (m, c))) {
                        Some((member, channel)) => {
                            let watch = checks::watch(channel, checks.service, report);
                            watch_until(watch, &removed, || member.state() != MemberState::Ready).await
                        }
                        None => {
                            let watch = checks::watch(channel, checks.service, report);
                            let any_ready = || {
                                monitor
                                    .members()
                                    .iter()
                                    .any(|m| m.endpoint() == &endpoint && m.state() == MemberState::Ready)
                            };
                            watch_until(watch, &removed, any_ready).await
                        }
                    };
                    (id, watched)
                };
                self.watchers.push(Box::pin(tracing::Instrument::instrument(watcher, span)));
            }
        }
    }

    /// The endpoint's ready member with the fewest streams in flight, for a `Watch` stream.
    fn ready_member(&self, endpoint: &Endpoint) -> Option<MemberHandle> {
        self.by_endpoint
            .get(endpoint)?
            .iter()
            .filter_map(|id| self.members.get(id))
            .map(|tracked| (tracked.member.status(), &tracked.member))
            .filter(|(status, _)| status.state == MemberState::Ready)
            .min_by_key(|(status, _)| status.in_flight)
            .map(|(_, member)| member.clone())
    }

    /// Applies one check's verdict with the thresholds; a `Watch` status message changes the
    /// verdict at once.
    fn on_verdict(&mut self, id: u64, verdict: Verdict, latency: Option<Duration>, from_watch: bool) {
        let Some(checks) = self.config.checks.clone() else { return };
        let pool = self.monitor.name().to_owned();
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        let endpoint_label = health.endpoint.to_string();
        metrics::counter!(names::HEALTH_CHECKS, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint_label.clone(), names::LABEL_RESULT => verdict.result()).increment(1);
        if let Some(latency) = latency {
            metrics::histogram!(names::HEALTH_CHECK_DURATION, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint_label.clone()).record(latency.as_secs_f64());
        }
        let passed = match &verdict {
            Verdict::Serving => true,
            Verdict::Unimplemented => {
                if !health.unimplemented_logged {
                    health.unimplemented_logged = true;
                    tracing::info!(pool = %pool, endpoint = %endpoint_label, healthy = checks.unimplemented_is_healthy, "the server has no grpc.health.v1 service (UNIMPLEMENTED); treating it as {}", if checks.unimplemented_is_healthy { "healthy" } else { "unhealthy" });
                }
                checks.unimplemented_is_healthy
            }
            Verdict::Failed { .. } => false,
        };
        let immediate =
            from_watch && !matches!(&verdict, Verdict::Failed { result: "error" | "timeout", .. });
        if passed {
            health.successes += 1;
            health.failures = 0;
        } else {
            health.failures += 1;
            health.successes = 0;
        }
        tracing::debug!(pool = %pool, endpoint = %endpoint_label, result = verdict.result(), latency = ?latency, "health check");
        let turn_healthy =
            !health.healthy && passed && (immediate || health.successes >= checks.healthy_threshold);
        let turn_unhealthy =
            health.healthy && !passed && (immediate || health.failures >= checks.unhealthy_threshold);
        if turn_healthy || turn_unhealthy {
            health.healthy = turn_healthy;
            let reason = match &verdict {
                Verdict::Failed { detail, .. } => Some(format!("health check: {detail}")),
                Verdict::Unimplemented => Some("health check: no health service (UNIMPLEMENTED)".to_owned()),
                Verdict::Serving => None,
            };
            let endpoint = health.endpoint.clone();
            self.monitor.set_endpoint_health(&endpoint, turn_healthy, reason.as_deref());
        }
    }

    fn reschedule(&mut self, id: u64, after: Duration) {
        if let Some(tracked) = self.members.get_mut(&id) {
            let at = batched(self.epoch, Instant::now() + after.max(MIN_RECHECK));
            match &tracked.key {
                Some(key) => self.queue.reset_at(key, at),
                None => tracked.key = Some(self.queue.insert_at(Due::Member(id), at)),
            }
        }
    }

    /// One lifetime retirement at a time per endpoint: the previous one must have closed and
    /// its replacement be ready (the endpoint back to as many ready members as it had, up to
    /// `min_connections`), or the previous must be draining for long already.
    fn may_retire_for_lifetime(&self, endpoint: &Endpoint) -> bool {
        match self.lifetime_drain.get(endpoint) {
            None => true,
            Some((previous, since, ready_before)) => {
                let wanted = (*ready_before).min(self.monitor.min_connections()).max(1);
                let replaced =
                    previous.state() == MemberState::Closed && self.ready_members(endpoint) >= wanted;
                replaced || since.elapsed() >= DRAIN_HOLD
            }
        }
    }

    fn ready_members(&self, endpoint: &Endpoint) -> usize {
        self.by_endpoint
            .get(endpoint)
            .map(|ids| {
                ids.iter()
                    .filter(|id| self.members.get(id).is_some_and(|t| t.member.state() == MemberState::Ready))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Whether the member may have another PING under the server's PING policy: fewer than
    /// `most` (0: no limit) sent since the server last sent DATA or HEADERS, which resets
    /// the server's strike count (the C core's `Chttp2PingAbusePolicy::ResetPingStrikes`,
    /// grpc-go's `resetPingStrikes`). Past that, the member waits for data before its next
    /// PING, as the C core's client does with `max_pings_without_data`.
    fn may_ping_without_data(&mut self, id: u64, data_frames: u64, most: u32) -> bool {
        let Some(tracked) = self.members.get_mut(&id) else { return false };
        if tracked.data_frames != data_frames {
            tracked.data_frames = data_frames;
            tracked.pings_without_data = 0;
        }
        most == 0 || tracked.pings_without_data < most
    }

    /// Probes a quiet member: an HTTP/2 PING, or for `rpc` a health-check call on that
    /// connection (for servers that limit PINGs on idle connections).
    fn start_probe(&mut self, id: u64, member: &MemberHandle, rpc: bool) {
        self.probes_started += 1;
        let probe = self.probes_started;
        if let Some(tracked) = self.members.get_mut(&id) {
            tracked.probe = Some(probe);
            if !rpc {
                // A health-check call makes the server send HEADERS: only PINGs count.
                tracked.pings_without_data += 1;
            }
        }
        let member = member.clone();
        let service = if rpc { self.config.checks.as_ref().map(|c| c.service.clone()) } else { None };
        // The probe's deadline is the member's queue entry, due after the keepalive timeout
        // (rounded up to the batch grid); the PING's own bound, a little later, is a backstop
        // that also closes the connection should the task be late.
        let backstop = self.keepalive().map(|k| k.timeout).unwrap_or(Duration::from_secs(20)) + 2 * BATCH;
        self.probes.push(Box::pin(async move {
            let result = match (rpc, member.channel()) {
                (true, Some(channel)) => checks::probe(channel, service.unwrap_or_default()).await,
                _ => member.ping(backstop).await.map_err(|e: Error| e.to_string()),
            };
            (id, probe, result)
        }));
    }

    fn ping_metrics(&mut self, endpoint: &Endpoint) -> &PingMetrics {
        if !self.ping_metrics.contains_key(endpoint) {
            let metrics = PingMetrics::new(self.monitor.name(), endpoint);
            self.ping_metrics.insert(endpoint.clone(), metrics);
        }
        &self.ping_metrics[endpoint]
    }

    fn on_pong(&mut self, id: u64, probe: u64, result: Result<Duration, String>) {
        let Some(tracked) = self.members.get_mut(&id) else { return };
        if tracked.probe != Some(probe) {
            return; // answered after its deadline; the member was dealt with then
        }
        tracked.probe = None;
        tracked.first_ping_after = None;
        let member = tracked.member.clone();
        match result {
            Ok(rtt) => {
                let metrics = self.ping_metrics(member.endpoint());
                metrics.ok.increment(1);
                metrics.rtt.record(rtt.as_secs_f64());
                tracing::trace!(member = id, rtt = ?rtt, "keepalive PONG");
                // Due again at whichever comes first: the next PING, its idle or lifetime end.
                self.check(id);
            }
            Err(error) => {
                self.ping_metrics(member.endpoint()).error.increment(1);
                tracing::debug!(member = id, error = %error, "keepalive probe failed");
                // The connection failed; the pool is taking it out already.
                self.reschedule(id, MIN_RECHECK);
            }
        }
    }

    /// A probe got no answer within the keepalive timeout: the connection is dead.
    fn on_probe_timeout(&mut self, id: u64, member: &MemberHandle) {
        self.ping_metrics(member.endpoint()).timeout.increment(1);
        let timeout = self.keepalive().map(|k| k.timeout).unwrap_or_default();
        member.kill(EvictionReason::PingTimeout, &format!("no PONG within keepalive timeout {timeout:?}"));
        // Its probe ends when the connection does; the answer finds no member.
        self.untrack(id);
    }
}

/// Runs a `Watch` stream until it ends (as it says), its endpoint is removed (`Ended`), or
/// `should_move` holds (`Moving`: reopen it elsewhere at once), looking every
/// [`WATCH_RECHECK`].
async fn watch_until(
    watch: impl Future<Output = WatchEnd>,
    removed: &AtomicBool,
    mut should_move: impl FnMut() -> bool,
) -> Watched {
    let left = async {
        let mut ticks = tokio::time::interval(WATCH_RECHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if removed.load(Ordering::Relaxed) {
                return false;
            }
            if should_move() {
                return true;
            }
        }
    };
    tokio::select! {
        end = watch => match end {
            WatchEnd::Ended => Watched::Ended,
            WatchEnd::Unimplemented => Watched::Unimplemented,
        },
        moving = left => if moving { Watched::Moving } else { Watched::Ended },
    }
}
