//! A call's deadline: read from its `grpc-timeout` header (or the pool's default `timeout`),
//! enforced over the whole call, and sent on as the time left when the request goes out.
//!
//! The header's format is gRPC's (`PROTOCOL-HTTP2.md`): at most eight ASCII digits and a unit,
//! `H` hours, `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use tokio::time::{Instant, Sleep};

/// The header that carries a call's timeout.
pub(crate) static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The largest value the header may hold: eight digits.
const MAX_VALUE: u128 = 99_999_999;

/// The timeout a `grpc-timeout` value names; `None` if it is malformed.
pub(crate) fn parse(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    let (unit, digits) = bytes.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout` as a `grpc-timeout` value: the finest unit in which it fits eight digits,
/// rounded up, so the server never sees less time than is left.
pub(crate) fn encode(timeout: Duration) -> HeaderValue {
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (value, unit) = units
        .iter()
        .map(|(per, unit)| (nanos.div_ceil(*per), *unit))
        .find(|(value, _)| *value <= MAX_VALUE)
        .unwrap_or((MAX_VALUE, 'H'));
    HeaderValue::try_from(format!("{value}{unit}")).unwrap_or(HeaderValue::from_static("99999999H"))
}

/// When a call must be over, and a timer that wakes its task then.
pub(crate) struct Deadline {
    /// The timeout the call was given, for its error.
    pub(crate) timeout: Duration,
    pub(crate) at: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    pub(crate) fn after(timeout: Duration) -> Deadline {
        let now = Instant::now();
        let at = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        Deadline { timeout, at, timer: Box::pin(tokio::time::sleep_until(at)) }
    }

    /// Time left; zero once it has passed.
    pub(crate) fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed; if not, the task is woken when it does.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer.as_mut().poll(cx) == Poll::Ready(())
    }
}

impl std::fmt::Debug for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline")
            .field("timeout", &self.timeout)
            .field("remaining", &self.remaining())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_malformed_values() {
        let cases = [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("200m", Some(Duration::from_millis(200))),
            ("5u", Some(Duration::from_micros(5))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("0m", Some(Duration::ZERO)),
            ("", None),
            ("m", None),
            ("100", None),
            ("123456789m", None),
            ("1.5S", None),
            ("-1S", None),
            ("10s", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(&HeaderValue::from_static(text)), expected, "{text}");
        }
    }

    #[test]
    fn encodes_in_the_finest_unit_that_fits_rounding_up() {
        let cases = [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_millis(200), "200000u"),
            (Duration::from_nanos(100_000_001), "100001u"),
            (Duration::from_secs(5), "5000000u"),
            (Duration::from_secs(100_000), "100000S"),
            (Duration::from_secs(4_000 * 86_400), "5760000M"),
        ];
        for (timeout, expected) in cases {
            assert_eq!(encode(timeout), expected, "{timeout:?}");
            let back = parse(&encode(timeout)).unwrap();
            assert!(back >= timeout, "{timeout:?} came back as {back:?}");
        }
    }
}
