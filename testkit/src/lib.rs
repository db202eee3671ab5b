//! Test support shared by grpc-pool's tests, examples and benches: the echo service, tonic
//! servers started in-process on 127.0.0.1, and a TCP relay that injects faults.
#![deny(missing_docs)]
pub mod bare;
pub mod ca;
pub mod clock;
/// The echo service, generated from `testkit/proto/echo.proto` by `scripts/regen-proto.sh`.
#[allow(missing_docs)] // generated code, documented by the proto's comments
pub mod echo;
pub mod etcd;
pub mod frame_server;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod peer;
pub mod ping_policy;
pub mod process;
pub mod raw;
pub mod refusing;
pub mod relay;
pub mod server;
pub mod xds;

pub use bare::BareH2;
pub use ca::Ca;
pub use clock::HeldClock;
pub use etcd::EtcdServer;
pub use frame_server::{Behaviour, FrameServer};
#[cfg(target_os = "linux")]
pub use netns::BlackHoleLink;
pub use peer::{grpcio_calls, CallBatch, GrpcioXdsClient, PeerOptions, PythonPeer};
pub use ping_policy::{PingEnforcer, PingPolicy};
pub use raw::{serve_echo, Misbehaviour, RawServer};
pub use refusing::RefuseFirstServer;
pub use relay::Relay;
#[cfg(unix)]
pub use server::UnixTestServer;
pub use server::{EchoServer, ServerOptions, ServerTls, TestServer};

use std::future::Future;
use std::time::Duration;

/// `http://127.0.0.1:port` of a port that nothing listens on (it was free a moment ago):
/// an endpoint whose connects are refused.
pub fn unused_uri() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    format!("http://{}", probe.local_addr().expect("local address"))
}

/// A `grpc-timeout` value as a server saw it (`200000u`), as a duration; panics on a value
/// that is not one, so that a test never reads a wrong header as a short timeout.
pub fn parse_grpc_timeout(text: &str) -> Duration {
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("digits in grpc-timeout {text}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        other => panic!("unit {other} in grpc-timeout {text}"),
    }
}

/// Polls `condition` every few milliseconds until it holds, for at most `limit`; panics with
/// `what` if it never does. Tests wait on state this way instead of sleeping for a guess.
pub async fn wait_until<F>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> bool,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`wait_until`], with an async condition.
pub async fn wait_until_async<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// File descriptors this process has open, from `/proc/self/fd` (Linux) or `/dev/fd` (macOS
/// and the BSDs). Panics where neither can be read, so that a leak check never passes for
/// want of a count.
pub fn open_fds() -> usize {
    for dir in ["/proc/self/fd", "/dev/fd"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            return entries.count();
        }
    }
    panic!(
        "cannot count open file descriptors here (no /proc/self/fd or /dev/fd): the fd leak checks need it"
    );
}
