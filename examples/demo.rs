//! The README's first command: `cargo run --release --example demo`.
//!
//! Two embedded echo servers, a pool in front of them, a steady load of unary calls, and
//! three faults on the way: a graceful server restart (GOAWAY, then the port comes back), a
//! connection reset by a relay (as a crashed middlebox would), and a silent drop (as a NAT
//! that forgot the flow would), which keepalive PINGs find. A line per endpoint shows the
//! pool's members as they change; a summary closes the run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{BackoffConfig, EvictionReason, Keepalive, Pool, State};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{Relay, ServerOptions, TestServer};

const HELP: &str = "\
grpc-pool demo: a pool under load while servers restart and connections die.

USAGE: cargo run --release --example demo -- [OPTIONS]

OPTIONS:
  --duration SECS   how long the load runs (default 8, at least 2)
  --callers N       concurrent callers (default 64)
  --quiet           no live view, only the summary
  -h, --help        this text

Faults, at fixed points of the run:
  25%  server A shuts down gracefully (GOAWAY, in-flight calls finish) and restarts
  50%  every connection to server B is reset (TCP RST) by the relay in front of it
  75%  every connection to server B goes silent (a NAT that forgot the flow): keepalive
       PINGs (every 500 ms of quiet, 500 ms timeout) find it and the pool replaces it
";

struct Options {
    duration: Duration,
    callers: usize,
    quiet: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options { duration: Duration::from_secs(8), callers: 64, quiet: false };
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
                    .filter(|s| *s >= 2)
                    .ok_or("--duration takes a whole number of seconds, at least 2")?;
                options.duration = Duration::from_secs(secs);
            }
            "--callers" => {
                options.callers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 1 && *n <= 10_000)
                    .ok_or("--callers takes a number from 1 to 10000")?;
            }
            "--quiet" => options.quiet = true,
            other => return Err(format!("unknown option `{other}`; see --help")),
        }
    }
    Ok(options)
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    worst_micros: AtomicU64,
}

fn describe(state: &State) -> String {
    let mut line = String::new();
    for endpoint in &state.endpoints {
        let members: Vec<String> = endpoint
            .members
            .iter()
            .map(|m| format!("#{}:{}:{}/{}", m.id, m.state.as_str(), m.in_flight, m.max_streams))
            .collect();
        line.push_str(&format!(
            "  {} [{}]{}",
            endpoint.endpoint,
            members.join(" "),
            if endpoint.connecting > 0 {
                format!(" +{} connecting", endpoint.connecting)
            } else {
                String::new()
            }
        ));
    }
    line
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

    let server_a = TestServer::start().await;
    let port_a = server_a.addr().port();
    let server_b = TestServer::start().await;
    let relay_b = Relay::start(server_b.addr()).await;
    let pool = Pool::builder()
        .name("demo")
        .min_connections(1)
        .max_connections(4)
        .backoff(BackoffConfig {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            ..Default::default()
        })
        .keepalive(Keepalive::new(Duration::from_millis(500), Duration::from_millis(500)))
        .build([server_a.uri(), relay_b.uri()])
        .await
        .expect("the embedded servers are up");
    println!("pool `{}` over {} and {} (B behind a fault relay)", pool.name(), server_a.uri(), relay_b.uri());
    println!("{} callers for {:?}; --help for options\n", options.callers, options.duration);

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for i in 0..options.callers {
        let (mut client, tally, stop) = (EchoClient::new(pool.clone()), tally.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            let message = Bytes::from(format!("call from caller {i}"));
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let request = EchoRequest { message: message.clone(), repeat: 0, delay_ms: 1 };
                match client.unary_echo(request).await {
                    Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => tally.failed.fetch_add(1, Ordering::Relaxed),
                };
                tally.worst_micros.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }));
    }

    let started = Instant::now();
    let restart_at = options.duration.mul_f64(0.25);
    let reset_at = options.duration.mul_f64(0.50);
    let freeze_at = options.duration.mul_f64(0.75);
    let mut freeze_done = false;
    let mut server_a = Some(server_a);
    let mut restarted_a = None;
    let mut reset_done = false;
    let mut last_ok = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    while started.elapsed() < options.duration {
        ticker.tick().await;
        let elapsed = started.elapsed();
        if let Some(server) = server_a.take_if(|_| elapsed >= restart_at) {
            println!("-- fault: server A shuts down gracefully (GOAWAY) and restarts on port {port_a}");
            server.shutdown().await;
            restarted_a = Some(
                TestServer::start_with(ServerOptions { port: Some(port_a), ..Default::default() }).await,
            );
        }
        if !reset_done && elapsed >= reset_at {
            println!("-- fault: the relay resets every connection to server B");
            relay_b.reset();
            reset_done = true;
        }
        if !freeze_done && elapsed >= freeze_at {
            println!(
                "-- fault: every connection to server B goes silent (nothing forwarded, nothing closed)"
            );
            relay_b.freeze();
            freeze_done = true;
        }
        if !options.quiet {
            let ok = tally.ok.load(Ordering::Relaxed);
            let rate = (ok - last_ok) * 2;
            last_ok = ok;
            println!(
                "{:>5.1}s {:>7} calls/s, {} failed |{}",
                elapsed.as_secs_f64(),
                rate,
                tally.failed.load(Ordering::Relaxed),
                describe(&pool.state())
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        let _ = caller.await;
    }

    let state = pool.state();
    let stats = &state.statistics;
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    println!("\nsummary after {:.1}s", started.elapsed().as_secs_f64());
    println!("  calls ok          {ok} ({:.0}/s)", ok as f64 / started.elapsed().as_secs_f64());
    println!(
        "  calls failed      {failed} (only calls in flight on a reset or silenced connection can fail)"
    );
    println!("  worst latency     {:.1} ms", tally.worst_micros.load(Ordering::Relaxed) as f64 / 1000.0);
    println!(
        "  checkouts         {} direct, {} waited, {} timed out",
        stats.checkouts_direct, stats.checkouts_waited, stats.checkout_timeouts
    );
    println!(
        "  connections       {} opened, {} connect failures",
        stats.connections_created, stats.connect_failures
    );
    let closed: Vec<String> = EvictionReason::ALL
        .iter()
        .filter(|r| stats.closed(**r) > 0)
        .map(|r| format!("{} {}", stats.closed(*r), r.as_str()))
        .collect();
    println!("  evictions         {}", if closed.is_empty() { "none".to_owned() } else { closed.join(", ") });
    println!("  resent            {} calls (never processed by the server)", stats.retries);
    println!("  pool now         {}", describe(&state));
    pool.close().await;
    drop(restarted_a);
}
