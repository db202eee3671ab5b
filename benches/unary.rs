//! A unary echo call through the pool, against the same call on one bare `h2` connection and
//! on a tonic `Channel`, all to the same in-process tonic server, at concurrency 1 and 64.
//!
//! Run: `cargo bench --bench unary`. The server runs on a runtime of its own (one worker
//! thread), the clients on another (one worker thread), so that both sides get a core.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;

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
        let bare = grpc_pool_testkit::BareH2::connect(addr).await;
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
