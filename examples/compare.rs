//! The side-by-side load comparison: the same closed-loop unary workload through each client
//! a Rust user has, against one in-process tonic echo server on several ports.
//!
//! `cargo run --release --example compare -- --help`
//!
//! Clients: `pool` (grpc-pool), `channel` (one tonic Channel), `balance` (tonic
//! `Channel::balance_list` over the ports), `rr4` (four Channels picked round-robin), `bb8` (a
//! bb8 pool of Channels, checked out per call), and `h2load` (nghttp2's C load generator with
//! correctly framed gRPC requests, when installed: Debian's `nghttp2-client`) as the
//! server's limit. For each: calls/s, p50/p99/p99.9 latency, errors, and callers that
//! completed no call at all ("starved").

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

const HELP: &str = "\
The load comparison: one workload through every gRPC client, side by side.

USAGE: cargo run --release --example compare -- [OPTIONS]

OPTIONS:
  --duration SECS        measured time per run (default 5)
  --warmup SECS          unmeasured time before each run (default 1)
  --concurrency LIST     concurrent callers, comma-separated (default 1,32,256)
  --clients LIST         from pool,channel,balance,rr4,bb8,h2load (default: all)
  --layouts LIST         multi (default runtimes, both sides) and/or single (one worker
                         thread per side) (default multi,single)
  --ports N              server ports, one endpoint each (default 4)
  --markdown FILE        also write the tables as Markdown
  --json FILE            also write the results as JSON
";

struct Options {
    duration: Duration,
    warmup: Duration,
    concurrency: Vec<usize>,
    clients: Vec<String>,
    layouts: Vec<String>,
    ports: usize,
    markdown: Option<String>,
    json: Option<String>,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        concurrency: vec![1, 32, 256],
        clients: ["pool", "channel", "balance", "rr4", "bb8", "h2load"].map(String::from).to_vec(),
        layouts: vec!["multi".into(), "single".into()],
        ports: 4,
        markdown: None,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    let list = |v: Option<String>| v.map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--duration" => o.duration = secs(args.next(), "--duration")?,
            "--warmup" => o.warmup = secs(args.next(), "--warmup")?,
            "--concurrency" => {
                o.concurrency = list(args.next())
                    .ok_or("--concurrency takes a list")?
                    .iter()
                    .map(|c| c.parse().ok().filter(|n| (1..=10_000).contains(n)))
                    .collect::<Option<_>>()
                    .ok_or("--concurrency takes numbers from 1 to 10000")?
            }
            "--clients" => o.clients = list(args.next()).ok_or("--clients takes a list")?,
            "--layouts" => o.layouts = list(args.next()).ok_or("--layouts takes a list")?,
            "--ports" => {
                o.ports = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (1..=64).contains(n))
                    .ok_or("--ports takes 1 to 64")?
            }
            "--markdown" => o.markdown = Some(args.next().ok_or("--markdown takes a file")?),
            "--json" => o.json = Some(args.next().ok_or("--json takes a file")?),
            other => return Err(format!("unknown option `{other}`; see --help")),
        }
    }
    for c in &o.clients {
        if !["pool", "channel", "balance", "rr4", "bb8", "h2load"].contains(&c.as_str()) {
            return Err(format!("unknown client `{c}`"));
        }
    }
    for l in &o.layouts {
        if !["multi", "single"].contains(&l.as_str()) {
            return Err(format!("unknown layout `{l}` (multi or single)"));
        }
    }
    Ok(o)
}

fn secs(value: Option<String>, flag: &str) -> Result<Duration, String> {
    value
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or(format!("{flag} takes seconds above zero"))
}

/// bb8 over tonic Channels, as people wire it: one Channel per pooled "connection".
struct ChannelManager(Endpoint);

impl bb8::ManageConnection for ChannelManager {
    type Connection = Channel;
    type Error = tonic::transport::Error;

    async fn connect(&self) -> Result<Channel, Self::Error> {
        self.0.connect().await
    }

    async fn is_valid(&self, _: &mut Channel) -> Result<(), Self::Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut Channel) -> bool {
        false
    }
}

#[derive(Clone)]
enum Client {
    Pool(EchoClient<Pool>),
    Channel(EchoClient<Channel>),
    RoundRobin(Arc<Vec<EchoClient<Channel>>>, Arc<AtomicUsize>),
    Bb8(bb8::Pool<ChannelManager>),
}

impl Client {
    async fn call(&mut self, request: EchoRequest) -> Result<(), String> {
        let result = match self {
            Client::Pool(c) => c.unary_echo(request).await.map(drop),
            Client::Channel(c) => c.unary_echo(request).await.map(drop),
            Client::RoundRobin(clients, next) => {
                let i = next.fetch_add(1, Ordering::Relaxed) % clients.len();
                clients[i].clone().unary_echo(request).await.map(drop)
            }
            Client::Bb8(pool) => {
                let channel = pool.get().await.map_err(|e| e.to_string())?;
                EchoClient::new(channel.clone()).unary_echo(request).await.map(drop)
            }
        };
        result.map_err(|s| s.to_string())
    }
}

async fn make_client(kind: &str, uris: &[String]) -> Client {
    let endpoint = |uri: &String| Endpoint::from_shared(uri.clone()).unwrap();
    match kind {
        "pool" => Client::Pool(EchoClient::new(Pool::builder().name("compare").build(uris).await.unwrap())),
        "channel" => Client::Channel(EchoClient::new(endpoint(&uris[0]).connect().await.unwrap())),
        "balance" => Client::Channel(EchoClient::new(Channel::balance_list(uris.iter().map(endpoint)))),
        "rr4" => {
            let mut clients = Vec::new();
            for i in 0..4 {
                clients.push(EchoClient::new(endpoint(&uris[i % uris.len()]).connect().await.unwrap()));
            }
            Client::RoundRobin(Arc::new(clients), Arc::new(AtomicUsize::new(0)))
        }
        "bb8" => Client::Bb8(
            bb8::Pool::builder().max_size(4).build(ChannelManager(endpoint(&uris[0]))).await.unwrap(),
        ),
        other => unreachable!("{other}"),
    }
}

struct Row {
    layout: String,
    client: String,
    concurrency: usize,
    calls_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    starved: usize,
}

async fn run(
    client: Client,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> (f64, Histogram<u64>, u64, usize) {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(vec![7u8; 64]);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (mut client, measuring, stop, payload) =
            (client.clone(), measuring.clone(), stop.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut calls, mut errors) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result =
                    client.call(EchoRequest { message: payload.clone(), repeat: 0, delay_ms: 0 }).await;
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    calls += 1;
                    if result.is_err() {
                        errors += 1;
                    }
                    let _ = histogram.record(started.elapsed().as_micros() as u64);
                }
            }
            (histogram, calls, errors)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut calls, mut errors, mut starved) = (0u64, 0u64, 0usize);
    for task in tasks {
        let (histogram, n, e) = task.await.unwrap();
        all.add(&histogram).unwrap();
        calls += n;
        errors += e;
        starved += usize::from(n == 0);
    }
    (calls as f64 / elapsed, all, errors, starved)
}

/// The gRPC request h2load sends: a length-prefixed EchoRequest with a 64-byte message.
fn grpc_frame() -> Vec<u8> {
    let mut message = vec![0x0a, 64];
    message.extend_from_slice(&[7u8; 64]);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

fn h2load(uri: &str, concurrency: usize, duration: Duration, warmup: Duration, single: bool) -> Option<Row> {
    let body = std::env::temp_dir().join("grpc-pool-compare-request.bin");
    std::fs::write(&body, grpc_frame()).ok()?;
    let connections = concurrency.min(4);
    let output = Command::new("h2load")
        .arg(format!("{uri}/echo.Echo/UnaryEcho"))
        .args(["-c", &connections.to_string(), "-m", &concurrency.div_ceil(connections).to_string()])
        .args(["-D", &format!("{}", duration.as_secs_f64().ceil() as u64)])
        .args(["--warm-up-time", &format!("{}", warmup.as_secs_f64().ceil() as u64)])
        // h2load wants no more threads than connections.
        .args(["-t", &(if single { 1 } else { 2 }).min(connections).to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))?
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let errored: u64 = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with("errored")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let latency = |row: &str| -> Option<f64> {
        // "time for request:  min  max  mean  sd  +/- sd" (h2load gives no percentiles).
        let line = text.lines().find(|l| l.trim_start().starts_with(row))?;
        let mean = line.split_whitespace().nth(5)?;
        parse_h2load_time(mean)
    };
    let mean = latency("time for request:").unwrap_or(f64::NAN);
    Some(Row {
        layout: String::new(),
        client: "h2load".into(),
        concurrency,
        calls_per_sec: rps,
        p50_us: mean,
        p99_us: f64::NAN,
        p999_us: f64::NAN,
        errors: errored,
        starved: 0,
    })
}

fn parse_h2load_time(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(v) = text.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1_000.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn runtime(single: bool) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if single {
        builder.worker_threads(1);
    }
    builder.enable_all().build().unwrap()
}

fn main() {
    let options = match parse() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let has_h2load = Command::new("h2load").arg("--version").output().is_ok();
    let mut rows = Vec::new();
    for layout in &options.layouts {
        let single = layout == "single";
        // The server on a runtime (and threads) of its own.
        let server_rt = runtime(single);
        let servers: Vec<TestServer> = server_rt.block_on(async {
            let mut servers = Vec::new();
            for _ in 0..options.ports {
                servers.push(TestServer::start().await);
            }
            servers
        });
        let uris: Vec<String> = servers.iter().map(|s| s.uri()).collect();
        let client_rt = runtime(single);
        println!(
            "\n## layout `{layout}`: {} worker thread(s) per side, {} ports\n",
            if single { "1" } else { "default" },
            uris.len()
        );
        for client in &options.clients {
            for &concurrency in &options.concurrency {
                let row = if client == "h2load" {
                    if !has_h2load {
                        continue;
                    }
                    match h2load(&uris[0], concurrency, options.duration, options.warmup, single) {
                        Some(row) => row,
                        None => {
                            eprintln!("h2load failed at concurrency {concurrency}");
                            continue;
                        }
                    }
                } else {
                    let (rate, histogram, errors, starved) = client_rt.block_on(async {
                        let c = make_client(client, &uris).await;
                        run(c, concurrency, options.warmup, options.duration).await
                    });
                    Row {
                        layout: String::new(),
                        client: client.clone(),
                        concurrency,
                        calls_per_sec: rate,
                        p50_us: histogram.value_at_quantile(0.5) as f64,
                        p99_us: histogram.value_at_quantile(0.99) as f64,
                        p999_us: histogram.value_at_quantile(0.999) as f64,
                        errors,
                        starved,
                    }
                };
                println!(
                    "{:<8} c={:<4} {:>9.0} calls/s  p50 {:>8.0} µs  p99 {:>8.0} µs  p99.9 {:>8.0} µs  errors {}  starved {}",
                    row.client, row.concurrency, row.calls_per_sec, row.p50_us, row.p99_us, row.p999_us, row.errors, row.starved
                );
                rows.push(Row { layout: layout.clone(), ..row });
            }
        }
        drop(client_rt);
        server_rt.block_on(async move { drop(servers) });
    }
    let markdown = tables(&rows);
    println!("\n{markdown}");
    if let Some(path) = &options.markdown {
        std::fs::write(path, &markdown).expect("write the Markdown file");
    }
    if let Some(path) = &options.json {
        std::fs::write(path, json(&rows)).expect("write the JSON file");
    }
}

fn ratio(rows: &[Row], row: &Row, client: &str) -> String {
    rows.iter()
        .find(|r| r.layout == row.layout && r.concurrency == row.concurrency && r.client == client)
        .map(|base| format!("{:.2}", row.calls_per_sec / base.calls_per_sec))
        .unwrap_or_else(|| "-".into())
}

fn tables(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut layouts: Vec<&str> = rows.iter().map(|r| r.layout.as_str()).collect();
    layouts.dedup();
    for layout in layouts {
        out.push_str(&format!("### layout `{layout}`\n\n| client | concurrency | calls/s | p50 µs | p99 µs | p99.9 µs | errors | starved | / channel | / h2load |\n|---|---|---|---|---|---|---|---|---|---|\n"));
        for row in rows.iter().filter(|r| r.layout == layout) {
            out.push_str(&format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |\n",
                row.client,
                row.concurrency,
                row.calls_per_sec,
                row.p50_us,
                row.p99_us,
                row.p999_us,
                row.errors,
                row.starved,
                ratio(rows, row, "channel"),
                ratio(rows, row, "h2load"),
            ));
        }
        out.push('\n');
    }
    out.push_str("(h2load reports no percentiles: its p50 column is its mean.)\n");
    out
}

fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            let num = |v: f64| if v.is_finite() { format!("{v:.1}") } else { "null".into() };
            format!(
                "{{\"layout\":\"{}\",\"client\":\"{}\",\"concurrency\":{},\"calls_per_sec\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"starved\":{}}}",
                r.layout, r.client, r.concurrency, num(r.calls_per_sec), num(r.p50_us), num(r.p99_us), num(r.p999_us), r.errors, r.starved
            )
        })
        .collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}
