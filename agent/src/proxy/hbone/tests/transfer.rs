//! Bytes through the tunnel: both ways, in bulk, half-closed, reset, throttled.
use std::{
    io::ErrorKind,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use super::support::*;
use crate::proxy::hbone::SpliceEnd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways_through_the_tunnel() {
    let app = echo_app().await;
    let mut t = tunnel_to(app).await;
    let data = pattern(1, 1024 * 1024 + 17);
    let mut tcp = TcpStream::connect(t.entry).await.unwrap();
    let (mut r, mut w) = tcp.split();
    let (_, echoed) = within(30, async {
        tokio::join!(
            async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            },
            async {
                let mut out = Vec::new();
                r.read_to_end(&mut out).await.unwrap();
                out
            }
        )
    })
    .await;
    assert!(echoed == data, "echo differs ({} bytes back)", echoed.len());
    drop(tcp);
    let report = within(10, t.reports.recv()).await.unwrap().unwrap();
    assert!(matches!(report.end, SpliceEnd::Closed), "{report:?}");
    assert_eq!(report.tcp_to_hbone, data.len() as u64);
    assert_eq!(report.hbone_to_tcp, data.len() as u64);
}

/// 256 MiB each way at once; the process must not buffer anything like that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_keeps_memory_bounded() {
    const TOTAL: usize = 256 * 1024 * 1024;
    let block = Arc::new(pattern(2, 1024 * 1024 + 3));
    let (got_tx, mut got_rx) = mpsc::unbounded_channel();
    let app_block = block.clone();
    let app = serve_app(move |tcp| {
        let (block, got_tx) = (app_block.clone(), got_tx.clone());
        async move {
            let (mut r, mut w) = tcp.into_split();
            let (read, written) = tokio::join!(read_blocks(&mut r, &block), async {
                write_blocks(&mut w, &block, TOTAL).await?;
                w.shutdown().await
            });
            let _ = got_tx.send((read.unwrap(), written.is_ok()));
        }
    })
    .await;
    let t = tunnel_to(app).await;

    let baseline = rss_bytes();
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let tcp = TcpStream::connect(t.entry).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let (received, sent) = within(300, async {
        tokio::join!(read_blocks(&mut r, &block), async {
            write_blocks(&mut w, &block, TOTAL).await?;
            w.shutdown().await
        })
    })
    .await;
    sampler.abort();
    sent.unwrap();
    assert_eq!(received.unwrap(), TOTAL);
    let (app_read, app_wrote) = within(10, got_rx.recv()).await.unwrap();
    assert_eq!(app_read, TOTAL);
    assert!(app_wrote);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    println!("RSS growth during 2 x 256 MiB: {} MiB", growth >> 20);
    assert!(growth < 96 << 20, "RSS grew by {} MiB", growth >> 20);
}

/// A reader that stops reading stops the writer at the other end of the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stops_the_writer() {
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let (got_tx, mut got_rx) = mpsc::unbounded_channel();
    let app = serve_app(move |mut tcp| {
        let (go_rx, got_tx) = (go_rx.clone(), got_tx.clone());
        async move {
            if let Some(go) = go_rx.lock().await.take() {
                let _ = go.await;
            }
            let _ = got_tx.send(read_all(&mut tcp).await.map(|d| d.len()));
        }
    })
    .await;
    let t = tunnel_to(app).await;
    let mut tcp = TcpStream::connect(t.entry).await.unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    // Write until no progress for half a second (or far more than any bound we accept).
    while written < 512 << 20 {
        match tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&chunk)).await {
            Ok(r) => {
                r.unwrap();
                written += chunk.len();
            }
            Err(_) => break,
        }
    }
    println!("accepted {} MiB while the app did not read", written >> 20);
    assert!(written > 0);
    assert!(
        written < 64 << 20,
        "{} MiB buffered for a stalled reader",
        written >> 20
    );
    go_tx.send(()).unwrap();
    within(30, async {
        tcp.write_all(&chunk).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await;
    // The blocked write_all may have put part of a chunk into the socket before it timed out.
    let got = within(30, got_rx.recv()).await.unwrap().unwrap();
    assert!(
        got >= written + chunk.len() && got < written + 2 * chunk.len(),
        "app read {got}, client wrote {written} + {}",
        chunk.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_the_app_and_the_answer_still_flows() {
    // The app answers only after it saw EOF: impossible unless the FIN crossed the tunnel.
    let app = serve_app(|mut tcp| async move {
        let data = read_all(&mut tcp).await.unwrap();
        let answer: Vec<u8> = data.iter().rev().copied().collect();
        tcp.write_all(&answer).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await;
    let mut t = tunnel_to(app).await;
    let data = pattern(3, 300_000);
    let mut tcp = TcpStream::connect(t.entry).await.unwrap();
    tcp.write_all(&data).await.unwrap();
    tcp.shutdown().await.unwrap();
    let answer = within(30, read_all(&mut tcp)).await.unwrap();
    let expected: Vec<u8> = data.iter().rev().copied().collect();
    assert!(answer == expected);
    let report = within(10, t.reports.recv()).await.unwrap().unwrap();
    assert!(matches!(report.end, SpliceEnd::Closed), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_half_close_reaches_the_client_and_the_client_can_still_send() {
    let (got_tx, mut got_rx) = mpsc::unbounded_channel();
    let app = serve_app(move |mut tcp| {
        let got_tx = got_tx.clone();
        async move {
            tcp.write_all(b"hello, then FIN").await.unwrap();
            tcp.shutdown().await.unwrap();
            let _ = got_tx.send(read_all(&mut tcp).await.unwrap());
        }
    })
    .await;
    let t = tunnel_to(app).await;
    let mut tcp = TcpStream::connect(t.entry).await.unwrap();
    // EOF arrives while our direction is still open.
    let greeting = within(30, read_all(&mut tcp)).await.unwrap();
    assert_eq!(greeting, b"hello, then FIN");
    let data = pattern(4, 200_000);
    tcp.write_all(&data).await.unwrap();
    tcp.shutdown().await.unwrap();
    let got = within(30, got_rx.recv()).await.unwrap();
    assert!(got == data, "app got {} bytes", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_the_app_as_a_reset() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (end_tx, mut end_rx) = mpsc::unbounded_channel();
    let app = serve_app(move |mut tcp| {
        let (seen_tx, end_tx) = (seen_tx.clone(), end_tx.clone());
        async move {
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).await.unwrap();
            let _ = seen_tx.send(());
            let mut rest = Vec::new();
            let _ = end_tx.send(tcp.read_to_end(&mut rest).await.map_err(|e| e.kind()));
        }
    })
    .await;
    let mut t = tunnel_to(app).await;
    let mut tcp = TcpStream::connect(t.entry).await.unwrap();
    tcp.write_all(b"first").await.unwrap();
    within(10, seen_rx.recv()).await.unwrap();
    abort(tcp);
    let end = within(10, end_rx.recv()).await.unwrap();
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
    let report = within(10, t.reports.recv()).await.unwrap().unwrap();
    assert!(matches!(report.end, SpliceEnd::Tcp(_)), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_reset_reaches_the_client_as_a_reset() {
    let app = serve_app(|mut tcp| async move {
        let mut buf = [0u8; 5];
        tcp.read_exact(&mut buf).await.unwrap();
        tcp.write_all(b"partial answer").await.unwrap();
        abort(tcp);
    })
    .await;
    let mut t = tunnel_to(app).await;
    let mut tcp = TcpStream::connect(t.entry).await.unwrap();
    tcp.write_all(b"first").await.unwrap();
    let mut got = Vec::new();
    let end = within(10, tcp.read_to_end(&mut got)).await;
    assert_eq!(
        end.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset),
        "read {got:?}"
    );
    let report = within(10, t.reports.recv()).await.unwrap().unwrap();
    match report.end {
        SpliceEnd::Hbone(e) => assert_eq!(e.reason(), Some(h2::Reason::CONNECT_ERROR)),
        other => panic!("expected a stream reset, got {other:?}"),
    }
}
