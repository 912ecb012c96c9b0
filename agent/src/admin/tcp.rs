//! Istio's four TCP connection metrics, kept in one table keyed by the label set so that a
//! connection costs one hash lookup, not one per metric.
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::labels::encode_pairs;

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
    /// The Service the connection was for: `<name>.<namespace>.svc.cluster.local` (or a
    /// ServiceEntry host), or `"unknown"`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
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

    pub(super) fn pairs(&self) -> [(&'static str, &str); 13] {
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
            ("destination_service", &self.destination_service),
            ("destination_service_name", &self.destination_service_name),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
        ]
    }
}

impl EncodeLabelSet for ConnectionLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        encode_pairs(&self.pairs(), encoder)
    }
}

/// The four counters of one label set.
#[derive(Debug, Default)]
struct Series {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// Which of a [`Series`]' counters a metric family shows.
type Field = fn(&Series) -> &AtomicU64;

/// Name (without `_total`, which the encoder appends), help and counter of each family.
const FAMILIES: [(&str, &str, Field); 4] = [
    (
        "istio_tcp_connections_opened",
        "Total TCP connections opened.",
        |s| &s.opened,
    ),
    (
        "istio_tcp_connections_closed",
        "Total TCP connections closed.",
        |s| &s.closed,
    ),
    (
        "istio_tcp_sent_bytes",
        "Bytes sent during TCP connections, towards the destination.",
        |s| &s.sent,
    ),
    (
        "istio_tcp_received_bytes",
        "Bytes received during TCP connections, from the destination.",
        |s| &s.received,
    ),
];

/// Every label set seen so far and its counters. Series are never removed, as in Istio.
#[derive(Debug, Default)]
pub(super) struct TcpConnections {
    series: RwLock<HashMap<ConnectionLabels, Arc<Series>>>,
}

impl TcpConnections {
    /// Runs `f` on the series of `labels`, creating it on first use. The common case takes only
    /// the read lock and allocates nothing.
    fn with<R>(&self, labels: &ConnectionLabels, f: impl FnOnce(&Arc<Series>) -> R) -> R {
        // A poisoned lock only means a holder panicked; the map itself is intact.
        if let Some(series) = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(labels)
        {
            return f(series);
        }
        let mut map = self.series.write().unwrap_or_else(|e| e.into_inner());
        f(map.entry(labels.clone()).or_default())
    }

    pub(super) fn opened(&self, labels: &ConnectionLabels) {
        self.with(labels, |s| s.opened.fetch_add(1, Ordering::Relaxed));
    }

    pub(super) fn closed(&self, labels: &ConnectionLabels, sent: u64, received: u64) {
        self.with(labels, |s| {
            s.sent.fetch_add(sent, Ordering::Relaxed);
            s.received.fetch_add(received, Ordering::Relaxed);
            s.closed.fetch_add(1, Ordering::Relaxed);
        });
    }

    pub(super) fn connection(&self, labels: &ConnectionLabels) -> ConnectionMetrics {
        let series = self.with(labels, |s| {
            s.opened.fetch_add(1, Ordering::Relaxed);
            s.clone()
        });
        ConnectionMetrics { series }
    }
}

impl Collector for TcpConnections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let map = self.series.read().unwrap_or_else(|e| e.into_inner());
        for (name, help, field) in FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, series) in map.iter() {
                let value = field(series).load(Ordering::Relaxed);
                ConstCounter::new(value).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// One open connection's counters, from [`Metrics::connection`](super::Metrics::connection).
/// Dropping it counts the connection as closed; bytes already added stay counted.
#[derive(Debug)]
#[must_use = "dropping the handle counts the connection as closed"]
pub struct ConnectionMetrics {
    series: Arc<Series>,
}

impl ConnectionMetrics {
    /// Adds response bytes, from the destination back to the source
    /// (`istio_tcp_sent_bytes_total`, "bytes sent during response" in Istio's definition).
    pub fn sent(&self, bytes: u64) {
        self.series.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds request bytes, from the source towards the destination
    /// (`istio_tcp_received_bytes_total`, "bytes received during request").
    pub fn received(&self, bytes: u64) {
        self.series.received.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.series.closed.fetch_add(1, Ordering::Relaxed);
    }
}
