//! The members' timer queue: due times on a grid, a list of entries per grid slot.
//!
//! Every member's next look is rounded up to the grid ([`BATCH`](super::BATCH)) anyway, so
//! that one wake-up of the task serves every member due in the same slot. A general timer
//! wheel (`tokio_util`'s `DelayQueue`, used before) keeps a slab entry per timer, links it
//! into wheel levels and walks them on expiry: about 4,600 instructions per keepalive PING
//! (two expiries and two inserts), a quarter of the client's whole cost of a PING at 10,000
//! idle members. Here an entry is a push onto its slot's list; moving it pushes it onto
//! another list and leaves the old push behind, stale (its version no longer matches), to
//! be skipped when that slot falls due; expiry pops whole slots from an ordered map.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// An entry's handle: its place, and the generation of that place (places are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GridKey {
    index: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry<T> {
    value: Option<T>,
    /// Bumped when the place is freed: an old key no longer finds it.
    generation: u32,
    /// Bumped when the entry moves: its earlier pushes are stale.
    version: u64,
}

/// A push onto a slot's list: which entry, and its version then.
type Push = (u32, u64);

#[derive(Debug)]
pub(super) struct GridQueue<T> {
    epoch: Instant,
    step: Duration,
    /// Slot number (steps since `epoch`) to the pushes due in it.
    slots: BTreeMap<u64, Vec<Push>>,
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
    /// Pushes of slots that fell due, being handed out.
    due: Vec<Push>,
    sleep: Pin<Box<Sleep>>,
    /// The slot `sleep` is set for.
    sleeping_for: Option<u64>,
    versions: u64,
}

impl<T> GridQueue<T> {
    pub(super) fn new(epoch: Instant, step: Duration) -> GridQueue<T> {
        GridQueue {
            epoch,
            step,
            slots: BTreeMap::new(),
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            due: Vec::new(),
            sleep: Box::pin(tokio::time::sleep_until(epoch)),
            sleeping_for: None,
            versions: 0,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The first slot that starts at or after `at`.
    fn slot_of(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        since.div_ceil(self.step.as_nanos()) as u64
    }

    fn start_of(&self, slot: u64) -> Instant {
        self.epoch + Duration::from_nanos((u128::from(slot) * self.step.as_nanos()) as u64)
    }

    fn push(&mut self, index: u32, at: Instant) {
        self.versions += 1;
        self.entries[index as usize].version = self.versions;
        let slot = self.slot_of(at);
        self.slots.entry(slot).or_default().push((index, self.versions));
    }

    /// Adds `value`, due at `at` rounded up to the grid.
    pub(super) fn insert_at(&mut self, value: T, at: Instant) -> GridKey {
        let index = match self.free.pop() {
            Some(index) => {
                self.entries[index as usize].value = Some(value);
                index
            }
            None => {
                self.entries.push(Entry { value: Some(value), generation: 0, version: 0 });
                (self.entries.len() - 1) as u32
            }
        };
        self.len += 1;
        self.push(index, at);
        GridKey { index, generation: self.entries[index as usize].generation }
    }

    fn live(&self, key: &GridKey) -> bool {
        self.entries
            .get(key.index as usize)
            .is_some_and(|e| e.generation == key.generation && e.value.is_some())
    }

    /// Moves the entry to `at`; a key of an entry no longer queued is ignored.
    pub(super) fn reset_at(&mut self, key: &GridKey, at: Instant) {
        if self.live(key) {
            self.push(key.index, at);
        }
    }

    fn take(&mut self, index: u32) -> Option<T> {
        let entry = &mut self.entries[index as usize];
        let value = entry.value.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(index);
        self.len -= 1;
        Some(value)
    }

    /// Takes the entry out; its pushes become stale.
    pub(super) fn remove(&mut self, key: &GridKey) -> Option<T> {
        if !self.live(key) {
            return None;
        }
        self.take(key.index)
    }

    /// The next entry whose slot has begun; `Pending` (with a timer for the first slot)
    /// while none has. Never `Ready(None)`: an empty queue waits for inserts, which only
    /// its owner makes (and polls again after).
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        loop {
            while let Some((index, version)) = self.due.pop() {
                if self.entries[index as usize].version == version {
                    if let Some(value) = self.take(index) {
                        return Poll::Ready(value);
                    }
                }
            }
            let Some(&slot) = self.slots.keys().next() else { return Poll::Pending };
            let start = self.start_of(slot);
            if start > Instant::now() {
                if self.sleeping_for != Some(slot) {
                    self.sleep.as_mut().reset(start);
                    self.sleeping_for = Some(slot);
                }
                if self.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // Its slot began (or its timer says so): hand out its entries, in the order
            // they were pushed.
            self.sleeping_for = None;
            if let Some(mut pushes) = self.slots.remove(&slot) {
                pushes.reverse();
                self.due = pushes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    const STEP: Duration = Duration::from_millis(50);

    async fn next(queue: &mut GridQueue<u32>) -> u32 {
        poll_fn(|cx| queue.poll_expired(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn hands_out_entries_at_their_slot_in_order() {
        let epoch = Instant::now();
        let mut queue = GridQueue::new(epoch, STEP);
        queue.insert_at(2, epoch + Duration::from_millis(120)); // slot of 150 ms
        queue.insert_at(1, epoch + Duration::from_millis(10)); // slot of 50 ms
        queue.insert_at(3, epoch + Duration::from_millis(150)); // 150 ms exactly
        assert_eq!(next(&mut queue).await, 1);
        assert_eq!(epoch.elapsed(), Duration::from_millis(50));
        assert_eq!(next(&mut queue).await, 2);
        assert_eq!(next(&mut queue).await, 3);
        assert_eq!(epoch.elapsed(), Duration::from_millis(150));
        assert!(queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_entry_comes_once_at_its_new_slot_and_a_removed_one_never() {
        let epoch = Instant::now();
        let mut queue = GridQueue::new(epoch, STEP);
        let moved = queue.insert_at(1, epoch + STEP);
        let removed = queue.insert_at(2, epoch + STEP);
        queue.insert_at(3, epoch + 4 * STEP);
        queue.reset_at(&moved, epoch + 3 * STEP);
        assert_eq!(queue.remove(&removed), Some(2));
        assert_eq!(queue.remove(&removed), None, "a key is good once");
        assert_eq!(next(&mut queue).await, 1);
        assert_eq!(epoch.elapsed(), 3 * STEP, "not at its first slot, where its stale push was");
        assert_eq!(next(&mut queue).await, 3);
        assert!(queue.is_empty());
        // The freed places are reused; the old keys do not reach the new entries.
        let reused = queue.insert_at(4, epoch + 6 * STEP);
        queue.reset_at(&moved, epoch + 5 * STEP);
        assert_eq!(queue.remove(&moved), None);
        assert_ne!(reused, moved);
        assert_eq!(next(&mut queue).await, 4);
        assert_eq!(epoch.elapsed(), 6 * STEP);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_due_in_the_past_comes_at_once_and_rounding_is_upward() {
        let epoch = Instant::now();
        tokio::time::advance(Duration::from_millis(70)).await;
        let mut queue = GridQueue::new(epoch, STEP);
        queue.insert_at(9, epoch);
        queue.insert_at(8, epoch + Duration::from_millis(101));
        assert_eq!(next(&mut queue).await, 9);
        assert_eq!(epoch.elapsed(), Duration::from_millis(70), "due before now: at once");
        assert_eq!(next(&mut queue).await, 8);
        assert_eq!(epoch.elapsed(), 3 * STEP, "101 ms rounds up to 150 ms");
    }
}
