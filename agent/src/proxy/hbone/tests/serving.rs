//! The server: request checks, refusals, what the handler sees, draining.
use std::net::SocketAddr;

use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use super::support::*;
use crate::config::H2Limits;
use crate::proxy::hbone::{
    ALPN_H2, Baggage, ConnectRequest, Refusal, RefusalStatus, RequestMeta, Upstream,
};

/// Refuses by the authority's port: 1 → 400, 2 → 401, 3 → 403, 4 → 503; forwards otherwise.
async fn refuse_by_port(req: ConnectRequest) -> Result<Upstream<TcpStream>, Refusal> {
    let status = match req.authority.port() {
        1 => RefusalStatus::BadRequest,
        2 => RefusalStatus::Unauthorized,
        3 => RefusalStatus::Forbidden,
        4 => RefusalStatus::ServiceUnavailable,
        _ => return forward(req).await,
    };
    Err(Refusal::new(status, "test policy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_answer_their_status_and_keep_the_connection() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), refuse_by_port).await;
    let client = Client::with_defaults(&pki, server.addr).await;
    for (port, status) in [
        (1, StatusCode::BAD_REQUEST),
        (2, StatusCode::UNAUTHORIZED),
        (3, StatusCode::FORBIDDEN),
        (4, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let err = within(30, client.connect((LOCALHOST, port).into()))
            .await
            .expect_err("refused");
        assert_eq!(err.status(), Some(status), "{err}");
    }
    // An app that is not listening: the forwarding handler answers 503.
    let closed = {
        let l = tokio::net::TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        l.local_addr().unwrap()
    };
    let err = within(30, client.connect(closed))
        .await
        .expect_err("refused");
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{err}");

    let mut ok = within(30, client.connect(app)).await.unwrap();
    ok.write_all(b"still fine").await.unwrap();
    let mut back = [0u8; 10];
    ok.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still fine");
    let server_stats = server.server.stats().snapshot();
    assert_eq!(server_stats.streams_refused, 5, "{server_stats:?}");
    assert_eq!(server_stats.streams_accepted, 1, "{server_stats:?}");
    let pool_stats = client.pool.stats().snapshot();
    assert_eq!(pool_stats.streams_failed, 5, "{pool_stats:?}");
    assert_eq!(pool_stats.handshakes, 1, "{pool_stats:?}");
}

/// Sends `req` on a raw HTTP/2 connection over TLS and returns the status.
async fn raw_request(pki: &TestPki, server: SocketAddr, req: Request<()>) -> StatusCode {
    let tcp = TcpStream::connect(server).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(
        pki.client_config(&client_identity(), &server_identity())
            .await,
    )
    .connect(
        rustls::pki_types::ServerName::IpAddress(LOCALHOST.into()),
        tcp,
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    let (sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender.ready().await.unwrap();
    let (response, _send) = sender.send_request(req, false).unwrap();
    response.await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_get_405_and_bad_authorities_400() {
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let get = Request::builder()
        .method(Method::GET)
        .uri("https://127.0.0.1/")
        .body(())
        .unwrap();
    assert_eq!(
        within(30, raw_request(&pki, server.addr, get)).await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let by_name = Request::builder()
        .method(Method::CONNECT)
        .uri("example.com:80")
        .body(())
        .unwrap();
    assert_eq!(
        within(30, raw_request(&pki, server.addr, by_name)).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(server.server.stats().snapshot().requests_rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_sees_authority_identity_and_ztunnel_headers() {
    let app = echo_app().await;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let handler = move |req: ConnectRequest| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send((
                req.authority,
                req.connection.peer_identity.clone(),
                req.baggage(),
                req.forwarded_for(),
                req.traceparent(),
                req.authority_is_dialled(),
            ));
            forward(req).await
        }
    };
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), handler).await;
    let client = Client::with_defaults(&pki, server.addr).await;
    let baggage = Baggage {
        namespace: Some("client-ns".into()),
        workload_kind: Some("deployment".into()),
        workload_name: Some("client".into()),
        ..Baggage::default()
    };
    let source: SocketAddr = "10.0.1.5:41000".parse().unwrap();
    let meta = RequestMeta::new(source, baggage.clone());
    let _stream = within(
        30,
        client
            .pool
            .connect(&client.key, client.tls.clone(), app, &meta),
    )
    .await
    .unwrap();
    let (authority, identity, got_baggage, forwarded, traceparent, dialled) =
        seen_rx.recv().await.unwrap();
    assert_eq!(authority, app);
    assert_eq!(identity, client_identity());
    assert_eq!(got_baggage, baggage);
    assert_eq!(forwarded, Some(source.ip()));
    assert_eq!(traceparent, Some(meta.traceparent));
    // The app listens on 127.0.0.1 like the HBONE listener.
    assert!(dialled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_lets_open_streams_finish_then_ends_the_connection() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let mut server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let client = Client::with_defaults(&pki, server.addr).await;
    let mut open = within(30, client.connect(app)).await.unwrap();
    open.write_all(b"before").await.unwrap();

    server.drain.send(true).unwrap();
    // The open stream keeps working after the drain started.
    let mut back = [0u8; 6];
    within(10, open.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"before");
    open.write_all(b"after!").await.unwrap();
    within(10, open.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"after!");
    assert!(
        server.served.try_recv().is_err(),
        "connection ended under an open stream"
    );

    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(10, open.read_to_end(&mut rest)).await.unwrap();
    drop(open);
    let served = within(10, server.served.recv()).await.unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(server.server.stats().snapshot().connections, 0);
}

/// The client's first bytes go out with the `CONNECT`: the app gets them, in order before what
/// follows, once the stream is accepted; a refused stream's never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_reaches_the_app_only_through_an_accepted_stream() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let (received_tx, mut received) = mpsc::unbounded_channel();
    let app = serve_app(move |mut tcp| {
        let received_tx = received_tx.clone();
        async move {
            let got = read_all(&mut tcp).await.unwrap_or_default();
            let _ = tcp.write_all(b"done").await;
            let _ = received_tx.send(got);
        }
    })
    .await;
    // Refuses the first request, forwards the others.
    let seen = Arc::new(AtomicUsize::new(0));
    let handler = move |req: ConnectRequest| {
        let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                Err(Refusal::new(RefusalStatus::Forbidden, "first one"))
            } else {
                forward(req).await
            }
        }
    };
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), handler).await;
    let client = Client::with_defaults(&pki, server.addr).await;
    let meta = RequestMeta::new((LOCALHOST, 40000).into(), Default::default());
    let connect = |early: &'static [u8]| {
        client.pool.connect_with_data(
            &client.key,
            client.tls.clone(),
            app,
            &meta,
            bytes::Bytes::from_static(early),
        )
    };

    let err = within(30, connect(b"not for the app"))
        .await
        .expect_err("refused");
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");

    let mut stream = within(30, connect(b"first flight, ")).await.unwrap();
    stream.write_all(b"then the rest").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    within(30, stream.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"done");
    let got = within(30, received.recv())
        .await
        .expect("the app saw a connection");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "first flight, then the rest",
        "what the app read"
    );
    assert!(
        received.try_recv().is_err(),
        "the refused stream reached the app"
    );
}
