//! Protocol code, kept apart from the pool's client API (as hyper keeps `proto/h2`).
pub(crate) mod connector;
pub(crate) mod grpc;
pub(crate) mod h2;
pub(crate) mod tls;
