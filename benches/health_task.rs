//! What keepalive costs at scale: 10,000 idle members PINGed every 10 s.
//!
//! Run: `cargo bench --bench health_task [-- --members N --seconds S]`. The servers run in a
//! child process (this same binary, re-executed), so that the numbers are the client's
//! alone: process CPU time over a quiet window (PINGs, PONGs and the health task's timer
//! queue, all of it), once with keepalive at 10 s and once without, and resident memory per
//! idle member.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use grpc_pool::{Keepalive, Pool};
use grpc_pool_testkit::TestServer;

const SERVER_ENV: &str = "GRPC_POOL_BENCH_SERVER";
const PORTS: usize = 10;

fn cpu_seconds() -> f64 {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 =
        fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn serve() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let mut servers = Vec::new();
        for _ in 0..PORTS {
            servers.push(TestServer::start().await);
        }
        let ports: Vec<String> = servers.iter().map(|s| s.addr().port().to_string()).collect();
        println!("{}", ports.join(" "));
        std::io::stdout().flush().unwrap();
        // Until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .unwrap();
    });
}

async fn measure(
    label: &str,
    builder: grpc_pool::Builder,
    uris: &[String],
    members: usize,
    window: Duration,
) {
    let rss_before = rss_bytes();
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
    let rss_after = rss_bytes();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    tokio::time::sleep(window).await;
    let cpu = cpu_seconds() - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let pinged = pool
        .state()
        .endpoints
        .iter()
        .flat_map(|e| e.members.iter())
        .filter(|m| m.last_ping_rtt.is_some())
        .count();
    println!(
        "{label:<22} {members} members up in {:.1}s; CPU {:.2}% of one core over {:.0}s; {:.1} KiB RSS per member; {pinged} members answered a PING",
        connect_time.as_secs_f64(),
        100.0 * cpu / wall,
        wall,
        (rss_after.saturating_sub(rss_before)) as f64 / members as f64 / 1024.0,
    );
    pool.close().await;
}

fn main() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return serve();
    }
    let mut members = 10_000usize;
    let mut seconds = 20u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--members" => members = args.next().and_then(|v| v.parse().ok()).expect("--members N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            _ => {} // cargo bench passes --bench
        }
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(SERVER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let uris: Vec<String> = line.split_whitespace().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let per_endpoint = members.div_ceil(uris.len());
    let members = per_endpoint * uris.len();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let base = || {
            Pool::builder()
                .min_connections(per_endpoint)
                .max_connections(per_endpoint)
                .connect_timeout(Duration::from_secs(60))
                .idle_timeout(None)
        };
        let window = Duration::from_secs(seconds);
        measure(
            "keepalive 10s/5s",
            base().keepalive(Keepalive::new(Duration::from_secs(10), Duration::from_secs(5))),
            &uris,
            members,
            window,
        )
        .await;
        measure("no keepalive", base().no_keepalive(), &uris, members, window).await;
    });
    drop(child.stdin.take());
    let _ = child.wait();
}
