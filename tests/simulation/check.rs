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
