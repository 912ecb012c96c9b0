//! The wire format of Istio's certificate API, written from its documented messages
//! (`security/v1alpha1/ca.proto` in istio/api):
//!
//! ```proto
//! package istio.v1.auth;
//! service IstioCertificateService {
//!   rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse);
//! }
//! message IstioCertificateRequest {
//!   string csr = 1;                        // PEM PKCS#10
//!   int64 validity_duration = 2;           // seconds
//!   google.protobuf.Struct metadata = 3;   // e.g. {"ImpersonatedIdentity": "spiffe://…"}
//! }
//! message IstioCertificateResponse { repeated string cert_chain = 1; }  // leaf … root, PEM
//! ```
//!
//! Both ends of Sluice use this module: the agent's client ([`super::ca_client`]) and the
//! `sluice ca` service. The protobuf encoding is written by hand (three fields and a Struct of
//! strings), and so is the gRPC framing: a 1-byte compression flag and a 4-byte big-endian length
//! before each message, `grpc-status` in the trailers.
use std::collections::BTreeMap;

/// The gRPC method path.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key with which a node proxy asks for another identity than its own (Istio's
/// node authorizer reads it).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The gRPC header Istio's clients send with the cluster's name (`Kubernetes` by default).
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

/// A certificate request as sent on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateRequest {
    /// PEM-encoded PKCS#10 request.
    pub csr: String,
    /// Requested lifetime in seconds.
    pub validity_duration: i64,
    /// The string-valued entries of the request's `metadata` Struct (others are dropped).
    pub metadata: BTreeMap<String, String>,
}

/// A certificate response: PEM certificates, the leaf first and the root last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateResponse {
    pub cert_chain: Vec<String>,
}

/// gRPC status codes the certificate API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcCode {
    Ok = 0,
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The code for a numeric `grpc-status`; unknown numbers are reported as `Internal`.
    pub fn from_number(n: u32) -> Self {
        match n {
            0 => Self::Ok,
            3 => Self::InvalidArgument,
            7 => Self::PermissionDenied,
            8 => Self::ResourceExhausted,
            12 => Self::Unimplemented,
            14 => Self::Unavailable,
            16 => Self::Unauthenticated,
            _ => Self::Internal,
        }
    }
}

/// Why bytes are not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated protobuf")]
    Truncated,
    #[error("protobuf varint too long")]
    Varint,
    #[error("protobuf wire type {0} is not supported")]
    WireType(u64),
    #[error("field {0} is not valid UTF-8")]
    Utf8(u32),
    #[error("gRPC frame: {0}")]
    Frame(&'static str),
}

impl CertificateRequest {
    /// Protobuf bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, self.csr.as_bytes());
        if self.validity_duration != 0 {
            put_key(&mut out, 2, VARINT);
            // int64: negative numbers as their two's complement, ten bytes.
            put_varint(&mut out, self.validity_duration as u64);
        }
        if !self.metadata.is_empty() {
            put_bytes(&mut out, 3, &encode_struct(&self.metadata));
        }
        out
    }

    /// From protobuf bytes; unknown fields are skipped.
    pub fn decode(mut buf: &[u8]) -> Result<Self, WireError> {
        let mut req = Self::default();
        while !buf.is_empty() {
            let (field, wire) = take_key(&mut buf)?;
            match (field, wire) {
                (1, LEN) => req.csr = take_string(&mut buf, 1)?,
                (2, VARINT) => req.validity_duration = take_varint(&mut buf)? as i64,
                (3, LEN) => req.metadata = decode_struct(take_len(&mut buf)?)?,
                _ => skip(&mut buf, wire)?,
            }
        }
        Ok(req)
    }
}

impl CertificateResponse {
    /// Protobuf bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for cert in &self.cert_chain {
            put_bytes(&mut out, 1, cert.as_bytes());
        }
        out
    }

    /// From protobuf bytes; unknown fields are skipped.
    pub fn decode(mut buf: &[u8]) -> Result<Self, WireError> {
        let mut resp = Self::default();
        while !buf.is_empty() {
            let (field, wire) = take_key(&mut buf)?;
            match (field, wire) {
                (1, LEN) => resp.cert_chain.push(take_string(&mut buf, 1)?),
                _ => skip(&mut buf, wire)?,
            }
        }
        Ok(resp)
    }
}

/// `message` in a gRPC length-prefixed frame (uncompressed).
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The one message of a unary call's body.
pub fn unframe(body: &[u8]) -> Result<&[u8], WireError> {
    let [flag, l0, l1, l2, l3, rest @ ..] = body else {
        return Err(WireError::Frame("shorter than its 5-byte prefix"));
    };
    if *flag != 0 {
        return Err(WireError::Frame("compressed messages are not supported"));
    }
    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::Frame("message too large"));
    }
    if rest.len() != len {
        return Err(WireError::Frame("length prefix does not match the body"));
    }
    Ok(rest)
}

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u64) {
    put_varint(out, (u64::from(field) << 3) | wire);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `google.protobuf.Struct` with string values: `map<string, Value> fields = 1`, each entry
/// `{key = 1, value = 2}`, and `Value.string_value = 3`.
fn encode_struct(fields: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        let mut value = Vec::new();
        put_bytes(&mut value, 3, v.as_bytes());
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, k.as_bytes());
        put_bytes(&mut entry, 2, &value);
        put_bytes(&mut out, 1, &entry);
    }
    out
}

fn decode_struct(mut buf: &[u8]) -> Result<BTreeMap<String, String>, WireError> {
    let mut fields = BTreeMap::new();
    while !buf.is_empty() {
        let (field, wire) = take_key(&mut buf)?;
        if (field, wire) != (1, LEN) {
            skip(&mut buf, wire)?;
            continue;
        }
        let mut entry = take_len(&mut buf)?;
        let (mut key, mut value) = (String::new(), None);
        while !entry.is_empty() {
            let (field, wire) = take_key(&mut entry)?;
            match (field, wire) {
                (1, LEN) => key = take_string(&mut entry, 1)?,
                (2, LEN) => value = decode_string_value(take_len(&mut entry)?)?,
                _ => skip(&mut entry, wire)?,
            }
        }
        if let Some(value) = value {
            fields.insert(key, value);
        }
    }
    Ok(fields)
}

/// The `string_value` of a `google.protobuf.Value`, if it holds a string.
fn decode_string_value(mut buf: &[u8]) -> Result<Option<String>, WireError> {
    let mut out = None;
    while !buf.is_empty() {
        let (field, wire) = take_key(&mut buf)?;
        match (field, wire) {
            (3, LEN) => out = Some(take_string(&mut buf, 3)?),
            _ => skip(&mut buf, wire)?,
        }
    }
    Ok(out)
}

fn take_varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or(WireError::Truncated)?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(WireError::Varint)
}

fn take_key(buf: &mut &[u8]) -> Result<(u32, u64), WireError> {
    let key = take_varint(buf)?;
    let field = u32::try_from(key >> 3).map_err(|_| WireError::Varint)?;
    Ok((field, key & 7))
}

fn take_n<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if buf.len() < n {
        return Err(WireError::Truncated);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn take_len<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let n = usize::try_from(take_varint(buf)?).map_err(|_| WireError::Truncated)?;
    take_n(buf, n)
}

fn take_string(buf: &mut &[u8], field: u32) -> Result<String, WireError> {
    let bytes = take_len(buf)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Utf8(field))
}

fn skip(buf: &mut &[u8], wire: u64) -> Result<(), WireError> {
    match wire {
        VARINT => take_varint(buf).map(drop),
        I64 => take_n(buf, 8).map(drop),
        LEN => take_len(buf).map(drop),
        I32 => take_n(buf, 4).map(drop),
        other => Err(WireError::WireType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_with_metadata() {
        let req = CertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----\n…".into(),
            validity_duration: 86400,
            metadata: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                "spiffe://cluster.local/ns/shop/sa/web".to_owned(),
            )]),
        };
        assert_eq!(CertificateRequest::decode(&req.encode()), Ok(req));
    }

    #[test]
    fn request_bytes_match_protobuf_encoding() {
        // Checked by hand against the protobuf encoding rules: field 1 (0x0a) "ab",
        // field 2 (0x10) 300 = ac 02, field 3 (0x1a) Struct {fields: {"k": {string_value: "v"}}}.
        let req = CertificateRequest {
            csr: "ab".into(),
            validity_duration: 300,
            metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        };
        assert_eq!(
            req.encode(),
            [
                0x0a, 2, b'a', b'b', 0x10, 0xac, 0x02, 0x1a, 10, 0x0a, 8, 0x0a, 1, b'k', 0x12, 3,
                0x1a, 1, b'v'
            ]
        );
    }

    #[test]
    fn response_round_trips_and_skips_unknown_fields() {
        let resp = CertificateResponse {
            cert_chain: vec!["leaf".into(), "root".into()],
        };
        let mut bytes = resp.encode();
        // An unknown varint field 9 and an unknown fixed64 field 10.
        bytes.extend_from_slice(&[0x48, 0x01, 0x51, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(CertificateResponse::decode(&bytes), Ok(resp));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[0x0a, 5, b'a'][..],
            &[0xff; 11][..],
            &[0x0b][..],
            &[0x0a, 1, 0xff][..],
        ] {
            assert!(CertificateRequest::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_round_trip_and_lengths_are_checked() {
        let f = frame(b"hello");
        assert_eq!(unframe(&f), Ok(&b"hello"[..]));
        assert!(unframe(&f[..4]).is_err());
        assert!(unframe(&f[..7]).is_err());
        let mut compressed = f.clone();
        compressed[0] = 1;
        assert!(unframe(&compressed).is_err());
    }
}
