//! Endpoints: their addresses (where a pool's members connect, and what their requests say
//! in `:scheme` and `:authority`), and what the members of one endpoint share.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::Uri;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::outlier::Outliers;
use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// One server address of a pool, parsed from an `http://host:port` URI, or, for a server on
/// this machine (a sidecar), a Unix domain socket: `unix:///absolute/path` (or
/// `unix:/absolute/path`).
///
/// Without a port, the scheme's: 443 for `https`, 80 for `http` (as tonic's `Endpoint` and
/// the `http` crate take it); `:authority` stays as written. Requests over a Unix socket
/// carry `:authority` `localhost`, as gRPC's own clients send.
///
/// ```
/// use grpc_pool_core::Endpoint;
/// let endpoint: Endpoint = "http://127.0.0.1:50051".parse().unwrap();
/// assert_eq!(endpoint.port(), 50051);
/// assert_eq!("https://api.example.com".parse::<Endpoint>().unwrap().port(), 443);
/// # #[cfg(unix)] {
/// let sidecar: Endpoint = "unix:///run/envoy/grpc.sock".parse().unwrap();
/// assert_eq!(sidecar.unix_path(), Some(std::path::Path::new("/run/envoy/grpc.sock")));
/// assert_eq!(sidecar.authority().as_str(), "localhost");
/// # }
/// ```
///
/// Cloning is cheap (a reference count): endpoints label every member, event and metric.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Endpoint(Arc<Parts>);

#[derive(PartialEq, Eq, Hash)]
struct Parts {
    scheme: Scheme,
    authority: Authority,
    /// For TCP; `localhost` and 0 for a Unix socket.
    host: String,
    port: u16,
    /// Set for a Unix-socket endpoint.
    unix_path: Option<PathBuf>,
    /// The address to connect to, when it was resolved apart from `host` (DNS discovery);
    /// `None` to resolve `host` at each connect.
    address: Option<SocketAddr>,
    /// The URI as given, for labels: a Unix path is not in `authority`.
    label: String,
}

impl Endpoint {
    /// Parses `http://host:port`, `https://host:port` (TLS) or `unix:///path`.
    pub fn parse(uri: &str) -> Result<Endpoint, Error> {
        if let Some(rest) = uri.strip_prefix("unix:") {
            return Endpoint::parse_unix(uri, rest);
        }
        let parsed: Uri = uri
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::invalid_endpoint(uri, &format!("not a URI ({e})")))?;
        let scheme = match parsed.scheme() {
            Some(s) if *s == Scheme::HTTP => Scheme::HTTP,
            Some(s) if *s == Scheme::HTTPS => Scheme::HTTPS,
            Some(s) => {
                return Err(Error::invalid_endpoint(
                    uri,
                    &format!("unsupported scheme `{s}` (`http`, `https` or `unix`)"),
                ))
            }
            None => return Err(Error::invalid_endpoint(uri, "no scheme")),
        };
        let authority = parsed.authority().cloned().ok_or_else(|| Error::invalid_endpoint(uri, "no host"))?;
        if authority.as_str().contains('@') {
            return Err(Error::invalid_endpoint(uri, "user information is not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(Error::invalid_endpoint(uri, "no host"));
        }
        let port = match authority.port_u16() {
            Some(port) => port,
            None if scheme == Scheme::HTTPS => 443,
            None => 80,
        };
        if port == 0 {
            return Err(Error::invalid_endpoint(uri, "port 0"));
        }
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err(Error::invalid_endpoint(uri, "a path or query is not allowed"));
        }
        // `[::1]` in a URI is `::1` to the resolver.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let label = format!("{scheme}://{authority}");
        Ok(Endpoint(Arc::new(Parts { scheme, authority, host, port, unix_path: None, address: None, label })))
    }

    /// `unix:///absolute/path` or `unix:/absolute/path` (gRPC's naming), `rest` being what
    /// follows `unix:`.
    fn parse_unix(uri: &str, rest: &str) -> Result<Endpoint, Error> {
        if !cfg!(unix) {
            return Err(Error::invalid_endpoint(
                uri,
                "Unix domain sockets are not supported on this platform",
            ));
        }
        // `unix://` must be followed by an empty authority and an absolute path.
        let path = match rest.strip_prefix("//") {
            Some(after) if after.starts_with('/') => after,
            Some(_) => {
                return Err(Error::invalid_endpoint(
                    uri,
                    "a Unix socket URI names an absolute path: unix:///path/to.sock",
                ))
            }
            None => rest,
        };
        if !path.starts_with('/') {
            return Err(Error::invalid_endpoint(
                uri,
                "the Unix socket path must be absolute (unix:///path/to.sock)",
            ));
        }
        if path.len() < 2 || path.ends_with('/') {
            return Err(Error::invalid_endpoint(uri, "no socket file in the path"));
        }
        if path.contains(['?', '#']) {
            return Err(Error::invalid_endpoint(uri, "a query or fragment is not allowed"));
        }
        Ok(Endpoint(Arc::new(Parts {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("localhost"),
            host: "localhost".to_owned(),
            port: 0,
            unix_path: Some(PathBuf::from(path)),
            address: None,
            label: format!("unix://{path}"),
        })))
    }

    /// This endpoint's host, reached at `address`, one the caller resolved it to: requests
    /// still carry the host name as `:authority` and TLS still checks the certificate
    /// against it (and sends it as SNI), but connections go to `address`. Each address is an
    /// endpoint of its own, labelled `scheme://host:port (address)`. A Unix-socket endpoint
    /// is returned as it is.
    ///
    /// ```
    /// use grpc_pool_core::Endpoint;
    /// let named: Endpoint = "https://orders.internal:50051".parse().unwrap();
    /// let one = named.at("10.0.0.7:50051".parse().unwrap());
    /// assert_eq!(one.authority().as_str(), "orders.internal:50051");
    /// assert_eq!(one.address(), Some("10.0.0.7:50051".parse().unwrap()));
    /// assert_eq!(one.to_string(), "https://orders.internal:50051 (10.0.0.7:50051)");
    /// assert!(one.is_tls());
    /// ```
    pub fn at(&self, address: SocketAddr) -> Endpoint {
        if self.0.unix_path.is_some() {
            return self.clone();
        }
        let p = &self.0;
        Endpoint(Arc::new(Parts {
            scheme: p.scheme.clone(),
            authority: p.authority.clone(),
            host: p.host.clone(),
            port: address.port(),
            unix_path: None,
            address: Some(address),
            label: format!("{}://{} ({address})", p.scheme, p.authority),
        }))
    }

    /// The resolved address connections go to, for an endpoint made by [`Endpoint::at`].
    pub fn address(&self) -> Option<SocketAddr> {
        self.0.address
    }

    /// Whether connections to it use TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.0.scheme == Scheme::HTTPS
    }

    /// The socket file of a Unix-socket endpoint; `None` for TCP.
    pub fn unix_path(&self) -> Option<&Path> {
        self.0.unix_path.as_deref()
    }

    /// The host name or address, without brackets (`localhost` for a Unix socket).
    pub fn host(&self) -> &str {
        &self.0.host
    }

    /// The TCP port (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// The `:authority` requests to this endpoint carry (`host:port`).
    pub fn authority(&self) -> &Authority {
        &self.0.authority
    }

    /// The `:scheme` requests to this endpoint carry.
    pub fn scheme(&self) -> &Scheme {
        &self.0.scheme
    }
}

impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(s)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.label)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the members of one endpoint share: its address, its load, whether it takes new
/// streams, and its outlier count. Members point here; the pool's endpoint entry
/// (`internals::EndpointEntry`) holds it beside the member list, so nothing here points back up.
#[derive(Debug)]
pub(crate) struct EndpointShared {
    pub(crate) endpoint: Endpoint,
    /// `endpoint` as text, for errors, logs and metric labels.
    pub(crate) label: String,
    /// Streams in flight over all members, for choosing between endpoints.
    pub(crate) in_flight: AtomicUsize,
    /// Whether new streams may go here: healthy, or every endpoint unhealthy and the pool
    /// routing to all of them then, and not removed. Kept by the pool; read on every checkout.
    pub(crate) routable: AtomicBool,
    /// Members listed now (the length of the entry's member list), kept beside `in_flight`
    /// and `routable` so that weighing an endpoint reads one cache line, not the list: in a
    /// pool of thousands of endpoints each weighed endpoint is a cache miss.
    pub(crate) listed: AtomicUsize,
    /// Outlier detection, when the pool has it: calls report how they ended here.
    outliers: Option<OutlierReports>,
    /// Calls that failed in a row, for outlier detection.
    pub(crate) failures_in_a_row: AtomicU32,
    /// Whether a request to eject this endpoint is on its way to the pool: one at a time, so
    /// a burst of failures past the threshold sends one, not one per failure.
    pub(crate) ejection_asked: AtomicBool,
    /// Connections open now (their driver tasks running), listed or draining.
    pub(crate) open_connections: AtomicUsize,
    /// Time to the response head, for the latency-aware choice between endpoints (kept only
    /// when the pool balances so).
    pub(crate) latency: crate::balance::LatencyEstimate,
    /// Its weight in the choice between endpoints (1 unless set: `Pool::set_endpoint_weight`,
    /// a `Weighted` discovery, a control plane); read into the pool's `Weights` when the
    /// list or a weight changes, not on every checkout.
    pub(crate) weight: AtomicU32,
    /// Calls ended here since the outlier sweep last looked, while its interval algorithms
    /// are on.
    pub(crate) calls: crate::outlier::CallCounter,
    /// The pool's cap on calls in flight, counted by the slots taken here.
    pub(crate) requests: Arc<crate::circuit::RequestLimit>,
}

/// Outlier detection's settings, and where its decision goes: the pool's ejector task
/// (`PoolInner::spawn_ejector`), which ejects under the pool's lock what a call asked for.
/// A message rather than a call into the pool, so that a call's body needs no pool handle.
#[derive(Debug, Clone)]
pub(crate) struct OutlierReports {
    pub(crate) outliers: Arc<Outliers>,
    pub(crate) ejections: mpsc::UnboundedSender<EjectionRequest>,
}

/// An endpoint whose calls failed `failures` times in a row.
pub(crate) type EjectionRequest = (Arc<EndpointShared>, u32);

impl EndpointShared {
    pub(crate) fn new(
        endpoint: Endpoint,
        outliers: Option<OutlierReports>,
        requests: Arc<crate::circuit::RequestLimit>,
    ) -> EndpointShared {
        EndpointShared {
            label: endpoint.to_string(),
            endpoint,
            in_flight: AtomicUsize::new(0),
            routable: AtomicBool::new(true),
            listed: AtomicUsize::new(0),
            outliers,
            failures_in_a_row: AtomicU32::new(0),
            ejection_asked: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            latency: crate::balance::LatencyEstimate::new(),
            weight: AtomicU32::new(1),
            calls: crate::outlier::CallCounter::default(),
            requests,
        }
    }

    /// Counts how a call on this endpoint ended, for outlier detection: `failed` says
    /// whether it failed, or `None` if the end says nothing either way (only called when the
    /// pool has outlier detection, so calls without it do not pay for reading their status).
    /// Returns the failures in a row when they reach the threshold: the caller then ejects the
    /// endpoint (`PoolInner::eject_shared`), or, without a pool at hand, asks the pool to
    /// (`ask_ejection`).
    #[must_use = "a count at the threshold means: eject the endpoint"]
    pub(crate) fn record_outcome(&self, failed: impl FnOnce() -> Option<bool>) -> Option<u32> {
        let reports = self.outliers.as_ref()?;
        reports.outliers.count(&self.failures_in_a_row, &self.calls, failed()?)
    }

    /// Sends an ejection decision to the pool's ejector task, for a response body, which has
    /// no pool handle; one request at a time per endpoint.
    pub(crate) fn ask_ejection(self: &Arc<Self>, failures: u32) {
        let Some(reports) = &self.outliers else { return };
        if !self.ejection_asked.swap(true, Ordering::AcqRel)
            && reports.ejections.send((self.clone(), failures)).is_err()
        {
            // The pool is gone; nobody will answer.
            self.ejection_asked.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn parses_unix_socket_paths_in_both_spellings() {
        for uri in ["unix:///tmp/grpc.sock", "unix:/tmp/grpc.sock"] {
            let e = Endpoint::parse(uri).unwrap();
            assert_eq!(e.unix_path(), Some(Path::new("/tmp/grpc.sock")), "{uri}");
            assert_eq!(e.authority().as_str(), "localhost");
            assert_eq!(e.to_string(), "unix:///tmp/grpc.sock");
        }
        // Labels round-trip: a label can be given back to `Pool::remove_endpoint`.
        let e = Endpoint::parse("unix:///tmp/grpc.sock").unwrap();
        assert_eq!(Endpoint::parse(&e.to_string()).unwrap(), e);
    }

    #[test]
    fn parses_hosts_and_addresses() {
        let e = Endpoint::parse("http://localhost:8080").unwrap();
        assert_eq!((e.host(), e.port()), ("localhost", 8080));
        assert_eq!(e.to_string(), "http://localhost:8080");
        let e = Endpoint::parse("https://grpc.example.com:443").unwrap();
        assert!(e.is_tls());
        assert_eq!(e.scheme(), &Scheme::HTTPS);
        // No port: the scheme's; `:authority` as written.
        let e = Endpoint::parse("https://api.example.com").unwrap();
        assert_eq!((e.host(), e.port(), e.authority().as_str()), ("api.example.com", 443, "api.example.com"));
        assert_eq!(Endpoint::parse("http://10.0.0.7").unwrap().port(), 80);
        let e = Endpoint::parse("http://[::1]:50051/").unwrap();
        assert_eq!((e.host(), e.port()), ("::1", 50051));
        assert_eq!(e.authority().as_str(), "[::1]:50051");
    }

    #[test]
    fn rejects_what_it_cannot_connect_to() {
        for (uri, problem) in [
            ("127.0.0.1:80", "no scheme"),
            ("ftp://127.0.0.1:21", "unsupported scheme `ftp`"),
            ("http://:80", "no host"),
            ("http://127.0.0.1:0", "port 0"),
            ("http://127.0.0.1:80/api", "path"),
            ("http://u@127.0.0.1:80", "user information"),
            ("not a uri", "not a URI"),
            ("unix:relative.sock", "must be absolute"),
            ("unix://host/tmp/a.sock", "absolute path"),
            ("unix:///", "no socket file"),
            ("unix:///tmp/", "no socket file"),
            ("unix:///tmp/a.sock?x=1", "query"),
        ] {
            let message = Endpoint::parse(uri).unwrap_err().to_string();
            assert!(message.contains(problem), "{uri}: {message}");
            assert!(message.contains(uri), "{uri}: {message}");
        }
    }
}
