//! Configuration values and their validation.
//!
//! Every limit is checked once, at build, so that a bad value fails with a message naming the
//! field and the allowed range rather than misbehaving at run time.

use std::time::Duration;

use crate::error::Error;
pub use crate::proto::h2::settings::H2Config;

/// Reconnect backoff after failed connects, as in gRPC's connection-backoff spec.
///
/// The delay before attempt `n + 1` after `n` consecutive failures is
/// `base * multiplier^(n - 1)`, capped at `max`, and spread by `+/- jitter` (a fraction).
///
/// ```
/// use std::time::Duration;
/// let mut backoff = grpc_pool_core::BackoffConfig::default();
/// backoff.base = Duration::from_millis(100);
/// assert_eq!(backoff.max, Duration::from_secs(120));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BackoffConfig {
    /// Delay after the first failure. Default 1 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub base: Duration,
    /// Growth factor per further failure, at least 1.0. Default 1.6.
    pub multiplier: f64,
    /// Fraction of random spread, in `[0, 1)`. Default 0.2.
    pub jitter: f64,
    /// Upper bound of the delay before jitter. Default 120 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub max: Duration,
    /// After a connect was refused (the host answered that nothing listens on the port, as
    /// while a server restarts), a call that finds the endpoint down may pull the next
    /// attempt forward, no sooner than this after the one before: the endpoint's return is
    /// found by the first call after it, at no more than one attempt per `refused_retry` per
    /// endpoint, and only while calls come. Zero turns it off (only the backoff then).
    /// Other failures (timeouts, handshakes that fail, connections closed at once) follow
    /// the backoff alone: those cost the server something. Default 100 ms; 0 or 10 ms to 60 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub refused_retry: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_secs(1),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(120),
            refused_retry: Duration::from_millis(100),
        }
    }
}

impl BackoffConfig {
    /// The wait before attempt number `failures + 1`, after `failures` failed attempts in a
    /// row: `base * multiplier^(failures - 1)`, capped at `max`, then spread by `+/- jitter`
    /// (zero for no failure). The pool waits this long between connects; anything else that
    /// retries with the same policy can ask it too.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut backoff = grpc_pool_core::BackoffConfig::default();
    /// backoff.jitter = 0.0;
    /// assert_eq!(backoff.delay(0), Duration::ZERO);
    /// assert_eq!(backoff.delay(1), Duration::from_secs(1));
    /// assert_eq!(backoff.delay(2), Duration::from_millis(1600));
    /// assert_eq!(backoff.delay(99), Duration::from_secs(120));
    /// ```
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exponent = (failures - 1).min(64) as i32;
        let raw = self.base.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = raw.min(self.max.as_secs_f64());
        // Spread uniformly over [-jitter, +jitter).
        let jittered = capped * (1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

/// What checkouts do when the health task has marked every endpoint unhealthy.
///
/// ```
/// assert_eq!(grpc_pool_core::AllUnhealthy::default(), grpc_pool_core::AllUnhealthy::FailFast);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(rename_all = "snake_case"))]
pub enum AllUnhealthy {
    /// Fail at once with `UNAVAILABLE`, listing each endpoint and why it is unhealthy.
    #[default]
    FailFast,
    /// Route to all endpoints anyway, as if all were healthy (Envoy's "panic mode"): better
    /// a chance than a certain failure when health checks themselves are what broke.
    RouteToAll,
}

/// Largest HTTP/2 flow-control window (RFC 9113, 6.9.1).
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// Largest `max_connections` and `min_connections`: far above any sane deployment, low enough
/// to catch a unit mistake.
pub(crate) const MAX_CONNECTIONS_LIMIT: usize = 10_000;
/// Most streams one connection can carry: HTTP/2 client stream ids are the odd numbers below
/// 2^31, less a margin for the calls already checked out when the limit is reached.
pub(crate) const MAX_LIFETIME_STREAMS: u64 = (1 << 30) - (1 << 23);
/// Longest reconnect backoff: beyond an hour a pool is as good as stopped.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// Largest per-connection stream cap that HTTP/2 stream ids leave room for in practice.
const MAX_STREAMS_LIMIT: u32 = 1 << 20;
/// Most attempts per call: each resend goes to another member, and past a handful the
/// endpoints are going away faster than a resend can help.
const MAX_ATTEMPTS_LIMIT: u32 = 10;
/// Longest default call timeout: past a month a deadline is a mistake of units.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);
/// Largest replay buffer per call: beyond this, memory held per call matters more than the
/// resend it buys.
const MAX_REPLAY_BUFFER: usize = 64 * 1024 * 1024;

/// The whole validated configuration of one pool.
/// Every setting of a pool, checked by [`Builder`](crate::Builder) at build. Users set them
/// through the facade crate's builder or `PoolConfig`; this is the core's copy, and the one
/// place where the defaults are written.
#[derive(Debug, Clone)]
pub struct Config {
    /// The pool's name in logs, errors and the `pool` metric label; unique among live pools
    /// (the default, [`DEFAULT_POOL_NAME`], gets a `-2`, `-3`... suffix when taken).
    pub name: String,
    /// Connections kept open per endpoint.
    pub min_connections: usize,
    /// Most connections per endpoint.
    pub max_connections: usize,
    /// Most concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Streams after which a member is drained and replaced.
    pub max_streams_per_connection: Option<u64>,
    /// Longest a call waits for a stream slot.
    pub checkout_timeout: Duration,
    /// The deadline of calls without their own.
    pub timeout: Option<Duration>,
    /// gRPC's wait-for-ready for every call.
    pub wait_for_ready: bool,
    /// Longest a connect may take.
    pub connect_timeout: Duration,
    /// Connects under way at once per endpoint.
    pub max_concurrent_connects: usize,
    /// `TCP_USER_TIMEOUT` on Linux.
    pub tcp_user_timeout: Option<Duration>,
    /// TCP keepalive (`SO_KEEPALIVE`): the kernel probes a socket quiet for this long.
    pub tcp_keepalive: Option<Duration>,
    /// Time between TCP keepalive probes; the system's when `None`.
    pub tcp_keepalive_interval: Option<Duration>,
    /// Unanswered TCP keepalive probes before the kernel drops the connection; the system's
    /// when `None`.
    pub tcp_keepalive_retries: Option<u32>,
    /// The local address TCP connections are made from; the system's choice when `None`.
    pub local_address: Option<std::net::IpAddr>,
    /// PING before use: after this much quiet, with this timeout.
    pub ping_before_use: Option<(Duration, Duration)>,
    /// What calls do when every endpoint is unhealthy.
    pub all_unhealthy: AllUnhealthy,
    /// How calls choose between endpoints.
    pub balance: crate::Balance,
    /// Attempts per call for calls the server never processed.
    pub max_attempts: u32,
    /// Request-body bytes kept per call for a resend.
    pub replay_buffer_limit: usize,
    /// Outlier ejection.
    pub outlier_detection: Option<crate::outlier::OutlierDetection>,
    /// Subsetting: how many of the known endpoints are live, and which.
    pub subset: Option<crate::subset::Subset>,
    /// Most connections, open and being opened, over every endpoint.
    pub max_total_connections: Option<usize>,
    /// How often the gauges are sampled.
    pub metrics_interval: Duration,
    /// TLS for `https://` endpoints.
    pub tls: Option<crate::proto::tls::TlsConfig>,
    /// The user's connector, instead of the pool's TCP and Unix socket connects (and its TLS,
    /// unless `tls` is set).
    pub connector: Option<crate::proto::connector::Connector>,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// HTTP/2 settings.
    pub h2: H2Config,
    /// gRPC's service config: per-method timeouts, wait-for-ready and retry policies, and
    /// the pool's retry throttling.
    pub service_config: Option<std::sync::Arc<crate::service_config::ServiceConfig>>,
    /// Put before the pool's own `grpc-pool/<version>` in the `user-agent` header of calls
    /// that carry none (as tonic's `Endpoint::user_agent` does before `tonic/<version>`).
    pub user_agent: Option<String>,
    /// The `:scheme` and `:authority` of every call instead of its endpoint's
    /// (`https://api.example.com`), as tonic's `Endpoint::origin`.
    pub origin: Option<String>,
}

/// The pool's own part of the `user-agent` header.
pub const POOL_USER_AGENT: &str = concat!("grpc-pool/", env!("CARGO_PKG_VERSION"));

/// Longest `user_agent`: headers that long are a mistake, and servers cap header lists.
const MAX_USER_AGENT: usize = 512;

impl Config {
    /// The `user-agent` header calls without one are sent with: the configured prefix, if
    /// any, then [`POOL_USER_AGENT`].
    pub(crate) fn user_agent_header(&self) -> http::HeaderValue {
        match &self.user_agent {
            Some(prefix) => http::HeaderValue::try_from(format!("{prefix} {POOL_USER_AGENT}"))
                .unwrap_or(http::HeaderValue::from_static(POOL_USER_AGENT)),
            None => http::HeaderValue::from_static(POOL_USER_AGENT),
        }
    }

    /// `origin` as the scheme and authority calls carry; `None` without one (or if it does
    /// not parse, which `validate` rules out).
    pub(crate) fn origin_parts(&self) -> Option<(http::uri::Scheme, http::uri::Authority)> {
        parse_origin(self.origin.as_deref()?).ok()
    }
}

/// An origin: `http` or `https`, a host and maybe a port, nothing else.
fn parse_origin(origin: &str) -> Result<(http::uri::Scheme, http::uri::Authority), ()> {
    let uri: http::Uri = origin.parse().map_err(|_| ())?;
    let scheme = uri.scheme().filter(|s| **s == http::uri::Scheme::HTTP || **s == http::uri::Scheme::HTTPS);
    let authority = uri.authority().filter(|a| !a.host().is_empty() && !a.as_str().contains('@'));
    match (scheme, authority) {
        (Some(scheme), Some(authority)) if matches!(uri.path(), "" | "/") && uri.query().is_none() => {
            Ok((scheme.clone(), authority.clone()))
        }
        _ => Err(()),
    }
}

/// The name of a pool built without one.
pub const DEFAULT_POOL_NAME: &str = "grpc-pool";

impl Default for Config {
    fn default() -> Self {
        Config {
            name: DEFAULT_POOL_NAME.to_owned(),
            min_connections: 1,
            max_connections: 8,
            max_concurrent_streams: 100,
            max_streams_per_connection: None,
            checkout_timeout: Duration::from_secs(5),
            timeout: None,
            wait_for_ready: false,
            connect_timeout: Duration::from_secs(10),
            max_concurrent_connects: 8,
            tcp_user_timeout: None,
            tcp_keepalive: None,
            tcp_keepalive_interval: None,
            tcp_keepalive_retries: None,
            local_address: None,
            ping_before_use: None,
            all_unhealthy: AllUnhealthy::FailFast,
            balance: crate::Balance::LeastLoaded,
            max_attempts: 3,
            replay_buffer_limit: 256 * 1024,
            outlier_detection: None,
            subset: None,
            max_total_connections: None,
            metrics_interval: Duration::from_secs(1),
            tls: None,
            connector: None,
            backoff: BackoffConfig::default(),
            h2: H2Config::default(),
            service_config: None,
            user_agent: None,
            origin: None,
        }
    }
}

impl Config {
    /// Checks every field; the first violation is returned with its field and allowed range.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::config("name", "is empty", "a non-empty name for logs and metrics"));
        }
        check_range("max_connections", self.max_connections, 1, MAX_CONNECTIONS_LIMIT)?;
        check_range("min_connections", self.min_connections, 0, MAX_CONNECTIONS_LIMIT)?;
        if self.min_connections > self.max_connections {
            return Err(Error::config(
                "min_connections",
                &format!("{} is above max_connections = {}", self.min_connections, self.max_connections),
                &format!("0 to max_connections ({})", self.max_connections),
            ));
        }
        check_range("max_concurrent_streams", self.max_concurrent_streams, 1, MAX_STREAMS_LIMIT)?;
        if let Some(max) = self.max_streams_per_connection {
            check_range("max_streams_per_connection", max, 1, MAX_LIFETIME_STREAMS)?;
        }
        check_duration("checkout_timeout", self.checkout_timeout, Duration::from_millis(1), DAY)?;
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() || timeout > MAX_CALL_TIMEOUT {
                return Err(Error::config("timeout", &format!("{timeout:?}"), "above zero, up to 30 days"));
            }
        }
        check_duration("connect_timeout", self.connect_timeout, Duration::from_millis(1), HOUR)?;
        check_range("max_concurrent_connects", self.max_concurrent_connects, 1, MAX_CONNECTIONS_LIMIT)?;
        if let Some(timeout) = self.tcp_user_timeout {
            check_nonzero("tcp_user_timeout", timeout)?;
            if timeout > MAX_BACKOFF {
                return Err(Error::config(
                    "tcp_user_timeout",
                    &format!("{timeout:?}"),
                    "above zero, up to 3600s",
                ));
            }
        }
        self.validate_tcp_keepalive()?;
        if let Some((after, timeout)) = self.ping_before_use {
            check_duration("ping_before_use", after, Duration::from_millis(1), DAY)?;
            check_duration("ping_before_use.timeout", timeout, Duration::from_millis(1), HOUR)?;
        }
        check_range("max_attempts", self.max_attempts, 1, MAX_ATTEMPTS_LIMIT)?;
        check_range("replay_buffer_limit", self.replay_buffer_limit, 0, MAX_REPLAY_BUFFER)?;
        if let Some(outliers) = &self.outlier_detection {
            check_outliers(outliers)?;
        }
        if let Some(max) = self.max_total_connections {
            check_range("max_total_connections", max, 1, MAX_TOTAL_CONNECTIONS)?;
        }
        if let Some(subset) = &self.subset {
            check_range("subset.size", subset.size, 1, MAX_SUBSET)?;
            check_duration("subset.replace_after", subset.replace_after, Duration::from_millis(10), DAY)?;
        }
        if self.metrics_interval < Duration::from_millis(10) || self.metrics_interval > MAX_BACKOFF {
            return Err(Error::config(
                "metrics_interval",
                &format!("{:?}", self.metrics_interval),
                "10ms to 3600s",
            ));
        }
        if let Some(user_agent) = &self.user_agent {
            check_user_agent(user_agent)?;
        }
        if let Some(origin) = &self.origin {
            parse_origin(origin).map_err(|()| {
                Error::config(
                    "origin",
                    &format!("{origin:?}"),
                    "`http://host[:port]` or `https://host[:port]`, no path",
                )
            })?;
        }
        check_backoff(&self.backoff)?;
        if let crate::Balance::PeakEwma { decay } = self.balance {
            check_duration("balance.decay", decay, Duration::from_millis(10), HOUR)?;
        }
        check_h2(&self.h2)
    }
}

/// The largest subset: the most endpoints a pool is measured with (docs/benchmarks.md).
const MAX_SUBSET: usize = 10_000;

/// The largest `max_total_connections`: far above what one process's file descriptors allow.
const MAX_TOTAL_CONNECTIONS: usize = 1_000_000;

pub(crate) fn check_outliers(outliers: &crate::outlier::OutlierDetection) -> Result<(), Error> {
    check_range("outlier_detection.consecutive_failures", outliers.consecutive_failures, 0, 10_000)?;
    check_duration("outlier_detection.interval", outliers.interval, Duration::from_millis(10), DAY)?;
    if let Some(rate) = &outliers.success_rate {
        check_range(
            "outlier_detection.success_rate.enforcement_percentage",
            rate.enforcement_percentage,
            0,
            100,
        )?;
    }
    if let Some(failures) = &outliers.failure_percentage {
        check_range("outlier_detection.failure_percentage.threshold", failures.threshold, 0, 100)?;
        check_range(
            "outlier_detection.failure_percentage.enforcement_percentage",
            failures.enforcement_percentage,
            0,
            100,
        )?;
    }
    check_duration(
        "outlier_detection.base_ejection_time",
        outliers.base_ejection_time,
        Duration::from_millis(1),
        DAY,
    )?;
    check_duration(
        "outlier_detection.max_ejection_time",
        outliers.max_ejection_time,
        Duration::from_millis(1),
        30 * DAY,
    )?;
    if outliers.max_ejection_time < outliers.base_ejection_time {
        return Err(Error::config(
            "outlier_detection.max_ejection_time",
            &format!(
                "{:?} is below base_ejection_time = {:?}",
                outliers.max_ejection_time, outliers.base_ejection_time
            ),
            "a duration of at least base_ejection_time",
        ));
    }
    check_range("outlier_detection.max_ejection_percent", outliers.max_ejection_percent, 0, 100)?;
    Ok(())
}

fn check_backoff(backoff: &BackoffConfig) -> Result<(), Error> {
    check_nonzero("backoff.base", backoff.base)?;
    if backoff.max > MAX_BACKOFF {
        return Err(Error::config(
            "backoff.max",
            &format!("{:?}", backoff.max),
            &format!("backoff.base to {MAX_BACKOFF:?}"),
        ));
    }
    if backoff.max < backoff.base {
        return Err(Error::config(
            "backoff.max",
            &format!("{:?} is below backoff.base = {:?}", backoff.max, backoff.base),
            "a duration of at least backoff.base",
        ));
    }
    if !(backoff.multiplier >= 1.0 && backoff.multiplier <= 100.0) {
        return Err(Error::config("backoff.multiplier", &format!("{}", backoff.multiplier), "1.0 to 100.0"));
    }
    if !(backoff.jitter >= 0.0 && backoff.jitter < 1.0) {
        return Err(Error::config(
            "backoff.jitter",
            &format!("{}", backoff.jitter),
            "0.0 up to (not including) 1.0",
        ));
    }
    let retry = backoff.refused_retry;
    if !retry.is_zero() && !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&retry) {
        return Err(Error::config("backoff.refused_retry", &format!("{retry:?}"), "0 (off) or 10ms to 60s"));
    }
    Ok(())
}

fn check_h2(h2: &H2Config) -> Result<(), Error> {
    check_range("h2.initial_stream_window_size", h2.initial_stream_window_size, 1, MAX_WINDOW)?;
    check_range("h2.initial_connection_window_size", h2.initial_connection_window_size, 65_535, MAX_WINDOW)?;
    check_range("h2.max_frame_size", h2.max_frame_size, 16_384, 16_777_215)?;
    check_range("h2.max_header_list_size", h2.max_header_list_size, 1, u32::MAX)?;
    check_range("h2.max_concurrent_reset_streams", h2.max_concurrent_reset_streams, 0, 1_000_000)?;
    check_duration("h2.reset_stream_duration", h2.reset_stream_duration, Duration::ZERO, HOUR)?;
    check_range("h2.max_local_error_reset_streams", h2.max_local_error_reset_streams, 1, 1_000_000_000)?;
    Ok(())
}

/// A header value's characters (visible ASCII and spaces: what every server takes), not
/// empty, not too long.
fn check_user_agent(user_agent: &str) -> Result<(), Error> {
    let printable = user_agent.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if user_agent.trim().is_empty() || user_agent.len() > MAX_USER_AGENT || !printable {
        return Err(Error::config(
            "user_agent",
            &format!("{user_agent:?}"),
            &format!("1 to {MAX_USER_AGENT} visible ASCII characters or spaces"),
        ));
    }
    Ok(())
}

impl Config {
    /// The TCP keepalive settings: whole seconds in what Linux takes (1 s to 32767 s, 1 to
    /// 127 probes), and an interval or a count only with the time they belong to.
    fn validate_tcp_keepalive(&self) -> Result<(), Error> {
        let (one, most) = (Duration::from_secs(1), Duration::from_secs(MAX_TCP_KEEPALIVE_SECS));
        if let Some(time) = self.tcp_keepalive {
            check_duration("tcp_keepalive", time, one, most)?;
        }
        if let Some(interval) = self.tcp_keepalive_interval {
            if self.tcp_keepalive.is_none() {
                return Err(Error::config(
                    "tcp_keepalive_interval",
                    &format!("{interval:?}"),
                    "set with tcp_keepalive",
                ));
            }
            check_duration("tcp_keepalive_interval", interval, one, most)?;
        }
        if let Some(retries) = self.tcp_keepalive_retries {
            if self.tcp_keepalive.is_none() {
                return Err(Error::config(
                    "tcp_keepalive_retries",
                    &retries.to_string(),
                    "set with tcp_keepalive",
                ));
            }
            check_range("tcp_keepalive_retries", retries, 1, 127)?;
        }
        Ok(())
    }
}

/// The most seconds Linux takes for `TCP_KEEPIDLE` and `TCP_KEEPINTVL`.
const MAX_TCP_KEEPALIVE_SECS: u64 = 32_767;

fn check_range<T>(field: &str, value: T, min: T, max: T) -> Result<(), Error>
where
    T: PartialOrd + std::fmt::Display,
{
    if value < min || value > max {
        return Err(Error::config(field, &value.to_string(), &format!("{min} to {max}")));
    }
    Ok(())
}

/// Durations have a floor (zero would spin or fail everything) and a ceiling (far past any
/// real use, and low enough that adding one to an `Instant` cannot overflow). The health
/// crate checks its durations with it too, so every range error reads alike.
pub fn check_duration(field: &str, value: Duration, min: Duration, max: Duration) -> Result<(), Error> {
    if value < min || value > max {
        return Err(Error::config(field, &format!("{value:?}"), &format!("{min:?} to {max:?}")));
    }
    Ok(())
}

fn check_nonzero(field: &str, value: Duration) -> Result<(), Error> {
    if value.is_zero() {
        return Err(Error::config(field, "0s", "a duration above zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_for(change: impl FnOnce(&mut Config)) -> String {
        let mut config = Config::default();
        change(&mut config);
        config.validate().expect_err("should be rejected").to_string()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn every_invalid_field_is_named_with_its_range() {
        type Change = Box<dyn FnOnce(&mut Config)>;
        let cases: Vec<(Change, &str, &str)> = vec![
            (Box::new(|c| c.max_connections = 0), "max_connections", "1 to 10000"),
            (Box::new(|c| c.min_connections = 20_000), "min_connections", "0 to 10000"),
            (Box::new(|c| c.min_connections = 9), "min_connections", "above max_connections = 8"),
            (Box::new(|c| c.max_concurrent_streams = 0), "max_concurrent_streams", "1 to"),
            (Box::new(|c| c.checkout_timeout = Duration::ZERO), "checkout_timeout", "1ms to 86400s"),
            (Box::new(|c| c.checkout_timeout = Duration::MAX), "checkout_timeout", "1ms to 86400s"),
            (Box::new(|c| c.connect_timeout = Duration::ZERO), "connect_timeout", "1ms to 3600s"),
            (
                Box::new(|c| c.ping_before_use = Some((Duration::from_secs(30), Duration::from_secs(7200)))),
                "ping_before_use.timeout",
                "1ms to 3600s",
            ),
            (Box::new(|c| c.timeout = Some(Duration::ZERO)), "timeout", "above zero, up to 30 days"),
            (Box::new(|c| c.max_concurrent_connects = 0), "max_concurrent_connects", "1 to 10000"),
            (Box::new(|c| c.backoff.base = Duration::ZERO), "backoff.base", "above zero"),
            (Box::new(|c| c.tcp_user_timeout = Some(Duration::ZERO)), "tcp_user_timeout", "above zero"),
            (Box::new(|c| c.origin = Some("https://api.example.com/v1".into())), "origin", "no path"),
            (Box::new(|c| c.origin = Some("api.example.com".into())), "origin", "`https://host[:port]`"),
            (
                Box::new(|c| c.tcp_keepalive = Some(Duration::from_millis(500))),
                "tcp_keepalive",
                "1s to 32767s",
            ),
            (
                Box::new(|c| c.tcp_keepalive_interval = Some(Duration::from_secs(5))),
                "tcp_keepalive_interval",
                "set with tcp_keepalive",
            ),
            (
                Box::new(|c| {
                    c.tcp_keepalive = Some(Duration::from_secs(60));
                    c.tcp_keepalive_retries = Some(0);
                }),
                "tcp_keepalive_retries",
                "1 to 127",
            ),
            (
                Box::new(|c| c.max_streams_per_connection = Some(0)),
                "max_streams_per_connection",
                "1 to 1065353216",
            ),
            (Box::new(|c| c.backoff.max = Duration::from_millis(1)), "backoff.max", "at least backoff.base"),
            (Box::new(|c| c.backoff.max = Duration::MAX), "backoff.max", "backoff.base to 3600s"),
            (Box::new(|c| c.backoff.multiplier = 0.5), "backoff.multiplier", "1.0 to 100.0"),
            (Box::new(|c| c.backoff.multiplier = f64::NAN), "backoff.multiplier", "1.0 to 100.0"),
            (Box::new(|c| c.backoff.jitter = 1.0), "backoff.jitter", "0.0 up to"),
            (
                Box::new(|c| c.balance = crate::Balance::PeakEwma { decay: Duration::ZERO }),
                "balance.decay",
                "10ms to 3600s",
            ),
            (
                Box::new(|c| c.backoff.refused_retry = Duration::from_millis(1)),
                "backoff.refused_retry",
                "0 (off) or 10ms to 60s",
            ),
            (
                Box::new(|c| c.h2.reset_stream_duration = Duration::from_secs(7200)),
                "h2.reset_stream_duration",
                "0ns to 3600s",
            ),
            (
                Box::new(|c| c.h2.max_local_error_reset_streams = 0),
                "h2.max_local_error_reset_streams",
                "1 to 1000000000",
            ),
            (
                Box::new(|c| c.h2.initial_stream_window_size = 0),
                "h2.initial_stream_window_size",
                "1 to 2147483647",
            ),
            (
                Box::new(|c| c.h2.initial_connection_window_size = 10),
                "h2.initial_connection_window_size",
                "65535 to",
            ),
            (Box::new(|c| c.h2.max_frame_size = 1024), "h2.max_frame_size", "16384 to 16777215"),
            (Box::new(|c| c.h2.max_header_list_size = 0), "h2.max_header_list_size", "1 to"),
            (Box::new(|c| c.name.clear()), "name", "non-empty"),
            (Box::new(|c| c.max_attempts = 0), "max_attempts", "1 to 10"),
            (
                Box::new(|c| {
                    c.outlier_detection = Some(crate::outlier::OutlierDetection {
                        consecutive_failures: 10_001,
                        ..Default::default()
                    })
                }),
                "outlier_detection.consecutive_failures",
                "0 to 10000",
            ),
            (
                Box::new(|c| {
                    c.outlier_detection = Some(crate::outlier::OutlierDetection {
                        max_ejection_percent: 101,
                        ..Default::default()
                    })
                }),
                "outlier_detection.max_ejection_percent",
                "0 to 100",
            ),
            (
                Box::new(|c| {
                    c.outlier_detection = Some(crate::outlier::OutlierDetection {
                        max_ejection_time: Duration::from_secs(1),
                        ..Default::default()
                    })
                }),
                "outlier_detection.max_ejection_time",
                "at least base_ejection_time",
            ),
            (Box::new(|c| c.replay_buffer_limit = usize::MAX), "replay_buffer_limit", "0 to 67108864"),
        ];
        for (change, field, allowed) in cases {
            let message = message_for(change);
            assert!(message.contains(&format!("`{field}`")), "{message} should name {field}");
            assert!(message.contains(allowed), "{message} should say {allowed}");
        }
    }
}
