//! Against a non-Rust gRPC server: the gRPC C core through Python grpcio (testkit/peer),
//! with the connection limits real deployments set. `scripts/setup-peer` installs it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::state::RetryReason;
use grpc_pool::{AllUnhealthy, CheckMode, EvictionReason, HealthCheck, Keepalive, Pool, PoolEvent};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, PeerOptions, PingEnforcer, PingPolicy, PythonPeer, Relay};
use tonic::Code;

fn is_too_many_pings(event: &PoolEvent) -> bool {
    matches!(event, PoolEvent::GoAway { code, debug_data, .. }
        if *code == u32::from(h2::Reason::ENHANCE_YOUR_CALM) && debug_data == "too_many_pings")
}

fn request(delay_ms: u32) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"peer"), repeat: 0, delay_ms }
}

/// Runs `callers` loops of calls for `duration`; returns (calls, failures).
async fn load(pool: &Pool, callers: usize, duration: Duration, delay_ms: u32) -> (usize, Vec<tonic::Status>) {
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (mut client, stop, calls) = (EchoClient::new(pool.clone()), stop.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Err(status) = client.unary_echo(request(delay_ms)).await {
                    failures.push(status);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    (calls.load(Ordering::Relaxed), failures)
}

/// Keepalive that PINGs idle members too (the defaults do not): for tests of how the pool
/// meets a server's PING policy when it is configured past it.
fn idle_keepalive(time: Duration, timeout: Duration) -> Keepalive {
    {
        let mut v = Keepalive::new(time, timeout);
        v.permit_without_stream = true;
        v.max_pings_without_data = 0;
        v
    }
}

#[tokio::test]
async fn idle_close_by_the_server_fails_no_call() {
    let peer =
        PythonPeer::start(PeerOptions { max_connection_idle_ms: Some(1_000), ..Default::default() }).await;
    let pool = Pool::builder().build([peer.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    // Idle past the server's limit: it sends GOAWAY and closes.
    wait_until(Duration::from_secs(10), "the server closed the idle connection", || {
        pool.state().statistics.closed(EvictionReason::GoAway) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the scenario: 3 s idle in all
    for _ in 0..20 {
        client.unary_echo(request(0)).await.unwrap();
    }
    // The replacement connections idle out too, each a second after it opened, so a call
    // may go out just as the server's GOAWAY for one is on its way: the server then says it
    // never processed it, and the pool sends it again (`GoAway`). Nothing else may be resent.
    let statistics = pool.state().statistics;
    assert_eq!(statistics.retries, statistics.retried(RetryReason::GoAway), "{statistics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_age_cycling_under_load_fails_no_call() {
    let peer = PythonPeer::start(PeerOptions {
        max_connection_age_ms: Some(1_000),
        max_connection_age_grace_ms: Some(500),
        ..Default::default()
    })
    .await;
    let pool = Pool::builder().max_connections(4).build([peer.uri()]).await.unwrap();
    let (calls, failures) = load(&pool, 32, Duration::from_secs(10), 1).await;
    let stats = pool.state().statistics;
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed, first: {:?}; {stats:?}",
        failures.len(),
        failures.first()
    );
    assert!(stats.closed(EvictionReason::GoAway) >= 5, "connections should have aged out: {stats:?}");
    println!(
        "age cycling: {calls} calls, 0 failed, {} GOAWAYs, {} retries",
        stats.closed(EvictionReason::GoAway),
        stats.retries
    );
}

#[tokio::test]
async fn ping_enforcement_backs_keepalive_off_and_fails_no_call() {
    // The peer's default ping policy: PINGs without calls at most every 5 minutes, two
    // strikes, then GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    let peer = PythonPeer::start(PeerOptions::default()).await;
    let pool = Pool::builder()
        .keepalive(Some(idle_keepalive(Duration::from_secs(1), Duration::from_secs(5))))
        .build([peer.uri()])
        .await
        .unwrap();
    let mut events = pool.events();
    let started = Instant::now();
    // Note when each too_many_pings arrives.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if is_too_many_pings(&event) {
                    seen.lock().unwrap().push(started.elapsed());
                }
            }
        })
    };
    let mut client = EchoClient::new(pool.clone());
    let mut failures = Vec::new();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(21) {
        if let Err(status) = client.unary_echo(request(0)).await {
            failures.push(status);
        }
        calls += 1;
        // Light traffic: enough PINGs fall between two calls for the server's strikes (its
        // fifth PING without data in between ends the connection).
        tokio::time::sleep(Duration::from_secs(7)).await;
    }
    recorder.abort();
    let too_many_pings = seen.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} of {calls} calls failed: {:?}", failures.len(), failures.first());
    assert!(!too_many_pings.is_empty(), "a 1 s keepalive should provoke the server's ping policy");
    assert!(too_many_pings.len() <= 3, "it should stop provoking after backing off: {too_many_pings:?}");
    // The first quiet gap provokes it; the two gaps after that must not.
    let last = too_many_pings.last().unwrap();
    assert!(*last < Duration::from_secs(8), "still provoking at {last:?}: {too_many_pings:?}");
    println!("ping enforcement: {calls} calls, 0 failed, too_many_pings at {too_many_pings:?}");
}

#[tokio::test]
async fn a_silent_drop_while_idle_never_hangs_the_next_call() {
    let peer = PythonPeer::start(PeerOptions::default()).await;
    let relay = Relay::start(peer.addr()).await;
    let keepalive = Keepalive::new(Duration::from_millis(500), Duration::from_millis(500));
    let bound = keepalive.time + keepalive.timeout + Duration::from_secs(2);
    let pool = Pool::builder().keepalive(Some(keepalive)).build([relay.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    relay.freeze();
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await; // the call comes while the pool is idle
    let result = tokio::time::timeout(Duration::from_secs(30), client.unary_echo(request(0))).await;
    let took = frozen_at.elapsed();
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(took <= bound, "failed only after {took:?}");
        }
        Err(_) => panic!("the call hung on the dropped connection"),
    }
    assert!(took <= bound, "the call took {took:?}");
    // Either way, the next calls go to a fresh connection.
    client.unary_echo(request(0)).await.unwrap();
    assert_eq!(pool.state().statistics.closed(EvictionReason::PingTimeout), 1);
}

fn fast_checks(mode: CheckMode) -> HealthCheck {
    let mut checks = HealthCheck::default();
    checks.interval = Duration::from_millis(100);
    checks.timeout = Duration::from_millis(500);
    checks.mode = mode;
    checks
}

async fn health_flip_under_load(mode: CheckMode) {
    let mut a = PythonPeer::start(PeerOptions::default()).await;
    let mut b = PythonPeer::start(PeerOptions::default()).await;
    let pool =
        Pool::builder().health_checks(Some(fast_checks(mode))).build([a.uri(), b.uri()]).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (mut client, stop) = (EchoClient::new(pool.clone()), stop.clone());
        callers.push(tokio::spawn(async move {
            let (mut calls, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let Err(status) = client.unary_echo(request(2)).await {
                    failures.push(status);
                }
                calls += 1;
            }
            (calls, failures)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.calls().await == 0 {
        assert!(Instant::now() < deadline, "A takes no traffic while healthy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a_before_flip = a.calls().await;

    a.set_serving(false).await;
    wait_until(Duration::from_secs(5), "A is marked unhealthy", || !pool.state().endpoints[0].healthy).await;
    let reason = pool.state().endpoints[0].health_reason.clone().unwrap_or_default();
    assert!(reason.contains("NOT_SERVING"), "{reason}");
    // Calls already on A finish; then A gets nothing for the rest of the 3 s.
    // (A Watch keeps its one stream to A open.)
    let health_streams = usize::from(mode == CheckMode::Watch);
    wait_until(Duration::from_secs(5), "the calls on A have finished", || {
        pool.state().endpoints[0].in_flight <= health_streams
    })
    .await;
    let a_drained = a.calls().await;
    tokio::time::sleep(Duration::from_millis(2_400)).await;
    let a_while_unhealthy = a.calls().await - a_drained;
    assert_eq!(a_while_unhealthy, 0, "calls went to the unhealthy endpoint");

    a.set_serving(true).await;
    wait_until(Duration::from_secs(5), "A is healthy again", || pool.state().endpoints[0].healthy).await;
    let a_back = a.calls().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.calls().await <= a_back {
        assert!(Instant::now() < deadline, "traffic does not return to A");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    stop.store(true, Ordering::Relaxed);
    let (mut calls, mut failures) = (0, Vec::new());
    for caller in callers {
        let (n, f) = caller.await.unwrap();
        calls += n;
        failures.extend(f);
    }
    assert!(failures.is_empty(), "{} of {calls} calls failed: {:?}", failures.len(), failures.first());
    println!(
        "health flip ({mode:?}): {calls} calls, 0 failed; A served {a_before_flip} before, 0 while unhealthy"
    );
    let _ = b.calls().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_flip_moves_traffic_away_and_back_without_failures() {
    health_flip_under_load(CheckMode::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_flip_seen_through_watch_moves_traffic_away_and_back() {
    health_flip_under_load(CheckMode::Watch).await;
}

#[tokio::test]
async fn every_endpoint_unhealthy_fails_fast_or_routes_to_all() {
    let mut a = PythonPeer::start(PeerOptions::default()).await;
    let mut b = PythonPeer::start(PeerOptions::default()).await;
    a.set_serving(false).await;
    b.set_serving(false).await;
    let strict = Pool::builder()
        .health_checks(Some(fast_checks(CheckMode::Poll)))
        .build([a.uri(), b.uri()])
        .await
        .unwrap();
    let lenient = Pool::builder()
        .health_checks(Some(fast_checks(CheckMode::Poll)))
        .when_all_unhealthy(AllUnhealthy::RouteToAll)
        .build([a.uri(), b.uri()])
        .await
        .unwrap();
    for pool in [&strict, &lenient] {
        wait_until(Duration::from_secs(5), "both endpoints are unhealthy", || {
            pool.state().endpoints.iter().all(|e| !e.healthy)
        })
        .await;
    }
    let started = Instant::now();
    let status = EchoClient::new(strict.clone()).unary_echo(request(0)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "should fail fast, took {:?}", started.elapsed());
    assert_eq!(status.code(), Code::Unavailable);
    for part in ["every endpoint is unhealthy", &a.uri(), &b.uri(), "NOT_SERVING", "RouteToAll"] {
        assert!(status.message().contains(part), "`{part}` missing from: {}", status.message());
    }
    EchoClient::new(lenient.clone()).unary_echo(request(0)).await.unwrap();
}

#[tokio::test]
async fn a_pool_idle_for_a_minute_against_default_ping_limits_serves_without_failures() {
    // The scenario: a default server, keepalive 10 s / 5 s with PINGs on idle
    // connections allowed. The server objects to the third PING within its 5 minutes
    // (too_many_pings); the pool backs off, probes with health-check calls from then on, and
    // serves every call after the minute.
    let peer = PythonPeer::start(PeerOptions::default()).await;
    // A tap in front of the peer counts what the pool sends; the peer polices PINGs itself.
    let tap = std::sync::Arc::new(
        PingEnforcer::start(peer.addr(), PingPolicy { min_interval: Duration::ZERO, max_strikes: u32::MAX })
            .await,
    );
    tap.set_enforcing(false);
    let pool = Pool::builder()
        .keepalive(Some(idle_keepalive(Duration::from_secs(10), Duration::from_secs(5))))
        .build([tap.uri()])
        .await
        .unwrap();
    let mut events = pool.events();
    // PINGs the tap had seen at each too_many_pings.
    let goaways = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let (goaways, tap) = (goaways.clone(), tap.clone());
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if is_too_many_pings(&event) {
                    goaways.lock().unwrap().push(tap.pings());
                }
            }
        })
    };
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    let streams_before = tap.streams();
    tokio::time::sleep(Duration::from_secs(60)).await;
    // The first probe call comes a keepalive time (doubled to 20 s) after the reconnect.
    wait_until(Duration::from_secs(60), "an idle member was probed with a call", || {
        tap.streams() > streams_before
    })
    .await;
    let (pings, streams) = (tap.pings(), tap.streams() - streams_before);
    for _ in 0..20 {
        client.unary_echo(request(0)).await.unwrap();
    }
    recorder.abort();
    let goaways = goaways.lock().unwrap().clone();
    let too_many_pings = goaways.len();
    // The idle PINGs went out, were answered, and provoked the server...
    assert!(too_many_pings >= 1, "10 s idle PINGs should provoke a default server; {pings} PINGs sent");
    assert!(too_many_pings <= 2, "{too_many_pings} too_many_pings in a minute");
    // ...after which the endpoint's idle members were probed with calls, not PINGs.
    let pings_after = pings - goaways.last().unwrap();
    assert_eq!(pings_after, 0, "{pings_after} PINGs after the last too_many_pings");
    assert!(streams >= 1, "{streams} probe calls while idle");
    println!(
        "idle minute: {pings} PINGs, {too_many_pings} too_many_pings (at {goaways:?} PINGs), {streams} probe calls, 20 calls after it, 0 failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_servers_fails_only_the_calls_in_flight_on_it() {
    // 32 callers against two gRPC C-core servers; one is killed with SIGKILL, as a crash
    // would. Only calls already running on it may fail; once its members are evicted every
    // call succeeds; restarted on the same port, it takes calls again.
    let survivor = PythonPeer::start(PeerOptions::default()).await;
    let doomed = PythonPeer::start(PeerOptions::default()).await;
    let port = doomed.port();
    let doomed_uri = doomed.uri();
    let pool = Pool::builder()
        .backoff({
            let mut v = grpc_pool::BackoffConfig::default();
            v.base = Duration::from_millis(50);
            v.max = Duration::from_millis(200);
            v
        })
        .build([survivor.uri(), doomed.uri()])
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..32 {
        let (mut client, stop) = (EchoClient::new(pool.clone()), stop.clone());
        callers.push(tokio::spawn(async move {
            // (when the call started, whether it failed)
            let mut calls: Vec<(Instant, bool)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let failed = client.unary_echo(request(10)).await.is_err();
                calls.push((started, failed));
            }
            calls
        }));
    }
    let doomed_members = |pool: &Pool| {
        pool.state()
            .endpoints
            .iter()
            .find(|e| e.endpoint.to_string() == doomed_uri)
            .map_or(0, |e| e.members.len())
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill_started = Instant::now();
    doomed.kill().await;
    let killed_at = Instant::now();
    wait_until(Duration::from_secs(10), "the killed server's members are evicted", || {
        doomed_members(&pool) == 0
    })
    .await;
    let evicted_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut restarted = PythonPeer::start(PeerOptions { port: Some(port), ..Default::default() }).await;
    wait_until(Duration::from_secs(10), "the restarted server has a member again", || {
        doomed_members(&pool) > 0
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while restarted.calls().await == 0 {
        assert!(Instant::now() < deadline, "the restarted server took no call within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut calls = Vec::new();
    for caller in callers {
        calls.extend(caller.await.unwrap());
    }
    let failed: Vec<Instant> =
        calls.iter().filter(|(_, failed)| *failed).map(|(started, _)| *started).collect();
    let n = |a: Instant, b: Instant| failed.iter().filter(|s| **s >= a && **s < b).count();
    println!(
        "failures: before kill {}, during kill {}, kill..evicted {}, after {}; kill took {:?}, eviction {:?}",
        n(kill_started - Duration::from_secs(100), kill_started),
        n(kill_started, killed_at),
        n(killed_at, evicted_at),
        n(evicted_at, Instant::now()),
        killed_at - kill_started,
        evicted_at - killed_at
    );
    assert!(
        failed.iter().all(|started| *started < killed_at),
        "a call that started after the kill failed ({} failures)",
        failed.len()
    );
    assert!(failed.len() <= 32, "{} calls failed; at most one per caller was in flight", failed.len());
    let after = calls.iter().filter(|(started, _)| *started > evicted_at).count();
    assert!(after > 100, "only {after} calls after the eviction");
    println!(
        "kill -9: {} calls, {} failed (in flight at the kill), eviction {:?} after the kill",
        calls.len(),
        failed.len(),
        evicted_at - killed_at
    );
}
