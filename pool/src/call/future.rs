//! A call's future: the states a call goes through (checkout, the check before use, the
//! stream open) and the steps between them, retries and deadlines included.
//!
//! About 600 lines, kept in one file on purpose: the states and the steps that move between
//! them are one state machine, read top to bottom; the pieces of one attempt that stand on
//! their own are in `attempt`, and what the service config's retry and hedging policies add
//! (the backoff, the hedged copies) in `policies`.

use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Uri, Version};
use http_body::Body;

use super::attempt::{
    needs_check, ping_after_deadline, rebuild, response_error, slot_now, spawn_pump, Head, Sending, Target,
};
use super::body::{BodyExtras, ResponseBody, ThrottleWatch};
use super::deadline::{self, Deadline, GRPC_TIMEOUT};
use super::hedge::{Ended, Hedge};
use super::options::WaitForReady;
use super::retry::{self, Verdict};
use crate::endpoint::EndpointShared;
use crate::error::{Error, ErrorKind};
use crate::inner::PoolInner;
use crate::member::{EvictionReason, Member, Slot};
use crate::proto::grpc::MessageLimit;
use crate::proto::h2::body::{Pump, Unsent};
use crate::proto::h2::replay::{CallBody, Recording, UnsentBody};
use crate::service_config::MethodConfig;
use crate::stats::RetryReason;

mod policies;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type Checkout = Pin<Box<dyn Future<Output = Result<Slot, Error>> + Send>>;

/// The future of [`Pool::call`](tower_service::Service::call): a stream slot, then the
/// response head.
///
/// Like most futures, it panics if polled again after it returned `Ready`.
pub struct ResponseFuture<B> {
    pool: Arc<PoolInner>,
    target: Target,
    /// On a resend: the endpoint that refused or lost the call, tried last.
    avoid: Option<Arc<EndpointShared>>,
    /// Where the call is; `None` once it has ended (its output returned).
    state: Option<Live<B>>,
    /// Attempts made so far, the current one included once it has started.
    attempts: u32,
    /// When the call must be over, if it has a deadline; handed to the response body.
    deadline: Option<Deadline>,
    /// Wait for an endpoint to come back rather than fail fast (gRPC's `wait_for_ready`).
    wait_for_ready: bool,
    /// The service config's entry for this call's method, for calls through the pool.
    method: Option<Arc<MethodConfig>>,
    /// Attempts the retry policy has seen fail with a retryable status.
    retries: u32,
    /// Hedged copies sent after the first.
    hedged: u32,
    /// Streams the call opened: what its servers saw, for the attempts histogram.
    streams: u32,
    /// Copies of a hedged call sent before its current copies: those of a hedge whose every
    /// copy was lost, before the call was sent again. They count against `maxAttempts`.
    hedge_sent: u32,
    /// The retry policy's backoff exponent: retries since the start or the last pushback.
    backoff_n: u32,
}

/// Where a call that has not ended is. Each state owns what it needs, so every step has its
/// slot, request and stream at hand rather than in an `Option` it must hope is filled. A
/// waiting state is polled where it is, and taken out of the future only to move on: a call
/// that waits does not copy its state around.
enum Live<B> {
    Checkout {
        request: Request<CallBody<B>>,
        /// The queued checkout, once the fast path found no slot.
        waiting: Option<Checkout>,
    },
    /// PINGing the slot's member before use (or waiting for another call's PING of it).
    Verifying {
        slot: Slot,
        request: Request<CallBody<B>>,
        check: Pin<Box<dyn Future<Output = bool> + Send>>,
    },
    Sending(Sending<B>),
    /// Copies of the call out at once (the hedging policy), the first response head wins.
    Hedging(Box<Hedge<B>>),
    /// The retry policy's backoff before the next attempt.
    Backoff {
        request: Request<CallBody<B>>,
        sleep: Pin<Box<tokio::time::Sleep>>,
    },
}

/// What moving a call on came to: `Continue` once its next state is in place (to be polled
/// at once), `Break` with its output when it ended.
type Step = ControlFlow<Result<http::Response<ResponseBody>, Error>>;

/// What opening a stream came to.
enum Opened<B> {
    Sent(Sending<B>),
    /// The connection was going away: nothing was written. With the head, if another
    /// attempt is allowed.
    NotSent {
        error: Error,
        again: Option<Head>,
        body: CallBody<B>,
    },
    Failed(Error),
}

impl<B> Live<B> {
    /// The first state of a call, and of each resend.
    fn checkout(request: Request<CallBody<B>>) -> Live<B> {
        Live::Checkout { request, waiting: None }
    }
}

// The request body is never pinned in place: it is moved into a boxed pump before it is
// polled, so the future itself may move freely.
impl<B> Unpin for ResponseFuture<B> {}

impl<B> ResponseFuture<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(pool: Arc<PoolInner>, request: Request<B>) -> ResponseFuture<B> {
        ResponseFuture::to(pool, Target::Pool, request)
    }

    pub(crate) fn to(pool: Arc<PoolInner>, target: Target, request: Request<B>) -> ResponseFuture<B> {
        // The call's own deadline, and for calls through the pool the pool's default: the
        // shorter one holds. Calls aimed at one endpoint or member (health checks, probes)
        // bound themselves.
        let own = request.headers().get(&GRPC_TIMEOUT).and_then(deadline::parse);
        let pool_call = matches!(target, Target::Pool);
        // The service config's entry for the method; its timeout holds when it is shorter.
        let method = match &pool.config.service_config {
            Some(config) if pool_call => config.for_path(request.uri().path()).cloned(),
            _ => None,
        };
        let pool_default = pool.config.timeout.filter(|_| pool_call);
        let method_timeout = method.as_ref().and_then(|m| m.timeout);
        let timeout = [own, pool_default, method_timeout].into_iter().flatten().min();
        let default_wait =
            method.as_ref().and_then(|m| m.wait_for_ready).unwrap_or(pool.config.wait_for_ready);
        let wait_for_ready = request.extensions().get::<WaitForReady>().map_or(default_wait, |w| w.0);
        ResponseFuture {
            pool,
            target,
            avoid: None,
            state: Some(Live::checkout(request.map(|body| {
                CallBody::original(body, method.as_ref().and_then(|m| m.max_request_message_bytes))
            }))),
            attempts: 0,
            deadline: timeout.map(Deadline::after),
            wait_for_ready,
            method,
            retries: 0,
            hedged: 0,
            streams: 0,
            hedge_sent: 0,
            backoff_n: 0,
        }
    }

    /// The retry policy of the call's method, if it has one.
    fn retry_policy(&self) -> Option<&crate::service_config::RetryPolicy> {
        self.method.as_ref().and_then(|m| m.retry_policy.as_ref())
    }

    /// Where the call stands for its retry policy: its failed attempts and time left.
    fn standing(&self) -> retry::Standing {
        retry::Standing { retries: self.retries, time_left: self.deadline.as_ref().map(Deadline::remaining) }
    }

    /// The error of a call whose deadline passed while it waited in `live`, saying where it
    /// was; ends the call (its slot freed, its stream, if open, reset with `CANCEL`).
    fn expire(&self, live: Live<B>) -> Error {
        let timeout = self.deadline.as_ref().map(|d| d.timeout).unwrap_or_default();
        let situation = match &live {
            Live::Checkout { .. } => {
                format!(
                    "waiting for a stream slot in pool `{}`: {}",
                    self.pool.name(),
                    self.pool.busy_summary()
                )
            }
            Live::Verifying { slot, .. } => {
                format!("while PINGing the connection to {} before use", slot.member().endpoint.label)
            }
            Live::Sending(sending) => {
                ping_after_deadline(&self.pool, sending.slot.member());
                format!("waiting for the response head from {}", sending.slot.member().endpoint.label)
            }
            Live::Backoff { .. } => {
                format!("in the retry policy's backoff, after {} attempts", self.retries)
            }
            Live::Hedging(hedge) => {
                for (_, copy) in &hedge.attempts {
                    ping_after_deadline(&self.pool, copy.slot.member());
                }
                format!("waiting for the response head of {} hedged copies", hedge.attempts.len())
            }
        };
        self.abandon(live);
        Error::deadline_exceeded(timeout, &situation)
    }

    /// Readies the request head in `parts` for `member`: its full URI, and the time left of
    /// the call's deadline. Returns a copy of it for another attempt, when one is allowed.
    fn prepare_head(&self, member: &Member, parts: &mut http::request::Parts) -> Result<Option<Head>, Error> {
        let endpoint = &member.endpoint.endpoint;
        if let Some(deadline) = &self.deadline {
            // The server is told the time left now, after any wait or earlier attempt, as
            // grpc-go does; none left, and the call does not go out at all.
            let left = deadline.remaining();
            if left.is_zero() {
                return Err(Error::deadline_exceeded(
                    deadline.timeout,
                    &format!("before the call could be sent to {}", member.endpoint.label),
                ));
            }
            parts.headers.insert(GRPC_TIMEOUT.clone(), deadline::encode(left));
        }
        // Who is calling, as tonic's `Channel` tells; a caller's own header is kept.
        if let http::header::Entry::Vacant(entry) = parts.headers.entry(http::header::USER_AGENT) {
            entry.insert(self.pool.user_agent.clone());
        }
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        // Put together from parts already checked (the endpoint's at build, the path by the
        // caller's `Uri`): cheaper than the builder, which checks each of them again.
        let mut uri = http::uri::Parts::default();
        let (scheme, authority) = match &self.pool.origin {
            Some((scheme, authority)) => (scheme, authority),
            None => (endpoint.scheme(), endpoint.authority()),
        };
        uri.scheme = Some(scheme.clone());
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(path.clone());
        parts.uri =
            Uri::from_parts(uri).map_err(|e| Error::request_body(&member.endpoint.label, Box::new(e)))?;
        // Kept only while another attempt is allowed: h2 consumes the head even when it
        // refuses to open the stream.
        let policy_allows = self.retry_policy().is_some_and(|p| self.retries + 1 < p.max_attempts)
            || self.method.as_ref().is_some_and(|m| m.hedging_policy.is_some());
        let retry_allowed = matches!(self.target, Target::Pool)
            && (self.attempts + 1 < self.pool.config.max_attempts || policy_allows);
        Ok(retry_allowed.then(|| Head {
            method: parts.method.clone(),
            path,
            headers: parts.headers.iter().map(|(name, value)| (name.clone(), value.clone())).collect(),
        }))
    }

    /// Opens the stream on the slot's member and starts sending the body; queues the call
    /// again if the member could not open a stream and nothing was sent.
    fn start(&mut self, slot: Slot, request: Request<CallBody<B>>) -> Step {
        match self.open(slot, request) {
            Opened::Sent(sending) => {
                self.state = Some(match self.method.as_ref().and_then(|m| m.hedging_policy.as_ref()) {
                    Some(policy) => {
                        if self.hedge_sent > 0 {
                            // A later copy of the call (sent again after its copies were
                            // lost, or queued for a slot): a hedge like any other.
                            self.hedged += 1;
                            self.pool.count_hedges("sent", 1);
                        }
                        Live::Hedging(Box::new(Hedge::new(sending, policy, self.hedge_sent)))
                    }
                    None => Live::Sending(sending),
                });
                Step::Continue(())
            }
            Opened::NotSent { error, again: Some(head), body } => {
                self.again(RetryReason::NotSent, rebuild(head, body), error)
            }
            Opened::NotSent { error, again: None, .. } => {
                Step::Break(Err(self.not_retried(error, false, false)))
            }
            Opened::Failed(error) => Step::Break(Err(error)),
        }
    }

    /// Opens the stream on the slot's member and starts sending the body.
    fn open(&mut self, slot: Slot, request: Request<CallBody<B>>) -> Opened<B> {
        let member = slot.member().clone();
        let span = match self.method {
            // Retries and hedged copies are told apart by their spans' fields.
            Some(_) => {
                let span = tracing::debug_span!(
                    "attempt",
                    pool = %self.pool.name(),
                    endpoint = %member.endpoint.label,
                    path = %request.uri().path(),
                    retry = self.retries,
                    copy = self.hedged,
                );
                span.in_scope(|| tracing::debug!("sending an attempt of a call under a service config"));
                span
            }
            None => tracing::Span::none(),
        };
        let (mut parts, body) = request.into_parts();
        let again = match self.prepare_head(&member, &mut parts) {
            Ok(again) => again,
            Err(error) => return Opened::Failed(error),
        };
        let mut head = Request::new(());
        *head.method_mut() = parts.method;
        *head.uri_mut() = parts.uri;
        *head.version_mut() = Version::HTTP_2;
        *head.headers_mut() = parts.headers;
        let end_of_stream = body.is_end_stream();
        match member.sender().send_request(head, end_of_stream) {
            Ok((response, stream)) => {
                self.streams += 1;
                let stream_id = u32::from(response.stream_id());
                member.record_stream_id(stream_id);
                if stream_id >= member.retire_at_stream_id {
                    self.pool.evict(
                        &member,
                        EvictionReason::MaxStreams,
                        &format!("carried its last stream (id {stream_id})"),
                    );
                }
                let replay_limit = again.as_ref().map(|_| self.pool.config.replay_buffer_limit);
                let pump = (!end_of_stream).then(|| Box::pin(Pump::new(body, stream, replay_limit)));
                let sent_body = end_of_stream.then(Recording::default);
                Opened::Sent(Sending {
                    slot,
                    response,
                    pump,
                    stream_id,
                    head: again,
                    sent_body,
                    body_over_limit: false,
                    pump_stopped: false,
                    span,
                    sent_at: match self.pool.config.balance {
                        crate::Balance::PeakEwma { .. } => Some(tokio::time::Instant::now()),
                        _ => None,
                    },
                })
            }
            Err(err) if err.is_go_away() || err.is_io() => {
                // The connection is going away and never saw this request.
                self.pool.on_send_failed(&member, &err);
                drop(slot);
                let error = Error::from_h2(&member.endpoint.label, err).mark_unprocessed();
                Opened::NotSent { error, again, body }
            }
            Err(err) => {
                Opened::Failed(self.not_retried(Error::from_h2(&member.endpoint.label, err), false, false))
            }
        }
    }

    /// Adds to a failed call's error why it is not sent again. Calls aimed at one endpoint
    /// or member (health checks, probes) are never resent, and their errors stay as they are.
    fn not_retried(&self, error: Error, body_over_limit: bool, body_not_whole: bool) -> Error {
        if !matches!(self.target, Target::Pool) {
            return error;
        }
        let config = &self.pool.config;
        let why = if !error.is_unprocessed() {
            "the server may have processed it".to_owned()
        } else if body_over_limit {
            format!("its request body is over the replay buffer limit ({} bytes)", config.replay_buffer_limit)
        } else if body_not_whole {
            "its request body had not been sent whole when the call failed".to_owned()
        } else if let Some(policy) = self
            .method
            .as_ref()
            .and_then(|m| m.hedging_policy.as_ref())
            .filter(|p| self.hedge_sent >= p.max_attempts)
        {
            format!("all {} copies of its hedging policy used", policy.max_attempts)
        } else if config.max_attempts == 1 {
            "max_attempts is 1".to_owned()
        } else {
            format!("all {} attempts used", config.max_attempts)
        };
        error.not_retried(&why)
    }

    /// Counts the failed attempt of a call that never reached the server and queues the call
    /// for another one; the error to return when no attempt is left. A member that failed
    /// its PING before use costs the call no attempt: the call never left, and the member
    /// is gone (a fresh one is never PINGed before use, so this cannot loop).
    fn again(&mut self, reason: RetryReason, request: Request<CallBody<B>>, error: Error) -> Step {
        if reason != RetryReason::PingBeforeUse {
            self.attempts += 1;
        }
        if self.attempts >= self.pool.config.max_attempts {
            return Step::Break(Err(self.not_retried(error, false, false)));
        }
        self.pool.count_retry(reason);
        self.state = Some(Live::checkout(request));
        Step::Continue(())
    }
}

impl<B> Future for ResponseFuture<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody>, Error>;

    /// Moves the call along its states (checkout, PING before use, sending) until it waits
    /// or ends; resends a call the server never processed.
    ///
    /// Each arm polls what its state waits for in place; once that is ready, it takes the
    /// state out (the one the arm just matched, so the `else` of each `take` cannot run) and
    /// hands it, by value, to the step that moves it on.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const MATCHED: &str = "the state is the one this arm matched";
        let this = &mut *self;
        loop {
            let step = match this.state.as_mut() {
                None => panic!("ResponseFuture polled after it completed"),
                Some(Live::Checkout { waiting: None, .. }) => {
                    let Some(Live::Checkout { request, .. }) = this.state.take() else {
                        unreachable!("{MATCHED}")
                    };
                    this.checkout_now(request)
                }
                Some(Live::Checkout { waiting: Some(checkout), .. }) => {
                    let Poll::Ready(result) = checkout.as_mut().poll(cx) else { break };
                    let Some(Live::Checkout { request, .. }) = this.state.take() else {
                        unreachable!("{MATCHED}")
                    };
                    match result {
                        Ok(slot) => this.use_slot(slot, request),
                        Err(error) => Step::Break(Err(error)),
                    }
                }
                Some(Live::Verifying { check, .. }) => {
                    let Poll::Ready(alive) = check.as_mut().poll(cx) else { break };
                    let Some(Live::Verifying { slot, request, .. }) = this.state.take() else {
                        unreachable!("{MATCHED}")
                    };
                    this.verified(slot, request, alive)
                }
                Some(Live::Sending(sending)) => {
                    let Poll::Ready(head) = sending.poll_head(cx) else { break };
                    let Some(Live::Sending(sending)) = this.state.take() else { unreachable!("{MATCHED}") };
                    match head {
                        Ok(Ok(response)) => this.answered(sending, response),
                        Ok(Err(err)) => this.failed(sending, err),
                        // Dropping `sending` resets the stream.
                        Err(body_failed) => Step::Break(Err(body_failed)),
                    }
                }
                Some(Live::Hedging(_)) => {
                    let Some(Live::Hedging(hedge)) = this.state.take() else { unreachable!("{MATCHED}") };
                    match this.poll_hedge(hedge, cx) {
                        Some(step) => step,
                        None => break,
                    }
                }
                Some(Live::Backoff { sleep, .. }) => {
                    let Poll::Ready(()) = sleep.as_mut().poll(cx) else { break };
                    let Some(Live::Backoff { request, .. }) = this.state.take() else {
                        unreachable!("{MATCHED}")
                    };
                    this.state = Some(Live::checkout(request));
                    Step::Continue(())
                }
            };
            if let Step::Break(output) = step {
                this.finished();
                return Poll::Ready(output);
            }
        }
        // The call waits, its state in place: unless its deadline has passed.
        if this.deadline.as_mut().is_some_and(|d| d.poll_expired(cx)) {
            // Every arm that breaks out of the loop above left its state in place.
            let Some(live) = this.state.take() else { unreachable!("a waiting call has its state") };
            let error = this.expire(live);
            this.finished();
            return Poll::Ready(Err(error));
        }
        Poll::Pending
    }
}

impl<B> ResponseFuture<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Takes a slot without waiting if there is one, else queues for one.
    fn checkout_now(&mut self, request: Request<CallBody<B>>) -> Step {
        match slot_now(&self.pool, &self.target, self.avoid.as_ref()) {
            Ok(Some(slot)) => self.use_slot(slot, request),
            Ok(None) => {
                let wait = crate::checkout::CheckoutWait {
                    wait_for_ready: self.wait_for_ready,
                    has_deadline: self.deadline.is_some(),
                };
                let checkout = Box::pin(self.pool.clone().checkout_wait(wait));
                self.state = Some(Live::Checkout { request, waiting: Some(checkout) });
                Step::Continue(())
            }
            Err(error) => Step::Break(Err(error)),
        }
    }

    /// Sends on `slot`, after a PING of its member if it needs one.
    fn use_slot(&mut self, slot: Slot, request: Request<CallBody<B>>) -> Step {
        // Past the cap on calls in flight once counted (a call admitted under it that waited
        // while others took their streams, or one that raced another): the stream goes back
        // and the call fails as one refused at the door would.
        if slot.counted() && self.pool.requests.over() {
            drop(slot);
            return Step::Break(Err(self.pool.over_limit()));
        }
        match needs_check(&self.pool, &self.target, &slot) {
            Some(check) => {
                self.state = Some(Live::Verifying { slot, request, check });
                Step::Continue(())
            }
            None => self.start(slot, request),
        }
    }

    /// The member's PING before use is over: sends on it if it answered, else queues the
    /// call for another member.
    fn verified(&mut self, slot: Slot, request: Request<CallBody<B>>, alive: bool) -> Step {
        if alive {
            return self.start(slot, request);
        }
        // The member is dead and the call never left: another member.
        let label = slot.member().endpoint.label.clone();
        self.avoid = Some(slot.member().endpoint.clone());
        drop(slot);
        let error = Error::no_member(&label, "the connection failed its PING before use").mark_unprocessed();
        self.again(RetryReason::PingBeforeUse, request, error)
    }

    /// The response head came: the call's result, its body carrying the slot.
    fn answered(&mut self, mut sending: Sending<B>, mut response: http::Response<h2::RecvStream>) -> Step {
        // A trailers-only answer carries its status in the head; any other is judged by its
        // trailers, in the body.
        let endpoint = &sending.slot.member().endpoint;
        if let Some(failures) = endpoint.record_outcome(|| crate::outlier::unavailable(response.headers())) {
            self.pool.eject_shared(endpoint, failures);
        }
        if let (Some(sent_at), crate::Balance::PeakEwma { decay }) =
            (sending.sent_at, self.pool.config.balance)
        {
            endpoint.latency.observe(sent_at.elapsed(), decay);
        }
        let mut watch = None;
        if let Some(hedging) = self.method.as_ref().and_then(|m| m.hedging_policy.as_ref()) {
            watch = self
                .pool
                .retry_tokens
                .clone()
                .map(|tokens| ThrottleWatch::new(tokens, &hedging.non_fatal_status_codes));
        }
        if let Some(policy) = self.retry_policy() {
            match retry::judge(&self.pool, policy, self.standing(), &mut sending, response.headers()) {
                Verdict::Committed => {
                    watch = self
                        .pool
                        .retry_tokens
                        .clone()
                        .map(|tokens| ThrottleWatch::new(tokens, &policy.retryable_status_codes));
                }
                Verdict::Done => {}
                Verdict::NotRetried(why) => {
                    retry::note_not_retried(response.headers_mut(), &why);
                }
                Verdict::Retry { code, pushback, head, body } => {
                    return self.retry(sending, code, pushback, head, body);
                }
            }
        }
        let Sending { slot, response: head_future, pump, pump_stopped, .. } = sending;
        drop(head_future);
        // The server answered before the request body ended (streaming): keep sending from a
        // task of its own.
        let pump = match pump.filter(|_| !pump_stopped).map(spawn_pump).transpose() {
            Ok(pump) => pump,
            Err(error) => return Step::Break(Err(error)),
        };
        let pool_call = matches!(self.target, Target::Pool);
        let deadline = self.deadline.take();
        let limit = self.method.as_ref().and_then(|m| m.max_response_message_bytes);
        let extras = BodyExtras { watch, limit: limit.map(|max| MessageLimit::new(max, "response")) };
        Step::Break(Ok(response.map(|recv| ResponseBody::new(recv, slot, pump, pool_call, deadline, extras))))
    }

    /// The stream failed before its response head: resent on another member if the server
    /// never processed it and the whole body is at hand, else the call's error.
    fn failed(&mut self, mut sending: Sending<B>, err: h2::Error) -> Step {
        let endpoint = &sending.slot.member().endpoint;
        if let Some(failures) = endpoint.record_outcome(|| crate::outlier::is_failure(&err)) {
            self.pool.eject_shared(endpoint, failures);
        }
        let error = response_error(&sending.slot, sending.stream_id, err);
        // The head may be kept for the retry policy alone: a transparent resend also needs
        // an attempt left of `max_attempts`, and for a hedged call a copy left of its
        // policy's `maxAttempts` (A6's cap on the streams one call opens).
        let copies_left = match self.method.as_ref().and_then(|m| m.hedging_policy.as_ref()) {
            Some(policy) => self.hedge_sent < policy.max_attempts,
            None => true,
        };
        let transparent_left = self.attempts + 1 < self.pool.config.max_attempts && copies_left;
        if !(error.is_unprocessed() && transparent_left) {
            // The server may have seen it, or the transparent attempts are used up: the
            // retry policy judges its status as it would a trailers-only answer's.
            if let Some(policy) = self.retry_policy() {
                let code = error.grpc_code();
                match retry::judge_status(&self.pool, policy, self.standing(), &mut sending, code, None) {
                    Verdict::Retry { code, pushback, head, body } => {
                        return self.retry(sending, code, pushback, head, body)
                    }
                    Verdict::NotRetried(why) => return Step::Break(Err(error.not_retried(&why))),
                    Verdict::Committed | Verdict::Done => {}
                }
            }
        }
        let Sending { slot, response, pump, head, sent_body, body_over_limit, .. } = sending;
        drop(response);
        let head = head.filter(|_| transparent_left);
        // Why a replay may be impossible, for the error: with no head kept, the attempts are
        // used up; with a head but no whole body, the body is to blame.
        let body_kept = head.is_some();
        let over_limit =
            body_kept && (body_over_limit || pump.as_ref().is_some_and(|p| p.over_replay_limit()));
        let body_not_whole = body_kept && sent_body.is_none();
        let slot_endpoint = slot.member().endpoint.clone();
        drop(slot);
        // Never processed, and the whole body is at hand (kept as it went out, plus what had
        // not gone out yet): again, on another member.
        let replay = match (head, sent_body, pump) {
            (Some(head), Some(sent), _) => Some((head, CallBody::replay(sent, None))),
            (Some(head), None, Some(mut pump)) if error.is_unprocessed() => {
                pump.as_mut().take_recording().map(|sent| {
                    let rest: UnsentBody = Box::pin(Unsent::new(pump));
                    (head, CallBody::replay(sent, Some(rest)))
                })
            }
            _ => None,
        };
        match replay {
            Some((mut head, body)) if error.is_unprocessed() => {
                if self.method.as_ref().is_some_and(|m| m.hedging_policy.is_some()) {
                    // The resend is the hedged call's next copy, and says so.
                    retry::set_previous_attempts(&mut head, self.hedge_sent);
                }
                self.attempts += 1;
                self.avoid = Some(slot_endpoint);
                self.pool.count_retry(if error.kind() == ErrorKind::Stream {
                    RetryReason::Refused
                } else {
                    RetryReason::GoAway
                });
                tracing::debug!(pool = %self.pool.name(), error = %error, "resending a call the server never processed");
                self.state = Some(Live::checkout(rebuild(head, body)));
                Step::Continue(())
            }
            _ => Step::Break(Err(self.not_retried(error, over_limit, body_not_whole))),
        }
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            Some(Live::Checkout { waiting: None, .. }) => "checkout",
            Some(Live::Checkout { waiting: Some(_), .. }) => "waiting",
            Some(Live::Verifying { .. }) => "verifying",
            Some(Live::Sending(_)) => "sending",
            Some(Live::Backoff { .. }) => "backoff",
            Some(Live::Hedging(_)) => "hedging",
            None => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}
