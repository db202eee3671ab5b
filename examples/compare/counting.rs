//! A socket that counts the writes made on it, and connectors that hand it to the pool
//! (`Builder::connector`) and to tonic (`Endpoint::connect_with_connector`), so that the
//! comparison can say how many writes each client makes per call.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::Uri;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Writes that reached the socket (a `poll_write` or `poll_write_vectored` that returned
/// ready: one system call each), over every counting socket of this process.
static WRITES: AtomicU64 = AtomicU64::new(0);
/// `poll_flush` calls (free on a TCP socket, but each is one flush of the caller's buffer).
static FLUSHES: AtomicU64 = AtomicU64::new(0);

/// Connection attempts (TCP connects begun, whatever came of them).
static CONNECTS: AtomicU64 = AtomicU64::new(0);

/// Connection attempts so far, over every counting connector of this process.
pub fn connects() -> u64 {
    CONNECTS.load(Ordering::Relaxed)
}

/// (writes, flushes) so far.
pub fn counts() -> (u64, u64) {
    (WRITES.load(Ordering::Relaxed), FLUSHES.load(Ordering::Relaxed))
}

/// A TCP stream with `TCP_NODELAY` (as the pool and tonic set on their own) whose writes are
/// counted.
pub struct Counted(TcpStream);

async fn connect(uri: Uri) -> io::Result<Counted> {
    let host = uri.host().unwrap_or("127.0.0.1");
    let port = uri.port_u16().unwrap_or(80);
    CONNECTS.fetch_add(1, Ordering::Relaxed);
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(Counted(stream))
}

/// For `Builder::connector`.
pub fn for_pool() -> impl tower::Service<
    Uri,
    Response = Counted,
    Error = io::Error,
    Future = impl std::future::Future<Output = io::Result<Counted>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(connect)
}

/// For `Endpoint::connect_with_connector`: the same socket in hyper's I/O traits.
pub fn for_tonic() -> impl tower::Service<
    Uri,
    Response = hyper_util::rt::TokioIo<Counted>,
    Error = io::Error,
    Future = impl std::future::Future<Output = io::Result<hyper_util::rt::TokioIo<Counted>>> + Send,
> + Send
       + 'static {
    tower::service_fn(|uri: Uri| async move { connect(uri).await.map(hyper_util::rt::TokioIo::new) })
}

fn counted<T>(result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    if let Poll::Ready(Ok(_)) = &result {
        WRITES.fetch_add(1, Ordering::Relaxed);
    }
    result
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        counted(Pin::new(&mut self.get_mut().0).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        counted(Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        FLUSHES.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
