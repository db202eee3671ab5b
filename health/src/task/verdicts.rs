//! The health task's `grpc.health.v1` side: when each endpoint is checked next, starting
//! `Check` calls and `Watch` streams, and what a verdict changes.

use super::*;

impl Task {
    /// Puts the endpoint's next check in the queue `after` from now, or moves it there.
    pub(super) fn schedule_check(&mut self, id: u64, after: Duration) {
        if self.config.checks.is_none() {
            return;
        }
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        match &health.key {
            Some(key) => self.checks_due.reset(key, after),
            None => health.key = Some(self.checks_due.insert(id, after)),
        }
    }

    /// After a check: the next one in `interval`, or the shorter `unhealthy_interval` while
    /// the endpoint is unhealthy (+/-10%); at once if a new connection came meanwhile and
    /// this check failed.
    pub(super) fn schedule_next_check(&mut self, id: u64) {
        let (Some(checks), Some(health)) = (&self.config.checks, self.endpoints.get_mut(&id)) else {
            return;
        };
        let recheck = std::mem::take(&mut health.recheck) && !health.healthy && health.successes == 0;
        let after = if recheck {
            Duration::ZERO
        } else if health.healthy {
            jittered(checks.interval)
        } else {
            jittered(checks.unhealthy_interval.min(checks.interval))
        };
        self.schedule_check(id, after);
    }

    /// A `Watch` stream ended: reopen it on another connection at once if it only moved;
    /// after the (unhealthy) interval if it failed; fall back to `Check` polling, at once, if
    /// the server has no `Watch`.
    pub(super) fn on_watch_end(&mut self, id: u64, watched: Watched) {
        let pool = self.monitor.name().to_owned();
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        match watched {
            Watched::Moving => self.schedule_check(id, Duration::ZERO),
            Watched::Ended => self.schedule_next_check(id),
            Watched::Unimplemented => {
                if !health.poll_only {
                    health.poll_only = true;
                    let interval = self.config.checks.as_ref().map(|c| c.interval).unwrap_or_default();
                    tracing::info!(pool = %pool, endpoint = %health.endpoint, "the server does not implement grpc.health.v1 Watch (UNIMPLEMENTED); polling it with Check every {interval:?} instead");
                }
                self.schedule_check(id, Duration::ZERO);
            }
        }
    }

    /// A connection to `endpoint` is ready: if the endpoint is unhealthy and no check has
    /// passed since its last failure, check it now rather than at its next check, so that a
    /// server back from an outage gets traffic as soon as it says it is serving. (A check
    /// under way is followed by another at once if it fails.) Once one has passed, the next
    /// waits `unhealthy_interval` as usual: connections opening together (a pool's connects
    /// all succeeding when the server is back) must not make `healthy_threshold` checks in a
    /// row within milliseconds.
    pub(super) fn recheck_if_unhealthy(&mut self, endpoint: &Endpoint) {
        let Some(id) = self.endpoint_ids.get(endpoint).copied() else { return };
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        if health.healthy || health.successes > 0 || self.config.checks.is_none() {
            return;
        }
        if health.key.is_some() {
            self.schedule_check(id, Duration::ZERO);
        } else {
            health.recheck = true;
        }
    }

    /// An endpoint check fell due: a `Check` call (poll mode, or a server without `Watch`),
    /// or (re)opening its `Watch`.
    pub(super) fn start_check(&mut self, id: u64) {
        let (Some(checks), Some((channel, endpoint, removed, poll_only))) = (
            self.config.checks.clone(),
            self.endpoints.get_mut(&id).and_then(|e| {
                // This check sees every connection ready now.
                e.recheck = false;
                e.channel.clone().map(|c| (c, e.endpoint.clone(), e.removed.clone(), e.poll_only))
            }),
        ) else {
            return;
        };
        let mode = if poll_only { CheckMode::Poll } else { checks.mode };
        match mode {
            CheckMode::Poll => {
                let span = tracing::debug_span!("health_check", pool = %self.monitor.name(), endpoint = %endpoint, mode = "check");
                self.checks.push(Box::pin(tracing::Instrument::instrument(
                    async move {
                        let (verdict, latency) = checks::check(channel, checks.service, checks.timeout).await;
                        (id, verdict, latency)
                    },
                    span,
                )));
            }
            CheckMode::Watch => {
                // A `Watch` stream never ends by itself, so the connection it rides must be
                // one that takes new streams: on a draining one (GOAWAY, max_lifetime, endpoint
                // removed) it would hold the connection open, and a server shutting down
                // gracefully would wait for it forever. So it rides a ready member, and moves
                // when that member stops being ready. With none ready yet, it goes through the
                // endpoint's channel (which connects) and moves once one is.
                let member = self.ready_member(&endpoint);
                let monitor = self.monitor.clone();
                let reports = self.reports_tx.clone();
                let report = move |verdict| {
                    let _ = reports.send((id, verdict));
                };
                let span = tracing::debug_span!("health_check", pool = %self.monitor.name(), endpoint = %endpoint, mode = "watch");
                let watcher = async move {
                    let watched = match member.as_ref().and_then(|m| m.channel().map(|c| (m, c))) {
                        Some((member, channel)) => {
                            let watch = checks::watch(channel, checks.service, report);
                            watch_until(watch, &removed, || member.state() != MemberState::Ready).await
                        }
                        None => {
                            let watch = checks::watch(channel, checks.service, report);
                            let any_ready = || {
                                monitor
                                    .members()
                                    .iter()
                                    .any(|m| m.endpoint() == &endpoint && m.state() == MemberState::Ready)
                            };
                            watch_until(watch, &removed, any_ready).await
                        }
                    };
                    (id, watched)
                };
                self.watchers.push(Box::pin(tracing::Instrument::instrument(watcher, span)));
            }
        }
    }

    /// The endpoint's ready member with the fewest streams in flight, for a `Watch` stream.
    pub(super) fn ready_member(&self, endpoint: &Endpoint) -> Option<MemberHandle> {
        self.by_endpoint
            .get(endpoint)?
            .iter()
            .filter_map(|id| self.members.get(id))
            .map(|tracked| (tracked.member.status(), &tracked.member))
            .filter(|(status, _)| status.state == MemberState::Ready)
            .min_by_key(|(status, _)| status.in_flight)
            .map(|(_, member)| member.clone())
    }

    /// Applies one check's verdict with the thresholds; a `Watch` status message changes the
    /// verdict at once.
    pub(super) fn on_verdict(
        &mut self,
        id: u64,
        verdict: Verdict,
        latency: Option<Duration>,
        from_watch: bool,
    ) {
        let Some(checks) = self.config.checks.clone() else { return };
        let pool = self.monitor.name().to_owned();
        let Some(health) = self.endpoints.get_mut(&id) else { return };
        let endpoint_label = health.endpoint.to_string();
        metrics::counter!(names::HEALTH_CHECKS, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint_label.clone(), names::LABEL_RESULT => verdict.result()).increment(1);
        if let Some(latency) = latency {
            metrics::histogram!(names::HEALTH_CHECK_DURATION, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint_label.clone()).record(latency.as_secs_f64());
        }
        let passed = match &verdict {
            Verdict::Serving => true,
            Verdict::Unimplemented => {
                if !health.unimplemented_logged {
                    health.unimplemented_logged = true;
                    tracing::info!(pool = %pool, endpoint = %endpoint_label, healthy = checks.unimplemented_is_healthy, "the server has no grpc.health.v1 service (UNIMPLEMENTED); treating it as {}", if checks.unimplemented_is_healthy { "healthy" } else { "unhealthy" });
                }
                checks.unimplemented_is_healthy
            }
            Verdict::Failed { .. } => false,
        };
        let immediate =
            from_watch && !matches!(&verdict, Verdict::Failed { result: "error" | "timeout", .. });
        if passed {
            health.successes += 1;
            health.failures = 0;
        } else {
            health.failures += 1;
            health.successes = 0;
        }
        tracing::debug!(pool = %pool, endpoint = %endpoint_label, result = verdict.result(), latency = ?latency, "health check");
        let turn_healthy =
            !health.healthy && passed && (immediate || health.successes >= checks.healthy_threshold);
        let turn_unhealthy =
            health.healthy && !passed && (immediate || health.failures >= checks.unhealthy_threshold);
        if turn_healthy || turn_unhealthy {
            health.healthy = turn_healthy;
            let reason = match &verdict {
                Verdict::Failed { detail, .. } => Some(format!("health check: {detail}")),
                Verdict::Unimplemented => Some("health check: no health service (UNIMPLEMENTED)".to_owned()),
                Verdict::Serving => None,
            };
            let endpoint = health.endpoint.clone();
            self.monitor.set_endpoint_health(&endpoint, turn_healthy, reason.as_deref());
        }
    }

    pub(super) fn reschedule(&mut self, id: u64, after: Duration) {
        if let Some(tracked) = self.members.get_mut(&id) {
            // The queue rounds it up to the grid.
            let at = Instant::now() + after.max(MIN_RECHECK);
            match &tracked.key {
                Some(key) => self.members_due.reset_at(key, at),
                None => tracked.key = Some(self.members_due.insert_at(id, at)),
            }
        }
    }
}

/// Runs a `Watch` stream until it ends (as it says), its endpoint is removed (`Ended`), or
/// `should_move` holds (`Moving`: reopen it elsewhere at once), looking every
/// [`WATCH_RECHECK`].
pub(super) async fn watch_until(
    watch: impl Future<Output = WatchEnd>,
    removed: &AtomicBool,
    mut should_move: impl FnMut() -> bool,
) -> Watched {
    let left = async {
        let mut ticks = tokio::time::interval(WATCH_RECHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if removed.load(Ordering::Relaxed) {
                return false;
            }
            if should_move() {
                return true;
            }
        }
    };
    tokio::select! {
        biased;
        end = watch => match end {
            WatchEnd::Ended => Watched::Ended,
            WatchEnd::Unimplemented => Watched::Unimplemented,
        },
        moving = left => if moving { Watched::Moving } else { Watched::Ended },
    }
}
