//! A hand-written HTTP/2 gRPC echo server on `h2` directly, for server behaviour tonic will
//! not produce, such as refusing streams (`REFUSED_STREAM`). It echoes the request's gRPC frame back as the
//! response (an `EchoRequest`'s `message` is field 1, as in `EchoResponse`; the other fields
//! are unknown to the response and skipped).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the server does wrong.
#[derive(Debug, Clone, Copy)]
pub enum Misbehaviour {
    /// Refuse every `n`-th stream with `RST_STREAM(REFUSED_STREAM)`, before reading it.
    RefuseEvery(u64),
}

/// A misbehaving echo server on 127.0.0.1.
pub struct RawServer {
    addr: SocketAddr,
    /// `:scheme://:authority` of the last request.
    origin: Arc<std::sync::Mutex<Option<String>>>,
    /// Where the last connection came from.
    peer: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    answered: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RawServer {
    /// Starts the server.
    pub async fn start(misbehaviour: Misbehaviour) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let answered = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let origin = Arc::new(std::sync::Mutex::new(None));
        let peer = Arc::new(std::sync::Mutex::new(None));
        let (a, r, o, p) = (answered.clone(), refused.clone(), origin.clone(), peer.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, from)) = listener.accept().await {
                *p.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve(tcp, misbehaviour, a.clone(), r.clone(), o.clone()));
            }
        });
        RawServer { addr, origin, peer, answered, refused, task }
    }

    /// `http://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `:scheme://:authority` of the last request, as the server read them.
    pub fn last_origin(&self) -> Option<String> {
        self.origin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the last connection came from.
    pub fn last_peer(&self) -> Option<SocketAddr> {
        *self.peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls answered.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Streams refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the echo on a connection of any kind (a TLS stream the test made, say) as
/// `RawServer` does, answering every call, until the client goes.
pub async fn serve_echo<T>(io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let none = || Arc::new(AtomicU64::new(0));
    serve(io, Misbehaviour::RefuseEvery(u64::MAX), none(), none(), Arc::new(std::sync::Mutex::new(None)))
        .await;
}

async fn serve<T>(
    tcp: T,
    misbehaviour: Misbehaviour,
    answered: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    origin: Arc<std::sync::Mutex<Option<String>>>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut connection) = h2::server::handshake(tcp).await else { return };
    let mut seen = 0u64;
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        seen += 1;
        let uri = request.uri();
        let seen_origin =
            format!("{}://{}", uri.scheme_str().unwrap_or("?"), uri.authority().map_or("?", |a| a.as_str()));
        *origin.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen_origin);
        let Misbehaviour::RefuseEvery(n) = misbehaviour;
        if seen.is_multiple_of(n) {
            refused.fetch_add(1, Ordering::Relaxed);
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut body = request.into_body();
            let mut frame = BytesMut::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                frame.extend_from_slice(&chunk);
            }
            let response = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .expect("response head");
            let Ok(mut send) = respond.send_response(response, false) else { return };
            let _ = send.send_data(frame.freeze(), false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let _ = send.send_trailers(trailers);
            answered.fetch_add(1, Ordering::Relaxed);
        });
    }
}
