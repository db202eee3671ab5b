//! The whole pool's connection budget (`max_total_connections`): connects under way and
//! connections open, over every endpoint, never more than the cap. A connect takes a
//! [`Ticket`] before it opens its socket; the ticket goes with the connection to its driver
//! task and is given back when the connection ends (or at once, when the connect fails).

use std::sync::Arc;

use tokio::sync::Notify;

use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Connections counted against the cap.
#[derive(Debug)]
pub(crate) struct ConnectionBudget {
    used: AtomicUsize,
    cap: usize,
    /// A connect was refused a ticket since the last one was given back: whoever gives one
    /// back wakes the pool's budget task, which tries the endpoints' connects again.
    refused: AtomicBool,
    pub(crate) freed: Notify,
}

/// One connection's place in the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<ConnectionBudget>);

impl ConnectionBudget {
    /// A budget of `cap` connections; `None`: no cap (tickets are still counted).
    pub(crate) fn new(cap: Option<usize>) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            used: AtomicUsize::new(0),
            cap: cap.unwrap_or(usize::MAX),
            refused: AtomicBool::new(false),
            freed: Notify::new(),
        })
    }

    /// A ticket, if the budget has room.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Ticket> {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used < self.cap).then_some(used + 1));
        match taken {
            Ok(_) => Some(Ticket(self.clone())),
            Err(_) => {
                self.refused.store(true, Ordering::Release);
                None
            }
        }
    }

    /// Connects under way and connections open now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Whether the cap is reached.
    pub(crate) fn is_exhausted(&self) -> bool {
        self.used() >= self.cap
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
        if self.0.refused.swap(false, Ordering::AcqRel) {
            self.0.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_stop_at_the_cap_and_a_ticket_given_back_says_so_to_the_refused() {
        let budget = ConnectionBudget::new(Some(2));
        let a = budget.take().unwrap();
        let _b = budget.take().unwrap();
        assert!(budget.take().is_none());
        assert!(budget.is_exhausted());
        drop(a);
        assert_eq!(budget.used(), 1);
        // The refusal left a wake-up for the budget task.
        let notified = budget.freed.notified();
        poll_once(notified);
        assert!(budget.take().is_some());
        let unlimited = ConnectionBudget::new(None);
        let tickets: Vec<_> = (0..1000).map(|_| unlimited.take().unwrap()).collect();
        assert_eq!(unlimited.used(), 1000);
        drop(tickets);
        assert_eq!(unlimited.used(), 0);
    }

    /// Polls a `Notified` once: ready if a permit was stored.
    fn poll_once(notified: tokio::sync::futures::Notified<'_>) {
        use std::future::Future;
        let mut notified = std::pin::pin!(notified);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(notified.as_mut().poll(&mut cx).is_ready(), "the refused connect is woken");
    }
}
