//! Following an endpoint set that changes at run time, from any `tower::discover::Discover`
//! stream: each `Insert` adds an endpoint to the pool, each `Remove` drains one away.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

pub use tower::discover::{Change, Discover};

use crate::endpoint::Endpoint;
use crate::inner::PoolInner;

/// The largest endpoint weight ([`Weighted`], `Pool::set_endpoint_weight`).
pub(crate) const MAX_WEIGHT: u32 = 1_000_000;

/// An endpoint and its weight in the choice between endpoints, as a discovery stream's
/// service: the pool adds the endpoint (if it has not) and sets its weight (1 to
/// 1,000,000; outside, the nearest). Inserted again under its key with another weight, only
/// the weight changes. Displays as its endpoint.
///
/// ```
/// use grpc_pool_core::discover::Weighted;
/// let endpoint = grpc_pool_core::Endpoint::parse("http://10.0.0.7:50051").unwrap();
/// let heavy = Weighted { endpoint, weight: 3 };
/// assert_eq!(heavy.to_string(), "http://10.0.0.7:50051");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weighted {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its weight: an endpoint of weight 3 beside one of weight 1 takes about three
    /// quarters of the calls.
    pub weight: u32,
}

impl fmt::Display for Weighted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.endpoint.fmt(f)
    }
}

/// Applies the changes of `discover` to the pool until the stream ends or the pool closes.
pub(crate) async fn follow<D>(pool: Weak<PoolInner>, discover: D)
where
    D: Discover + Send + 'static,
    D::Key: Send,
    D::Service: fmt::Display + 'static,
    D::Error: fmt::Display,
{
    let Some(shutdown) = pool.upgrade().map(|p| p.shutdown.clone()) else { return };
    let mut discover = Box::pin(discover);
    let mut keys = Keys::default();
    loop {
        // `biased`: a fixed order (shutdown first), the same on every run.
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            change = poll_fn(|cx| discover.as_mut().poll_discover(cx)) => change,
        };
        let Some(pool) = pool.upgrade() else { return };
        // Every change ready now goes with the first (up to `MAX_BATCH`): a burst (a first
        // listing, a deploy) is applied as one change of the pool's endpoint list, not one
        // change per endpoint. A stream that is not ready is polled again below with the
        // task's own waker.
        let mut changes = vec![first];
        while changes.len() < MAX_BATCH && matches!(changes.last(), Some(Some(_))) {
            let mut cx = Context::from_waker(Waker::noop());
            match discover.as_mut().poll_discover(&mut cx) {
                Poll::Ready(change) => changes.push(change),
                Poll::Pending => break,
            }
        }
        let mut batch = Batch::default();
        for change in changes {
            match change {
                None => {
                    batch.apply(&pool);
                    tracing::info!(pool = %pool.name(), "endpoint discovery ended; the endpoints stay as they are");
                    return;
                }
                Some(Err(error)) => {
                    tracing::warn!(pool = %pool.name(), error = %error, "endpoint discovery failed; the endpoints stay as they are");
                }
                Some(Ok(Change::Insert(key, service))) => {
                    // An `Endpoint` is taken as it is (it may carry a resolved address that its
                    // label does not parse back into); anything else is parsed as a URI.
                    let uri = service.to_string();
                    let any = &service as &dyn Any;
                    let parsed = match (any.downcast_ref::<Endpoint>(), any.downcast_ref::<Weighted>()) {
                        (Some(endpoint), _) => Ok(endpoint.clone()),
                        (_, Some(weighted)) => {
                            batch
                                .weights
                                .push((weighted.endpoint.clone(), weighted.weight.clamp(1, MAX_WEIGHT)));
                            Ok(weighted.endpoint.clone())
                        }
                        _ => Endpoint::parse(&uri),
                    };
                    match parsed {
                        Ok(endpoint) => {
                            if let Some(replaced) = keys.insert(key, endpoint.clone()) {
                                batch.push(false, replaced);
                            }
                            batch.push(true, endpoint);
                        }
                        Err(error) => {
                            tracing::warn!(pool = %pool.name(), endpoint = %uri, error = %error, "discovered endpoint ignored");
                        }
                    }
                }
                Some(Ok(Change::Remove(key))) => {
                    if let Some(removed) = keys.remove(&key) {
                        batch.push(false, removed);
                    }
                }
            }
        }
        batch.apply(&pool);
    }
}

/// The most changes applied together.
const MAX_BATCH: usize = 10_000;

/// Additions and removals in the order discovery made them, runs of the same kind together.
#[derive(Default)]
struct Batch {
    runs: Vec<(bool, Vec<Endpoint>)>,
    /// Weights to set once the endpoints are in.
    weights: Vec<(Endpoint, u32)>,
}

impl Batch {
    fn push(&mut self, add: bool, endpoint: Endpoint) {
        match self.runs.last_mut() {
            Some((kind, run)) if *kind == add => run.push(endpoint),
            _ => self.runs.push((add, vec![endpoint])),
        }
    }

    fn apply(self, pool: &Arc<PoolInner>) {
        for (add, run) in self.runs {
            if add {
                pool.add_known_all(run);
            } else {
                pool.remove_known_all(&run);
            }
        }
        if !self.weights.is_empty() {
            pool.set_weights(&self.weights);
        }
    }
}

/// Which endpoint each discovery key stands for. `Discover` keys need only `Eq`, so the keys
/// are a list; how many keys name each endpoint is a map, so that finding whether an endpoint
/// is still named costs nothing however many there are. Two keys may name one endpoint: it
/// stays in the pool until neither does.
struct Keys<K> {
    entries: Vec<(K, Endpoint)>,
    named: HashMap<Endpoint, usize>,
}

impl<K> Default for Keys<K> {
    fn default() -> Self {
        Keys { entries: Vec::new(), named: HashMap::new() }
    }
}

impl<K: Eq> Keys<K> {
    /// Maps `key` to `endpoint`; returns the endpoint it named before if no key names that
    /// one any more (the caller removes it from the pool).
    fn insert(&mut self, key: K, endpoint: Endpoint) -> Option<Endpoint> {
        *self.named.entry(endpoint.clone()).or_default() += 1;
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, current)) => {
                let before = std::mem::replace(current, endpoint);
                self.unname(before)
            }
            None => {
                self.entries.push((key, endpoint));
                None
            }
        }
    }

    /// Forgets `key`; returns its endpoint if no other key names it.
    fn remove(&mut self, key: &K) -> Option<Endpoint> {
        let index = self.entries.iter().position(|(k, _)| k == key)?;
        let (_, endpoint) = self.entries.swap_remove(index);
        self.unname(endpoint)
    }

    /// One key fewer names `endpoint`; returns it if none does now.
    fn unname(&mut self, endpoint: Endpoint) -> Option<Endpoint> {
        let count = self.named.get_mut(&endpoint)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.named.remove(&endpoint);
        Some(endpoint)
    }
}

/// Starts [`follow`] on a task that holds the pool weakly, so that it does not keep the pool
/// open.
pub(crate) fn spawn<D>(pool: &Arc<PoolInner>, discover: D) -> tokio::task::JoinHandle<()>
where
    D: Discover + Send + 'static,
    D::Key: Send,
    D::Service: fmt::Display + 'static,
    D::Error: fmt::Display,
{
    tokio::spawn(follow(Arc::downgrade(pool), discover))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    #[test]
    fn an_endpoint_named_by_two_keys_leaves_only_when_neither_names_it() {
        let mut keys = Keys::default();
        assert_eq!(keys.insert("a", endpoint(1)), None);
        assert_eq!(keys.insert("b", endpoint(1)), None);
        assert_eq!(keys.remove(&"a"), None);
        assert_eq!(keys.remove(&"b"), Some(endpoint(1)));
        assert_eq!(keys.remove(&"b"), None);
    }

    #[test]
    fn a_key_inserted_again_replaces_its_endpoint() {
        let mut keys = Keys::default();
        keys.insert(1, endpoint(1));
        assert_eq!(keys.insert(1, endpoint(2)), Some(endpoint(1)));
        assert_eq!(keys.insert(1, endpoint(2)), None);
        assert_eq!(keys.remove(&1), Some(endpoint(2)));
    }
}
