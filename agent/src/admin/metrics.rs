//! The Prometheus metrics Sluice exports: Istio's TCP metrics, with Istio's label names so
//! existing dashboards work, and Sluice's own (`sluice_*`).
//!
//! The registry has no prefix, so every name here is the exact exposed name. Counters are
//! registered without `_total`; the OpenMetrics encoder appends it to the sample name.
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use super::labels::{Escaped, encode_pairs};
use super::stats::PoolStats;
use super::tcp::TcpConnections;
pub use super::tcp::{ConnectionLabels, ConnectionMetrics};
use crate::identity::CertInfo;

/// Name of the certificate expiry gauge.
const CERTIFICATE_EXPIRY: &str = "sluice_certificate_expiry_seconds";

/// The one label `reason` of the denial and refusal counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ReasonLabel {
    reason: String,
}

impl EncodeLabelSet for ReasonLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        encode_pairs(&[("reason", &self.reason)], encoder)
    }
}

/// One label `name="value"` (e.g. `scope`, `stage`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OneLabel {
    name: &'static str,
    value: String,
}

impl EncodeLabelSet for OneLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        encode_pairs(&[(self.name, &self.value)], encoder)
    }
}

/// The HBONE client pools' counters, shared by every pool of the node and read at scrape time.
#[derive(Debug, Default)]
struct HbonePoolCollector(Arc<PoolStats>);

impl Collector for HbonePoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = self.0.snapshot();
        let families: [(&str, &str, MetricType, u64); 5] = [
            (
                "sluice_hbone_pool_connections",
                "HBONE (HTTP/2 over mTLS) connections currently held in the outbound pools.",
                MetricType::Gauge,
                s.connections,
            ),
            (
                "sluice_hbone_handshakes",
                "TLS handshakes completed for outbound HBONE connections.",
                MetricType::Counter,
                s.handshakes,
            ),
            (
                "sluice_hbone_dial_failures",
                "Outbound HBONE connections that failed (TCP, TLS, HTTP/2 preface or timeout).",
                MetricType::Counter,
                s.dial_failures,
            ),
            (
                "sluice_hbone_streams_opened",
                "HBONE CONNECT streams the peer accepted (200).",
                MetricType::Counter,
                s.streams_opened,
            ),
            (
                "sluice_hbone_streams_failed",
                "HBONE CONNECT streams refused by the peer or failed before an answer.",
                MetricType::Counter,
                s.streams_failed,
            ),
        ];
        for (name, help, kind, value) in families {
            let family = encoder.encode_descriptor(name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(value).encode(family)?,
                _ => ConstGauge::new(saturating_i64_u64(value)).encode(family)?,
            }
        }
        Ok(())
    }
}

fn saturating_i64_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Seconds until each held certificate expires, computed at scrape time so the gauge never goes
/// stale between two [`Metrics::set_certificates`] calls.
#[derive(Debug, Default)]
struct CertificateExpiry {
    expiries: RwLock<Vec<(String, OffsetDateTime)>>,
}

impl CertificateExpiry {
    fn set(&self, certs: &[CertInfo]) {
        let fresh = certs
            .iter()
            .map(|c| (c.identity.clone(), c.not_after))
            .collect();
        // A poisoned lock only means a writer panicked mid-assignment; the Vec is still whole.
        *self.expiries.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }
}

impl Collector for CertificateExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let expiries = self.expiries.read().unwrap_or_else(|e| e.into_inner());
        let now = OffsetDateTime::from(SystemTime::now());
        let mut family = encoder.encode_descriptor(
            CERTIFICATE_EXPIRY,
            "Seconds until each workload certificate held by this node expires (negative once expired).",
            None,
            MetricType::Gauge,
        )?;
        for (identity, not_after) in expiries.iter() {
            let labels = [("identity", Escaped(identity))];
            let sample = family.encode_family(&labels)?;
            ConstGauge::new((*not_after - now).whole_seconds()).encode(sample)?;
        }
        Ok(())
    }
}

/// Every metric the agent exports, in one registry. Share it as `Arc<Metrics>`; all methods take
/// `&self` and are cheap enough for the per-connection path (one hash lookup per family).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tcp: Arc<TcpConnections>,
    hbone_pool: Arc<HbonePoolCollector>,
    policy_denials: Family<ReasonLabel, Counter>,
    certificates: Arc<CertificateExpiry>,
    captured_pods: Gauge,
    egress_refusals: Family<ReasonLabel, Counter>,
    hbone_unauthenticated_refused: Family<OneLabel, Counter>,
    hbone_handshake_timeouts: Family<OneLabel, Counter>,
    connection_caps: Family<OneLabel, Counter>,
    own_listener_refusals: Counter,
    capture_failures: Counter,
    pods_held_closed: Gauge,
    transparent_sources_full: Counter,
    window_budget_granted: Gauge,
    window_budget_reduced: Counter,
    mesh_config_not_in_force: Family<OneLabel, Gauge>,
    http: super::http::HttpRequests,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered and at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp = Arc::new(TcpConnections::default());
        let hbone_pool = Arc::new(HbonePoolCollector::default());
        let policy_denials = Family::<ReasonLabel, Counter>::default();
        let certificates = Arc::new(CertificateExpiry::default());
        let captured_pods = Gauge::default();
        let egress_refusals = Family::<ReasonLabel, Counter>::default();
        let hbone_unauthenticated_refused = Family::<OneLabel, Counter>::default();
        let hbone_handshake_timeouts = Family::<OneLabel, Counter>::default();
        let connection_caps = Family::<OneLabel, Counter>::default();
        let own_listener_refusals = Counter::default();
        let capture_failures = Counter::default();
        let pods_held_closed = Gauge::default();
        let transparent_sources_full = Counter::default();
        let window_budget_granted = Gauge::default();
        let window_budget_reduced = Counter::default();
        // Always 1; the labels say which build runs (dashboards join on it, as on
        // istio_build / cilium_version).
        let build_info = Family::<OneLabel, Gauge>::default();
        build_info
            .get_or_create(&OneLabel {
                name: "version",
                value: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);

        let http = super::http::HttpRequests::register(&mut registry);
        registry.register_collector(Box::new(tcp.clone()));
        registry.register_collector(Box::new(hbone_pool.clone()));
        registry.register(
            "sluice_policy_denials",
            "Connections refused by PeerAuthentication or AuthorizationPolicy, by reason.",
            policy_denials.clone(),
        );
        registry.register_collector(Box::new(certificates.clone()));
        registry.register(
            "sluice_captured_pods",
            "Pods whose traffic this node currently captures.",
            captured_pods.clone(),
        );
        registry.register(
            "sluice_egress_refusals",
            "Egress connections refused, by reason.",
            egress_refusals.clone(),
        );
        registry.register(
            "sluice_hbone_unauthenticated_refused",
            "HBONE connections closed at accept because too many others had not yet authenticated, by the cap that was full (scope=node, source).",
            hbone_unauthenticated_refused.clone(),
        );
        registry.register(
            "sluice_hbone_handshake_timeouts",
            "HBONE connections closed for not finishing the TLS handshake (stage=tls) or not sending a first request (stage=first_request) in time.",
            hbone_handshake_timeouts.clone(),
        );
        registry.register(
            "sluice_proxy_connection_limit_refusals",
            "Connections refused because a cap on connections in flight was reached, by scope (pod, node).",
            connection_caps.clone(),
        );
        registry.register(
            "sluice_proxy_own_listener_refusals",
            "Connections refused because they were addressed to the agent's own listeners.",
            own_listener_refusals.clone(),
        );
        registry.register(
            "sluice_capture_failures",
            "Attempts to capture a pod that failed (e.g. its application holds a proxy port); the pod is held closed and retried.",
            capture_failures.clone(),
        );
        registry.register(
            "sluice_pods_held_closed",
            "Enrolled pods whose capture failed: their traffic is refused until a retry succeeds.",
            pods_held_closed.clone(),
        );
        registry.register(
            "sluice_tproxy_map_full",
            "Connections to an application refused because the sluice_tproxy map was full.",
            transparent_sources_full.clone(),
        );
        registry.register(
            "sluice_hbone_window_budget_granted_bytes",
            "HTTP/2 receive window granted to the HBONE connections this node serves beyond each one's initial 65535 bytes (at most spec.hbone.windowBudgetBytes).",
            window_budget_granted.clone(),
        );
        registry.register(
            "sluice_hbone_window_budget_reduced",
            "Served HBONE connections given a smaller receive window than configured because the node's window budget ran low.",
            window_budget_reduced.clone(),
        );
        let mesh_config_not_in_force = Family::<OneLabel, Gauge>::default();
        registry.register(
            "sluice_mesh_config_not_in_force",
            "1 for each mesh config ConfigMap an operator may expect in force that is not: the one spec.meshConfig names when it does not exist, and the revisioned ones (istio.io/rev) Sluice does not read.",
            mesh_config_not_in_force.clone(),
        );
        registry.register(
            "sluice_build_info",
            "Always 1, labelled with the running build's version.",
            build_info,
        );

        Self {
            registry,
            tcp,
            hbone_pool,
            policy_denials,
            certificates,
            captured_pods,
            egress_refusals,
            hbone_unauthenticated_refused,
            hbone_handshake_timeouts,
            connection_caps,
            own_listener_refusals,
            capture_failures,
            pods_held_closed,
            transparent_sources_full,
            window_budget_granted,
            window_budget_reduced,
            mesh_config_not_in_force,
            http,
        }
    }

    /// Replaces the series of `sluice_mesh_config_not_in_force` with one per ConfigMap
    /// (`namespace/name`) in `config_maps`.
    pub fn set_mesh_config_not_in_force<'a>(&self, config_maps: impl IntoIterator<Item = &'a str>) {
        self.mesh_config_not_in_force.clear();
        for cm in config_maps {
            self.mesh_config_not_in_force
                .get_or_create(&OneLabel {
                    name: "configmap",
                    value: cm.to_owned(),
                })
                .set(1);
        }
    }

    /// HTTP request metrics (the ingress gateway's).
    pub fn http(&self) -> &super::http::HttpRequests {
        &self.http
    }

    /// Counts a failed attempt to capture a pod.
    pub fn capture_failed(&self) {
        self.capture_failures.inc();
    }

    /// Sets the number of pods held closed after a failed capture.
    pub fn set_pods_held_closed(&self, n: usize) {
        self.pods_held_closed.set(saturating_i64(n));
    }

    /// Counts a connection refused because `sluice_tproxy` was full.
    pub fn transparent_sources_full(&self) {
        self.transparent_sources_full.inc();
    }

    /// Sets the HTTP/2 receive window granted to served HBONE connections (bytes).
    pub fn set_window_budget_granted(&self, bytes: usize) {
        self.window_budget_granted.set(saturating_i64(bytes));
    }

    /// Counts a served HBONE connection given less than its window by the window budget.
    pub fn window_budget_short(&self) {
        self.window_budget_reduced.inc();
    }

    /// Counts an HBONE connection closed at accept over the unauthenticated cap of `scope`
    /// (`node`, `source`).
    pub fn hbone_unauthenticated_refused(&self, scope: &'static str) {
        self.hbone_unauthenticated_refused
            .get_or_create(&OneLabel {
                name: "scope",
                value: scope.to_owned(),
            })
            .inc();
    }

    /// Counts an HBONE connection closed for being slow at `stage` (`tls`, `first_request`).
    pub fn hbone_handshake_timeout(&self, stage: &'static str) {
        self.hbone_handshake_timeouts
            .get_or_create(&OneLabel {
                name: "stage",
                value: stage.to_owned(),
            })
            .inc();
    }

    /// Counts a connection refused by the cap of `scope` (`pod`, `node`).
    pub fn connection_cap_hit(&self, scope: &'static str) {
        self.connection_caps
            .get_or_create(&OneLabel {
                name: "scope",
                value: scope.to_owned(),
            })
            .inc();
    }

    /// Counts a connection refused for being addressed to the agent's own listener.
    pub fn own_listener_refused(&self) {
        self.own_listener_refusals.inc();
    }

    /// Counts a connection opened (`istio_tcp_connections_opened_total`).
    pub fn opened(&self, labels: &ConnectionLabels) {
        self.tcp.opened(labels);
    }

    /// Counts a connection opened and returns its handle: bytes are added through the handle
    /// without any further lookup, and dropping it counts the close. Use this when the labels
    /// are known at open; use [`Metrics::opened`]/[`Metrics::closed`] when the close needs
    /// other labels (e.g. `response_flags` learnt late).
    pub fn connection(&self, labels: &ConnectionLabels) -> ConnectionMetrics {
        self.tcp.connection(labels)
    }

    /// Counts a connection closed and the bytes it carried: `sent` in responses (destination to
    /// source), `received` in requests (source to destination), as Istio defines them.
    pub fn closed(&self, labels: &ConnectionLabels, sent: u64, received: u64) {
        self.tcp.closed(labels, sent, received);
    }

    /// Counts a connection refused by policy (`sluice_policy_denials_total{reason}`).
    pub fn policy_denied(&self, reason: &str) {
        inc_reason(&self.policy_denials, reason);
    }

    /// The counters every outbound HBONE pool of this node shares (read at scrape time).
    pub fn hbone_pool_stats(&self) -> Arc<PoolStats> {
        self.hbone_pool.0.clone()
    }

    /// Sets the number of pods whose traffic is captured.
    pub fn set_captured_pods(&self, n: usize) {
        self.captured_pods.set(saturating_i64(n));
    }

    /// Counts an egress connection refused (`sluice_egress_refusals_total{reason}`).
    pub fn egress_refused(&self, reason: &str) {
        inc_reason(&self.egress_refusals, reason);
    }

    /// Replaces the certificates behind `sluice_certificate_expiry_seconds{identity}` with
    /// `certs` (as `identity::SecretManager::certificates()` returns them); identities no
    /// longer listed disappear from the output.
    pub fn set_certificates(&self, certs: &[CertInfo]) {
        self.certificates.set(certs);
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn inc_reason(family: &Family<ReasonLabel, Counter>, reason: &str) {
    let label = ReasonLabel {
        reason: reason.to_owned(),
    };
    family.get_or_create(&label).inc();
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn labels(reporter: &str, source: &str) -> ConnectionLabels {
        ConnectionLabels {
            reporter: reporter.into(),
            source_workload: source.into(),
            source_workload_namespace: "shop".into(),
            source_principal: format!("spiffe://cluster.local/ns/shop/sa/{source}"),
            destination_workload: "db".into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/db".into(),
            connection_security_policy: ConnectionLabels::MUTUAL_TLS.into(),
            request_protocol: ConnectionLabels::TCP.into(),
            response_flags: ConnectionLabels::NO_FLAGS.into(),
            destination_service: "db.shop.svc.cluster.local".into(),
            destination_service_name: "db".into(),
            destination_service_namespace: "shop".into(),
        }
    }

    fn label_text(l: &ConnectionLabels) -> String {
        l.pairs()
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The sample line for `name` whose label set is exactly `labels`, if present.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().expect("numeric sample"))
    }

    #[test]
    fn build_info_names_the_version() {
        let text = Metrics::new().encode().unwrap();
        let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
        assert_eq!(sample(&text, "sluice_build_info", &version), Some(1.0));
    }

    #[test]
    fn connection_counters_render_with_istio_names_and_labels() {
        let m = Metrics::new();
        let web = labels(ConnectionLabels::SOURCE, "web");
        let api = labels(ConnectionLabels::DESTINATION, "api");
        m.opened(&web);
        m.opened(&web);
        m.opened(&api);
        m.closed(&web, 1000, 20);
        m.closed(&web, 5, 7);
        let text = m.encode().unwrap();

        let (w, a) = (label_text(&web), label_text(&api));
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", &w),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", &a),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &w),
            Some(2.0)
        );
        // A label set once seen shows all four counters, zero included.
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &a),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "istio_tcp_sent_bytes_total", &w),
            Some(1005.0)
        );
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", &w),
            Some(27.0)
        );
        assert!(text.contains("# TYPE istio_tcp_connections_opened counter"));
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn a_connection_handle_counts_bytes_live_and_the_close_on_drop() {
        let m = Metrics::new();
        let web = labels(ConnectionLabels::SOURCE, "web");
        let w = label_text(&web);
        let conn = m.connection(&web);
        conn.sent(100);
        conn.received(40);
        conn.sent(1);
        let text = m.encode().unwrap();
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", &w),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &w),
            Some(0.0)
        );
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", &w), Some(101.0));
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", &w),
            Some(40.0)
        );

        drop(conn);
        // The handle and the label-based calls feed the same series.
        m.closed(&web, 9, 0);
        let text = m.encode().unwrap();
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &w),
            Some(2.0)
        );
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", &w), Some(110.0));
    }

    #[test]
    fn sluice_metrics_render_with_their_names() {
        let m = Metrics::new();
        let pool = m.hbone_pool_stats();
        pool.handshakes
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        pool.connections
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        m.set_captured_pods(11);
        m.policy_denied("strict_mtls");
        m.policy_denied("strict_mtls");
        m.policy_denied("authz_deny");
        m.egress_refused("no_prefix");
        let text = m.encode().unwrap();

        assert_eq!(
            sample_plain(&text, "sluice_hbone_handshakes_total"),
            Some(2.0)
        );
        assert_eq!(
            sample_plain(&text, "sluice_hbone_pool_connections"),
            Some(3.0)
        );
        assert_eq!(sample_plain(&text, "sluice_captured_pods"), Some(11.0));
        assert_eq!(
            sample(
                &text,
                "sluice_policy_denials_total",
                "reason=\"strict_mtls\""
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "sluice_policy_denials_total",
                "reason=\"authz_deny\""
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "sluice_egress_refusals_total",
                "reason=\"no_prefix\""
            ),
            Some(1.0)
        );
        assert!(text.contains("# TYPE sluice_hbone_pool_connections gauge"));
    }

    fn sample_plain(text: &str, name: &str) -> Option<f64> {
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().expect("numeric sample"))
    }

    fn cert(identity: &str, expires_in: Duration) -> CertInfo {
        let now = OffsetDateTime::now_utc();
        CertInfo {
            identity: identity.into(),
            serial: "01".into(),
            issuer: "O=cluster.local".into(),
            not_before: now - Duration::hours(1),
            not_after: now + expires_in,
            roots: 1,
        }
    }

    #[test]
    fn mesh_config_notices_replace_each_other() {
        let m = Metrics::new();
        m.set_mesh_config_not_in_force(["istio-system/istio", "aks-istio-system/x"]);
        m.set_mesh_config_not_in_force(["aks-istio-system/x"]);
        let text = m.encode().unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sluice_mesh_config_not_in_force{"))
            .collect();
        assert_eq!(
            series,
            [r#"sluice_mesh_config_not_in_force{configmap="aks-istio-system/x"} 1"#]
        );
    }

    /// The Grafana dashboard shipped in `deploy/grafana` charts only metrics the agent exports,
    /// with labels they carry: a renamed metric fails here rather than as an empty panel.
    #[test]
    fn the_grafana_dashboard_reads_only_exported_metrics() {
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../../deploy/grafana/sluice-dashboard.json"
        ))
        .expect("the dashboard is JSON");
        // One series in each labelled family: an empty family writes no `# TYPE` line.
        let m = Metrics::new();
        m.set_certificates(&[cert("spiffe://cluster.local/ns/a/sa/b", Duration::hours(1))]);
        m.policy_denied("authz_deny");
        m.egress_refused("registry_only");
        m.hbone_unauthenticated_refused("node");
        m.hbone_handshake_timeout("tls");
        m.connection_cap_hit("pod");
        m.set_mesh_config_not_in_force(["istio-system/istio"]);
        let labels = ConnectionLabels::default();
        m.opened(&labels);
        m.closed(&labels, 1, 1);
        let text = m.encode().unwrap();
        // Every family, as `# TYPE <name> <type>` names it, with the suffixes a series adds.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let exported = |name: &str| {
            families.iter().any(|f| {
                name == *f
                    || ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(f))
            })
        };
        let mut exprs = Vec::new();
        fn collect<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v) {
                            ("expr" | "query", serde_json::Value::String(e)) => out.push(e),
                            _ => collect(v, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        collect(&dashboard, &mut exprs);
        assert!(exprs.len() >= 10, "{exprs:?}");
        let mut names = 0;
        for expr in exprs {
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("sluice_") || token.starts_with("istio_") {
                    names += 1;
                    assert!(exported(token), "{token} (in {expr}) is not exported");
                }
            }
        }
        assert!(names >= 15, "{names}");
    }

    #[test]
    fn certificate_expiry_follows_the_latest_set() {
        let m = Metrics::new();
        let a = "spiffe://cluster.local/ns/shop/sa/web";
        let b = "spiffe://cluster.local/ns/shop/sa/db";
        m.set_certificates(&[cert(a, Duration::hours(12)), cert(b, Duration::minutes(-5))]);
        let text = m.encode().unwrap();
        let a_secs = sample(&text, CERTIFICATE_EXPIRY, &format!("identity=\"{a}\"")).unwrap();
        let b_secs = sample(&text, CERTIFICATE_EXPIRY, &format!("identity=\"{b}\"")).unwrap();
        // Computed at scrape time: a few seconds may have passed since `cert` was built.
        assert!(
            (12.0 * 3600.0 - 5.0..=12.0 * 3600.0).contains(&a_secs),
            "{a_secs}"
        );
        assert!((-300.0 - 5.0..=-300.0).contains(&b_secs), "{b_secs}");
        assert!(text.contains(&format!("# TYPE {CERTIFICATE_EXPIRY} gauge")));

        // Rotation leaves only the identities still held.
        m.set_certificates(&[cert(b, Duration::hours(24))]);
        let text = m.encode().unwrap();
        assert_eq!(
            sample(&text, CERTIFICATE_EXPIRY, &format!("identity=\"{a}\"")),
            None
        );
        assert!(sample(&text, CERTIFICATE_EXPIRY, &format!("identity=\"{b}\"")).unwrap() > 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.policy_denied("say \"no\"\\\nnow");
        let text = m.encode().unwrap();
        assert_eq!(
            sample(
                &text,
                "sluice_policy_denials_total",
                r#"reason="say \"no\"\\\nnow""#
            ),
            Some(1.0)
        );
    }
}
