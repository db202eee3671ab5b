//! An HTTP/2 gRPC echo server written at the frame level, without the `h2` crate, for what
//! `h2`'s server will not do: GOAWAYs whose last stream id the test decides, a stream limit
//! of 0, PINGs left unanswered, answers without `grpc-status`.
//!
//! `h2`'s server puts the highest stream id it has *read* in a GOAWAY, whether or not the
//! application ever saw the stream, so it cannot say "streams above N were never processed"
//! for an N below what is in flight. This server answers each stream as soon as its request
//! has arrived whole, and when it decides to go away it names the last stream it answered:
//! every stream above it, received or not, was never processed, which is exactly what a
//! client may send again.
//!
//! It speaks just enough HTTP/2 for a gRPC client: the preface, SETTINGS and their ACKs,
//! PING ACKs, flow-control credit for what it receives, and responses encoded with HPACK
//! literals only (no dynamic table, so it never needs to decode the client's headers).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::echo::{EchoRequest, EchoResponse};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// How long a connection stays open after its GOAWAY for the client to finish and close it.
const LINGER: Duration = Duration::from_secs(10);

/// What the server does wrong.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// GOAWAY on every connection once it is about this old (drawn per connection between half and
    /// one and a half times it, as servers spread their maximum connection age so that
    /// connections do not all go at once), but without grace: at the first stream's HEADERS
    /// after that, GOAWAY names the last stream answered, and that stream and every later
    /// one go unanswered.
    GoAwayAfterAge(Duration),
    /// When the first stream's request has arrived whole (however large): GOAWAY with last
    /// stream id 0, and the stream goes unanswered.
    GoAwayAtFirstRequestEnd,
    /// On the server's first connection only, as soon as its first stream's HEADERS arrive:
    /// GOAWAY with last stream id 0. Later connections serve every stream.
    GoAwayAtFirstHeadersOnce,
    /// GOAWAY (last stream id 0) right after its SETTINGS, on every connection: a server
    /// that will not take this client.
    GoAwayOnConnect,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS = 0`: connected, and no room for a single call.
    ZeroStreams,
    /// Serves calls but never answers a PING.
    IgnorePings,
    /// Answers calls with trailers that lack `grpc-status`.
    NoGrpcStatus,
    /// Answers calls with no trailers at all: END_STREAM on the last DATA frame.
    NoTrailers,
    /// Answers with a response header of this many bytes (in one HEADERS frame, so keep it
    /// under 16 KiB).
    HugeHeaders(usize),
    /// Lowers `SETTINGS_MAX_CONCURRENT_STREAMS` from 1000 to 1 once this many streams have
    /// been answered on a connection.
    LowerStreamLimitAfter(u64),
    /// Gives request streams no flow-control window (`SETTINGS_INITIAL_WINDOW_SIZE = 0`) and
    /// never opens it: a request body can never be sent.
    StalledWindow,
    /// Answers each call this long after its request arrived whole, whatever its
    /// `grpc-timeout` says (this server reads no header), as a slow or stuck backend does.
    AnswerAfter(Duration),
    /// Sends each call's response head at once, and its message and trailers this long
    /// after: a response stream that stalls after it started.
    HeadThenStall(Duration),
}

#[derive(Debug, Default)]
struct Counts {
    answered: AtomicU64,
    goaways: AtomicU64,
    unanswered: AtomicU64,
    body_bytes: AtomicU64,
    /// Connections accepted so far.
    connections: AtomicU64,
    /// `RST_STREAM` frames received from the client.
    resets: AtomicU64,
    /// PINGs received (not their ACKs).
    pings: AtomicU64,
    /// Calls waiting for their delayed answer now (`AnswerAfter`, `HeadThenStall`).
    waiting: AtomicU64,
}

/// The server, listening on 127.0.0.1 until dropped.
pub struct FrameServer {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl FrameServer {
    /// Starts the server.
    pub async fn start(behaviour: Behaviour) -> FrameServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let counts = shared.clone();
                tokio::spawn(async move {
                    let _ = Connection::new(behaviour, counts).serve(tcp).await;
                });
            }
        });
        FrameServer { addr, counts, task }
    }

    /// `http://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Streams answered.
    pub fn answered(&self) -> u64 {
        self.counts.answered.load(Ordering::Relaxed)
    }

    /// GOAWAY frames sent.
    pub fn goaways(&self) -> u64 {
        self.counts.goaways.load(Ordering::Relaxed)
    }

    /// Streams whose HEADERS arrived but that were left unanswered because they were above a
    /// GOAWAY's last stream id.
    pub fn unanswered(&self) -> u64 {
        self.counts.unanswered.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::Relaxed)
    }

    /// PINGs received from the client (answered or not, as the behaviour says).
    pub fn pings(&self) -> u64 {
        self.counts.pings.load(Ordering::Relaxed)
    }

    /// `RST_STREAM` frames received: streams the client cancelled.
    pub fn resets(&self) -> u64 {
        self.counts.resets.load(Ordering::Relaxed)
    }

    /// Calls waiting for their delayed answer now (`AnswerAfter`, `HeadThenStall`); a call
    /// the client resets stops waiting.
    pub fn waiting(&self) -> u64 {
        self.counts.waiting.load(Ordering::Relaxed)
    }

    /// Request body bytes received, on all streams.
    pub fn body_bytes(&self) -> u64 {
        self.counts.body_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FrameServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Connection {
    behaviour: Behaviour,
    counts: Arc<Counts>,
    /// Which connection of the server this is, from 0.
    index: u64,
    /// Streams whose request is still arriving: id -> the body so far.
    open: HashMap<u32, BytesMut>,
    /// Streams answered on this connection.
    answered_here: u64,
    /// When this connection goes away, for `AfterAge`.
    deadline: std::time::Instant,
    last_answered: u32,
    /// The last stream id of the GOAWAY sent, once sent.
    went_away: Option<u32>,
    /// Answers held back (`AnswerAfter`, `HeadThenStall`): when, which stream, its request.
    delayed: Vec<(tokio::time::Instant, u32, BytesMut)>,
    out: BytesMut,
}

impl Connection {
    fn new(behaviour: Behaviour, counts: Arc<Counts>) -> Connection {
        let index = counts.connections.fetch_add(1, Ordering::Relaxed);
        Connection {
            behaviour,
            counts,
            index,
            answered_here: 0,
            open: HashMap::new(),
            deadline: match behaviour {
                Behaviour::GoAwayAfterAge(age) => std::time::Instant::now() + age.mul_f64(0.5 + spread()),
                _ => std::time::Instant::now(),
            },
            last_answered: 0,
            went_away: None,
            delayed: Vec::new(),
            out: BytesMut::new(),
        }
    }

    async fn serve(mut self, mut tcp: TcpStream) -> std::io::Result<()> {
        let mut preface = [0u8; PREFACE.len()];
        tcp.read_exact(&mut preface).await?;
        if preface != PREFACE {
            return Ok(());
        }
        // Room for any request: the largest stream window, and the connection window opened
        // as far as it goes (and topped up as data arrives).
        let mut settings = BytesMut::new();
        settings.put_u16(0x3); // MAX_CONCURRENT_STREAMS
        settings.put_u32(if matches!(self.behaviour, Behaviour::ZeroStreams) { 0 } else { 1000 });
        settings.put_u16(0x4); // INITIAL_WINDOW_SIZE
        settings.put_u32(if matches!(self.behaviour, Behaviour::StalledWindow) { 0 } else { MAX_WINDOW });
        frame(&mut self.out, SETTINGS, 0, 0, &settings);
        frame(&mut self.out, WINDOW_UPDATE, 0, 0, &(MAX_WINDOW - 65_535).to_be_bytes());
        if matches!(self.behaviour, Behaviour::GoAwayOnConnect) {
            self.go_away(0);
        }
        tcp.write_all(&self.out).await?;
        self.out.clear();

        let mut input = BytesMut::with_capacity(64 * 1024);
        loop {
            if let Some(due) = self.delayed.iter().map(|(at, _, _)| *at).min() {
                let read = tokio::select! {
                    read = tcp.read_buf(&mut input) => Some(read?),
                    _ = tokio::time::sleep_until(due) => None,
                };
                match read {
                    Some(0) => return Ok(()),
                    Some(_) => {}
                    None => {
                        self.answer_due();
                        tcp.write_all(&self.out).await?;
                        self.out.clear();
                        continue;
                    }
                }
            } else {
                let read = match self.went_away {
                    None => tcp.read_buf(&mut input).await?,
                    // After the GOAWAY the client finishes its streams below it and hangs up.
                    Some(_) => match tokio::time::timeout(LINGER, tcp.read_buf(&mut input)).await {
                        Ok(read) => read?,
                        Err(_) => return Ok(()),
                    },
                };
                if read == 0 {
                    return Ok(());
                }
            }
            while input.len() >= 9 {
                let length =
                    (usize::from(input[0]) << 16) | (usize::from(input[1]) << 8) | usize::from(input[2]);
                if input.len() < 9 + length {
                    break;
                }
                let kind = input[3];
                let flags = input[4];
                let stream = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
                input.advance(9);
                let payload = input.split_to(length);
                self.on_frame(kind, flags, stream, payload);
            }
            if !self.out.is_empty() {
                tcp.write_all(&self.out).await?;
                self.out.clear();
            }
        }
    }

    fn on_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: BytesMut) {
        match kind {
            SETTINGS if flags & ACK == 0 => frame(&mut self.out, SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => {
                self.counts.pings.fetch_add(1, Ordering::Relaxed);
                if !matches!(self.behaviour, Behaviour::IgnorePings) {
                    frame(&mut self.out, PING, ACK, 0, &payload)
                }
            }
            HEADERS => self.on_headers(flags, stream),
            DATA => {
                if !payload.is_empty() {
                    // Give the connection window back at once; streams have the largest.
                    frame(&mut self.out, WINDOW_UPDATE, 0, 0, &(payload.len() as u32).to_be_bytes());
                }
                let data = unpadded(flags, payload);
                self.counts.body_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(body) = self.open.get_mut(&stream) {
                    body.extend_from_slice(&data);
                }
                if flags & END_STREAM != 0 {
                    self.on_request_end(stream);
                }
            }
            RST_STREAM => {
                self.counts.resets.fetch_add(1, Ordering::Relaxed);
                self.open.remove(&stream);
                let before = self.delayed.len();
                self.delayed.retain(|(_, id, _)| *id != stream);
                self.counts.waiting.fetch_sub((before - self.delayed.len()) as u64, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn on_headers(&mut self, flags: u8, stream: u32) {
        // Trailers of a stream already open carry nothing this server needs.
        if self.open.contains_key(&stream) {
            if flags & END_STREAM != 0 {
                self.on_request_end(stream);
            }
            return;
        }
        if let Some(last) = self.went_away {
            if stream > last {
                self.counts.unanswered.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let now = match self.behaviour {
            Behaviour::GoAwayAfterAge(_) => std::time::Instant::now() >= self.deadline,
            Behaviour::GoAwayAtFirstHeadersOnce => self.index == 0,
            _ => false,
        };
        if now {
            let last = self.last_answered;
            self.go_away(last);
            self.counts.unanswered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.open.insert(stream, BytesMut::new());
        if flags & END_STREAM != 0 {
            self.on_request_end(stream);
        }
    }

    fn on_request_end(&mut self, stream: u32) {
        let Some(body) = self.open.remove(&stream) else { return };
        if let Behaviour::GoAwayAtFirstRequestEnd = self.behaviour {
            if self.went_away.is_none() {
                self.go_away(0);
                self.counts.unanswered.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        match self.behaviour {
            Behaviour::AnswerAfter(delay) | Behaviour::HeadThenStall(delay) => {
                if let Behaviour::HeadThenStall(_) = self.behaviour {
                    self.answer_head(stream);
                }
                self.counts.waiting.fetch_add(1, Ordering::Relaxed);
                self.delayed.push((tokio::time::Instant::now() + delay, stream, body));
            }
            _ => self.answer(stream, body),
        }
    }

    /// Sends the held-back answers that are due.
    fn answer_due(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.delayed).into_iter().partition(|(at, _, _)| *at <= now);
        self.delayed = later;
        for (_, stream, body) in due {
            self.counts.waiting.fetch_sub(1, Ordering::Relaxed);
            match self.behaviour {
                Behaviour::HeadThenStall(_) => self.answer_body(stream, body),
                _ => self.answer(stream, body),
            }
        }
    }

    fn go_away(&mut self, last: u32) {
        let mut payload = BytesMut::new();
        payload.put_u32(last);
        payload.put_u32(0); // NO_ERROR
        frame(&mut self.out, GOAWAY, 0, 0, &payload);
        self.went_away = Some(last);
        // Streams above `last` whose requests were still arriving are dropped with the rest:
        // the GOAWAY said they were never processed.
        let before = self.open.len();
        self.open.retain(|&stream, _| stream <= last);
        self.counts.unanswered.fetch_add((before - self.open.len()) as u64, Ordering::Relaxed);
        self.counts.goaways.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers as the echo service's unary and client-streaming methods do: one
    /// `EchoResponse` carrying the request messages' `message` fields, concatenated.
    fn answer(&mut self, stream: u32, body: BytesMut) {
        self.answer_head(stream);
        self.answer_body(stream, body);
    }

    /// The response head: `:status: 200`, `content-type: application/grpc`.
    fn answer_head(&mut self, stream: u32) {
        // HPACK: `:status: 200` is static entry 8; `content-type` is static entry 31, sent as
        // a literal without indexing (4-bit prefix: 15, then 16); `grpc-status` is a literal
        // with a new name. No Huffman coding, no dynamic table.
        let mut head = BytesMut::new();
        head.put_u8(0x88);
        head.put_slice(&[0x0f, 0x10, 16]);
        head.put_slice(b"application/grpc");
        if let Behaviour::HugeHeaders(size) = self.behaviour {
            head.put_slice(&[0x00, 5]);
            head.put_slice(b"x-big");
            hpack_length(&mut head, size);
            head.put_bytes(b'x', size);
        }
        frame(&mut self.out, HEADERS, END_HEADERS, stream, &head);
    }

    /// The response message and trailers.
    fn answer_body(&mut self, stream: u32, mut body: BytesMut) {
        let mut echoed = Vec::new();
        while body.len() >= 5 {
            let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            if body.len() < 5 + length {
                break;
            }
            body.advance(5);
            if let Ok(request) = EchoRequest::decode(body.split_to(length)) {
                echoed.extend_from_slice(&request.message);
            }
        }
        let response = EchoResponse { message: echoed.into() }.encode_to_vec();
        let mut message = BytesMut::with_capacity(5 + response.len());
        message.put_u8(0);
        message.put_u32(response.len() as u32);
        message.put_slice(&response);
        if matches!(self.behaviour, Behaviour::NoTrailers) {
            frame(&mut self.out, DATA, END_STREAM, stream, &message);
            self.last_answered = self.last_answered.max(stream);
            self.counts.answered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        frame(&mut self.out, DATA, 0, stream, &message);
        let mut trailers = BytesMut::new();
        if !matches!(self.behaviour, Behaviour::NoGrpcStatus) {
            trailers.put_slice(&[0x00, 11]);
            trailers.put_slice(b"grpc-status");
            trailers.put_slice(&[1, b'0']);
        }
        frame(&mut self.out, HEADERS, END_HEADERS | END_STREAM, stream, &trailers);
        self.last_answered = self.last_answered.max(stream);
        self.counts.answered.fetch_add(1, Ordering::Relaxed);
        self.answered_here += 1;
        if let Behaviour::LowerStreamLimitAfter(n) = self.behaviour {
            if self.answered_here == n {
                let mut settings = BytesMut::new();
                settings.put_u16(0x3); // MAX_CONCURRENT_STREAMS
                settings.put_u32(1);
                frame(&mut self.out, SETTINGS, 0, 0, &settings);
            }
        }
    }
}

/// Appends one frame.
fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = payload.len() as u32;
    out.put_slice(&length.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// An HPACK string length with a 7-bit prefix and no Huffman coding (RFC 7541, 5.1).
fn hpack_length(out: &mut BytesMut, length: usize) {
    if length < 127 {
        out.put_u8(length as u8);
        return;
    }
    out.put_u8(127);
    let mut rest = length - 127;
    while rest >= 128 {
        out.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.put_u8(rest as u8);
}

/// A DATA payload without its padding.
fn unpadded(flags: u8, mut payload: BytesMut) -> BytesMut {
    if flags & PADDED == 0 || payload.is_empty() {
        return payload;
    }
    let pad = usize::from(payload[0]);
    payload.advance(1);
    payload.truncate(payload.len().saturating_sub(pad));
    payload
}

/// A number in [0, 1), different for each call: a hash of a counter and the clock.
fn spread() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}
