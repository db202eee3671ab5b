//! grpc-pool's health task: keepalive PINGs, `grpc.health.v1` checks and the eviction policy.
//!
//! This crate depends on `grpc-pool-core` and never the other way round: the pool knows
//! nothing of gRPC health. Its task and configuration arrive with the health work; until
//! then it only re-exports the eviction reasons it will use.

pub use grpc_pool_core::EvictionReason;
