//! HTTP/2 with the `h2` crate: connecting and the handshake (`client`), watching the frames a
//! server sends (`frames`), PINGs with a measured round trip (`ping`), and moving request
//! bodies into streams with flow control (`body`).
pub(crate) mod body;
pub(crate) mod client;
pub(crate) mod frames;
pub(crate) mod ping;
