//! [`EtcdDiscover`]: the endpoints registered under a key prefix, as a `Discover` stream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use grpc_pool_core::discover::Change;
use grpc_pool_core::metrics as m;
use tokio::sync::mpsc;

use super::proto::watch_client::WatchClient;
use super::proto::{self, event::EventType, watch_request::RequestUnion};
use super::value::{parse_value, ParseValue};
use super::{prefix_end, Backoff, EtcdClient};
use crate::{Endpoint, Error};

/// A `tower::discover::Discover` stream of the endpoints registered under an etcd key prefix,
/// for [`Pool::discover`](crate::Pool::discover): one endpoint per key, the key being the
/// discovery key, its value read by [`parse_value`] (or a parser of your own).
///
/// It lists the prefix at a revision, then watches it from the next revision, so no change
/// between the two is lost. When etcd is down or unreachable the endpoints stay as they are
/// (a registry away never empties a pool): it reconnects with backoff and watches on from
/// the last revision it saw. When etcd has compacted that revision away, it lists the prefix
/// again and passes on only the difference. A watch quiet for six call timeouts (60 s by
/// default, [`EtcdClient::with_call_timeout`]) asks etcd for its progress, and one whose
/// answer does not come within a call timeout (its connection went silent) is given up and
/// made again. A value that names no endpoint is logged with its key, counted and skipped.
/// Each of these is a `tracing` event and a metric
/// (`grpc_pool_etcd_*`, see [`metrics`](crate::metrics)); [`EtcdDiscover::status`] shows
/// them too.
///
/// The watch starts on the first poll (inside the runtime) and stops when the stream is
/// dropped (the pool closed).
///
/// ```no_run
/// use grpc_pool::etcd::{EtcdClient, EtcdDiscover};
/// # async fn run(pool: grpc_pool::Pool) -> Result<(), grpc_pool::Error> {
/// let etcd = EtcdClient::new(["http://127.0.0.1:2379"])?;
/// let discover = EtcdDiscover::new(&etcd, "services/echo/")?;
/// let status = discover.status();
/// pool.discover(discover);
/// // Later: what the pool was told.
/// println!("{} endpoints at revision {}", status.endpoints().len(), status.revision());
/// # Ok(()) }
/// ```
pub struct EtcdDiscover {
    watcher: Option<Watcher>,
    changes: Option<mpsc::Receiver<Change<String, Endpoint>>>,
    status: WatchStatus,
}

impl EtcdDiscover {
    /// Follows the keys under `prefix` (`services/echo/`; not empty) in the etcd of `client`.
    pub fn new(client: &EtcdClient, prefix: &str) -> Result<EtcdDiscover, Error> {
        if prefix.is_empty() {
            return Err(Error::invalid_config(
                "etcd.prefix",
                "\"\"",
                "a key prefix of 1 or more bytes (`services/echo/`)",
            ));
        }
        let status = WatchStatus::default();
        let watcher = Watcher {
            client: client.clone(),
            prefix: prefix.to_owned(),
            parse: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            current: BTreeMap::new(),
            bad: BTreeMap::new(),
            revision: 0,
            watching: Watching { prefix: prefix.to_owned(), status: status.clone() },
            status: status.clone(),
        };
        Ok(EtcdDiscover { watcher: Some(watcher), changes: None, status })
    }

    /// Reads values with `parse` instead of [`parse_value`].
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use grpc_pool::etcd::{EtcdClient, EtcdDiscover};
    /// # fn run(etcd: EtcdClient) -> Result<(), grpc_pool::Error> {
    /// // Values are bare ports on one known host.
    /// let discover = EtcdDiscover::new(&etcd, "services/echo/")?.parse_with(Arc::new(|_key: &str, value: &[u8]| {
    ///     let port = std::str::from_utf8(value).map_err(|e| e.to_string())?;
    ///     grpc_pool::Endpoint::parse(&format!("http://10.0.0.7:{port}")).map_err(|e| e.to_string())
    /// }));
    /// # Ok(()) }
    /// ```
    pub fn parse_with(mut self, parse: ParseValue) -> EtcdDiscover {
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.parse = Some(parse);
        }
        self
    }

    /// Backoff between reconnects: from `min` (1 ms to an hour; default 100 ms), doubling up
    /// to `max` (`min` to an hour; default 5 s), +/-20% jitter.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Result<EtcdDiscover, Error> {
        let hour = Duration::from_secs(3600);
        if min < Duration::from_millis(1) || min > hour {
            return Err(Error::invalid_config("etcd.backoff.min", &format!("{min:?}"), "1ms to 3600s"));
        }
        if max < min || max > hour {
            return Err(Error::invalid_config("etcd.backoff.max", &format!("{max:?}"), "min to 3600s"));
        }
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.backoff = Backoff::new(min, max);
        }
        Ok(self)
    }

    /// A handle on what the stream has seen and done, for tests and status pages.
    pub fn status(&self) -> WatchStatus {
        self.status.clone()
    }
}

impl futures_core::Stream for EtcdDiscover {
    type Item = Result<Change<String, Endpoint>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(watcher) = this.watcher.take() {
            let (send, receive) = mpsc::channel(256);
            tokio::spawn(watcher.run(send));
            this.changes = Some(receive);
        }
        match this.changes.as_mut() {
            Some(changes) => changes.poll_recv(cx).map(|change| change.map(Ok)),
            None => Poll::Ready(None),
        }
    }
}

impl fmt::Debug for EtcdDiscover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDiscover").field("status", &self.status).finish_non_exhaustive()
    }
}

/// What an [`EtcdDiscover`] has seen and done so far; a cheap handle, shared with the stream.
///
/// ```
/// let status = grpc_pool::etcd::WatchStatus::default();
/// assert_eq!(status.revision(), 0);
/// assert!(!status.watching());
/// ```
#[derive(Clone, Default)]
pub struct WatchStatus {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    revision: AtomicI64,
    watching: AtomicBool,
    inserts: AtomicU64,
    removes: AtomicU64,
    bad_values: AtomicU64,
    reconnects: AtomicU64,
    relists: AtomicU64,
    endpoints: Mutex<BTreeMap<String, Endpoint>>,
}

impl WatchStatus {
    /// The last etcd revision seen: the watch resumes after it.
    pub fn revision(&self) -> i64 {
        self.shared.revision.load(Ordering::Relaxed)
    }

    /// Whether the watch is established now (false again once the stream is dropped).
    pub fn watching(&self) -> bool {
        self.shared.watching.load(Ordering::Relaxed)
    }

    /// `Insert`s passed on so far: keys that appeared, or whose endpoint changed.
    pub fn inserts(&self) -> u64 {
        self.shared.inserts.load(Ordering::Relaxed)
    }

    /// `Remove`s passed on so far.
    pub fn removes(&self) -> u64 {
        self.shared.removes.load(Ordering::Relaxed)
    }

    /// Values skipped because they name no endpoint (each key's value once).
    pub fn bad_values(&self) -> u64 {
        self.shared.bad_values.load(Ordering::Relaxed)
    }

    /// Failed lists and lost watches, each followed by a reconnect.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Full re-lists after a compaction.
    pub fn relists(&self) -> u64 {
        self.shared.relists.load(Ordering::Relaxed)
    }

    /// The endpoints passed on and not removed since, by key.
    pub fn endpoints(&self) -> BTreeMap<String, Endpoint> {
        self.shared.endpoints.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for WatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStatus")
            .field("revision", &self.revision())
            .field("watching", &self.watching())
            .field("inserts", &self.inserts())
            .field("removes", &self.removes())
            .field("bad_values", &self.bad_values())
            .field("reconnects", &self.reconnects())
            .field("relists", &self.relists())
            .finish_non_exhaustive()
    }
}

/// How a watch ended.
enum Ended {
    /// The stream was dropped: stop.
    Closed,
    /// etcd compacted the history the watch needed: list again.
    Compacted(i64),
    /// etcd unreachable, the stream broken, or the watch refused: reconnect after a backoff.
    Failed(String),
    /// etcd refused the watch's token: sign in again and create it again at once, the first
    /// time in a row (the token goes only with a watch's creation, so an open watch does not
    /// keep it from expiring); then as `Failed`.
    TokenRefused(String),
}

/// The task behind an [`EtcdDiscover`]: lists, watches, and sends the changes.
struct Watcher {
    client: EtcdClient,
    prefix: String,
    parse: Option<ParseValue>,
    backoff: Backoff,
    /// The endpoints passed on, by key.
    current: BTreeMap<String, Endpoint>,
    /// Keys whose value names no endpoint, with the revision of that value (logged once).
    bad: BTreeMap<String, i64>,
    /// The last revision seen.
    revision: i64,
    /// The `watching` flag and gauge, back to 0 when the watcher goes, however it goes.
    watching: Watching,
    status: WatchStatus,
}

/// The `watching` flag of a [`WatchStatus`] and its gauge: set while the watch is
/// established, and cleared when this is dropped (the stream dropped, the task aborted or
/// panicked, the runtime shut down), so that a watcher that is gone never shows as watching.
struct Watching {
    prefix: String,
    status: WatchStatus,
}

impl Watching {
    fn set(&self, on: bool) {
        if self.status.shared.watching.swap(on, Ordering::Relaxed) != on {
            metrics::gauge!(m::ETCD_WATCHING, m::LABEL_PREFIX => self.prefix.clone()).set(if on {
                1.0
            } else {
                0.0
            });
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        if self.status.watching() {
            tracing::debug!(prefix = %self.prefix, revision = self.status.revision(), "etcd watch stopped: the discovery stream was dropped or its task ended");
        }
        self.set(false);
    }
}

type Changes = mpsc::Sender<Change<String, Endpoint>>;

/// A watch quiet for this many call timeouts (60 s by default), and at least
/// `PROGRESS_QUIET_FLOOR`, asks etcd for its progress, and is given up when the answer takes
/// longer than a call timeout (and at least `PROGRESS_ANSWER_FLOOR`).
const PROGRESS_AFTER_TIMEOUTS: u32 = 6;
const PROGRESS_QUIET_FLOOR: Duration = Duration::from_secs(5);
const PROGRESS_ANSWER_FLOOR: Duration = Duration::from_secs(1);

/// The `watch_id` of etcd's answers to a progress request.
const PROGRESS_ANSWER: i64 = -1;

impl Watcher {
    async fn run(mut self, changes: Changes) {
        let mut listed = false;
        // Whether the last try was refused for its token and retried at once.
        let mut signed_in_again = false;
        loop {
            if !listed {
                match self.list(&changes).await {
                    Ok(true) => listed = true,
                    Ok(false) => return,
                    Err(error) => {
                        if !self.fail(&changes, "list", &error).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            match self.watch(&changes).await {
                Ended::Closed => return,
                Ended::Compacted(compacted) => {
                    self.set_watching(false);
                    tracing::info!(prefix = %self.prefix, revision = self.revision, compacted, "etcd compacted the watched revisions; listing the prefix again");
                    metrics::counter!(m::ETCD_RELISTS, m::LABEL_PREFIX => self.prefix.clone()).increment(1);
                    self.status.shared.relists.fetch_add(1, Ordering::Relaxed);
                    listed = false;
                    signed_in_again = false;
                }
                Ended::TokenRefused(error) if !signed_in_again => {
                    tracing::debug!(prefix = %self.prefix, error = %error, "etcd refused the watch's token; signing in again");
                    signed_in_again = true;
                }
                Ended::TokenRefused(error) => {
                    if !self.fail(&changes, "watch", &error).await {
                        return;
                    }
                }
                Ended::Failed(error) => {
                    signed_in_again = false;
                    if !self.fail(&changes, "watch", &error).await {
                        return;
                    }
                }
            }
        }
    }

    /// Logs and counts a failure, then waits out the backoff. False if the stream was
    /// dropped meanwhile.
    async fn fail(&mut self, changes: &Changes, what: &str, error: &str) -> bool {
        self.set_watching(false);
        let wait = self.backoff.next_wait();
        tracing::warn!(prefix = %self.prefix, revision = self.revision, kept = self.current.len(), error = %error, retry_in = ?wait, "etcd {what} failed; keeping the endpoints and reconnecting");
        metrics::counter!(m::ETCD_RECONNECTS, m::LABEL_PREFIX => self.prefix.clone()).increment(1);
        self.status.shared.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = changes.closed() => false,
        }
    }

    fn set_watching(&self, on: bool) {
        self.watching.set(on);
    }

    /// Lists the prefix and passes on the difference from what was passed on before. Ok(false)
    /// if the stream was dropped.
    async fn list(&mut self, changes: &Changes) -> Result<bool, String> {
        let listing = tokio::select! {
            listing = self.client.range_prefix(&self.prefix) => listing,
            _ = changes.closed() => return Ok(false),
        };
        let (revision, kvs) = listing.map_err(|e| e.to_string())?;
        let mut found = BTreeMap::new();
        for kv in kvs {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if let Some(endpoint) = self.read(&key, &kv.value, kv.mod_revision) {
                found.insert(key, endpoint);
            }
        }
        self.bad.retain(|key, _| !found.contains_key(key));
        let gone: Vec<String> = self.current.keys().filter(|k| !found.contains_key(*k)).cloned().collect();
        for key in gone {
            if !self.remove(changes, &key).await {
                return Ok(false);
            }
        }
        for (key, endpoint) in found {
            if !self.insert(changes, key, endpoint).await {
                return Ok(false);
            }
        }
        self.set_revision(revision);
        tracing::info!(prefix = %self.prefix, revision, endpoints = self.current.len(), "etcd prefix listed");
        Ok(true)
    }

    /// Watches from the revision after the last seen until the watch ends.
    async fn watch(&mut self, changes: &Changes) -> Ended {
        let (requests, request_stream) = mpsc::channel(1);
        let create = proto::WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(proto::WatchCreateRequest {
                key: self.prefix.clone().into(),
                range_end: prefix_end(self.prefix.as_bytes()).into(),
                start_revision: self.revision + 1,
                progress_notify: true,
            })),
        };
        // The channel has room for it; `requests` stays open with the watch, since etcd
        // ends a watch stream whose requests end.
        let _ = requests.try_send(create);
        let token = tokio::select! {
            token = self.client.token() => token,
            _ = changes.closed() => return Ended::Closed,
        };
        let token = match token {
            Ok(token) => token,
            Err(error) => return Ended::Failed(error.to_string()),
        };
        let mut client = WatchClient::new(self.client.channel(token.clone()));
        // etcd answers a watch's creation at once; one that does not is as good as down.
        let within = self.client.call_timeout();
        let opened = tokio::select! {
            opened = tokio::time::timeout(within, client.watch(Requests(request_stream))) => opened,
            _ = changes.closed() => return Ended::Closed,
        };
        let mut responses = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let error = format!("{:?}: {}", status.code(), status.message());
                if self.client.token_rejected(&status, &token) {
                    return Ended::TokenRefused(error);
                }
                return Ended::Failed(error);
            }
            Err(_) => {
                let status = super::timed_out("watch", within);
                return Ended::Failed(format!(
                    "the watch's creation: {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
        };
        // A watch that hears nothing for a while asks etcd how far it is: the answer proves
        // the stream alive, and its DATA lets the pool's keepalive PINGs go on (they stop
        // after two without data from the server, so they alone lose sight of a connection
        // that went silent after a long quiet watch).
        // Floors, so that a short call timeout does not make a watch chatty, or give it up
        // for one slow answer of a loaded etcd.
        let quiet = within.saturating_mul(PROGRESS_AFTER_TIMEOUTS).max(PROGRESS_QUIET_FLOOR);
        let within = within.max(PROGRESS_ANSWER_FLOOR);
        let mut heard = tokio::time::Instant::now();
        let mut asked = false;
        loop {
            let check_at = if asked { heard + quiet + within } else { heard + quiet };
            let message = tokio::select! {
                message = responses.message() => message,
                _ = changes.closed() => return Ended::Closed,
                _ = tokio::time::sleep_until(check_at) => {
                    if asked {
                        return Ended::Failed(format!(
                            "no answer within {within:?} to a progress request, after {quiet:?} without a word: the watch's connection is silent"
                        ));
                    }
                    let progress = proto::WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(proto::WatchProgressRequest {})),
                    };
                    // Room for it unless the last request is still unsent: then it is
                    // silent too, which the deadline finds.
                    let _ = requests.try_send(progress);
                    tracing::debug!(prefix = %self.prefix, quiet = ?quiet, "etcd watch quiet; asking for its progress");
                    asked = true;
                    continue;
                }
            };
            (heard, asked) = (tokio::time::Instant::now(), false);
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Ended::Failed("etcd ended the watch stream".to_owned()),
                Err(status) => return Ended::Failed(format!("{:?}: {}", status.code(), status.message())),
            };
            if response.compact_revision > 0 {
                return Ended::Compacted(response.compact_revision);
            }
            if response.canceled {
                let error = format!("etcd cancelled the watch: {}", response.cancel_reason);
                // etcd cancels the creation of a watch whose token it no longer takes with
                // the refusal as the reason (`rpc error: code = Unauthenticated desc =
                // etcdserver: invalid auth token`); before 3.4.22 and 3.5.6 as `permission
                // denied`, the same as for a user who may not read the prefix (who then
                // signs in again before each try: one sign-in per backoff wait).
                let reason = &response.cancel_reason;
                if super::auth::refuses_token(reason) || reason.contains("permission denied") {
                    self.client.forget_token(&token);
                    return Ended::TokenRefused(error);
                }
                return Ended::Failed(error);
            }
            if response.created {
                self.set_watching(true);
                self.backoff.reset();
                tracing::info!(prefix = %self.prefix, from = self.revision + 1, "etcd watch established");
            }
            if response.events.is_empty() && !response.created && response.watch_id != PROGRESS_ANSWER {
                // A progress notification: every change up to its revision has been sent.
                // Not so an answer to a progress request, which only shows the stream
                // alive: older etcd releases answered with the store's revision, possibly
                // ahead of changes not yet sent on this stream.
                if let Some(header) = response.header {
                    self.set_revision(header.revision);
                }
            }
            for event in response.events {
                let Some(kv) = event.kv else { continue };
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let applied = if event.r#type == EventType::Delete as i32 {
                    self.bad.remove(&key);
                    self.remove(changes, &key).await
                } else {
                    match self.read(&key, &kv.value, kv.mod_revision) {
                        Some(endpoint) => {
                            self.bad.remove(&key);
                            self.insert(changes, key, endpoint).await
                        }
                        // The key names nothing usable any more: its old endpoint goes.
                        None => self.remove(changes, &key).await,
                    }
                };
                if !applied {
                    return Ended::Closed;
                }
                self.set_revision(kv.mod_revision);
            }
        }
    }

    /// The endpoint a value names, or `None` after logging and counting it (once per value).
    fn read(&mut self, key: &str, value: &[u8], mod_revision: i64) -> Option<Endpoint> {
        let parsed = match &self.parse {
            Some(parse) => parse(key, value),
            None => parse_value(value),
        };
        match parsed {
            Ok(endpoint) => Some(endpoint),
            Err(problem) => {
                if self.bad.insert(key.to_owned(), mod_revision) != Some(mod_revision) {
                    let shown = String::from_utf8_lossy(&value[..value.len().min(200)]).into_owned();
                    tracing::warn!(prefix = %self.prefix, key, value = %shown, problem = %problem, "etcd value names no endpoint; key skipped");
                    metrics::counter!(m::ETCD_BAD_VALUES, m::LABEL_PREFIX => self.prefix.clone())
                        .increment(1);
                    self.status.shared.bad_values.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// Passes on `key` -> `endpoint` unless it is so already. False if the stream was dropped.
    async fn insert(&mut self, changes: &Changes, key: String, endpoint: Endpoint) -> bool {
        if self.current.get(&key) == Some(&endpoint) {
            return true;
        }
        self.current.insert(key.clone(), endpoint.clone());
        self.status
            .shared
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), endpoint.clone());
        self.status.shared.inserts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::ETCD_CHANGES, m::LABEL_PREFIX => self.prefix.clone(), m::LABEL_CHANGE => "insert").increment(1);
        tracing::debug!(prefix = %self.prefix, key, endpoint = %endpoint, "etcd endpoint in");
        changes.send(Change::Insert(key, endpoint)).await.is_ok()
    }

    /// Passes on the removal of `key` if it had an endpoint. False if the stream was dropped.
    async fn remove(&mut self, changes: &Changes, key: &str) -> bool {
        if self.current.remove(key).is_none() {
            return true;
        }
        self.status.shared.endpoints.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        self.status.shared.removes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::ETCD_CHANGES, m::LABEL_PREFIX => self.prefix.clone(), m::LABEL_CHANGE => "remove").increment(1);
        tracing::debug!(prefix = %self.prefix, key, "etcd endpoint out");
        changes.send(Change::Remove(key.to_owned())).await.is_ok()
    }

    fn set_revision(&mut self, revision: i64) {
        if revision > self.revision {
            self.revision = revision;
            self.status.shared.revision.store(revision, Ordering::Relaxed);
        }
    }
}

/// The requests of a bidirectional call, from a channel: a `Stream` for tonic.
pub(crate) struct Requests<T>(pub(crate) mpsc::Receiver<T>);

impl<T> futures_core::Stream for Requests<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
