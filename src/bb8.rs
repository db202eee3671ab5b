//! A `bb8::ManageConnection` for one endpoint's HTTP/2 connections, for code that already
//! pools with bb8 (cargo feature `bb8`).
//!
//! Each bb8 connection is one HTTP/2 connection to the endpoint, usable as a `tower::Service`
//! by any tonic client. `is_valid` PINGs it (bb8 calls it on checkout when
//! `test_on_check_out` is on), and `has_broken` sees a GOAWAY or a dead connection, so bb8
//! drops it instead of handing it out.
//!
//! When to use it: when bb8 is how your service pools everything and you want its
//! semantics (one connection per checkout, its own sizing and timeouts). When not to: for
//! throughput. An HTTP/2 connection carries a hundred streams at once, and bb8 hands each
//! connection to one caller at a time; with more callers than connections, bb8's wake-up order
//! starves most of them (see the load comparison in `docs/benchmarks.md`: at 256 callers, 83 of 256 got
//! no call through in 4 s). [`Pool`](crate::Pool) multiplexes calls over its connections,
//! queues fairly, retries what the server never processed, and keeps connections healthy in the
//! background.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use grpc_pool::bb8::Http2ConnectionManager;
//! let manager = Http2ConnectionManager::new("http://127.0.0.1:50051")?;
//! let pool = bb8::Pool::builder().max_size(4).test_on_check_out(true).build(manager).await?;
//! let connection = pool.get().await?;
//! // `connection.clone()` is a `tower::Service` for a tonic client:
//! // `EchoClient::new(connection.clone())`.
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::state::MemberState;
use crate::{Endpoint, Error};

/// Opens, checks and retires HTTP/2 connections to one endpoint for a bb8 pool.
#[derive(Debug, Clone)]
pub struct Http2ConnectionManager {
    endpoint: Endpoint,
    builder: crate::Builder,
    ping_timeout: Duration,
}

/// The numbers in the names of the bb8 connections' pools (`<name> bb8 #<n>`), by manager
/// name: each connection is a one-connection pool, pool names (the metric series' `pool`
/// label) are unique, and a new connection takes the lowest number free, so that a process
/// churning connections has as many series as it ever had connections open at once.
static NUMBERS: Mutex<BTreeMap<String, BTreeSet<u64>>> = Mutex::new(BTreeMap::new());

/// One connection's number, given back when the last clone of the connection drops.
struct Number {
    name: String,
    n: u64,
}

impl Number {
    fn take(name: &str) -> Number {
        let mut numbers = NUMBERS.lock().unwrap_or_else(|e| e.into_inner());
        let taken = numbers.entry(name.to_owned()).or_default();
        let n = (1..).find(|n| !taken.contains(n)).unwrap_or(u64::MAX);
        taken.insert(n);
        Number { name: name.to_owned(), n }
    }
}

impl Drop for Number {
    fn drop(&mut self) {
        let mut numbers = NUMBERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(taken) = numbers.get_mut(&self.name) {
            taken.remove(&self.n);
            if taken.is_empty() {
                numbers.remove(&self.name);
            }
        }
    }
}

impl Http2ConnectionManager {
    /// Connections to `uri` (`http://host:port`, `https://...`, `unix:///path`) with the
    /// builder's defaults.
    pub fn new(uri: &str) -> Result<Http2ConnectionManager, Error> {
        Ok(Http2ConnectionManager {
            endpoint: Endpoint::parse(uri)?,
            builder: crate::Builder::default(),
            ping_timeout: Duration::from_secs(5),
        })
    }

    /// Connection settings (timeouts, HTTP/2 windows, TLS, the name...). Pool sizes are
    /// ignored: each bb8 connection is exactly one HTTP/2 connection; so are the health
    /// task's settings (keepalive, health checks, eviction), which are bb8's business here.
    /// Each connection is named `<name> bb8 #n`, `n` counting every connection opened.
    pub fn settings(mut self, builder: crate::Builder) -> Self {
        self.builder = builder;
        self
    }

    /// How long `is_valid` waits for the PONG. Default 5 s.
    pub fn ping_timeout(mut self, timeout: Duration) -> Self {
        self.ping_timeout = timeout;
        self
    }
}

/// One HTTP/2 connection handed out by bb8. Clone it into a tonic client; clones share the
/// connection. If it dies while a caller holds it, its next call opens a new connection
/// rather than failing; bb8 drops it when it comes back (`has_broken`).
#[derive(Clone)]
pub struct Http2Connection {
    // A one-connection core pool: the same request path, stream limits and GOAWAY handling as
    // the pool's members, without growing (max 1) or reconnecting (min 0) on its own, which
    // is bb8's job here.
    pool: grpc_pool_core::Pool,
    // Dropped after `pool` (fields drop in order), which gives its name back as it closes, so
    // the number is never free while its name is still taken.
    _number: Arc<Number>,
}

impl Http2Connection {
    fn member(&self) -> Option<grpc_pool_core::MemberHandle> {
        self.pool.monitor().members().into_iter().next()
    }

    /// Whether the connection still takes calls.
    pub fn is_ready(&self) -> bool {
        self.member().is_some_and(|m| m.state() == MemberState::Ready)
    }
}

impl fmt::Debug for Http2Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Connection")
            .field("pool", &self.pool.name())
            .field("ready", &self.is_ready())
            .finish()
    }
}

crate::service_through_core_pool!(Http2Connection, pool);

impl bb8::ManageConnection for Http2ConnectionManager {
    type Connection = Http2Connection;
    type Error = Error;

    async fn connect(&self) -> Result<Http2Connection, Error> {
        let number = Number::take(&self.builder.config().name);
        let mut config = self.builder.config().split()?.0;
        config.name = format!("{} bb8 #{}", number.name, number.n);
        config.min_connections = 0;
        config.max_connections = 1;
        let pool = grpc_pool_core::Builder::from_config(config).build([self.endpoint.to_string()]).await?;
        Ok(Http2Connection { pool, _number: Arc::new(number) })
    }

    async fn is_valid(&self, connection: &mut Http2Connection) -> Result<(), Error> {
        let label = self.endpoint.to_string();
        let Some(member) = connection.member().filter(|m| m.state() == MemberState::Ready) else {
            return Err(Error::connection_unusable(&label, "closed (GOAWAY, or the connection ended)"));
        };
        // No PONG in time closes the connection (`ping_timeout`), so bb8 drops it.
        member.ping(self.ping_timeout).await.map(|_| ())
    }

    fn has_broken(&self, connection: &mut Http2Connection) -> bool {
        !connection.is_ready()
    }
}
