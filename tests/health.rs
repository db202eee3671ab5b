//! The health task against real servers on 127.0.0.1 and a fault relay: keepalive PINGs
//! find silently dropped connections, and the eviction policy retires idle, old and busy
//! members without failing calls.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::state::MemberState;
use grpc_pool::{BackoffConfig, CheckMode, EvictionReason, HealthCheck, Keepalive, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, HeldClock, Relay, ServerOptions, TestServer};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(15);
/// Scheduling slack on top of a keepalive bound, for a shared 2-core machine.
const SLACK: Duration = Duration::from_secs(2);

fn request(delay_ms: u32) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"health"), repeat: 0, delay_ms }
}

/// Keepalive that PINGs idle members too, however long the server stays silent (the
/// defaults PING only members carrying calls, at most twice without data): what these tests
/// of the keepalive machinery on idle connections need.
fn idle_keepalive(time: Duration, timeout: Duration) -> Keepalive {
    {
        let mut v = Keepalive::new(time, timeout);
        v.permit_without_stream = true;
        v.max_pings_without_data = 0;
        v
    }
}

fn keepalive() -> Keepalive {
    idle_keepalive(Duration::from_millis(300), Duration::from_millis(300))
}

/// The health task's timer grid (`BATCH` in health/src/task.rs): a PING goes out, and its
/// deadline falls, on the first multiple of it at or after the instant due.
const GRID: Duration = Duration::from_millis(50);

/// How far tests on a held clock move it at a time.
const STEP: Duration = Duration::from_millis(10);

/// On a held clock, where scheduling costs no time: a quiet member is PINGed at most `time`
/// after its last read and evicted `timeout` later, each rounded up to the grid.
fn held_bound(keepalive: &Keepalive) -> Duration {
    keepalive.time + keepalive.timeout + 2 * GRID
}

#[tokio::test(start_paused = true)]
async fn keepalive_replaces_a_silently_dropped_idle_member_before_the_next_call() {
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder().keepalive(Some(keepalive())).build([relay.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    let dropped = pool.state().endpoints[0].members[0].id;

    relay.freeze();
    let found_after = clock
        .advance_until(
            held_bound(&keepalive()),
            STEP,
            "the dropped member is evicted for ping_timeout",
            || pool.state().statistics.closed(EvictionReason::PingTimeout) == 1,
        )
        .await;
    println!("evicted {found_after:?} after the freeze");
    assert!(
        found_after >= keepalive().timeout,
        "evicted after {found_after:?}, before a PING could time out"
    );

    // The next call never meets the dead connection: it ends with the clock standing still,
    // so it waited for no timer.
    let call = tokio::spawn(async move { client.unary_echo(request(0)).await });
    clock.wait_until(WAIT, "the next call ends", || call.is_finished()).await;
    call.await.unwrap().expect("the next call succeeds");
    let state = pool.state();
    assert!(state.endpoints[0].members.iter().all(|m| m.id != dropped), "{state:?}");
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test(start_paused = true)]
async fn members_opened_together_send_their_first_pings_spread_over_half_a_keepalive_time() {
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let time = Duration::from_secs(2);
    let pool = Pool::builder()
        .min_connections(24)
        .max_connections(24)
        .keepalive(Some(idle_keepalive(time, Duration::from_secs(2))))
        .build([server.uri()])
        .await
        .unwrap();
    let opened = tokio::time::Instant::now();
    // When each member's first PING was answered, on the clock, as seen by the state after
    // each step (an answer is seen a step or two after its PING at most).
    let mut first_pong: std::collections::HashMap<u64, Duration> = Default::default();
    clock
        .advance_until(time + GRID, STEP, "every member's first PING is answered", || {
            for member in &pool.state().endpoints[0].members {
                if member.last_ping_rtt.is_some() {
                    first_pong.entry(member.id).or_insert_with(|| opened.elapsed());
                }
            }
            first_pong.len() == 24
        })
        .await;
    let earliest = first_pong.values().min().copied().unwrap();
    let latest = first_pong.values().max().copied().unwrap();
    // Quiet for half the keepalive time at least; and not all at once: 24 draws from a
    // uniform spread over 1 s land within 250 ms of each other with odds below 1e-13.
    assert!(earliest >= time / 2, "a first PING after {earliest:?}");
    assert!(
        latest - earliest >= Duration::from_millis(250),
        "first PINGs between {earliest:?} and {latest:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn keepalive_fails_calls_on_a_dead_connection_at_once_instead_of_at_their_deadline() {
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder().keepalive(Some(keepalive())).build([relay.uri()]).await.unwrap();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = EchoClient::new(pool.clone());
        calls.push(tokio::spawn(async move { client.unary_echo(request(60_000)).await }));
    }
    clock.wait_until(WAIT, "the calls are on the server", || server.active() == 4).await;
    relay.freeze();
    let failed_after = clock
        .advance_until(held_bound(&keepalive()), STEP, "the calls fail", || {
            calls.iter().all(|c| c.is_finished())
        })
        .await;
    println!("calls failed {failed_after:?} after the freeze");
    assert!(
        failed_after >= keepalive().timeout,
        "calls failed after {failed_after:?}, before a PING could time out"
    );
    for call in calls {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert_eq!(pool.state().statistics.closed(EvictionReason::PingTimeout), 1);
}

#[tokio::test]
async fn without_keepalive_a_call_on_a_silently_dropped_connection_hangs() {
    // The contrast: the failure keepalive prevents.
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder().keepalive(None).build([relay.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    relay.freeze();
    let hung = tokio::time::timeout(Duration::from_secs(2), client.unary_echo(request(0))).await;
    assert!(hung.is_err(), "the call should hang on the dead connection, got {hung:?}");
    assert_eq!(pool.state().endpoints[0].members[0].state, MemberState::Ready, "nothing noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_drop_under_load_moves_calls_to_the_other_endpoint() {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let relay = Relay::start(a.addr()).await;
    relay.freeze_new_connections(false);
    let pool = Pool::builder().keepalive(Some(keepalive())).build([relay.uri(), b.uri()]).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let evicted_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (mut client, stop, evicted_at) =
            (EchoClient::new(pool.clone()), stop.clone(), evicted_at.clone());
        callers.push(tokio::spawn(async move {
            let mut late_failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if let Err(status) = client.unary_echo(request(5)).await {
                    // Calls that started after the eviction must not fail.
                    if evicted_at.lock().unwrap().is_some_and(|at| started > at) {
                        late_failures.push(status);
                    }
                }
            }
            late_failures
        }));
    }
    wait_until(WAIT, "load runs on both endpoints", || a.calls() > 50 && b.calls() > 50).await;
    // From now on, connections to A go nowhere: the member dies, and so would a new one.
    relay.freeze_new_connections(true);
    relay.freeze();
    // How soon keepalive finds it is checked on a held clock above; here, where the load
    // needs real time, only that it does.
    wait_until(WAIT, "the frozen member is evicted", || {
        pool.state().statistics.closed(EvictionReason::PingTimeout) >= 1
    })
    .await;
    *evicted_at.lock().unwrap() = Some(Instant::now());
    let b_before = b.calls();
    wait_until(WAIT, "calls keep flowing to B", || b.calls() > b_before + 200).await;
    stop.store(true, Ordering::Relaxed);
    let mut late_failures = Vec::new();
    for caller in callers {
        late_failures.extend(caller.await.unwrap());
    }
    assert!(
        late_failures.is_empty(),
        "{} calls started after the eviction failed: {:?}",
        late_failures.len(),
        late_failures.first()
    );
}

#[tokio::test(start_paused = true)]
async fn idle_members_are_pinged_only_when_permitted() {
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let time = Duration::from_millis(50);
    let quiet = {
        let mut v = Keepalive::new(time, Duration::from_secs(1));
        v.permit_without_stream = false;
        v
    };
    let pool = Pool::builder().keepalive(Some(quiet)).build([server.uri()]).await.unwrap();
    let permitted = Pool::builder()
        .keepalive(Some(idle_keepalive(time, Duration::from_secs(1))))
        .build([server.uri()])
        .await
        .unwrap();
    let pinged = |pool: &Pool| pool.state().endpoints[0].members[0].last_ping_rtt.is_some();
    clock
        .advance_until(time + 2 * GRID, STEP, "the permitted pool has pinged its idle member", || {
            pinged(&permitted)
        })
        .await;
    // Ten keepalive times more of quiet, on the same clock for both pools.
    let early = clock.advance_in_steps(10 * time, STEP, || pinged(&pool)).await;
    assert!(!early, "an idle member was pinged");

    // With a stream open, it is pinged.
    let mut client = EchoClient::new(pool.clone());
    let call = tokio::spawn(async move { client.unary_echo(request(1_000)).await });
    clock.wait_until(WAIT, "the call is on the server", || server.active() == 1).await;
    clock.advance_until(2 * (time + GRID), STEP, "the busy member is pinged", || pinged(&pool)).await;
    clock.advance_until(Duration::from_secs(1), STEP, "the call ends", || call.is_finished()).await;
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_members_above_the_minimum() {
    let clock = HeldClock::hold();
    let server =
        TestServer::start_with(ServerOptions { max_concurrent_streams: Some(1), ..Default::default() }).await;
    let idle = Duration::from_millis(300);
    let pool = Pool::builder()
        .min_connections(1)
        .max_connections(4)
        .idle_timeout(Some(idle))
        .build([server.uri()])
        .await
        .unwrap();
    // Calls that take 10 ms of the clock, one per connection: `n` members carry them.
    let calls_on_members = |n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let mut client = EchoClient::new(pool.clone());
                tokio::spawn(async move { client.unary_echo(request(10)).await })
            })
            .collect();
        let (pool, server, clock) = (&pool, &server, &clock);
        async move {
            clock.wait_until(WAIT, "the calls are on the server", || server.active() == n).await;
            let started = tokio::time::Instant::now();
            clock.advance(Duration::from_millis(10)).await;
            clock.wait_until(WAIT, "the calls end", || calls.iter().all(|c| c.is_finished())).await;
            for call in calls {
                call.await.unwrap().unwrap();
            }
            assert_eq!(pool.state().in_flight(), 0);
            started
        }
    };
    let started = calls_on_members(4).await;
    assert_eq!(pool.state().statistics.connections_created, 4);
    clock
        .advance_until(idle + GRID, STEP, "idle members above the minimum are closed", || {
            pool.state().members() == 1
        })
        .await;
    let after = started.elapsed();
    assert!(after >= idle, "members closed {after:?} after their last stream, before idle_timeout");
    let stats = pool.state().statistics;
    assert_eq!(stats.closed(EvictionReason::IdleTimeout), 3, "{stats:?}");
    // It stays at the minimum, idle for three idle timeouts...
    clock.advance_in_steps(3 * idle, STEP, || pool.state().members() != 1).await;
    assert_eq!(pool.state().members(), 1);
    assert_eq!(pool.state().statistics.closed(EvictionReason::IdleTimeout), 3);
    // ...and the task that kept it there is still at work: a member above the minimum is
    // closed again (a dead task would leave it, and the check above would pass all the same).
    calls_on_members(2).await;
    assert_eq!(pool.state().members(), 2);
    clock
        .advance_until(idle + GRID, STEP, "the extra member is closed too", || {
            pool.state().statistics.closed(EvictionReason::IdleTimeout) == 4
        })
        .await;
    assert_eq!(pool.state().members(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_replaces_members_one_at_a_time_without_failing_calls() {
    let server = TestServer::start().await;
    let pool = Pool::builder()
        .min_connections(3)
        .max_connections(3)
        .max_lifetime(Some(Duration::from_millis(400)))
        .build([server.uri()])
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let (mut client, stop, calls) = (EchoClient::new(pool.clone()), stop.clone(), calls.clone());
        callers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Err(status) = client.unary_echo(request(2)).await {
                    failures.push(status);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let mut fewest_ready = usize::MAX;
    let deadline = Instant::now() + WAIT;
    while pool.state().statistics.closed(EvictionReason::MaxLifetime) < 6 {
        assert!(Instant::now() < deadline, "members were not retired: {:?}", pool.state().statistics);
        let ready =
            pool.state().endpoints[0].members.iter().filter(|m| m.state == MemberState::Ready).count();
        fewest_ready = fewest_ready.min(ready);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for caller in callers {
        failures.extend(caller.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {:?}",
        failures.len(),
        calls.load(Ordering::Relaxed),
        failures.first()
    );
    // One retirement at a time: never more than one member out of three missing.
    assert!(fewest_ready >= 2, "ready members fell to {fewest_ready}");
}

#[tokio::test]
async fn members_are_retired_after_max_streams_per_connection() {
    let server = TestServer::start().await;
    let pool = Pool::builder().max_streams_per_connection(Some(50)).build([server.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    for _ in 0..200 {
        client.unary_echo(request(0)).await.unwrap();
    }
    // Each member retires on its 50th stream: four of them carried the 200 calls, and a
    // fifth replaces the last (min_connections).
    let stats = pool.state().statistics;
    assert_eq!(stats.closed(EvictionReason::MaxStreams), 4, "{stats:?}");
    wait_until(WAIT, "the last one is replaced", || pool.state().statistics.connections_created == 5).await;
    assert_eq!(pool.state().statistics.connect_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn a_member_unused_for_long_is_pinged_before_use_and_replaced_if_dead() {
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    // Keepalive PINGs too rare to matter here.
    let keepalive = idle_keepalive(Duration::from_secs(3600), Duration::from_millis(300));
    let unused = Duration::from_millis(200);
    let pool = Pool::builder()
        .keepalive(Some(keepalive))
        .ping_before_use(Some(unused))
        .build([relay.uri()])
        .await
        .unwrap();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    let first = pool.state().endpoints[0].members[0].id;

    // Still alive after a pause: PINGed, answered, used.
    clock.advance(unused + STEP).await;
    client.unary_echo(request(0)).await.unwrap();
    let state = pool.state();
    assert_eq!(state.endpoints[0].members[0].id, first);
    assert!(state.endpoints[0].members[0].last_ping_rtt.is_some(), "it was PINGed before use");

    // Silently dropped while unused: the PING finds it, the call goes to a new member.
    relay.freeze();
    clock.advance(unused + STEP).await;
    let call = tokio::spawn(async move { client.unary_echo(request(0)).await });
    let bound = grpc_pool::DEFAULT_PING_BEFORE_USE_TIMEOUT + STEP;
    let took = clock.advance_until(bound, STEP, "the call ends", || call.is_finished()).await;
    call.await.unwrap().expect("the call succeeds on a new member");
    assert!(took >= grpc_pool::DEFAULT_PING_BEFORE_USE_TIMEOUT, "the PING before use gave up after {took:?}");
    let state = pool.state();
    assert_eq!(state.statistics.closed(EvictionReason::PingTimeout), 1, "{:?}", state.statistics);
    assert!(state.endpoints[0].members.iter().all(|m| m.id != first));
}

#[tokio::test]
async fn a_server_without_the_health_service_is_healthy_unless_configured_otherwise() {
    // tonic's test server has no grpc.health.v1 service: checks answer UNIMPLEMENTED.
    let server = TestServer::start().await;
    let checks = {
        let mut v = HealthCheck::default();
        v.interval = Duration::from_millis(50);
        v
    };
    let lenient = Pool::builder().health_checks(Some(checks.clone())).build([server.uri()]).await.unwrap();
    let strict = Pool::builder()
        .health_checks(Some({
            let mut v = checks;
            v.unimplemented_is_healthy = false;
            v
        }))
        .build([server.uri()])
        .await
        .unwrap();
    wait_until(WAIT, "the strict pool marks it unhealthy", || !strict.state().endpoints[0].healthy).await;
    let reason = strict.state().endpoints[0].health_reason.clone().unwrap_or_default();
    assert!(reason.contains("UNIMPLEMENTED"), "{reason}");
    // The lenient pool has seen the same answers by now, and still routes there.
    assert!(lenient.state().endpoints[0].healthy);
    EchoClient::new(lenient.clone()).unary_echo(request(0)).await.unwrap();
    let status = EchoClient::new(strict.clone()).unary_echo(request(0)).await.unwrap_err();
    assert!(status.message().contains("every endpoint is unhealthy"), "{}", status.message());
}

/// The pool's streams in flight on `endpoint` now (a `Watch` stream is one).
fn streams_on(pool: &Pool, endpoint: &str) -> u32 {
    pool.state()
        .endpoints
        .iter()
        .filter(|e| e.endpoint.to_string() == endpoint)
        .flat_map(|e| e.members.iter())
        .map(|m| m.in_flight)
        .sum()
}

#[tokio::test]
async fn a_watch_stream_leaves_a_draining_connection_so_a_graceful_shutdown_completes() {
    // A `Watch` stream never ends by itself. Riding a connection the server is draining
    // (GOAWAY), it would keep that connection, and the server's graceful shutdown, waiting
    // forever.
    let server = TestServer::start_with(ServerOptions { health: true, ..Default::default() }).await;
    let other = TestServer::start_with(ServerOptions { health: true, ..Default::default() }).await;
    let watch = {
        let mut v = HealthCheck::default();
        v.interval = Duration::from_millis(50);
        v.mode = grpc_pool::CheckMode::Watch;
        v
    };
    let pool = Pool::builder().health_checks(Some(watch)).build([server.uri(), other.uri()]).await.unwrap();
    let uri = server.uri();
    wait_until(WAIT, "the Watch stream is open", || streams_on(&pool, &uri) == 1).await;

    let shutdown = tokio::time::timeout(WAIT, server.shutdown()).await;
    assert!(shutdown.is_ok(), "the graceful shutdown still waits after {WAIT:?}: {:#?}", pool.state());
    assert!(pool.state().statistics.closed(EvictionReason::GoAway) >= 1);

    // The same for a connection the pool drains itself: a removed endpoint's closes.
    let relay = Relay::start(other.addr()).await;
    pool.add_endpoint(&relay.uri()).unwrap();
    let relayed = relay.uri();
    wait_until(WAIT, "the relayed endpoint's Watch stream is open", || streams_on(&pool, &relayed) == 1)
        .await;
    pool.remove_endpoint(&relayed).unwrap();
    wait_until(WAIT, "the removed endpoint's connection closed", || relay.open_connections() == 0).await;
}

#[tokio::test]
async fn keepalive_pings_keep_a_connection_alive_through_an_idle_expiring_middlebox() {
    // A middlebox that forgets flows quiet for 1 s and answers their next packet with
    // RST (a NAT gateway or load balancer's idle timeout). The pool PINGs after 200 ms of
    // quiet, so its connection is never quiet that long; a pool without keepalive loses its
    // connection and the first call after the quiet spell.
    through_an_idle_expiring_middlebox(idle_keepalive(
        Duration::from_millis(200),
        Duration::from_millis(500),
    ))
    .await;
}

#[tokio::test]
async fn a_keepalive_timeout_longer_than_its_time_does_not_space_the_pings_out() {
    // The health task learns that a PING was answered when it next looks at the member: at
    // the PING's deadline, or after the keepalive time if that comes first. Looking only at
    // the deadline (3 s here) would leave the connection quiet for 3 s between PINGs, and
    // the middlebox would forget it.
    through_an_idle_expiring_middlebox(idle_keepalive(Duration::from_millis(200), Duration::from_secs(3)))
        .await;
}

async fn through_an_idle_expiring_middlebox(keepalive: Keepalive) {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    relay.set_idle_expiry(Some(Duration::from_secs(1)));
    let quiet = Duration::from_millis(2_500);

    let pinging = Pool::builder().keepalive(Some(keepalive)).build([relay.uri()]).await.unwrap();
    let mut client = EchoClient::new(pinging.clone());
    client.unary_echo(request(0)).await.unwrap();
    tokio::time::sleep(quiet).await; // the quiet spell is what is tested
    client.unary_echo(request(0)).await.expect("the PINGed connection survived the quiet spell");
    assert_eq!(relay.accepted(), 1, "the connection was replaced: {:#?}", pinging.state());
    pinging.close().await;

    let silent = Pool::builder().build([relay.uri()]).await.unwrap();
    let mut client = EchoClient::new(silent.clone());
    client.unary_echo(request(0)).await.unwrap();
    tokio::time::sleep(quiet).await;
    let status = client.unary_echo(request(0)).await.expect_err("the middlebox forgot the quiet connection");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_server_enforcing_a_ping_policy_sends_too_many_pings_and_no_call_fails() {
    // tonic servers have no PING policy; the testkit's enforcer adds the C core's in front
    // of one (here: PINGs at least 1 s apart without data, 2 strikes). A 100 ms keepalive on
    // a quiet connection breaks it within half a second.
    let server = TestServer::start().await;
    let enforcer = grpc_pool_testkit::PingEnforcer::start(
        server.addr(),
        grpc_pool_testkit::PingPolicy { min_interval: Duration::from_secs(1), max_strikes: 2 },
    )
    .await;
    let pool = Pool::builder()
        .keepalive(Some(idle_keepalive(Duration::from_millis(100), Duration::from_secs(1))))
        .build([enforcer.uri()])
        .await
        .unwrap();
    let mut events = pool.events();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();
    let event = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(grpc_pool::PoolEvent::GoAway { code, debug_data, .. }) => break (code, debug_data),
                Some(_) => continue,
                None => panic!("the pool closed"),
            }
        }
    })
    .await
    .expect("a GOAWAY within the wait");
    assert_eq!(event.0, u32::from(h2::Reason::ENHANCE_YOUR_CALM));
    assert_eq!(event.1, "too_many_pings");
    assert!(enforcer.goaways() >= 1);
    client.unary_echo(request(0)).await.expect("the pool reconnected");
}

/// The goal of issue 13: after an outage, traffic is back this soon after the server answers
/// health checks again.
const RECOVERY_GOAL: Duration = Duration::from_millis(1_500);
/// How long the server stays down (at least: until it is marked unhealthy, if that is later).
const OUTAGE: Duration = Duration::from_secs(3);

/// Reconnects at most ~60 ms (50 ms and its jitter) after the port opens again, so that what
/// the outage tests measure is the health task's part of the recovery, not the reconnect
/// backoff's (tests/pool.rs covers that).
fn quick_reconnects() -> BackoffConfig {
    {
        let mut v = BackoffConfig::default();
        v.base = Duration::from_millis(10);
        v.max = Duration::from_millis(50);
        v
    }
}

/// What one outage looked like, from the test's side.
struct Outage {
    /// From the server going down to the endpoint marked unhealthy.
    marked_unhealthy_after: Duration,
    /// From the server going down to it answering again.
    down_for: Duration,
    /// From the server answering again to the first call that succeeded.
    traffic_back_after: Duration,
}

/// Calls flow to one server with health checks `checks`; the server shuts down (GOAWAY, its
/// port refusing connections) until the endpoint is marked unhealthy and for [`OUTAGE`] at
/// least, then starts again on the same port, answering health checks (SERVING) at once.
async fn outage_and_recovery(checks: HealthCheck) -> Outage {
    let options = ServerOptions { health: true, ..Default::default() };
    let server = TestServer::start_with(options.clone()).await;
    let port = server.addr().port();
    let pool = Pool::builder()
        .health_checks(Some(checks.clone()))
        .backoff(quick_reconnects())
        .build([server.uri()])
        .await
        .unwrap();
    // When the first call to succeed after the test last cleared it did.
    let first_ok = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (mut client, first_ok, stop) = (EchoClient::new(pool.clone()), first_ok.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.unary_echo(request(1)).await {
                    Ok(_) => {
                        first_ok.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                    // While the endpoint is unhealthy calls fail at once: pace them.
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    wait_until(WAIT, "calls flow", || first_ok.lock().unwrap().is_some()).await;

    server.shutdown().await;
    let down_at = Instant::now();
    // Failed checks in a row, each one interval (+10%) apart, plus the first one's wait.
    let marking = checks.interval.mul_f64(1.1) * (checks.unhealthy_threshold + 1) + checks.timeout + SLACK;
    wait_until(marking, "the endpoint is marked unhealthy", || !pool.state().endpoints[0].healthy).await;
    let marked_unhealthy_after = down_at.elapsed();
    // The outage's length is what the test sets, not a guess at some state.
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;

    *first_ok.lock().unwrap() = None;
    let server = TestServer::start_with(ServerOptions { port: Some(port), ..options }).await;
    let back = Instant::now();
    let down_for = back - down_at;
    // Generous: long enough for today's schedule to show its figure rather than time out.
    let recovery = checks.interval.mul_f64(1.1) * (checks.healthy_threshold + 1) + SLACK;
    wait_until(recovery, "a call succeeds again", || first_ok.lock().unwrap().is_some()).await;
    let traffic_back_after = first_ok.lock().unwrap().unwrap().saturating_duration_since(back);
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    drop(server);
    Outage { marked_unhealthy_after, down_for, traffic_back_after }
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "marked unhealthy {:?} after the server went down, down for {:?}; traffic back {:?} after it \
             answered again",
            self.marked_unhealthy_after, self.down_for, self.traffic_back_after
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_traffic_is_back_within_1_5_s_of_the_server_answering_health_checks() {
    // The default health checks: intervals, thresholds and mode.
    let checks = {
        let mut v = HealthCheck::default();
        v.service = "echo.Echo".into();
        v
    };
    let outage = outage_and_recovery(checks).await;
    println!("default checks (Watch): {outage}");
    // The new connection's Watch stream says SERVING at once.
    assert!(outage.traffic_back_after <= RECOVERY_GOAL, "{outage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_polled_health_checks_bring_traffic_back_within_1_5_s() {
    // Check polling at the default intervals: the new connection is checked at once, and the
    // second passing check (healthy_threshold) comes one unhealthy interval (1 s, +10%) later.
    let checks = {
        let mut v = HealthCheck::default();
        v.service = "echo.Echo".into();
        v.mode = CheckMode::Poll;
        v
    };
    let outage = outage_and_recovery(checks).await;
    println!("polled checks: {outage}");
    assert!(outage.traffic_back_after <= RECOVERY_GOAL, "{outage}");
}

/// `Check` polls of `echo.Echo` every 30 s (far beyond a test), `unhealthy_interval` while
/// unhealthy, one verdict enough either way.
fn polled_once(unhealthy_interval: Duration) -> HealthCheck {
    let mut checks = HealthCheck::service("echo.Echo");
    checks.mode = CheckMode::Poll;
    checks.interval = Duration::from_secs(30);
    checks.unhealthy_interval = unhealthy_interval;
    checks.unhealthy_threshold = 1;
    checks.healthy_threshold = 1;
    checks
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_endpoint_is_checked_every_unhealthy_interval() {
    let clock = HeldClock::hold();
    // An interval far beyond the test: only the unhealthy interval can bring it back soon.
    let server = TestServer::start_with(ServerOptions { health: true, ..Default::default() }).await;
    server.set_serving(false).await;
    let checks = polled_once(Duration::from_millis(100));
    let pool = Pool::builder().health_checks(Some(checks.clone())).build([server.uri()]).await.unwrap();
    // The new connection is checked at once: with the clock standing still.
    clock.wait_until(WAIT, "the first check marks it unhealthy", || !pool.state().endpoints[0].healthy).await;
    server.set_serving(true).await;
    // The next check comes one unhealthy interval (+/-10%) after that one, on the task's grid.
    let bound = checks.unhealthy_interval.mul_f64(1.1) + GRID;
    assert!(bound < checks.interval);
    let after = clock
        .advance_until(bound, STEP, "a check at the unhealthy interval finds it serving", || {
            pool.state().endpoints[0].healthy
        })
        .await;
    println!("healthy {after:?} after the server said SERVING");
    assert!(after >= checks.unhealthy_interval.mul_f64(0.9), "checked again after {after:?}");
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_endpoint_is_checked_as_soon_as_a_new_connection_to_it_is_ready() {
    let clock = HeldClock::hold();
    // Both intervals far beyond the test, and the clock standing still from here on: only
    // the check on the new connection can bring the endpoint back.
    let server = TestServer::start_with(ServerOptions { health: true, ..Default::default() }).await;
    server.set_serving(false).await;
    let relay = Relay::start(server.addr()).await;
    let checks = polled_once(Duration::from_secs(30));
    let pool = Pool::builder().health_checks(Some(checks.clone())).build([relay.uri()]).await.unwrap();
    clock.wait_until(WAIT, "the first check marks it unhealthy", || !pool.state().endpoints[0].healthy).await;
    server.set_serving(true).await;
    // The connection breaks; the pool opens another at once (no connect has failed).
    relay.reset();
    clock
        .wait_until(WAIT, "the endpoint is checked on its new connection", || {
            pool.state().endpoints[0].healthy
        })
        .await;
    assert_eq!(relay.accepted(), 2);
    EchoClient::new(pool.clone()).unary_echo(request(0)).await.unwrap();
}

/// A server whose health service has `Check` only: `Watch` answers `UNIMPLEMENTED` (as
/// servers with a partial grpc.health.v1 do). `Check` says SERVING or NOT_SERVING as told.
/// Plain `h2`, so the test decides exactly what each method answers.
struct CheckOnlyServer {
    addr: std::net::SocketAddr,
    serving: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
    watches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CheckOnlyServer {
    async fn start(serving: bool) -> CheckOnlyServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = Arc::new(AtomicBool::new(serving));
        let (checks, watches) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, c, w) = (serving.clone(), checks.clone(), watches.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (serving, checks, watches) = (s.clone(), c.clone(), w.clone());
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(tcp).await else { return };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        let head = || {
                            http::Response::builder().status(200).header("content-type", "application/grpc")
                        };
                        if request.uri().path() == "/grpc.health.v1.Health/Check" {
                            checks.fetch_add(1, Ordering::Relaxed);
                            // HealthCheckResponse { status }: field 1, varint; SERVING is 1,
                            // NOT_SERVING 2. Framed: no compression, 2 bytes long.
                            let status = if serving.load(Ordering::Relaxed) { 1 } else { 2 };
                            let Ok(mut stream) = respond.send_response(head().body(()).unwrap(), false)
                            else {
                                continue;
                            };
                            let _ = stream.send_data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]), false);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let _ = stream.send_trailers(trailers);
                        } else {
                            // Watch, and anything else: a trailers-only UNIMPLEMENTED.
                            if request.uri().path() == "/grpc.health.v1.Health/Watch" {
                                watches.fetch_add(1, Ordering::Relaxed);
                            }
                            let response = head().header("grpc-status", "12").body(()).unwrap();
                            let _ = respond.send_response(response, true);
                        }
                    }
                });
            }
        });
        CheckOnlyServer { addr, serving, checks, watches, task }
    }
}

impl Drop for CheckOnlyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_server_without_watch_is_polled_with_check_instead() {
    // Watch is the default mode. This server's NOT_SERVING can only be heard through Check:
    // taking its Watch's UNIMPLEMENTED as the verdict would leave the endpoint healthy
    // (unimplemented_is_healthy).
    let server = CheckOnlyServer::start(false).await;
    let checks = {
        let mut v = HealthCheck::default();
        v.interval = Duration::from_millis(50);
        v
    };
    assert_eq!(checks.mode, CheckMode::Watch);
    let pool =
        Pool::builder().health_checks(Some(checks)).build([format!("http://{}", server.addr)]).await.unwrap();
    wait_until(WAIT, "Check finds it NOT_SERVING", || !pool.state().endpoints[0].healthy).await;
    let reason = pool.state().endpoints[0].health_reason.clone().unwrap_or_default();
    assert!(reason.contains("NOT_SERVING"), "{reason}");
    server.serving.store(true, Ordering::Relaxed);
    wait_until(WAIT, "Check finds it SERVING again", || pool.state().endpoints[0].healthy).await;
    assert!(server.checks.load(Ordering::Relaxed) >= 4);
    // Asked once: the fallback holds for the endpoint.
    assert_eq!(server.watches.load(Ordering::Relaxed), 1);
}

// The panic is asked for through a test hook (feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[tokio::test]
async fn a_health_task_that_panics_is_restarted_and_goes_on_judging_endpoints() {
    let server = TestServer::start_with(ServerOptions { health: true, ..Default::default() }).await;
    let checks = {
        let mut v = HealthCheck::default();
        v.service = "echo.Echo".into();
        v.mode = CheckMode::Poll;
        v.interval = Duration::from_millis(100);
        v.unhealthy_interval = Duration::from_millis(100);
        v.timeout = Duration::from_millis(500);
        v.unhealthy_threshold = 1;
        v.healthy_threshold = 1;
        v
    };
    let pool = Pool::builder()
        .name("panicking-health-task")
        .health_checks(Some(checks))
        .build([server.uri()])
        .await
        .unwrap();
    server.set_serving(false).await;
    wait_until(WAIT, "the endpoint is marked unhealthy", || !pool.state().endpoints[0].healthy).await;

    let before = grpc_pool::__private::health::panics_taken();
    grpc_pool::__private::health::panic_health_task("panicking-health-task");
    wait_until(WAIT, "the health task panicked", || grpc_pool::__private::health::panics_taken() > before)
        .await;
    // The restarted task takes the pool's verdict as its own: a passing check brings the
    // endpoint back (a task starting from "healthy" would see no change to make).
    server.set_serving(true).await;
    wait_until(WAIT, "the restarted task marks the endpoint healthy again", || {
        pool.state().endpoints[0].healthy
    })
    .await;
    EchoClient::new(pool.clone()).unary_echo(request(0)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn keepalive_goes_on_for_a_draining_member_until_its_last_stream_ends() {
    // A call with no deadline is on a member when max_lifetime drains it; then its connection
    // goes silent. Keepalive must go on PINGing the draining member for that call's sake and
    // kill it, or the call waits for ever (before, the task let go of draining members).
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    // No limit on PINGs without data: the call is silent from the start, and the default
    // two would be spent before the drop (that limit is the server's policy's business).
    let keepalive = idle_keepalive(Duration::from_secs(1), Duration::from_secs(1));
    let pool = Pool::builder()
        .keepalive(Some(keepalive.clone()))
        .max_lifetime(Some(Duration::from_secs(2)))
        .build([relay.uri()])
        .await
        .unwrap();
    let mut client = EchoClient::new(pool.clone());
    let call = tokio::spawn(async move { client.unary_echo(request(3_600_000)).await });
    let drained = clock
        .advance_in_steps(Duration::from_secs(10), STEP, || {
            pool.state().statistics.closed(EvictionReason::MaxLifetime) == 1
        })
        .await;
    assert!(drained, "max_lifetime never drained the member: {:?}", pool.state());
    assert_eq!(server.active(), 1, "the call is still on the draining member");
    relay.freeze();
    let found =
        clock.advance_in_steps(keepalive.time + keepalive.timeout + SLACK, STEP, || call.is_finished()).await;
    assert!(found, "the call on the silent draining member never ended: {:?}", pool.state());
    let status = call.await.unwrap().expect_err("its connection died");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Counted once, for the drain that took it out of service.
    assert_eq!(pool.state().statistics.closed(EvictionReason::MaxLifetime), 1);
}
