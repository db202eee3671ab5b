//! An `h2` server that refuses the first call it gets (`RST_STREAM REFUSED_STREAM`, after a
//! pause) and answers the rest, recording each call's `grpc-timeout` header: for tests of
//! what a call resent after a refusal tells the server about its deadline.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::echo::EchoResponse;

/// The server, listening on 127.0.0.1 until dropped.
pub struct RefuseFirstServer {
    addr: SocketAddr,
    timeouts: Arc<Mutex<Vec<Option<String>>>>,
    task: JoinHandle<()>,
}

impl RefuseFirstServer {
    /// Starts a server that refuses its first call `pause` after the call arrives.
    pub async fn start(pause: Duration) -> RefuseFirstServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let timeouts: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let seen = timeouts.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(tcp).await else { return };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        let timeout = request
                            .headers()
                            .get("grpc-timeout")
                            .and_then(|t| t.to_str().ok())
                            .map(str::to_owned);
                        let first = {
                            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                            seen.push(timeout);
                            seen.len() == 1
                        };
                        tokio::spawn(async move {
                            if first {
                                tokio::time::sleep(pause).await;
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                            } else {
                                answer(&mut respond);
                            }
                        });
                    }
                });
            }
        });
        RefuseFirstServer { addr, timeouts, task }
    }

    /// `http://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Each call's `grpc-timeout` header as it arrived, in order (`None`: it had none).
    pub fn grpc_timeouts(&self) -> Vec<Option<String>> {
        self.timeouts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RefuseFirstServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An empty echo answer with `grpc-status: 0`.
fn answer(respond: &mut h2::server::SendResponse<Bytes>) {
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("response head");
    let Ok(mut stream) = respond.send_response(head, false) else { return };
    let message = EchoResponse::default().encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    let _ = stream.send_data(framed.freeze(), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}
