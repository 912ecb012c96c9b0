//! The request metadata an HBONE `CONNECT` carries: `baggage`, `forwarded`, `traceparent`.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version, header};

/// Header naming the peer workload (W3C baggage with OpenTelemetry resource keys).
pub const BAGGAGE: &str = "baggage";
/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// What the client side says about the connection it tunnels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestMeta {
    /// Address of the original client (pod) socket, sent as `forwarded: for="<ip:port>"`.
    pub source: SocketAddr,
    /// The source workload, sent as `baggage`; an empty one sends no header.
    pub baggage: Baggage,
    /// Trace context, sent as `traceparent`.
    pub traceparent: TraceParent,
}

impl RequestMeta {
    /// Metadata for a connection from `source` with a fresh random trace context.
    pub fn new(source: SocketAddr, baggage: Baggage) -> Self {
        Self {
            source,
            baggage,
            traceparent: TraceParent::random(),
        }
    }
}

/// Workload attributes carried in `baggage`, the keys ztunnel reads and writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`
    pub cluster: Option<String>,
    /// `k8s.namespace.name`
    pub namespace: Option<String>,
    /// The `<kind>` in `k8s.<kind>.name` (deployment, daemonset, pod, …); `pod` when unset.
    pub workload_kind: Option<String>,
    /// `k8s.<kind>.name`
    pub workload_name: Option<String>,
    /// `service.name` (the canonical service)
    pub service: Option<String>,
    /// `service.version` (the canonical revision)
    pub revision: Option<String>,
    /// `cloud.region`
    pub region: Option<String>,
    /// `cloud.availability_zone`
    pub zone: Option<String>,
}

/// Workload kinds that appear as `k8s.<kind>.name` keys.
const WORKLOAD_KINDS: &[&str] = &[
    "deployment",
    "daemonset",
    "statefulset",
    "replicaset",
    "job",
    "cronjob",
    "pod",
];

impl Baggage {
    /// True when no attribute is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The header value: `key=value` members joined by commas. Values with characters that
    /// baggage does not allow unencoded are left out (Kubernetes names never have them).
    pub fn header_value(&self) -> String {
        let kind = self.workload_kind.as_deref().unwrap_or("pod");
        let workload_key = format!("k8s.{kind}.name");
        let members: [(&str, &Option<String>); 7] = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload_name),
            ("service.name", &self.service),
            ("service.version", &self.revision),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ];
        let mut out = String::new();
        for (key, value) in members {
            let Some(value) = value.as_deref() else {
                continue;
            };
            if !value.bytes().all(is_baggage_octet) {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(key);
            out.push('=');
            out.push_str(value);
        }
        out
    }

    /// Reads every `baggage` header of `headers`; unknown keys and malformed members are skipped.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut baggage = Self::default();
        for value in headers.get_all(BAGGAGE) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            for member in value.split(',') {
                // A member may carry `;property` suffixes; they are not ours.
                let member = member.split(';').next().unwrap_or_default();
                let Some((key, val)) = member.split_once('=') else {
                    continue;
                };
                let (key, val) = (key.trim(), val.trim());
                if val.is_empty() {
                    continue;
                }
                baggage.set(key, val);
            }
        }
        baggage
    }

    fn set(&mut self, key: &str, val: &str) {
        let slot = match key {
            "k8s.cluster.name" => &mut self.cluster,
            "k8s.namespace.name" => &mut self.namespace,
            "service.name" => &mut self.service,
            "service.version" => &mut self.revision,
            "cloud.region" => &mut self.region,
            "cloud.availability_zone" => &mut self.zone,
            _ => {
                let kind = key
                    .strip_prefix("k8s.")
                    .and_then(|k| k.strip_suffix(".name"))
                    .filter(|k| WORKLOAD_KINDS.contains(k));
                let Some(kind) = kind else {
                    return;
                };
                self.workload_kind = Some(kind.to_owned());
                &mut self.workload_name
            }
        };
        *slot = Some(val.to_owned());
    }
}

/// The octets W3C baggage allows in a value without percent-encoding.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

/// W3C trace context (`traceparent: 00-<trace id>-<parent id>-<flags>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 128-bit trace id, never zero.
    pub trace_id: u128,
    /// 64-bit id of the parent span, never zero.
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new, unsampled trace with random ids.
    pub fn random() -> Self {
        Self {
            trace_id: fastrand::u128(1..),
            parent_id: fastrand::u64(1..),
            flags: 0,
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// Why a `traceparent` value was not understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed traceparent {0:?}")]
pub struct TraceParentParseError(pub String);

impl FromStr for TraceParent {
    type Err = TraceParentParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TraceParentParseError(s.to_owned());
        let parts: Vec<&str> = s.split('-').collect();
        let [version, trace, parent, flags] = parts.as_slice() else {
            return Err(err());
        };
        let hex_of =
            |p: &str, len: usize| p.len() == len && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex_of(version, 2) && hex_of(trace, 32) && hex_of(parent, 16) && hex_of(flags, 2))
            || *version == "ff"
        {
            return Err(err());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| err())?;
        let parent_id = u64::from_str_radix(parent, 16).map_err(|_| err())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| err())?;
        if trace_id == 0 || parent_id == 0 {
            return Err(err());
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

/// The `forwarded` value ztunnel sends: `for="<ip:port>"`.
fn forwarded_value(source: SocketAddr) -> String {
    format!("for=\"{source}\"")
}

/// The client address of the first `for=` parameter of a `forwarded` header value (RFC 7239),
/// with or without quotes and port.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let node = node.trim_matches('"');
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let bare = node.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok()
}

/// The destination a `CONNECT` request names: its `:authority` as `ip:port` (IPv6 in
/// brackets), or `None` for anything else (a host name, no port, no authority).
pub fn parse_authority(uri: &Uri) -> Option<SocketAddr> {
    uri.authority().and_then(|a| a.as_str().parse().ok())
}

/// Why a `CONNECT` request could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RequestBuildError {
    /// The authority did not form a valid URI.
    #[error("authority {authority} is not a valid request target: {source}")]
    Authority {
        authority: SocketAddr,
        #[source]
        source: http::uri::InvalidUri,
    },
    /// A header value was rejected.
    #[error("invalid {name} header value: {source}")]
    Header {
        name: &'static str,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    /// The request could not be assembled.
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

/// The `CONNECT` request for `authority` (the original destination `ip:port`).
pub(crate) fn connect_request(
    authority: SocketAddr,
    meta: &RequestMeta,
) -> Result<Request<()>, RequestBuildError> {
    let uri: Uri = authority
        .to_string()
        .parse()
        .map_err(|source| RequestBuildError::Authority { authority, source })?;
    let value = |name: &'static str, v: String| {
        HeaderValue::try_from(v).map_err(|source| RequestBuildError::Header { name, source })
    };
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .version(Version::HTTP_2)
        .header(
            header::FORWARDED,
            value("forwarded", forwarded_value(meta.source))?,
        )
        .header(
            TRACEPARENT,
            value(TRACEPARENT, meta.traceparent.to_string())?,
        );
    if !meta.baggage.is_empty() {
        builder = builder.header(BAGGAGE, value(BAGGAGE, meta.baggage.header_value())?);
    }
    Ok(builder.body(())?)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn baggage_round_trips_through_headers() {
        let baggage = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("shop".into()),
            workload_kind: Some("deployment".into()),
            workload_name: Some("cart".into()),
            service: Some("cart".into()),
            revision: Some("v2".into()),
            region: None,
            zone: Some("zone-a".into()),
        };
        let value = baggage.header_value();
        assert!(value.contains("k8s.deployment.name=cart"), "{value}");
        let mut headers = HeaderMap::new();
        headers.insert(BAGGAGE, HeaderValue::from_str(&value).unwrap());
        assert_eq!(Baggage::from_headers(&headers), baggage);
    }

    #[test]
    fn baggage_skips_unsafe_values_and_unknown_keys() {
        let baggage = Baggage {
            namespace: Some("a b".into()),
            service: Some("svc".into()),
            ..Baggage::default()
        };
        assert_eq!(baggage.header_value(), "service.name=svc");
        let mut headers = HeaderMap::new();
        headers.insert(
            BAGGAGE,
            HeaderValue::from_static("foo=bar, k8s.pod.name=p1;prop=1,broken,k8s.weird.name=x"),
        );
        let parsed = Baggage::from_headers(&headers);
        assert_eq!(parsed.workload_name.as_deref(), Some("p1"));
        assert_eq!(parsed.workload_kind.as_deref(), Some("pod"));
        assert_eq!(parsed.service, None);
    }

    #[test]
    fn traceparent_formats_and_parses() {
        let tp = TraceParent::random();
        let text = tp.to_string();
        assert_eq!(text.len(), 55, "{text}");
        assert_eq!(text.parse::<TraceParent>(), Ok(tp));
        for bad in [
            "00-00000000000000000000000000000000-0000000000000001-00",
            "00-1-2-3",
            "ff-00000000000000000000000000000001-0000000000000001-00",
            "00-0000000000000000000000000000000g-0000000000000001-00",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_parses_what_ztunnel_sends() {
        let v4: SocketAddr = "10.0.1.2:43210".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:443".parse().unwrap();
        assert_eq!(parse_forwarded_for(&forwarded_value(v4)), Some(v4.ip()));
        assert_eq!(parse_forwarded_for(&forwarded_value(v6)), Some(v6.ip()));
        assert_eq!(
            parse_forwarded_for("proto=http;For=192.0.2.60, for=198.51.100.17"),
            Some("192.0.2.60".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }

    #[test]
    fn connect_request_has_authority_and_headers() {
        let meta = RequestMeta::new("10.0.1.2:5000".parse().unwrap(), Baggage::default());
        let req = connect_request("10.0.2.7:8080".parse().unwrap(), &meta).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("10.0.2.7:8080")
        );
        assert_eq!(req.uri().path_and_query(), None);
        assert_eq!(req.headers()[header::FORWARDED], "for=\"10.0.1.2:5000\"");
        assert!(req.headers().get(BAGGAGE).is_none());
        let tp: TraceParent = req.headers()[TRACEPARENT]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(tp, meta.traceparent);
    }
}
