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
/// has been unused for `ping_before_use`, or waiting for another call's PING of it.
pub(super) fn needs_check(
    pool: &Arc<PoolInner>,
    target: &Target,
    slot: &Slot,
) -> Option<Pin<Box<dyn Future<Output = bool> + Send>>> {
    let (after, timeout) = pool.config.ping_before_use?;
    if !matches!(target, Target::Pool) {
        return None;
    }
    let member = slot.member();
    let stale = slot.unused_for >= after && member.signals.since_last_read() >= after;
    if !stale && !member.is_probing() {
        return None;
    }
    let timeout = ping_bound(member, timeout);
    let (pool, member) = (pool.clone(), member.clone());
    Some(Box::pin(async move {
        let Some(probe) = member.start_probe() else {
            // Another call is PINGing it: its answer serves this call too. That PING is
            // bounded by the same timeout, so waiting longer would only wait for nothing.
            let _ = tokio::time::timeout(timeout, member.probe_finished()).await;
            return member.state() == MemberState::Ready;
        };
        let alive = ping_or_kill(&pool, &member, timeout, "when PINGed before use").await;
        drop(probe);
        alive
    }))
}

/// How long a PING waits for its PONG when `ping_before_use` does not say.
const DEFAULT_PING_BOUND: Duration = Duration::from_secs(1);

/// How long a check of `member` waits for its PONG: `timeout`, or four round trips of its
/// connection if longer, so that a far server is not taken for a dead one.
fn ping_bound(member: &Member, timeout: Duration) -> Duration {
    member.pinger.last_rtt().map_or(timeout, |rtt| timeout.max(rtt * 4))
}

/// PINGs `member` (the caller holds its probe role) and kills it, as `PingTimeout`, if no
/// PONG comes within `timeout`. Whether it answered; a keepalive PING already out counts as
/// an answer, as its own timeout decides.
async fn ping_or_kill(pool: &Arc<PoolInner>, member: &Arc<Member>, timeout: Duration, when: &str) -> bool {
    let alive = match tokio::time::timeout(timeout, member.pinger.ping()).await {
        Ok(Ok(_)) => true,
        Ok(Err(PingError::Busy)) => true,
        Ok(Err(PingError::Connection(_))) | Err(_) => false,
    };
    if !alive {
        pool.kill(member, EvictionReason::PingTimeout, &format!("no PONG within {timeout:?} {when}"));
    }
    alive
}

/// A call's deadline passed on `member` while it waited for the server: the first sign of a
/// connection dropped without a word. If the connection has heard nothing for as long as a
/// PING may take (1 s, or four round trips), it is PINGed at once, from a task of its own
/// (the call has its error already), and killed without a PONG in that time. Calls that
/// pick it meanwhile wait for the answer, as for a check before use, instead of following
/// the dead call onto it: a silent drop under load is found a deadline and a second after
/// it happened, not after keepalive's 30 s. Only while no PING went out since the server's
/// last data, so this never spends more of the server's PING policy than keepalive would.
pub(super) fn ping_after_deadline(pool: &Arc<PoolInner>, member: &Arc<Member>) {
    let timeout = ping_bound(member, pool.config.ping_before_use.map_or(DEFAULT_PING_BOUND, |(_, t)| t));
    let quiet = member.signals.since_last_read();
    let usable = matches!(member.state(), MemberState::Ready | MemberState::Draining);
    if quiet < timeout || !usable || member.is_probing() || member.signals.pings_without_data() > 0 {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    // The role is taken now, not in the task: a call that picks the member before the task
    // runs must already wait for the PING's answer rather than go out on it.
    let Some(probe) = member.start_probe() else { return };
    let (pool, member) = (pool.clone(), member.clone());
    runtime.spawn(async move {
        tracing::debug!(
            pool = %pool.name(),
            member = member.id,
            endpoint = %member.endpoint.label,
            ?quiet,
            "a call's deadline passed on a quiet connection: PINGing it",
        );
        let alive =
            ping_or_kill(&pool, &member, timeout, "after a call's deadline passed on the quiet connection")
                .await;
        pool.count_deadline_ping(&member, alive);
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
            Ok(avoid.and_then(|avoid| pool.checkout_elsewhere(avoid)).or_else(|| pool.checkout_now()))
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
