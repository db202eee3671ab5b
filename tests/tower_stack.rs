//! The pool as one `tower::Service` among others: under tower's concurrency limit and
//! timeout, through `ServiceExt` adapters without naming the request type, and with a request
//! body that fails midway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{ErrorKind, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, Behaviour, FrameServer, TestServer};
use http_body_util::StreamBody;
use tower::{ServiceBuilder, ServiceExt};

const WAIT: Duration = Duration::from_secs(10);

fn request(delay_ms: u32) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"tower"), repeat: 0, delay_ms }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_concurrency_limit_and_a_timeout_layer() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let stack =
        ServiceBuilder::new().concurrency_limit(2).timeout(Duration::from_millis(300)).service(pool.clone());
    // Eight callers through a limit of two: the server never sees more than two at once.
    let most = AtomicUsize::new(0);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = EchoClient::new(stack.clone());
            tokio::spawn(async move { client.unary_echo(request(50)).await })
        })
        .collect();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(150) {
        most.fetch_max(server.active(), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let most = most.load(Ordering::Relaxed);
    assert!((1..=2).contains(&most), "{most} calls at once through a limit of 2");
    assert_eq!(server.calls(), 8);

    // The timeout layer ends a slow call; the pool frees its slot when tower drops the call.
    let status = EchoClient::new(stack).unary_echo(request(2_000)).await.unwrap_err();
    assert!(status.message().contains("timed out"), "{status:?}");
    wait_until(WAIT, "the abandoned call's slot is free", || pool.state().in_flight() == 0).await;
}

#[tokio::test]
async fn a_request_body_that_fails_fails_its_call_and_resets_the_stream() {
    let server = FrameServer::start(Behaviour::AnswerAfter(Duration::ZERO)).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    // A client-streaming body: one gRPC frame, then an error from the caller's own stream.
    let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Err(std::io::Error::other("the caller's upload broke")),
    ];
    let body = StreamBody::new(tokio_stream::iter(frames));
    let request = http::Request::builder()
        .method("POST")
        .uri("/echo.Echo/ClientStreamingEcho")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::new(body))
        .unwrap();
    let result = pool.clone().oneshot(request).await;
    let error = match result {
        Err(error) => error,
        Ok(response) => {
            // The server may answer first; then the failure shows in the response body.
            let body = http_body_util::BodyExt::collect(response.into_body()).await;
            body.expect_err("a call whose request body failed cannot succeed")
        }
    };
    assert_eq!(error.kind(), ErrorKind::RequestBody, "{error}");
    assert!(error.to_string().contains("the caller's upload broke"), "{error}");
    wait_until(WAIT, "the call's slot is free", || pool.state().in_flight() == 0).await;
    wait_until(WAIT, "the server saw the stream reset", || server.resets() >= 1).await;
}

#[tokio::test]
async fn service_ext_adapters_need_no_turbofish() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    // The pool takes one request type, so `ServiceExt` infers it: a response mapped into
    // tonic's body, an error mapped into tonic's `Status`, as a stack built for `Channel`
    // would have them.
    let mapped = pool
        .clone()
        .map_response(|response| response.map(tonic::body::Body::new))
        .map_err(|error| tonic::Status::unavailable(error.to_string()));
    let boxed = tower::util::BoxCloneService::new(mapped);
    let reply = EchoClient::new(boxed).unary_echo(request(0)).await.unwrap();
    assert_eq!(reply.into_inner().message, Bytes::from_static(b"tower"));
    assert_eq!(server.calls(), 1);
}
