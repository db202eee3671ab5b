//! What one seed runs: the servers, the pool's settings, the faults and the workload, all
//! drawn from the seed (and nothing else) before the simulation starts.

use std::time::Duration;

use fastrand::Rng;

/// The simulation's tick: turmoil moves every host's clock and the network by this much a
/// step. A call with a deadline must end by its deadline plus one tick.
pub const TICK: Duration = Duration::from_millis(1);

/// Workload calls start before this.
pub const WORKLOAD_END: Duration = Duration::from_secs(6);
/// Every fault is healed by then (partitions repaired, held packets released, crashed or
/// shut-down servers restarted, health SERVING, servers fast and available, latency back,
/// every server listed again); the recovery check starts there.
pub const HEAL_AT: Duration = Duration::from_secs(7);
/// A run whose client has not finished by then fails the "every call ends" check.
pub const HORIZON: Duration = Duration::from_secs(90);

/// The pool's keepalive: PINGs after this much quiet (every member, idle ones too) ...
pub const KEEPALIVE_TIME: Duration = Duration::from_millis(1000);
/// ... answered within this, or the member is killed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(500);
/// Reconnect backoff: 100 ms, x1.6, +/-20%, at most 1 s before jitter.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
pub const BACKOFF_JITTER: f64 = 0.2;
/// Longest a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a call waits for a stream slot.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// Health checks (when a seed has them): Watch, rechecked this often while unhealthy, ...
pub const HEALTH_UNHEALTHY_INTERVAL: Duration = Duration::from_millis(200);
/// ... each check given this long.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(300);

/// After every fault heals, some call succeeds within this: a connection that died under a
/// partition is found by keepalive (time + timeout, on the health task's 50 ms grid), the
/// endpoint's next connect comes within one backoff step (the cap with jitter, 1.2 s), and
/// an endpoint marked unhealthy is checked again within the unhealthy interval plus a
/// check's timeout. Plus 100 ms for the grid, round trips and the probe's own call.
pub const RECOVERY_BOUND: Duration = KEEPALIVE_TIME
    .saturating_add(KEEPALIVE_TIMEOUT)
    .saturating_add(Duration::from_millis(1200))
    .saturating_add(HEALTH_UNHEALTHY_INTERVAL)
    .saturating_add(HEALTH_TIMEOUT)
    .saturating_add(Duration::from_millis(100));

/// Probe calls after the heal: each waits for ready, with this deadline.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(500);
/// Probe call ids start here.
pub const PROBE_IDS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    None,
    Retry { max_attempts: u32 },
    Hedge { max_attempts: u32, delay_ms: u32 },
}

impl Policy {
    /// Handler runs allowed per call: one, or the policy's attempts (gRPC caps them at 5).
    pub fn runs_allowed(self) -> usize {
        match self {
            Policy::None => 1,
            Policy::Retry { max_attempts } | Policy::Hedge { max_attempts, .. } => {
                max_attempts.min(5) as usize
            }
        }
    }

    /// The service config JSON for it.
    pub fn service_config(self) -> Option<String> {
        let name = r#""name": [{"service": "echo.Echo"}]"#;
        match self {
            Policy::None => None,
            Policy::Retry { max_attempts } => Some(format!(
                r#"{{"methodConfig": [{{{name}, "retryPolicy": {{"maxAttempts": {max_attempts}, "initialBackoff": "0.05s", "maxBackoff": "0.3s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}}}]}}"#
            )),
            Policy::Hedge { max_attempts, delay_ms } => Some(format!(
                r#"{{"methodConfig": [{{{name}, "hedgingPolicy": {{"maxAttempts": {max_attempts}, "hedgingDelay": "{}s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}}}]}}"#,
                f64::from(delay_ms) / 1000.0
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolPlan {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub health_checks: bool,
    pub policy: Policy,
    /// `Balance::PEAK_EWMA` instead of least loaded: every other seed, drawn from the seed
    /// itself so that the rest of each seed's plan is what it was before the choice existed.
    pub latency_aware: bool,
    /// Subsetting, on a third of the seeds (from the seed itself, as `latency_aware`): a
    /// subset of one server fewer than the seed has, for client number `seed % 5`, with
    /// `SUBSET_REPLACE_AFTER`.
    pub subset: Option<usize>,
    /// `max_total_connections`, on a quarter of the seeds (from the seed itself): half the
    /// servers, and one more.
    pub max_total_connections: Option<usize>,
    /// `Pool::set_max_requests`, on a fifth of the seeds (from the seed itself): 3 calls in
    /// flight, so that the workload meets the cap.
    pub max_requests: Option<u32>,
    /// Outlier detection, on two sevenths of the seeds (from the seed itself): 3 failures in
    /// a row, or gRFC A50's failure percentage over 100 ms intervals; ejections of 300 ms to
    /// 1 s, at most half the endpoints.
    pub outliers: Option<Outliers>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outliers {
    InARow,
    FailurePercentage,
}

/// Most endpoints ejected at once, in percent, on the seeds with outlier detection.
pub const MAX_EJECTION_PERCENT: u32 = 50;

/// With subsetting, a live endpoint unable to take calls this long gives its place away.
pub const SUBSET_REPLACE_AFTER: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Both ways: every segment between the client and the server is dropped.
    Partition,
    /// Client to server only.
    PartitionToServer,
    /// Server to client only.
    PartitionToClient,
    /// Segments held (neither delivered nor dropped) until the heal releases them.
    Hold,
    /// The host crashes (its sockets close) and restarts at the heal.
    Crash,
    /// Graceful shutdown (GOAWAY, calls in flight finish); restarted at the heal.
    Shutdown,
    /// grpc.health.v1 NOT_SERVING, SERVING again at the heal.
    NotServing,
    /// Every call ends UNAVAILABLE, with `grpc-retry-pushback-ms` when non-zero.
    Unavailable { pushback_ms: u64 },
    /// Handlers take this much longer.
    Slow { ms: u32 },
    /// The link's latency goes up to this.
    Latency { ms: u64 },
}

#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub server: usize,
    pub fault: Fault,
    pub from: Duration,
    pub until: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Unary,
    /// `repeat` messages, `delay_ms` apart; `u32::MAX` with no delay streams without pause.
    Stream {
        repeat: u32,
    },
}

#[derive(Debug, Clone)]
pub struct CallPlan {
    pub id: u64,
    pub at: Duration,
    pub shape: Shape,
    /// The server's delay (before the answer, or before each message).
    pub delay_ms: u32,
    pub deadline: Option<Duration>,
    /// `Some`: the `WaitForReady` extension; `None`: the pool's default (fail fast).
    pub wait_for_ready: Option<bool>,
    /// The caller drops the call (future or body) this long after it started.
    pub drop_after: Option<Duration>,
    /// Bytes in the request's message, echoed in every response message.
    pub size: usize,
    /// The caller waits this long after each message it reads (a slow reader: the
    /// response body then always has data ready).
    pub read_pause: Option<Duration>,
}

/// The message size of streams without pause: big messages keep the number of frames,
/// and so the simulation's cost, down while the server keeps data ready.
pub const ENDLESS_MESSAGE: usize = 32 << 10;

/// An endpoint set change, at a time: insert (true) or remove server `index`.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub at: Duration,
    pub server: usize,
    pub insert: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub servers: usize,
    /// Servers in the pool from the start; the others come through discovery.
    pub initial: Vec<usize>,
    pub latency: Duration,
    pub pool: PoolPlan,
    pub faults: Vec<FaultPlan>,
    pub discovery: Vec<Discovery>,
    pub calls: Vec<CallPlan>,
}

pub fn server_name(index: usize) -> String {
    format!("server-{}", index + 1)
}

pub fn server_uri(index: usize) -> String {
    format!("http://{}:{}", server_name(index), super::server::PORT)
}

fn millis(rng: &mut Rng, range: std::ops::RangeInclusive<u64>) -> Duration {
    Duration::from_millis(rng.u64(range))
}

impl Plan {
    pub fn draw(seed: u64) -> Plan {
        let mut rng = Rng::with_seed(seed);
        let servers = rng.usize(3..=8);
        let policy = match rng.u32(0..8) {
            0..=3 => Policy::None,
            4 | 5 => Policy::Retry { max_attempts: rng.u32(2..=7) },
            _ => Policy::Hedge { max_attempts: rng.u32(2..=6), delay_ms: rng.u32(20..=300) },
        };
        let pool = PoolPlan {
            max_connections: [1, 2, 4][rng.usize(0..3)],
            max_concurrent_streams: [2, 8, 100][rng.usize(0..3)],
            health_checks: rng.bool(),
            policy,
            latency_aware: seed % 2 == 1,
            subset: seed.is_multiple_of(3).then_some(servers - 1),
            max_total_connections: (seed % 4 == 1).then_some(servers / 2 + 1),
            max_requests: (seed % 5 == 3).then_some(3),
            outliers: match seed % 7 {
                2 => Some(Outliers::InARow),
                5 => Some(Outliers::FailurePercentage),
                _ => None,
            },
        };

        // An outage of every server, from a moment until the heal (a third of the seeds):
        // the recovery check then measures a real recovery.
        let outage = (rng.u32(0..3) == 0).then(|| {
            let fault = match rng.u32(0..6) {
                0 => Fault::Partition,
                1 => Fault::Hold,
                2 => Fault::Crash,
                3 => Fault::Shutdown,
                4 => Fault::NotServing,
                _ => Fault::Unavailable { pushback_ms: 0 },
            };
            (fault, millis(&mut rng, 4000..=6500))
        });
        let faults_end = outage.map_or(HEAL_AT, |(_, from)| from);

        // Faults: at most one at a time per server.
        let mut faults = Vec::new();
        let mut order: Vec<usize> = (0..servers).collect();
        rng.shuffle(&mut order);
        let count = rng.usize(0..=servers.min(5));
        for &server in order.iter().take(count) {
            let fault = match rng.u32(0..10) {
                0 => Fault::Partition,
                1 => [Fault::PartitionToServer, Fault::PartitionToClient][rng.usize(0..2)],
                2 => Fault::Hold,
                3 => Fault::Crash,
                4 => Fault::Shutdown,
                5 => Fault::NotServing,
                6 => {
                    let pushback_ms = match rng.u32(0..4) {
                        0 => rng.u64(10..=3_600_000),
                        _ => 0,
                    };
                    Fault::Unavailable { pushback_ms }
                }
                7 => Fault::Slow { ms: rng.u32(300..=3000) },
                _ => Fault::Latency { ms: rng.u64(50..=400) },
            };
            let from = millis(&mut rng, 300..=5500);
            let until = (from + millis(&mut rng, 200..=3000)).min(faults_end);
            if from < until {
                faults.push(FaultPlan { server, fault, from, until });
            }
        }
        if let Some((fault, from)) = outage {
            for server in 0..servers {
                faults.push(FaultPlan { server, fault, from, until: HEAL_AT });
            }
        }

        // Discovery: some servers join later; some leave and come back.
        let mut initial = Vec::new();
        let mut discovery = Vec::new();
        for server in 0..servers {
            if server < 2 || rng.u32(0..4) != 0 {
                initial.push(server);
                if rng.u32(0..6) == 0 {
                    let at = millis(&mut rng, 500..=5000);
                    discovery.push(Discovery { at, server, insert: false });
                    let back = at + millis(&mut rng, 200..=1500);
                    if back < HEAL_AT {
                        discovery.push(Discovery { at: back, server, insert: true });
                    }
                }
            } else {
                discovery.push(Discovery { at: millis(&mut rng, 100..=5000), server, insert: true });
            }
        }
        discovery.sort_by_key(|d| d.at);

        let mut calls = Vec::new();
        let count = rng.u64(20..=100);
        for id in 1..=count {
            let at = millis(&mut rng, 50..=WORKLOAD_END.as_millis() as u64 - 1);
            let endless = rng.u32(0..30) == 0;
            let shape = if endless {
                Shape::Stream { repeat: u32::MAX }
            } else if rng.u32(0..10) < 4 {
                Shape::Stream { repeat: rng.u32(1..=5) }
            } else {
                Shape::Unary
            };
            let delay_ms = match (endless, rng.u32(0..10)) {
                (true, _) => 0,
                (false, 0) => rng.u32(500..=2500),
                (false, _) => rng.u32(0..=150),
            };
            let mut deadline = rng.bool().then(|| millis(&mut rng, 50..=2000));
            let wait_for_ready = match rng.u32(0..4) {
                0 => Some(true),
                1 => Some(false),
                _ => None,
            };
            let drop_after = (rng.u32(0..10) == 0).then(|| millis(&mut rng, 0..=800));
            if endless {
                // Never without an end: a deadline, or a caller that gives up.
                if deadline.is_none() && drop_after.is_none() {
                    deadline = Some(millis(&mut rng, 20..=300));
                }
            }
            // Streams without pause: big messages read at once, or small ones read slowly
            // (so data is always ready when the caller polls).
            let slow_reader = endless && rng.bool();
            let size = if endless && !slow_reader { ENDLESS_MESSAGE } else { 16 };
            let read_pause = slow_reader.then_some(Duration::from_millis(1));
            calls.push(CallPlan {
                id,
                at,
                shape,
                delay_ms,
                deadline,
                wait_for_ready,
                drop_after,
                size,
                read_pause,
            });
        }
        // A burst of short calls around each crash and graceful shutdown, so that some are
        // on their way when the connection goes (resends of calls the server never saw).
        let mut id = count + 1;
        for fault in &faults {
            if !matches!(fault.fault, Fault::Crash | Fault::Shutdown) {
                continue;
            }
            for _ in 0..rng.usize(4..=10) {
                let at = fault.from.saturating_sub(Duration::from_millis(15)) + millis(&mut rng, 0..=30);
                let deadline = rng.bool().then(|| millis(&mut rng, 50..=1000));
                let wait_for_ready = rng.bool().then(|| rng.bool());
                let delay_ms = rng.u32(0..=100);
                calls.push(CallPlan {
                    id,
                    at,
                    shape: Shape::Unary,
                    delay_ms,
                    deadline,
                    wait_for_ready,
                    drop_after: None,
                    size: 16,
                    read_pause: None,
                });
                id += 1;
            }
        }
        calls.sort_by_key(|c| (c.at, c.id));

        Plan { seed, servers, initial, latency: millis(&mut rng, 1..=5), pool, faults, discovery, calls }
    }
}
