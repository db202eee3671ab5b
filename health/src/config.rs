//! The health task's settings, checked at build like the pool's.

use std::time::Duration;

use grpc_pool_core::Error;

/// Keepalive PINGs, with the parameters of grpc-go's and Kitex's client keepalive.
///
/// A member that has received nothing for `time` gets an HTTP/2 PING; no PONG within
/// `timeout` closes it (`ping_timeout`), and the calls on it fail at once with `UNAVAILABLE`
/// instead of hanging until their deadlines. On Linux, `timeout` also becomes the sockets'
/// `TCP_USER_TIMEOUT`, so a write to a dead peer fails as fast.
///
/// ```
/// use std::time::Duration;
/// let keepalive = grpc_pool_health::Keepalive::new(Duration::from_secs(10), Duration::from_secs(5));
/// assert!(keepalive.permit_without_stream);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time after which a member is PINGed (at least 10 ms).
    pub time: Duration,
    /// How long a PING may wait for its PONG (at least 1 ms).
    pub timeout: Duration,
    /// Whether members without streams are PINGed too. Default `true`: finding idle
    /// connections that died is the point. Servers that count such PINGs as abuse answer
    /// with GOAWAY `too_many_pings`; the task then doubles `time` for that endpoint.
    pub permit_without_stream: bool,
}

impl Keepalive {
    /// PING after `time` of quiet, wait `timeout` for the PONG, idle members included.
    pub fn new(time: Duration, timeout: Duration) -> Keepalive {
        Keepalive { time, timeout, permit_without_stream: true }
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

/// Everything the health task does for one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthConfig {
    /// Keepalive PINGs; `None` turns them off.
    pub keepalive: Option<Keepalive>,
    /// Retirement of members that still work.
    pub eviction: EvictionPolicy,
}

impl HealthConfig {
    /// Checks every field; the first violation names the field and its allowed range.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(keepalive) = &self.keepalive {
            at_least("keepalive.time", keepalive.time, Duration::from_millis(10))?;
            at_least("keepalive.timeout", keepalive.timeout, Duration::from_millis(1))?;
        }
        if let Some(idle) = self.eviction.idle_timeout {
            at_least("eviction.idle_timeout", idle, Duration::from_millis(10))?;
        }
        if let Some(lifetime) = self.eviction.max_lifetime {
            at_least("eviction.max_lifetime", lifetime, Duration::from_millis(100))?;
        }
        if self.eviction.max_streams_per_connection == Some(0) {
            return Err(Error::invalid_config(
                "eviction.max_streams_per_connection",
                "0",
                "1 or more, or None",
            ));
        }
        Ok(())
    }
}

fn at_least(field: &str, value: Duration, min: Duration) -> Result<(), Error> {
    if value < min {
        return Err(Error::invalid_config(field, &format!("{value:?}"), &format!("at least {min:?}")));
    }
    Ok(())
}

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
                "`keepalive.time` = 0ns; allowed: at least 10ms",
            ),
            (
                HealthConfig {
                    keepalive: Some(Keepalive::new(Duration::from_secs(1), Duration::ZERO)),
                    ..Default::default()
                },
                "`keepalive.timeout` = 0ns; allowed: at least 1ms",
            ),
            (
                HealthConfig {
                    eviction: EvictionPolicy { idle_timeout: Some(Duration::ZERO), ..Default::default() },
                    ..Default::default()
                },
                "`eviction.idle_timeout`",
            ),
            (
                HealthConfig {
                    eviction: EvictionPolicy {
                        max_lifetime: Some(Duration::from_millis(1)),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "`eviction.max_lifetime` = 1ms; allowed: at least 100ms",
            ),
            (
                HealthConfig {
                    eviction: EvictionPolicy { max_streams_per_connection: Some(0), ..Default::default() },
                    ..Default::default()
                },
                "`eviction.max_streams_per_connection` = 0",
            ),
        ];
        for (config, expected) in cases {
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(expected), "{message} should contain {expected}");
        }
        HealthConfig::default().validate().unwrap();
    }
}
