//! `sluice-testpod`: the application the end-to-end tests run inside pods.
//!
//! * `serve ADDR`: accepts connections; for each, prints a JSON line
//!   `{"event":"accepted","peer":..,"local":..}` on stdout, sends the same line to the client,
//!   then echoes every byte back until the client half-closes.
//! * `connect ADDR BYTES`: connects, reads the server's line, sends BYTES bytes, half-closes,
//!   reads the echo, checks it, and prints
//!   `{"local":..,"peer":..,"server":{..},"echoed":N}` (or `{"error":..}` and exits 1).
//!   With `SLUICE_TESTPOD_SO_MARK` set, its socket carries that `SO_MARK`.
//! * `latency ADDR COUNT [request]`: COUNT times: connect, read the server's first byte (or,
//!   with `request`, send a byte and read its echo), close; prints
//!   `{"samples_us":[..]}` (connect + first byte, microseconds).
//! * `hold ADDR SECONDS`: connects and keeps sending until SECONDS pass, then checks the echo
//!   (a long transfer, for restart tests).
//! * `sink ADDR`: accepts connections and reads each to its end, discarding the bytes, then
//!   closes (the receiving end of `bulk`).
//! * `bulk ADDR SECONDS STREAMS`: STREAMS connections to a `sink`, each sending as fast as it
//!   can for SECONDS, then half-closing and waiting for the sink to close; prints
//!   `{"bytes":N,"seconds":S,"bytes_per_s":R}` (all streams together).
//! * `rr ADDR SIZE COUNT`: one connection to a `serve`; COUNT times: send SIZE bytes, read the
//!   SIZE-byte echo; prints `{"samples_us":[..]}` (one round trip each, microseconds).
//! * `fanout ADDR CONNECTIONS BYTES`: opens CONNECTIONS connections to a `serve` and holds them
//!   all open at once (each has read the server's line), then each sends BYTES bytes and checks
//!   the echo; prints `{"connections":N,"ok":K,"errors":[..],"open_us":[..]}` (the first few
//!   errors; per connection that opened, µs from the start of all until its greeting was read).
//! * `load ADDR SECONDS LONG RATE`: long transfers and a stream of short connections to a
//!   `serve`, every byte checked; prints a `LoadReport` (see `sluice_tests::load`).
//! * `http-keepalive ADDR HOST...`: one connection, one `GET /` per HOST in turn; prints
//!   `{"statuses":[..],"error":..}`.
//! * `http-get ADDR HOST [PATH]`, `tls-get ADDR SNI CA_FILE [PATH]`, `dns SERVER NAME
//!   [udp|tcp]`: clients of the simulated internet (`sluice_tests::internet::client`).
//! * `internet DIR DNS_ADDR`: the simulated internet's servers
//!   (`sluice_tests::internet::server`).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sluice_tests::{
    internet::client,
    load::{check_echo, pattern},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2..]),
        Some("connect") => connect(&args[2..]),
        Some("hold") => hold(&args[2..]),
        Some("latency") => latency(&args[2..]),
        Some("sink") => sink(&args[2..]),
        Some("bulk") => bulk(&args[2..]),
        Some("rr") => rr(&args[2..]),
        Some("fanout") => fanout(&args[2..]),
        Some("load") => sluice_tests::load::run(&args[2..]).and_then(|r| {
            println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            Ok(())
        }),
        Some("http-get") => print(client::http_get(&args[2..])),
        Some("http-keepalive") => http_keepalive(&args[2..]),
        Some("tls-get") => print(client::tls_get(&args[2..])),
        Some("dns") => print(client::dns(&args[2..])),
        Some("internet") => sluice_tests::internet::server::run(&args[2..]),
        Some("http-echo") => sluice_tests::http_echo::run(&args[2..]),
        _ => Err(
            "usage: sluice-testpod serve ADDR | connect ADDR BYTES | hold ADDR SECONDS | \
                 latency ADDR COUNT [request] | sink ADDR | bulk ADDR SECONDS STREAMS | rr ADDR SIZE COUNT | \
                 fanout ADDR CONNECTIONS BYTES | load ADDR SECONDS LONG RATE | \
                 http-get ADDR HOST [PATH] | http-keepalive ADDR HOST... | tls-get ADDR SNI CA_FILE [PATH] | \
                 dns SERVER NAME [udp|tcp] | internet DIR DNS_ADDR"
                .into(),
        ),
    };
    if let Err(e) = result {
        println!("{}", json!({ "error": e }));
        std::process::exit(1);
    }
}

fn print(result: Result<Value, String>) -> Result<(), String> {
    println!("{}", result?);
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or(format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

/// A listener with a deep accept queue: std's 128 overflows when a thousand connections arrive
/// at once on a loaded machine, and the dropped handshakes then wait for SYN retransmits
/// (1 s, 3 s, 7 s, 15 s…), which is the test's backlog, not the proxy's latency.
fn listen(addr: SocketAddr) -> Result<TcpListener, String> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        Ok(socket.into())
    };
    bind().map_err(|e| format!("bind {addr}: {e}"))
}

fn serve(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let listener = listen(addr)?;
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
    let stream = dial(addr)?;
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

/// TCP to `addr` within 5 s; with `SLUICE_TESTPOD_SO_MARK` (e.g. `0x539`) set, the socket
/// carries that mark first, as a pod with `CAP_NET_ADMIN` could set it.
fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    let Ok(raw) = std::env::var("SLUICE_TESTPOD_SO_MARK") else {
        return TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"));
    };
    let mark = u32::from_str_radix(raw.trim_start_matches("0x"), 16)
        .map_err(|_| format!("bad SLUICE_TESTPOD_SO_MARK {raw:?}"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .set_mark(mark)
        .map_err(|e| format!("SO_MARK {mark:#x}: {e}"))?;
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    Ok(socket.into())
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

/// `latency ADDR COUNT [request]`: µs from connect to the server's first byte (the `serve`
/// greeting); with `request`, the client speaks first: it sends one byte at once and times
/// until `serve` has echoed it (after its greeting line).
fn latency(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let count: usize = arg(args, 1, "COUNT")?;
    let request = match args.get(2).map(String::as_str) {
        None => false,
        Some("request") => true,
        Some(other) => return Err(format!("latency: unknown mode {other:?}")),
    };
    let mut samples = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        if request {
            s.write_all(b"?").map_err(|e| format!("request: {e}"))?;
            // The greeting line, then the echo.
            let mut reader = BufReader::new(&mut s);
            let mut greeting = String::new();
            reader
                .read_line(&mut greeting)
                .map_err(|e| format!("greeting: {e}"))?;
            reader
                .read_exact(&mut byte)
                .map_err(|e| format!("echo: {e}"))?;
            if byte[0] != b'?' {
                return Err(format!("echo: got {:?}, sent '?'", byte[0] as char));
            }
        } else {
            s.read_exact(&mut byte)
                .map_err(|e| format!("first byte: {e}"))?;
        }
        samples.push(start.elapsed().as_micros() as u64);
    }
    println!("{}", json!({ "samples_us": samples }));
    Ok(())
}

fn sink(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let listener = listen(addr)?;
    println!(
        "{}",
        json!({"event": "listening", "local": addr.to_string()})
    );
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            let _ = conn.shutdown(Shutdown::Both);
        });
    }
    Ok(())
}

fn bulk(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let secs: f64 = arg(args, 1, "SECONDS")?;
    let streams: usize = arg(args, 2, "STREAMS")?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> Result<u64, String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .map_err(|e| e.to_string())?;
                let chunk = vec![0x5au8; 128 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&chunk)
                        .map_err(|e| format!("send after {sent} bytes: {e}"))?;
                    sent += chunk.len() as u64;
                }
                s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                // The sink closes once it has read everything: the bytes arrived.
                let mut rest = [0u8; 64];
                while s
                    .read(&mut rest)
                    .map_err(|e| format!("waiting for the sink: {e}"))?
                    > 0
                {}
                Ok(sent)
            })
        })
        .collect();
    let mut bytes = 0u64;
    for w in workers {
        bytes += w.join().map_err(|_| "stream panicked".to_string())??;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"bytes": bytes, "seconds": seconds, "bytes_per_s": bytes as f64 / seconds})
    );
    Ok(())
}

fn rr(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let size: usize = arg(args, 1, "SIZE")?;
    let count: usize = arg(args, 2, "COUNT")?;
    let (mut stream, mut reader, _server) = open(addr)?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let request = vec![0xa5u8; size];
    let mut reply = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        stream
            .write_all(&request)
            .map_err(|e| format!("request {i}: {e}"))?;
        reader
            .read_exact(&mut reply)
            .map_err(|e| format!("reply {i}: {e}"))?;
        samples.push(start.elapsed().as_micros() as u64);
    }
    let _ = stream.shutdown(Shutdown::Write);
    println!("{}", json!({ "samples_us": samples }));
    Ok(())
}

fn fanout(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let n: usize = arg(args, 1, "CONNECTIONS")?;
    let bytes: u64 = arg(args, 2, "BYTES")?;
    // Every connection is open (and greeted) before any of them sends: truly concurrent.
    let all_open = std::sync::Arc::new(std::sync::Barrier::new(n));
    let started = Instant::now();
    let workers: Vec<_> = (0..n)
        .map(|_| {
            let all_open = all_open.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || -> Result<u64, String> {
                    let opened = open(addr);
                    let open_us = started.elapsed().as_micros() as u64;
                    all_open.wait();
                    let (mut stream, mut reader, _server) = opened?;
                    let chunk = vec![0u8; 4096];
                    let mut sent = 0u64;
                    while sent < bytes {
                        let k = chunk.len().min((bytes - sent) as usize);
                        stream
                            .write_all(&chunk[..k])
                            .map_err(|e| format!("send: {e}"))?;
                        sent += k as u64;
                    }
                    stream
                        .shutdown(Shutdown::Write)
                        .map_err(|e| format!("half-close: {e}"))?;
                    let mut echoed = Vec::new();
                    reader
                        .read_to_end(&mut echoed)
                        .map_err(|e| format!("echo: {e}"))?;
                    if echoed.len() as u64 != bytes || echoed.iter().any(|b| *b != 0) {
                        return Err(format!("echo of {} bytes, expected {bytes}", echoed.len()));
                    }
                    Ok(open_us)
                })
                .map_err(|e| format!("thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut open_us = Vec::with_capacity(n);
    for w in workers {
        match w.join() {
            Ok(Ok(us)) => {
                ok += 1;
                open_us.push(us);
            }
            Ok(Err(e)) if errors.len() < 5 => errors.push(e),
            Ok(Err(_)) => {}
            Err(_) => errors.push("worker panicked".to_owned()),
        }
    }
    println!(
        "{}",
        json!({"connections": n, "ok": ok, "errors": errors, "open_us": open_us})
    );
    Ok(())
}

/// `http-keepalive ADDR HOST...`: one connection to ADDR; for each HOST in turn, a `GET /`
/// naming it, and its answer read (by `Content-Length`); prints
/// `{"statuses":[..],"error":..}` with the status line of each answer received.
fn http_keepalive(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = arg(args, 0, "ADDR")?;
    let hosts = args.get(1..).unwrap_or_default();
    let stream = dial(addr)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut statuses = Vec::new();
    let mut error = None;
    for host in hosts {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if let Err(e) = writer.write_all(request.as_bytes()) {
            error = Some(format!("sending the request for {host}: {e}"));
            break;
        }
        let mut status = String::new();
        match reader.read_line(&mut status) {
            Ok(0) => {
                error = Some(format!("closed before the answer for {host}"));
                break;
            }
            Err(e) => {
                error = Some(format!("reading the answer for {host}: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).map_err(|e| e.to_string())?;
        statuses.push(status.trim().to_owned());
    }
    println!("{}", json!({ "statuses": statuses, "error": error }));
    Ok(())
}
