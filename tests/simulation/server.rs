//! The simulated servers: tonic echo servers (with grpc.health.v1) on turmoil listeners,
//! whose handlers write every call they run into the run's ledger, and whose faults the
//! driver flips from outside the simulation (a `watch` or an atomic, read on the server's
//! own runtime at its next tick).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use grpc_pool_testkit::echo::echo_server::{Echo, EchoServer};
use grpc_pool_testkit::echo::{EchoRequest, EchoResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;

use super::trace::Journal;

/// The port every simulated server listens on.
pub const PORT: u16 = 50051;

/// The metadata key carrying the workload's call id, for the server-side ledger.
pub const CALL_ID: &str = "x-sim-call-id";

/// One server's switches, kept across its crashes and restarts.
pub struct ServerCtl {
    /// `server-3`: its turmoil host name.
    pub name: String,
    /// While set, every call ends with `UNAVAILABLE` (after its delay).
    pub unavailable: AtomicBool,
    /// With `unavailable`: the `grpc-retry-pushback-ms` to send along (0: none).
    pub pushback_ms: AtomicU64,
    /// Added to every handler's delay (a slow server).
    pub extra_delay_ms: AtomicU32,
    /// Its grpc.health.v1 status for `""` and `echo.Echo`.
    pub serving: watch::Sender<bool>,
    /// Bumped to shut the server down gracefully (GOAWAY, calls in flight finish).
    pub shutdown: watch::Sender<u64>,
    /// Its accepted connections, closed in order before a crash.
    pub connections: Arc<super::net::Connections>,
}

impl ServerCtl {
    pub fn new(name: String) -> Arc<ServerCtl> {
        Arc::new(ServerCtl {
            name,
            unavailable: AtomicBool::new(false),
            pushback_ms: AtomicU64::new(0),
            extra_delay_ms: AtomicU32::new(0),
            serving: watch::channel(true).0,
            shutdown: watch::channel(0).0,
            connections: Arc::default(),
        })
    }
}

/// The host's software: binds, serves until told to shut down, then returns. Run again by
/// `Sim::bounce` after a crash or shutdown.
pub async fn serve(ctl: Arc<ServerCtl>, journal: Journal) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut serving = ctl.serving.subscribe();
    let status = |on: bool| if on { ServingStatus::Serving } else { ServingStatus::NotServing };
    let now = *serving.borrow_and_update();
    reporter.set_service_status("", status(now)).await;
    reporter.set_service_status("echo.Echo", status(now)).await;
    tokio::spawn(async move {
        while serving.changed().await.is_ok() {
            let now = *serving.borrow_and_update();
            reporter.set_service_status("", status(now)).await;
            reporter.set_service_status("echo.Echo", status(now)).await;
        }
    });
    let mut shutdown = ctl.shutdown.subscribe();
    shutdown.borrow_and_update();
    let echo = SimEcho { ctl: ctl.clone(), journal };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(EchoServer::new(echo))
        .serve_with_incoming_shutdown(super::net::incoming(listener, ctl.connections.clone()), async move {
            let _ = shutdown.changed().await;
            // Half a tick later, when no segment can arrive (the network delivers at the
            // tick's start): tonic's server `select!`s between the shutdown and its
            // connections, in an order drawn from tokio's unseeded generator, so the two
            // must never be ready together.
            tokio::time::sleep(super::plan::TICK / 2).await;
        })
        .await?;
    Ok(())
}

/// The echo service as the simulation runs it.
#[derive(Clone)]
struct SimEcho {
    ctl: Arc<ServerCtl>,
    journal: Journal,
}

type Messages = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

impl SimEcho {
    /// Writes the call into the ledger and the trace; returns the extra delay to add.
    fn handled<T>(&self, request: &Request<T>, method: &str) -> u32 {
        let metadata = request.metadata();
        let id = metadata
            .get(CALL_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        let attempt = metadata
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u32);
        self.journal.handled(id, &self.ctl.name, attempt, method);
        self.ctl.extra_delay_ms.load(Ordering::Relaxed)
    }

    fn failure(&self) -> Option<Status> {
        if !self.ctl.unavailable.load(Ordering::Relaxed) {
            return None;
        }
        let mut status = Status::unavailable(format!("{} is unavailable (simulated)", self.ctl.name));
        let pushback = self.ctl.pushback_ms.load(Ordering::Relaxed);
        if pushback > 0 {
            status
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", pushback.to_string().parse().expect("digits"));
        }
        Some(status)
    }
}

async fn pause(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms.into())).await;
    }
}

#[tonic::async_trait]
impl Echo for SimEcho {
    async fn unary_echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let extra = self.handled(&request, "unary");
        let request = request.into_inner();
        pause(request.delay_ms.saturating_add(extra)).await;
        if let Some(status) = self.failure() {
            return Err(status);
        }
        Ok(Response::new(EchoResponse { message: request.message }))
    }

    type ServerStreamingEchoStream = Messages;

    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamingEchoStream>, Status> {
        let extra = self.handled(&request, "stream");
        let request = request.into_inner();
        pause(extra).await;
        if let Some(status) = self.failure() {
            return Err(status);
        }
        let (message, ms) = (request.message, request.delay_ms);
        let messages = futures_util::stream::iter(0..request.repeat.max(1)).then(move |_| {
            let message = message.clone();
            async move {
                pause(ms).await;
                Ok(EchoResponse { message })
            }
        });
        Ok(Response::new(Box::pin(messages)))
    }

    async fn client_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.handled(&request, "client-stream");
        Err(Status::unimplemented("not simulated"))
    }

    type BidirectionalStreamingEchoStream = Messages;

    async fn bidirectional_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidirectionalStreamingEchoStream>, Status> {
        self.handled(&request, "bidi");
        Err(Status::unimplemented("not simulated"))
    }
}
