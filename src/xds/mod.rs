//! Endpoints from an xDS control plane (feature `xds`): the proxyless-gRPC client of gRFC
//! A27, as far as a pool needs it.
//!
//! A pool built for `xds:///name` ([`Builder::build_xds`](crate::Builder::build_xds), or
//! [`XdsDiscover`] handed to [`Pool::discover`]) holds one ADS stream (state of the world,
//! `envoy.service.discovery.v3.AggregatedDiscoveryService`) to the control plane of its
//! [`Bootstrap`], over a pool of its own. It asks for the listener `name`, and from its
//! answer for the route configuration (RDS, or inline), the cluster of the virtual host that
//! matches `name` (CDS), and that cluster's endpoints (EDS). The endpoints that take calls
//! (`health_status` `UNKNOWN` or `HEALTHY`, priority 0 and the next priorities while the
//! ones before are short of healthy endpoints) are the pool's endpoints: added, drained and
//! removed as with any discovery.
//!
//! Each accepted response is ACKed; one with a resource the pool cannot honour is NACKed
//! with an error detail naming the resource and the field, and every other resource in it
//! is still taken (gRFC A46); the refused one keeps its last good version. When the stream
//! breaks, the pool keeps its endpoints and the stream is made again with backoff (100 ms
//! doubling to 30 s), asking for the same resources with the versions it holds. A resource
//! no response has carried 15 s after it was asked for does not exist (A27's timer); so
//! does a listener or cluster that a response of its type leaves out. A target that
//! resolves to a resource that does not exist has no endpoints: its calls fail with the
//! pool's checkout error rather than go to a stale set.
//!
//! What is not supported is refused by NACK, never read past: see the guide's xDS page
//! (`docs/xds.md`) for the list.
//!
//! ```no_run
//! # async fn run() -> Result<(), grpc_pool::Error> {
//! // GRPC_XDS_BOOTSTRAP=/etc/grpc/bootstrap.json, as for grpc-go or grpc-java.
//! let pool = grpc_pool::Pool::builder().name("echo").build_xds("xds:///echo.prod:50051")?;
//! // let mut client = EchoClient::new(pool.clone());
//! # Ok(()) }
//! ```

mod bootstrap;
mod client;
mod resources;

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub use bootstrap::Bootstrap;
use grpc_pool_core::discover::{Change, Weighted};
use tokio::sync::mpsc;

use crate::reconnect::Backoff;
use crate::{Error, Pool};
use client::{AdsClient, AdsState, SharedStatus};

/// A `tower::discover::Discover` stream of the endpoints an xDS control plane gives a
/// target, for [`Pool::discover`], which also hands it the pool for the cluster's policy
/// (its circuit breaker; its outlier detection, if the pool was built with outlier
/// detection, [`OutlierDetection::off`](crate::OutlierDetection::off) will do) and for the
/// priorities' failover on the endpoints the pool finds failing. The ADS stream starts on
/// the first poll (inside the runtime) and stops when this is dropped (the pool closed).
/// [`XdsDiscover::status`] shows what it holds.
///
/// ```no_run
/// use grpc_pool::xds::{Bootstrap, XdsDiscover};
/// # async fn run() -> Result<(), grpc_pool::Error> {
/// let bootstrap = Bootstrap::from_file("/etc/grpc/bootstrap.json")?;
/// let discover = XdsDiscover::new(&bootstrap, "xds:///echo.prod:50051")?;
/// let status = discover.status();
/// let pool = grpc_pool::Pool::builder().name("echo").build_lazy(Vec::<String>::new())?;
/// pool.discover(discover);
/// // Later: what the control plane said.
/// println!("{:?} from {} resources", status.endpoints(), status.resources().len());
/// # Ok(()) }
/// ```
pub struct XdsDiscover {
    client: Option<AdsClient>,
    changes: mpsc::Receiver<Change<String, Weighted>>,
    status: XdsStatus,
}

/// Numbers the control-plane pools (`xds`, `xds-2`, ...): pool names are unique.
static CLIENTS: AtomicUsize = AtomicUsize::new(0);

impl XdsDiscover {
    /// Follows `target` (`xds:///name`; the listener `name`) at the control plane of
    /// `bootstrap`. Must be called inside a Tokio runtime (the control plane's pool is made
    /// here, and connects in the background). Fails if the target is not an `xds:` URI with
    /// a name and no authority.
    pub fn new(bootstrap: &Bootstrap, target: &str) -> Result<XdsDiscover, Error> {
        let name = listener_name(target)?;
        let pool = control_plane_pool(bootstrap)?;
        let (tx, changes) = mpsc::channel(1024);
        let status = XdsStatus { target: name.clone(), inner: Arc::default() };
        let client = AdsClient {
            pool,
            node: bootstrap.node().clone(),
            state: AdsState::new(&name),
            changes: tx,
            status: status.clone(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            policy: None,
            applied: None,
            parsed: Default::default(),
            on_stream: false,
        };
        Ok(XdsDiscover { client: Some(client), changes, status })
    }

    pub(crate) fn set_policy(&mut self, monitor: grpc_pool_core::PoolMonitor) {
        if let Some(client) = &mut self.client {
            client.policy = Some(monitor);
        }
    }

    /// A handle on what the stream holds, kept after this is given to the pool.
    pub fn status(&self) -> XdsStatus {
        self.status.clone()
    }
}

impl fmt::Debug for XdsDiscover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdsDiscover").field("target", &self.status.target).finish_non_exhaustive()
    }
}

impl futures_core::Stream for XdsDiscover {
    type Item = Result<Change<String, Weighted>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(client) = self.client.take() {
            tokio::spawn(client.run());
        }
        self.changes.poll_recv(cx).map(|change| change.map(Ok))
    }
}

/// The listener name of an `xds:` target: `xds:///name` or `xds:name`.
fn listener_name(target: &str) -> Result<String, Error> {
    let allowed = "`xds:///name` (a listener name; no authority)";
    let name = match target.strip_prefix("xds://") {
        Some(rest) => match rest.strip_prefix('/') {
            Some(name) => name,
            None => {
                return Err(Error::invalid_config(
                    "xds.target",
                    &format!("\"{target}\" (an authority: xDS federation is not supported)"),
                    allowed,
                ))
            }
        },
        None => target.strip_prefix("xds:").unwrap_or(""),
    };
    if name.is_empty() {
        return Err(Error::invalid_config("xds.target", &format!("\"{target}\""), allowed));
    }
    Ok(name.to_owned())
}

/// The pool that carries the ADS stream: one connection is enough.
fn control_plane_pool(bootstrap: &Bootstrap) -> Result<Pool, Error> {
    crate::reconnect::registry_pool("xds", &CLIENTS, |mut builder| {
        if let Some(tls) = bootstrap.tls() {
            builder = builder.tls(tls.clone());
        }
        builder
            .max_connections(1)
            .connect_timeout(Duration::from_secs(5))
            .build_lazy([bootstrap.server_uri()])
    })
}

/// What an [`XdsDiscover`] holds: the endpoints it gave the pool, each resource and its
/// state, and the stream's health. A cheap handle; clones see the same.
#[derive(Clone)]
pub struct XdsStatus {
    target: String,
    inner: SharedStatus,
}

#[derive(Debug, Default)]
pub(crate) struct StatusInner {
    pub(crate) connected: bool,
    pub(crate) endpoints: Vec<String>,
    pub(crate) weights: Vec<(String, u32)>,
    pub(crate) broken: Option<String>,
    pub(crate) max_requests: Option<u32>,
    pub(crate) outlier_detection: Option<crate::OutlierDetection>,
    pub(crate) resources: Vec<XdsResource>,
    pub(crate) acks: u64,
    pub(crate) nacks: u64,
    pub(crate) updates: u64,
    pub(crate) last_nack: Option<String>,
    pub(crate) last_error: Option<String>,
}

/// One resource an [`XdsDiscover`] asked for, as [`XdsStatus::resources`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct XdsResource {
    /// `lds`, `rds`, `cds` or `eds`.
    pub kind: &'static str,
    /// The resource's name.
    pub name: String,
    /// `requested` (asked for, not received), `acked`, `nacked` (its last version refused;
    /// the one before, if any, is kept), or `does_not_exist`.
    pub state: &'static str,
    /// Why its last version was refused, naming the field.
    pub error: Option<String>,
    /// The version of its type last accepted, while the pool holds a version of it.
    pub version: String,
}

impl XdsStatus {
    pub(crate) fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn read<T>(&self, f: impl FnOnce(&StatusInner) -> T) -> T {
        f(&self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The target's listener name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The endpoints (`host:port`) given to the pool, sorted.
    pub fn endpoints(&self) -> Vec<String> {
        self.read(|s| s.endpoints.clone())
    }

    /// The endpoints given to the pool with their weights: each one's share of the calls in
    /// millionths, from its priority's share, its locality's weight and its own.
    pub fn weights(&self) -> Vec<(String, u32)> {
        self.read(|s| s.weights.clone())
    }

    /// The cap on calls in flight the target's cluster sets (`circuit_breakers`
    /// max_requests) and the pool applies, if any.
    pub fn max_requests(&self) -> Option<u32> {
        self.read(|s| s.max_requests)
    }

    /// The outlier detection the target's cluster sets (as gRFC A50 reads it) and the pool
    /// applies in place of its own, if any.
    pub fn outlier_detection(&self) -> Option<crate::OutlierDetection> {
        self.read(|s| s.outlier_detection.clone())
    }

    /// Why the target resolves to no endpoint (a resource that does not exist, no virtual
    /// host for the name), while it does.
    pub fn broken(&self) -> Option<String> {
        self.read(|s| s.broken.clone())
    }

    /// Every resource asked for, by type then name.
    pub fn resources(&self) -> Vec<XdsResource> {
        self.read(|s| s.resources.clone())
    }

    /// Whether the ADS stream is up.
    pub fn connected(&self) -> bool {
        self.read(|s| s.connected)
    }

    /// Responses ACKed and NACKed since the start.
    pub fn responses(&self) -> (u64, u64) {
        self.read(|s| (s.acks, s.nacks))
    }

    /// The last NACK's error detail, with the type and version it refused.
    pub fn last_nack(&self) -> Option<String> {
        self.read(|s| s.last_nack.clone())
    }

    /// Why the last ADS stream broke or could not start, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.read(|s| s.last_error.clone())
    }

    /// Endpoint set changes given to the pool since the start.
    pub fn updates(&self) -> u64 {
        self.read(|s| s.updates)
    }
}

impl fmt::Debug for XdsStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.read(|s| {
            f.debug_struct("XdsStatus")
                .field("target", &self.target)
                .field("connected", &s.connected)
                .field("endpoints", &s.endpoints)
                .field("resources", &s.resources)
                .finish_non_exhaustive()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_names_a_listener() {
        assert_eq!(listener_name("xds:///echo.prod:50051").unwrap(), "echo.prod:50051");
        assert_eq!(listener_name("xds:echo").unwrap(), "echo");
        for bad in ["xds:///", "xds://authority/echo", "dns:///echo", "echo"] {
            let err = listener_name(bad).unwrap_err().to_string();
            assert!(err.contains("`xds.target`"), "{bad}: {err}");
        }
    }
}
