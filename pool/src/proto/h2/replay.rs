//! Keeping a request's body as it is sent, so a call the server provably never processed
//! (stream refused, or above a GOAWAY's last stream id) can be sent again on another member.
//!
//! The chunks are `Bytes`, so keeping them costs a reference count each, not a copy. Only
//! bodies sent whole before the response head arrives are kept, up to a size limit; a
//! streaming call whose body outlives that point is never replayed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::proto::grpc::MessageLimit;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The part of a body an earlier attempt had not sent; boxed, as it holds that attempt's
/// pump (and so, through the pump, a `CallBody` of its own).
pub(crate) type UnsentBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// The body as it went out: data chunks, then trailers if any.
#[derive(Debug, Default, Clone)]
pub(crate) struct Recording {
    /// The first chunk, kept apart: a unary call's body is one chunk, and keeping it then
    /// costs no allocation.
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
    len: usize,
    /// Boxed: request trailers are rare (gRPC sends none), and a recording is moved with
    /// the call's state, which should not carry a whole `HeaderMap` for them.
    trailers: Option<Box<HeaderMap>>,
}

impl Recording {
    /// Keeps `chunk`; false once the body is over `limit` bytes (the recording is then
    /// useless).
    pub(crate) fn data(&mut self, chunk: &Bytes, limit: usize) -> bool {
        self.len += chunk.len();
        if self.len > limit {
            return false;
        }
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk.clone());
        } else {
            self.rest.push_back(chunk.clone());
        }
        true
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty() && self.trailers.is_none()
    }

    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        self.trailers = Some(Box::new(trailers.clone()));
    }
}

pin_project_lite::pin_project! {
    /// The body a call sends: the caller's, or, on a replay, the recording of what went out
    /// before, followed by what had not gone out yet, if anything.
    #[project = CallBodyProj]
    pub(crate) enum CallBody<B> {
        Original { #[pin] body: B, limit: Option<MessageLimit> },
        Replay { recording: Recording, rest: Option<UnsentBody> },
    }
}

impl<B> CallBody<B> {
    /// The caller's body; with `max_message`, a message longer than that fails it.
    pub(crate) fn original(body: B, max_message: Option<u64>) -> CallBody<B> {
        CallBody::Original { body, limit: max_message.map(|max| MessageLimit::new(max, "request")) }
    }

    /// A body that sends `recording` again, then `rest`.
    pub(crate) fn replay(recording: Recording, rest: Option<UnsentBody>) -> CallBody<B> {
        CallBody::Replay { recording, rest }
    }
}

impl<B> Body for CallBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            CallBodyProj::Original { body, limit } => {
                let polled = body.poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into)));
                if let (Some(limit), Poll::Ready(Some(Ok(frame)))) = (limit.as_mut(), &polled) {
                    if let Some(data) = frame.data_ref() {
                        limit.check(data).map_err(|too_large| -> BoxError { Box::new(too_large) })?;
                    }
                }
                polled
            }
            CallBodyProj::Replay { recording, rest } => {
                if let Some(chunk) = recording.next_chunk() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(trailers) = recording.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
                }
                match rest {
                    Some(rest) => rest.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CallBody::Original { body, .. } => body.is_end_stream(),
            CallBody::Replay { recording, rest } => {
                recording.is_empty() && rest.as_ref().is_none_or(|rest| rest.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            CallBody::Original { body, .. } => body.size_hint(),
            CallBody::Replay { recording, rest: None } => SizeHint::with_exact(recording.len as u64),
            CallBody::Replay { recording, rest: Some(_) } => {
                let mut hint = SizeHint::new();
                hint.set_lower(recording.len as u64);
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_replay_sends_the_chunks_in_order_then_the_trailers() {
        let mut recording = Recording::default();
        for chunk in ["one", "two", "three"] {
            assert!(recording.data(&Bytes::from_static(chunk.as_bytes()), 64));
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        recording.trailers(&trailers);
        let mut body = CallBody::<http_body_util::Empty<Bytes>>::replay(recording, None);
        let mut data = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => data.push(chunk),
                Err(frame) => got_trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(data, ["one", "two", "three"]);
        assert_eq!(got_trailers, Some(trailers));
        assert!(body.is_end_stream());
    }

    #[test]
    fn a_body_over_the_limit_is_not_kept() {
        let mut recording = Recording::default();
        assert!(recording.data(&Bytes::from(vec![0u8; 1024]), 1024));
        assert!(!recording.data(&Bytes::from_static(b"x"), 1024));
    }
}
