//! What a call allocates: a unary call through the pool counted allocation by allocation,
//! so that a change that makes calls allocate more fails here rather than slowly in a
//! benchmark. Only the calling thread's allocations count: the server runs on threads of its
//! own, and the client on a current-thread runtime in the test's thread, so the connection's
//! task and the call's are both in the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use bytes::Bytes;
use grpc_pool::Pool;
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::TestServer;

/// Counts the allocations (and reallocations: each is a trip to the allocator) of the thread
/// that makes them.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: a thread's allocations after its locals are gone are not ours to count.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// The most a sequential 64-byte unary call may allocate on the calling thread, on average,
/// through the pool with its defaults: 23.0 when this test was written (2026-12-06; tonic's
/// `Channel` 35.0 in the same test), and the same in debug and release builds. Lower it when a
/// change makes calls allocate less; a change that needs more must say why on the benchmarks
/// page.
const MOST_PER_CALL: f64 = 23.5;

/// Calls measured, after as many unmeasured ones to warm every buffer and cache.
const CALLS: u64 = 2_000;

/// The server, on a runtime of its own in another thread, so its allocations are not counted.
fn server() -> (String, std::sync::mpsc::Sender<()>) {
    let (uri_tx, uri_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async move {
            let server = TestServer::start().await;
            uri_tx.send(server.uri()).unwrap();
            tokio::task::spawn_blocking(move || stop_rx.recv()).await.unwrap().ok();
            drop(server);
        });
    });
    (uri_rx.recv_timeout(Duration::from_secs(30)).expect("the server's address"), stop_tx)
}

/// Allocations per call of `CALLS` sequential calls made by `call`, after as many to warm up.
async fn per_call<F, Fut>(mut call: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..CALLS {
        call().await;
    }
    let before = allocations();
    for _ in 0..CALLS {
        call().await;
    }
    (allocations() - before) as f64 / CALLS as f64
}

fn request() -> EchoRequest {
    EchoRequest { message: Bytes::from_static(&[7u8; 64]), repeat: 0, delay_ms: 0 }
}

#[test]
fn a_unary_call_allocates_no_more_than_it_did() {
    let (uri, stop) = server();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (pool, channel) = rt.block_on(async {
        let pool = Pool::builder().build([uri.clone()]).await.unwrap();
        let mut client = EchoClient::new(pool.clone());
        let pool_per_call = per_call(|| {
            let mut client = client.clone();
            async move {
                client.unary_echo(request()).await.expect("a call through the pool");
            }
        })
        .await;
        client.unary_echo(request()).await.unwrap();
        // tonic's Channel, for scale (not asserted: it is not ours).
        let channel = tonic::transport::Endpoint::from_shared(uri).unwrap().connect().await.unwrap();
        let channel_client = EchoClient::new(channel);
        let channel_per_call = per_call(|| {
            let mut client = channel_client.clone();
            async move {
                client.unary_echo(request()).await.expect("a call through the channel");
            }
        })
        .await;
        (pool_per_call, channel_per_call)
    });
    let _ = stop.send(());
    eprintln!("allocations per call on the calling thread: pool {pool:.2}, tonic Channel {channel:.2}");
    assert!(pool > 1.0, "{pool} allocations per call: the counting allocator is not counting");
    assert!(
        pool <= MOST_PER_CALL,
        "a unary call through the pool allocates {pool:.2} times, more than the {MOST_PER_CALL} it did: find what \
         allocates more (or, if it must, raise MOST_PER_CALL and say why on the benchmarks page)"
    );
}
