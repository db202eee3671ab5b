//! Endpoints from an xDS control plane: a small ADS server (testkit's, on Envoy's published
//! types) serves a listener, its routes, a cluster and its endpoints; a pool built for
//! `xds:///echo.example:50051` follows them through an endpoint change, a priority
//! failover, a resource it refuses (NACK) and a control plane restart, with calls going on
//! throughout. Then it times how long an endpoint change takes from the control plane to
//! the pool.
//!
//! ```text
//! cargo run --release --example xds --features xds
//! ```

use std::time::{Duration, Instant};

use grpc_pool::xds::{Bootstrap, XdsStatus};
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::xds::{self as cp, ControlPlane, HealthStatus, LocalityEndpoints};
use grpc_pool_testkit::TestServer;

const TARGET: &str = "xds:///echo.example:50051";
const LISTENER: &str = "echo.example:50051";
const UPDATES: usize = 200;

#[tokio::main]
async fn main() {
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(TestServer::start().await);
    }
    let addr = |i: usize| servers[i].addr();
    let mut plane = ControlPlane::start().await;
    plane.set(LISTENER, cp::listener(LISTENER, "echo-routes"));
    plane.set("echo-routes", cp::route_config("echo-routes", &["echo.example:50051"], "echo"));
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));
    let assign = |plane: &ControlPlane, localities: &[LocalityEndpoints]| {
        plane.set("echo-endpoints", cp::assignment("echo-endpoints", localities));
    };
    assign(&plane, &[LocalityEndpoints::healthy("zone-a", 0, &[addr(0), addr(1)])]);
    println!("control plane on {}", plane.addr());

    let bootstrap = Bootstrap::from_json(&plane.bootstrap("example-client")).expect("bootstrap");
    let (pool, status) = Pool::builder().name("echo").build_xds_with(TARGET, &bootstrap).expect("pool");

    let step = |what: &str| println!("\n== {what}");
    step("first assignment: two endpoints in zone-a");
    wait(&status, |e| e.len() == 2).await;
    show(&pool, &status, &servers).await;

    step("the assignment moves to the other two servers");
    assign(&plane, &[LocalityEndpoints::healthy("zone-a", 0, &[addr(2), addr(3)])]);
    wait(&status, |e| e.contains(&addr(2).to_string()) && !e.contains(&addr(0).to_string())).await;
    show(&pool, &status, &servers).await;

    step("priority 0 unhealthy: priority 1 (zone-b) takes over");
    let p0 = LocalityEndpoints {
        zone: "zone-a".to_owned(),
        priority: 0,
        weight: 1,
        endpoints: vec![(addr(2), HealthStatus::Unhealthy), (addr(3), HealthStatus::Draining)],
    };
    assign(&plane, &[p0, LocalityEndpoints::healthy("zone-b", 1, &[addr(0)])]);
    wait(&status, |e| e == [addr(0).to_string()]).await;
    show(&pool, &status, &servers).await;

    step("locality weights 3:1");
    assign(
        &plane,
        &[
            LocalityEndpoints { weight: 3, ..LocalityEndpoints::healthy("zone-a", 0, &[addr(1)]) },
            LocalityEndpoints { weight: 1, ..LocalityEndpoints::healthy("zone-b", 0, &[addr(2)]) },
        ],
    );
    wait(&status, |e| e.len() == 2 && e.contains(&addr(1).to_string())).await;
    show(&pool, &status, &servers).await;

    step("a ring-hash cluster: refused (NACK), the last good one kept");
    let mut ring_hash = cp::cluster("echo", "echo-endpoints");
    ring_hash.lb_policy = 2;
    plane.set("echo", ring_hash);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status.last_nack().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("NACK: {}", status.last_nack().unwrap_or_default());
    show(&pool, &status, &servers).await;
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));

    step("the control plane restarts: the endpoints stay, the stream resumes");
    plane.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while status.connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("stream up: {}", status.connected());
    show(&pool, &status, &servers).await;
    plane.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status.connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("stream up: {} ({} streams opened)", status.connected(), plane.streams());

    step(&format!("{UPDATES} endpoint changes, each timed from the control plane to the pool"));
    let mut took = Vec::new();
    for i in 0..UPDATES {
        let server = addr(i % 4);
        let started = Instant::now();
        assign(&plane, &[LocalityEndpoints::healthy("zone-a", 0, &[server])]);
        let want = server.to_string();
        loop {
            let endpoints: Vec<String> = pool
                .state()
                .endpoints
                .iter()
                .map(|e| e.endpoint.to_string().replace("http://", ""))
                .collect();
            if endpoints == [want.clone()] {
                break;
            }
            tokio::task::yield_now().await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "control plane -> pool: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.9),
        at(0.99),
        took.last().unwrap()
    );
    let (acks, nacks) = status.responses();
    println!("responses: {acks} ACKed, {nacks} NACKed");
    pool.close().await;
}

/// Waits up to 10 s for the endpoints the status shows to pass `check`.
async fn wait(status: &XdsStatus, check: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&status.endpoints()) {
        assert!(Instant::now() < deadline, "the pool did not follow: {status:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The pool's endpoints and weights, and where 100 calls went.
async fn show(pool: &Pool, status: &XdsStatus, servers: &[TestServer]) {
    let before: Vec<u64> = servers.iter().map(TestServer::calls).collect();
    let mut client = EchoClient::new(pool.clone());
    let mut failed = 0;
    for _ in 0..100 {
        let request = EchoRequest { message: "hi".into(), repeat: 0, delay_ms: 0 };
        failed += usize::from(client.unary_echo(request).await.is_err());
    }
    for (address, weight) in status.weights() {
        println!("  endpoint {address} weight {weight}");
    }
    let calls: Vec<String> =
        servers.iter().zip(&before).map(|(s, b)| format!("{}: {}", s.addr(), s.calls() - b)).collect();
    println!("  100 calls ({failed} failed): {}", calls.join(", "));
}
