//! The facade's [`Builder`]: settings into a [`PoolConfig`], then the core pool built from
//! it with its health task started beside it.

use std::time::Duration;

use crate::{
    AllUnhealthy, BackoffConfig, Balance, Connector, Error, H2Config, HealthCheck, Keepalive,
    OutlierDetection, Pool, PoolConfig, Subset, TlsConfig,
};
#[cfg(doc)]
use crate::{WaitForReady, DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_POOL_NAME};

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

    /// Your application's name and version, put before the pool's own
    /// ([`POOL_USER_AGENT`](crate::POOL_USER_AGENT)) in the `user-agent` header of every
    /// call that carries none, as tonic's `Endpoint::user_agent` puts it before
    /// `tonic/<version>`. 1 to 512 visible ASCII characters or spaces, checked at build.
    ///
    /// ```
    /// let builder = grpc_pool::Pool::builder().user_agent("billing/2.3");
    /// assert_eq!(builder.config().user_agent.as_deref(), Some("billing/2.3"));
    /// ```
    pub fn user_agent(mut self, user_agent: &str) -> Self {
        self.config.user_agent = Some(user_agent.to_owned());
        self
    }

    /// The `:scheme` and `:authority` every call carries instead of its endpoint's, as
    /// tonic's `Endpoint::origin`: for a proxy or ingress reached by address that routes by
    /// host name. `http://host[:port]` or `https://host[:port]`, checked at build. TLS still
    /// verifies the endpoint's host name (or [`TlsConfig`](crate::TlsConfig)'s `server_name`).
    ///
    /// ```
    /// let builder = grpc_pool::Pool::builder().origin("https://orders.example.com");
    /// assert_eq!(builder.config().origin.as_deref(), Some("https://orders.example.com"));
    /// ```
    pub fn origin(mut self, origin: &str) -> Self {
        self.config.origin = Some(origin.to_owned());
        self
    }

    setters! {
        /// Connections kept open per endpoint even when idle (0 to `max_connections`).
        min_connections: usize;
        /// Most connections per endpoint (1 to 10,000).
        max_connections: usize;
        /// Most connections over every endpoint, open and being opened (1 to 1,000,000): for
        /// a pool over thousands of endpoints, where `min_connections` each would be too
        /// many. When reached, the pool opens no more (`min_connections` are kept as far as
        /// it allows) and calls wait for a stream slot, up to `checkout_timeout`, whose
        /// error then says so. `None` (the default): no cap beyond `max_connections` per
        /// endpoint.
        max_total_connections: Option<usize>;
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
        /// TCP keepalive, as tonic's `Endpoint::tcp_keepalive`: after this much quiet on a
        /// connection's socket, the kernel sends probes (1 s to 32767 s, whole seconds). It
        /// keeps an idle connection's entry in NATs and load balancers alive and finds a dead
        /// peer without waking the process, and the server's HTTP/2 PING policy never sees
        /// it. `None` (the default): off.
        ///
        /// ```
        /// use std::time::Duration;
        /// let builder = grpc_pool::Pool::builder()
        ///     .tcp_keepalive(Some(Duration::from_secs(60)))
        ///     .tcp_keepalive_interval(Some(Duration::from_secs(10)))
        ///     .tcp_keepalive_retries(Some(3));
        /// assert_eq!(builder.config().tcp_keepalive_retries, Some(3));
        /// ```
        tcp_keepalive: Option<Duration>;
        /// Time between TCP keepalive probes (1 s to 32767 s), with `tcp_keepalive`. `None`:
        /// the system's (75 s on Linux).
        tcp_keepalive_interval: Option<Duration>;
        /// Unanswered TCP keepalive probes before the kernel drops the connection (1 to 127),
        /// with `tcp_keepalive`. `None`: the system's (9 on Linux). On Linux the sockets'
        /// `TCP_USER_TIMEOUT` (the keepalive PINGs' timeout) ends the probing sooner when
        /// probes have gone unanswered that long.
        tcp_keepalive_retries: Option<u32>;
        /// The local IP address TCP connections are made from, as tonic's
        /// `Endpoint::local_address`: for hosts with several addresses where the server (or a
        /// firewall) allows only one. Each connection goes to the endpoint's addresses of the
        /// same family. `None` (the default): the system's choice.
        local_address: Option<std::net::IpAddr>;
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
        /// How calls choose between endpoints: fewer calls in flight
        /// ([`Balance::LeastLoaded`], the default), or latency times calls in flight
        /// ([`Balance::PeakEwma`]: better when one endpoint is slower than the others).
        balance: Balance;
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
        /// Subsetting: of the endpoints the pool knows (given, added, discovered), only
        /// `size` are live (connections, health checks, calls), chosen so that a change of
        /// the set moves only the endpoints it must, and so that clients numbered 0, 1,
        /// 2, ... spread evenly over the endpoints. `None` (the default): every endpoint is
        /// live.
        ///
        /// ```
        /// let mut subset = grpc_pool::Subset::new(20);
        /// subset.client = Some(7); // e.g. this replica's ordinal
        /// let builder = grpc_pool::Pool::builder().subset(Some(subset));
        /// assert_eq!(builder.config().subset.as_ref().map(|s| s.size), Some(20));
        /// ```
        subset: Option<Subset>;
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
    /// address), within `connect_timeout`; its stream is used as it is, so `TCP_NODELAY` and
    /// `TCP_USER_TIMEOUT` are its business. TLS is too, unless [`tls`](Builder::tls) is set:
    /// then the pool runs TLS over the connector's stream to `https://` endpoints (checking
    /// the endpoint's host name), as tonic runs `tls_config` over `connect_with_connector`'s
    /// streams: for a connector that opens a tunnel through a proxy.
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

    /// gRPC's service config, as the standard JSON document: per-method `timeout`,
    /// `waitForReady` and `retryPolicy` (calls that end with a retryable status are sent
    /// again, with backoff), and `retryThrottling` for the pool. Checked at build: a bad
    /// document fails the build with the JSON path of the bad field. See
    /// `docs/deadlines-and-retries.md`, "Service config".
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let err = grpc_pool::Pool::builder()
    ///     .service_config(r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}], "timeout": "soon"}]}"#)
    ///     .build_lazy(["http://127.0.0.1:50051"])
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("methodConfig[0].timeout: `soon` is not a duration"));
    /// # }
    /// ```
    pub fn service_config(mut self, json: &str) -> Self {
        self.config.service_config = Some(json.to_owned());
        self
    }

    /// The service config read from a file at build (see [`service_config`](Self::service_config)).
    pub fn service_config_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.service_config_file = Some(path.into());
        self
    }

    /// The settings so far.
    pub fn config(&self) -> &PoolConfig {
        &self.config
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
        if endpoints.is_empty() && (self.config.dns.is_some() || self.etcd_set() || self.xds_set()) {
            return self.build_lazy(endpoints);
        }
        // (An xDS pool is built lazily, above: no xds section here.)
        let (core, health) = self.config.split()?;
        let discoveries = self.discoveries(&endpoints)?;
        let core = grpc_pool_core::Builder::from_config(core).build(endpoints).await?;
        Ok(Pool::start(core, health, discoveries))
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
        let mut config = self.config.clone();
        if self.xds_set() {
            // A cluster's outlier detection overrides the pool's: the pool needs some, off
            // unless configured.
            config.outlier_detection.get_or_insert_with(crate::OutlierDetection::off);
        }
        let (core, health) = config.split()?;
        let discoveries = self.discoveries(&endpoints)?;
        let core = grpc_pool_core::Builder::from_config(core).build_lazy(endpoints)?;
        Ok(Pool::start(core, health, discoveries))
    }

    /// Builds a pool whose endpoints come from the xDS control plane of the bootstrap the
    /// environment names (`GRPC_XDS_BOOTSTRAP` or `GRPC_XDS_BOOTSTRAP_CONFIG`, as in the other
    /// gRPC languages) for `target` (`xds:///name`). Connects in the background, as
    /// [`build_lazy`](Self::build_lazy): calls wait for the first endpoints up to
    /// `checkout_timeout`. See [`xds`](crate::xds) for what is followed. Fails without a
    /// bootstrap, with a bad target, or with endpoints, `dns` or `etcd` also set.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), grpc_pool::Error> {
    /// let pool = grpc_pool::Pool::builder().name("echo").build_xds("xds:///echo.prod:50051")?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "xds")]
    pub fn build_xds(self, target: &str) -> Result<Pool, Error> {
        let bootstrap = crate::xds::Bootstrap::from_env()?;
        self.build_xds_with(target, &bootstrap).map(|(pool, _)| pool)
    }

    /// [`build_xds`](Self::build_xds) with a bootstrap given in code; returns the
    /// [`XdsStatus`](crate::xds::XdsStatus) of the stream beside the pool.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), grpc_pool::Error> {
    /// let bootstrap = grpc_pool::xds::Bootstrap::from_json(
    ///     r#"{"xds_servers": [{"server_uri": "localhost:18000", "channel_creds": [{"type": "insecure"}]}]}"#,
    /// )?;
    /// let (pool, status) = grpc_pool::Pool::builder().build_xds_with("xds:///echo", &bootstrap)?;
    /// println!("{:?}", status.endpoints());
    /// # drop(pool); Ok(()) }
    /// ```
    #[cfg(feature = "xds")]
    pub fn build_xds_with(
        self,
        target: &str,
        bootstrap: &crate::xds::Bootstrap,
    ) -> Result<(Pool, crate::xds::XdsStatus), Error> {
        let discover = crate::xds::XdsDiscover::new(bootstrap, target)?;
        let status = discover.status();
        let mut builder = self;
        builder.config.xds = None;
        builder.check_xds_alone(&builder.config.endpoints)?;
        builder.config.outlier_detection.get_or_insert_with(crate::OutlierDetection::off);
        let pool = builder.build_lazy(Vec::<String>::new())?;
        pool.discover(discover);
        Ok((pool, status))
    }

    /// Whether an `etcd` section is set.
    fn etcd_set(&self) -> bool {
        #[cfg(feature = "etcd")]
        return self.config.etcd.is_some();
        #[cfg(not(feature = "etcd"))]
        false
    }

    /// Whether an `xds` section is set.
    fn xds_set(&self) -> bool {
        #[cfg(feature = "xds")]
        return self.config.xds.is_some();
        #[cfg(not(feature = "xds"))]
        false
    }

    /// An xDS pool's endpoints come from the control plane alone.
    #[cfg(feature = "xds")]
    fn check_xds_alone(&self, endpoints: &[String]) -> Result<(), Error> {
        if !endpoints.is_empty() || self.config.dns.is_some() || self.etcd_set() {
            return Err(Error::invalid_config(
                "xds",
                &format!("with {} endpoints, dns or etcd", endpoints.len()),
                "alone: a pool built for an xDS target takes its endpoints from the control plane",
            ));
        }
        Ok(())
    }

    /// The discovery streams the settings ask for (`dns`, `etcd`, `xds`), each checked, as
    /// tasks to start on the built pool.
    fn discoveries(&self, endpoints: &[String]) -> Result<Vec<Discovery>, Error> {
        let mut out: Vec<Discovery> = Vec::new();
        if let Some(dns) = &self.config.dns {
            let discover = dns.discover()?;
            out.push(Box::new(move |pool| drop(pool.discover(discover))));
        }
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &self.config.etcd {
            let discover = etcd.discover()?;
            out.push(Box::new(move |pool| drop(pool.discover(discover))));
        }
        #[cfg(feature = "xds")]
        if let Some(xds) = &self.config.xds {
            self.check_xds_alone(endpoints)?;
            let mut discover = xds.discover()?;
            out.push(Box::new(move |pool| {
                discover.set_policy(pool.monitor());
                drop(pool.discover(discover))
            }));
        }
        let _ = endpoints;
        Ok(out)
    }
}

/// A discovery stream to start on a built pool.
type Discovery = Box<dyn FnOnce(&grpc_pool_core::Pool) + Send>;

impl Pool {
    fn start(
        core: grpc_pool_core::Pool,
        health: grpc_pool_health::HealthConfig,
        discoveries: Vec<Discovery>,
    ) -> Pool {
        grpc_pool_health::spawn(core.monitor(), health);
        for start in discoveries {
            start(&core);
        }
        Pool { core }
    }
}
