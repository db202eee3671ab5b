//! The simulated network's two ends for the pool and tonic: a connector that opens turmoil
//! TCP streams (names resolved by turmoil's DNS), and a listener stream of accepted
//! connections that tonic's `serve_with_incoming` takes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use turmoil::net::{TcpListener, TcpStream};

use super::trace::{now, Journal};

/// The pool's `Builder::connector`: `http://server-3:50051` becomes a turmoil connect to
/// the host named `server-3`. TCP socket options (TCP_NODELAY, TCP_USER_TIMEOUT, keepalive,
/// local address) are the connector's business and turmoil has none, so none is simulated.
/// Every connect is written in `journal`, with when it began and how it ended (a connect
/// the pool gave up on, at its connect timeout, ends failed when it is dropped).
pub fn connector(
    journal: Journal,
) -> impl tower_service::Service<http::Uri, Response = TcpStream, Error = io::Error, Future: Send>
       + Clone
       + Send
       + Sync {
    tower::service_fn(move |uri: http::Uri| {
        let journal = journal.clone();
        async move {
            let host = uri.host().ok_or_else(|| io::Error::other(format!("no host in {uri}")))?.to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let mut attempt = Attempt { journal, host: host.clone(), started: now(), connected: None };
            let result = TcpStream::connect((host, port)).await;
            attempt.connected = Some(result.is_ok());
            result
        }
    })
}

/// A connect under way: written in the journal when it ends, however it ends.
struct Attempt {
    journal: Journal,
    host: String,
    started: std::time::Duration,
    connected: Option<bool>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.journal.connect(&self.host, self.started, self.connected.unwrap_or(false));
    }
}

/// A switch that closes a server's accepted connections, in the order they were accepted.
///
/// A crash (`Sim::crash`, `Sim::bounce`) drops the host's tokio runtime, and tokio drops its
/// tasks in an order that depends on the process's task ids: the connections would close
/// (FIN, RST) in an order that differs from one run to the next within one process. So the
/// driver closes them with this first, in a fixed order, and crashes the host a tick later.
#[derive(Default)]
pub struct Connections {
    open: Mutex<Vec<Weak<Kill>>>,
}

#[derive(Default)]
struct Kill {
    killed: AtomicBool,
    /// The waker of the task reading the connection.
    reader: Mutex<Option<Waker>>,
}

impl Connections {
    /// Closes every connection accepted so far (on the server's next tick).
    pub fn close_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|e| e.into_inner()));
        for kill in open.iter().filter_map(Weak::upgrade) {
            kill.killed.store(true, Ordering::Relaxed);
            if let Some(waker) = kill.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                waker.wake();
            }
        }
    }

    fn track(&self, stream: TcpStream) -> Accepted {
        let kill = Arc::new(Kill::default());
        self.open.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&kill));
        Accepted { stream: Some(stream), kill }
    }
}

/// An accepted turmoil stream, as tonic's server wants its connections: with `Connected`.
pub struct Accepted {
    /// `None` once closed by [`Connections::close_all`].
    stream: Option<TcpStream>,
    kill: Arc<Kill>,
}

impl Accepted {
    /// The stream, unless the connection was closed: then it is dropped here (its FIN or
    /// RST goes out from the server's own tick) and the caller gets a reset.
    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        if self.kill.killed.load(Ordering::Relaxed) {
            self.stream = None;
        }
        self.stream.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionReset, "the host crashed"))
    }
}

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
        *self.kill.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        Pin::new(self.stream()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()?).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, for `serve_with_incoming`, each tracked by `open`.
pub fn incoming(
    listener: TcpListener,
    open: Arc<Connections>,
) -> impl futures_util::Stream<Item = io::Result<Accepted>> {
    futures_util::stream::unfold((listener, open), |(listener, open)| async move {
        let accepted = listener.accept().await.map(|(stream, _)| open.track(stream));
        Some((accepted, (listener, open)))
    })
}
