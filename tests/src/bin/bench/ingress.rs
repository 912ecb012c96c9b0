//! `cargo xtask bench ingress`: the ingress gateway against nginx and the direct path, with
//! wrk (HTTP/1.1 keep-alive, 64 connections, 1 KiB responses), rounds interleaved.
use sluice_tests::ingress_world::Ingress;

/// What one wrk run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `wrk -t2 -c64 -d<secs>s --latency URL` in the client pod.
fn wrk(ing: &Ingress, url: &str, secs: u32) -> Wrk {
    let out = ing
        .w
        .pod("client")
        .command("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "--latency", url])
        .output()
        .expect("run wrk (installed by cargo xtask setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk {url}: {text}");
    let ms = |s: &str| -> f64 {
        let s = s.trim();
        if let Some(v) = s.strip_suffix("us") {
            v.parse::<f64>().unwrap_or(0.0) / 1000.0
        } else if let Some(v) = s.strip_suffix("ms") {
            v.parse().unwrap_or(0.0)
        } else if let Some(v) = s.strip_suffix('s') {
            v.parse::<f64>().unwrap_or(0.0) * 1000.0
        } else {
            0.0
        }
    };
    let mut r = Wrk::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = ms(v);
        }
    }
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk {url} saw errors: {text}"
    );
    assert!(r.rps > 0.0, "wrk {url}: {text}");
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// nginx from Debian in the gateway pod on :8081, reverse proxy to `upstream` with keep-alive.
fn start_nginx(ing: &Ingress, upstream: &str) -> std::process::Child {
    let dir = ing.w.dir.path().join("nginx");
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
               upstream backend {{ server {upstream}; keepalive 64; }}\n\
               server {{\n    listen 8081 reuseport;\n    location / {{\n      proxy_pass http://backend;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering on;\n    }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )
    .expect("nginx.conf");
    let mut child = ing
        .w
        .pod("gw")
        .command("nginx")
        .args([
            "-c",
            conf.to_str().expect("utf-8"),
            "-p",
            dir.to_str().expect("utf-8"),
            "-g",
            "daemon off;",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start nginx (Debian package nginx-light, installed by cargo xtask setup)");
    // Until it answers.
    let url = format!("http://{}:8081/bytes/1024", ing.gw_ip());
    for _ in 0..100 {
        if ing
            .try_curl(&["-sS", "--max-time", "1", "-o", "/dev/null", &url])
            .0
        {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("nginx never answered on {url}");
}

/// Runs the three paths interleaved and prints the table and the ratios.
pub fn run() {
    const ROUNDS: usize = 3;
    const SECS: u32 = 8;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bench, namespace: test-infra}
spec:
  gatewayClassName: sluice
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bench, namespace: test-infra}
spec:
  parentRefs: [{name: bench}]
  rules: [{backendRefs: [{name: backend-v1, port: 8080}]}]
"#;
    let ing = Ingress::start_with(route, "", true);
    let plain = format!("{}:3000", ing.w.pod("plain").ipv4);
    let mut nginx = start_nginx(&ing, &plain);
    let urls = [
        ("direct", format!("http://{plain}/bytes/1024")),
        ("nginx", format!("http://{}:8081/bytes/1024", ing.gw_ip())),
        ("sluice", format!("http://{}/bytes/1024", ing.gw_ip())),
    ];
    // Warm-up: connection pools, certificates.
    for (_, url) in &urls {
        wrk(&ing, url, 2);
    }
    let mut results: Vec<Vec<Wrk>> = vec![Vec::new(); urls.len()];
    for _ in 0..ROUNDS {
        for (i, (_, url)) in urls.iter().enumerate() {
            results[i].push(wrk(&ing, url, SECS));
        }
    }
    let _ = nginx.kill();
    let _ = nginx.wait();
    let fig = |i: usize| {
        let r = &results[i];
        (
            median(r.iter().map(|x| x.rps).collect()),
            median(r.iter().map(|x| x.p50_ms).collect()),
            median(r.iter().map(|x| x.p99_ms).collect()),
        )
    };
    println!(
        "\ningress: wrk -t2 -c64, {SECS} s x {ROUNDS} rounds interleaved, 1 KiB responses, medians"
    );
    println!("| path | requests/s | p50 ms | p99 ms |\n|---|---|---|---|");
    for (i, (name, _)) in urls.iter().enumerate() {
        let (rps, p50, p99) = fig(i);
        println!("| {name} | {rps:.0} | {p50:.2} | {p99:.2} |");
    }
    let (d, n, s) = (fig(0), fig(1), fig(2));
    println!("ratio ingress_rps_vs_nginx {:.2}", s.0 / n.0);
    println!("ratio ingress_p99_vs_nginx {:.2}", s.2 / n.2);
    println!("ratio ingress_rps_vs_direct {:.2}", s.0 / d.0);
}
