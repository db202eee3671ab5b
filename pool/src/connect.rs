//! Opening members: `min_connections` kept, connect tasks paced per endpoint, gRPC's
//! reconnect backoff counted in rounds, one retrier per failing endpoint, and the handshake up
//! to the server's first SETTINGS.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::task::AbortOnDropHandle;

use crate::backoff;
use crate::budget::Ticket;
use crate::driver::drive;
use crate::error::Error;
use crate::inner::PoolInner;
use crate::internals::{EndpointEntry, EndpointInternals};
use crate::member::Member;
use crate::metrics as names;
use crate::proto::h2::client;

/// Counts a connect task out of its endpoint's `connecting` when the task ends, and gives up
/// the retrier's role if it had it.
pub(crate) struct ConnectingGuard {
    entry: Arc<EndpointEntry>,
    retrier: bool,
}

impl Drop for ConnectingGuard {
    fn drop(&mut self) {
        let mut locked = self.entry.lock();
        locked.connecting = locked.connecting.saturating_sub(1);
        if self.retrier {
            locked.retrier = false;
            // Nobody is left to make the attempt a call pulled forward.
            locked.pulled = false;
        }
    }
}

/// How long a connect task waiting out its backoff sleeps between looks at whether it is
/// still wanted, so that a retry nobody needs any more is dropped rather than made.
pub(crate) const BACKOFF_RECHECK: Duration = Duration::from_millis(250);

/// The stream id of a member's last stream before it retires: client stream ids are odd, so
/// stream number `n` has id `2n - 1`.
pub(crate) fn retire_at_stream_id(max_streams: Option<u64>) -> u32 {
    let max =
        max_streams.unwrap_or(crate::config::MAX_LIFETIME_STREAMS).min(crate::config::MAX_LIFETIME_STREAMS);
    (2 * max - 1) as u32
}

/// A member that closes sooner than this after connecting counts as a failed connect.
pub(crate) const SHORT_LIFE: Duration = Duration::from_secs(1);

impl PoolInner {
    /// Keeps `min_connections` per endpoint, counting connects under way.
    pub(crate) fn replenish(self: &Arc<Self>, entry: &Arc<EndpointEntry>) {
        if self.is_closed() || self.shutdown.is_cancelled() || entry.is_removed() {
            return;
        }
        let missing = {
            let locked = entry.lock();
            self.config.min_connections.saturating_sub(entry.members().len() + locked.connecting)
        };
        for _ in 0..missing {
            self.spawn_connect(entry.clone());
        }
    }

    /// Starts a task that opens one member of `entry`, retrying with backoff while the pool
    /// still wants it. An endpoint whose connects are failing gets no second task: the one
    /// under way retries for everybody, one attempt at a time. Returns whether it started one.
    pub(crate) fn spawn_connect(self: &Arc<Self>, entry: Arc<EndpointEntry>) -> bool {
        {
            let mut locked = entry.lock();
            if entry.members().len() + locked.connecting >= self.config.max_connections {
                return false;
            }
            if locked.consecutive_failures > 0 && locked.connecting > 0 {
                return false;
            }
            locked.connecting += 1;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            // Counted out however the task ends: done, cancelled by shutdown, or panicked.
            let mut guard = ConnectingGuard { entry: entry.clone(), retrier: false };
            let listed = pool
                .shutdown
                .run_until_cancelled(pool.connect_loop(&entry, &mut guard))
                .await
                .unwrap_or(false);
            let retried = guard.retrier;
            drop(guard);
            if listed && retried {
                // While the endpoint failed, this was its only connect: open the rest of
                // `min_connections` now. (Queued callers grow the pool themselves, as the new
                // member serves them.)
                pool.replenish(&entry);
            }
        });
        true
    }

    /// With `max_total_connections`: each time a connection gives its place in the budget
    /// back after a connect was refused one, tries the endpoints' `min_connections` again
    /// (from a random endpoint on, so none is always last) and grows the pool for queued
    /// calls. Ends when the pool closes.
    pub(crate) fn spawn_budget_keeper(self: &Arc<Self>) {
        if self.config.max_total_connections.is_none() {
            return;
        }
        let (pool, shutdown, budget) = (Arc::downgrade(self), self.shutdown.clone(), self.budget.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = budget.freed.notified() => {}
                }
                let Some(pool) = pool.upgrade() else { return };
                let endpoints = pool.endpoints();
                let offset = fastrand::usize(..endpoints.len().max(1));
                for i in 0..endpoints.len() {
                    if pool.budget.is_exhausted() {
                        break;
                    }
                    pool.replenish(&endpoints[(offset + i) % endpoints.len()]);
                }
                pool.grow();
            }
        });
    }

    /// A connect to `entry` not made: the budget had no room.
    pub(crate) fn count_budget_refusal(&self, entry: &EndpointEntry) {
        tracing::debug!(pool = %self.name(), endpoint = %entry.label(), "no connect: max_total_connections reached");
        metrics::counter!(names::BUDGET_REFUSALS, names::LABEL_POOL => self.config.name.clone()).increment(1);
    }

    /// Whether a connect task of `entry` is still wanted: the endpoint is below
    /// `min_connections` without it, callers are waiting, or a call found it down since its
    /// last attempt (and failed fast, or pulled the next attempt forward).
    pub(crate) fn connect_wanted(&self, entry: &EndpointEntry, locked: &EndpointInternals) -> bool {
        let others = (entry.members().len() + locked.connecting).saturating_sub(1);
        others < self.config.min_connections || self.waiters.has_waiters() || locked.demand || locked.pulled
    }

    /// A call found every endpoint down (gRPC's transient failure) and is about to fail fast.
    /// Each endpoint that failed to connect learns that a connect is wanted; one whose last
    /// attempt was refused (nothing listened: a server restarting) and started at least
    /// `backoff.refused_retry` ago gets its next attempt now instead of at the end of its
    /// backoff. Returns whether any did: then the call waits for that attempt instead of
    /// failing, and a server that is back serves it.
    ///
    /// This departs from gRPC's connection-backoff spec, whose only clock is the backoff: a
    /// refused connect costs the server nothing (the kernel answers it), so trying again at
    /// a call's request, at most once per `refused_retry` per endpoint, finds a restarted
    /// server within that interval without storming it, where the spec's backoff (1 s, then
    /// growing to 120 s) leaves calls failing for up to the backoff after the server is
    /// back. A timeout, a failed handshake or a connection closed at once still waits out
    /// the backoff: those cost the server work.
    pub(crate) fn pull_attempts(self: &Arc<Self>) -> bool {
        let retry = self.config.backoff.refused_retry;
        let now = Instant::now();
        let mut pulled_any = false;
        let endpoints = self.endpoints.load();
        for entry in endpoints.iter() {
            if !entry.is_routable() {
                continue;
            }
            let (pulled, spawn) = {
                let mut locked = entry.lock();
                if locked.consecutive_failures == 0 || locked.pulled {
                    continue;
                }
                locked.demand = true;
                let due = locked.refused_retry_at(retry).is_none_or(|at| now >= at);
                let pulled = locked.refused && !retry.is_zero() && due;
                locked.pulled = pulled;
                (pulled, locked.connecting == 0)
            };
            if spawn {
                // No task retries this endpoint (`min_connections` 0, and the last one gave
                // up when no call was left waiting): start one.
                if !self.spawn_connect(entry.clone()) && pulled {
                    entry.lock().pulled = false;
                    continue;
                }
            } else if pulled {
                entry.wake_retrier.notify_one();
            }
            pulled_any |= pulled;
        }
        pulled_any
    }

    /// Opens one member of `entry`, waiting out the endpoint's backoff before each attempt;
    /// returns whether it listed one. While the endpoint is failing, only the task holding
    /// the retrier's role goes on; the others end.
    pub(crate) async fn connect_loop(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        guard: &mut ConnectingGuard,
    ) -> bool {
        loop {
            if entry.is_removed() {
                return false;
            }
            let (round, wait) = {
                let mut locked = entry.lock();
                if locked.consecutive_failures > 0 && !guard.retrier {
                    if locked.retrier {
                        return false;
                    }
                    locked.retrier = true;
                    guard.retrier = true;
                }
                let now = Instant::now();
                let wait = match locked.pulled {
                    true => Duration::ZERO,
                    false => {
                        let backoff = locked.next_attempt.map(|at| at.saturating_duration_since(now));
                        // After a refused attempt, the backoff's own attempt keeps
                        // `refused_retry` from the last one too (pulled attempts may have
                        // come just before it): at most one attempt per `refused_retry`.
                        let spaced = match locked.refused_retry_at(self.config.backoff.refused_retry) {
                            Some(at) if backoff.is_some() => at.saturating_duration_since(now),
                            _ => Duration::ZERO,
                        };
                        backoff.unwrap_or_default().max(spaced)
                    }
                };
                (locked.failure_round, wait)
            };
            if !wait.is_zero() && !self.wait_backoff(entry, wait).await {
                return false;
            }
            // Paced per endpoint. A failure counted while this task waited for its turn
            // makes it start over (the backoff, and the retrier's role, which another task
            // may hold): connects queued behind one that failed must not follow it at once,
            // and to a failing endpoint only the retrier connects.
            let permit = entry.connect_permits.acquire().await.ok();
            // The whole pool's budget (`max_total_connections`): with no room, no attempt;
            // the budget task starts the endpoints' connects again when a connection ends.
            let Some(ticket) = self.budget.take() else {
                self.count_budget_refusal(entry);
                return false;
            };
            {
                let mut locked = entry.lock();
                if locked.failure_round != round || (locked.consecutive_failures > 0 && !guard.retrier) {
                    continue;
                }
                locked.last_attempt = Some(Instant::now());
                locked.demand = false;
            }
            let listed = match self.open_member_holding(entry, round, permit, ticket).await {
                Ok(member) => {
                    let listed = self.add_member(entry, member.clone(), round);
                    if !listed {
                        // It ended before it could serve: as good as a failed connect.
                        self.note_failure(entry, round, "the connection ended as soon as it opened", false);
                    }
                    listed
                }
                Err(_) => false,
            };
            if listed || self.is_closed() {
                return listed;
            }
            if !self.connect_wanted(entry, &entry.lock()) {
                return false;
            }
        }
    }

    /// Sleeps out a backoff `wait` (plus a little spread), looking every
    /// [`BACKOFF_RECHECK`] whether the attempt is still wanted; false if it is not. Ends
    /// early when a call pulls the attempt forward (`pull_attempts`), or, while calls are
    /// queued and the last attempt was refused, `backoff.refused_retry` after it: the queued
    /// calls are the demand that pulls it.
    pub(crate) async fn wait_backoff(&self, entry: &EndpointEntry, wait: Duration) -> bool {
        // A little spread of its own, so that pools started together do not reconnect in
        // lockstep.
        let spread = wait.mul_f64(0.1 * fastrand::f64());
        let until = Instant::now() + wait + spread;
        let retry = self.config.backoff.refused_retry;
        loop {
            let now = Instant::now();
            let wake_at = {
                let locked = entry.lock();
                if locked.pulled {
                    return true;
                }
                match locked.refused_retry_at(retry) {
                    Some(at) if self.waiters.has_waiters() => at.min(until),
                    _ => until,
                }
            };
            if now >= wake_at {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at.min(now + BACKOFF_RECHECK)) => {}
                _ = entry.wake_retrier.notified() => {}
            }
            if entry.is_removed() || !self.connect_wanted(entry, &entry.lock()) {
                return false;
            }
        }
    }

    /// Opens one connection and waits for the server's SETTINGS; records the outcome in the
    /// endpoint's backoff state, metrics and logs.
    /// `round` is the endpoint's `failure_round` when the attempt was decided: a failure is
    /// counted in the backoff only if no other attempt's failure was counted since.
    pub(crate) async fn open_member(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        round: u64,
        ticket: Ticket,
    ) -> Result<Arc<Member>, Error> {
        // Paced per endpoint; the wait for a turn is not part of the connect's time.
        let permit = entry.connect_permits.acquire().await.ok();
        self.open_member_holding(entry, round, permit, ticket).await
    }

    /// `open_member` with the endpoint's connect permit taken already (held until the
    /// connect ends).
    async fn open_member_holding(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        round: u64,
        _permit: Option<tokio::sync::SemaphorePermit<'_>>,
        ticket: Ticket,
    ) -> Result<Arc<Member>, Error> {
        let started = Instant::now();
        let span = tracing::debug_span!("connect", pool = %self.name(), endpoint = %entry.label());
        let result = match tokio::time::timeout(
            self.config.connect_timeout,
            tracing::Instrument::instrument(self.connect_member(entry, ticket), span),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Error::connect(
                entry.label(),
                &format!("no HTTP/2 SETTINGS within connect_timeout ({:?})", self.config.connect_timeout),
                None,
            )),
        };
        self.record_connect(entry, round, &result, started.elapsed());
        result
    }

    /// The connect itself: the transport and the HTTP/2 handshake, the member and its
    /// connection's driver task, then the server's SETTINGS.
    async fn connect_member(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        ticket: Ticket,
    ) -> Result<Arc<Member>, Error> {
        // A connector of the user's makes the whole stream, TLS included, unless TLS settings
        // are given too: then the pool runs them over its stream, as tonic runs `tls_config`
        // over `connect_with_connector`'s.
        let pool_runs_tls = self.config.connector.is_none() || self.config.tls.is_some();
        let tls = match entry.endpoint().is_tls() && pool_runs_tls {
            true => Some(self.tls_client()?),
            false => None,
        };
        let hs = client::handshake(
            &entry.shared.endpoint,
            &self.config.h2,
            &client::SocketOptions::from_config(&self.config),
            tls.as_deref(),
            self.config.connector.as_ref(),
        )
        .await?;
        let id = self.next_member_id.fetch_add(1, Ordering::Relaxed);
        let member = Arc::new(Member::new(
            id,
            entry.shared.clone(),
            hs.send,
            hs.signals.clone(),
            hs.pinger,
            self.waiters.clone(),
            self.config.max_concurrent_streams,
            retire_at_stream_id(self.config.max_streams_per_connection),
        ));
        // Tracked in `live` for as long as it runs; aborted if the handshake fails or times
        // out before the member is handed over.
        let driver = AbortOnDropHandle::new(self.live.spawn(drive(
            hs.connection,
            hs.signals.clone(),
            Arc::downgrade(&member),
            Arc::downgrade(self),
            entry.shared.clone(),
            ticket,
        )));
        member.set_driver(driver.abort_handle());
        if !hs.signals.settings_or_closed().await {
            let what = match hs.signals.close_error() {
                Some(error) => format!("the connection failed before the server's HTTP/2 SETTINGS: {error}"),
                None => {
                    "the server closed the connection before sending HTTP/2 SETTINGS (is it an HTTP/2 server?)"
                        .to_owned()
                }
            };
            return Err(Error::connect(entry.label(), &what, None));
        }
        // The member owns the connection now (it aborts the task itself when killed).
        drop(driver.detach());
        Ok(member)
    }

    /// A connect's outcome in statistics, metrics and logs, and a failure in the backoff.
    fn record_connect(
        &self,
        entry: &Arc<EndpointEntry>,
        round: u64,
        result: &Result<Arc<Member>, Error>,
        elapsed: std::time::Duration,
    ) {
        let pool_label = self.config.name.clone();
        let endpoint_label = entry.label().to_owned();
        match result {
            Ok(member) => {
                // The backoff is reset, and the connection counted in the statistics, only
                // once the member is listed (`add_member`): a server that sends GOAWAY with
                // its SETTINGS must not reset it every time.
                metrics::counter!(names::CONNECTS, names::LABEL_POOL => pool_label.clone(), names::LABEL_ENDPOINT => endpoint_label.clone(), names::LABEL_RESULT => "ok").increment(1);
                metrics::histogram!(names::CONNECT_DURATION, names::LABEL_POOL => pool_label, names::LABEL_ENDPOINT => endpoint_label).record(elapsed.as_secs_f64());
                tracing::debug!(pool = %self.name(), endpoint = %entry.label(), member = member.id, elapsed = ?elapsed, "connection established");
            }
            Err(error) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CONNECTS, names::LABEL_POOL => pool_label, names::LABEL_ENDPOINT => endpoint_label, names::LABEL_RESULT => "error").increment(1);
                let (failures, delay) =
                    self.note_failure(entry, round, &error.to_string(), error.is_connection_refused());
                tracing::warn!(pool = %self.name(), endpoint = %entry.label(), failures, retry_in = ?delay, error = %error, "connect failed");
            }
        }
    }

    /// A member that dies young without having carried a call (a server that accepts and
    /// then closes or sends an error GOAWAY at once) counts as a failed connect, so its
    /// replacements back off instead of looping. One that carried calls had a working
    /// server: a short `max_connection_age` is not a failure, and backing off from it would
    /// leave callers with no connection at all when members age out together. Nor is one
    /// the server closed with a GOAWAY after it was in service, however young: the server
    /// worked and said goodbye (an idle or age limit; the gRPC C core's idle limit says so
    /// with `INTERNAL_ERROR` "connection idle", so the code is no guide), and the next call
    /// must not wait out a backoff for it. (A GOAWAY that comes with the server's SETTINGS,
    /// before the member was listed, is a failed connect all the same: `connect_loop`.)
    pub(crate) fn note_short_life(&self, entry: &EndpointEntry, member: &Member) {
        if member.age() < SHORT_LIFE && member.streams_opened() == 0 && !member.signals.goaway_seen() {
            let round = entry.lock().failure_round;
            let what = format!("connection closed {:?} after it opened", member.age());
            self.note_failure(entry, round, &what, false);
        }
    }

    /// Records a failed attempt decided at `round` in the endpoint's reconnect backoff, which
    /// grows by one round only if no other attempt's failure was counted since (attempts under
    /// way together fail as one), and releases the queued calls that now have nothing to wait
    /// for. Returns the failures in a row and the delay before the next attempt.
    ///
    /// `refused` says the attempt was refused at the TCP level; one that a call pulled
    /// forward and was refused is not a round of the backoff (the server is simply not back
    /// yet, and the backoff must not grow at the pace of the calls).
    pub(crate) fn note_failure(
        &self,
        entry: &EndpointEntry,
        round: u64,
        what: &str,
        refused: bool,
    ) -> (u32, Duration) {
        let counted = {
            let mut locked = entry.lock();
            locked.last_error = Some(what.to_owned());
            let pulled = std::mem::take(&mut locked.pulled);
            locked.refused = refused;
            if locked.failure_round == round && !(pulled && refused && locked.consecutive_failures > 0) {
                locked.failure_round += 1;
                locked.consecutive_failures = locked.consecutive_failures.saturating_add(1);
                let delay = backoff::delay(&self.config.backoff, locked.consecutive_failures);
                locked.next_attempt = Some(Instant::now() + delay);
            }
            let delay = locked.next_attempt.map(|at| at.saturating_duration_since(Instant::now()));
            (locked.consecutive_failures, delay.unwrap_or_default())
        };
        self.release_hopeless_waiters();
        counted
    }

    /// The TLS client, loading the default one (system roots) on first use.
    pub(crate) fn tls_client(&self) -> Result<Arc<crate::proto::tls::Tls>, Error> {
        if let Some(tls) = self.tls.get() {
            return Ok(tls.clone());
        }
        let tls = Arc::new(crate::proto::tls::Tls::new(&Default::default(), self.name())?);
        Ok(self.tls.get_or_init(|| tls).clone())
    }
}
