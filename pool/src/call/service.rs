use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Body;
use tower_service::Service;

use super::body::ResponseBody;
use super::future::ResponseFuture;
use crate::api::Pool;
use crate::error::Error;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Sends any HTTP/2 request over the pool; tonic-generated clients take it as their
/// transport: `EchoClient::new(pool.clone())`.
///
/// `poll_ready` is always ready: back-pressure happens per call, in the checkout, which waits
/// up to `checkout_timeout` for a stream slot.
impl<B> Service<Request<B>> for Pool
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        ResponseFuture::new(self.inner().clone(), request)
    }
}
