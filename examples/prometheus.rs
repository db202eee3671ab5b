//! The pool's metrics on a Prometheus `/metrics` page: two echo servers, the pool in front of
//! them under a steady load, and `metrics-exporter-prometheus` serving the page on
//! 127.0.0.1.
//!
//! Run: `cargo run --release --example prometheus [-- --port 9898 --seconds 60]`, then
//! `curl http://127.0.0.1:9898/metrics` while it runs. Every metric is listed in
//! `docs/metrics.md`; their names are constants in `grpc_pool::metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 9898u16;
    let mut seconds = 60u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|v| v.parse().ok()).ok_or("--port N")?,
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).ok_or("--seconds N")?,
            "--help" | "-h" => {
                println!("usage: prometheus [--port N (9898)] [--seconds N (60)]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}; see --help").into()),
        }
    }
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    PrometheusBuilder::new().with_http_listener(listen).install()?;
    println!("metrics on http://{listen}/metrics for {seconds} s");

    let servers = [TestServer::start().await, TestServer::start().await];
    let pool = Pool::builder()
        .name("echo")
        .metrics_interval(Duration::from_millis(250))
        .build(servers.iter().map(|s| s.uri()))
        .await?;
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut callers = Vec::new();
    for _ in 0..16 {
        let mut client = EchoClient::new(pool.clone());
        callers.push(tokio::spawn(async move {
            let request = EchoRequest { message: Bytes::from_static(b"metrics"), repeat: 0, delay_ms: 1 };
            while Instant::now() < until {
                let _ = client.unary_echo(request.clone()).await;
            }
        }));
    }
    for caller in callers {
        caller.await?;
    }
    println!("{:#?}", pool.state().statistics);
    pool.close().await;
    Ok(())
}
