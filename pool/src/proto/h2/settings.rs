//! The HTTP/2 settings a member announces in its handshake, and the limits its `h2`
//! connection keeps.

use std::time::Duration;

/// HTTP/2 settings the pool's connections announce.
///
/// The defaults favour gRPC's large messages: a 2 MiB stream window and a 4 MiB connection
/// window, so that a multi-megabyte message does not stall on 64 KiB window updates.
///
/// ```
/// let mut h2 = grpc_pool_core::H2Config::default();
/// h2.max_frame_size = 64 * 1024;
/// assert_eq!(h2.initial_stream_window_size, 2 * 1024 * 1024);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct H2Config {
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: receive window of each stream, 1 to 2^31-1 bytes.
    pub initial_stream_window_size: u32,
    /// Receive window of the whole connection, 65,535 to 2^31-1 bytes.
    pub initial_connection_window_size: u32,
    /// `SETTINGS_MAX_FRAME_SIZE`: largest frame the server may send, 16,384 to 16,777,215.
    pub max_frame_size: u32,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`: largest response header list accepted, at least 1.
    pub max_header_list_size: u32,
    /// `SETTINGS_HEADER_TABLE_SIZE`: the HPACK table the server may use for the headers it
    /// sends, in bytes (0 for none). Default 4,096, the protocol's (then not sent).
    pub header_table_size: u32,
    /// Streams reset by this side kept in memory at once so that frames still arriving for
    /// them are recognised, 0 to 1,000,000 (`h2`'s default 50), as tonic's
    /// `http2_max_concurrent_reset_streams`.
    pub max_concurrent_reset_streams: usize,
    /// How long a reset stream is kept so (0 to 3600 s; default 1 s, `h2`'s).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::de::duration"))]
    pub reset_stream_duration: Duration,
    /// Streams the connection may reset for the server's protocol errors before it closes
    /// the connection with `ENHANCE_YOUR_CALM`, 1 to 10^9 (`h2`'s default 1,024): a guard
    /// against a server that provokes resets without end.
    pub max_local_error_reset_streams: usize,
}

/// The protocol's own `SETTINGS_HEADER_TABLE_SIZE`, which the handshake need not announce.
pub(crate) const DEFAULT_HEADER_TABLE_SIZE: u32 = 4_096;

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            initial_stream_window_size: 2 * 1024 * 1024,
            initial_connection_window_size: 4 * 1024 * 1024,
            max_frame_size: 16 * 1024,
            max_header_list_size: 16 * 1024,
            header_table_size: DEFAULT_HEADER_TABLE_SIZE,
            max_concurrent_reset_streams: 50,
            reset_stream_duration: Duration::from_secs(1),
            max_local_error_reset_streams: 1_024,
        }
    }
}
