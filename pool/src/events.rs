//! What happens to a pool, as a stream of events a user can follow: connections opened and
//! closed with their reason, endpoints joining and leaving, their health and ejections, and
//! GOAWAYs with their code and text, so a timeline can be built without polling `state()`.
//!
//! The stream is bounded: each subscriber has room for [`EVENT_BUFFER`] events, and one that
//! falls further behind loses the oldest and reads [`PoolEvent::Missed`] with how many, so a
//! slow subscriber costs memory up to that bound and never slows the pool.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::endpoint::Endpoint;
use crate::member::{EvictionReason, Member};

/// How many events a subscriber may fall behind before it misses some.
pub const EVENT_BUFFER: usize = 1024;

/// Something that happened to a pool, from [`PoolEvents`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A connection to `endpoint` is up and takes calls.
    ConnectionOpened {
        /// Its endpoint.
        endpoint: Endpoint,
        /// Its id in the pool (`member` in logs and in `State`).
        connection: u64,
    },
    /// A connection was taken out of service: it takes no new calls, and closes now or once
    /// its calls in flight end.
    ConnectionClosed {
        /// Its endpoint.
        endpoint: Endpoint,
        /// Its id in the pool.
        connection: u64,
        /// Why.
        reason: EvictionReason,
        /// The details (the error, the GOAWAY, the PING that went unanswered...).
        detail: String,
    },
    /// The server sent GOAWAY on a connection (the pool drains it already).
    GoAway {
        /// Its endpoint.
        endpoint: Endpoint,
        /// The connection's id in the pool.
        connection: u64,
        /// The HTTP/2 error code (RFC 9113, section 7): 0 `NO_ERROR` for a graceful close,
        /// 11 `ENHANCE_YOUR_CALM` (with debug text `too_many_pings`: the server thinks it
        /// was PINGed too often).
        code: u32,
        /// The GOAWAY's debug data, as text (invalid UTF-8 replaced).
        debug_data: String,
    },
    /// An endpoint joined the pool (discovery, or `add_endpoint`).
    EndpointAdded(Endpoint),
    /// An endpoint left the pool; its connections drain and close.
    EndpointRemoved(Endpoint),
    /// Health checks marked an endpoint unhealthy (it takes no new calls) or healthy again.
    EndpointHealth {
        /// The endpoint.
        endpoint: Endpoint,
        /// Its verdict now.
        healthy: bool,
        /// Why it is unhealthy, when it is.
        reason: Option<String>,
    },
    /// Outlier detection took an endpoint out of routing for `duration`.
    EndpointEjected {
        /// The endpoint.
        endpoint: Endpoint,
        /// How long it stays out.
        duration: Duration,
    },
    /// An ejected endpoint is back in routing.
    EndpointReturned(Endpoint),
    /// This subscriber fell more than [`EVENT_BUFFER`] events behind and lost the oldest
    /// `count` of them.
    Missed {
        /// Events lost.
        count: u64,
    },
}

/// A subscription to a pool's events, from `Pool::events`. Each subscriber sees every event
/// from the moment it subscribed, unless it falls behind (see [`PoolEvent::Missed`]).
#[derive(Debug)]
pub struct PoolEvents {
    receiver: broadcast::Receiver<PoolEvent>,
}

impl PoolEvents {
    pub(crate) fn new(receiver: broadcast::Receiver<PoolEvent>) -> PoolEvents {
        PoolEvents { receiver }
    }

    /// The next event; `None` once the pool is gone (closed, and every task of it ended).
    pub async fn recv(&mut self) -> Option<PoolEvent> {
        match self.receiver.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(count)) => Some(PoolEvent::Missed { count }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<PoolEvent> {
        match self.receiver.try_recv() {
            Ok(event) => Some(event),
            Err(broadcast::error::TryRecvError::Lagged(count)) => Some(PoolEvent::Missed { count }),
            Err(_) => None,
        }
    }
}
/// What the pool tells its monitor (the health task) of members and endpoints, in the pool's
/// own terms: `PoolMonitor`'s `MonitorEvents` turns each into a public `MonitorEvent`, so the
/// pool's core needs nothing of the monitor's types.
#[derive(Debug, Clone)]
pub(crate) enum MemberEvent {
    Ready(Arc<Member>),
    GoAway { member: Arc<Member>, reason: h2::Reason, debug_data: Bytes },
    EndpointAdded(Endpoint),
    EndpointRemoved(Endpoint),
}
