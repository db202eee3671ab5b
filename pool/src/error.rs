//! The one error type of the pool.
//!
//! Every error says what happened, to which endpoint, and what to do. Each also carries the
//! gRPC status a caller should see, so that tonic, which looks for a `tonic::Status` in an
//! error's source chain, reports `UNAVAILABLE` for a lost connection rather than `UNKNOWN`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

use crate::proto::grpc::MessageTooLarge;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A configuration value is out of range; nothing was started.
    Config,
    /// An endpoint URI could not be used (no host, port 0, unsupported scheme).
    InvalidEndpoint,
    /// Connecting to an endpoint failed (TCP, timeout, or the HTTP/2 handshake).
    Connect,
    /// No stream slot became free within `checkout_timeout`.
    CheckoutTimeout,
    /// The pool was closed; it takes no new calls.
    PoolClosed,
    /// Every endpoint is marked unhealthy by its health checks.
    AllUnhealthy,
    /// The connection under a call failed or went away while the call was on it.
    Connection,
    /// The server reset the call's stream, or the stream failed on its own.
    Stream,
    /// The caller's request body failed.
    RequestBody,
    /// A PING got no answer (the connection failed, or another PING was in flight).
    Ping,
    /// The call's deadline passed (its `grpc-timeout`, or the pool's `timeout`).
    DeadlineExceeded,
    /// A request or response message was over the service config's
    /// `maxRequestMessageBytes` or `maxResponseMessageBytes` (`RESOURCE_EXHAUSTED`).
    MessageTooLarge,
    /// No endpoint could take the call (all unreachable, unhealthy, ejected or removed), and
    /// the call failed fast instead of waiting for one (`wait_for_ready` off).
    Unavailable,
}

/// An error from the pool: configuration, connecting, checkout, or a call on a connection.
///
/// `Display` gives the whole story; [`Error::kind`] tells what kind it is, and
/// [`Error::grpc_code`] the gRPC status code a caller sees through tonic.
///
/// ```
/// let config = grpc_pool_core::Config { max_connections: 0, ..Default::default() };
/// let err = grpc_pool_core::Builder::from_config(config).build_lazy(["http://127.0.0.1:1"]).unwrap_err();
/// assert_eq!(err.kind(), grpc_pool_core::ErrorKind::Config);
/// assert!(err.to_string().contains("max_connections"));
/// ```
#[derive(Clone)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    message: String,
    status: Status,
    /// Kept apart from `status` so that a note added later can rebuild the status with it.
    cause: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
    /// Whether the request provably never reached the server, so it may be sent again.
    unprocessed: bool,
}

impl Error {
    fn new(kind: ErrorKind, code: Code, message: String, cause: Option<BoxError>) -> Error {
        let cause: Option<Arc<dyn std::error::Error + Send + Sync + 'static>> = cause.map(Arc::from);
        let status = status_of(code, &message, cause.as_ref());
        Error { inner: Box::new(Inner { kind, message, status, cause, unprocessed: false }) }
    }

    /// Adds why the call was not sent again: "...; not retried: {why}".
    pub(crate) fn not_retried(mut self, why: &str) -> Error {
        let inner = &mut *self.inner;
        inner.message = format!("{}; not retried: {why}", inner.message);
        inner.status = status_of(inner.status.code(), &inner.message, inner.cause.as_ref());
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The gRPC status code this error maps to.
    pub fn grpc_code(&self) -> Code {
        self.inner.status.code()
    }

    /// Whether the server provably never saw the request (refused, or never sent), so that
    /// sending it again cannot run it twice.
    pub fn is_unprocessed(&self) -> bool {
        self.inner.unprocessed
    }

    pub(crate) fn mark_unprocessed(mut self) -> Error {
        self.inner.unprocessed = true;
        self
    }

    pub(crate) fn config(field: &str, value: &str, allowed: &str) -> Error {
        Error::new(
            ErrorKind::Config,
            Code::InvalidArgument,
            format!("invalid pool configuration: `{field}` = {value}; allowed: {allowed}"),
            None,
        )
    }

    /// A service config document that cannot be used: the JSON path of the bad field (empty
    /// for the document itself) and what is wrong with it.
    pub(crate) fn service_config(path: &str, problem: &str) -> Error {
        let at = if path.is_empty() { String::new() } else { format!("{path}: ") };
        Error::new(
            ErrorKind::Config,
            Code::InvalidArgument,
            format!("invalid service config: {at}{problem}"),
            None,
        )
    }

    /// A configuration error for settings outside this crate (the health task's), worded
    /// like the pool's own: the field, its value, and what is allowed. Between this
    /// workspace's crates only: hidden from the docs, not part of the API.
    #[doc(hidden)]
    pub fn invalid_config(field: &str, value: &str, allowed: &str) -> Error {
        Error::config(field, value, allowed)
    }

    /// A connection that cannot take calls any more (closed, or not answering PINGs), for
    /// code that manages connections itself on top of the pool (the bb8 adapter):
    /// `UNAVAILABLE`, kind [`ErrorKind::Connection`]. Between this workspace's crates only:
    /// hidden from the docs, not part of the API.
    #[doc(hidden)]
    pub fn connection_unusable(endpoint: &str, what: &str) -> Error {
        Error::new(
            ErrorKind::Connection,
            Code::Unavailable,
            format!("connection to {endpoint}: {what}"),
            None,
        )
    }

    pub(crate) fn invalid_endpoint(uri: &str, problem: &str) -> Error {
        Error::new(
            ErrorKind::InvalidEndpoint,
            Code::InvalidArgument,
            format!("invalid endpoint `{uri}`: {problem}; expected `http://host:port`"),
            None,
        )
    }

    pub(crate) fn connect(endpoint: &str, what: &str, cause: Option<BoxError>) -> Error {
        let detail = cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default();
        Error::new(
            ErrorKind::Connect,
            Code::Unavailable,
            format!("connecting to {endpoint} failed: {what}{detail}"),
            cause,
        )
    }

    /// Whether this is a connect that nobody answered at the TCP level: the host is up and
    /// nothing listens on the port (`ECONNREFUSED`), as while a server restarts. Such an
    /// attempt cost the server nothing, so the pool may try again sooner than its backoff
    /// (`BackoffConfig::refused_retry`).
    pub(crate) fn is_connection_refused(&self) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = match &self.inner.cause {
            Some(cause) => Some(cause.as_ref()),
            None => return false,
        };
        while let Some(error) = next {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return true;
                }
            }
            next = error.source();
        }
        false
    }

    /// The pool could not be built eagerly because no endpoint could be reached.
    pub(crate) fn no_endpoint_reachable(pool: &str, errors: &[Error]) -> Error {
        let each: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
        Error::new(
            ErrorKind::Connect,
            Code::Unavailable,
            format!(
                "pool `{pool}`: no endpoint could be reached at build; check the addresses and \
                 that the servers run, or use build_lazy() to connect in the background:\n{}",
                each.join("\n")
            ),
            None,
        )
    }

    /// No slot within `checkout_timeout`: the pool is saturated (every member busy), or, for
    /// a `wait_for_ready` call without a deadline, every endpoint stayed down (`outage`).
    pub(crate) fn checkout_timeout(pool: &str, waited: Duration, detail: &str, outage: bool) -> Error {
        let advice = if outage {
            "Every endpoint is down: check the servers and the network; give the call a deadline \
             to wait longer"
        } else {
            "Raise max_connections or checkout_timeout, or lower the load"
        };
        Error::new(
            ErrorKind::CheckoutTimeout,
            Code::Unavailable,
            format!("pool `{pool}`: no stream slot within checkout_timeout ({waited:?}); {detail}. {advice}"),
            None,
        )
    }

    /// No endpoint can take a call now (every one is unreachable, unhealthy, ejected or
    /// removed) and the call fails fast rather than wait for one, as gRPC calls do unless
    /// they are `wait_for_ready`.
    pub(crate) fn outage(pool: &str, detail: &str) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            Code::Unavailable,
            format!(
                "pool `{pool}`: no endpoint can take the call ({detail}); failing fast. Calls that \
                 should wait for an endpoint to come back can set wait_for_ready"
            ),
            None,
        )
    }

    pub(crate) fn over_limit(pool: &str, limit: u64) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            Code::Unavailable,
            format!(
                "pool `{pool}`: {limit} calls in flight, max_requests ({limit}) reached: circuit breaker \
                 open, failing at once"
            ),
            None,
        )
    }

    pub(crate) fn all_unhealthy(pool: &str, endpoints: &[(String, String)]) -> Error {
        let each: Vec<String> = endpoints.iter().map(|(e, why)| format!("{e}: {why}")).collect();
        Error::new(
            ErrorKind::AllUnhealthy,
            Code::Unavailable,
            format!(
                "pool `{pool}`: every endpoint is unhealthy ({}); failing fast. Fix the servers, or \
                 route to all of them anyway with when_all_unhealthy(AllUnhealthy::RouteToAll)",
                each.join("; ")
            ),
            None,
        )
    }

    pub(crate) fn pool_closed(pool: &str) -> Error {
        Error::new(
            ErrorKind::PoolClosed,
            Code::Unavailable,
            format!("pool `{pool}` is closed and takes no new calls"),
            None,
        )
    }

    /// The connection under a call failed; the server may or may not have processed it.
    pub(crate) fn from_h2(endpoint: &str, err: h2::Error) -> Error {
        let code = code_for_h2(&err);
        let (kind, what) = if err.is_io() {
            (ErrorKind::Connection, "connection failed")
        } else if err.is_go_away() {
            (ErrorKind::Connection, "connection closed by GOAWAY")
        } else if err.is_remote() && err.reason().is_some() {
            (ErrorKind::Stream, "stream reset by the server")
        } else if err.reason().is_some() {
            (ErrorKind::Stream, "stream reset")
        } else {
            (ErrorKind::Connection, "HTTP/2 error")
        };
        Error::new(kind, code, format!("call to {endpoint}: {what}: {err}"), Some(Box::new(err)))
    }

    /// A call's deadline passed; `situation` says where the call was then.
    pub(crate) fn deadline_exceeded(timeout: Duration, situation: &str) -> Error {
        Error::new(
            ErrorKind::DeadlineExceeded,
            Code::DeadlineExceeded,
            format!("deadline of {timeout:?} exceeded {situation}; not retried: the deadline has passed"),
            None,
        )
    }

    pub(crate) fn no_member(endpoint: &str, what: &str) -> Error {
        Error::new(ErrorKind::Connection, Code::Unavailable, format!("call to {endpoint}: {what}"), None)
    }

    pub(crate) fn ping(endpoint: &str, member: u64, what: &str) -> Error {
        Error::new(
            ErrorKind::Ping,
            Code::Unavailable,
            format!("PING on member {member} of {endpoint}: {what}"),
            None,
        )
    }

    pub(crate) fn request_body(endpoint: &str, cause: BoxError) -> Error {
        if let Some(too_large) = cause.downcast_ref::<MessageTooLarge>() {
            return Error::message_too_large(too_large.clone());
        }
        Error::new(
            ErrorKind::RequestBody,
            Code::Internal,
            format!("call to {endpoint}: the request body failed: {cause}"),
            Some(cause),
        )
    }
}

impl Error {
    /// A message over the method's size limit; the call is not sent again.
    pub(crate) fn message_too_large(too_large: MessageTooLarge) -> Error {
        Error::new(
            ErrorKind::MessageTooLarge,
            Code::ResourceExhausted,
            format!("{too_large}; the call was cancelled, not retried"),
            None,
        )
    }
}

fn status_of(
    code: Code,
    message: &str,
    cause: Option<&Arc<dyn std::error::Error + Send + Sync + 'static>>,
) -> Status {
    let mut status = Status::new(code, message.to_owned());
    if let Some(cause) = cause {
        status.set_source(cause.clone());
    }
    status
}

/// The gRPC code for an HTTP/2 failure, per gRPC's "HTTP/2 to gRPC status" mapping.
pub(crate) fn code_for_h2(err: &h2::Error) -> Code {
    if err.is_io() {
        return Code::Unavailable;
    }
    if err.is_go_away() && err.is_remote() {
        return Code::Unavailable;
    }
    match err.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("code", &self.inner.status.code())
            .field("message", &self.inner.message)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // tonic walks this chain and reports the status it finds here.
        Some(&self.inner.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_sees_the_status_in_the_chain() {
        let err = Error::pool_closed("orders");
        let status = Status::from_error(Box::new(err));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("pool `orders` is closed"), "{}", status.message());
    }

    #[test]
    fn a_note_on_why_a_call_was_not_retried_reaches_the_status() {
        let err = Error::from_h2("127.0.0.1:1", h2::Error::from(h2::Reason::REFUSED_STREAM))
            .not_retried("all 3 attempts used");
        assert!(err.to_string().ends_with("; not retried: all 3 attempts used"), "{err}");
        let status = Status::from_error(Box::new(err));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("not retried: all 3 attempts used"), "{}", status.message());
    }

    #[test]
    fn refused_streams_are_unavailable() {
        let err = Error::from_h2("127.0.0.1:1", h2::Error::from(h2::Reason::REFUSED_STREAM));
        assert_eq!(err.grpc_code(), Code::Unavailable);
        assert_eq!(err.kind(), ErrorKind::Stream);
    }
}
