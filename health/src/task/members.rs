//! The health task's view of the pool's membership: members tracked as they become ready
//! and forgotten as they close, endpoints (and their health checks) added and removed, from
//! the pool's monitor events.

use super::*;

impl Task {
    pub(super) fn track(&mut self, member: MemberHandle) {
        let id = member.id();
        if self.members.contains_key(&id) || member.state() == MemberState::Closed {
            return;
        }
        let lifetime = self.config.eviction.max_lifetime.map(jittered);
        self.by_endpoint.entry(member.endpoint().clone()).or_default().insert(id);
        let key = Some(self.members_due.insert_at(id, Instant::now() + MIN_RECHECK));
        let first_ping_after =
            self.keepalive_time(member.endpoint()).map(|time| time.mul_f64(0.75 + 0.25 * symmetric_unit()));
        let ping_metrics = self.ping_metrics(member.endpoint());
        self.members.insert(
            id,
            Tracked { member, key, lifetime, probe: None, ping: None, ping_metrics, first_ping_after },
        );
        // Look at it right away (the entry is due at once), so a member that is already
        // old or quiet is handled on the next turn.
    }

    pub(super) fn untrack(&mut self, id: u64) {
        if let Some(tracked) = self.members.remove(&id) {
            if let Some(key) = tracked.key {
                self.members_due.remove(&key);
            }
            if let Some(ids) = self.by_endpoint.get_mut(tracked.member.endpoint()) {
                ids.remove(&id);
            }
        }
    }

    pub(super) fn on_event(&mut self, event: MonitorEvent) {
        match event {
            MonitorEvent::MemberReady(member) => {
                let endpoint = member.endpoint().clone();
                self.track(member);
                self.recheck_if_unhealthy(&endpoint);
            }
            MonitorEvent::EndpointAdded(endpoint) => self.add_endpoint(endpoint),
            MonitorEvent::EndpointRemoved(endpoint) => self.remove_endpoint(&endpoint),
            MonitorEvent::GoAway { member, reason, debug_data } => {
                let too_many_pings =
                    reason == h2::Reason::ENHANCE_YOUR_CALM && debug_data.as_ref() == b"too_many_pings";
                if too_many_pings {
                    self.back_off_keepalive(member.endpoint());
                }
            }
            _ => {}
        }
    }

    /// Starts health-checking a new endpoint (once; the task may hear of it twice).
    pub(super) fn add_endpoint(&mut self, endpoint: Endpoint) {
        if self.endpoint_ids.contains_key(&endpoint) {
            return;
        }
        let id = self.next_endpoint_id;
        self.next_endpoint_id += 1;
        self.endpoint_ids.insert(endpoint.clone(), id);
        // The pool's own verdict, for a task that starts over after a panic: a passing check
        // must still be able to bring an endpoint it had marked unhealthy back.
        let healthy = self.monitor.is_endpoint_healthy(&endpoint).unwrap_or(true);
        self.endpoints.insert(
            id,
            EndpointHealth {
                channel: self.monitor.endpoint_channel(&endpoint),
                removed: Arc::new(AtomicBool::new(false)),
                endpoint,
                healthy,
                successes: 0,
                failures: 0,
                unimplemented_logged: false,
                key: None,
                recheck: false,
                poll_only: false,
            },
        );
        self.schedule_check(id, Duration::ZERO);
    }

    /// Forgets an endpoint the pool removed. Its members drain and close on their own (the
    /// task stops tracking each as it closes); a check or `Watch` still under way for it
    /// reports to an id that is gone, and is dropped.
    pub(super) fn remove_endpoint(&mut self, endpoint: &Endpoint) {
        if let Some(id) = self.endpoint_ids.remove(endpoint) {
            if let Some(health) = self.endpoints.remove(&id) {
                health.removed.store(true, Ordering::Relaxed);
                if let Some(key) = health.key {
                    self.checks_due.remove(&key);
                }
            }
        }
        self.ping_limited.remove(endpoint);
        self.keepalive_time.remove(endpoint);
        self.lifetime_drain.remove(endpoint);
        self.ping_metrics.remove(endpoint);
    }
}
