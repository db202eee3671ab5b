//! # grpc-pool
//!
//! A pool of HTTP/2 connections for gRPC clients: several connections per endpoint, spread
//! over several endpoints, checked out per call through a `tower::Service` that any
//! tonic-generated client can wrap.
//!
//! ```no_run
//! # async fn run() -> Result<(), grpc_pool::Error> {
//! let pool = grpc_pool::Pool::builder()
//!     .name("echo")
//!     .max_connections(4)
//!     .build(["http://127.0.0.1:50051", "http://127.0.0.1:50052"])
//!     .await?;
//! // let mut client = EchoClient::new(pool.clone());
//! // let reply = client.unary_echo(request).await?;
//! # Ok(()) }
//! ```
//!
//! See the README for the architecture, and [`grpc_pool_core`] for the pool itself.
#![warn(missing_docs)]

pub use grpc_pool_core::{
    api, call, metrics, BackoffConfig, Builder, Endpoint, EndpointState, Error, ErrorKind, EvictionReason,
    H2Config, MemberSnapshot, MemberState, Pool, ResponseBody, ResponseFuture, State, Statistics,
};
pub use grpc_pool_health as health;
