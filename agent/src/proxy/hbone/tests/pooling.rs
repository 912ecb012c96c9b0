//! The client pool: sharing, limits, idle expiry, dial failures.
use std::{num::NonZeroU32, num::NonZeroUsize, sync::Arc, time::Duration};

use futures::future::join_all;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::support::*;
use crate::config::{H2Limits, PoolLimits};
use crate::proxy::hbone::{ConnectError, DialError, HboneStream};

fn pool_config(max_streams: u32, max_conns: usize) -> PoolLimits {
    PoolLimits {
        max_streams_per_conn: NonZeroU32::new(max_streams).unwrap(),
        max_conns_per_key: NonZeroUsize::new(max_conns).unwrap(),
        ..PoolLimits::default()
    }
}

/// Echoes one message over an open stream.
async fn ping(stream: &mut HboneStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

async fn open_many(client: &Client, app: std::net::SocketAddr, n: usize) -> Vec<HboneStream> {
    let opened = join_all((0..n).map(|_| client.connect(app))).await;
    opened.into_iter().map(|s| s.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_share_one_connection() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let client = Client::with_defaults(&pki, server.addr).await;

    let mut streams = within(30, open_many(&client, app, 50)).await;
    within(
        30,
        join_all(
            streams
                .iter_mut()
                .enumerate()
                .map(|(i, s)| async move { ping(s, format!("stream {i}").as_bytes()).await }),
        ),
    )
    .await;
    let stats = client.pool.stats().snapshot();
    assert_eq!(stats.handshakes, 1, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(stats.active_streams, 50, "{stats:?}");
    assert_eq!(stats.streams_opened, 50, "{stats:?}");
    assert_eq!(server.tls_accepts(), 1);
    eventually(10, "server sees 50 streams", || {
        server.server.stats().snapshot().active_streams == 50
    })
    .await;

    drop(streams);
    eventually(10, "streams released", || {
        client.pool.stats().snapshot().active_streams == 0
    })
    .await;
    eventually(10, "server streams ended", || {
        server.server.stats().snapshot().active_streams == 0
    })
    .await;
    // A released connection is reused.
    let mut again = within(30, client.connect(app)).await.unwrap();
    ping(&mut again, b"again").await;
    assert_eq!(client.pool.stats().snapshot().handshakes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_makes_the_pool_open_another() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let client = Client::new(&pki, server.addr, pool_config(10, 64), H2Limits::default()).await;

    let mut streams = within(30, open_many(&client, app, 35)).await;
    for s in &mut streams {
        ping(s, b"x").await;
    }
    let stats = client.pool.stats().snapshot();
    assert_eq!(stats.handshakes, 4, "{stats:?}");
    assert_eq!(stats.connections, 4, "{stats:?}");
    assert_eq!(server.tls_accepts(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peers_stream_limit_is_respected() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let h2 = H2Limits {
        max_concurrent_streams: 5,
        ..H2Limits::default()
    };
    let server = ServerHarness::start(&pki, h2, forward).await;
    let client = Client::with_defaults(&pki, server.addr).await;

    let mut streams = Vec::new();
    for i in 0..12 {
        let mut s = within(30, client.connect(app)).await.unwrap();
        ping(&mut s, format!("{i}").as_bytes()).await;
        streams.push(s);
    }
    let stats = client.pool.stats().snapshot();
    assert_eq!(stats.connections, 3, "{stats:?}");
    assert_eq!(server.tls_accepts(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_connection_full_callers_wait_for_a_free_stream() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let client = Client::new(&pki, server.addr, pool_config(2, 1), H2Limits::default()).await;

    let mut held = within(30, open_many(&client, app, 2)).await;
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.connect(app).await })
    };
    // While both slots are held the third caller must not get a stream (nor a connection).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "third stream opened beyond the limits"
    );
    drop(held.pop());
    let mut third = within(10, waiter).await.unwrap().unwrap();
    ping(&mut third, b"third").await;
    assert_eq!(client.pool.stats().snapshot().handshakes, 1);
    assert_eq!(server.tls_accepts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_expire_with_a_goaway() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let mut server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let cfg = PoolLimits {
        idle_timeout: Duration::from_millis(300),
        ..PoolLimits::default()
    };
    let client = Client::new(&pki, server.addr, cfg, H2Limits::default()).await;

    let mut s = within(30, client.connect(app)).await.unwrap();
    // Busy for longer than the idle timeout: must not expire.
    for _ in 0..6 {
        ping(&mut s, b"busy").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.pool.stats().snapshot().connections, 1);
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);

    // The server sees an orderly end (GOAWAY), not an error.
    let served = within(10, server.served.recv()).await.unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(client.pool.stats().snapshot().connections, 0);
    let mut s = within(30, client.connect(app)).await.unwrap();
    ping(&mut s, b"new connection").await;
    assert_eq!(client.pool.stats().snapshot().handshakes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_carry_the_right_bytes() {
    const N: usize = 1000;
    let app = echo_app().await;
    let t = tunnel_to(app).await;
    let entry = t.entry;
    let results = within(
        120,
        join_all((0..N).map(|i| async move {
            let data = pattern(i as u64, 16 * 1024 + i);
            let mut tcp = TcpStream::connect(entry).await?;
            let (mut r, mut w) = tcp.split();
            let (sent, echoed) = tokio::join!(
                async {
                    w.write_all(&data).await?;
                    w.shutdown().await
                },
                async {
                    let mut out = Vec::new();
                    r.read_to_end(&mut out).await.map(|_| out)
                }
            );
            sent?;
            std::io::Result::Ok(echoed? == data)
        })),
    )
    .await;
    let good = results.iter().filter(|r| matches!(r, Ok(true))).count();
    assert_eq!(
        good,
        N,
        "failures: {:?}",
        results.iter().find(|r| !matches!(r, Ok(true)))
    );
    let stats = t.client.pool.stats().snapshot();
    println!("{N} connections: {stats:?}");
    assert_eq!(stats.streams_opened, N as u64);
    assert_eq!(
        t.server.server.stats().snapshot().streams_accepted,
        N as u64
    );
    // 100 streams per connection by default.
    assert!((1..=10).contains(&stats.handshakes), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_on_a_failing_dial_share_its_failure() {
    // A peer that accepts TCP but never speaks TLS: every dial times out.
    let silent = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let pki = TestPki::new();
    let cfg = PoolLimits {
        connect_timeout: Duration::from_millis(500),
        ..PoolLimits::default()
    };
    let client = Client::new(&pki, addr, cfg, H2Limits::default()).await;
    let results = within(30, join_all((0..20).map(|_| client.connect(addr)))).await;
    for r in &results {
        match r {
            Err(ConnectError::Dial(cause)) => {
                assert!(matches!(**cause, DialError::Timeout { .. }), "{cause}")
            }
            other => panic!("expected a dial timeout, got {other:?}"),
        }
    }
    assert_eq!(client.pool.stats().snapshot().dial_failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_from_another_root_is_refused() {
    let app = echo_app().await;
    let server_pki = TestPki::new();
    let server = ServerHarness::start(&server_pki, H2Limits::default(), forward).await;
    let client = Client::new(
        &TestPki::new(),
        server.addr,
        PoolLimits::default(),
        H2Limits::default(),
    )
    .await;
    match within(30, client.connect(app)).await {
        Err(ConnectError::Dial(cause)) => {
            assert!(matches!(*cause, DialError::Tls { .. }), "{cause}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    assert_eq!(client.pool.stats().snapshot().handshakes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_alpn_h2_is_refused() {
    let pki = TestPki::new();
    let mut config = (*pki.server_config(&server_identity()).await).clone();
    config.alpn_protocols.clear();
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = tls.read_to_end(&mut Vec::new()).await;
            }
        }
    });
    let client = Client::new(&pki, addr, PoolLimits::default(), H2Limits::default()).await;
    match within(30, client.connect(addr)).await {
        Err(ConnectError::Dial(cause)) => {
            assert!(matches!(*cause, DialError::Alpn { .. }), "{cause}")
        }
        other => panic!("expected an ALPN failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_their_maximum_age_take_no_new_streams() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let mut server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let cfg = PoolLimits {
        max_connection_age: Some(Duration::from_millis(200)),
        ..PoolLimits::default()
    };
    let client = Client::new(&pki, server.addr, cfg, H2Limits::default()).await;
    let mut old = within(30, client.connect(app)).await.unwrap();
    ping(&mut old, b"old").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut new = within(30, client.connect(app)).await.unwrap();
    ping(&mut new, b"new").await;
    assert_eq!(client.pool.stats().snapshot().handshakes, 2);
    // The aged connection still carries its stream, then closes once the stream ends.
    ping(&mut old, b"old still works").await;
    assert_eq!(client.pool.stats().snapshot().connections, 2);
    old.shutdown().await.unwrap();
    old.read_to_end(&mut Vec::new()).await.unwrap();
    drop(old);
    let served = within(10, server.served.recv()).await.unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(client.pool.stats().snapshot().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_unexpected_identity_is_refused() {
    let app = echo_app().await;
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, H2Limits::default(), forward).await;
    let mut client = Client::with_defaults(&pki, server.addr).await;
    let someone_else = crate::state::workload::Identity::new(TRUST_DOMAIN, "other-ns", "other-sa");
    client.tls = pki.client_config(&client_identity(), &someone_else).await;
    client.key.destination_identity = someone_else;
    match within(30, client.connect(app)).await {
        Err(ConnectError::Dial(cause)) => {
            assert!(matches!(*cause, DialError::Tls { .. }), "{cause}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    assert_eq!(server.tls_accepts(), 0);
}
