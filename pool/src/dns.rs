//! Endpoints from DNS: a host name that resolves to N addresses becomes N endpoints, and the
//! set follows the answers as they change.
//!
//! [`DnsDiscover`] is a `tower::discover::Discover` stream, so it feeds
//! [`Pool::discover`](crate::Pool::discover) like any other source of endpoints. Resolution
//! goes through the [`Resolve`] trait: the system resolver by default, anything else (a
//! service registry, a test's script of answers) by implementing it.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::discover::Change;

use crate::endpoint::Endpoint;
use crate::error::Error;

/// The answer to one lookup.
pub type Resolving = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a host name into addresses.
///
/// ```
/// use std::net::SocketAddr;
/// use grpc_pool_core::dns::{Resolve, Resolving};
///
/// /// Always the same two addresses, whatever the name.
/// struct Fixed(Vec<SocketAddr>);
///
/// impl Resolve for Fixed {
///     fn resolve(&self, _host: &str, _port: u16) -> Resolving {
///         let addrs = self.0.clone();
///         Box::pin(async move { Ok(addrs) })
///     }
/// }
/// ```
pub trait Resolve: Send + Sync + 'static {
    /// The addresses `host` has now, with `port` (the endpoint URI's) unless the resolver
    /// knows better.
    fn resolve(&self, host: &str, port: u16) -> Resolving;
}

/// The operating system's resolver (`getaddrinfo`, through `tokio::net::lookup_host`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> Resolving {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// A `Discover` stream of the addresses a host name resolves to, looked up again every
/// `interval`: an address that appears is inserted as an endpoint of its own
/// ([`Endpoint::at`]: `https://name:port (address)`), one that disappears is removed. A
/// failed lookup, or one that returns no address, keeps the last good set and is logged: a
/// DNS hiccup must not empty a pool.
///
/// Requests to these endpoints carry the host name as `:authority`, and with `https://`, TLS
/// sends it as SNI and checks the server's certificate against it, as for the name itself.
///
/// ```no_run
/// use std::time::Duration;
/// use grpc_pool_core::dns::{DnsDiscover, SystemResolver};
/// # async fn run() -> Result<(), grpc_pool_core::Error> {
/// let pool = grpc_pool_core::Pool::builder().build_lazy(Vec::<String>::new())?;
/// let dns = DnsDiscover::new("http://orders.internal:50051", Duration::from_secs(30), SystemResolver)?;
/// pool.discover(dns);
/// # Ok(()) }
/// ```
pub struct DnsDiscover<R> {
    /// The endpoint as named; each address becomes `named.at(address)`.
    named: Endpoint,
    interval: Duration,
    resolver: Arc<R>,
    /// The last good answer.
    current: BTreeSet<SocketAddr>,
    /// Changes found by the last lookup, not yet yielded.
    pending: VecDeque<Change<SocketAddr, Endpoint>>,
    lookup: Option<Resolving>,
    /// When to look up again; `None` for at once. Made on first use, inside the runtime.
    next_lookup: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<R: Resolve> DnsDiscover<R> {
    /// Resolves `uri`'s host (`http://name:port`) now and every `interval` (1 ms to a day).
    pub fn new(uri: &str, interval: Duration, resolver: R) -> Result<DnsDiscover<R>, Error> {
        let endpoint = Endpoint::parse(uri)?;
        if endpoint.unix_path().is_some() {
            return Err(Error::config(
                "dns.uri",
                uri,
                "an http://host:port URI (a Unix socket has no DNS name)",
            ));
        }
        if interval < Duration::from_millis(1) || interval > Duration::from_secs(24 * 3600) {
            return Err(Error::config("dns.interval", &format!("{interval:?}"), "1ms to 86400s"));
        }
        Ok(DnsDiscover {
            named: endpoint,
            interval,
            resolver: Arc::new(resolver),
            current: BTreeSet::new(),
            pending: VecDeque::new(),
            lookup: None,
            next_lookup: None,
        })
    }

    /// Turns one lookup's answer into changes against the last good set.
    fn apply(&mut self, answer: io::Result<Vec<SocketAddr>>) {
        let addrs: BTreeSet<SocketAddr> = match answer {
            Ok(addrs) if !addrs.is_empty() => addrs.into_iter().collect(),
            Ok(_) => {
                tracing::warn!(host = %self.named.host(), kept = self.current.len(), "DNS lookup returned no address; keeping the last good set");
                return;
            }
            Err(error) => {
                tracing::warn!(host = %self.named.host(), kept = self.current.len(), error = %error, "DNS lookup failed; keeping the last good set");
                return;
            }
        };
        for gone in self.current.difference(&addrs) {
            self.pending.push_back(Change::Remove(*gone));
        }
        for new in addrs.difference(&self.current) {
            self.pending.push_back(Change::Insert(*new, self.named.at(*new)));
        }
        if !self.pending.is_empty() {
            tracing::info!(host = %self.named.host(), addresses = addrs.len(), changes = self.pending.len(), "DNS answer changed");
        }
        self.current = addrs;
    }
}

impl<R: Resolve> futures_core::Stream for DnsDiscover<R> {
    type Item = Result<Change<SocketAddr, Endpoint>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match this.lookup.as_mut() {
                Some(lookup) => {
                    let answer = std::task::ready!(lookup.as_mut().poll(cx));
                    this.lookup = None;
                    this.apply(answer);
                    let next = tokio::time::Instant::now() + this.interval;
                    match this.next_lookup.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(next),
                        None => this.next_lookup = Some(Box::pin(tokio::time::sleep_until(next))),
                    }
                }
                None => {
                    if let Some(sleep) = this.next_lookup.as_mut() {
                        std::task::ready!(sleep.as_mut().poll(cx));
                    }
                    this.lookup = Some(this.resolver.resolve(this.named.host(), this.named.port()));
                }
            }
        }
    }
}

impl<R> fmt::Debug for DnsDiscover<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscover")
            .field("named", &self.named)
            .field("interval", &self.interval)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers from a script, one per lookup; the last one repeats.
    struct Scripted(Mutex<VecDeque<io::Result<Vec<SocketAddr>>>>);

    impl Resolve for Scripted {
        fn resolve(&self, _host: &str, _port: u16) -> Resolving {
            let mut script = self.0.lock().unwrap();
            let answer = if script.len() > 1 { script.pop_front().unwrap() } else { clone(&script[0]) };
            Box::pin(async move { answer })
        }
    }

    fn clone(answer: &io::Result<Vec<SocketAddr>>) -> io::Result<Vec<SocketAddr>> {
        match answer {
            Ok(addrs) => Ok(addrs.clone()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 50051))
    }

    async fn next(dns: &mut DnsDiscover<Scripted>) -> Change<SocketAddr, Endpoint> {
        std::future::poll_fn(|cx| Pin::new(&mut *dns).poll_next(cx)).await.unwrap().unwrap()
    }

    use futures_core::Stream;

    #[tokio::test(start_paused = true)]
    async fn the_changes_follow_the_answers_and_failures_keep_the_set() {
        let script = VecDeque::from([
            Ok(vec![addr(1), addr(2)]),
            Err(io::Error::other("SERVFAIL")),
            Ok(vec![]),
            Ok(vec![addr(2), addr(3)]),
        ]);
        let mut dns = DnsDiscover::new(
            "http://orders.test:50051",
            Duration::from_secs(5),
            Scripted(Mutex::new(script)),
        )
        .unwrap();
        let mut first = [next(&mut dns).await, next(&mut dns).await];
        first.sort_by_key(|c| format!("{c:?}"));
        assert!(
            matches!(&first[0], Change::Insert(a, e) if *a == addr(1) && e.to_string() == "http://orders.test:50051 (10.0.0.1:50051)" && e.authority().as_str() == "orders.test:50051")
        );
        assert!(matches!(&first[1], Change::Insert(a, _) if *a == addr(2)));
        // The failure and the empty answer change nothing; the fourth lookup (15 s later on
        // the paused clock) swaps 1 for 3.
        let started = tokio::time::Instant::now();
        assert!(matches!(next(&mut dns).await, Change::Remove(a) if a == addr(1)));
        assert!(matches!(next(&mut dns).await, Change::Insert(a, _) if a == addr(3)));
        assert_eq!(started.elapsed(), Duration::from_secs(15));
        assert_eq!(dns.current, BTreeSet::from([addr(2), addr(3)]));
    }

    #[test]
    fn a_zero_interval_is_rejected_with_its_range() {
        let err = DnsDiscover::new("http://orders.test:50051", Duration::ZERO, SystemResolver).unwrap_err();
        assert!(err.to_string().contains("`dns.interval`"), "{err}");
        assert!(err.to_string().contains("1ms to 86400s"), "{err}");
    }
}
