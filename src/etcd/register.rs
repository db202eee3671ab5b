//! [`register`]: a server's key in etcd, alive with a lease while the server is.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grpc_pool_core::metrics as m;
use tokio::sync::mpsc;

use super::discover::Requests;
use super::proto;
use super::proto::lease_client::LeaseClient;
use super::{Backoff, EtcdClient, EtcdError};
use crate::Error;

/// Registers a server: puts `key` = `value` in etcd under a lease of `ttl` (1 s to 9e9 s,
/// rounded up to whole seconds) and keeps the lease alive in the background.
///
/// Dropping the returned [`Registration`] (or [`Registration::deregister`], which waits for
/// it) deletes the key at once; a process that dies without either leaves the key until the
/// lease expires, `ttl` later. If the lease is lost anyway (etcd was away for longer than
/// `ttl`), the key is registered again under a new one as soon as etcd is back.
///
/// `value` is what [`EtcdDiscover`](super::EtcdDiscover) reads: `host:port`, a URI, or etcd's
/// naming JSON (`{"Addr": "host:port"}`).
///
/// ```no_run
/// use std::time::Duration;
/// # async fn run(etcd: grpc_pool::etcd::EtcdClient) -> Result<(), grpc_pool::etcd::EtcdError> {
/// let registration = grpc_pool::etcd::register(&etcd, "services/echo/10.0.0.7:50051", r#"{"Addr":"10.0.0.7:50051"}"#, Duration::from_secs(10)).await?;
/// // ... serve ...
/// registration.deregister().await?;
/// # Ok(()) }
/// ```
pub async fn register(
    client: &EtcdClient,
    key: &str,
    value: &str,
    ttl: Duration,
) -> Result<Registration, EtcdError> {
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(9_000_000_000) {
        return Err(Error::invalid_config("etcd.ttl", &format!("{ttl:?}"), "1s to 9000000000s").into());
    }
    let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let keeper = Keeper {
        client: client.clone(),
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        ttl_secs: ttl_secs as i64,
        lease: Arc::new(AtomicI64::new(0)),
    };
    keeper.grant_and_put().await?;
    let lease = keeper.lease.clone();
    let task = tokio::spawn(keeper.keep_alive());
    Ok(Registration { client: client.clone(), key: key.to_owned(), lease, task: Some(task) })
}

/// A server's registration in etcd (see [`register`]): dropping it deletes the key.
pub struct Registration {
    client: EtcdClient,
    key: String,
    /// The lease the key lives under now (a new one after a lost lease).
    lease: Arc<AtomicI64>,
    /// The keepalive task; `None` once deregistered.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Registration {
    /// The registered key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The id of the lease the key lives under now.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// Deletes the key and revokes the lease, and returns when etcd has done both.
    pub async fn deregister(mut self) -> Result<(), EtcdError> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        remove(&self.client, &self.key, self.lease.load(Ordering::Relaxed)).await
    }
}

/// Deletes the key, then revokes its lease (which would delete it too, but a key put again
/// without the lease would stay).
async fn remove(client: &EtcdClient, key: &str, lease: i64) -> Result<(), EtcdError> {
    client.delete(key).await?;
    let revoked = client
        .unary("lease revoke", |channel| async move {
            LeaseClient::new(channel).lease_revoke(proto::LeaseRevokeRequest { id: lease }).await
        })
        .await;
    match revoked {
        Ok(_) => Ok(()),
        // Expired or revoked already: the key is gone either way.
        Err(EtcdError::Call { status, .. }) if status.code() == tonic::Code::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        task.abort();
        let (client, key, lease) =
            (self.client.clone(), self.key.clone(), self.lease.load(Ordering::Relaxed));
        // Outside a runtime (it is shutting down) nothing can be sent: the lease expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = remove(&client, &key, lease).await {
                    tracing::warn!(key, error = %error, "etcd deregistration failed; the key goes when its lease expires");
                }
            });
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("lease", &self.lease_id())
            .finish_non_exhaustive()
    }
}

/// The background task that renews a registration's lease.
struct Keeper {
    client: EtcdClient,
    key: String,
    value: Vec<u8>,
    ttl_secs: i64,
    lease: Arc<AtomicI64>,
}

impl Keeper {
    /// A new lease, and the key put under it.
    async fn grant_and_put(&self) -> Result<(), EtcdError> {
        let request = proto::LeaseGrantRequest { ttl: self.ttl_secs, id: 0 };
        let granted =
            self.client
                .unary("lease grant", |channel| async move {
                    LeaseClient::new(channel).lease_grant(request).await
                })
                .await?;
        if !granted.error.is_empty() {
            return Err(EtcdError::call("lease grant", tonic::Status::unavailable(granted.error)));
        }
        self.client.put_with_lease(&self.key, &self.value, granted.id).await?;
        self.lease.store(granted.id, Ordering::Relaxed);
        Ok(())
    }

    /// Renews the lease every third of its TTL, for ever (the task is aborted to stop).
    async fn keep_alive(self) {
        let period = Duration::from_millis((self.ttl_secs as u64 * 1000 / 3).max(100));
        let mut backoff = Backoff::new(Duration::from_millis(100), period.max(Duration::from_millis(200)));
        let mut lost = false;
        loop {
            if lost {
                match self.grant_and_put().await {
                    Ok(()) => {
                        tracing::info!(key = %self.key, lease = self.lease.load(Ordering::Relaxed), "etcd registration renewed under a new lease");
                        lost = false;
                    }
                    Err(error) => {
                        tracing::warn!(key = %self.key, error = %error, "etcd registration lost; registering again");
                        tokio::time::sleep(backoff.next_wait()).await;
                        continue;
                    }
                }
            }
            match self.renew(period, &mut backoff).await {
                Renewal::Lost => {
                    metrics::counter!(m::ETCD_KEEPALIVES, m::LABEL_RESULT => "lost").increment(1);
                    tracing::warn!(key = %self.key, "etcd lease expired; registering again");
                    lost = true;
                }
                Renewal::Failed(error) => {
                    metrics::counter!(m::ETCD_KEEPALIVES, m::LABEL_RESULT => "error").increment(1);
                    let wait = backoff.next_wait();
                    tracing::warn!(key = %self.key, error = %error, retry_in = ?wait, "etcd lease keepalive failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One keepalive stream, until it fails or the lease is gone.
    async fn renew(&self, period: Duration, backoff: &mut Backoff) -> Renewal {
        let (requests, request_stream) = mpsc::channel(1);
        // The first renewal goes with the call: etcd sends its response head only with its
        // first answer, so the call would wait for it for ever with nothing sent.
        let _ = requests.try_send(proto::LeaseKeepAliveRequest { id: self.lease.load(Ordering::Relaxed) });
        let answer_within = period.max(Duration::from_secs(1));
        let token = match tokio::time::timeout(answer_within, self.client.token()).await {
            Ok(Ok(token)) => token,
            Ok(Err(error)) => return Renewal::Failed(error.to_string()),
            Err(_) => return Renewal::Failed("no token in time".to_owned()),
        };
        let mut client = LeaseClient::new(self.client.channel(token.clone()));
        let opened =
            tokio::time::timeout(answer_within, client.lease_keep_alive(Requests(request_stream))).await;
        let mut responses = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                self.client.token_rejected(&status, &token);
                return Renewal::Failed(format!("{:?}: {}", status.code(), status.message()));
            }
            Err(_) => return Renewal::Failed("no keepalive answer in time".to_owned()),
        };
        let mut ticks = tokio::time::interval(period);
        ticks.tick().await;
        loop {
            let answer = tokio::time::timeout(answer_within, responses.message()).await;
            match answer {
                Ok(Ok(Some(response))) if response.ttl > 0 => {
                    metrics::counter!(m::ETCD_KEEPALIVES, m::LABEL_RESULT => "ok").increment(1);
                    backoff.reset();
                }
                Ok(Ok(Some(_))) => return Renewal::Lost,
                Ok(Ok(None)) => return Renewal::Failed("etcd ended the keepalive stream".to_owned()),
                Ok(Err(status)) => {
                    self.client.token_rejected(&status, &token);
                    return Renewal::Failed(format!("{:?}: {}", status.code(), status.message()));
                }
                Err(_) => return Renewal::Failed("no keepalive answer in time".to_owned()),
            }
            ticks.tick().await;
            let id = self.lease.load(Ordering::Relaxed);
            if requests.send(proto::LeaseKeepAliveRequest { id }).await.is_err() {
                return Renewal::Failed("the keepalive stream closed".to_owned());
            }
        }
    }
}

/// How a keepalive stream ended.
enum Renewal {
    Lost,
    Failed(String),
}
