//! The service config's retry and hedging policies, as a call's future carries them out:
//! the backoff before a policy retry, the copies of a hedged call and which one wins, and the
//! attempts counted when the call ends. What to retry is decided in `call::retry`; the
//! copies themselves are kept in `call::hedge`.

use super::*;

impl<B> ResponseFuture<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// The attempt ended with a status the retry policy retries, and the whole body is at
    /// hand: waits out the backoff (or the server's pushback), then queues the call again,
    /// on another endpoint when there is one.
    pub(super) fn retry(
        &mut self,
        sending: Sending<B>,
        code: tonic::Code,
        pushback: Option<std::time::Duration>,
        mut head: Head,
        body: CallBody<B>,
    ) -> Step {
        self.retries += 1;
        let delay = match pushback {
            Some(delay) => {
                // The server said when: that exactly, and the backoff starts over (A6).
                self.backoff_n = 0;
                delay
            }
            None => {
                self.backoff_n += 1;
                self.retry_policy().map(|p| p.backoff(self.backoff_n)).unwrap_or_default()
            }
        };
        self.avoid = Some(sending.slot.member().endpoint.clone());
        sending.span.in_scope(|| {
            tracing::debug!(
                code = crate::service_config::code_name(code),
                retry = self.retries,
                ?delay,
                "retrying a call under its retry policy",
            )
        });
        drop(sending);
        self.pool.count_policy_retry(code);
        retry::set_previous_attempts(&mut head, self.retries);
        let request = rebuild(head, body);
        self.state = Some(Live::Backoff { request, sleep: Box::pin(tokio::time::sleep(delay)) });
        Step::Continue(())
    }

    /// Moves a hedged call on: polls every copy out, sends the next copy when it is due,
    /// and ends the call with the first response head that is not a non-fatal status (the
    /// other copies are dropped, which resets their streams with `CANCEL`). `None` while it
    /// waits, its state put back in place.
    pub(super) fn poll_hedge(&mut self, mut hedge: Box<Hedge<B>>, cx: &mut Context<'_>) -> Option<Step> {
        loop {
            let mut i = 0;
            while i < hedge.attempts.len() {
                let Poll::Ready(head) = hedge.attempts[i].1.poll_head(cx) else {
                    i += 1;
                    continue;
                };
                let (copy, sending) = hedge.attempts.swap_remove(i);
                match head {
                    // Dropping `hedge` resets the other copies.
                    Err(body_failed) => {
                        self.abandon(Live::Hedging(hedge));
                        return Some(Step::Break(Err(body_failed)));
                    }
                    Ok(Ok(response)) => {
                        if retry::status(response.headers()).is_some_and(|code| hedge.is_non_fatal(code)) {
                            hedge.failed_non_fatally(&self.pool, Ended::Answer(sending, response));
                            continue;
                        }
                        self.hedge_over(hedge, Some(copy));
                        return Some(self.answered(sending, response));
                    }
                    Ok(Err(err)) => {
                        if hedge.is_non_fatal(crate::error::code_for_h2(&err)) {
                            hedge.failed_non_fatally(&self.pool, Ended::Failed(sending, err));
                            continue;
                        }
                        // A copy whose connection broke under it is not the server's answer:
                        // it must not cancel the copies still out. With none out, the call
                        // goes on as any call whose stream failed (`failed`: resent through
                        // the checkout queue if the server never saw it, where waiting and
                        // failing fast follow the call's wait-for-ready).
                        if Hedge::<B>::is_lost(&err) && !hedge.attempts.is_empty() {
                            hedge.lost_copy(sending, err);
                            continue;
                        }
                        self.hedge_over(hedge, None);
                        return Some(self.failed(sending, err));
                    }
                }
            }
            hedge.keep_copy();
            if hedge.attempts.is_empty() && !hedge.can_send_more() {
                // Every copy ended with a non-fatal status (or was lost) and no other may
                // go: the last one's outcome is the call's.
                self.hedge_sent = hedge.sent;
                let step = match hedge.last.take() {
                    Some(Ended::Answer(sending, response)) => self.answered(sending, response),
                    Some(Ended::Failed(sending, err)) => self.failed(sending, err),
                    None => {
                        Step::Break(Err(Error::no_member(self.pool.name(), "no hedged copy could be sent")))
                    }
                };
                return Some(step);
            }
            if hedge.can_send_more() && hedge.due(cx) {
                if let Some((head, body)) = hedge.next_copy() {
                    // Sent, or no other may go (throttled, or none could be sent): look again
                    // now rather than after a delay.
                    if self.send_copy(&mut hedge, head, body) || !hedge.can_send_more() {
                        continue;
                    }
                    if let Some((head, body)) = hedge.next_copy().filter(|_| hedge.attempts.is_empty()) {
                        // No copy out and no slot free now: the next copy queues as any call
                        // does (its deadline, wait-for-ready and failing fast hold there),
                        // and the copy set aside gives its slot back meanwhile. Waiting here
                        // on it instead, calls that hold every slot would wait on each other.
                        return Some(self.queue_next_copy(hedge, head, body));
                    }
                }
                hedge.wait(cx);
            }
            self.state = Some(Live::Hedging(hedge));
            return None;
        }
    }

    /// Sends the next hedged copy on a slot free now, on another endpoint than the last
    /// copy's when there is one. False if it did not go out.
    fn send_copy(&mut self, hedge: &mut Hedge<B>, mut head: Head, body: Recording) -> bool {
        // Throttled (A6): no hedges while the tokens are at or below half.
        if self.pool.retry_tokens.as_ref().is_some_and(|tokens| !tokens.allows()) {
            self.pool.count_throttled_retry();
            hedge.stop();
            return false;
        }
        let avoid = hedge.attempts.last().map(|(_, s)| s.slot.member().endpoint.clone());
        let slot = match slot_now(&self.pool, &self.target, avoid.as_ref()) {
            Ok(Some(slot)) => slot,
            // No slot now: the next try after another delay.
            Ok(None) => return false,
            Err(_) => {
                hedge.stop();
                return false;
            }
        };
        retry::set_previous_attempts(&mut head, hedge.sent);
        match self.open(slot, rebuild(head, CallBody::replay(body, None))) {
            Opened::Sent(sending) => {
                sending.span.in_scope(|| tracing::debug!(copy = hedge.sent, "sending a hedged copy"));
                hedge.sent_copy(sending);
                self.hedged += 1;
                self.pool.count_hedges("sent", 1);
                true
            }
            _ => {
                hedge.stop();
                false
            }
        }
    }

    /// A copy's answer (`winner`), or its failure (`None`), ends the call: the others are
    /// cancelled (dropped, which resets their streams).
    fn hedge_over(&mut self, hedge: Box<Hedge<B>>, winner: Option<u32>) {
        self.hedge_sent = hedge.sent;
        if winner.is_some_and(|copy| copy > 0) {
            self.pool.count_hedges("won", 1);
        }
        self.cancel_copies(hedge);
    }

    /// Puts the hedged call back in the checkout queue for its next copy, which then starts
    /// a hedge of its own, counting on from this one's copies.
    fn queue_next_copy(&mut self, hedge: Box<Hedge<B>>, mut head: Head, body: Recording) -> Step {
        self.hedge_sent = hedge.sent;
        retry::set_previous_attempts(&mut head, hedge.sent);
        self.cancel_copies(hedge);
        self.state = Some(Live::checkout(rebuild(head, CallBody::replay(body, None))));
        Step::Continue(())
    }
}

impl<B> ResponseFuture<B> {
    /// The call is over, with whatever result (or dropped): counts the streams it opened
    /// when it had a retry or hedging policy.
    pub(super) fn finished(&self) {
        let policy =
            self.method.as_ref().is_some_and(|m| m.retry_policy.is_some() || m.hedging_policy.is_some());
        if policy && self.streams > 0 {
            self.pool.record_call_attempts(self.streams);
        }
    }

    /// The call ends in `live`, unanswered (its deadline passed, its caller dropped it, its
    /// request body failed): what it had out is cancelled and counted.
    pub(super) fn abandon(&self, live: Live<B>) {
        if let Live::Hedging(hedge) = live {
            self.cancel_copies(hedge);
        }
    }

    /// Resets every copy still out (by dropping it) and counts them, with the outcome of
    /// one set aside, which will not end the call now.
    fn cancel_copies(&self, mut hedge: Box<Hedge<B>>) {
        if let Some(passed_over) = hedge.last.take() {
            passed_over.count_outcome();
        }
        let cancelled = hedge.attempts.len() as u64;
        if cancelled > 0 {
            self.pool.count_hedges("cancelled", cancelled);
        }
        drop(hedge);
    }
}

impl<B> Drop for ResponseFuture<B> {
    /// A call dropped before it ended (its caller gave up) still counts: its hedged copies
    /// as cancelled, its attempts in the histogram.
    fn drop(&mut self) {
        if let Some(live) = self.state.take() {
            self.abandon(live);
            self.finished();
        }
    }
}
