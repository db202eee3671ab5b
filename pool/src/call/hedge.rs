//! The bookkeeping of a hedged call (gRPC A6's `hedgingPolicy`): the copies out, what each
//! copy sends, when the next one is due, and the outcome kept while the others go on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;
use tonic::Code;

use super::attempt::{Head, Sending};
use crate::inner::PoolInner;
use crate::proto::h2::replay::Recording;
use crate::service_config::HedgingPolicy;

/// How a copy ended with a non-fatal status: its trailers-only answer, or its stream's
/// failure. Kept (with its slot) in case no other copy does better.
pub(super) enum Ended<B> {
    Answer(Sending<B>, http::Response<h2::RecvStream>),
    Failed(Sending<B>, h2::Error),
}

impl<B> Ended<B> {
    /// Counts the copy's outcome for outlier detection, as the outcome that ends a call is
    /// counted: a copy passed over for a later one still tells how its endpoint is. An
    /// ejection goes through the pool's ejector task, as a response body's does: this runs
    /// from `Drop` too, maybe outside any runtime.
    pub(super) fn count_outcome(&self) {
        let (Ended::Answer(sending, _) | Ended::Failed(sending, _)) = self;
        let endpoint = &sending.slot.member().endpoint;
        let failures = endpoint.record_outcome(|| match self {
            Ended::Answer(_, response) => crate::outlier::unavailable(response.headers()),
            Ended::Failed(_, err) => crate::outlier::is_failure(err),
        });
        if let Some(failures) = failures {
            endpoint.ask_ejection(failures);
        }
    }
}

/// A hedged call's copies and schedule.
pub(super) struct Hedge<B> {
    /// The copies out now, with their number (0 for the first).
    pub(super) attempts: Vec<(u32, Sending<B>)>,
    /// What every copy sends: the head and the whole body, once the first copy's body went
    /// out whole.
    copy: Option<(Head, Recording)>,
    /// When the next copy is due; `None`: now.
    timer: Option<Pin<Box<Sleep>>>,
    /// Copies sent so far, the first included (and those of the call's earlier hedges).
    pub(super) sent: u32,
    max_attempts: u32,
    delay: Duration,
    non_fatal: Vec<Code>,
    /// The latest copy that ended with a non-fatal status.
    pub(super) last: Option<Ended<B>>,
    /// No more copies: throttled, or one could not be sent.
    stopped: bool,
}

impl<B> Hedge<B> {
    /// The copies of a call whose first copy (since `sent_before` copies of it that were
    /// lost and sent again) just went out: all of them count against `maxAttempts`.
    pub(super) fn new(first: Sending<B>, policy: &HedgingPolicy, sent_before: u32) -> Hedge<B> {
        Hedge {
            attempts: vec![(sent_before, first)],
            copy: None,
            timer: Some(Box::pin(tokio::time::sleep(policy.hedging_delay))),
            sent: sent_before + 1,
            max_attempts: policy.max_attempts,
            delay: policy.hedging_delay,
            non_fatal: policy.non_fatal_status_codes.clone(),
            last: None,
            stopped: false,
        }
    }

    pub(super) fn is_non_fatal(&self, code: Code) -> bool {
        code != Code::Ok && self.non_fatal.contains(&code)
    }

    /// A copy ended with a non-fatal status: it counts as a failure for the throttle, and
    /// the next copy is due at once (A6).
    pub(super) fn failed_non_fatally(&mut self, pool: &Arc<PoolInner>, ended: Ended<B>) {
        if let Some(tokens) = &pool.retry_tokens {
            if !tokens.failure() {
                pool.count_throttled_retry();
                self.stopped = true;
            }
        }
        self.set_aside(ended);
    }

    /// A copy was lost with its connection (or refused unseen): no answer of the server's,
    /// so neither a status that ends the call nor one for the throttle. The others go on and
    /// the next copy is due at once, as after a non-fatal status.
    pub(super) fn lost_copy(&mut self, sending: Sending<B>, err: h2::Error) {
        self.set_aside(Ended::Failed(sending, err));
    }

    /// Keeps `ended` as the call's outcome should no other copy do better; sends the next
    /// copy now.
    fn set_aside(&mut self, ended: Ended<B>) {
        // The one kept before is passed over now: it will not end the call.
        if let Some(passed_over) = self.last.replace(ended) {
            passed_over.count_outcome();
        }
        self.timer = None;
    }

    /// Whether a copy's stream failed because its connection did (it broke, or went away
    /// with the stream unseen) or the server refused the stream unseen: a transport failure
    /// of that copy, not an answer to the call.
    pub(super) fn is_lost(err: &h2::Error) -> bool {
        err.is_io() || err.is_go_away() || err.reason() == Some(h2::Reason::REFUSED_STREAM)
    }

    /// A copy went out: the next one is due a `hedgingDelay` later.
    pub(super) fn sent_copy(&mut self, sending: Sending<B>) {
        self.attempts.push((self.sent, sending));
        self.sent += 1;
        self.timer = Some(Box::pin(tokio::time::sleep(self.delay)));
    }

    pub(super) fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether another copy may still go out: attempts left, not stopped, and a body to
    /// send (or the hope of one, while a copy is still sending it).
    pub(super) fn can_send_more(&self) -> bool {
        !self.stopped && self.sent < self.max_attempts && (self.copy.is_some() || !self.attempts.is_empty())
    }

    /// Keeps the head and body to copy, once a copy has sent its body whole.
    pub(super) fn keep_copy(&mut self) {
        if self.copy.is_some() {
            return;
        }
        self.copy = self.attempts.iter().find_map(|(_, sending)| {
            Some((sending.head.as_ref()?.clone(), sending.sent_body.as_ref()?.clone()))
        });
    }

    pub(super) fn next_copy(&self) -> Option<(Head, Recording)> {
        self.copy.clone()
    }

    /// Whether the next copy is due; if not, the task is woken when it is.
    pub(super) fn due(&mut self, cx: &mut Context<'_>) -> bool {
        match self.timer.as_mut() {
            Some(timer) => timer.as_mut().poll(cx).is_ready(),
            None => true,
        }
    }

    /// Waits `delay` (at least a millisecond: a `hedgingDelay` of 0 must not spin while no
    /// slot is free) before the next try, with the task's waker registered. A copy that is
    /// due but has no body yet is tried again when a copy's progress wakes the task.
    pub(super) fn wait(&mut self, cx: &mut Context<'_>) {
        if self.copy.is_none() {
            self.timer = None;
            return;
        }
        let mut timer = Box::pin(tokio::time::sleep(self.delay.max(Duration::from_millis(1))));
        if timer.as_mut().poll(cx).is_ready() {
            // Due already: poll again rather than wait for nothing.
            cx.waker().wake_by_ref();
        }
        self.timer = Some(timer);
    }
}
