//! The HTTP/2 settings a member announces in its handshake.

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
}

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            initial_stream_window_size: 2 * 1024 * 1024,
            initial_connection_window_size: 4 * 1024 * 1024,
            max_frame_size: 16 * 1024,
            max_header_list_size: 16 * 1024,
        }
    }
}
