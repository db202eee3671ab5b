//! The public surface: [`Pool`], its [`Builder`], and the [`State`] snapshot.

use std::fmt;
use std::sync::Arc;

use crate::config::Config;
use crate::discover::MAX_WEIGHT;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::inner::PoolInner;
use crate::metrics::PoolName;
use crate::state::State;

/// A pool of HTTP/2 connections to the endpoints of one gRPC service.
///
/// `Pool` is a cheap handle (an `Arc` inside): clone it into every client. It implements
/// `tower::Service<http::Request<B>>`, so a tonic-generated client works on it directly:
/// `EchoClient::new(pool.clone())`. Each call takes a stream slot on the least loaded ready
/// connection (power of two choices between endpoints), opens more connections when all are
/// saturated, and waits at most `checkout_timeout` for room.
///
/// Dropping the last handle closes the pool: connections drain their in-flight streams and
/// close, and every background task ends. [`Pool::close`] does the same and waits for it.
///
/// ```no_run
/// # async fn run() -> Result<(), grpc_pool_core::Error> {
/// use std::time::Duration;
/// let config = grpc_pool_core::Config {
///     name: "orders".into(),
///     max_connections: 4,
///     checkout_timeout: Duration::from_secs(2),
///     ..Default::default()
/// };
/// let pool = grpc_pool_core::Builder::from_config(config)
///     .build(["http://10.0.0.7:50051", "http://10.0.0.8:50051"])
///     .await?;
/// println!("{:?}", pool.state().statistics);
/// pool.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    handle: Arc<Handle>,
}

/// The user-held part: when the last one drops, the pool shuts down, even though in-flight
/// calls and background tasks still hold `PoolInner`.
struct Handle {
    inner: Arc<PoolInner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Pool {
    /// A builder with the defaults: `min_connections` 1, `max_connections` 8 (both per
    /// endpoint), 100 streams per connection, 5 s checkout timeout, 10 s connect timeout, and
    /// gRPC's reconnect backoff.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) fn inner(&self) -> &Arc<PoolInner> {
        &self.handle.inner
    }

    /// The pool's name, as in logs and metric labels.
    pub fn name(&self) -> &str {
        self.inner().name()
    }

    /// Stops taking new calls, lets the calls in flight finish, and returns when every
    /// connection has closed. Calls that start afterwards fail with
    /// [`ErrorKind::PoolClosed`](crate::ErrorKind::PoolClosed). A call whose stream never
    /// ends keeps `close` waiting: bound it with `tokio::time::timeout` if that can happen.
    pub async fn close(&self) {
        self.inner().close();
        self.inner().live.wait().await;
    }

    /// The pool's events from now on: connections opened and closed, endpoints added,
    /// removed, unhealthy, ejected, GOAWAYs. Bounded per subscriber (see
    /// [`PoolEvents`](crate::PoolEvents)); the pool never waits for a subscriber.
    pub fn events(&self) -> crate::events::PoolEvents {
        self.inner().events()
    }

    /// Adds an endpoint at run time; it opens its `min_connections` and takes calls as soon as
    /// a connection is ready. Returns `Ok(false)` if the pool has it already, and an error
    /// if `uri` is not a valid endpoint. With subsetting (`Config::subset`) the endpoint is
    /// known, and live only if it is one of the subset (then it may push another out).
    ///
    /// ```no_run
    /// # async fn run(pool: grpc_pool_core::Pool) -> Result<(), grpc_pool_core::Error> {
    /// pool.add_endpoint("http://10.0.0.9:50051")?;
    /// pool.remove_endpoint("http://10.0.0.7:50051")?;
    /// # Ok(()) }
    /// ```
    pub fn add_endpoint(&self, uri: &str) -> Result<bool, Error> {
        let endpoint = Endpoint::parse(uri)?;
        Ok(self.inner().add_known(endpoint))
    }

    /// Removes an endpoint at run time: it takes no new calls and opens no connections; the
    /// calls in flight on it finish, then its connections close. Returns `Ok(false)` if the
    /// pool does not have it. With subsetting, if it was live, the next endpoint in the
    /// order takes its place.
    pub fn remove_endpoint(&self, uri: &str) -> Result<bool, Error> {
        let endpoint = Endpoint::parse(uri)?;
        Ok(self.inner().remove_known(&endpoint))
    }

    /// Sets an endpoint's weight in the choice between endpoints (1 to 1,000,000; every
    /// endpoint weighs 1 until set). A checkout draws its two candidate endpoints in
    /// proportion to their weights and takes the one with fewer calls in flight per unit of
    /// weight (the first drawn on a tie), so an endpoint of weight 3 beside one of weight 1
    /// takes about three quarters of the calls, under light load and heavy. Returns
    /// `Ok(false)` if the pool does not have the endpoint; an error if `uri` is not a valid
    /// endpoint or `weight` is out of range. An endpoint removed and added again weighs 1.
    ///
    /// ```no_run
    /// # async fn run(pool: grpc_pool_core::Pool) -> Result<(), grpc_pool_core::Error> {
    /// pool.set_endpoint_weight("http://10.0.0.7:50051", 3)?; // a bigger machine
    /// # Ok(()) }
    /// ```
    pub fn set_endpoint_weight(&self, uri: &str, weight: u32) -> Result<bool, Error> {
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(Error::invalid_config("weight", &weight.to_string(), "1 to 1000000"));
        }
        let endpoint = Endpoint::parse(uri)?;
        Ok(self.inner().set_weights(&[(endpoint, weight)]) == 1)
    }

    /// Caps the calls the pool has in flight (circuit breaking, gRFC A32's `max_requests`):
    /// while `max` calls hold a stream, a new call fails at once with `UNAVAILABLE`
    /// (`max_requests (N) reached`) instead of queueing; `Some(0)` refuses every call (as
    /// Envoy's 0 does); `None` lifts the cap, as it is by default. A call admitted under the
    /// cap that finds it reached when it gets its stream (it waited while others took theirs)
    /// fails then.
    /// Health checks and probes do not count. A control plane's cluster
    /// `circuit_breakers` sets it for a pool built for an xDS target.
    ///
    /// ```no_run
    /// # async fn run(pool: grpc_pool_core::Pool) {
    /// pool.set_max_requests(Some(1024));
    /// # }
    /// ```
    pub fn set_max_requests(&self, max: Option<u32>) {
        self.monitor().set_max_requests(max);
    }

    /// Puts other outlier detection settings in force while the pool runs (`Some`), or the
    /// pool's own back (`None`): the ejections under way run their course, the next ones
    /// follow the new settings. A control plane's cluster `outlier_detection` does this for
    /// a pool built for an xDS target. Fails if the pool was built without outlier detection
    /// and `settings` is `Some` (build it with
    /// [`OutlierDetection::off`](crate::OutlierDetection::off) to have the machinery and no
    /// ejections until an override), or naming the field of a bad setting.
    ///
    /// ```no_run
    /// # async fn run(pool: grpc_pool_core::Pool) -> Result<(), grpc_pool_core::Error> {
    /// let mut settings = grpc_pool_core::OutlierDetection::off();
    /// settings.failure_percentage = Some(grpc_pool_core::FailurePercentageEjection::default());
    /// pool.override_outlier_detection(Some(settings))?;
    /// # Ok(()) }
    /// ```
    pub fn override_outlier_detection(&self, settings: Option<crate::OutlierDetection>) -> Result<(), Error> {
        self.monitor().override_outlier_detection(settings)
    }

    /// Follows an endpoint set that changes at run time: every `Change::Insert` of the
    /// `discover` stream adds an endpoint (its service is the endpoint's URI, anything that
    /// displays as one: a `String`, an [`Endpoint`], or a
    /// [`Weighted`](crate::discover::Weighted) endpoint, which sets its weight too), every
    /// `Change::Remove` removes the one
    /// its key named, as [`Pool::add_endpoint`] and [`Pool::remove_endpoint`] do. A discovery
    /// error or an invalid URI is logged and the set stays as it is; when the stream ends,
    /// the endpoints stay. The task stops when the pool closes; it does not keep the pool
    /// open.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use grpc_pool_core::dns::{DnsDiscover, SystemResolver};
    /// # async fn run(pool: grpc_pool_core::Pool) -> Result<(), grpc_pool_core::Error> {
    /// // Every address `orders.internal` resolves to, looked up again every 30 s.
    /// pool.discover(DnsDiscover::new("http://orders.internal:50051", Duration::from_secs(30), SystemResolver)?);
    /// # Ok(()) }
    /// ```
    pub fn discover<D>(&self, discover: D) -> tokio::task::JoinHandle<()>
    where
        D: crate::discover::Discover + Send + 'static,
        D::Key: Send,
        D::Service: fmt::Display + 'static,
        D::Error: fmt::Display,
    {
        crate::discover::spawn(self.inner(), discover)
    }

    /// A snapshot of every endpoint and member, and the pool's statistics.
    pub fn state(&self) -> State {
        self.inner().state()
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("name", &self.name()).finish_non_exhaustive()
    }
}

/// Builds a [`Pool`] from a [`Config`]; every setting is checked at build, and a bad one
/// fails with a message naming the field and the allowed range. (Users set settings through
/// the `grpc-pool` facade's builder, which fills a `Config`; this one only builds.)
///
/// ```
/// let config = grpc_pool_core::Config { min_connections: 5, max_connections: 2, ..Default::default() };
/// let err = grpc_pool_core::Builder::from_config(config)
///     .build_lazy(["http://127.0.0.1:50051"])
///     .unwrap_err();
/// assert!(err.to_string().contains("`min_connections` = 5 is above max_connections = 2"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: Config,
}

impl Builder {
    /// A builder with every setting of `config`.
    pub fn from_config(config: Config) -> Builder {
        Builder { config }
    }

    /// The settings so far.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn prepare<I, S>(mut self, endpoints: I, allow_empty: bool) -> Result<Arc<PoolInner>, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.config.validate()?;
        let endpoints =
            endpoints.into_iter().map(|e| Endpoint::parse(e.as_ref())).collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() && !allow_empty {
            return Err(Error::config(
                "endpoints",
                "an empty list",
                "at least one endpoint URI (build_lazy takes none, for endpoints added later)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for endpoint in &endpoints {
            if !seen.insert(endpoint) {
                return Err(Error::config(
                    "endpoints",
                    &format!("`{endpoint}` listed twice"),
                    "each endpoint once (raise max_connections for more connections to one)",
                ));
            }
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::config(
                "runtime",
                "no Tokio runtime",
                "building inside a Tokio runtime (the pool spawns its connection tasks there)",
            ));
        }
        // TLS is loaded once, here, so a bad certificate file fails the build, not a connect.
        let tls = match &self.config.tls {
            Some(tls) => Some(Arc::new(crate::proto::tls::Tls::new(tls, &self.config.name)?)),
            None if endpoints.iter().any(|e| e.is_tls()) => {
                Some(Arc::new(crate::proto::tls::Tls::new(&Default::default(), &self.config.name)?))
            }
            None => None,
        };
        // Last, so that a build that fails above never holds the name.
        let numbered = self.config.name == crate::config::DEFAULT_POOL_NAME;
        let (claim, name) = PoolName::claim(&self.config.name, numbered)?;
        self.config.name = name;
        let (inner, ejections) = PoolInner::new(self.config, endpoints, claim);
        let inner = Arc::new(inner);
        if let Some(tls) = tls {
            let _ = inner.tls.set(tls);
        }
        if let Some(requests) = ejections {
            inner.spawn_ejector(requests);
            inner.spawn_outlier_sweep();
        }
        inner.spawn_gauge_sampler(inner.config.metrics_interval);
        inner.spawn_subset_keeper();
        inner.spawn_budget_keeper();
        Ok(inner)
    }

    /// Builds the pool and connects before returning: `max(min_connections, 1)` connections
    /// per endpoint, all at once. Fails only if no endpoint can be reached, with every
    /// endpoint's error. Endpoints that failed keep retrying in the background (with backoff)
    /// while they are below `min_connections`; with `min_connections(0)` they connect again
    /// when calls need them.
    pub async fn build<I, S>(self, endpoints: I) -> Result<Pool, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let inner = self.prepare(endpoints, false)?;
        let pool = Pool { handle: Arc::new(Handle { inner: inner.clone() }) };
        let per_endpoint = inner.config.min_connections.max(1);
        let mut attempts = tokio::task::JoinSet::new();
        // A first connection to every endpoint before a second to any, as far as
        // `max_total_connections` goes.
        'budget: for _ in 0..per_endpoint {
            for entry in inner.endpoints().iter() {
                let Some(ticket) = inner.budget.take() else {
                    inner.count_budget_refusal(entry);
                    break 'budget;
                };
                let (inner, entry) = (inner.clone(), entry.clone());
                attempts.spawn(async move {
                    let round = entry.lock().failure_round;
                    let result = inner.open_member(&entry, round, ticket).await;
                    if let Ok(member) = &result {
                        inner.add_member(&entry, member.clone(), round);
                    }
                    result.map(|_| ())
                });
            }
        }
        let mut errors = Vec::new();
        let mut connected = 0;
        while let Some(joined) = attempts.join_next().await {
            match joined {
                Ok(Ok(())) => connected += 1,
                Ok(Err(error)) => errors.push(error),
                Err(join) => {
                    errors.push(Error::connect(inner.name(), "connect task failed", Some(Box::new(join))))
                }
            }
        }
        if connected == 0 {
            drop(pool);
            return Err(Error::no_endpoint_reachable(&inner.config.name, &errors));
        }
        for entry in inner.endpoints().iter() {
            inner.replenish(entry);
        }
        Ok(pool)
    }

    /// Builds the pool at once and connects in the background (`min_connections` per
    /// endpoint); the first calls wait for a connection, up to `checkout_timeout`. The list
    /// may be empty when endpoints come later ([`Pool::add_endpoint`], discovery). Must be
    /// called inside a Tokio runtime.
    pub fn build_lazy<I, S>(self, endpoints: I) -> Result<Pool, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let inner = self.prepare(endpoints, true)?;
        for entry in inner.endpoints().iter() {
            inner.replenish(entry);
        }
        Ok(Pool { handle: Arc::new(Handle { inner }) })
    }
}
