//! Deterministic simulation (issue 26): the pool, its health task and 3 to 8 tonic echo
//! servers on turmoil's simulated network and clock, with faults and a workload drawn from
//! one seed, and the pool's invariants checked on every run.
//!
//! `cargo test --all-features --test simulation` runs a batch of seeds
//! (`GRPC_POOL_SIM_SEEDS`, from `GRPC_POOL_SIM_FROM`; `GRPC_POOL_SIM_DUMP=dir` writes every
//! seed's trace there); a failing seed prints the command that replays it with its trace. `scripts/simulate` runs long batches. What runs and what
//! cannot run under simulation: `docs/development.md`, "Simulation".

#[path = "simulation/check.rs"]
mod check;
#[path = "simulation/client.rs"]
mod client;
#[path = "simulation/net.rs"]
mod net;
#[path = "simulation/plan.rs"]
mod plan;
#[path = "simulation/run.rs"]
mod run;
#[path = "simulation/server.rs"]
mod server;
#[path = "simulation/trace.rs"]
mod trace;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Seeds in the CI batch, unless `GRPC_POOL_SIM_SEEDS` says otherwise.
const CI_SEEDS: u64 = 400;
/// Threads the batch runs seeds on (each simulation runs on one thread), unless
/// `GRPC_POOL_SIM_THREADS` says otherwise.
const THREADS: u64 = 2;
/// The seeds the trace-equality test runs twice each, unless `GRPC_POOL_SIM_SEED` names one:
/// between them every kind of fault, policy and call.
const TRACE_SEEDS: &[u64] = &[26, 44, 68, 82, 97];
/// Seeds that once failed, kept as regressions: (seed, what it caught).
const REGRESSION_SEEDS: &[(u64, &str)] = &[
    (0, "deadline: a slow reader's endless stream always had data ready, and was never cut at its deadline"),
    (1, "deadline: the same, with another fault schedule"),
    (
        82,
        "statistics: a connection that ended between its handshake and its listing (every server crashed) was counted as opened, never as closed",
    ),
    (469, "every-call-ends: the health task let go of a draining member, so a call on it waited for ever once its connection went silent"),
    (1204, "every-call-ends: a call under a retry policy slept out the server's hour-long grpc-retry-pushback-ms"),
    (1472, "every-call-ends: the same, another schedule"),
    (1738, "every-call-ends: hedged calls holding every slot waited on each other for their next copies"),
    (2076, "every-call-ends: the same, another schedule"),
    (
        659,
        "every-call-ends: a PING given up on after a deadline stayed out on a dead connection, so keepalive never PINGed that draining member again and hedged calls on it waited for ever",
    ),
    (
        20705,
        "every-call-ends: the way to a server died (the way back did not) under a PING given up on after a deadline; keepalive waited for silence that never came, so a call without a deadline on that draining member waited for ever",
    ),
    (28563, "every-call-ends: the same, with a hedged server-streaming call"),
    (
        170420,
        "recovery (the check): probes waiting behind the workload's own slow calls in a saturated pool (one connection of two streams) were counted as the pool failing to recover",
    ),
];

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.trim().parse().unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

fn threads() -> u64 {
    env_u64("GRPC_POOL_SIM_THREADS").unwrap_or(THREADS).max(1)
}

fn replay_command(seed: u64) -> String {
    format!(
        "GRPC_POOL_SIM_SEED={seed} GRPC_POOL_SIM_TRACE=1 cargo test --all-features --test simulation -- replay --nocapture"
    )
}

/// Runs `seed`; its violations, or the panic that ended it.
fn violations(seed: u64) -> (Vec<String>, Option<run::Run>) {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run::run(seed))) {
        Ok(run) => (run.journal.violations(), Some(run)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned());
            (vec![format!("[panic] {message}")], None)
        }
    }
}

/// A long batch says how far it got after this many seeds.
const PROGRESS_EVERY: usize = 10_000;

/// Runs `seeds` on [`THREADS`] threads; returns the failing ones with their violations.
fn batch_of(seeds: Vec<u64>) -> Vec<(u64, Vec<String>)> {
    let next = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads() {
            std::thread::Builder::new()
                .stack_size(16 << 20)
                .spawn_scoped(scope, || loop {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(n) else { return };
                    let (violations, run) = violations(seed);
                    if let (Some(dir), Some(run)) = (std::env::var_os("GRPC_POOL_SIM_DUMP"), run) {
                        let path = std::path::Path::new(&dir).join(format!("seed-{seed}.trace"));
                        std::fs::write(&path, run.journal.render()).expect("write the trace");
                    }
                    if !violations.is_empty() {
                        // Said at once as well: a long batch tells its failures as it goes.
                        eprintln!("{}", report(&[(seed, violations.clone())]));
                        failed.lock().unwrap().push((seed, violations));
                    }
                    if (n + 1).is_multiple_of(PROGRESS_EVERY) {
                        eprintln!("simulation: {} of {} seeds run", n + 1, seeds.len());
                    }
                })
                .expect("a simulation thread");
        }
    });
    let mut failed = failed.into_inner().unwrap();
    failed.sort();
    failed
}

fn report(failed: &[(u64, Vec<String>)]) -> String {
    let mut out = String::new();
    for (seed, violations) in failed {
        out.push_str(&format!("seed {seed}:\n"));
        for violation in violations {
            out.push_str(&format!("  {violation}\n"));
        }
        out.push_str(&format!("  replay: {}\n", replay_command(*seed)));
    }
    out
}

#[test]
fn batch() {
    let from = env_u64("GRPC_POOL_SIM_FROM").unwrap_or(0);
    let count = env_u64("GRPC_POOL_SIM_SEEDS").unwrap_or(CI_SEEDS);
    let started = Instant::now();
    let failed = batch_of((from..from + count).collect());
    let took = started.elapsed();
    eprintln!(
        "simulation: {count} seeds from {from} in {took:.1?} ({:.1?} a seed on {} threads), {} failed",
        took / count.max(1) as u32,
        threads(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} of {count} seeds failed:\n{}", failed.len(), report(&failed));
}

#[test]
fn regressions() {
    let failed = batch_of(REGRESSION_SEEDS.iter().map(|(seed, _)| *seed).collect());
    assert!(failed.is_empty(), "regression seeds failed:\n{}", report(&failed));
}

/// `GRPC_POOL_SIM_SEED=N`: runs that seed alone, printing its trace with
/// `GRPC_POOL_SIM_TRACE=1`. Without it, does nothing.
#[test]
fn replay() {
    let Some(seed) = env_u64("GRPC_POOL_SIM_SEED") else {
        eprintln!("replay: set GRPC_POOL_SIM_SEED to replay a seed");
        return;
    };
    // `RUST_LOG=grpc_pool_core=debug` shows the pool's own events beside the trace.
    if std::env::var_os("RUST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::from_default_env();
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).try_init();
    }
    let (violations, run) = violations(seed);
    if std::env::var_os("GRPC_POOL_SIM_TRACE").is_some() {
        if let Some(run) = &run {
            println!("{}", run.journal.render());
        }
    }
    assert!(violations.is_empty(), "{}", report(&[(seed, violations)]));
}

/// Runs `seed` on a thread of its own, as the batch's threads do...
fn on_a_thread(seed: u64) -> run::Run {
    std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(move || run::run(seed))
        .expect("a simulation thread")
        .join()
        .expect("the run")
}

/// The same seed twice gives the same trace, line for line.
#[test]
fn same_seed_same_trace() {
    let seeds = match env_u64("GRPC_POOL_SIM_SEED") {
        Some(seed) => vec![seed],
        None => TRACE_SEEDS.to_vec(),
    };
    let runs = env_u64("GRPC_POOL_SIM_RUNS").unwrap_or(2).max(2);
    for seed in seeds {
        let first = on_a_thread(seed).journal.lines();
        for run in 2..=runs {
            let again = on_a_thread(seed).journal.lines();
            if let Some(dir) = std::env::var_os("GRPC_POOL_SIM_DUMP") {
                let path = std::path::Path::new(&dir).join(format!("seed-{seed}-run-{run}.trace"));
                std::fs::write(&path, again.join("\n")).expect("write the trace");
                let path = std::path::Path::new(&dir).join(format!("seed-{seed}-run-1.trace"));
                std::fs::write(&path, first.join("\n")).expect("write the trace");
            }
            if let Some(n) = (0..first.len().max(again.len())).find(|&n| first.get(n) != again.get(n)) {
                panic!(
                    "seed {seed}: run {run}'s trace differs from the first's from line {n} on (of {} and {}):\n first:  {:?}\n run {run}: {:?}\n{}",
                    first.len(),
                    again.len(),
                    first.get(n),
                    again.get(n),
                    replay_command(seed)
                );
            }
        }
        assert!(first.len() > 10, "seed {seed}: a trace of {} lines", first.len());
    }
}
