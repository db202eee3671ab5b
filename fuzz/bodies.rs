//! The fuzz targets' bodies, shared by `cargo fuzz` (fuzz_targets/*.rs, nightly) and the
//! smoke test that runs them on stable (tests/fuzz_smoke.rs). Each is included by path
//! (`#[path]`), so both run exactly this code without a crate of its own between them.
//!
//! Every body must return normally for any input: a panic is a finding.

// Each fuzz target uses one body of the three.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Duration;

use grpc_pool::dns::{DnsDiscover, Resolve, Resolving};
use grpc_pool::{Endpoint, Pool, PoolConfig};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One runtime for every input: building one per input would dominate the time.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
    })
}

/// Resolves nothing: DNS sections are checked, never looked up.
struct NoLookups;

impl Resolve for NoLookups {
    fn resolve(&self, _host: &str, _port: u16) -> Resolving {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The configuration parser: the input as TOML and as JSON; whatever parses is built into a
/// pool (without connecting anywhere) and closed. Errors are fine; panics are not.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // TLS files are read as the `tls` section is parsed: an input naming a file (any path,
    // `/dev/zero` included) is not for a fuzzer to open. Keys are compared after the format
    // has unescaped them.
    let names_a_file = |keys: Vec<String>| keys.iter().any(|k| k.ends_with("_file"));
    let toml_ok =
        toml::from_str::<toml::Table>(text).is_ok_and(|t| !names_a_file(toml_keys(&toml::Value::Table(t))));
    let json_ok = serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| !names_a_file(json_keys(&v)));
    let parsed = [
        toml_ok.then(|| toml::from_str::<PoolConfig>(text).ok()).flatten(),
        json_ok.then(|| serde_json::from_str::<PoolConfig>(text).ok()).flatten(),
    ];
    for mut config in parsed.into_iter().flatten() {
        // Nothing here may touch the machine: endpoints are parsed but not connected to, the
        // DNS name is checked but not looked up.
        for uri in std::mem::take(&mut config.endpoints) {
            let _ = Endpoint::parse(&uri);
        }
        if let Some(dns) = config.dns.take() {
            let _ = DnsDiscover::new(&dns.uri, dns.interval, NoLookups);
        }
        config.tls = None;
        runtime().block_on(async {
            if let Ok(pool) = config.build_lazy() {
                pool.close().await;
            }
        });
    }
}

/// Every key in a TOML value, at any depth.
fn toml_keys(value: &toml::Value) -> Vec<String> {
    match value {
        toml::Value::Table(table) => {
            table.iter().flat_map(|(k, v)| std::iter::once(k.clone()).chain(toml_keys(v))).collect()
        }
        toml::Value::Array(items) => items.iter().flat_map(toml_keys).collect(),
        _ => Vec::new(),
    }
}

/// Every key in a JSON value, at any depth.
fn json_keys(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::Object(map) => {
            map.iter().flat_map(|(k, v)| std::iter::once(k.clone()).chain(json_keys(v))).collect()
        }
        serde_json::Value::Array(items) => items.iter().flat_map(json_keys).collect(),
        _ => Vec::new(),
    }
}

/// The frame observer under every connection: the input as a server's byte stream, whole and
/// split by the first eight bytes' seed; both must record the same facts.
pub fn frames(data: &[u8]) {
    let (seed, bytes) = match data.split_first_chunk::<8>() {
        Some((seed, rest)) => (u64::from_le_bytes(*seed), rest),
        None => (0, data),
    };
    grpc_pool::__private::fuzz::frame_observer(bytes, seed);
}

/// The response path: a server that answers the HTTP/2 handshake properly, waits for the
/// call's HEADERS, then sends the input and closes. The call must end (with an answer or an
/// error) and the pool must close, within bounds; nothing may panic. Returns whether the
/// call was answered (so the smoke test can tell that a good response gets through).
pub fn response(data: &[u8]) -> bool {
    let data = data.to_vec();
    runtime().block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let uri = format!("http://{}", listener.local_addr().expect("local address"));
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await?;
            let mut preface = [0u8; 24];
            socket.read_exact(&mut preface).await?;
            // An empty SETTINGS, and the ACK of the client's.
            socket.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0, 0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]).await?;
            // Skip the client's frames up to its first HEADERS: the call is open then.
            loop {
                let mut header = [0u8; 9];
                socket.read_exact(&mut header).await?;
                let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0u8; length];
                socket.read_exact(&mut payload).await?;
                if header[3] == 0x1 {
                    break;
                }
            }
            socket.write_all(&data).await?;
            socket.flush().await
        });
        let pool = Pool::builder()
            .connect_timeout(Duration::from_millis(500))
            .checkout_timeout(Duration::from_millis(500))
            .max_attempts(1)
            .build_lazy([&uri])
            .expect("a valid pool");
        let mut client = EchoClient::new(pool.clone());
        let request = EchoRequest { message: bytes::Bytes::from_static(b"fuzz"), repeat: 0, delay_ms: 0 };
        let call = tokio::time::timeout(Duration::from_secs(5), client.unary_echo(request)).await;
        // The server has closed (or failed); a call still open now would wait forever.
        let _ = server.await;
        if call.is_err() {
            panic!("the call neither ended nor failed within 5 s after the server sent its bytes and closed");
        }
        let closed = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
        assert!(closed.is_ok(), "the pool did not close within 5 s");
        matches!(call, Ok(Ok(_)))
    })
}
