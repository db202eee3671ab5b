//! The bb8 adapter (cargo feature `bb8`): bb8 hands out working HTTP/2 connections, drops one
//! whose connection died (`has_broken`), and replaces one that stopped answering PINGs
//! (`is_valid`, with `test_on_check_out`).
#![cfg(feature = "bb8")]

use std::time::Duration;

use bb8::ManageConnection;
use bytes::Bytes;
use grpc_pool::bb8::Http2ConnectionManager;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, Relay, TestServer};

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"bb8"), repeat: 0, delay_ms: 0 }
}

#[tokio::test]
async fn bb8_hands_out_connections_that_carry_calls_and_replaces_dead_ones() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let manager = Http2ConnectionManager::new(&relay.uri()).unwrap();
    let pool = bb8::Pool::builder().max_size(2).min_idle(Some(1)).build(manager).await.unwrap();
    {
        let connection = pool.get().await.unwrap();
        let mut client = EchoClient::new(connection.clone());
        for _ in 0..10 {
            client.unary_echo(request()).await.unwrap();
        }
    }
    assert_eq!(server.calls(), 10);
    let opened = relay.accepted();

    // A connection that dies is reported broken (bb8 asks on every return), so bb8 drops it
    // instead of handing it out again.
    let manager = Http2ConnectionManager::new(&relay.uri()).unwrap();
    let mut connection = manager.connect().await.unwrap();
    assert!(!manager.has_broken(&mut connection));
    manager.is_valid(&mut connection).await.unwrap();
    relay.reset();
    wait_until(Duration::from_secs(10), "the reset connection is reported broken", || {
        manager.has_broken(&mut connection)
    })
    .await;
    let err = manager.is_valid(&mut connection).await.unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
    // And bb8 goes on handing out working connections.
    let connection = pool.get().await.unwrap();
    EchoClient::new(connection.clone()).unary_echo(request()).await.unwrap();
    assert!(relay.accepted() > opened);
}

#[tokio::test]
async fn a_connection_that_stopped_answering_is_replaced_at_checkout() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let manager = Http2ConnectionManager::new(&relay.uri()).unwrap().ping_timeout(Duration::from_millis(200));
    let pool = bb8::Pool::builder().max_size(1).test_on_check_out(true).build(manager).await.unwrap();
    EchoClient::new(pool.get().await.unwrap().clone()).unary_echo(request()).await.unwrap();
    let opened = relay.accepted();
    // Silently dropped: the socket stays open, nothing comes back. The PING at checkout
    // finds it, and bb8 connects anew.
    relay.freeze();
    let connection = pool.get().await.unwrap();
    assert!(relay.accepted() > opened, "the frozen connection was handed out");
    EchoClient::new(connection.clone()).unary_echo(request()).await.unwrap();
    assert_eq!(server.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_each_carry_their_own_calls() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr()).await;
    let manager = Http2ConnectionManager::new(&relay.uri()).unwrap();
    let pool = bb8::Pool::builder().max_size(3).build(manager).await.unwrap();
    // Six workers share three connections; each holds one for a burst of calls.
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    let connection = pool.get().await.unwrap();
                    let mut client = EchoClient::new(connection.clone());
                    for _ in 0..4 {
                        client.unary_echo(request()).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(server.calls(), 6 * 5 * 4);
    let state = pool.state();
    assert_eq!(state.connections, 3, "{state:?}");
    // Each bb8 connection is one HTTP/2 connection of its own, and they all stayed up.
    assert_eq!(relay.accepted(), 3);
    assert_eq!(relay.open_connections(), 3);
}

#[tokio::test]
async fn a_new_connection_takes_the_lowest_free_number_so_metric_series_stay_bounded() {
    // Each bb8 connection is a pool of its own, named `<name> bb8 #<n>` (the `pool` label of
    // its metric series): numbers come back when connections close, so churn makes no new
    // series.
    let server = TestServer::start().await;
    let manager = Http2ConnectionManager::new(&server.uri())
        .unwrap()
        .settings(grpc_pool::Pool::builder().name("bb8-numbers"));
    let named = |connection: &grpc_pool::bb8::Http2Connection, n: u32| {
        let debug = format!("{connection:?}");
        assert!(debug.contains(&format!("\"bb8-numbers bb8 #{n}\"")), "{debug}");
    };
    let first = manager.connect().await.unwrap();
    let second = manager.connect().await.unwrap();
    named(&first, 1);
    named(&second, 2);
    let first_clone = first.clone();
    drop(first);
    // A clone keeps the connection, and its number.
    named(&manager.connect().await.unwrap(), 3);
    drop(first_clone);
    // Numbers 1 and 3 are free again (the third connection above was dropped at once).
    let again = manager.connect().await.unwrap();
    named(&again, 1);
    named(&manager.connect().await.unwrap(), 3);
    drop(second);
}
