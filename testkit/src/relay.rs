//! A TCP relay on 127.0.0.1 that sits between a pool and a server and injects faults:
//! `reset` drops every relayed connection with a TCP RST on both sides, as a crashed host or
//! a middlebox would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Relays every connection made to [`Relay::addr`] on to a target address.
pub struct Relay {
    addr: SocketAddr,
    /// Bumped by `reset`; each relayed connection watches it.
    generation: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and relays to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let (generation, _) = watch::channel(0u64);
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task =
            tokio::spawn(accept_loop(listener, target, generation.clone(), open.clone(), accepted.clone()));
        Relay { addr, generation, open, accepted, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port` of the relay, for a pool.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Relayed connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }

    /// Resets every connection open now (RST to both sides). New ones are relayed as before.
    pub fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    generation: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::AcqRel);
        open.fetch_add(1, Ordering::AcqRel);
        let guard = OpenGuard(open.clone());
        let mut reset = generation.subscribe();
        reset.borrow_and_update();
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                let _ = inbound.set_zero_linger();
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = reset.changed() => {
                    // Zero linger turns the close into a RST on both sides.
                    let _ = inbound.set_zero_linger();
                    let _ = outbound.set_zero_linger();
                }
            }
        });
    }
}
