//! `sluice-testpod load ADDR SECONDS LONG RATE`: the traffic of the upgrade tests, against a
//! `serve` (which greets with a line, then echoes).
//!
//! * LONG long transfers, each for SECONDS: the client sends a byte pattern in 16 KiB chunks
//!   every 20 ms while it reads the echo back and checks every byte; at the end it half-closes
//!   and checks that every byte sent came back.
//! * Short connections at RATE per second for SECONDS, each on its own thread: connect, read
//!   the greeting (the connect latency), send 1 KiB, half-close, check the echo.
//!
//! Prints one [`LoadReport`] as JSON.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// What one `load` saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub long_ok: u64,
    pub long_failed: u64,
    /// Bytes sent and verified on the way back, over the long transfers that completed.
    pub long_bytes: u64,
    pub short_ok: u64,
    pub short_failed: u64,
    /// The first errors, each with when its connection started (unix ms).
    pub errors: Vec<(u64, String)>,
    /// Per short connection that was greeted: (unix ms at its start, µs until the greeting).
    pub connects: Vec<(u64, u64)>,
}

const SHORT_BYTES: usize = 1024;
const CHUNK: usize = 16 * 1024;
const MAX_ERRORS: usize = 20;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The byte at offset `i` of every checked transfer (a period of 251 never lines up with
/// buffer sizes, so a dropped or repeated chunk shows).
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Connects and reads the greeting; the stream and how long that took.
fn greeted(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, Duration), String> {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("greeting: {e}"))?;
    if !line.ends_with('\n') {
        return Err(format!("greeting cut short: {line:?}"));
    }
    Ok((stream, reader, start.elapsed()))
}

/// Reads the echo to its end, checking the pattern; how many bytes came back.
pub fn check_echo(reader: &mut BufReader<TcpStream>) -> Result<u64, String> {
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("receive after {got} bytes: {e}"))?;
        if n == 0 {
            return Ok(got);
        }
        if let Some(i) = buf[..n]
            .iter()
            .enumerate()
            .position(|(i, b)| *b != pattern(got + i as u64))
        {
            return Err(format!("byte {} differs", got + i as u64));
        }
        got += n as u64;
    }
}

fn long(addr: SocketAddr, secs: u64) -> Result<u64, String> {
    let (stream, mut reader, _) = greeted(addr)?;
    let mut s = stream.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        let mut chunk = vec![0u8; CHUNK];
        while Instant::now() < deadline {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            s.write_all(&chunk)
                .map_err(|e| format!("send after {sent} bytes: {e}"))?;
            sent += CHUNK as u64;
            std::thread::sleep(Duration::from_millis(20));
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(sent)
    });
    let echoed = check_echo(&mut reader);
    let sent = writer.join().map_err(|_| "writer panicked".to_string())??;
    let echoed = echoed?;
    if echoed != sent {
        return Err(format!("sent {sent} bytes, {echoed} came back"));
    }
    Ok(sent)
}

fn short(addr: SocketAddr) -> Result<Duration, String> {
    let (mut stream, mut reader, took) = greeted(addr)?;
    let data: Vec<u8> = (0..SHORT_BYTES as u64).map(pattern).collect();
    stream.write_all(&data).map_err(|e| format!("send: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let echoed = check_echo(&mut reader)?;
    if echoed != SHORT_BYTES as u64 {
        return Err(format!("sent {SHORT_BYTES} bytes, {echoed} came back"));
    }
    Ok(took)
}

/// Runs the load; see the module documentation.
pub fn run(args: &[String]) -> Result<LoadReport, String> {
    let get = |i: usize, what: &str| -> Result<&String, String> {
        args.get(i).ok_or(format!("load: missing {what}"))
    };
    let addr: SocketAddr = get(0, "ADDR")?.parse().map_err(|_| "load: bad ADDR")?;
    let secs: u64 = get(1, "SECONDS")?
        .parse()
        .map_err(|_| "load: bad SECONDS")?;
    let long_count: usize = get(2, "LONG")?.parse().map_err(|_| "load: bad LONG")?;
    let rate: u64 = get(3, "RATE")?.parse().map_err(|_| "load: bad RATE")?;
    let longs: Vec<_> = (0..long_count)
        .map(|_| {
            let started = unix_ms();
            (started, std::thread::spawn(move || long(addr, secs)))
        })
        .collect();
    let start = Instant::now();
    let total = secs * rate;
    let mut shorts = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + Duration::from_micros(i * 1_000_000 / rate.max(1));
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let started = unix_ms();
        shorts.push((started, std::thread::spawn(move || short(addr))));
    }
    let mut report = LoadReport::default();
    let error = |report: &mut LoadReport, at: u64, e: String| {
        if report.errors.len() < MAX_ERRORS {
            report.errors.push((at, e));
        }
    };
    for (at, t) in shorts {
        match t.join().unwrap_or_else(|_| Err("panicked".into())) {
            Ok(took) => {
                report.short_ok += 1;
                report.connects.push((at, took.as_micros() as u64));
            }
            Err(e) => {
                report.short_failed += 1;
                error(&mut report, at, format!("short: {e}"));
            }
        }
    }
    for (at, t) in longs {
        match t.join().unwrap_or_else(|_| Err("panicked".into())) {
            Ok(bytes) => {
                report.long_ok += 1;
                report.long_bytes += bytes;
            }
            Err(e) => {
                report.long_failed += 1;
                error(&mut report, at, format!("long: {e}"));
            }
        }
    }
    Ok(report)
}

/// The `q` quantile (0..=1) of `samples` (µs); 0 when there are none.
pub fn quantile(samples: &mut [u64], q: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}
