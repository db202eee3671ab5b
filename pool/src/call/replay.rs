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

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Most body bytes kept for a replay (grpc-go keeps 256 KiB per call for retries).
pub(crate) const REPLAY_LIMIT: usize = 256 * 1024;

/// The body as it went out: data chunks, then trailers if any.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    chunks: VecDeque<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
}

impl Recording {
    /// Keeps `chunk`; false once the body is over the limit (the recording is then useless).
    pub(crate) fn data(&mut self, chunk: &Bytes) -> bool {
        self.len += chunk.len();
        if self.len > REPLAY_LIMIT {
            return false;
        }
        self.chunks.push_back(chunk.clone());
        true
    }

    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        self.trailers = Some(trailers.clone());
    }
}

pin_project_lite::pin_project! {
    /// The body a call sends: the caller's, or, on a replay, the recording of it.
    #[project = CallBodyProj]
    pub(crate) enum CallBody<B> {
        Original { #[pin] body: B },
        Replay { recording: Recording },
    }
}

impl<B> CallBody<B> {
    pub(crate) fn original(body: B) -> CallBody<B> {
        CallBody::Original { body }
    }

    pub(crate) fn replay(recording: Recording) -> CallBody<B> {
        CallBody::Replay { recording }
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
            CallBodyProj::Original { body } => body.poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
            CallBodyProj::Replay { recording } => Poll::Ready(match recording.chunks.pop_front() {
                Some(chunk) => Some(Ok(Frame::data(chunk))),
                None => recording.trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CallBody::Original { body } => body.is_end_stream(),
            CallBody::Replay { recording } => recording.chunks.is_empty() && recording.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            CallBody::Original { body } => body.size_hint(),
            CallBody::Replay { recording } => SizeHint::with_exact(recording.len as u64),
        }
    }
}
