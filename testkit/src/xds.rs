//! A small xDS control plane for tests: an ADS server (state of the world) on 127.0.0.1 that
//! serves the resources a test sets, built on the published Envoy protos of `envoy-types`.
//! It answers any ADS client the same way (the pool's, and the gRPC C core's through Python
//! `grpcio`), so a test can check that both see the same endpoints.
//!
//! Each resource type has a version, bumped by every change of one of its resources; every
//! stream is sent the resources of a type it subscribes to when its subscription changes or
//! the version moves past the one it was last sent. LDS and CDS responses carry every
//! subscribed resource that exists; RDS and EDS ones the subscribed ones that exist (an
//! absent one is for the client's does-not-exist timer).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
pub use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::config::route::v3 as rds;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::{Message, Name};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The type URLs of the four resource types.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RDS.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// CDS.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS.
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

#[derive(Default)]
struct Resources {
    /// Type URL -> (version, name -> resource).
    types: BTreeMap<String, (u64, BTreeMap<String, Any>)>,
}

#[derive(Default)]
struct Shared {
    resources: Mutex<Resources>,
    /// Every request received, in order, on every stream.
    requests: Mutex<Vec<DiscoveryRequest>>,
    streams: AtomicUsize,
    nonce: AtomicU64,
    /// Send nothing for a type none of whose subscribed resources exist (as go-control-plane
    /// does; gRFC A57 allows it): the client's does-not-exist timer must decide.
    silent_when_empty: std::sync::atomic::AtomicBool,
}

/// The control plane: start it, set resources, read what clients sent.
pub struct ControlPlane {
    addr: SocketAddr,
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
    stop: Option<oneshot::Sender<()>>,
    /// Ends every stream of the current server when set to false.
    alive: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
    /// Serves TLS with this certificate.
    tls: Option<crate::ServerTls>,
}

impl ControlPlane {
    /// Starts one on a free port of 127.0.0.1.
    pub async fn start() -> ControlPlane {
        ControlPlane::start_with(None).await
    }

    /// Starts one that serves TLS with `tls` (a certificate for `127.0.0.1`).
    pub async fn start_tls(tls: crate::ServerTls) -> ControlPlane {
        ControlPlane::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<crate::ServerTls>) -> ControlPlane {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        let (changed, _) = watch::channel(0);
        let mut plane =
            ControlPlane { addr, shared: Arc::default(), changed, stop: None, alive: None, task: None, tls };
        plane.serve(listener);
        plane
    }

    fn serve(&mut self, listener: TcpListener) {
        let (alive, alive_rx) = watch::channel(true);
        let service = Ads { shared: self.shared.clone(), changed: self.changed.subscribe(), alive: alive_rx };
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            let config = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            builder = builder.tls_config(config).expect("the control plane's TLS");
        }
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.stop = Some(stop);
        self.alive = Some(alive);
        self.task = Some(task);
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A bootstrap (gRFC A27) naming this control plane, insecure, for node `node_id`.
    pub fn bootstrap(&self, node_id: &str) -> String {
        format!(
            r#"{{"xds_servers": [{{"server_uri": "{}", "channel_creds": [{{"type": "insecure"}}], "server_features": ["xds_v3"]}}],
  "node": {{"id": "{node_id}", "cluster": "test", "locality": {{"zone": "test-zone"}}}}}}"#,
            self.addr
        )
    }

    /// From now on, sends nothing for a type none of whose subscribed resources exist,
    /// instead of an empty response, and a new stream's response headers only with its
    /// first message.
    pub fn set_silent_when_empty(&self, silent: bool) {
        self.shared.silent_when_empty.store(silent, Ordering::Relaxed);
    }

    /// A bootstrap naming this control plane with `tls` credentials whose `config` (gRFC
    /// A65) trusts the CA in the file `ca_file`.
    pub fn bootstrap_tls(&self, node_id: &str, ca_file: &std::path::Path) -> String {
        format!(
            r#"{{"xds_servers": [{{"server_uri": "{}", "channel_creds": [{{"type": "tls", "config": {{"ca_certificate_file": "{}"}}}}]}}],
  "node": {{"id": "{node_id}"}}}}"#,
            self.addr,
            ca_file.display()
        )
    }

    /// Sets (adds or replaces) a resource under `name`.
    pub fn set<M: Message + Name>(&self, name: &str, resource: M) {
        self.set_any(name, Any { type_url: M::type_url(), value: resource.encode_to_vec() });
    }

    /// Sets a resource as an `Any` of any content (a bad one, for NACK tests).
    pub fn set_any(&self, name: &str, any: Any) {
        let mut resources = self.shared.resources.lock().unwrap();
        let (version, items) = resources.types.entry(any.type_url.clone()).or_default();
        *version += 1;
        items.insert(name.to_owned(), any);
        drop(resources);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Removes a resource of type `type_url`.
    pub fn remove(&self, type_url: &str, name: &str) {
        let mut resources = self.shared.resources.lock().unwrap();
        if let Some((version, items)) = resources.types.get_mut(type_url) {
            *version += 1;
            items.remove(name);
        }
        drop(resources);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The version of a type's resources (0: none set yet).
    pub fn version(&self, type_url: &str) -> u64 {
        self.shared.resources.lock().unwrap().types.get(type_url).map_or(0, |(v, _)| *v)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<DiscoveryRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The NACKs received: (type URL, the version the client kept, the error detail).
    pub fn nacks(&self) -> Vec<(String, String, String)> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.error_detail.map(|d| (r.type_url, r.version_info, d.message)))
            .collect()
    }

    /// Whether a client ACKed `version` of `type_url` (a request with that version, its
    /// nonce set and no error).
    pub fn acked(&self, type_url: &str, version: u64) -> bool {
        self.requests().iter().any(|r| {
            r.type_url == type_url
                && r.version_info == version.to_string()
                && !r.response_nonce.is_empty()
                && r.error_detail.is_none()
        })
    }

    /// ADS streams opened so far.
    pub fn streams(&self) -> usize {
        self.shared.streams.load(Ordering::Relaxed)
    }

    /// Stops serving: the listener closes and every stream breaks (the process of a control
    /// plane that went away). The resources stay for [`ControlPlane::restart`].
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(alive) = self.alive.take() {
            let _ = alive.send(false);
        }
        if let Some(mut task) = self.task.take() {
            // The streams end with UNAVAILABLE, so the graceful shutdown has nothing to wait
            // for; a connection that lingers anyway is cut.
            if tokio::time::timeout(std::time::Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Serves again on the same port, with the resources it had.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("bind the same port again");
        self.serve(listener);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Ads {
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
    alive: watch::Receiver<bool>,
}

type Responses = Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        self.shared.streams.fetch_add(1, Ordering::Relaxed);
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        let mut changed = self.changed.clone();
        let mut alive = self.alive.clone();
        // In silent mode the response headers go with the first message, as grpc-go's and
        // grpc-java's servers send them: no message, no headers.
        let (first_sent, first) = oneshot::channel::<()>();
        let mut first_sent = Some(first_sent);
        let silent = self.shared.silent_when_empty.load(Ordering::Relaxed);
        tokio::spawn(async move {
            // Per type: the names subscribed, and the version last sent.
            let mut subscribed: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut sent: HashMap<String, (u64, BTreeSet<String>)> = HashMap::new();
            loop {
                let mut dirty: Vec<String> = Vec::new();
                tokio::select! {
                    request = requests.message() => {
                        let Ok(Some(request)) = request else { return };
                        shared.requests.lock().unwrap().push(request.clone());
                        let names: BTreeSet<String> = request.resource_names.iter().cloned().collect();
                        let before = subscribed.insert(request.type_url.clone(), names.clone());
                        if before.as_ref() != Some(&names) {
                            dirty.push(request.type_url.clone());
                        }
                    }
                    change = changed.changed() => {
                        if change.is_err() { return }
                        dirty.extend(subscribed.keys().cloned());
                    }
                    _ = stopped(&mut alive) => {
                        let _ = tx.send(Err(Status::unavailable("the control plane is stopping"))).await;
                        return;
                    }
                }
                for type_url in dirty {
                    let Some(names) = subscribed.get(&type_url) else { continue };
                    let (version, resources) = {
                        let all = shared.resources.lock().unwrap();
                        let (version, items) = all.types.get(&type_url).cloned().unwrap_or_default();
                        let resources: Vec<Any> = items
                            .iter()
                            .filter(|(name, _)| names.contains(*name))
                            .map(|(_, any)| any.clone())
                            .collect();
                        (version, resources)
                    };
                    // Sent again when the version moved or the subscription changed.
                    let now = (version, names.clone());
                    if sent.get(&type_url) == Some(&now) {
                        continue;
                    }
                    sent.insert(type_url.clone(), now);
                    if resources.is_empty() && shared.silent_when_empty.load(Ordering::Relaxed) {
                        continue;
                    }
                    let nonce = shared.nonce.fetch_add(1, Ordering::Relaxed) + 1;
                    let response = DiscoveryResponse {
                        version_info: version.to_string(),
                        resources,
                        type_url: type_url.clone(),
                        nonce: nonce.to_string(),
                        ..DiscoveryResponse::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                    if let Some(first_sent) = first_sent.take() {
                        let _ = first_sent.send(());
                    }
                }
            }
        });
        if silent {
            let _ = first.await;
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented("this control plane serves state of the world only"))
    }
}

/// Returns when the server's streams are to end (or the server is gone).
async fn stopped(alive: &mut watch::Receiver<bool>) {
    loop {
        if !*alive.borrow_and_update() {
            return;
        }
        if alive.changed().await.is_err() {
            return;
        }
    }
}

/// A listener for `name` whose routes come from RDS (`route_config`), with the router
/// filter, as gRPC's xDS clients want it.
pub fn listener(name: &str, route_config: &str) -> lds::Listener {
    manager_listener(
        name,
        hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads()),
            route_config_name: route_config.to_owned(),
        }),
    )
}

/// A listener for `name` with its routes inline: every call to `cluster`.
pub fn listener_inline(name: &str, cluster: &str) -> lds::Listener {
    manager_listener(
        name,
        hcm::http_connection_manager::RouteSpecifier::RouteConfig(route_config("inline", &["*"], cluster)),
    )
}

fn manager_listener(name: &str, routes: hcm::http_connection_manager::RouteSpecifier) -> lds::Listener {
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(routes),
        http_filters: vec![hcm::HttpFilter {
            name: "router".to_owned(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(Router::default()))),
            ..hcm::HttpFilter::default()
        }],
        ..hcm::HttpConnectionManager::default()
    };
    lds::Listener {
        name: name.to_owned(),
        api_listener: Some(lds::ApiListener { api_listener: Some(any(manager)) }),
        ..lds::Listener::default()
    }
}

/// A route configuration: one virtual host for `domains`, every call to `cluster`.
pub fn route_config(name: &str, domains: &[&str], cluster: &str) -> rds::RouteConfiguration {
    let route = rds::Route {
        r#match: Some(rds::RouteMatch {
            path_specifier: Some(rds::route_match::PathSpecifier::Prefix(String::new())),
            ..rds::RouteMatch::default()
        }),
        action: Some(rds::route::Action::Route(rds::RouteAction {
            cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
            ..rds::RouteAction::default()
        })),
        ..rds::Route::default()
    };
    rds::RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![rds::VirtualHost {
            name: format!("{name}-host"),
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            routes: vec![route],
            ..rds::VirtualHost::default()
        }],
        ..rds::RouteConfiguration::default()
    }
}

/// A route configuration: one virtual host for `domains`, its calls split over `clusters` by
/// their weights (gRFC A28's weighted clusters).
pub fn route_config_weighted(
    name: &str,
    domains: &[&str],
    clusters: &[(&str, u32)],
) -> rds::RouteConfiguration {
    let mut config = route_config(name, domains, "unused");
    let weighted = rds::WeightedCluster {
        clusters: clusters
            .iter()
            .map(|(cluster, weight)| rds::weighted_cluster::ClusterWeight {
                name: (*cluster).to_owned(),
                weight: Some(UInt32Value { value: *weight }),
                ..rds::weighted_cluster::ClusterWeight::default()
            })
            .collect(),
        ..rds::WeightedCluster::default()
    };
    if let Some(rds::route::Action::Route(action)) = &mut config.virtual_hosts[0].routes[0].action {
        action.cluster_specifier = Some(rds::route_action::ClusterSpecifier::WeightedClusters(weighted));
    }
    config
}

/// An EDS cluster (round robin) whose endpoints are the assignment `eds_name`.
pub fn cluster(name: &str, eds_name: &str) -> cds::Cluster {
    cds::Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cds::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: eds_name.to_owned(),
        }),
        ..cds::Cluster::default()
    }
}

/// One locality of an assignment.
#[derive(Debug, Clone)]
pub struct LocalityEndpoints {
    /// Its zone.
    pub zone: String,
    /// Its priority (0 first).
    pub priority: u32,
    /// Its weight (0: none, and it takes no calls).
    pub weight: u32,
    /// Its endpoints and their health.
    pub endpoints: Vec<(SocketAddr, HealthStatus)>,
}

impl LocalityEndpoints {
    /// A locality of weight 1 at `priority` with these endpoints, all `HEALTHY`.
    pub fn healthy(zone: &str, priority: u32, endpoints: &[SocketAddr]) -> LocalityEndpoints {
        LocalityEndpoints {
            zone: zone.to_owned(),
            priority,
            weight: 1,
            endpoints: endpoints.iter().map(|a| (*a, HealthStatus::Healthy)).collect(),
        }
    }
}

/// A cluster load assignment for `name`.
pub fn assignment(name: &str, localities: &[LocalityEndpoints]) -> eds::ClusterLoadAssignment {
    let endpoints = localities
        .iter()
        .map(|l| eds::LocalityLbEndpoints {
            locality: Some(core::Locality { zone: l.zone.clone(), ..core::Locality::default() }),
            load_balancing_weight: Some(UInt32Value { value: l.weight }),
            priority: l.priority,
            lb_endpoints: l
                .endpoints
                .iter()
                .map(|(addr, health)| eds::LbEndpoint {
                    health_status: *health as i32,
                    host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                        address: Some(socket(*addr)),
                        ..eds::Endpoint::default()
                    })),
                    ..eds::LbEndpoint::default()
                })
                .collect(),
            ..eds::LocalityLbEndpoints::default()
        })
        .collect();
    eds::ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints,
        ..eds::ClusterLoadAssignment::default()
    }
}

fn socket(addr: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..core::SocketAddress::default()
        })),
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..core::ConfigSource::default()
    }
}

fn any<M: Message + Name>(message: M) -> Any {
    Any { type_url: M::type_url(), value: message.encode_to_vec() }
}
