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
            let endpoint = tracked.member.endpoint();
            if let Some(ids) = self.by_endpoint.get_mut(endpoint) {
                ids.remove(&id);
                // An empty set is dropped: endpoints come and go with discovery for the
                // life of the process, and each would leave its key behind.
                if ids.is_empty() {
                    self.by_endpoint.remove(endpoint);
                }
            }
            self.forget_endpoint_if_gone(endpoint);
        }
    }

    /// Drops what the task keeps per endpoint (PING metrics, keepalive backoff, lifetime
    /// drains) once the endpoint has left the pool and the task tracks none of its members.
    /// Called whenever either becomes true, so that state made for a removed endpoint after
    /// its removal (a late `MemberReady`, a GOAWAY on one of its draining members) goes too.
    pub(super) fn forget_endpoint_if_gone(&mut self, endpoint: &Endpoint) {
        if self.endpoint_ids.contains_key(endpoint) || self.by_endpoint.contains_key(endpoint) {
            return;
        }
        self.ping_limited.remove(endpoint);
        self.keepalive_time.remove(endpoint);
        self.lifetime_drain.remove(endpoint);
        self.ping_metrics.remove(endpoint);
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

    /// Forgets an endpoint the pool removed. The pool drains its members before it says so:
    /// those without streams are no longer tracked from now, those with streams once they
    /// end (keepalive watches them until then), and what the task kept for the endpoint goes
    /// with the last of them. A check or `Watch` still under way for it
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
        let ids: Vec<u64> =
            self.by_endpoint.get(endpoint).map(|ids| ids.iter().copied().collect()).unwrap_or_default();
        for id in ids {
            // A draining member with streams left stays tracked, for keepalive, until they
            // end (`check`).
            let drained = self.members.get(&id).is_some_and(|t| {
                let status = t.member.status();
                status.state == MemberState::Closed
                    || (status.state == MemberState::Draining && status.in_flight == 0)
            });
            if drained {
                self.untrack(id);
            }
        }
        self.forget_endpoint_if_gone(endpoint);
    }
}
