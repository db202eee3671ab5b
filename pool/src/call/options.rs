//! Per-call options, set as request extensions.

/// Whether a call waits for a connection when no endpoint can take it now (gRPC's
/// `wait_for_ready`), overriding the pool's [`Config::wait_for_ready`](crate::Config::wait_for_ready)
/// for one call.
///
/// Off (the default, gRPC's too), a call fails at once with `UNAVAILABLE` and the real cause
/// when every endpoint is in transient failure: its last connect failed and it is backing off,
/// or it is unhealthy or ejected. On, the call waits for an endpoint to come back, until its
/// deadline (or `checkout_timeout` when it has none). Either way a call waits while a first
/// connection is still being made.
///
/// ```
/// use grpc_pool_core::WaitForReady;
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(WaitForReady(true));
/// // With tonic: `tonic::Request::extensions_mut()` reaches the same map.
/// assert_eq!(request.extensions().get::<WaitForReady>(), Some(&WaitForReady(true)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaitForReady(pub bool);
