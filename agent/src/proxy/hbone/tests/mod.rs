//! HBONE over real TLS on loopback sockets: a server harness, a client pool, and an
//! "outbound" listener that tunnels accepted TCP connections the way the node proxy will.
mod bench;
mod pooling;
mod serving;
mod support;
mod timeouts;
mod transfer;
