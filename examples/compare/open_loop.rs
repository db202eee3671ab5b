//! Open-loop cells: calls started at a fixed rate whether or not the earlier ones have
//! returned, as a service's callers arrive, so that queueing shows in the latency. Each call's
//! latency runs from when it was meant to start, not from when it did: a client (or a load
//! generator) that falls behind its schedule would otherwise hide the wait it made the later
//! calls take ("coordinated omission").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool_testkit::echo::EchoRequest;
use hdrhistogram::Histogram;

use super::measure::{per_call, Probe};
use super::report::Row;
use super::Client;

/// Calls in flight beyond which a cell stops starting calls and counts the ones it skips as
/// errors: a client that cannot carry the rate would otherwise queue without bound.
const MOST_IN_FLIGHT: usize = 20_000;

/// How long the calls started in the window may take to finish after it: their latencies are
/// the tail this mode is for, so the cell waits for them (up to this) before it reports.
const DRAIN: Duration = Duration::from_secs(10);

/// What the calls started in the measured window add up to.
struct Tally {
    histogram: Mutex<Histogram<u64>>,
    calls: AtomicU64,
    errors: AtomicU64,
}

/// One cell: calls started `rate` times a second; after `warmup`, the calls meant to start in a
/// window of `duration` are measured (latency from their intended start), with the probe read
/// at the window's ends. CPU per call divides by the calls meant to start in the window.
pub async fn run(client: Client, rate: f64, warmup: Duration, duration: Duration, probe: Probe) -> Row {
    let tally = Arc::new(Tally {
        histogram: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()),
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let in_flight = Arc::new(AtomicUsize::new(0));
    let payload = Bytes::from(vec![7u8; 64]);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let window_start = started + warmup;
    let window_end = window_start + duration;
    // The schedule is kept by a thread of its own, which sleeps to each call's start and
    // spawns the call onto the runtime: tokio's timers tick by the millisecond, which would
    // start the calls of each millisecond together and add up to a millisecond to each.
    let handle = tokio::runtime::Handle::current();
    let dispatch = {
        let (tally, in_flight) = (tally.clone(), in_flight.clone());
        std::thread::spawn(move || {
            let (mut before, mut skipped, mut measured_starts) = (None, 0u64, 0u64);
            let mut next = 0u64;
            loop {
                let intended = started + interval.mul_f64(next as f64);
                if intended >= window_end {
                    break;
                }
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                if before.is_none() && intended >= window_start {
                    before = Some(probe.start());
                }
                next += 1;
                let measured = intended >= window_start;
                measured_starts += u64::from(measured);
                if in_flight.load(Ordering::Relaxed) >= MOST_IN_FLIGHT {
                    skipped += u64::from(measured);
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (mut client, tally, in_flight, payload) =
                    (client.clone(), tally.clone(), in_flight.clone(), payload.clone());
                handle.spawn(async move {
                    let result = client.call(EchoRequest { message: payload, repeat: 0, delay_ms: 0 }).await;
                    let latency = intended.elapsed();
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    if measured {
                        tally.calls.fetch_add(1, Ordering::Relaxed);
                        if result.is_err() {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = tally.histogram.lock().unwrap().record(latency.as_micros() as u64);
                    }
                });
            }
            let after = probe.end();
            (before.unwrap_or(after), after, skipped, measured_starts)
        })
    };
    let (before, after, skipped, measured_starts) =
        tokio::task::spawn_blocking(move || dispatch.join().expect("the dispatching thread")).await.unwrap();
    // The calls started in the window finish (or are given up on) before the figures are read.
    let drained = Instant::now() + DRAIN;
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let finished = tally.calls.load(Ordering::Relaxed);
    let unfinished = measured_starts.saturating_sub(finished + skipped);
    let histogram = tally.histogram.lock().unwrap().clone();
    let quantile = |q: f64| match histogram.is_empty() {
        true => f64::NAN,
        false => histogram.value_at_quantile(q) as f64,
    };
    Row {
        round: 0,
        share: None,
        layout: String::new(),
        client: String::new(),
        concurrency: 0,
        offered: Some(rate),
        calls_per_sec: finished as f64 / duration.as_secs_f64(),
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
        p999_us: quantile(0.999),
        errors: tally.errors.load(Ordering::Relaxed) + skipped + unfinished,
        starved: 0,
        per: per_call(before, after, measured_starts as f64),
    }
}
