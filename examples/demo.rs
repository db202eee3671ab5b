//! The README's first command: `cargo run --release --example demo`.
//!
//! Three embedded echo servers (with a connection age limit, as real deployments have), each
//! behind a fault relay; two clients under the same load, a plain tonic `Channel` (its
//! defaults, balanced over the three) and the pool; and a scripted series of faults, one per
//! phase: a load balancer forgetting quiet flows, a server restart, a health flip, a server's
//! PING policy, and a silent drop. A live view shows both clients and the pool's members; a
//! summary compares them, fault by fault.

#[path = "demo/chart.rs"]
mod chart;

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{BackoffConfig, CheckMode, EvictionReason, HealthCheck, Keepalive, Pool, State};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{PingEnforcer, PingPolicy, Relay, ServerOptions, TestServer};
use tokio::sync::watch;
use tonic::transport::Channel;

const HELP: &str = "\
grpc-pool demo: a plain tonic Channel and the pool, side by side, under the same load while
connections are closed, dropped and refused the ways production networks do it.

USAGE: cargo run --release --example demo -- [OPTIONS]

OPTIONS:
  --faults LIST     which faults to run, comma-separated (default: all, in this order):
                      idle     a load balancer forgets flows quiet for 1 s and answers their
                               next packet with RST; the load pauses for 1.6 s
                      restart  server 0 shuts down gracefully (GOAWAY) and is back after 1 s
                      health   server 2 reports NOT_SERVING (grpc.health.v1), and 300 ms later
                               fails its calls with UNAVAILABLE, for 40% of the phase
                      ping     server 1 enforces the gRPC C core's PING policy (PINGs at least
                               1 s apart without data, 1 strike); the load pauses for 2 s
                      drop     every connection to server 0 goes silent (a NAT that forgot
                               the flows): nothing arrives, nothing is closed
  --duration SECS   length of each phase (default 5, at least 3); a 2 s baseline comes first
  --callers N       concurrent callers per client (default 16)
  --quiet           no live view, only the summary
  --svg FILE        also draw the run: calls/s and failed calls/s of both clients over
                    time, the fault phases shaded and named (an SVG file)
  -h, --help        this text

Every call has a 1 s deadline. The servers close each connection at 10 s of age (GOAWAY).
The pool: 1 to 4 connections per endpoint, keepalive PINGs after 500 ms of quiet (500 ms
timeout), grpc.health.v1 Watch per endpoint. The Channel: tonic's defaults
(Channel::balance_list over the same three addresses).
";

/// Every call's deadline, for both clients.
const DEADLINE: Duration = Duration::from_secs(1);
const BASELINE: Duration = Duration::from_secs(2);
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(10);
/// The chart's resolution: calls are counted per quarter second.
const BUCKET: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Idle,
    Restart,
    Health,
    Ping,
    Drop,
}

impl Fault {
    /// The run order: the silent drop last, because a `Channel` never recovers from it.
    const ALL: [Fault; 5] = [Fault::Idle, Fault::Restart, Fault::Health, Fault::Ping, Fault::Drop];

    fn name(self) -> &'static str {
        match self {
            Fault::Idle => "idle",
            Fault::Restart => "restart",
            Fault::Health => "health",
            Fault::Ping => "ping",
            Fault::Drop => "drop",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Fault::Idle => "a load balancer forgets quiet flows (RST on their next packet)",
            Fault::Restart => "server 0 restarts (graceful shutdown, back after 1 s)",
            Fault::Health => "server 2 reports NOT_SERVING, then fails its calls",
            Fault::Ping => "server 1 enforces a PING policy (too_many_pings)",
            Fault::Drop => "connections to server 0 go silent",
        }
    }
}

struct Options {
    phase: Duration,
    faults: Vec<Fault>,
    callers: usize,
    quiet: bool,
    svg: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        phase: Duration::from_secs(5),
        faults: Fault::ALL.to_vec(),
        callers: 16,
        quiet: false,
        svg: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--duration" => {
                let secs: u64 = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|s| (3..=600).contains(s))
                    .ok_or("--duration takes a whole number of seconds from 3 to 600")?;
                options.phase = Duration::from_secs(secs);
            }
            "--callers" => {
                options.callers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (1..=1_000).contains(n))
                    .ok_or("--callers takes a number from 1 to 1000")?;
            }
            "--faults" => {
                let list = args.next().ok_or("--faults takes a list, e.g. idle,drop")?;
                let mut chosen = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let fault = Fault::ALL.iter().find(|f| f.name() == name).ok_or_else(|| {
                        format!("unknown fault `{name}`; the faults are idle, restart, health, ping, drop")
                    })?;
                    chosen.push(*fault);
                }
                options.faults = Fault::ALL.into_iter().filter(|f| chosen.contains(f)).collect();
            }
            "--quiet" => options.quiet = true,
            "--svg" => {
                options.svg = Some(args.next().ok_or("--svg takes a file name, e.g. demo.svg")?.into())
            }
            other => return Err(format!("unknown option `{other}`; see --help")),
        }
    }
    Ok(options)
}

/// One client's calls in one phase.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    worst_micros: AtomicU64,
    /// When the phase's last failed call ended, in ms since the run started (0: none).
    last_failure_ms: AtomicU64,
    /// What the phase's first failed call said.
    first_error: std::sync::Mutex<Option<String>>,
    /// Calls that succeeded since the last one failed.
    ok_since_failure: AtomicU64,
}

/// What the callers need: where to count, and whether to call at all right now.
struct Load {
    started: Instant,
    phase: AtomicUsize,
    /// Per phase, per client (0: channel, 1: pool).
    tallies: Vec<[Tally; 2]>,
    /// Per `BUCKET` of the run, per client: calls and failed calls ended in it (the chart).
    buckets: Vec<[[AtomicU64; 2]; 2]>,
    paused: watch::Receiver<bool>,
    stopped: watch::Receiver<bool>,
}

/// Calls in a loop on one client until the run stops; pauses while the load is paused.
async fn caller(load: Arc<Load>, client: usize, mut echo: Client, n: usize) {
    let message = Bytes::from(format!("call from caller {n}"));
    let (mut paused, stopped) = (load.paused.clone(), load.stopped.clone());
    while !*stopped.borrow() {
        if *paused.borrow() {
            let _ = paused.changed().await;
            continue;
        }
        let request = EchoRequest { message: message.clone(), repeat: 0, delay_ms: 1 };
        let started = Instant::now();
        let error = match tokio::time::timeout(DEADLINE, echo.call(request)).await {
            Ok(Ok(())) => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("no answer within the {DEADLINE:?} deadline")),
        };
        let tally = &load.tallies[load.phase.load(Ordering::Relaxed)][client];
        tally.calls.fetch_add(1, Ordering::Relaxed);
        tally.worst_micros.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let bucket = (load.started.elapsed().as_millis() / BUCKET.as_millis()) as usize;
        if let Some(counts) = load.buckets.get(bucket) {
            counts[client][0].fetch_add(1, Ordering::Relaxed);
            counts[client][1].fetch_add(u64::from(error.is_some()), Ordering::Relaxed);
        }
        if let Some(error) = error {
            tally.ok_since_failure.store(0, Ordering::Relaxed);
            tally.failed.fetch_add(1, Ordering::Relaxed);
            tally.last_failure_ms.fetch_max(load.started.elapsed().as_millis() as u64, Ordering::Relaxed);
            tally.first_error.lock().unwrap().get_or_insert(error);
        } else {
            tally.ok_since_failure.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One of the two clients.
enum Client {
    Channel(EchoClient<Channel>),
    Pool(EchoClient<Pool>),
}

impl Client {
    async fn call(&mut self, request: EchoRequest) -> Result<(), tonic::Status> {
        match self {
            Client::Channel(c) => c.unary_echo(request).await.map(drop),
            Client::Pool(c) => c.unary_echo(request).await.map(drop),
        }
    }
}

/// The servers and what stands in front of them.
struct World {
    servers: [Option<TestServer>; 3],
    ports: [u16; 3],
    relays: [Relay; 3],
    enforcer: PingEnforcer,
}

fn server_options(port: Option<u16>) -> ServerOptions {
    ServerOptions { port, health: true, max_connection_age: Some(MAX_CONNECTION_AGE), ..Default::default() }
}

impl World {
    async fn start() -> World {
        let servers = [
            TestServer::start_with(server_options(None)).await,
            TestServer::start_with(server_options(None)).await,
            TestServer::start_with(server_options(None)).await,
        ];
        let ports = [servers[0].addr().port(), servers[1].addr().port(), servers[2].addr().port()];
        // Server 1's PING policy sits between its relay and it; off until the ping phase.
        let enforcer = PingEnforcer::start(
            servers[1].addr(),
            PingPolicy { min_interval: Duration::from_secs(1), max_strikes: 1 },
        )
        .await;
        enforcer.set_enforcing(false);
        let relays = [
            Relay::start(servers[0].addr()).await,
            Relay::start(enforcer.addr()).await,
            Relay::start(servers[2].addr()).await,
        ];
        let [a, b, c] = servers;
        World { servers: [Some(a), Some(b), Some(c)], ports, relays, enforcer }
    }

    fn uris(&self) -> Vec<String> {
        self.relays.iter().map(|r| r.uri()).collect()
    }

    fn server(&self, i: usize) -> &TestServer {
        self.servers[i].as_ref().expect("the server is up")
    }
}

/// Runs one fault's script, which ends before its phase does; notes in `struck` when the
/// fault struck (recovery is timed from there).
async fn inject(
    fault: Fault,
    world: &mut World,
    pause: &watch::Sender<bool>,
    start: Instant,
    phase: Duration,
    struck: &Cell<Option<Instant>>,
) {
    let at = |fraction: f64| start + phase.mul_f64(fraction);
    let strike = || struck.set(Some(Instant::now()));
    match fault {
        Fault::Idle => {
            tokio::time::sleep_until(at(0.1).into()).await;
            for relay in &world.relays {
                relay.set_idle_expiry(Some(Duration::from_secs(1)));
            }
            let _ = pause.send(true);
            tokio::time::sleep(Duration::from_millis(1_600)).await;
            let _ = pause.send(false);
            strike();
        }
        Fault::Restart => {
            tokio::time::sleep_until(at(0.3).into()).await;
            strike();
            if let Some(server) = world.servers[0].take() {
                server.shutdown().await;
            }
            tokio::time::sleep_until((at(0.3) + Duration::from_secs(1)).into()).await;
            world.servers[0] = Some(TestServer::start_with(server_options(Some(world.ports[0]))).await);
        }
        Fault::Health => {
            // A server going into maintenance the way it should: it says so first, then stops
            // taking calls; after a while it is back.
            tokio::time::sleep_until(at(0.3).into()).await;
            strike();
            world.server(2).set_serving(false).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            world.server(2).set_unavailable(true);
            tokio::time::sleep_until(at(0.7).into()).await;
            world.server(2).set_unavailable(false);
            world.server(2).set_serving(true).await;
        }
        Fault::Ping => {
            tokio::time::sleep_until(at(0.1).into()).await;
            world.enforcer.set_enforcing(true);
            let _ = pause.send(true);
            strike();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = pause.send(false);
        }
        Fault::Drop => {
            tokio::time::sleep_until(at(0.3).into()).await;
            strike();
            world.relays[0].freeze();
        }
    }
}

/// Puts things back at the end of a phase (the silent drop stays: it is the last phase).
fn heal(fault: Fault, world: &World, pause: &watch::Sender<bool>) {
    let _ = pause.send(false);
    match fault {
        Fault::Idle => {
            for relay in &world.relays {
                relay.set_idle_expiry(None);
            }
        }
        Fault::Ping => world.enforcer.set_enforcing(false),
        Fault::Restart | Fault::Health | Fault::Drop => {}
    }
}

/// Whether a client that last failed `since` before its phase ended was back to normal by
/// then: at least half its baseline rate of good calls since. A client whose calls hang
/// until their deadline fails them in waves, a deadline apart; between the waves it is not
/// failing, but it is not working either.
fn back_to_normal(tally: &Tally, baseline_rate: f64, since: Duration) -> bool {
    let ok = tally.ok_since_failure.load(Ordering::Relaxed) as f64;
    since >= Duration::from_millis(200) && ok >= 0.5 * baseline_rate * since.as_secs_f64()
}

/// One row of the summary.
struct Row {
    name: &'static str,
    what: &'static str,
    /// Per client: calls, failed, worst latency, time to recover.
    clients: [(u64, u64, Duration, Recovery); 2],
    /// Per client: the first failed call's error.
    first_errors: [Option<String>; 2],
}

enum Recovery {
    NothingFailed,
    After(Duration),
    NotWithinPhase,
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recovery::NothingFailed => f.pad("-"),
            Recovery::After(d) => f.pad(&format!("{:.1} s", d.as_secs_f64())),
            Recovery::NotWithinPhase => f.pad("not by phase end"),
        }
    }
}

/// The live view: a block redrawn in place on a terminal, a plain line a second otherwise.
struct View {
    terminal: bool,
    quiet: bool,
    drawn_lines: usize,
    last_plain: Option<Instant>,
    last_counts: [u64; 2],
    last_at: Instant,
}

impl View {
    fn show(&mut self, load: &Load, label: &str, state: &State, names: &[String]) {
        if self.quiet {
            return;
        }
        let phase = load.phase.load(Ordering::Relaxed);
        let counts =
            [0, 1].map(|c| load.tallies.iter().map(|t| t[c].calls.load(Ordering::Relaxed)).sum::<u64>());
        let failed = [0, 1].map(|c| load.tallies[phase][c].failed.load(Ordering::Relaxed));
        let elapsed = self.last_at.elapsed().as_secs_f64().max(0.001);
        let rates = [0, 1].map(|c| (counts[c] - self.last_counts[c]) as f64 / elapsed);
        let now = load.started.elapsed().as_secs_f64();
        if !self.terminal {
            if self.last_plain.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            self.last_plain = Some(Instant::now());
            self.last_counts = counts;
            self.last_at = Instant::now();
            let members: Vec<String> = state
                .endpoints
                .iter()
                .zip(names)
                .enumerate()
                .map(|(i, (e, _))| {
                    format!("s{i} {}{}", e.members.len(), if e.healthy { "" } else { " unhealthy" })
                })
                .collect();
            println!(
                "{now:>5.1}s channel {:>6.0}/s {:>4} failed | pool {:>6.0}/s {:>4} failed | members {}",
                rates[0],
                failed[0],
                rates[1],
                failed[1],
                members.join(", ")
            );
            return;
        }
        self.last_counts = counts;
        self.last_at = Instant::now();
        let mut lines = vec![
            format!("\x1b[1m{now:>5.1}s  {label}\x1b[0m"),
            format!("  {:<8} {:>9} {:>8} {:>8}", "client", "calls/s", "failed", "worst"),
        ];
        for (c, name) in ["channel", "pool"].iter().enumerate() {
            let worst = load.tallies[phase][c].worst_micros.load(Ordering::Relaxed) as f64 / 1000.0;
            let colour = if failed[c] > 0 { "\x1b[31m" } else { "\x1b[32m" };
            lines.push(format!(
                "  {name:<8} {:>9.0} {colour}{:>8}\x1b[0m {:>6.1}ms",
                rates[c], failed[c], worst
            ));
        }
        lines.push("  pool members (id:state:streams):".to_owned());
        for (endpoint, name) in state.endpoints.iter().zip(names) {
            let members: Vec<String> = endpoint
                .members
                .iter()
                .map(|m| format!("#{}:{}:{}", m.id, m.state.as_str(), m.in_flight))
                .collect();
            let health =
                if endpoint.healthy { "\x1b[32mhealthy\x1b[0m  " } else { "\x1b[31munhealthy\x1b[0m" };
            let connecting = if endpoint.connecting > 0 {
                format!(" +{} connecting", endpoint.connecting)
            } else {
                String::new()
            };
            lines.push(format!("    {name} {health} {}{connecting}", members.join(" ")));
        }
        let mut out = std::io::stdout().lock();
        if self.drawn_lines > 0 {
            let _ = write!(out, "\x1b[{}A\x1b[J", self.drawn_lines);
        }
        for line in &lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        self.drawn_lines = lines.len();
    }

    /// Leaves what is drawn on screen and starts a fresh block below it.
    fn keep(&mut self) {
        self.drawn_lines = 0;
    }
}

#[tokio::main]
async fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let mut world = World::start().await;
    let uris = world.uris();
    let names: Vec<String> =
        (0..3).map(|i| format!("server {i} ({})", uris[i].trim_start_matches("http://"))).collect();

    let pool = Pool::builder()
        .name("demo")
        .min_connections(1)
        .max_connections(4)
        // The defaults (keepalive 20 s / 10 s on connections carrying calls; idle ones
        // PINGed before use after 30 s of quiet), scaled down 40x to fit phases of seconds.
        .keepalive(Some(Keepalive::new(Duration::from_millis(500), Duration::from_millis(250))))
        .ping_before_use(Some(Duration::from_millis(750)))
        .health_checks(Some({
            let mut v = HealthCheck::default();
            v.mode = CheckMode::Watch;
            v.interval = Duration::from_millis(500);
            v
        }))
        .backoff({
            let mut v = BackoffConfig::default();
            v.base = Duration::from_millis(100);
            v.max = Duration::from_secs(2);
            v
        })
        .build(uris.clone())
        .await
        .expect("the embedded servers are up");
    let channel = Channel::balance_list(
        uris.iter().map(|u| tonic::transport::Endpoint::from_shared(u.clone()).expect("a valid URI")),
    );

    let phases: Vec<Option<Fault>> =
        std::iter::once(None).chain(options.faults.iter().copied().map(Some)).collect();
    let (pause, paused) = watch::channel(false);
    let (stop, stopped) = watch::channel(false);
    let load = Arc::new(Load {
        started: Instant::now(),
        phase: AtomicUsize::new(0),
        tallies: phases.iter().map(|_| Default::default()).collect(),
        buckets: {
            let run = BASELINE + options.phase * options.faults.len() as u32;
            (0..=run.as_millis() / BUCKET.as_millis() + 8).map(|_| Default::default()).collect()
        },
        paused,
        stopped,
    });
    let mut callers = tokio::task::JoinSet::new();
    for n in 0..options.callers {
        callers.spawn(caller(load.clone(), 0, Client::Channel(EchoClient::new(channel.clone())), n));
        callers.spawn(caller(load.clone(), 1, Client::Pool(EchoClient::new(pool.clone())), n));
    }
    let terminal = std::io::stdout().is_terminal();
    println!(
        "grpc-pool demo: {} callers per client, {} phases of {:?} after a {BASELINE:?} baseline; --help explains\n",
        options.callers,
        options.faults.len(),
        options.phase
    );
    let mut view = View {
        terminal,
        quiet: options.quiet,
        drawn_lines: 0,
        last_plain: None,
        last_counts: [0, 0],
        last_at: Instant::now(),
    };

    let mut rows: Vec<Row> = Vec::new();
    let mut drawn_phases: Vec<chart::Phase> = Vec::new();
    let mut baseline_rates = [0.0; 2];
    for (index, fault) in phases.iter().enumerate() {
        let phase_start = Instant::now();
        let length = if fault.is_some() { options.phase } else { BASELINE };
        let phase_end = phase_start + length;
        load.phase.store(index, Ordering::Relaxed);
        let label = match fault {
            Some(f) => format!("phase {index}/{}: {} - {}", phases.len() - 1, f.name(), f.what()),
            None => "baseline: steady load, no fault".to_owned(),
        };
        if !options.quiet && !terminal {
            println!("-- {label}");
        }
        // The script runs beside the view, polled here: it borrows the world.
        let struck = Cell::new(None);
        let mut script = fault.map(|f| Box::pin(inject(f, &mut world, &pause, phase_start, length, &struck)));
        let mut script_done = script.is_none();
        let mut ticks = tokio::time::interval(Duration::from_millis(250));
        while Instant::now() < phase_end {
            tokio::select! {
                _ = async { script.as_mut().expect("a script").await }, if !script_done => script_done = true,
                _ = ticks.tick() => view.show(&load, &label, &pool.state(), &names),
            }
        }
        drop(script);
        view.keep();
        drawn_phases.push(chart::Phase {
            from: phase_start.saturating_duration_since(load.started).as_secs_f64(),
            to: load.started.elapsed().as_secs_f64(),
            name: fault.map(|f| f.name()).unwrap_or("baseline"),
        });
        if let Some(f) = fault {
            heal(*f, &world, &pause);
        }
        let struck = struck.get().unwrap_or(phase_start);
        let clients = [0, 1].map(|c| {
            let tally = &load.tallies[index][c];
            let failed = tally.failed.load(Ordering::Relaxed);
            let last_failure =
                load.started + Duration::from_millis(tally.last_failure_ms.load(Ordering::Relaxed));
            let recovery = if failed == 0 {
                Recovery::NothingFailed
            } else if !back_to_normal(
                tally,
                baseline_rates[c],
                phase_end.saturating_duration_since(last_failure),
            ) {
                Recovery::NotWithinPhase
            } else {
                Recovery::After(last_failure.saturating_duration_since(struck))
            };
            (
                tally.calls.load(Ordering::Relaxed),
                failed,
                Duration::from_micros(tally.worst_micros.load(Ordering::Relaxed)),
                recovery,
            )
        });
        if fault.is_none() {
            baseline_rates = [0, 1].map(|c| clients[c].0 as f64 / BASELINE.as_secs_f64());
        }
        rows.push(Row {
            name: fault.map(|f| f.name()).unwrap_or("baseline"),
            what: fault.map(|f| f.what()).unwrap_or("steady load"),
            clients,
            first_errors: [0, 1].map(|c| load.tallies[index][c].first_error.lock().unwrap().clone()),
        });
    }
    let _ = stop.send(true);
    let _ = pause.send(false);
    while callers.join_next().await.is_some() {}

    println!("\nsummary: the same load through each client; every call has a {DEADLINE:?} deadline\n");
    println!(
        "{:<9} {:<8} {:>9} {:>8} {:>10} {:>17}   fault",
        "phase", "client", "calls", "failed", "worst", "recovered after"
    );
    for row in &rows {
        for (c, name) in ["channel", "pool"].iter().enumerate() {
            let (calls, failed, worst, recovery) = &row.clients[c];
            println!(
                "{:<9} {name:<8} {calls:>9} {failed:>8} {:>8.1}ms {recovery:>17}   {}",
                if c == 0 { row.name } else { "" },
                worst.as_secs_f64() * 1000.0,
                if c == 0 { row.what } else { "" },
            );
        }
    }
    let total = |c: usize| rows.iter().map(|r| r.clients[c].1).sum::<u64>();
    println!("\nfailed calls in all: channel {}, pool {}", total(0), total(1));
    println!("\nfirst failure of each client in each phase:");
    for row in &rows {
        for (c, name) in ["channel", "pool"].iter().enumerate() {
            if let Some(error) = &row.first_errors[c] {
                let short: String = error.chars().take(150).collect();
                println!("  {:<8} {name:<8} {short}", row.name);
            }
        }
    }
    println!(
        "  (both clients also meet each server's age limit: a GOAWAY per connection every {}s)",
        MAX_CONNECTION_AGE.as_secs()
    );

    let state = pool.state();
    let stats = &state.statistics;
    let closed: Vec<String> = EvictionReason::ALL
        .iter()
        .filter(|r| stats.closed(**r) > 0)
        .map(|r| format!("{} {}", stats.closed(*r), r.as_str()))
        .collect();
    println!(
        "pool: {} connections opened, {} connect failures; closed: {}; {} calls resent (never processed); \
         {} too_many_pings GOAWAYs",
        stats.connections_created,
        stats.connect_failures,
        if closed.is_empty() { "none".to_owned() } else { closed.join(", ") },
        stats.retries,
        world.enforcer.goaways(),
    );
    println!(
        "the pool's failures are calls in flight on a connection that then went silent or was cut: \
         the server may have run them, so they are not resent"
    );
    if let Some(path) = &options.svg {
        let length = drawn_phases.last().map_or(0.0, |p| p.to);
        // Whole buckets only: the last, cut short by the end, would read as a fall.
        let buckets = ((length / BUCKET.as_secs_f64()).floor() as usize).min(load.buckets.len());
        let per_second = |client: usize, what: usize| -> Vec<f64> {
            load.buckets[..buckets]
                .iter()
                .map(|b| b[client][what].load(Ordering::Relaxed) as f64 / BUCKET.as_secs_f64())
                .collect()
        };
        let series = [
            chart::Series {
                name: "tonic Channel",
                colour: "#d95f02",
                calls: per_second(0, 0),
                failed: per_second(0, 1),
            },
            chart::Series {
                name: "grpc-pool",
                colour: "#1b9e77",
                calls: per_second(1, 0),
                failed: per_second(1, 1),
            },
        ];
        let title = format!(
            "grpc-pool demo: {} callers per client, {DEADLINE:?} deadlines, one fault per phase",
            options.callers
        );
        let svg = chart::render(BUCKET.as_secs_f64(), length, &drawn_phases, &series, &title);
        match std::fs::write(path, svg) {
            Ok(()) => println!("the run's chart: {}", path.display()),
            Err(e) => eprintln!("error: writing {}: {e}", path.display()),
        }
    }
    pool.close().await;
}
