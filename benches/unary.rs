//! A unary echo call through the pool, against the same call on one bare `h2` connection and
//! on a tonic `Channel`, all to the same in-process tonic server, at concurrency 1 and 64.
//!
//! Run: `cargo bench --bench unary`. The server runs on a runtime of its own (one worker
//! thread), the clients on another (one worker thread), so that both sides get a core.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;
use http_body::Frame;

/// The baseline: tonic's codec over one `h2` connection, no pool. Each call clones the
/// `SendRequest`, sends, and wraps the receive stream; nothing else.
#[derive(Clone)]
struct BareH2 {
    send: h2::client::SendRequest<Bytes>,
    authority: http::uri::Authority,
}

struct BareBody(h2::RecvStream, bool);

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

async fn bare_h2(addr: std::net::SocketAddr) -> BareH2 {
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

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(&[7u8; 64]), repeat: 0, delay_ms: 0 }
}

async fn run<T>(client: &EchoClient<T>, concurrency: usize)
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    join_all((0..concurrency).map(|_| {
        let mut client = client.clone();
        async move { client.unary_echo(request()).await.unwrap() }
    }))
    .await;
}

fn unary(c: &mut Criterion) {
    // The server side: its own runtime and thread.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let server = TestServer::start().await;
            addr_tx.send(server.addr()).unwrap();
            std::future::pending::<Infallible>().await;
        });
    });
    let addr = addr_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (pool, bare, channel) = rt.block_on(async {
        let pool = Pool::builder().max_connections(1).build([format!("http://{addr}")]).await.unwrap();
        let bare = bare_h2(addr).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (EchoClient::new(pool), EchoClient::new(bare), EchoClient::new(channel))
    });

    let mut group = c.benchmark_group("unary");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for concurrency in [1usize, 64] {
        group.throughput(Throughput::Elements(concurrency as u64));
        group.bench_with_input(BenchmarkId::new("pool", concurrency), &concurrency, |b, &n| {
            b.to_async(&rt).iter(|| run(&pool, n))
        });
        group.bench_with_input(BenchmarkId::new("bare_h2", concurrency), &concurrency, |b, &n| {
            b.to_async(&rt).iter(|| run(&bare, n))
        });
        group.bench_with_input(BenchmarkId::new("channel", concurrency), &concurrency, |b, &n| {
            b.to_async(&rt).iter(|| run(&channel, n))
        });
    }
    group.finish();
}

criterion_group!(benches, unary);
criterion_main!(benches);
