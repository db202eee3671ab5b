//! Restart cells: each client under an open-loop load while its server stops gracefully
//! (GOAWAY on every connection, then the process exits), stays down, and starts again on the
//! same ports. What a user sees of it: calls failed, how long after the server listens again
//! calls succeed, the connection attempts made while it was down, and the p99 of the second
//! the server stopped in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool_testkit::echo::EchoRequest;
use hdrhistogram::Histogram;

use super::measure::ServerProcess;
use super::{counting, make_client};

/// One call: when it was meant to start, when it ended, whether it succeeded.
type Outcome = (Instant, Instant, bool);

/// What one restart cost a client.
pub struct RestartRow {
    pub client: String,
    pub down: Duration,
    pub rate: f64,
    pub calls: usize,
    pub failed: usize,
    /// From the server listening again to the first call that succeeded.
    pub back_after: Option<Duration>,
    /// Connection attempts while the server was down, per second of it.
    pub attempts_per_sec: f64,
    /// p99 latency (from each call's intended start) of the calls meant to start in the
    /// second after the stop began, failures included.
    pub p99_stop_second_us: f64,
}

/// How long the load runs before the stop and after the server is back.
const STEADY: Duration = Duration::from_secs(2);

/// Each call's deadline, as a service would set one.
const DEADLINE: Duration = Duration::from_secs(1);

/// One cell: `client` at `rate` calls a second over one server port; the server stops, stays
/// down for `down`, and comes back on the same port.
pub fn run(client: &str, down: Duration, rate: f64, client_rt: &tokio::runtime::Runtime) -> RestartRow {
    let server = ServerProcess::start(1, false, None);
    let ports = server.ports.clone();
    let uris = server.uris();
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let c = client_rt.block_on(make_client(client, &uris));
    let load = client_rt.spawn(offer(c, rate, stop.clone(), outcomes.clone()));
    std::thread::sleep(STEADY);
    let stop_at = Instant::now();
    server.stop();
    let down_at = Instant::now();
    let connects_down = counting::connects();
    std::thread::sleep(down);
    let attempts = counting::connects() - connects_down;
    let down_for = down_at.elapsed();
    let server = ServerProcess::start_on(1, false, Some(&ports), None);
    let listen_at = Instant::now();
    std::thread::sleep(STEADY);
    stop.store(true, Ordering::Relaxed);
    client_rt.block_on(load).expect("the load task");
    drop(server);

    let outcomes = outcomes.lock().unwrap().clone();
    let back_after = outcomes
        .iter()
        .filter(|(_, done, ok)| *ok && *done > down_at)
        .map(|(_, done, _)| done.saturating_duration_since(listen_at))
        .min();
    let mut stop_second = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
    for (intended, done, _) in &outcomes {
        if *intended >= stop_at && *intended < stop_at + Duration::from_secs(1) {
            let _ = stop_second.record(done.saturating_duration_since(*intended).as_micros() as u64);
        }
    }
    RestartRow {
        client: client.to_owned(),
        down,
        rate,
        calls: outcomes.len(),
        failed: outcomes.iter().filter(|(_, _, ok)| !ok).count(),
        back_after,
        attempts_per_sec: attempts as f64 / down_for.as_secs_f64().max(1e-3),
        p99_stop_second_us: match stop_second.is_empty() {
            true => f64::NAN,
            false => stop_second.value_at_quantile(0.99) as f64,
        },
    }
}

/// Calls started `rate` times a second until `stop`, each with a deadline of [`DEADLINE`];
/// every outcome recorded once its call ends.
async fn offer(client: super::Client, rate: f64, stop: Arc<AtomicBool>, outcomes: Arc<Mutex<Vec<Outcome>>>) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut calls = Vec::new();
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let intended = started + interval.mul_f64(next as f64);
        next += 1;
        if intended > Instant::now() {
            tokio::time::sleep_until(intended.into()).await;
        }
        let (mut client, outcomes) = (client.clone(), outcomes.clone());
        calls.push(tokio::spawn(async move {
            let request = EchoRequest { message: Bytes::from_static(&[7u8; 64]), repeat: 0, delay_ms: 0 };
            let ok = tokio::time::timeout(DEADLINE, client.call_with_deadline(request, DEADLINE))
                .await
                .is_ok_and(|r| r.is_ok());
            outcomes.lock().unwrap().push((intended, Instant::now(), ok));
        }));
        calls.retain(|c| !c.is_finished());
    }
    for call in calls {
        let _ = call.await;
    }
}

/// The restart table: one row per client and time down.
pub fn table(rows: &[RestartRow]) -> String {
    let mut out = String::from(
        "### server restarts (graceful stop, down, back on the same port)\n\n| client | down | offered calls/s | calls | failed | first call served after the server listened | connection attempts/s while down | p99 µs of the stop's second |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:?} | {:.0} | {} | {} | {} | {:.1} | {:.0} |\n",
            r.client,
            r.down,
            r.rate,
            r.calls,
            r.failed,
            r.back_after
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "never".into()),
            r.attempts_per_sec,
            r.p99_stop_second_us,
        ));
    }
    out
}
