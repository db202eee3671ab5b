//! Checkout alone: choosing an endpoint and a member and taking a stream slot, then freeing it,
//! with no I/O. The number to watch is the time per checkout with 16 members (target: under
//! 200 ns).
//!
//! Run: `cargo bench --bench checkout`.

use std::convert::Infallible;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use grpc_pool::__private::checkout_and_release;
use grpc_pool_testkit::TestServer;

fn checkout(c: &mut Criterion) {
    // Four servers on a runtime of their own.
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut servers = Vec::new();
            for _ in 0..4 {
                servers.push(TestServer::start().await);
            }
            addrs_tx.send(servers.iter().map(|s| s.uri()).collect::<Vec<_>>()).unwrap();
            std::future::pending::<Infallible>().await;
        });
    });
    let uris = addrs_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

    let mut group = c.benchmark_group("checkout");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    // (endpoints, members per endpoint): 16 members either way.
    for (endpoints, per_endpoint) in [(1usize, 16usize), (4, 4)] {
        let pool = rt.block_on(async {
            let pool = grpc_pool::Pool::builder()
                .min_connections(per_endpoint)
                .max_connections(per_endpoint)
                .build(&uris[..endpoints])
                .await
                .unwrap();
            while pool.state().members() < endpoints * per_endpoint {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            pool
        });
        let label = format!("{endpoints}x{per_endpoint}");
        group.bench_function(BenchmarkId::new("16 members", label), |b| {
            b.iter(|| assert!(checkout_and_release(&pool)))
        });
        rt.block_on(pool.close());
    }
    group.finish();
}

criterion_group!(benches, checkout);
criterion_main!(benches);
