//! HTTP/2 PINGs on demand, with the round trip measured, safe to cancel.
//!
//! `h2` allows one user PING in flight per connection, and its state outlives the future that
//! waits for the PONG: if that future is dropped (a timeout, a cancelled call), h2 still
//! counts the PING as pending, and every later `send_ping` on the connection fails with
//! `SendPingWhilePending` until somebody collects the PONG with `poll_pong`. So [`Pinger`]
//! remembers a PING whose waiter went away, and the next pinger collects it first: if its
//! PONG already came, that answer is stale (it says nothing of the connection now) and a fresh
//! PING goes out; if not, the old PING is still on the wire and its PONG, when it comes, is a
//! fresh answer for the new pinger too.
//!
//! One pinger at a time holds the connection's `PingPong`; a second caller while a PING is
//! out is told so rather than queued, since the answer to the first PING answers it too.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// Why a PING did not come back.
#[derive(Debug)]
pub(crate) enum PingError {
    /// Another PING is in flight on this connection.
    Busy,
    /// The connection failed or closed while waiting.
    Connection(h2::Error),
}

/// The connection's `PingPong`, and whether a PING sent on it has a PONG nobody collected.
#[derive(Debug)]
struct Held {
    ping_pong: h2::PingPong,
    /// A PING was sent and its PONG not yet collected with `poll_pong`: h2 refuses another
    /// `send_ping` until it is.
    outstanding: bool,
}

#[derive(Debug)]
pub(crate) struct Pinger {
    held: Mutex<Option<Held>>,
    /// Round trip of the last answered PING, in microseconds; 0 before the first.
    last_rtt_micros: AtomicU64,
}

/// Lends the `PingPong` to one pinger and puts it back however the PING ends: answered,
/// failed, or its future dropped, in which case `outstanding` stays set for the next pinger
/// to collect.
struct Lent<'a> {
    pinger: &'a Pinger,
    held: Option<Held>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            *self.pinger.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
        }
    }
}

impl Pinger {
    pub(crate) fn new(ping_pong: Option<h2::PingPong>) -> Pinger {
        Pinger {
            held: Mutex::new(ping_pong.map(|ping_pong| Held { ping_pong, outstanding: false })),
            last_rtt_micros: AtomicU64::new(0),
        }
    }

    /// Sends a PING and waits for its PONG; returns the round trip. Safe to cancel: bound it
    /// with a timeout, and a PING left unanswered is collected by the next one.
    pub(crate) async fn ping(&self) -> Result<Duration, PingError> {
        let taken = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut lent = Lent { pinger: self, held: Some(taken.ok_or(PingError::Busy)?) };
        let Some(held) = lent.held.as_mut() else {
            return Err(PingError::Busy);
        };
        let started = Instant::now();
        let mut fresh = true;
        if held.outstanding {
            // A PING whose waiter went away: collect its PONG if it came (stale, so PING
            // again), or wait for it if it is still out (then its answer is news).
            let mut cx = Context::from_waker(Waker::noop());
            match held.ping_pong.poll_pong(&mut cx) {
                Poll::Ready(Ok(_)) => held.outstanding = false,
                Poll::Ready(Err(error)) => return Err(PingError::Connection(error)),
                Poll::Pending => fresh = false,
            }
        }
        if !held.outstanding {
            held.ping_pong.send_ping(h2::Ping::opaque()).map_err(PingError::Connection)?;
            held.outstanding = true;
        }
        poll_fn(|cx| held.ping_pong.poll_pong(cx)).await.map_err(PingError::Connection)?;
        held.outstanding = false;
        let rtt = started.elapsed();
        if fresh {
            self.last_rtt_micros.store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
        }
        Ok(rtt)
    }

    /// The last measured round trip, if any PING was answered yet.
    pub(crate) fn last_rtt(&self) -> Option<Duration> {
        match self.last_rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}
