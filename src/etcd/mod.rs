//! Endpoints from etcd (feature `etcd`): servers register themselves under a key prefix with
//! a lease ([`register`]), and pools follow the prefix ([`EtcdDiscover`]).
//!
//! The client is a small one of the crate's own, speaking etcd's v3 gRPC API (ranges, puts,
//! deletes, compaction, watches, leases) through a [`Pool`] of its own to the etcd cluster's
//! endpoints: connections, reconnects, keepalive and TLS are the pool's. An etcd with
//! authentication enabled takes a user name and password ([`EtcdClient::with_user`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use grpc_pool::etcd::{register, EtcdClient, EtcdDiscover};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = EtcdClient::new(["http://127.0.0.1:2379"])?;
//!
//! // A server: registered while `registration` lives, gone at once when it is dropped, and
//! // within 10 s of a crash.
//! let registration = register(&etcd, "services/echo/a", "10.0.0.7:50051", Duration::from_secs(10)).await?;
//!
//! // A client: the pool follows every key under `services/echo/`.
//! let pool = grpc_pool::Pool::builder().name("echo").build_lazy(Vec::<String>::new())?;
//! pool.discover(EtcdDiscover::new(&etcd, "services/echo/")?);
//! # drop(registration); Ok(()) }
//! ```

mod auth;
mod discover;
#[allow(missing_docs, clippy::all, clippy::pedantic)] // generated from proto/etcd.proto
mod proto;
mod register;
mod value;

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;

pub use discover::{EtcdDiscover, WatchStatus};
pub use register::{register, Registration};
pub use value::{parse_value, ParseValue};

pub(crate) use crate::reconnect::Backoff;
use crate::{Error, Pool, TlsConfig};
use auth::{Credentials, SendToken, SharedCredentials, Token};
use grpc_pool_core::metrics as m;
use proto::kv_client::KvClient;

/// A client of one etcd cluster: a [`Pool`] of connections to its endpoints, shared by every
/// clone, the [`EtcdDiscover`] streams and the [`Registration`]s made with it. It closes
/// when the last of them is dropped. Its pool is named `etcd` (`etcd-2`, ... for more
/// clients), connects within 3 s, and reconnects at most 5 s apart. Each call (put, delete,
/// range, compact, lease grant and revoke, signing in, a watch's creation) fails with
/// `DeadlineExceeded` when etcd has not answered it within the call timeout (10 s;
/// [`EtcdClient::with_call_timeout`]); watches and lease keepalives, which last, have none.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let etcd = grpc_pool::etcd::EtcdClient::new(["http://10.0.0.1:2379", "http://10.0.0.2:2379"])?;
/// let revision = etcd.put("services/echo/a", "10.0.0.7:50051").await?;
/// assert_eq!(etcd.get_prefix("services/echo/").await?.len(), 1);
/// # let _ = revision; Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdClient {
    pool: Pool,
    credentials: SharedCredentials,
    call_timeout: Duration,
}

/// How long an etcd call may wait for its answer, unless set otherwise.
pub(crate) const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The pool, with the token (if any) put on every call.
pub(crate) type Channel = InterceptedService<Pool, SendToken>;

/// Numbers the etcd clients' pools (`etcd`, `etcd-2`, ...): pool names are unique.
static CLIENTS: AtomicUsize = AtomicUsize::new(0);

impl EtcdClient {
    /// A client of the etcd cluster at `endpoints` (`http://host:port`, or `https://` with
    /// the system's roots). Connects in the background; must be called inside a Tokio
    /// runtime. Fails if the list is empty or an endpoint is not a URI.
    pub fn new<I, S>(endpoints: I) -> Result<EtcdClient, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        EtcdClient::with_tls(endpoints, None)
    }

    /// The same, with TLS settings for `https://` endpoints (roots, a client certificate).
    pub fn with_tls<I, S>(endpoints: I, tls: Option<TlsConfig>) -> Result<EtcdClient, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(|e| e.as_ref().to_owned()).collect();
        if endpoints.is_empty() {
            return Err(Error::invalid_config(
                "etcd.endpoints",
                "[]",
                "1 or more etcd URIs (`http://host:2379`)",
            ));
        }
        for uri in &endpoints {
            let allowed = "`http://host:port` or `https://host:port` URIs";
            match crate::Endpoint::parse(uri) {
                Ok(endpoint) if endpoint.unix_path().is_none() => {}
                Ok(_) => return Err(Error::invalid_config("etcd.endpoints", uri, allowed)),
                Err(e) => {
                    return Err(Error::invalid_config("etcd.endpoints", &format!("`{uri}` ({e})"), allowed))
                }
            }
        }
        let pool = crate::reconnect::registry_pool("etcd", &CLIENTS, |mut builder| {
            if let Some(tls) = &tls {
                builder = builder.tls(tls.clone());
            }
            builder
                // Watches and lease keepalives are long calls; a few connections carry them.
                .max_connections(2)
                .connect_timeout(Duration::from_secs(3))
                .build_lazy(&endpoints)
        })?;
        Ok(EtcdClient { pool, credentials: None, call_timeout: DEFAULT_CALL_TIMEOUT })
    }

    /// The same client, signing in to etcd as `user` (for an etcd with authentication
    /// enabled): the first call gets a token for the user and password (etcd's
    /// `Authenticate`), every call carries it, and when etcd no longer takes it (it expired
    /// unused, or the users or roles changed) the client signs in again and repeats the call once. A
    /// wrong password fails calls with `etcd authenticate failed: InvalidArgument: ...
    /// invalid user ID or password`; an etcd whose authentication is off is called without
    /// a token (until it asks for one). Fails if `user` or `password` is empty.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let password = std::fs::read_to_string("/run/secrets/etcd")?;
    /// let etcd = grpc_pool::etcd::EtcdClient::new(["http://10.0.0.1:2379"])?.with_user("echo", password.trim_end())?;
    /// etcd.put("services/echo/a", "10.0.0.7:50051").await?;
    /// # Ok(()) }
    /// ```
    pub fn with_user(self, user: &str, password: &str) -> Result<EtcdClient, Error> {
        if user.is_empty() {
            return Err(Error::invalid_config("etcd.user", "\"\"", "a user name of 1 or more characters"));
        }
        if password.is_empty() {
            return Err(Error::invalid_config("etcd.password", "\"\"", "a password of 1 or more characters"));
        }
        Ok(EtcdClient { credentials: Some(Arc::new(Credentials::new(user, password))), ..self })
    }

    /// The same client, its calls failing when etcd has not answered them within `timeout`
    /// (1 ms to 3600 s; default 10 s) instead: an etcd that takes connections and never
    /// answers (stuck, or a proxy in front of one that is gone) must not hang `register`,
    /// `deregister` or a discovery's list for ever. Each unary call, signing in, and a
    /// watch's creation get the timeout; the streams that last (a watch, a lease keepalive)
    /// do not, but a watch quiet for six timeouts asks etcd for its progress and is made
    /// again when the answer takes longer than one. A call that times out fails with `etcd put failed: DeadlineExceeded: no answer
    /// within 5s (the etcd client's call timeout)`, is a `tracing` event and counts in
    /// `grpc_pool_etcd_call_timeouts_total`. Fails naming `etcd.call_timeout` outside the range.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), grpc_pool::Error> {
    /// use std::time::Duration;
    /// let etcd = grpc_pool::etcd::EtcdClient::new(["http://10.0.0.1:2379"])?.with_call_timeout(Duration::from_secs(5))?;
    /// assert_eq!(etcd.call_timeout(), Duration::from_secs(5));
    /// let err = etcd.with_call_timeout(Duration::ZERO).unwrap_err();
    /// assert!(err.to_string().contains("`etcd.call_timeout`"));
    /// # Ok(()) }
    /// ```
    pub fn with_call_timeout(self, timeout: Duration) -> Result<EtcdClient, Error> {
        if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(3600) {
            return Err(Error::invalid_config("etcd.call_timeout", &format!("{timeout:?}"), "1ms to 3600s"));
        }
        Ok(EtcdClient { call_timeout: timeout, ..self })
    }

    /// How long a call waits for etcd's answer before it fails (see
    /// [`EtcdClient::with_call_timeout`]).
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The user the client signs in as, if any.
    pub fn user(&self) -> Option<&str> {
        self.credentials.as_deref().map(Credentials::user)
    }

    /// The pool under the client: its state shows the connections to etcd.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The token to send with a call: `None` without credentials; signs in when there is
    /// none in hand.
    pub(crate) async fn token(&self) -> Result<Option<Token>, EtcdError> {
        match &self.credentials {
            Some(credentials) => credentials.token(&self.pool, self.call_timeout).await,
            None => Ok(None),
        }
    }

    /// Whether `status` says etcd no longer takes the token `used`; if so, the next call
    /// signs in again.
    pub(crate) fn token_rejected(&self, status: &tonic::Status, used: &Option<Token>) -> bool {
        match &self.credentials {
            Some(credentials) => credentials.rejected(status, used),
            None => false,
        }
    }

    /// Makes the next call sign in again instead of sending `used` (for answers that are no
    /// status, like the reason a watch was cancelled).
    pub(crate) fn forget_token(&self, used: &Option<Token>) {
        if let Some(credentials) = &self.credentials {
            credentials.forget(used);
        }
    }

    /// The pool, putting `token` on every call.
    pub(crate) fn channel(&self, token: Option<Token>) -> Channel {
        InterceptedService::new(self.pool.clone(), SendToken(token))
    }

    /// A unary call made by `call`, with the token; made once more, after signing in again,
    /// if etcd no longer took the token. The whole of it (signing in and the second try
    /// included) fails with `DeadlineExceeded` after the call timeout; the call's stream is
    /// reset then, so etcd stops working on it too.
    pub(crate) async fn unary<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.unary_within(self.call_timeout, op, call).await
    }

    /// [`EtcdClient::unary`] bounded by `timeout` rather than the call timeout.
    async fn unary_within<T, F, Fut>(
        &self,
        timeout: Duration,
        op: &'static str,
        call: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(timeout, self.unary_unbounded(op, call)).await {
            Ok(result) => result,
            Err(_) => Err(EtcdError::call(op, timed_out(op, timeout))),
        }
    }

    async fn unary_unbounded<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut signed_in_again = false;
        loop {
            let token = self.token().await?;
            match call(self.channel(token.clone())).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => {
                    // Forgotten even when it is the second refusal, so that the next call
                    // does not try it first.
                    if self.token_rejected(&status, &token) && !signed_in_again {
                        signed_in_again = true;
                        continue;
                    }
                    return Err(EtcdError::call(op, status));
                }
            }
        }
    }

    /// Sets `key` to `value` (no lease); returns the store's revision after the write.
    pub async fn put(&self, key: &str, value: &str) -> Result<i64, EtcdError> {
        self.put_with_lease(key, value.as_bytes(), 0).await
    }

    async fn put_with_lease(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let request = proto::PutRequest { key: key.to_owned().into(), value: value.to_vec().into(), lease };
        let response = self
            .unary("put", |channel| {
                let request = request.clone();
                async move { KvClient::new(channel).put(request).await }
            })
            .await?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let request = proto::DeleteRangeRequest { key: key.to_owned().into(), range_end: Default::default() };
        let response = self
            .unary("delete", |channel| {
                let request = request.clone();
                async move { KvClient::new(channel).delete_range(request).await }
            })
            .await?;
        Ok(response.deleted)
    }

    /// Every key under `prefix` with its value, in key order (keys as UTF-8, lossily).
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let (_, kvs) = self.range_prefix(prefix).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value.to_vec()))
            .collect())
    }

    /// The keys under `prefix` now, and the revision they are at.
    async fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<proto::KeyValue>), EtcdError> {
        let request = proto::RangeRequest {
            key: prefix.to_owned().into(),
            range_end: prefix_end(prefix.as_bytes()).into(),
            limit: 0,
            revision: 0,
        };
        let response = self
            .unary("range", |channel| {
                let request = request.clone();
                async move { KvClient::new(channel).range(request).await }
            })
            .await?;
        Ok((response.header.map_or(0, |h| h.revision), response.kvs))
    }

    /// Forgets the history before `revision` (etcd's compaction): watches that still need
    /// it are cancelled as compacted. A physical compaction of a large store takes a while,
    /// so it is given 5 minutes (or the call timeout, if longer).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let request = proto::CompactionRequest { revision, physical: true };
        let timeout = self.call_timeout.max(COMPACT_TIMEOUT);
        self.unary_within(timeout, "compact", |channel| async move {
            KvClient::new(channel).compact(request).await
        })
        .await?;
        Ok(())
    }
}

impl fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdClient")
            .field("pool", &self.pool.name())
            .field("user", &self.user())
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

/// The least time `EtcdClient::compact` is given: etcd answers a physical compaction
/// only once the old revisions are gone from disk.
const COMPACT_TIMEOUT: Duration = Duration::from_secs(300);

/// The status of an etcd call `op` that got no answer within `timeout`, logged and counted.
pub(crate) fn timed_out(op: &'static str, timeout: Duration) -> tonic::Status {
    metrics::counter!(m::ETCD_CALL_TIMEOUTS, m::LABEL_OP => op).increment(1);
    tracing::warn!(op, timeout = ?timeout, "etcd call got no answer within the call timeout");
    tonic::Status::deadline_exceeded(format!("no answer within {timeout:?} (the etcd client's call timeout)"))
}

/// The end of the key range that holds every key starting with `prefix`: the prefix with its
/// last byte below 0xff incremented (etcd's convention), or `\0` (every key) when there is
/// none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A failed etcd call, or a setting out of range.
///
/// ```
/// let err = grpc_pool::etcd::EtcdError::from(grpc_pool::Error::invalid_config("ttl", "0s", "1s to 9e9 s"));
/// assert!(err.to_string().contains("`ttl`"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum EtcdError {
    /// A setting out of range; nothing was sent.
    Config(Error),
    /// etcd answered a call with an error status, could not be reached, or did not answer
    /// within the client's call timeout (`DeadlineExceeded`).
    Call {
        /// The call: `put`, `delete`, `range`, `compact`, `lease grant`, `lease revoke`,
        /// `authenticate` (signing in with [`EtcdClient::with_user`]'s credentials).
        op: &'static str,
        /// The status it ended with.
        status: tonic::Status,
    },
}

impl EtcdError {
    fn call(op: &'static str, status: tonic::Status) -> EtcdError {
        EtcdError::Call { op, status }
    }
}

impl From<Error> for EtcdError {
    fn from(error: Error) -> EtcdError {
        EtcdError::Config(error)
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Config(error) => error.fmt(f),
            EtcdError::Call { op, status } => {
                write!(f, "etcd {op} failed: {:?}: {}", status.code(), status.message())
            }
        }
    }
}

impl std::error::Error for EtcdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EtcdError::Config(error) => Some(error),
            EtcdError::Call { status, .. } => Some(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_end_covers_every_key_under_the_prefix() {
        assert_eq!(prefix_end(b"services/echo/"), b"services/echo0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
