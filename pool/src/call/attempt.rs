//! One attempt of a call, in the pieces `ResponseFuture` puts together: where it may go and
//! the slot it gets there now, the check a stale member needs before use, the stream open on
//! the member (body going out, response head awaited), the request head kept for a resend,
//! and the error of a stream that failed before its response head.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri};
use http_body::Body;
use tokio::time::Instant;

use crate::endpoint::EndpointShared;
use crate::error::Error;
use crate::inner::PoolInner;
use crate::internals::EndpointEntry;
use crate::member::{EvictionReason, Member, MemberState, Slot};
use crate::proto::h2::body::{Pump, PumpError};
use crate::proto::h2::ping::PingError;
use crate::proto::h2::replay::{CallBody, Recording};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a call may go.
#[derive(Clone)]
pub(crate) enum Target {
    /// Any member of any healthy endpoint: the pool's own checkout.
    Pool,
    /// The least loaded ready member of one endpoint, even if it is full (the stream then
    /// waits in h2 for the server's room) or the endpoint is marked unhealthy: for health
    /// checks, which must not be starved by the traffic they judge. With its label, for the
    /// error once it is removed.
    Endpoint(Weak<EndpointEntry>, String),
    /// One member and no other: for probing that connection.
    Member(Weak<Member>),
}

/// The request head kept for another attempt: h2 consumes the head it sends. The headers
/// are kept as a list, which is cheaper to make than a `HeaderMap` clone and is only turned
/// back into a map on the rare resend.
#[derive(Clone)]
pub(super) struct Head {
    pub(super) method: Method,
    pub(super) path: PathAndQuery,
    pub(super) headers: Vec<(HeaderName, HeaderValue)>,
}

/// A stream open on a member: the request body going out, the response head awaited.
pub(super) struct Sending<B> {
    pub(super) slot: Slot,
    pub(super) response: h2::client::ResponseFuture,
    pub(super) pump: Option<Pin<Box<Pump<CallBody<B>>>>>,
    pub(super) stream_id: u32,
    /// For a replay, while one is possible: the head, and the body once it has gone out
    /// whole (`None` until then; an empty body counts as whole from the start).
    pub(super) head: Option<Head>,
    pub(super) sent_body: Option<Recording>,
    /// The body went past the replay limit, so no replay is possible.
    pub(super) body_over_limit: bool,
    /// The pump stopped because its stream failed; it is kept, unpolled, for what it had
    /// not sent yet.
    pub(super) pump_stopped: bool,
    /// For a call under a service config, this attempt's span (entered while the attempt
    /// is polled, closed when it ends); none for other calls.
    pub(super) span: tracing::Span,
    /// When the request went out, for the latency-aware choice between endpoints (only
    /// when the pool balances so: a clock reading per call otherwise saved).
    pub(super) sent_at: Option<tokio::time::Instant>,
}

/// Runs the rest of a request body on a task of its own.
pub(super) fn spawn_pump<B>(pump: Pin<Box<Pump<CallBody<B>>>>) -> Result<tokio::task::AbortHandle, Error>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::request_body(
            "the endpoint",
            "a streaming request must be polled inside a Tokio runtime (its body is sent from a task)".into(),
        )
    })?;
    Ok(runtime
        .spawn(async move {
            let _ = pump.await;
        })
        .abort_handle())
}

/// The error of a call whose response head failed; marked unprocessed when the server
/// provably never saw the stream (refused, or above a GOAWAY's last stream id).
pub(super) fn response_error(slot: &Slot, stream_id: u32, err: h2::Error) -> Error {
    let member = slot.member();
    let refused = err.reason() == Some(h2::Reason::REFUSED_STREAM);
    let above_goaway = err.is_go_away()
        && err.is_remote()
        && member.signals.goaway().is_some_and(|goaway| stream_id > goaway.last_stream_id);
    let error = Error::from_h2(&member.endpoint.label, err);
    if refused || above_goaway {
        error.mark_unprocessed()
    } else {
        error
    }
}

/// The check a slot's member needs before the call may go out on it, if any: a PING when it
/// has been unused for `ping_before_use`, or waiting for another call's PING of it (one
/// before use, or one after a deadline passed on it).
pub(super) fn needs_check(
    pool: &Arc<PoolInner>,
    target: &Target,
    slot: &Slot,
) -> Option<Pin<Box<dyn Future<Output = bool> + Send>>> {
    if !matches!(target, Target::Pool) {
        return None;
    }
    let member = slot.member();
    let stale = match pool.config.ping_before_use {
        Some((after, _)) => slot.unused_for >= after && member.signals.since_last_read() >= after,
        None => false,
    };
    if !stale && !member.is_probing() {
        return None;
    }
    let timeout = ping_bound(member, ping_timeout(pool));
    let (pool, member) = (pool.clone(), member.clone());
    Some(Box::pin(async move {
        let Some(probe) = member.start_probe() else {
            // Another call is PINGing it: its answer serves this call too. That PING is
            // bounded by the same timeout, so waiting longer would only wait for nothing.
            let _ = tokio::time::timeout(timeout, member.probe_finished()).await;
            return member.state() == MemberState::Ready;
        };
        let verdict = ping(&member, Instant::now() + timeout).await;
        if !verdict.alive() {
            // Nothing is in flight on a member unused this long: closing it costs nothing.
            let why = verdict.failure();
            pool.kill(
                &member,
                EvictionReason::PingTimeout,
                &format!("{why} when PINGed before use ({timeout:?})"),
            );
        }
        drop(probe);
        verdict.alive()
    }))
}

/// How long a PING waits for its PONG when `ping_before_use` does not say.
const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The PING before use's bound, which the PING after a deadline shares.
fn ping_timeout(pool: &PoolInner) -> Duration {
    pool.config.ping_before_use.map_or(DEFAULT_PING_TIMEOUT, |(_, timeout)| timeout)
}

/// How long a check of `member` waits for its PONG: `timeout`, or four round trips of its
/// connection if longer, so that a far server is not taken for a dead one.
fn ping_bound(member: &Member, timeout: Duration) -> Duration {
    member.pinger.last_rtt().map_or(timeout, |rtt| timeout.max(rtt * 4))
}

/// How a check's PING ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PingVerdict {
    Answered,
    /// A keepalive PING is out already: its own timeout decides.
    KeepaliveOut,
    NoPong,
    /// The connection failed under the PING.
    Broken,
}

impl PingVerdict {
    fn alive(self) -> bool {
        matches!(self, PingVerdict::Answered | PingVerdict::KeepaliveOut)
    }

    /// What happened to a PING that found its member dead.
    fn failure(self) -> &'static str {
        match self {
            PingVerdict::Broken => "the connection failed under its PING",
            _ => "no PONG",
        }
    }

    /// `result` label of `grpc_pool_deadline_pings_total`.
    fn label(self) -> &'static str {
        match self {
            PingVerdict::Answered => "ok",
            PingVerdict::KeepaliveOut => "keepalive_out",
            PingVerdict::NoPong => "timeout",
            PingVerdict::Broken => "error",
        }
    }
}

/// PINGs `member` (the caller holds its probe role) and waits for the PONG until `until`.
async fn ping(member: &Member, until: Instant) -> PingVerdict {
    match tokio::time::timeout_at(until, member.pinger.ping()).await {
        Ok(Ok(_)) => PingVerdict::Answered,
        Ok(Err(PingError::Busy)) => PingVerdict::KeepaliveOut,
        Ok(Err(PingError::Connection(_))) => PingVerdict::Broken,
        Err(_) => PingVerdict::NoPong,
    }
}

/// A call's deadline passed on `member` while it waited for the server: the first sign of a
/// connection dropped without a word. If the connection has heard nothing for as long as a
/// PING may take (the PING before use's bound: 1 s, or four round trips), it is PINGed at
/// once, from a task of its own (the call has its error already). Calls that pick it
/// meanwhile wait for the answer, as for a check before use, instead of following the dead
/// call onto it. Without a PONG in time it takes no new calls (drained, `ping_timeout`);
/// the calls in flight on it keep their own deadlines, so a server only stalled (a long GC
/// pause) costs none of them, and keepalive's timeout closes it if it stays silent. So a
/// silent drop under load is found a deadline and a PING after it happened, not after
/// keepalive's 30 s. Only while no PING went out since the server's last data: it adds at
/// most one PING, the first, which no server's PING policy counts as a strike.
pub(super) fn ping_after_deadline(pool: &Arc<PoolInner>, member: &Arc<Member>) {
    let timeout = ping_bound(member, ping_timeout(pool));
    let quiet = member.signals.since_last_read();
    if quiet < timeout || member.state() != MemberState::Ready || member.signals.pings_without_data() > 0 {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    // The role is taken, and the PING's bound starts, now rather than when the task runs: a
    // call that picks the member meanwhile waits for this PING's answer, for no longer.
    let Some(probe) = member.start_probe() else { return };
    let until = Instant::now() + timeout;
    let (pool, member) = (pool.clone(), member.clone());
    runtime.spawn(async move {
        tracing::debug!(
            pool = %pool.name(),
            member = member.id,
            endpoint = %member.endpoint.label,
            ?quiet,
            "a call's deadline passed on a quiet connection: PINGing it",
        );
        let verdict = ping(&member, until).await;
        pool.count_deadline_ping(&member, verdict.label());
        // A connection that failed under the PING is closed by its own task, as `io_error`.
        if verdict == PingVerdict::NoPong {
            let detail =
                format!("no PONG within {timeout:?} after a call's deadline passed on the quiet connection");
            pool.evict(&member, EvictionReason::PingTimeout, &detail);
        }
        drop(probe);
    });
}

/// A slot at `target` now, or `Err` with the reason there is none; `Ok(None)` means queue in
/// the pool's checkout.
pub(super) fn slot_now(
    pool: &Arc<PoolInner>,
    target: &Target,
    avoid: Option<&Arc<EndpointShared>>,
) -> Result<Option<Slot>, Error> {
    match target {
        Target::Pool => {
            pool.admit()?;
            let slot = avoid.and_then(|avoid| pool.checkout_elsewhere(avoid)).or_else(|| pool.checkout_now());
            // Another call took the last place between the look and the stream.
            if slot.as_ref().is_some_and(|s| s.counted() && pool.requests.over()) {
                drop(slot);
                return Err(pool.over_limit());
            }
            Ok(slot)
        }
        Target::Endpoint(entry, label) => {
            let Some(entry) = entry.upgrade().filter(|e| !e.is_removed()) else {
                return Err(Error::no_member(label, "the endpoint was removed from the pool"));
            };
            entry.force_acquire().map(Some).ok_or_else(|| {
                pool.replenish(&entry);
                Error::no_member(entry.label(), "no ready connection to this endpoint")
            })
        }
        Target::Member(member) => member
            .upgrade()
            .and_then(|m| m.force_acquire())
            .map(Some)
            .ok_or_else(|| Error::no_member(pool.name(), "the member is no longer ready")),
    }
}

pub(super) fn rebuild<B>(head: Head, body: B) -> Request<B> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = Uri::from(head.path);
    let headers = request.headers_mut();
    headers.reserve(head.headers.len());
    for (name, value) in head.headers {
        headers.append(name, value);
    }
    request
}

/// The response head, or how the stream failed before it; `Err` if the request body failed.
pub(super) type HeadResult = Result<Result<http::Response<h2::RecvStream>, h2::Error>, Error>;

impl<B> Sending<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Sends more of the request body and looks for the response head.
    pub(super) fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<HeadResult> {
        let span = (!self.span.is_none()).then(|| self.span.clone());
        let _attempt = span.as_ref().map(|span| span.enter());
        if let Err(error) = self.poll_pump(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.response).poll(cx).map(Ok)
    }

    /// Sends more of the request body, unless it went out whole or its stream failed (then
    /// the response says why); an error only if the body itself failed.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        let Some(pump) = self.pump.as_mut().filter(|_| !self.pump_stopped) else {
            return Ok(());
        };
        match pump.as_mut().poll(cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => {
                self.sent_body = pump.as_mut().take_recording();
                self.body_over_limit = pump.over_replay_limit();
                self.pump = None;
            }
            Poll::Ready(Err(PumpError::Stream)) => self.pump_stopped = true,
            Poll::Ready(Err(PumpError::Body(cause))) => {
                return Err(Error::request_body(&self.slot.member().endpoint.label, cause));
            }
        }
        Ok(())
    }
}
