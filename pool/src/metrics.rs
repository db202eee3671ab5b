//! Every metric the pool records, by name, in one place.
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade, so they reach whatever
//! recorder the application installed (Prometheus, StatsD, ...), and cost nothing without one.
//! Names follow Prometheus conventions; every series carries the `pool` label (the builder's
//! `name`) and, where it concerns one endpoint, `endpoint` (`http://host:port`).
//!
//! Two live pools never share a name, so their series never mix: a name in use fails the
//! build, except the default one, which the second pool gets as `grpc-pool-2` (and so on).
//! A closed pool gives its name back.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use crate::error::Error;

/// Counter: connection attempts, by `result` (`ok`, `error`).
pub const CONNECTS: &str = "grpc_pool_connects_total";
/// Histogram (seconds): time to open a connection and receive the server's SETTINGS.
pub const CONNECT_DURATION: &str = "grpc_pool_connect_duration_seconds";
/// Counter: members taken out of service, by `reason` (see `EvictionReason::as_str`).
pub const EVICTIONS: &str = "grpc_pool_evictions_total";
/// Counter: checkouts, by `result` (`direct`: a slot was free; `waited`; `timeout`; `closed`;
/// `unhealthy`: every endpoint was unhealthy).
pub const CHECKOUTS: &str = "grpc_pool_checkouts_total";
/// Histogram (seconds): how long checkouts that had to wait waited.
pub const CHECKOUT_WAIT: &str = "grpc_pool_checkout_wait_seconds";
/// Counter: calls sent again on another member because the server never processed them (by
/// `reason`, see `RetryReason::as_str`).
pub const RETRIES: &str = "grpc_pool_retries_total";
/// Counter: calls sent again by their service config's retry policy, by `code` (the status
/// the attempt ended with, `UNAVAILABLE`).
pub const POLICY_RETRIES: &str = "grpc_pool_policy_retries_total";
/// Counter: retryable failures not sent again because retry throttling was at or below half
/// its tokens.
pub const RETRIES_THROTTLED: &str = "grpc_pool_retries_throttled_total";
/// Counter: hedged copies (service config `hedgingPolicy`), by `result`: `sent` (a copy after
/// the first went out), `won` (a copy after the first answered first), `cancelled` (a copy
/// reset because another answered first).
pub const HEDGES: &str = "grpc_pool_hedges_total";
/// Histogram: attempts per call, hedged copies included, for calls under a retry or hedging
/// policy (1 when the first attempt was the last).
pub const CALL_ATTEMPTS: &str = "grpc_pool_call_attempts";
/// Gauge: the retry throttle's tokens (service config `retryThrottling`); sampled every
/// `metrics_interval`.
pub const RETRY_TOKENS: &str = "grpc_pool_retry_tokens";

/// Counter: PINGs of a quiet connection on which a call's deadline passed, by `result`
/// (`ok`: answered; `timeout`: none in time, the connection was killed).
pub const DEADLINE_PINGS: &str = "grpc_pool_deadline_pings_total";
/// Counter: keepalive PINGs, by `result` (`ok`, `timeout`, `error`).
pub const PINGS: &str = "grpc_pool_pings_total";
/// Histogram (seconds): round trip of answered keepalive PINGs.
pub const PING_RTT: &str = "grpc_pool_ping_rtt_seconds";
/// Counter: keepalive time doublings after a server's GOAWAY `too_many_pings`.
pub const KEEPALIVE_BACKOFFS: &str = "grpc_pool_keepalive_backoffs_total";

/// Gauge: 1 while an endpoint is healthy (takes new streams), 0 while it is not.
pub const ENDPOINT_HEALTHY: &str = "grpc_pool_endpoint_healthy";
/// Counter: gRPC health checks, by `result` (`serving`, `not_serving`, `unknown`,
/// `unimplemented`, `error`, `timeout`).
pub const HEALTH_CHECKS: &str = "grpc_pool_health_checks_total";
/// Histogram (seconds): latency of health checks that got an answer.
pub const HEALTH_CHECK_DURATION: &str = "grpc_pool_health_check_duration_seconds";

/// Counter: restarts of the health task after it panicked (keepalive and health checks stop
/// while it is down; the restart tracks the pool afresh).
pub const HEALTH_TASK_RESTARTS: &str = "grpc_pool_health_task_restarts_total";

/// Counter: endpoints ejected by outlier detection.
pub const EJECTIONS: &str = "grpc_pool_ejections_total";
/// Gauge: 1 while outlier detection keeps the endpoint out of routing, 0 after.
pub const ENDPOINT_EJECTED: &str = "grpc_pool_endpoint_ejected";

/// Gauge: with subsetting, endpoints by `state`: `known` (every endpoint the pool was given
/// or discovered), `live` (the subset: in routing, with connections), `displaced` (held out
/// of the subset after they could not take calls for `replace_after`); sampled every
/// `metrics_interval`.
pub const SUBSET_ENDPOINTS: &str = "grpc_pool_subset_endpoints";
/// Counter: with subsetting, live endpoints displaced from the subset (the next endpoint in
/// the order took their place).
pub const SUBSET_DISPLACEMENTS: &str = "grpc_pool_subset_displacements_total";

/// Counter: connects not made because `max_total_connections` was reached (a connect task
/// that found no room, or a build's connect beyond the cap).
pub const BUDGET_REFUSALS: &str = "grpc_pool_budget_refusals_total";

/// Gauge: connections per endpoint, by `state` (`ready`, `draining`, `connecting`); sampled
/// every `metrics_interval`.
pub const CONNECTIONS: &str = "grpc_pool_connections";
/// Gauge: streams in flight per endpoint; sampled every `metrics_interval`.
pub const IN_FLIGHT: &str = "grpc_pool_in_flight_streams";
/// Gauge: checkouts waiting for a slot; sampled every `metrics_interval`.
pub const WAITERS: &str = "grpc_pool_waiters";

/// Counter: endpoint changes an `EtcdDiscover` (facade feature `etcd`) passed on to its
/// pool, by `change` (`insert`, `remove`) and `prefix` (the key prefix it watches).
pub const ETCD_CHANGES: &str = "grpc_pool_etcd_changes_total";
/// Counter: etcd values an `EtcdDiscover` skipped because they name no usable endpoint (not
/// JSON, no address, an unsupported scheme), by `prefix`; each value once.
pub const ETCD_BAD_VALUES: &str = "grpc_pool_etcd_bad_values_total";
/// Counter: an `EtcdDiscover`'s failed lists and lost watches, each followed by a reconnect
/// after a backoff (the endpoints stay as they were meanwhile), by `prefix`.
pub const ETCD_RECONNECTS: &str = "grpc_pool_etcd_reconnects_total";
/// Counter: an `EtcdDiscover`'s full re-lists after etcd compacted the history its watch
/// needed, by `prefix`.
pub const ETCD_RELISTS: &str = "grpc_pool_etcd_relists_total";
/// Gauge: 1 while an `EtcdDiscover`'s watch is established, 0 while it reconnects and once
/// the stream is dropped, by `prefix`.
pub const ETCD_WATCHING: &str = "grpc_pool_etcd_watching";
/// Counter: lease renewals of etcd registrations (`register`), by `result` (`ok`; `error`:
/// the keepalive stream failed and is opened again; `lost`: the lease expired and the key is
/// registered again under a new one).
pub const ETCD_KEEPALIVES: &str = "grpc_pool_etcd_keepalives_total";
/// Counter: sign-ins of etcd clients with a user and password (`EtcdClient::with_user`), by
/// `result` (`ok`: a new token; `error`: refused, or etcd unreachable). After the first, each
/// `ok` means etcd stopped taking the previous token (it expired unused, or the users or
/// roles changed).
pub const ETCD_AUTHENTICATIONS: &str = "grpc_pool_etcd_authentications_total";
/// Counter: etcd calls that got no answer within the etcd client's call timeout
/// (`EtcdClient::with_call_timeout`, `[etcd] call_timeout`), by `op` (`put`, `delete`,
/// `range`, `compact`, `lease grant`, `lease revoke`, `authenticate`, `watch`: a watch's
/// creation).
pub const ETCD_CALL_TIMEOUTS: &str = "grpc_pool_etcd_call_timeouts_total";
/// Gauge: the resources an xDS client (facade feature `xds`) holds for a target, by `type`
/// (`lds`, `rds`, `cds`, `eds`) and `state` (`requested`: asked for, not yet received;
/// `acked`; `nacked`: its last version refused, the one before kept; `does_not_exist`).
pub const XDS_RESOURCES: &str = "grpc_pool_xds_resources";
/// Counter: xDS responses by `type` and `result` (`ack`: every resource in it taken; `nack`:
/// one or more refused, named in the NACK's error detail).
pub const XDS_RESPONSES: &str = "grpc_pool_xds_responses_total";
/// Counter: ADS streams made again after one broke or could not start.
pub const XDS_RECONNECTS: &str = "grpc_pool_xds_stream_reconnects_total";
/// Gauge: 1 while the xDS client's ADS stream is up, 0 while it reconnects.
pub const XDS_CONNECTED: &str = "grpc_pool_xds_connected";

/// Label: the pool's name.
pub const LABEL_POOL: &str = "pool";
/// Label: the endpoint, as `http://host:port`.
pub const LABEL_ENDPOINT: &str = "endpoint";
/// Label: an outcome (`ok`, `error`, `direct`, `waited`, `timeout`, `closed`).
pub const LABEL_RESULT: &str = "result";
/// Label: a connection's state (`ready`, `draining`, `connecting`).
pub const LABEL_STATE: &str = "state";
/// Label: a gRPC status code's name (`UNAVAILABLE`).
pub const LABEL_CODE: &str = "code";
/// Label: why something happened (an eviction or retry reason).
pub const LABEL_REASON: &str = "reason";
/// Label: the etcd key prefix an `EtcdDiscover` watches.
pub const LABEL_PREFIX: &str = "prefix";
/// Label: an endpoint change (`insert`, `remove`).
pub const LABEL_CHANGE: &str = "change";
/// Label: an etcd call (`put`, `range`, `lease grant`, ...).
pub const LABEL_OP: &str = "op";
/// Label: an xDS target's listener name (`echo.prod:50051` for `xds:///echo.prod:50051`).
pub const LABEL_TARGET: &str = "target";
/// Label: an xDS resource type (`lds`, `rds`, `cds`, `eds`).
pub const LABEL_TYPE: &str = "type";

/// A live pool's hold on its name; dropping it frees the name.
#[derive(Debug)]
pub(crate) struct PoolName(String);

fn live_names() -> &'static Mutex<HashSet<String>> {
    static NAMES: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

impl PoolName {
    /// Claims `wanted` for a new pool; returns the name it gets. A `numbered` name (the
    /// default one) takes the first free `-N` suffix when taken; any other name in use is an
    /// error.
    pub(crate) fn claim(wanted: &str, numbered: bool) -> Result<(PoolName, String), Error> {
        let mut names = live_names().lock().unwrap_or_else(|e| e.into_inner());
        let name = if numbered {
            let mut name = wanted.to_owned();
            let mut n = 2;
            while names.contains(&name) {
                name = format!("{wanted}-{n}");
                n += 1;
            }
            name
        } else if names.contains(wanted) {
            return Err(Error::config(
                "name",
                &format!("`{wanted}` is the name of another live pool"),
                "a name no live pool has (it labels the pool's metric series and logs)",
            ));
        } else {
            wanted.to_owned()
        };
        names.insert(name.clone());
        Ok((PoolName(name.clone()), name))
    }
}

impl Drop for PoolName {
    fn drop(&mut self) {
        live_names().lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
    }
}
