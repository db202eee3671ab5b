//! A pool over many endpoints: the cost curves at 1, 100, 1,000 and 10,000 of them (issue 29).
//!
//! For each size: memory per endpoint the pool knows but holds no connection to, memory per
//! connected member, the time of one checkout and release, the time to apply 1,000 endpoint
//! changes from `discover`; at 1,000 and 10,000, the process CPU with a `grpc.health.v1`
//! Watch stream on every endpoint; and the calls a second of one pool spread over 1,000
//! endpoints against the same pool over 4.
//!
//! Memory is counted by this binary's allocator (bytes allocated and not yet freed), so it is
//! the client's own; the servers run in child processes (this binary again), 2,500 ports to
//! a process, so that the file descriptors fit this machine's limit (20,000 a process).
//!
//! Run: `cargo bench --bench fleet --features test-hooks [-- --sizes 1,100,1000,10000]
//! [--parts costs,health,calls,discovery]` (`discovery` alone needs no servers).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::discover::Change;
use grpc_pool::{CheckMode, HealthCheck, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::process;

/// Counts the bytes this process holds from the allocator.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to `System` as it came; the count is a side record.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

/// Ports served per child process.
const PER_PROCESS: usize = 2_500;

/// Endpoints where nothing listens (a pool with `min_connections(0)` never connects to them):
/// distinct loopback addresses, one port.
fn unconnected(n: usize, offset: usize) -> Vec<String> {
    (offset..offset + n).map(|i| format!("http://127.1.{}.{}:9", i / 250, i % 250 + 1)).collect()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

/// Bytes a pool holds with no endpoint: its tasks, metrics handles and queues. Measured
/// after one pool was built and closed, so that what is allocated once per process
/// (statics, metric and tracing registrations) is not counted.
async fn pool_bytes() -> isize {
    Pool::builder().build_lazy(Vec::<String>::new()).unwrap().close().await;
    settle().await;
    let before = held();
    let pool = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bytes = held() - before;
    pool.close().await;
    settle().await;
    bytes
}

/// Lets a closed pool's tasks end and free what they hold, so that the next measurement
/// does not count it.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Bytes held per endpoint by a pool that knows `n` endpoints and connects to none, over
/// what the pool holds with none (`fixed`).
async fn known_bytes(n: usize, fixed: isize) -> f64 {
    let before = held();
    let pool = Pool::builder().min_connections(0).build_lazy(unconnected(n, 0)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bytes = (held() - before - fixed) as f64 / n as f64;
    pool.close().await;
    settle().await;
    bytes
}

/// The time to apply 1,000 changes from a `discover` stream, to a pool that knows `n`
/// endpoints and connects to none: 500 endpoints added in one burst, then the same 500
/// removed in another, each timed until `state()` shows it.
async fn discovery_time(n: usize) -> Duration {
    let pool = Pool::builder().min_connections(0).build_lazy(unconnected(n, 0)).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Change<usize, String>, Infallible>>();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    pool.discover(stream);
    let extra = unconnected(500, n);
    let started = Instant::now();
    for (key, uri) in extra.iter().enumerate() {
        tx.send(Ok(Change::Insert(key, uri.clone()))).unwrap();
    }
    wait_for("500 added", Duration::from_secs(600), || pool.state().endpoints.len() == n + extra.len()).await;
    for key in 0..extra.len() {
        tx.send(Ok(Change::Remove(key))).unwrap();
    }
    wait_for("500 removed", Duration::from_secs(600), || pool.state().endpoints.len() == n).await;
    let elapsed = started.elapsed();
    pool.close().await;
    settle().await;
    elapsed
}

/// Checkouts and releases a second, on a pool with `n` connected endpoints.
fn checkout_ns(pool: &Pool) -> f64 {
    let rounds = 200_000;
    for _ in 0..10_000 {
        grpc_pool::__private::checkout_and_release(pool);
    }
    let started = Instant::now();
    for _ in 0..rounds {
        assert!(grpc_pool::__private::checkout_and_release(pool));
    }
    started.elapsed().as_nanos() as f64 / rounds as f64
}

/// CPU of this process and of the server processes over `window`, in percent of one core.
async fn cpu_over(window: Duration, servers: &[std::process::Child]) -> (f64, f64) {
    let children =
        |servers: &[std::process::Child]| -> f64 { servers.iter().map(|c| child_cpu_seconds(c.id())).sum() };
    let ((u0, s0), c0, t0) = (process::cpu_seconds(), children(servers), Instant::now());
    tokio::time::sleep(window).await;
    let ((u1, s1), c1) = (process::cpu_seconds(), children(servers));
    let wall = t0.elapsed().as_secs_f64();
    (100.0 * (u1 - u0 + s1 - s0) / wall, 100.0 * (c1 - c0) / wall)
}

fn child_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    ticks(11) + ticks(12)
}

/// Calls a second from 64 callers in a closed loop for `window`.
async fn calls_per_second(pool: &Pool, window: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (mut client, stop, calls) = (EchoClient::new(pool.clone()), stop.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let request = EchoRequest { message: Bytes::from_static(&[7; 64]), repeat: 0, delay_ms: 0 };
            while !stop.load(Ordering::Relaxed) {
                client.unary_echo(request.clone()).await.expect("a call");
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (calls.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let rate = (calls.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    rate
}

async fn connected(uris: &[String], health: bool) -> (Pool, Duration) {
    let mut builder = Pool::builder().min_connections(1);
    if health {
        let mut check = HealthCheck::default();
        check.mode = CheckMode::Watch;
        builder = builder.health_checks(Some(check));
    }
    let pool = builder.build_lazy(uris).unwrap();
    let took = wait_for("every endpoint connected", Duration::from_secs(600), || {
        pool.state().members() == uris.len()
    })
    .await;
    (pool, took)
}

/// `--NAME a,b,c` from the command line, or `default`.
fn list_arg(name: &str, default: &[&str]) -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect())
}

fn main() {
    if let Some(count) = process::server_process_count() {
        return process::serve_until_stdin_closes(count);
    }
    let sizes: Vec<usize> = list_arg("--sizes", &["1", "100", "1000", "10000"])
        .iter()
        .map(|n| n.parse().expect("a size"))
        .collect();
    let parts = list_arg("--parts", &["costs", "health", "calls"]);
    let most = sizes.iter().copied().max().unwrap_or(1);
    let needs_servers = parts.iter().any(|p| p != "discovery");
    let (servers, uris) = match needs_servers {
        true => process::start_server_processes(most.max(4), PER_PROCESS),
        false => (Vec::new(), Vec::new()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if parts.iter().any(|p| p == "discovery") {
            println!("| endpoints | 1,000 discovery changes |");
            println!("| --- | --- |");
            for &n in &sizes {
                println!("| {n} | {:.1} ms |", discovery_time(n).await.as_secs_f64() * 1e3);
            }
        }
        if parts.iter().any(|p| p == "costs") {
            println!("| endpoints | bytes per known endpoint | bytes per connected member | connect all | checkout + release | 1,000 discovery changes |");
            println!("| --- | --- | --- | --- | --- | --- |");
            let fixed = pool_bytes().await;
            println!("(a pool with no endpoint holds {fixed} bytes)\n");
            for &n in &sizes {
                let known = known_bytes(n, fixed).await;
                let changes = discovery_time(n).await;
                let before = held();
                let (pool, took) = connected(&uris[..n], false).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let member = (held() - before - fixed) as f64 / n as f64 - known;
                let checkout = checkout_ns(&pool);
                println!(
                    "| {n} | {known:.0} | {member:.0} | {:.2} s | {checkout:.0} ns | {:.1} ms |",
                    took.as_secs_f64(),
                    changes.as_secs_f64() * 1e3
                );
                pool.close().await;
            }
        }

        if parts.iter().any(|p| p == "health") {
            println!("\n| endpoints | Watch health checks | client CPU, % of a core | servers' CPU | client per endpoint |");
            println!("| --- | --- | --- | --- | --- |");
            for &n in sizes.iter().filter(|n| **n >= 1_000) {
                for health in [false, true] {
                    let (pool, _) = connected(&uris[..n], health).await;
                    if health {
                        wait_for("every endpoint healthy", Duration::from_secs(600), || {
                            pool.state().endpoints.iter().all(|e| e.healthy)
                        })
                        .await;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let (client, server) = cpu_over(Duration::from_secs(10), &servers).await;
                    println!(
                        "| {n} | {} | {client:.2}% | {server:.2}% | {:.4}% |",
                        if health { "yes" } else { "no" },
                        client / n as f64
                    );
                    pool.close().await;
                }
            }
        }

        if parts.iter().any(|p| p == "calls") && most >= 1_000 {
            println!("\n| endpoints | calls/s, 64 callers, 64-byte unary |");
            println!("| --- | --- |");
            for n in [4, 1_000] {
                let (pool, _) = connected(&uris[..n], false).await;
                let rate = calls_per_second(&pool, Duration::from_secs(3)).await;
                println!("| {n} | {rate:.0} |");
                pool.close().await;
            }
        }
    });
    for mut child in servers {
        drop(child.stdin.take());
        let _ = child.wait();
    }
}
