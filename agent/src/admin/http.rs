//! Istio's HTTP request metrics, as the ingress gateway reports them: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes`.
use std::fmt;

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{labels::encode_pairs, tcp::ConnectionLabels};

/// The labels of one request: Istio's standard set and the response code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub conn: ConnectionLabels,
    pub response_code: u16,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        encode_pairs(&self.conn.pairs(), encoder)?;
        encode_pairs(
            &[("response_code", &self.response_code.to_string())],
            encoder,
        )
    }
}

/// Milliseconds, Istio's default buckets.
const DURATION_BUCKETS: [f64; 14] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];
/// Bytes, powers of ten as Istio's.
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The four families, registered once.
#[derive(Debug, Clone)]
pub struct HttpRequests {
    total: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

impl HttpRequests {
    /// The families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            total: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
        };
        registry.register(
            "istio_requests",
            "HTTP requests, by Istio's standard labels and response code.",
            this.total.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival to its response's end, in milliseconds.",
            this.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes, in bytes.",
            this.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes, in bytes.",
            this.response_bytes.clone(),
        );
        this
    }

    /// Records one finished request.
    pub fn record(
        &self,
        labels: &RequestLabels,
        millis: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.total.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }
}
