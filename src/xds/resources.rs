//! xDS resources as the pool reads them: each one decoded from its `Any` and checked, into a
//! small model of what the pool uses. What the pool cannot honour is an error naming the
//! field, and the response that carried it is NACKed (never a field read past in silence).

use std::fmt;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::config::route::v3 as rds;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::Resource as Wrapped;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// The four resource types of the ADS stream, in the order a target resolves through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Listener,
    Route,
    Cluster,
    Endpoints,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoints];

    pub(crate) fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoints => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    pub(crate) fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// The short name used in metrics and logs: `lds`, `rds`, `cds`, `eds`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoints => "eds",
        }
    }

    /// Whether a state-of-the-world response lists every resource of the type that exists
    /// (LDS, CDS): one subscribed and not in it was deleted. For RDS and EDS only the
    /// does-not-exist timer says so (gRFC A27).
    pub(crate) fn complete_in_each_response(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A resource, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resource {
    Listener(RouteSource),
    Route(RouteTable),
    Cluster(ClusterPolicy),
    Endpoints(Assignment),
}

/// Where a listener's routes are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RouteSource {
    /// In a `RouteConfiguration` of that name, from RDS.
    Rds(String),
    /// In the listener itself.
    Inline(RouteTable),
}

/// A route configuration: its virtual hosts, each with the cluster its default route sends
/// calls to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouteTable {
    pub(crate) virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VirtualHost {
    pub(crate) domains: Vec<String>,
    /// The clusters its route sends calls to, each with its weight (one cluster: weight 1).
    pub(crate) clusters: Vec<(String, u32)>,
}

/// What the pool takes from a `Cluster`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClusterPolicy {
    /// The EDS resource with its endpoints (`eds_cluster_config.service_name`, else the
    /// cluster's name).
    pub(crate) eds_name: String,
    pub(crate) least_request: bool,
    /// `circuit_breakers.thresholds[DEFAULT].max_requests`.
    pub(crate) max_requests: Option<u32>,
    /// `outlier_detection`, as gRFC A50 maps it.
    pub(crate) outlier_detection: Option<crate::OutlierDetection>,
}

/// A `ClusterLoadAssignment`: its endpoints by priority.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Assignment {
    /// Index = priority, from 0 with no gap.
    pub(crate) priorities: Vec<Vec<Locality>>,
    /// Percent (140 unless set).
    pub(crate) overprovisioning_factor: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Locality {
    pub(crate) name: String,
    pub(crate) weight: u32,
    pub(crate) endpoints: Vec<LbEndpoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LbEndpoint {
    /// `host:port`.
    pub(crate) address: String,
    /// Its `health_status` lets it take calls: `UNKNOWN` or `HEALTHY` (gRFC A27).
    pub(crate) usable: bool,
    pub(crate) health: &'static str,
    pub(crate) weight: u32,
}

/// A resource that failed its checks: its name (when it could be read) and the problem,
/// naming the field.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Invalid {
    pub(crate) name: Option<String>,
    pub(crate) problem: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name:?}: {}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

/// Decodes and checks one resource of a response for `kind`: its name and what the pool
/// takes from it.
pub(crate) fn decode(kind: Kind, any: &Any) -> Result<(String, Resource), Invalid> {
    let unnamed = |problem: String| Invalid { name: None, problem };
    // A resource may come wrapped in a `Resource` (its name and TTL beside it).
    let any = if any.type_url == "type.googleapis.com/envoy.service.discovery.v3.Resource" {
        let wrapped = Wrapped::decode(any.value.as_slice())
            .map_err(|e| unnamed(format!("Resource: undecodable: {e}")))?;
        wrapped.resource.ok_or_else(|| unnamed("Resource.resource: missing".to_owned()))?
    } else {
        any.clone()
    };
    if any.type_url != kind.type_url() {
        return Err(unnamed(format!("type_url: {:?} in a response for {}", any.type_url, kind.type_url())));
    }
    let bytes = any.value.as_slice();
    let undecodable = |e: prost::DecodeError| unnamed(format!("undecodable: {e}"));
    match kind {
        Kind::Listener => {
            let l = lds::Listener::decode(bytes).map_err(undecodable)?;
            let named = |problem: String| Invalid { name: Some(l.name.clone()), problem };
            listener(&l).map(|r| (l.name.clone(), Resource::Listener(r))).map_err(named)
        }
        Kind::Route => {
            let r = rds::RouteConfiguration::decode(bytes).map_err(undecodable)?;
            let named = |problem: String| Invalid { name: Some(r.name.clone()), problem };
            route_table(&r).map(|t| (r.name.clone(), Resource::Route(t))).map_err(named)
        }
        Kind::Cluster => {
            let c = cds::Cluster::decode(bytes).map_err(undecodable)?;
            let named = |problem: String| Invalid { name: Some(c.name.clone()), problem };
            cluster(&c).map(|p| (c.name.clone(), Resource::Cluster(p))).map_err(named)
        }
        Kind::Endpoints => {
            let a = eds::ClusterLoadAssignment::decode(bytes).map_err(undecodable)?;
            let named = |problem: String| Invalid { name: Some(a.cluster_name.clone()), problem };
            assignment(&a).map(|p| (a.cluster_name.clone(), Resource::Endpoints(p))).map_err(named)
        }
    }
}

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn listener(l: &lds::Listener) -> Result<RouteSource, String> {
    let any = l
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
        .ok_or("api_listener.api_listener: missing (a client listener is an API listener)")?;
    if any.type_url != HCM {
        return Err(format!("api_listener.api_listener: {:?}, not an HttpConnectionManager", any.type_url));
    }
    let manager = hcm::HttpConnectionManager::decode(any.value.as_slice())
        .map_err(|e| format!("api_listener.api_listener: undecodable HttpConnectionManager: {e}"))?;
    // gRFC A39: the filters run in order and the router ends them; the pool has no filter of
    // its own, so any other that is not optional is refused.
    let filters = &manager.http_filters;
    let Some(last) = filters.last() else {
        return Err("http_filters: empty (the router filter must be last)".to_owned());
    };
    for (i, filter) in filters.iter().enumerate() {
        let url = match &filter.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
            _ => "",
        };
        let is_last = std::ptr::eq(filter, last);
        if url == ROUTER && !is_last {
            return Err(format!("http_filters[{i}]: the router filter must be last"));
        }
        if url != ROUTER && is_last {
            return Err(format!("http_filters[{i}]: {:?} is last; the router filter must be", filter.name));
        }
        if url != ROUTER && !filter.is_optional {
            return Err(format!("http_filters[{i}]: filter {:?} ({url:?}) is not supported", filter.name));
        }
    }
    match &manager.route_specifier {
        Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) => {
            ads_source(rds.config_source.as_ref(), "rds.config_source")?;
            if rds.route_config_name.is_empty() {
                return Err("rds.route_config_name: empty".to_owned());
            }
            Ok(RouteSource::Rds(rds.route_config_name.clone()))
        }
        Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(config)) => {
            route_table(config).map(RouteSource::Inline).map_err(|e| format!("route_config.{e}"))
        }
        Some(_) => Err("route_specifier: scoped routes are not supported (rds or route_config)".to_owned()),
        None => Err("route_specifier: missing (rds or route_config)".to_owned()),
    }
}

/// The config source of an RDS or EDS resource must be the ADS stream itself.
fn ads_source(source: Option<&core::ConfigSource>, field: &str) -> Result<(), String> {
    use core::config_source::ConfigSourceSpecifier as S;
    match source.and_then(|s| s.config_source_specifier.as_ref()) {
        Some(S::Ads(_)) | Some(S::Self_(_)) => Ok(()),
        _ => Err(format!("{field}: must be `ads` or `self` (resources come over the one ADS stream)")),
    }
}

fn route_table(config: &rds::RouteConfiguration) -> Result<RouteTable, String> {
    let mut virtual_hosts = Vec::new();
    for (v, host) in config.virtual_hosts.iter().enumerate() {
        if host.domains.is_empty() {
            return Err(format!("virtual_hosts[{v}].domains: empty"));
        }
        // The pool sends every call of a pool to one cluster: the host's first route must
        // match every call (a prefix of "" or "/", nothing else to match on).
        let Some(route) = host.routes.first() else {
            return Err(format!("virtual_hosts[{v}].routes: empty"));
        };
        let field = format!("virtual_hosts[{v}].routes[0]");
        let matches_all = route.r#match.as_ref().is_some_and(|m| {
            let prefix = matches!(&m.path_specifier,
                Some(rds::route_match::PathSpecifier::Prefix(p)) if p.is_empty() || p == "/");
            prefix && m.headers.is_empty() && m.query_parameters.is_empty() && m.runtime_fraction.is_none()
        });
        if !matches_all {
            return Err(format!(
                "{field}.match: only a route that matches every call (prefix \"\" or \"/\") is supported"
            ));
        }
        let clusters = match &route.action {
            Some(rds::route::Action::Route(action)) => match &action.cluster_specifier {
                Some(rds::route_action::ClusterSpecifier::Cluster(name)) if !name.is_empty() => {
                    vec![(name.clone(), 1)]
                }
                Some(rds::route_action::ClusterSpecifier::WeightedClusters(weighted)) => {
                    weighted_clusters(weighted).map_err(|e| format!("{field}.route.weighted_clusters.{e}"))?
                }
                _ => return Err(format!("{field}.route.cluster_specifier: a cluster name is required")),
            },
            _ => return Err(format!("{field}.action: must be `route`")),
        };
        virtual_hosts.push(VirtualHost { domains: host.domains.clone(), clusters });
    }
    Ok(RouteTable { virtual_hosts })
}

/// gRFC A28's weighted clusters: names and weights, the weights adding up to more than 0
/// (and to at most 2^32-1).
fn weighted_clusters(weighted: &rds::WeightedCluster) -> Result<Vec<(String, u32)>, String> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for (i, cluster) in weighted.clusters.iter().enumerate() {
        if cluster.name.is_empty() {
            return Err(format!("clusters[{i}].name: empty"));
        }
        let weight = cluster.weight.map_or(0, |w| w.value);
        total += u64::from(weight);
        out.push((cluster.name.clone(), weight));
    }
    if total == 0 || total > u64::from(u32::MAX) {
        return Err(format!("clusters: weights add up to {total} (1 to 4294967295)"));
    }
    Ok(out)
}

fn cluster(c: &cds::Cluster) -> Result<ClusterPolicy, String> {
    use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {}
        _ => return Err("type: only EDS clusters are supported".to_owned()),
    }
    let eds_config = c.eds_cluster_config.as_ref().ok_or("eds_cluster_config: missing")?;
    ads_source(eds_config.eds_config.as_ref(), "eds_cluster_config.eds_config")?;
    let least_request = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => false,
        Ok(LbPolicy::LeastRequest) => true,
        _ => {
            return Err(format!("lb_policy: {} is not supported (ROUND_ROBIN or LEAST_REQUEST)", c.lb_policy))
        }
    };
    if c.load_balancing_policy.is_some() {
        return Err("load_balancing_policy: not supported (use lb_policy)".to_owned());
    }
    if c.transport_socket.is_some() {
        return Err("transport_socket: TLS to endpoints from xDS is not supported yet".to_owned());
    }
    let max_requests = c.circuit_breakers.as_ref().and_then(|b| {
        b.thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
            .and_then(|t| t.max_requests.map(|m| m.value))
    });
    let eds_name =
        if eds_config.service_name.is_empty() { c.name.clone() } else { eds_config.service_name.clone() };
    let outlier_detection = c
        .outlier_detection
        .as_ref()
        .map(outliers)
        .transpose()
        .map_err(|e| format!("outlier_detection.{e}"))?;
    Ok(ClusterPolicy { eds_name, least_request, max_requests, outlier_detection })
}

/// gRFC A50's reading of a cluster's `outlier_detection`: the interval, ejection times and
/// cap, success-rate ejection unless `enforcing_success_rate` is 0, failure-percentage
/// ejection when `enforcing_failure_percentage` is above 0; consecutive-5xx and gateway
/// criteria are HTTP's and not read (A50 leaves them out, and so failures in a row eject
/// nothing while the cluster's settings are in force). Durations must not be negative and
/// percentages at most 100.
fn outliers(o: &cds::OutlierDetection) -> Result<crate::OutlierDetection, String> {
    use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
    let duration = |field: &str, d: Option<&ProtoDuration>, default: Duration| -> Result<Duration, String> {
        match d {
            None => Ok(default),
            Some(d)
                if d.seconds < 0
                    || d.nanos < 0
                    || d.nanos >= 1_000_000_000
                    || d.seconds > 315_576_000_000 =>
            {
                Err(format!("{field}: {}s {}ns (a duration of 0 to 10,000 years)", d.seconds, d.nanos))
            }
            Some(d) => Ok(Duration::new(d.seconds as u64, d.nanos as u32)),
        }
    };
    let percent = |field: &str, v: Option<u32>, default: u32| -> Result<u32, String> {
        match v.unwrap_or(default) {
            p if p > 100 => Err(format!("{field}: {p} (0 to 100)")),
            p => Ok(p),
        }
    };
    let value = |v: Option<envoy_types::pb::google::protobuf::UInt32Value>| v.map(|v| v.value);
    // Within the pool's ranges (an interval of 10 ms to a day, ejections of 1 ms to a day and
    // at most 30 days): valid A50 values outside them are brought to the nearest.
    const DAY: Duration = Duration::from_secs(86_400);
    let mut settings = crate::OutlierDetection::off();
    settings.interval = duration("interval", o.interval.as_ref(), Duration::from_secs(10))?
        .clamp(Duration::from_millis(10), DAY);
    settings.base_ejection_time =
        duration("base_ejection_time", o.base_ejection_time.as_ref(), Duration::from_secs(30))?
            .clamp(Duration::from_millis(1), DAY);
    settings.max_ejection_time =
        duration("max_ejection_time", o.max_ejection_time.as_ref(), Duration::from_secs(300))?
            .clamp(settings.base_ejection_time, 30 * DAY);
    settings.max_ejection_percent = percent("max_ejection_percent", value(o.max_ejection_percent), 10)?;
    let enforcing_success_rate = percent("enforcing_success_rate", value(o.enforcing_success_rate), 100)?;
    if enforcing_success_rate > 0 {
        let mut rate = crate::SuccessRateEjection::default();
        rate.enforcement_percentage = enforcing_success_rate;
        rate.stdev_factor = value(o.success_rate_stdev_factor).unwrap_or(1900);
        rate.minimum_hosts = value(o.success_rate_minimum_hosts).unwrap_or(5);
        rate.request_volume = value(o.success_rate_request_volume).unwrap_or(100);
        settings.success_rate = Some(rate);
    }
    let enforcing_failure_percentage =
        percent("enforcing_failure_percentage", value(o.enforcing_failure_percentage), 0)?;
    if enforcing_failure_percentage > 0 {
        let mut failures = crate::FailurePercentageEjection::default();
        failures.enforcement_percentage = enforcing_failure_percentage;
        failures.threshold =
            percent("failure_percentage_threshold", value(o.failure_percentage_threshold), 85)?;
        failures.minimum_hosts = value(o.failure_percentage_minimum_hosts).unwrap_or(5);
        failures.request_volume = value(o.failure_percentage_request_volume).unwrap_or(50);
        settings.failure_percentage = Some(failures);
    }
    Ok(settings)
}

fn assignment(a: &eds::ClusterLoadAssignment) -> Result<Assignment, String> {
    let mut overprovisioning_factor = 140;
    if let Some(policy) = &a.policy {
        if !policy.drop_overloads.is_empty() {
            return Err("policy.drop_overloads: not supported".to_owned());
        }
        if let Some(factor) = policy.overprovisioning_factor {
            if factor.value == 0 {
                return Err("policy.overprovisioning_factor: 0 (1 or more, percent)".to_owned());
            }
            overprovisioning_factor = factor.value;
        }
    }
    // gRFC A27: priorities run from 0 with none missing.
    let levels = a.endpoints.iter().map(|g| g.priority as usize + 1).max().unwrap_or(0);
    if let Some(gap) = (0..levels).find(|p| !a.endpoints.iter().any(|g| g.priority as usize == *p)) {
        return Err(format!(
            "endpoints: priority {gap} is missing (priorities run from 0 with none missing)"
        ));
    }
    let mut priorities: Vec<Vec<Locality>> = vec![Vec::new(); levels];
    for (l, group) in a.endpoints.iter().enumerate() {
        let field = format!("endpoints[{l}]");
        let locality = group.locality.as_ref().map_or_else(String::new, |l| {
            let parts = [&l.region, &l.zone, &l.sub_zone];
            parts.iter().filter(|s| !s.is_empty()).map(|s| s.as_str()).collect::<Vec<_>>().join("/")
        });
        let mut endpoints = Vec::new();
        for (e, lb) in group.lb_endpoints.iter().enumerate() {
            endpoints.push(lb_endpoint(lb).map_err(|p| format!("{field}.lb_endpoints[{e}].{p}"))?);
        }
        // gRFC A27: a locality without a weight takes no calls (as the C core does).
        match group.load_balancing_weight.map_or(0, |w| w.value) {
            0 => {
                tracing::debug!(cluster = %a.cluster_name, locality = %locality, "locality without a weight takes no calls")
            }
            weight => {
                priorities[group.priority as usize].push(Locality { name: locality, weight, endpoints })
            }
        }
    }
    Ok(Assignment { priorities, overprovisioning_factor })
}

fn lb_endpoint(lb: &eds::LbEndpoint) -> Result<LbEndpoint, String> {
    use core::address::Address;
    use core::socket_address::PortSpecifier;
    let endpoint = match &lb.host_identifier {
        Some(eds::lb_endpoint::HostIdentifier::Endpoint(e)) => e,
        _ => return Err("endpoint: missing".to_owned()),
    };
    let socket = match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(Address::SocketAddress(s)) => s,
        _ => return Err("endpoint.address.socket_address: missing".to_owned()),
    };
    let port = match socket.port_specifier {
        Some(PortSpecifier::PortValue(p)) if (1..=65535).contains(&p) => p,
        _ => return Err("endpoint.address.socket_address.port_value: 1 to 65535 is required".to_owned()),
    };
    if socket.address.is_empty() {
        return Err("endpoint.address.socket_address.address: empty".to_owned());
    }
    let host =
        if socket.address.contains(':') { format!("[{}]", socket.address) } else { socket.address.clone() };
    if let Err(e) = crate::Endpoint::parse(&format!("http://{host}:{port}")) {
        return Err(format!("endpoint.address.socket_address.address: {:?} ({e})", socket.address));
    }
    let health = core::HealthStatus::try_from(lb.health_status).unwrap_or(core::HealthStatus::Unknown);
    Ok(LbEndpoint {
        address: format!("{host}:{port}"),
        usable: matches!(health, core::HealthStatus::Unknown | core::HealthStatus::Healthy),
        health: health.as_str_name(),
        weight: lb.load_balancing_weight.map_or(1, |w| w.value.max(1)),
    })
}

/// The weights the endpoints in use are given: a million shared out, so that each
/// endpoint's is its share of the calls in millionths.
const WEIGHT_SCALE: f64 = 1_000_000.0;

impl Assignment {
    /// The endpoints that take calls, each with its weight. Priority 0 takes calls, and each
    /// next priority joins while the ones before are not enough: a priority's health is
    /// its usable share of its endpoints times the overprovisioning factor (140%: a
    /// priority with 5 of 7 endpoints usable still takes all the calls), capped at 100%, and
    /// it takes that much of the calls, the next priorities the rest (Envoy's priority
    /// levels). Within a priority the localities share its calls by their weights, and
    /// within a locality its usable endpoints by theirs. `failing` (addresses) are the
    /// endpoints the pool finds failing: they count as unhealthy for the priorities' health,
    /// and stay in the pool with the least weight.
    pub(crate) fn in_use(&self, failing: &std::collections::HashSet<String>) -> Vec<(String, u32)> {
        // Usable: its health status lets it take calls; healthy: usable and the pool does not
        // find it failing (no connection and its connects failing, ejected, or unhealthy by
        // its checks). A priority's health counts its healthy endpoints; its usable ones all
        // stay in the pool, so that a failing one is tried again and comes back.
        let healthy = |e: &LbEndpoint| e.usable && !failing.contains(&e.address);
        let mut shares: Vec<(usize, f64)> = Vec::new();
        let mut left = 100.0f64;
        for (p, localities) in self.priorities.iter().enumerate() {
            let total: usize = localities.iter().map(|l| l.endpoints.len()).sum();
            let count = localities.iter().flat_map(|l| &l.endpoints).filter(|e| healthy(e)).count();
            let any_usable = localities.iter().flat_map(|l| &l.endpoints).any(|e| e.usable);
            if total == 0 || !any_usable {
                continue;
            }
            let health = (count as f64 * f64::from(self.overprovisioning_factor) / total as f64).min(100.0);
            let share = health.min(left);
            shares.push((p, share));
            left -= share;
            if left <= 0.0 {
                break;
            }
        }
        // Every priority short of healthy endpoints: what there is takes it all.
        let taken: f64 = shares.iter().map(|(_, s)| s).sum();
        let mut weights: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
        for (p, share) in shares {
            let localities: Vec<&Locality> =
                self.priorities[p].iter().filter(|l| l.endpoints.iter().any(|e| e.usable)).collect();
            let healthy_localities: Vec<&&Locality> =
                localities.iter().filter(|l| l.endpoints.iter().any(&healthy)).collect();
            let locality_total: f64 = healthy_localities.iter().map(|l| f64::from(l.weight)).sum();
            for locality in localities {
                let endpoint_total: f64 =
                    locality.endpoints.iter().filter(|e| healthy(e)).map(|e| f64::from(e.weight)).sum();
                for endpoint in locality.endpoints.iter().filter(|e| e.usable) {
                    // A failing endpoint stays with the least weight: the pool keeps trying it.
                    let fraction = if healthy(endpoint) && taken > 0.0 {
                        share / taken * f64::from(locality.weight) / locality_total
                            * f64::from(endpoint.weight)
                            / endpoint_total
                    } else {
                        0.0
                    };
                    *weights.entry(endpoint.address.clone()).or_default() += fraction;
                }
            }
        }
        weights
            .into_iter()
            .map(|(address, w)| (address, ((w * WEIGHT_SCALE).round() as u32).max(1)))
            .collect()
    }
}

/// gRFC A27's domain match of a virtual host for `authority`: an exact match first, then the
/// longest suffix (`*.example.com`), then the longest prefix (`example.*`), then `*`.
pub(crate) fn virtual_host<'a>(table: &'a RouteTable, authority: &str) -> Option<&'a VirtualHost> {
    let authority = authority.to_ascii_lowercase();
    let mut best: Option<(u8, usize, &VirtualHost)> = None;
    for host in &table.virtual_hosts {
        for domain in &host.domains {
            let domain = domain.to_ascii_lowercase();
            let rank = if domain == authority {
                Some((4, domain.len()))
            } else if domain == "*" {
                Some((1, 0))
            } else if let Some(suffix) = domain.strip_prefix('*') {
                authority.ends_with(suffix).then_some((3, domain.len()))
            } else if let Some(prefix) = domain.strip_suffix('*') {
                authority.starts_with(prefix).then_some((2, domain.len()))
            } else {
                None
            };
            if let Some((kind, len)) = rank {
                if best.is_none_or(|(k, l, _)| (kind, len) > (k, l)) {
                    best = Some((kind, len, host));
                }
            }
        }
    }
    best.map(|(_, _, host)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, usable: bool) -> LbEndpoint {
        LbEndpoint { address: address.to_owned(), usable, health: "HEALTHY", weight: 1 }
    }

    fn priority(usable: usize, total: usize, base: usize) -> Vec<Locality> {
        let endpoints = (0..total).map(|i| endpoint(&format!("10.0.0.{}:1", base + i), i < usable)).collect();
        vec![Locality { name: String::new(), weight: 1, endpoints }]
    }

    #[test]
    fn the_next_priority_takes_calls_when_the_first_is_not_enough() {
        // 5 of 7 usable: 5/7 x 140% = 100%, priority 1 is not needed.
        let a = Assignment {
            priorities: vec![priority(5, 7, 0), priority(2, 2, 100)],
            overprovisioning_factor: 140,
        };
        assert_eq!(a.in_use(&Default::default()).len(), 5);
        // 4 of 7: 80%, and priority 1 joins.
        let a = Assignment {
            priorities: vec![priority(4, 7, 0), priority(2, 2, 100)],
            overprovisioning_factor: 140,
        };
        assert_eq!(a.in_use(&Default::default()).len(), 6);
        // None usable in 0: priority 1 alone.
        let a = Assignment {
            priorities: vec![priority(0, 3, 0), priority(2, 2, 100)],
            overprovisioning_factor: 140,
        };
        let addresses: Vec<String> = a.in_use(&Default::default()).into_iter().map(|(a, _)| a).collect();
        assert_eq!(addresses, vec!["10.0.0.100:1".to_owned(), "10.0.0.101:1".to_owned()]);
    }

    #[test]
    fn calls_are_shared_by_priority_health_then_locality_and_endpoint_weights() {
        let weighted = |name: &str, weight: u32, endpoints: &[(&str, u32)]| Locality {
            name: name.to_owned(),
            weight,
            endpoints: endpoints
                .iter()
                .map(|(a, w)| LbEndpoint {
                    address: (*a).to_owned(),
                    usable: true,
                    health: "HEALTHY",
                    weight: *w,
                })
                .collect(),
        };
        // Localities 3:1; in the first, endpoints 1:1; in the second one endpoint.
        let a = Assignment {
            priorities: vec![vec![
                weighted("a", 3, &[("a1:1", 1), ("a2:1", 1)]),
                weighted("b", 1, &[("b1:1", 5)]),
            ]],
            overprovisioning_factor: 140,
        };
        assert_eq!(
            a.in_use(&Default::default()),
            vec![("a1:1".to_owned(), 375_000), ("a2:1".to_owned(), 375_000), ("b1:1".to_owned(), 250_000)]
        );
        // Priority 0 at 4 of 7: 80% of the calls; priority 1 the other 20%.
        let a = Assignment {
            priorities: vec![priority(4, 7, 0), priority(1, 1, 100)],
            overprovisioning_factor: 140,
        };
        let weights = a.in_use(&Default::default());
        assert_eq!(weights.len(), 5);
        assert!(weights.iter().all(|(_, w)| *w == 200_000), "{weights:?}");
        assert!(weights.iter().any(|(a, _)| a == "10.0.0.100:1"), "{weights:?}");
    }

    #[test]
    fn a_virtual_host_is_matched_as_grpc_does() {
        let host = |d: &[&str], c: &str| VirtualHost {
            domains: d.iter().map(|s| s.to_string()).collect(),
            clusters: vec![(c.to_owned(), 1)],
        };
        let table = RouteTable {
            virtual_hosts: vec![
                host(&["*"], "any"),
                host(&["echo.*"], "prefix"),
                host(&["*.prod"], "suffix"),
                host(&["echo.prod"], "exact"),
            ],
        };
        assert_eq!(virtual_host(&table, "echo.prod").unwrap().clusters[0].0, "exact");
        assert_eq!(virtual_host(&table, "x.prod").unwrap().clusters[0].0, "suffix");
        assert_eq!(virtual_host(&table, "echo.dev").unwrap().clusters[0].0, "prefix");
        assert_eq!(virtual_host(&table, "other").unwrap().clusters[0].0, "any");
    }
}
