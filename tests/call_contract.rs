//! The contract a caller relies on when it swaps tonic's `Channel` for the pool, as gRPC
//! defines it: a call never outlives its deadline, fails fast with the true cause when nothing
//! can serve it (or waits, when asked to), and the pool reconnects as gRPC's backoff says.
//! Real servers on 127.0.0.1: tonic, and the frame-level test server for answers that come
//! late whatever the call's `grpc-timeout` says.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{ErrorKind, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{
    parse_grpc_timeout, wait_until, Behaviour, FrameServer, HeldClock, ServerOptions, TestServer,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn client(pool: &Pool) -> EchoClient<Pool> {
    EchoClient::new(pool.clone())
}

/// An echo request whose server-side delay is `delay_ms`, with a deadline of `timeout`.
fn with_deadline(delay_ms: u32, timeout: Duration) -> tonic::Request<EchoRequest> {
    let mut request =
        tonic::Request::new(EchoRequest { message: Bytes::from_static(b"hi"), repeat: 0, delay_ms });
    request.set_timeout(timeout);
    request
}

/// The server answers after 2 s whatever the deadline: a call given 200 ms must end at its
/// deadline, not when the server gets round to it.
const SLOW: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_millis(200);

/// How far the deadline tests move their held clock at a time.
const STEP: Duration = Duration::from_millis(10);

/// Runs `call` with the clock held, moving it on in steps until the call ends, by `bound`
/// at most (then the test fails); returns its outcome and how long it took on the clock.
/// The deadline tests run this way: the server's late answer and the call's deadline are
/// both on the clock, so the deadline wins however slow the machine.
async fn on_the_clock<T: Send + 'static>(
    clock: &HeldClock,
    bound: Duration,
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> (T, Duration) {
    let call = tokio::spawn(call);
    let took = clock.advance_until(bound, STEP, "the call ends", || call.is_finished()).await;
    (call.await.expect("the call's task"), took)
}

/// A deadline's bound on the clock: tokio's timers round up to the millisecond, and the
/// clock moves by steps. Far below [`SLOW`]: a call that waited for the answer fails the
/// test.
const DEADLINE_BOUND: Duration = DEADLINE.saturating_add(STEP).saturating_add(STEP);

#[tokio::test(start_paused = true)]
async fn a_call_past_its_deadline_fails_with_deadline_exceeded_and_is_cancelled_at_once() {
    let clock = HeldClock::hold();
    let server = FrameServer::start(Behaviour::AnswerAfter(SLOW)).await;
    let pool = Pool::builder().name("deadlines").build([server.uri()]).await.unwrap();
    for call in 1..=5u64 {
        let mut client = client(&pool);
        let (outcome, took) = on_the_clock(&clock, DEADLINE_BOUND, async move {
            client.unary_echo(with_deadline(0, DEADLINE)).await
        })
        .await;
        let status = outcome.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(took >= DEADLINE, "ended after {took:?}, before its deadline");
        for part in ["deadline of 200ms exceeded", "waiting for the response head from", &server.uri()] {
            assert!(status.message().contains(part), "`{part}` missing from: {}", status.message());
        }
        // Its slot is free the moment the call returns.
        assert_eq!(pool.state().in_flight(), 0);
        // The stream was reset, so the server stopped waiting to answer it.
        clock
            .wait_until(WAIT, "the server saw the call cancelled", || {
                server.resets() == call && server.waiting() == 0
            })
            .await;
    }
    let state = pool.state();
    assert_eq!(state.statistics.retries, 0, "a call past its deadline is never sent again");
    assert_eq!(server.answered(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_response_stream_that_stalls_fails_at_the_deadline() {
    let clock = HeldClock::hold();
    let server = FrameServer::start(Behaviour::HeadThenStall(SLOW)).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let mut client = client(&pool);
    let (outcome, took) = on_the_clock(&clock, DEADLINE_BOUND, async move {
        // The head comes at once, so the call itself succeeds; its stream then stalls.
        let mut stream = client.server_streaming_echo(with_deadline(0, DEADLINE)).await.unwrap().into_inner();
        let status = stream.message().await.unwrap_err();
        (status, stream)
    })
    .await;
    let (status, stream) = outcome;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= DEADLINE, "ended after {took:?}");
    assert!(status.message().contains("while receiving the response from"), "{}", status.message());
    assert_eq!(
        pool.state().in_flight(),
        0,
        "the slot is freed with the error, not when the stream is dropped"
    );
    clock.wait_until(WAIT, "the server saw the stream cancelled", || server.resets() == 1).await;
    drop(stream);

    // Side by side: tonic's `Channel` bounds only the response head by the deadline, so the
    // same stalled stream keeps its caller until the server answers.
    let channel = tonic::transport::Endpoint::from_shared(server.uri()).unwrap().connect().await.unwrap();
    let (_, channel_took) = on_the_clock(&clock, SLOW + DEADLINE_BOUND, async move {
        let response =
            EchoClient::new(channel).server_streaming_echo(with_deadline(0, DEADLINE)).await.unwrap();
        let _ = response.into_inner().message().await;
    })
    .await;
    assert!(channel_took >= SLOW, "the Channel ended the stalled stream after {channel_took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_response_stream_whose_data_is_always_ready_is_cut_at_the_deadline() {
    // The server streams without pause, so the body always has data waiting when it is
    // polled: its deadline must still end it (before, only a pending poll looked). Each
    // message is larger than an HTTP/2 frame (16 KiB), so tonic never has a whole message
    // buffered that it could hand out without polling the body.
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let mut client = client(&pool);
    let mut request = tonic::Request::new(EchoRequest {
        message: Bytes::from(vec![b'x'; 32 * 1024]),
        repeat: u32::MAX,
        delay_ms: 0,
    });
    request.set_timeout(DEADLINE);
    let started = tokio::time::Instant::now();
    let mut stream = client.server_streaming_echo(request).await.unwrap().into_inner();
    let mut late = 0u32;
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) if started.elapsed() > DEADLINE => late += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the endless stream ended"),
            Err(status) => break status,
        }
        assert!(
            started.elapsed() <= DEADLINE_BOUND,
            "the stream outlived its deadline, {late} messages late"
        );
        // Real time for the server to keep the window full, then the clock moves on.
        clock.advance(STEP).await;
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert_eq!(late, 0, "messages were delivered after the deadline");
    assert!(ended.message().contains("while receiving the response from"), "{}", ended.message());
    assert_eq!(pool.state().in_flight(), 0, "the slot is freed with the error");
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_a_slot_fails_at_its_deadline_and_leaves_the_queue() {
    let clock = HeldClock::hold();
    let server = FrameServer::start(Behaviour::AnswerAfter(SLOW)).await;
    let pool = Pool::builder()
        .max_connections(1)
        .max_concurrent_streams(1)
        .checkout_timeout(Duration::from_secs(30))
        .build([server.uri()])
        .await
        .unwrap();
    let mut busy = client(&pool);
    let holder =
        tokio::spawn(async move { busy.unary_echo(with_deadline(0, Duration::from_secs(30))).await });
    clock.wait_until(WAIT, "the only slot is taken", || pool.state().in_flight() == 1).await;

    let mut queued = client(&pool);
    let (outcome, took) =
        on_the_clock(
            &clock,
            DEADLINE_BOUND,
            async move { queued.unary_echo(with_deadline(0, DEADLINE)).await },
        )
        .await;
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= DEADLINE, "ended after {took:?}");
    assert!(status.message().contains("waiting for a stream slot"), "{}", status.message());
    let state = pool.state();
    assert_eq!(state.waiters, 0);
    assert_eq!(state.in_flight(), 1, "only the call holding the slot is in flight");
    assert_eq!(server.waiting(), 1, "the queued call never reached the server");
    clock.advance_until(SLOW, STEP, "the call holding the slot ends", || holder.is_finished()).await;
    holder.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_server_is_sent_the_time_left_when_the_call_goes_out() {
    let server =
        TestServer::start_with(ServerOptions { max_concurrent_streams: Some(1), ..Default::default() }).await;
    let pool = Pool::builder().max_connections(1).build([server.uri()]).await.unwrap();
    let mut first = client(&pool);
    let holder =
        tokio::spawn(async move { first.unary_echo(with_deadline(1_000, Duration::from_secs(30))).await });
    wait_until(WAIT, "the first call holds the only stream", || server.active() == 1).await;

    let timeout = Duration::from_secs(10);
    let started = Instant::now();
    client(&pool).unary_echo(with_deadline(0, timeout)).await.unwrap();
    let deadline = started + timeout;
    holder.await.unwrap().unwrap();

    let seen = server.grpc_timeouts();
    assert_eq!(seen.len(), 2);
    let (arrived, value) = &seen[1];
    let waited = arrived.duration_since(started);
    assert!(waited >= Duration::from_millis(500), "the call went out after {waited:?}, without waiting");
    // What the server was told ends where the client's deadline does, give or take the trip
    // over loopback; the full 10 s would end `waited` later.
    let told = parse_grpc_timeout(value);
    let server_deadline = *arrived + told;
    let off =
        if server_deadline > deadline { server_deadline - deadline } else { deadline - server_deadline };
    assert!(off < waited / 2, "told {value} after a wait of {waited:?}: off by {off:?}");
    assert!(told < timeout, "told {value}");
}

#[tokio::test(start_paused = true)]
async fn the_pool_timeout_bounds_calls_without_a_deadline_of_their_own() {
    let clock = HeldClock::hold();
    let server = FrameServer::start(Behaviour::AnswerAfter(SLOW)).await;
    let pool = Pool::builder().timeout(Some(DEADLINE)).build([server.uri()]).await.unwrap();
    let mut client_of_pool = client(&pool);
    let (outcome, took) = on_the_clock(&clock, DEADLINE_BOUND, async move {
        let request = EchoRequest { message: Bytes::from_static(b"x"), repeat: 0, delay_ms: 0 };
        client_of_pool.unary_echo(request).await
    })
    .await;
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= DEADLINE, "ended after {took:?}");
    // A call's own shorter deadline still holds under a longer pool timeout.
    let pool = Pool::builder().timeout(Some(Duration::from_secs(30))).build([server.uri()]).await.unwrap();
    let mut client_of_pool = client(&pool);
    let (outcome, took) = on_the_clock(&clock, DEADLINE_BOUND, async move {
        client_of_pool.unary_echo(with_deadline(0, DEADLINE)).await
    })
    .await;
    assert_eq!(outcome.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(took >= DEADLINE, "ended after {took:?}");
}

#[test]
fn a_pool_timeout_of_zero_is_rejected_at_build() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let error = runtime.block_on(async {
        Pool::builder().timeout(Some(Duration::ZERO)).build_lazy(["http://127.0.0.1:1"]).unwrap_err()
    });
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("`timeout` = 0ns; allowed: above zero, up to 30 days"), "{error}");
}

/// PINGs are cancel-safe: h2 keeps one user PING per connection, and a PING whose waiter
/// went away must not block every later one.
#[tokio::test(start_paused = true)]
async fn a_call_cancelled_during_its_ping_before_use_leaves_the_member_usable() {
    let clock = HeldClock::hold();
    let server = FrameServer::start(Behaviour::AnswerAfter(Duration::ZERO)).await;
    let quiet = Duration::from_millis(50);
    let pool = Pool::builder()
        .max_connections(1)
        .ping_before_use(Some(quiet))
        .keepalive(None)
        .build([server.uri()])
        .await
        .unwrap();
    let member = pool.state().endpoints[0].members[0].id;
    clock.advance(2 * quiet).await;
    // Cancelled at its first wait: the PING has gone out, its PONG not yet come back. One
    // poll and a drop, not a 1 ns timeout: tokio's timers tick by the millisecond, and a PONG
    // back within that tick let the call go out (101 calls answered, on a busy machine).
    let mut cancelled_client = client(&pool);
    let mut cancelled = Box::pin(cancelled_client.unary_echo(with_deadline(0, WAIT)));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(cancelled.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the call should have been waiting for its PONG");
    drop(cancelled);
    clock.wait_until(WAIT, "the PING before use reached the server", || server.pings() == 1).await;

    // Quiet again: a later call PINGs before use too, after the abandoned PING, and goes out.
    // (The abandoned PING's PONG counts as news whenever it is read: a call before the clock
    // has moved on past it is not PINGed, hence the tries.)
    let mut client = client(&pool);
    let mut calls = 0;
    while server.pings() < 2 {
        assert!(calls < 5, "no call was PINGed before use after the abandoned PING");
        clock.advance(2 * quiet).await;
        let mut caller = client.clone();
        let call = tokio::spawn(async move { caller.unary_echo(with_deadline(0, WAIT)).await });
        clock.wait_until(WAIT, "a call after the abandoned PING ends", || call.is_finished()).await;
        call.await.unwrap().expect("a call after the abandoned PING");
        calls += 1;
    }
    // And none of the calls after it waits for a PING nobody finishes.
    let more = tokio::spawn(async move {
        for _ in 0..100 {
            client.unary_echo(with_deadline(0, WAIT)).await.unwrap();
        }
    });
    clock.wait_until(WAIT, "a hundred more calls end", || more.is_finished()).await;
    more.await.unwrap();
    let state = pool.state();
    assert_eq!(state.endpoints[0].members.len(), 1);
    assert_eq!(state.endpoints[0].members[0].id, member, "the member was replaced");
    assert_eq!(server.answered(), 100 + calls);
}

// The member is reached through a test hook (feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[tokio::test]
async fn a_ping_whose_caller_gave_up_does_not_stop_later_keepalive_pings() {
    let server = FrameServer::start(Behaviour::AnswerAfter(Duration::ZERO)).await;
    let keepalive = {
        let mut v = grpc_pool::Keepalive::new(Duration::from_millis(100), Duration::from_secs(5));
        v.permit_without_stream = true;
        v.max_pings_without_data = 0;
        v
    };
    let pool = Pool::builder().keepalive(Some(keepalive)).build([server.uri()]).await.unwrap();
    let members = grpc_pool::__private::monitor(&pool).members();
    let member = members.first().expect("a member");
    // Given up at its first wait, with the PING out: h2 still counts it as pending. (A
    // keepalive PING in flight at that moment makes it fail as busy instead: try again.)
    let mut attempts = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout(Duration::from_nanos(1), member.ping(Duration::from_secs(5))).await {
            Err(_) => break,
            Ok(result) => {
                assert!(attempts < 100, "never abandoned a PING: {result:?}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    wait_until(WAIT, "the abandoned PING reached the server", || server.pings() >= 1).await;
    let after_abandoned = server.pings();
    // Keepalive PINGs on the same connection still go out and come back.
    wait_until(WAIT, "three more keepalive PINGs reached the server", || {
        server.pings() >= after_abandoned + 3
    })
    .await;
    let rtt = member.ping(Duration::from_secs(5)).await.expect("a PING after an abandoned one is answered");
    assert!(rtt < Duration::from_secs(5));
    assert_eq!(member.state(), grpc_pool::state::MemberState::Ready);
    assert_eq!(pool.state().statistics.closed(grpc_pool::EvictionReason::PingTimeout), 0);
}

/// A server on a fixed port that can go down and come back. While down, the port accepts
/// TCP connections and closes each 50 ms later without a word of HTTP/2 (so every connect
/// fails, and the listener sees each attempt and how many overlap).
struct Outage {
    port: u16,
    server: Option<TestServer>,
    refuser: Option<tokio::task::JoinHandle<()>>,
    attempts: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most_held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Outage {
    async fn start() -> Outage {
        let server = TestServer::start().await;
        Outage {
            port: server.addr().port(),
            server: Some(server),
            refuser: None,
            attempts: Default::default(),
            held: Default::default(),
            most_held: Default::default(),
        }
    }

    fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn down(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (attempts, held, most_held) = (self.attempts.clone(), self.held.clone(), self.most_held.clone());
        self.refuser = Some(tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                attempts.lock().unwrap().push(Instant::now());
                most_held.fetch_max(held.fetch_add(1, SeqCst) + 1, SeqCst);
                let held = held.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    held.fetch_sub(1, SeqCst);
                    drop(socket);
                });
            }
        }));
    }

    async fn up(&mut self) {
        if let Some(refuser) = self.refuser.take() {
            refuser.abort();
            let _ = refuser.await;
        }
        let options = ServerOptions { port: Some(self.port), ..Default::default() };
        self.server = Some(TestServer::start_with(options).await);
    }

    fn attempts(&self) -> Vec<Instant> {
        self.attempts.lock().unwrap().clone()
    }
}

/// How each of `callers` callers' calls went while `run` ran: (when it started, how long
/// it took, its status if it failed).
type Outcomes = Vec<(Instant, Duration, Option<tonic::Status>)>;

fn start_callers(
    pool: &Pool,
    callers: usize,
    timeout: Duration,
    wait_for_ready: bool,
) -> (tokio::sync::watch::Sender<bool>, Vec<tokio::task::JoinHandle<Outcomes>>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = (0..callers)
        .map(|_| {
            let mut client = client(pool);
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !*stopped.borrow() {
                    let mut request = with_deadline(0, timeout);
                    request.extensions_mut().insert(grpc_pool::WaitForReady(wait_for_ready));
                    let started = Instant::now();
                    let result = client.unary_echo(request).await;
                    outcomes.push((started, started.elapsed(), result.err()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                outcomes
            })
        })
        .collect();
    (stop, tasks)
}

fn outage_backoff() -> grpc_pool::BackoffConfig {
    let mut v = grpc_pool::BackoffConfig::default();
    v.base = Duration::from_millis(200);
    v.multiplier = 1.6;
    v.jitter = 0.2;
    v.max = Duration::from_secs(30);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_calls_fast_with_the_cause_and_one_connect_at_a_time_backs_off() {
    let mut outage = Outage::start().await;
    let pool = Pool::builder().name("outage").backoff(outage_backoff()).build([outage.uri()]).await.unwrap();
    let deadline = Duration::from_secs(5);
    let (stop, callers) = start_callers(&pool, 8, deadline, false);
    wait_until(WAIT, "calls are flowing", || pool.state().statistics.checkouts_direct > 50).await;

    outage.down().await;
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    outage.up().await;
    let up_at = Instant::now();
    let mut first_success_after_up = None;
    wait_until(WAIT, "the endpoint takes calls again", || {
        let ok =
            pool.state().endpoints[0].members.iter().any(|m| m.state == grpc_pool::state::MemberState::Ready);
        if ok && first_success_after_up.is_none() {
            first_success_after_up = Some(up_at.elapsed());
        }
        ok
    })
    .await;
    let reconnected_after = first_success_after_up.unwrap();
    // Let the callers see it serve again, then stop them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(true).unwrap();
    let mut outcomes = Vec::new();
    for caller in callers {
        outcomes.extend(caller.await.unwrap());
    }

    // Calls during the outage failed fast, with the cause; none waited for its deadline.
    let failed: Vec<_> = outcomes.iter().filter(|(_, _, status)| status.is_some()).collect();
    assert!(failed.len() >= 8, "only {} calls failed during a 3 s outage", failed.len());
    for (_, took, status) in &failed {
        let status = status.as_ref().unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(*took < deadline / 5, "a call failed after {took:?}, close to its deadline of {deadline:?}");
    }
    let fast = failed.iter().filter(|(_, took, _)| *took < Duration::from_millis(100)).count();
    assert!(fast * 10 >= failed.len() * 9, "{fast} of {} failures came within 100 ms", failed.len());
    let causes = failed
        .iter()
        .filter(|(_, _, s)| s.as_ref().unwrap().message().contains("last connect error"))
        .count();
    assert!(causes * 10 >= failed.len() * 9, "{causes} of {} failures named the connect error", failed.len());

    // One connect at a time, backing off by the multiplier a round.
    let attempts = outage.attempts();
    let gaps: Vec<_> = attempts.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let mut fail_times: Vec<_> = failed.iter().map(|(_, took, _)| *took).collect();
    fail_times.sort();
    eprintln!(
        "outage: {} calls failed, median {:?}, slowest {:?}; {} connect attempts, gaps {gaps:?}; \
         reconnected {reconnected_after:?} after the server came back",
        failed.len(),
        fail_times[fail_times.len() / 2],
        fail_times.last().unwrap(),
        attempts.len()
    );
    assert_eq!(outage.most_held.load(std::sync::atomic::Ordering::SeqCst), 1, "connects overlapped");
    assert!(attempts.len() >= 4, "{} connect attempts in a 3 s outage with a 200 ms backoff", attempts.len());
    for (round, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let least = outage_backoff().base.mul_f64(0.8 * 1.6f64.powi(round as i32));
        assert!(
            gap >= least,
            "attempt {} came {gap:?} after the one before; backoff allows no less than {least:?}",
            round + 2
        );
    }
    // The backoff in force when the server came back bounds how long the pool took.
    let rounds = attempts.len() as i32;
    let in_force = outage_backoff().base.mul_f64(1.6f64.powi(rounds - 1) * 1.2 * 1.1);
    assert!(
        reconnected_after <= in_force + Duration::from_secs(1),
        "reconnected {reconnected_after:?} after the server came back; backoff in force at most {in_force:?}"
    );
    assert!(down_at.elapsed() > Duration::from_secs(3));

    // Only the connections the load needs: eight callers fit on one.
    wait_until(WAIT, "no connect is under way", || pool.state().endpoints[0].connecting == 0).await;
    assert_eq!(pool.state().endpoints[0].members.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_calls_ride_out_an_outage_shorter_than_their_deadline() {
    let mut outage = Outage::start().await;
    let pool = Pool::builder().backoff(outage_backoff()).build([outage.uri()]).await.unwrap();
    let (stop, callers) = start_callers(&pool, 8, Duration::from_secs(20), true);
    wait_until(WAIT, "calls are flowing", || pool.state().statistics.checkouts_direct > 50).await;
    outage.down().await;
    wait_until(WAIT, "calls are queued behind the outage", || pool.state().waiters == 8).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    outage.up().await;
    wait_until(WAIT, "the queued calls are served", || pool.state().waiters == 0).await;
    stop.send(true).unwrap();
    for caller in callers {
        for (_, took, status) in caller.await.unwrap() {
            assert!(status.is_none(), "a wait_for_ready call failed after {took:?}: {status:?}");
        }
    }
    assert_eq!(outage.most_held.load(std::sync::atomic::Ordering::SeqCst), 1, "connects overlapped");
}

/// A backoff far longer than the tests below run: whatever brings the endpoint back within
/// them, it is not the backoff's next attempt.
fn long_backoff() -> grpc_pool::BackoffConfig {
    let mut v = grpc_pool::BackoffConfig::default();
    v.base = Duration::from_secs(60);
    v.max = Duration::from_secs(60);
    v
}

/// The first call of `outcomes` that succeeded at or after `since`: when it started.
fn first_success_since(
    outcomes: &[(Instant, Duration, Option<tonic::Status>)],
    since: Instant,
) -> Option<Instant> {
    outcomes
        .iter()
        .filter(|(started, _, status)| *started >= since && status.is_none())
        .map(|(s, _, _)| *s)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_back_from_a_restart_is_found_by_the_next_call_not_by_the_backoff() {
    // A restart closes the port: connects are refused (the kernel answers for the server).
    // The calls that find the endpoint down pull the next attempt forward, at most one per
    // `refused_retry`, so the first call after the server listens again is served, though
    // the backoff alone would wait a minute.
    let server = TestServer::start().await;
    let port = server.addr().port();
    let refused_retry = grpc_pool::BackoffConfig::default().refused_retry;
    let pool = Pool::builder().backoff(long_backoff()).build([server.uri()]).await.unwrap();
    let (stop, callers) = start_callers(&pool, 4, Duration::from_secs(5), false);
    wait_until(WAIT, "calls are flowing", || pool.state().statistics.checkouts_direct > 50).await;

    server.shutdown().await;
    let down_at = Instant::now();
    let failures_before = pool.state().statistics.connect_failures;
    wait_until(WAIT, "connects are refused", || {
        pool.state().statistics.connect_failures > failures_before + 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attempts = pool.state().statistics.connect_failures - failures_before;
    let down_for = down_at.elapsed();
    let _server = TestServer::start_with(ServerOptions { port: Some(port), ..Default::default() }).await;
    let up_at = Instant::now();
    wait_until(WAIT, "the endpoint takes calls again", || {
        pool.state().endpoints[0].members.iter().any(|m| m.state == grpc_pool::state::MemberState::Ready)
    })
    .await;
    let back_after = up_at.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(true).unwrap();
    let mut outcomes = Vec::new();
    for caller in callers {
        outcomes.extend(caller.await.unwrap());
    }
    let served_after = first_success_since(&outcomes, up_at).map(|at| at - up_at);
    eprintln!(
        "restart: {attempts} refused connects in {down_for:?} down; connection back {back_after:?} after the \
         server listened, first call served {served_after:?} after"
    );
    // No more attempts than one per `refused_retry` (and the one that found the port closed).
    let most = (down_for.as_secs_f64() / refused_retry.as_secs_f64()).floor() as u64 + 2;
    assert!(
        attempts <= most,
        "{attempts} connect attempts in {down_for:?}: more than one per {refused_retry:?}"
    );
    assert!(
        attempts >= 3,
        "only {attempts} attempts in {down_for:?} of calls failing: calls pulled none forward"
    );
    // Back long before the backoff (a minute) would have tried again.
    assert!(back_after < Duration::from_secs(10), "the connection came back {back_after:?} after the server");
    // The outage's failures were fast, and none came once the connection was back.
    for (started, took, status) in &outcomes {
        if let Some(status) = status {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(*took < Duration::from_secs(1), "a call failed after {took:?}");
            assert!(*started < up_at + back_after, "a call failed after the connection was back: {status:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_min_connections_a_pool_whose_connects_failed_tries_again_when_calls_come() {
    // With `min_connections` 0 nothing keeps a connection open for its own sake: the calls
    // that fail fast while the endpoint is down must be what keeps the pool trying, or it
    // would stay down for good once its retrier gave up.
    let mut outage = Outage::start().await;
    let pool =
        Pool::builder().min_connections(0).backoff(outage_backoff()).build_lazy([outage.uri()]).unwrap();
    let (stop, callers) = start_callers(&pool, 2, Duration::from_secs(5), false);
    wait_until(WAIT, "calls are flowing", || pool.state().statistics.checkouts_direct > 50).await;
    // Down with connections accepted and closed at once: not refused, so the backoff rules.
    outage.down().await;
    wait_until(WAIT, "connects fail", || pool.state().statistics.connect_failures >= 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outage.up().await;
    let up_at = Instant::now();
    let served = pool.state().statistics.checkouts_direct;
    wait_until(Duration::from_secs(30), "calls are served again", || {
        pool.state().statistics.checkouts_direct > served + 10
    })
    .await;
    stop.send(true).unwrap();
    let mut outcomes = Vec::new();
    for caller in callers {
        outcomes.extend(caller.await.unwrap());
    }
    assert!(first_success_since(&outcomes, up_at).is_some(), "no call was served after the server came back");
    assert_eq!(outage.most_held.load(std::sync::atomic::Ordering::SeqCst), 1, "connects overlapped");
}

#[tokio::test]
async fn calls_queued_behind_a_dead_host_are_released_once_health_checks_mark_it_down() {
    let server = TestServer::start_with(ServerOptions { health: true, ..Default::default() }).await;
    // A host that takes TCP connections and never says a word: connects cannot finish.
    let relay = grpc_pool_testkit::Relay::start(server.addr()).await;
    relay.freeze_new_connections(true);
    let checks = {
        let mut v = grpc_pool::HealthCheck::default();
        v.service = "echo.Echo".into();
        v.interval = Duration::from_millis(100);
        v.timeout = Duration::from_millis(100);
        v.unhealthy_threshold = 2;
        v.mode = grpc_pool::CheckMode::Poll;
        v
    };
    let checkout_timeout = Duration::from_secs(20);
    let pool = Pool::builder()
        .connect_timeout(Duration::from_secs(30))
        .checkout_timeout(checkout_timeout)
        .health_checks(Some(checks))
        .build_lazy([relay.uri()])
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary_echo(with_deadline(0, Duration::from_secs(60))).await })
        })
        .collect();
    for call in calls {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("unhealthy"), "{}", status.message());
    }
    let took = started.elapsed();
    // Released when the endpoint was marked down (two failed checks 100 ms apart), not at
    // checkout_timeout.
    assert!(took < checkout_timeout / 2, "the queued calls were released after {took:?}");
    assert!(!pool.state().endpoints[0].healthy);
}

#[tokio::test(start_paused = true)]
async fn a_connection_closed_gracefully_while_young_costs_the_next_call_no_backoff() {
    // Every connection is closed (GOAWAY NO_ERROR) at 500 ms of age, before it carried a
    // call: the pool replaces it at once, so a call never waits out a reconnect backoff. The
    // clock is held: each call must end with it standing still, so it waited for no timer.
    let clock = HeldClock::hold();
    let server = TestServer::start_with(ServerOptions {
        max_connection_age: Some(Duration::from_millis(500)),
        ..Default::default()
    })
    .await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    for _ in 0..10 {
        // Quiet past a connection's age (the server's timer is on the clock too).
        clock.advance_in_steps(Duration::from_millis(700), STEP, || false).await;
        let mut client = client(&pool);
        let call = tokio::spawn(async move { client.unary_echo(with_deadline(0, WAIT)).await });
        clock.wait_until(WAIT, "the call ends, the clock standing still", || call.is_finished()).await;
        call.await.unwrap().unwrap();
    }
    let state = pool.state();
    assert_eq!(state.endpoints[0].consecutive_failures, 0);
    assert!(state.statistics.closed(grpc_pool::EvictionReason::GoAway) >= 5, "{:?}", state.statistics);
}

#[tokio::test]
async fn a_call_resent_after_a_refusal_tells_the_server_the_time_left() {
    let pause = Duration::from_millis(300);
    let server = grpc_pool_testkit::RefuseFirstServer::start(pause).await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    client(&pool).unary_echo(with_deadline(0, Duration::from_secs(10))).await.unwrap();
    assert_eq!(pool.state().statistics.retried(grpc_pool::state::RetryReason::Refused), 1);
    let seen = server.grpc_timeouts();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let first = parse_grpc_timeout(seen[0].as_deref().expect("the first attempt's grpc-timeout"));
    let resent = parse_grpc_timeout(seen[1].as_deref().expect("the resend's grpc-timeout"));
    // The resend went out at least `pause` later, and says so.
    assert!(resent + pause <= first, "first attempt told {first:?}, the resend {resent:?}");
}

#[tokio::test(start_paused = true)]
async fn calls_on_a_silently_dropped_connection_fail_at_their_deadline_with_pool_defaults() {
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let relay = grpc_pool_testkit::Relay::start(server.addr()).await;
    let pool = Pool::builder().build([relay.uri()]).await.unwrap();
    client(&pool).unary_echo(with_deadline(0, WAIT)).await.unwrap();
    relay.freeze(); // the network drops the connection's packets from now on
    let deadline = Duration::from_secs(1);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary_echo(with_deadline(0, deadline)).await.unwrap_err() })
        })
        .collect();
    // Keepalive's defaults find the dead connection only after 30 s: the deadline is what
    // ends these calls, and it does so on time.
    let took = clock
        .advance_until(deadline + 2 * STEP, STEP, "the calls fail at their deadline", || {
            calls.iter().all(|c| c.is_finished())
        })
        .await;
    assert!(took >= deadline, "failed after {took:?}");
    for call in calls {
        let status = call.await.unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(pool.state().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_silent_drop_under_load_is_found_one_deadline_and_one_ping_after_it_with_pool_defaults() {
    // 8 callers with 5 s deadlines; the connection goes silent under them. The first
    // deadline to pass on it (5 s) PINGs it, and no PONG in 1 s kills it: found within 7 s
    // at most (keepalive alone: 20 s + 10 s), costing the calls in flight on it (8) and at
    // most as many again, however the steps fall. Calls that pick the member while its
    // PING is out wait for the answer and go to a fresh connection.
    let clock = HeldClock::hold();
    let server = TestServer::start().await;
    let relay = grpc_pool_testkit::Relay::start(server.addr()).await;
    let pool = Pool::builder().build([relay.uri()]).await.unwrap();
    let deadline = Duration::from_secs(5);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client(&pool);
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !*stopped.borrow() {
                    let started = tokio::time::Instant::now();
                    let result = client.unary_echo(with_deadline(0, deadline)).await;
                    outcomes.push((started, result.err()));
                    tokio::time::sleep(STEP).await;
                }
                outcomes
            })
        })
        .collect();
    let flowing = clock.advance_in_steps(WAIT, STEP, || pool.state().statistics.checkouts_direct > 100).await;
    assert!(flowing, "calls never flowed: {:?}", pool.state().statistics);

    relay.freeze(); // the network drops the connection's packets from now on
    let frozen_at = tokio::time::Instant::now();
    let found = clock
        .advance_in_steps(Duration::from_secs(30), STEP, || {
            pool.state().statistics.closed(grpc_pool::EvictionReason::PingTimeout) >= 1
        })
        .await;
    let found_after = frozen_at.elapsed();
    assert!(found, "the silent connection was never found: {:?}", pool.state().statistics);
    let evicted_at = tokio::time::Instant::now();
    // Calls go on, on a fresh connection.
    let recovered = clock
        .advance_in_steps(WAIT, STEP, || {
            let state = pool.state();
            state.statistics.connections_created >= 2 && state.in_flight() == 0
        })
        .await;
    assert!(recovered, "no fresh connection: {:?}", pool.state());
    clock.advance_in_steps(Duration::from_secs(1), STEP, || false).await;
    stop.send(true).unwrap();
    // The callers end their last calls: answered, or at their deadlines at the latest (the
    // clock moves on until then; a call left waiting on the held clock would hang the test).
    clock
        .advance_until(deadline + Duration::from_secs(2), STEP, "the callers end", || {
            callers.iter().all(|c| c.is_finished())
        })
        .await;
    let (mut failed, mut late_failures, mut ok_after) = (Vec::new(), Vec::new(), 0);
    for caller in callers {
        for (started, status) in caller.await.unwrap() {
            match status {
                Some(status) if started >= evicted_at => late_failures.push(status),
                Some(status) => failed.push(status),
                None if started >= evicted_at => ok_after += 1,
                None => {}
            }
        }
    }
    println!("silent drop under load: found after {found_after:?}, {} calls failed", failed.len());
    assert!(found_after <= deadline + Duration::from_secs(1) + 2 * STEP, "found after {found_after:?}");
    assert!(failed.len() <= 16, "{} calls failed: {failed:?}", failed.len());
    assert!(failed.iter().all(|s| s.code() == Code::DeadlineExceeded), "{failed:?}");
    assert!(
        late_failures.is_empty(),
        "calls started after the eviction failed: {late_failures:?}; statistics {:?}",
        pool.state().statistics
    );
    assert!(ok_after > 0);
}

#[tokio::test(start_paused = true)]
async fn deadlines_passing_on_a_slow_but_live_server_stay_within_its_ping_policy() {
    // Every call outlives its 1 s deadline on a server that answers after 60 s whatever the
    // call's grpc-timeout says (so it never sends a frame for a call), one after another
    // for 40 s on the clock, through a proxy enforcing the C core's default PING
    // policy (a PING within 5 minutes of the last, with no data from the server between, is
    // a strike; a third strike is GOAWAY). The first deadline PINGs the quiet connection, the
    // PONG keeps it; later deadlines find a PING already spent since the server's last data
    // and send none, and keepalive adds at most one more: no GOAWAY, the connection kept.
    let clock = HeldClock::hold();
    let server = FrameServer::start(Behaviour::AnswerAfter(Duration::from_secs(60))).await;
    let target = server.uri().trim_start_matches("http://").parse().unwrap();
    let policy = grpc_pool_testkit::PingPolicy { min_interval: Duration::from_secs(300), max_strikes: 2 };
    let enforcer = grpc_pool_testkit::PingEnforcer::start(target, policy).await;
    let pool = Pool::builder().build([enforcer.uri()]).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(40) {
        let mut client = client(&pool);
        let (outcome, _) = on_the_clock(&clock, Duration::from_secs(2), async move {
            client.unary_echo(with_deadline(0, Duration::from_secs(1))).await
        })
        .await;
        assert_eq!(outcome.unwrap_err().code(), Code::DeadlineExceeded);
        calls += 1;
    }
    let stats = pool.state().statistics;
    println!(
        "{calls} deadlines passed: {} PINGs, at most {} without data",
        enforcer.pings(),
        enforcer.most_pings_without_data()
    );
    assert!(enforcer.pings() >= 1, "the first deadline PINGs the quiet connection");
    assert!(
        enforcer.most_pings_without_data() <= 2,
        "{} PINGs without data",
        enforcer.most_pings_without_data()
    );
    assert_eq!(enforcer.goaways(), 0, "the server's PING policy was broken");
    assert_eq!(
        stats.closed(grpc_pool::EvictionReason::PingTimeout),
        0,
        "an answered PING keeps it: {stats:?}"
    );
    assert_eq!(stats.connections_created, 1, "{stats:?}");
}
