//! The simulated network's two ends for the pool and tonic: a connector that opens turmoil
//! TCP streams (names resolved by turmoil's DNS), and a listener stream of accepted
//! connections that tonic's `serve_with_incoming` takes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use turmoil::net::{TcpListener, TcpStream};

/// The pool's `Builder::connector`: `http://server-3:50051` becomes a turmoil connect to
/// the host named `server-3`. TCP socket options (TCP_NODELAY, TCP_USER_TIMEOUT, keepalive,
/// local address) are the connector's business and turmoil has none, so none is simulated.
pub fn connector(
) -> impl tower_service::Service<http::Uri, Response = TcpStream, Error = io::Error, Future: Send>
       + Clone
       + Send
       + Sync {
    tower::service_fn(|uri: http::Uri| async move {
        let host = uri.host().ok_or_else(|| io::Error::other(format!("no host in {uri}")))?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        TcpStream::connect((host, port)).await
    })
}

/// An accepted turmoil stream, as tonic's server wants its connections: with `Connected`.
pub struct Accepted(TcpStream);

impl Connected for Accepted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, for `serve_with_incoming`.
pub fn incoming(listener: TcpListener) -> impl futures_util::Stream<Item = io::Result<Accepted>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| Accepted(stream));
        Some((accepted, listener))
    })
}
