//! The queue of checkouts waiting for a stream slot, and the hand-off of freed slots to it.
//!
//! Generic over what hands out slots (`SlotSource`), so it knows nothing of members or the
//! pool: members implement `SlotSource`, and the loom model (`wait_queue/loom_tests.rs`) runs
//! this same code over a stand-in without a connection.

use std::collections::VecDeque;

use crate::error::Error;
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{oneshot, Mutex, MutexGuard};

/// What the wait queue hands out: the slots of one member. `Arc<Member>` is the one the pool
/// uses; the loom model (`wait_queue/loom_tests.rs`) implements it over the same `Slots`
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
/// The protocol, which `wait_queue/loom_tests.rs` checks under loom:
/// - a caller that finds no free slot joins (`enqueue`: counts itself in `waiting`, SeqCst,
///   then queues under the lock), then looks for a free slot once more (`checkout_wait`),
///   and gives what it finds to the oldest waiter (`hand_on`), which may be itself;
/// - a releaser frees its slot (SeqCst), then reads `waiting` (SeqCst) and, if anybody
///   waits, `serve`s: under the lock, takes a slot for the oldest open waiter and sends it;
/// - a waiter that gives up closes its receiver, then counts itself out; a slot sent before
///   the close is dropped with the receiver (a release), one sent after comes back to
///   `serve`, which offers it to the next waiter or frees it under the lock.
///
/// FIFO holds among the waiters: a slot freed while a caller is joining may be taken by that
/// caller's second look before the releaser serves the queue, but the look hands it on to the
/// oldest waiter (the loom model found the overtaking before `hand_on`, and checks it is gone).
/// A caller on the fast path takes a free slot only when nobody is counted as waiting.
#[derive(Debug)]
pub(crate) struct WaitQueue<S> {
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
pub(crate) struct Waiting<'a, S> {
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
        loop {
            while queue.front().is_some_and(|w| w.slot.is_closed()) {
                queue.pop_front();
            }
            if queue.is_empty() {
                return;
            }
            let Some(slot) = member.try_acquire() else { return };
            if let Some(slot) = send_to_oldest(&mut queue, slot) {
                // Nobody left to take it; free it here, under the lock, so that a waiter
                // queueing next sees it when it looks at the slots again.
                M::free_leftover(slot);
                return;
            }
        }
    }

    /// Gives `slot`, which a caller that has just joined took on its second look, to the
    /// oldest open waiter, perhaps that caller itself: a look at the slots from inside the
    /// queue must not overtake anyone queued before it. Frees the slot, under the lock, if
    /// nobody takes it.
    pub(crate) fn hand_on<M: SlotSource<Slot = S> + ?Sized>(&self, slot: S) {
        let mut queue = self.lock();
        if let Some(slot) = send_to_oldest(&mut queue, slot) {
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

/// Sends `slot` to the oldest waiter still waiting, dropping from the queue those that gave
/// up; returns it if nobody took it.
fn send_to_oldest<S>(queue: &mut VecDeque<Waiter<S>>, mut slot: S) -> Option<S> {
    while let Some(waiter) = queue.pop_front() {
        match waiter.slot.send(Ok(slot)) {
            Err(Ok(back)) => slot = back, // gave up meanwhile: the next one
            _ => return None,
        }
    }
    Some(slot)
}

#[cfg(all(test, grpc_pool_loom))]
mod loom_tests;
