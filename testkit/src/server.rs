//! tonic echo servers on 127.0.0.1, with the limits tests need and a graceful shutdown.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;

use crate::echo::echo_server::{Echo, EchoServer as EchoService};
use crate::echo::{EchoRequest, EchoResponse};

/// The echo service's name, as health checks ask for it.
const HEALTH_NAME: &str = "echo.Echo";

/// Counts what a server saw, for tests that check where calls went.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls of any kind that reached the handler.
    pub calls: AtomicU64,
    /// Calls whose handler is running now.
    pub active: AtomicUsize,
    /// Each unary call's `grpc-timeout` header as it arrived, and when it arrived.
    pub timeouts: std::sync::Mutex<Vec<(std::time::Instant, String)>>,
    /// The `user-agent` header of the last unary call that had one.
    pub user_agent: std::sync::Mutex<Option<String>>,
}

/// The echo service; every method honours `delay_ms`.
#[derive(Debug, Clone, Default)]
pub struct EchoServer {
    counters: Arc<Counters>,
    /// While set, unary calls end with `UNAVAILABLE` (an overloaded or broken backend).
    unavailable: Arc<AtomicBool>,
    /// Every unary call waits this long more before its answer (a slow backend).
    slow: Duration,
}

struct ActiveGuard(Arc<Counters>);

impl ActiveGuard {
    fn new(counters: &Arc<Counters>) -> ActiveGuard {
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counters.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn delay(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms.into())).await;
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoServer {
    async fn unary_echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let _active = ActiveGuard::new(&self.counters);
        if let Some(timeout) = request.metadata().get("grpc-timeout").and_then(|t| t.to_str().ok()) {
            let seen = (std::time::Instant::now(), timeout.to_owned());
            self.counters.timeouts.lock().unwrap_or_else(|e| e.into_inner()).push(seen);
        }
        if let Some(agent) = request.metadata().get("user-agent").and_then(|a| a.to_str().ok()) {
            *self.counters.user_agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(agent.to_owned());
        }
        let request = request.into_inner();
        delay(request.delay_ms).await;
        if !self.slow.is_zero() {
            tokio::time::sleep(self.slow).await;
        }
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(Status::unavailable("the test made this server unavailable"));
        }
        Ok(Response::new(EchoResponse { message: request.message }))
    }

    type ServerStreamingEchoStream = ResponseStream;

    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamingEchoStream>, Status> {
        let active = ActiveGuard::new(&self.counters);
        let request = request.into_inner();
        if self.unavailable.load(Ordering::Relaxed) {
            // One message, then the status in the trailers: a failure the client learns from
            // the response body, not from its head.
            let items = [
                Ok(EchoResponse { message: request.message }),
                Err(Status::unavailable("the test made this server unavailable")),
            ];
            return Ok(Response::new(Box::pin(tokio_stream::iter(items).map(move |item| {
                let _keep = &active;
                item
            }))));
        }
        let repeat = request.repeat.max(1);
        let stream = async_stream(repeat, request);
        Ok(Response::new(Box::pin(stream.map(move |item| {
            let _keep = &active;
            item
        }))))
    }

    async fn client_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let _active = ActiveGuard::new(&self.counters);
        let mut stream = request.into_inner();
        let mut message = Vec::new();
        while let Some(item) = stream.next().await {
            let item = item?;
            delay(item.delay_ms).await;
            message.extend_from_slice(&item.message);
        }
        Ok(Response::new(EchoResponse { message: message.into() }))
    }

    type BidirectionalStreamingEchoStream = ResponseStream;

    async fn bidirectional_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidirectionalStreamingEchoStream>, Status> {
        let active = ActiveGuard::new(&self.counters);
        let stream = request.into_inner().then(|item| async move {
            let item = item?;
            delay(item.delay_ms).await;
            Ok(EchoResponse { message: item.message })
        });
        Ok(Response::new(Box::pin(stream.map(move |item| {
            let _keep = &active;
            item
        }))))
    }
}

/// `repeat` responses echoing `request`, each after `delay_ms`.
fn async_stream(
    repeat: u32,
    request: EchoRequest,
) -> impl Stream<Item = Result<EchoResponse, Status>> + Send {
    tokio_stream::iter(0..repeat).then(move |_| {
        let message = request.message.clone();
        let ms = request.delay_ms;
        async move {
            delay(ms).await;
            Ok(EchoResponse { message })
        }
    })
}

/// How to run a [`TestServer`].
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` per connection; `None` for tonic's default.
    pub max_concurrent_streams: Option<u32>,
    /// Bind to this port instead of a free one (to restart a server in place).
    pub port: Option<u16>,
    /// Serve TLS (ALPN h2) with this certificate; `https://` URIs then.
    pub tls: Option<ServerTls>,
    /// Serve `grpc.health.v1.Health` too (SERVING for `""` and `echo.Echo` until
    /// [`TestServer::set_serving`] says otherwise). Off by default: a tonic server has no
    /// health service unless it adds one.
    pub health: bool,
    /// Close each connection gracefully (GOAWAY, in-flight calls finish) once it is this old,
    /// as servers with a `max_connection_age` do.
    pub max_connection_age: Option<Duration>,
    /// Every unary call waits this long more before it is answered: a slow backend among
    /// fast ones.
    pub slow: Option<Duration>,
}

/// A TLS server's certificate chain and key (PEM), and the CA its clients must present a
/// certificate from, if it requires one.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate chain.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca_pem: Option<String>,
}

/// An echo server on 127.0.0.1 (or on a listener of the caller's), stopped gracefully
/// (GOAWAY, in-flight calls finish) by [`TestServer::shutdown`] or abruptly when dropped.
pub struct TestServer {
    addr: SocketAddr,
    scheme: &'static str,
    counters: Arc<Counters>,
    unavailable: Arc<AtomicBool>,
    health: Option<tonic_health::server::HealthReporter>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with default options.
    pub async fn start() -> TestServer {
        TestServer::start_with(ServerOptions::default()).await
    }

    /// Starts a server with `options`.
    pub async fn start_with(options: ServerOptions) -> TestServer {
        let listener =
            TcpListener::bind(("127.0.0.1", options.port.unwrap_or(0))).await.expect("bind 127.0.0.1");
        TestServer::start_on(listener, options).await
    }

    /// Starts a server on a listener of the caller's (bound elsewhere than 127.0.0.1, say
    /// in another network namespace); `options.port` is not used.
    pub async fn start_on(listener: TcpListener, options: ServerOptions) -> TestServer {
        let addr = listener.local_addr().expect("local address");
        let service = EchoServer { slow: options.slow.unwrap_or_default(), ..EchoServer::default() };
        let counters = service.counters.clone();
        let unavailable = service.unavailable.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(max) = options.max_concurrent_streams {
            builder = builder.max_concurrent_streams(max);
        }
        if let Some(age) = options.max_connection_age {
            builder = builder.max_connection_age(age);
        }
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        if let Some(tls) = &options.tls {
            let mut config = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            builder = builder.tls_config(config).expect("server TLS configuration");
        }
        let (health, health_service) = if options.health {
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter.set_service_status("", ServingStatus::Serving).await;
            reporter.set_service_status(HEALTH_NAME, ServingStatus::Serving).await;
            (Some(reporter), Some(service))
        } else {
            (None, None)
        };
        let router = builder.add_optional_service(health_service).add_service(
            EchoService::new(service).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20),
        );
        let task = tokio::spawn(async move {
            // Without TCP_NODELAY, Nagle and delayed ACKs add 40 ms to pipelined responses.
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestServer { addr, scheme, counters, unavailable, health, stop: Some(stop), task: Some(task) }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port` (`https://` with TLS), for a pool.
    pub fn uri(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Calls that reached the handlers so far.
    pub fn calls(&self) -> u64 {
        self.counters.calls.load(Ordering::Relaxed)
    }

    /// Each unary call's `grpc-timeout` header as it arrived (calls without one are left
    /// out), and when it arrived.
    pub fn grpc_timeouts(&self) -> Vec<(std::time::Instant, String)> {
        self.counters.timeouts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `user-agent` header of the last unary call that had one.
    pub fn last_user_agent(&self) -> Option<String> {
        self.counters.user_agent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// While `on`, unary calls end with `UNAVAILABLE` (after their `delay_ms`), and server
    /// streams with `UNAVAILABLE` in their trailers after one message.
    pub fn set_unavailable(&self, on: bool) {
        self.unavailable.store(on, Ordering::Relaxed);
    }

    /// Sets the health status of `""` and `echo.Echo` to SERVING or NOT_SERVING; `Watch`
    /// streams hear it at once. Panics if the server was started without `health`.
    pub async fn set_serving(&self, serving: bool) {
        let reporter = self.health.as_ref().expect("set_serving needs ServerOptions::health");
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(HEALTH_NAME, status).await;
    }

    /// Calls running in the handlers now.
    pub fn active(&self) -> usize {
        self.counters.active.load(Ordering::Relaxed)
    }

    /// Graceful shutdown: GOAWAY on every connection, in-flight calls finish, then the
    /// listener closes. Returns when the server has stopped.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An echo server on a Unix domain socket in the temporary directory, for endpoints on the
/// same machine (sidecars). Stopped, and its socket file removed, when dropped.
#[cfg(unix)]
pub struct UnixTestServer {
    path: std::path::PathBuf,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

#[cfg(unix)]
impl UnixTestServer {
    /// Starts a server on a fresh socket path.
    pub async fn start() -> UnixTestServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("grpc-pool-{}-{}.sock", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind the Unix socket");
        let service = EchoServer::default();
        let counters = service.counters.clone();
        let router = tonic::transport::Server::builder().add_service(
            EchoService::new(service).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20),
        );
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = router.serve_with_incoming(incoming).await;
        });
        UnixTestServer { path, counters, task }
    }

    /// `unix:///tmp/...sock`, for a pool.
    pub fn uri(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Calls that reached the handlers so far.
    pub fn calls(&self) -> u64 {
        self.counters.calls.load(Ordering::Relaxed)
    }
}

#[cfg(unix)]
impl Drop for UnixTestServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
