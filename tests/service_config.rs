//! gRPC's service config in the pool: per-method timeout and wait-for-ready, the retry
//! policy (A6: retryable statuses, backoff bounds, `grpc-previous-rpc-attempts`, server
//! pushback, the replay buffer limit, another endpoint for the retry, commitment once the
//! server answered), retry throttling to A6's exact arithmetic, and invalid documents named
//! by their JSON path. Real tonic servers on 127.0.0.1 that count every attempt they see.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use grpc_pool::{ErrorKind, Pool, WaitForReady};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::echo_server::{Echo, EchoServer};
use grpc_pool_testkit::echo::{EchoRequest, EchoResponse};
use grpc_pool_testkit::{
    grpcio_calls, parse_grpc_timeout, unused_uri, wait_until, Behaviour, FrameServer, Relay, TestServer,
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status, Streaming};

/// The most a test waits for what should come at once, on a machine however busy.
const WAIT: Duration = Duration::from_secs(10);

/// One attempt as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    /// Its `grpc-previous-rpc-attempts` header.
    previous: Option<String>,
    /// The server's port.
    port: u16,
}

/// What the servers of one test share: how they fail, and every attempt they saw, by call
/// (the request's message names the call).
struct Script {
    /// Attempts of each call that fail; later ones answer.
    fail_first: AtomicU32,
    code: Code,
    /// `grpc-retry-pushback-ms` sent with each failure.
    pushback: Option<&'static str>,
    attempts: Mutex<HashMap<Bytes, Vec<Seen>>>,
    total: AtomicU64,
}

impl Script {
    fn new(fail_first: u32, code: Code, pushback: Option<&'static str>) -> Arc<Script> {
        Arc::new(Script {
            fail_first: AtomicU32::new(fail_first),
            code,
            pushback,
            attempts: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
        })
    }

    /// Records an attempt of `call`; its number, from 1.
    fn record<T>(&self, call: &Bytes, request: &Request<T>, port: u16) -> u32 {
        let previous = request
            .metadata()
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut attempts = self.attempts.lock().unwrap();
        let seen = attempts.entry(call.clone()).or_default();
        seen.push(Seen { at: Instant::now(), previous, port });
        seen.len() as u32
    }

    fn failure(&self) -> Status {
        let mut metadata = MetadataMap::new();
        if let Some(pushback) = self.pushback {
            metadata.insert("grpc-retry-pushback-ms", pushback.parse().unwrap());
        }
        Status::with_metadata(self.code, "the script fails this attempt", metadata)
    }

    fn attempts_of(&self, call: &str) -> Vec<Seen> {
        self.attempts.lock().unwrap().get(call.as_bytes()).cloned().unwrap_or_default()
    }

    fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Scripted {
    script: Arc<Script>,
    port: u16,
}

type Responses = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Scripted {
    async fn unary_echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let call = request.get_ref().message.clone();
        let attempt = self.script.record(&call, &request, self.port);
        if attempt <= self.script.fail_first.load(Ordering::Relaxed) {
            return Err(self.script.failure());
        }
        Ok(Response::new(EchoResponse { message: call }))
    }

    type ServerStreamingEchoStream = Responses;

    /// One message, then the script's failure in the trailers: the server had answered.
    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Responses>, Status> {
        let call = request.get_ref().message.clone();
        self.script.record(&call, &request, self.port);
        let items = [Ok(EchoResponse { message: call }), Err(self.script.failure())];
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn client_streaming_echo(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type BidirectionalStreamingEchoStream = Responses;

    async fn bidirectional_streaming_echo(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Responses>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Starts a server following `script` on 127.0.0.1; its URI. It runs until the test ends.
async fn serve(script: &Arc<Script>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = EchoServer::new(Scripted { script: script.clone(), port: addr.port() });
    tokio::spawn(async move {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    format!("http://{addr}")
}

/// A service config retrying `codes` of every `echo.Echo` method.
fn retrying(
    max_attempts: u32,
    initial: &str,
    max: &str,
    multiplier: f64,
    codes: &str,
    extra: &str,
) -> String {
    format!(
        r#"{{
          "methodConfig": [{{
            "name": [{{"service": "echo.Echo"}}],
            "retryPolicy": {{
              "maxAttempts": {max_attempts},
              "initialBackoff": "{initial}",
              "maxBackoff": "{max}",
              "backoffMultiplier": {multiplier},
              "retryableStatusCodes": [{codes}]
            }}
          }}]{extra}
        }}"#
    )
}

async fn pool_with(config: Option<&str>, endpoints: &[String]) -> Pool {
    let mut builder = Pool::builder();
    if let Some(config) = config {
        builder = builder.service_config(config);
    }
    builder.build(endpoints).await.expect("the pool builds")
}

fn call(name: &str) -> EchoRequest {
    EchoRequest { message: Bytes::copy_from_slice(name.as_bytes()), repeat: 0, delay_ms: 0 }
}

async fn unary(pool: &Pool, name: &str) -> Result<EchoResponse, Status> {
    EchoClient::new(pool.clone()).unary_echo(call(name)).await.map(Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_sends_each_call_until_its_third_attempt_answers() {
    let script = Script::new(2, Code::Unavailable, None);
    let server = serve(&script).await;
    // Backoff bounds: up to 100 ms before the first retry, then min(100 ms * 100, 150 ms).
    let config = retrying(3, "0.1s", "0.15s", 100.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &[server]).await;

    let names: Vec<String> = (0..20).map(|i| format!("call-{i}")).collect();
    let results = join_all(names.iter().map(|name| unary(&pool, name))).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "calls failed: {failed:?}");

    let slack = Duration::from_millis(600);
    let mut first_gaps = Vec::new();
    for name in &names {
        let seen = script.attempts_of(name);
        assert_eq!(seen.len(), 3, "{name}: attempts at the server");
        let previous: Vec<_> = seen.iter().map(|s| s.previous.as_deref()).collect();
        assert_eq!(previous, [None, Some("1"), Some("2")], "{name}: grpc-previous-rpc-attempts");
        let (first, second) = (seen[1].at - seen[0].at, seen[2].at - seen[1].at);
        assert!(first <= Duration::from_millis(100) + slack, "{name}: first backoff {first:?}");
        assert!(
            second <= Duration::from_millis(150) + slack,
            "{name}: second backoff {second:?} over maxBackoff"
        );
        first_gaps.push(first);
    }
    // The backoff is random in [0, 100 ms): among 20 calls, one waits 30 ms or more unless
    // there is no backoff at all (0.3^20 otherwise).
    let longest = first_gaps.iter().max().copied().unwrap_or_default();
    assert!(longest >= Duration::from_millis(30), "no call waited before its retry: longest {longest:?}");
    assert_eq!(pool.state().statistics.policy_retries, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_or_with_another_status_calls_are_not_retried() {
    // No service config: each call fails at its first attempt.
    let script = Script::new(2, Code::Unavailable, None);
    let pool = pool_with(None, &[serve(&script).await]).await;
    for i in 0..5 {
        let status = unary(&pool, &format!("plain-{i}")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(script.total(), 5, "one attempt per call");

    // A status the policy does not name: not retried either.
    let script = Script::new(2, Code::Internal, None);
    let config = retrying(3, "0.01s", "0.01s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    for i in 0..5 {
        let status = unary(&pool, &format!("internal-{i}")).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
    }
    assert_eq!(script.total(), 5, "one attempt per call");
    assert_eq!(pool.state().statistics.policy_retries, 0);
}

/// A6's throttle, written out: attempts a run of always-failing calls makes, the tokens left
/// (in thousandths) and the failures not retried for the throttle.
fn a6_model(calls: u32, max_attempts: u32, max_tokens: u64) -> (u64, u64, u64) {
    let (mut attempts, mut milli, mut throttled) = (0, max_tokens * 1000, 0);
    for _ in 0..calls {
        for n in 1..=max_attempts {
            attempts += 1;
            milli = milli.saturating_sub(1000);
            if milli <= max_tokens * 1000 / 2 {
                throttled += 1;
                break;
            }
            if n == max_attempts {
                break;
            }
        }
    }
    (attempts, milli, throttled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_throttling_follows_a6_arithmetic_exactly() {
    let script = Script::new(u32::MAX, Code::Unavailable, None);
    let throttling = r#", "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.25}"#;
    let config = retrying(3, "0.001s", "0.001s", 1.0, "14", throttling);
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    assert_eq!(pool.state().retry_tokens, Some(10.0));

    let calls = 12;
    for i in 0..calls {
        let status = unary(&pool, &format!("doomed-{i}")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let (attempts, milli, throttled) = a6_model(calls, 3, 10);
    assert_eq!(attempts, 3 + 2 + 10, "the model itself: 3, then 2, then 1 per call");
    assert_eq!(script.total(), attempts, "attempts at the server");
    assert_eq!(pool.state().retry_tokens, Some(milli as f64 / 1000.0));
    assert_eq!(pool.state().statistics.retries_throttled, throttled);

    // Successes give back tokenRatio each: 0 + 8 * 0.25 = 2 tokens.
    script.fail_first.store(0, Ordering::Relaxed);
    for i in 0..8 {
        unary(&pool, &format!("fine-{i}")).await.expect("the server answers now");
    }
    assert_eq!(pool.state().retry_tokens, Some(milli as f64 / 1000.0 + 2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pushback_sets_the_delay_or_stops_the_retries() {
    // Pushback 300 ms: the retry waits that long, whatever the policy's backoff (1 ms here).
    let script = Script::new(1, Code::Unavailable, Some("300"));
    let config = retrying(3, "0.001s", "0.001s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    unary(&pool, "pushed-back").await.expect("the second attempt answers");
    let seen = script.attempts_of("pushed-back");
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(300), "the retry came {gap:?} after the first attempt");

    // Pushback -1: no retry.
    let script = Script::new(1, Code::Unavailable, Some("-1"));
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    let status = unary(&pool, "stopped").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("grpc-retry-pushback-ms (-1)"), "{}", status.message());
    assert_eq!(script.attempts_of("stopped").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushback_longer_than_the_call_may_wait_ends_the_call_with_the_servers_status() {
    // A day: nothing but the pool bounds that wait for a call without a deadline (before,
    // the call slept it out). The bound on each call here is the test's, far above "at once".
    let config = retrying(3, "0.001s", "0.001s", 1.0, r#""UNAVAILABLE""#, "");
    let script = Script::new(1, Code::Unavailable, Some("86400000"));
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    let status = tokio::time::timeout(WAIT, unary(&pool, "a-day"))
        .await
        .expect("the call ends rather than wait a day")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let why = "grpc-retry-pushback-ms (86400000) is longer than a call without a deadline waits (30s";
    assert!(status.message().contains(why), "{}", status.message());
    assert_eq!(script.attempts_of("a-day").len(), 1);

    // 60 s against a call with 30 s left: it ends now with the server's status, not with
    // DEADLINE_EXCEEDED 30 s later.
    let script = Script::new(1, Code::Unavailable, Some("60000"));
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    let mut request = tonic::Request::new(call("past-deadline"));
    request.set_timeout(Duration::from_secs(30));
    let status = tokio::time::timeout(WAIT, EchoClient::new(pool.clone()).unary_echo(request))
        .await
        .expect("the call ends before its deadline")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("(60000) ends past the call's deadline"), "{}", status.message());
    assert_eq!(script.attempts_of("past-deadline").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_endpoint() {
    let script = Script::new(1, Code::Unavailable, None);
    let servers = [serve(&script).await, serve(&script).await];
    let config = retrying(2, "0.001s", "0.001s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &servers).await;
    for i in 0..10 {
        let name = format!("moved-{i}");
        unary(&pool, &name).await.expect("the retry answers");
        let seen = script.attempts_of(&name);
        assert_eq!(seen.len(), 2);
        assert_ne!(seen[0].port, seen[1].port, "{name}: both attempts went to one server");
    }
}

type Respond = h2::server::SendResponse<Bytes>;

/// An h2 server on 127.0.0.1 that hands each stream, numbered from 1, to `answer` on a task of
/// its own. Its URI and the count of streams it saw.
async fn h2_server<F, Fut>(answer: F) -> (String, Arc<AtomicU64>)
where
    F: Fn(u64, http::Request<h2::RecvStream>, Respond) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicU64::new(0));
    let counter = streams.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (counter, answer) = (counter.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::spawn(answer(n, request, respond));
                }
            });
        }
    });
    (format!("http://{addr}"), streams)
}

/// An h2 server that resets every stream with `INTERNAL_ERROR` once its request is in,
/// except each `answer_every`-th, which it answers with the request's own message (an
/// `EchoRequest` with only its message set encodes as the `EchoResponse` of that message).
/// Its URI and the count of streams it saw.
async fn resetting_server(answer_every: u64) -> (String, Arc<AtomicU64>) {
    h2_server(move |n, request, mut respond: Respond| async move {
        let mut body = request.into_body();
        let mut echoed = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            echoed.extend_from_slice(&chunk);
        }
        if !n.is_multiple_of(answer_every) {
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
        let head = http::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
        let Ok(mut send) = respond.send_response(head, false) else { return };
        let _ = send.send_data(Bytes::from(echoed), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_before_the_response_head_is_retried_when_its_status_is_retryable() {
    // RST_STREAM INTERNAL_ERROR is gRPC's INTERNAL: retried when the policy names it.
    let (server, streams) = resetting_server(3).await;
    let config = retrying(3, "0.001s", "0.001s", 1.0, r#""INTERNAL""#, "");
    let pool = pool_with(Some(&config), &[server]).await;
    for i in 0..5 {
        unary(&pool, &format!("reset-{i}")).await.expect("the third attempt answers");
    }
    assert_eq!(streams.load(Ordering::SeqCst), 15, "three attempts per call");

    // Not named: the first reset ends the call, and the error says the server may have it.
    let (server, streams) = resetting_server(3).await;
    let config = retrying(3, "0.001s", "0.001s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &[server]).await;
    let status = unary(&pool, "reset-once").await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("the server may have processed it"), "{}", status.message());
    assert_eq!(streams.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_replay_buffer_limit_is_not_retried_and_the_error_says_so() {
    let script = Script::new(1, Code::Unavailable, None);
    let config = retrying(3, "0.001s", "0.001s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = Pool::builder()
        .service_config(&config)
        .replay_buffer_limit(64)
        .build([serve(&script).await])
        .await
        .unwrap();
    let big = "x".repeat(200);
    let status = unary(&pool, &big).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("replay buffer limit (64 bytes)"), "{}", status.message());
    assert_eq!(script.attempts_of(&big).len(), 1);
    // A small body is retried by the same pool.
    unary(&pool, "small").await.expect("retried");
    assert_eq!(script.attempts_of("small").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_that_delivered_a_message_is_never_retried() {
    let script = Script::new(u32::MAX, Code::Unavailable, None);
    let config = retrying(5, "0.001s", "0.001s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    let mut client = EchoClient::new(pool.clone());
    let mut stream =
        client.server_streaming_echo(call("streamed")).await.expect("the server answers").into_inner();
    let first = stream.message().await.expect("one message").expect("a message");
    assert_eq!(first.message, "streamed".as_bytes());
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(script.attempts_of("streamed").len(), 1, "attempts at the server");
    assert_eq!(pool.state().statistics.policy_retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_timeout_shorter_than_the_callers_deadline_ends_the_call() {
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo", "method": "UnaryEcho"}], "timeout": "0.2s"}]}"#;
    // A server that answers after 3 s whatever the call's grpc-timeout says (a tonic server
    // would end the call itself at the timeout it is told, with CANCELLED).
    let slow = FrameServer::start(Behaviour::AnswerAfter(Duration::from_secs(3))).await;
    let pool = pool_with(Some(config), &[slow.uri()]).await;
    let mut request = tonic::Request::new(call("slow"));
    request.set_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let status = EchoClient::new(pool.clone()).unary_echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    wait_until(Duration::from_secs(10), "the stream was reset", || slow.resets() >= 1).await;

    // The server is told the method's timeout, not the caller's.
    let server = TestServer::start().await;
    let pool = pool_with(Some(config), &[server.uri()]).await;
    let mut request = tonic::Request::new(call("quick"));
    request.set_timeout(Duration::from_secs(10));
    EchoClient::new(pool.clone()).unary_echo(request).await.expect("a quick call answers");
    let (_, told) = server.grpc_timeouts().pop().expect("the server saw the call");
    assert!(parse_grpc_timeout(&told) <= Duration::from_millis(200), "grpc-timeout {told}");

    // A method with no timeout keeps the caller's deadline: the same slow call answers.
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Other"}], "timeout": "0.2s"}]}"#;
    let pool = pool_with(Some(config), &[server.uri()]).await;
    let mut request =
        tonic::Request::new(EchoRequest { message: Bytes::from_static(b"slow"), repeat: 0, delay_ms: 300 });
    request.set_timeout(Duration::from_secs(10));
    EchoClient::new(pool.clone()).unary_echo(request).await.expect("no method timeout applies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_comes_from_the_method_config_unless_the_call_says_otherwise() {
    let config = r#"{"methodConfig": [{"name": [{}], "waitForReady": true}]}"#;
    let pool = Pool::builder().service_config(config).build_lazy([unused_uri()]).unwrap();
    wait_until(Duration::from_secs(10), "the connect failed", || {
        pool.state().endpoints[0].consecutive_failures > 0
    })
    .await;
    // The method's waitForReady: the call waits for the endpoint, until its deadline.
    let mut request = tonic::Request::new(call("waits"));
    request.set_timeout(Duration::from_millis(300));
    let status = EchoClient::new(pool.clone()).unary_echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The call's own WaitForReady(false) wins: it fails fast.
    let mut request = tonic::Request::new(call("fails fast"));
    request.set_timeout(Duration::from_secs(5));
    request.extensions_mut().insert(WaitForReady(false));
    let started = Instant::now();
    let status = EchoClient::new(pool.clone()).unary_echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "it waited for its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_limits_end_the_call_with_resource_exhausted() {
    let script = Script::new(0, Code::Ok, None);
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "maxRequestMessageBytes": 100, "maxResponseMessageBytes": "50"}]}"#;
    let pool = pool_with(Some(config), &[serve(&script).await]).await;
    // 200 bytes of message (202 encoded): over the request limit, never sent whole.
    let big = "r".repeat(200);
    let status = unary(&pool, &big).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(
            "request message of 203 bytes is over the service config's maxRequestMessageBytes (100 bytes)"
        ),
        "{}",
        status.message()
    );
    assert!(script.attempts_of(&big).is_empty(), "the server never got the message");
    // 60 bytes: the request fits, the echo (62 encoded) is over the response limit.
    let status = unary(&pool, &"e".repeat(60)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(
            "response message of 62 bytes is over the service config's maxResponseMessageBytes (50 bytes)"
        ),
        "{}",
        status.message()
    );
    // Within both.
    unary(&pool, "small").await.expect("a small call answers");
}

#[tokio::test(flavor = "current_thread")]
async fn an_invalid_service_config_fails_the_build_naming_the_json_path() {
    let config = retrying(1, "0.1s", "1s", 2.0, r#""UNAVAILABLE""#, "");
    let err = Pool::builder().service_config(&config).build_lazy([unused_uri()]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("methodConfig[0].retryPolicy.maxAttempts: must be at least 2"), "{err}");
    let config = retrying(2, "0.1s", "1s", 2.0, r#""UNAVAILABLE", "SOMETIMES""#, "");
    let err = Pool::builder().service_config(&config).build_lazy([unused_uri()]).unwrap_err();
    assert!(err.to_string().contains("methodConfig[0].retryPolicy.retryableStatusCodes[1]"), "{err}");
    let err = Pool::builder()
        .service_config_file("/nonexistent/service-config.json")
        .build_lazy([unused_uri()])
        .unwrap_err();
    assert!(err.to_string().contains("service_config_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_sends_a_copy_to_the_fast_endpoint_and_cancels_the_loser() {
    // One endpoint answers after 500 ms, the other after 5 ms; a copy goes out after 50 ms.
    let slow = FrameServer::start(Behaviour::AnswerAfter(Duration::from_millis(500))).await;
    let fast = FrameServer::start(Behaviour::AnswerAfter(Duration::from_millis(5))).await;
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.05s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;
    let pool = pool_with(Some(config), &[slow.uri(), fast.uri()]).await;
    let mut latencies = Vec::new();
    for chunk in 0..25 {
        let calls = (0..8).map(|i| {
            let pool = pool.clone();
            async move {
                let started = Instant::now();
                unary(&pool, &format!("hedged-{chunk}-{i}")).await.expect("a copy answers");
                started.elapsed()
            }
        });
        latencies.extend(join_all(calls).await);
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    let stats = pool.state().statistics;
    println!("hedged p99 {p99:?}, median {:?}, {stats:?}", latencies[latencies.len() / 2]);
    // Without hedging, the calls sent to the slow endpoint (about half) take 500 ms.
    assert!(p99 < Duration::from_millis(400), "p99 {p99:?}");
    assert!(stats.hedges_sent > 0 && stats.hedges_won > 0, "{stats:?}");
    // Every losing copy is cancelled, and the servers see each reset.
    assert_eq!(stats.hedges_cancelled, stats.hedges_sent, "each hedged call has one loser");
    wait_until(Duration::from_secs(10), "the servers saw every cancelled copy", || {
        slow.resets() + fast.resets() >= stats.hedges_cancelled
    })
    .await;
    assert_eq!(slow.resets() + fast.resets(), stats.hedges_cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_fatal_status_sends_the_next_copy_at_once_and_a_fatal_one_ends_the_call() {
    // hedgingDelay 60 s: only a non-fatal status can bring the next copy within the call's
    // 10 s deadline.
    let hedging = |codes: &str| {
        format!(
            r#"{{"methodConfig": [{{"name": [{{"service": "echo.Echo"}}],
            "hedgingPolicy": {{"maxAttempts": 3, "hedgingDelay": "60s", "nonFatalStatusCodes": [{codes}]}}}}]}}"#
        )
    };
    let script = Script::new(1, Code::Unavailable, None);
    let pool = pool_with(Some(&hedging(r#""UNAVAILABLE""#)), &[serve(&script).await]).await;
    let mut request = tonic::Request::new(call("non-fatal"));
    request.set_timeout(Duration::from_secs(10));
    EchoClient::new(pool.clone()).unary_echo(request).await.expect("the second copy answers");
    let seen = script.attempts_of("non-fatal");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].previous.as_deref(), Some("1"), "grpc-previous-rpc-attempts on the copy");

    // INTERNAL is not in nonFatalStatusCodes: the first copy's answer is the call's.
    let script = Script::new(1, Code::Internal, None);
    let pool = pool_with(Some(&hedging(r#""UNAVAILABLE""#)), &[serve(&script).await]).await;
    let mut request = tonic::Request::new(call("fatal"));
    request.set_timeout(Duration::from_secs(10));
    let status = EchoClient::new(pool.clone()).unary_echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(script.attempts_of("fatal").len(), 1);
    assert_eq!(pool.state().statistics.hedges_sent, 0);
}

/// One scenario against the gRPC C core: a server script, a service config, the calls.
struct Scenario {
    fail_first: u32,
    code: Code,
    pushback: Option<&'static str>,
    config: String,
    calls: usize,
}

/// Attempts a scenario's server counted and each call's status code, for calls from the
/// pool and, on a fresh server, from the C core (grpcio) with the same document.
async fn both_clients(label: &str, scenario: &Scenario) -> [(u64, Vec<String>); 2] {
    let names: Vec<String> = (0..scenario.calls).map(|i| format!("{label}-{i}")).collect();
    let script = Script::new(scenario.fail_first, scenario.code, scenario.pushback);
    let pool = pool_with(Some(&scenario.config), &[serve(&script).await]).await;
    let mut codes = Vec::new();
    for name in &names {
        let code = unary(&pool, name).await.map_or_else(|status| status.code(), |_| Code::Ok);
        codes.push(code_name(code));
    }
    let ours = (script.total(), codes);
    let script = Script::new(scenario.fail_first, scenario.code, scenario.pushback);
    let uri = serve(&script).await;
    let codes = grpcio_calls(uri.trim_start_matches("http://"), &scenario.config, &names).await;
    [ours, (script.total(), codes)]
}

fn code_name(code: Code) -> String {
    match code {
        Code::Ok => "OK",
        Code::Unavailable => "UNAVAILABLE",
        Code::Internal => "INTERNAL",
        other => return format!("{other:?}"),
    }
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_service_config_makes_the_same_attempts_as_the_grpc_c_core() {
    let unavailable = r#""UNAVAILABLE""#;
    let throttling = r#", "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.25}"#;
    let scenarios = [
        (
            "two-fail",
            Scenario {
                fail_first: 2,
                code: Code::Unavailable,
                pushback: None,
                config: retrying(3, "0.01s", "0.01s", 1.0, unavailable, ""),
                calls: 5,
            },
        ),
        (
            "throttled",
            Scenario {
                fail_first: u32::MAX,
                code: Code::Unavailable,
                pushback: None,
                config: retrying(3, "0.01s", "0.01s", 1.0, unavailable, throttling),
                calls: 12,
            },
        ),
        (
            "not-retryable",
            Scenario {
                fail_first: 2,
                code: Code::Internal,
                pushback: None,
                config: retrying(3, "0.01s", "0.01s", 1.0, unavailable, ""),
                calls: 5,
            },
        ),
        (
            "pushback-stop",
            Scenario {
                fail_first: 1,
                code: Code::Unavailable,
                pushback: Some("-1"),
                config: retrying(3, "0.01s", "0.01s", 1.0, unavailable, ""),
                calls: 3,
            },
        ),
        (
            "pushback-50",
            Scenario {
                fail_first: 1,
                code: Code::Unavailable,
                pushback: Some("50"),
                config: retrying(3, "0.01s", "0.01s", 1.0, unavailable, ""),
                calls: 3,
            },
        ),
        (
            "capped-at-5",
            Scenario {
                fail_first: u32::MAX,
                code: Code::Unavailable,
                pushback: None,
                config: retrying(9, "0.01s", "0.01s", 1.0, unavailable, ""),
                calls: 2,
            },
        ),
    ];
    // Successes give tokens back: 4 -> 3, +0.5, -> 2.5, +0.5, -> 2 (stops), then 1, 0...
    let mixed = r#", "retryThrottling": {"maxTokens": 4, "tokenRatio": 0.5}"#;
    let scenarios = scenarios.into_iter().chain([(
        "throttled-mixed",
        Scenario {
            fail_first: 1,
            code: Code::Unavailable,
            pushback: None,
            config: retrying(3, "0.01s", "0.01s", 1.0, unavailable, mixed),
            calls: 5,
        },
    )]);
    let mut table = Vec::new();
    for (label, scenario) in scenarios {
        let [ours, core] = both_clients(label, &scenario).await;
        table.push(format!(
            "{label}: pool {} attempts {:?}; C core {} attempts {:?}",
            ours.0, ours.1, core.0, core.1
        ));
        assert_eq!(ours, core, "{label}: the pool and the C core differ");
    }
    println!("{}", table.join("\n"));
}

/// Records the `attempt` spans the pool opens and closes: the `retry` field of each opened,
/// and how many have closed.
#[derive(Clone, Default)]
struct AttemptSpans {
    opened: Arc<Mutex<Vec<u64>>>,
    closed: Arc<AtomicU32>,
}

impl<S> tracing_subscriber::Layer<S> for AttemptSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Retry(Option<u64>);
        impl tracing::field::Visit for Retry {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "retry" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
        }
        if attrs.metadata().name() == "attempt" {
            let mut retry = Retry(None);
            attrs.record(&mut retry);
            self.opened.lock().unwrap().push(retry.0.expect("an attempt span names its retry"));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if ctx.metadata(&id).is_some_and(|m| m.name() == "attempt") {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn each_attempt_of_a_call_under_a_retry_policy_is_a_span() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = AttemptSpans::default();
    // This thread's subscriber: the test runtime is current-thread, so the call's future
    // is polled here.
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let script = Script::new(2, Code::Unavailable, None);
    let config = retrying(3, "0.01s", "0.01s", 1.0, r#""UNAVAILABLE""#, "");
    let pool = pool_with(Some(&config), &[serve(&script).await]).await;
    unary(&pool, "spanned").await.expect("answered at its third attempt");
    assert_eq!(*spans.opened.lock().unwrap(), [0, 1, 2], "one span per attempt, numbered by retry");
    assert_eq!(spans.closed.load(Ordering::SeqCst), 3, "every attempt's span closed with its attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_copies_that_fail_count_for_outlier_detection_though_another_copy_answers() {
    // Every first copy that lands on the broken endpoint answers UNAVAILABLE (non-fatal), and
    // the next copy, sent at once, answers from the good one: the calls all succeed, and the
    // broken endpoint's failures must still get it ejected.
    let (broken, good) = (TestServer::start().await, TestServer::start().await);
    broken.set_unavailable(true);
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "60s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;
    let mut outliers = grpc_pool::OutlierDetection::default();
    outliers.consecutive_failures = 3;
    outliers.max_ejection_percent = 50;
    let pool = Pool::builder()
        .service_config(config)
        .outlier_detection(Some(outliers))
        .build([broken.uri(), good.uri()])
        .await
        .unwrap();
    let ejected = |pool: &Pool| {
        pool.state()
            .endpoints
            .iter()
            .find(|e| e.endpoint.to_string() == broken.uri())
            .and_then(|e| e.ejected_for)
    };
    for i in 0..40 {
        unary(&pool, &format!("hedged-{i}")).await.expect("a copy answers");
        if ejected(&pool).is_some() {
            break;
        }
    }
    assert!(broken.calls() >= 3, "the broken endpoint took {} copies", broken.calls());
    assert!(
        ejected(&pool).is_some(),
        "not ejected after {} failed copies: {:?}",
        broken.calls(),
        pool.state().endpoints
    );
    // Ejected, it takes no more first copies.
    let before = broken.calls();
    for i in 0..10 {
        unary(&pool, &format!("after-{i}")).await.expect("answered");
    }
    assert_eq!(broken.calls(), before);
}

/// A hedging policy for every `echo.Echo` method, with no non-fatal status.
fn hedging_only(max_attempts: u32, delay: &str) -> String {
    format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "echo.Echo"}}],
        "hedgingPolicy": {{"maxAttempts": {max_attempts}, "hedgingDelay": "{delay}"}}}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_copy_whose_connection_breaks_leaves_the_other_copies_to_answer() {
    // Two copies out, one on each endpoint, both answering after 2 s (time enough for the
    // test to see both out on a busy machine); the connection under one of them is reset. That copy's failure is no answer of the server's: the other copy
    // must still answer the call (before, the broken copy's error cancelled it).
    let (behind_relay, direct) = (TestServer::start().await, TestServer::start().await);
    let relay = Relay::start(behind_relay.addr()).await;
    let pool = pool_with(Some(&hedging_only(2, "0.05s")), &[relay.uri(), direct.uri()]).await;
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            let slow = EchoRequest { message: Bytes::from_static(b"hedged"), repeat: 0, delay_ms: 2_000 };
            EchoClient::new(pool).unary_echo(slow).await
        }
    });
    wait_until(WAIT, "a copy is on each server", || behind_relay.active() == 1 && direct.active() == 1).await;
    relay.reset();
    let answer = tokio::time::timeout(WAIT, call).await.expect("the call ends").unwrap();
    assert_eq!(answer.expect("the copy on the healthy connection answers").into_inner().message, "hedged");
    assert_eq!(pool.state().statistics.hedges_sent, 1);
}

/// An h2 server that holds every stream for `hold`, then refuses it (`REFUSED_STREAM`: the
/// server never saw it, so a client may send it again). Its URI and the streams it saw.
async fn refusing_server(hold: Duration) -> (String, Arc<AtomicU64>) {
    h2_server(move |_, _, mut respond: Respond| async move {
        tokio::time::sleep(hold).await;
        respond.send_reset(h2::Reason::REFUSED_STREAM);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_call_whose_copies_are_all_refused_opens_at_most_max_attempts_streams() {
    // Five copies 10 ms apart, each refused 100 ms after it arrives. A refused copy was never
    // seen, so it may be sent again, but within the policy's five (A6's cap): before, the
    // first refusal cancelled the others and resent the call as a new hedge of five.
    let (server, streams) = refusing_server(Duration::from_millis(100)).await;
    let pool = pool_with(Some(&hedging_only(5, "0.01s")), &[server]).await;
    let status = tokio::time::timeout(WAIT, unary(&pool, "refused"))
        .await
        .expect("the call ends")
        .expect_err("every copy is refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not retried: all 5 copies of its hedging policy used"),
        "{}",
        status.message()
    );
    assert_eq!(streams.load(Ordering::SeqCst), 5, "streams the server saw for one call");
    assert_eq!(pool.state().statistics.hedges_sent, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_call_dropped_by_its_caller_counts_its_copies_as_cancelled() {
    let server = FrameServer::start(Behaviour::AnswerAfter(Duration::from_secs(30))).await;
    let pool = pool_with(Some(&hedging_only(2, "0.01s")), &[server.uri()]).await;
    let call = tokio::spawn({
        let pool = pool.clone();
        async move { unary(&pool, "abandoned").await }
    });
    wait_until(WAIT, "both copies are out", || pool.state().statistics.hedges_sent == 1).await;
    call.abort();
    let _ = call.await;
    // Dropping the call's future reset both copies; they count as cancelled (before, a
    // dropped call counted nothing).
    wait_until(WAIT, "the server saw both copies reset", || server.resets() == 2).await;
    let stats = pool.state().statistics;
    assert_eq!(stats.hedges_cancelled, 2, "{stats:?}");
    assert_eq!(pool.state().in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_call_whose_only_copy_is_lost_with_its_endpoint_down_fails_fast() {
    // One endpoint, one copy out, hedgingDelay 60 s, no deadline: the server dies under the
    // copy and does not come back. The call must end at once as any call would (UNAVAILABLE,
    // failing fast while every endpoint is down), not wait for a slot to send the next copy.
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let pool = pool_with(Some(&hedging_only(3, "60s")), &[relay.uri()]).await;
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            let slow = EchoRequest { message: Bytes::from_static(b"lost"), repeat: 0, delay_ms: 5_000 };
            EchoClient::new(pool).unary_echo(slow).await
        }
    });
    wait_until(WAIT, "the copy is on the server", || server.active() == 1).await;
    drop(server); // gone for good: its port refuses connects from now on
    relay.reset();
    let status = tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends rather than wait for a slot")
        .unwrap()
        .expect_err("nothing can answer it");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_calls_holding_every_slot_do_not_wait_on_each_other_for_their_next_copies() {
    // Two stream slots in all, four hedged calls, every copy answered UNAVAILABLE (non-fatal,
    // so each call wants its next copy at once). A call whose copy has ended holds that
    // copy's slot while it wants another: waiting for a free one there, the calls would wait
    // on each other until their deadlines (found by the simulation, seeds 1738 and 2076).
    // Queued instead, each call gives its slot back and all end with their last status.
    let script = Script::new(u32::MAX, Code::Unavailable, None);
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "60s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;
    let pool = Pool::builder()
        .service_config(config)
        .max_connections(1)
        .max_concurrent_streams(2)
        .build([serve(&script).await])
        .await
        .unwrap();
    let calls = (0..4).map(|i| {
        let pool = pool.clone();
        async move {
            let mut request = tonic::Request::new(call(&format!("crowded-{i}")));
            request.set_timeout(Duration::from_secs(60));
            EchoClient::new(pool).unary_echo(request).await
        }
    });
    let outcomes =
        tokio::time::timeout(WAIT, join_all(calls)).await.expect("the calls end long before their deadlines");
    for outcome in outcomes {
        let status = outcome.expect_err("every copy fails");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    for i in 0..4 {
        assert_eq!(script.attempts_of(&format!("crowded-{i}")).len(), 3, "each call's three copies");
    }
    assert_eq!(pool.state().in_flight(), 0);
}
