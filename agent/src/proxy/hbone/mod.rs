//! HBONE: TCP tunnelled through HTTP/2 `CONNECT` over mutual TLS 1.3, as Istio's ztunnel speaks it.
//!
//! - [`HbonePool`] (client): pooled HTTP/2 connections per [`PoolKey`] (source identity,
//!   destination `ip:15008`, expected destination identity), each carrying many `CONNECT`
//!   streams; [`HbonePool::connect`] returns an [`HboneStream`].
//! - [`HboneServer`] (server): [`HboneServer::serve_connection`] answers the `CONNECT` requests
//!   of one accepted TLS connection through a [`ConnectHandler`], then splices.
//! - [`splice`]: the bidirectional copy between a TCP socket and an [`HboneStream`], with
//!   half-close, reset and back-pressure propagation.
//!
//! TLS is configured elsewhere (the identity module hands out `rustls` configs with ALPN `h2`,
//! TLS 1.3 only and AES-GCM suites); this module only checks that `h2` was negotiated.
//!
//! Wire details that must match ztunnel: the request is `CONNECT` with `:authority` = the
//! original destination `ip:port` (no `:scheme`/`:path`), carries `baggage`, `forwarded`
//! (`for="<source ip:port>"`) and `traceparent` headers, and is answered with `200`.
mod client;
mod headers;
mod pool;
mod server;
mod splice;
mod stream;

#[cfg(test)]
mod tests;

pub use client::{ConnectError, DialError, EARLY_DATA_MAX};
pub use headers::{Baggage, RequestMeta, TraceParent, parse_authority, parse_forwarded_for};
pub use pool::{Dial, HbonePool, PoolKey, TcpDial};
pub use server::{
    ConnectHandler, ConnectRequest, ConnectionInfo, HboneServer, Refusal, RefusalStatus,
    ServeError, ServeTimeouts, ServerStats, ServerStatsSnapshot, Upstream,
};
pub use splice::{SpliceCounters, SpliceEnd, SpliceIo, SpliceReport, splice};
pub use stream::{HboneRecvHalf, HboneSendHalf, HboneStream};

/// The port HBONE listens on.
pub const HBONE_PORT: u16 = 15008;

/// The ALPN protocol both ends must negotiate.
pub const ALPN_H2: &[u8] = b"h2";
