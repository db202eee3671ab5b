//! The health task's settings, checked at build like the pool's.

use std::time::Duration;

use grpc_pool_core::{check_duration, Error};

/// Keepalive PINGs, with the parameters of grpc-go's and the gRPC C core's client keepalive.
///
/// A member with calls in flight that has received nothing for `time` gets an HTTP/2 PING;
/// no PONG within `timeout` closes it (`ping_timeout`), and the calls on it fail at once with
/// `UNAVAILABLE` instead of hanging until their deadlines. On Linux, `timeout` also becomes
/// the sockets' `TCP_USER_TIMEOUT`, so a write to a dead peer fails as fast.
///
/// Servers police PINGs. gRPC's (the C core's `Chttp2PingAbusePolicy`, grpc-go's
/// `handlePing`) count a PING as a strike when it comes within 5 minutes of the previous one
/// while calls are open, or within 2 hours while none are (unless the server permits PINGs
/// without calls), forget the strikes whenever the server sends HEADERS or DATA, and answer
/// a third strike with GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings". So, as the C core's own
/// client does (`grpc.http2.max_pings_without_data`), at most `max_pings_without_data` PINGs
/// go out on a member between two frames of data from the server (at most one strike), and
/// idle members are not PINGed unless `permit_without_stream` says so: the pool checks them
/// before use instead (`Builder::ping_before_use`), which servers never count.
///
/// ```
/// use std::time::Duration;
/// let keepalive = grpc_pool_health::Keepalive::new(Duration::from_secs(20), Duration::from_secs(10));
/// assert!(!keepalive.permit_without_stream);
/// assert_eq!(keepalive.max_pings_without_data, 2);
/// // PING idle connections too, every 10 s, however long the server stays silent: only for
/// // servers that permit it (grpc.keepalive_permit_without_calls, PermitWithoutStream).
/// let mut idle_too = grpc_pool_health::Keepalive::new(Duration::from_secs(10), Duration::from_secs(5));
/// idle_too.permit_without_stream = true;
/// idle_too.max_pings_without_data = 0;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct Keepalive {
    /// Quiet time after which a member is PINGed (10 ms to a day).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub time: Duration,
    /// How long a PING may wait for its PONG (1 ms to an hour).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub timeout: Duration,
    /// Whether members without streams are PINGed too. Default `false`: gRPC servers count
    /// a PING on an idle connection as abuse unless told otherwise, and a dead idle
    /// connection is found by the PING before use at no such risk. Should a server answer
    /// `too_many_pings` anyway, the task doubles `time` for that endpoint.
    pub permit_without_stream: bool,
    /// Most PINGs sent on a member between two DATA or HEADERS frames from the server (0:
    /// no limit). Default 2, as the gRPC C core's client: a call silent for long on a live
    /// connection then costs two PONGs and never a GOAWAY. Set 0 only for servers that
    /// permit PINGs without data.
    pub max_pings_without_data: u32,
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

impl Default for Keepalive {
    /// [`DEFAULT_KEEPALIVE_TIME`] and [`DEFAULT_KEEPALIVE_TIMEOUT`], as [`Keepalive::new`].
    fn default() -> Self {
        Keepalive::new(DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT)
    }
}

impl Keepalive {
    /// PING members with calls in flight after `time` of quiet, wait `timeout` for the PONG;
    /// idle members are not PINGed, and at most 2 PINGs go out without data from the server
    /// in between.
    pub fn new(time: Duration, timeout: Duration) -> Keepalive {
        Keepalive { time, timeout, permit_without_stream: false, max_pings_without_data: 2 }
    }
}

/// When members are retired even though they work.
///
/// ```
/// use std::time::Duration;
/// let policy = grpc_pool_health::EvictionPolicy {
///     idle_timeout: Some(Duration::from_secs(300)),
///     max_lifetime: Some(Duration::from_secs(1800)),
///     ..Default::default()
/// };
/// assert_eq!(policy.max_streams_per_connection, None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictionPolicy {
    /// Close members above `min_connections` that started no stream for this long.
    pub idle_timeout: Option<Duration>,
    /// Drain and replace members this old (+/-10% jitter, one at a time per endpoint).
    pub max_lifetime: Option<Duration>,
    /// Drain and replace members that have carried this many streams in all (enforced by the
    /// pool on the call that reaches it).
    pub max_streams_per_connection: Option<u64>,
}

/// How endpoints are health-checked with `grpc.health.v1.Health`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(rename_all = "snake_case"))]
pub enum CheckMode {
    /// A `Check` call every `interval` (with +/-10% jitter; `unhealthy_interval` while the
    /// endpoint is unhealthy).
    Poll,
    /// A `Watch` stream per endpoint (the default, and recommended): the verdict changes as
    /// soon as the server's status does, at the cost of one open stream per endpoint. A
    /// broken stream counts as a failed check and is reopened after `interval`
    /// (`unhealthy_interval` while the endpoint is unhealthy). An endpoint whose server
    /// answers `Watch` with `UNIMPLEMENTED` (a health service with `Check` only, or none) is
    /// polled with `Check` instead, as in [`CheckMode::Poll`].
    #[default]
    Watch,
}

/// gRPC health checks per endpoint (`grpc.health.v1.Health`).
///
/// `unhealthy_threshold` failed checks in a row mark an endpoint unhealthy: no new streams
/// go there. `healthy_threshold` successes in a row bring it back. `NOT_SERVING` and
/// `SERVICE_UNKNOWN` are failures. A server without the health service (`UNIMPLEMENTED`) is
/// healthy unless `unimplemented_is_healthy` is false; it is logged once.
///
/// ```
/// let checks = grpc_pool_health::HealthCheck::service("echo.Echo");
/// assert_eq!(checks.unhealthy_threshold, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct HealthCheck {
    /// The service name to ask about; `""` asks about the server as a whole.
    pub service: String,
    /// Time between checks (at least 10 ms). Default 5 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub interval: Duration,
    /// Time between checks while the endpoint is marked unhealthy (10 ms to 1 h; the shorter
    /// of this and `interval` applies). Default 1 s: an endpoint back from an outage takes
    /// traffic again after `healthy_threshold` checks this far apart, not `interval` apart.
    /// (An unhealthy endpoint is also checked at once when a new connection to it is ready.)
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub unhealthy_interval: Duration,
    /// Longest a check may take (at least 1 ms). Default 1 s.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "grpc_pool_core::de::duration"))]
    pub timeout: Duration,
    /// Failures in a row that mark an endpoint unhealthy (1 to 100). Default 2.
    pub unhealthy_threshold: u32,
    /// Successes in a row that mark it healthy again (1 to 100). Default 2.
    pub healthy_threshold: u32,
    /// Whether a server without the health service counts as healthy. Default true.
    pub unimplemented_is_healthy: bool,
    /// Follow `Watch`, or poll with `Check`. Default `Watch` (`Check` for servers without
    /// `Watch`).
    pub mode: CheckMode,
}

impl HealthCheck {
    /// Checks of `service` (`""`: the server as a whole) with the default settings.
    pub fn service(service: &str) -> HealthCheck {
        HealthCheck { service: service.to_owned(), ..HealthCheck::default() }
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            service: String::new(),
            interval: Duration::from_secs(5),
            unhealthy_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            unimplemented_is_healthy: true,
            mode: CheckMode::Watch,
        }
    }
}

/// Everything the health task does for one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthConfig {
    /// Keepalive PINGs; `None` turns them off.
    pub keepalive: Option<Keepalive>,
    /// Retirement of members that still work.
    pub eviction: EvictionPolicy,
    /// gRPC health checks per endpoint; `None` turns them off.
    pub checks: Option<HealthCheck>,
}

impl HealthConfig {
    /// Checks every field; the first violation names the field and its allowed range.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(keepalive) = &self.keepalive {
            check_duration("keepalive.time", keepalive.time, Duration::from_millis(10), DAY)?;
            check_duration("keepalive.timeout", keepalive.timeout, Duration::from_millis(1), HOUR)?;
            if keepalive.max_pings_without_data > 1000 {
                return Err(Error::invalid_config(
                    "keepalive.max_pings_without_data",
                    &keepalive.max_pings_without_data.to_string(),
                    "0 (no limit) to 1000",
                ));
            }
        }
        if let Some(idle) = self.eviction.idle_timeout {
            check_duration("idle_timeout", idle, Duration::from_millis(10), 30 * DAY)?;
        }
        if let Some(lifetime) = self.eviction.max_lifetime {
            check_duration("max_lifetime", lifetime, Duration::from_millis(100), 30 * DAY)?;
        }
        if let Some(checks) = &self.checks {
            check_duration("health_checks.interval", checks.interval, Duration::from_millis(10), HOUR)?;
            check_duration(
                "health_checks.unhealthy_interval",
                checks.unhealthy_interval,
                Duration::from_millis(10),
                HOUR,
            )?;
            check_duration("health_checks.timeout", checks.timeout, Duration::from_millis(1), HOUR)?;
            for (field, value) in [
                ("health_checks.unhealthy_threshold", checks.unhealthy_threshold),
                ("health_checks.healthy_threshold", checks.healthy_threshold),
            ] {
                if !(1..=100).contains(&value) {
                    return Err(Error::invalid_config(field, &value.to_string(), "1 to 100"));
                }
            }
        }
        if self.eviction.max_streams_per_connection == Some(0) {
            return Err(Error::invalid_config("max_streams_per_connection", "0", "1 or more, or None"));
        }
        Ok(())
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (
                HealthConfig {
                    keepalive: Some(Keepalive::new(Duration::ZERO, Duration::from_secs(1))),
                    ..Default::default()
                },
                "`keepalive.time` = 0ns; allowed: 10ms to 86400s",
            ),
            (
                HealthConfig {
                    keepalive: Some(Keepalive::new(Duration::from_secs(1), Duration::ZERO)),
                    ..Default::default()
                },
                "`keepalive.timeout` = 0ns; allowed: 1ms to 3600s",
            ),
            (
                HealthConfig {
                    eviction: EvictionPolicy { idle_timeout: Some(Duration::ZERO), ..Default::default() },
                    ..Default::default()
                },
                "`idle_timeout`",
            ),
            (
                HealthConfig {
                    eviction: EvictionPolicy {
                        max_lifetime: Some(Duration::from_millis(1)),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "`max_lifetime` = 1ms; allowed: 100ms to 2592000s",
            ),
            (
                HealthConfig {
                    eviction: EvictionPolicy { max_streams_per_connection: Some(0), ..Default::default() },
                    ..Default::default()
                },
                "`max_streams_per_connection` = 0",
            ),
            (
                HealthConfig {
                    checks: Some(HealthCheck { unhealthy_threshold: 0, ..Default::default() }),
                    ..Default::default()
                },
                "`health_checks.unhealthy_threshold` = 0; allowed: 1 to 100",
            ),
            (
                HealthConfig {
                    checks: Some(HealthCheck { interval: Duration::ZERO, ..Default::default() }),
                    ..Default::default()
                },
                "`health_checks.interval` = 0ns; allowed: 10ms to 3600s",
            ),
            (
                HealthConfig {
                    checks: Some(HealthCheck { unhealthy_interval: Duration::ZERO, ..Default::default() }),
                    ..Default::default()
                },
                "`health_checks.unhealthy_interval` = 0ns; allowed: 10ms to 3600s",
            ),
            (
                HealthConfig {
                    checks: Some(HealthCheck {
                        unhealthy_interval: Duration::from_secs(7200),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "`health_checks.unhealthy_interval` = 7200s; allowed: 10ms to 3600s",
            ),
        ];
        for (config, expected) in cases {
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(expected), "{message} should contain {expected}");
        }
        HealthConfig::default().validate().unwrap();
        HealthConfig { checks: Some(HealthCheck::default()), ..Default::default() }.validate().unwrap();
    }

    #[test]
    fn watch_is_the_default_and_unhealthy_endpoints_are_checked_every_second() {
        let checks = HealthCheck::default();
        assert_eq!(checks.mode, CheckMode::Watch);
        assert_eq!(checks.unhealthy_interval, Duration::from_secs(1));
        assert!(checks.unhealthy_interval < checks.interval);
    }
}
