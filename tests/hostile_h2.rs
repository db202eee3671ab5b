//! HTTP/2 servers that misbehave in ways `h2`'s server will not (the frame-level test
//! server): no room for a single stream, a GOAWAY on every connection, PINGs never answered,
//! answers without `grpc-status`. Each costs at most its connections, never a panic or a
//! call the pool could have saved.

use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{BackoffConfig, EvictionReason, Keepalive, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, Behaviour, FrameServer, TestServer};

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"hostile"), repeat: 0, delay_ms: 0 }
}

#[tokio::test]
async fn a_server_allowing_zero_streams_takes_no_call_and_the_others_take_them_all() {
    let zero = FrameServer::start(Behaviour::ZeroStreams).await;
    let healthy = TestServer::start().await;
    let pool = Pool::builder().build([zero.uri(), healthy.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    for _ in 0..50 {
        client.unary_echo(request()).await.unwrap();
    }
    assert_eq!((zero.answered(), healthy.calls()), (0, 50));
    let state = pool.state();
    assert!(state.endpoints[0].members.iter().all(|m| m.max_streams == 0), "{state:?}");

    // Alone, it makes callers wait for room that never comes, then says why.
    let alone =
        Pool::builder().checkout_timeout(Duration::from_millis(300)).build([zero.uri()]).await.unwrap();
    let status = EchoClient::new(alone.clone()).unary_echo(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("0/0 streams busy"), "{}", status.message());
}

#[tokio::test]
async fn a_goaway_on_every_connection_backs_reconnects_off_instead_of_looping() {
    let storm = FrameServer::start(Behaviour::GoAwayOnConnect).await;
    let backoff = {
        let mut v = BackoffConfig::default();
        v.base = Duration::from_millis(50);
        v.max = Duration::from_millis(400);
        v
    };
    let pool = Pool::builder().backoff(backoff).build_lazy([storm.uri()]).unwrap();
    let started = Instant::now();
    wait_until(Duration::from_secs(10), "a few reconnects", || storm.connections() >= 4).await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    // With the backoff (50 ms, x1.6, at most 400 ms) two seconds hold about ten attempts; a
    // busy loop would make thousands.
    let connections = storm.connections();
    assert!(connections <= 20, "{connections} connections in 2 s");
    let state = pool.state();
    assert!(state.endpoints[0].members.is_empty(), "{state:?}");
    assert!(state.endpoints[0].consecutive_failures >= 3, "{state:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_pings_loses_its_connection_to_keepalive() {
    let deaf = FrameServer::start(Behaviour::IgnorePings).await;
    let pool = Pool::builder()
        .keepalive(Some({
            let mut v = Keepalive::new(Duration::from_millis(200), Duration::from_millis(200));
            v.permit_without_stream = true;
            v.max_pings_without_data = 0;
            v
        }))
        .build([deaf.uri()])
        .await
        .unwrap();
    // Calls work (the server serves them); its silence to PINGs costs the connection.
    EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap();
    wait_until(Duration::from_secs(10), "keepalive killed the member", || {
        pool.state().statistics.closed(EvictionReason::PingTimeout) >= 1
    })
    .await;
    // And the pool has connected again and serves.
    EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap();
}

#[tokio::test]
async fn an_answer_without_grpc_status_is_an_error_and_frees_its_slot() {
    let server = FrameServer::start(Behaviour::NoGrpcStatus).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let status = EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    wait_until(Duration::from_secs(10), "the slot is back", || pool.state().in_flight() == 0).await;
    assert_eq!(server.answered(), 1);
}

#[tokio::test]
async fn an_answer_without_trailers_is_an_error_and_frees_its_slot() {
    let server = FrameServer::start(Behaviour::NoTrailers).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let status = EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    wait_until(Duration::from_secs(10), "the slot is back", || pool.state().in_flight() == 0).await;
}

#[tokio::test]
async fn response_headers_over_the_limit_fail_the_call_not_the_pool() {
    let server = FrameServer::start(Behaviour::HugeHeaders(8 * 1024)).await;
    let h2 = {
        let mut v = grpc_pool::H2Config::default();
        v.max_header_list_size = 4 * 1024;
        v
    };
    let pool = Pool::builder().h2(h2).build([server.uri()]).await.unwrap();
    for _ in 0..3 {
        let status = EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(status.message().contains(&server.uri()), "{}", status.message());
    }
    wait_until(Duration::from_secs(10), "every slot is back", || pool.state().in_flight() == 0).await;
}

#[tokio::test]
async fn a_call_whose_body_can_never_be_sent_ends_at_its_deadline_and_frees_its_slot() {
    let server = FrameServer::start(Behaviour::StalledWindow).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let mut client = EchoClient::new(pool.clone());
    let deadline = Duration::from_millis(300);
    let call = tokio::time::timeout(deadline, client.unary_echo(request())).await;
    assert!(call.is_err(), "the call should still be waiting for window at its deadline: {call:?}");
    wait_until(Duration::from_secs(10), "the slot is back", || pool.state().in_flight() == 0).await;
    assert_eq!(server.answered(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_limit_lowered_mid_connection_is_obeyed_and_fails_no_call() {
    let server = FrameServer::start(Behaviour::LowerStreamLimitAfter(20)).await;
    let pool = Pool::builder().max_connections(1).build([server.uri()]).await.unwrap();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = EchoClient::new(pool.clone());
        callers.spawn(async move {
            for _ in 0..25 {
                client.unary_echo(request()).await.unwrap();
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    assert_eq!(server.answered(), 200);
    let state = pool.state();
    assert_eq!(state.endpoints[0].members[0].max_streams, 1, "{state:?}");
}
