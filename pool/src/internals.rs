//! The pool's per-endpoint data: member lists and their locked bookkeeping.
//!
//! The hot path reads member lists through `ArcSwap` snapshots and takes slots with atomics;
//! the mutex here is taken only when membership changes.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::endpoint::{Endpoint, EndpointShared, OutlierReports};
use crate::member::{Member, Slot};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// One endpoint of the pool: its members and its connect bookkeeping.
#[derive(Debug)]
pub(crate) struct EndpointEntry {
    pub(crate) shared: Arc<EndpointShared>,
    /// Members that take streams or drain; replaced whole on every change.
    members: ArcSwap<Vec<Arc<Member>>>,
    internals: Mutex<EndpointInternals>,
    /// The health task's verdict.
    healthy: AtomicBool,
    /// One permit per connect that may be under way at once.
    pub(crate) connect_permits: Semaphore,
    /// Wakes the retrier waiting out a backoff when a call pulls the next attempt forward.
    pub(crate) wake_retrier: Notify,
    /// Removed from the pool (discovery): no new streams or connects; members drain.
    removed: AtomicBool,
    /// Ejected by outlier detection: no new streams until the ejection ends.
    ejected: AtomicBool,
}

/// Bookkeeping changed under the endpoint's lock.
#[derive(Debug, Default)]
pub(crate) struct EndpointInternals {
    /// Connect tasks under way (each opens one member, retrying with backoff).
    pub(crate) connecting: usize,
    /// Rounds of failed attempts since the last success; drives the backoff. Attempts that
    /// were under way together fail as one round: counting each would grow the backoff by
    /// the multiplier once per attempt instead of once per round.
    pub(crate) consecutive_failures: u32,
    /// Moves on each time a round of failures is counted; an attempt that started before
    /// the last move belongs to a round counted already.
    pub(crate) failure_round: u64,
    /// Whether a connect task has taken the role of retrying this endpoint while it fails:
    /// one attempt at a time goes to a failing endpoint, whoever is waiting for it.
    pub(crate) retrier: bool,
    /// No connect attempt before this instant (unless a call pulls one forward: `pulled`).
    pub(crate) next_attempt: Option<Instant>,
    /// When the last connect attempt started: pulled attempts keep `refused_retry` apart
    /// from any attempt.
    pub(crate) last_attempt: Option<Instant>,
    /// The last failed attempt was refused at the TCP level (nothing listened): the next
    /// one may be pulled forward by a call.
    pub(crate) refused: bool,
    /// A call pulled the next attempt forward: the retrier makes it now, without waiting out
    /// the backoff, and until it ends the endpoint is not in transient failure (calls wait
    /// for it, as gRPC's calls wait for a connection in `CONNECTING`).
    pub(crate) pulled: bool,
    /// A call found the endpoint down since its last attempt started: a connect is wanted
    /// even with no `min_connections` to keep and no call queued (the call failed fast).
    pub(crate) demand: bool,
    pub(crate) last_error: Option<String>,
    /// Why the endpoint is unhealthy, when it is.
    pub(crate) health_reason: Option<String>,
    /// Ejections so far, less one for each `base_ejection_time` spent back in service.
    pub(crate) ejections: u32,
    /// When the last ejection ended.
    pub(crate) back_since: Option<Instant>,
    /// When the ejection under way ends.
    pub(crate) ejected_until: Option<Instant>,
}

/// Where an endpoint's failing connects stood when it left the pool's routing (pushed out of
/// its subset), carried to the entry made for it if it comes back before its next attempt
/// was due: going out of the subset and back in must not make that attempt sooner.
#[derive(Debug, Clone)]
pub(crate) struct ConnectHistory {
    consecutive_failures: u32,
    next_attempt: Option<Instant>,
    last_attempt: Option<Instant>,
    refused: bool,
    last_error: Option<String>,
}

impl ConnectHistory {
    /// Whether its next attempt is still to wait for at `now`: the backoff's, or, after a
    /// refused attempt, `refused_retry` from the last.
    pub(crate) fn pending(&self, now: Instant, refused_retry: Duration) -> bool {
        let refused_at = refused_retry_at(self.last_attempt, self.refused, refused_retry);
        self.next_attempt.into_iter().chain(refused_at).any(|at| at > now)
    }
}

/// After a refused attempt that began at `last_attempt`, the earliest the next one may
/// start: `retry` later. `None` when the last failure was not a refusal, the rule is off
/// (`retry` zero), or no attempt has been stamped yet.
fn refused_retry_at(last_attempt: Option<Instant>, refused: bool, retry: Duration) -> Option<Instant> {
    match last_attempt {
        Some(at) if refused && !retry.is_zero() => Some(at + retry),
        _ => None,
    }
}

/// With subsetting: the subset's choice, and the connect histories of endpoints that left
/// it while failing.
#[derive(Debug)]
pub(crate) struct Subsetting {
    pub(crate) choice: crate::subset::Subsetter,
    pub(crate) histories: std::collections::HashMap<Endpoint, ConnectHistory>,
}

impl EndpointInternals {
    /// Its connects' history while they fail; `None` when the last one succeeded.
    pub(crate) fn history(&self) -> Option<ConnectHistory> {
        (self.consecutive_failures > 0).then(|| ConnectHistory {
            consecutive_failures: self.consecutive_failures,
            next_attempt: self.next_attempt,
            last_attempt: self.last_attempt,
            refused: self.refused,
            last_error: self.last_error.clone(),
        })
    }

    /// Takes up a history where it stood (a fresh entry, before its first connect).
    pub(crate) fn resume(&mut self, history: ConnectHistory) {
        self.consecutive_failures = history.consecutive_failures;
        self.next_attempt = history.next_attempt;
        self.last_attempt = history.last_attempt;
        self.refused = history.refused;
        self.last_error = history.last_error;
    }

    /// After a refused attempt, the earliest the next one may start (`refused_retry_at`).
    pub(crate) fn refused_retry_at(&self, retry: Duration) -> Option<Instant> {
        refused_retry_at(self.last_attempt, self.refused, retry)
    }
}

impl EndpointEntry {
    pub(crate) fn new(
        endpoint: Endpoint,
        concurrent_connects: usize,
        outliers: Option<OutlierReports>,
        requests: Arc<crate::circuit::RequestLimit>,
    ) -> Arc<EndpointEntry> {
        Arc::new(EndpointEntry {
            shared: Arc::new(EndpointShared::new(endpoint, outliers, requests)),
            members: ArcSwap::from_pointee(Vec::new()),
            internals: Mutex::new(EndpointInternals::default()),
            healthy: AtomicBool::new(true),
            connect_permits: Semaphore::new(concurrent_connects),
            wake_retrier: Notify::new(),
            removed: AtomicBool::new(false),
            ejected: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    pub(crate) fn set_ejected(&self, ejected: bool) {
        self.ejected.store(ejected, Ordering::Release);
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Marks it removed and takes it out of routing; returns false if it already was.
    pub(crate) fn set_removed(&self) -> bool {
        self.shared.routable.store(false, Ordering::Release);
        !self.removed.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn label(&self) -> &str {
        &self.shared.label
    }

    pub(crate) fn is_routable(&self) -> bool {
        self.shared.routable.load(Ordering::Acquire)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records the health task's verdict; returns whether it changed.
    pub(crate) fn set_healthy(&self, healthy: bool, reason: Option<String>) -> bool {
        let mut locked = self.lock();
        locked.health_reason = reason;
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, EndpointInternals> {
        self.internals.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn members(&self) -> arc_swap::Guard<Arc<Vec<Arc<Member>>>> {
        self.members.load()
    }

    /// Load for choosing between endpoints: streams in flight, or the most possible when the
    /// endpoint has no member to take a stream (so an endpoint that is down never wins).
    pub(crate) fn load(&self) -> usize {
        if !self.has_members() {
            usize::MAX
        } else {
            self.in_flight()
        }
    }

    /// Whether any member is listed, without reading the list.
    pub(crate) fn has_members(&self) -> bool {
        self.shared.listed.load(Ordering::Acquire) > 0
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Adds a member; call with the endpoint's lock held so list changes don't race.
    pub(crate) fn insert(&self, _locked: &mut EndpointInternals, member: Arc<Member>) {
        let mut list = Vec::clone(&self.members.load());
        list.push(member);
        self.shared.listed.store(list.len(), Ordering::Release);
        self.members.store(Arc::new(list));
    }

    /// Removes a member; returns whether it was listed. Call with the endpoint's lock held.
    pub(crate) fn remove(&self, _locked: &mut EndpointInternals, member_id: u64) -> bool {
        let current = self.members.load();
        if !current.iter().any(|m| m.id == member_id) {
            return false;
        }
        let list: Vec<_> = current.iter().filter(|m| m.id != member_id).cloned().collect();
        self.shared.listed.store(list.len(), Ordering::Release);
        self.members.store(Arc::new(list));
        true
    }

    /// Takes every member out of the list.
    pub(crate) fn take_all(&self, _locked: &mut EndpointInternals) -> Arc<Vec<Arc<Member>>> {
        self.shared.listed.store(0, Ordering::Release);
        self.members.swap(Arc::new(Vec::new()))
    }

    /// Whether the endpoint cannot take a call now and is not about to: it takes no new
    /// streams (unhealthy, ejected, removed), or it has no ready member and its last connect
    /// failed, so the next attempt waits for the backoff (gRPC's `TRANSIENT_FAILURE`). An
    /// endpoint still making its first connection is not, nor one making an attempt a call
    /// pulled forward.
    pub(crate) fn in_transient_failure(&self) -> bool {
        if !self.is_routable() {
            return true;
        }
        let members = self.members.load();
        if members.iter().any(|m| m.state() == crate::member::MemberState::Ready) {
            return false;
        }
        let locked = self.lock();
        locked.consecutive_failures > 0 && !locked.pulled
    }

    /// Whether the endpoint is failing: it takes no new streams (unhealthy, ejected,
    /// removed), or it has no ready member and its connects are failing. Unlike
    /// `in_transient_failure`, an attempt a call pulled forward does not change it, so that
    /// what follows it (a priority failover) does not flap with each pulled attempt.
    pub(crate) fn is_failing(&self) -> bool {
        if !self.is_routable() {
            return true;
        }
        let members = self.members.load();
        !members.iter().any(|m| m.state() == crate::member::MemberState::Ready)
            && self.lock().consecutive_failures > 0
    }

    /// A slot on the least loaded ready member, room or not (see `Member::force_acquire`).
    pub(crate) fn force_acquire(&self) -> Option<Slot> {
        let members = self.members.load();
        members
            .iter()
            .filter(|m| m.state() == crate::member::MemberState::Ready)
            .min_by_key(|m| m.in_flight())
            .and_then(|m| m.force_acquire())
    }

    /// A slot on the least loaded ready member with room, if any.
    pub(crate) fn try_acquire(&self) -> Option<Slot> {
        let members = self.members.load();
        match members.len() {
            0 => return None,
            1 => return members[0].try_acquire(),
            _ => {}
        }
        // Least in-flight first; on a lost race for its last slot, try the rest in order.
        let mut best: Option<&Arc<Member>> = None;
        let mut best_load = u32::MAX;
        for member in members.iter() {
            let load = member.in_flight();
            if load < best_load && load < member.max_streams() {
                best = Some(member);
                best_load = load;
            }
        }
        if let Some(slot) = best.and_then(|m| m.try_acquire()) {
            return Some(slot);
        }
        members.iter().find_map(|m| m.try_acquire())
    }
}
