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
//!
//! Two ways to PING: [`Pinger::ping`] waits for the PONG (a caller's check before use, which
//! must know now), and [`Pinger::send`] does not (the health task's keepalive, which only
//! needs to know by the PING's deadline). The PONG of either is counted, and its round trip
//! measured, by the connection's frame observer as it is read ([`ConnSignals`]), so nobody
//! is woken for an answer that nobody waits for.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::frames::ConnSignals;

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
    /// Counts the PONGs and times them.
    signals: Arc<ConnSignals>,
}

/// A PING sent by [`Pinger::send`]: answered once the connection's PONG count passes
/// `pongs_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SentPing {
    pongs_before: u64,
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
    pub(crate) fn new(ping_pong: Option<h2::PingPong>, signals: Arc<ConnSignals>) -> Pinger {
        Pinger {
            held: Mutex::new(ping_pong.map(|ping_pong| Held { ping_pong, outstanding: false })),
            signals,
        }
    }

    /// Sends a PING and returns at once; [`Pinger::answered`] tells later whether its PONG
    /// came. `Busy` when another PING is out (a waiter's, or one whose waiter went away and
    /// whose PONG has not come): its answer would be ambiguous here, since its PONG may
    /// have been counted already while `h2` has not taken it yet. Ask again a little later.
    pub(crate) fn send(&self) -> Result<SentPing, PingError> {
        let mut guard = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let held = guard.as_mut().ok_or(PingError::Busy)?;
        if held.outstanding {
            let mut cx = Context::from_waker(Waker::noop());
            match held.ping_pong.poll_pong(&mut cx) {
                Poll::Ready(Ok(_)) => held.outstanding = false, // answered; nothing waits for it
                Poll::Ready(Err(error)) => return Err(PingError::Connection(error)),
                Poll::Pending => return Err(PingError::Busy),
            }
        }
        // No PING of ours is out, so the next PONG read answers this one: count from here.
        let pongs_before = self.signals.pongs();
        self.signals.ping_sent_now();
        held.ping_pong.send_ping(h2::Ping::opaque()).map_err(PingError::Connection)?;
        held.outstanding = true;
        Ok(SentPing { pongs_before })
    }

    /// Whether a PING is out: lent to a waiter, or sent and its PONG not yet collected (as
    /// [`Pinger::send`] last found it).
    pub(crate) fn in_flight(&self) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_none_or(|held| held.outstanding)
    }

    /// Whether the PONG of a PING sent with [`Pinger::send`] has come.
    pub(crate) fn answered(&self, sent: SentPing) -> bool {
        self.signals.pongs() > sent.pongs_before
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
        if held.outstanding {
            // A PING whose waiter went away: collect its PONG if it came (stale, so PING
            // again), or wait for it if it is still out (then its answer is news).
            let mut cx = Context::from_waker(Waker::noop());
            match held.ping_pong.poll_pong(&mut cx) {
                Poll::Ready(Ok(_)) => held.outstanding = false,
                Poll::Ready(Err(error)) => return Err(PingError::Connection(error)),
                Poll::Pending => {}
            }
        }
        if !held.outstanding {
            self.signals.ping_sent_now();
            held.ping_pong.send_ping(h2::Ping::opaque()).map_err(PingError::Connection)?;
            held.outstanding = true;
        }
        poll_fn(|cx| held.ping_pong.poll_pong(cx)).await.map_err(PingError::Connection)?;
        held.outstanding = false;
        Ok(started.elapsed())
    }

    /// The last measured round trip, if any PING was answered yet.
    pub(crate) fn last_rtt(&self) -> Option<Duration> {
        self.signals.last_rtt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::h2::frames::ObservedIo;

    /// A client connection to an in-memory `h2` server that answers PINGs, its `Pinger`, and
    /// the server's side to keep open.
    async fn answered_pinger() -> (Pinger, impl Sized) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server).await.expect("server handshake");
            // Polling the connection answers PINGs; no stream is ever opened.
            while connection.accept().await.is_some() {}
        });
        let signals = Arc::new(ConnSignals::new());
        let io = ObservedIo::new(client, signals.clone());
        let (send, mut connection) = h2::client::handshake(io).await.expect("client handshake");
        let pinger = Pinger::new(connection.ping_pong(), signals);
        let client = tokio::spawn(async move {
            let _ = connection.await;
        });
        (pinger, (send, server, client))
    }

    /// Waits until the PONG of `sent` has been read, for at most 5 s.
    async fn until_answered(pinger: &Pinger, sent: SentPing) {
        let started = std::time::Instant::now();
        while !pinger.answered(sent) {
            assert!(started.elapsed() < Duration::from_secs(5), "no PONG within 5s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_sent_ping_is_answered_and_timed_with_nobody_waiting() {
        let (pinger, _keep) = answered_pinger().await;
        assert_eq!(pinger.last_rtt(), None);
        let first = pinger.send().expect("first PING");
        until_answered(&pinger, first).await;
        assert!(pinger.last_rtt().is_some(), "the PONG's round trip is recorded as it is read");
        // Its PONG was never collected with `poll_pong`: the next send collects it and sends.
        let second = pinger.send().expect("second PING, after an answer nobody collected");
        assert_ne!(first, second, "the second waits for a second PONG");
        until_answered(&pinger, second).await;
        assert_eq!(pinger.signals.pongs(), 2);
    }

    #[tokio::test]
    async fn a_waiter_after_a_sent_ping_shares_its_pong() {
        let (pinger, _keep) = answered_pinger().await;
        let sent = pinger.send().expect("PING");
        // The waiter finds the sent PING out and waits for its PONG instead of sending one.
        pinger.ping().await.expect("the waiter's answer");
        assert!(pinger.answered(sent), "the PONG the waiter collected answers the sent PING too");
        assert_eq!(pinger.signals.pongs(), 1, "one PING, one PONG");
    }

    #[tokio::test]
    async fn no_ping_is_sent_while_another_is_out() {
        let (pinger, _keep) = answered_pinger().await;
        // A waiter holds the connection's `PingPong` while its PING is out.
        let waiting = pinger.ping();
        tokio::pin!(waiting);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(std::future::Future::poll(waiting.as_mut(), &mut cx).is_pending());
        assert!(matches!(pinger.send(), Err(PingError::Busy)), "the waiter's PING is out");
        waiting.await.expect("the waiter's answer");
        let sent = pinger.send().expect("a PING once the waiter is done");
        until_answered(&pinger, sent).await;
    }
}
