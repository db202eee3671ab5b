//! A pool built with no configuration at all cures the idle-connection problem without
//! tripping any server's PING policy. Against the gRPC C core (Python grpcio) with its
//! DEFAULT policy: a PING within 5 minutes of the previous one while calls are open, or
//! within 2 hours while none are, is a strike; HEADERS or DATA from the server forgive them
//! all; the third strike earns GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings". A tonic `Channel`
//! with its defaults runs the same scenarios for contrast.
//!
//! These tests wait the defaults out (20 s keepalive, 10 s timeout, 30 s before a PING
//! before use); the last one compresses an hour of idle/busy cycles by scaling the pool's
//! quiet thresholds and the server's PING interval down by the same factor.

use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{EvictionReason, Keepalive, Pool, PoolEvent};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, PeerOptions, PingEnforcer, PingPolicy, PythonPeer, Relay};
use tonic::Code;

/// Scheduling slack on top of a bound made of configured times, for a shared 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn request(delay_ms: u32, repeat: u32) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"idle"), repeat, delay_ms }
}

fn with_deadline(timeout: Duration) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(request(0, 0));
    request.set_timeout(timeout);
    request
}

/// A proxy in front of `target` that only counts: PINGs, PINGs between two frames of the
/// server's data, and the server's GOAWAYs. The server behind it enforces its own policy.
async fn tap(target: std::net::SocketAddr) -> PingEnforcer {
    let tap =
        PingEnforcer::start(target, PingPolicy { min_interval: Duration::ZERO, max_strikes: u32::MAX }).await;
    tap.set_enforcing(false);
    tap
}

/// The C core with its default policy; the pool (defaults) and a tonic `Channel` (defaults)
/// each reach it through a relay of its own that can drop their flows silently.
struct Scene {
    peer: PythonPeer,
    relay: Relay,
    channel_relay: Relay,
    pool: Pool,
    channel: tonic::transport::Channel,
}

impl Scene {
    async fn start() -> Scene {
        let peer = PythonPeer::start(PeerOptions::default()).await;
        let relay = Relay::start(peer.addr()).await;
        let channel_relay = Relay::start(peer.addr()).await;
        let pool = Pool::builder().build([relay.uri()]).await.unwrap();
        let channel =
            tonic::transport::Endpoint::from_shared(channel_relay.uri()).unwrap().connect().await.unwrap();
        Scene { peer, relay, channel_relay, pool, channel }
    }
}

fn is_too_many_pings(event: &PoolEvent) -> bool {
    matches!(event, PoolEvent::GoAway { debug_data, .. } if debug_data == "too_many_pings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_silently_under_load_is_found_at_the_first_deadline_and_replaced() {
    let Scene { peer: _peer, relay, channel_relay, pool, channel } = Scene::start().await;
    EchoClient::new(channel.clone()).unary_echo(request(0, 0)).await.unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let deadline = Duration::from_secs(5);
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = EchoClient::new(pool.clone());
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !*stopped.borrow() {
                    let started = Instant::now();
                    let result = client.unary_echo(with_deadline(deadline)).await;
                    outcomes.push((started, result.err()));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                outcomes
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), "calls flow", || pool.state().statistics.checkouts_direct > 100)
        .await;

    relay.freeze();
    channel_relay.freeze();
    let frozen_at = Instant::now();
    // The first deadline to pass on the silent connection (5 s) PINGs it; no PONG within
    // 1 s kills it. Keepalive alone would take 20 s + 10 s.
    let first_sign_bound = deadline + Duration::from_secs(1);
    let keepalive_bound = grpc_pool::DEFAULT_KEEPALIVE_TIME + grpc_pool::DEFAULT_KEEPALIVE_TIMEOUT;
    wait_until(keepalive_bound + SLACK, "the dead member is evicted", || {
        let stats = pool.state().statistics;
        stats.closed(EvictionReason::PingTimeout) + stats.closed(EvictionReason::IoError) >= 1
    })
    .await;
    let found_after = frozen_at.elapsed();
    let evicted_at = Instant::now();
    wait_until(Duration::from_secs(10), "a new connection is up", || {
        let state = pool.state();
        state.statistics.connections_created >= 2 && !state.endpoints[0].members.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // calls on the new connection
    stop.send(true).unwrap();
    let mut late_failures = Vec::new();
    let (mut ok_after, mut failed_before) = (0, 0);
    for caller in callers {
        for (started, status) in caller.await.unwrap() {
            match (started >= evicted_at, status) {
                (true, None) => ok_after += 1,
                (true, Some(status)) => late_failures.push(status),
                (false, Some(_)) => failed_before += 1,
                (false, None) => {}
            }
        }
    }
    println!("silent drop under load: found after {found_after:?}; {failed_before} calls in flight on it failed, {ok_after} after succeeded");
    assert!(found_after <= first_sign_bound + SLACK, "found after {found_after:?}");
    assert!(failed_before <= 16, "{failed_before} calls failed on the silent connection");
    assert!(late_failures.is_empty(), "calls started after the eviction failed: {late_failures:?}");
    assert!(ok_after > 0);

    // The Channel (no keepalive by default) is still on its dead connection.
    let status =
        EchoClient::new(channel).unary_echo(with_deadline(Duration::from_secs(1))).await.unwrap_err();
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_silently_while_idle_is_checked_before_use_and_no_call_fails() {
    let Scene { peer: _peer, relay, channel_relay, pool, channel } = Scene::start().await;
    let mut client = EchoClient::new(pool.clone());
    let mut usual = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        client.unary_echo(request(0, 0)).await.unwrap();
        usual.push(started.elapsed());
    }
    EchoClient::new(channel.clone()).unary_echo(request(0, 0)).await.unwrap();
    relay.freeze();
    channel_relay.freeze();
    let quiet_enough = grpc_pool::DEFAULT_PING_BEFORE_USE + Duration::from_secs(1);
    wait_until(quiet_enough + SLACK, "the member has been quiet past the check-before-use threshold", || {
        pool.state().endpoints[0].members.iter().all(|m| m.idle >= quiet_enough)
    })
    .await;

    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        client.unary_echo(with_deadline(Duration::from_secs(20))).await.unwrap();
        took.push(started.elapsed());
    }
    usual.sort();
    let typical = usual[usual.len() / 2];
    println!(
        "silent drop while idle: first call {:?} (typical {typical:?}), the rest at most {:?}",
        took[0],
        took[1..].iter().max().unwrap()
    );
    assert!(
        took[0] <= typical + grpc_pool::DEFAULT_PING_BEFORE_USE_TIMEOUT + SLACK,
        "the first call after the drop took {:?}",
        took[0]
    );
    let stats = pool.state().statistics;
    assert_eq!(stats.closed(EvictionReason::PingTimeout), 1, "{stats:?}");
    assert_eq!(pool.state().endpoints[0].members.len(), 1);

    // The Channel sends its call down the dead connection and waits for its deadline.
    let status =
        EchoClient::new(channel).unary_echo(with_deadline(Duration::from_secs(2))).await.unwrap_err();
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
}

#[tokio::test]
async fn a_call_silent_for_a_minute_costs_two_pings_and_no_goaway() {
    let peer = PythonPeer::start(PeerOptions::default()).await;
    let tap = tap(peer.addr()).await;
    let pool = Pool::builder().build([tap.uri()]).await.unwrap();
    let mut events = pool.events();
    // One message after a minute of silence: the stream is open and nothing is read.
    let mut stream =
        EchoClient::new(pool.clone()).server_streaming_echo(request(60_000, 1)).await.unwrap().into_inner();
    let message = stream.message().await.unwrap().expect("the message after a minute");
    assert_eq!(&message.message[..], b"idle");
    assert!(stream.message().await.unwrap().is_none());

    let pings = tap.pings();
    println!("a minute of silence: {pings} PINGs, at most {} without data", tap.most_pings_without_data());
    assert_eq!(tap.server_goaways(), 0, "the server sent GOAWAY");
    assert!(pings >= 2, "keepalive did not PING the quiet connection ({pings} PINGs)");
    assert_eq!(tap.most_pings_without_data(), 2, "PINGs between two frames of data");
    while let Some(event) = events.try_recv() {
        assert!(!is_too_many_pings(&event), "{event:?}");
    }
    assert_eq!(pool.state().statistics.closed(EvictionReason::PingTimeout), 0);
}

#[tokio::test]
async fn an_hour_of_idle_and_busy_compressed_provokes_no_goaway_and_fails_no_call() {
    // The defaults and the server's PING interval scaled down 60 times: an hour in a minute.
    // The server's 2 hours for PINGs without calls cannot be scaled, which only makes it
    // stricter here.
    const SCALE: u32 = 60;
    let peer = PythonPeer::start(PeerOptions {
        min_ping_interval_without_data_ms: Some(300_000 / u64::from(SCALE)),
        ..Default::default()
    })
    .await;
    let tap = tap(peer.addr()).await;
    let pool = Pool::builder()
        .keepalive(Some(Keepalive::new(
            grpc_pool::DEFAULT_KEEPALIVE_TIME / SCALE,
            grpc_pool::DEFAULT_KEEPALIVE_TIMEOUT / SCALE,
        )))
        .ping_before_use(Some(grpc_pool::DEFAULT_PING_BEFORE_USE / SCALE))
        .build([tap.uri()])
        .await
        .unwrap();
    let mut events = pool.events();
    let mut client = EchoClient::new(pool.clone());
    let mut calls = 0;
    for _ in 0..20 {
        // Idle past the check-before-use threshold...
        tokio::time::sleep(grpc_pool::DEFAULT_PING_BEFORE_USE / SCALE * 2).await;
        // ...then busy: calls, and one that is silent for three keepalive times.
        for _ in 0..5 {
            client.unary_echo(request(0, 0)).await.unwrap();
            calls += 1;
        }
        let silent_ms = (3 * grpc_pool::DEFAULT_KEEPALIVE_TIME / SCALE).as_millis() as u32;
        let mut stream = client.server_streaming_echo(request(silent_ms, 1)).await.unwrap().into_inner();
        while stream.message().await.unwrap().is_some() {}
        calls += 1;
    }
    let mut too_many_pings = 0;
    while let Some(event) = events.try_recv() {
        too_many_pings += usize::from(is_too_many_pings(&event));
    }
    println!(
        "an hour compressed: {calls} calls, 0 failed; {} PINGs, at most {} without data; {too_many_pings} too_many_pings",
        tap.pings(),
        tap.most_pings_without_data()
    );
    assert_eq!(too_many_pings, 0);
    assert_eq!(tap.server_goaways(), 0);
    assert!(tap.most_pings_without_data() <= 2);
    assert!(tap.pings() >= 20, "keepalive and the checks before use should have PINGed: {}", tap.pings());
}
