//! grpc-pool's health task: keepalive PINGs, `grpc.health.v1` checks per endpoint, and the
//! eviction policy (idle timeout, jittered max lifetime, streams per connection), driven by
//! one timer queue per pool.
//!
//! This crate depends on `grpc-pool-core` and never the other way round: the pool knows
//! nothing of health. It watches the pool through a
//! [`PoolMonitor`](grpc_pool_core::PoolMonitor), and acts through member handles: PING,
//! drain, kill. The facade crate `grpc-pool` starts the task for every pool it builds.
#![deny(missing_docs)]

mod checks;
mod config;
mod task;

pub use config::{
    CheckMode, EvictionPolicy, HealthCheck, HealthConfig, Keepalive, DEFAULT_KEEPALIVE_TIME,
    DEFAULT_KEEPALIVE_TIMEOUT,
};
pub use grpc_pool_core::EvictionReason;
#[cfg(feature = "test-hooks")]
pub use task::__test;
pub use task::spawn;
