//! `grpc.health.v1.Health` calls: endpoint checks (`Check`, `Watch`) and connection probes.

use std::time::Duration;

use tokio::time::Instant;

use grpc_pool_core::call::{EndpointChannel, MemberChannel};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What one check said about an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Serving,
    /// The server has no health service (`UNIMPLEMENTED`).
    Unimplemented,
    /// A failed check, with what went wrong (for logs and `Pool::state()`).
    Failed {
        result: &'static str,
        detail: String,
    },
}

impl Verdict {
    /// The `result` label of the checks metric.
    pub(crate) fn result(&self) -> &'static str {
        match self {
            Verdict::Serving => "serving",
            Verdict::Unimplemented => "unimplemented",
            Verdict::Failed { result, .. } => result,
        }
    }
}

fn from_status(status: i32) -> Verdict {
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Verdict::Serving,
        Ok(ServingStatus::NotServing) => {
            Verdict::Failed { result: "not_serving", detail: "NOT_SERVING".into() }
        }
        Ok(ServingStatus::ServiceUnknown) => {
            Verdict::Failed { result: "unknown", detail: "SERVICE_UNKNOWN".into() }
        }
        _ => Verdict::Failed { result: "unknown", detail: format!("status {status}") },
    }
}

fn from_error(status: tonic::Status) -> Verdict {
    match status.code() {
        Code::Unimplemented => Verdict::Unimplemented,
        // A server whose health service does not know the name answers NOT_FOUND.
        Code::NotFound => Verdict::Failed { result: "unknown", detail: "service unknown (NOT_FOUND)".into() },
        code => Verdict::Failed { result: "error", detail: format!("{code:?}: {}", status.message()) },
    }
}

/// One `Check` call to an endpoint, bounded by `timeout`; with its latency when answered.
pub(crate) async fn check(
    channel: EndpointChannel,
    service: String,
    timeout: Duration,
) -> (Verdict, Option<Duration>) {
    let started = Instant::now();
    let mut client = HealthClient::new(channel);
    match tokio::time::timeout(timeout, client.check(HealthCheckRequest { service })).await {
        Ok(Ok(response)) => (from_status(response.into_inner().status), Some(started.elapsed())),
        Ok(Err(status)) => (from_error(status), Some(started.elapsed())),
        Err(_) => {
            (Verdict::Failed { result: "timeout", detail: format!("no answer within {timeout:?}") }, None)
        }
    }
}

/// How a `Watch` stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchEnd {
    /// It ended or failed; its last report said why.
    Ended,
    /// The server answered `UNIMPLEMENTED` before any status: it has no `Watch` (a health
    /// service with `Check` only, or none at all). Nothing was reported: `Check` will tell.
    Unimplemented,
}

/// Follows `Watch` on an endpoint (through `channel`: the endpoint's channel, or one of its
/// members') and reports every status it sends, until the stream ends or fails (the last
/// report then says why).
pub(crate) async fn watch<C>(channel: C, service: String, mut report: impl FnMut(Verdict)) -> WatchEnd
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client = HealthClient::new(channel);
    let mut stream = match client.watch(HealthCheckRequest { service }).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::Unimplemented => return WatchEnd::Unimplemented,
        Err(status) => {
            report(from_error(status));
            return WatchEnd::Ended;
        }
    };
    let mut answered = false;
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                answered = true;
                report(from_status(response.status));
            }
            Ok(None) => {
                report(Verdict::Failed { result: "error", detail: "the Watch stream ended".into() });
                return WatchEnd::Ended;
            }
            // A server may send its headers before it finds the method missing.
            Err(status) if status.code() == Code::Unimplemented && !answered => {
                return WatchEnd::Unimplemented
            }
            Err(status) => {
                report(from_error(status));
                return WatchEnd::Ended;
            }
        }
    }
}

/// Probes one connection with a real stream (a `Check` call on that member): any answer,
/// even an error status, proves the connection alive. Servers that count PINGs on idle
/// connections as abuse accept this.
pub(crate) async fn probe(channel: MemberChannel, service: String) -> Result<Duration, String> {
    let started = Instant::now();
    let mut client = HealthClient::new(channel);
    match client.check(HealthCheckRequest { service }).await {
        Ok(_) => Ok(started.elapsed()),
        // UNAVAILABLE is what a failed connection turns into; any other status came from
        // the server (UNIMPLEMENTED, NOT_FOUND, ...) and proves it is there.
        Err(status) if status.code() == Code::Unavailable => Err(status.message().to_owned()),
        Err(_) => Ok(started.elapsed()),
    }
}
