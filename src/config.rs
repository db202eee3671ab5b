//! [`PoolConfig`]: every setting of a pool in one value, what a [`Builder`] fills in and
//! what a configuration file holds. With the `serde` feature it deserializes from TOML,
//! JSON or any other serde format, durations written as people write them (`"30s"`,
//! `"1m 30s"`, `"250ms"`) and `"off"` for a setting that can be off; it is checked exactly
//! as the builder's settings are, with the same messages, when the pool is built.
//!
//! `examples/pool.toml` lists every field with its default.

use std::time::Duration;

use crate::dns::{DnsDiscover, SystemResolver};
use crate::service_config::ServiceConfig;
use crate::{
    AllUnhealthy, BackoffConfig, Balance, Builder, Connector, Error, H2Config, HealthCheck, Keepalive,
    OutlierDetection, Pool, Subset, TlsConfig, DEFAULT_PING_BEFORE_USE,
};

/// A whole pool configuration. [`PoolConfig::default`] holds the defaults, and is the one
/// place they are written; unknown fields in a file are an error that names them.
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: grpc_pool::PoolConfig = serde_json::from_str(r#"{
///     "name": "orders",
///     "endpoints": ["http://10.0.0.7:50051"],
///     "checkout_timeout": "2s",
///     "keepalive": { "time": "30s", "timeout": "5s" },
///     "idle_timeout": "off"
/// }"#).unwrap();
/// assert_eq!(config.checkout_timeout, std::time::Duration::from_secs(2));
/// assert_eq!(config.idle_timeout, None);
/// # }
/// ```
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct PoolConfig {
    /// The pool's name in logs, errors and the `pool` metric label; unique among live pools.
    /// Default [`DEFAULT_POOL_NAME`](crate::DEFAULT_POOL_NAME), which a second pool gets as
    /// `grpc-pool-2`.
    pub name: String,
    /// Endpoint URIs (`http://host:port`, `https://...`, `unix:///path`; without a port, the
    /// scheme's), before those given to `build`.
    pub endpoints: Vec<String>,
    /// Connections kept open per endpoint even when idle (0 to `max_connections`). Default 1.
    pub min_connections: usize,
    /// Most connections per endpoint (1 to 10,000). Default 8.
    pub max_connections: usize,
    /// Most connections over every endpoint, open and being opened (1 to 1,000,000). When
    /// reached, the pool opens no more (`min_connections` are kept as far as it allows, a
    /// first connection to each endpoint before a second to any at build) and calls wait for
    /// a stream slot, up to `checkout_timeout`. Default: none.
    pub max_total_connections: Option<usize>,
    /// Most concurrent streams per connection (1 to 2^20); the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` lowers it further. Default 100.
    pub max_concurrent_streams: u32,
    /// Connects under way at once per endpoint (1 to 10,000). Default 8.
    pub max_concurrent_connects: usize,
    /// Longest a call waits for a stream slot (1 ms to a day). Default 5 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub checkout_timeout: Duration,
    /// Longest a connect may take, from TCP to the server's SETTINGS (1 ms to an hour).
    /// Default 10 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub connect_timeout: Duration,
    /// The deadline of calls without one of their own, and the most any call may take (1 ns
    /// to 30 days). Default: none.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::optional_duration"))]
    pub timeout: Option<Duration>,
    /// gRPC's `wait_for_ready` for every call. Default `false`: fail fast.
    pub wait_for_ready: bool,
    /// Attempts per call in all, for calls the server never processed (1 to 10). Default 3.
    pub max_attempts: u32,
    /// Request-body bytes kept per call for a resend (0 to 64 MiB). Default 256 KiB.
    pub replay_buffer_limit: usize,
    /// What calls do when every endpoint is unhealthy. Default: fail fast.
    pub when_all_unhealthy: AllUnhealthy,
    /// How calls choose between endpoints. Default: fewer calls in flight
    /// ([`Balance::LeastLoaded`]); `{ peak_ewma = { decay = "10s" } }` in a file for the
    /// latency-aware choice.
    pub balance: Balance,
    /// How often the gauges are sampled (10 ms to an hour). Default 1 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub metrics_interval: Duration,
    /// PING a connection unused for this long before a call goes out on it (1 ms to a day).
    /// Default [`DEFAULT_PING_BEFORE_USE`].
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::optional_duration"))]
    pub ping_before_use: Option<Duration>,
    /// TCP keepalive: after this much quiet on a connection's socket the kernel sends probes
    /// (1 s to 32767 s, whole seconds), as tonic's `Endpoint::tcp_keepalive`. It keeps an
    /// idle connection's entry in NATs and load balancers and finds a dead peer with no work
    /// in the process and nothing the server's HTTP/2 PING policy sees. Default: none.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::optional_duration"))]
    pub tcp_keepalive: Option<Duration>,
    /// Time between TCP keepalive probes (1 s to 32767 s), with `tcp_keepalive`. Default: the
    /// system's (75 s on Linux).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::optional_duration"))]
    pub tcp_keepalive_interval: Option<Duration>,
    /// Unanswered TCP keepalive probes before the kernel drops the connection (1 to 127), with
    /// `tcp_keepalive`. Default: the system's (9 on Linux).
    pub tcp_keepalive_retries: Option<u32>,
    /// The local IP address TCP connections are made from (`"10.0.0.5"`), for hosts with
    /// several where the server allows only one, as tonic's `Endpoint::local_address`; each
    /// connects to the endpoint's addresses of its family. Not for Unix sockets. Default:
    /// the system's choice.
    pub local_address: Option<std::net::IpAddr>,
    /// Keepalive PINGs; default [`Keepalive::default`]. `None` (`"off"` in a file): none.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::off_or"))]
    pub keepalive: Option<Keepalive>,
    /// Close connections above `min_connections` that started no stream for this long (10 ms
    /// to 30 days). Default 10 minutes.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::optional_duration"))]
    pub idle_timeout: Option<Duration>,
    /// Drain and replace connections this old, +/-10%, one at a time per endpoint (100 ms to
    /// 30 days). Default: never.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::optional_duration"))]
    pub max_lifetime: Option<Duration>,
    /// Drain and replace connections after this many streams in all. Default: never.
    pub max_streams_per_connection: Option<u64>,
    /// `grpc.health.v1` checks per endpoint. Default: none.
    pub health_checks: Option<HealthCheck>,
    /// Outlier ejection. Default: none.
    pub outlier_detection: Option<OutlierDetection>,
    /// Subsetting: at most `size` of the known endpoints live, the rest known only
    /// (`[subset]` in a file: `size`, `client`, `replace_after`). Default: none, every
    /// endpoint live.
    pub subset: Option<Subset>,
    /// TLS for `https://` endpoints. Default: the system's roots, no client certificate.
    pub tls: Option<TlsConfig>,
    /// A connector of your own, instead of the pool's TCP (or Unix socket) connects, and its
    /// TLS unless `tls` is set (see [`Builder::connector`]). Not read from files.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub connector: Option<Connector>,
    /// Endpoints from DNS, besides `endpoints`. Default: none.
    pub dns: Option<DnsConfig>,
    /// Endpoints registered in etcd under a key prefix, besides `endpoints` (feature
    /// `etcd`). Default: none.
    #[cfg(feature = "etcd")]
    pub etcd: Option<EtcdConfig>,
    /// Endpoints from an xDS control plane, instead of `endpoints` (feature `xds`).
    /// Default: none.
    #[cfg(feature = "xds")]
    pub xds: Option<XdsConfig>,
    /// Reconnect backoff after failed connects. Default: gRPC's.
    pub backoff: BackoffConfig,
    /// HTTP/2 settings.
    pub h2: H2Config,
    /// gRPC's service config, the JSON document itself (per-method `timeout`,
    /// `waitForReady` and `retryPolicy`, and `retryThrottling`; see
    /// `docs/deadlines-and-retries.md`). Checked at build: a bad field fails the build naming its JSON path. Default:
    /// none.
    pub service_config: Option<String>,
    /// The same, read from this file at build. Default: none; set one of the two.
    pub service_config_file: Option<std::path::PathBuf>,
    /// Your application's name and version, put before the pool's own in the `user-agent`
    /// header of calls that carry none (`"my-app/1.2 grpc-pool/0.1.0"`; 1 to 512 visible
    /// ASCII characters or spaces). Default: none, the header is
    /// [`POOL_USER_AGENT`](crate::POOL_USER_AGENT) alone.
    pub user_agent: Option<String>,
    /// The `:scheme` and `:authority` every call carries instead of its endpoint's
    /// (`https://api.example.com`: a proxy or ingress reached by address that routes by
    /// host), as tonic's `Endpoint::origin`. TLS still verifies the endpoint's host (or
    /// `tls.server_name`). Default: none, each endpoint's own.
    pub origin: Option<String>,
}

/// `dns`: a host name whose addresses become endpoints, looked up again every `interval`
/// ([`DnsDiscover`] with the system resolver).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct DnsConfig {
    /// `http://name:port` or `https://name:port`; each address is an endpoint that keeps the
    /// name for `:authority` and TLS.
    pub uri: String,
    /// Time between lookups (1 ms to a day). Default 30 s.
    #[cfg_attr(
        feature = "serde",
        serde(default = "DnsConfig::default_interval", deserialize_with = "grpc_pool_core::de::duration")
    )]
    pub interval: Duration,
}

impl DnsConfig {
    /// `uri`'s addresses, looked up every 30 s.
    pub fn new(uri: &str) -> DnsConfig {
        DnsConfig { uri: uri.to_owned(), interval: DnsConfig::default_interval() }
    }

    fn default_interval() -> Duration {
        Duration::from_secs(30)
    }

    /// The discovery stream; fails naming `dns.uri` or `dns.interval`.
    pub(crate) fn discover(&self) -> Result<DnsDiscover<SystemResolver>, Error> {
        DnsDiscover::new(&self.uri, self.interval, SystemResolver)
    }
}

/// `etcd` (feature `etcd`): the endpoints registered under a key prefix of an etcd cluster,
/// followed by an [`EtcdDiscover`](crate::etcd::EtcdDiscover) (values read by
/// [`parse_value`](crate::etcd::parse_value)). The pool's own `tls` does not apply to etcd:
/// this section has its own. An etcd with authentication enabled takes `user` and `password`
/// (or `password_file`, read at build).
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: grpc_pool::PoolConfig = toml::from_str(r#"
///     [etcd]
///     endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
///     prefix = "services/echo/"
///     user = "echo"
///     password_file = "/run/secrets/etcd-password"
/// "#).unwrap();
/// let etcd = config.etcd.unwrap();
/// assert_eq!(etcd.prefix, "services/echo/");
/// assert!(format!("{etcd:?}").contains("password_file: Some(\"/run/secrets/etcd-password\")"));
/// # }
/// ```
#[cfg(feature = "etcd")]
#[derive(Clone)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct EtcdConfig {
    /// The etcd cluster's client URIs (`http://host:2379`, `https://...`), 1 or more.
    pub endpoints: Vec<String>,
    /// The key prefix the servers register under (`services/echo/`), not empty.
    pub prefix: String,
    /// TLS for `https://` etcd endpoints. Default: the system's roots, no client
    /// certificate.
    #[cfg_attr(feature = "serde", serde(default))]
    pub tls: Option<TlsConfig>,
    /// The etcd user to sign in as, for an etcd with authentication enabled. Default: none
    /// (calls carry no token).
    #[cfg_attr(feature = "serde", serde(default))]
    pub user: Option<String>,
    /// The user's password. Set this or `password_file` with `user`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub password: Option<String>,
    /// A file holding the user's password (one trailing newline is dropped), read when the
    /// pool is built.
    #[cfg_attr(feature = "serde", serde(default))]
    pub password_file: Option<std::path::PathBuf>,
    /// How long each etcd call (a list, signing in, a watch's creation) may wait for its
    /// answer before it fails and the discovery retries (1 ms to 3600 s). Default 10 s.
    #[cfg_attr(
        feature = "serde",
        serde(
            default = "EtcdConfig::default_call_timeout",
            deserialize_with = "grpc_pool_core::de::duration"
        )
    )]
    pub call_timeout: Duration,
}

/// Shows everything but the password.
#[cfg(feature = "etcd")]
impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .field("password_file", &self.password_file)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

#[cfg(feature = "etcd")]
impl EtcdConfig {
    /// The keys under `prefix` in the etcd at `endpoints`.
    pub fn new<I, S>(endpoints: I, prefix: &str) -> EtcdConfig
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(|e| e.as_ref().to_owned()).collect(),
            prefix: prefix.to_owned(),
            tls: None,
            user: None,
            password: None,
            password_file: None,
            call_timeout: EtcdConfig::default_call_timeout(),
        }
    }

    fn default_call_timeout() -> Duration {
        crate::etcd::DEFAULT_CALL_TIMEOUT
    }

    /// The user and password to sign in with, checked (and the password file read); errors
    /// name `etcd.user`, `etcd.password` or `etcd.password_file`.
    pub(crate) fn credentials(&self) -> Result<Option<(&str, String)>, Error> {
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid_config(
                    "etcd.password_file",
                    "(set with `etcd.password`)",
                    "either `password` or `password_file`, not both",
                ))
            }
            (Some(password), None) => Some(password.clone()),
            (None, Some(path)) => {
                let read = std::fs::read_to_string(path).map_err(|e| {
                    Error::invalid_config(
                        "etcd.password_file",
                        &format!("`{}` ({e})", path.display()),
                        "a readable UTF-8 file holding the password",
                    )
                })?;
                let password = read.strip_suffix('\n').unwrap_or(&read);
                Some(password.strip_suffix('\r').unwrap_or(password).to_owned())
            }
            (None, None) => None,
        };
        match (&self.user, password) {
            (Some(user), _) if user.is_empty() => {
                Err(Error::invalid_config("etcd.user", "\"\"", "a user name of 1 or more characters"))
            }
            (Some(_), Some(password)) if password.is_empty() => Err(Error::invalid_config(
                if self.password_file.is_some() { "etcd.password_file" } else { "etcd.password" },
                "(empty)",
                "a password of 1 or more characters",
            )),
            (Some(user), Some(password)) => Ok(Some((user, password))),
            (Some(_), None) => Err(Error::invalid_config(
                "etcd.password",
                "(none)",
                "a password for `etcd.user`, or `etcd.password_file`",
            )),
            (None, Some(_)) => Err(Error::invalid_config(
                "etcd.user",
                "(none)",
                "the user the password is for (a password needs a user)",
            )),
            (None, None) => Ok(None),
        }
    }

    /// The client and its discovery stream; fails naming the field (`etcd.endpoints`,
    /// `etcd.prefix`, `etcd.user`, `etcd.password`, `etcd.password_file`,
    /// `etcd.call_timeout`).
    pub(crate) fn discover(&self) -> Result<crate::etcd::EtcdDiscover, Error> {
        if self.prefix.is_empty() {
            return Err(Error::invalid_config(
                "etcd.prefix",
                "\"\"",
                "a key prefix of 1 or more bytes (`services/echo/`)",
            ));
        }
        let credentials = self.credentials()?;
        let mut client = crate::etcd::EtcdClient::with_tls(&self.endpoints, self.tls.clone())?
            .with_call_timeout(self.call_timeout)?;
        if let Some((user, password)) = credentials {
            client = client.with_user(user, &password)?;
        }
        crate::etcd::EtcdDiscover::new(&client, &self.prefix)
    }
}

/// `xds` (feature `xds`): the pool's endpoints from an xDS control plane, for `target`
/// (`xds:///name`), with the bootstrap in the file `bootstrap` or, without it, where the
/// environment says (`GRPC_XDS_BOOTSTRAP`, `GRPC_XDS_BOOTSTRAP_CONFIG`). See
/// [`xds`](crate::xds). A pool with this section lists no `endpoints`, `dns` or `etcd`.
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: grpc_pool::PoolConfig = toml::from_str(r#"
///     [xds]
///     target = "xds:///echo.prod:50051"
///     bootstrap = "/etc/grpc/bootstrap.json"
/// "#).unwrap();
/// assert_eq!(config.xds.unwrap().target, "xds:///echo.prod:50051");
/// # }
/// ```
#[cfg(feature = "xds")]
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct XdsConfig {
    /// The target: `xds:///name`, the name of the listener the control plane serves.
    pub target: String,
    /// The bootstrap file (gRFC A27). Default: the environment's.
    #[cfg_attr(feature = "serde", serde(default))]
    pub bootstrap: Option<std::path::PathBuf>,
}

#[cfg(feature = "xds")]
impl XdsConfig {
    /// `target`, with the environment's bootstrap.
    pub fn new(target: &str) -> XdsConfig {
        XdsConfig { target: target.to_owned(), bootstrap: None }
    }

    /// The discovery stream; fails naming `xds.target`, `xds.bootstrap` or the bootstrap's
    /// field.
    pub(crate) fn discover(&self) -> Result<crate::xds::XdsDiscover, Error> {
        let bootstrap = match &self.bootstrap {
            Some(path) => crate::xds::Bootstrap::from_file(path)?,
            None => crate::xds::Bootstrap::from_env()?,
        };
        crate::xds::XdsDiscover::new(&bootstrap, &self.target)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        let core = grpc_pool_core::Config::default();
        PoolConfig {
            name: core.name,
            endpoints: Vec::new(),
            min_connections: core.min_connections,
            max_connections: core.max_connections,
            max_total_connections: core.max_total_connections,
            max_concurrent_streams: core.max_concurrent_streams,
            max_concurrent_connects: core.max_concurrent_connects,
            checkout_timeout: core.checkout_timeout,
            connect_timeout: core.connect_timeout,
            timeout: core.timeout,
            wait_for_ready: core.wait_for_ready,
            max_attempts: core.max_attempts,
            replay_buffer_limit: core.replay_buffer_limit,
            when_all_unhealthy: core.all_unhealthy,
            balance: core.balance,
            metrics_interval: core.metrics_interval,
            ping_before_use: Some(DEFAULT_PING_BEFORE_USE),
            tcp_keepalive: core.tcp_keepalive,
            tcp_keepalive_interval: core.tcp_keepalive_interval,
            tcp_keepalive_retries: core.tcp_keepalive_retries,
            local_address: core.local_address,
            keepalive: Some(Keepalive::default()),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: None,
            max_streams_per_connection: core.max_streams_per_connection,
            health_checks: None,
            outlier_detection: core.outlier_detection,
            subset: core.subset,
            tls: core.tls,
            connector: core.connector,
            dns: None,
            #[cfg(feature = "etcd")]
            etcd: None,
            #[cfg(feature = "xds")]
            xds: None,
            backoff: core.backoff,
            h2: core.h2,
            service_config: None,
            service_config_file: None,
            user_agent: core.user_agent,
            origin: core.origin,
        }
    }
}

impl PoolConfig {
    /// A builder with this configuration, to change some of it in code.
    pub fn builder(self) -> Builder {
        Builder::from(self)
    }

    /// Builds the pool over `endpoints` and connects (see [`Builder::build`]). With `dns`,
    /// the name's addresses join as they are resolved.
    pub async fn build(self) -> Result<Pool, Error> {
        self.builder().build(Vec::<String>::new()).await
    }

    /// Builds the pool and connects in the background (see [`Builder::build_lazy`]).
    pub fn build_lazy(self) -> Result<Pool, Error> {
        self.builder().build_lazy(Vec::<String>::new())
    }

    /// The service config, parsed from `service_config` or read from `service_config_file`.
    fn service_config(&self) -> Result<Option<ServiceConfig>, Error> {
        let text = match (&self.service_config, &self.service_config_file) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid_config(
                    "service_config_file",
                    "set beside service_config",
                    "one of service_config (the JSON) and service_config_file (its path)",
                ))
            }
            (Some(json), None) => json.clone(),
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
                Error::invalid_config(
                    "service_config_file",
                    &format!("`{}` ({e})", path.display()),
                    "a readable file holding the service config JSON",
                )
            })?,
            (None, None) => return Ok(None),
        };
        ServiceConfig::from_json(&text).map(Some)
    }

    /// The core's settings and the health task's, checked.
    pub(crate) fn split(&self) -> Result<(grpc_pool_core::Config, grpc_pool_health::HealthConfig), Error> {
        let health = grpc_pool_health::HealthConfig {
            keepalive: self.keepalive.clone(),
            eviction: grpc_pool_health::EvictionPolicy {
                idle_timeout: self.idle_timeout,
                max_lifetime: self.max_lifetime,
                max_streams_per_connection: self.max_streams_per_connection,
            },
            checks: self.health_checks.clone(),
        };
        health.validate()?;
        // Every field named, so that a new core setting cannot be forgotten here.
        let core = grpc_pool_core::Config {
            name: self.name.clone(),
            min_connections: self.min_connections,
            max_connections: self.max_connections,
            max_total_connections: self.max_total_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            max_streams_per_connection: self.max_streams_per_connection,
            checkout_timeout: self.checkout_timeout,
            timeout: self.timeout,
            wait_for_ready: self.wait_for_ready,
            connect_timeout: self.connect_timeout,
            max_concurrent_connects: self.max_concurrent_connects,
            // A write to a dead peer fails as fast as a PING to it would.
            tcp_user_timeout: self.keepalive.as_ref().map(|k| k.timeout),
            tcp_keepalive: self.tcp_keepalive,
            tcp_keepalive_interval: self.tcp_keepalive_interval,
            tcp_keepalive_retries: self.tcp_keepalive_retries,
            local_address: self.local_address,
            ping_before_use: self
                .ping_before_use
                .map(|after| (after, crate::DEFAULT_PING_BEFORE_USE_TIMEOUT)),
            all_unhealthy: self.when_all_unhealthy,
            balance: self.balance,
            max_attempts: self.max_attempts,
            replay_buffer_limit: self.replay_buffer_limit,
            outlier_detection: self.outlier_detection.clone(),
            subset: self.subset.clone(),
            metrics_interval: self.metrics_interval,
            tls: self.tls.clone(),
            connector: self.connector.clone(),
            backoff: self.backoff.clone(),
            h2: self.h2.clone(),
            service_config: self.service_config()?.map(std::sync::Arc::new),
            user_agent: self.user_agent.clone(),
            origin: self.origin.clone(),
        };
        Ok((core, health))
    }
}
