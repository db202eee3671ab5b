//! A pool built for an `xds:///` target against the test control plane (testkit's ADS
//! server on the published Envoy protos): endpoints from LDS -> RDS -> CDS -> EDS, health
//! status and priority failover, a NACK that names the field and keeps the last good
//! resource, a control plane restart, and a listener that goes away.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use grpc_pool::xds::{Bootstrap, XdsStatus};
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::xds::{self as cp, ControlPlane, HealthStatus, LocalityEndpoints};
use grpc_pool_testkit::{wait_until, GrpcioXdsClient, TestServer};

const WAIT: Duration = Duration::from_secs(20);
const TARGET: &str = "xds:///echo.test:50051";
const LISTENER: &str = "echo.test:50051";

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(b"hello"), repeat: 0, delay_ms: 0 }
}

async fn servers(n: usize) -> Vec<TestServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestServer::start().await);
    }
    out
}

/// A control plane serving the listener, its routes, the cluster `echo` and its endpoints.
fn serve(plane: &ControlPlane, localities: &[LocalityEndpoints]) {
    plane.set(LISTENER, cp::listener(LISTENER, "echo-routes"));
    plane.set("echo-routes", cp::route_config("echo-routes", &["echo.test:50051"], "echo"));
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));
    plane.set("echo-endpoints", cp::assignment("echo-endpoints", localities));
}

fn addresses(servers: &[&TestServer]) -> Vec<String> {
    let mut out: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    out.sort();
    out
}

fn pool_endpoints(pool: &Pool) -> BTreeSet<String> {
    pool.state()
        .endpoints
        .iter()
        .map(|e| e.endpoint.to_string().trim_start_matches("http://").to_owned())
        .collect()
}

async fn xds_pool(plane: &ControlPlane) -> (Pool, XdsStatus) {
    let bootstrap = Bootstrap::from_json(&plane.bootstrap("pool-test")).unwrap();
    Pool::builder().checkout_timeout(Duration::from_secs(10)).build_xds_with(TARGET, &bootstrap).unwrap()
}

/// Waits until the pool holds exactly `want`, as the status and the pool itself show.
async fn wait_for_endpoints(pool: &Pool, status: &XdsStatus, want: &[String], what: &str) {
    let set: BTreeSet<String> = want.iter().cloned().collect();
    wait_until(WAIT, what, || status.endpoints() == want && pool_endpoints(pool) == set).await;
}

/// Waits until every endpoint of the pool has a ready connection: a share of calls measured
/// before would count the calls that went elsewhere while one connected.
async fn wait_ready(pool: &Pool) {
    wait_until(WAIT, "every endpoint has a ready connection", || {
        pool.state()
            .endpoints
            .iter()
            .all(|e| e.members.iter().any(|m| m.state == grpc_pool::state::MemberState::Ready))
    })
    .await;
}

/// With weights 3:1 between `s[0]` and `s[1]`: the pool and the C core each send about
/// three quarters of 400 calls to `s[0]` (300 expected, sd 8.7).
async fn three_quarters_each(pool: &Pool, c_core: &mut GrpcioXdsClient, s: &[TestServer], what: &str) {
    let both = addresses(&[&s[0], &s[1]]);
    wait_ready(pool).await;
    let before = counts(s);
    calls(pool, 400).await;
    let pool_share = (s[0].calls() - before[0]) as f64 / 400.0;
    assert_eq!(c_core_endpoints(c_core, s, &both).await, both);
    let before = counts(s);
    assert_eq!(c_core.calls(400).await.ok, 400);
    let c_core_share = (s[0].calls() - before[0]) as f64 / 400.0;
    println!("share of the weight-3 {what}: pool {pool_share:.3}, C core {c_core_share:.3}");
    assert!((0.65..=0.85).contains(&pool_share), "the pool: {pool_share:.3}");
    assert!((0.65..=0.85).contains(&c_core_share), "the C core: {c_core_share:.3}");
}

/// Makes `n` calls; every one must succeed.
async fn calls(pool: &Pool, n: usize) {
    let mut client = EchoClient::new(pool.clone());
    for i in 0..n {
        if let Err(status) = client.unary_echo(request()).await {
            panic!("call {i} failed: {status}");
        }
    }
}

/// Priority 0 in zone `a`: the first two servers, with these health statuses.
fn priority_0(s: &[TestServer], h0: HealthStatus, h1: HealthStatus) -> LocalityEndpoints {
    LocalityEndpoints {
        zone: "a".to_owned(),
        priority: 0,
        weight: 1,
        endpoints: vec![(addr(&s[0]), h0), (addr(&s[1]), h1)],
    }
}

fn addr(server: &TestServer) -> SocketAddr {
    server.addr()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_follows_the_endpoints_of_the_targets_cluster_through_lds_rds_cds_and_eds() {
    let s = servers(3).await;
    let plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0]), addr(&s[1])])]);
    let (pool, status) = xds_pool(&plane).await;
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0], &s[1]]), "the first two servers are the pool's")
        .await;
    calls(&pool, 40).await;
    assert!(
        s[0].calls() > 0 && s[1].calls() > 0,
        "both endpoints take calls: {} {}",
        s[0].calls(),
        s[1].calls()
    );
    assert_eq!(s[2].calls(), 0, "the server not in the assignment takes none");

    // Every type's version ACKed, with the node sent on the stream's first request.
    for type_url in [cp::LISTENER, cp::ROUTE, cp::CLUSTER, cp::ENDPOINTS] {
        let version = plane.version(type_url);
        wait_until(WAIT, "each type is ACKed", || plane.acked(type_url, version)).await;
    }
    let first = plane.requests().into_iter().next().unwrap();
    assert_eq!(first.node.as_ref().map(|n| n.id.as_str()), Some("pool-test"));
    assert_eq!(first.resource_names, vec![LISTENER.to_owned()]);
    assert!(plane.nacks().is_empty(), "{:?}", plane.nacks());
    let kinds: Vec<(&str, String)> =
        status.resources().iter().map(|r| (r.kind, r.state.to_owned())).collect();
    assert_eq!(
        kinds,
        vec![
            ("cds", "acked".to_owned()),
            ("eds", "acked".to_owned()),
            ("lds", "acked".to_owned()),
            ("rds", "acked".to_owned())
        ]
    );

    // The assignment moves to servers 1 and 2: server 0 is drained away, 2 joins.
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[1]), addr(&s[2])])]),
    );
    wait_for_endpoints(&pool, &status, &addresses(&[&s[1], &s[2]]), "the pool follows the new assignment")
        .await;
    let before = s[0].calls();
    calls(&pool, 40).await;
    assert_eq!(s[0].calls(), before, "the endpoint removed takes no new call");
    assert!(s[2].calls() > 0, "the endpoint added takes calls");

    // The route moves the target to another cluster with its own endpoints.
    plane.set("other", cp::cluster("other", "other-endpoints"));
    plane.set(
        "other-endpoints",
        cp::assignment("other-endpoints", &[LocalityEndpoints::healthy("b", 0, &[addr(&s[0])])]),
    );
    plane.set("echo-routes", cp::route_config("echo-routes", &["echo.test:50051"], "other"));
    wait_for_endpoints(
        &pool,
        &status,
        &addresses(&[&s[0]]),
        "the pool follows the route to the other cluster",
    )
    .await;
    let eds: Vec<String> =
        status.resources().into_iter().filter(|r| r.kind == "eds").map(|r| r.name).collect();
    assert_eq!(
        eds,
        vec!["other-endpoints".to_owned()],
        "the old cluster's endpoints are no longer subscribed"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_and_draining_endpoints_take_no_calls_and_the_next_priority_takes_over() {
    let s = servers(3).await;
    let plane = ControlPlane::start().await;
    let p0 = |h0, h1| priority_0(&s, h0, h1);
    let p1 = LocalityEndpoints::healthy("b", 1, &[addr(&s[2])]);
    serve(&plane, &[p0(HealthStatus::Healthy, HealthStatus::Unknown), p1.clone()]);
    let (pool, status) = xds_pool(&plane).await;
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0], &s[1]]), "priority 0 alone, healthy").await;

    // Both of priority 0 unhealthy: priority 1 takes every call.
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[p0(HealthStatus::Unhealthy, HealthStatus::Draining), p1.clone()]),
    );
    wait_for_endpoints(&pool, &status, &addresses(&[&s[2]]), "priority 1 takes over").await;
    let before = (s[0].calls(), s[1].calls());
    calls(&pool, 20).await;
    assert_eq!((s[0].calls(), s[1].calls()), before, "unhealthy and draining endpoints take no call");

    // One of two back: 50% x 1.4 = 70% < 100%, so priority 1 still helps.
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[p0(HealthStatus::Unhealthy, HealthStatus::Healthy), p1]),
    );
    wait_for_endpoints(
        &pool,
        &status,
        &addresses(&[&s[1], &s[2]]),
        "priority 0's healthy one and priority 1",
    )
    .await;
    calls(&pool, 20).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_the_pool_cannot_honour_is_nacked_naming_the_field_and_the_last_good_one_is_kept() {
    let s = servers(2).await;
    let plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    let (pool, status) = xds_pool(&plane).await;
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the first assignment").await;
    let good = plane.version(cp::CLUSTER);

    // A ring-hash cluster: refused, and the NACK says which resource and field.
    let mut ring_hash = cp::cluster("echo", "echo-endpoints");
    ring_hash.lb_policy = 2; // RING_HASH
    plane.set("echo", ring_hash);
    wait_until(WAIT, "the cluster is NACKed", || !plane.nacks().is_empty()).await;
    let (type_url, kept, detail) = plane.nacks().remove(0);
    assert_eq!(type_url, cp::CLUSTER);
    assert_eq!(kept, good.to_string(), "the NACK carries the version the client keeps");
    assert!(detail.contains("\"echo\"") && detail.contains("lb_policy"), "{detail}");
    assert!(status.last_nack().is_some_and(|n| n.contains("lb_policy")), "{:?}", status.last_nack());
    let cds = status.resources().into_iter().find(|r| r.kind == "cds").unwrap();
    assert_eq!(cds.state, "nacked");
    assert!(cds.error.is_some_and(|e| e.contains("lb_policy")));

    // The last good cluster still holds: an endpoint change under it is followed.
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[1])])]),
    );
    wait_for_endpoints(&pool, &status, &addresses(&[&s[1]]), "EDS is followed under the kept cluster").await;
    calls(&pool, 10).await;

    // A bad assignment (a port of 0) is refused too, naming the endpoint's field; the
    // endpoints stay.
    let mut bad = cp::assignment("echo-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    bad.endpoints[0].lb_endpoints[0].host_identifier = None;
    plane.set("echo-endpoints", bad);
    wait_until(WAIT, "the assignment is NACKed", || plane.nacks().iter().any(|n| n.0 == cp::ENDPOINTS)).await;
    let detail = plane.nacks().into_iter().find(|n| n.0 == cp::ENDPOINTS).unwrap().2;
    assert!(detail.contains("endpoints[0].lb_endpoints[0].endpoint"), "{detail}");
    assert_eq!(status.endpoints(), addresses(&[&s[1]]));

    // Fixed: ACKed, and followed.
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));
    let fixed = plane.version(cp::CLUSTER);
    wait_until(WAIT, "the fixed cluster is ACKed", || plane.acked(cp::CLUSTER, fixed)).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_keeps_the_endpoints_and_the_stream_resumes() {
    let s = servers(2).await;
    let mut plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    let (pool, status) = xds_pool(&plane).await;
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the first assignment").await;

    plane.stop().await;
    wait_until(WAIT, "the client sees the stream gone", || !status.connected()).await;
    calls(&pool, 10).await; // the endpoints stay while the control plane is away
    assert_eq!(pool_endpoints(&pool), addresses(&[&s[0]]).into_iter().collect());

    plane.restart().await;
    wait_until(WAIT, "the stream is made again", || plane.streams() >= 2 && status.connected()).await;
    // The new stream asks again with the versions it holds.
    let listener_version = plane.version(cp::LISTENER).to_string();
    let resumed = plane
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.type_url == cp::LISTENER && r.response_nonce.is_empty());
    assert_eq!(resumed.map(|r| r.version_info), Some(listener_version));
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[1])])]),
    );
    wait_for_endpoints(&pool, &status, &addresses(&[&s[1]]), "changes after the restart are followed").await;
    calls(&pool, 10).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_goes_away_leaves_the_target_without_endpoints_and_says_why() {
    let s = servers(1).await;
    let plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    let (pool, status) = xds_pool(&plane).await;
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the first assignment").await;

    plane.remove(cp::LISTENER, LISTENER);
    wait_for_endpoints(&pool, &status, &[], "the endpoints go with the listener").await;
    let why = status.broken().unwrap();
    assert!(why.contains("does not exist") && why.contains(LISTENER), "{why}");

    // Back: the endpoints return.
    plane.set(LISTENER, cp::listener(LISTENER, "echo-routes"));
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the listener is back").await;
    assert_eq!(status.broken(), None);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_route_configuration_needs_no_rds() {
    let s = servers(1).await;
    let plane = ControlPlane::start().await;
    plane.set(LISTENER, cp::listener_inline(LISTENER, "echo"));
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]),
    );
    let (pool, status) = xds_pool(&plane).await;
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the inline route's cluster").await;
    assert!(plane.requests().iter().all(|r| r.type_url != cp::ROUTE), "no RDS request");
    calls(&pool, 5).await;
    pool.close().await;
}

/// The servers whose call counts moved between `before` and now.
fn hit(servers: &[TestServer], before: &[u64]) -> Vec<String> {
    let mut out: Vec<String> = servers
        .iter()
        .zip(before)
        .filter(|(s, b)| s.calls() > **b)
        .map(|(s, _)| s.addr().to_string())
        .collect();
    out.sort();
    out
}

fn counts(servers: &[TestServer]) -> Vec<u64> {
    servers.iter().map(TestServer::calls).collect()
}

/// The endpoints the C core sends calls to once it has taken the control plane's current
/// resources: batches of calls until one reaches exactly `want` (its xDS client applies an
/// update a moment after the control plane sends it), or the last batch's set after 30 s.
async fn c_core_endpoints(
    client: &mut GrpcioXdsClient,
    servers: &[TestServer],
    want: &[String],
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let before = counts(servers);
        let batch = client.calls(10 * servers.len() as u64).await;
        let seen = hit(servers, &before);
        if (seen == want && (batch.failed == 0 || want.is_empty())) || tokio::time::Instant::now() > deadline
        {
            return seen;
        }
    }
}

/// The endpoints the pool sends calls to: every endpoint it holds must take some of 10 per
/// server, and no other.
async fn pool_hits(pool: &Pool, servers: &[TestServer]) -> Vec<String> {
    let before = counts(servers);
    calls(pool, 10 * servers.len()).await;
    hit(servers, &before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_c_core_sees_the_same_endpoints_as_the_pool_on_each_resource_set() {
    let s = servers(3).await;
    let plane = ControlPlane::start().await;
    let p0 = |h0, h1| priority_0(&s, h0, h1);
    let p1 = LocalityEndpoints::healthy("b", 1, &[addr(&s[2])]);
    serve(&plane, &[p0(HealthStatus::Healthy, HealthStatus::Healthy), p1.clone()]);
    let (pool, status) = xds_pool(&plane).await;
    let mut c_core = GrpcioXdsClient::start(TARGET, &plane.bootstrap("c-core")).await;

    // Each resource set: the endpoints both must use.
    let sets: Vec<(&str, Vec<LocalityEndpoints>, Vec<String>)> = vec![
        (
            "priority 0 healthy",
            vec![p0(HealthStatus::Healthy, HealthStatus::Healthy), p1.clone()],
            addresses(&[&s[0], &s[1]]),
        ),
        (
            "priority 0 unhealthy and draining: priority 1",
            vec![p0(HealthStatus::Unhealthy, HealthStatus::Draining), p1.clone()],
            addresses(&[&s[2]]),
        ),
        (
            "UNKNOWN counts as healthy",
            vec![p0(HealthStatus::Unknown, HealthStatus::Unknown), p1.clone()],
            addresses(&[&s[0], &s[1]]),
        ),
        (
            "DEGRADED and TIMEOUT do not",
            vec![p0(HealthStatus::Degraded, HealthStatus::Timeout), p1.clone()],
            addresses(&[&s[2]]),
        ),
        (
            "one locality with its own endpoints",
            vec![LocalityEndpoints::healthy("c", 0, &[addr(&s[1]), addr(&s[2])])],
            addresses(&[&s[1], &s[2]]),
        ),
    ];
    for (what, localities, want) in sets {
        plane.set("echo-endpoints", cp::assignment("echo-endpoints", &localities));
        wait_for_endpoints(&pool, &status, &want, what).await;
        assert_eq!(pool_hits(&pool, &s).await, want, "the pool, {what}");
        assert_eq!(c_core_endpoints(&mut c_core, &s, &want).await, want, "the C core, {what}");
    }

    // Locality weights 3:1 (one endpoint each): both send about three quarters of the
    // calls to the first (400 calls: 300 expected, sd 8.7).
    let weighted = [
        LocalityEndpoints { weight: 3, ..LocalityEndpoints::healthy("a", 0, &[addr(&s[0])]) },
        LocalityEndpoints { weight: 1, ..LocalityEndpoints::healthy("b", 0, &[addr(&s[1])]) },
    ];
    plane.set("echo-endpoints", cp::assignment("echo-endpoints", &weighted));
    let mut want = vec![(s[0].addr().to_string(), 750_000), (s[1].addr().to_string(), 250_000)];
    want.sort();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pool_weights: Vec<u32> = pool.state().endpoints.iter().map(|e| e.weight).collect();
        if status.weights() == want && pool_weights.contains(&750_000) && pool_weights.contains(&250_000) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "weights: {:?} in the status, {pool_weights:?} in the pool",
            status.weights()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    three_quarters_each(&pool, &mut c_core, &s, "locality").await;

    // Where the two differ, on purpose: one of priority 0's two endpoints unhealthy. The pool
    // follows Envoy's overprovisioning factor (50% x 1.4 = 70% healthy, so priority 1 takes
    // calls too); the C core's priority policy stays on priority 0 while it has a ready
    // endpoint (gRFC A27 and A56 have no overprovisioning).
    plane.set(
        "echo-endpoints",
        cp::assignment("echo-endpoints", &[p0(HealthStatus::Healthy, HealthStatus::Unhealthy), p1]),
    );
    let envoy = addresses(&[&s[0], &s[2]]);
    wait_for_endpoints(&pool, &status, &envoy, "priority 0 half healthy").await;
    assert_eq!(pool_hits(&pool, &s).await, envoy);
    let grpc = addresses(&[&s[0]]);
    assert_eq!(c_core_endpoints(&mut c_core, &s, &grpc).await, grpc, "the C core stays on priority 0");

    // The listener gone: neither sends a call anywhere.
    plane.remove(cp::LISTENER, LISTENER);
    wait_for_endpoints(&pool, &status, &[], "no listener").await;
    assert_eq!(c_core_endpoints(&mut c_core, &s, &[]).await, Vec::<String>::new());
    let batch = c_core.calls(3).await;
    assert_eq!((batch.ok, batch.failed), (0, 3), "{batch:?}");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_files_xds_section_builds_a_pool_that_follows_the_control_plane() {
    let s = servers(1).await;
    let plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    let dir = std::env::temp_dir().join(format!("grpc-pool-xds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bootstrap = dir.join("bootstrap.json");
    std::fs::write(&bootstrap, plane.bootstrap("from-a-file")).unwrap();
    let text = format!("[xds]\ntarget = \"{TARGET}\"\nbootstrap = \"{}\"\n", bootstrap.display());
    let config: grpc_pool::PoolConfig = toml::from_str(&text).unwrap();
    let pool = config.clone().builder().build([] as [&str; 0]).await.unwrap();
    wait_until(WAIT, "the pool has the control plane's endpoint", || {
        pool_endpoints(&pool) == addresses(&[&s[0]]).into_iter().collect()
    })
    .await;
    calls(&pool, 5).await;
    let first = plane.requests().into_iter().next().unwrap();
    assert_eq!(first.node.map(|n| n.id), Some("from-a-file".to_owned()));
    pool.close().await;

    // Alone: with endpoints beside it, or a target that is not xds, the build names the field.
    let err = config.clone().builder().build_lazy(["http://127.0.0.1:1"]).unwrap_err().to_string();
    assert!(err.contains("`xds`"), "{err}");
    let bad: grpc_pool::PoolConfig = toml::from_str(&text.replace(TARGET, "dns:///echo.test:50051")).unwrap();
    let err = bad.builder().build_lazy([] as [&str; 0]).unwrap_err().to_string();
    assert!(err.contains("`xds.target`"), "{err}");
    let missing: grpc_pool::PoolConfig =
        toml::from_str(&text.replace("bootstrap.json", "absent.json")).unwrap();
    let err = missing.builder().build_lazy([] as [&str; 0]).unwrap_err().to_string();
    assert!(err.contains("`xds.bootstrap`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_circuit_breaker_caps_the_pools_calls_in_flight_while_it_is_set() {
    use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers::Thresholds, CircuitBreakers};
    let s = servers(1).await;
    let plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    let mut capped = cp::cluster("echo", "echo-endpoints");
    capped.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds {
            max_requests: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 1 }),
            ..Thresholds::default()
        }],
        ..CircuitBreakers::default()
    });
    plane.set("echo", capped);
    // The stream made by hand and given to a pool built otherwise: `Pool::discover` hands
    // it the pool for the cluster's policy too.
    let bootstrap = Bootstrap::from_json(&plane.bootstrap("by-hand")).unwrap();
    let discover = grpc_pool::xds::XdsDiscover::new(&bootstrap, TARGET).unwrap();
    let status = discover.status();
    let pool = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    pool.discover(discover);
    wait_until(WAIT, "the cap is applied", || {
        status.max_requests() == Some(1) && status.endpoints().len() == 1
    })
    .await;
    let mut c = EchoClient::new(pool.clone());
    let held = tokio::spawn(async move {
        c.unary_echo(EchoRequest { message: Bytes::from_static(b"slow"), repeat: 0, delay_ms: 1_000 }).await
    });
    wait_until(WAIT, "the slow call is at the server", || s[0].active() == 1).await;
    let status_code = EchoClient::new(pool.clone()).unary_echo(request()).await.unwrap_err();
    assert_eq!(status_code.code(), tonic::Code::Unavailable, "{status_code:?}");
    assert!(status_code.message().contains("max_requests (1)"), "{status_code:?}");
    held.await.unwrap().unwrap();

    // The cluster without a circuit breaker: the cap goes.
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));
    wait_until(WAIT, "the cap is lifted", || {
        status.max_requests().is_none() && plane.acked(cp::CLUSTER, plane.version(cp::CLUSTER))
    })
    .await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut c = EchoClient::new(pool.clone());
        calls.spawn(async move {
            c.unary_echo(EchoRequest { message: Bytes::from_static(b"x"), repeat: 0, delay_ms: 50 }).await
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap().unwrap();
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_the_calls_by_weight_in_the_pool_and_in_the_c_core() {
    let s = servers(2).await;
    let plane = ControlPlane::start().await;
    plane.set(LISTENER, cp::listener(LISTENER, "echo-routes"));
    plane.set("echo-routes", cp::route_config_weighted("echo-routes", &["*"], &[("big", 3), ("small", 1)]));
    plane.set("big", cp::cluster("big", "big-endpoints"));
    plane.set("small", cp::cluster("small", "small-endpoints"));
    plane.set(
        "big-endpoints",
        cp::assignment("big-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]),
    );
    plane.set(
        "small-endpoints",
        cp::assignment("small-endpoints", &[LocalityEndpoints::healthy("a", 0, &[addr(&s[1])])]),
    );
    let (pool, status) = xds_pool(&plane).await;
    let both = addresses(&[&s[0], &s[1]]);
    wait_for_endpoints(&pool, &status, &both, "both clusters' endpoints").await;
    let weight_of = |a: &TestServer| {
        status.weights().into_iter().find(|(e, _)| *e == a.addr().to_string()).map(|(_, w)| w)
    };
    assert_eq!((weight_of(&s[0]), weight_of(&s[1])), (Some(750_000), Some(250_000)));

    let mut c_core = GrpcioXdsClient::start(TARGET, &plane.bootstrap("c-core")).await;
    three_quarters_each(&pool, &mut c_core, &s, "cluster").await;

    // A cluster that goes away gives its share to the other.
    plane.remove(cp::CLUSTER, "small");
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the remaining cluster takes every call").await;
    calls(&pool, 10).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_outlier_detection_ejects_as_grfc_a50_reads_it_and_its_removal_gives_the_pools_back() {
    use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection as ClusterOutliers;
    use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};
    let s = servers(3).await;
    let plane = ControlPlane::start().await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0]), addr(&s[1]), addr(&s[2])])]);
    let percent = |value| Some(UInt32Value { value });
    let mut ejecting = cp::cluster("echo", "echo-endpoints");
    ejecting.outlier_detection = Some(ClusterOutliers {
        interval: Some(ProtoDuration { seconds: 0, nanos: 100_000_000 }),
        max_ejection_percent: percent(50),
        enforcing_success_rate: percent(0),
        enforcing_failure_percentage: percent(100),
        failure_percentage_threshold: percent(50),
        failure_percentage_minimum_hosts: percent(3),
        failure_percentage_request_volume: percent(10),
        ..ClusterOutliers::default()
    });
    plane.set("echo", ejecting.clone());
    let (pool, status) = xds_pool(&plane).await;
    wait_until(WAIT, "the cluster's outlier detection is applied", || {
        status.outlier_detection().is_some_and(|o| o.failure_percentage.is_some() && o.success_rate.is_none())
            && status.endpoints().len() == 3
    })
    .await;
    s[0].set_unavailable(true);
    let ejected = |pool: &Pool| {
        pool.state()
            .endpoints
            .iter()
            .any(|e| e.endpoint.to_string().ends_with(&s[0].addr().to_string()) && e.ejected_for.is_some())
    };
    let mut c = EchoClient::new(pool.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ejected(&pool) {
        assert!(tokio::time::Instant::now() < deadline, "not ejected: {:?}", pool.state());
        let _ = c.unary_echo(request()).await;
    }

    // A percentage over 100 is refused, naming the field; the last good cluster holds.
    let mut bad = ejecting;
    bad.outlier_detection.as_mut().unwrap().failure_percentage_threshold = percent(150);
    plane.set("echo", bad);
    wait_until(WAIT, "the bad cluster is NACKed", || !plane.nacks().is_empty()).await;
    let detail = plane.nacks().remove(0).2;
    assert!(detail.contains("outlier_detection.failure_percentage_threshold: 150 (0 to 100)"), "{detail}");

    // The cluster without outlier detection: the pool's own (off) is back.
    plane.set("echo", cp::cluster("echo", "echo-endpoints"));
    wait_until(WAIT, "the pool's own settings are back", || status.outlier_detection().is_none()).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_1_takes_over_when_the_pool_finds_priority_0_failing_and_gives_back_when_it_returns() {
    let mut s = servers(3).await;
    let plane = ControlPlane::start().await;
    let p0 = LocalityEndpoints::healthy("a", 0, &[addr(&s[0]), addr(&s[1])]);
    let p1 = LocalityEndpoints::healthy("b", 1, &[addr(&s[2])]);
    serve(&plane, &[p0, p1]);
    let bootstrap = Bootstrap::from_json(&plane.bootstrap("failover")).unwrap();
    let mut backoff = grpc_pool::BackoffConfig::default();
    (backoff.base, backoff.max) = (Duration::from_millis(50), Duration::from_millis(200));
    let (pool, status) = Pool::builder()
        .backoff(backoff)
        .checkout_timeout(Duration::from_secs(10))
        .build_xds_with(TARGET, &bootstrap)
        .unwrap();
    let p0_addresses = addresses(&[&s[0], &s[1]]);
    wait_for_endpoints(&pool, &status, &p0_addresses, "priority 0 alone").await;
    let mut c_core = GrpcioXdsClient::start(TARGET, &plane.bootstrap("c-core")).await;
    assert_eq!(c_core_endpoints(&mut c_core, &s, &p0_addresses).await, p0_addresses);

    // Both servers of priority 0 go away (the control plane still lists them HEALTHY): the
    // pool finds them failing, and priority 1 joins. The C core fails over too.
    let (a0, a1) = (s[0].addr(), s[1].addr());
    let gone: Vec<TestServer> = s.drain(0..2).collect();
    for server in gone {
        server.shutdown().await;
    }
    let all = {
        let mut all = vec![a0.to_string(), a1.to_string(), s[0].addr().to_string()];
        all.sort();
        all
    };
    wait_for_endpoints(&pool, &status, &all, "priority 1 joins").await;
    let before = s[0].calls();
    calls(&pool, 20).await;
    assert_eq!(s[0].calls() - before, 20, "every call goes to priority 1");
    let before = s[0].calls();
    let batch = c_core.calls(20).await;
    assert_eq!((batch.ok, s[0].calls() - before), (20, 20), "the C core fails over too: {batch:?}");

    // Priority 0 comes back on its ports: priority 1 gives its calls back.
    let mut back = Vec::new();
    for a in [a0, a1] {
        back.push(
            TestServer::start_with(grpc_pool_testkit::ServerOptions {
                port: Some(a.port()),
                ..Default::default()
            })
            .await,
        );
    }
    wait_for_endpoints(&pool, &status, &p0_addresses, "priority 0 alone again").await;
    calls(&pool, 20).await;
    assert!(back.iter().all(|b| b.calls() > 0), "priority 0 takes the calls again");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_the_control_plane_never_answers_for_does_not_exist_after_the_timer() {
    // A control plane that sends nothing for resources it does not have (gRFC A57 allows it):
    // the stream is up from when its requests go out, and the 15 s timer decides.
    let plane = ControlPlane::start().await;
    plane.set_silent_when_empty(true);
    let (pool, status) = xds_pool(&plane).await;
    wait_until(WAIT, "the stream is up without any answer", || status.connected()).await;
    assert!(status.broken().is_none(), "not before the timer");
    wait_until(Duration::from_secs(30), "the listener does not exist", || {
        status.broken().is_some_and(|why| why.contains("does not exist") && why.contains(LISTENER))
    })
    .await;
    let lds = status.resources().into_iter().find(|r| r.kind == "lds").unwrap();
    assert_eq!(lds.state, "does_not_exist");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_over_tls_is_reached_with_the_bootstraps_ca_file() {
    let s = servers(1).await;
    let ca = grpc_pool_testkit::Ca::new("xds test CA");
    let plane = ControlPlane::start_tls(ca.server(&["127.0.0.1"], false, None)).await;
    serve(&plane, &[LocalityEndpoints::healthy("a", 0, &[addr(&s[0])])]);
    let dir = std::env::temp_dir().join(format!("grpc-pool-xds-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let bootstrap = Bootstrap::from_json(&plane.bootstrap_tls("tls-client", &ca_file)).unwrap();
    assert!(bootstrap.server_uri().starts_with("https://"));
    let (pool, status) = Pool::builder().build_xds_with(TARGET, &bootstrap).unwrap();
    wait_for_endpoints(&pool, &status, &addresses(&[&s[0]]), "the endpoints come over TLS").await;
    calls(&pool, 3).await;
    pool.close().await;

    // A bootstrap naming a CA file that is not there fails at once, naming the field.
    let missing = plane.bootstrap_tls("tls-client", &dir.join("absent.pem"));
    let err = Bootstrap::from_json(&missing).unwrap_err().to_string();
    assert!(err.contains("`xds_servers[0].channel_creds[0].config.ca_certificate_file`"), "{err}");
    // Trusting another CA: the control plane is never reached, and the stream says why.
    let other = grpc_pool_testkit::Ca::new("another CA");
    std::fs::write(&ca_file, other.pem()).unwrap();
    let bootstrap = Bootstrap::from_json(&plane.bootstrap_tls("tls-client", &ca_file)).unwrap();
    let (pool, status) =
        Pool::builder().checkout_timeout(Duration::from_secs(1)).build_xds_with(TARGET, &bootstrap).unwrap();
    wait_until(WAIT, "the stream fails to start", || status.last_error().is_some()).await;
    let why = status.last_error().unwrap();
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert!(!status.connected() && status.endpoints().is_empty(), "{status:?}");
    pool.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
