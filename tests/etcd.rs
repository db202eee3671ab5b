//! Endpoints from etcd (feature `etcd`), against a real etcd (testkit's `EtcdServer`, one per
//! test on free 127.0.0.1 ports) and real tonic servers: registrations under load, etcd
//! stopped, compaction, churn, values that name no endpoint, and an etcd with authentication.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_pool::etcd::{parse_value, register, EtcdClient, EtcdDiscover, WatchStatus};
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{wait_until, Behaviour, EtcdServer, FrameServer, Relay, TestServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const WAIT: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(2);

/// Set in the child process that serves and registers (see `registrant_child`).
const CHILD_ENV: &str = "GRPC_POOL_ETCD_REGISTRANT";

fn endpoints(pool: &Pool) -> BTreeSet<String> {
    pool.state().endpoints.iter().map(|e| e.endpoint.to_string()).collect()
}

fn set<const N: usize>(uris: [&str; N]) -> BTreeSet<String> {
    uris.iter().map(|u| u.to_string()).collect()
}

/// What etcd holds under `prefix`, as endpoint URIs.
async fn registered(etcd: &EtcdClient, prefix: &str) -> BTreeSet<String> {
    let kvs = etcd.get_prefix(prefix).await.expect("etcd range");
    kvs.iter().filter_map(|(_, v)| parse_value(v).ok()).map(|e| e.to_string()).collect()
}

/// A pool that follows `prefix`, and the discovery's status.
fn following(etcd: &EtcdClient, prefix: &str) -> (Pool, WatchStatus) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pool = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    let discover = EtcdDiscover::new(etcd, prefix)
        .unwrap()
        .reconnect_backoff(Duration::from_millis(100), Duration::from_millis(500))
        .unwrap();
    let status = discover.status();
    pool.discover(discover);
    (pool, status)
}

/// 16 callers making 2 ms calls until stopped; each failure with the time it happened.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    callers: tokio::task::JoinSet<(usize, Vec<(Instant, tonic::Status)>)>,
}

impl Load {
    fn start(pool: &Pool) -> Load {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let mut client = EchoClient::new(pool.clone());
            let stopped = stopped.clone();
            callers.spawn(async move {
                let (mut calls, mut failures) = (0, Vec::new());
                while !*stopped.borrow() {
                    calls += 1;
                    let request = EchoRequest { message: Bytes::from_static(b"hi"), repeat: 0, delay_ms: 2 };
                    if let Err(status) = client.unary_echo(request).await {
                        failures.push((Instant::now(), status));
                    }
                }
                (calls, failures)
            });
        }
        Load { stop, callers }
    }

    async fn finish(mut self) -> (usize, Vec<(Instant, tonic::Status)>) {
        let _ = self.stop.send(true);
        let (mut calls, mut failures) = (0, Vec::new());
        while let Some(result) = self.callers.join_next().await {
            let (c, f) = result.unwrap();
            calls += c;
            failures.extend(f);
        }
        (calls, failures)
    }
}

/// Not a test of its own: the child process of `registrations_under_load...`, which serves
/// and registers until it is killed (or its stdin closes). A no-op in the test run itself.
#[test]
fn registrant_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (etcd_uri, key) = spec.split_once(' ').expect("etcd URI and key");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let server = TestServer::start().await;
        let etcd = EtcdClient::new([etcd_uri]).unwrap();
        let registration = register(&etcd, key, &server.addr().to_string(), TTL).await.expect("register");
        println!("SERVING {}", server.uri());
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .unwrap();
        drop(registration);
    });
}

/// Starts this test binary again as a registrant of `key`; returns it and the URI it serves.
fn start_registrant(etcd: &EtcdServer, key: &str) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["registrant_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{} {key}", etcd.uri()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the registrant");
    let (found, uri) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        // Reads on after the URI, so that the child's later output never meets a closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest's "test registrant_child ... " may stand before it on the line.
                if let Some((_, uri)) = line.split_once("SERVING ") {
                    let _ = found.send(uri.trim().to_owned());
                }
            }
        });
    }
    match uri.recv_timeout(WAIT) {
        Ok(uri) => (child, uri),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the registrant did not serve within {WAIT:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_under_load_one_added_one_deregistered_one_killed() {
    let etcd_server = EtcdServer::start();
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap();
    let (first, third, fourth) =
        (TestServer::start().await, TestServer::start().await, TestServer::start().await);
    let first_reg = register(&etcd, "svc/a/1", &first.addr().to_string(), TTL).await.unwrap();
    let (mut second, second_uri) = start_registrant(&etcd_server, "svc/a/2");
    let _third_reg = register(&etcd, "svc/a/3", &third.addr().to_string(), TTL).await.unwrap();

    let (pool, status) = following(&etcd, "svc/a/");
    let three = set([first.uri().as_str(), second_uri.as_str(), third.uri().as_str()]);
    wait_until(WAIT, "the three registered servers are in the pool", || endpoints(&pool) == three).await;
    let load = Load::start(&pool);
    wait_until(WAIT, "calls reach every server", || first.calls() > 0 && third.calls() > 0).await;

    // A fourth registers.
    let _fourth_reg = register(&etcd, "svc/a/4", &fourth.addr().to_string(), TTL).await.unwrap();
    wait_until(WAIT, "the fourth is in the pool", || endpoints(&pool).contains(&fourth.uri())).await;
    wait_until(WAIT, "the fourth takes calls", || fourth.calls() > 0).await;

    // The first deregisters: out of the pool at once; its calls in flight finish.
    first_reg.deregister().await.unwrap();
    let deregistered = Instant::now();
    wait_until(TTL + Duration::from_secs(1), "the first is out of the pool, its connections drained", || {
        let state = pool.state();
        let listed = state.endpoints.iter().any(|e| e.endpoint.to_string() == first.uri());
        !listed && state.open_connections == state.members()
    })
    .await;
    println!("the deregistered server left the pool, drained, {:?} after", deregistered.elapsed());

    // The second dies without a word: out within the lease's TTL and a second.
    let killed = Instant::now();
    second.kill().unwrap();
    second.wait().unwrap();
    wait_until(TTL + Duration::from_secs(1), "the killed server is out of the pool, no member left", || {
        let state = pool.state();
        let listed = state.endpoints.iter().any(|e| e.endpoint.to_string() == second_uri);
        !listed && state.open_connections == state.members()
    })
    .await;
    let gone_after = killed.elapsed();
    wait_until(WAIT, "calls go on", || third.calls() > 100 && fourth.calls() > 100).await;

    let (calls, failures) = load.finish().await;
    assert!(calls > 200, "{calls} calls");
    // Only calls in flight on the killed server may fail: at most one per caller, and none
    // before the kill.
    assert!(failures.iter().all(|(at, _)| *at >= killed), "failures before the kill: {failures:?}");
    assert!(failures.len() <= 16, "{} failures: {failures:?}", failures.len());
    assert!(
        failures.iter().all(|(_, status)| status.message().contains(&second_uri)),
        "failures not on the killed server: {failures:?}"
    );
    assert_eq!(endpoints(&pool), set([third.uri().as_str(), fourth.uri().as_str()]));
    assert_eq!(status.bad_values(), 0);
    println!("{calls} calls, {} failed (in flight on the killed server); it left the pool {gone_after:?} after the kill", failures.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_for_5s_under_load_fails_no_call_and_a_registration_made_meanwhile_arrives() {
    let mut etcd_server = EtcdServer::start();
    // The pool's watch goes through a relay, so that the test decides when it may reconnect;
    // the registrations go to etcd directly.
    let relay = Relay::start(etcd_server.uri().trim_start_matches("http://").parse().unwrap()).await;
    let direct = EtcdClient::new([etcd_server.uri()]).unwrap();
    let watching = EtcdClient::new([relay.uri()]).unwrap();
    let (a, b, c) = (TestServer::start().await, TestServer::start().await, TestServer::start().await);
    let ttl = Duration::from_secs(30);
    let _a_reg = register(&direct, "svc/b/a", &a.addr().to_string(), ttl).await.unwrap();
    let _b_reg = register(&direct, "svc/b/b", &b.addr().to_string(), ttl).await.unwrap();
    let (pool, status) = following(&watching, "svc/b/");
    let two = set([a.uri().as_str(), b.uri().as_str()]);
    wait_until(WAIT, "both servers are in the pool", || endpoints(&pool) == two).await;
    wait_until(WAIT, "the watch is established", || status.watching()).await;
    let revision_before = status.revision();
    let load = Load::start(&pool);

    etcd_server.stop();
    wait_until(WAIT, "the watch notices", || !status.watching()).await;
    let stopped = Instant::now();
    while stopped.elapsed() < Duration::from_secs(5) {
        assert_eq!(endpoints(&pool), two, "the endpoints changed while etcd was down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back, but not for the watch yet: a registration made now is one it has not seen.
    relay.freeze_new_connections(true);
    relay.reset();
    etcd_server.restart();
    // The direct client reconnects too: its first tries may fail while it does.
    let deadline = Instant::now() + WAIT;
    let _c_reg = loop {
        match register(&direct, "svc/b/c", &c.addr().to_string(), ttl).await {
            Ok(registration) => break registration,
            Err(error) => assert!(Instant::now() < deadline, "could not register after the restart: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.watching(), "the watch came back before the registration");
    assert_eq!(endpoints(&pool), two);
    relay.freeze_new_connections(false);
    relay.reset();
    wait_until(
        Duration::from_secs(30),
        "the registration made while the watch was away reaches the pool",
        || endpoints(&pool).contains(&c.uri()),
    )
    .await;

    let (calls, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(status.reconnects() >= 1, "{status:?}");
    assert_eq!(status.relists(), 0, "resumed from its revision, no re-list: {status:?}");
    assert!(status.revision() > revision_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_past_the_watch_revision_relists_and_the_next_change_arrives() {
    let etcd_server = EtcdServer::start();
    let relay = Relay::start(etcd_server.uri().trim_start_matches("http://").parse().unwrap()).await;
    let direct = EtcdClient::new([etcd_server.uri()]).unwrap();
    let watching = EtcdClient::new([relay.uri()]).unwrap();
    direct.put("svc/c/1", "127.0.0.1:1001").await.unwrap();
    let (pool, status) = following(&watching, "svc/c/");
    wait_until(WAIT, "the first endpoint is in the pool", || {
        endpoints(&pool) == set(["http://127.0.0.1:1001"])
    })
    .await;
    wait_until(WAIT, "the watch is established", || status.watching()).await;

    // The watch is cut off; meanwhile keys change and the history is compacted.
    relay.freeze_new_connections(true);
    relay.reset();
    wait_until(WAIT, "the watch notices", || !status.watching()).await;
    direct.put("svc/c/2", "127.0.0.1:1002").await.unwrap();
    direct.delete("svc/c/1").await.unwrap();
    let revision = direct.put("svc/c/3", "127.0.0.1:1003").await.unwrap();
    direct.compact(revision).await.unwrap();
    relay.freeze_new_connections(false);
    relay.reset();

    let wanted = set(["http://127.0.0.1:1002", "http://127.0.0.1:1003"]);
    wait_until(Duration::from_secs(30), "the re-list brings the pool up to date", || {
        endpoints(&pool) == wanted
    })
    .await;
    assert_eq!(status.relists(), 1, "{status:?}");
    // The watch goes on after the re-list.
    direct.put("svc/c/4", "127.0.0.1:1004").await.unwrap();
    wait_until(WAIT, "the next change reaches the pool", || {
        endpoints(&pool).contains("http://127.0.0.1:1004")
    })
    .await;
    assert_eq!(status.inserts(), 4, "{status:?}");
    assert_eq!(status.removes(), 1, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_registrations_and_removals_over_10s_end_with_etcds_set_each_applied_once() {
    let etcd_server = EtcdServer::start();
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap();
    // The watch goes through a relay that cuts it twice on the way: it resumes each time.
    let relay = Relay::start(etcd_server.uri().trim_start_matches("http://").parse().unwrap()).await;
    let watching = EtcdClient::new([relay.uri()]).unwrap();
    // No connections: the endpoints are ports nobody listens on, and only the set matters.
    let pool = Pool::builder().min_connections(0).build_lazy(Vec::<String>::new()).unwrap();
    let discover = EtcdDiscover::new(&watching, "svc/d/").unwrap();
    let status = discover.status();
    pool.discover(discover);
    wait_until(WAIT, "the watch is established", || status.watching()).await;

    // 1,000 keys put and every other one deleted again, one step per 10 ms: 1,500 changes.
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..1000u32 {
        tick.tick().await;
        etcd.put(&format!("svc/d/{i:04}"), &format!("127.0.0.1:{}", 20000 + i)).await.unwrap();
        if i % 2 == 1 {
            etcd.delete(&format!("svc/d/{:04}", i - 1)).await.unwrap();
        }
        if i == 333 || i == 666 {
            relay.reset();
        }
    }
    let took = started.elapsed();
    let in_etcd = registered(&etcd, "svc/d/").await;
    assert_eq!(in_etcd.len(), 500);
    wait_until(WAIT, "the pool has etcd's set", || endpoints(&pool) == in_etcd).await;
    assert_eq!(status.inserts(), 1000, "{status:?}");
    assert_eq!(status.removes(), 500, "{status:?}");
    assert_eq!(status.endpoints().len(), 500);
    assert!(status.reconnects() >= 2, "{status:?}");
    assert_eq!(status.relists(), 0, "{status:?}");
    println!("1,500 changes written in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_name_no_endpoint_are_skipped_and_counted() {
    let etcd_server = EtcdServer::start();
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap();
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    etcd.put("svc/e/a", &format!(r#"{{"Addr":"{}","Metadata":{{"zone":"a"}}}}"#, a.addr())).await.unwrap();
    etcd.put("svc/e/not-json", "{ not json").await.unwrap();
    let (pool, status) = following(&etcd, "svc/e/");
    wait_until(WAIT, "the good value is in the pool", || endpoints(&pool).contains(&a.uri())).await;
    etcd.put("svc/e/no-addr", r#"{"Metadata":{"zone":"b"}}"#).await.unwrap();
    etcd.put("svc/e/scheme", "ftp://127.0.0.1:21").await.unwrap();
    etcd.put("svc/e/b", &b.uri()).await.unwrap();
    wait_until(WAIT, "the other good value is in the pool", || endpoints(&pool).contains(&b.uri())).await;
    assert_eq!(status.bad_values(), 3, "{status:?}");
    assert_eq!(endpoints(&pool), set([a.uri().as_str(), b.uri().as_str()]));
    // A good key whose value turns bad leaves; the others stay and take calls.
    etcd.put("svc/e/a", "not a uri at all").await.unwrap();
    wait_until(WAIT, "the key turned bad leaves", || endpoints(&pool) == set([b.uri().as_str()])).await;
    assert_eq!(status.bad_values(), 4);
    let mut client = EchoClient::new(pool.clone());
    client
        .unary_echo(EchoRequest { message: Bytes::from_static(b"x"), repeat: 0, delay_ms: 0 })
        .await
        .unwrap();
}

#[cfg(feature = "serde")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_section_of_the_config_follows_the_prefix_and_bad_values_fail_the_build_naming_the_field() {
    let etcd_server = EtcdServer::start();
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap();
    let server = TestServer::start().await;
    let _reg = register(&etcd, "svc/f/1", &server.addr().to_string(), TTL).await.unwrap();
    let text = format!(
        "name = \"from-etcd\"\n[etcd]\nendpoints = [\"{}\"]\nprefix = \"svc/f/\"\n",
        etcd_server.uri()
    );
    let config: grpc_pool::PoolConfig = toml::from_str(&text).unwrap();
    let pool = config.build().await.unwrap();
    wait_until(WAIT, "the registered server is in the pool", || {
        endpoints(&pool) == set([server.uri().as_str()])
    })
    .await;
    let mut client = EchoClient::new(pool.clone());
    client
        .unary_echo(EchoRequest { message: Bytes::from_static(b"x"), repeat: 0, delay_ms: 0 })
        .await
        .unwrap();

    for (section, field, allowed) in [
        ("endpoints = []\nprefix = \"p/\"", "`etcd.endpoints`", "1 or more"),
        ("endpoints = [\"unix:///tmp/etcd.sock\"]\nprefix = \"p/\"", "`etcd.endpoints`", "http://host:port"),
        ("endpoints = [\"no uri\"]\nprefix = \"p/\"", "`etcd.endpoints`", "http://host:port"),
        ("endpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"\"", "`etcd.prefix`", "1 or more bytes"),
        (
            "endpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"p/\"\ncall_timeout = \"0s\"",
            "`etcd.call_timeout`",
            "1ms to 3600s",
        ),
    ] {
        let config: grpc_pool::PoolConfig = toml::from_str(&format!("[etcd]\n{section}\n")).unwrap();
        let err = config.build_lazy().unwrap_err().to_string();
        assert!(err.contains(field) && err.contains(allowed), "{section}: {err}");
    }
    let err =
        toml::from_str::<grpc_pool::PoolConfig>("[etcd]\nendpoints = []\nprefixx = \"p/\"\n").unwrap_err();
    assert!(err.to_string().contains("prefixx"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_a_user_registers_and_follows_and_signs_in_again_when_its_token_expires() {
    // Tokens expire after 1 s unused (etcd's default is 300 s).
    let etcd_server = EtcdServer::start_with(&["--auth-token-ttl=1"]);
    etcd_server.enable_auth("root-password", &[("echo", "echo-password", "svc/auth/")]);

    // No user, a wrong password, a key outside the user's prefix: each a clear error.
    let anonymous = EtcdClient::new([etcd_server.uri()]).unwrap();
    let err = anonymous.put("svc/auth/x", "127.0.0.1:1").await.unwrap_err().to_string();
    assert!(err.starts_with("etcd put failed") && err.contains("user name is empty"), "{err}");
    let wrong = EtcdClient::new([etcd_server.uri()]).unwrap().with_user("echo", "nope").unwrap();
    let err = wrong.put("svc/auth/x", "127.0.0.1:1").await.unwrap_err().to_string();
    assert!(
        err.starts_with("etcd authenticate failed") && err.contains("invalid user ID or password"),
        "{err}"
    );
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap().with_user("echo", "echo-password").unwrap();
    assert_eq!(etcd.user(), Some("echo"));
    assert!(EtcdClient::new([etcd_server.uri()]).unwrap().with_user("echo", "").is_err());
    assert!(!format!("{etcd:?}").contains("echo-password"));
    let err = etcd.put("svc/other/x", "127.0.0.1:1").await.unwrap_err().to_string();
    assert!(err.contains("permission denied"), "{err}");
    let err = EtcdClient::new([etcd_server.uri()]).unwrap().with_user("", "x").unwrap_err().to_string();
    assert!(err.contains("`etcd.user`"), "{err}");

    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let _a_reg = register(&etcd, "svc/auth/a", &a.addr().to_string(), TTL).await.unwrap();
    // The pool's watch has a client of its own, through a relay the test can cut, so that
    // nothing else signs in for it.
    let relay = Relay::start(etcd_server.uri().trim_start_matches("http://").parse().unwrap()).await;
    let watching = EtcdClient::new([relay.uri()]).unwrap().with_user("echo", "echo-password").unwrap();
    let (pool, status) = following(&watching, "svc/auth/");
    wait_until(WAIT, "the registered server is in the pool", || endpoints(&pool) == set([a.uri().as_str()]))
        .await;
    wait_until(WAIT, "the watch is established", || status.watching()).await;
    let mut client = EchoClient::new(pool.clone());
    client
        .unary_echo(EchoRequest { message: Bytes::from_static(b"x"), repeat: 0, delay_ms: 0 })
        .await
        .unwrap();

    // Unused for 3 s, both clients' tokens have expired (etcd drops them within 1 s of
    // their TTL). A call with one is refused; the client signs in again and repeats it.
    assert!(!etcd_server.log().contains("invalid auth token"), "no token refused yet");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The watch, cut, is created again: refused with the old token, then with a new one.
    let reconnects = status.reconnects();
    relay.reset();
    wait_until(WAIT, "the watch notices the cut", || status.reconnects() > reconnects).await;
    wait_until(WAIT, "the watch is established again, with a new token", || status.watching()).await;
    let _b_reg =
        register(&etcd, "svc/auth/b", &b.addr().to_string(), TTL).await.expect("registers with a new token");
    wait_until(WAIT, "the new registration reaches the pool", || {
        endpoints(&pool) == set([a.uri().as_str(), b.uri().as_str()])
    })
    .await;
    // The tokens did expire (else this test would not have tested signing in again). A slow
    // machine could keep etcd from expiring them in time; that would fail here, not pass.
    assert!(etcd_server.log().contains("invalid auth token"), "etcd refused no token");
    assert_eq!(
        registered(&etcd, "svc/auth/").await,
        set([a.uri().as_str(), b.uri().as_str()]),
        "the first registration's lease is still kept alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_user_works_with_an_etcd_whose_authentication_is_off_and_signs_in_once_it_is_on() {
    let etcd_server = EtcdServer::start();
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap().with_user("echo", "echo-password").unwrap();
    // Credentials deployed before `etcdctl auth enable`: calls go without a token.
    etcd.put("svc/off/a", "127.0.0.1:1").await.expect("a put while authentication is off");
    etcd_server.enable_auth("root-password", &[("echo", "echo-password", "svc/off/")]);
    // Now etcd wants a token (`user name is empty` for a call without one): signs in.
    etcd.put("svc/off/b", "127.0.0.1:2").await.expect("a put once authentication is on");
    assert_eq!(etcd.get_prefix("svc/off/").await.unwrap().len(), 2);
}

#[cfg(feature = "serde")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_section_signs_in_with_a_password_file_and_bad_credentials_fail_the_build_naming_the_field() {
    let etcd_server = EtcdServer::start();
    etcd_server.enable_auth("root-password", &[("echo", "echo-password", "svc/g/")]);
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap().with_user("echo", "echo-password").unwrap();
    let server = TestServer::start().await;
    let _reg = register(&etcd, "svc/g/1", &server.addr().to_string(), TTL).await.unwrap();
    let dir = std::env::temp_dir().join(format!("grpc-pool-etcd-password-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let password_file = dir.join("password");
    // As secret files usually are: one line.
    std::fs::write(&password_file, "echo-password\n").unwrap();
    let text = format!(
        "[etcd]\nendpoints = [\"{}\"]\nprefix = \"svc/g/\"\nuser = \"echo\"\npassword_file = \"{}\"\n",
        etcd_server.uri(),
        password_file.display()
    );
    let config: grpc_pool::PoolConfig = toml::from_str(&text).unwrap();
    let pool = config.build_lazy().unwrap();
    wait_until(WAIT, "the registered server is in the pool", || {
        endpoints(&pool) == set([server.uri().as_str()])
    })
    .await;

    let missing = dir.join("missing");
    let base = "endpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"p/\"";
    // A password in the file itself: never shown, in errors or in the config's Debug.
    let secret = "pw-not-shown";
    let inline: grpc_pool::PoolConfig =
        toml::from_str(&format!("[etcd]\n{base}\nuser = \"echo\"\npassword = \"{secret}\"\n")).unwrap();
    assert!(!format!("{inline:?}").contains(secret));
    let empty_file = dir.join("empty");
    std::fs::write(&empty_file, "\n").unwrap();
    for (credentials, field, allowed) in [
        ("user = \"echo\"".to_owned(), "`etcd.password`", "a password for `etcd.user`"),
        (format!("password = \"{secret}\""), "`etcd.user`", "a password needs a user"),
        (format!("user = \"\"\npassword = \"{secret}\""), "`etcd.user`", "1 or more characters"),
        ("user = \"echo\"\npassword = \"\"".to_owned(), "`etcd.password`", "1 or more characters"),
        (
            format!("user = \"echo\"\npassword_file = \"{}\"", empty_file.display()),
            "`etcd.password_file`",
            "1 or more characters",
        ),
        (
            format!(
                "user = \"echo\"\npassword = \"{secret}\"\npassword_file = \"{}\"",
                password_file.display()
            ),
            "`etcd.password_file`",
            "not both",
        ),
        (
            format!("user = \"echo\"\npassword_file = \"{}\"", missing.display()),
            "`etcd.password_file`",
            "a readable UTF-8 file",
        ),
    ] {
        let config: grpc_pool::PoolConfig =
            toml::from_str(&format!("[etcd]\n{base}\n{credentials}\n")).unwrap();
        let err = config.build_lazy().unwrap_err().to_string();
        assert!(err.contains(field) && err.contains(allowed), "{credentials}: {err}");
        assert!(!err.contains(secret), "the password is not shown: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process's metrics as a Prometheus page. The recorder is installed on first use, once
/// for this test binary (a process has one); the etcd series are told apart by `prefix`.
fn metrics_page() -> String {
    static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();
    RECORDER.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("a metrics recorder")).render()
}

/// The `grpc_pool_etcd_watching` gauge of `prefix`, if it was ever set.
fn watching_gauge(prefix: &str) -> Option<f64> {
    let label = format!("prefix=\"{prefix}\"");
    metrics_page()
        .lines()
        .filter(|line| line.starts_with("grpc_pool_etcd_watching{") && line.contains(&label))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watching_gauge_returns_to_0_when_the_discovery_stream_ends() {
    metrics_page();
    let etcd_server = EtcdServer::start();
    let etcd = EtcdClient::new([etcd_server.uri()]).unwrap();
    // One stream ends with its pool's close, the other when its following task is aborted.
    let closed = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    let aborted = Pool::builder().build_lazy(Vec::<String>::new()).unwrap();
    let (closed_discover, aborted_discover) =
        (EtcdDiscover::new(&etcd, "svc/g1/").unwrap(), EtcdDiscover::new(&etcd, "svc/g2/").unwrap());
    let (closed_status, aborted_status) = (closed_discover.status(), aborted_discover.status());
    closed.discover(closed_discover);
    let following = aborted.discover(aborted_discover);
    wait_until(WAIT, "both watches are established", || {
        closed_status.watching()
            && aborted_status.watching()
            && watching_gauge("svc/g1/") == Some(1.0)
            && watching_gauge("svc/g2/") == Some(1.0)
    })
    .await;

    closed.close().await;
    following.abort();
    wait_until(WAIT, "both watches show as stopped", || {
        !closed_status.watching()
            && !aborted_status.watching()
            && watching_gauge("svc/g1/") == Some(0.0)
            && watching_gauge("svc/g2/") == Some(0.0)
    })
    .await;
}

/// A counter of the process's metrics, summed over the series whose labels hold `label`.
fn counter(name: &str, label: &str) -> f64 {
    metrics_page()
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `call`, which must fail; its error and how long it took.
async fn failing<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = Result<T, grpc_pool::etcd::EtcdError>>,
) -> (String, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(TIMED_OUT_WITHIN, call)
        .await
        .unwrap_or_else(|_| panic!("the call neither answered nor failed within {TIMED_OUT_WITHIN:?}"));
    (result.expect_err("the call must fail").to_string(), started.elapsed())
}

/// The longest a call with a 300 ms timeout may take here: generous, for a loaded machine.
const TIMED_OUT_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_takes_connections_and_never_answers_fails_calls_within_the_call_timeout() {
    metrics_page();
    // Takes connections and calls and answers PINGs (so the pool's keepalive sees a live
    // connection), but answers no call within the test.
    let deaf = FrameServer::start(Behaviour::AnswerAfter(Duration::from_secs(3600))).await;
    let timeout = Duration::from_millis(300);
    let etcd = EtcdClient::new([deaf.uri()]).unwrap().with_call_timeout(timeout).unwrap();
    assert_eq!(etcd.call_timeout(), timeout);

    let (err, took) = failing(register(&etcd, "svc/h/1", "127.0.0.1:1", TTL)).await;
    assert!(err.contains("etcd lease grant failed: DeadlineExceeded: no answer within 300ms"), "{err}");
    assert!(took >= timeout && took < TIMED_OUT_WITHIN, "register failed after {took:?}");
    let (err, took) = failing(etcd.get_prefix("svc/h/")).await;
    assert!(err.contains("etcd range failed: DeadlineExceeded: no answer within 300ms"), "{err}");
    assert!(took >= timeout && took < TIMED_OUT_WITHIN, "the list failed after {took:?}");
    let (err, took) = failing(etcd.put("svc/h/2", "127.0.0.1:2")).await;
    assert!(err.contains("etcd put failed: DeadlineExceeded"), "{err}");
    assert!(took < TIMED_OUT_WITHIN, "the put failed after {took:?}");
    // Each call reached the server, and was reset there when it timed out (so etcd stops
    // working on it).
    wait_until(WAIT, "the server saw the three calls reset", || deaf.resets() >= 3).await;

    // The discovery's list times out and is tried again after its backoff, for as long as
    // etcd does not answer; the pool keeps its (empty) set.
    let (pool, status) = following(&etcd, "svc/h/");
    wait_until(WAIT, "the discovery's list has timed out twice", || status.reconnects() >= 2).await;
    assert!(!status.watching() && endpoints(&pool).is_empty(), "{status:?}");
    assert!(counter("grpc_pool_etcd_call_timeouts_total", "op=\"lease grant\"") >= 1.0, "{}", metrics_page());
    assert!(counter("grpc_pool_etcd_call_timeouts_total", "op=\"range\"") >= 3.0, "{}", metrics_page());

    // Out of range, the setting fails naming itself and its range.
    for bad in [Duration::ZERO, Duration::from_secs(3601)] {
        let err = etcd.clone().with_call_timeout(bad).unwrap_err().to_string();
        assert!(err.contains("`etcd.call_timeout`") && err.contains("1ms to 3600s"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_through_a_connection_gone_silent_fails_within_the_call_timeout() {
    let etcd_server = EtcdServer::start();
    let relay = Relay::start(etcd_server.uri().trim_start_matches("http://").parse().unwrap()).await;
    let timeout = Duration::from_millis(300);
    let etcd = EtcdClient::new([relay.uri()]).unwrap().with_call_timeout(timeout).unwrap();
    let registration = register(&etcd, "svc/i/1", "127.0.0.1:1", Duration::from_secs(60)).await.unwrap();
    // Every connection through the relay, and every new one, turns into a black hole.
    relay.freeze_new_connections(true);
    relay.freeze();
    let (err, took) = failing(registration.deregister()).await;
    assert!(err.contains("etcd delete failed: DeadlineExceeded: no answer within 300ms"), "{err}");
    assert!(took >= timeout && took < TIMED_OUT_WITHIN, "deregister failed after {took:?}");
    let (err, took) = failing(etcd.get_prefix("svc/i/")).await;
    assert!(err.contains("etcd range failed: DeadlineExceeded"), "{err}");
    assert!(took < TIMED_OUT_WITHIN, "the list failed after {took:?}");
    // etcd itself still has the key: nothing reached it.
    let direct = EtcdClient::new([etcd_server.uri()]).unwrap();
    assert_eq!(direct.get_prefix("svc/i/").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_connection_goes_silent_is_given_up_and_one_only_quiet_is_kept() {
    let etcd_server = EtcdServer::start();
    let relay = Relay::start(etcd_server.uri().trim_start_matches("http://").parse().unwrap()).await;
    // A watch quiet for 6 call timeouts, but at least 5 s, asks etcd for its progress and
    // gives it 1 s at least to answer.
    let timeout = Duration::from_millis(300);
    let quiet = Duration::from_secs(5);
    let etcd = EtcdClient::new([relay.uri()]).unwrap().with_call_timeout(timeout).unwrap();
    let (_pool, status) = following(&etcd, "svc/j/");
    wait_until(WAIT, "the watch is established", || status.watching()).await;

    // Quiet is not silent: etcd answers each progress request, and the watch stays. (A
    // negative, so it is watched for a set time: two quiet periods.)
    tokio::time::sleep(quiet * 2 + Duration::from_millis(500)).await;
    assert!(status.watching() && status.reconnects() == 0, "a quiet watch was given up: {status:?}");

    // Silent: the connection drops everything from now, PINGs included, as a NAT that
    // forgot the flow does. The watch is given up well before the pool's keepalive (20 s
    // of quiet, then 10 s for the PONG) would notice.
    relay.freeze();
    let frozen = Instant::now();
    wait_until(
        quiet + Duration::from_secs(1) + Duration::from_secs(10),
        "the silent watch is given up",
        || status.reconnects() >= 1,
    )
    .await;
    assert!(!status.watching(), "{status:?}");
    println!("the silent watch was given up {:?} after the connection went silent", frozen.elapsed());
}
