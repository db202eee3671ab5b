//! What a pool tells its users as it happens (`Pool::events`), and the uniqueness of pool
//! names that keeps metric series apart.

use std::time::Duration;

use grpc_pool::{ErrorKind, EvictionReason, Pool, PoolEvent, EVENT_BUFFER};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;

const WAIT: Duration = Duration::from_secs(10);

/// The next event that `wanted` accepts, skipping others; fails after `WAIT`.
async fn next_matching(
    events: &mut grpc_pool::PoolEvents,
    what: &str,
    wanted: impl Fn(&PoolEvent) -> bool,
) -> PoolEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(event) if wanted(&event) => return event,
                Some(_) => continue,
                None => panic!("the pool went away before {what}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

#[tokio::test]
async fn connections_and_endpoints_coming_and_going_are_events() {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let pool = Pool::builder().build_lazy([a.uri()]).unwrap();
    let mut events = pool.events();
    let opened =
        next_matching(&mut events, "a connection to A", |e| matches!(e, PoolEvent::ConnectionOpened { .. }))
            .await;
    let PoolEvent::ConnectionOpened { endpoint, connection } = opened else { unreachable!() };
    assert_eq!(endpoint.to_string(), a.uri());

    pool.add_endpoint(&b.uri()).unwrap();
    let added = next_matching(&mut events, "B added", |e| matches!(e, PoolEvent::EndpointAdded(_))).await;
    assert_eq!(added, PoolEvent::EndpointAdded(b.uri().parse().unwrap()));

    pool.remove_endpoint(&a.uri()).unwrap();
    // Its connection is retired as it leaves: both events, in either order.
    let (mut removed, mut retired) = (None, None);
    while removed.is_none() || retired.is_none() {
        let event = next_matching(&mut events, "A removed and its connection retired", |e| {
            matches!(e, PoolEvent::EndpointRemoved(_) | PoolEvent::ConnectionClosed { .. })
        })
        .await;
        match event {
            PoolEvent::EndpointRemoved(endpoint) => removed = Some(endpoint),
            PoolEvent::ConnectionClosed { connection: id, reason, .. } => retired = Some((id, reason)),
            _ => unreachable!(),
        }
    }
    assert_eq!(removed.unwrap().to_string(), a.uri());
    assert_eq!(retired.unwrap(), (connection, EvictionReason::EndpointRemoved));
}

#[tokio::test]
async fn a_goaway_is_an_event_with_its_code_and_text() {
    let server = TestServer::start().await;
    let pool = Pool::builder().build([server.uri()]).await.unwrap();
    let mut events = pool.events();
    let mut client = EchoClient::new(pool.clone());
    client.unary_echo(EchoRequest { message: Default::default(), repeat: 0, delay_ms: 0 }).await.unwrap();
    // A graceful shutdown of the server: GOAWAY NO_ERROR on every connection.
    server.shutdown().await;
    let goaway = next_matching(&mut events, "a GOAWAY", |e| matches!(e, PoolEvent::GoAway { .. })).await;
    let PoolEvent::GoAway { code, .. } = goaway else { unreachable!() };
    assert_eq!(code, 0, "NO_ERROR");
    let closed = next_matching(&mut events, "the connection retired", |e| {
        matches!(e, PoolEvent::ConnectionClosed { .. })
    })
    .await;
    assert!(
        matches!(closed, PoolEvent::ConnectionClosed { reason: EvictionReason::GoAway, .. }),
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_misses_the_oldest_and_is_told_how_many() {
    // No connections (min 0, and nothing calls): every event is an endpoint added or removed.
    let pool = Pool::builder().min_connections(0).build_lazy(Vec::<String>::new()).unwrap();
    let mut slow = pool.events();
    let rounds = EVENT_BUFFER; // two events a round: twice what the buffer holds
    for port in 0..rounds {
        let uri = format!("http://127.0.0.1:{}", 10_000 + port);
        pool.add_endpoint(&uri).unwrap();
        pool.remove_endpoint(&uri).unwrap();
    }
    let first = slow.try_recv().expect("an event");
    assert_eq!(first, PoolEvent::Missed { count: (2 * rounds - EVENT_BUFFER) as u64 });
    // Then the newest EVENT_BUFFER, in order, and nothing more.
    let mut seen = 0;
    while let Some(event) = slow.try_recv() {
        assert!(matches!(event, PoolEvent::EndpointAdded(_) | PoolEvent::EndpointRemoved(_)), "{event:?}");
        seen += 1;
    }
    assert_eq!(seen, EVENT_BUFFER);
}

#[tokio::test]
async fn two_live_pools_never_share_a_name() {
    let first = Pool::builder().name("orders").build_lazy(Vec::<String>::new()).unwrap();
    let err = Pool::builder().name("orders").build_lazy(Vec::<String>::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("`name`") && err.to_string().contains("another live pool"), "{err}");
    // A closed pool gives its name back.
    first.close().await;
    let second = Pool::builder().name("orders").build_lazy(Vec::<String>::new()).unwrap();
    assert_eq!(second.name(), "orders");

    // Pools left with the default name get one each.
    let (x, y) = (
        Pool::builder().build_lazy(Vec::<String>::new()).unwrap(),
        Pool::builder().build_lazy(Vec::<String>::new()).unwrap(),
    );
    assert_ne!(x.name(), y.name());
    for pool in [&x, &y] {
        assert!(pool.name().starts_with(grpc_pool::DEFAULT_POOL_NAME), "{}", pool.name());
    }
}
