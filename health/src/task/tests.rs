//! The task's own state under endpoint churn: every map it keeps must be sized by the
//! endpoints and members that are live, not by every one it has ever seen.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::*;
use crate::config::{CheckMode, HealthCheck};

/// How many entries each of the task's maps and queues holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sizes {
    members: usize,
    members_due: usize,
    by_endpoint: usize,
    endpoints: usize,
    endpoint_ids: usize,
    checks_due: usize,
    ping_limited: usize,
    keepalive_time: usize,
    lifetime_drain: usize,
    ping_metrics: usize,
}

impl Task {
    fn sizes(&self) -> Sizes {
        Sizes {
            members: self.members.len(),
            members_due: self.members_due.len(),
            by_endpoint: self.by_endpoint.len(),
            endpoints: self.endpoints.len(),
            endpoint_ids: self.endpoint_ids.len(),
            checks_due: self.checks_due.len(),
            ping_limited: self.ping_limited.len(),
            keepalive_time: self.keepalive_time.len(),
            lifetime_drain: self.lifetime_drain.len(),
            ping_metrics: self.ping_metrics.len(),
        }
    }

    /// Every endpoint any of the endpoint-keyed maps holds.
    fn endpoints_known(&self) -> BTreeSet<String> {
        let mut known = BTreeSet::new();
        known.extend(self.by_endpoint.keys().map(ToString::to_string));
        known.extend(self.endpoints.values().map(|h| h.endpoint.to_string()));
        known.extend(self.endpoint_ids.keys().map(ToString::to_string));
        known.extend(self.ping_limited.iter().map(ToString::to_string));
        known.extend(self.keepalive_time.keys().map(ToString::to_string));
        known.extend(self.lifetime_drain.keys().map(ToString::to_string));
        known.extend(self.ping_metrics.keys().map(ToString::to_string));
        known
    }

    fn tracks_a_member_of(&self, endpoint: &str) -> bool {
        self.members.values().any(|t| t.member.endpoint().to_string() == endpoint)
    }
}

/// An HTTP/2 server on 127.0.0.1 that takes connections and resets every stream (the health
/// checks fail, which is all they need to do here).
async fn h2_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else { return };
                while let Some(Ok(_stream)) = connection.accept().await {}
            });
        }
    });
    (addr, task)
}

/// Runs the task's loop until `done` holds for it, for at most 10 s.
async fn serve_until(task: &mut Task, events: &mut MonitorEvents, what: &str, done: impl Fn(&Task) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(task) {
        assert!(Instant::now() < deadline, "timed out waiting until {what}: {:?}", task.sizes());
        let _ = tokio::time::timeout(Duration::from_millis(10), task.serve(events)).await;
    }
}

#[tokio::test]
async fn endpoint_churn_leaves_every_map_sized_by_the_live_endpoints() {
    const CHURNED: usize = 24;
    let mut servers = Vec::new();
    for _ in 0..CHURNED + 2 {
        servers.push(h2_server().await);
    }
    let uris: Vec<String> = servers.iter().map(|(addr, _)| format!("http://{addr}")).collect();
    let (staying, churned) = uris.split_at(2);

    let config = grpc_pool_core::Config { name: "health-task-churn".to_owned(), ..Default::default() };
    let pool = grpc_pool_core::Builder::from_config(config).build_lazy(staying).unwrap();
    let health = HealthConfig {
        keepalive: Some(Keepalive::new(Duration::from_millis(100), Duration::from_secs(5))),
        checks: Some(HealthCheck {
            interval: Duration::from_millis(100),
            unhealthy_interval: Duration::from_millis(100),
            mode: CheckMode::Poll,
            ..HealthCheck::default()
        }),
        ..HealthConfig::default()
    };
    let mut task = Task::new(pool.monitor(), health);
    let mut events = task.start();
    for uri in staying {
        serve_until(&mut task, &mut events, "a member of each staying endpoint is tracked", |t| {
            t.tracks_a_member_of(uri)
        })
        .await;
    }

    for uri in churned {
        assert!(pool.add_endpoint(uri).unwrap());
        serve_until(&mut task, &mut events, "the new endpoint's member is tracked", |t| {
            t.tracks_a_member_of(uri)
        })
        .await;
        let endpoint = Endpoint::parse(uri).unwrap();
        // The server says it was PINGed too often while the endpoint is in the pool...
        task.back_off_keepalive(&endpoint);
        assert!(pool.remove_endpoint(uri).unwrap());
        serve_until(&mut task, &mut events, "the removed endpoint's member is no longer tracked", |t| {
            !t.tracks_a_member_of(uri) && !t.endpoint_ids.contains_key(&endpoint)
        })
        .await;
        // ... and once more after it left, on the connection that drains (a GOAWAY read late).
        task.back_off_keepalive(&endpoint);
    }
    // A few more turns of the loop: checks and PINGs of the staying endpoints go on.
    let _ = tokio::time::timeout(Duration::from_millis(300), task.serve(&mut events)).await;

    let live: BTreeSet<String> = staying.iter().cloned().collect();
    let sizes = task.sizes();
    assert_eq!(task.endpoints_known(), live, "endpoints the task keeps state for; {sizes:?}");
    assert!(sizes.members <= 2 * staying.len() && sizes.members_due <= sizes.members, "{sizes:?}");
    for (map, len) in [
        ("by_endpoint", sizes.by_endpoint),
        ("endpoints", sizes.endpoints),
        ("endpoint_ids", sizes.endpoint_ids),
        ("checks_due", sizes.checks_due),
        ("ping_limited", sizes.ping_limited),
        ("keepalive_time", sizes.keepalive_time),
        ("lifetime_drain", sizes.lifetime_drain),
        ("ping_metrics", sizes.ping_metrics),
    ] {
        assert!(
            len <= staying.len(),
            "`{map}` holds {len} entries for {} live endpoints: {sizes:?}",
            staying.len()
        );
    }
    drop(pool);
    for (_, server) in servers {
        server.abort();
    }
}
