//! # grpc-pool
//!
//! A pool of HTTP/2 connections for gRPC clients: several connections per endpoint, spread
//! over several endpoints, checked out per call through a `tower::Service` that any
//! tonic-generated client can wrap, and a background health task that PINGs quiet
//! connections and retires old, idle or dead ones before a caller meets them.
//!
//! ```no_run
//! # async fn run() -> Result<(), grpc_pool::Error> {
//! use std::time::Duration;
//! use grpc_pool::{Keepalive, Pool};
//!
//! let pool = Pool::builder()
//!     .name("echo")
//!     .max_connections(4)
//!     .keepalive(Keepalive::new(Duration::from_secs(30), Duration::from_secs(5)))
//!     .max_lifetime(Duration::from_secs(30 * 60))
//!     .build(["http://127.0.0.1:50051", "http://127.0.0.1:50052"])
//!     .await?;
//! // let mut client = EchoClient::new(pool.clone());
//! // let reply = client.unary_echo(request).await?;
//! # Ok(()) }
//! ```
//!
//! The pool itself is [`grpc_pool_core`]; the health task is [`grpc_pool_health`]. This
//! crate wires them together.
#![deny(missing_docs)]

#[cfg(feature = "bb8")]
pub mod bb8;
pub mod config;

use std::fmt;
use std::time::Duration;

pub use config::PoolConfig;
pub use grpc_pool_core::AllUnhealthy;
pub use grpc_pool_core::{
    api, call, discover, dns, metrics, monitor, BackoffConfig, ClientIdentity, Endpoint, EndpointState,
    Error, ErrorKind, EvictionReason, H2Config, MemberHandle, MemberSnapshot, MemberState, OutlierDetection,
    PoolEvent, PoolMonitor, ResponseBody, ResponseFuture, RetryReason, State, Statistics, TlsConfig,
    WaitForReady,
};
pub use grpc_pool_health as health;
pub use grpc_pool_health::{CheckMode, EvictionPolicy, HealthCheck, HealthConfig, Keepalive};

/// A pool of HTTP/2 connections to the endpoints of one gRPC service, kept healthy by a
/// background task.
///
/// A cheap handle: clone it into every client (`EchoClient::new(pool.clone())`). Dropping the
/// last handle closes the pool and ends its tasks. See [`grpc_pool_core::Pool`] for how calls
/// are spread and queued, and [`Builder`] for the settings.
#[derive(Clone)]
pub struct Pool {
    core: grpc_pool_core::Pool,
}

impl Pool {
    /// A builder with the defaults: see [`Builder`].
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The pool's name, as in logs and metric labels.
    pub fn name(&self) -> &str {
        self.core.name()
    }

    /// A snapshot of every endpoint and member, and the pool's statistics.
    pub fn state(&self) -> State {
        self.core.state()
    }

    /// Adds an endpoint at run time; `Ok(false)` if the pool has it already. See
    /// [`grpc_pool_core::Pool::add_endpoint`].
    pub fn add_endpoint(&self, uri: &str) -> Result<bool, Error> {
        self.core.add_endpoint(uri)
    }

    /// Removes an endpoint at run time: no new calls go there, the ones in flight finish,
    /// then its connections close. `Ok(false)` if the pool does not have it.
    pub fn remove_endpoint(&self, uri: &str) -> Result<bool, Error> {
        self.core.remove_endpoint(uri)
    }

    /// Follows a `tower::discover::Discover` stream of endpoints (inserts and removals) until
    /// it ends or the pool closes. See [`grpc_pool_core::Pool::discover`].
    pub fn discover<D>(&self, discover: D) -> tokio::task::JoinHandle<()>
    where
        D: discover::Discover + Send + 'static,
        D::Key: Send,
        D::Service: fmt::Display,
        D::Error: fmt::Display,
    {
        self.core.discover(discover)
    }

    /// Stops taking calls, lets the ones in flight finish, and returns when every
    /// connection has closed.
    pub async fn close(&self) {
        self.core.close().await
    }

    /// The pool without its facade (same pool, same connections).
    pub fn core(&self) -> &grpc_pool_core::Pool {
        &self.core
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.core.fmt(f)
    }
}

/// `tower::Service` for a wrapper of a core pool, by handing each call to it.
macro_rules! service_through_core_pool {
    ($wrapper:ty, $field:ident) => {
        impl<B> tower_service::Service<http::Request<B>> for $wrapper
        where
            B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
            B::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
        {
            type Response = http::Response<$crate::ResponseBody>;
            type Error = $crate::Error;
            type Future = $crate::ResponseFuture<B>;

            fn poll_ready(
                &mut self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), $crate::Error>> {
                tower_service::Service::<http::Request<B>>::poll_ready(&mut self.$field, cx)
            }

            fn call(&mut self, request: http::Request<B>) -> Self::Future {
                tower_service::Service::call(&mut self.$field, request)
            }
        }
    };
}
// For the bb8 adapter's connection, when that feature is on.
#[cfg_attr(not(feature = "bb8"), allow(unused_imports))]
pub(crate) use service_through_core_pool;

service_through_core_pool!(Pool, core);

/// Builds a [`Pool`] and starts its health task. Every setting is checked at build; a bad one
/// fails with a message naming the field and the allowed range.
///
/// Defaults: `min_connections` 1 and `max_connections` 8 per endpoint, 100 concurrent streams
/// per connection, 5 s checkout timeout, 10 s connect timeout, gRPC's reconnect backoff;
/// keepalive PINGs on connections with calls in flight after [`DEFAULT_KEEPALIVE_TIME`] of
/// quiet, at most two without data from the server in between, with a
/// [`DEFAULT_KEEPALIVE_TIMEOUT`]; idle connections not PINGed but checked before use after
/// [`DEFAULT_PING_BEFORE_USE`] of quiet, with a PING answered within
/// [`DEFAULT_PING_BEFORE_USE_TIMEOUT`]; `idle_timeout` 10 minutes; no `max_lifetime`. Why
/// each value: see the constants.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = grpc_pool::Pool::builder()
///     .keepalive(grpc_pool::Keepalive::new(std::time::Duration::ZERO, std::time::Duration::from_secs(1)))
///     .build_lazy(["http://127.0.0.1:50051"])
///     .unwrap_err();
/// assert!(err.to_string().contains("`keepalive.time`"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    core: grpc_pool_core::Builder,
    health: HealthConfig,
    ping_before_use: Option<Duration>,
}

/// Default keepalive time: a connection carrying calls that has heard nothing from the
/// server for this long is PINGed. Short enough that a call on a connection that died under
/// it (a NAT or load balancer that dropped the flow, a crashed host) is failed within
/// `time + timeout` = 30 s instead of hanging until TCP gives up (15 minutes and more), and a
/// busy connection is never PINGed at all (every read counts as news). Servers allow one PING
/// per 5 minutes while calls are open, but forgive every PING once they send data; with at
/// most two PINGs between two frames of data, a call silent for hours on a live connection
/// costs two PINGs and one strike, never the third strike that earns a GOAWAY.
pub const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(20);

/// Default keepalive timeout, and the sockets' `TCP_USER_TIMEOUT` on Linux: ten round trips
/// of the slowest intercontinental path are under 5 s; 10 s leaves room for a busy server.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default quiet time after which an idle connection is PINGed before a call uses it.
/// Middleboxes drop idle flows after their own timeout, and the shortest common ones are
/// 60 s (many L4 load balancers; AWS's NAT gateway waits 350 s, Azure's load balancer 4
/// minutes): a connection quiet for less than half the shortest is almost surely still
/// there, one quiet for longer is checked. Servers never count this PING against their
/// policy, because the call that follows makes them send data.
pub const DEFAULT_PING_BEFORE_USE: Duration = Duration::from_secs(30);

/// Default bound on the answer to a PING before use (four round trips measured on the
/// connection, if that is longer): a dead connection costs the call this much, and the call
/// then goes to a fresh connection.
pub const DEFAULT_PING_BEFORE_USE_TIMEOUT: Duration = Duration::from_secs(1);

impl Default for Builder {
    fn default() -> Self {
        Builder {
            core: grpc_pool_core::Builder::default(),
            health: HealthConfig {
                keepalive: Some(Keepalive::new(DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT)),
                eviction: EvictionPolicy {
                    idle_timeout: Some(Duration::from_secs(600)),
                    ..Default::default()
                },
                checks: None,
            },
            ping_before_use: Some(DEFAULT_PING_BEFORE_USE),
        }
    }
}

macro_rules! delegate {
    ($($(#[$doc:meta])* $name:ident($ty:ty);)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.core = self.core.$name(value);
                self
            }
        )*
    };
}

impl Builder {
    delegate! {
        /// The pool's name in logs, errors and metric labels. Default `grpc-pool`.
        name(&str);
        /// Connections kept open per endpoint even when idle (0 to `max_connections`).
        min_connections(usize);
        /// Most connections per endpoint (1 to 10,000).
        max_connections(usize);
        /// Most concurrent streams per connection (1 to 2^20); the server's
        /// `SETTINGS_MAX_CONCURRENT_STREAMS` lowers it further.
        max_concurrent_streams(u32);
        /// Longest a call waits for a stream slot before failing (above zero).
        checkout_timeout(Duration);
        /// The deadline of calls without a `grpc-timeout` of their own, and the most any call
        /// may take (above zero, up to 30 days); `None` (the default): none.
        timeout(Option<Duration>);
        /// gRPC's `wait_for_ready` for every call: wait for an endpoint to come back instead
        /// of failing fast when all are in transient failure. Off by default; a call's
        /// [`WaitForReady`] extension overrides it.
        wait_for_ready(bool);
        /// Longest a connect may take, from TCP to the server's SETTINGS (above zero).
        connect_timeout(Duration);
        /// Connects under way at once to one endpoint; the others wait their turn. Default 8.
        max_concurrent_connects(usize);
        /// Attempts per call in all, the first included (1 to 10), for calls the server
        /// provably never processed (refused, above a GOAWAY's last stream id, or never
        /// written). Default 3.
        max_attempts(u32);
        /// Most request-body bytes a call keeps so it can be sent again (0 to 64 MiB); a
        /// larger call is not sent again and its error says so. Default 256 KiB.
        replay_buffer_limit(usize);
        /// Outlier ejection: an endpoint whose calls fail `consecutive_failures` times in a
        /// row takes no new streams for a while. Off (`None`) by default.
        outlier_detection(Option<OutlierDetection>);
        /// How often the connection, stream and waiter gauges are sampled. Default 1 s.
        metrics_interval(Duration);
        /// TLS for the `https://` endpoints; without it they verify servers against the
        /// system's roots.
        tls(TlsConfig);
        /// Reconnect backoff after failed connects.
        backoff(BackoffConfig);
        /// HTTP/2 window, frame and header-list settings.
        h2(H2Config);
        /// What calls do when every endpoint is unhealthy: fail fast (default), or route
        /// to all of them anyway.
        when_all_unhealthy(AllUnhealthy);
    }

    /// gRPC health checks per endpoint (`grpc.health.v1.Health`); off by default.
    pub fn health_checks(mut self, checks: HealthCheck) -> Self {
        self.health.checks = Some(checks);
        self
    }

    /// Keepalive PINGs (see [`Keepalive`]); `timeout` also becomes the sockets'
    /// `TCP_USER_TIMEOUT` on Linux.
    pub fn keepalive(mut self, keepalive: Keepalive) -> Self {
        self.health.keepalive = Some(keepalive);
        self
    }

    /// PING a member before it carries a call when it has been unused for `after` (no
    /// stream started, nothing received), and wait for the PONG; no PONG within
    /// [`DEFAULT_PING_BEFORE_USE_TIMEOUT`] (or four round trips of that connection) closes it
    /// and the call goes to another member. Default [`DEFAULT_PING_BEFORE_USE`]; `None` turns
    /// it off.
    pub fn ping_before_use(mut self, after: Option<Duration>) -> Self {
        self.ping_before_use = after;
        self
    }

    /// No keepalive PINGs: a connection that dies silently is found only by the call that
    /// uses it.
    pub fn no_keepalive(mut self) -> Self {
        self.health.keepalive = None;
        self
    }

    /// Close members above `min_connections` that started no stream for this long (`None`:
    /// never).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.health.eviction.idle_timeout = timeout;
        self
    }

    /// Drain and replace members this old, +/-10% jitter, one at a time per endpoint.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.health.eviction.max_lifetime = Some(lifetime);
        self
    }

    /// Drain and replace members after this many streams in all.
    pub fn max_streams_per_connection(mut self, streams: u64) -> Self {
        self.health.eviction.max_streams_per_connection = Some(streams);
        self
    }

    /// The whole health configuration at once.
    pub fn health(mut self, health: HealthConfig) -> Self {
        self.health = health;
        self
    }

    fn prepared(self) -> Result<(grpc_pool_core::Builder, HealthConfig), Error> {
        self.health.validate()?;
        let timeout = self.health.keepalive.as_ref().map(|k| k.timeout);
        let core = self
            .core
            .tcp_user_timeout(timeout)
            .ping_before_use(self.ping_before_use, DEFAULT_PING_BEFORE_USE_TIMEOUT)
            .max_streams_per_connection(self.health.eviction.max_streams_per_connection);
        Ok((core, self.health))
    }

    /// Connects before returning (see [`grpc_pool_core::Builder::build`]), then starts the
    /// health task.
    pub async fn build<I, S>(self, endpoints: I) -> Result<Pool, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let (core, health) = self.prepared()?;
        let core = core.build(endpoints).await?;
        grpc_pool_health::spawn(core.monitor(), health);
        Ok(Pool { core })
    }

    /// Builds at once and connects in the background (see
    /// [`grpc_pool_core::Builder::build_lazy`]); starts the health task.
    pub fn build_lazy<I, S>(self, endpoints: I) -> Result<Pool, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let (core, health) = self.prepared()?;
        let core = core.build_lazy(endpoints)?;
        grpc_pool_health::spawn(core.monitor(), health);
        Ok(Pool { core })
    }
}

/// For the fuzz targets (`fuzz/`) and their smoke test only: not part of the API.
#[doc(hidden)]
pub use grpc_pool_core::__fuzz;
