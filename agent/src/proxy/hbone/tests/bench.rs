//! Bulk throughput over loopback, plain TCP vs. the HBONE tunnel (client → outbound splice →
//! HTTP/2 + TLS → server splice → app). Run by hand:
//!
//! ```text
//! cargo test -p sluice --release hbone::tests::bench -- --ignored --nocapture
//! ```
//!
//! `SLUICE_BENCH_MIB` sets the bytes per run (default 2048); `SLUICE_BENCH_FRAME_KIB`,
//! `SLUICE_BENCH_SEND_BUFFER_KIB`, `SLUICE_BENCH_STREAM_WINDOW_KIB` and
//! `SLUICE_BENCH_CONN_WINDOW_KIB` override the HTTP/2 settings of both ends.
use std::{net::SocketAddr, time::Instant};

use futures::future::join_all;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use super::support::*;
use crate::config::{H2Limits, PoolLimits};

fn env_num(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

/// CPU time (user + system) of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// An app that reads every connection to EOF and reports the byte count.
async fn sink_app() -> (SocketAddr, mpsc::UnboundedReceiver<usize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_app(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0;
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            let _ = tx.send(total);
        }
    })
    .await;
    (addr, rx)
}

/// Sends `total` bytes split over `streams` connections to `addr`; returns (Gbit/s, CPU s).
async fn run(
    addr: SocketAddr,
    sink: &mut mpsc::UnboundedReceiver<usize>,
    streams: usize,
    total: usize,
) -> (f64, f64) {
    let per_stream = total / streams;
    let cpu = cpu_seconds();
    let start = Instant::now();
    join_all((0..streams).map(|_| async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = per_stream;
        while left > 0 {
            let n = left.min(buf.len());
            tcp.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
        tcp.shutdown().await.unwrap();
    }))
    .await;
    let mut received = 0;
    for _ in 0..streams {
        received += sink.recv().await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(received, per_stream * streams);
    (received as f64 * 8.0 / secs / 1e9, cpu_seconds() - cpu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run by hand with --release --ignored --nocapture"]
async fn bench_bulk_throughput_direct_vs_hbone() {
    let total = env_num("SLUICE_BENCH_MIB").unwrap_or(2048) << 20;
    let mut h2 = H2Limits::default();
    let kib = |name| env_num(name).map(|k| k * 1024);
    if let Some(v) = kib("SLUICE_BENCH_FRAME_KIB") {
        h2.max_frame_size = v as u32;
    }
    if let Some(v) = kib("SLUICE_BENCH_SEND_BUFFER_KIB") {
        h2.max_send_buffer = v;
    }
    if let Some(v) = kib("SLUICE_BENCH_STREAM_WINDOW_KIB") {
        h2.stream_window = v as u32;
    }
    if let Some(v) = kib("SLUICE_BENCH_CONN_WINDOW_KIB") {
        h2.connection_window = v as u32;
    }
    println!("{h2:?}");
    let (app, mut sink) = sink_app().await;
    let t = tunnel_with(app, PoolLimits::default(), h2, forward).await;
    // Warm up: the pooled connection and the allocator.
    run(t.entry, &mut sink, 1, 64 << 20).await;
    for streams in [1, 4] {
        let (direct, direct_cpu) = run(app, &mut sink, streams, total).await;
        let (hbone, hbone_cpu) = run(t.entry, &mut sink, streams, total).await;
        let gb = total as f64 / 1e9;
        println!(
            "bulk{streams}: direct {direct:.2} Gbit/s ({:.2} CPU s/GB), hbone {hbone:.2} Gbit/s \
             ({:.2} CPU s/GB), ratio {:.3}",
            direct_cpu / gb,
            hbone_cpu / gb,
            hbone / direct
        );
    }
}
