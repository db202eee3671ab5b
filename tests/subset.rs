//! Subsetting against real servers: a pool with a subset connects to `size` endpoints of the
//! set and to no other, two pools with one client number choose alike, a removed member's
//! place goes to the next endpoint, and a member whose server is gone is displaced and given
//! its place back after the hold. (The order's spread over a fleet and its churn are checked
//! by `subset.rs`'s own tests, which need no network.)

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use grpc_pool::{Pool, Subset};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, Relay, ServerOptions, TestServer};

const WAIT: Duration = Duration::from_secs(10);

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"hello"), repeat: 0, delay_ms: 0 }
}

fn live(pool: &Pool) -> BTreeSet<String> {
    pool.state().endpoints.iter().map(|e| e.endpoint.to_string()).collect()
}

fn subset(size: usize, client: u64, replace_after: Duration) -> Option<Subset> {
    let mut subset = Subset::new(size);
    subset.client = Some(client);
    subset.replace_after = replace_after;
    Some(subset)
}

/// Callers that keep calls going until stopped; counts the failed ones.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    ok: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(pool: &Pool, callers: usize) -> Load {
        let (stop, failed, ok) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let tasks = (0..callers)
            .map(|_| {
                let mut client = EchoClient::new(pool.clone());
                let (stop, failed, ok): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
                    (stop.clone(), Arc::clone(&failed), Arc::clone(&ok));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match client.unary_echo(request()).await {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(status) => {
                                eprintln!("call failed: {status:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load { stop, failed, ok, tasks }
    }

    /// Stops the callers; returns the failed calls and the ones that succeeded.
    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (self.failed.load(Ordering::Relaxed), self.ok.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_a_subset_connects_to_its_size_and_to_no_other_endpoint() {
    // Eight servers, each behind a relay that counts the connections made through it.
    let mut servers = Vec::new();
    let mut relays = Vec::new();
    for _ in 0..8 {
        let server = TestServer::start().await;
        relays.push(Relay::start(server.addr()).await);
        servers.push(server);
    }
    let uris: Vec<String> = relays.iter().map(Relay::uri).collect();
    let pool = Pool::builder().subset(subset(3, 5, Duration::from_secs(30))).build(&uris).await.unwrap();
    let chosen = live(&pool);
    assert_eq!(chosen.len(), 3, "{chosen:?}");
    let state = pool.state().subset.expect("subsetting shows in the state");
    assert_eq!((state.size, state.client, state.known), (3, 5, 8));
    assert_eq!(state.clients_per_ring, Some(3), "8 endpoints over a subset of 3, rounded");

    let mut client = EchoClient::new(pool.clone());
    for _ in 0..60 {
        client.unary_echo(request()).await.unwrap();
    }
    for (relay, (uri, server)) in relays.iter().zip(uris.iter().zip(&servers)) {
        if chosen.contains(uri) {
            assert!(relay.accepted() >= 1 && server.calls() > 0, "{uri}: a member of the subset takes calls");
        } else {
            assert_eq!(
                (relay.accepted(), server.calls()),
                (0, 0),
                "{uri}: outside the subset, never connected"
            );
        }
    }

    // The same client number chooses the same subset, whatever the order of the list.
    let mut reversed = uris.clone();
    reversed.reverse();
    let again = Pool::builder().subset(subset(3, 5, Duration::from_secs(30))).build_lazy(&reversed).unwrap();
    assert_eq!(live(&again), chosen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_gives_its_place_to_the_next_endpoint_and_the_others_stay() {
    let mut servers = Vec::new();
    for _ in 0..6 {
        servers.push(TestServer::start().await);
    }
    let uris: Vec<String> = servers.iter().map(TestServer::uri).collect();
    let pool = Pool::builder().subset(subset(3, 1, Duration::from_secs(30))).build(&uris).await.unwrap();
    let before = live(&pool);
    let load = Load::start(&pool, 8);
    wait_until(WAIT, "calls are going", || load.ok.load(Ordering::Relaxed) > 100).await;

    let gone = before.iter().next().unwrap().clone();
    assert!(pool.remove_endpoint(&gone).unwrap());
    let after = live(&pool);
    assert_eq!(after.len(), 3);
    assert!(!after.contains(&gone));
    let kept: BTreeSet<_> = before.intersection(&after).cloned().collect();
    assert_eq!(kept.len(), 2, "only the removed member moves: {before:?} -> {after:?}");
    let newcomer = after.difference(&before).next().unwrap().clone();
    let index = uris.iter().position(|u| *u == newcomer).unwrap();
    let served = servers[index].calls();
    wait_until(WAIT, "the newcomer takes calls", || servers[index].calls() > served + 20).await;

    // Put back, it takes its place again (the order is the client's, not the history's).
    assert!(pool.add_endpoint(&gone).unwrap());
    assert_eq!(live(&pool), before);
    assert!(!pool.add_endpoint(&gone).unwrap(), "known already");
    let (failed, ok) = load.stop().await;
    assert_eq!(failed, 0, "no call fails while members change ({ok} succeeded)");
    assert_eq!(pool.state().subset.unwrap().known, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_server_is_gone_is_displaced_and_takes_its_place_back_after_the_hold() {
    let replace_after = Duration::from_millis(300);
    let mut servers = Vec::new();
    for _ in 0..5 {
        servers.push(Some(TestServer::start().await));
    }
    let uris: Vec<String> = servers.iter().map(|s| s.as_ref().unwrap().uri()).collect();
    let pool = Pool::builder().subset(subset(2, 4, replace_after)).build(&uris).await.unwrap();
    let before = live(&pool);
    let load = Load::start(&pool, 4);

    // One member's server stops (GOAWAY, then nothing listens: connects are refused).
    let dead = before.iter().next().unwrap().clone();
    let index = uris.iter().position(|u| *u == dead).unwrap();
    let port = servers[index].as_ref().unwrap().addr().port();
    servers[index].take().unwrap().shutdown().await;
    wait_until(WAIT, "the dead member is displaced", || {
        pool.state().subset.unwrap().displaced.iter().any(|(e, _)| e.to_string() == dead)
    })
    .await;
    let during = live(&pool);
    assert_eq!(during.len(), 2);
    assert!(!during.contains(&dead));
    let replacement = during.difference(&before).next().expect("another endpoint took the place").clone();
    let hold = pool.state().subset.unwrap().displaced[0].1;
    assert!(hold <= replace_after, "the first hold is replace_after: {hold:?}");

    // The server comes back on its port; after the hold the endpoint takes its place back
    // and the replacement leaves.
    let options = ServerOptions { port: Some(port), ..Default::default() };
    servers[index] = Some(TestServer::start_with(options).await);
    wait_until(WAIT, "the endpoint is back in the subset", || live(&pool) == before).await;
    assert!(!live(&pool).contains(&replacement));
    let served = servers[index].as_ref().unwrap().calls();
    wait_until(WAIT, "it takes calls again", || servers[index].as_ref().unwrap().calls() > served + 20).await;
    let (failed, ok) = load.stop().await;
    // Calls in flight on the stopped server end with its GOAWAY (the pool sends them again);
    // calls that find it gone go to the other member.
    assert_eq!(failed, 0, "no call fails ({ok} succeeded)");
}
