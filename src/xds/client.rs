//! The ADS stream: one state-of-the-world `StreamAggregatedResources` call to the control
//! plane, the subscriptions a target needs (LDS, then RDS, CDS and EDS as each answer names
//! the next), ACK and NACK, the does-not-exist timer, and reconnects that keep what was
//! learned. Its output is the endpoint set of the target's cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf as pb;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use grpc_pool_core::discover::{Change, Weighted};
use grpc_pool_core::metrics as m;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::bootstrap::Node;
use super::resources::{self, ClusterPolicy, Invalid, Kind, Resource, RouteSource};
use super::XdsStatus;
use crate::reconnect::Backoff;
use crate::{Endpoint, Pool};

/// gRFC A27: a subscribed resource that no response has carried this long after it was
/// requested does not exist.
pub(crate) const DOES_NOT_EXIST_AFTER: Duration = Duration::from_secs(15);

/// How often the client looks at which of its endpoints the pool finds failing.
const POOL_LOOK: Duration = Duration::from_millis(200);

/// One subscription per resource type.
#[derive(Debug, Default)]
struct Subscription {
    names: BTreeSet<String>,
    /// The version of the last response accepted (sent back in every request of the type).
    version: String,
    /// The nonce of the last response of the type on this stream.
    nonce: String,
}

/// What is known of one resource.
#[derive(Debug)]
struct Known {
    /// The last good version of it (kept when a later one is NACKed).
    resource: Option<Resource>,
    /// The problem with the last one received, if it was refused.
    refused: Option<String>,
    /// The control plane said (or its silence did) that it does not exist.
    missing: bool,
    /// When the does-not-exist timer runs out, while it runs.
    deadline: Option<Instant>,
}

/// The ADS client's state: what it subscribes to, what it holds, what it told the pool.
pub(crate) struct AdsState {
    /// The listener's name (the target's path), also the authority virtual hosts match.
    target: String,
    subscriptions: BTreeMap<Kind, Subscription>,
    known: HashMap<(Kind, String), Known>,
    /// The endpoints passed to the pool, with their weights.
    published: BTreeMap<String, u32>,
    /// Those the pool finds failing, as last looked at: unhealthy for the priorities.
    failing: std::collections::HashSet<String>,
    /// Why the target resolves to no endpoint, while it does not.
    broken: Option<String>,
}

/// How the target resolves at the moment.
#[derive(Debug, PartialEq)]
enum Resolution {
    /// The endpoints of its cluster that take calls, with their weights.
    Endpoints(Vec<(String, u32)>),
    /// A resource on the way is still awaited: keep what the pool has.
    Pending,
    /// A resource on the way does not exist (or names nothing that does): the pool keeps no
    /// endpoint, so calls fail with the reason rather than go to a stale set.
    Broken(String),
}

impl AdsState {
    pub(crate) fn new(target: &str) -> AdsState {
        let mut state = AdsState {
            target: target.to_owned(),
            subscriptions: Kind::ALL.iter().map(|k| (*k, Subscription::default())).collect(),
            known: HashMap::new(),
            published: BTreeMap::new(),
            failing: Default::default(),
            broken: None,
        };
        state.subscriptions.get_mut(&Kind::Listener).expect("every kind").names.insert(target.to_owned());
        state
    }

    fn resource(&self, kind: Kind, name: &str) -> Result<Option<&Resource>, String> {
        match self.known.get(&(kind, name.to_owned())) {
            Some(k) if k.missing => Err(format!("{kind} resource {name:?} does not exist")),
            Some(k) => Ok(k.resource.as_ref()),
            None => Ok(None),
        }
    }

    /// The policies of the clusters the target resolves to now (none while it does not).
    fn clusters_in_use(&self) -> Vec<&ClusterPolicy> {
        let mut clusters = Vec::new();
        self.walk(&mut BTreeMap::new(), &mut clusters);
        clusters
    }

    /// Walks listener -> routes -> cluster -> endpoints, noting the names each step needs.
    fn resolve(&self, wanted: &mut BTreeMap<Kind, BTreeSet<String>>) -> Resolution {
        self.walk(wanted, &mut Vec::new())
    }

    fn walk<'a>(
        &'a self,
        wanted: &mut BTreeMap<Kind, BTreeSet<String>>,
        in_use: &mut Vec<&'a ClusterPolicy>,
    ) -> Resolution {
        let mut want = |kind: Kind, name: &str| {
            wanted.entry(kind).or_default().insert(name.to_owned());
        };
        want(Kind::Listener, &self.target);
        let listener = match self.resource(Kind::Listener, &self.target) {
            Ok(Some(Resource::Listener(l))) => l,
            Ok(_) => return Resolution::Pending,
            Err(e) => return Resolution::Broken(e),
        };
        let table = match listener {
            RouteSource::Inline(table) => table,
            RouteSource::Rds(name) => {
                want(Kind::Route, name);
                match self.resource(Kind::Route, name) {
                    Ok(Some(Resource::Route(t))) => t,
                    Ok(_) => return Resolution::Pending,
                    Err(e) => return Resolution::Broken(e),
                }
            }
        };
        let Some(host) = resources::virtual_host(table, &self.target) else {
            return Resolution::Broken(format!("no virtual host's domains match {:?}", self.target));
        };
        // Each cluster of the route (one, or weighted clusters) and its endpoints; the
        // endpoints of all go to the pool, weighed by their cluster's share of the calls.
        let (mut pending, mut broken, mut resolved) = (false, Vec::new(), Vec::new());
        for (name, weight) in host.clusters.iter().filter(|(_, w)| *w > 0) {
            want(Kind::Cluster, name);
            let cluster = match self.resource(Kind::Cluster, name) {
                Ok(Some(Resource::Cluster(c))) => c,
                Ok(_) => {
                    pending = true;
                    continue;
                }
                Err(e) => {
                    broken.push(e);
                    continue;
                }
            };
            want(Kind::Endpoints, &cluster.eds_name);
            match self.resource(Kind::Endpoints, &cluster.eds_name) {
                Ok(Some(Resource::Endpoints(a))) => {
                    in_use.push(cluster);
                    resolved.push((*weight, a.in_use(&self.failing)));
                }
                Ok(_) => pending = true,
                Err(e) => broken.push(e),
            }
        }
        if pending {
            return Resolution::Pending;
        }
        if resolved.is_empty() {
            return Resolution::Broken(broken.join("; "));
        }
        // A cluster that does not exist gives its share to the others.
        let total: f64 = resolved.iter().map(|(w, _)| f64::from(*w)).sum();
        let mut merged: BTreeMap<String, f64> = BTreeMap::new();
        for (weight, endpoints) in resolved {
            for (address, share) in endpoints {
                *merged.entry(address).or_default() += f64::from(weight) / total * f64::from(share);
            }
        }
        Resolution::Endpoints(merged.into_iter().map(|(a, w)| (a, (w.round() as u32).max(1))).collect())
    }

    /// Applies a response: every resource in it that passes its checks is taken, the others
    /// keep their last good version. Returns the request that ACKs it (all passed) or NACKs
    /// it (the problems in `error_detail`), and whether anything changed.
    fn apply(&mut self, response: &DiscoveryResponse) -> Option<(DiscoveryRequest, Vec<Invalid>)> {
        let kind = Kind::from_type_url(&response.type_url)?;
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();
        // A response may carry resources no longer (or never) asked for: a reply to an
        // earlier subscription crossing the request that changed it. They are read past.
        let subscribed = |name: &str| self.subscriptions[&kind].names.contains(name);
        let decoded: Vec<Result<(String, Resource), Invalid>> = response
            .resources
            .iter()
            .map(|any| resources::decode(kind, any))
            .filter(|r| match r {
                Ok((name, _)) => subscribed(name),
                Err(invalid) => invalid.name.as_deref().is_none_or(subscribed),
            })
            .collect();
        for decoded in decoded {
            match decoded {
                Ok((name, resource)) => {
                    seen.insert(name.clone());
                    let known = self.known_mut(kind, &name);
                    known.resource = Some(resource);
                    known.refused = None;
                    known.missing = false;
                    known.deadline = None;
                }
                Err(invalid) => {
                    if let Some(name) = &invalid.name {
                        seen.insert(name.clone());
                        let known = self.known_mut(kind, name);
                        known.refused = Some(invalid.problem.clone());
                        known.deadline = None;
                    }
                    problems.push(invalid);
                }
            }
        }
        let subscription = &self.subscriptions[&kind];
        // LDS and CDS responses list all that exist: a subscribed one left out was deleted,
        // if it had come before (one asked for since may be missing from a response to the
        // subscription before it: its does-not-exist timer decides, as in the C core). Not
        // when a resource in it could not even be named: that one may be the one left out.
        let unnamed = problems.iter().any(|p| p.name.is_none());
        if kind.complete_in_each_response() && !unnamed {
            for name in subscription.names.clone() {
                let held = self.known.get(&(kind, name.clone())).is_some_and(|k| k.resource.is_some());
                if !seen.contains(&name) && held {
                    let known = self.known_mut(kind, &name);
                    known.resource = None;
                    known.refused = None;
                    known.missing = true;
                    known.deadline = None;
                }
            }
        }
        let subscription = self.subscriptions.get_mut(&kind).expect("every kind");
        subscription.nonce = response.nonce.clone();
        if problems.is_empty() {
            subscription.version = response.version_info.clone();
        }
        let mut request = self.request(kind);
        if !problems.is_empty() {
            let message = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            request.error_detail =
                Some(RpcStatus { code: tonic::Code::InvalidArgument as i32, message, details: vec![] });
        }
        Some((request, problems))
    }

    fn known_mut(&mut self, kind: Kind, name: &str) -> &mut Known {
        self.known.entry((kind, name.to_owned())).or_insert(Known {
            resource: None,
            refused: None,
            missing: false,
            deadline: None,
        })
    }

    /// The request of `kind` as things stand: its names, last accepted version and nonce.
    fn request(&self, kind: Kind) -> DiscoveryRequest {
        let subscription = &self.subscriptions[&kind];
        DiscoveryRequest {
            version_info: subscription.version.clone(),
            resource_names: subscription.names.iter().cloned().collect(),
            type_url: kind.type_url().to_owned(),
            response_nonce: subscription.nonce.clone(),
            ..DiscoveryRequest::default()
        }
    }

    /// Resolves the target and moves the subscriptions to what it needs now. Returns the
    /// requests for the types whose names changed, and the endpoint set if it changed.
    fn settle(&mut self, now: Instant) -> (Vec<DiscoveryRequest>, Option<BTreeMap<String, u32>>) {
        let mut wanted: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
        let resolution = self.resolve(&mut wanted);
        let mut requests = Vec::new();
        for kind in Kind::ALL {
            let names = wanted.remove(&kind).unwrap_or_default();
            let subscription = self.subscriptions.get_mut(&kind).expect("every kind");
            if subscription.names == names {
                continue;
            }
            let dropped: Vec<String> = subscription.names.difference(&names).cloned().collect();
            let added: Vec<String> = names.difference(&subscription.names).cloned().collect();
            subscription.names = names;
            for name in dropped {
                self.known.remove(&(kind, name));
            }
            for name in added {
                let known = self.known_mut(kind, &name);
                if known.resource.is_none() && !known.missing {
                    known.deadline = Some(now + DOES_NOT_EXIST_AFTER);
                }
            }
            requests.push(self.request(kind));
        }
        let endpoints = match resolution {
            Resolution::Pending => None,
            Resolution::Endpoints(list) => {
                self.broken = None;
                Some(list.into_iter().collect())
            }
            Resolution::Broken(why) => {
                self.broken = Some(why);
                Some(BTreeMap::new())
            }
        };
        let changed = endpoints.filter(|set| *set != self.published);
        (requests, changed)
    }

    /// Every subscribed resource not yet received starts its does-not-exist timer again (a
    /// new stream: gRFC A27 runs the timer from the request).
    fn restart_timers(&mut self, now: Instant) {
        let subscribed: Vec<(Kind, String)> = self
            .subscriptions
            .iter()
            .flat_map(|(kind, s)| s.names.iter().map(|n| (*kind, n.clone())))
            .collect();
        for (kind, name) in subscribed {
            let known = self.known_mut(kind, &name);
            if known.resource.is_none() && !known.missing {
                known.deadline = Some(now + DOES_NOT_EXIST_AFTER);
            }
        }
    }

    /// A new stream: the nonces of the last one mean nothing on it.
    fn forget_nonces(&mut self) {
        for subscription in self.subscriptions.values_mut() {
            subscription.nonce.clear();
        }
    }

    fn stop_timers(&mut self) {
        for known in self.known.values_mut() {
            known.deadline = None;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.known.values().filter_map(|k| k.deadline).min()
    }

    /// Resources whose timer ran out by `now` do not exist.
    fn expire(&mut self, now: Instant) -> Vec<(Kind, String)> {
        let mut expired = Vec::new();
        for ((kind, name), known) in &mut self.known {
            if known.deadline.is_some_and(|d| d <= now) {
                known.deadline = None;
                known.missing = true;
                expired.push((*kind, name.clone()));
            }
        }
        expired.sort();
        expired
    }

    /// The first request of each type with names, for a new stream.
    fn initial_requests(&self) -> Vec<DiscoveryRequest> {
        Kind::ALL
            .into_iter()
            .filter(|k| !self.subscriptions[k].names.is_empty())
            .map(|k| DiscoveryRequest { response_nonce: String::new(), ..self.request(k) })
            .collect()
    }

    /// What the status shows of each resource.
    fn resource_states(&self) -> Vec<super::XdsResource> {
        let mut out: Vec<super::XdsResource> = self
            .known
            .iter()
            .map(|((kind, name), known)| super::XdsResource {
                kind: kind.label(),
                name: name.clone(),
                state: if known.missing {
                    "does_not_exist"
                } else if known.refused.is_some() {
                    "nacked"
                } else if known.resource.is_some() {
                    "acked"
                } else {
                    "requested"
                },
                error: known.refused.clone(),
                version: if known.resource.is_some() {
                    self.subscriptions[kind].version.clone()
                } else {
                    String::new()
                },
            })
            .collect();
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        out
    }
}

/// The request side of the stream: what the client sends, as a `Stream` for tonic.
struct Requests(mpsc::UnboundedReceiver<DiscoveryRequest>);

impl futures_core::Stream for Requests {
    type Item = DiscoveryRequest;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DiscoveryRequest>> {
        self.0.poll_recv(cx)
    }
}

/// The task behind an `XdsDiscover`: runs ADS streams until the pool it feeds is gone.
pub(crate) struct AdsClient {
    pub(crate) pool: Pool,
    pub(crate) node: Node,
    pub(crate) state: AdsState,
    pub(crate) changes: mpsc::Sender<Change<String, Weighted>>,
    pub(crate) status: XdsStatus,
    pub(crate) backoff: Backoff,
    /// The pool the cluster's policy goes to, if any.
    pub(crate) policy: Option<grpc_pool_core::PoolMonitor>,
    /// The cluster policy last given to the pool (`None`: none given yet).
    pub(crate) applied: Option<AppliedPolicy>,
    /// The endpoints given to the pool, parsed once, for the looks at the pool.
    pub(crate) parsed: HashMap<String, Endpoint>,
    /// Whether the current stream is up (its requests went out).
    pub(crate) on_stream: bool,
}

impl AdsClient {
    pub(crate) async fn run(mut self) {
        let mut first = true;
        loop {
            if !first {
                metrics::counter!(m::XDS_RECONNECTS, m::LABEL_TARGET => self.state.target.clone())
                    .increment(1);
            }
            first = false;
            // A clone to watch for the pool's end while the stream borrows `self`.
            let changes = self.changes.clone();
            let answered = tokio::select! {
                biased;
                _ = changes.closed() => return,
                answered = self.stream() => answered,
            };
            self.state.stop_timers();
            self.status.update(|s| s.connected = false);
            metrics::gauge!(m::XDS_CONNECTED, m::LABEL_TARGET => self.state.target.clone()).set(0.0);
            if answered {
                self.backoff.reset();
            }
            let wait = self.backoff.next_wait();
            tracing::info!(target_name = %self.state.target, wait = ?wait, "xDS stream ended; the endpoints stay as they are, reconnecting");
            let changes = self.changes.clone();
            tokio::select! {
                biased;
                _ = changes.closed() => return,
                _ = self.watching(tokio::time::sleep(wait), false) => {}
            }
        }
    }

    /// Runs `work` while looking at the pool's endpoints every `POOL_LOOK` (a priority
    /// failover must not wait for the control plane to be back). With `starting` (a stream
    /// being made), the stream counts as up once the control plane's connection is ready,
    /// and the does-not-exist timers run from then. Requests made meanwhile go nowhere: the
    /// next stream starts with every subscription.
    async fn watching<T>(&mut self, work: impl std::future::Future<Output = T>, starting: bool) -> T {
        tokio::pin!(work);
        let (nowhere, _) = mpsc::unbounded_channel();
        let mut looks = looks();
        loop {
            let deadline = self.state.next_deadline().filter(|_| starting && self.on_stream);
            let timer = sleep_until(deadline);
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = looks.tick() => {
                    if starting && !self.on_stream && self.control_plane_ready() {
                        self.stream_up();
                    }
                    self.look_at_pool(&nowhere).await;
                }
                _ = timer => self.expire(&nowhere).await,
            }
        }
    }

    /// Whether the control plane's pool has a ready connection (so a stream's requests go out).
    fn control_plane_ready(&self) -> bool {
        self.pool
            .state()
            .endpoints
            .iter()
            .any(|e| e.members.iter().any(|m| m.state == crate::state::MemberState::Ready))
    }

    /// The stream is up: said once a stream, and the does-not-exist timers start.
    fn stream_up(&mut self) {
        if self.on_stream {
            return;
        }
        self.on_stream = true;
        self.status.update(|s| s.connected = true);
        metrics::gauge!(m::XDS_CONNECTED, m::LABEL_TARGET => self.state.target.clone()).set(1.0);
        self.state.restart_timers(Instant::now());
    }

    /// Resources whose does-not-exist timer ran out do not exist; the target is resolved
    /// again.
    async fn expire(&mut self, tx: &mpsc::UnboundedSender<DiscoveryRequest>) {
        for (kind, name) in self.state.expire(Instant::now()) {
            tracing::warn!(target_name = %self.state.target, kind = %kind, resource = %name,
                after = ?DOES_NOT_EXIST_AFTER, "xDS resource does not exist: no response carried it");
        }
        self.settle(tx).await;
    }

    /// Which endpoints the pool finds failing; when that changed, the target is resolved
    /// again (a priority may take calls, or give them back).
    async fn look_at_pool(&mut self, tx: &mpsc::UnboundedSender<DiscoveryRequest>) {
        let Some(monitor) = &self.policy else { return };
        let failing: std::collections::HashSet<String> = self
            .parsed
            .iter()
            .filter(|(_, endpoint)| monitor.is_endpoint_failing(endpoint) == Some(true))
            .map(|(address, _)| address.clone())
            .collect();
        if failing == self.state.failing {
            return;
        }
        let mut now: Vec<&String> = failing.iter().collect();
        now.sort();
        tracing::info!(target_name = %self.state.target, failing = ?now, "the pool's failing endpoints changed; priorities weighed again");
        self.state.failing = failing;
        self.settle(tx).await;
    }

    /// One stream, until it breaks. Returns whether the control plane answered on it.
    async fn stream(&mut self) -> bool {
        let (tx, rx) = mpsc::unbounded_channel();
        // Nonces belong to a stream: none from the last one goes on this one.
        self.state.forget_nonces();
        self.on_stream = false;
        let mut requests = self.state.initial_requests();
        if let Some(first) = requests.first_mut() {
            first.node = Some(node(&self.node));
        }
        for request in requests {
            let _ = tx.send(request);
        }
        let mut client =
            AggregatedDiscoveryServiceClient::new(self.pool.clone()).max_decoding_message_size(64 << 20);
        // A server may send its response headers only with its first message, and need not
        // answer at all for resources it does not have (gRFC A57): the stream counts as up,
        // and the does-not-exist timers run, from when the control plane's connection is
        // ready and the requests go out, not from the headers.
        let started = self.watching(client.stream_aggregated_resources(Requests(rx)), true).await;
        let mut responses = match started {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(target_name = %self.state.target, error = %status, "xDS stream could not start");
                self.status.update(|s| s.last_error = Some(status.to_string()));
                return false;
            }
        };
        self.stream_up();
        let mut answered = false;
        let mut looks = looks();
        loop {
            let deadline = self.state.next_deadline();
            let timer = sleep_until(deadline);
            tokio::select! {
                biased;
                message = responses.message() => match message {
                    Ok(Some(response)) => {
                        answered = true;
                        self.on_response(&response, &tx).await;
                    }
                    Ok(None) => {
                        self.status.update(|s| s.last_error = Some("the control plane ended the stream".to_owned()));
                        return answered;
                    }
                    Err(status) => {
                        tracing::warn!(target_name = %self.state.target, error = %status, "xDS stream broke");
                        self.status.update(|s| s.last_error = Some(status.to_string()));
                        return answered;
                    }
                },
                _ = looks.tick() => self.look_at_pool(&tx).await,
                _ = timer => self.expire(&tx).await,
            }
        }
    }

    async fn on_response(
        &mut self,
        response: &DiscoveryResponse,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
    ) {
        let Some((request, problems)) = self.state.apply(response) else {
            tracing::warn!(target_name = %self.state.target, type_url = %response.type_url, "xDS response of a type the pool did not ask for, ignored");
            return;
        };
        let kind = Kind::from_type_url(&response.type_url).expect("applied");
        let target = self.state.target.clone();
        if problems.is_empty() {
            tracing::info!(target_name = %target, kind = %kind, version = %response.version_info,
                resources = response.resources.len(), "xDS update accepted");
            metrics::counter!(m::XDS_RESPONSES, m::LABEL_TARGET => target.clone(), m::LABEL_TYPE => kind.label(), m::LABEL_RESULT => "ack").increment(1);
        } else {
            let detail = request.error_detail.as_ref().map(|d| d.message.clone()).unwrap_or_default();
            tracing::warn!(target_name = %target, kind = %kind, version = %response.version_info, error = %detail,
                "xDS update refused (NACK); the last good version of each refused resource is kept");
            metrics::counter!(m::XDS_RESPONSES, m::LABEL_TARGET => target.clone(), m::LABEL_TYPE => kind.label(), m::LABEL_RESULT => "nack").increment(1);
            self.status.update(|s| {
                s.nacks += 1;
                s.last_nack = Some(format!("{kind} version {:?}: {detail}", response.version_info));
            });
        }
        if problems.is_empty() {
            self.status.update(|s| s.acks += 1);
        }
        let _ = tx.send(request);
        self.settle(tx).await;
    }

    /// Re-resolves the target: new subscriptions go out, a changed endpoint set goes to the
    /// pool.
    async fn settle(&mut self, tx: &mpsc::UnboundedSender<DiscoveryRequest>) {
        let (requests, endpoints) = self.state.settle(Instant::now());
        for request in requests {
            let _ = tx.send(request);
        }
        // The resources first: whoever sees the endpoints change sees what they came from.
        let resources = self.state.resource_states();
        let mut counts: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
        for r in &resources {
            *counts.entry((r.kind, r.state)).or_default() += 1;
        }
        for kind in Kind::ALL {
            for state in ["requested", "acked", "nacked", "does_not_exist"] {
                let n = counts.get(&(kind.label(), state)).copied().unwrap_or(0);
                metrics::gauge!(m::XDS_RESOURCES, m::LABEL_TARGET => self.state.target.clone(),
                    m::LABEL_TYPE => kind.label(), m::LABEL_STATE => state)
                .set(n as f64);
            }
        }
        self.status.update(|s| s.resources = resources);
        self.apply_policy();
        // Why the target has no endpoints: said when it changes, whether or not the set does
        // (a target that never resolved goes from none to none).
        let broken = self.state.broken.clone();
        if self.status.read(|s| s.broken.clone()) != broken {
            match &broken {
                Some(why) => {
                    tracing::warn!(target_name = %self.state.target, reason = %why, "xDS target resolves to no endpoint")
                }
                None => tracing::info!(target_name = %self.state.target, "xDS target resolves again"),
            }
            self.status.update(|s| s.broken = broken);
        }
        if let Some(set) = endpoints {
            self.publish(set).await;
        }
    }

    /// Gives the pool the policy of the cluster in use when it changed: its cap on calls in
    /// flight (none when it sets none) and its outlier detection (the pool's own when it has
    /// none).
    fn apply_policy(&mut self) {
        let Some(monitor) = &self.policy else { return };
        let clusters = self.state.clusters_in_use();
        if clusters.is_empty() {
            return;
        }
        // Weighted clusters share one pool: their caps add up, if each has one; the outlier
        // detection is the first cluster's that has one.
        let policy = AppliedPolicy {
            max_requests: clusters
                .iter()
                .map(|c| c.max_requests)
                .try_fold(0u32, |sum, max| max.map(|m| sum.saturating_add(m))),
            outlier_detection: clusters.iter().find_map(|c| c.outlier_detection.clone()),
        };
        if self.applied.as_ref() == Some(&policy) {
            return;
        }
        tracing::info!(target_name = %self.state.target, max_requests = ?policy.max_requests,
            outlier_detection = ?policy.outlier_detection, "xDS cluster policy applied to the pool");
        monitor.set_max_requests(policy.max_requests);
        // Fails only for a pool built without outlier detection (the resources were checked
        // against the pool's ranges): said once for this policy; the status shows none.
        let outliers = match monitor.override_outlier_detection(policy.outlier_detection.clone()) {
            Ok(()) => policy.outlier_detection.clone(),
            Err(error) => {
                tracing::warn!(target_name = %self.state.target, %error, "the cluster's outlier detection is not applied");
                None
            }
        };
        self.status.update(|s| {
            s.max_requests = policy.max_requests;
            s.outlier_detection = outliers;
        });
        self.applied = Some(policy);
    }

    async fn publish(&mut self, set: BTreeMap<String, u32>) {
        let target = self.state.target.clone();
        let removed: Vec<String> =
            self.state.published.keys().filter(|a| !set.contains_key(*a)).cloned().collect();
        // New endpoints, and those whose weight changed (inserted again: only the weight moves).
        let changed: Vec<(String, u32)> = set
            .iter()
            .filter(|(a, w)| self.state.published.get(*a) != Some(*w))
            .map(|(a, w)| (a.clone(), *w))
            .collect();
        tracing::info!(target_name = %target, added_or_reweighed = changed.len(), removed = removed.len(), endpoints = set.len(), "xDS endpoints applied");
        for address in removed {
            if self.changes.send(Change::Remove(address)).await.is_err() {
                return;
            }
        }
        for (address, weight) in changed {
            let Ok(endpoint) = Endpoint::parse(&format!("http://{address}")) else {
                tracing::warn!(target_name = %target, endpoint = %address, "xDS endpoint is not a valid address, skipped");
                continue;
            };
            if self.changes.send(Change::Insert(address, Weighted { endpoint, weight })).await.is_err() {
                return;
            }
        }
        self.parsed.retain(|address, _| set.contains_key(address));
        for address in set.keys() {
            if !self.parsed.contains_key(address) {
                if let Ok(endpoint) = Endpoint::parse(&format!("http://{address}")) {
                    self.parsed.insert(address.clone(), endpoint);
                }
            }
        }
        self.status.update(|s| {
            s.endpoints = set.keys().cloned().collect();
            s.weights = set.iter().map(|(a, w)| (a.clone(), *w)).collect();
            s.updates += 1;
        });
        self.state.published = set;
    }
}

/// Ticks every `POOL_LOOK`, a late tick not made up for.
fn looks() -> tokio::time::Interval {
    let mut looks = tokio::time::interval(POOL_LOOK);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    looks
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What of a cluster's policy the pool was given.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AppliedPolicy {
    max_requests: Option<u32>,
    outlier_detection: Option<crate::OutlierDetection>,
}

/// The bootstrap's node as the control plane gets it.
fn node(node: &Node) -> core::Node {
    core::Node {
        id: node.id.clone(),
        cluster: node.cluster.clone(),
        metadata: Some(pb::Struct {
            fields: node.metadata.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
        }),
        locality: Some(core::Locality {
            region: node.region.clone(),
            zone: node.zone.clone(),
            sub_zone: node.sub_zone.clone(),
        }),
        user_agent_name: "grpc-pool".to_owned(),
        user_agent_version_type: Some(core::node::UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").to_owned(),
        )),
        ..core::Node::default()
    }
}

/// A JSON value as a `google.protobuf.Value`.
fn value(v: &Value) -> pb::Value {
    use pb::value::Kind as K;
    let kind = match v {
        Value::Null => K::NullValue(0),
        Value::Bool(b) => K::BoolValue(*b),
        Value::Number(n) => K::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => K::StringValue(s.clone()),
        Value::Array(a) => K::ListValue(pb::ListValue { values: a.iter().map(value).collect() }),
        Value::Object(o) => {
            K::StructValue(pb::Struct { fields: o.iter().map(|(k, v)| (k.clone(), value(v))).collect() })
        }
    };
    pb::Value { kind: Some(kind) }
}

/// Shared between the task and `XdsStatus` handles.
pub(crate) type SharedStatus = Arc<Mutex<super::StatusInner>>;

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3 as cds;
    use prost::{Message, Name};

    /// A CDS response with EDS clusters of these names.
    fn clusters(names: &[&str], version: &str) -> DiscoveryResponse {
        let resources = names
            .iter()
            .map(|name| {
                let cluster = cds::Cluster {
                    name: (*name).to_owned(),
                    cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                        cds::cluster::DiscoveryType::Eds as i32,
                    )),
                    eds_cluster_config: Some(cds::cluster::EdsClusterConfig {
                        eds_config: Some(core::ConfigSource {
                            config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                                core::AggregatedConfigSource {},
                            )),
                            ..core::ConfigSource::default()
                        }),
                        service_name: String::new(),
                    }),
                    ..cds::Cluster::default()
                };
                pb::Any { type_url: cds::Cluster::type_url(), value: cluster.encode_to_vec() }
            })
            .collect();
        DiscoveryResponse {
            version_info: version.to_owned(),
            resources,
            type_url: Kind::Cluster.type_url().to_owned(),
            nonce: version.to_owned(),
            ..DiscoveryResponse::default()
        }
    }

    #[test]
    fn a_response_crossing_a_subscription_change_neither_adds_nor_deletes_what_it_should_not() {
        let mut state = AdsState::new("echo");
        state.subscriptions.get_mut(&Kind::Cluster).unwrap().names.insert("new".to_owned());
        // A reply to the subscription before: "old" (no longer asked for) and not "new".
        let (ack, problems) = state.apply(&clusters(&["old"], "1")).unwrap();
        assert!(problems.is_empty() && ack.error_detail.is_none());
        assert!(!state.known.contains_key(&(Kind::Cluster, "old".to_owned())), "not asked for: read past");
        let new = (Kind::Cluster, "new".to_owned());
        assert!(state.known.get(&new).is_none_or(|k| !k.missing), "never received: the timer decides");
        // Received, then left out of a response: deleted.
        state.apply(&clusters(&["new"], "2")).unwrap();
        assert!(state.known[&new].resource.is_some());
        // A response with a resource that cannot even be named deletes nothing: it may be
        // the one left out.
        let mut garbled = clusters(&[], "3");
        garbled.resources.push(pb::Any { type_url: cds::Cluster::type_url(), value: vec![0xff, 0xff] });
        let (nack, problems) = state.apply(&garbled).unwrap();
        assert!(nack.error_detail.is_some() && problems.len() == 1);
        assert!(state.known[&new].resource.is_some(), "kept");
        state.apply(&clusters(&[], "4")).unwrap();
        assert!(state.known[&new].missing && state.known[&new].resource.is_none());
    }

    #[test]
    fn a_resource_no_response_carries_does_not_exist_after_the_timer_and_the_target_has_no_endpoints() {
        let start = Instant::now();
        let mut state = AdsState::new("echo");
        // Nothing received yet: pending, the listener asked for.
        let (requests, endpoints) = state.settle(start);
        assert!(requests.is_empty(), "the listener's subscription is there from the start");
        assert_eq!(endpoints, None);
        assert_eq!(state.initial_requests()[0].resource_names, vec!["echo".to_owned()]);
        state.restart_timers(start);
        assert_eq!(state.next_deadline(), Some(start + DOES_NOT_EXIST_AFTER));
        assert!(state.expire(start + DOES_NOT_EXIST_AFTER - Duration::from_millis(1)).is_empty());
        assert_eq!(state.expire(start + DOES_NOT_EXIST_AFTER), vec![(Kind::Listener, "echo".to_owned())]);
        let (_, endpoints) = state.settle(start + DOES_NOT_EXIST_AFTER);
        // The set was already empty: no change to publish, but the reason is known.
        assert_eq!(endpoints, None);
        assert!(
            state.broken.as_deref().is_some_and(|why| why.contains("does not exist")),
            "{:?}",
            state.broken
        );
        let mut wanted = BTreeMap::new();
        assert!(
            matches!(state.resolve(&mut wanted), Resolution::Broken(why) if why.contains("does not exist"))
        );
        // A broken stream stops the timers; a new one runs them again for what is missing.
        state.stop_timers();
        assert_eq!(state.next_deadline(), None);
    }
}
