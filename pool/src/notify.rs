//! Waiting on a condition that a `Notify` announces, without missing a wake-up.

use tokio::sync::Notify;

/// Returns once `done()` holds. `notify` must be woken with `notify_waiters` after every
/// change that can make `done()` true; the waiter registers before it looks, so a change
/// between its look and its wait is never missed.
pub(crate) async fn until(notify: &Notify, mut done: impl FnMut() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
