//! A proxy that enforces the gRPC C core's PING policy in front of a server that has none
//! (tonic's). The C core (and grpc-go) count a PING that arrives sooner than
//! `min_interval` after the previous one as a strike, unless the server has sent HEADERS or
//! DATA in between; past `max_strikes` it sends GOAWAY `ENHANCE_YOUR_CALM` with debug data
//! `too_many_pings` and closes the connection. Clients whose keepalive is tighter than the
//! server's policy meet exactly this.
//!
//! The proxy relays whole HTTP/2 frames both ways, so it can look at every frame the client
//! sends and slip its GOAWAY between two of the server's frames.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PREFACE_LEN: usize = 24;
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The server's PING policy.
#[derive(Debug, Clone, Copy)]
pub struct PingPolicy {
    /// Least time between two PINGs without HEADERS or DATA from the server in between (the
    /// C core's `GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS`, 5 minutes by
    /// default).
    pub min_interval: Duration,
    /// Strikes tolerated; one more closes the connection (`GRPC_ARG_HTTP2_MAX_PING_STRIKES`,
    /// 2 by default).
    pub max_strikes: u32,
}

/// Relays every connection made to [`PingEnforcer::addr`] on to a target, enforcing a
/// [`PingPolicy`] while [`PingEnforcer::set_enforcing`] says so (from the start).
pub struct PingEnforcer {
    addr: SocketAddr,
    enforcing: Arc<AtomicBool>,
    goaways: Arc<AtomicU64>,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

/// What crossed the proxy, counted whether or not the policy is enforced: with enforcing
/// off it is a transparent, frame-aware tap in front of a server that polices PINGs itself.
#[derive(Debug, Default)]
struct Seen {
    /// PINGs from clients (not their ACKs).
    pings: AtomicU64,
    /// The most PINGs one connection sent between two HEADERS or DATA frames of the server.
    most_pings_without_data: AtomicU64,
    /// GOAWAY frames the server sent (not the proxy's own).
    server_goaways: AtomicU64,
    /// Streams clients opened (calls, health checks and probes alike).
    streams: AtomicU64,
}

impl PingEnforcer {
    /// Listens on a free port of 127.0.0.1 and relays to `target`.
    pub async fn start(target: SocketAddr, policy: PingPolicy) -> PingEnforcer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the PING enforcer");
        let addr = listener.local_addr().expect("its address");
        let enforcing = Arc::new(AtomicBool::new(true));
        let goaways = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Seen::default());
        let shared =
            Shared { policy, enforcing: enforcing.clone(), goaways: goaways.clone(), seen: seen.clone() };
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let _ = relay(inbound, outbound, shared).await;
                    }
                });
            }
        });
        PingEnforcer { addr, enforcing, goaways, seen, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`, for a pool.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether the policy is enforced (on every connection, open or new). While off, PINGs
    /// are neither counted nor punished.
    pub fn set_enforcing(&self, on: bool) {
        self.enforcing.store(on, Ordering::SeqCst);
    }

    /// `too_many_pings` GOAWAYs sent so far.
    pub fn goaways(&self) -> u64 {
        self.goaways.load(Ordering::SeqCst)
    }

    /// PINGs clients sent through the proxy (counted whether enforcing or not).
    pub fn pings(&self) -> u64 {
        self.seen.pings.load(Ordering::SeqCst)
    }

    /// The most PINGs one connection sent between two HEADERS or DATA frames from the
    /// server: what a server's PING policy counts strikes by.
    pub fn most_pings_without_data(&self) -> u64 {
        self.seen.most_pings_without_data.load(Ordering::SeqCst)
    }

    /// Streams clients opened through the proxy.
    pub fn streams(&self) -> u64 {
        self.seen.streams.load(Ordering::SeqCst)
    }

    /// GOAWAY frames the server behind the proxy sent to clients.
    pub fn server_goaways(&self) -> u64 {
        self.seen.server_goaways.load(Ordering::SeqCst)
    }
}

impl Drop for PingEnforcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared {
    policy: PingPolicy,
    enforcing: Arc<AtomicBool>,
    goaways: Arc<AtomicU64>,
    seen: Arc<Seen>,
}

/// One connection's PING accounting, as the C core keeps it.
#[derive(Default)]
struct Strikes {
    /// When the last PING arrived, unless the server has sent HEADERS or DATA since.
    last_ping: Option<Instant>,
    strikes: u32,
    /// The highest stream the client opened, for the GOAWAY's last-stream-id.
    last_stream: u32,
    /// PINGs since the server last sent HEADERS or DATA, enforced or not.
    pings_without_data: u64,
}

/// Reads one frame (header and payload) whole.
async fn read_frame<R: AsyncRead + Unpin>(from: &mut R) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 9];
    from.read_exact(&mut frame).await?;
    let length = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
    frame.resize(9 + length, 0);
    from.read_exact(&mut frame[9..]).await?;
    Ok(frame)
}

async fn relay(inbound: TcpStream, outbound: TcpStream, shared: Shared) -> std::io::Result<()> {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut from_client, to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    // Both directions write to the client: the server's frames, and the GOAWAY.
    let to_client = tokio::sync::Mutex::new(to_client);
    let strikes = Mutex::new(Strikes::default());

    let down = server_to_client(&mut from_server, &to_client, &strikes, &shared.seen);
    let up = async {
        let mut preface = [0u8; PREFACE_LEN];
        from_client.read_exact(&mut preface).await?;
        to_server.write_all(&preface).await?;
        loop {
            let frame = read_frame(&mut from_client).await?;
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let abusive = {
                let mut s = strikes.lock().unwrap();
                if kind == HEADERS && stream > s.last_stream {
                    s.last_stream = stream;
                    shared.seen.streams.fetch_add(1, Ordering::SeqCst);
                }
                if kind == PING && flags & ACK == 0 {
                    s.pings_without_data += 1;
                    shared.seen.pings.fetch_add(1, Ordering::SeqCst);
                    shared.seen.most_pings_without_data.fetch_max(s.pings_without_data, Ordering::SeqCst);
                }
                if kind == PING && flags & ACK == 0 && shared.enforcing.load(Ordering::SeqCst) {
                    let now = Instant::now();
                    if s.last_ping.is_some_and(|last| now - last < shared.policy.min_interval) {
                        s.strikes += 1;
                    }
                    s.last_ping = Some(now);
                }
                (s.strikes > shared.policy.max_strikes).then_some(s.last_stream)
            };
            if let Some(last_stream) = abusive {
                go_away(&to_client, last_stream).await?;
                shared.goaways.fetch_add(1, Ordering::SeqCst);
                return Ok(()); // and close, as the C core does
            }
            to_server.write_all(&frame).await?;
        }
    };
    // Whichever direction ends first ends the connection: both sockets close on return.
    tokio::select! {
        result = down => result,
        result = up => result,
    }
}

/// Relays the server's frames; HEADERS or DATA reset the client's PING strikes.
async fn server_to_client(
    from_server: &mut OwnedReadHalf,
    to_client: &tokio::sync::Mutex<OwnedWriteHalf>,
    strikes: &Mutex<Strikes>,
    seen: &Seen,
) -> std::io::Result<()> {
    loop {
        let frame = read_frame(from_server).await?;
        if matches!(frame[3], HEADERS | DATA) {
            let mut s = strikes.lock().unwrap();
            s.last_ping = None;
            s.strikes = 0;
            s.pings_without_data = 0;
        }
        if frame[3] == GOAWAY {
            seen.server_goaways.fetch_add(1, Ordering::SeqCst);
        }
        to_client.lock().await.write_all(&frame).await?;
    }
}

async fn go_away(to_client: &tokio::sync::Mutex<OwnedWriteHalf>, last_stream: u32) -> std::io::Result<()> {
    let debug = b"too_many_pings";
    let mut frame = Vec::with_capacity(9 + 8 + debug.len());
    let length = (8 + debug.len()) as u32;
    frame.extend_from_slice(&length.to_be_bytes()[1..]);
    frame.extend_from_slice(&[GOAWAY, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&last_stream.to_be_bytes());
    frame.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    frame.extend_from_slice(debug);
    let mut writer = to_client.lock().await;
    writer.write_all(&frame).await?;
    writer.flush().await
}
