//! A connector of the user's (`Builder::connector`): the pool's connections run over the
//! streams it returns, and its failures are the pool's connect errors.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grpc_pool::{ErrorKind, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"via connector"), repeat: 0, delay_ms: 0 }
}

#[tokio::test]
async fn every_connection_goes_through_the_connector() {
    let server = TestServer::start().await;
    let target = server.addr();
    let asked = Arc::new(Mutex::new(Vec::<http::Uri>::new()));
    let log = asked.clone();
    // Nothing listens on port 1: only a connector that dials elsewhere can reach a server.
    let connector = tower::service_fn(move |uri: http::Uri| {
        log.lock().unwrap().push(uri);
        tokio::net::TcpStream::connect(target)
    });
    let pool = Pool::builder()
        .min_connections(2)
        .max_connections(2)
        .connector(connector)
        .build(["http://127.0.0.1:1"])
        .await
        .unwrap();
    let reply = EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap();
    assert_eq!(reply.into_inner().message, Bytes::from_static(b"via connector"));
    assert_eq!(server.calls(), 1);
    grpc_pool_testkit::wait_until(Duration::from_secs(10), "both connections are up", || {
        pool.state().members() == 2
    })
    .await;
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(asked.iter().all(|uri| *uri == "http://127.0.0.1:1/"), "{asked:?}");
}

#[tokio::test]
async fn a_connector_that_fails_fails_the_connect_with_its_error() {
    let connector = tower::service_fn(|_uri: http::Uri| async {
        Err::<tokio::net::TcpStream, _>(std::io::Error::other("the tunnel is down"))
    });
    let err = Pool::builder().connector(connector).build(["http://127.0.0.1:1"]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    // The build's error lists each endpoint's: the connector's own words included.
    let text = err.to_string();
    assert!(text.contains("http://127.0.0.1:1 failed: the connector failed: the tunnel is down"), "{text}");
}
