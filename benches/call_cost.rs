//! What one unary call costs the client: the pool, one bare `h2` connection (the floor: tonic's
//! codec and `h2`, nothing else) and a tonic `Channel`, each making the same sequential 64-byte
//! echo calls to a server in a child process, so that only the client is measured.
//!
//! Run: `cargo bench --bench call_cost [-- --calls N --client pool|bare_h2|channel]`. It prints
//! client CPU time per call (user and kernel, from `/proc/self/stat`) and wall time per call,
//! with each client's ratio to `bare_h2`.
//!
//! CPU time on a shared machine still moves by a few percent between runs; for a count that
//! does not, run one client twice under callgrind, which counts instructions, and divide the
//! difference of the two `Collected` totals by the difference in calls (5,000 here). The
//! subtraction removes start-up and shut-down and keeps everything a call costs, including
//! the connection task that `h2` runs beside the caller:
//!
//! ```text
//! for n in 3000 8000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.pool.$n \
//!     target/release/deps/call_cost-<hash> --client pool --calls $n
//! done
//! ```

use std::time::Instant;

use bytes::Bytes;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{process, BareH2};

const WARMUP_CALLS: usize = 2_000;

/// The calls that are measured; a function of its own so callgrind can count just these.
#[inline(never)]
async fn measured_calls<T>(client: &mut EchoClient<T>, calls: usize)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let request = EchoRequest { message: Bytes::from_static(&[7u8; 64]), repeat: 0, delay_ms: 0 };
    for _ in 0..calls {
        client.unary_echo(request.clone()).await.expect("echo call");
    }
}

struct Cost {
    cpu_micros: f64,
    user_micros: f64,
    kernel_micros: f64,
    wall_micros: f64,
}

async fn cost<T>(mut client: EchoClient<T>, calls: usize) -> Cost
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    measured_calls(&mut client, WARMUP_CALLS).await;
    let ((user0, sys0), started) = (process::cpu_seconds(), Instant::now());
    measured_calls(&mut client, calls).await;
    let wall = started.elapsed();
    let (user1, sys1) = process::cpu_seconds();
    let per_call = |seconds: f64| seconds * 1e6 / calls as f64;
    Cost {
        cpu_micros: per_call(user1 - user0 + sys1 - sys0),
        user_micros: per_call(user1 - user0),
        kernel_micros: per_call(sys1 - sys0),
        wall_micros: per_call(wall.as_secs_f64()),
    }
}

fn main() {
    if process::is_server_process() {
        return process::serve_until_stdin_closes(1);
    }
    let mut calls = 50_000usize;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--calls" => calls = args.next().and_then(|v| v.parse().ok()).expect("--calls N"),
            "--client" => only = Some(args.next().expect("--client pool|bare_h2|channel")),
            _ => {} // cargo bench passes --bench
        }
    }
    let (mut child, uris) = process::start_server_process();
    let uri = uris[0].clone();
    let addr: std::net::SocketAddr = uri.trim_start_matches("http://").parse().expect("server address");

    // One thread for the client: its CPU time is then the cost of the calls, not of threads
    // handing work to each other.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut results: Vec<(&str, Cost)> = Vec::new();
    rt.block_on(async {
        if wanted("bare_h2") {
            let client = EchoClient::new(BareH2::connect(addr).await);
            results.push(("bare_h2", cost(client, calls).await));
        }
        if wanted("pool") {
            let pool = Pool::builder().max_connections(1).build([&uri]).await.unwrap();
            results.push(("pool", cost(EchoClient::new(pool.clone()), calls).await));
            pool.close().await;
        }
        if wanted("channel") {
            let channel =
                tonic::transport::Endpoint::from_shared(uri.clone()).unwrap().connect().await.unwrap();
            results.push(("channel", cost(EchoClient::new(channel), calls).await));
        }
    });
    let floor = results.iter().find(|(name, _)| *name == "bare_h2").map(|(_, c)| c.cpu_micros);
    for (name, cost) in &results {
        let ratio = floor.map(|f| format!("; {:.3}x bare_h2 CPU", cost.cpu_micros / f)).unwrap_or_default();
        println!(
            "{name:<8} {calls} calls: {:.2} µs CPU per call (user {:.2}, kernel {:.2}), {:.2} µs wall per call{ratio}",
            cost.cpu_micros, cost.user_micros, cost.kernel_micros, cost.wall_micros,
        );
    }
    drop(child.stdin.take());
    let _ = child.wait();
}
