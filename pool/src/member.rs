//! A member: one HTTP/2 connection of the pool, its state and its stream slots.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::clock::AtomicInstant;
use crate::endpoint::EndpointShared;
use crate::proto::h2::frames::ConnSignals;
use crate::proto::h2::ping::Pinger;
use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use crate::wait_queue::WaitQueue;

mod slots;
pub(crate) use slots::{Slot, Slots};

/// Where a member is in its life: `Connecting -> Ready -> Draining -> Closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// TCP and the HTTP/2 handshake are under way; the server has not sent SETTINGS yet.
    Connecting,
    /// Takes new streams.
    Ready,
    /// Takes no new streams; the ones in flight finish, then the connection closes.
    Draining,
    /// The connection is gone.
    Closed,
}

impl MemberState {
    fn from_u8(value: u8) -> MemberState {
        match value {
            0 => MemberState::Connecting,
            1 => MemberState::Ready,
            2 => MemberState::Draining,
            _ => MemberState::Closed,
        }
    }

    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Connecting => "connecting",
            MemberState::Ready => "ready",
            MemberState::Draining => "draining",
            MemberState::Closed => "closed",
        }
    }
}

/// Why a member stopped taking streams. Each is a `reason` label value of
/// [`EVICTIONS`](crate::metrics::EVICTIONS) and a field of every eviction's `tracing` event.
///
/// `IdleTimeout`, `MaxLifetime`, `PingTimeout` and `HealthFailed` come from the eviction
/// policy and health task of `grpc-pool-health`; the pool itself produces the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum EvictionReason {
    /// Carried no stream for `idle_timeout`.
    IdleTimeout,
    /// Reached its (jittered) `max_lifetime`; drained gracefully.
    MaxLifetime,
    /// The server sent GOAWAY; drained gracefully.
    GoAway,
    /// A keepalive PING got no answer in time.
    PingTimeout,
    /// The endpoint's health checks failed.
    HealthFailed,
    /// The connection failed: reset, broken pipe, protocol error.
    IoError,
    /// The server closed the connection without a GOAWAY.
    ClosedByPeer,
    /// Carried its lifetime's worth of streams (HTTP/2 stream ids run out at 2^31).
    MaxStreams,
    /// The pool was closed or dropped.
    PoolClosed,
    /// Its endpoint was removed from the pool (discovery); drained gracefully.
    EndpointRemoved,
}

impl EvictionReason {
    /// Every reason, in a fixed order (for statistics tables).
    pub const ALL: [EvictionReason; 10] = [
        EvictionReason::IdleTimeout,
        EvictionReason::MaxLifetime,
        EvictionReason::GoAway,
        EvictionReason::PingTimeout,
        EvictionReason::HealthFailed,
        EvictionReason::IoError,
        EvictionReason::ClosedByPeer,
        EvictionReason::MaxStreams,
        EvictionReason::PoolClosed,
        EvictionReason::EndpointRemoved,
    ];

    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::IdleTimeout => "idle_timeout",
            EvictionReason::MaxLifetime => "max_lifetime",
            EvictionReason::GoAway => "goaway",
            EvictionReason::PingTimeout => "ping_timeout",
            EvictionReason::HealthFailed => "health_failed",
            EvictionReason::IoError => "io_error",
            EvictionReason::ClosedByPeer => "closed_by_peer",
            EvictionReason::MaxStreams => "max_streams",
            EvictionReason::PoolClosed => "pool_closed",
            EvictionReason::EndpointRemoved => "endpoint_removed",
        }
    }

    pub(crate) fn index(self) -> usize {
        EvictionReason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for EvictionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const STATE_CONNECTING: u8 = 0;
const STATE_READY: u8 = 1;
const STATE_DRAINING: u8 = 2;
const STATE_CLOSED: u8 = 3;

/// One HTTP/2 connection of an endpoint.
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) endpoint: Arc<EndpointShared>,
    /// Cloned per call: each clone may open one stream without waiting on the others.
    send: h2::client::SendRequest<Bytes>,
    pub(crate) signals: Arc<ConnSignals>,
    pub(crate) pinger: Pinger,
    /// The connection's driver task; aborting it closes the connection at once.
    driver: OnceLock<tokio::task::AbortHandle>,
    waiters: Arc<WaitQueue<Slot>>,
    state: AtomicU8,
    /// The id of the newest stream opened on it (ids go 1, 3, 5, ...).
    last_stream_id: AtomicU32,
    /// Set while a call PINGs it before use; other calls that picked it wait for the answer.
    probing: AtomicBool,
    probe_done: tokio::sync::Notify,
    slots: Slots,
    /// The configured per-connection cap; the server's own limit applies too.
    cap: u32,
    /// The stream id at which it retires (`max_streams_per_connection`, or the id space).
    pub(crate) retire_at_stream_id: u32,
    created: Instant,
    /// When a stream last started.
    last_used: AtomicInstant,
}

impl Member {
    #[allow(clippy::too_many_arguments)] // one call site, each argument a different part
    pub(crate) fn new(
        id: u64,
        endpoint: Arc<EndpointShared>,
        send: h2::client::SendRequest<Bytes>,
        signals: Arc<ConnSignals>,
        pinger: Pinger,
        waiters: Arc<WaitQueue<Slot>>,
        cap: u32,
        retire_at_stream_id: u32,
    ) -> Member {
        Member {
            id,
            endpoint,
            send,
            signals,
            pinger,
            driver: OnceLock::new(),
            waiters,
            state: AtomicU8::new(STATE_CONNECTING),
            last_stream_id: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            probe_done: tokio::sync::Notify::new(),
            slots: Slots::new(),
            cap,
            retire_at_stream_id,
            created: Instant::now(),
            last_used: AtomicInstant::now(),
        }
    }

    pub(crate) fn state(&self) -> MemberState {
        MemberState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// `Connecting -> Ready`; false if the member moved on meanwhile.
    pub(crate) fn set_ready(&self) -> bool {
        self.state
            .compare_exchange(STATE_CONNECTING, STATE_READY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// `Ready -> Draining`; returns whether this call made the change.
    pub(crate) fn set_draining(&self) -> bool {
        self.state.compare_exchange(STATE_READY, STATE_DRAINING, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Any state `-> Closed`; returns the state before.
    pub(crate) fn set_closed(&self) -> MemberState {
        MemberState::from_u8(self.state.swap(STATE_CLOSED, Ordering::AcqRel))
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.slots.in_flight()
    }

    /// The most streams this member carries at once: the configured cap, or less if the
    /// server's `SETTINGS_MAX_CONCURRENT_STREAMS` says so.
    pub(crate) fn max_streams(&self) -> u32 {
        self.cap.min(self.signals.server_max_streams())
    }

    pub(crate) fn age(&self) -> Duration {
        self.created.elapsed()
    }

    pub(crate) fn idle(&self) -> Duration {
        self.last_used.elapsed()
    }

    pub(crate) fn set_driver(&self, driver: tokio::task::AbortHandle) {
        let _ = self.driver.set(driver);
    }

    /// Drops the connection now: every stream on it fails at once.
    pub(crate) fn abort_connection(&self) {
        if let Some(driver) = self.driver.get() {
            driver.abort();
        }
    }

    /// Whether a call is PINGing it before use right now.
    pub(crate) fn is_probing(&self) -> bool {
        self.probing.load(Ordering::Acquire)
    }

    /// Takes the prober's role; `None` if another call has it. The role ends when the guard
    /// drops, however the probe ends: answered, timed out, or its call cancelled.
    pub(crate) fn start_probe(self: &Arc<Self>) -> Option<ProbeGuard> {
        (!self.probing.swap(true, Ordering::AcqRel)).then(|| ProbeGuard(self.clone()))
    }

    /// Waits until no call is PINGing it.
    pub(crate) async fn probe_finished(&self) {
        crate::notify::until(&self.probe_done, || !self.is_probing()).await
    }

    pub(crate) fn record_stream_id(&self, id: u32) {
        self.last_stream_id.store(id, Ordering::Relaxed);
    }

    /// Streams opened on it so far.
    pub(crate) fn streams_opened(&self) -> u64 {
        u64::from(self.last_stream_id.load(Ordering::Relaxed)).div_ceil(2)
    }

    /// A sender for one new stream.
    pub(crate) fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.send.clone()
    }

    /// Takes a stream slot if the member is `Ready` and below its limit.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        if self.state.load(Ordering::Acquire) != STATE_READY {
            return None;
        }
        if !self.slots.try_take(self.max_streams()) {
            return None;
        }
        self.endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let unused_for = self.last_used.swap_now();
        let counted = self.endpoint.requests.count();
        Some(Slot::new(self.clone(), unused_for, counted))
    }

    /// Takes a stream slot if the member is `Ready`, even above its limit: the stream then
    /// waits in h2 until the server has room. For probes and health checks only.
    pub(crate) fn force_acquire(self: &Arc<Self>) -> Option<Slot> {
        if self.state.load(Ordering::Acquire) != STATE_READY {
            return None;
        }
        self.slots.force_take();
        self.endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        // Probes and health checks are not calls: never counted against the cap.
        Some(Slot::new(self.clone(), Duration::ZERO, false))
    }
}

/// The prober's role on a member (see [`Member::start_probe`]).
pub(crate) struct ProbeGuard(Arc<Member>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
        self.0.probe_done.notify_waiters();
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint.endpoint)
            .field("state", &self.state())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::internals::EndpointEntry;

    /// A member over an in-memory pipe that no server answers: enough for its clocks and
    /// slots. The pipe's other end and the connection are returned to keep them open.
    async fn unanswered_member() -> (Arc<Member>, impl Sized) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (send, connection) = h2::client::handshake(client).await.expect("h2 client preface");
        let entry =
            EndpointEntry::new(Endpoint::parse("http://127.0.0.1:1").unwrap(), 1, None, Default::default());
        let signals = Arc::new(ConnSignals::new());
        let member = Member::new(
            1,
            entry.shared.clone(),
            send,
            signals.clone(),
            Pinger::new(None, signals),
            Arc::default(),
            10,
            u32::MAX,
        );
        (Arc::new(member), (server, connection, entry))
    }

    /// Every timestamp a member keeps is on tokio's clock, so that the health task's rules
    /// (idle, lifetime, keepalive) can be tested on a paused clock.
    #[tokio::test(start_paused = true)]
    async fn age_idle_and_quiet_time_follow_tokio_time() {
        let (member, _keep) = unanswered_member().await;
        assert!(member.set_ready());
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(member.age(), Duration::from_secs(7));
        assert_eq!(member.idle(), Duration::from_secs(7));
        assert_eq!(member.signals.since_last_read(), Duration::from_secs(7));

        let slot = member.try_acquire().expect("a free slot");
        assert_eq!(slot.unused_for, Duration::from_secs(7));
        assert_eq!(member.idle(), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(member.idle(), Duration::from_millis(1500));
        assert_eq!(member.age(), Duration::from_millis(8500));
        assert_eq!(member.signals.since_last_read(), Duration::from_millis(8500));
    }
}
