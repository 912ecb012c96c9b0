//! `sluice-testpod http-echo ADDR NAME`: an HTTP/1.1 server with keep-alive that answers every
//! request with `200` and one JSON line naming itself and what it received:
//! `{"backend","method","path","host","peer","headers":{..}}` (`/bytes/<n>`: n bytes, and
//! `/delay/<ms>/…`: answered that late). It prints
//! `{"event":"listening"}` once bound. Connections are served on threads until the process
//! is killed.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use serde_json::json;

/// Serves until killed.
pub fn run(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .ok_or("http-echo ADDR NAME")?;
    let name = args.get(1).cloned().ok_or("http-echo ADDR NAME")?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("{}", json!({"event": "listening"}));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &name);
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    // Each response goes out in one write, at once: head and body in separate small writes
    // would meet the client's delayed ACK under Nagle (40 ms a response).
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?.to_string();
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim().to_owned();
                headers
                    .entry(k)
                    .and_modify(|old| {
                        old.push_str(", ");
                        old.push_str(&v);
                    })
                    .or_insert(v);
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        // `/delay/<ms>` answers late (for timeouts and requests in flight).
        if let Some(ms) = path
            .strip_prefix("/delay/")
            .and_then(|m| m.split(['/', '?']).next())
            .and_then(|m| m.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms.min(30_000)));
        }
        // `/bytes/<n>` answers with n bytes (the benchmark's fixed-size responses).
        if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            let n = n.min(1 << 20);
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
            )
            .into_bytes();
            response.resize(response.len() + n, b'x');
            writer.write_all(&response)?;
            continue;
        }
        let answer = json!({
            "backend": name,
            "method": method,
            "path": path,
            "host": headers.get("host"),
            "peer": peer,
            "body_bytes": length,
            "headers": headers,
        })
        .to_string()
            + "\n";
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        writer.write_all(response.as_bytes())?;
        if headers
            .get("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            return Ok(());
        }
    }
}
