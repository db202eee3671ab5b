//! `TCP_USER_TIMEOUT` end to end: a write to a peer that went silent (a dead host, a
//! firewall dropping the flow) fails within the keepalive timeout, which the pool sets as the
//! sockets' `TCP_USER_TIMEOUT`, even when no keepalive PING is due to find it. And TCP
//! keepalive (`Builder::tcp_keepalive`): the kernel's probes find such a peer under an idle
//! connection, with no PING and no call to notice.
//!
//! The peer is a tonic server in a network namespace of its own behind a veth pair, and the
//! black hole a `blackhole` qdisc on our end of the pair (testkit's `BlackHoleLink`): the
//! kernel stops delivering what we send, so the peer never ACKs it. That needs root; without
//! it these tests fail and say so, unless `GRPC_POOL_SKIP_NETNS_TESTS` is set.
#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::{EvictionReason, Keepalive, Pool, PoolEvent};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::{EchoRequest, EchoResponse};
use grpc_pool_testkit::{BlackHoleLink, ServerOptions, TestServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// The keepalive timeout, and so the sockets' `TCP_USER_TIMEOUT`.
const USER_TIMEOUT: Duration = Duration::from_secs(2);
/// Keepalive time: no PING is due while a test runs, so only the kernel can notice the
/// black hole.
const NO_PING_BEFORE: Duration = Duration::from_secs(3600);
/// How long past `USER_TIMEOUT` the failure may take to reach the caller: the kernel
/// checks the timeout when a retransmission timer fires, and then the connection's task
/// must run. Without `TCP_USER_TIMEOUT` the kernel retransmits for 15 minutes and more
/// (`tcp_retries2`), so the bound still tells the two apart by two orders of magnitude.
const MARGIN: Duration = USER_TIMEOUT.saturating_mul(2);

fn message(text: &'static str) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(text.as_bytes()), repeat: 0, delay_ms: 0 }
}

/// A pool of one connection to a server behind `link`, with a bidirectional call open on it
/// that has echoed one message: the link works before it becomes a black hole.
async fn open_call(
    name: &str,
    link: &BlackHoleLink,
    keepalive: Option<Keepalive>,
) -> (TestServer, Pool, mpsc::Sender<EchoRequest>, tonic::Streaming<EchoResponse>) {
    let server = TestServer::start_on(link.listen(), ServerOptions::default()).await;
    let pool = Pool::builder()
        .name(name)
        .max_connections(1)
        .keepalive(keepalive)
        .build([server.uri()])
        .await
        .expect("the pool connects to the server in the namespace");
    let (tx, rx) = mpsc::channel(1);
    let mut replies = EchoClient::new(pool.clone())
        .bidirectional_streaming_echo(ReceiverStream::new(rx))
        .await
        .expect("the call opens")
        .into_inner();
    tx.send(message("before")).await.unwrap();
    let reply = replies.next().await.expect("a reply").expect("the first message is echoed");
    assert_eq!(&reply.message[..], b"before");
    (server, pool, tx, replies)
}

#[tokio::test]
async fn a_write_to_a_black_holed_peer_fails_within_the_keepalive_timeout() {
    let Some(link) = BlackHoleLink::create() else { return };
    let (_server, pool, tx, mut replies) =
        open_call("black-hole", &link, Some(Keepalive::new(NO_PING_BEFORE, USER_TIMEOUT))).await;
    let mut events = pool.events();

    link.black_hole();
    let written = Instant::now();
    tx.send(message("into the void")).await.unwrap();
    let outcome = tokio::time::timeout(USER_TIMEOUT + MARGIN, replies.next()).await;
    let took = written.elapsed();
    let status = match outcome {
        Err(_) => panic!(
            "the write to the black-holed peer had not failed {took:?} later, with TCP_USER_TIMEOUT \
             {USER_TIMEOUT:?} (is it set on the socket?)"
        ),
        Ok(Some(Err(status))) => status,
        Ok(other) => panic!("the call went on through a black hole: {other:?}"),
    };
    println!("the write failed after {took:?}: {status:?}");
    // The kernel gave up on the unacknowledged data: nothing else could end the call, and
    // not before the timeout.
    assert!(took >= USER_TIMEOUT, "failed after {took:?}, before TCP_USER_TIMEOUT ({USER_TIMEOUT:?})");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("timed out"), "not the kernel's timeout: {status:?}");

    // The member is evicted for the I/O error, with the kernel's error as the detail.
    let closed = tokio::time::timeout(MARGIN, async {
        loop {
            match events.recv().await.expect("the pool's events") {
                PoolEvent::ConnectionClosed { reason, detail, .. } => return (reason, detail),
                _ => continue,
            }
        }
    })
    .await
    .expect("the connection is closed");
    assert_eq!(closed.0, EvictionReason::IoError, "{closed:?}");
    assert!(closed.1.contains("timed out"), "{closed:?}");
    let statistics = pool.state().statistics;
    assert_eq!(statistics.closed(EvictionReason::PingTimeout), 0, "a PING found it: {statistics:?}");
}

/// The control: the same black hole without `TCP_USER_TIMEOUT` (no keepalive, so the pool
/// sets none) leaves the call hanging past the bound the test above holds it to, so the
/// black hole alone (an ICMP error, a reset) does not end calls, and the timeout does.
#[tokio::test]
async fn without_tcp_user_timeout_the_same_write_hangs_past_that_bound() {
    let Some(link) = BlackHoleLink::create() else { return };
    let (_server, pool, tx, mut replies) = open_call("black-hole-no-user-timeout", &link, None).await;

    link.black_hole();
    tx.send(message("into the void")).await.unwrap();
    let outcome = tokio::time::timeout(USER_TIMEOUT + MARGIN, replies.next()).await;
    assert!(outcome.is_err(), "the call ended without TCP_USER_TIMEOUT: {outcome:?}");

    // And once the link carries packets again, the same connection carries the call on.
    link.restore();
    // The next retransmission carries it, within TCP's longest retransmission interval (2 min).
    let reply = tokio::time::timeout(Duration::from_secs(120), replies.next())
        .await
        .expect("the data is retransmitted once the link works")
        .expect("a reply")
        .expect("the message is echoed");
    assert_eq!(&reply.message[..], b"into the void");
    assert_eq!(pool.state().statistics.closed(EvictionReason::IoError), 0);
}

/// A pool of one idle connection to a server behind `link`, without keepalive PINGs or a
/// PING before use, so that only the kernel can notice the peer going silent.
async fn idle_connection(
    name: &str,
    link: &BlackHoleLink,
    tcp_keepalive: Option<Duration>,
) -> (TestServer, Pool) {
    let server = TestServer::start_on(link.listen(), ServerOptions::default()).await;
    let pool = Pool::builder()
        .name(name)
        .max_connections(1)
        .keepalive(None)
        .ping_before_use(None)
        .tcp_keepalive(tcp_keepalive)
        .tcp_keepalive_interval(tcp_keepalive.map(|_| TCP_KEEPALIVE_INTERVAL))
        .tcp_keepalive_retries(tcp_keepalive.map(|_| TCP_KEEPALIVE_RETRIES))
        .build([server.uri()])
        .await
        .expect("the pool connects to the server in the namespace");
    EchoClient::new(pool.clone()).unary_echo(message("before")).await.expect("a call before the black hole");
    (server, pool)
}

/// TCP keepalive: 1 s of quiet, then 2 probes 1 s apart: the kernel drops a connection whose
/// peer answers none about 3 s after its last packet.
const TCP_KEEPALIVE: Duration = Duration::from_secs(1);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const TCP_KEEPALIVE_RETRIES: u32 = 2;

#[tokio::test]
async fn tcp_keepalive_finds_a_black_holed_peer_under_an_idle_connection() {
    let Some(link) = BlackHoleLink::create() else { return };
    let (_server, pool) = idle_connection("black-hole-tcp-keepalive", &link, Some(TCP_KEEPALIVE)).await;
    let mut events = pool.events();

    // Both ways: a segment of the server's still unacknowledged when the link goes would
    // otherwise be retransmitted to us, and each arrival restarts the kernel's quiet time.
    link.cut_both_ways();
    let holed = Instant::now();
    let bound = TCP_KEEPALIVE + TCP_KEEPALIVE_INTERVAL * TCP_KEEPALIVE_RETRIES + MARGIN;
    let closed = tokio::time::timeout(bound, async {
        loop {
            match events.recv().await.expect("the pool's events") {
                PoolEvent::ConnectionClosed { reason, detail, .. } => return (reason, detail),
                _ => continue,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the idle connection to the black-holed peer was still open {bound:?} later"));
    let took = holed.elapsed();
    println!("closed {took:?} after the link was cut: {closed:?}");
    // The kernel's probes went unanswered: an I/O error with its timeout, and no sooner than
    // the quiet time and one probe interval.
    assert_eq!(closed.0, EvictionReason::IoError, "{closed:?}");
    assert!(closed.1.contains("timed out"), "{closed:?}");
    assert!(
        took >= TCP_KEEPALIVE + TCP_KEEPALIVE_INTERVAL,
        "closed after {took:?}, before any probe went unanswered"
    );
}

/// The control: without TCP keepalive the same idle connection stays open past that bound.
#[tokio::test]
async fn without_tcp_keepalive_the_same_idle_connection_stays_open() {
    let Some(link) = BlackHoleLink::create() else { return };
    let (_server, pool) = idle_connection("black-hole-no-tcp-keepalive", &link, None).await;
    let mut events = pool.events();

    link.cut_both_ways();
    let bound = TCP_KEEPALIVE + TCP_KEEPALIVE_INTERVAL * TCP_KEEPALIVE_RETRIES + MARGIN;
    let closed = tokio::time::timeout(bound, async {
        loop {
            if let PoolEvent::ConnectionClosed { reason, detail, .. } = events.recv().await.expect("events") {
                return (reason, detail);
            }
        }
    })
    .await;
    assert!(closed.is_err(), "closed without TCP keepalive: {closed:?}");
    assert_eq!(pool.state().members(), 1);
}
