//! The connection pool behind [grpc-pool](https://docs.rs/grpc-pool): several HTTP/2
//! connections ("members") per endpoint, a checkout that spreads streams over them, and a
//! [`tower_service::Service`] that any tonic-generated client can send its calls through.
//!
//! **An implementation crate.** Depend on the facade crate `grpc-pool`: it is the only way
//! to build a pool with its health task (keepalive, health checks, eviction), and the only
//! API that is kept stable. A pool built here directly has none of that. What is public here
//! is public for `grpc-pool-health` and the facade.
//!
//! The layout follows bb8's: [`api`] holds the core's surface ([`Pool`], [`Builder`],
//! [`State`]), `inner` the logic, `internals` the locked data; the HTTP/2 protocol code lives
//! apart in `proto::h2`, and the request path (the `tower` service, its future and the
//! response body) in [`call`].
#![deny(missing_docs)]

pub mod api;
mod backoff;
mod balance;
mod budget;
pub mod call;
mod checkout;
pub(crate) mod circuit;
mod clock;
mod config;
mod connect;
#[cfg(feature = "serde")]
#[doc(hidden)]
pub mod de;
pub mod discover;
pub mod dns;
mod driver;
mod endpoint;
mod error;
mod events;
mod gauges;
mod inner;
mod internals;
mod member;
pub mod metrics;
pub mod monitor;
mod notify;
mod outlier;
mod proto;
mod routing;
mod service_config;
mod state;
mod stats;
mod subset;
mod sync;
mod wait_queue;

pub use api::{Builder, Pool};
pub use balance::Balance;
pub use call::{ResponseBody, ResponseFuture, WaitForReady};
#[doc(hidden)]
pub use config::check_duration;
pub use config::{AllUnhealthy, BackoffConfig, Config, H2Config, DEFAULT_POOL_NAME, POOL_USER_AGENT};
pub use endpoint::Endpoint;
pub use error::{Error, ErrorKind};
pub use events::{PoolEvent, PoolEvents, EVENT_BUFFER};
pub use member::{EvictionReason, MemberState};
pub use monitor::{MemberHandle, MemberStatus, MonitorEvent, MonitorEvents, PoolMonitor, SentPing};
pub use outlier::{FailurePercentageEjection, OutlierDetection, SuccessRateEjection};
pub use proto::connector::Connector;
pub use proto::tls::{ClientIdentity, TlsConfig};
pub use service_config::{
    HedgingPolicy, MethodConfig, MethodName, RetryPolicy, RetryThrottling, ServiceConfig, MAX_POLICY_ATTEMPTS,
};
pub use state::{EndpointState, MemberSnapshot, State, SubsetState};
pub use stats::{RetryReason, Statistics};
pub use subset::Subset;
/// The rustls this crate is built with, for [`TlsConfig::rustls`].
pub use tokio_rustls::rustls;

/// For the crate's benchmarks only: not part of the API, and may change in any release.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod __bench {
    /// Takes a stream slot the way a call does (endpoint and member selection, then the
    /// slot), and frees it again. False if no slot was free.
    pub fn checkout_and_release(pool: &crate::Pool) -> bool {
        pool.inner().checkout_now().is_some()
    }
}

/// For the fuzz targets (`fuzz/`) and their smoke test only: not part of the API, and may
/// change in any release.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod __fuzz {
    /// Feeds `bytes`, as a server would send them, to the frame observer twice: whole, and
    /// cut into pieces whose sizes `seed` picks. Panics if the two runs recorded different
    /// facts (stream limit, SETTINGS seen, GOAWAY, close reason): what a connection learns
    /// must not depend on how the kernel happened to split the bytes.
    pub fn frame_observer(bytes: &[u8], seed: u64) {
        crate::proto::h2::frames::check_chunking(bytes, seed);
    }
}
