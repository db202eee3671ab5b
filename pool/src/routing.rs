//! Which endpoints take new streams: health verdicts, outlier ejection, and endpoints added
//! and removed at run time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::AllUnhealthy;
use crate::endpoint::{EjectionRequest, Endpoint, EndpointShared};
use crate::events::{MemberEvent, PoolEvent};
use crate::inner::PoolInner;
use crate::internals::EndpointEntry;
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
    pub(crate) fn eject(self: &Arc<Self>, entry: &Arc<EndpointEntry>, failures: u32) {
        let Some(outliers) = self.outliers.as_ref().map(|r| r.outliers.clone()) else { return };
        let duration = {
            let membership = self.lock_membership();
            if entry.is_removed() || entry.is_ejected() {
                return;
            }
            let endpoints = self.endpoints.load();
            let ejected = endpoints.iter().filter(|e| e.is_ejected()).count();
            if ejected >= outliers.max_ejected(endpoints.len()) {
                tracing::debug!(pool = %self.name(), endpoint = %entry.label(), failures, ejected, "not ejected: max_ejection_percent reached");
                return;
            }
            let mut locked = entry.lock();
            // Time back in service earns the multiplier down again.
            if let Some(back) = locked.back_since {
                let base = outliers.config.base_ejection_time.as_nanos().max(1);
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
        tracing::warn!(pool = %self.name(), endpoint = %entry.label(), failures, ejected_for = ?duration, "endpoint ejected: its calls failed {failures} times in a row; no new streams go there until the ejection ends");
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
            self.eject(&entry, failures);
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

    /// Adds `endpoint` (if the pool does not have it yet) and opens its `min_connections`;
    /// returns whether it was added.
    pub(crate) fn add_endpoint(self: &Arc<Self>, endpoint: Endpoint) -> bool {
        if self.is_closed() {
            return false;
        }
        let entry = {
            let membership = self.lock_membership();
            let current = self.endpoints.load();
            if current.iter().any(|e| e.endpoint() == &endpoint) {
                return false;
            }
            let entry = EndpointEntry::new(
                endpoint.clone(),
                self.config.max_concurrent_connects,
                self.outliers.clone(),
            );
            let mut list = Vec::clone(&current);
            list.push(entry.clone());
            self.endpoints.store(Arc::new(list));
            // A healthy newcomer ends "all unhealthy", or joins the others in it.
            self.update_routing(&membership);
            entry
        };
        tracing::info!(pool = %self.name(), endpoint = %entry.label(), "endpoint added");
        self.emit(|| MemberEvent::EndpointAdded(endpoint.clone()));
        self.publish(|| PoolEvent::EndpointAdded(endpoint.clone()));
        self.replenish(&entry);
        if self.waiters.has_waiters() {
            self.grow();
        }
        true
    }

    /// Removes `endpoint`: it takes no new streams and opens no connection; its members
    /// drain (the streams on them finish) and close. Returns whether the pool had it.
    pub(crate) fn remove_endpoint(self: &Arc<Self>, endpoint: &Endpoint) -> bool {
        let entry = {
            let membership = self.lock_membership();
            let current = self.endpoints.load();
            let Some(entry) = current.iter().find(|e| e.endpoint() == endpoint).cloned() else {
                return false;
            };
            let rest: Vec<_> = current.iter().filter(|e| !Arc::ptr_eq(e, &entry)).cloned().collect();
            self.endpoints.store(Arc::new(rest));
            entry.set_removed();
            if !entry.is_healthy() {
                self.unhealthy.fetch_sub(1, Ordering::AcqRel);
            }
            self.update_routing(&membership);
            entry
        };
        let draining =
            self.drain_all(&entry, EvictionReason::EndpointRemoved, "endpoint removed from the pool");
        tracing::info!(pool = %self.name(), endpoint = %entry.label(), draining, "endpoint removed; its connections drain");
        self.emit(|| MemberEvent::EndpointRemoved(endpoint.clone()));
        self.publish(|| PoolEvent::EndpointRemoved(endpoint.clone()));
        // Removing the last unhealthy endpoint may leave only healthy ones with room; removing
        // the last healthy one may leave nothing to wait for.
        self.serve_waiters_everywhere();
        self.release_hopeless_waiters();
        if self.waiters.has_waiters() {
            self.grow();
        }
        true
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
