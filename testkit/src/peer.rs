//! The non-Rust peer: an echo and health server on the gRPC C core (Python grpcio), run as a
//! child process. `scripts/setup-peer` installs it (the README's test command does); tests
//! that need it fail with instructions when it is missing, never skip.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Server-side limits of the peer, as the C core's channel arguments.
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    /// Bind this port instead of a free one.
    pub port: Option<u16>,
    /// `grpc.max_connection_idle_ms`: GOAWAY after this long without streams.
    pub max_connection_idle_ms: Option<u64>,
    /// `grpc.max_connection_age_ms`: GOAWAY once a connection is this old.
    pub max_connection_age_ms: Option<u64>,
    /// `grpc.max_connection_age_grace_ms`: then close it this long after.
    pub max_connection_age_grace_ms: Option<u64>,
    /// `grpc.keepalive_permit_without_calls`.
    pub keepalive_permit_without_calls: Option<bool>,
    /// `grpc.http2.min_ping_interval_without_data_ms`.
    pub min_ping_interval_without_data_ms: Option<u64>,
    /// `grpc.http2.max_ping_strikes`.
    pub max_ping_strikes: Option<u32>,
    /// `grpc.max_concurrent_streams`.
    pub max_concurrent_streams: Option<u32>,
}

impl PeerOptions {
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut add = |flag: &str, value: Option<String>| {
            if let Some(value) = value {
                args.push(flag.to_owned());
                args.push(value);
            }
        };
        add("--port", self.port.map(|v| v.to_string()));
        add("--max-connection-idle-ms", self.max_connection_idle_ms.map(|v| v.to_string()));
        add("--max-connection-age-ms", self.max_connection_age_ms.map(|v| v.to_string()));
        add("--max-connection-age-grace-ms", self.max_connection_age_grace_ms.map(|v| v.to_string()));
        add(
            "--keepalive-permit-without-calls",
            self.keepalive_permit_without_calls.map(|v| u8::from(v).to_string()),
        );
        add(
            "--min-ping-interval-without-data-ms",
            self.min_ping_interval_without_data_ms.map(|v| v.to_string()),
        );
        add("--max-ping-strikes", self.max_ping_strikes.map(|v| v.to_string()));
        add("--max-concurrent-streams", self.max_concurrent_streams.map(|v| v.to_string()));
        args
    }
}

/// Makes one unary `echo.Echo/UnaryEcho` call per name, one after another, from a gRPC C
/// core client (Python grpcio) with `service_config` and retries enabled, to `target`
/// (`127.0.0.1:port`); each call's message is its name. The status code name of each call,
/// in order.
pub async fn grpcio_calls(target: &str, service_config: &str, names: &[String]) -> Vec<String> {
    let python = python();
    assert!(
        python.exists(),
        "the Python gRPC peer is not installed ({} is missing): run scripts/setup-peer",
        python.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peer/retry_client.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(target)
        .arg(service_config)
        .args(names)
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the grpcio client did not finish within 120 s")
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.lines().last() == Some("done"), "the grpcio client failed: {text}");
    text.lines().filter_map(|line| line.rsplit_once(' ').map(|(_, code)| code.to_owned())).collect()
}

/// A running peer; killed when dropped.
pub struct PythonPeer {
    port: u16,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPC_POOL_PEER_PYTHON") {
        return PathBuf::from(path);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

/// A peer script run with the venv's Python, its stdin and stdout piped, and its first
/// line of output (within 30 s).
struct Launched {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    first_line: String,
}

fn launch(script: &str, configure: impl FnOnce(&mut Command)) -> impl std::future::Future<Output = Launched> {
    let python = python();
    assert!(
        python.exists(),
        "the Python gRPC peer is not installed ({} is missing): run scripts/setup-peer, or \
         scripts/test, which runs it",
        python.display()
    );
    let mut command = Command::new(&python);
    command.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peer").join(script));
    configure(&mut command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
    let script = script.to_owned();
    async move {
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let first_line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("{script} did not start within 30 s"))
            .expect("reading the peer's output")
            .unwrap_or_else(|| panic!("{script} exited before it was ready"));
        Launched { child, stdin, stdout, first_line }
    }
}

impl PythonPeer {
    /// Starts the peer and waits until it listens.
    pub async fn start(options: PeerOptions) -> PythonPeer {
        let Launched { child, stdin, stdout, first_line: line } = launch("echo_peer.py", |command| {
            command.args(options.args());
        })
        .await;
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the peer: {line}"));
        PythonPeer { port, child, stdin, stdout }
    }

    /// The peer's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The peer's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sets the health status of `""` and `echo.Echo` to SERVING or NOT_SERVING, and waits
    /// until the peer has done it.
    pub async fn set_serving(&mut self, serving: bool) {
        let command = if serving { "serving" } else { "not_serving" };
        let reply = self.command(command).await;
        assert_eq!(reply, format!("ok {command}"));
    }

    /// Echo calls the peer has served so far.
    pub async fn calls(&mut self) -> u64 {
        let reply = self.command("count").await;
        reply
            .strip_prefix("ok count ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer to count: {reply}"))
    }

    async fn command(&mut self, command: &str) -> String {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.expect("writing to the peer");
        self.stdin.flush().await.expect("writing to the peer");
        tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .expect("the peer did not answer within 10 s")
            .expect("reading the peer's output")
            .expect("the peer exited")
    }

    /// Kills the peer at once (SIGKILL), as a crash would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A gRPC C core xDS client (Python grpcio, `peer/xds_client.py`): one channel to an
/// `xds:///` target, resolved by the C core's own xDS client through the control plane of
/// `bootstrap`. Killed when dropped.
pub struct GrpcioXdsClient {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// What a batch of calls from the C core ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallBatch {
    /// Calls that succeeded.
    pub ok: u64,
    /// Calls that failed.
    pub failed: u64,
    /// The last failure's status code name (`UNAVAILABLE`), or `-`.
    pub last_code: String,
}

impl GrpcioXdsClient {
    /// Starts the client on `target` with the bootstrap JSON in `GRPC_XDS_BOOTSTRAP_CONFIG`.
    pub async fn start(target: &str, bootstrap: &str) -> GrpcioXdsClient {
        let Launched { child, stdin, stdout, first_line: line } = launch("xds_client.py", |command| {
            command.arg(target).env("GRPC_XDS_BOOTSTRAP_CONFIG", bootstrap).env_remove("GRPC_XDS_BOOTSTRAP");
        })
        .await;
        assert_eq!(line, "ready", "unexpected first line from the xDS client");
        GrpcioXdsClient { _child: child, stdin, stdout }
    }

    /// Makes `n` calls, one after another (5 s deadline each, failing fast).
    pub async fn calls(&mut self, n: u64) -> CallBatch {
        self.stdin.write_all(format!("calls {n}\n").as_bytes()).await.expect("writing to the xDS client");
        self.stdin.flush().await.expect("writing to the xDS client");
        let line = tokio::time::timeout(Duration::from_secs(5 * n + 30), self.stdout.next_line())
            .await
            .expect("the xDS client did not answer in time")
            .expect("reading the xDS client's output")
            .expect("the xDS client exited");
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["ok", ok, "failed", failed, code] => CallBatch {
                ok: ok.parse().expect("a count"),
                failed: failed.parse().expect("a count"),
                last_code: (*code).to_owned(),
            },
            _ => panic!("unexpected answer from the xDS client: {line}"),
        }
    }
}
