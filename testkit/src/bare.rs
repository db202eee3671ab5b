//! The baseline client of the benches: tonic's codec over one bare `h2` connection, with no
//! pool, no retries and no bookkeeping. What a call through the pool costs above this is the
//! pool's own price.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;

/// The baseline: tonic's codec over one `h2` connection, no pool. Each call clones the
/// `SendRequest`, sends, and wraps the receive stream; nothing else.
#[derive(Clone)]
pub struct BareH2 {
    send: h2::client::SendRequest<Bytes>,
    authority: http::uri::Authority,
}

/// A response body straight from `h2`: data, then trailers.
pub struct BareBody(h2::RecvStream, bool);

impl http_body::Body for BareBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.1 {
            match std::task::ready!(this.0.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.0.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.1 = true,
            }
        }
        match std::task::ready!(this.0.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for BareH2 {
    type Response = http::Response<BareBody>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut send = self.send.clone();
        let authority = self.authority.clone();
        Box::pin(async move {
            use http_body_util::BodyExt;
            let (mut parts, body) = request.into_parts();
            parts.uri = http::Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(parts.uri.path_and_query().unwrap().clone())
                .build()?;
            // Unary bodies are one message: collect it and send head and data together.
            let data = body.collect().await.map_err(|e| -> Self::Error { Box::new(e) })?.to_bytes();
            let (response, mut stream) = send.send_request(http::Request::from_parts(parts, ()), false)?;
            stream.send_data(data, true)?;
            let response = response.await?;
            Ok(response.map(|recv| BareBody(recv, false)))
        })
    }
}

impl BareH2 {
    /// Connects to `addr` with the pool's window sizes and `TCP_NODELAY`.
    pub async fn connect(addr: std::net::SocketAddr) -> BareH2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        BareH2 { send, authority: addr.to_string().parse().unwrap() }
    }
}
