//! The metrics on a Prometheus page: the pool under load with `metrics-exporter-prometheus`
//! serving `/metrics` on 127.0.0.1, scraped over HTTP like Prometheus would, twice: every
//! documented family is there, and the counters move between scrapes.
//!
//! One test in its own binary: a process has one global metrics recorder.

use std::time::Duration;

use bytes::Bytes;
use grpc_pool::{metrics as names, Pool};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, TestServer};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over a plain HTTP/1.1 connection; the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{}", response.lines().next().unwrap_or(""));
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// Scrapes until `ready` holds for the page (the gauges are sampled on an interval), for at
/// most 10 s; the page.
async fn scrape_until(addr: std::net::SocketAddr, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = scrape(addr).await;
        if ready(&page) {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}:\n{page}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the first sample of `family` whose labels contain every one of `labels`.
fn value(page: &str, family: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(family) && line[family.len()..].starts_with(['{', ' ']))
        .find(|line| labels.iter().all(|l| line.contains(l)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_page_has_every_family_and_the_values_move() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    PrometheusBuilder::new().with_http_listener(addr).install().unwrap();

    let servers = [TestServer::start().await, TestServer::start().await];
    let pool = Pool::builder()
        .name("scraped")
        .metrics_interval(Duration::from_millis(20))
        .build(servers.iter().map(|s| s.uri()))
        .await
        .unwrap();
    let mut client = EchoClient::new(pool.clone());
    let request = EchoRequest { message: Bytes::from_static(b"m"), repeat: 0, delay_ms: 0 };
    for _ in 0..50 {
        client.unary_echo(request.clone()).await.unwrap();
    }
    // A call holding its slot, so the in-flight gauge has something to show.
    let mut slow = EchoClient::new(pool.clone());
    let held = tokio::spawn(async move {
        slow.unary_echo(EchoRequest { message: Bytes::from_static(b"s"), repeat: 0, delay_ms: 2_000 }).await
    });
    wait_until(Duration::from_secs(10), "the slow call is on a server", || {
        servers.iter().map(|s| s.active()).sum::<usize>() == 1
    })
    .await;
    let in_flight = |page: &str| -> f64 {
        servers
            .iter()
            .filter_map(|s| value(page, names::IN_FLIGHT, &[&format!("endpoint=\"{}\"", s.uri())]))
            .sum()
    };
    let first = scrape_until(addr, "the gauge shows the slow call", |page| in_flight(page) == 1.0).await;
    let pool_label = "pool=\"scraped\"";
    for family in [
        names::CONNECTS,
        names::CHECKOUTS,
        names::CONNECT_DURATION,
        names::CONNECTIONS,
        names::IN_FLIGHT,
        names::WAITERS,
    ] {
        assert!(first.contains(family), "{family} missing from the page:\n{first}");
    }
    let ready: f64 = servers
        .iter()
        .filter_map(|s| {
            value(
                &first,
                names::CONNECTIONS,
                &[pool_label, &format!("endpoint=\"{}\"", s.uri()), "state=\"ready\""],
            )
        })
        .sum();
    assert!(ready >= 2.0, "ready connections: {ready}\n{first}");
    let direct =
        |page: &str| value(page, names::CHECKOUTS, &[pool_label, "result=\"direct\""]).unwrap_or(0.0);
    assert!(direct(&first) >= 51.0, "{first}");

    for _ in 0..25 {
        client.unary_echo(request.clone()).await.unwrap();
    }
    held.await.unwrap().unwrap();
    let second = scrape_until(addr, "the gauge shows no call", |page| in_flight(page) == 0.0).await;
    assert!(direct(&second) >= direct(&first) + 25.0, "checkouts did not move:\n{second}");

    // A pool with a subset and a connection budget of one: the subset's gauges, and the
    // connect the budget did not allow at build.
    let mut subset = grpc_pool::Subset::new(2);
    subset.client = Some(0);
    let _budgeted = Pool::builder()
        .name("budgeted")
        .metrics_interval(Duration::from_millis(20))
        .subset(Some(subset))
        .max_total_connections(Some(1))
        .build(servers.iter().map(|s| s.uri()))
        .await
        .unwrap();
    let budgeted = "pool=\"budgeted\"";
    let subset_count = |page: &str, state: &str| {
        value(page, names::SUBSET_ENDPOINTS, &[budgeted, &format!("state=\"{state}\"")])
    };
    let third =
        scrape_until(addr, "the subset's gauges", |page| subset_count(page, "live") == Some(2.0)).await;
    assert_eq!(subset_count(&third, "known"), Some(2.0), "{third}");
    assert_eq!(subset_count(&third, "displaced"), Some(0.0), "{third}");
    let refused = value(&third, names::BUDGET_REFUSALS, &[budgeted]).unwrap_or(0.0);
    assert!(refused >= 1.0, "the second endpoint's connect was beyond the budget:\n{third}");

    #[cfg(feature = "xds")]
    xds_families(addr, &servers[0]).await;
}

/// An xDS client's families: its resources by state, ACKs and a NACK, the stream up, then
/// down and made again.
#[cfg(feature = "xds")]
async fn xds_families(addr: std::net::SocketAddr, server: &TestServer) {
    use grpc_pool_testkit::xds::{self as cp, ControlPlane, LocalityEndpoints};
    let mut plane = ControlPlane::start().await;
    plane.set("scraped.xds", cp::listener("scraped.xds", "routes"));
    plane.set("routes", cp::route_config("routes", &["*"], "echo"));
    plane.set("echo", cp::cluster("echo", "echo-eds"));
    plane
        .set("echo-eds", cp::assignment("echo-eds", &[LocalityEndpoints::healthy("a", 0, &[server.addr()])]));
    let bootstrap = grpc_pool::xds::Bootstrap::from_json(&plane.bootstrap("scraped")).unwrap();
    let (_pool, status) =
        Pool::builder().name("xds-scraped").build_xds_with("xds:///scraped.xds", &bootstrap).unwrap();
    wait_until(Duration::from_secs(10), "the xDS endpoint arrives", || status.endpoints().len() == 1).await;
    let mut ring_hash = cp::cluster("echo", "echo-eds");
    ring_hash.lb_policy = 2;
    plane.set("echo", ring_hash);
    let target = "target=\"scraped.xds\"";
    let page = scrape_until(addr, "the NACK is counted", |page| {
        value(page, names::XDS_RESPONSES, &[target, "type=\"cds\"", "result=\"nack\""]) == Some(1.0)
    })
    .await;
    for kind in ["lds", "rds", "eds"] {
        let acked =
            value(&page, names::XDS_RESOURCES, &[target, &format!("type=\"{kind}\""), "state=\"acked\""]);
        assert_eq!(acked, Some(1.0), "{kind}:\n{page}");
    }
    let nacked = value(&page, names::XDS_RESOURCES, &[target, "type=\"cds\"", "state=\"nacked\""]);
    assert_eq!(nacked, Some(1.0), "{page}");
    assert!(value(&page, names::XDS_RESPONSES, &[target, "type=\"eds\"", "result=\"ack\""]) >= Some(1.0));
    assert_eq!(value(&page, names::XDS_CONNECTED, &[target]), Some(1.0), "{page}");
    plane.stop().await;
    plane.restart().await;
    scrape_until(addr, "the stream is made again", |page| {
        value(page, names::XDS_RECONNECTS, &[target]) >= Some(1.0)
            && value(page, names::XDS_CONNECTED, &[target]) == Some(1.0)
    })
    .await;
}
