//! Watching the frames a server sends, without touching them.
//!
//! `h2` keeps two facts to itself that the pool needs the moment they arrive: the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (to never put more streams on a member than it accepts)
//! and a GOAWAY with its error code and debug data (to stop handing the member out, and, for
//! `ENHANCE_YOUR_CALM`/`too_many_pings`, to back off keepalive). [`ObservedIo`] sits between
//! the socket and `h2`, reads the 9-byte frame headers as the bytes go by, and records those
//! two frames in [`ConnSignals`]. It copies at most a few hundred bytes per SETTINGS or GOAWAY
//! frame and nothing else; every other payload is skipped by length.
//!
//! It also counts PING acknowledgements (PONGs) and times them against the moment the last
//! PING was sent: so a PING's answer is known, with its round trip, the moment it is read,
//! without anyone waiting for it. The health task sends its keepalive PINGs that way and
//! looks at the count at the PING's deadline, instead of being woken by every PONG.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::clock::AtomicInstant;

const FRAME_HEADER_LEN: usize = 9;
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PING: u8 = 0x6;
const TYPE_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// How much of a SETTINGS or GOAWAY payload is kept: SETTINGS has six bytes per setting and
/// servers send a handful; GOAWAY debug data is a short reason like `too_many_pings`.
const CAPTURE_LIMIT: usize = 1024;

/// A GOAWAY frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GoAway {
    pub(crate) last_stream_id: u32,
    pub(crate) error_code: u32,
    pub(crate) debug_data: Bytes,
}

impl GoAway {
    /// The error code's name, as in RFC 9113 section 7.
    pub(crate) fn reason(&self) -> h2::Reason {
        h2::Reason::from(self.error_code)
    }
}

/// What the server has told us so far on one connection, shared between the connection's
/// reader and the pool.
#[derive(Debug)]
pub(crate) struct ConnSignals {
    /// When bytes last arrived from the server: keepalive PINGs only connections that have
    /// been quiet.
    last_read: AtomicInstant,
    /// When the last PING was handed to `h2`, to time its PONG.
    ping_sent: AtomicInstant,
    /// PING acknowledgements received so far. `h2` allows one PING of the client's in flight
    /// and sends none of its own, so each answers the PING sent last.
    pongs: AtomicU64,
    /// Round trip of the last answered PING, in microseconds; 0 before the first.
    last_rtt_micros: AtomicU64,
    /// DATA and HEADERS frames received so far. Servers forgive a client's PINGs once they
    /// have sent either (gRPC's PING policy resets its strikes then), so keepalive counts the
    /// PINGs it sends between two changes of this.
    data_frames: AtomicU64,
    /// PINGs sent since the server last sent DATA or HEADERS (the reader sets it back to 0):
    /// every PING of ours (keepalive, the check before use, the one after a deadline) counts
    /// against the server's PING policy until then.
    pings_without_data: AtomicU64,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS`; `u32::MAX` until it sends one
    /// (unlimited, as RFC 9113 says of a setting not yet received).
    server_max_streams: AtomicU32,
    settings_seen: AtomicBool,
    /// Set when the server raises its stream limit; taken by the driver, which then hands
    /// the new room to queued callers.
    limit_raised: AtomicBool,
    goaway_seen: AtomicBool,
    goaway: Mutex<Option<GoAway>>,
    closed: AtomicBool,
    /// Why the connection ended, when it ended with an error: a connect that fails before
    /// the server's SETTINGS reports it (a TLS alert, a reset).
    close_error: Mutex<Option<String>>,
    /// Woken on the first SETTINGS, on GOAWAY and on close.
    changed: Notify,
}

impl ConnSignals {
    pub(crate) fn new() -> ConnSignals {
        ConnSignals {
            last_read: AtomicInstant::now(),
            ping_sent: AtomicInstant::now(),
            pongs: AtomicU64::new(0),
            last_rtt_micros: AtomicU64::new(0),
            data_frames: AtomicU64::new(0),
            pings_without_data: AtomicU64::new(0),
            server_max_streams: AtomicU32::new(u32::MAX),
            settings_seen: AtomicBool::new(false),
            limit_raised: AtomicBool::new(false),
            goaway_seen: AtomicBool::new(false),
            goaway: Mutex::new(None),
            closed: AtomicBool::new(false),
            close_error: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// Time since bytes last arrived from the server.
    pub(crate) fn since_last_read(&self) -> Duration {
        self.last_read.elapsed()
    }

    /// Time since the last PING was handed to `h2`.
    pub(crate) fn since_ping_sent(&self) -> Duration {
        self.ping_sent.elapsed()
    }

    /// Notes that a PING goes out now: its PONG's round trip is measured from here, and it
    /// counts as a PING without data until the server sends some.
    pub(crate) fn ping_sent_now(&self) {
        self.ping_sent.set_now();
        self.pings_without_data.fetch_add(1, Ordering::Relaxed);
    }

    /// PINGs sent since the server last sent DATA or HEADERS (which resets its PING
    /// policy's strikes), whoever sent them.
    pub(crate) fn pings_without_data(&self) -> u64 {
        self.pings_without_data.load(Ordering::Relaxed)
    }

    /// PING acknowledgements received so far.
    pub(crate) fn pongs(&self) -> u64 {
        self.pongs.load(Ordering::Acquire)
    }

    /// Round trip of the last answered PING, if one was answered yet.
    pub(crate) fn last_rtt(&self) -> Option<Duration> {
        match self.last_rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    fn on_pong(&self) {
        let rtt = self.ping_sent.elapsed();
        self.last_rtt_micros.store((rtt.as_micros() as u64).max(1), Ordering::Relaxed);
        // Only the connection's reader writes it; Release so that whoever sees the new count
        // sees the round trip too.
        let seen = self.pongs.load(Ordering::Relaxed);
        self.pongs.store(seen + 1, Ordering::Release);
    }

    /// DATA and HEADERS frames received from the server so far.
    pub(crate) fn data_frames(&self) -> u64 {
        self.data_frames.load(Ordering::Relaxed)
    }

    pub(crate) fn server_max_streams(&self) -> u32 {
        self.server_max_streams.load(Ordering::Relaxed)
    }

    pub(crate) fn settings_seen(&self) -> bool {
        self.settings_seen.load(Ordering::Acquire)
    }

    /// Whether the server raised its stream limit since the last call.
    pub(crate) fn take_limit_raised(&self) -> bool {
        self.limit_raised.load(Ordering::Relaxed) && self.limit_raised.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn goaway_seen(&self) -> bool {
        self.goaway_seen.load(Ordering::Acquire)
    }

    /// The most recent GOAWAY, if any.
    pub(crate) fn goaway(&self) -> Option<GoAway> {
        self.goaway.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Records why the connection ended, before `mark_closed`; the first reason recorded
    /// stays (it is the cause; later ones are its consequences).
    pub(crate) fn set_close_error(&self, error: String) {
        self.close_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(error);
    }

    pub(crate) fn close_error(&self) -> Option<String> {
        self.close_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Waits until the server's first SETTINGS frame arrives or the connection closes;
    /// returns whether SETTINGS came.
    pub(crate) async fn settings_or_closed(&self) -> bool {
        crate::notify::until(&self.changed, || self.settings_seen() || self.is_closed()).await;
        self.settings_seen()
    }

    fn on_settings(&self, payload: &[u8]) {
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                let before = self.server_max_streams.swap(value, Ordering::Relaxed);
                if value > before && self.settings_seen() {
                    self.limit_raised.store(true, Ordering::Release);
                }
            }
        }
        if !self.settings_seen.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    fn on_goaway(&self, payload: &[u8]) {
        if payload.len() < 8 {
            return; // malformed; h2 will fail the connection with a protocol error.
        }
        let goaway = GoAway {
            last_stream_id: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                & 0x7fff_ffff,
            error_code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
            debug_data: Bytes::copy_from_slice(&payload[8..]),
        };
        *self.goaway.lock().unwrap_or_else(|e| e.into_inner()) = Some(goaway);
        self.goaway_seen.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// Incremental parser of the server-to-client frame sequence.
#[derive(Debug, Default)]
struct FrameReader {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
    kind: u8,
    /// Whether the current frame's payload is kept (SETTINGS without ACK, GOAWAY).
    capturing: bool,
    payload: Vec<u8>,
    /// How many of the first bytes matched `HTTP/1.` so far (an HTTP/1 server's answer);
    /// `usize::MAX` once decided either way. Counted across reads: the server's first bytes
    /// may arrive split.
    http1_matched: usize,
}

const HTTP1: &[u8] = b"HTTP/1.";

impl FrameReader {
    fn feed(&mut self, mut bytes: &[u8], signals: &ConnSignals) {
        if self.http1_matched < HTTP1.len() {
            for &byte in bytes.iter().take(HTTP1.len() - self.http1_matched) {
                if byte != HTTP1[self.http1_matched] {
                    self.http1_matched = usize::MAX;
                    break;
                }
                self.http1_matched += 1;
            }
            if self.http1_matched == HTTP1.len() {
                self.http1_matched = usize::MAX;
                signals.set_close_error(
                    "the server answered in HTTP/1.x: it does not speak HTTP/2 here (gRPC needs HTTP/2; \
                     over cleartext the server must accept it without an upgrade)"
                        .to_owned(),
                );
            }
        }
        while !bytes.is_empty() {
            if self.header_len < FRAME_HEADER_LEN {
                let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == FRAME_HEADER_LEN {
                    self.start_frame(signals);
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            if self.capturing {
                let room = CAPTURE_LIMIT.saturating_sub(self.payload.len());
                self.payload.extend_from_slice(&bytes[..take.min(room)]);
            }
            self.remaining -= take;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.end_frame(signals);
            }
        }
    }

    fn start_frame(&mut self, signals: &ConnSignals) {
        let h = &self.header;
        self.remaining = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        self.kind = h[3];
        let flags = h[4];
        self.capturing = (self.kind == TYPE_SETTINGS && flags & FLAG_ACK == 0) || self.kind == TYPE_GOAWAY;
        if self.kind == TYPE_DATA || self.kind == TYPE_HEADERS {
            // Only the connection's reader writes it: a load and a store, no atomic
            // read-modify-write on every frame.
            let seen = signals.data_frames.load(Ordering::Relaxed);
            signals.data_frames.store(seen + 1, Ordering::Relaxed);
            // The server forgives our PINGs now. Written only when there were some, so the
            // common frame costs a load.
            if signals.pings_without_data.load(Ordering::Relaxed) != 0 {
                signals.pings_without_data.store(0, Ordering::Relaxed);
            }
        } else if self.kind == TYPE_PING && flags & FLAG_ACK != 0 {
            signals.on_pong();
        }
        self.payload.clear();
        if self.remaining == 0 {
            self.end_frame(signals);
        }
    }

    fn end_frame(&mut self, signals: &ConnSignals) {
        if self.capturing {
            match self.kind {
                TYPE_SETTINGS => signals.on_settings(&self.payload),
                TYPE_GOAWAY => signals.on_goaway(&self.payload),
                _ => {}
            }
        }
        self.header_len = 0;
        self.capturing = false;
    }
}

/// What [`ConnSignals`] recorded, for comparing two runs.
#[cfg(feature = "test-hooks")]
#[derive(Debug, PartialEq, Eq)]
struct Recorded {
    server_max_streams: u32,
    settings_seen: bool,
    limit_raised: bool,
    goaway: Option<GoAway>,
    close_error: Option<String>,
    pongs: u64,
}

#[cfg(feature = "test-hooks")]
fn observe(pieces: &mut dyn Iterator<Item = &[u8]>) -> Recorded {
    let (mut reader, signals) = (FrameReader::default(), ConnSignals::new());
    for piece in pieces {
        reader.feed(piece, &signals);
    }
    Recorded {
        server_max_streams: signals.server_max_streams(),
        settings_seen: signals.settings_seen(),
        limit_raised: signals.take_limit_raised(),
        goaway: signals.goaway(),
        close_error: signals.close_error(),
        pongs: signals.pongs(),
    }
}

/// The fuzz targets' check (see `crate::__fuzz::frame_observer`).
#[cfg(feature = "test-hooks")]
pub(crate) fn check_chunking(bytes: &[u8], seed: u64) {
    let whole = observe(&mut std::iter::once(bytes));
    // Piece sizes from 1 to 64 bytes, drawn from `seed` (a 64-bit LCG).
    let mut state = seed;
    let mut rest = bytes;
    let mut pieces = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let size = ((state >> 58) as usize + 1).min(rest.len());
        let (piece, after) = rest.split_at(size);
        rest = after;
        Some(piece)
    });
    let chunked = observe(&mut pieces);
    assert_eq!(whole, chunked, "the frame observer's record depends on how the bytes were split");
}

pin_project_lite::pin_project! {
    /// A transport that reports SETTINGS and GOAWAY frames to [`ConnSignals`] as `h2` reads
    /// them; writes pass straight through.
    pub(crate) struct ObservedIo<T> {
        #[pin]
        io: T,
        reader: FrameReader,
        signals: std::sync::Arc<ConnSignals>,
    }
}

impl<T> ObservedIo<T> {
    pub(crate) fn new(io: T, signals: std::sync::Arc<ConnSignals>) -> ObservedIo<T> {
        ObservedIo { io, reader: FrameReader::default(), signals }
    }
}

impl<T: AsyncRead> AsyncRead for ObservedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.signals.last_read.set_now();
                this.reader.feed(read, this.signals);
            }
        }
        result
    }
}

impl<T: AsyncWrite> AsyncWrite for ObservedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }

    fn settings(max_streams: u32) -> Vec<u8> {
        let mut payload = vec![0, 0x4, 0, 0, 0xff, 0xff]; // INITIAL_WINDOW_SIZE first
        payload.extend_from_slice(&[0, 0x3]);
        payload.extend_from_slice(&max_streams.to_be_bytes());
        frame(TYPE_SETTINGS, 0, &payload)
    }

    fn goaway(last: u32, code: u32, debug: &[u8]) -> Vec<u8> {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(debug);
        frame(TYPE_GOAWAY, 0, &payload)
    }

    fn stream() -> Vec<u8> {
        let mut bytes = settings(50);
        bytes.extend(frame(0x0, 0x1, &[7u8; 300])); // DATA
        bytes.extend(frame(TYPE_SETTINGS, FLAG_ACK, &[]));
        bytes.extend(frame(TYPE_PING, 0, &[1u8; 8])); // the server's PING: not an answer
        bytes.extend(frame(TYPE_PING, FLAG_ACK, &[2u8; 8])); // PONG
        bytes.extend(goaway(41, 0xb, b"too_many_pings"));
        bytes
    }

    fn check(signals: &ConnSignals) {
        assert!(signals.settings_seen());
        assert_eq!(signals.server_max_streams(), 50);
        let goaway = signals.goaway().expect("goaway seen");
        assert_eq!(goaway.last_stream_id, 41);
        assert_eq!(goaway.reason(), h2::Reason::ENHANCE_YOUR_CALM);
        assert_eq!(&goaway.debug_data[..], b"too_many_pings");
        assert_eq!(signals.pongs(), 1, "one PONG; the server's own PING is not one");
        assert!(signals.last_rtt().is_some());
    }

    #[test]
    fn pings_count_until_the_server_sends_data_or_headers() {
        let (signals, mut reader) = (ConnSignals::new(), FrameReader::default());
        reader.feed(&settings(50), &signals);
        signals.ping_sent_now();
        signals.ping_sent_now();
        // A PONG, a SETTINGS ack and the server's own PING do not forgive them.
        reader.feed(&frame(TYPE_PING, FLAG_ACK, &[2u8; 8]), &signals);
        reader.feed(&frame(TYPE_SETTINGS, FLAG_ACK, &[]), &signals);
        reader.feed(&frame(TYPE_PING, 0, &[1u8; 8]), &signals);
        assert_eq!(signals.pings_without_data(), 2);
        reader.feed(&frame(0x0, 0x0, &[7u8; 10]), &signals); // DATA
        assert_eq!(signals.pings_without_data(), 0);
        signals.ping_sent_now();
        reader.feed(&frame(0x1, 0x4, &[0x88]), &signals); // HEADERS
        assert_eq!(signals.pings_without_data(), 0);
    }

    #[test]
    fn reads_settings_and_goaway_in_one_piece() {
        let signals = ConnSignals::new();
        FrameReader::default().feed(&stream(), &signals);
        check(&signals);
    }

    #[test]
    fn reads_them_split_at_every_byte() {
        let signals = ConnSignals::new();
        let mut reader = FrameReader::default();
        for byte in stream() {
            reader.feed(&[byte], &signals);
        }
        check(&signals);
    }

    #[test]
    fn an_http1_answer_is_named_even_when_its_first_bytes_arrive_split() {
        // Found by the frames fuzz target: only the first read was looked at.
        for split in 1..HTTP1.len() {
            let answer = b"HTTP/1.1 400 Bad Request\r\n\r\n";
            let (signals, mut reader) = (ConnSignals::new(), FrameReader::default());
            reader.feed(&answer[..split], &signals);
            reader.feed(&answer[split..], &signals);
            assert!(signals.close_error().is_some_and(|e| e.contains("HTTP/1.x")), "split at {split}");
        }
        // A frame that merely starts with `H` is not taken for one.
        let (signals, mut reader) = (ConnSignals::new(), FrameReader::default());
        reader.feed(b"H", &signals);
        reader.feed(b"XXXXXXXXXXXX", &signals);
        assert_eq!(signals.close_error(), None);
    }

    #[test]
    fn later_settings_frames_lower_and_raise_the_limit() {
        let signals = ConnSignals::new();
        let mut reader = FrameReader::default();
        reader.feed(&settings(100), &signals);
        assert_eq!(signals.server_max_streams(), 100);
        reader.feed(&settings(0), &signals);
        assert_eq!(signals.server_max_streams(), 0);
        assert!(!signals.take_limit_raised());
        reader.feed(&settings(10), &signals);
        assert!(signals.take_limit_raised());
        assert!(!signals.take_limit_raised(), "taken once");
        assert!(!signals.goaway_seen());
    }
}
