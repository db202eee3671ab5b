//! The side-by-side load comparison: the same closed-loop unary workload through each client
//! a Rust user has, against one tonic echo server on several ports, in a process of its own.
//!
//! `cargo run --release --example compare -- --help`
//!
//! Clients: `pool` (grpc-pool), `pool-ewma` (the same with `Balance::PEAK_EWMA`, on request), `channel` (one tonic Channel), `balance` (tonic
//! `Channel::balance_list` over the ports), `rr4` (four Channels picked round-robin), `bb8` (a
//! bb8 pool of Channels, checked out per call), and `h2load` (nghttp2's C load generator with
//! correctly framed gRPC requests, when installed: Debian's `nghttp2-client`) as the
//! server's limit. For each: calls/s, p50/p99/p99.9 latency, errors, callers that completed
//! no call at all ("starved"), and per call over the measured window: CPU time of the client
//! and of the server process, TCP segments, and the client's socket writes.

#[path = "compare/counting.rs"]
mod counting;
#[path = "compare/measure.rs"]
mod measure;
#[path = "compare/open_loop.rs"]
mod open_loop;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/restart.rs"]
mod restart;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use measure::{per_call, Probe, ServerProcess, Writes};
use report::Row;

const HELP: &str = "\
The load comparison: one workload through every gRPC client, side by side.

USAGE: cargo run --release --example compare -- [OPTIONS]

OPTIONS:
  --duration SECS        measured time per run (default 5)
  --warmup SECS          unmeasured time before each run (default 1)
  --concurrency LIST     concurrent callers, comma-separated (default 1,32,256)
  --clients LIST         from pool,pool-ewma,channel,balance,rr4,bb8,h2load (default: all
                         but pool-ewma, the pool with Balance::PEAK_EWMA)
  --layouts LIST         multi (default runtimes, both sides), single (one worker thread
                         per side) and/or pinned (one worker thread per side, the client's
                         on the first CPU and the server's on the second)
                         (default multi,single)
  --ports N              server ports, one endpoint each (default 4)
  --rounds N             run every cell N times, interleaved; the tables give medians
                         (default 1)
  --open-loop LIST       also run every client in open loop: calls started at a fixed rate
                         whether or not earlier ones returned, latency from each call's
                         intended start; each rate absolute (calls/s) or a percentage of
                         the `channel`'s closed-loop calls/s at the largest --concurrency in
                         the same round and layout (measured for it if the channel is not in
                         --clients), e.g. 50%,75%,5000 (default: none)
  --slow MS              the first port's server answers every call MS milliseconds later
                         than the others (a slow endpoint among fast ones; default 0)
  --restart LIST         instead of the tables: each Rust client under open-loop load while
                         its server (one port) stops gracefully, stays down this many
                         seconds, and starts again on the same port, e.g. 0,1,3; reports
                         failed calls, how soon after the server listens calls succeed,
                         connection attempts a second while down, and the p99 of the
                         second the stop began in
  --restart-rate N       calls/s offered in the restart cells (default 1000)
  --markdown FILE        also write the tables as Markdown
  --json FILE            also write the results as JSON

Beside calls/s and latency, per call over each measured window: CPU time (user + system) of
the client process and of the server process (a child of this one, or h2load itself), TCP
segments sent (the machine's, and the client's and server's sockets' own), and the client's
socket writes. scripts/setup-bench installs h2load (and strace).
";

struct Options {
    duration: Duration,
    warmup: Duration,
    concurrency: Vec<usize>,
    clients: Vec<String>,
    layouts: Vec<String>,
    ports: usize,
    rounds: usize,
    open_loop: Vec<Rate>,
    restart: Vec<Duration>,
    restart_rate: f64,
    slow: Option<Duration>,
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
        rounds: 1,
        open_loop: Vec::new(),
        restart: Vec::new(),
        restart_rate: 1000.0,
        slow: None,
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
            "--ports" => o.ports = number(args.next(), 1..=64, "--ports takes 1 to 64")?,
            "--rounds" => o.rounds = number(args.next(), 1..=20, "--rounds takes 1 to 20")?,
            "--open-loop" => {
                o.open_loop = list(args.next())
                    .ok_or("--open-loop takes a list")?
                    .iter()
                    .map(|r| Rate::parse(r))
                    .collect::<Option<_>>()
                    .ok_or("--open-loop takes rates: calls/s (1 to 10000000) or percentages (1% to 500%)")?
            }
            "--restart" => {
                o.restart = list(args.next())
                    .ok_or("--restart takes a list")?
                    .iter()
                    .map(|d| {
                        d.parse::<f64>()
                            .ok()
                            .filter(|d| (0.0..=600.0).contains(d))
                            .map(Duration::from_secs_f64)
                    })
                    .collect::<Option<_>>()
                    .ok_or("--restart takes seconds down, 0 to 600")?
            }
            "--restart-rate" => {
                o.restart_rate = number(args.next(), 1.0..=1e6, "--restart-rate takes 1 to 1000000 calls/s")?
            }
            "--slow" => {
                let ms: u64 = number(args.next(), 0..=10_000, "--slow takes 0 to 10000 ms")?;
                o.slow = Some(Duration::from_millis(ms)).filter(|d| !d.is_zero());
            }
            "--markdown" => o.markdown = Some(args.next().ok_or("--markdown takes a file")?),
            "--json" => o.json = Some(args.next().ok_or("--json takes a file")?),
            other => return Err(format!("unknown option `{other}`; see --help")),
        }
    }
    for c in &o.clients {
        if !["pool", "pool-ewma", "channel", "balance", "rr4", "bb8", "h2load"].contains(&c.as_str()) {
            return Err(format!("unknown client `{c}`"));
        }
    }
    for l in &o.layouts {
        if !["multi", "single", "pinned"].contains(&l.as_str()) {
            return Err(format!("unknown layout `{l}` (multi, single or pinned)"));
        }
        if l == "pinned" && std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
            return Err("layout `pinned` needs two CPUs".into());
        }
    }
    Ok(o)
}

/// An open-loop rate: absolute, or a share of the `channel`'s closed-loop capacity.
#[derive(Clone, Copy)]
enum Rate {
    PerSecond(f64),
    OfChannel(f64),
}

impl Rate {
    fn parse(text: &str) -> Option<Rate> {
        match text.strip_suffix('%') {
            Some(p) => {
                p.parse().ok().filter(|p| (1.0..=500.0).contains(p)).map(|p: f64| Rate::OfChannel(p / 100.0))
            }
            None => text.parse().ok().filter(|r| (1.0..=1e7).contains(r)).map(Rate::PerSecond),
        }
    }

    /// The share of the channel's capacity, for a rate given as one.
    fn share(self) -> Option<f64> {
        match self {
            Rate::PerSecond(_) => None,
            Rate::OfChannel(share) => Some(share),
        }
    }

    fn calls_per_sec(self, channel_capacity: f64) -> f64 {
        match self {
            Rate::PerSecond(r) => r,
            Rate::OfChannel(share) => (channel_capacity * share).round().max(1.0),
        }
    }
}

/// An option's number, in `range`, or `message`.
fn number<T: std::str::FromStr + PartialOrd>(
    value: Option<String>,
    range: std::ops::RangeInclusive<T>,
    message: &str,
) -> Result<T, String> {
    value.and_then(|v| v.parse().ok()).filter(|n| range.contains(n)).ok_or_else(|| message.to_owned())
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
        self.0.connect_with_connector(counting::for_tonic()).await
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
    /// A call with a deadline: `grpc-timeout` on the request, which each client enforces.
    async fn call_with_deadline(&mut self, request: EchoRequest, deadline: Duration) -> Result<(), String> {
        let mut request = tonic::Request::new(request);
        request.set_timeout(deadline);
        self.send(request).await
    }

    async fn call(&mut self, request: EchoRequest) -> Result<(), String> {
        self.send(tonic::Request::new(request)).await
    }

    async fn send(&mut self, request: tonic::Request<EchoRequest>) -> Result<(), String> {
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

/// The `pool`'s connections per endpoint kept open from the start:
/// `GRPC_POOL_COMPARE_MIN_CONNECTIONS`, or the default, 1 (for trying as many connections as
/// worker threads, or more).
fn min_connections() -> usize {
    std::env::var("GRPC_POOL_COMPARE_MIN_CONNECTIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(1)
}

/// The decay of `pool-ewma`'s latency estimate: `GRPC_POOL_COMPARE_EWMA_DECAY_MS`, or
/// `Balance::PEAK_EWMA`'s.
fn ewma_decay() -> Duration {
    let default = match grpc_pool::Balance::PEAK_EWMA {
        grpc_pool::Balance::PeakEwma { decay } => decay,
        _ => unreachable!("PEAK_EWMA is latency-aware"),
    };
    std::env::var("GRPC_POOL_COMPARE_EWMA_DECAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(default, Duration::from_millis)
}

async fn make_client(kind: &str, uris: &[String]) -> Client {
    let endpoint = |uri: &String| Endpoint::from_shared(uri.clone()).unwrap();
    // Every client but `balance` (`balance_list` takes no connector) over the counting socket.
    let channel = |uri: &String| {
        let endpoint = endpoint(uri);
        async move { endpoint.connect_with_connector(counting::for_tonic()).await }
    };
    match kind {
        "pool" => Client::Pool(EchoClient::new(
            Pool::builder()
                .name("compare")
                .min_connections(min_connections())
                .connector(counting::for_pool())
                .build(uris)
                .await
                .unwrap(),
        )),
        "pool-ewma" => Client::Pool(EchoClient::new(
            Pool::builder()
                .name("compare")
                .balance(grpc_pool::Balance::PeakEwma { decay: ewma_decay() })
                .connector(counting::for_pool())
                .build(uris)
                .await
                .unwrap(),
        )),
        "channel" => Client::Channel(EchoClient::new(channel(&uris[0]).await.unwrap())),
        "balance" => Client::Channel(EchoClient::new(Channel::balance_list(uris.iter().map(endpoint)))),
        "rr4" => {
            let mut clients = Vec::new();
            for i in 0..4 {
                clients.push(EchoClient::new(channel(&uris[i % uris.len()]).await.unwrap()));
            }
            Client::RoundRobin(Arc::new(clients), Arc::new(AtomicUsize::new(0)))
        }
        "bb8" => Client::Bb8(
            bb8::Pool::builder().max_size(4).build(ChannelManager(endpoint(&uris[0]))).await.unwrap(),
        ),
        other => unreachable!("{other}"),
    }
}

/// One cell: `concurrency` callers in a closed loop; after `warmup`, a measured window of
/// `duration` with the probe read at both ends.
async fn run(client: Client, concurrency: usize, warmup: Duration, duration: Duration, probe: Probe) -> Row {
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
    let before = probe.start();
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let after = probe.end();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut calls, mut errors, mut starved) = (0u64, 0u64, 0usize);
    for task in tasks {
        let (histogram, n, e) = task.await.unwrap();
        all.add(&histogram).unwrap();
        calls += n;
        errors += e;
        starved += usize::from(n == 0);
    }
    Row {
        round: 0,
        share: None,
        layout: String::new(),
        client: String::new(),
        concurrency,
        offered: None,
        calls_per_sec: calls as f64 / elapsed,
        p50_us: all.value_at_quantile(0.5) as f64,
        p99_us: all.value_at_quantile(0.99) as f64,
        p999_us: all.value_at_quantile(0.999) as f64,
        errors,
        starved,
        per: per_call(before, after, calls as f64),
    }
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

/// One h2load cell. h2load runs `warmup` + `duration`; the probe is read 0.3 s into its
/// measured part and 0.3 s before its end (its own clock starts after it connects), and the
/// calls in that window are its rate times the window.
/// With `rate`, in open loop: h2load's `--rps` (per connection) over 4 connections of up to
/// `concurrency` streams each; its latency then runs from each request's actual start.
fn h2load(
    uri: &str,
    concurrency: usize,
    rate: Option<f64>,
    options: &Options,
    single: bool,
    mut probe: Probe,
) -> Option<Row> {
    let body = std::env::temp_dir().join("grpc-pool-compare-request.bin");
    std::fs::write(&body, grpc_frame()).ok()?;
    let connections = concurrency.min(4);
    let rps: Vec<String> = match rate {
        Some(rate) => vec!["--rps".into(), format!("{:.0}", (rate / connections as f64).max(1.0))],
        None => Vec::new(),
    };
    let seconds = |d: Duration| (d.as_secs_f64().ceil() as u64).max(1);
    let (warmup, duration) = (seconds(options.warmup), seconds(options.duration));
    let child = Command::new("h2load")
        .arg(format!("{uri}/echo.Echo/UnaryEcho"))
        .args(["-c", &connections.to_string(), "-m", &concurrency.div_ceil(connections).to_string()])
        .args(["-D", &duration.to_string(), "--warm-up-time", &warmup.to_string()])
        // h2load wants no more threads than connections.
        .args(["-t", &(if single { 1 } else { 2 }).min(connections).to_string()])
        .args(&rps)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body)
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    probe.client = child.id();
    probe.writes = Writes::Syscalls(child.id());
    std::thread::sleep(Duration::from_secs(warmup) + Duration::from_millis(300));
    let before = probe.start();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(duration).saturating_sub(Duration::from_millis(600)));
    let after = probe.end();
    let window = started.elapsed().as_secs_f64();
    let output = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let achieved: f64 = text
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
    // "time for request:  min  max  mean  sd  +/- sd" (h2load gives no percentiles).
    let mean = text
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))
        .and_then(|l| parse_h2load_time(l.split_whitespace().nth(5)?))
        .unwrap_or(f64::NAN);
    Some(Row {
        round: 0,
        share: None,
        layout: String::new(),
        client: "h2load".into(),
        concurrency: if rate.is_some() { 0 } else { concurrency },
        offered: rate,
        calls_per_sec: achieved,
        p50_us: mean,
        p99_us: f64::NAN,
        p999_us: f64::NAN,
        errors: errored,
        starved: 0,
        per: per_call(before, after, achieved * window),
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

/// A cell's load.
#[derive(Clone, Copy)]
enum Load {
    /// This many callers, each starting a call when its last one returns.
    Closed(usize),
    /// Calls started at this rate a second, whatever comes back.
    Open(f64),
}

/// What the cells of one round and layout share.
struct Setup<'a> {
    options: &'a Options,
    uris: &'a [String],
    server: &'a ServerProcess,
    client_rt: &'a tokio::runtime::Runtime,
    single: bool,
    has_h2load: bool,
}

impl Setup<'_> {
    /// One cell of `client` under `load`; none for h2load when it is missing or fails.
    fn cell(&self, client: &str, load: Load) -> Option<Row> {
        let probe = Probe {
            client: std::process::id(),
            server: self.server.child.id(),
            ports: self.server.ports.clone(),
            writes: if client == "balance" { Writes::None } else { Writes::Counted },
        };
        let (warmup, duration) = (self.options.warmup, self.options.duration);
        if client == "h2load" {
            if !self.has_h2load {
                return None;
            }
            // In open loop, as many streams as the largest closed-loop cell had.
            let most = self.options.concurrency.iter().max().copied().unwrap_or(256).max(4);
            let (concurrency, rate) = match load {
                Load::Closed(c) => (c, None),
                Load::Open(rate) => (most, Some(rate)),
            };
            let row = h2load(&self.uris[0], concurrency, rate, self.options, self.single, probe);
            if row.is_none() {
                eprintln!("h2load failed at concurrency {concurrency}, rate {rate:?}");
            }
            return row;
        }
        // The callers run on the runtime's workers; this future, and the probe's reads, on
        // this thread.
        Some(self.client_rt.block_on(async {
            let c = make_client(client, self.uris).await;
            match load {
                Load::Closed(concurrency) => run(c, concurrency, warmup, duration, probe).await,
                Load::Open(rate) => open_loop::run(c, rate, warmup, duration, probe).await,
            }
        }))
    }
}

/// The `channel`'s closed-loop calls/s at the largest concurrency in this round and layout,
/// for open-loop rates given as percentages: from its row if it ran, else measured now.
fn channel_capacity(rows: &[Row], round: usize, layout: &str, setup: &Setup) -> f64 {
    let most = setup.options.concurrency.iter().max().copied().unwrap_or(256);
    let ran = rows.iter().find(|r| {
        r.round == round
            && r.layout == layout
            && r.client == "channel"
            && r.offered.is_none()
            && r.concurrency == most
    });
    if let Some(row) = ran {
        return row.calls_per_sec;
    }
    let measured = setup.cell("channel", Load::Closed(most)).map(|r| r.calls_per_sec).unwrap_or(f64::NAN);
    println!("channel capacity for open-loop rates: {measured:.0} calls/s at c={most}");
    measured
}

/// `--restart`: the restart cells, every Rust client at every time down, interleaved.
fn restarts(options: &Options) {
    let client_rt = runtime(false);
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        for &down in &options.restart {
            for client in options.clients.iter().filter(|c| *c != "h2load") {
                let row = restart::run(client, down, options.restart_rate, &client_rt);
                println!(
                    "round {round}: {client:<8} down {down:?}: {} of {} calls failed, served again {:?} after the server listened, {:.1} connection attempts/s while down, p99 of the stop's second {:.0} µs",
                    row.failed, row.calls, row.back_after, row.attempts_per_sec, row.p99_stop_second_us
                );
                rows.push(row);
            }
        }
    }
    let table = restart::table(&rows);
    println!("\n{table}");
    if let Some(path) = &options.markdown {
        std::fs::write(path, &table).expect("write the Markdown file");
    }
}

fn runtime(single: bool) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if single {
        builder.worker_threads(1);
    }
    builder.enable_all().build().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let ports = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(4);
        let on =
            args.get(4).filter(|p| *p != "-").map(|p| p.split(',').filter_map(|p| p.parse().ok()).collect());
        let slow = args.get(5).and_then(|ms| ms.parse().ok()).filter(|ms| *ms > 0).map(Duration::from_millis);
        let layout = args.get(3).map(String::as_str);
        if layout == Some("pinned") {
            // Before the runtime, whose threads take this thread's CPU set.
            measure::pin_this_thread(Some(1));
        }
        return measure::serve(ports, layout != Some("multi"), on, slow);
    }
    let options = match parse() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let has_h2load = Command::new("h2load").arg("--version").output().is_ok();
    if !has_h2load && options.clients.iter().any(|c| c == "h2load") {
        eprintln!("h2load is not installed (scripts/setup-bench installs it): its rows are left out");
    }
    if !options.restart.is_empty() {
        return restarts(&options);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load =
        format!("load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("{load}");
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        for layout in &options.layouts {
            let single = layout != "multi";
            let server = ServerProcess::start_in(options.ports, layout, None, options.slow);
            let uris = server.uris();
            if layout == "pinned" {
                // Threads (the client runtime's) and processes (h2load) started from here on
                // take this thread's CPU set.
                measure::pin_this_thread(Some(0));
            }
            let client_rt = runtime(single);
            println!(
                "\n## round {round}, layout `{layout}`: {} worker thread(s) per side, {} ports\n",
                if single { "1" } else { "default" },
                uris.len()
            );
            let setup = Setup {
                options: &options,
                uris: &uris,
                server: &server,
                client_rt: &client_rt,
                single,
                has_h2load,
            };
            for client in &options.clients {
                for &concurrency in &options.concurrency {
                    if let Some(row) = setup.cell(client, Load::Closed(concurrency)) {
                        let row = Row { layout: layout.clone(), client: client.clone(), round, ..row };
                        println!("{}", report::line(&row));
                        rows.push(row);
                    }
                }
            }
            if !options.open_loop.is_empty() {
                let capacity = channel_capacity(&rows, round, layout, &setup);
                for rate in &options.open_loop {
                    for client in &options.clients {
                        if let Some(row) = setup.cell(client, Load::Open(rate.calls_per_sec(capacity))) {
                            let share = rate.share();
                            let row =
                                Row { layout: layout.clone(), client: client.clone(), round, share, ..row };
                            println!("{}", report::line(&row));
                            rows.push(row);
                        }
                    }
                }
            }
            drop(client_rt);
            drop(server);
            measure::pin_this_thread(None);
        }
    }
    let rows = report::medians(&rows);
    let markdown = format!("{load}; {} round(s), medians\n\n{}", options.rounds, report::tables(&rows));
    println!("\n{markdown}");
    if let Some(path) = &options.markdown {
        std::fs::write(path, &markdown).expect("write the Markdown file");
    }
    if let Some(path) = &options.json {
        std::fs::write(path, report::json(&rows)).expect("write the JSON file");
    }
}
