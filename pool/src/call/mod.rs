//! The `tower::Service` through which callers send requests over the pool.
//!
//! [`Pool`](crate::Pool) implements `Service<http::Request<B>>`; its future takes a stream
//! slot, sends the request on the member's `h2` connection from the caller's own task (no
//! channel hop to a worker), and resolves to an `http::Response<`[`ResponseBody`]`>`.
mod attempt;
mod body;
mod channel;
pub(crate) mod deadline;
mod future;
mod hedge;
mod options;
mod retry;
mod service;

pub use body::ResponseBody;
pub use channel::{EndpointChannel, MemberChannel};
pub use future::ResponseFuture;
pub use options::WaitForReady;
