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
mod builder;
mod config;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(any(feature = "etcd", feature = "xds"))]
mod reconnect;
#[cfg(feature = "xds")]
pub mod xds;

use std::fmt;

pub use builder::{Builder, DEFAULT_PING_BEFORE_USE, DEFAULT_PING_BEFORE_USE_TIMEOUT};
#[cfg(feature = "etcd")]
pub use config::EtcdConfig;
#[cfg(feature = "xds")]
pub use config::XdsConfig;
pub use config::{DnsConfig, PoolConfig};
pub use grpc_pool_core::{
    discover, dns, metrics, rustls, AllUnhealthy, BackoffConfig, Balance, ClientIdentity, Connector,
    Endpoint, Error, ErrorKind, EvictionReason, FailurePercentageEjection, H2Config, OutlierDetection,
    PoolEvent, PoolEvents, ResponseBody, State, Subset, SuccessRateEjection, TlsConfig, WaitForReady,
    DEFAULT_POOL_NAME, EVENT_BUFFER, POOL_USER_AGENT,
};

/// gRPC's service config as the pool reads it: [`ServiceConfig::from_json`] checks a document
/// in code (the pool itself takes the JSON, through [`Builder::service_config`] or a config
/// file), and [`ServiceConfig::ignored`] says which of its fields the pool ignores.
///
/// [`ServiceConfig::from_json`]: service_config::ServiceConfig::from_json
/// [`ServiceConfig::ignored`]: service_config::ServiceConfig::ignored
pub mod service_config {
    pub use grpc_pool_core::{
        HedgingPolicy, MethodConfig, MethodName, RetryPolicy, RetryThrottling, ServiceConfig,
    };
}

/// What [`Pool::state`] shows beside the [`State`] itself: each endpoint, each member and
/// its state, and the pool's statistics.
pub mod state {
    pub use grpc_pool_core::{
        EndpointState, MemberSnapshot, MemberState, RetryReason, Statistics, SubsetState,
    };
}
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

    /// Sets an endpoint's weight in the choice between endpoints (1 to 1,000,000; 1 unless
    /// set): an endpoint of weight 3 beside one of weight 1 takes about three quarters of the
    /// calls. `Ok(false)` if the pool does not have it. See the core's
    /// [`Pool::set_endpoint_weight`](grpc_pool_core::Pool::set_endpoint_weight).
    pub fn set_endpoint_weight(&self, uri: &str, weight: u32) -> Result<bool, Error> {
        self.core.set_endpoint_weight(uri, weight)
    }

    /// Caps the calls the pool has in flight (circuit breaking): while `max` calls hold a
    /// stream, a new call fails at once with `UNAVAILABLE`; `None` lifts the cap (the
    /// default). See the core's
    /// [`Pool::set_max_requests`](grpc_pool_core::Pool::set_max_requests).
    pub fn set_max_requests(&self, max: Option<u32>) {
        self.core.set_max_requests(max);
    }

    /// Puts other outlier detection settings in force while the pool runs, or (`None`) the
    /// pool's own back. See the core's
    /// [`Pool::override_outlier_detection`](grpc_pool_core::Pool::override_outlier_detection).
    pub fn override_outlier_detection(&self, settings: Option<OutlierDetection>) -> Result<(), Error> {
        self.core.override_outlier_detection(settings)
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
        // An xDS stream also puts its cluster's policy on this pool, and looks at which of
        // its endpoints the pool finds failing.
        #[cfg(feature = "xds")]
        let mut discover = discover;
        #[cfg(feature = "xds")]
        if let Some(xds) = (&mut discover as &mut dyn std::any::Any).downcast_mut::<xds::XdsDiscover>() {
            xds.set_policy(self.core.monitor());
        }
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
/// streams after it. Dropping it cancels the call (its stream is reset, its slot freed).
///
/// Like most futures, it panics if polled again after it returned `Ready`.
pub struct ResponseFuture(grpc_pool_core::ResponseFuture<tonic::body::Body>);

impl std::future::Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

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
                $crate::ResponseFuture(tower_service::Service::call(&mut self.$field, request))
            }
        }
    };
}
// For the bb8 adapter's connection, when that feature is on.
#[cfg_attr(not(feature = "bb8"), allow(unused_imports))]
pub(crate) use service_through_core_pool;

service_through_core_pool!(Pool, core);

/// For the crate's tests, benchmarks and fuzz targets only (feature `test-hooks`): not part
/// of the API, and may change in any release.
#[cfg(feature = "test-hooks")]
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
