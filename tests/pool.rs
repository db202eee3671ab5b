//! The pool against real tonic servers on 127.0.0.1: every RPC kind, growth under load,
//! saturation, GOAWAY, dead connections, cancellation, and bb8's pool semantics re-expressed
//! for a multiplexed pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::state::{MemberState, RetryReason};
use grpc_pool::{BackoffConfig, ErrorKind, EvictionReason, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{
    unused_uri, wait_until, Behaviour, FrameServer, HeldClock, Relay, ServerOptions, TestServer,
};
use tokio_stream::StreamExt;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn request(message: &'static [u8], delay_ms: u32) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(message), repeat: 0, delay_ms }
}

fn client(pool: &Pool) -> EchoClient<Pool> {
    EchoClient::new(pool.clone()).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

fn fast_backoff() -> BackoffConfig {
    {
        let mut v = BackoffConfig::default();
        v.base = Duration::from_millis(20);
        v.max = Duration::from_millis(200);
        v
    }
}

#[tokio::test]
async fn all_four_rpc_kinds_with_large_messages() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    all_four_rpc_kinds(&pool).await;
    assert_eq!(server.calls(), 4);
}

#[cfg(unix)]
#[tokio::test]
async fn a_unix_socket_endpoint_serves_all_four_rpc_kinds() {
    let server = grpc_pool_testkit::UnixTestServer::start().await;
    assert!(server.uri().starts_with("unix:///"), "{}", server.uri());
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let state = pool.state();
    assert_eq!(state.endpoints[0].endpoint.to_string(), server.uri());
    assert!(state.endpoints[0].members.iter().any(|m| m.state == MemberState::Ready));
    all_four_rpc_kinds(&pool).await;
    assert_eq!(server.calls(), 4);
}

#[tokio::test]
async fn a_missing_unix_socket_fails_the_build_with_its_path() {
    let path = std::env::temp_dir().join(format!("grpc-pool-missing-{}.sock", std::process::id()));
    let err = Pool::builder().build([format!("unix://{}", path.display())]).await.unwrap_err();
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

/// A unary, a server-streaming, a client-streaming and a bidirectional call through `pool`,
/// with 5 MiB messages, each checked; then every slot is back.
async fn all_four_rpc_kinds(pool: &Pool) {
    let mut client = client(pool);
    let big = Bytes::from(vec![0xa5u8; 5 << 20]);

    // Unary, 5 MiB each way.
    let reply = client
        .unary_echo(EchoRequest { message: big.clone(), repeat: 0, delay_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, big);

    // Server streaming: three 5 MiB messages back.
    let mut stream = client
        .server_streaming_echo(EchoRequest { message: big.clone(), repeat: 3, delay_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while let Some(item) = stream.next().await {
        assert_eq!(item.unwrap().message, big);
        received += 1;
    }
    assert_eq!(received, 3);

    // Client streaming: two 5 MiB messages up, 10 MiB back.
    let parts = vec![
        EchoRequest { message: big.clone(), repeat: 0, delay_ms: 0 },
        EchoRequest { message: big.clone(), repeat: 0, delay_ms: 0 },
    ];
    let reply = client.client_streaming_echo(tokio_stream::iter(parts)).await.unwrap().into_inner();
    assert_eq!(reply.message.len(), 10 << 20);

    // Bidirectional: each message echoed as it arrives, with the request stream still open.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidirectional_streaming_echo(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..4u8 {
        let message = Bytes::from(vec![i; if i == 3 { 5 << 20 } else { 10 }]);
        tx.send(EchoRequest { message: message.clone(), repeat: 0, delay_ms: 0 }).await.unwrap();
        assert_eq!(replies.next().await.unwrap().unwrap().message, message);
    }
    drop(tx);
    assert!(replies.next().await.is_none());

    wait_until(WAIT, "every slot is returned", || pool.state().in_flight() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_calls_grow_the_pool_over_capped_servers() {
    let options = ServerOptions { max_concurrent_streams: Some(50), ..Default::default() };
    let (a, b) = (TestServer::start_with(options.clone()).await, TestServer::start_with(options).await);
    let pool = Pool::builder()
        .max_connections(8)
        .checkout_timeout(Duration::from_secs(30))
        .build([a.uri(), b.uri()])
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..2_000 {
        let mut client = client(&pool);
        calls.spawn(
            async move { client.unary_echo(request(b"hi", 20)).await.map(|r| r.into_inner().message) },
        );
    }
    let mut peak_members = 0;
    let mut failures = Vec::new();
    while let Some(result) = calls.join_next().await {
        peak_members = peak_members.max(pool.state().members());
        match result.unwrap() {
            Ok(message) => assert_eq!(&message[..], b"hi"),
            Err(status) => failures.push(status),
        }
    }
    assert!(failures.is_empty(), "{} calls failed, first: {:?}", failures.len(), failures.first());
    let state = pool.state();
    assert!(
        peak_members > 2,
        "the pool should have grown past one member per endpoint, peaked at {peak_members}"
    );
    for endpoint in &state.endpoints {
        assert!(endpoint.members.len() <= 8, "{endpoint:?}");
        for member in &endpoint.members {
            assert_eq!(member.max_streams, 50, "the server's limit applies: {member:?}");
        }
    }
    assert_eq!(a.calls() + b.calls(), 2_000);
    assert!(a.calls() > 200 && b.calls() > 200, "both endpoints carry load: {} / {}", a.calls(), b.calls());
    assert!(state.statistics.checkouts_waited > 0, "{:?}", state.statistics);
}

#[tokio::test(start_paused = true)]
async fn saturation_past_max_connections_waits_then_fails_with_a_clear_error() {
    // The clock moves only when the test says: the long calls outlast the checkout timeout
    // however slow the machine, and the wait ends at checkout_timeout exactly.
    let clock = HeldClock::hold();
    let server =
        TestServer::start_with(ServerOptions { max_concurrent_streams: Some(2), ..Default::default() }).await;
    let timeout = Duration::from_millis(300);
    let pool = Pool::builder()
        .name("saturated")
        .max_connections(1)
        .checkout_timeout(timeout)
        .build([server.uri()])
        .await
        .unwrap();
    let mut long_calls = Vec::new();
    for _ in 0..2 {
        let mut client = client(&pool);
        long_calls.push(tokio::spawn(async move { client.unary_echo(request(b"slow", 2_000)).await }));
    }
    clock.wait_until(WAIT, "both slots are taken", || pool.state().in_flight() == 2).await;

    let started = tokio::time::Instant::now();
    let mut late = client(&pool);
    let late = tokio::spawn(async move { late.unary_echo(request(b"late", 0)).await });
    let step = Duration::from_millis(10);
    let early = clock.advance_in_steps(timeout - step, step, || late.is_finished()).await;
    assert!(!early, "gave up after {:?}, before checkout_timeout", started.elapsed());
    // tokio's timers round up to the next millisecond.
    clock.advance_until(2 * step, step, "the checkout gives up", || late.is_finished()).await;
    let status = late.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let message = status.message();
    for part in
        ["pool `saturated`", &server.uri(), "checkout_timeout", "2/2 streams busy", "max_connections 1"]
    {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
    assert_eq!(pool.state().statistics.checkout_timeouts, 1);
    clock
        .advance_until(Duration::from_secs(2), step, "the long calls end", || {
            long_calls.iter().all(|c| c.is_finished())
        })
        .await;
    for call in long_calls {
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_of_one_endpoint_under_load_fails_no_call() {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let pool = Pool::builder().backoff(fast_backoff()).build([a.uri(), b.uri()]).await.unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let done = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..32 {
        let (mut client, stop, done) = (client(&pool), stop.clone(), done.clone());
        callers.push(tokio::spawn(async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            let mut failures = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => return failures,
                    result = client.unary_echo(request(b"x", 2)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        if let Err(status) = result { failures.push(status) }
                    }
                }
            }
        }));
    }
    wait_until(WAIT, "load is running", || done.load(Ordering::Relaxed) > 500).await;
    let a_calls = a.calls();
    a.shutdown().await;
    let after = done.load(Ordering::Relaxed);
    wait_until(WAIT, "more load has run", || done.load(Ordering::Relaxed) > after + 1_000).await;
    stop.notify_waiters();
    let mut failures = Vec::new();
    for caller in callers {
        failures.extend(caller.await.unwrap());
    }
    assert!(failures.is_empty(), "{} calls failed, first: {:?}", failures.len(), failures.first());
    assert!(a_calls > 0);
    assert!(pool.state().statistics.closed(EvictionReason::GoAway) >= 1, "{:?}", pool.state().statistics);
    drop(b);
}

#[tokio::test]
async fn a_killed_member_is_replaced_and_never_used_again() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder().backoff(fast_backoff()).build([relay.uri()]).await.unwrap();
    let mut client = client(&pool);
    client.unary_echo(request(b"before", 0)).await.unwrap();
    let old = pool.state().endpoints[0].members[0].id;

    relay.reset();
    wait_until(WAIT, "the killed member is gone and replaced", || {
        let state = pool.state();
        let members = &state.endpoints[0].members;
        !members.iter().any(|m| m.id == old) && members.iter().any(|m| m.state == MemberState::Ready)
    })
    .await;
    for _ in 0..20 {
        client.unary_echo(request(b"after", 0)).await.unwrap();
    }
    let state = pool.state();
    assert!(state.endpoints[0].members.iter().all(|m| m.id != old));
    let killed = state.statistics.closed(EvictionReason::IoError)
        + state.statistics.closed(EvictionReason::ClosedByPeer);
    assert_eq!(killed, 1, "{:?}", state.statistics);
    assert_eq!(relay.accepted(), 2, "one replacement connection");
}

#[tokio::test]
async fn cancelling_a_call_frees_its_slot() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();

    // A unary call dropped while the server works on it.
    let mut slow = client(&pool);
    let call = tokio::spawn(async move { slow.unary_echo(request(b"slow", 30_000)).await });
    wait_until(WAIT, "the call is in flight", || pool.state().in_flight() == 1 && server.active() == 1).await;
    call.abort();
    wait_until(WAIT, "the slot is freed", || pool.state().in_flight() == 0).await;
    wait_until(WAIT, "the server saw the cancel", || server.active() == 0).await;

    // A server stream dropped after its first message.
    let mut stream = client(&pool)
        .server_streaming_echo(EchoRequest { message: Bytes::from_static(b"s"), repeat: 1_000, delay_ms: 10 })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    assert_eq!(pool.state().in_flight(), 1);
    drop(stream);
    wait_until(WAIT, "the stream's slot is freed", || pool.state().in_flight() == 0).await;
    wait_until(WAIT, "the server stream ended", || server.active() == 0).await;
}

#[tokio::test]
async fn max_connections_is_respected_and_thousands_of_waiters_are_all_served() {
    let server =
        TestServer::start_with(ServerOptions { max_concurrent_streams: Some(4), ..Default::default() }).await;
    let pool = Pool::builder()
        .max_connections(2)
        .checkout_timeout(Duration::from_secs(60))
        .build([server.uri()])
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3_000 {
        let mut client = client(&pool);
        calls.spawn(async move { client.unary_echo(request(b"w", 0)).await });
    }
    let mut served = 0;
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
        served += 1;
        let state = pool.state();
        assert!(state.members() <= 2, "max_connections exceeded: {state:?}");
        assert!(state.in_flight() <= 8, "more streams than 2 x 4: {state:?}");
    }
    assert_eq!(served, 3_000);
    let stats = pool.state().statistics;
    assert_eq!(stats.checkouts_direct + stats.checkouts_waited, 3_000, "{stats:?}");
    assert!(stats.checkouts_waited > 0);
    assert_eq!(stats.checkout_timeouts, 0);
}

#[tokio::test]
async fn min_connections_are_kept_warm_without_calls() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder()
        .min_connections(3)
        .max_connections(5)
        .backoff(fast_backoff())
        .build_lazy([relay.uri()])
        .unwrap();
    wait_until(WAIT, "three members are ready", || pool.state().members() == 3).await;
    relay.reset();
    wait_until(WAIT, "three fresh members replace them", || {
        relay.accepted() == 6
            && pool.state().endpoints[0].members.iter().filter(|m| m.state == MemberState::Ready).count() == 3
    })
    .await;
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn connects_retry_with_backoff_until_the_server_comes_up() {
    let uri = unused_uri();
    let port: u16 = uri.rsplit(':').next().unwrap().parse().unwrap();
    // wait_for_ready: the call below waits for the server to come up, instead of failing
    // fast while the endpoint is unreachable.
    let pool = Pool::builder()
        .backoff(fast_backoff())
        .checkout_timeout(Duration::from_secs(20))
        .wait_for_ready(true)
        .build_lazy([&uri])
        .unwrap();
    wait_until(WAIT, "connects have failed a few times", || {
        pool.state().endpoints[0].consecutive_failures >= 3
    })
    .await;
    let error = pool.state().endpoints[0].last_connect_error.clone().unwrap();
    assert!(error.contains(&uri) && error.contains("TCP connect"), "{error}");

    let server = TestServer::start_with(ServerOptions { port: Some(port), ..Default::default() }).await;
    let reply = client(&pool).unary_echo(request(b"up", 0)).await.unwrap();
    assert_eq!(&reply.into_inner().message[..], b"up");
    let state = pool.state();
    assert_eq!(state.endpoints[0].consecutive_failures, 0);
    assert!(state.statistics.connect_failures >= 3);
    drop(server);
}

#[tokio::test]
async fn connects_to_one_endpoint_are_paced_by_max_concurrent_connects() {
    // A server that accepts, never answers, and hangs up 100 ms later: each connect fails
    // when the server hangs up, and only then may the next one start. The server closes
    // before the client can learn of it, so the connections it holds at an accept are an
    // upper bound on the connects under way at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let held = Arc::new(AtomicUsize::new(0));
    let most_held = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (h, m, a) = (held.clone(), most_held.clone(), accepted.clone());
    let acceptor = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            a.fetch_add(1, Ordering::SeqCst);
            m.fetch_max(h.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                h.fetch_sub(1, Ordering::SeqCst);
                drop(socket);
            });
        }
    });
    let pool = Pool::builder()
        .min_connections(6)
        .max_connections(6)
        .max_concurrent_connects(2)
        .backoff(fast_backoff())
        .build_lazy([&uri])
        .unwrap();
    wait_until(WAIT, "eight connects have reached the server", || accepted.load(Ordering::SeqCst) >= 8).await;
    assert_eq!(most_held.load(Ordering::SeqCst), 2, "connects under way at once");
    let error = pool.state().endpoints[0].last_connect_error.clone().unwrap();
    assert!(error.contains("before the server's HTTP/2 SETTINGS"), "{error}");
    drop(pool);
    acceptor.abort();
}

#[tokio::test]
async fn eager_build_fails_when_nothing_answers_and_lazy_build_fails_the_call() {
    let dead = unused_uri();
    let other_dead = unused_uri();
    let error = Pool::builder().name("eager").build([&dead, &other_dead]).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect);
    let message = error.to_string();
    for part in ["pool `eager`", "no endpoint could be reached", &dead, &other_dead, "build_lazy"] {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }

    let pool = Pool::builder()
        .checkout_timeout(Duration::from_millis(500))
        .backoff(fast_backoff())
        .build_lazy([&dead])
        .unwrap();
    let status = client(&pool).unary_echo(request(b"x", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("last connect error"), "{}", status.message());
    assert!(status.message().contains(&dead), "{}", status.message());
}

#[tokio::test]
async fn eager_build_succeeds_when_one_endpoint_answers() {
    let server = TestServer::start().await;
    let dead = unused_uri();
    let pool = Pool::builder().backoff(fast_backoff()).build([&dead, &server.uri()]).await.unwrap();
    for _ in 0..10 {
        client(&pool).unary_echo(request(b"ok", 0)).await.unwrap();
    }
    assert_eq!(server.calls(), 10);
}

#[tokio::test]
async fn dropping_the_pool_closes_its_connections_and_tasks() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    // Every task of this test's runtime but the server's and the relay's listeners: the
    // pool's (connection drivers, health task, gauge sampler) and those serving its
    // connections must all end.
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let without_pool = tasks();
    let pool = Pool::builder().min_connections(2).build([relay.uri()]).await.unwrap();
    client(&pool).unary_echo(request(b"x", 0)).await.unwrap();
    assert_eq!(relay.open_connections(), 2);
    // Two drivers, the health task and the sampler at least, besides the relay's and the
    // server's tasks for each connection.
    assert!(tasks() >= without_pool + 4, "{} tasks with the pool, {without_pool} without", tasks());
    drop(pool);
    wait_until(WAIT, "the pool's connections are closed", || relay.open_connections() == 0).await;
    wait_until(WAIT, "every task the pool started has ended", || tasks() == without_pool).await;
}

#[tokio::test]
async fn close_waits_for_calls_in_flight_and_then_refuses_new_ones() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let mut client_a = client(&pool);
    let call = tokio::spawn(async move { client_a.unary_echo(request(b"finishing", 300)).await });
    wait_until(WAIT, "the call is in flight", || server.active() == 1).await;
    pool.close().await;
    assert_eq!(&call.await.unwrap().unwrap().into_inner().message[..], b"finishing");
    let state = pool.state();
    assert_eq!(state.open_connections, 0);
    assert!(state.closed);
    let status = client(&pool).unary_echo(request(b"late", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("is closed"), "{}", status.message());
}

#[tokio::test]
async fn statistics_count_checkouts_and_connections() {
    let server = TestServer::start().await;
    let pool = Pool::builder().min_connections(2).build([server.uri()]).await.unwrap();
    for _ in 0..25 {
        client(&pool).unary_echo(request(b"s", 0)).await.unwrap();
    }
    let stats = pool.state().statistics;
    assert_eq!(stats.checkouts_direct, 25);
    assert_eq!(stats.checkouts_waited, 0);
    assert_eq!(stats.connections_created, 2);
    assert_eq!(stats.connect_failures, 0);
    assert!(stats.connections_closed.iter().all(|(_, n)| *n == 0), "{stats:?}");
}

#[tokio::test]
async fn invalid_configuration_is_rejected_at_build_with_the_field_named() {
    let cases: Vec<(grpc_pool::Builder, Vec<&str>, &str)> = vec![
        (
            Pool::builder().max_connections(0),
            vec!["http://127.0.0.1:1"],
            "`max_connections` = 0; allowed: 1 to 10000",
        ),
        (
            Pool::builder().min_connections(3).max_connections(2),
            vec!["http://127.0.0.1:1"],
            "`min_connections` = 3 is above max_connections = 2",
        ),
        (
            Pool::builder().checkout_timeout(Duration::ZERO),
            vec!["http://127.0.0.1:1"],
            "`checkout_timeout` = 0ns; allowed: 1ms to 86400s",
        ),
        (
            Pool::builder().connect_timeout(Duration::ZERO),
            vec!["http://127.0.0.1:1"],
            "`connect_timeout` = 0ns; allowed: 1ms to 3600s",
        ),
        (
            Pool::builder().max_concurrent_streams(0),
            vec!["http://127.0.0.1:1"],
            "`max_concurrent_streams` = 0",
        ),
        (Pool::builder(), vec!["http://:50051"], "no host"),
        (Pool::builder(), vec!["ftp://127.0.0.1:21"], "unsupported scheme `ftp`"),
        (Pool::builder(), vec!["http://127.0.0.1:1", "http://127.0.0.1:1"], "listed twice"),
    ];
    for (builder, endpoints, expected) in cases {
        let lazy = builder.clone().build_lazy(endpoints.clone()).unwrap_err();
        assert!(lazy.to_string().contains(expected), "{lazy} should say {expected}");
        let eager = builder.build(endpoints).await.unwrap_err();
        assert!(eager.to_string().contains(expected), "{eager} should say {expected}");
    }
    // Only `build`, which connects before it returns, needs an endpoint; a lazy pool may get
    // its endpoints later.
    let eager = Pool::builder().build(Vec::<String>::new()).await.unwrap_err();
    assert!(eager.to_string().contains("`endpoints` = an empty list"), "{eager}");
    assert!(Pool::builder().build_lazy(Vec::<String>::new()).is_ok());
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    let error = Pool::builder().build_lazy(["http://127.0.0.1:1"]).unwrap_err();
    assert!(error.to_string().contains("Tokio runtime"), "{error}");
}

#[tokio::test]
async fn broken_connections_do_not_starve_queued_callers() {
    let server =
        TestServer::start_with(ServerOptions { max_concurrent_streams: Some(2), ..Default::default() }).await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder()
        .max_connections(1)
        .checkout_timeout(Duration::from_secs(30))
        .backoff(fast_backoff())
        .build([relay.uri()])
        .await
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (mut client, done) = (client(&pool), done.clone());
        calls.spawn(async move {
            let result = client.unary_echo(request(b"q", 30)).await;
            done.fetch_add(1, Ordering::Relaxed);
            result
        });
    }
    // Two connection deaths while most callers are still queued behind two slots.
    for after in [6, 16] {
        wait_until(WAIT, "calls have completed", || done.load(Ordering::Relaxed) >= after).await;
        relay.reset();
    }
    let mut failed = 0;
    while let Some(result) = calls.join_next().await {
        if let Err(status) = result.unwrap() {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            failed += 1;
        }
    }
    // Only the (at most two) calls on the connection at each reset may fail; every queued
    // caller is served by the replacement.
    assert!(failed <= 4, "{failed} calls failed");
    let stats = pool.state().statistics;
    assert_eq!(stats.checkout_timeouts, 0);
    assert_eq!(stats.connections_created, 3, "{stats:?}");
    assert!(stats.checkouts_waited >= 30, "{stats:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_does_not_stop_the_others_from_growing() {
    let server =
        TestServer::start_with(ServerOptions { max_concurrent_streams: Some(2), ..Default::default() }).await;
    let dead = unused_uri();
    let pool = Pool::builder()
        .max_connections(4)
        .checkout_timeout(Duration::from_secs(30))
        .backoff({
            let mut v = BackoffConfig::default();
            v.base = Duration::from_secs(5);
            v
        })
        .build([dead.as_str(), &server.uri()])
        .await
        .unwrap();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = client(&pool);
        calls.push(tokio::spawn(async move { client.unary_echo(request(b"g", 3_000)).await }));
    }
    wait_until(WAIT, "the live endpoint grew to carry all four calls at once", || {
        let state = pool.state();
        state.endpoints[1].members.len() == 2 && server.active() == 4
    })
    .await;
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_sent_again_and_fail_no_call() {
    // Every second stream to A is refused before A reads it: the pool sends those calls again
    // (their bodies were kept) on another endpoint, so no caller sees a failure.
    let server = grpc_pool_testkit::RawServer::start(grpc_pool_testkit::Misbehaviour::RefuseEvery(2)).await;
    let healthy = TestServer::start().await;
    let pool = Pool::builder().build([server.uri(), healthy.uri()]).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..32u8 {
        let mut client = client(&pool);
        calls.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..20 {
                let message = Bytes::from(vec![i; 100]);
                match client
                    .unary_echo(EchoRequest { message: message.clone(), repeat: 0, delay_ms: 0 })
                    .await
                {
                    Ok(reply) => assert_eq!(reply.into_inner().message, message),
                    Err(status) => failures.push(status),
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = calls.join_next().await {
        failures.extend(result.unwrap());
    }
    assert!(failures.is_empty(), "{} calls failed, first: {:?}", failures.len(), failures.first());
    let stats = pool.state().statistics;
    assert_eq!(server.answered() + healthy.calls(), 640);
    assert!(server.refused() > 50, "the server refused {}", server.refused());
    assert_eq!(stats.retries, server.refused(), "{stats:?}");
}

/// Runs `callers` concurrent callers of unary echoes through `pool` for `duration`; returns
/// the number of calls made and the failures.
async fn unary_load(pool: &Pool, callers: u8, duration: Duration) -> (usize, Vec<tonic::Status>) {
    let until = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..callers {
        let mut client = client(pool);
        tasks.spawn(async move {
            let (mut calls, mut failures) = (0, Vec::new());
            while Instant::now() < until {
                let message = Bytes::from(vec![i; 100]);
                calls += 1;
                match client
                    .unary_echo(EchoRequest { message: message.clone(), repeat: 0, delay_ms: 0 })
                    .await
                {
                    Ok(reply) => assert_eq!(reply.into_inner().message, message),
                    Err(status) => failures.push(status),
                }
            }
            (calls, failures)
        });
    }
    let (mut calls, mut failures) = (0, Vec::new());
    while let Some(result) = tasks.join_next().await {
        let (made, failed) = result.unwrap();
        calls += made;
        failures.extend(failed);
    }
    (calls, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_with_a_low_last_stream_id_under_load_fails_no_call() {
    // Each connection, once 0.4-1.2 s old, goes away at the next stream, naming the last
    // stream it answered: every stream above it (in flight at the client, or still on the
    // wire) was never processed. The pool sends each of those again, to the other endpoint
    // first. (Ages are far shorter than real servers' so that a few seconds see many
    // GOAWAYs; at 0.1-0.3 s, a loaded machine occasionally saw a call doomed on all three
    // attempts, each on a connection that went away while the call was on it.)
    let servers = [
        FrameServer::start(Behaviour::GoAwayAfterAge(Duration::from_millis(800))).await,
        FrameServer::start(Behaviour::GoAwayAfterAge(Duration::from_millis(800))).await,
    ];
    let pool = Pool::builder()
        .max_connections(2)
        .backoff(fast_backoff())
        .build(servers.iter().map(|s| s.uri()))
        .await
        .unwrap();
    let (calls, failures) = unary_load(&pool, 32, Duration::from_secs(3)).await;
    let stats = pool.state().statistics;
    let mut why: Vec<String> =
        failures.iter().map(|s| s.message().rsplit("; ").next().unwrap_or("").to_owned()).collect();
    why.sort();
    why.dedup();
    assert!(
        failures.is_empty(),
        "{} calls failed ({why:?}), first: {:?}; {stats:?}",
        failures.len(),
        failures.first()
    );
    let (answered, goaways, unanswered) = servers
        .iter()
        .fold((0, 0, 0), |(a, g, u), s| (a + s.answered(), g + s.goaways(), u + s.unanswered()));
    assert_eq!(answered, calls as u64, "{stats:?}");
    // Each endpoint carries calls all along and its connections live at most 1.2 s: in 3 s
    // each has gone away at least twice.
    assert!(goaways >= 4, "the servers sent {goaways} GOAWAYs");
    // Each stream a server left unanswered failed at the client above the GOAWAY's last
    // stream id, and was counted as such when it was sent again.
    assert!(unanswered > 0);
    assert!(stats.retried(RetryReason::GoAway) >= unanswered, "{unanswered} streams unanswered, {stats:?}");
}

#[tokio::test]
async fn a_response_cut_after_its_head_says_why_it_was_not_resent() {
    // The server has answered (the response head and a message came) when the connection
    // is reset: the error from the response body says so, as every pool call error says
    // why it was not sent again.
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder().build([relay.uri()]).await.unwrap();
    let mut stream = client(&pool)
        .server_streaming_echo(EchoRequest { message: Bytes::from_static(b"s"), repeat: 1_000, delay_ms: 10 })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    relay.reset();
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => continue, // messages already on their way
            Some(Err(status)) => break status,
            None => panic!("the stream ended cleanly after a reset"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&relay.uri()), "{}", status.message());
    assert!(
        status.message().ends_with("not retried: the server was already answering it"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_large_client_streaming_call_cut_by_goaway_is_not_resent_and_says_why() {
    // 1 MiB of client stream, then a GOAWAY that says the server processed nothing. The call
    // could be resent safely, but its body was larger than the replay buffer, so the bytes
    // are gone: the error must say that, and the server must have seen the call once.
    let server = FrameServer::start(Behaviour::GoAwayAtFirstRequestEnd).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let chunks: Vec<EchoRequest> = (0..16)
        .map(|_| EchoRequest { message: Bytes::from(vec![1u8; 64 * 1024]), repeat: 0, delay_ms: 0 })
        .collect();
    let status = client(&pool).client_streaming_echo(tokio_stream::iter(chunks)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("not retried: its request body is over the replay buffer limit (262144 bytes)"),
        "{}",
        status.message()
    );
    assert_eq!(server.goaways(), 1);
    assert!(server.body_bytes() >= 1 << 20, "the server got {} bytes", server.body_bytes());
    assert_eq!(pool.state().statistics.retries, 0);
}

#[tokio::test]
async fn a_call_refused_on_every_attempt_fails_after_max_attempts_and_says_so() {
    let server = grpc_pool_testkit::RawServer::start(grpc_pool_testkit::Misbehaviour::RefuseEvery(1)).await;
    let pool = Pool::builder().max_attempts(2).build([server.uri()]).await.unwrap();
    let status = client(&pool).unary_echo(request(b"x", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not retried: all 2 attempts used"), "{}", status.message());
    assert_eq!(server.refused(), 2);
    assert_eq!(pool.state().statistics.retried(RetryReason::Refused), 1);

    let once = Pool::builder().max_attempts(1).build([server.uri()]).await.unwrap();
    let status = client(&once).unary_echo(request(b"x", 0)).await.unwrap_err();
    assert!(status.message().contains("not retried: max_attempts is 1"), "{}", status.message());
    assert_eq!(server.refused(), 3);
}

#[tokio::test]
async fn a_call_the_server_may_have_processed_is_not_resent_and_says_why() {
    // The connection is cut (RST) while the server works on the call: it may have acted on it.
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = Pool::builder().build([relay.uri()]).await.unwrap();
    let mut call = client(&pool);
    let pending = tokio::spawn(async move { call.unary_echo(request(b"x", 5_000)).await });
    wait_until(WAIT, "the call reached the server", || server.active() == 1).await;
    relay.reset();
    let status = pending.await.unwrap().unwrap_err();
    assert!(
        status.message().contains("not retried: the server may have processed it"),
        "{}",
        status.message()
    );
    assert_eq!(pool.state().statistics.retries, 0);
}

#[tokio::test]
async fn a_streaming_call_cut_before_its_body_ended_is_resent_with_all_of_it() {
    // The first connection goes away as the call's HEADERS arrive, while the caller has sent
    // one message and holds back the rest. The resend carries the message kept from the first
    // attempt, then the ones the caller sends afterwards.
    let server = FrameServer::start(Behaviour::GoAwayAtFirstHeadersOnce).await;
    let pool = Pool::builder().backoff(fast_backoff()).build([server.uri()]).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(4);
    let messages = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut call_client = client(&pool);
    let call = tokio::spawn(async move { call_client.client_streaming_echo(messages).await });
    tx.send(request(b"one ", 0)).await.unwrap();
    wait_until(WAIT, "the first attempt was cut by the GOAWAY and sent again", || {
        pool.state().statistics.retried(RetryReason::GoAway) == 1
    })
    .await;
    tx.send(request(b"two ", 0)).await.unwrap();
    tx.send(request(b"three", 0)).await.unwrap();
    drop(tx);
    let reply = call.await.unwrap().unwrap().into_inner();
    assert_eq!(reply.message, Bytes::from_static(b"one two three"));
    assert_eq!((server.goaways(), server.answered()), (1, 1));
}

fn outliers(percent: u32) -> grpc_pool::OutlierDetection {
    {
        let mut v = grpc_pool::OutlierDetection::default();
        v.consecutive_failures = 3;
        v.base_ejection_time = Duration::from_millis(300);
        v.max_ejection_time = Duration::from_secs(1);
        v.max_ejection_percent = percent;
        v
    }
}

/// A pool over `servers` with outlier detection (3 failures in a row, 50%), the first server
/// answering every call with UNAVAILABLE.
async fn first_failing(servers: &[TestServer]) -> Pool {
    servers[0].set_unavailable(true);
    Pool::builder()
        .outlier_detection(Some(outliers(50)))
        .build(servers.iter().map(|s| s.uri()))
        .await
        .unwrap()
}

/// Whether the pool's first endpoint is ejected now.
fn ejected(pool: &Pool) -> bool {
    pool.state().endpoints[0].ejected_for.is_some()
}

/// Calls until `done` holds (at most `limit` calls); returns how many failed.
async fn call_until(client: &mut EchoClient<Pool>, limit: usize, mut done: impl FnMut() -> bool) -> usize {
    let mut failed = 0;
    for _ in 0..limit {
        if done() {
            return failed;
        }
        if client.unary_echo(request(b"x", 0)).await.is_err() {
            failed += 1;
        }
    }
    assert!(done(), "not done after {limit} calls");
    failed
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_failing_every_call_is_ejected_and_returns_when_its_time_is_up() {
    // The clock stands still while the calls run, however slow the machine: the ejection
    // ends when the test moves the clock past its 300 ms, and not before.
    let clock = HeldClock::hold();
    let servers = [TestServer::start().await, TestServer::start().await, TestServer::start().await];
    let pool = first_failing(&servers).await;
    let detection = outliers(50);
    let mut client = client(&pool);
    // Only the calls that reach the failing server fail, and the third in a row ejects it.
    let failed = call_until(&mut client, 500, || ejected(&pool)).await;
    assert_eq!(failed, 3);
    assert_eq!(servers[0].calls(), 3);
    // Ejected: it takes no call, and no call fails.
    for _ in 0..50 {
        client.unary_echo(request(b"x", 0)).await.unwrap();
    }
    assert_eq!(servers[0].calls(), 3);
    // Repaired; it stays out until its 300 ms are up...
    servers[0].set_unavailable(false);
    let step = Duration::from_millis(10);
    let early = clock.advance_in_steps(detection.base_ejection_time - step, step, || !ejected(&pool)).await;
    assert!(!early, "the ejection ended before its {:?}", detection.base_ejection_time);
    // ...and then takes calls again.
    clock.advance_until(2 * step, step, "the ejection ended", || !ejected(&pool)).await;
    for _ in 0..100 {
        client.unary_echo(request(b"x", 0)).await.unwrap();
    }
    assert!(servers[0].calls() > 3, "the endpoint took no call after its ejection");
    assert_eq!(pool.state().statistics.ejections, 1);
}

#[tokio::test]
async fn a_failure_seen_only_in_a_response_body_ejects_too() {
    // UNAVAILABLE in the trailers, after a message: the call's response body (which holds no
    // pool handle) decides the ejection and the pool's ejector task carries it out.
    let servers = [TestServer::start().await, TestServer::start().await];
    let pool = first_failing(&servers).await;
    let mut client = client(&pool);
    let mut failed = 0;
    for _ in 0..500 {
        if ejected(&pool) {
            break;
        }
        let mut stream = client.server_streaming_echo(request(b"x", 1)).await.unwrap().into_inner();
        while let Some(item) = stream.next().await {
            if let Err(status) = item {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                failed += 1;
            }
        }
        if failed >= 3 {
            // The request is on its way to the ejector; give it its moment.
            wait_until(WAIT, "the ejection asked for by a response body", || ejected(&pool)).await;
        }
    }
    assert!(ejected(&pool), "{:?}", pool.state().endpoints);
    assert_eq!(failed, 3, "the third failure in a row asks for the ejection");
    assert_eq!(pool.state().statistics.ejections, 1);
    let before = servers[0].calls();
    for _ in 0..20 {
        client.unary_echo(request(b"x", 0)).await.unwrap();
    }
    assert_eq!(servers[0].calls(), before, "an ejected endpoint took calls");
}

#[tokio::test]
async fn no_more_endpoints_are_ejected_than_max_ejection_percent_allows() {
    // Two of three fail every call; 10% of three rounds to zero, and one may always go: one
    // is ejected, the other keeps taking (and failing) calls. The ejection outlasts the
    // test however slow the machine: its end is another test's business, and a first
    // ejection ending midway would let the cap eject again.
    let servers = [TestServer::start().await, TestServer::start().await, TestServer::start().await];
    servers[0].set_unavailable(true);
    servers[1].set_unavailable(true);
    let long = Duration::from_secs(600);
    let pool = Pool::builder()
        .outlier_detection(Some({
            let mut v = outliers(10);
            v.base_ejection_time = long;
            v.max_ejection_time = long;
            v
        }))
        .build(servers.iter().map(|s| s.uri()))
        .await
        .unwrap();
    let ejected = |pool: &Pool| pool.state().endpoints.iter().filter(|e| e.ejected_for.is_some()).count();
    let mut client = client(&pool);
    call_until(&mut client, 500, || ejected(&pool) == 1).await;
    let failed_before = servers[0].calls() + servers[1].calls();
    let mut failed = 0;
    for _ in 0..100 {
        if client.unary_echo(request(b"x", 0)).await.is_err() {
            failed += 1;
        }
    }
    assert_eq!(ejected(&pool), 1, "{:?}", pool.state().endpoints);
    assert!(failed > 0, "the endpoint over the cap should still take calls");
    assert_eq!(servers[0].calls() + servers[1].calls() - failed_before, failed as u64);
    assert_eq!(pool.state().statistics.ejections, 1);
}

#[tokio::test]
async fn calls_say_who_is_calling_in_their_user_agent_as_tonic_channels_do() {
    let server = TestServer::start().await;
    let call = |pool: Pool, agent: Option<&'static str>| async move {
        let mut request =
            tonic::Request::new(EchoRequest { message: Bytes::from_static(b"who"), repeat: 0, delay_ms: 0 });
        if let Some(agent) = agent {
            request.metadata_mut().insert("user-agent", agent.parse().unwrap());
        }
        EchoClient::new(pool).unary_echo(request).await.expect("answered");
    };
    let plain = Pool::builder().build([server.uri()]).await.unwrap();
    call(plain.clone(), None).await;
    assert_eq!(server.last_user_agent().as_deref(), Some(grpc_pool::POOL_USER_AGENT));
    assert!(grpc_pool::POOL_USER_AGENT.starts_with("grpc-pool/"));

    let named = Pool::builder().name("agent").user_agent("billing/2.3").build([server.uri()]).await.unwrap();
    call(named.clone(), None).await;
    let expected = format!("billing/2.3 {}", grpc_pool::POOL_USER_AGENT);
    assert_eq!(server.last_user_agent(), Some(expected));
    // A caller's own header is sent as it is.
    call(named, Some("mine/1")).await;
    assert_eq!(server.last_user_agent().as_deref(), Some("mine/1"));

    let error = Pool::builder().user_agent("two\nlines").build_lazy([server.uri()]).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("user_agent"), "{error}");
    assert!(error.to_string().contains("visible ASCII"), "{error}");
}

#[tokio::test]
async fn calls_carry_the_origin_instead_of_the_endpoint_as_tonic_channels_do() {
    let server =
        grpc_pool_testkit::RawServer::start(grpc_pool_testkit::Misbehaviour::RefuseEvery(u64::MAX)).await;
    let call = |pool: Pool| async move {
        let request = EchoRequest { message: Bytes::from_static(b"where"), repeat: 0, delay_ms: 0 };
        EchoClient::new(pool).unary_echo(request).await.expect("answered");
    };
    let plain = Pool::builder().name("no-origin").build([server.uri()]).await.unwrap();
    call(plain).await;
    assert_eq!(server.last_origin(), Some(server.uri()), "the endpoint's own");

    let behind_proxy = Pool::builder()
        .name("origin")
        .origin("https://orders.example.com")
        .build([server.uri()])
        .await
        .unwrap();
    call(behind_proxy).await;
    assert_eq!(server.last_origin().as_deref(), Some("https://orders.example.com"));

    for bad in ["orders.example.com", "https://orders.example.com/v1", "ftp://orders.example.com"] {
        let error = Pool::builder().origin(bad).build_lazy([server.uri()]).unwrap_err().to_string();
        assert!(error.contains("`origin`") && error.contains("`https://host[:port]`"), "{bad}: {error}");
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn connections_come_from_the_local_address_as_tonic_channels_can() {
    let server =
        grpc_pool_testkit::RawServer::start(grpc_pool_testkit::Misbehaviour::RefuseEvery(u64::MAX)).await;
    // 127.0.0.0/8 is all loopback on Linux: 127.0.0.2 is a second local address.
    let local: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let pool = Pool::builder().local_address(Some(local)).build([server.uri()]).await.unwrap();
    let request = EchoRequest { message: Bytes::from_static(b"from"), repeat: 0, delay_ms: 0 };
    EchoClient::new(pool).unary_echo(request).await.expect("answered");
    assert_eq!(server.last_peer().map(|p| p.ip()), Some(local));

    // No address of the endpoint's family: the connect fails and says why.
    let v6: std::net::IpAddr = "::1".parse().unwrap();
    let error =
        Pool::builder().name("v6-from").local_address(Some(v6)).build([server.uri()]).await.unwrap_err();
    assert!(error.to_string().contains("no IPv6 address to connect to"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latency_aware_choice_keeps_calls_off_a_slow_endpoint_where_least_loaded_does_not() {
    // One call at a time: every endpoint has 0 calls in flight, so least loaded cannot tell
    // a slow endpoint from a fast one and sends it half the calls; the latency-aware choice
    // learns from the first answer of each and sends it (next to) none.
    let fast = TestServer::start().await;
    let slow = TestServer::start_with(ServerOptions {
        slow: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let endpoints = [fast.uri(), slow.uri()];
    let least_loaded = Pool::builder().build(&endpoints).await.unwrap();
    let mut calls = client(&least_loaded);
    for _ in 0..40 {
        calls.unary_echo(request(b"hi", 0)).await.unwrap();
    }
    let slow_share = slow.calls();
    assert!(
        slow_share >= 8,
        "least loaded sent {slow_share} of 40 calls to the slow endpoint, not about half"
    );

    let latency_aware =
        Pool::builder().balance(grpc_pool::Balance::PEAK_EWMA).build(&endpoints).await.unwrap();
    let mut calls = client(&latency_aware);
    for _ in 0..100 {
        calls.unary_echo(request(b"hi", 0)).await.unwrap();
    }
    let to_slow = slow.calls() - slow_share;
    assert!(
        to_slow <= 5,
        "the latency-aware choice sent {to_slow} of 100 calls to the endpoint 200 ms slower"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_total_connections_caps_the_pool_over_every_endpoint_and_a_freed_place_is_used_again() {
    // Four servers behind relays that count connections; two connections wanted per
    // endpoint, three allowed in all, two streams a connection.
    let mut servers = Vec::new();
    let mut relays = Vec::new();
    for _ in 0..4 {
        let server = TestServer::start().await;
        relays.push(Relay::start(server.addr()).await);
        servers.push(server);
    }
    let uris: Vec<String> = relays.iter().map(Relay::uri).collect();
    let pool = Pool::builder()
        .min_connections(2)
        .max_total_connections(Some(3))
        .max_concurrent_streams(2)
        .checkout_timeout(Duration::from_millis(300))
        .backoff(fast_backoff())
        .build(&uris)
        .await
        .unwrap();
    let open = |relays: &[Relay]| relays.iter().map(Relay::open_connections).sum::<usize>();
    // A first connection to three endpoints, none to a second before each has a first.
    assert_eq!(pool.state().members(), 3);
    assert_eq!(relays.iter().filter(|r| r.accepted() == 1).count(), 3, "one each to three endpoints");

    // Under more load than three connections carry: calls wait for slots, the pool never
    // opens a fourth, and a call that waits too long says why.
    let busy = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for _ in 0..12 {
        let (mut client, busy) = (client(&pool), busy.clone());
        calls.push(tokio::spawn(async move {
            let result = client.unary_echo(request(b"hold", 400)).await;
            busy.fetch_add(1, Ordering::Relaxed);
            result
        }));
    }
    let mut most = 0;
    while busy.load(Ordering::Relaxed) < 12 {
        most = most.max(open(&relays)).max(pool.state().open_connections);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(most <= 3, "at most 3 connections at once, saw {most}");
    let mut timed_out = 0;
    for call in calls {
        if let Err(status) = call.await.unwrap() {
            assert!(status.message().contains("max_total_connections (3) reached"), "{status:?}");
            timed_out += 1;
        }
    }
    assert!(timed_out > 0, "6 slots for 12 calls of 400 ms with a 300 ms checkout timeout");

    // One server stops: its connection ends, and its place in the budget is used again by
    // the endpoints still up (each wants two; the budget allows three), never a fourth.
    let stopped = relays.iter().position(|r| r.accepted() >= 1).unwrap();
    servers.remove(stopped).shutdown().await;
    let up = |relays: &[Relay]| -> usize {
        relays.iter().enumerate().filter(|(i, _)| *i != stopped).map(|(_, r)| r.open_connections()).sum()
    };
    wait_until(WAIT, "the freed place is used again", || up(&relays) == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(open(&relays) <= 3 && pool.state().open_connections <= 3, "{}", open(&relays));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_weights_share_the_calls_under_light_load_and_heavy() {
    let (heavy, light) = (TestServer::start().await, TestServer::start().await);
    let pool = Pool::builder().build([heavy.uri(), light.uri()]).await.unwrap();
    assert!(pool.set_endpoint_weight(&heavy.uri(), 3).unwrap());
    assert!(!pool.set_endpoint_weight("http://127.0.0.1:1", 3).unwrap(), "an endpoint the pool lacks");
    let err = pool.set_endpoint_weight(&heavy.uri(), 0).unwrap_err().to_string();
    assert!(err.contains("`weight`") && err.contains("1 to 1000000"), "{err}");
    let weights: Vec<u32> = pool.state().endpoints.iter().map(|e| e.weight).collect();
    assert_eq!(weights, vec![3, 1]);

    // Light load: one call at a time, every endpoint idle when drawn; the first drawn wins
    // the tie, and it is drawn 3 times in 4. 400 calls: 300 expected, sd 8.7.
    let mut c = client(&pool);
    for _ in 0..400 {
        c.unary_echo(request(b"w", 0)).await.unwrap();
    }
    let share = heavy.calls() as f64 / (heavy.calls() + light.calls()) as f64;
    println!("one at a time {share:.3}");
    assert!(
        (0.65..=0.85).contains(&share),
        "one at a time: {share:.3} of the calls on the weight-3 endpoint"
    );

    // Heavy load: 16 callers, 2 ms each at the server; the heavy endpoint keeps about three
    // times the calls in flight, so takes about three quarters of them.
    let (h0, l0) = (heavy.calls(), light.calls());
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut c = client(&pool);
        callers.spawn(async move {
            for _ in 0..50 {
                c.unary_echo(request(b"w", 2)).await.unwrap();
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    let (h, l) = (heavy.calls() - h0, light.calls() - l0);
    let share = h as f64 / (h + l) as f64;
    println!("16 at a time {share:.3}");
    assert!((0.6..=0.9).contains(&share), "16 at a time: {share:.3} of the calls on the weight-3 endpoint");

    // Back to equal weights: an even split again.
    assert!(pool.set_endpoint_weight(&heavy.uri(), 1).unwrap());
    let (h0, l0) = (heavy.calls(), light.calls());
    for _ in 0..400 {
        c.unary_echo(request(b"w", 0)).await.unwrap();
    }
    let share = (heavy.calls() - h0) as f64 / (heavy.calls() - h0 + light.calls() - l0) as f64;
    assert!((0.38..=0.62).contains(&share), "equal weights: {share:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_fails_the_call_past_the_cap_at_once_and_lifting_it_lets_all_through() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    pool.set_max_requests(Some(2));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = client(&pool);
        held.push(tokio::spawn(async move { c.unary_echo(request(b"slow", 1_000)).await }));
    }
    wait_until(WAIT, "both slow calls are at the server", || server.active() == 2).await;
    // Failed, not queued: queued, it would have had a slot when a slow call ended (1 s, well
    // within the 5 s checkout timeout) and succeeded.
    let status = client(&pool).unary_echo(request(b"third", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("max_requests (2) reached"), "{status:?}");
    for call in held {
        call.await.unwrap().unwrap();
    }
    client(&pool).unary_echo(request(b"after", 0)).await.unwrap();

    // A cap of 0 refuses every call (as Envoy's); lifted, 8 at once all go through.
    pool.set_max_requests(Some(0));
    let status = client(&pool).unary_echo(request(b"none", 0)).await.unwrap_err();
    assert!(status.message().contains("max_requests (0) reached"), "{status:?}");
    pool.set_max_requests(None);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut c = client(&pool);
        calls.spawn(async move { c.unary_echo(request(b"many", 50)).await });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outlier_detection_override_ejects_by_failure_percentage_and_none_puts_the_pools_own_back() {
    let servers = [TestServer::start().await, TestServer::start().await, TestServer::start().await];
    let unmanaged = Pool::builder().build_lazy([servers[0].uri()]).unwrap();
    unmanaged.override_outlier_detection(None).expect("its own (none) back: nothing to do");
    let err = unmanaged
        .override_outlier_detection(Some(grpc_pool::OutlierDetection::off()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`outlier_detection`"), "{err}");

    let pool = Pool::builder()
        .outlier_detection(Some(grpc_pool::OutlierDetection::off()))
        .build(servers.iter().map(|s| s.uri()))
        .await
        .unwrap();
    let mut settings = grpc_pool::OutlierDetection::off();
    settings.interval = Duration::from_millis(100);
    settings.max_ejection_percent = 50;
    let mut failures = grpc_pool::FailurePercentageEjection::default();
    (failures.threshold, failures.minimum_hosts, failures.request_volume) = (50, 3, 10);
    settings.failure_percentage = Some(failures);
    let mut bad = settings.clone();
    bad.failure_percentage.as_mut().unwrap().threshold = 101;
    let err = pool.override_outlier_detection(Some(bad)).unwrap_err().to_string();
    assert!(err.contains("`outlier_detection.failure_percentage.threshold`"), "{err}");
    pool.override_outlier_detection(Some(settings)).unwrap();

    // The first server fails every call; the others answer. Calls go on until the sweep
    // ejects it (its failures in a row would not: the pool's own settings eject nothing).
    servers[0].set_unavailable(true);
    let ejected = |pool: &Pool| {
        pool.state()
            .endpoints
            .iter()
            .any(|e| e.endpoint.to_string() == servers[0].uri() && e.ejected_for.is_some())
    };
    let mut c = client(&pool);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ejected(&pool) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ejected by failure percentage: {:?}",
            pool.state()
        );
        let _ = c.unary_echo(request(b"x", 0)).await;
    }
    let others = ejected_count(&pool);
    assert_eq!(others, 1, "only the failing endpoint is ejected");

    // Back to the pool's own settings (off): nothing more is ejected, however it fails.
    pool.override_outlier_detection(None).unwrap();
    servers[1].set_unavailable(true);
    for _ in 0..200 {
        let _ = c.unary_echo(request(b"x", 0)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // three of the old intervals
    assert!(pool
        .state()
        .endpoints
        .iter()
        .all(|e| e.endpoint.to_string() != servers[1].uri() || e.ejected_for.is_none()));
}

fn ejected_count(pool: &Pool) -> usize {
    pool.state().endpoints.iter().filter(|e| e.ejected_for.is_some()).count()
}
