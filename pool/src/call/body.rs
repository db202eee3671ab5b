use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::AbortHandle;

use super::deadline::Deadline;
use crate::error::Error;
use crate::member::Slot;
use crate::proto::grpc::{MessageEnds, MessageLimit};
use crate::service_config::RetryTokens;

/// For a call under a retry policy in a pool with retry throttling: how its trailers count
/// in the throttle (OK gives back, a retryable status takes, as A6 counts a committed call).
pub(crate) struct ThrottleWatch {
    tokens: std::sync::Arc<RetryTokens>,
    /// The policy's retryable codes, one bit per code.
    retryable: u32,
}

impl ThrottleWatch {
    /// `failures`: the codes that count as failures (the retry policy's retryable ones, or the
    /// hedging policy's non-fatal ones).
    pub(crate) fn new(tokens: std::sync::Arc<RetryTokens>, failures: &[tonic::Code]) -> ThrottleWatch {
        let retryable = failures.iter().fold(0u32, |bits, code| bits | 1 << (*code as u32 & 31));
        ThrottleWatch { tokens, retryable }
    }

    /// The call ended with `code` (from its trailers, or the error that ended its stream).
    fn ended(&self, code: tonic::Code) {
        if code == tonic::Code::Ok {
            self.tokens.success();
        } else if self.retryable & (1 << (code as u32 & 31)) != 0 {
            let _ = self.tokens.failure();
        }
    }
}

/// The body of a response from the pool: the stream's data, then its trailers (where gRPC
/// puts `grpc-status`).
///
/// It holds the call's stream slot until the stream ends, so a streaming call counts against
/// its connection for as long as it lasts. Dropping it early cancels the stream
/// (`RST_STREAM CANCEL`) and frees the slot at once.
pub struct ResponseBody {
    /// `None` once the deadline passed: dropping it reset the stream.
    recv: Option<h2::RecvStream>,
    slot: Option<Slot>,
    /// The task still sending the request body (client and bidirectional streaming).
    pump: Option<AbortHandle>,
    data_done: bool,
    /// A call through the pool (not a health check aimed at one endpoint or member): its
    /// errors say why they were not resent, as the response future's do.
    pool_call: bool,
    /// The call's deadline, which bounds the response body too (streaming calls).
    deadline: Option<Deadline>,
    /// Where its trailers count for the retry throttle, if anywhere.
    watch: Option<ThrottleWatch>,
    /// The method's `maxResponseMessageBytes`, if it has one.
    limit: Option<MessageLimit>,
    /// For a call with a deadline: where messages end, so that data goes out one message
    /// at a time and each is handed over only before the deadline. (A frame of small
    /// messages handed over whole sits in the caller's decoder, which hands them out after
    /// the deadline without polling the body again.)
    ends: Option<MessageEnds>,
    /// The rest of a frame after the message handed out last.
    pending: Option<Bytes>,
}

/// What a response body carries for a call under a service config.
pub(crate) struct BodyExtras {
    pub(crate) watch: Option<ThrottleWatch>,
    pub(crate) limit: Option<MessageLimit>,
}

impl ResponseBody {
    pub(crate) fn new(
        recv: h2::RecvStream,
        slot: Slot,
        pump: Option<AbortHandle>,
        pool_call: bool,
        deadline: Option<Deadline>,
        extras: BodyExtras,
    ) -> ResponseBody {
        let BodyExtras { watch, limit } = extras;
        ResponseBody {
            recv: Some(recv),
            slot: Some(slot),
            pump,
            data_done: false,
            pool_call,
            ends: deadline.is_some().then(MessageEnds::default),
            deadline,
            watch,
            limit,
            pending: None,
        }
    }

    fn endpoint(&self) -> &str {
        self.slot.as_ref().map(|s| s.member().endpoint.label.as_str()).unwrap_or("the endpoint")
    }

    /// The call is over: stop sending, give back the slot, and take the deadline's timer out
    /// of the runtime's wheel.
    fn finish(&mut self) {
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
        self.slot = None;
        self.deadline = None;
        self.pending = None;
    }

    /// The deadline passed while the response was still coming: the stream is reset
    /// (`CANCEL`, by dropping its last handles) and the slot freed now, not when the caller
    /// gets round to dropping the body.
    fn expire(&mut self) -> Error {
        let timeout = self.deadline.as_ref().map(|d| d.timeout).unwrap_or_default();
        let error = Error::deadline_exceeded(
            timeout,
            &format!("while receiving the response from {}", self.endpoint()),
        );
        self.recv = None;
        self.finish();
        error
    }

    fn fail(&mut self, err: h2::Error) -> Error {
        if let Some(slot) = &self.slot {
            let endpoint = &slot.member().endpoint;
            if let Some(failures) = endpoint.record_outcome(|| crate::outlier::is_failure(&err)) {
                endpoint.ask_ejection(failures);
            }
        }
        let mut error = Error::from_h2(self.endpoint(), err);
        if let Some(watch) = self.watch.take() {
            watch.ended(error.grpc_code());
        }
        if self.pool_call {
            // The server had sent its response head: it has the call.
            error = error.not_retried("the server was already answering it");
        }
        self.finish();
        error
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let polled = this.poll_stream(cx);
        // The deadline bounds the data as well as the waits: a server that keeps data ready
        // would otherwise never let a pending poll see it. Trailers that are in end the
        // call as the server ended it, late or not.
        let bounded = match &polled {
            Poll::Pending => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_data(),
            Poll::Ready(_) => false,
        };
        if bounded && this.deadline.as_mut().is_some_and(|d| d.poll_expired(cx)) {
            return Poll::Ready(Some(Err(this.expire())));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.recv.as_ref().is_none_or(|recv| recv.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl ResponseBody {
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self;
        let Some(recv) = this.recv.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(rest) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(this.one_message(rest)))));
        }
        if !this.data_done {
            match recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // The caller has the bytes: let the server send more.
                    let _ = recv.flow_control().release_capacity(data.len());
                    if let Some(Err(too_large)) = this.limit.as_mut().map(|limit| limit.check(&data)) {
                        // Dropping the stream resets it (CANCEL): the rest is not wanted.
                        this.recv = None;
                        this.finish();
                        return Poll::Ready(Some(Err(Error::message_too_large(too_large))));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(this.one_message(data)))));
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(this.fail(err)))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => {
                if let Some(slot) = &this.slot {
                    // Trailers without `grpc-status` count as a success: the server answered.
                    let endpoint = &slot.member().endpoint;
                    let failed = || Some(crate::outlier::unavailable(&trailers).unwrap_or(false));
                    if let Some(failures) = endpoint.record_outcome(failed) {
                        endpoint.ask_ejection(failures);
                    }
                }
                // Only calls under a throttled policy read the status here (a header lookup).
                if let Some(watch) = this.watch.take() {
                    if let Some(code) = super::retry::status(&trailers) {
                        watch.ended(code);
                    }
                }
                this.finish();
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(Ok(None)) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(this.fail(err)))),
        }
    }
}

impl ResponseBody {
    /// Of `data`, what goes out now: up to the end of the first message that ends in it
    /// when the call has a deadline (the rest waits in `pending`), else all of it.
    fn one_message(&mut self, mut data: Bytes) -> Bytes {
        if let Some(ends) = self.ends.as_mut() {
            let read = ends.through_next_end(&data);
            if read < data.len() {
                self.pending = Some(data.split_off(read));
            }
        }
        data
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropping `recv` (and the aborted pump's send half) makes h2 reset the stream with
        // CANCEL if it is still open; the slot returns with `self.slot`.
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").field("slot", &self.slot).field("data_done", &self.data_done).finish()
    }
}

// tonic needs response bodies that can move between threads.
const _: fn() = || {
    fn check<T: Send + Sync + 'static>() {}
    check::<ResponseBody>();
};
