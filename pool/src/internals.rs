//! The pool's shared data: per-endpoint member lists and their locked bookkeeping, and the
//! queue of checkouts waiting for a slot.
//!
//! The hot path reads member lists through `ArcSwap` snapshots and takes slots with atomics;
//! the mutexes here are taken only when membership changes or when callers have to wait.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::member::{Member, Slot};
use crate::outlier::Outliers;
use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use crate::sync::{oneshot, Mutex, MutexGuard};

/// What members need to know of their endpoint (no member list: members point here, and the
/// list points at members).
#[derive(Debug)]
pub(crate) struct EndpointShared {
    pub(crate) endpoint: Endpoint,
    /// `endpoint` as text, for errors, logs and metric labels.
    pub(crate) label: String,
    /// Streams in flight over all members, for choosing between endpoints.
    pub(crate) in_flight: AtomicUsize,
    /// Whether new streams may go here: healthy, or every endpoint unhealthy and the pool
    /// routing to all of them then, and not removed. Kept by the pool; read on every checkout.
    pub(crate) routable: AtomicBool,
    /// The entry this belongs to, for a member to find its list (gone once the entry is
    /// removed from the pool and its last member has closed).
    pub(crate) entry: Weak<EndpointEntry>,
    /// Outlier detection, when the pool has it: calls report how they ended here.
    pub(crate) outliers: Option<Arc<Outliers>>,
    /// Calls that failed in a row, for outlier detection.
    pub(crate) failures_in_a_row: AtomicU32,
    /// Connections open now (their driver tasks running), listed or draining.
    pub(crate) open_connections: AtomicUsize,
}

impl EndpointShared {
    /// Reports how a call on this endpoint ended, for outlier detection: `failed` says
    /// whether it failed, or `None` if the end says nothing either way. Only called when the
    /// pool has outlier detection, so calls without it do not pay for reading their status.
    pub(crate) fn record_outcome(&self, failed: impl FnOnce() -> Option<bool>) {
        if let Some(outliers) = &self.outliers {
            if let Some(failed) = failed() {
                outliers.record(self, failed);
            }
        }
    }
}

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
    /// No connect attempt before this instant.
    pub(crate) next_attempt: Option<Instant>,
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

impl EndpointEntry {
    pub(crate) fn new(
        endpoint: Endpoint,
        concurrent_connects: usize,
        outliers: Option<Arc<Outliers>>,
    ) -> Arc<EndpointEntry> {
        let label = endpoint.to_string();
        Arc::new_cyclic(|entry| EndpointEntry {
            shared: Arc::new(EndpointShared {
                endpoint,
                label,
                in_flight: AtomicUsize::new(0),
                routable: AtomicBool::new(true),
                entry: entry.clone(),
                outliers,
                failures_in_a_row: AtomicU32::new(0),
                open_connections: AtomicUsize::new(0),
            }),
            members: ArcSwap::from_pointee(Vec::new()),
            internals: Mutex::new(EndpointInternals::default()),
            healthy: AtomicBool::new(true),
            connect_permits: Semaphore::new(concurrent_connects),
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
        if self.members.load().is_empty() {
            usize::MAX
        } else {
            self.in_flight()
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Adds a member; call with the endpoint's lock held so list changes don't race.
    pub(crate) fn insert(&self, _locked: &mut EndpointInternals, member: Arc<Member>) {
        let mut list = Vec::clone(&self.members.load());
        list.push(member);
        self.members.store(Arc::new(list));
    }

    /// Removes a member; returns whether it was listed. Call with the endpoint's lock held.
    pub(crate) fn remove(&self, _locked: &mut EndpointInternals, member_id: u64) -> bool {
        let current = self.members.load();
        if !current.iter().any(|m| m.id == member_id) {
            return false;
        }
        let list: Vec<_> = current.iter().filter(|m| m.id != member_id).cloned().collect();
        self.members.store(Arc::new(list));
        true
    }

    /// Takes every member out of the list.
    pub(crate) fn take_all(&self, _locked: &mut EndpointInternals) -> Arc<Vec<Arc<Member>>> {
        self.members.swap(Arc::new(Vec::new()))
    }

    /// Whether the endpoint cannot take a call now and is not about to: it takes no new
    /// streams (unhealthy, ejected, removed), or it has no ready member and its last connect
    /// failed, so the next attempt waits for the backoff (gRPC's `TRANSIENT_FAILURE`). An
    /// endpoint still making its first connection is not.
    pub(crate) fn in_transient_failure(&self) -> bool {
        if !self.is_routable() {
            return true;
        }
        let members = self.members.load();
        if members.iter().any(|m| m.state() == crate::member::MemberState::Ready) {
            return false;
        }
        self.lock().consecutive_failures > 0
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

/// What the wait queue hands out: the slots of one member. `Arc<Member>` is the one the pool
/// uses; the loom model (`internals/loom_tests.rs`) implements it over the same `Slots`
/// counter without a connection, and runs this `release` and the queue's own code.
pub(crate) trait SlotSource {
    /// The right to one stream; dropping it calls `slot_dropped`.
    type Slot;

    /// A slot if one is free (`Slots::try_take`: SeqCst).
    fn try_acquire(&self) -> Option<Self::Slot>;

    /// Frees a slot without serving waiters (`Slots::give_back`: SeqCst).
    fn free_slot(&self);

    /// Whether freed slots may go to waiters now (ready, routable).
    fn serves_waiters(&self) -> bool;

    /// The queue its freed slots go to.
    fn waiters(&self) -> &WaitQueue<Self::Slot>;

    /// Frees a slot the queue took and could not hand on; it holds its lock meanwhile.
    fn free_leftover(slot: Self::Slot);

    /// What dropping one of its slots does: `release` it, or only free it (the queue's
    /// leftover: the queue holds its lock and has served already).
    #[inline]
    fn slot_dropped(&self, serve_waiters: bool) {
        if serve_waiters {
            self.release();
        } else {
            self.free_slot();
        }
    }

    /// Frees a slot, or hands it to the oldest waiter.
    #[inline]
    fn release(&self) {
        self.free_slot();
        // Decrement first, then look for waiters: a waiter that queued after our look
        // re-checks the slots itself, so no free slot is ever left with a waiter queued.
        if self.waiters().has_waiters() && self.serves_waiters() {
            self.waiters().serve(self);
        }
    }
}

/// Checkouts waiting for a slot, served first come, first served.
///
/// A freed slot goes straight to the longest waiter instead of back to the member, so a burst
/// of new callers cannot overtake the ones already queued (bb8's starvation at high
/// concurrency comes from exactly that).
///
/// `waiting` counts the checkouts that are waiting now; each one decrements it itself when it
/// stops waiting, however it stops (slot, timeout, cancellation), so the fast path's "is
/// anybody queued?" never sees stale entries. The queue may still hold senders of waiters that
/// left; they are skipped when served and swept when they pile up.
///
/// The protocol, which `internals/loom_tests.rs` checks under loom:
/// - a caller that finds no free slot joins (`enqueue`: counts itself in `waiting`, SeqCst,
///   then queues under the lock), then looks for a free slot once more (`checkout_wait`);
/// - a releaser frees its slot (SeqCst), then reads `waiting` (SeqCst) and, if anybody
///   waits, `serve`s: under the lock, takes a slot for the oldest open waiter and sends it;
/// - a waiter that gives up closes its receiver, then counts itself out; a slot sent before
///   the close is dropped with the receiver (a release), one sent after comes back to
///   `serve`, which offers it to the next waiter or frees it under the lock.
///
/// FIFO holds for the slots the queue hands on. A caller in the middle of joining can still
/// take a slot freed in that moment by its second look, before the releaser serves the
/// oldest waiter (the loom model finds that interleaving).
#[derive(Debug)]
pub(crate) struct WaitQueue<S = Slot> {
    waiting: AtomicUsize,
    queue: Mutex<VecDeque<Waiter<S>>>,
}

impl<S> Default for WaitQueue<S> {
    fn default() -> Self {
        WaitQueue { waiting: AtomicUsize::new(0), queue: Mutex::new(VecDeque::new()) }
    }
}

/// One queued checkout: where its slot goes, and whether it waits out an outage.
#[derive(Debug)]
struct Waiter<S> {
    slot: oneshot::Sender<Result<S, Error>>,
    wait_for_ready: bool,
}

/// One waiting checkout; dropping it (whatever the outcome) stops the count of waiters
/// including it.
pub(crate) struct Waiting<'a, S = Slot> {
    queue: &'a WaitQueue<S>,
    pub(crate) slot: oneshot::Receiver<Result<S, Error>>,
}

impl<S> Drop for Waiting<'_, S> {
    fn drop(&mut self) {
        self.slot.close();
        self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S> WaitQueue<S> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Waiter<S>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Joins the end of the queue.
    pub(crate) fn enqueue(&self, wait_for_ready: bool) -> Waiting<'_, S> {
        let (tx, rx) = oneshot::channel();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut queue = self.lock();
        if queue.len() > 2 * self.waiting.load(Ordering::Relaxed) + 64 {
            queue.retain(|w| !w.slot.is_closed());
        }
        queue.push_back(Waiter { slot: tx, wait_for_ready });
        Waiting { queue: self, slot: rx }
    }

    /// Hands slots of `member` to waiters, oldest first, while it has room.
    pub(crate) fn serve<M: SlotSource<Slot = S> + ?Sized>(&self, member: &M) {
        let mut queue = self.lock();
        let mut leftover = None;
        while let Some(waiter) = queue.pop_front() {
            if waiter.slot.is_closed() {
                continue;
            }
            let slot = match leftover.take() {
                Some(slot) => slot,
                None => match member.try_acquire() {
                    Some(slot) => slot,
                    None => {
                        queue.push_front(waiter);
                        break;
                    }
                },
            };
            if let Err(Ok(slot)) = waiter.slot.send(Ok(slot)) {
                leftover = Some(slot); // gave up meanwhile; offer it to the next one
            }
        }
        if let Some(slot) = leftover {
            // Nobody left to take it; free it here, under the lock, so that a waiter queueing
            // next sees it when it looks at the slots again.
            M::free_leftover(slot);
        }
    }

    /// Fails every waiter with `error()`.
    pub(crate) fn fail_all(&self, error: impl Fn() -> Error) {
        let mut queue = self.lock();
        for waiter in queue.drain(..) {
            let _ = waiter.slot.send(Err(error()));
        }
    }

    /// Fails the waiters that fail fast (not `wait_for_ready`) with `error()`; returns how
    /// many it failed.
    pub(crate) fn fail_fast_ones(&self, error: impl Fn() -> Error) -> usize {
        let mut queue = self.lock();
        let mut failed = 0;
        let mut kept = VecDeque::with_capacity(queue.len());
        for waiter in queue.drain(..) {
            if waiter.slot.is_closed() {
                continue;
            }
            if waiter.wait_for_ready {
                kept.push_back(waiter);
                continue;
            }
            failed += usize::from(waiter.slot.send(Err(error())).is_ok());
        }
        *queue = kept;
        failed
    }
}

#[cfg(all(test, grpc_pool_loom))]
mod loom_tests;
