//! The health task's keepalive side: PINGs (or health-check RPCs, for servers that limit
//! PINGs) of quiet members, their answers and timeouts, and backing off after
//! `too_many_pings`.

use super::*;

/// One endpoint's PING counters and round-trip histogram.
pub(super) struct PingMetrics {
    ok: metrics::Counter,
    error: metrics::Counter,
    timeout: metrics::Counter,
    rtt: metrics::Histogram,
}

impl PingMetrics {
    pub(super) fn new(pool: &str, endpoint: &Endpoint) -> PingMetrics {
        let counter = |result: &'static str| metrics::counter!(names::PINGS, names::LABEL_POOL => pool.to_owned(), names::LABEL_ENDPOINT => endpoint.to_string(), names::LABEL_RESULT => result);
        PingMetrics {
            ok: counter("ok"),
            error: counter("error"),
            timeout: counter("timeout"),
            rtt: metrics::histogram!(names::PING_RTT, names::LABEL_POOL => pool.to_owned(), names::LABEL_ENDPOINT => endpoint.to_string()),
        }
    }
}

impl Task {
    /// The server thinks it is PINGed too often: double this endpoint's keepalive time, as
    /// grpc-go does, and say which server setting to align.
    pub(super) fn back_off_keepalive(&mut self, endpoint: &Endpoint) {
        let Some(current) = self.keepalive_time(endpoint) else { return };
        self.ping_limited.insert(endpoint.clone());
        let raised = (current * 2).min(MAX_KEEPALIVE_TIME);
        self.keepalive_time.insert(endpoint.clone(), raised);
        // A GOAWAY read after the endpoint left the pool: nothing is kept for it.
        self.forget_endpoint_if_gone(endpoint);
        metrics::counter!(names::KEEPALIVE_BACKOFFS, names::LABEL_POOL => self.monitor.name().to_owned(), names::LABEL_ENDPOINT => endpoint.to_string()).increment(1);
        tracing::warn!(
            pool = %self.monitor.name(),
            endpoint = %endpoint,
            keepalive_time = ?raised,
            "server sent GOAWAY ENHANCE_YOUR_CALM \"too_many_pings\": keepalive time doubled. Align the \
             server's ping policy with the pool's keepalive (gRPC C core: \
             grpc.http2.min_ping_interval_without_data_ms and grpc.keepalive_permit_without_calls; \
             grpc-go: keepalive.EnforcementPolicy MinTime and PermitWithoutStream), or raise keepalive.time. \
             Idle connections to it are now probed with health-check calls instead of PINGs"
        );
    }

    /// Probes a quiet member: an HTTP/2 PING, or for `rpc` a health-check call on that
    /// connection (for servers that limit PINGs on idle connections). Its deadline is
    /// `timeout` from now. Returns whether a probe went out: a PING cannot while another is
    /// in flight on the member (a caller's check before use), or once its connection failed.
    pub(super) fn start_probe(
        &mut self,
        id: u64,
        member: &MemberHandle,
        rpc: bool,
        timeout: Duration,
    ) -> bool {
        let channel = if rpc { member.channel() } else { None };
        let Some(channel) = channel else {
            let sent = match member.send_ping() {
                Ok(sent) => sent,
                Err(_) if member.ping_out_for().is_some_and(|out| out >= timeout) => {
                    // Another's PING (a caller's, given up on) has been out unanswered this
                    // long: as good as ours timing out, whatever else the server sent (the way
                    // to the server may be dead while the way back is not). Waiting instead,
                    // the member would never be PINGed again while that PING is out.
                    self.on_probe_timeout(id, member);
                    return true;
                }
                Err(error) => {
                    self.metrics_of(id, member).error.increment(1);
                    tracing::debug!(member = id, error = %error, "keepalive PING not sent");
                    return false;
                }
            };
            self.probes_started += 1;
            if let Some(tracked) = self.members.get_mut(&id) {
                tracked.probe = Some(self.probes_started);
                tracked.ping = Some((sent, Instant::now() + timeout));
            }
            return true;
        };
        // A health-check call makes the server send HEADERS: it does not count as a PING.
        self.probes_started += 1;
        let probe = self.probes_started;
        if let Some(tracked) = self.members.get_mut(&id) {
            tracked.probe = Some(probe);
        }
        let service = self.config.checks.as_ref().map(|c| c.service.clone()).unwrap_or_default();
        self.probes.push(Box::pin(async move { (id, probe, checks::probe(channel, service).await) }));
        true
    }

    /// The endpoint's PING metrics, made on first use.
    pub(super) fn ping_metrics(&mut self, endpoint: &Endpoint) -> Arc<PingMetrics> {
        if let Some(metrics) = self.ping_metrics.get(endpoint) {
            return metrics.clone();
        }
        let metrics = Arc::new(PingMetrics::new(self.monitor.name(), endpoint));
        self.ping_metrics.insert(endpoint.clone(), metrics.clone());
        metrics
    }

    /// A member's PING metrics: those it was tracked with. For a member no longer tracked,
    /// its endpoint's, without keeping them: its endpoint may be gone.
    fn metrics_of(&mut self, id: u64, member: &MemberHandle) -> Arc<PingMetrics> {
        match self.members.get(&id) {
            Some(tracked) => tracked.ping_metrics.clone(),
            None => match self.ping_metrics.get(member.endpoint()) {
                Some(metrics) => metrics.clone(),
                None => Arc::new(PingMetrics::new(self.monitor.name(), member.endpoint())),
            },
        }
    }

    /// The PONG of the member's keepalive PING came (seen when its entry fell due).
    pub(super) fn on_pong(&mut self, id: u64, member: &MemberHandle) {
        if let Some(tracked) = self.members.get_mut(&id) {
            (tracked.probe, tracked.ping, tracked.first_ping_after) = (None, None, None);
        }
        let rtt = member.last_ping_rtt();
        let metrics = self.metrics_of(id, member);
        metrics.ok.increment(1);
        if let Some(rtt) = rtt {
            metrics.rtt.record(rtt.as_secs_f64());
        }
        tracing::trace!(member = id, rtt = ?rtt, "keepalive PONG");
    }

    /// A health-check RPC probe ended.
    pub(super) fn on_rpc_probe(&mut self, id: u64, probe: u64, result: Result<Duration, String>) {
        let Some(tracked) = self.members.get_mut(&id) else { return };
        if tracked.probe != Some(probe) {
            return; // answered after its deadline; the member was dealt with then
        }
        tracked.probe = None;
        tracked.first_ping_after = None;
        let member = tracked.member.clone();
        match result {
            Ok(rtt) => {
                let metrics = self.metrics_of(id, &member);
                metrics.ok.increment(1);
                metrics.rtt.record(rtt.as_secs_f64());
                tracing::trace!(member = id, rtt = ?rtt, "keepalive health-check probe answered");
                // Due again at whichever comes first: the next PING, its idle or lifetime end.
                self.check(id);
            }
            Err(error) => {
                self.metrics_of(id, &member).error.increment(1);
                tracing::debug!(member = id, error = %error, "keepalive probe failed");
                // The connection failed; the pool is taking it out already.
                self.reschedule(id, MIN_RECHECK);
            }
        }
    }

    /// A probe got no answer within the keepalive timeout: the connection is dead.
    pub(super) fn on_probe_timeout(&mut self, id: u64, member: &MemberHandle) {
        self.metrics_of(id, member).timeout.increment(1);
        let timeout = self.keepalive().map(|k| k.timeout).unwrap_or_default();
        member.kill(EvictionReason::PingTimeout, &format!("no PONG within keepalive timeout {timeout:?}"));
        // Its probe ends when the connection does; the answer finds no member.
        self.untrack(id);
    }
}

/// Whether a member may have another PING under the server's PING policy: fewer than `most`
/// (0: no limit) sent since the server last sent DATA or HEADERS, which resets the server's
/// strike count (the C core's `Chttp2PingAbusePolicy::ResetPingStrikes`, grpc-go's
/// `resetPingStrikes`). Every PING on the connection counts, the pool's own (a caller's
/// check before use, the PING after a deadline) too. Past that, the member waits for data
/// before its next PING, as the C core's client does with `max_pings_without_data`.
pub(super) fn may_ping_without_data(pings_without_data: u64, most: u32) -> bool {
    most == 0 || pings_without_data < u64::from(most)
}
