//! The server's time limits: a peer that never sends a request, and a connection left idle.
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::support::{client_identity, within};
use crate::config::H2Limits;
use crate::proxy::hbone::{
    ConnectRequest, ConnectionInfo, HboneServer, Refusal, RefusalStatus, ServeError, ServeTimeouts,
    Upstream,
};

fn server(timeouts: ServeTimeouts) -> HboneServer<impl crate::proxy::hbone::ConnectHandler> {
    HboneServer::new(H2Limits::default(), |_req: ConnectRequest| async {
        Err::<Upstream<TcpStream>, _>(Refusal::new(RefusalStatus::Forbidden, "test"))
    })
    .with_timeouts(timeouts)
}

fn info() -> ConnectionInfo {
    let addr = "127.0.0.1:1".parse().expect("address");
    ConnectionInfo {
        peer_identity: client_identity(),
        peer_addr: addr,
        local_addr: addr,
        tls: Default::default(),
    }
}

#[tokio::test]
async fn a_peer_without_preface_or_request_is_cut_at_the_deadline() {
    let limit = Duration::from_millis(200);
    let server = server(ServeTimeouts {
        first_request: Some(limit),
        idle: None,
    });
    // Sends nothing at all.
    let (_client, io) = tokio::io::duplex(64 * 1024);
    let started = Instant::now();
    let result = within(
        5,
        server.serve_connection(io, info(), std::future::pending()),
    )
    .await;
    assert!(
        matches!(result, Err(ServeError::FirstRequestTimeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() >= limit);

    // Sends the HTTP/2 preface and settings, but no request.
    let (client, io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if let Ok((_send, conn)) = h2::client::handshake(client).await {
            let _ = conn.await;
        }
    });
    let result = within(
        5,
        server.serve_connection(io, info(), std::future::pending()),
    )
    .await;
    assert!(
        matches!(result, Err(ServeError::FirstRequestTimeout { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_idle_connection_is_drained() {
    let server = server(ServeTimeouts {
        first_request: None,
        idle: Some(Duration::from_millis(200)),
    });
    let (client, io) = tokio::io::duplex(64 * 1024);
    let client = tokio::spawn(async move {
        let (_send, conn) = h2::client::handshake(client)
            .await
            .expect("client handshake");
        conn.await
    });
    let started = Instant::now();
    let result = within(
        5,
        server.serve_connection(io, info(), std::future::pending()),
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    // The client saw the connection end (GOAWAY), not an error of its own making.
    let _ = within(5, client).await;
}
