//! `spec.hbone`: the limits of the HBONE client pools and of the HTTP/2 connections on both
//! sides. They are read and checked here, once; the proxy uses them as they are.
use std::{
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Smallest and largest frame sizes HTTP/2 allows (RFC 9113 §6.5.2).
pub const FRAME_SIZE_RANGE: (u32, u32) = (16 * 1024, 16 * 1024 * 1024 - 1);
/// Largest flow-control window HTTP/2 allows (RFC 9113 §6.9.1).
pub const MAX_WINDOW: u32 = i32::MAX as u32;
/// Every HTTP/2 connection starts with this connection window (RFC 9113 §6.9.2); it cannot be
/// made smaller, so the window budget pays only for what a connection is granted above it.
pub const MIN_CONNECTION_WINDOW: u32 = 65_535;
/// Largest `windowBudgetBytes`: what a semaphore can count (1 PiB, far beyond any node).
pub const MAX_WINDOW_BUDGET: u64 = 1 << 50;

/// Every HBONE limit: the client pool's and HTTP/2's. Read from `spec.hbone` (its field names
/// are those of the private `HboneSpec`) and checked while the config file is read, so a value
/// of this type taken from a config is in range.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "HboneSpec", into = "HboneSpec")]
pub struct HboneLimits {
    /// Client pool limits (one pool per pod).
    pub pool: PoolLimits,
    /// HTTP/2 settings, client and server side.
    pub h2: H2Limits,
    /// What an HBONE listener (a pod's 15008, the egress gateway's) allows a peer that has not
    /// yet proven who it is, and an idle one.
    pub server: ServerLimits,
}

/// Bounds on the HBONE listeners, so that a peer cannot hold file descriptors and tasks without
/// authenticating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// From accept to the end of the TLS handshake (the client's certificate verified).
    pub handshake_timeout: Duration,
    /// From the end of the TLS handshake to the first `CONNECT` request (HTTP/2 preface and
    /// settings included).
    pub first_request_timeout: Duration,
    /// A connection we serve without streams for this long is closed (GOAWAY). Longer than the
    /// client pools' idle timeout, so that clients normally close first.
    pub idle_timeout: Duration,
    /// Connections accepted whose TLS handshake has not finished, on the whole node, at most;
    /// beyond, new connections are closed at once.
    pub max_unauthenticated: NonZeroUsize,
    /// Of those, from one source address at most.
    pub max_unauthenticated_per_source: NonZeroUsize,
    /// HTTP/2 receive window, in bytes, that all served HBONE connections on the node may be
    /// granted together beyond each one's initial [`MIN_CONNECTION_WINDOW`]: what
    /// authenticated peers can make the agent buffer for applications that do not read. When
    /// it runs low, new connections get smaller windows.
    pub window_budget: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            max_unauthenticated: const { NonZeroUsize::new(1024).unwrap() },
            max_unauthenticated_per_source: const { NonZeroUsize::new(128).unwrap() },
            window_budget: 128 * 1024 * 1024,
        }
    }
}

/// HTTP/2 settings shared by the client and the server side.
///
/// Defaults follow what measured fastest on loopback (see the `hbone` bench test) while keeping
/// memory bounded: a stream can have at most `stream_window` bytes in flight towards us and
/// `max_send_buffer` bytes queued for sending; a connection at most `connection_window`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Limits {
    /// Initial per-stream receive window (SETTINGS_INITIAL_WINDOW_SIZE), at most
    /// [`MAX_WINDOW`].
    pub stream_window: u32,
    /// Connection-level receive window, at most [`MAX_WINDOW`]. Larger than `stream_window`, so
    /// that one stream that stops reading cannot stall the others.
    pub connection_window: u32,
    /// Largest DATA frame we accept (SETTINGS_MAX_FRAME_SIZE), within [`FRAME_SIZE_RANGE`].
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

impl Default for H2Limits {
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

impl H2Limits {
    /// The connection window in use: never below the stream window.
    pub fn effective_connection_window(&self) -> u32 {
        self.connection_window.max(self.stream_window)
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
pub struct PoolLimits {
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

impl Default for PoolLimits {
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

/// `spec.hbone` as written in the file. Every field has a default (those of [`HboneLimits`]);
/// zero is refused by the types where it would stall traffic.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct HboneSpec {
    /// Streams one pooled connection carries at most (the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS may lower it).
    max_streams_per_connection: NonZeroU32,
    /// Connections from one pod to one peer at most; when all are full, new connections wait.
    max_connections_per_peer: NonZeroUsize,
    /// A pooled connection without streams for this long is closed.
    idle_timeout_seconds: NonZeroU64,
    /// Bound on TCP connect + TLS handshake + HTTP/2 preface.
    connect_timeout_seconds: NonZeroU64,
    /// After this age a pooled connection takes no new streams; unset keeps it while in use.
    max_connection_age_seconds: Option<NonZeroU64>,
    /// Streams a peer may open on one connection this agent serves.
    max_concurrent_streams: NonZeroU32,
    /// Initial per-stream receive window (bytes).
    stream_window_bytes: u32,
    /// Per-connection receive window (bytes); raised to the stream window when smaller.
    connection_window_bytes: u32,
    /// Largest HTTP/2 DATA frame accepted (bytes), 16384 ..= 16777215.
    max_frame_bytes: u32,
    /// Bytes one stream may queue for sending before its writer waits.
    send_buffer_bytes: NonZeroUsize,
    /// Seconds between keepalive PINGs on idle connections; 0 turns them off.
    keepalive_interval_seconds: u64,
    /// A PING unanswered for this long closes the connection.
    keepalive_timeout_seconds: NonZeroU64,
    /// Seconds an accepted HBONE connection has to finish its TLS handshake.
    handshake_timeout_seconds: NonZeroU64,
    /// Seconds from the TLS handshake to the first CONNECT request.
    first_request_timeout_seconds: NonZeroU64,
    /// Seconds a served HBONE connection may stay without streams.
    server_idle_timeout_seconds: NonZeroU64,
    /// Accepted HBONE connections not yet authenticated, node-wide, at most.
    max_unauthenticated_connections: NonZeroUsize,
    /// Of those, from one source address at most.
    max_unauthenticated_per_source: NonZeroUsize,
    /// HTTP/2 receive window all served HBONE connections share beyond their initial 65535
    /// bytes, node-wide (bytes).
    window_budget_bytes: u64,
}

impl Default for HboneSpec {
    fn default() -> Self {
        HboneLimits::default().into()
    }
}

fn seconds(d: Duration) -> NonZeroU64 {
    NonZeroU64::new(d.as_secs()).unwrap_or(NonZeroU64::MIN)
}

impl From<HboneLimits> for HboneSpec {
    fn from(HboneLimits { pool, h2, server }: HboneLimits) -> Self {
        Self {
            max_streams_per_connection: pool.max_streams_per_conn,
            max_connections_per_peer: pool.max_conns_per_key,
            idle_timeout_seconds: seconds(pool.idle_timeout),
            connect_timeout_seconds: seconds(pool.connect_timeout),
            max_connection_age_seconds: pool.max_connection_age.map(seconds),
            max_concurrent_streams: NonZeroU32::new(h2.max_concurrent_streams)
                .unwrap_or(NonZeroU32::MIN),
            stream_window_bytes: h2.stream_window,
            connection_window_bytes: h2.connection_window,
            max_frame_bytes: h2.max_frame_size,
            send_buffer_bytes: NonZeroUsize::new(h2.max_send_buffer).unwrap_or(NonZeroUsize::MIN),
            keepalive_interval_seconds: h2.keepalive.map_or(0, |k| k.interval.as_secs()),
            keepalive_timeout_seconds: seconds(h2.keepalive.unwrap_or_default().timeout),
            handshake_timeout_seconds: seconds(server.handshake_timeout),
            first_request_timeout_seconds: seconds(server.first_request_timeout),
            server_idle_timeout_seconds: seconds(server.idle_timeout),
            max_unauthenticated_connections: server.max_unauthenticated,
            max_unauthenticated_per_source: server.max_unauthenticated_per_source,
            window_budget_bytes: server.window_budget as u64,
        }
    }
}

impl TryFrom<HboneSpec> for HboneLimits {
    type Error = ConfigError;

    /// The one place the HBONE limits are checked: HTTP/2's ranges, naming the field.
    fn try_from(s: HboneSpec) -> Result<Self, ConfigError> {
        let (min_frame, max_frame) = FRAME_SIZE_RANGE;
        if !(min_frame..=max_frame).contains(&s.max_frame_bytes) {
            return Err(ConfigError::HboneRange {
                field: "maxFrameBytes",
                value: s.max_frame_bytes.into(),
                min: min_frame.into(),
                max: max_frame.into(),
            });
        }
        for (field, value) in [
            ("streamWindowBytes", s.stream_window_bytes),
            ("connectionWindowBytes", s.connection_window_bytes),
        ] {
            // A window below one frame makes every frame wait for a WINDOW_UPDATE.
            if !(min_frame..=MAX_WINDOW).contains(&value) {
                return Err(ConfigError::HboneRange {
                    field,
                    value: value.into(),
                    min: min_frame.into(),
                    max: MAX_WINDOW.into(),
                });
            }
        }
        let budget_range = (0, MAX_WINDOW_BUDGET);
        let window_budget = usize::try_from(s.window_budget_bytes)
            .ok()
            .filter(|_| (budget_range.0..=budget_range.1).contains(&s.window_budget_bytes))
            .ok_or(ConfigError::HboneRange {
                field: "windowBudgetBytes",
                value: s.window_budget_bytes,
                min: budget_range.0,
                max: budget_range.1,
            })?;
        Ok(Self {
            pool: PoolLimits {
                max_streams_per_conn: s.max_streams_per_connection,
                max_conns_per_key: s.max_connections_per_peer,
                idle_timeout: Duration::from_secs(s.idle_timeout_seconds.get()),
                connect_timeout: Duration::from_secs(s.connect_timeout_seconds.get()),
                max_connection_age: s
                    .max_connection_age_seconds
                    .map(|s| Duration::from_secs(s.get())),
            },
            h2: H2Limits {
                stream_window: s.stream_window_bytes,
                connection_window: s.connection_window_bytes,
                max_frame_size: s.max_frame_bytes,
                max_send_buffer: s.send_buffer_bytes.get(),
                max_concurrent_streams: s.max_concurrent_streams.get(),
                keepalive: (s.keepalive_interval_seconds > 0).then(|| Keepalive {
                    interval: Duration::from_secs(s.keepalive_interval_seconds),
                    timeout: Duration::from_secs(s.keepalive_timeout_seconds.get()),
                }),
                ..H2Limits::default()
            },
            server: ServerLimits {
                handshake_timeout: Duration::from_secs(s.handshake_timeout_seconds.get()),
                first_request_timeout: Duration::from_secs(s.first_request_timeout_seconds.get()),
                idle_timeout: Duration::from_secs(s.server_idle_timeout_seconds.get()),
                max_unauthenticated: s.max_unauthenticated_connections,
                max_unauthenticated_per_source: s.max_unauthenticated_per_source,
                window_budget,
            },
        })
    }
}
