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

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use grpc_pool_core::metrics as names;
use grpc_pool_core::{Endpoint, Error, EvictionReason, MemberHandle, MemberState, PoolEvent, PoolMonitor};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::time::delay_queue::{DelayQueue, Key};

use crate::config::{HealthConfig, Keepalive};

/// Longest keepalive time after `too_many_pings` doublings.
const MAX_KEEPALIVE_TIME: Duration = Duration::from_secs(2 * 60 * 60);
/// How often a member whose retirement must wait (another one of its endpoint is draining
/// for its lifetime) is looked at again.
const RETRY_RETIREMENT: Duration = Duration::from_millis(250);
/// A lifetime drain that has not finished after this long no longer holds back the next.
const DRAIN_HOLD: Duration = Duration::from_secs(30);
/// Entries are never due sooner than this after being looked at: bounds the work per member.
const MIN_RECHECK: Duration = Duration::from_millis(5);

type Ping =
    Pin<Box<dyn Future<Output = (u64, Result<Result<Duration, Error>, tokio::time::error::Elapsed>)> + Send>>;

/// Starts the health task of the pool behind `monitor`. It ends by itself when the pool
/// closes or its last handle is dropped.
pub fn spawn(monitor: PoolMonitor, config: HealthConfig) -> JoinHandle<()> {
    tokio::spawn(Task::new(monitor, config).run())
}

struct Tracked {
    member: MemberHandle,
    /// Its entry in the queue; `None` while it is being looked at (the entry fired).
    key: Option<Key>,
    /// This member's jittered `max_lifetime`.
    lifetime: Option<Duration>,
    pinging: bool,
}

struct Task {
    monitor: PoolMonitor,
    config: HealthConfig,
    queue: DelayQueue<u64>,
    members: HashMap<u64, Tracked>,
    by_endpoint: HashMap<Endpoint, HashSet<u64>>,
    pings: FuturesUnordered<Ping>,
    /// Keepalive time per endpoint, raised after `too_many_pings`.
    keepalive_time: HashMap<Endpoint, Duration>,
    /// The member each endpoint last drained for its lifetime, when, and how many of the
    /// endpoint's members were ready then.
    lifetime_drain: HashMap<Endpoint, (MemberHandle, Instant, usize)>,
    jitter: RandomState,
}

impl Task {
    fn new(monitor: PoolMonitor, config: HealthConfig) -> Task {
        Task {
            monitor,
            config,
            queue: DelayQueue::new(),
            members: HashMap::new(),
            by_endpoint: HashMap::new(),
            pings: FuturesUnordered::new(),
            keepalive_time: HashMap::new(),
            lifetime_drain: HashMap::new(),
            jitter: RandomState::new(),
        }
    }

    async fn run(mut self) {
        // Subscribe first, then list: a member may show up twice, never zero times.
        let mut events = self.monitor.subscribe();
        for member in self.monitor.members() {
            self.track(member);
        }
        let monitor = self.monitor.clone();
        let closed = monitor.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                _ = &mut closed => break,
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
                Some(expired) = poll_fn(|cx| self.queue.poll_expired(cx)), if !self.queue.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(tracked) = self.members.get_mut(&id) {
                        tracked.key = None;
                    }
                    self.check(id);
                }
                Some((id, result)) = self.pings.next(), if !self.pings.is_empty() => {
                    self.on_pong(id, result);
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
        let lifetime = self.config.eviction.max_lifetime.map(|lifetime| {
            let mut hasher = self.jitter.build_hasher();
            hasher.write_u64(id);
            let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            lifetime.mul_f64(1.0 + 0.1 * unit)
        });
        self.by_endpoint.entry(member.endpoint().clone()).or_default().insert(id);
        let key = Some(self.queue.insert(id, MIN_RECHECK));
        self.members.insert(id, Tracked { member, key, lifetime, pinging: false });
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

    fn on_event(&mut self, event: PoolEvent) {
        match event {
            PoolEvent::MemberReady(member) => self.track(member),
            PoolEvent::GoAway { member, reason, debug_data } => {
                let too_many_pings =
                    reason == h2::Reason::ENHANCE_YOUR_CALM && debug_data.as_ref() == b"too_many_pings";
                if too_many_pings {
                    self.back_off_keepalive(member.endpoint());
                }
            }
            _ => {}
        }
    }

    /// The server thinks it is PINGed too often: double this endpoint's keepalive time, as
    /// grpc-go does, and say which server setting to align.
    fn back_off_keepalive(&mut self, endpoint: &Endpoint) {
        let Some(current) = self.keepalive_time(endpoint) else { return };
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
             grpc-go: keepalive.EnforcementPolicy MinTime and PermitWithoutStream), or raise keepalive.time"
        );
    }

    /// Looks at one member whose entry fell due; acts, and puts the entry back.
    fn check(&mut self, id: u64) {
        let Some(tracked) = self.members.get(&id) else { return };
        let member = tracked.member.clone();
        let state = member.state();
        if matches!(state, MemberState::Closed | MemberState::Draining) {
            // Nothing more to do for it; the pool closes it when its streams end.
            self.untrack(id);
            return;
        }
        let (lifetime, pinging) = (tracked.lifetime, tracked.pinging);
        let age = member.age();
        let idle = member.idle();
        let in_flight = member.in_flight();

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
            let quiet = member.since_last_read();
            let permitted = keepalive.permit_without_stream || in_flight > 0;
            if pinging {
                // Its PING's timeout brings it back.
            } else if quiet >= time && permitted {
                self.start_ping(id, &member, keepalive.timeout);
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

    fn reschedule(&mut self, id: u64, after: Duration) {
        if let Some(tracked) = self.members.get_mut(&id) {
            let after = after.max(MIN_RECHECK);
            match &tracked.key {
                Some(key) => self.queue.reset(key, after),
                None => tracked.key = Some(self.queue.insert(id, after)),
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

    fn start_ping(&mut self, id: u64, member: &MemberHandle, timeout: Duration) {
        if let Some(tracked) = self.members.get_mut(&id) {
            tracked.pinging = true;
        }
        let member = member.clone();
        self.pings.push(Box::pin(async move { (id, tokio::time::timeout(timeout, member.ping()).await) }));
    }

    fn on_pong(&mut self, id: u64, result: Result<Result<Duration, Error>, tokio::time::error::Elapsed>) {
        let Some(tracked) = self.members.get_mut(&id) else { return };
        tracked.pinging = false;
        let member = tracked.member.clone();
        let pool = self.monitor.name().to_owned();
        let endpoint = member.endpoint().to_string();
        match result {
            Ok(Ok(rtt)) => {
                metrics::counter!(names::PINGS, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint.clone(), names::LABEL_RESULT => "ok").increment(1);
                metrics::histogram!(names::PING_RTT, names::LABEL_POOL => pool, names::LABEL_ENDPOINT => endpoint).record(rtt.as_secs_f64());
                tracing::trace!(member = id, rtt = ?rtt, "keepalive PONG");
                let time = self.keepalive_time(member.endpoint()).unwrap_or(Duration::from_secs(60));
                self.reschedule(id, time);
            }
            Ok(Err(error)) => {
                metrics::counter!(names::PINGS, names::LABEL_POOL => pool, names::LABEL_ENDPOINT => endpoint, names::LABEL_RESULT => "error").increment(1);
                tracing::debug!(member = id, error = %error, "keepalive PING failed");
                // The connection failed; the pool is taking it out already.
                self.reschedule(id, MIN_RECHECK);
            }
            Err(_) => {
                metrics::counter!(names::PINGS, names::LABEL_POOL => pool, names::LABEL_ENDPOINT => endpoint, names::LABEL_RESULT => "timeout").increment(1);
                let timeout = self.keepalive().map(|k| k.timeout).unwrap_or_default();
                member.kill(
                    EvictionReason::PingTimeout,
                    &format!("no PONG within keepalive timeout {timeout:?}"),
                );
                self.untrack(id);
            }
        }
    }
}
