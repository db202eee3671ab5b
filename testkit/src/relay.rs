//! A TCP relay on 127.0.0.1 that sits between a pool and a server and injects faults:
//! `reset` drops every relayed connection with a TCP RST on both sides, as a crashed host or
//! a middlebox would; `freeze` turns every relayed connection into a black hole (both sockets
//! stay open, nothing is forwarded, whatever arrives is discarded), as a NAT that silently
//! forgot the flow or a host that vanished would. New connections are relayed normally unless
//! `freeze_new_connections(true)`.

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
    /// Bumped by `freeze`.
    freezes: watch::Sender<u64>,
    freeze_new: Arc<std::sync::atomic::AtomicBool>,
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
        let (freezes, _) = watch::channel(0u64);
        let freeze_new = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let signals =
            Signals { reset: generation.clone(), freeze: freezes.clone(), freeze_new: freeze_new.clone() };
        let task = tokio::spawn(accept_loop(listener, target, signals, open.clone(), accepted.clone()));
        Relay { addr, generation, freezes, freeze_new, open, accepted, task }
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

    /// Black-holes every connection open now: both sockets stay open, nothing is forwarded
    /// any more. New ones are relayed as before.
    pub fn freeze(&self) {
        self.freezes.send_modify(|g| *g += 1);
    }

    /// Whether connections accepted from now on are black holes from the start (a dead host
    /// behind a live address).
    pub fn freeze_new_connections(&self, frozen: bool) {
        self.freeze_new.store(frozen, Ordering::SeqCst);
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

#[derive(Clone)]
struct Signals {
    reset: watch::Sender<u64>,
    freeze: watch::Sender<u64>,
    freeze_new: Arc<std::sync::atomic::AtomicBool>,
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    signals: Signals,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::AcqRel);
        open.fetch_add(1, Ordering::AcqRel);
        let guard = OpenGuard(open.clone());
        let mut reset = signals.reset.subscribe();
        reset.borrow_and_update();
        let mut freeze = signals.freeze.subscribe();
        freeze.borrow_and_update();
        let frozen_from_start = signals.freeze_new.load(Ordering::SeqCst);
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                let _ = inbound.set_zero_linger();
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            if !frozen_from_start {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                    _ = reset.changed() => {
                        rst(&inbound, &outbound);
                        return;
                    }
                    _ = freeze.changed() => {}
                }
            }
            // Frozen: swallow whatever either side sends, answer nothing, until reset or the
            // relay goes away.
            tokio::select! {
                _ = discard(&mut inbound) => {}
                _ = discard(&mut outbound) => {}
                _ = reset.changed() => rst(&inbound, &outbound),
            }
        });
    }
}

/// Zero linger turns the close into a RST on both sides.
fn rst(inbound: &TcpStream, outbound: &TcpStream) {
    let _ = inbound.set_zero_linger();
    let _ = outbound.set_zero_linger();
}

/// Reads and drops everything until the peer closes; then waits forever (a black hole does
/// not close either).
async fn discard(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    std::future::pending::<()>().await
}
