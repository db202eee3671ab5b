//! HTTP/2 with the `h2` crate: connecting and the handshake (`client`) with the settings a
//! member announces (`settings`), watching the frames a server sends (`frames`), PINGs with a
//! measured round trip (`ping`), moving request bodies into streams with flow control
//! (`body`), and keeping what was sent so a call the server never processed can be sent again
//! (`replay`).
pub(crate) mod body;
pub(crate) mod client;
pub(crate) mod frames;
pub(crate) mod ping;
pub(crate) mod replay;
pub(crate) mod settings;
