//! A TCP relay on 127.0.0.1 that sits between a pool and a server and injects faults:
//! `reset` drops every relayed connection with a TCP RST on both sides, as a crashed host or
//! a middlebox would; `freeze` turns every relayed connection into a black hole (both sockets
//! stay open, nothing is forwarded, whatever arrives is discarded), as a NAT that silently
//! forgot the flow or a host that vanished would. New connections are relayed normally unless
//! `freeze_new_connections(true)`. `set_idle_expiry` makes it forget flows that were quiet
//! for too long, as NAT gateways, conntrack and cloud load balancers do: the first packet of a
//! forgotten flow is answered with RST.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// Idle expiry in milliseconds; 0 for none.
    idle_expiry_ms: Arc<AtomicU64>,
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
        let idle_expiry_ms = Arc::new(AtomicU64::new(0));
        let signals = Signals {
            reset: generation.clone(),
            freeze: freezes.clone(),
            freeze_new: freeze_new.clone(),
            idle_expiry_ms: idle_expiry_ms.clone(),
        };
        let task = tokio::spawn(accept_loop(listener, target, signals, open.clone(), accepted.clone()));
        Relay { addr, generation, freezes, freeze_new, idle_expiry_ms, open, accepted, task }
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

    /// Forgets every relayed connection that stays quiet (no byte either way) for `expiry`
    /// or longer: the next byte from either side is answered with RST on both. `None` turns
    /// it off. Applies to connections open now too.
    pub fn set_idle_expiry(&self, expiry: Option<Duration>) {
        let ms = expiry.map(|e| e.as_millis().max(1) as u64).unwrap_or(0);
        self.idle_expiry_ms.store(ms, Ordering::SeqCst);
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
    idle_expiry_ms: Arc<AtomicU64>,
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
        let idle_expiry_ms = signals.idle_expiry_ms.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                let _ = inbound.set_zero_linger();
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            if !frozen_from_start {
                let frozen = freeze.clone();
                tokio::select! {
                    forgotten = relay(&mut inbound, &mut outbound, &idle_expiry_ms, frozen) => {
                        if forgotten {
                            rst(&inbound, &outbound);
                        }
                        return;
                    }
                    _ = reset.changed() => {
                        rst(&inbound, &outbound);
                        return;
                    }
                    _ = freeze.changed() => {}
                }
            }
            // Frozen: swallow whatever either side sends, answer nothing, until reset, the
            // relay goes away, or the client gives the connection up (then nobody can tell a
            // black hole from a closed one, and the sockets are freed).
            tokio::select! {
                _ = discard(&mut inbound) => {}
                _ = async { discard(&mut outbound).await; std::future::pending::<()>().await } => {}
                _ = reset.changed() => rst(&inbound, &outbound),
            }
        });
    }
}

/// Copies both ways until both sides have closed (false), or until a byte arrives on a flow
/// that was quiet for the idle expiry or longer (true: the caller resets it).
async fn relay(
    inbound: &mut TcpStream,
    outbound: &mut TcpStream,
    idle_expiry_ms: &AtomicU64,
    frozen: watch::Receiver<u64>,
) -> bool {
    let clock =
        Activity { start: std::time::Instant::now(), last_ms: AtomicU64::new(0), idle_expiry_ms, frozen };
    let (mut in_read, mut in_write) = inbound.split();
    let (mut out_read, mut out_write) = outbound.split();
    let up = forward(&mut in_read, &mut out_write, &clock);
    let down = forward(&mut out_read, &mut in_write, &clock);
    tokio::pin!(up, down);
    tokio::select! {
        forgotten = &mut up => forgotten || down.await,
        forgotten = &mut down => forgotten || up.await,
    }
}

/// When a relayed flow last carried a byte, and how long it may stay quiet.
struct Activity<'a> {
    start: std::time::Instant,
    last_ms: AtomicU64,
    idle_expiry_ms: &'a AtomicU64,
    /// Changes when the relay freezes: bytes read after that are never passed on, even
    /// when they were read in the same poll that the freeze came in (else a write made just
    /// after `freeze()` could still get through).
    frozen: watch::Receiver<u64>,
}

/// One direction of [`relay`]: false when `from` closes (after passing the close on), true
/// when a byte arrives after the flow was quiet too long.
async fn forward(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    activity: &Activity<'_>,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return false;
            }
            Ok(n) => n,
        };
        let now_ms = activity.start.elapsed().as_millis() as u64;
        let expiry = activity.idle_expiry_ms.load(Ordering::Relaxed);
        if expiry > 0 && now_ms.saturating_sub(activity.last_ms.load(Ordering::Relaxed)) >= expiry {
            return true;
        }
        activity.last_ms.store(now_ms, Ordering::Relaxed);
        if activity.frozen.has_changed().unwrap_or(false) {
            // The caller's select takes the freeze; these bytes are swallowed.
            return std::future::pending().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}

/// Zero linger turns the close into a RST on both sides.
fn rst(inbound: &TcpStream, outbound: &TcpStream) {
    let _ = inbound.set_zero_linger();
    let _ = outbound.set_zero_linger();
}

/// Reads and drops everything until the peer closes or the socket fails.
async fn discard(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
