//! `PoolConfig` from TOML and JSON (cargo feature `serde`): the example file, defaults, and
//! the errors a bad file gets (unknown fields and bad durations named; out-of-range values
//! with the builder's messages).
#![cfg(feature = "serde")]

use std::time::Duration;

use grpc_pool::{AllUnhealthy, CheckMode, PoolConfig};

fn example() -> PoolConfig {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pool.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

#[test]
fn the_example_file_parses_and_says_the_defaults() {
    let config = example();
    let defaults = PoolConfig::default();
    assert_eq!(config.endpoints.len(), 2);
    assert_eq!(config.max_connections, defaults.max_connections);
    assert_eq!(config.checkout_timeout, defaults.checkout_timeout);
    let keepalive = config.keepalive.clone().unwrap();
    assert_eq!(keepalive.time, Duration::from_secs(20));
    assert_eq!(Some(&keepalive), defaults.keepalive.as_ref());
    assert_eq!(keepalive.timeout, Duration::from_secs(10));
    assert!(!keepalive.permit_without_stream);
    assert_eq!(keepalive.max_pings_without_data, 2);
    assert_eq!(config.idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(config.max_lifetime, None);
    assert_eq!(config.ping_before_use, Some(Duration::from_secs(30)));
    assert_eq!(config.when_all_unhealthy, AllUnhealthy::FailFast);
    // The optional sections are written out in the example with their defaults.
    let check = config.health_checks.as_ref().unwrap();
    assert_eq!(check, &grpc_pool::HealthCheck::default());
    assert_eq!((check.interval, check.mode), (Duration::from_secs(5), CheckMode::Watch));
    assert_eq!(check.unhealthy_interval, Duration::from_secs(1));
    assert_eq!(config.outlier_detection, Some(grpc_pool::OutlierDetection::default()));
    assert_eq!(config.backoff.multiplier, defaults.backoff.multiplier);
    assert_eq!(config.h2.max_frame_size, defaults.h2.max_frame_size);
}

#[tokio::test]
async fn the_example_file_builds_a_pool() {
    let pool = example().build_lazy().unwrap();
    assert_eq!(pool.state().endpoints.len(), 2);
    assert_eq!(pool.name(), "example");
}

#[test]
fn json_works_the_same_and_empty_means_defaults() {
    let config: PoolConfig = serde_json::from_str(
        r#"{"name": "orders", "checkout_timeout": "1m 30s", "idle_timeout": "off",
            "health_checks": {"mode": "watch"}, "keepalive": "off"}"#,
    )
    .unwrap();
    assert_eq!(config.name, "orders");
    assert_eq!(config.checkout_timeout, Duration::from_secs(90));
    assert_eq!(config.idle_timeout, None);
    assert_eq!(config.keepalive, None);
    assert_eq!(config.health_checks.unwrap().mode, CheckMode::Watch);
    let empty: PoolConfig = toml::from_str("").unwrap();
    assert_eq!(empty.max_connections, 8);
    assert!(empty.health_checks.is_none());
    assert!(empty.keepalive.is_some());
    assert_eq!(empty.balance, grpc_pool::Balance::LeastLoaded);
}

#[test]
fn the_choice_between_endpoints_is_named_in_a_file() {
    let aware: PoolConfig = toml::from_str("balance = { peak_ewma = { decay = \"250ms\" } }").unwrap();
    assert_eq!(aware.balance, grpc_pool::Balance::PeakEwma { decay: Duration::from_millis(250) });
    let least: PoolConfig = toml::from_str("balance = \"least_loaded\"").unwrap();
    assert_eq!(least.balance, grpc_pool::Balance::LeastLoaded);
    let wrong = toml::from_str::<PoolConfig>("balance = \"fastest\"").unwrap_err().to_string();
    assert!(wrong.contains("least_loaded") && wrong.contains("peak_ewma"), "{wrong}");
}

#[test]
fn unknown_fields_are_errors_that_name_them() {
    let top = toml::from_str::<PoolConfig>("max_conections = 3").unwrap_err().to_string();
    assert!(top.contains("unknown field `max_conections`"), "{top}");
    let nested = toml::from_str::<PoolConfig>("[keepalive]\ntimout = \"5s\"").unwrap_err().to_string();
    assert!(nested.contains("unknown field `timout`"), "{nested}");
    let off = toml::from_str::<PoolConfig>("keepalive = \"of\"").unwrap_err().to_string();
    assert!(off.contains("a table of settings, or \"off\""), "{off}");
}

#[test]
fn a_bad_duration_says_how_to_write_one() {
    let err = toml::from_str::<PoolConfig>("checkout_timeout = \"5 parsecs\"").unwrap_err().to_string();
    assert!(err.contains("invalid duration `5 parsecs`"), "{err}");
    assert!(err.contains("\"30s\""), "{err}");
    assert!(err.contains("checkout_timeout"), "the error should point at the field: {err}");
}

#[tokio::test]
async fn out_of_range_values_get_the_builders_messages() {
    let config: PoolConfig =
        toml::from_str("endpoints = [\"http://127.0.0.1:1\"]\nmax_connections = 0").unwrap();
    let err = config.build_lazy().unwrap_err().to_string();
    assert!(err.contains("`max_connections` = 0"), "{err}");
    assert!(err.contains("1 to 10000"), "{err}");
    let config: PoolConfig =
        toml::from_str("endpoints = [\"http://127.0.0.1:1\"]\n[keepalive]\ntime = \"0s\"").unwrap();
    let err = config.build_lazy().unwrap_err().to_string();
    assert!(err.contains("`keepalive.time`"), "{err}");
}

#[test]
fn tls_files_are_read_with_the_file_and_a_missing_one_is_named() {
    let err =
        toml::from_str::<PoolConfig>("[tls]\nca_file = \"/nonexistent/ca.pem\"").unwrap_err().to_string();
    assert!(err.contains("`tls.ca_file`") && err.contains("/nonexistent/ca.pem"), "{err}");
    let err = toml::from_str::<PoolConfig>("[tls]\ncert_file = \"/tmp/c.pem\"").unwrap_err().to_string();
    assert!(err.contains("`tls.cert_file`") && err.contains("both files, or neither"), "{err}");
    let config: PoolConfig = toml::from_str("[tls]\nserver_name = \"orders.internal\"").unwrap();
    assert_eq!(config.tls.unwrap().server_name.as_deref(), Some("orders.internal"));
}

#[tokio::test]
async fn a_dns_section_adds_the_resolved_addresses_as_endpoints() {
    let server = grpc_pool_testkit::TestServer::start().await;
    // An address literal resolves to itself: the system resolver, with no DNS server needed.
    let text = format!("[dns]\nuri = \"{}\"\ninterval = \"50ms\"\n", server.uri());
    let config: PoolConfig = toml::from_str(&text).unwrap();
    assert_eq!(config.dns.as_ref().unwrap().interval, Duration::from_millis(50));
    let pool = config.build().await.unwrap();
    grpc_pool_testkit::wait_until(Duration::from_secs(10), "the resolved endpoint is in the pool", || {
        pool.state().endpoints.len() == 1
    })
    .await;
    assert_eq!(
        pool.state().endpoints[0].endpoint.to_string(),
        format!("{} ({})", server.uri(), server.addr())
    );
    let mut client = grpc_pool_testkit::echo::echo_client::EchoClient::new(pool.clone());
    let request =
        grpc_pool_testkit::echo::EchoRequest { message: Default::default(), repeat: 0, delay_ms: 0 };
    client.unary_echo(request).await.unwrap();
    assert_eq!(server.calls(), 1);

    // A bad name fails the build, naming the field; the interval defaults to 30 s.
    let config: PoolConfig = toml::from_str("[dns]\nuri = \"unix:///tmp/a.sock\"\n").unwrap();
    assert_eq!(config.dns.as_ref().unwrap().interval, Duration::from_secs(30));
    let err = config.build_lazy().unwrap_err().to_string();
    assert!(err.contains("`dns.uri`"), "{err}");
    let err = toml::from_str::<PoolConfig>("[dns]\nuri = \"http://a:1\"\nintervall = \"1s\"\n").unwrap_err();
    assert!(err.to_string().contains("intervall"), "{err}");
}

#[test]
fn the_example_file_writes_out_every_default() {
    // examples/pool.toml says each field's default; with its example values put back (the
    // endpoints, the name, the optional sections), it is `PoolConfig::default()` exactly.
    let mut config = example();
    config.name = grpc_pool::DEFAULT_POOL_NAME.to_owned();
    config.endpoints.clear();
    config.health_checks = None;
    config.outlier_detection = None;
    assert_eq!(config.user_agent.take().as_deref(), Some("example/1.0"));
    let service_config = config.service_config.take().expect("the example has a service config");
    grpc_pool::service_config::ServiceConfig::from_json(&service_config)
        .expect("the example's service config is valid");
    assert_eq!(format!("{config:#?}"), format!("{:#?}", PoolConfig::default()));
}

#[tokio::test]
async fn the_subset_section_reads_as_the_example_writes_it_and_bad_values_are_named() {
    // The example's `[subset]` section, uncommented.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pool.toml")).unwrap();
    let section: String = text
        .lines()
        .skip_while(|l| *l != "# [subset]")
        .take_while(|l| l.starts_with('#'))
        .filter(|l| !l.starts_with("#  "))
        .map(|l| format!("{}\n", l.trim_start_matches("# ")))
        .collect();
    let config: PoolConfig =
        toml::from_str(&format!("endpoints = [\"http://127.0.0.1:1\"]\n{section}")).unwrap();
    let subset = config.subset.clone().expect("the section");
    assert_eq!((subset.size, subset.client, subset.replace_after), (20, Some(7), Duration::from_secs(30)));
    let pool = config.build_lazy().unwrap();
    let state = pool.state().subset.expect("subsetting shows in the state");
    assert_eq!((state.size, state.client, state.known), (20, 7, 1));

    for (text, field) in [
        ("[subset]\nsize = 0\n", "`subset.size`"),
        ("[subset]\nsize = 10001\n", "`subset.size`"),
        ("[subset]\nreplace_after = \"1ms\"\n", "`subset.replace_after`"),
    ] {
        let config: PoolConfig =
            toml::from_str(&format!("endpoints = [\"http://127.0.0.1:1\"]\n{text}")).unwrap();
        let err = config.build_lazy().unwrap_err().to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
    let err = toml::from_str::<PoolConfig>("[subset]\nsise = 3\n").unwrap_err();
    assert!(err.to_string().contains("sise"), "{err}");
}

#[tokio::test]
async fn the_outlier_sections_interval_algorithms_read_from_a_file_and_bad_values_are_named() {
    let text = "endpoints = [\"http://127.0.0.1:1\"]\n[outlier_detection]\nconsecutive_failures = 0\ninterval = \"1s\"\n\
                [outlier_detection.success_rate]\nminimum_hosts = 3\n[outlier_detection.failure_percentage]\nthreshold = 60\n";
    let config: PoolConfig = toml::from_str(text).unwrap();
    let outliers = config.outlier_detection.clone().unwrap();
    assert_eq!((outliers.consecutive_failures, outliers.interval), (0, Duration::from_secs(1)));
    assert_eq!(outliers.success_rate.unwrap().minimum_hosts, 3);
    let failures = outliers.failure_percentage.unwrap();
    assert_eq!((failures.threshold, failures.request_volume), (60, 50));
    config.build_lazy().unwrap();
    for (from, to, field) in [
        ("threshold = 60", "threshold = 101", "`outlier_detection.failure_percentage.threshold`"),
        ("interval = \"1s\"", "interval = \"1ms\"", "`outlier_detection.interval`"),
    ] {
        let config: PoolConfig = toml::from_str(&text.replace(from, to)).unwrap();
        let err = config.build_lazy().unwrap_err().to_string();
        assert!(err.contains(field), "{to}: {err}");
    }
}
