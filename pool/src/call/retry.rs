//! The service config's retry policy (gRPC A6) at the moment an attempt's response head
//! arrives: whether the call is committed, done, or to be sent again, and with what.
//!
//! Only a trailers-only answer (the status in the head, no message) can be retried: once the
//! server has sent response headers the call is committed to that attempt, as A6 says, so a
//! streaming call that delivered a message is never sent again.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use http_body::Body;
use tonic::Code;

use super::attempt::{Head, Sending};
use crate::inner::PoolInner;
use crate::proto::h2::body::Unsent;
use crate::proto::h2::replay::{CallBody, UnsentBody};
use crate::service_config::RetryPolicy;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The server's pushback: milliseconds to wait before the next attempt, or, if negative or
/// not a number, no further attempt.
static PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
/// Sent on every retry: the attempts before this one.
static PREVIOUS_ATTEMPTS: HeaderName = HeaderName::from_static("grpc-previous-rpc-attempts");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// What the retry policy makes of an attempt's response head.
pub(super) enum Verdict<B> {
    /// Response headers without a status: the server committed to this attempt; its
    /// trailers will tell how it ended.
    Committed,
    /// A status the policy leaves as it is (OK, or not retryable).
    Done,
    /// A retryable status that is not retried, and why.
    NotRetried(String),
    /// Send the call again: after the server's pushback if it gave one, else the backoff.
    Retry { code: Code, pushback: Option<Duration>, head: Head, body: CallBody<B> },
}

/// The status in a response head or trailers, if there is one.
pub(super) fn status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(&GRPC_STATUS)?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// Where a call under a retry policy stands when an attempt of it ends: the attempts that
/// failed before it, and the time left of its deadline (`None`: no deadline).
#[derive(Debug, Clone, Copy)]
pub(super) struct Standing {
    pub(super) retries: u32,
    pub(super) time_left: Option<Duration>,
}

/// Judges an attempt whose response head came, under `policy`. Counts the outcome in the
/// pool's retry throttle.
pub(super) fn judge<B>(
    pool: &PoolInner,
    policy: &RetryPolicy,
    standing: Standing,
    sending: &mut Sending<B>,
    headers: &HeaderMap,
) -> Verdict<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Some(code) = status(headers) else { return Verdict::Committed };
    judge_status(pool, policy, standing, sending, code, headers.get(&PUSHBACK))
}

/// Judges an attempt that ended with `code` before the server committed to it: a
/// trailers-only answer (with the server's `pushback`, if any), or a stream that failed
/// before its response head.
pub(super) fn judge_status<B>(
    pool: &PoolInner,
    policy: &RetryPolicy,
    standing: Standing,
    sending: &mut Sending<B>,
    code: Code,
    pushback: Option<&HeaderValue>,
) -> Verdict<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if code == Code::Ok {
        if let Some(tokens) = &pool.retry_tokens {
            tokens.success();
        }
        return Verdict::Done;
    }
    if !policy.is_retryable(code) {
        return Verdict::Done;
    }
    // A6's order: the failure counts against the throttle first, then the attempts left.
    if let Some(tokens) = &pool.retry_tokens {
        if !tokens.failure() {
            pool.count_throttled_retry();
            return Verdict::NotRetried(
                "retries are throttled (the pool's retryThrottling tokens are at or below half)".to_owned(),
            );
        }
    }
    if standing.retries + 1 >= policy.max_attempts {
        return Verdict::NotRetried(format!("all {} attempts of its retry policy used", policy.max_attempts));
    }
    let pushback = match pushback {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(ms) => match pushback_too_long(Duration::from_millis(ms), policy, standing.time_left) {
                None => Some(Duration::from_millis(ms)),
                Some(why) => {
                    return Verdict::NotRetried(format!("the server's grpc-retry-pushback-ms ({ms}) {why}"))
                }
            },
            None => {
                let shown = String::from_utf8_lossy(value.as_bytes()).into_owned();
                return Verdict::NotRetried(format!(
                    "the server's grpc-retry-pushback-ms ({shown}) says not to"
                ));
            }
        },
    };
    match take_replay(sending) {
        Some((head, body)) => Verdict::Retry { code, pushback, head, body },
        None => {
            let over =
                sending.body_over_limit || sending.pump.as_ref().is_some_and(|p| p.over_replay_limit());
            Verdict::NotRetried(if over {
                format!(
                    "its request body is over the replay buffer limit ({} bytes)",
                    pool.config.replay_buffer_limit
                )
            } else {
                "its request body could not be kept for a resend".to_owned()
            })
        }
    }
}

/// The longest pushback a call without a deadline waits out, unless its policy's
/// `maxBackoff` is longer.
const PUSHBACK_CEILING: Duration = Duration::from_secs(30);

/// Why the server's pushback is not waited out, if it is not. The server may name any wait
/// (a u64 of milliseconds): a call waits one that ends before its deadline, and a call with
/// no deadline one up to the longer of its policy's `maxBackoff` and [`PUSHBACK_CEILING`].
/// Past that the call ends now with the server's status, rather than sleep without bound,
/// or sleep only to fail with DEADLINE_EXCEEDED and hide the server's answer.
fn pushback_too_long(
    pushback: Duration,
    policy: &RetryPolicy,
    time_left: Option<Duration>,
) -> Option<String> {
    match time_left {
        Some(left) if pushback >= left => Some(format!("ends past the call's deadline ({left:?} left)")),
        Some(_) => None,
        None => {
            let ceiling = policy.max_backoff.max(PUSHBACK_CEILING);
            (pushback > ceiling).then(|| {
                format!("is longer than a call without a deadline waits ({ceiling:?}: maxBackoff, or 30s if longer)")
            })
        }
    }
}

/// The attempt's head and its whole body (what went out, and what had not yet), for the
/// next attempt; `None`, with `sending` untouched, when they are not at hand.
fn take_replay<B>(sending: &mut Sending<B>) -> Option<(Head, CallBody<B>)>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if sending.head.is_none() || sending.body_over_limit {
        return None;
    }
    if let Some(sent) = sending.sent_body.take() {
        return Some((sending.head.take()?, CallBody::replay(sent, None)));
    }
    let pump = sending.pump.as_mut()?;
    if pump.over_replay_limit() {
        return None;
    }
    let sent = pump.as_mut().take_recording()?;
    let pump = sending.pump.take()?;
    let rest: UnsentBody = Box::pin(Unsent::new(pump));
    Some((sending.head.take()?, CallBody::replay(sent, Some(rest))))
}

/// Sets `grpc-previous-rpc-attempts` on the head of a retry.
pub(super) fn set_previous_attempts(head: &mut Head, previous: u32) {
    head.headers.retain(|(name, _)| name != PREVIOUS_ATTEMPTS);
    head.headers.push((PREVIOUS_ATTEMPTS.clone(), HeaderValue::from(previous)));
}

/// Adds why a retryable status was not retried to the answer's `grpc-message`.
pub(super) fn note_not_retried(headers: &mut HeaderMap, why: &str) {
    let message = match headers.get(&GRPC_MESSAGE).map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
    {
        Some(message) if !message.is_empty() => format!("{message}; not retried: {why}"),
        _ => format!("not retried: {why}"),
    };
    if let Ok(value) = HeaderValue::try_from(message) {
        headers.insert(GRPC_MESSAGE.clone(), value);
    }
}
