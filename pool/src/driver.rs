//! A member's connection task: polls the `h2` connection, and tells the pool at once when
//! the server raises its stream limit, sends GOAWAY, or closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::budget::Ticket;
use crate::endpoint::EndpointShared;
use crate::events::MemberEvent;
use crate::events::PoolEvent;
use crate::inner::PoolInner;
use crate::member::{EvictionReason, Member};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Weak;

use crate::proto::h2::client::Connection;
use crate::proto::h2::frames::ConnSignals;

/// Counts a connection open on its endpoint for as long as its driver task runs.
pub(crate) struct OpenConnection(Arc<EndpointShared>);

impl OpenConnection {
    fn enter(endpoint: Arc<EndpointShared>) -> OpenConnection {
        endpoint.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(endpoint)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A member's connection task: polls the `h2` connection until it ends, and tells the pool
/// at once when the server sends GOAWAY and when the connection closes. Holds only weak
/// references, so a dropped pool is not kept alive by its connections.
pub(crate) async fn drive(
    mut connection: Connection,
    signals: Arc<ConnSignals>,
    member: Weak<Member>,
    pool: Weak<PoolInner>,
    endpoint: Arc<EndpointShared>,
    ticket: Ticket,
) {
    // The connection's place in the pool's budget, given back when it ends.
    let _ticket = ticket;
    let open = OpenConnection::enter(endpoint);
    let mut goaway_reported = false;
    // Each poll of the connection writes all the frames queued by then in one write. Woken
    // while other calls are in flight on the endpoint, the task first goes once to the back
    // of its worker's run queue (a wake of itself is a yield), so that the callers made
    // runnable with it, by the responses it last read, queue their next requests before it
    // writes: theirs then leave together. With one call in flight nobody would join the
    // write, and the yield would only cost a trip through the scheduler.
    let mut yielded = false;
    let result = poll_fn(|cx| {
        yielded = !yielded && open.0.in_flight.load(Ordering::Relaxed) > 1;
        if yielded {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let result = Pin::new(&mut connection).poll(cx);
        if signals.take_limit_raised() {
            if let (Some(pool), Some(member)) = (pool.upgrade(), member.upgrade()) {
                pool.serve_waiters(&member);
            }
        }
        if !goaway_reported && signals.goaway_seen() {
            goaway_reported = true;
            if let (Some(pool), Some(member)) = (pool.upgrade(), member.upgrade()) {
                if let Some(goaway) = signals.goaway() {
                    pool.emit(|| MemberEvent::GoAway {
                        member: member.clone(),
                        reason: goaway.reason(),
                        debug_data: goaway.debug_data.clone(),
                    });
                    pool.publish(|| PoolEvent::GoAway {
                        endpoint: member.endpoint.endpoint.clone(),
                        connection: member.id,
                        code: u32::from(goaway.reason()),
                        debug_data: String::from_utf8_lossy(&goaway.debug_data).into_owned(),
                    });
                }
                let detail = signals
                    .goaway()
                    .map(|g| {
                        format!(
                            "GOAWAY {:?} last_stream_id={} debug={:?}",
                            g.reason(),
                            g.last_stream_id,
                            String::from_utf8_lossy(&g.debug_data)
                        )
                    })
                    .unwrap_or_default();
                pool.evict(&member, EvictionReason::GoAway, &detail);
            }
        }
        result
    })
    .await;
    if let Err(error) = &result {
        signals.set_close_error(error.to_string());
    }
    signals.mark_closed();
    if let (Some(pool), Some(member)) = (pool.upgrade(), member.upgrade()) {
        pool.on_connection_closed(&member, result);
    }
}
