//! The checks made once a run is over (the ones made as it goes are in client.rs).

use std::collections::BTreeMap;

use grpc_pool::state::Statistics;

use super::plan::Plan;
use super::trace::Journal;

/// The server-side ledger: a handler runs a call more than once only under a retry or
/// hedging policy, and never more often than the policy's attempts (at most 5).
pub fn ledger(plan: &Plan, journal: &Journal, at: std::time::Duration) {
    let allowed = plan.pool.policy.runs_allowed();
    let mut runs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (id, server, attempt) in journal.ledger() {
        runs.entry(id).or_default().push(format!("{server} (previous attempts {attempt})"));
    }
    for (id, runs) in runs {
        if runs.len() > allowed {
            journal.violation_at(
                at,
                "ledger",
                format!(
                    "call {id} ran {} times under {:?} (at most {allowed}): {}",
                    runs.len(),
                    plan.pool.policy,
                    runs.join(", ")
                ),
            );
        }
    }
}

/// Reconnects are paced: once a connect to a server has failed, and until one to it succeeds,
/// no connect to it starts sooner after the one before than the backoff's least delay or
/// `refused_retry` (whichever is less) allows, however many calls find it down. (A server
/// added again by discovery is a new endpoint and starts afresh.)
pub fn connects(plan: &Plan, journal: &Journal) {
    use super::plan::{BACKOFF_BASE, BACKOFF_JITTER};
    let retry = grpc_pool::BackoffConfig::default().refused_retry;
    // Less a tick: the simulation moves by the millisecond.
    let least = retry
        .min(BACKOFF_BASE.mul_f64(1.0 - BACKOFF_JITTER))
        .saturating_sub(std::time::Duration::from_millis(1));
    let connects = journal.connects();
    for attempt in &connects {
        let added_again = plan.discovery.iter().any(|d| {
            d.insert && super::plan::server_name(d.server) == attempt.host && d.at <= attempt.started
        });
        // The latest connect to the same server that ended before this one began, if it
        // failed, and no connect to it succeeded while it was under way or since: a failure
        // that overlapped a success belongs to the round that success ended (the pool counts
        // attempts under way together as one round), so it does not make the server failing.
        let before = connects.iter().filter(|c| c.host == attempt.host && c.ended < attempt.started);
        let Some(last) = before.clone().max_by_key(|c| c.ended) else { continue };
        if last.connected || before.clone().any(|c| c.connected && c.ended >= last.started) {
            continue;
        }
        let readded = added_again
            && plan.discovery.iter().any(|d| {
                d.insert
                    && super::plan::server_name(d.server) == attempt.host
                    && d.at >= last.started
                    && d.at <= attempt.started
            });
        let previous = before.map(|c| c.started).max().unwrap_or_default();
        if !readded && attempt.started.saturating_sub(previous) < least {
            journal.violation_at(
                attempt.started,
                "connects",
                format!(
                    "a connect to {} began at {:?}, {:?} after the one before, while its connects failed (the last ended at {:?}; at least {least:?})",
                    attempt.host,
                    attempt.started,
                    attempt.started - previous,
                    last.ended,
                ),
            );
        }
    }
}

/// The pool's statistics add up after the close: every connection opened was closed for
/// some reason.
pub fn statistics(_plan: &Plan, stats: &Statistics, journal: &Journal) {
    let closed: u64 = stats.connections_closed.iter().map(|(_, n)| n).sum();
    journal.note(format!(
        "statistics: {} connections opened, {closed} closed {:?}, {} connect failures, {} direct and {} waited checkouts, {} checkout timeouts, {} resends, {} policy retries, {} hedges sent",
        stats.connections_created,
        stats.connections_closed.iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>(),
        stats.connect_failures,
        stats.checkouts_direct,
        stats.checkouts_waited,
        stats.checkout_timeouts,
        stats.retries,
        stats.policy_retries,
        stats.hedges_sent,
    ));
    if closed != stats.connections_created {
        journal.violation(
            "statistics",
            format!("{} connections opened but {closed} closed after Pool::close", stats.connections_created),
        );
    }
    let by_reason: u64 = stats.retries_by_reason.iter().map(|(_, n)| n).sum();
    if by_reason != stats.retries {
        journal.violation("statistics", format!("{} resends, but {by_reason} by reason", stats.retries));
    }
    if stats.hedges_won + stats.hedges_cancelled
        > stats.hedges_sent + stats.checkouts_direct + stats.checkouts_waited
    {
        journal.violation("statistics", "more hedged copies won or cancelled than were sent");
    }
}
