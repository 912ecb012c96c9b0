//! `sluice-testpod`: the application the end-to-end tests run inside pods.
//!
//! * `serve ADDR`: accepts connections; for each, prints a JSON line
//!   `{"event":"accepted","peer":..,"local":..}` on stdout, sends the same line to the client,
//!   then echoes every byte back until the client half-closes.
//! * `connect ADDR BYTES`: connects, reads the server's line, sends BYTES bytes, half-closes,
//!   reads the echo, checks it, and prints
//!   `{"local":..,"peer":..,"server":{..},"echoed":N}` (or `{"error":..}` and exits 1).
//! * `latency ADDR COUNT`: COUNT times: connect, read the server's first byte, close; prints
//!   `{"samples_us":[..]}` (connect + first byte, microseconds).
//! * `hold ADDR SECONDS`: connects and keeps sending until SECONDS pass, then checks the echo
//!   (a long transfer, for restart tests).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2..]),
        Some("connect") => connect(&args[2..]),
        Some("hold") => hold(&args[2..]),
        Some("latency") => latency(&args[2..]),
        _ => {
            Err("usage: sluice-testpod serve ADDR | connect ADDR BYTES | hold ADDR SECONDS".into())
        }
    };
    if let Err(e) = result {
        println!("{}", json!({ "error": e }));
        std::process::exit(1);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or(format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

fn serve(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "{}",
        json!({"event": "listening", "local": addr.to_string()})
    );
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let (Ok(peer), Ok(local)) = (conn.peer_addr(), conn.local_addr()) else {
                return;
            };
            let line =
                json!({"event": "accepted", "peer": peer.to_string(), "local": local.to_string()})
                    .to_string();
            println!("{line}");
            let _ = std::io::stdout().flush();
            if conn.write_all(format!("{line}\n").as_bytes()).is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = conn.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

fn open(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, Value), String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("reading the server's line: {e}"))?;
    let server: Value =
        serde_json::from_str(&line).map_err(|e| format!("server line {line:?}: {e}"))?;
    Ok((stream, reader, server))
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn connect(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let bytes: u64 = arg(args, 1, "BYTES")?;
    let (mut stream, mut reader, server) = open(addr)?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    let writer = {
        let mut s = stream.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || -> Result<(), String> {
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 32 * 1024];
            while sent < bytes {
                let n = chunk.len().min((bytes - sent) as usize);
                for (i, b) in chunk[..n].iter_mut().enumerate() {
                    *b = pattern(sent + i as u64);
                }
                s.write_all(&chunk[..n]).map_err(|e| format!("send: {e}"))?;
                sent += n as u64;
            }
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())
        })
    };
    let echoed = check_echo(&mut reader)?;
    writer.join().map_err(|_| "writer panicked".to_string())??;
    let _ = stream.flush();
    if echoed != bytes {
        return Err(format!("sent {bytes} bytes, {echoed} came back"));
    }
    println!(
        "{}",
        json!({"local": local.to_string(), "peer": peer.to_string(), "server": server, "echoed": echoed})
    );
    Ok(())
}

fn check_echo(reader: &mut BufReader<TcpStream>) -> Result<u64, String> {
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("receive after {got} bytes: {e}"))?;
        if n == 0 {
            return Ok(got);
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern(got + i as u64) {
                return Err(format!("byte {} differs", got + i as u64));
            }
        }
        got += n as u64;
    }
}

fn hold(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let secs: u64 = arg(args, 1, "SECONDS")?;
    let (stream, mut reader, server) = open(addr)?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let mut s = stream.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        let mut chunk = vec![0u8; 4096];
        while Instant::now() < deadline {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            s.write_all(&chunk)
                .map_err(|e| format!("send after {sent} bytes: {e}"))?;
            sent += chunk.len() as u64;
            std::thread::sleep(Duration::from_millis(20));
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(sent)
    });
    let echoed = check_echo(&mut reader)?;
    let sent = writer.join().map_err(|_| "writer panicked".to_string())??;
    if echoed != sent {
        return Err(format!("sent {sent} bytes, {echoed} came back"));
    }
    println!(
        "{}",
        json!({"local": local.to_string(), "server": server, "echoed": echoed})
    );
    Ok(())
}

fn latency(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let count: usize = arg(args, 1, "COUNT")?;
    let mut samples = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.read_exact(&mut byte)
            .map_err(|e| format!("first byte: {e}"))?;
        samples.push(start.elapsed().as_micros() as u64);
    }
    println!("{}", json!({ "samples_us": samples }));
    Ok(())
}
