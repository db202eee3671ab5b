//! The guide's code. Every Rust snippet in README.md and docs/ is a region of this file,
//! marked `// snippet: NAME` and `// end snippet` and named in the Markdown by a
//! `<!-- snippet: NAME -->` line above its block; `tests/doc_snippets.rs` checks that each
//! block is its region, line for line. So the snippets compile with the examples (`cargo test`
//! builds them) and cannot drift from the API.
//!
//! Nothing here runs against a server: `cargo run --example guide --all-features` only says
//! where the snippets are.

use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// README.md, "Quickstart".
#[rustfmt::skip]
async fn quickstart(request: EchoRequest) -> Result {
    // snippet: quickstart
    use grpc_pool::{HealthCheck, Pool};
    use std::time::Duration;

    let pool = Pool::builder()
        .name("echo")                                 // in logs, errors and metric labels
        .max_connections(4)                           // per endpoint (default 8)
        .timeout(Some(Duration::from_secs(2)))        // every call's deadline, or its own if shorter
        .health_checks(Some(HealthCheck::service("echo.Echo")))   // grpc.health.v1 Watch
        .build(["http://10.0.0.7:50051", "http://10.0.0.8:50051"])   // or build_lazy: connect in the background
        .await?;

    let mut client = EchoClient::new(pool.clone());   // any tonic-generated client
    let reply = client.unary_echo(request).await?;

    println!("{:#?}", pool.state());                 // endpoints, members, statistics
    pool.close().await;                               // drain and close; dropping the last handle also closes
    // end snippet
    drop(reply);
    Ok(())
}

/// docs/configuration.md, at the top.
#[rustfmt::skip]
async fn more_settings() -> Result {
    // snippet: more-settings
    use grpc_pool::{HealthCheck, Keepalive, Pool};
    use std::time::Duration;

    let pool = Pool::builder()
        .name("echo")                       // in logs, errors and metric labels
        .min_connections(1)                 // per endpoint, kept open
        .max_connections(4)                 // per endpoint
        .max_concurrent_streams(100)        // the server's SETTINGS_MAX_CONCURRENT_STREAMS applies too
        .timeout(Some(Duration::from_secs(2)))          // every call's deadline, or its own if shorter
        .checkout_timeout(Duration::from_secs(5))       // the longest a call waits for a free stream
        .keepalive(Some(Keepalive::new(Duration::from_secs(20), Duration::from_secs(10))))   // the default
        .health_checks(Some(HealthCheck::service("echo.Echo")))
        .max_lifetime(Some(Duration::from_secs(30 * 60)))
        .max_attempts(3)                    // for calls the server provably never processed
        .replay_buffer_limit(256 * 1024)    // body bytes kept per call so it can be resent
        .build(["http://10.0.0.7:50051", "http://10.0.0.8:50051"])   // or "unix:///run/app.sock"
        .await?;                            // or .build_lazy(...) to connect in the background

    let mut events = pool.events();         // connections opened/closed (with why), GOAWAYs,
    while let Some(event) = events.recv().await {   // endpoints healthy/ejected...
        println!("{event:?}");
    }
    // end snippet
    Ok(())
}

/// docs/configuration.md, the config file (feature `serde`).
#[rustfmt::skip]
async fn config_file() -> Result {
    // snippet: config-file
    let config: grpc_pool::PoolConfig = toml::from_str(&std::fs::read_to_string("pool.toml")?)?;
    let pool = config.build().await?;
    // end snippet
    pool.close().await;
    Ok(())
}

/// docs/discovery.md, etcd (feature `etcd`).
#[rustfmt::skip]
async fn etcd() -> Result {
    // snippet: etcd
    use grpc_pool::etcd::{register, EtcdClient, EtcdDiscover};
    use std::time::Duration;

    let etcd = EtcdClient::new(["http://10.0.0.1:2379"])?;
    // Client side: the pool follows every key under the prefix.
    let pool = grpc_pool::Pool::builder().name("echo").build_lazy(Vec::<String>::new())?;
    pool.discover(EtcdDiscover::new(&etcd, "services/echo/")?);
    // Server side: a key with a lease kept alive in the background.
    let registration = register(&etcd, "services/echo/10.0.0.7:50051", "10.0.0.7:50051", Duration::from_secs(10)).await?;
    // ... serve ...
    registration.deregister().await?; // or drop it: the key is deleted at once
    // end snippet
    Ok(())
}

/// docs/discovery.md, subsetting.
#[rustfmt::skip]
async fn subset() -> Result {
    // snippet: subset
    use std::time::Duration;
    let mut subset = grpc_pool::Subset::new(20);
    subset.client = Some(7); // this replica's ordinal: clients 0, 1, 2, ... spread evenly
    subset.replace_after = Duration::from_secs(30);
    let pool = grpc_pool::Pool::builder().subset(Some(subset)).build_lazy(Vec::<String>::new())?;
    pool.discover(grpc_pool::dns::DnsDiscover::new(
        "http://orders.internal:50051",
        Duration::from_secs(30),
        grpc_pool::dns::SystemResolver,
    )?);
    // end snippet
    Ok(())
}

/// docs/xds.md.
#[rustfmt::skip]
async fn xds() -> Result {
    // snippet: xds
    // GRPC_XDS_BOOTSTRAP=/etc/grpc/bootstrap.json (or the JSON itself in
    // GRPC_XDS_BOOTSTRAP_CONFIG), as for the other gRPC languages.
    let pool = grpc_pool::Pool::builder().name("echo").build_xds("xds:///echo.prod:50051")?;
    let mut client = EchoClient::new(pool.clone());
    // end snippet
    let _ = &mut client;
    Ok(())
}

fn main() {
    // Named, not run: they need servers at the addresses they show.
    let _snippets = (quickstart, more_settings, config_file, etcd, subset, xds);
    println!(
        "the guide's snippets are in examples/guide.rs; tests/doc_snippets.rs holds the Markdown to them"
    );
}
