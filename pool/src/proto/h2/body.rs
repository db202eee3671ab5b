//! Moving a request body into an `h2` stream, with flow control.
//!
//! A chunk is handed to `h2` only once the previous one has been given flow-control window,
//! so at most one chunk of the caller's body waits in `h2`'s buffer and a slow server applies
//! back-pressure all the way to the caller's body stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::SendStream;
use http_body::{Body, Frame};

use crate::proto::h2::replay::Recording;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pin_project_lite::pin_project! {
    /// Sends a request body into its stream; resolves when the body has ended (END_STREAM
    /// sent), or with the body's error after resetting the stream. An `h2` failure ends the
    /// pump quietly: the response side reports it to the caller.
    pub(crate) struct Pump<B> {
        #[pin]
        body: B,
        stream: SendStream<Bytes>,
        // A chunk of data partly sent, waiting for window.
        pending: Bytes,
        // Whether END_STREAM goes with the last byte of `pending`.
        end_after_pending: bool,
        sent_any: bool,
        // What went out, for a replay; dropped once over `replay_limit` bytes.
        recording: Option<Recording>,
        replay_limit: usize,
        over_replay_limit: bool,
        // A frame read ahead of time, sent next.
        lookahead: Option<Frame<Bytes>>,
    }
}

/// Why a pump stopped early.
pub(crate) enum PumpError {
    /// The caller's body failed; the stream was reset with CANCEL.
    Body(BoxError),
    /// The stream or connection failed; the response side has the error.
    Stream,
}

impl<B> Pump<B> {
    /// A pump that keeps up to `replay_limit` bytes of what it sends for a replay, if any.
    pub(crate) fn new(body: B, stream: SendStream<Bytes>, replay_limit: Option<usize>) -> Pump<B> {
        Pump {
            body,
            stream,
            pending: Bytes::new(),
            end_after_pending: false,
            sent_any: false,
            recording: replay_limit.map(|_| Recording::default()),
            replay_limit: replay_limit.unwrap_or(0),
            over_replay_limit: false,
            lookahead: None,
        }
    }

    /// The whole body as sent, if it was kept and fit the limit.
    pub(crate) fn take_recording(self: Pin<&mut Self>) -> Option<Recording> {
        self.project().recording.take()
    }

    /// Whether the body went past the replay limit (it can then not be sent again).
    pub(crate) fn over_replay_limit(&self) -> bool {
        self.over_replay_limit
    }
}

impl<B> Future for Pump<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), PumpError>;

    // One loop of ~100 lines on purpose: it runs on every call's hot path, and each branch
    // moves the same projected fields (pending chunk, lookahead, recording) on; split into
    // helpers, each would need all of them passed and its outcome matched again here.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if !this.pending.is_empty() {
                // The first chunk goes out at once, behind the HEADERS: a new stream has no
                // window until the connection task opens it, and waiting for that costs a
                // task round trip on every unary call. Each later chunk waits until the
                // previous one has been given window, so at most one chunk sits in h2's
                // buffer beyond what the server allows.
                if *this.sent_any {
                    this.stream.reserve_capacity(this.pending.len());
                    if this.stream.capacity() == 0 {
                        match ready!(this.stream.poll_capacity(cx)) {
                            Some(Ok(_)) => continue,
                            Some(Err(_)) | None => return Poll::Ready(Err(PumpError::Stream)),
                        }
                    }
                }
                let chunk = std::mem::take(this.pending);
                let end = *this.end_after_pending;
                if let Some(recording) = this.recording.as_mut() {
                    if !recording.data(&chunk, *this.replay_limit) {
                        *this.recording = None;
                        *this.over_replay_limit = true;
                    }
                }
                if this.stream.send_data(chunk, end).is_err() {
                    return Poll::Ready(Err(PumpError::Stream));
                }
                *this.sent_any = true;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let next = match this.lookahead.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => this.body.as_mut().poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
            };
            let frame = match next {
                Poll::Pending => {
                    // While the caller's body is quiet, notice a reset so that the pump does
                    // not outlive its stream.
                    if this.stream.poll_reset(cx).is_ready() {
                        return Poll::Ready(Err(PumpError::Stream));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    let _ = this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(err))) => {
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(PumpError::Body(err)));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(mut data) => {
                    let mut end = this.body.is_end_stream();
                    if !end {
                        // Look one frame ahead: a unary body ends right after its message, and
                        // knowing it now puts END_STREAM on this DATA frame instead of an empty
                        // one of its own.
                        match this.body.as_mut().poll_frame(cx) {
                            Poll::Ready(None) => end = true,
                            Poll::Ready(Some(Ok(frame))) => *this.lookahead = Some(frame),
                            Poll::Ready(Some(Err(err))) => {
                                this.stream.send_reset(h2::Reason::CANCEL);
                                return Poll::Ready(Err(PumpError::Body(err.into())));
                            }
                            Poll::Pending => {}
                        }
                    }
                    if !data.has_remaining() {
                        if end {
                            let _ = this.stream.send_data(Bytes::new(), true);
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    *this.pending = data.copy_to_bytes(data.remaining());
                    *this.end_after_pending = end;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        if let Some(recording) = this.recording.as_mut() {
                            recording.trailers(&trailers);
                        }
                        return Poll::Ready(
                            this.stream.send_trailers(trailers).map_err(|_| PumpError::Stream),
                        );
                    }
                    // Unknown frame kinds carry nothing HTTP/2 can send; skip them.
                }
            }
        }
    }
}

/// What a pump has not sent yet, as a body: a chunk still waiting for window, a frame read
/// ahead, then the rest of the caller's body. With the pump's recording of what it did send,
/// it makes up the whole body again, for a call that must be resent before it was sent whole.
pub(crate) struct Unsent<B> {
    pump: Pin<Box<Pump<B>>>,
    ended: bool,
}

impl<B> Unsent<B> {
    /// The pump must not be polled again: its stream is gone.
    pub(crate) fn new(pump: Pin<Box<Pump<B>>>) -> Unsent<B> {
        Unsent { pump, ended: false }
    }
}

impl<B> Body for Unsent<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let pump = this.pump.as_mut().project();
        if !pump.pending.is_empty() {
            this.ended = *pump.end_after_pending;
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(pump.pending)))));
        }
        if let Some(frame) = pump.lookahead.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        pump.body.poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
