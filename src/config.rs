//! The pool's configuration as data: [`PoolConfig`] deserializes with serde (from TOML, JSON,
//! or any other format), with durations written as people write them (`"30s"`, `"1m 30s"`,
//! `"250ms"`), and turns into the same [`Builder`] calls, so a file is checked exactly as code
//! is, with the same messages.
//!
//! `examples/pool.toml` lists every field with its default.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::dns::{DnsDiscover, SystemResolver};

use crate::{
    AllUnhealthy, BackoffConfig, Builder, CheckMode, ClientIdentity, Error, H2Config, HealthCheck, Keepalive,
    OutlierDetection, Pool, TlsConfig,
};

/// A whole pool configuration. Every field has the builder's default; unknown fields are an
/// error that names them.
///
/// ```
/// let config: grpc_pool::PoolConfig = serde_json::from_str(r#"{
///     "name": "orders",
///     "endpoints": ["http://10.0.0.7:50051"],
///     "checkout_timeout": "2s",
///     "keepalive": { "time": "30s", "timeout": "5s" }
/// }"#).unwrap();
/// assert_eq!(config.checkout_timeout, std::time::Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// The pool's name in logs, errors and metric labels.
    pub name: String,
    /// Endpoint URIs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Connections kept open per endpoint.
    pub min_connections: usize,
    /// Most connections per endpoint.
    pub max_connections: usize,
    /// Most concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Connects under way at once per endpoint.
    pub max_concurrent_connects: usize,
    /// Longest a call waits for a stream slot.
    #[serde(deserialize_with = "duration")]
    pub checkout_timeout: Duration,
    /// Longest a connect may take.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// The deadline of calls without one of their own; `"off"` by default.
    #[serde(deserialize_with = "optional_duration")]
    pub timeout: Option<Duration>,
    /// Whether calls wait for an endpoint to come back instead of failing fast.
    pub wait_for_ready: bool,
    /// Attempts per call for calls the server never processed.
    pub max_attempts: u32,
    /// Request-body bytes kept per call for a resend.
    pub replay_buffer_limit: usize,
    /// What calls do when every endpoint is unhealthy.
    pub when_all_unhealthy: WhenAllUnhealthy,
    /// How often the gauges are sampled.
    #[serde(deserialize_with = "duration")]
    pub metrics_interval: Duration,
    /// PING a member unused for this long before a call goes out on it; `"30s"` by default.
    #[serde(deserialize_with = "optional_duration")]
    pub ping_before_use: Option<Duration>,
    /// Keepalive PINGs.
    pub keepalive: KeepaliveSection,
    /// When members are retired.
    pub eviction: EvictionSection,
    /// `grpc.health.v1` checks; absent: none.
    pub health_check: Option<HealthCheckSection>,
    /// Outlier ejection; absent: none.
    pub outlier_detection: Option<OutlierSection>,
    /// TLS for `https://` endpoints; absent: the system's roots, no client certificate.
    pub tls: Option<TlsSection>,
    /// Endpoints from DNS, besides `endpoints`; absent: none.
    pub dns: Option<DnsSection>,
    /// Reconnect backoff.
    pub backoff: BackoffSection,
    /// HTTP/2 settings.
    pub h2: H2Section,
}

/// `when_all_unhealthy`: `"fail_fast"` or `"route_to_all"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllUnhealthy {
    /// Fail at once with each endpoint's reason.
    #[default]
    FailFast,
    /// Route to all endpoints anyway.
    RouteToAll,
}

/// `[keepalive]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KeepaliveSection {
    /// `false` turns keepalive PINGs off.
    pub enabled: bool,
    /// Quiet time before a PING.
    #[serde(deserialize_with = "duration")]
    pub time: Duration,
    /// Wait for the PONG; also `TCP_USER_TIMEOUT`.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// PING connections with no call open too.
    pub permit_without_stream: bool,
    /// Most PINGs between two frames of data from the server; 0: no limit.
    pub max_pings_without_data: u32,
}

impl Default for KeepaliveSection {
    fn default() -> Self {
        let d = Keepalive::new(crate::DEFAULT_KEEPALIVE_TIME, crate::DEFAULT_KEEPALIVE_TIMEOUT);
        KeepaliveSection {
            enabled: true,
            time: d.time,
            timeout: d.timeout,
            permit_without_stream: d.permit_without_stream,
            max_pings_without_data: d.max_pings_without_data,
        }
    }
}

/// `[eviction]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EvictionSection {
    /// Close members above `min_connections` unused for this long; `"off"`: never.
    #[serde(deserialize_with = "optional_duration")]
    pub idle_timeout: Option<Duration>,
    /// Replace members this old (+/-10%); `"off"` by default.
    #[serde(deserialize_with = "optional_duration")]
    pub max_lifetime: Option<Duration>,
    /// Replace members after this many streams; absent by default.
    pub max_streams_per_connection: Option<u64>,
}

impl Default for EvictionSection {
    fn default() -> Self {
        EvictionSection {
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: None,
            max_streams_per_connection: None,
        }
    }
}

/// `[health_check]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthCheckSection {
    /// The service name to check (`""`: the server as a whole).
    pub service: String,
    /// Time between checks.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Time between checks while an endpoint is unhealthy (the shorter of this and
    /// `interval`).
    #[serde(deserialize_with = "duration")]
    pub unhealthy_interval: Duration,
    /// Longest a check may take.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Failures in a row that mark an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Successes in a row that bring it back.
    pub healthy_threshold: u32,
    /// Whether a server without the health service counts as healthy.
    pub unimplemented_is_healthy: bool,
    /// `"watch"` (follow `Watch`; `Check` for servers without it) or `"poll"` (`Check`
    /// every interval).
    pub mode: Mode,
}

impl Default for HealthCheckSection {
    fn default() -> Self {
        let d = HealthCheck::default();
        HealthCheckSection {
            service: d.service,
            interval: d.interval,
            unhealthy_interval: d.unhealthy_interval,
            timeout: d.timeout,
            unhealthy_threshold: d.unhealthy_threshold,
            healthy_threshold: d.healthy_threshold,
            unimplemented_is_healthy: d.unimplemented_is_healthy,
            mode: match d.mode {
                CheckMode::Poll => Mode::Poll,
                CheckMode::Watch => Mode::Watch,
            },
        }
    }
}

/// `health_check.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A `Check` call every interval.
    Poll,
    /// One `Watch` stream per endpoint (`Check` calls for servers without `Watch`).
    #[default]
    Watch,
}

/// `[outlier_detection]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OutlierSection {
    /// Failed calls in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    #[serde(deserialize_with = "duration")]
    pub base_ejection_time: Duration,
    /// The longest ejection.
    #[serde(deserialize_with = "duration")]
    pub max_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejection_percent: u32,
}

impl Default for OutlierSection {
    fn default() -> Self {
        let d = OutlierDetection::default();
        OutlierSection {
            consecutive_failures: d.consecutive_failures,
            base_ejection_time: d.base_ejection_time,
            max_ejection_time: d.max_ejection_time,
            max_ejection_percent: d.max_ejection_percent,
        }
    }
}

/// `[tls]`: certificate files are read when the pool is built.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSection {
    /// PEM file of the CAs to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM file of a client certificate chain (mTLS); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// The name to verify servers' certificates against, instead of each endpoint's host.
    pub server_name: Option<String>,
    /// Accept any server certificate: tests against self-signed servers only.
    pub insecure_skip_verify: bool,
}

/// `[dns]`: a host name whose addresses become endpoints, looked up again every
/// `interval` ([`DnsDiscover`] with the system resolver).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DnsSection {
    /// `http://name:port` or `https://name:port`; each address is an endpoint that keeps the
    /// name for `:authority` and TLS.
    pub uri: String,
    /// Time between lookups (1 ms to a day). Default 30 s.
    #[serde(default = "DnsSection::default_interval", deserialize_with = "duration")]
    pub interval: Duration,
}

impl DnsSection {
    fn default_interval() -> Duration {
        Duration::from_secs(30)
    }

    /// The discovery stream; fails naming `dns.uri` or `dns.interval`.
    fn discover(&self) -> Result<DnsDiscover<SystemResolver>, Error> {
        DnsDiscover::new(&self.uri, self.interval, SystemResolver)
    }
}

/// `[backoff]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BackoffSection {
    /// Delay after the first failure.
    #[serde(deserialize_with = "duration")]
    pub base: Duration,
    /// Growth per further failure.
    pub multiplier: f64,
    /// Random spread, a fraction.
    pub jitter: f64,
    /// Longest delay.
    #[serde(deserialize_with = "duration")]
    pub max: Duration,
}

impl Default for BackoffSection {
    fn default() -> Self {
        let d = BackoffConfig::default();
        BackoffSection { base: d.base, multiplier: d.multiplier, jitter: d.jitter, max: d.max }
    }
}

/// `[h2]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct H2Section {
    /// Receive window per stream, bytes.
    pub initial_stream_window_size: u32,
    /// Receive window of the connection, bytes.
    pub initial_connection_window_size: u32,
    /// Largest frame the server may send.
    pub max_frame_size: u32,
    /// Largest response header list.
    pub max_header_list_size: u32,
}

impl Default for H2Section {
    fn default() -> Self {
        let d = H2Config::default();
        H2Section {
            initial_stream_window_size: d.initial_stream_window_size,
            initial_connection_window_size: d.initial_connection_window_size,
            max_frame_size: d.max_frame_size,
            max_header_list_size: d.max_header_list_size,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            name: "grpc-pool".to_owned(),
            endpoints: Vec::new(),
            min_connections: 1,
            max_connections: 8,
            max_concurrent_streams: 100,
            max_concurrent_connects: 8,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            timeout: None,
            wait_for_ready: false,
            max_attempts: 3,
            replay_buffer_limit: 256 * 1024,
            when_all_unhealthy: WhenAllUnhealthy::FailFast,
            metrics_interval: Duration::from_secs(1),
            ping_before_use: Some(crate::DEFAULT_PING_BEFORE_USE),
            keepalive: KeepaliveSection::default(),
            eviction: EvictionSection::default(),
            health_check: None,
            outlier_detection: None,
            tls: None,
            dns: None,
            backoff: BackoffSection::default(),
            h2: H2Section::default(),
        }
    }
}

impl PoolConfig {
    /// The builder this configuration stands for; building it checks every value. Fails
    /// only if a TLS file cannot be read (naming the field and the path).
    pub fn builder(&self) -> Result<Builder, Error> {
        let mut builder = Builder::default()
            .name(&self.name)
            .min_connections(self.min_connections)
            .max_connections(self.max_connections)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_concurrent_connects(self.max_concurrent_connects)
            .checkout_timeout(self.checkout_timeout)
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .wait_for_ready(self.wait_for_ready)
            .max_attempts(self.max_attempts)
            .replay_buffer_limit(self.replay_buffer_limit)
            .metrics_interval(self.metrics_interval)
            .when_all_unhealthy(match self.when_all_unhealthy {
                WhenAllUnhealthy::FailFast => AllUnhealthy::FailFast,
                WhenAllUnhealthy::RouteToAll => AllUnhealthy::RouteToAll,
            })
            .idle_timeout(self.eviction.idle_timeout)
            .backoff(BackoffConfig {
                base: self.backoff.base,
                multiplier: self.backoff.multiplier,
                jitter: self.backoff.jitter,
                max: self.backoff.max,
            })
            .h2(H2Config {
                initial_stream_window_size: self.h2.initial_stream_window_size,
                initial_connection_window_size: self.h2.initial_connection_window_size,
                max_frame_size: self.h2.max_frame_size,
                max_header_list_size: self.h2.max_header_list_size,
            })
            .outlier_detection(self.outlier_detection.as_ref().map(|o| OutlierDetection {
                consecutive_failures: o.consecutive_failures,
                base_ejection_time: o.base_ejection_time,
                max_ejection_time: o.max_ejection_time,
                max_ejection_percent: o.max_ejection_percent,
            }));
        builder = if self.keepalive.enabled {
            builder.keepalive(Keepalive {
                time: self.keepalive.time,
                timeout: self.keepalive.timeout,
                permit_without_stream: self.keepalive.permit_without_stream,
                max_pings_without_data: self.keepalive.max_pings_without_data,
            })
        } else {
            builder.no_keepalive()
        };
        if let Some(lifetime) = self.eviction.max_lifetime {
            builder = builder.max_lifetime(lifetime);
        }
        if let Some(streams) = self.eviction.max_streams_per_connection {
            builder = builder.max_streams_per_connection(streams);
        }
        builder = builder.ping_before_use(self.ping_before_use);
        if let Some(tls) = &self.tls {
            builder = builder.tls(tls.load()?);
        }
        if let Some(check) = &self.health_check {
            builder = builder.health_checks(HealthCheck {
                service: check.service.clone(),
                interval: check.interval,
                unhealthy_interval: check.unhealthy_interval,
                timeout: check.timeout,
                unhealthy_threshold: check.unhealthy_threshold,
                healthy_threshold: check.healthy_threshold,
                unimplemented_is_healthy: check.unimplemented_is_healthy,
                mode: match check.mode {
                    Mode::Poll => CheckMode::Poll,
                    Mode::Watch => CheckMode::Watch,
                },
            });
        }
        Ok(builder)
    }

    /// Builds the pool over `endpoints` and connects (see [`Builder::build`]). With `[dns]`,
    /// the name's addresses join as they are resolved and connect in the background; the
    /// build then waits for no connection (there may be no other endpoint).
    pub async fn build(&self) -> Result<Pool, Error> {
        let builder = self.builder()?;
        let Some(dns) = &self.dns else { return builder.build(&self.endpoints).await };
        let discover = dns.discover()?;
        let pool = if self.endpoints.is_empty() {
            builder.build_lazy(&self.endpoints)?
        } else {
            builder.build(&self.endpoints).await?
        };
        pool.discover(discover);
        Ok(pool)
    }

    /// Builds the pool over `endpoints` (and `[dns]`'s addresses as they are resolved) and
    /// connects in the background (see [`Builder::build_lazy`]).
    pub fn build_lazy(&self) -> Result<Pool, Error> {
        let builder = self.builder()?;
        let discover = self.dns.as_ref().map(DnsSection::discover).transpose()?;
        let pool = builder.build_lazy(&self.endpoints)?;
        if let Some(discover) = discover {
            pool.discover(discover);
        }
        Ok(pool)
    }
}

impl TlsSection {
    /// Reads the files.
    fn load(&self) -> Result<TlsConfig, Error> {
        let read = |field: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                Error::invalid_config(field, &format!("{} ({e})", path.display()), "a readable PEM file")
            })
        };
        let ca_pem = self.ca_file.as_ref().map(|p| read("tls.ca_file", p)).transpose()?;
        let client_identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_chain_pem: read("tls.cert_file", cert)?,
                key_pem: read("tls.key_file", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::invalid_config(
                    "tls.cert_file",
                    "given without tls.key_file, or the other way round",
                    "both files, or neither",
                ))
            }
        };
        Ok(TlsConfig {
            ca_pem,
            client_identity,
            server_name: self.server_name.clone(),
            insecure_skip_verify: self.insecure_skip_verify,
        })
    }
}

/// A duration as people write it: `"30s"`, `"1m 30s"`, `"250ms"`, `"2h"`.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(de::Error::custom)
}

/// A duration, or `"off"` for none.
fn optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if matches!(text.trim(), "off" | "never" | "none") {
        return Ok(None);
    }
    parse_duration(&text).map(Some).map_err(de::Error::custom)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration `{text}` ({e}); write it like \"30s\", \"1m 30s\" or \"250ms\"")
    })
}
