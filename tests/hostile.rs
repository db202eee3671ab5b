//! Servers that do not speak HTTP/2, or stop speaking: each costs the pool a failed connect
//! with an error that names the endpoint and says what happened, never a panic, and leaves no
//! task or file descriptor behind once the pool is gone.
//!
//! One test walks through every case in turn, because it counts the process's open file
//! descriptors, which tests running beside it would disturb.

use std::time::Duration;

use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a server does with each connection it accepts.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Answers like an HTTP/1.1 server that does not know HTTP/2.
    Http1Only,
    /// Sends bytes that are no protocol at all.
    Garbage,
    /// Closes the connection at once.
    CloseAtOnce,
    /// Accepts and never sends a byte.
    Silent,
}

async fn serve(listener: TcpListener, behaviour: Behaviour) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            match behaviour {
                Behaviour::Http1Only => {
                    let _ = tcp.read(&mut buf).await;
                    let _ = tcp
                        .write_all(
                            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                }
                Behaviour::Garbage => {
                    let noise: Vec<u8> =
                        (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
                    let _ = tcp.write_all(&noise).await;
                    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                }
                Behaviour::CloseAtOnce => {}
                Behaviour::Silent => while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {},
            }
        });
    }
}

#[tokio::test]
async fn misbehaving_servers_cost_a_connect_with_a_clear_error_and_leak_nothing() {
    let cases = [
        (Behaviour::Http1Only, "answered in HTTP/1.x"),
        (Behaviour::Garbage, "before the server's HTTP/2 SETTINGS"),
        (Behaviour::CloseAtOnce, "HTTP/2"),
        (Behaviour::Silent, "no HTTP/2 SETTINGS within connect_timeout"),
    ];
    let metrics = tokio::runtime::Handle::current().metrics();
    for (behaviour, expected) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(serve(listener, behaviour));
        tokio::task::yield_now().await;
        let (fds, tasks) = (grpc_pool_testkit::open_fds(), metrics.num_alive_tasks());

        // Built eagerly: the build fails, naming the endpoint and what went wrong.
        let builder = Pool::builder().connect_timeout(Duration::from_millis(300));
        let err = builder.clone().build([&uri]).await.unwrap_err().to_string();
        assert!(err.contains(&uri) && err.contains(expected), "{behaviour:?}: {err}");
        println!("{behaviour:?}: {err}");

        // Built lazily: a call fails with the same story once its checkout gives up.
        let pool = builder.checkout_timeout(Duration::from_millis(500)).build_lazy([&uri]).unwrap();
        let status = EchoClient::new(pool.clone())
            .unary_echo(EchoRequest { message: Default::default(), repeat: 0, delay_ms: 0 })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{behaviour:?}: {status:?}");
        assert!(status.message().contains(&uri), "{behaviour:?}: {}", status.message());
        let state = pool.state();
        assert!(state.endpoints[0].last_connect_error.is_some(), "{behaviour:?}: {state:?}");
        pool.close().await;
        drop(pool);

        // Nothing left: connections, connect tasks, drivers, timers.
        wait_until(Duration::from_secs(10), "file descriptors back to where they were", || {
            grpc_pool_testkit::open_fds() <= fds
        })
        .await;
        wait_until(Duration::from_secs(10), "tasks back to where they were", || {
            metrics.num_alive_tasks() <= tasks
        })
        .await;
        server.abort();
    }
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_naming_the_endpoint() {
    // Nothing listens (the port was free a moment ago): connection refused.
    let uri = grpc_pool_testkit::unused_uri();
    let err = Pool::builder().build([&uri]).await.unwrap_err().to_string();
    assert!(err.contains(&uri) && err.contains("TCP connect"), "{err}");
}
