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
//!     .keepalive(Some(Keepalive::new(Duration::from_secs(30), Duration::from_secs(5))))
//!     .max_lifetime(Some(Duration::from_secs(30 * 60)))
//!     .build(["http://127.0.0.1:50051", "http://127.0.0.1:50052"])
//!     .await?;
//! // let mut client = EchoClient::new(pool.clone());
//! // let reply = client.unary_echo(request).await?;
//! # Ok(()) }
//! ```
//!
//! Everything a user needs is here, at the crate's root: [`Pool`] and its [`Builder`] (or
//! [`PoolConfig`], the same settings as data), the settings' types, [`State`] and
//! [`PoolEvent`] to watch the pool, and [`Error`]. The pool's machinery lives in two
//! implementation crates, `grpc-pool-core` (connections, checkout, the request path) and
//! `grpc-pool-health` (keepalive, health checks, eviction); their APIs are not stable and
//! nothing in them is needed to use the pool.
#![deny(missing_docs)]

#[cfg(feature = "bb8")]
pub mod bb8;
mod config;

use std::fmt;
use std::time::Duration;

pub use config::{DnsConfig, PoolConfig};
pub use grpc_pool_core::{
    discover, dns, metrics, rustls, AllUnhealthy, BackoffConfig, ClientIdentity, Connector, Endpoint,
    EndpointState, Error, ErrorKind, EvictionReason, H2Config, MemberSnapshot, MemberState, OutlierDetection,
    PoolEvent, PoolEvents, ResponseBody, RetryReason, State, Statistics, TlsConfig, WaitForReady,
    DEFAULT_POOL_NAME, EVENT_BUFFER,
};
pub use grpc_pool_health::{
    CheckMode, HealthCheck, Keepalive, DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT,
};

/// A pool of HTTP/2 connections to the endpoints of one gRPC service, kept healthy by a
/// background task.
///
/// `Pool` is a cheap handle (an `Arc` inside): clone it into every client. It implements
/// `tower::Service<http::Request<tonic::body::Body>>`, so a tonic-generated client works on
/// it directly, and so does `tower::ServiceExt` or a `ServiceBuilder` stack:
/// `EchoClient::new(pool.clone())`. Each call takes a stream slot on the least loaded ready
/// connection (power of two choices between endpoints), opens more connections when all are
/// saturated, and waits at most `checkout_timeout` for room.
///
/// Dropping the last handle closes the pool: connections drain their in-flight streams and
/// close, and every background task ends. [`Pool::close`] does the same and waits for it.
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

    /// A snapshot of every endpoint and connection, and the pool's statistics.
    pub fn state(&self) -> State {
        self.core.state()
    }

    /// The pool's events from now on: connections opened and closed with their reason,
    /// endpoints added, removed, unhealthy or ejected, GOAWAYs. Each subscriber has room for
    /// [`EVENT_BUFFER`] events; one that falls further behind reads [`PoolEvent::Missed`].
    ///
    /// ```no_run
    /// # async fn run(pool: grpc_pool::Pool) {
    /// let mut events = pool.events();
    /// while let Some(event) = events.recv().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> PoolEvents {
        self.core.events()
    }

    /// Adds an endpoint at run time; it opens its `min_connections` and takes calls as soon as
    /// a connection is ready. `Ok(false)` if the pool has it already, an error if `uri` is not
    /// a valid endpoint.
    pub fn add_endpoint(&self, uri: &str) -> Result<bool, Error> {
        self.core.add_endpoint(uri)
    }

    /// Removes an endpoint at run time: no new calls go there, the ones in flight finish,
    /// then its connections close. `Ok(false)` if the pool does not have it.
    pub fn remove_endpoint(&self, uri: &str) -> Result<bool, Error> {
        self.core.remove_endpoint(uri)
    }

    /// Follows an endpoint set that changes at run time: every `Change::Insert` of the
    /// `discover` stream adds an endpoint (its service is the endpoint's URI, anything that
    /// displays as one), every `Change::Remove` removes the one its key named. A discovery
    /// error or an invalid URI is logged and the set stays as it is; when the stream ends,
    /// the endpoints stay. The task stops when the pool closes; it does not keep it open.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use grpc_pool::dns::{DnsDiscover, SystemResolver};
    /// # async fn run(pool: grpc_pool::Pool) -> Result<(), grpc_pool::Error> {
    /// // Every address `orders.internal` resolves to, looked up again every 30 s.
    /// pool.discover(DnsDiscover::new("http://orders.internal:50051", Duration::from_secs(30), SystemResolver)?);
    /// # Ok(()) }
    /// ```
    pub fn discover<D>(&self, discover: D) -> tokio::task::JoinHandle<()>
    where
        D: discover::Discover + Send + 'static,
        D::Key: Send,
        D::Service: fmt::Display + 'static,
        D::Error: fmt::Display,
    {
        self.core.discover(discover)
    }

    /// Stops taking calls, lets the ones in flight finish, and returns when every
    /// connection has closed. Calls that start afterwards fail with
    /// [`ErrorKind::PoolClosed`]. A call whose stream never ends keeps `close` waiting: bound
    /// it with `tokio::time::timeout` if that can happen.
    pub async fn close(&self) {
        self.core.close().await
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.core.fmt(f)
    }
}

/// The future of a call through a [`Pool`]: resolves to the response head; the body
/// streams after it.
pub type ResponseFuture = grpc_pool_core::ResponseFuture<tonic::body::Body>;

/// `tower::Service` for a wrapper of a core pool, by handing each call to it.
///
/// For tonic's request body only, not any body: tonic's clients send that type, and one
/// request type lets `tower::ServiceExt` and `ServiceBuilder` infer it (no turbofish). Other
/// bodies go in through `tonic::body::Body::new`, which boxes them (tonic's own are passed
/// through as they are).
macro_rules! service_through_core_pool {
    ($wrapper:ty, $field:ident) => {
        impl tower_service::Service<http::Request<tonic::body::Body>> for $wrapper {
            type Response = http::Response<$crate::ResponseBody>;
            type Error = $crate::Error;
            type Future = $crate::ResponseFuture;

            fn poll_ready(
                &mut self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), $crate::Error>> {
                tower_service::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.$field, cx)
            }

            fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
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
/// fails with a message naming the field and the allowed range. The settings are a
/// [`PoolConfig`]; each method sets the field of the same name, and [`PoolConfig`]'s fields
/// say the defaults.
///
/// In short: `min_connections` 1 and `max_connections` 8 per endpoint, 100 concurrent
/// streams per connection, 5 s checkout timeout, 10 s connect timeout, gRPC's reconnect
/// backoff; keepalive PINGs on connections with calls in flight after
/// [`DEFAULT_KEEPALIVE_TIME`] of quiet, at most two without data from the server in between,
/// with a [`DEFAULT_KEEPALIVE_TIMEOUT`]; idle connections not PINGed but checked before use
/// after [`DEFAULT_PING_BEFORE_USE`] of quiet, with a PING answered within
/// [`DEFAULT_PING_BEFORE_USE_TIMEOUT`]; `idle_timeout` 10 minutes; no `max_lifetime`. Why
/// each value: see the constants.
///
/// ```no_run
/// # async fn run() -> Result<(), grpc_pool::Error> {
/// use std::time::Duration;
/// use grpc_pool::{Keepalive, Pool};
///
/// let pool = Pool::builder()
///     .name("echo")
///     .max_connections(4)
///     .keepalive(Some(Keepalive::new(Duration::from_secs(30), Duration::from_secs(5))))
///     .max_lifetime(Some(Duration::from_secs(30 * 60)))
///     .build(["http://127.0.0.1:50051", "http://127.0.0.1:50052"])
///     .await?;
/// // let mut client = EchoClient::new(pool.clone());
/// # Ok(()) }
/// ```
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let err = grpc_pool::Pool::builder()
///     .keepalive(Some(grpc_pool::Keepalive::new(Duration::ZERO, Duration::from_secs(1))))
///     .build_lazy(["http://127.0.0.1:50051"])
///     .unwrap_err();
/// assert!(err.to_string().contains("`keepalive.time`"));
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: PoolConfig,
}

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

impl From<PoolConfig> for Builder {
    fn from(config: PoolConfig) -> Builder {
        Builder { config }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.config.$name = value;
                self
            }
        )*
    };
}

impl Builder {
    /// The pool's name in logs, errors and the `pool` metric label. Two live pools never
    /// share one: building a pool with the name of another fails, except the default
    /// ([`DEFAULT_POOL_NAME`]), which a second pool gets as `grpc-pool-2`.
    pub fn name(mut self, name: &str) -> Self {
        self.config.name = name.to_owned();
        self
    }

    setters! {
        /// Connections kept open per endpoint even when idle (0 to `max_connections`).
        min_connections: usize;
        /// Most connections per endpoint (1 to 10,000).
        max_connections: usize;
        /// Most concurrent streams per connection (1 to 2^20); the server's
        /// `SETTINGS_MAX_CONCURRENT_STREAMS` lowers it further.
        max_concurrent_streams: u32;
        /// Connects under way at once to one endpoint (1 to 10,000); the others wait their
        /// turn, outside `connect_timeout`, so a pool opening hundreds of connections does
        /// not overflow the server's accept queue.
        max_concurrent_connects: usize;
        /// Longest a call waits for a stream slot before failing (1 ms to a day).
        checkout_timeout: Duration;
        /// Longest a connect may take, from TCP to the server's SETTINGS (1 ms to an hour).
        connect_timeout: Duration;
        /// The deadline of calls without a `grpc-timeout` of their own, and the most any
        /// call may take (up to 30 days): a call's deadline is the shorter of its own and
        /// this one. It bounds the whole call: the wait for a slot, a PING before use, every
        /// resend, the response head and body. Past it, a call fails with
        /// `DEADLINE_EXCEEDED`, its stream is reset and its slot freed. `None`: none.
        timeout: Option<Duration>;
        /// gRPC's `wait_for_ready` for every call: when every endpoint is in transient
        /// failure, wait for one to come back (until the deadline, or `checkout_timeout`)
        /// instead of failing at once with `UNAVAILABLE` and the cause. A call's
        /// [`WaitForReady`] extension overrides it.
        wait_for_ready: bool;
        /// Attempts per call in all, the first included (1 to 10), for calls the server
        /// provably never processed (refused, above a GOAWAY's last stream id, or never
        /// written); each goes to another connection, on another endpoint when there is one.
        max_attempts: u32;
        /// Most request-body bytes a call keeps so that it can be sent again (0 to 64 MiB);
        /// a larger call is not sent again, and its error says so.
        replay_buffer_limit: usize;
        /// What calls do when every endpoint is unhealthy: fail fast, or route to all of
        /// them anyway.
        when_all_unhealthy: AllUnhealthy;
        /// How often the connection, stream and waiter gauges are sampled (10 ms to an
        /// hour).
        metrics_interval: Duration;
        /// PING a connection before it carries a call when it has been unused (no stream
        /// started, nothing received) for this long (1 ms to a day), and wait for the PONG:
        /// no PONG within [`DEFAULT_PING_BEFORE_USE_TIMEOUT`] (or four round trips of that
        /// connection) closes it, and the call goes to another one. `None`: never.
        ping_before_use: Option<Duration>;
        /// Keepalive PINGs (see [`Keepalive`]); `timeout` also becomes the sockets'
        /// `TCP_USER_TIMEOUT` on Linux. `None`: no PINGs, and a connection that dies
        /// silently is found only by the call that uses it.
        keepalive: Option<Keepalive>;
        /// Close connections above `min_connections` that started no stream for this long
        /// (10 ms to 30 days). `None`: never.
        idle_timeout: Option<Duration>;
        /// Drain and replace connections this old, +/-10% jitter, one at a time per endpoint
        /// (100 ms to 30 days). `None`: never.
        max_lifetime: Option<Duration>;
        /// Drain and replace connections after this many streams in all (1 to about 2^30).
        /// `None`: only when HTTP/2 stream ids run out.
        max_streams_per_connection: Option<u64>;
        /// gRPC health checks per endpoint (`grpc.health.v1.Health`). `None`: none.
        health_checks: Option<HealthCheck>;
        /// Outlier ejection: an endpoint whose calls fail `consecutive_failures` times in a
        /// row takes no new streams for a while. `None`: none.
        outlier_detection: Option<OutlierDetection>;
        /// Reconnect backoff after failed connects.
        backoff: BackoffConfig;
        /// HTTP/2 window, frame and header-list settings.
        h2: H2Config;
    }

    /// TLS for the `https://` endpoints; without it they verify servers against the
    /// system's roots. `http://` endpoints stay plaintext.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Opens connections through `connector` instead of the pool's own TCP (or Unix socket)
    /// and TLS connects, as tonic's `Endpoint::connect_with_connector`: any
    /// `tower::Service<http::Uri>` returning a byte stream (a proxy tunnel, a socket with
    /// options of its own, an in-memory pipe, a TLS stream it made). It is called once per
    /// connection with the endpoint's URI (for an endpoint found by DNS, its resolved
    /// address), within `connect_timeout`; its stream is used as it is, so `TCP_NODELAY`,
    /// `TCP_USER_TIMEOUT` and TLS are its business.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), grpc_pool::Error> {
    /// // Every connection goes to a local sidecar, whatever the endpoint's address.
    /// let sidecar = tower::service_fn(|_uri: http::Uri| async {
    ///     let tcp = tokio::net::TcpStream::connect("127.0.0.1:15001").await?;
    ///     tcp.set_nodelay(true)?;
    ///     Ok::<_, std::io::Error>(tcp)
    /// });
    /// let pool = grpc_pool::Pool::builder().connector(sidecar).build(["http://orders:50051"]).await?;
    /// # Ok(()) }
    /// ```
    pub fn connector<S>(mut self, connector: S) -> Self
    where
        S: tower_service::Service<http::Uri> + Clone + Send + Sync + 'static,
        S::Response: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
        S::Future: Send + 'static,
    {
        self.config.connector = Some(Connector::new(connector));
        self
    }

    /// The settings so far.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The core pool's builder (no health task), for the bb8 adapter.
    #[cfg_attr(not(feature = "bb8"), allow(dead_code))]
    pub(crate) fn core_builder(&self) -> Result<grpc_pool_core::Builder, Error> {
        Ok(grpc_pool_core::Builder::from_config(self.config.split()?.0))
    }

    /// The endpoints: the configuration's, then `more`.
    fn endpoints<I, S>(&self, more: I) -> Vec<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.config.endpoints.iter().cloned().chain(more.into_iter().map(|e| e.as_ref().to_owned())).collect()
    }

    /// Builds the pool and connects before returning: `max(min_connections, 1)` connections
    /// per endpoint, all at once. Fails only if no endpoint can be reached, with every
    /// endpoint's error; the ones that failed keep retrying in the background. With a `dns`
    /// setting and no endpoint listed, connects in the background instead (as
    /// [`build_lazy`](Self::build_lazy)): the name's addresses join as they are resolved.
    /// Starts the health task.
    pub async fn build<I, S>(self, endpoints: I) -> Result<Pool, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints = self.endpoints(endpoints);
        if endpoints.is_empty() && self.config.dns.is_some() {
            return self.build_lazy(endpoints);
        }
        let (core, health) = self.config.split()?;
        let discover = self.config.dns.as_ref().map(DnsConfig::discover).transpose()?;
        let core = grpc_pool_core::Builder::from_config(core).build(endpoints).await?;
        Ok(Pool::start(core, health, discover))
    }

    /// Builds the pool at once and connects in the background (`min_connections` per
    /// endpoint); the first calls wait for a connection, up to `checkout_timeout`. The list
    /// may be empty when endpoints come later ([`Pool::add_endpoint`], discovery). Must be
    /// called inside a Tokio runtime. Starts the health task.
    pub fn build_lazy<I, S>(self, endpoints: I) -> Result<Pool, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints = self.endpoints(endpoints);
        let (core, health) = self.config.split()?;
        let discover = self.config.dns.as_ref().map(DnsConfig::discover).transpose()?;
        let core = grpc_pool_core::Builder::from_config(core).build_lazy(endpoints)?;
        Ok(Pool::start(core, health, discover))
    }
}

impl Pool {
    fn start(
        core: grpc_pool_core::Pool,
        health: grpc_pool_health::HealthConfig,
        discover: Option<dns::DnsDiscover<dns::SystemResolver>>,
    ) -> Pool {
        grpc_pool_health::spawn(core.monitor(), health);
        if let Some(discover) = discover {
            core.discover(discover);
        }
        Pool { core }
    }
}

/// For the crate's tests, benchmarks and fuzz targets only: not part of the API, and may
/// change in any release.
#[doc(hidden)]
pub mod __private {
    pub use grpc_pool_core::__fuzz as fuzz;
    pub use grpc_pool_health::__test as health;

    /// Takes a stream slot the way a call does, and frees it again. False if none was free.
    pub fn checkout_and_release(pool: &crate::Pool) -> bool {
        grpc_pool_core::__bench::checkout_and_release(&pool.core)
    }

    /// The pool as its health task sees it.
    pub fn monitor(pool: &crate::Pool) -> grpc_pool_core::PoolMonitor {
        pool.core.monitor()
    }
}
