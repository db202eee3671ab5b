//! A loom model of the slot hand-off: a member's slots (`Slots`), the wait queue (`WaitQueue`:
//! `enqueue`, `serve`, `Waiting`'s drop) and the members' release (`SlotSource::release`),
//! the pool's own code, under every interleaving loom explores for 2 and 3 threads.
//!
//! What is not the pool's code here: `Probe` stands for a member (a real `Member` needs an
//! HTTP/2 connection) and implements `SlotSource` as `Arc<Member>` does, less the state and
//! routing checks; `ProbeSlot` drops as `Slot` does; the oneshot channel is the loom stand-in
//! of `crate::sync`; `checkout_wait` and `give_up` below follow the steps of
//! `PoolInner::checkout_wait` (join, look again and hand on what it finds, wait; on timeout
//! `try_recv`, then leave).
//!
//! `RUSTFLAGS="--cfg grpc_pool_loom" CARGO_TARGET_DIR=target/loom cargo test -p grpc-pool-core --lib loom`
//! (`docs/development.md`; CI runs it).

use loom::sync::atomic::AtomicUsize;
use loom::sync::Arc;
use loom::thread;

use super::{SlotSource, WaitQueue};
use crate::member::Slots;
use crate::sync::atomic::Ordering;

/// A member with `limit` slots and the queue its freed slots go to.
struct Probe {
    slots: Slots,
    limit: u32,
    waiters: WaitQueue<ProbeSlot>,
    /// Slots held now (taken and not yet dropped), to check that no two holders overlap.
    holders: AtomicUsize,
}

/// One slot of a `Probe`; dropping it does what dropping a `Slot` does.
struct ProbeSlot {
    member: Arc<Probe>,
    /// False for the queue's leftover, as in `Slot`.
    serve_waiters: bool,
}

impl std::fmt::Debug for ProbeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeSlot")
    }
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.member.slot_dropped(self.serve_waiters);
    }
}

impl SlotSource for Arc<Probe> {
    type Slot = ProbeSlot;

    fn try_acquire(&self) -> Option<ProbeSlot> {
        self.slots.try_take(self.limit).then(|| ProbeSlot { member: self.clone(), serve_waiters: true })
    }

    fn free_slot(&self) {
        self.slots.give_back();
    }

    fn serves_waiters(&self) -> bool {
        true
    }

    fn waiters(&self) -> &WaitQueue<ProbeSlot> {
        &self.waiters
    }

    fn free_leftover(mut slot: ProbeSlot) {
        slot.serve_waiters = false;
    }
}

/// A member with one slot, and that slot, taken: every model starts full.
fn full_member() -> (Arc<Probe>, ProbeSlot) {
    let member = Arc::new(Probe {
        slots: Slots::new(),
        limit: 1,
        waiters: WaitQueue::default(),
        holders: AtomicUsize::new(0),
    });
    let held = member.try_acquire().expect("a free slot");
    (member, held)
}

/// Holds `slot` for a moment and drops it, checking that nobody else holds one meanwhile
/// (the probes here have one slot).
fn use_and_drop(slot: ProbeSlot) {
    let holders = slot.member.holders.fetch_add(1, Ordering::SeqCst);
    assert_eq!(holders, 0, "two holders of the one slot");
    slot.member.holders.fetch_sub(1, Ordering::SeqCst);
    drop(slot);
}

/// A checkout that found no free slot, as `checkout_wait` goes on: joins the queue, looks at
/// the slots once more and hands what it finds to the oldest waiter (perhaps itself), then
/// waits for its turn. A wake-up that never comes leaves this thread blocked for good, which
/// loom reports as a deadlock.
fn checkout_wait(member: &Arc<Probe>) -> ProbeSlot {
    let mut waiting = join_and_look_again(member);
    let slot = match waiting.slot.try_recv() {
        Ok(slot) => slot,
        Err(_) => loom::future::block_on(&mut waiting.slot).expect("the queue keeps its senders"),
    };
    drop(waiting);
    slot.expect("no failure")
}

/// `checkout_wait`'s first steps: join, look at the slots again, hand a free one on.
fn join_and_look_again(member: &Arc<Probe>) -> super::Waiting<'_, ProbeSlot> {
    let waiting = member.waiters.enqueue(false);
    if let Some(slot) = member.try_acquire() {
        member.waiters.hand_on::<Arc<Probe>>(slot);
    }
    waiting
}

/// A checkout that joins the queue, finds no free slot, and gives up at once (its timeout):
/// `try_recv` for a slot sent meanwhile, then leaves the queue. Returns the slot it got.
fn give_up(member: &Arc<Probe>) -> Option<ProbeSlot> {
    let mut waiting = join_and_look_again(member);
    match waiting.slot.try_recv() {
        Ok(slot) => Some(slot.expect("no failure")),
        // Leaving: a slot sent between the `try_recv` and the close is dropped with the
        // receiver, and a release.
        Err(_) => None,
    }
}

/// After every thread is done: every slot is back and nobody is counted as waiting.
fn assert_settled(member: &Arc<Probe>) {
    assert_eq!(member.slots.in_flight(), 0, "a slot leaked");
    assert_eq!(member.waiters.len(), 0, "a waiter still counted");
}

/// Checks `f` under every interleaving loom explores with at most `preemptions` preemptions
/// (`None`: any number; `LOOM_MAX_PREEMPTIONS` overrides it), and says how many it ran
/// (`-- --nocapture`). The 2-thread models run exhaustively in a second; the 3-thread ones
/// take seconds with 3 preemptions, 40 s each with 4 (release build), and do not finish in
/// minutes without a bound.
fn model(preemptions: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = preemptions;
    }
    let counted = runs.clone();
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!("{} interleavings", runs.load(Ordering::Relaxed));
}

/// A release racing a caller that found the member full: the caller always ends up with the
/// slot, either by its own second look or through the queue (no lost wake-up), and the slot
/// comes back afterwards.
#[test]
fn loom_release_reaches_a_caller_joining_the_queue() {
    model(None, || {
        let (member, held) = full_member();

        let releaser = thread::spawn(move || drop(held));

        // The caller's fast path, then the queue if that found the member full.
        let slot = match member.try_acquire() {
            Some(slot) => slot,
            None => checkout_wait(&member),
        };
        use_and_drop(slot);

        releaser.join().unwrap();
        assert_settled(&member);
    });
}

/// Two waiters and a release, one slot: each waiter is served exactly once and never while
/// the other holds the slot, and the older waiter always goes first, even when the release's
/// decrement comes between the younger one's joining and the releaser's `serve` (its second
/// look finds the slot free, and hands it on to the older one: without `hand_on`, loom finds
/// the younger one first).
#[test]
fn loom_queue_serves_the_oldest_waiter_first() {
    model(Some(3), || {
        let (member, held) = full_member();
        let order = Arc::new(AtomicUsize::new(0));

        // The older waiter joins before anything else runs and finds the member full.
        let mut first = member.waiters.enqueue(false);
        assert!(member.try_acquire().is_none());

        let second = {
            let (member, order) = (member.clone(), order.clone());
            thread::spawn(move || {
                let slot = checkout_wait(&member);
                let turn = order.fetch_add(1, Ordering::SeqCst);
                use_and_drop(slot);
                turn
            })
        };
        let releaser = thread::spawn(move || drop(held));

        let slot = loom::future::block_on(&mut first.slot).unwrap().expect("no failure");
        drop(first);
        let first_turn = order.fetch_add(1, Ordering::SeqCst);
        use_and_drop(slot);

        let second_turn = second.join().unwrap();
        releaser.join().unwrap();
        assert!(first_turn < second_turn, "the younger waiter went first");
        assert_settled(&member);
    });
}

/// A waiter that gives up while the release hands it the slot: the slot is not lost. Either
/// the waiter got it (and drops it), or it went back to the member.
#[test]
fn loom_a_waiter_giving_up_leaks_no_slot() {
    model(None, || {
        let (member, held) = full_member();

        let releaser = thread::spawn(move || drop(held));
        if let Some(slot) = give_up(&member) {
            use_and_drop(slot);
        }

        releaser.join().unwrap();
        assert_settled(&member);
        assert!(member.try_acquire().is_some(), "the slot did not come back");
    });
}

/// As above with a second waiter, which joins before or after the one giving up: the slot
/// refused by the one leaving reaches it (no lost wake-up through the hand-back either).
#[test]
fn loom_a_slot_refused_by_a_leaving_waiter_reaches_the_next() {
    model(Some(3), || {
        let (member, held) = full_member();

        let leaving = {
            let member = member.clone();
            thread::spawn(move || {
                if let Some(slot) = give_up(&member) {
                    use_and_drop(slot);
                }
            })
        };
        let releaser = thread::spawn(move || drop(held));

        let slot = checkout_wait(&member);
        use_and_drop(slot);

        leaving.join().unwrap();
        releaser.join().unwrap();
        assert_settled(&member);
    });
}
