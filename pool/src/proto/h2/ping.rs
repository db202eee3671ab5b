//! HTTP/2 PINGs on demand, with the round trip measured.
//!
//! `h2` allows one user PING in flight per connection. [`Pinger`] keeps the connection's
//! `PingPong` and lends it to one pinger at a time; a second caller while a PING is out is told
//! so rather than queued, since the answer to the first PING answers it too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a PING did not come back.
#[derive(Debug)]
pub(crate) enum PingError {
    /// Another PING is in flight on this connection.
    Busy,
    /// The connection failed or closed while waiting.
    Connection(h2::Error),
}

#[derive(Debug)]
pub(crate) struct Pinger {
    ping_pong: Mutex<Option<h2::PingPong>>,
    /// Round trip of the last answered PING, in microseconds; 0 before the first.
    last_rtt_micros: AtomicU64,
}

/// Puts the `PingPong` back when the PING ends or its future is dropped (a timeout).
struct Lent<'a> {
    pinger: &'a Pinger,
    ping_pong: Option<h2::PingPong>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(ping_pong) = self.ping_pong.take() {
            *self.pinger.ping_pong.lock().unwrap_or_else(|e| e.into_inner()) = Some(ping_pong);
        }
    }
}

impl Pinger {
    pub(crate) fn new(ping_pong: Option<h2::PingPong>) -> Pinger {
        Pinger { ping_pong: Mutex::new(ping_pong), last_rtt_micros: AtomicU64::new(0) }
    }

    /// Sends a PING and waits for its PONG; returns the round trip. The caller bounds the
    /// wait: a PING left unanswered keeps the connection's one PING slot until then.
    pub(crate) async fn ping(&self) -> Result<Duration, PingError> {
        let taken = self.ping_pong.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut lent = Lent { pinger: self, ping_pong: Some(taken.ok_or(PingError::Busy)?) };
        let started = Instant::now();
        let Some(ping_pong) = lent.ping_pong.as_mut() else {
            return Err(PingError::Busy);
        };
        ping_pong.ping(h2::Ping::opaque()).await.map_err(PingError::Connection)?;
        let rtt = started.elapsed();
        self.last_rtt_micros.store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
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
