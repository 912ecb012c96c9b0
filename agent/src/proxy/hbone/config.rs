//! Tunables of the HTTP/2 layer and of the client pool.
use std::{
    num::{NonZeroU32, NonZeroUsize},
    time::Duration,
};

/// HTTP/2 settings shared by the client and the server side.
///
/// Defaults follow what measured fastest on loopback (see the `hbone` bench test) while keeping
/// memory bounded: a stream can have at most `stream_window` bytes in flight towards us and
/// `max_send_buffer` bytes queued for sending; a connection at most `connection_window`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Config {
    /// Initial per-stream receive window (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// Connection-level receive window. Larger than `stream_window`, so that one stream that
    /// stops reading cannot stall the others.
    pub connection_window: u32,
    /// Largest DATA frame we accept (SETTINGS_MAX_FRAME_SIZE); clamped to 16 KiB ..= 16 MiB - 1.
    pub max_frame_size: u32,
    /// Bytes a stream may queue for sending before writers wait (back-pressure).
    pub max_send_buffer: usize,
    /// Streams the peer may open on one connection we serve (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest header block we accept.
    pub max_header_list_size: u32,
    /// Pings that detect a dead peer; `None` disables them.
    pub keepalive: Option<Keepalive>,
}

impl Default for H2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 64 * 1024,
            max_send_buffer: 1024 * 1024,
            max_concurrent_streams: 1000,
            max_header_list_size: 16 * 1024,
            keepalive: Some(Keepalive::default()),
        }
    }
}

/// Smallest and largest frame sizes HTTP/2 allows (RFC 9113 §6.5.2).
const FRAME_SIZE_RANGE: (u32, u32) = (16 * 1024, 16 * 1024 * 1024 - 1);

impl H2Config {
    /// `max_frame_size` brought into the range HTTP/2 allows.
    pub(crate) fn frame_size(&self) -> u32 {
        self.max_frame_size
            .clamp(FRAME_SIZE_RANGE.0, FRAME_SIZE_RANGE.1)
    }

    /// `stream_window` brought into the range HTTP/2 allows (at most 2^31 - 1).
    pub(crate) fn stream_window(&self) -> u32 {
        self.stream_window.min(i32::MAX as u32)
    }

    /// `connection_window` brought into the range HTTP/2 allows, never below the stream window.
    pub(crate) fn connection_window(&self) -> u32 {
        self.connection_window
            .max(self.stream_window())
            .min(i32::MAX as u32)
    }
}

/// HTTP/2 PING keepalive: a ping every `interval`, the connection is dropped when one is not
/// answered within `timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between pings.
    pub interval: Duration,
    /// How long to wait for the answer.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Limits of the client connection pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Streams one connection carries at most (the peer's SETTINGS_MAX_CONCURRENT_STREAMS lowers
    /// it further).
    pub max_streams_per_conn: NonZeroU32,
    /// Connections per pool key at most; when all are full, `connect` waits for a free stream.
    pub max_conns_per_key: NonZeroUsize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on TCP connect + TLS handshake + HTTP/2 preface.
    pub connect_timeout: Duration,
    /// After this age a connection takes no new streams and closes once its streams end (bounds
    /// how long a rotated certificate stays in use); `None` keeps connections while busy.
    pub max_connection_age: Option<Duration>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_conn: const { NonZeroU32::new(100).unwrap() },
            max_conns_per_key: const { NonZeroUsize::new(64).unwrap() },
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            max_connection_age: None,
        }
    }
}
