//! What a pool shows to its maintenance task: members to watch, PINGs to send, members to
//! drain or kill, and events as members come and go.
//!
//! The health task of `grpc-pool-health` is built on this; so can be any other policy. A
//! [`PoolMonitor`] does not keep the pool open (dropping the last [`Pool`] handle
//! still closes it), and a [`MemberHandle`] does not keep its connection open.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::api::Pool;
use crate::call::{EndpointChannel, MemberChannel};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::events::MemberEvent;
use crate::inner::PoolInner;
use crate::member::{EvictionReason, Member, MemberState};
use crate::proto::h2::ping::{PingError, SentPing as SentOnConnection};

/// A pool's maintenance view, from [`Pool::monitor`](crate::Pool::monitor).
///
/// ```no_run
/// # async fn run(pool: grpc_pool_core::Pool) {
/// let monitor = pool.monitor();
/// let mut events = monitor.subscribe();
/// tokio::select! {
///     _ = monitor.closed() => {}
///     Some(event) = events.recv() => println!("{event:?}"),
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct PoolMonitor {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// The maintenance view of the pool, for a health task: members, PINGs, events. It does
    /// not keep the pool open.
    pub fn monitor(&self) -> PoolMonitor {
        PoolMonitor { inner: self.inner().clone() }
    }
}

impl PoolMonitor {
    /// The pool's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The pool's endpoints now, in the order they were added.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.inner.endpoints().iter().map(|e| e.endpoint().clone()).collect()
    }

    /// `min_connections` per endpoint.
    pub fn min_connections(&self) -> usize {
        self.inner.config.min_connections
    }

    /// Every member listed now (ready or draining), over all endpoints.
    pub fn members(&self) -> Vec<MemberHandle> {
        self.inner
            .endpoints()
            .iter()
            .flat_map(|entry| {
                entry
                    .members()
                    .iter()
                    .map(|m| MemberHandle::new(Arc::downgrade(&self.inner), m))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Marks an endpoint healthy (it takes new streams) or unhealthy (it takes none, unless
    /// every endpoint is unhealthy and the pool routes to all then), with the reason shown in
    /// `Pool::state()` and the fail-fast error. Unknown endpoints are ignored.
    pub fn set_endpoint_health(&self, endpoint: &Endpoint, healthy: bool, reason: Option<&str>) {
        if let Some(entry) = self.inner.entry(endpoint) {
            self.inner.set_endpoint_health(&entry, healthy, reason.map(str::to_owned));
        }
    }

    /// Whether `endpoint` is failing (`None` for one the pool does not have): it takes no new
    /// streams (unhealthy, ejected), or it has no ready connection and its connects fail.
    /// For a policy above the pool that moves calls elsewhere when endpoints fail (an xDS
    /// priority failover).
    pub fn is_endpoint_failing(&self, endpoint: &Endpoint) -> Option<bool> {
        self.inner.entry(endpoint).map(|entry| entry.is_failing())
    }

    /// Caps the pool's calls in flight, as [`Pool::set_max_requests`] does: for a policy that
    /// follows a control plane's circuit breakers without keeping the pool open.
    pub fn set_max_requests(&self, max: Option<u32>) {
        self.inner.requests.set(max);
    }

    /// Puts other outlier detection settings in force, as
    /// [`Pool::override_outlier_detection`] does.
    pub fn override_outlier_detection(&self, settings: Option<crate::OutlierDetection>) -> Result<(), Error> {
        let Some(reports) = &self.inner.outliers else {
            if settings.is_none() {
                return Ok(()); // the pool's own (none) is what it has
            }
            return Err(Error::invalid_config(
                "outlier_detection",
                "(none at build)",
                "a pool built with outlier detection (OutlierDetection::off() ejects nothing) to override it",
            ));
        };
        if let Some(settings) = &settings {
            crate::config::check_outliers(settings)?;
        }
        reports.outliers.set(settings);
        Ok(())
    }

    /// Whether `endpoint` takes new streams as far as health goes (`None` for an endpoint the
    /// pool does not have): what the last [`set_endpoint_health`](Self::set_endpoint_health)
    /// said, for a health task that starts over.
    pub fn is_endpoint_healthy(&self, endpoint: &Endpoint) -> Option<bool> {
        self.inner.entry(endpoint).map(|entry| entry.is_healthy())
    }

    /// A `tower::Service` that sends calls to `endpoint` only, healthy or not: for health
    /// checks. `None` for an endpoint the pool does not have; once the endpoint is removed,
    /// its calls fail at once.
    pub fn endpoint_channel(&self, endpoint: &Endpoint) -> Option<EndpointChannel> {
        self.inner.entry(endpoint).map(|entry| EndpointChannel::new(self.inner.clone(), &entry))
    }

    /// Events from now on: members that become ready, GOAWAYs received, endpoints added and
    /// removed.
    pub fn subscribe(&self) -> MonitorEvents {
        MonitorEvents { events: self.inner.subscribe(), pool: Arc::downgrade(&self.inner) }
    }

    /// Whether the pool was closed (or its last handle dropped).
    pub fn is_closed(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Resolves when the pool is closed (or its last handle dropped).
    pub async fn closed(&self) {
        self.inner.shutdown.cancelled().await
    }
}

impl fmt::Debug for PoolMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolMonitor").field("pool", &self.name()).finish()
    }
}

/// Something that happened to a pool's members, as the health task needs it (users read
/// [`PoolEvent`](crate::PoolEvent)s instead).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum MonitorEvent {
    /// A member connected and takes streams.
    MemberReady(MemberHandle),
    /// The server sent GOAWAY on a member (the pool drains it already).
    GoAway {
        /// The member.
        member: MemberHandle,
        /// The GOAWAY's error code (`ENHANCE_YOUR_CALM` with `too_many_pings` means the server
        /// thinks it was PINGed too often).
        reason: h2::Reason,
        /// The GOAWAY's debug data, as the server sent it.
        debug_data: Bytes,
    },
    /// An endpoint joined the pool (discovery, or `Pool::add_endpoint`).
    EndpointAdded(Endpoint),
    /// An endpoint left the pool; its members drain and close.
    EndpointRemoved(Endpoint),
}

/// The events of one [`PoolMonitor::subscribe`], in order; unbounded (its reader is the
/// pool's own health task, which keeps up: events come at the rate connections do).
#[derive(Debug)]
pub struct MonitorEvents {
    events: mpsc::UnboundedReceiver<MemberEvent>,
    pool: Weak<PoolInner>,
}

impl MonitorEvents {
    /// The next event; `None` once the pool is gone. Cancel-safe: an event is never lost
    /// to a `select!` that drops this future.
    pub async fn recv(&mut self) -> Option<MonitorEvent> {
        let event = self.events.recv().await?;
        let member = |member: &Arc<Member>| MemberHandle::new(self.pool.clone(), member);
        Some(match event {
            MemberEvent::Ready(m) => MonitorEvent::MemberReady(member(&m)),
            MemberEvent::GoAway { member: m, reason, debug_data } => {
                MonitorEvent::GoAway { member: member(&m), reason, debug_data }
            }
            MemberEvent::EndpointAdded(endpoint) => MonitorEvent::EndpointAdded(endpoint),
            MemberEvent::EndpointRemoved(endpoint) => MonitorEvent::EndpointRemoved(endpoint),
        })
    }
}

/// What [`MemberHandle::status`] read of a member; a closed member reads as `Closed` with
/// zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// Where it is in its life.
    pub state: MemberState,
    /// Streams open on it.
    pub in_flight: u32,
    /// Time since it connected.
    pub age: Duration,
    /// Time since a stream last started on it.
    pub idle: Duration,
    /// Time since the server last sent anything on it.
    pub since_last_read: Duration,
    /// DATA and HEADERS frames the server has sent on it so far: a PING sent after the last
    /// of them counts toward the server's PING policy (see `Keepalive`).
    pub data_frames: u64,
    /// PINGs sent on it since the server last sent DATA or HEADERS, by anyone (keepalive,
    /// a caller's check before use, the PING after a deadline): each may be a strike under
    /// the server's PING policy (see `Keepalive`).
    pub pings_without_data: u64,
}

/// A PING sent by [`MemberHandle::send_ping`], to ask [`MemberHandle::ping_answered`]
/// about later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentPing(SentOnConnection);

/// A member, seen from outside the pool. Holds no strong reference: once the pool lets go
/// of the member, every query answers as for a closed one.
#[derive(Clone)]
pub struct MemberHandle {
    id: u64,
    endpoint: Endpoint,
    member: Weak<Member>,
    pool: Weak<PoolInner>,
}

impl MemberHandle {
    pub(crate) fn new(pool: Weak<PoolInner>, member: &Arc<Member>) -> MemberHandle {
        MemberHandle {
            id: member.id,
            endpoint: member.endpoint.endpoint.clone(),
            member: Arc::downgrade(member),
            pool,
        }
    }

    /// The member's id, unique in its pool (`member` in logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The member's endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Where the member is in its life; `Closed` once the pool let go of it.
    pub fn state(&self) -> MemberState {
        self.member.upgrade().map(|m| m.state()).unwrap_or(MemberState::Closed)
    }

    /// Streams open on it now.
    pub fn in_flight(&self) -> u32 {
        self.member.upgrade().map(|m| m.in_flight()).unwrap_or(0)
    }

    /// Time since it connected.
    pub fn age(&self) -> Duration {
        self.member.upgrade().map(|m| m.age()).unwrap_or_default()
    }

    /// Time since a stream last started on it (since it connected, if none did).
    pub fn idle(&self) -> Duration {
        self.member.upgrade().map(|m| m.idle()).unwrap_or_default()
    }

    /// Time since the server last sent anything on it: a quiet connection is the one to
    /// PING.
    pub fn since_last_read(&self) -> Duration {
        self.member.upgrade().map(|m| m.signals.since_last_read()).unwrap_or_default()
    }

    /// Its state, in-flight streams, age, idle and quiet time, read together: one look at
    /// the member instead of one per question.
    pub fn status(&self) -> MemberStatus {
        match self.member.upgrade() {
            Some(m) => MemberStatus {
                state: m.state(),
                in_flight: m.in_flight(),
                age: m.age(),
                idle: m.idle(),
                since_last_read: m.signals.since_last_read(),
                data_frames: m.signals.data_frames(),
                pings_without_data: m.signals.pings_without_data(),
            },
            None => MemberStatus {
                state: MemberState::Closed,
                in_flight: 0,
                age: Duration::ZERO,
                idle: Duration::ZERO,
                since_last_read: Duration::ZERO,
                data_frames: 0,
                pings_without_data: 0,
            },
        }
    }

    /// Streams opened on it since it connected.
    pub fn streams_opened(&self) -> u64 {
        self.member.upgrade().map(|m| m.streams_opened()).unwrap_or(0)
    }

    /// The round trip of its last answered PING.
    pub fn last_ping_rtt(&self) -> Option<Duration> {
        self.member.upgrade().and_then(|m| m.pinger.last_rtt())
    }

    /// A `tower::Service` that sends calls on this member only: for probing its connection
    /// with a real stream (a health check), which servers that limit PINGs accept. Calls fail
    /// with `UNAVAILABLE` once the member is no longer ready.
    pub fn channel(&self) -> Option<MemberChannel> {
        self.pool.upgrade().map(|pool| MemberChannel::new(pool, self.member.clone()))
    }

    /// Sends an HTTP/2 PING and waits up to `timeout` for the PONG; returns the round trip.
    /// No PONG in time means the connection is dead: the member is closed at once
    /// ([`EvictionReason::PingTimeout`]), so the calls on it fail now instead of hanging. Fails
    /// at once if another PING is in flight on this member or the member is gone. Safe to
    /// cancel: a PING whose waiter went away is collected by the next one.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, Error> {
        let member = self.member.upgrade().ok_or_else(|| self.gone())?;
        let label = &member.endpoint.label;
        match tokio::time::timeout(timeout, member.pinger.ping()).await {
            Ok(Ok(rtt)) => Ok(rtt),
            Ok(Err(PingError::Busy)) => Err(Error::ping(label, self.id, "a PING is already in flight")),
            Ok(Err(PingError::Connection(e))) => {
                Err(Error::ping(label, self.id, &format!("connection failed: {e}")))
            }
            Err(_) => {
                let what = format!("no PONG within {timeout:?}");
                if let Some(pool) = self.pool.upgrade() {
                    pool.kill(&member, EvictionReason::PingTimeout, &what);
                }
                Err(Error::ping(label, self.id, &format!("{what}; the connection was closed")))
            }
        }
    }

    /// How long the PING in flight on its connection has been out, if one is (whoever sent
    /// it): what [`MemberHandle::send_ping`] found when it said another PING is in flight.
    pub fn ping_out_for(&self) -> Option<Duration> {
        let member = self.member.upgrade()?;
        member.pinger.in_flight().then(|| member.signals.since_ping_sent())
    }

    /// Sends an HTTP/2 PING and returns at once, without waiting for the PONG: ask
    /// [`MemberHandle::ping_answered`] by the PING's deadline. The PONG is counted and timed
    /// ([`MemberHandle::last_ping_rtt`]) when the connection reads it, and wakes nobody: a
    /// keepalive over thousands of idle members costs one look per PING instead of a wake-up
    /// per PONG. Fails at once if another PING is in flight on this member (ask again a
    /// little later), its connection failed, or the member is gone.
    pub fn send_ping(&self) -> Result<SentPing, Error> {
        let member = self.member.upgrade().ok_or_else(|| self.gone())?;
        let label = &member.endpoint.label;
        match member.pinger.send() {
            Ok(sent) => Ok(SentPing(sent)),
            Err(PingError::Busy) => Err(Error::ping(label, self.id, "a PING is already in flight")),
            Err(PingError::Connection(e)) => {
                Err(Error::ping(label, self.id, &format!("connection failed: {e}")))
            }
        }
    }

    /// Whether the PONG of a PING sent with [`MemberHandle::send_ping`] has come; `false`
    /// once the member is gone.
    pub fn ping_answered(&self, sent: SentPing) -> bool {
        self.member.upgrade().is_some_and(|m| m.pinger.answered(sent.0))
    }

    /// Stops new streams on it; the ones in flight finish, then it closes. The pool
    /// replaces it as `min_connections` requires. Returns whether this call drained it.
    pub fn drain(&self, reason: EvictionReason, detail: &str) -> bool {
        match (self.pool.upgrade(), self.member.upgrade()) {
            (Some(pool), Some(member)) => pool.evict(&member, reason, detail),
            _ => false,
        }
    }

    /// Closes its connection now: streams in flight on it fail at once with `UNAVAILABLE`.
    /// For a connection known dead (no PONG), where draining would only make callers wait.
    pub fn kill(&self, reason: EvictionReason, detail: &str) -> bool {
        match (self.pool.upgrade(), self.member.upgrade()) {
            (Some(pool), Some(member)) => pool.kill(&member, reason, detail),
            _ => false,
        }
    }

    fn gone(&self) -> Error {
        Error::ping(&self.endpoint.to_string(), self.id, "the member is closed")
    }
}

impl fmt::Debug for MemberHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberHandle").field("id", &self.id).field("endpoint", &self.endpoint).finish()
    }
}
