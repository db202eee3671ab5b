//! What keepalive costs at scale: 10,000 idle members PINGed every 10 s.
//!
//! Three runs: the pool with keepalive 10 s/5 s, the pool without keepalive, and the floor
//! to compare with: as many bare `h2` connections, each PINGed every 10 s by a task of its own.
//! CPU is split into user and kernel time; on loopback the kernel time includes the server
//! side's TCP receive work, which runs in the sender's system call.
//!
//! Run: `cargo bench --bench health_task [-- --members N --seconds S --only ROWS]` (ROWS: any
//! of `defaults,keepalive,none,bare`; all by default). The servers run in a
//! child process (this same binary, re-executed), so that the numbers are the client's
//! alone: process CPU time over a quiet window (PINGs, PONGs and the health task's timer
//! queue, all of it), once with keepalive at 10 s and once without, and resident memory per
//! idle member.

use std::time::{Duration, Instant};

use grpc_pool::{Keepalive, Pool};
use grpc_pool_testkit::process;

const PORTS: usize = 10;

/// Measures CPU over `window`: "X% of one core (user Y%, kernel Z%)".
async fn cpu_over(window: Duration) -> String {
    let ((user0, sys0), t0) = (process::cpu_seconds(), Instant::now());
    tokio::time::sleep(window).await;
    let (user1, sys1) = process::cpu_seconds();
    let wall = t0.elapsed().as_secs_f64();
    let (user, sys) = (100.0 * (user1 - user0) / wall, 100.0 * (sys1 - sys0) / wall);
    format!("CPU {:.2}% of one core (user {user:.2}%, kernel {sys:.2}%) over {wall:.0}s", user + sys)
}

async fn measure(
    label: &str,
    builder: grpc_pool::Builder,
    uris: &[String],
    members: usize,
    window: Duration,
) {
    let rss_before = process::rss_bytes();
    let started = Instant::now();
    let pool = builder.build_lazy(uris).unwrap();
    while pool.state().members() < members {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {} members after 300 s",
            pool.state().members()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_time = started.elapsed();
    // Let connection setup settle, then watch a quiet window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = process::rss_bytes();
    let cpu = cpu_over(window).await;
    let pinged = pool
        .state()
        .endpoints
        .iter()
        .flat_map(|e| e.members.iter())
        .filter(|m| m.last_ping_rtt.is_some())
        .count();
    println!(
        "{label:<18} {members} members up in {:.1}s; {cpu}; {:.1} KiB RSS per member; {pinged} members answered a PING",
        connect_time.as_secs_f64(),
        (rss_after.saturating_sub(rss_before)) as f64 / members as f64 / 1024.0,
    );
    pool.close().await;
}

/// The floor: the same number of bare `h2` connections, each PINGed every `keepalive` by a
/// task of its own (a sleep and a PING in a loop), with no pool and no health task. What the
/// pool costs above this is the price of its bookkeeping; the rest is HTTP/2 and TCP.
async fn measure_bare_h2(uris: &[String], members: usize, keepalive: Duration, window: Duration) {
    let rss_before = process::rss_bytes();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..members {
        let addr = uris[i % uris.len()].trim_start_matches("http://").to_owned();
        // Opened one endpoint-batch at a time, as the pool's connect pacing does.
        let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        let (_send, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let mut ping_pong = connection.ping_pong().expect("ping_pong");
        let answered = answered.clone();
        tasks.spawn(async move {
            let _send = _send;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            // Spread like the pool's first PINGs: somewhere in the second half of the period.
            let phase = keepalive.mul_f64(0.5 + 0.5 * (i as f64 / members as f64));
            tokio::time::sleep(phase).await;
            loop {
                if ping_pong.ping(h2::Ping::opaque()).await.is_err() {
                    return;
                }
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(keepalive).await;
            }
        });
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = process::rss_bytes();
    let cpu = cpu_over(window).await;
    println!(
        "{:<18} {members} connections up in {:.1}s; {cpu}; {:.1} KiB RSS per connection; {} PINGs answered",
        "bare h2, 10s PING",
        connect_time.as_secs_f64(),
        (rss_after.saturating_sub(rss_before)) as f64 / members as f64 / 1024.0,
        answered.load(std::sync::atomic::Ordering::Relaxed),
    );
    tasks.shutdown().await;
}

fn main() {
    if process::is_server_process() {
        return process::serve_until_stdin_closes(PORTS);
    }
    let mut members = 10_000usize;
    let mut seconds = 20u64;
    // Which rows to run (all by default): any of defaults, keepalive, none, bare.
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--members" => members = args.next().and_then(|v| v.parse().ok()).expect("--members N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--only" => only = Some(args.next().expect("--only defaults,keepalive,none,bare")),
            _ => {} // cargo bench passes --bench
        }
    }
    let (mut child, uris) = process::start_server_process();
    let per_endpoint = members.div_ceil(uris.len());
    let members = per_endpoint * uris.len();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let runs = |row: &str| only.as_deref().is_none_or(|only| only.split(',').any(|o| o == row));
    rt.block_on(async {
        let base = || {
            Pool::builder()
                .min_connections(per_endpoint)
                .max_connections(per_endpoint)
                .connect_timeout(Duration::from_secs(60))
                .idle_timeout(None)
        };
        let window = Duration::from_secs(seconds);
        // The defaults: idle members are not PINGed (they are checked before use instead).
        if runs("defaults") {
            measure("defaults (keepalive 20s/10s with calls in flight)", base(), &uris, members, window)
                .await;
        }
        // Idle members PINGed every 10 s, as servers that permit it allow.
        let idle_pings = {
            let mut v = Keepalive::new(Duration::from_secs(10), Duration::from_secs(5));
            v.permit_without_stream = true;
            v.max_pings_without_data = 0;
            v
        };
        if runs("keepalive") {
            let builder = base().keepalive(Some(idle_pings));
            measure("keepalive 10s/5s, idle members too", builder, &uris, members, window).await;
        }
        if runs("none") {
            measure("no keepalive", base().keepalive(None), &uris, members, window).await;
        }
        if runs("bare") {
            measure_bare_h2(&uris, members, Duration::from_secs(10), window).await;
        }
    });
    drop(child.stdin.take());
    let _ = child.wait();
}
