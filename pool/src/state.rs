//! What `Pool::state()` shows: every endpoint and member, and the pool's statistics.

use std::time::Duration;

use crate::endpoint::Endpoint;
use crate::inner::PoolInner;
use crate::member::MemberState;
use crate::stats::Statistics;

impl PoolInner {
    /// A snapshot of every endpoint and member, and the statistics.
    pub(crate) fn state(&self) -> State {
        let endpoints = self
            .endpoints()
            .iter()
            .map(|entry| {
                let members = entry
                    .members()
                    .iter()
                    .map(|m| MemberSnapshot {
                        id: m.id,
                        state: m.state(),
                        in_flight: m.in_flight(),
                        max_streams: m.max_streams(),
                        age: m.age(),
                        idle: m.idle(),
                        last_ping_rtt: m.pinger.last_rtt(),
                    })
                    .collect();
                let locked = entry.lock();
                EndpointState {
                    endpoint: entry.shared.endpoint.clone(),
                    healthy: entry.is_healthy(),
                    health_reason: locked.health_reason.clone(),
                    members,
                    connecting: locked.connecting,
                    in_flight: entry.in_flight(),
                    consecutive_failures: locked.consecutive_failures,
                    last_connect_error: locked.last_error.clone(),
                    ejected_for: locked
                        .ejected_until
                        .map(|until| until.saturating_duration_since(tokio::time::Instant::now())),
                    weight: entry.shared.weight.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect();
        State {
            name: self.name().to_owned(),
            endpoints,
            waiters: self.waiters.len(),
            open_connections: self.live.len(),
            closed: self.is_closed(),
            statistics: self.stats.snapshot(),
            retry_tokens: self.retry_tokens.as_ref().map(|t| t.tokens()),
            subset: self.subset.as_ref().map(|subset| {
                let subset = &subset.lock().unwrap_or_else(|e| e.into_inner()).choice;
                SubsetState {
                    size: subset.settings().size,
                    client: subset.client(),
                    known: subset.known(),
                    clients_per_ring: subset.points(),
                    displaced: subset.displaced(tokio::time::Instant::now()),
                }
            }),
        }
    }
}

/// A snapshot of a pool, from [`Pool::state`](crate::Pool::state).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct State {
    /// The pool's name.
    pub name: String,
    /// Every endpoint, in the order they were added.
    pub endpoints: Vec<EndpointState>,
    /// Calls queued for a stream slot.
    pub waiters: usize,
    /// Connections still open, counting draining ones no longer listed under an endpoint.
    pub open_connections: usize,
    /// Whether the pool was closed.
    pub closed: bool,
    /// Counters since the pool was built.
    pub statistics: Statistics,
    /// The retry throttle's tokens now, when the service config sets `retryThrottling`:
    /// failed calls are sent again only while they are above half of `maxTokens`.
    pub retry_tokens: Option<f64>,
    /// With subsetting: the subset's settings and the endpoints it holds out. `endpoints`
    /// above are the live ones (the subset); the others are known only.
    pub subset: Option<SubsetState>,
}

/// Subsetting in a [`State`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubsetState {
    /// Endpoints kept live, at most.
    pub size: usize,
    /// This client's number: `Subset::client`, or the one drawn for the pool.
    pub client: u64,
    /// Endpoints the pool knows of, live or not.
    pub known: usize,
    /// How many numbered clients share this client's ring (the known endpoints over `size`
    /// when the set first outgrew the subset, fixed from then on); `None` while every known
    /// endpoint is live.
    pub clients_per_ring: Option<u64>,
    /// Endpoints out of the subset because they could not take calls, with the time until
    /// they take their place back.
    pub displaced: Vec<(Endpoint, Duration)>,
}

impl State {
    /// Members over all endpoints.
    pub fn members(&self) -> usize {
        self.endpoints.iter().map(|e| e.members.len()).sum()
    }

    /// Streams in flight over all endpoints.
    pub fn in_flight(&self) -> usize {
        self.endpoints.iter().map(|e| e.in_flight).sum()
    }
}

/// One endpoint in a [`State`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointState {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Whether the health task lets new streams go there.
    pub healthy: bool,
    /// Why it is unhealthy, when it is.
    pub health_reason: Option<String>,
    /// Its listed members (ready, or draining until they are unlisted).
    pub members: Vec<MemberSnapshot>,
    /// Connects under way.
    pub connecting: usize,
    /// Streams in flight over its members, draining ones included.
    pub in_flight: usize,
    /// Failed connects since the last successful one.
    pub consecutive_failures: u32,
    /// The most recent connect error, cleared by a success.
    pub last_connect_error: Option<String>,
    /// While outlier detection has it ejected: the time left.
    pub ejected_for: Option<Duration>,
    /// Its weight in the choice between endpoints (1 unless set).
    pub weight: u32,
}

/// One member in a [`State`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemberSnapshot {
    /// Unique within the pool; appears in logs as `member`.
    pub id: u64,
    /// Where it is in its life.
    pub state: MemberState,
    /// Streams open on it now.
    pub in_flight: u32,
    /// Its stream limit: the configured cap or the server's, whichever is lower.
    pub max_streams: u32,
    /// Time since it connected.
    pub age: Duration,
    /// Time since a stream last started on it.
    pub idle: Duration,
    /// Round trip of its last answered keepalive PING.
    pub last_ping_rtt: Option<Duration>,
}
