//! Tables for `sluice status` and `sluice dump`, in the habit of `istioctl ztunnel-config`.
use std::fmt::Write as _;

use serde_json::Value;

use super::DumpKind;
use crate::admin::status::AgentStatus;

/// Left-aligned columns separated by two spaces, a header first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let _ = write!(text, "{cell:<w$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A field of a dump entry as text: strings as they are, lists joined by commas, nothing as `-`.
fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.is_empty() => "-".to_owned(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// The entries of one dump section as a table.
pub fn dump_table(kind: DumpKind, items: &[Value]) -> String {
    match kind {
        DumpKind::Workloads => table(
            &[
                "NAMESPACE",
                "NAME",
                "ADDRESS",
                "NODE",
                "PROTOCOL",
                "IDENTITY",
            ],
            &items
                .iter()
                .map(|w| {
                    vec![
                        field(w, "namespace"),
                        field(w, "name"),
                        field(w, "workloadIps"),
                        field(w, "node"),
                        field(w, "protocol"),
                        format!(
                            "spiffe://{}/ns/{}/sa/{}",
                            field(w, "trustDomain"),
                            field(w, "namespace"),
                            field(w, "serviceAccount")
                        ),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        DumpKind::Services => table(
            &["NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS"],
            &items
                .iter()
                .map(|s| {
                    let endpoints = s
                        .get("endpoints")
                        .and_then(Value::as_object)
                        .map(|e| {
                            let healthy = e.values().filter(|e| e["status"] == "Healthy").count();
                            format!("{healthy}/{}", e.len())
                        })
                        .unwrap_or_else(|| "0/0".to_owned());
                    let ports = s
                        .get("ports")
                        .and_then(Value::as_object)
                        .map(|p| {
                            p.iter()
                                .map(|(port, target)| format!("{port}→{target}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        field(s, "namespace"),
                        field(s, "name"),
                        field(s, "vips").replace('/', ""),
                        ports,
                        endpoints,
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        DumpKind::Policies => table(
            &["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES"],
            &items
                .iter()
                .map(|p| {
                    let rules = p.get("rules").and_then(Value::as_array).map_or(0, Vec::len);
                    vec![
                        field(p, "namespace"),
                        field(p, "name"),
                        field(p, "action"),
                        field(p, "scope"),
                        rules.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        DumpKind::Certificates => table(
            &["IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER"],
            &items
                .iter()
                .map(|c| {
                    let leaf = &c["certChain"][0];
                    vec![
                        field(c, "identity"),
                        field(c, "state"),
                        field(leaf, "serialNumber"),
                        field(leaf, "validFrom"),
                        field(leaf, "expirationTime"),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

/// `sluice status` as text.
pub fn status_text(s: &AgentStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Node:          {} (sluice {})", s.node, s.version);
    let ready = if s.ready {
        "yes".to_owned()
    } else if s.waiting_for.is_empty() {
        "no".to_owned()
    } else {
        format!("no, waiting for {}", s.waiting_for.join(", "))
    };
    let _ = writeln!(out, "Ready:         {ready}");
    let c = &s.config;
    let published = c
        .report
        .published_at
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "never".to_owned());
    let _ = writeln!(
        out,
        "Config:        generation {}, published {published}",
        c.report.generation
    );
    let _ = writeln!(
        out,
        "               {} workloads, {} services, {} authorization policies, {} peer authentications",
        c.workloads, c.services, c.authorization_policies, c.peer_authentications
    );
    let _ = writeln!(out, "Rejected:      {}", c.report.rejections.len());
    for r in &c.report.rejections {
        let _ = writeln!(out, "  {r}");
    }
    let captured = s.pods.iter().filter(|p| p.captured).count();
    let _ = writeln!(
        out,
        "Pods:          {} known on this node, {captured} captured",
        s.pods.len()
    );
    if !s.pods.is_empty() {
        let rows: Vec<Vec<String>> = s
            .pods
            .iter()
            .map(|p| {
                vec![
                    p.namespace.clone(),
                    p.name.clone(),
                    p.ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    if p.captured { "yes" } else { "no" }.to_owned(),
                ]
            })
            .collect();
        indent(
            &mut out,
            &table(&["NAMESPACE", "NAME", "IPS", "CAPTURED"], &rows),
        );
    }
    let _ = writeln!(out, "Certificates:  {}", s.certificates.len());
    if !s.certificates.is_empty() {
        let rows: Vec<Vec<String>> = s
            .certificates
            .iter()
            .map(|c| {
                vec![
                    c.identity.clone(),
                    c.not_after
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                    duration(c.expires_in_seconds),
                ]
            })
            .collect();
        indent(
            &mut out,
            &table(&["IDENTITY", "NOT AFTER", "EXPIRES IN"], &rows),
        );
    }
    let p = &s.hbone_pool;
    let _ = writeln!(
        out,
        "HBONE pool:    {} connections, {} active streams; {} handshakes, {} dial failures, {} streams opened, {} failed",
        p.connections,
        p.active_streams,
        p.handshakes,
        p.dial_failures,
        p.streams_opened,
        p.streams_failed
    );
    let l = &s.limits;
    let _ = writeln!(
        out,
        "Limits:        {} connections per pod, {} per node, {} open files",
        l.max_connections_per_pod, l.max_connections_per_node, l.open_files
    );
    if !s.warnings.is_empty() {
        let _ = writeln!(out, "Warnings:");
        for w in &s.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
}

/// `3d4h`, `5h12m`, `42m`, `17s`, or `expired` for a certificate.
fn duration(seconds: i64) -> String {
    if seconds <= 0 {
        return "expired".to_owned();
    }
    let (d, h, m) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["NAME", "X"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME    X\na       1\nlonger  22\n");
    }

    #[test]
    fn durations_read_as_an_operator_would_say_them() {
        assert_eq!(duration(-5), "expired");
        assert_eq!(duration(17), "17s");
        assert_eq!(duration(42 * 60 + 3), "42m");
        assert_eq!(duration(5 * 3600 + 12 * 60), "5h12m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600 + 59), "3d4h");
    }

    #[test]
    fn a_workload_row_names_its_identity() {
        let w = serde_json::json!({
            "namespace": "shop", "name": "web-1", "workloadIps": ["10.1.0.5"],
            "node": "n1", "protocol": "HBONE", "trustDomain": "cluster.local",
            "serviceAccount": "web",
        });
        let t = dump_table(DumpKind::Workloads, &[w]);
        let row = t.lines().nth(1).expect("a row");
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "shop",
                "web-1",
                "10.1.0.5",
                "n1",
                "HBONE",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
    }
}
