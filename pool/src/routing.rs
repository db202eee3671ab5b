//! Which endpoints take new streams: health verdicts, outlier ejection, and endpoints added
//! and removed at run time.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::AllUnhealthy;
use crate::endpoint::{EjectionRequest, Endpoint, EndpointShared};
use crate::events::{MemberEvent, PoolEvent};
use crate::inner::PoolInner;
use crate::internals::Subsetting;
use crate::internals::{ConnectHistory, EndpointEntry};
use crate::member::{EvictionReason, MemberState};
use crate::metrics as names;

impl PoolInner {
    /// Sets which endpoints take new streams: the healthy ones that are not ejected, or, when
    /// all are unhealthy and the pool routes to all then, every one not ejected. Call with the
    /// membership lock held.
    pub(crate) fn update_routing(&self, _membership: &std::sync::MutexGuard<'_, ()>) {
        let route_all = self.config.all_unhealthy == AllUnhealthy::RouteToAll && self.all_unhealthy();
        for e in self.endpoints.load().iter() {
            let routable = !e.is_removed() && !e.is_ejected() && (e.is_healthy() || route_all);
            e.shared.routable.store(routable, Ordering::Release);
        }
    }

    /// Outlier detection: `failures` calls in a row failed on `entry`. Ejects it unless it
    /// is ejected already or the cap on ejected endpoints is reached.
    pub(crate) fn eject(self: &Arc<Self>, entry: &Arc<EndpointEntry>, why: &str) {
        let Some(outliers) = self.outliers.as_ref().map(|r| r.outliers.clone()) else { return };
        let duration = {
            let membership = self.lock_membership();
            if entry.is_removed() || entry.is_ejected() {
                return;
            }
            let endpoints = self.endpoints.load();
            let ejected = endpoints.iter().filter(|e| e.is_ejected()).count();
            if ejected >= outliers.max_ejected(endpoints.len()) {
                tracing::debug!(pool = %self.name(), endpoint = %entry.label(), why, ejected, "not ejected: max_ejection_percent reached");
                return;
            }
            let mut locked = entry.lock();
            // Time back in service earns the multiplier down again.
            if let Some(back) = locked.back_since {
                let base = outliers.config().base_ejection_time.as_nanos().max(1);
                let earned = (back.elapsed().as_nanos() / base).min(u128::from(u32::MAX)) as u32;
                locked.ejections = locked.ejections.saturating_sub(earned);
            }
            locked.ejections = locked.ejections.saturating_add(1);
            let duration = outliers.ejection_time(locked.ejections);
            locked.ejected_until = Some(Instant::now() + duration);
            drop(locked);
            entry.set_ejected(true);
            entry.shared.failures_in_a_row.store(0, Ordering::Relaxed);
            self.update_routing(&membership);
            duration
        };
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::EJECTIONS, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).increment(1);
        metrics::gauge!(names::ENDPOINT_EJECTED, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).set(1.0);
        self.publish(|| PoolEvent::EndpointEjected { endpoint: entry.endpoint().clone(), duration });
        tracing::warn!(pool = %self.name(), endpoint = %entry.label(), ejected_for = ?duration, "endpoint ejected: {why}; no new streams go there until the ejection ends");
        self.release_hopeless_waiters();
        let (pool, entry) = (Arc::downgrade(self), Arc::downgrade(entry));
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if shutdown.run_until_cancelled_owned(tokio::time::sleep(duration)).await.is_none() {
                return;
            }
            if let (Some(pool), Some(entry)) = (pool.upgrade(), entry.upgrade()) {
                pool.end_ejection(&entry);
            }
        });
    }

    /// Outlier detection decided to eject the endpoint whose members share `shared` (a call
    /// with the pool at hand: its future); ejects it now if the pool still has it.
    pub(crate) fn eject_shared(self: &Arc<Self>, shared: &Arc<EndpointShared>, failures: u32) {
        if let Some(entry) = self.entry_sharing(shared) {
            self.eject(&entry, &format!("its calls failed {failures} times in a row"));
        }
    }

    /// Every `interval` of the outlier settings in force: each endpoint's calls since the
    /// last time, judged by gRFC A50's success-rate and failure-percentage algorithms when
    /// they are on; the outliers found are ejected (up to `max_ejection_percent`). The
    /// interval is read again each time: an override may change it.
    pub(crate) fn spawn_outlier_sweep(self: &Arc<Self>) {
        let Some(outliers) = self.outliers.as_ref().map(|r| r.outliers.clone()) else { return };
        let (pool, shutdown) = (Arc::downgrade(self), self.shutdown.clone());
        tokio::spawn(async move {
            loop {
                let interval = outliers.config().interval.max(std::time::Duration::from_millis(10));
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    // New settings: their interval starts now (the calls counted so far
                    // count in it).
                    _ = outliers.changed.notified() => continue,
                    _ = tokio::time::sleep(interval) => {}
                }
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep_outliers(&outliers);
            }
        });
    }

    fn sweep_outliers(self: &Arc<Self>, outliers: &crate::outlier::Outliers) {
        let config = outliers.config();
        let endpoints = self.endpoints.load_full();
        // Taken from every endpoint, so that each next interval starts from zero; judged for
        // those not ejected.
        let calls: Vec<(usize, crate::outlier::IntervalCalls)> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.shared.calls.take()))
            .filter(|(i, _)| !endpoints[*i].is_ejected())
            .collect();
        for (i, why) in crate::outlier::judge(&config, &calls, endpoints.len(), || fastrand::u32(..100)) {
            self.eject(&endpoints[i], &why);
        }
    }

    /// Runs the ejections that response bodies ask for (`EndpointShared::ask_ejection`), one
    /// at a time, until the pool closes. A request for an endpoint no longer in the pool is
    /// dropped; each endpoint has at most one request on its way.
    pub(crate) fn spawn_ejector(self: &Arc<Self>, mut requests: mpsc::UnboundedReceiver<EjectionRequest>) {
        let (pool, shutdown) = (Arc::downgrade(self), self.shutdown.clone());
        tokio::spawn(async move {
            while let Some(Some((endpoint, failures))) = shutdown.run_until_cancelled(requests.recv()).await {
                let Some(pool) = pool.upgrade() else { return };
                pool.eject_shared(&endpoint, failures);
                // Cleared after the ejection (or its refusal), so that failures that came
                // meanwhile ask again only if the endpoint is still failing afterwards.
                endpoint.ejection_asked.store(false, Ordering::Release);
            }
        });
    }

    /// An ejection's time is up: the endpoint takes new streams again, once its health
    /// checks (if any) pass.
    pub(crate) fn end_ejection(self: &Arc<Self>, entry: &Arc<EndpointEntry>) {
        {
            let membership = self.lock_membership();
            let mut locked = entry.lock();
            locked.ejected_until = None;
            locked.back_since = Some(Instant::now());
            drop(locked);
            entry.set_ejected(false);
            entry.shared.failures_in_a_row.store(0, Ordering::Relaxed);
            self.update_routing(&membership);
        }
        metrics::gauge!(names::ENDPOINT_EJECTED, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).set(0.0);
        self.publish(|| PoolEvent::EndpointReturned(entry.endpoint().clone()));
        if entry.is_healthy() {
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "ejection over; the endpoint takes new streams again");
        } else {
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "ejection over; the endpoint takes new streams once its health checks pass");
        }
        self.serve_waiters_everywhere();
    }

    /// Members that became routable take queued callers now.
    pub(crate) fn serve_waiters_everywhere(self: &Arc<Self>) {
        for e in self.endpoints.load().iter().filter(|e| e.is_routable()) {
            for member in e.members().iter() {
                self.serve_waiters(member);
            }
        }
    }

    /// The health task's verdict on an endpoint.
    pub(crate) fn set_endpoint_health(
        self: &Arc<Self>,
        entry: &Arc<EndpointEntry>,
        healthy: bool,
        reason: Option<String>,
    ) {
        {
            let membership = self.lock_membership();
            if entry.is_removed() || !entry.set_healthy(healthy, reason.clone()) {
                return;
            }
            if healthy {
                self.unhealthy.fetch_sub(1, Ordering::AcqRel);
            } else {
                self.unhealthy.fetch_add(1, Ordering::AcqRel);
            }
            self.update_routing(&membership);
        }
        self.serve_waiters_everywhere();
        self.release_hopeless_waiters();
        if healthy {
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "endpoint healthy again; it takes new streams");
        } else {
            tracing::warn!(pool = %self.name(), endpoint = %entry.label(), reason = reason.as_deref().unwrap_or(""), "endpoint unhealthy; no new streams go there");
        }
        metrics::gauge!(names::ENDPOINT_HEALTHY, names::LABEL_POOL => self.config.name.clone(), names::LABEL_ENDPOINT => entry.label().to_owned()).set(if healthy { 1.0 } else { 0.0 });
        self.publish(|| PoolEvent::EndpointHealth { endpoint: entry.endpoint().clone(), healthy, reason });
    }

    /// Adds each endpoint the pool does not have yet (and opens its `min_connections`), its connects taking up its history
    /// (if any) where it stood, and opens their `min_connections`; returns how many were
    /// added. The endpoint list is replaced once for all of them, so a discovery that sends
    /// thousands of changes at once costs one copy of the list, not one per change.
    pub(crate) fn add_endpoints(
        self: &Arc<Self>,
        endpoints: Vec<(Endpoint, Option<ConnectHistory>)>,
    ) -> usize {
        if self.is_closed() || endpoints.is_empty() {
            return 0;
        }
        let added = {
            let membership = self.lock_membership();
            let (current, index) = (self.endpoints.load(), self.index.load());
            let mut list = Vec::clone(&current);
            let mut added = Vec::new();
            // The pool's index says what it has; `batch` what this call added already.
            let mut batch = HashSet::new();
            for (endpoint, history) in endpoints {
                if index.contains_key(&endpoint) || !batch.insert(endpoint.clone()) {
                    continue;
                }
                let entry = EndpointEntry::new(
                    endpoint,
                    self.config.max_concurrent_connects,
                    self.outliers.clone(),
                    self.requests.clone(),
                );
                if let Some(history) = history {
                    entry.lock().resume(history);
                }
                list.push(entry.clone());
                added.push(entry);
            }
            if added.is_empty() {
                return 0;
            }
            self.set_endpoints(list, &membership);
            // A healthy newcomer ends "all unhealthy", or joins the others in it.
            self.update_routing(&membership);
            added
        };
        for entry in &added {
            let endpoint = entry.endpoint();
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "endpoint added");
            self.emit(|| MemberEvent::EndpointAdded(endpoint.clone()));
            self.publish(|| PoolEvent::EndpointAdded(endpoint.clone()));
            self.replenish(entry);
        }
        if self.waiters.has_waiters() {
            self.grow();
        }
        added.len()
    }

    /// Removes each of `endpoints` the pool has: it takes no new streams and opens no
    /// connection; its members drain (the streams on them finish) and close. One copy of the
    /// endpoint list for all of them; returns how many it had.
    pub(crate) fn remove_endpoints(self: &Arc<Self>, endpoints: &[Endpoint]) -> usize {
        if endpoints.is_empty() {
            return 0;
        }
        let removed = {
            let membership = self.lock_membership();
            let current = self.endpoints.load();
            let leaving: HashSet<&Endpoint> = endpoints.iter().collect();
            let (removed, rest): (Vec<_>, Vec<_>) =
                current.iter().cloned().partition(|e| leaving.contains(e.endpoint()));
            if removed.is_empty() {
                return 0;
            }
            self.set_endpoints(rest, &membership);
            for entry in &removed {
                entry.set_removed();
                if !entry.is_healthy() {
                    self.unhealthy.fetch_sub(1, Ordering::AcqRel);
                }
            }
            self.update_routing(&membership);
            removed
        };
        for entry in &removed {
            let endpoint = entry.endpoint();
            let draining =
                self.drain_all(entry, EvictionReason::EndpointRemoved, "endpoint removed from the pool");
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), draining, "endpoint removed; its connections drain");
            self.emit(|| MemberEvent::EndpointRemoved(endpoint.clone()));
            self.publish(|| PoolEvent::EndpointRemoved(endpoint.clone()));
        }
        // Removing the last unhealthy endpoint may leave only healthy ones with room; removing
        // the last healthy one may leave nothing to wait for.
        self.serve_waiters_everywhere();
        self.release_hopeless_waiters();
        if self.waiters.has_waiters() {
            self.grow();
        }
        removed.len()
    }

    /// Unlists every member of `entry` and drains it (its streams finish, then it closes);
    /// returns how many there were. Under the entry's lock, so a connect finishing meanwhile
    /// either sees why (closed, removed) and is not listed, or is taken here.
    pub(crate) fn drain_all(&self, entry: &EndpointEntry, reason: EvictionReason, detail: &str) -> usize {
        let members = {
            let mut locked = entry.lock();
            entry.take_all(&mut locked)
        };
        for member in members.iter() {
            if member.set_draining() {
                self.count_eviction(member, reason, MemberState::Draining, detail);
            }
        }
        members.len()
    }
}

// ----- subsetting: which known endpoints are live -----

impl PoolInner {
    fn lock_subset(subset: &std::sync::Mutex<Subsetting>) -> std::sync::MutexGuard<'_, Subsetting> {
        subset.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an endpoint the pool knows of (given by the user or discovered): live at once
    /// without subsetting; with it, live if it is one of the subset. Returns whether it was
    /// new to the pool.
    pub(crate) fn add_known(self: &Arc<Self>, endpoint: Endpoint) -> bool {
        self.add_known_all(vec![endpoint]) == 1
    }

    /// Forgets an endpoint: it leaves the pool if it was live (its calls in flight finish),
    /// and its place in the subset goes to the next endpoint in the order. Returns whether
    /// the pool knew it.
    pub(crate) fn remove_known(self: &Arc<Self>, endpoint: &Endpoint) -> bool {
        self.remove_known_all(std::slice::from_ref(endpoint)) == 1
    }

    /// Makes the live endpoints the subset's choice now: newcomers first, so that calls
    /// always have somewhere to go, then the leavers, which drain. A leaver whose connects
    /// were failing leaves its history behind, and takes it up again if it comes back before
    /// its next attempt was due, so that the subset's moves never hurry a connect. Called
    /// with the subset's lock held, so that two changes are applied in the order they were
    /// decided.
    fn apply_subset(self: &Arc<Self>, subset: &mut Subsetting) {
        let now = Instant::now();
        let changes = subset.choice.rebalance(now);
        let mut joining = Vec::with_capacity(changes.add.len());
        for endpoint in changes.add {
            let history = subset
                .histories
                .remove(&endpoint)
                .filter(|h| h.pending(now, self.config.backoff.refused_retry));
            tracing::info!(pool = %self.name(), endpoint = %endpoint, failing = history.is_some(), "endpoint joins the subset");
            joining.push((endpoint, history));
        }
        self.add_endpoints(joining);
        if changes.remove.is_empty() {
            return;
        }
        let leaving: HashSet<&Endpoint> = changes.remove.iter().collect();
        for entry in self.endpoints.load().iter().filter(|e| leaving.contains(e.endpoint())) {
            if let Some(history) = entry.lock().history() {
                subset.histories.insert(entry.endpoint().clone(), history);
            }
            tracing::info!(pool = %self.name(), endpoint = %entry.label(), "endpoint leaves the subset");
        }
        self.remove_endpoints(&changes.remove);
    }

    /// Adds every endpoint of `endpoints` the pool does not know yet, with one change of the
    /// subset (or of the endpoint list) for all; returns how many were new.
    pub(crate) fn add_known_all(self: &Arc<Self>, endpoints: Vec<Endpoint>) -> usize {
        let Some(subset) = &self.subset else {
            return self.add_endpoints(endpoints.into_iter().map(|e| (e, None)).collect());
        };
        if self.is_closed() {
            return 0;
        }
        let mut subset = Self::lock_subset(subset);
        let added = endpoints.into_iter().filter(|e| subset.choice.insert(e.clone())).count();
        if added > 0 {
            self.apply_subset(&mut subset);
        }
        added
    }

    /// Forgets every endpoint of `endpoints` the pool knows, as `remove_known` does, with one
    /// change for all; returns how many it knew.
    pub(crate) fn remove_known_all(self: &Arc<Self>, endpoints: &[Endpoint]) -> usize {
        let Some(subset) = &self.subset else { return self.remove_endpoints(endpoints) };
        let mut subset = Self::lock_subset(subset);
        let mut removed = 0;
        for endpoint in endpoints {
            if subset.choice.remove(endpoint) {
                subset.histories.remove(endpoint);
                removed += 1;
            }
        }
        if removed > 0 {
            self.apply_subset(&mut subset);
        }
        removed
    }

    /// With subsetting: notes which live endpoints cannot take calls, gives the place of
    /// those that could not for `replace_after` to the next endpoints in the order, and
    /// gives back the places whose hold ended.
    pub(crate) fn keep_subset(self: &Arc<Self>) {
        let Some(subset) = &self.subset else { return };
        if self.is_closed() {
            return;
        }
        let mut subset = Self::lock_subset(subset);
        let endpoints = self.endpoints.load();
        let unusable: std::collections::HashSet<&Endpoint> =
            endpoints.iter().filter(|e| e.in_transient_failure()).map(|e| e.endpoint()).collect();
        let now = Instant::now();
        for displaced in subset.choice.observe(now, |e| !unusable.contains(e)) {
            tracing::warn!(
                pool = %self.name(),
                endpoint = %displaced.endpoint,
                unusable_for = ?displaced.unusable_for,
                hold = ?displaced.hold,
                "endpoint displaced from the subset: it could not take calls for replace_after; the next endpoint in the order takes its place for the hold",
            );
            metrics::counter!(names::SUBSET_DISPLACEMENTS, names::LABEL_POOL => self.name().to_owned())
                .increment(1);
        }
        drop(endpoints);
        self.apply_subset(&mut subset);
    }

    /// Keeps the subset every quarter of `replace_after` (at most a second apart) until the
    /// pool closes.
    pub(crate) fn spawn_subset_keeper(self: &Arc<Self>) {
        let Some(settings) = self.config.subset.as_ref() else { return };
        let interval = (settings.replace_after / 4).min(std::time::Duration::from_secs(1));
        self.spawn_periodic(interval, |pool| pool.keep_subset());
    }
}
