//! The client host: the pool (with its health task) over the simulated network, the
//! workload's calls, the state sampler, the recovery probe after the heal, and the checks
//! at the close.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grpc_pool::discover::Change;
use grpc_pool::state::MemberState;
use grpc_pool::{BackoffConfig, CheckMode, HealthCheck, Keepalive, Pool, WaitForReady};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Code;

use super::plan::*;
use super::server::CALL_ID;
use super::trace::{now, Journal};

/// One change of the endpoint set, as the pool's `discover` takes it.
pub type Changed = Result<Change<usize, String>, Infallible>;

/// How often the sampler reads `Pool::state()`.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Longest `Pool::close` may take once every call has ended.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// The calls not ended yet (id, start, deadline), for the report when a run never finishes.
pub type Open = Arc<Mutex<BTreeMap<u64, (Duration, Option<Duration>)>>>;

fn builder(plan: &Plan, journal: &Journal) -> grpc_pool::Builder {
    let mut keepalive = Keepalive::new(KEEPALIVE_TIME, KEEPALIVE_TIMEOUT);
    keepalive.permit_without_stream = true;
    keepalive.max_pings_without_data = 0;
    let mut backoff = BackoffConfig::default();
    backoff.base = BACKOFF_BASE;
    backoff.multiplier = 1.6;
    backoff.jitter = BACKOFF_JITTER;
    backoff.max = BACKOFF_MAX;
    let mut builder = Pool::builder()
        .name(&format!("sim-{}", plan.seed))
        .connector(super::net::connector(journal.clone()))
        .min_connections(1)
        .max_connections(plan.pool.max_connections)
        .max_concurrent_streams(plan.pool.max_concurrent_streams)
        .connect_timeout(CONNECT_TIMEOUT)
        .checkout_timeout(CHECKOUT_TIMEOUT)
        .keepalive(Some(keepalive))
        .backoff(backoff)
        .h2(h2());
    if plan.pool.health_checks {
        let mut checks = HealthCheck::service("echo.Echo");
        checks.interval = Duration::from_millis(500);
        checks.unhealthy_interval = HEALTH_UNHEALTHY_INTERVAL;
        checks.timeout = HEALTH_TIMEOUT;
        checks.unhealthy_threshold = 1;
        checks.healthy_threshold = 1;
        checks.mode = CheckMode::Watch;
        builder = builder.health_checks(Some(checks));
    }
    if let Some(json) = plan.pool.policy.service_config() {
        builder = builder.service_config(&json);
    }
    if plan.pool.latency_aware {
        builder = builder.balance(grpc_pool::Balance::PEAK_EWMA);
    }
    if let Some(max) = plan.pool.max_total_connections {
        builder = builder.max_total_connections(Some(max));
    }
    if let Some(kind) = plan.pool.outliers {
        let mut outliers = grpc_pool::OutlierDetection::off();
        outliers.base_ejection_time = Duration::from_millis(300);
        outliers.max_ejection_time = Duration::from_secs(1);
        outliers.max_ejection_percent = super::plan::MAX_EJECTION_PERCENT;
        outliers.interval = Duration::from_millis(100);
        match kind {
            super::plan::Outliers::InARow => outliers.consecutive_failures = 3,
            super::plan::Outliers::FailurePercentage => {
                let mut failures = grpc_pool::FailurePercentageEjection::default();
                (failures.threshold, failures.minimum_hosts, failures.request_volume) = (50, 2, 4);
                outliers.failure_percentage = Some(failures);
            }
        }
        builder = builder.outlier_detection(Some(outliers));
    }
    if let Some(size) = plan.pool.subset {
        let mut subset = grpc_pool::Subset::new(size);
        subset.client = Some(plan.seed % 5);
        subset.replace_after = super::plan::SUBSET_REPLACE_AFTER;
        builder = builder.subset(Some(subset));
    }
    builder
}

/// The pool's HTTP/2 settings, with one change: `h2` keeps a reset stream's id for
/// `reset_stream_duration` by the real clock (not tokio's), so on a busy machine a run's
/// resets would expire at other simulated instants, and frames that arrive for them later
/// would be taken differently: a seed would not replay. Kept for longer than any run.
fn h2() -> grpc_pool::H2Config {
    let mut h2 = grpc_pool::H2Config::default();
    h2.reset_stream_duration = Duration::from_secs(3600);
    h2
}

/// The client's software.
pub async fn workload(
    plan: Arc<Plan>,
    journal: Journal,
    open: Open,
    changes: mpsc::UnboundedReceiver<Changed>,
) -> turmoil::Result {
    let base = Instant::now();
    let initial: Vec<String> = plan.initial.iter().map(|&s| server_uri(s)).collect();
    let pool = builder(&plan, &journal).build_lazy(&initial)?;
    pool.set_max_requests(plan.pool.max_requests);
    let stream =
        futures_util::stream::unfold(changes, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    pool.discover(stream);

    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // A health check's stream may go over a member's stream limit (`Member::force_acquire`:
    // it then waits in h2 for the server's room), one per endpoint.
    let extra_streams = u32::from(plan.pool.health_checks);
    let sampler = tokio::spawn(sample(
        pool.clone(),
        journal.clone(),
        Limits {
            max_connections: plan.pool.max_connections,
            extra_streams,
            subset: plan.pool.subset,
            max_total: plan.pool.max_total_connections,
            max_requests: plan.pool.max_requests,
            outliers: plan.pool.outliers.is_some(),
        },
        sampling.clone(),
    ));

    let mut calls = Vec::new();
    for call in &plan.calls {
        tokio::time::sleep_until(base + call.at).await;
        calls.push(tokio::spawn(run_call(pool.clone(), call.clone(), journal.clone(), open.clone())));
    }

    // Recovery: from the heal on, calls that wait for ready, one after another, until one
    // succeeds.
    tokio::time::sleep_until(base + HEAL_AT).await;
    let healed = now();
    let mut id = PROBE_IDS;
    // A probe that failed while the workload's own calls held every slot of every usable
    // endpoint waited on traffic that flows, not on a recovery: the bound counts from the
    // end of the last such probe.
    let mut saturated_until = healed;
    let recovered = loop {
        let probe = CallPlan {
            id,
            at: now(),
            shape: Shape::Unary,
            delay_ms: 0,
            deadline: Some(PROBE_DEADLINE),
            wait_for_ready: Some(true),
            drop_after: None,
            size: 16,
            read_pause: None,
        };
        let ok = run_call(pool.clone(), probe, journal.clone(), open.clone()).await;
        if ok {
            break Some(now());
        }
        if saturated(&pool, plan.pool.max_connections, plan.pool.max_requests) {
            saturated_until = now();
        }
        if now() > healed + RECOVERY_BOUND + Duration::from_secs(5) {
            break None;
        }
        id += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if saturated_until > healed {
        journal.note(format!(
            "the probes met a pool saturated by the workload until {:?} after the heal (not counted)",
            saturated_until - healed
        ));
    }
    match recovered {
        Some(at) if at - saturated_until <= RECOVERY_BOUND => {
            journal.note(format!("recovered {:?} after the heal", at - healed));
        }
        Some(at) => journal.violation(
            "recovery",
            format!(
                "the first call to succeed after the heal ended {:?} after it, {:?} after the pool was last \
                 saturated (bound {RECOVERY_BOUND:?})",
                at - healed,
                at - saturated_until
            ),
        ),
        None => journal.violation(
            "recovery",
            format!("no call succeeded within {:?} of the heal (bound {RECOVERY_BOUND:?})", now() - healed),
        ),
    }

    for call in calls {
        let _ = call.await;
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;

    journal.note("closing the pool");
    if tokio::time::timeout(CLOSE_BOUND, pool.close()).await.is_err() {
        journal.violation(
            "close",
            format!("Pool::close did not return within {CLOSE_BOUND:?} of the last call's end"),
        );
    }
    let state = pool.state();
    journal.note(format!(
        "closed: open connections {}, waiters {}, in flight {}",
        state.open_connections,
        state.waiters,
        state.in_flight()
    ));
    if !state.closed {
        journal.violation("close", "the pool does not say it is closed");
    }
    if state.waiters != 0 {
        journal.violation("close", format!("{} waiters queued after the close", state.waiters));
    }
    if state.in_flight() != 0 || state.endpoints.iter().any(|e| e.members.iter().any(|m| m.in_flight != 0)) {
        journal.violation("close", format!("{} stream slots busy after the close", state.in_flight()));
    }
    if state.open_connections != 0 {
        journal.violation("close", format!("{} connections open after the close", state.open_connections));
    }
    super::check::statistics(&plan, &state.statistics, &journal);
    super::check::connects(&plan, &journal);
    let _ = base;
    Ok(())
}

/// What `sample` holds the pool's state to.
struct Limits {
    max_connections: usize,
    /// Streams a member may have over its limit (health checks).
    extra_streams: u32,
    /// The most live endpoints, with subsetting.
    subset: Option<usize>,
    /// `max_total_connections`.
    max_total: Option<usize>,
    /// `Pool::set_max_requests`.
    max_requests: Option<u32>,
    /// Outlier detection, with `MAX_EJECTION_PERCENT`.
    outliers: bool,
}

/// Reads `Pool::state()` every [`SAMPLE_EVERY`] while the workload runs.
async fn sample(pool: Pool, journal: Journal, limits: Limits, on: Arc<std::sync::atomic::AtomicBool>) {
    let Limits { max_connections, extra_streams, subset, max_total, max_requests, outliers } = limits;
    let mut reported = false;
    while on.load(std::sync::atomic::Ordering::Relaxed) {
        let state = pool.state();
        journal.set_last_state(summary(&state));
        if let Some(max) = max_total {
            if state.open_connections > max && !reported {
                reported = true;
                journal.violation(
                    "max-total-connections",
                    format!("{} connections open, over max_total_connections {max}", state.open_connections),
                );
            }
        }
        if outliers {
            // At most MAX_EJECTION_PERCENT of the endpoints out at once (one always may when
            // there are two or more), and never the last.
            let n = state.endpoints.len();
            let ejected = state.endpoints.iter().filter(|e| e.ejected_for.is_some()).count();
            let cap = if n < 2 {
                0
            } else {
                (n * super::plan::MAX_EJECTION_PERCENT as usize / 100).clamp(1, n - 1)
            };
            if ejected > cap && !reported {
                reported = true;
                journal.violation(
                    "outlier-cap",
                    format!("{ejected} of {n} endpoints ejected, over the cap of {cap}"),
                );
            }
        }
        if let Some(max) = max_requests {
            // Health checks hold a stream per endpoint and are not calls: not counted.
            let allowed = max as usize + state.endpoints.len() * extra_streams as usize;
            if state.in_flight() > allowed && !reported {
                reported = true;
                journal.violation(
                    "max-requests",
                    format!("{} streams in flight, over max_requests {max} (and {extra_streams} health stream an endpoint)", state.in_flight()),
                );
            }
        }
        if let Some(size) = subset {
            if state.endpoints.len() > size && !reported {
                reported = true;
                journal.violation(
                    "subset-size",
                    format!("{} endpoints live, over the subset's {size}", state.endpoints.len()),
                );
            }
        }
        for endpoint in &state.endpoints {
            let listed = endpoint
                .members
                .iter()
                .filter(|m| matches!(m.state, MemberState::Connecting | MemberState::Ready))
                .count();
            if listed > max_connections && !reported {
                reported = true;
                journal.violation(
                    "max-connections",
                    format!(
                        "{} has {listed} members not draining (max_connections {max_connections})",
                        endpoint.endpoint
                    ),
                );
            }
            for member in &endpoint.members {
                if member.in_flight > member.max_streams + extra_streams && !reported {
                    reported = true;
                    journal.violation(
                        "stream-limit",
                        format!(
                            "member {} of {} has {} streams in flight, over its limit {} (+{extra_streams} for health checks)",
                            member.id, endpoint.endpoint, member.in_flight, member.max_streams
                        ),
                    );
                }
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// The pool's endpoints and members in a line.
fn summary(state: &grpc_pool::State) -> String {
    let endpoints: Vec<String> = state
        .endpoints
        .iter()
        .map(|e| {
            let members: Vec<String> = e
                .members
                .iter()
                .map(|m| format!("#{} {:?} {} streams", m.id, m.state, m.in_flight))
                .collect();
            format!(
                "{} ({}, {} connecting): [{}]",
                e.endpoint,
                if e.healthy { "healthy" } else { "unhealthy" },
                e.connecting,
                members.join(", ")
            )
        })
        .collect();
    format!(
        "open connections {}, waiters {}; {}",
        state.open_connections,
        state.waiters,
        endpoints.join("; ")
    )
}

/// How a call ended.
enum Ended {
    Ok { messages: u64 },
    Failed(tonic::Status),
    Dropped,
}

/// Runs one call as planned, writes its start and end into the journal and checks its
/// deadline; true if it succeeded.
async fn run_call(pool: Pool, call: CallPlan, journal: Journal, open: Open) -> bool {
    open.lock().unwrap_or_else(|e| e.into_inner()).insert(call.id, (now(), call.deadline));
    journal.note(format!(
        "call {} starts: {:?} of {} bytes, server delay {}ms, deadline {:?}, wait_for_ready {:?}, dropped after {:?}, read pause {:?}",
        call.id, call.shape, call.size, call.delay_ms, call.deadline, call.wait_for_ready, call.drop_after, call.read_pause
    ));
    let started = Instant::now();
    let attempt = perform(pool, &call);
    let ended = match call.drop_after {
        Some(after) => match tokio::time::timeout(after, attempt).await {
            Ok(ended) => ended,
            Err(_) => Ended::Dropped,
        },
        None => attempt.await,
    };
    let took = started.elapsed();
    let (ok, outcome) = match &ended {
        Ended::Ok { messages } => (true, format!("OK ({messages} messages)")),
        Ended::Failed(status) => (false, format!("{:?}: {}", status.code(), status.message())),
        Ended::Dropped => (false, "dropped by its caller".to_owned()),
    };
    journal.note(format!("call {} ends after {took:?}: {outcome}", call.id));
    open.lock().unwrap_or_else(|e| e.into_inner()).remove(&call.id);

    if let Some(deadline) = call.deadline {
        if took > deadline + TICK {
            journal.violation(
                "deadline",
                format!("call {} with a deadline of {deadline:?} ended after {took:?} ({outcome})", call.id),
            );
        } else if took > deadline && matches!(ended, Ended::Ok { .. }) {
            journal.violation(
                "deadline",
                format!("call {} with a deadline of {deadline:?} succeeded after {took:?}", call.id),
            );
        } else if took + TICK < deadline
            && matches!(&ended, Ended::Failed(status) if status.code() == Code::DeadlineExceeded)
        {
            journal.violation(
                "deadline",
                format!("call {} failed with DEADLINE_EXCEEDED after {took:?}, before its deadline of {deadline:?}", call.id),
            );
        }
    }
    ok
}

async fn perform(pool: Pool, call: &CallPlan) -> Ended {
    let mut client = EchoClient::new(pool);
    let repeat = match call.shape {
        Shape::Unary => 0,
        Shape::Stream { repeat } => repeat,
    };
    let mut request = tonic::Request::new(EchoRequest {
        message: Bytes::from(vec![b's'; call.size]),
        repeat,
        delay_ms: call.delay_ms,
    });
    request.metadata_mut().insert(CALL_ID, call.id.to_string().parse().expect("digits"));
    if let Some(deadline) = call.deadline {
        request.set_timeout(deadline);
    }
    if let Some(ready) = call.wait_for_ready {
        request.extensions_mut().insert(WaitForReady(ready));
    }
    match call.shape {
        Shape::Unary => match client.unary_echo(request).await {
            Ok(_) => Ended::Ok { messages: 1 },
            Err(status) => Ended::Failed(status),
        },
        Shape::Stream { .. } => {
            let mut stream = match client.server_streaming_echo(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Ended::Failed(status),
            };
            let mut messages = 0;
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {
                        messages += 1;
                        if let Some(pause) = call.read_pause {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    Ok(None) => return Ended::Ok { messages },
                    Err(status) => return Ended::Failed(status),
                }
            }
        }
    }
}

/// Whether every usable endpoint (healthy, not ejected) has as many ready members as it may
/// and every one of them carries as many streams as it may: a new call can only wait.
fn saturated(pool: &Pool, max_connections: usize, max_requests: Option<u32>) -> bool {
    let state = pool.state();
    // The workload's calls may hold every call the cap allows: the streams in flight reach it
    // (with health streams among them this also counts a pool one call short of the cap as
    // saturated, which only widens what the recovery bound forgives).
    if max_requests.is_some_and(|max| state.in_flight() >= max as usize) {
        return true;
    }
    let usable: Vec<_> = state.endpoints.iter().filter(|e| e.healthy && e.ejected_for.is_none()).collect();
    !usable.is_empty()
        && usable.iter().all(|e| {
            let ready: Vec<_> = e.members.iter().filter(|m| m.state == MemberState::Ready).collect();
            ready.len() >= max_connections && ready.iter().all(|m| m.in_flight >= m.max_streams)
        })
}
