//! Moving a request body into an `h2` stream, with flow control.
//!
//! Data is sent no faster than the server's window allows: each chunk is split to the
//! capacity `h2` assigns, so at most one chunk of the caller's body is held at a time and a
//! slow server applies back-pressure all the way to the caller's body stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::SendStream;
use http_body::Body;

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
    pub(crate) fn new(body: B, stream: SendStream<Bytes>) -> Pump<B> {
        Pump { body, stream, pending: Bytes::new(), end_after_pending: false }
    }
}

impl<B> Future for Pump<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), PumpError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if !this.pending.is_empty() {
                this.stream.reserve_capacity(this.pending.len());
                let capacity = this.stream.capacity();
                if capacity == 0 {
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return Poll::Ready(Err(PumpError::Stream)),
                    }
                }
                let part = this.pending.split_to(capacity.min(this.pending.len()));
                let end = this.pending.is_empty() && *this.end_after_pending;
                if this.stream.send_data(part, end).is_err() {
                    return Poll::Ready(Err(PumpError::Stream));
                }
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match this.body.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    // While the caller's body is quiet, notice a reset so that the pump does
                    // not outlive its stream.
                    if let Poll::Ready(_) = this.stream.poll_reset(cx) {
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
                    return Poll::Ready(Err(PumpError::Body(err.into())));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(mut data) => {
                    let end = this.body.is_end_stream();
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
