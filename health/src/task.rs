//! The health task: one per pool, one timer queue for all its members.
//!
//! (`max_streams_per_connection` is enforced by the pool itself, on the call that reaches the
//! limit; the task handles the time-based rules.)
//!
//! Every member has one entry in a timer queue (`grid`), due at the earliest moment something may
//! need doing to it: a keepalive PING (quiet for `time`), idle retirement, lifetime
//! retirement. When an entry fires, the member's state is read (a few atomics) and the entry
//! is put back for the next such moment; busy members just move their entry along.
//!
//! A keepalive PING is sent without waiting for its PONG: the member's entry comes back at
//! the PING's deadline and asks whether the PONG came (the connection counts them as it
//! reads them). So 1,000 PINGs a second cost the task its batched timer wake-ups and
//! nothing per PONG. Health-check RPC probes (for servers that limit PINGs) are futures
//! polled by the same task, not tasks of their own.
//!
//! This file holds the task's state, its loop, and the look at a member that falls due;
//! `members` follows the pool's members and endpoints as they come and go, `verdicts` the
//! `grpc.health.v1` checks, `probes` the PINGs and their answers, and `supervisor` the
//! restart after a panic.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use grpc_pool_core::metrics as names;
use grpc_pool_core::{
    Endpoint, EvictionReason, MemberHandle, MemberState, MemberStatus, MonitorEvent, MonitorEvents,
    PoolMonitor, SentPing,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tokio_util::time::delay_queue::{DelayQueue, Key};

use crate::checks::{self, Verdict, WatchEnd};

mod grid;
mod members;
mod probes;
mod supervisor;
#[cfg(test)]
mod tests;
mod verdicts;

#[cfg(feature = "test-hooks")]
pub use supervisor::__test;
pub use supervisor::spawn;

use crate::config::{CheckMode, HealthConfig, Keepalive};
use grid::{GridKey, GridQueue};
use grpc_pool_core::call::EndpointChannel;
use probes::{may_ping_without_data, PingMetrics};

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

/// A health-check RPC probe of one member: (member id, probe number, round trip). Its
/// deadline is the member's queue entry, not a timer of its own.
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

/// Hashes member ids, which the pool hands out in sequence: a multiplication spreads them
/// over the table, where the standard SipHash (made to resist chosen keys, which a counter
/// is not) cost a few hundred instructions per PING in lookups.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0 ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: the golden ratio's 64-bit fraction, odd, so ids map one to one.
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Tracked members by id.
type ById<T> = HashMap<u64, T, BuildHasherDefault<IdHasher>>;

/// A uniformly distributed number in `[-1, 1)`, for symmetric jitter.
fn symmetric_unit() -> f64 {
    fastrand::f64() * 2.0 - 1.0
}

/// `interval` spread by +/-10%, differently on each call.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(1.0 + 0.1 * symmetric_unit())
}

struct Tracked {
    member: MemberHandle,
    /// Its entry in the queue; `None` while it is being looked at (the entry fired).
    key: Option<GridKey>,
    /// This member's jittered `max_lifetime`.
    lifetime: Option<Duration>,
    /// The number of the probe in flight, if one is: its queue entry is then its deadline.
    probe: Option<u64>,
    /// The PING in flight, if the probe is one, and its deadline.
    ping: Option<(SentPing, Instant)>,
    /// Its endpoint's PING metrics, looked up once: hashing an endpoint per PING cost more
    /// than the rest of the task's work for it.
    ping_metrics: Arc<PingMetrics>,
    /// How quiet it must be for its first keepalive PING: somewhere between half the
    /// keepalive time and all of it, so that connections opened together (a pool starting,
    /// an endpoint coming back) do not PING together ever after. Later PINGs wait the full
    /// keepalive time, which the server's PING policy may be tuned to.
    first_ping_after: Option<Duration>,
}

struct Task {
    monitor: PoolMonitor,
    config: HealthConfig,
    /// Each tracked member's next look, on the [`BATCH`] grid.
    members_due: GridQueue<u64>,
    /// Each endpoint's next health check (by its id in the task: ids are never reused, so an
    /// entry or a check result of a removed endpoint finds nothing and is dropped), at the
    /// exact interval.
    checks_due: DelayQueue<u64>,
    members: ById<Tracked>,
    by_endpoint: HashMap<Endpoint, HashSet<u64>>,
    /// Health-check RPC probes in flight (PINGs are not waited for).
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
    /// Probes started so far; numbers them, so that a late answer is not taken for the
    /// current probe's.
    probes_started: u64,
    /// PING metrics per endpoint, labelled once.
    ping_metrics: HashMap<Endpoint, Arc<PingMetrics>>,
}

impl Task {
    fn new(monitor: PoolMonitor, config: HealthConfig) -> Task {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        Task {
            monitor,
            config,
            members_due: GridQueue::new(Instant::now(), BATCH),
            checks_due: DelayQueue::new(),
            members: ById::default(),
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
            probes_started: 0,
            ping_metrics: HashMap::new(),
        }
    }

    async fn run(mut self) {
        let mut events = self.start();
        self.serve(&mut events).await;
        tracing::debug!(pool = %self.monitor.name(), "health task ended");
    }

    /// Takes in the pool's members and endpoints as they are now, and the events from then.
    fn start(&mut self) -> MonitorEvents {
        // Subscribe first, then list: a member may show up twice, never zero times.
        let events = self.monitor.subscribe();
        for member in self.monitor.members() {
            self.track(member);
        }
        for endpoint in self.monitor.endpoints() {
            self.add_endpoint(endpoint);
        }
        events
    }

    /// The task's loop, until the pool closes.
    async fn serve(&mut self, events: &mut MonitorEvents) {
        let monitor = self.monitor.clone();
        let closed = monitor.closed();
        tokio::pin!(closed);
        loop {
            #[cfg(feature = "test-hooks")]
            __test::maybe_panic(monitor.name());
            // `biased`: branches are looked at in this order, not a random one, so that the
            // task does the same for the same inputs (the simulation replays seeds exactly).
            tokio::select! {
                biased;
                _ = &mut closed => break,
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
                id = poll_fn(|cx| self.members_due.poll_expired(cx)), if !self.members_due.is_empty() => {
                    if let Some(tracked) = self.members.get_mut(&id) {
                        tracked.key = None;
                    }
                    self.check(id);
                }
                Some(expired) = poll_fn(|cx| self.checks_due.poll_expired(cx)), if !self.checks_due.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(health) = self.endpoints.get_mut(&id) {
                        health.key = None;
                    }
                    self.start_check(id);
                }
                Some((id, probe, result)) = self.probes.next(), if !self.probes.is_empty() => {
                    self.on_rpc_probe(id, probe, result);
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
    }

    fn keepalive(&self) -> Option<&Keepalive> {
        self.config.keepalive.as_ref()
    }

    fn keepalive_time(&self, endpoint: &Endpoint) -> Option<Duration> {
        let keepalive = self.keepalive()?;
        Some(self.keepalive_time.get(endpoint).copied().unwrap_or(keepalive.time))
    }

    /// Looks at one member whose entry fell due; acts, and puts the entry back.
    fn check(&mut self, id: u64) {
        let Some(tracked) = self.members.get(&id) else { return };
        let member = tracked.member.clone();
        let (probe, ping) = (tracked.probe, tracked.ping);
        let status = member.status();
        let draining = status.state == MemberState::Draining;
        if status.state == MemberState::Closed || (draining && status.in_flight == 0) {
            // Nothing more to do for it; the pool closes a draining one as its streams end.
            self.untrack(id);
            return;
        }
        if let Some((sent, deadline)) = ping {
            if member.ping_answered(sent) {
                self.on_pong(id, &member);
            } else {
                let now = Instant::now();
                if now < deadline {
                    // Looked at before its deadline (its keepalive time is the shorter).
                    self.reschedule(id, deadline - now);
                } else {
                    self.on_probe_timeout(id, &member);
                }
                return;
            }
        } else if probe.is_some() {
            // Its entry fired while a probe was out: the probe's deadline passed.
            self.on_probe_timeout(id, &member);
            return;
        }
        let Some(tracked) = self.members.get(&id) else { return };
        let (lifetime, first_ping_after) = (tracked.lifetime, tracked.first_ping_after);
        let MemberStatus { age, idle, in_flight, since_last_read: quiet, pings_without_data, .. } = status;
        // A draining member with streams left is only kept alive or found dead: its streams
        // may wait on a connection that went silent (a call without a deadline would wait
        // for ever), so keepalive goes on PINGing it until the last one ends.
        let lifetime = lifetime.filter(|_| !draining);

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
                // Looked at again as a draining member: kept alive while its streams last.
                self.reschedule(id, MIN_RECHECK);
                return;
            }
            self.reschedule(id, RETRY_RETIREMENT);
            return;
        }
        if let Some(idle_timeout) =
            self.config.eviction.idle_timeout.filter(|t| idle >= *t && in_flight == 0 && !draining)
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
                && may_ping_without_data(pings_without_data, keepalive.max_pings_without_data);
            if quiet >= time && permitted {
                let rpc = in_flight == 0 && self.ping_limited.contains(member.endpoint());
                if self.start_probe(id, &member, rpc, keepalive.timeout) {
                    // The entry comes back at the probe's deadline, or after the keepalive
                    // time if that is shorter: an answered PING is seen by then.
                    self.reschedule(id, keepalive.timeout.min(time));
                } else {
                    // Another's PING is out: look again when it has had the keepalive timeout.
                    let left = member
                        .ping_out_for()
                        .map_or(MIN_RECHECK, |out| keepalive.timeout.saturating_sub(out));
                    self.reschedule(id, left.max(MIN_RECHECK));
                }
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
        if let Some(idle_timeout) = self.config.eviction.idle_timeout.filter(|_| !draining) {
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
}
