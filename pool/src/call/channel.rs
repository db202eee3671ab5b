use std::fmt;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Body;
use tower_service::Service;

use super::attempt::Target;
use super::future::ResponseFuture;
use crate::error::Error;
use crate::inner::PoolInner;
use crate::internals::EndpointEntry;
use crate::member::Member;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Sends calls to one endpoint of a pool, on its least loaded ready member, whether the
/// endpoint is marked healthy or not and whether that member is full or not (the stream then
/// waits in HTTP/2 for room). Made for health checks, which must neither skip the endpoint
/// they judge nor be starved by its traffic. From
/// [`PoolMonitor::endpoint_channel`](crate::PoolMonitor::endpoint_channel).
#[derive(Clone)]
pub struct EndpointChannel {
    pool: Arc<PoolInner>,
    entry: Weak<EndpointEntry>,
    label: String,
}

impl EndpointChannel {
    pub(crate) fn new(pool: Arc<PoolInner>, entry: &Arc<EndpointEntry>) -> EndpointChannel {
        EndpointChannel { pool, entry: Arc::downgrade(entry), label: entry.label().to_owned() }
    }
}

/// Sends calls on one member (one connection) and no other; fails if it is not ready. Made
/// for probing a connection with a real stream. From
/// [`MemberHandle::channel`](crate::MemberHandle::channel).
#[derive(Clone)]
pub struct MemberChannel {
    pool: Arc<PoolInner>,
    member: Weak<Member>,
}

impl MemberChannel {
    pub(crate) fn new(pool: Arc<PoolInner>, member: Weak<Member>) -> MemberChannel {
        MemberChannel { pool, member }
    }
}

macro_rules! channel_service {
    ($channel:ty, $target:expr) => {
        impl<B> Service<Request<B>> for $channel
        where
            B: Body<Data = Bytes> + Send + 'static,
            B::Error: Into<BoxError>,
        {
            type Response = http::Response<super::ResponseBody>;
            type Error = Error;
            type Future = ResponseFuture<B>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, request: Request<B>) -> Self::Future {
                #[allow(clippy::redundant_closure_call)]
                let target = ($target)(&*self);
                ResponseFuture::to(self.pool.clone(), target, request)
            }
        }
    };
}

channel_service!(EndpointChannel, |c: &EndpointChannel| Target::Endpoint(c.entry.clone(), c.label.clone()));
channel_service!(MemberChannel, |c: &MemberChannel| Target::Member(c.member.clone()));

impl fmt::Debug for EndpointChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointChannel").field("endpoint", &self.label).finish()
    }
}

impl fmt::Debug for MemberChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberChannel").field("member", &self.member.upgrade().map(|m| m.id)).finish()
    }
}
