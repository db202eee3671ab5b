//! Endpoints from etcd: three servers register, a pool follows them, one server is killed
//! (its lease expires), one is added, and the pool's view is printed at each step.
//!
//! It starts an etcd of its own (the `etcd` binary, on free 127.0.0.1 ports, data in a
//! temporary directory), so it needs only that binary: `scripts/setup-etcd` installs it.
//!
//! ```text
//! cargo run --example etcd --features etcd
//! ```
//!
//! The servers run in child processes (this program started again), so that one can be
//! killed with SIGKILL as a crash would: it never deregisters, and its key goes when its
//! 2 s lease expires.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grpc_pool::etcd::{register, EtcdClient, EtcdDiscover};
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{EtcdServer, TestServer};

const SERVER_ENV: &str = "GRPC_POOL_ETCD_EXAMPLE_SERVER";
const PREFIX: &str = "services/echo/";
const TTL: Duration = Duration::from_secs(2);

fn main() {
    if let Err(missing) = grpc_pool_testkit::etcd::etcd_binary() {
        eprintln!("{missing}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    match std::env::var(SERVER_ENV) {
        Ok(spec) => runtime.block_on(serve(spec)),
        Err(_) => runtime.block_on(run()),
    }
}

/// A child: an echo server registered as `services/echo/<name>` until killed or told to stop.
async fn serve(spec: String) {
    let mut parts = spec.split(' ');
    let (Some(etcd_uri), Some(name)) = (parts.next(), parts.next()) else {
        eprintln!("{SERVER_ENV} must be `<etcd uri> <name>`");
        std::process::exit(2);
    };
    let server = TestServer::start().await;
    let etcd = EtcdClient::new([etcd_uri]).expect("etcd client");
    let value = format!(r#"{{"Addr":"{}","Metadata":{{"name":"{name}"}}}}"#, server.addr());
    let registration = match register(&etcd, &format!("{PREFIX}{name}"), &value, TTL).await {
        Ok(registration) => registration,
        Err(error) => {
            eprintln!("server {name}: {error}");
            std::process::exit(1);
        }
    };
    println!("{}", server.uri());
    // Serve until the parent closes our stdin, then deregister (a clean stop).
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
    })
    .await;
    let _ = registration.deregister().await;
}

/// Starts this program again as server `name`; returns it and the URI it serves.
fn start_server(etcd: &EtcdServer, name: &str) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().expect("this program"))
        .env(SERVER_ENV, format!("{} {name}", etcd.uri()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a server");
    let mut uri = String::new();
    BufReader::new(child.stdout.take().expect("its stdout")).read_line(&mut uri).expect("its URI");
    (child, uri.trim().to_owned())
}

fn view(pool: &Pool) -> Vec<String> {
    pool.state().endpoints.iter().map(|e| e.endpoint.to_string()).collect()
}

/// Waits (up to 10 s) until the pool's view satisfies `done`, then prints it.
async fn show(pool: &Pool, what: &str, done: impl Fn(&[String]) -> bool) {
    let started = Instant::now();
    while !done(&view(pool)) && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{what} (after {:.1?}): {:?}", started.elapsed(), view(pool));
}

async fn run() {
    let etcd_server = EtcdServer::start();
    println!("etcd at {}", etcd_server.uri());
    let mut servers: Vec<(Child, String)> =
        ["a", "b", "c"].iter().map(|name| start_server(&etcd_server, name)).collect();

    let etcd = EtcdClient::new([etcd_server.uri()]).expect("etcd client");
    let pool = Pool::builder().name("echo").build_lazy(Vec::<String>::new()).expect("pool");
    let discover = EtcdDiscover::new(&etcd, PREFIX).expect("prefix");
    let status = discover.status();
    pool.discover(discover);
    show(&pool, "three servers registered", |v| v.len() == 3).await;

    let mut client = EchoClient::new(pool.clone());
    for _ in 0..6 {
        let request = EchoRequest { message: "hello".into(), repeat: 0, delay_ms: 0 };
        if let Err(status) = client.unary_echo(request).await {
            println!("call failed: {status}");
        }
    }
    println!("6 calls made");

    let (mut killed, killed_uri) = servers.remove(1);
    killed.kill().expect("kill server b");
    let _ = killed.wait();
    println!("server b ({killed_uri}) killed with SIGKILL: its lease expires within {TTL:?}");
    show(&pool, "server b's lease expired", |v| !v.contains(&killed_uri)).await;

    let added = start_server(&etcd_server, "d");
    let added_uri = added.1.clone();
    servers.push(added);
    show(&pool, "server d registered", |v| v.contains(&added_uri)).await;
    println!("the watch: {status:?}");

    // Clean stops: each server deregisters when its stdin closes.
    for (mut child, _) in servers {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    show(&pool, "servers stopped cleanly", |v| v.is_empty()).await;
}
