//! The Prometheus metrics Sluice exports: Istio's TCP metrics, with Istio's label names so
//! existing dashboards work, and Sluice's own (`sluice_*`).
//!
//! The registry has no prefix, so every name here is the exact exposed name. Counters are
//! registered without `_total`; the OpenMetrics encoder appends it to the sample name.
use std::fmt::{self, Write as _};
use std::sync::RwLock;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::identity::CertInfo;

/// Name of the certificate expiry gauge.
const CERTIFICATE_EXPIRY: &str = "sluice_certificate_expiry_seconds";

/// Istio's standard labels on a TCP connection's metrics. Every field is one label of the same
/// name; values are free text (escaped on output). Unknown values are `"unknown"` in Istio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// Which side reports: [`ConnectionLabels::SOURCE`] or [`ConnectionLabels::DESTINATION`].
    pub reporter: String,
    /// Source workload name (e.g. the Deployment's name).
    pub source_workload: String,
    /// Source workload's namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE identity, `spiffe://<td>/ns/<ns>/sa/<sa>`, or `"unknown"`.
    pub source_principal: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination workload's namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE identity, or `"unknown"`.
    pub destination_principal: String,
    /// [`ConnectionLabels::MUTUAL_TLS`] or [`ConnectionLabels::NONE`].
    pub connection_security_policy: String,
    /// [`ConnectionLabels::TCP`] for every L4 connection.
    pub request_protocol: String,
    /// `"-"` ([`ConnectionLabels::NO_FLAGS`]) or a short Envoy-style code such as `"UF"`.
    pub response_flags: String,
}

impl ConnectionLabels {
    /// `reporter` value when the source side's proxy reports.
    pub const SOURCE: &str = "source";
    /// `reporter` value when the destination side's proxy reports.
    pub const DESTINATION: &str = "destination";
    /// `connection_security_policy` for HBONE (mTLS) connections.
    pub const MUTUAL_TLS: &str = "mutual_tls";
    /// `connection_security_policy` for plaintext connections.
    pub const NONE: &str = "none";
    /// `request_protocol` for L4 connections.
    pub const TCP: &str = "tcp";
    /// `response_flags` when nothing went wrong.
    pub const NO_FLAGS: &str = "-";
    /// Istio's value for a label Sluice cannot know.
    pub const UNKNOWN: &str = "unknown";

    fn pairs(&self) -> [(&'static str, &str); 10] {
        [
            ("reporter", &self.reporter),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            (
                "connection_security_policy",
                &self.connection_security_policy,
            ),
            ("request_protocol", &self.request_protocol),
            ("response_flags", &self.response_flags),
        ]
    }
}

impl EncodeLabelSet for ConnectionLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        encode_pairs(&self.pairs(), encoder)
    }
}

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

fn encode_pairs(pairs: &[(&str, &str)], encoder: &mut LabelSetEncoder) -> fmt::Result {
    for (key, value) in pairs {
        EncodeLabel::encode(&(*key, Escaped(value)), encoder.encode_label())?;
    }
    Ok(())
}

/// A label value escaped as the exposition formats require (`\\`, `\"`, `\n`); the
/// prometheus-client text encoder writes values verbatim.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
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
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent_bytes: Family<ConnectionLabels, Counter>,
    received_bytes: Family<ConnectionLabels, Counter>,
    pool_connections: Gauge,
    handshakes: Counter,
    policy_denials: Family<ReasonLabel, Counter>,
    certificates: std::sync::Arc<CertificateExpiry>,
    captured_pods: Gauge,
    egress_refusals: Family<ReasonLabel, Counter>,
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
        let opened = Family::<ConnectionLabels, Counter>::default();
        let closed = Family::<ConnectionLabels, Counter>::default();
        let sent_bytes = Family::<ConnectionLabels, Counter>::default();
        let received_bytes = Family::<ConnectionLabels, Counter>::default();
        let pool_connections = Gauge::default();
        let handshakes = Counter::default();
        let policy_denials = Family::<ReasonLabel, Counter>::default();
        let certificates = std::sync::Arc::new(CertificateExpiry::default());
        let captured_pods = Gauge::default();
        let egress_refusals = Family::<ReasonLabel, Counter>::default();

        registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened.",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed.",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during TCP connections, towards the destination.",
            sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during TCP connections, from the destination.",
            received_bytes.clone(),
        );
        registry.register(
            "sluice_hbone_pool_connections",
            "HBONE (HTTP/2 over mTLS) connections currently held in the outbound pool.",
            pool_connections.clone(),
        );
        registry.register(
            "sluice_hbone_handshakes",
            "TLS handshakes completed for HBONE connections.",
            handshakes.clone(),
        );
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

        Self {
            registry,
            opened,
            closed,
            sent_bytes,
            received_bytes,
            pool_connections,
            handshakes,
            policy_denials,
            certificates,
            captured_pods,
            egress_refusals,
        }
    }

    /// Counts a connection opened (`istio_tcp_connections_opened_total`).
    pub fn opened(&self, labels: &ConnectionLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// Counts a connection opened and returns its handle: bytes are added through the handle
    /// without any further lookup, and dropping it counts the close. Use this when the labels
    /// are known at open; use [`Metrics::opened`]/[`Metrics::closed`] when the close needs
    /// other labels (e.g. `response_flags` learnt late).
    pub fn connection(&self, labels: &ConnectionLabels) -> ConnectionMetrics {
        self.opened(labels);
        ConnectionMetrics {
            closed: self.closed.get_or_create_owned(labels),
            sent: self.sent_bytes.get_or_create_owned(labels),
            received: self.received_bytes.get_or_create_owned(labels),
        }
    }

    /// Counts a connection closed and the bytes it carried: `sent` towards the destination,
    /// `received` from it.
    pub fn closed(&self, labels: &ConnectionLabels, sent: u64, received: u64) {
        self.closed.get_or_create(labels).inc();
        self.sent_bytes.get_or_create(labels).inc_by(sent);
        self.received_bytes.get_or_create(labels).inc_by(received);
    }

    /// Counts a connection refused by policy (`sluice_policy_denials_total{reason}`).
    pub fn policy_denied(&self, reason: &str) {
        inc_reason(&self.policy_denials, reason);
    }

    /// Counts one completed HBONE TLS handshake.
    pub fn handshake(&self) {
        self.handshakes.inc();
    }

    /// Sets the number of pooled HBONE connections.
    pub fn set_pool_connections(&self, n: usize) {
        self.pool_connections.set(saturating_i64(n));
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

/// One open connection's counters, from [`Metrics::connection`]. Dropping it counts the
/// connection as closed; bytes already added stay counted.
#[derive(Debug)]
#[must_use = "dropping the handle counts the connection as closed"]
pub struct ConnectionMetrics {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl ConnectionMetrics {
    /// Adds bytes sent towards the destination (`istio_tcp_sent_bytes_total`).
    pub fn sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// Adds bytes received from the destination (`istio_tcp_received_bytes_total`).
    pub fn received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.closed.inc();
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
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &a),
            None
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
        m.handshake();
        m.handshake();
        m.set_pool_connections(3);
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
