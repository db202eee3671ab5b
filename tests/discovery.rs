//! Endpoint sets that change at run time: endpoints added and removed under load, DNS
//! re-resolution through the resolver trait, and the health task following the set.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::discover::Change;
use grpc_pool::dns::{DnsDiscover, Resolve, Resolving};
use grpc_pool::{EvictionReason, HealthCheck, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, Relay, TestServer};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn request(delay_ms: u32) -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"hello"), repeat: 0, delay_ms }
}

/// The pool's endpoints now, as URIs.
fn endpoints(pool: &Pool) -> BTreeSet<String> {
    pool.state().endpoints.iter().map(|e| e.endpoint.to_string()).collect()
}

/// One change of the endpoint set, as a `Discover` stream yields it.
type Changed = Result<Change<usize, String>, Infallible>;

/// A `Discover` stream fed by the test.
fn changes() -> (mpsc::UnboundedSender<Changed>, impl futures_util::Stream<Item = Changed> + Send + 'static) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_every_500ms_under_load_fail_no_call_and_leave_no_connection_open() {
    // Four servers, each behind a relay that counts the connections open through it. The set
    // starts with two; every 500 ms one leaves or one comes back, for 10 s, while 16 callers
    // keep calls in flight (each call takes 5 ms at the server).
    let servers = [
        TestServer::start().await,
        TestServer::start().await,
        TestServer::start().await,
        TestServer::start().await,
    ];
    let mut relays = Vec::new();
    for server in &servers {
        relays.push(Relay::start(server.addr()).await);
    }
    let pool = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    let (discover, stream) = changes();
    pool.discover(stream);
    for (key, relay) in relays.iter().enumerate().take(2) {
        discover.send(Ok(Change::Insert(key, relay.uri()))).unwrap();
    }
    wait_until(WAIT, "both first endpoints are in the pool", || endpoints(&pool).len() == 2).await;

    let until = Instant::now() + Duration::from_secs(10);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut client = EchoClient::new(pool.clone());
        callers.spawn(async move {
            let (mut calls, mut failures) = (0usize, Vec::new());
            while Instant::now() < until {
                calls += 1;
                if let Err(status) = client.unary_echo(request(5)).await {
                    failures.push(status);
                }
            }
            (calls, failures)
        });
    }

    let mut present: Vec<usize> = vec![0, 1];
    let mut absent: Vec<usize> = vec![2, 3];
    let mut step = 0;
    while Instant::now() + Duration::from_millis(500) < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        step += 1;
        // Alternate: remove the oldest present endpoint, then add the oldest absent one.
        if step % 2 == 1 && present.len() > 1 {
            let key = present.remove(0);
            discover.send(Ok(Change::Remove(key))).unwrap();
            absent.push(key);
            // Its calls in flight finish, then its connections close.
            let relay = &relays[key];
            wait_until(WAIT, "the removed endpoint's connections closed", || relay.open_connections() == 0)
                .await;
        } else if !absent.is_empty() {
            let key = absent.remove(0);
            discover.send(Ok(Change::Insert(key, relays[key].uri()))).unwrap();
            present.push(key);
        }
    }

    let (mut calls, mut failures) = (0, Vec::new());
    while let Some(result) = callers.join_next().await {
        let (made, failed) = result.unwrap();
        calls += made;
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "{} of {calls} calls failed, first: {:?}", failures.len(), failures.first());
    assert!(step >= 15, "only {step} changes were made");
    let expected: BTreeSet<String> = present.iter().map(|k| relays[*k].uri()).collect();
    assert_eq!(endpoints(&pool), expected);
    for key in &absent {
        assert_eq!(relays[*key].open_connections(), 0, "a connection to removed endpoint {key} is open");
    }
    // Every server took part, and every removal drained (none cut a call).
    assert!(
        servers.iter().all(|s| s.calls() > 0),
        "{:?}",
        servers.iter().map(|s| s.calls()).collect::<Vec<_>>()
    );
    assert!(pool.state().statistics.closed(EvictionReason::EndpointRemoved) >= 5);
}

#[tokio::test]
async fn a_removed_endpoint_finishes_its_calls_in_flight_then_closes() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let other = TestServer::start().await;
    let pool = Pool::builder().build([relay.uri(), other.uri()]).await.unwrap();
    // A slow call on the endpoint about to go.
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = EchoClient::new(pool.clone());
        calls.push(tokio::spawn(async move { client.unary_echo(request(300)).await }));
    }
    wait_until(WAIT, "a slow call is running on the first endpoint", || server.active() > 0).await;
    assert!(pool.remove_endpoint(&relay.uri()).unwrap());
    assert!(!pool.remove_endpoint(&relay.uri()).unwrap(), "removing twice says it was not there");
    assert_eq!(endpoints(&pool), BTreeSet::from([other.uri()]));
    // New calls go to the other endpoint only; the slow ones finish where they are.
    let mut client = EchoClient::new(pool.clone());
    let before = server.calls();
    for _ in 0..20 {
        client.unary_echo(request(0)).await.unwrap();
    }
    assert_eq!(server.calls(), before);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    wait_until(WAIT, "the removed endpoint's connection closed", || relay.open_connections() == 0).await;
    // Added back, it takes calls again.
    assert!(pool.add_endpoint(&relay.uri()).unwrap());
    assert!(!pool.add_endpoint(&relay.uri()).unwrap(), "adding twice says it was there");
    wait_until(WAIT, "the endpoint is back with a ready member", || {
        pool.state().endpoints.iter().any(|e| e.endpoint.to_string() == relay.uri() && !e.members.is_empty())
    })
    .await;
    for _ in 0..50 {
        client.unary_echo(request(0)).await.unwrap();
    }
    assert!(server.calls() > before, "the endpoint took no call after it came back");
}

/// A resolver whose answer the test sets; counts lookups.
#[derive(Clone, Default)]
struct ScriptedResolver {
    answer: Arc<Mutex<VecDeque<io::Result<Vec<SocketAddr>>>>>,
    lookups: Arc<AtomicUsize>,
}

impl ScriptedResolver {
    fn answer(&self, answer: io::Result<Vec<SocketAddr>>) {
        let mut script = self.answer.lock().unwrap();
        script.clear();
        script.push_back(answer);
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Resolve for ScriptedResolver {
    fn resolve(&self, _host: &str, _port: u16) -> Resolving {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let answer = match self.answer.lock().unwrap().front() {
            Some(Ok(addrs)) => Ok(addrs.clone()),
            Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(Vec::new()),
        };
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn dns_re_resolution_follows_the_answers_and_a_failing_resolver_keeps_the_last_good_set() {
    let servers = [TestServer::start().await, TestServer::start().await, TestServer::start().await];
    let resolver = ScriptedResolver::default();
    resolver.answer(Ok(vec![servers[0].addr(), servers[1].addr()]));
    let pool = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    pool.discover(
        DnsDiscover::new("http://echo.test:50051", Duration::from_millis(20), resolver.clone()).unwrap(),
    );
    // Each address is an endpoint of its own, named after the host it was resolved from.
    let uris = |indexes: &[usize]| {
        indexes
            .iter()
            .map(|i| format!("http://echo.test:50051 ({})", servers[*i].addr()))
            .collect::<BTreeSet<_>>()
    };
    wait_until(WAIT, "the pool has the two addresses", || endpoints(&pool) == uris(&[0, 1])).await;
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(request(0)).await.unwrap();

    resolver.answer(Ok(vec![servers[1].addr(), servers[2].addr()]));
    wait_until(WAIT, "the pool follows the new answer", || endpoints(&pool) == uris(&[1, 2])).await;
    client.unary_echo(request(0)).await.unwrap();

    for failure in [Err(io::Error::other("SERVFAIL")), Ok(Vec::new())] {
        resolver.answer(failure);
        let seen = resolver.lookups();
        wait_until(WAIT, "three more lookups", || resolver.lookups() >= seen + 3).await;
        assert_eq!(endpoints(&pool), uris(&[1, 2]), "a failed lookup changed the set");
        client.unary_echo(request(0)).await.unwrap();
    }
}

#[tokio::test]
async fn the_health_task_checks_endpoints_added_after_the_pool_was_built() {
    // The servers have no health service; with `unimplemented_is_healthy: false` that makes
    // an endpoint unhealthy once the health task checks it.
    let first = TestServer::start().await;
    let added = TestServer::start().await;
    let checks = {
        let mut v = HealthCheck::default();
        v.interval = Duration::from_millis(50);
        v.unimplemented_is_healthy = false;
        v
    };
    let pool = Pool::builder().health_checks(Some(checks)).build([first.uri()]).await.unwrap();
    // The task is running and has checked the first endpoint: it knew the pool before the
    // second endpoint came.
    wait_until(WAIT, "the first endpoint is checked", || pool.state().endpoints.iter().all(|e| !e.healthy))
        .await;
    assert!(pool.add_endpoint(&added.uri()).unwrap());
    wait_until(WAIT, "the added endpoint is marked unhealthy by its checks", || {
        pool.state().endpoints.iter().any(|e| e.endpoint.to_string() == added.uri() && !e.healthy)
    })
    .await;
    assert!(pool.remove_endpoint(&added.uri()).unwrap());
    assert_eq!(endpoints(&pool), BTreeSet::from([first.uri()]));
}

#[tokio::test]
async fn a_burst_of_changes_is_applied_in_order_as_one() {
    // 300 endpoints added, 100 of them removed, one key moved to another endpoint, and one
    // endpoint added and removed again, all sent before the pool looks: the set is what the
    // changes say in their order. (The pool connects to none: min_connections 0.)
    let pool = Pool::builder().min_connections(0).build_lazy(Vec::<String>::new()).unwrap();
    let (discover, stream) = changes();
    let uri = |i: usize| format!("http://127.2.{}.{}:9", i / 250, i % 250 + 1);
    for i in 0..300 {
        discover.send(Ok(Change::Insert(i, uri(i)))).unwrap();
    }
    for i in 0..100 {
        discover.send(Ok(Change::Remove(i))).unwrap();
    }
    discover.send(Ok(Change::Insert(150, uri(1000)))).unwrap();
    discover.send(Ok(Change::Insert(500, uri(500)))).unwrap();
    discover.send(Ok(Change::Remove(500))).unwrap();
    pool.discover(stream);
    let expected: BTreeSet<String> = (100..300).filter(|i| *i != 150).map(uri).chain([uri(1000)]).collect();
    wait_until(WAIT, "the changes are applied", || endpoints(&pool) == expected).await;
    // And one change after the burst is applied too.
    discover.send(Ok(Change::Remove(299))).unwrap();
    wait_until(WAIT, "the later change is applied", || !endpoints(&pool).contains(&uri(299))).await;
    assert_eq!(endpoints(&pool).len(), 199);
}
