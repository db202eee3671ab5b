//! A member's stream slots: the counter that caps its streams, the `Slot` a call holds, and
//! the member's side of the wait queue's hand-off (`SlotSource`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{Member, STATE_READY};
use crate::sync::atomic::{AtomicU32, Ordering};
use crate::wait_queue::{SlotSource, WaitQueue};

/// The wait queue's view of a member: its slots, and whether freed ones may go to waiters.
/// `release`, the members' half of the hand-off, is the trait's own (see `SlotSource`).
impl SlotSource for Arc<Member> {
    type Slot = Slot;

    #[inline]
    fn try_acquire(&self) -> Option<Slot> {
        Member::try_acquire(self)
    }

    #[inline]
    fn free_slot(&self) {
        self.slots.give_back();
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    #[inline]
    fn serves_waiters(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_READY && self.endpoint.routable.load(Ordering::Acquire)
    }

    #[inline]
    fn waiters(&self) -> &WaitQueue<Slot> {
        &self.waiters
    }

    #[inline]
    fn free_leftover(slot: Slot) {
        slot.release_quietly();
    }
}

/// A member's stream slots: how many streams it carries now, taken below a limit with a
/// compare-and-swap. The wait queue's loom model (`wait_queue/loom_tests.rs`) runs this same
/// counter, so every ordering here is one the model checks.
#[derive(Debug)]
pub(crate) struct Slots {
    in_flight: AtomicU32,
}

impl Slots {
    pub(crate) fn new() -> Slots {
        Slots { in_flight: AtomicU32::new(0) }
    }

    /// Streams in flight now (a gauge: no ordering with anything else).
    #[inline]
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes a slot if fewer than `limit` are taken.
    #[inline]
    pub(crate) fn try_take(&self, limit: u32) -> bool {
        // SeqCst pairs with the wait queue: a waiter counts itself in, then reads this; a
        // releaser decrements this, then reads the count. One of the two sees the other.
        let mut current = self.in_flight.load(Ordering::SeqCst);
        loop {
            if current >= limit {
                return false;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Takes a slot whatever the limit.
    #[inline]
    pub(crate) fn force_take(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Gives a slot back; the caller then looks for waiters (see `SlotSource::release`).
    #[inline]
    pub(crate) fn give_back(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The right to one stream on a member. Dropping it frees the slot, or hands it straight to
/// the longest waiting checkout.
pub(crate) struct Slot {
    member: Arc<Member>,
    /// False only for the wait queue's own leftovers, which it frees under its lock.
    serve_waiters: bool,
    /// How long no stream had started on the member before this one: a member unused for
    /// long is PINGed before use when the pool is configured so.
    pub(crate) unused_for: Duration,
    /// Counted against the pool's cap on calls in flight (`circuit.rs`).
    counted: bool,
}

impl Slot {
    #[inline]
    pub(super) fn new(member: Arc<Member>, unused_for: Duration, counted: bool) -> Slot {
        Slot { member, serve_waiters: true, unused_for, counted }
    }

    pub(crate) fn member(&self) -> &Arc<Member> {
        &self.member
    }

    /// Whether it counts against the pool's cap on calls in flight.
    pub(crate) fn counted(&self) -> bool {
        self.counted
    }

    /// Frees the slot without serving waiters; for the wait queue itself, which holds its
    /// lock while it calls this.
    pub(crate) fn release_quietly(mut self) {
        self.serve_waiters = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.counted {
            self.member.endpoint.requests.uncount();
        }
        self.member.slot_dropped(self.serve_waiters);
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("member", &self.member.id).finish()
    }
}
