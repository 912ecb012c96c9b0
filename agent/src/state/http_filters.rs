//! HTTPRoute filters, value matches and timeouts, normalised: the typed form of what
//! `gateway.networking.k8s.io/v1` keeps as loosely typed objects, each checked with the field
//! named when it is wrong.
use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use serde_json::Value;

use crate::resources::gateway_api::{HttpRouteFilter, HttpRouteTimeouts};

/// How a header or query parameter value is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    Exact(String),
    /// A regular expression that must match the whole value.
    RegularExpression(String),
}

/// A filter of a rule, applied in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpFilter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
}

/// `set` replaces, `add` appends, `remove` deletes (names lower-case).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// How a redirect or rewrite changes the path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
}

/// `RequestRedirect`: the gateway answers with a redirect instead of forwarding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301 or 302 (the default).
    pub status: u16,
}

/// `URLRewrite`: the request is changed on its way to the backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// A rule's `timeouts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteTimeouts {
    /// From the request's arrival to the end of the response headers.
    pub request: Option<Duration>,
    /// One attempt at the backend.
    pub backend_request: Option<Duration>,
}

/// A field that is wrong: (path, what is wrong).
pub type FieldError = (String, String);

/// Checks a value match and returns its normalised form.
pub fn value_match(
    type_: Option<&str>,
    value: &str,
    field: &str,
) -> Result<ValueMatch, FieldError> {
    match type_.unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(value.to_owned())),
        "RegularExpression" => {
            check_regex(value, &format!("{field}.value"))?;
            Ok(ValueMatch::RegularExpression(value.to_owned()))
        }
        other => Err((
            format!("{field}.type"),
            format!("{other:?} is not Exact or RegularExpression"),
        )),
    }
}

/// Checks that `re` is a regular expression the data plane can compile.
pub fn check_regex(re: &str, field: &str) -> Result<(), FieldError> {
    regex::Regex::new(re)
        .map(|_| ())
        .map_err(|e| (field.to_owned(), format!("not a regular expression: {e}")))
}

/// Normalises filter `f` (at `field`); `Ok(None)` for a filter the data plane does not
/// implement but that does not change where a request goes (`RequestMirror`).
pub fn filter(f: &HttpRouteFilter, field: &str) -> Result<Option<HttpFilter>, FieldError> {
    let body = |v: &Option<crate::resources::istio_networking::Opaque>, name: &str| {
        v.as_ref().map(|o| o.0.clone()).ok_or_else(|| {
            (
                format!("{field}.{name}"),
                format!("required for type {}", f.type_),
            )
        })
    };
    Ok(Some(match f.type_.as_str() {
        "RequestHeaderModifier" => HttpFilter::RequestHeaders(header_modifier(
            &body(&f.request_header_modifier, "requestHeaderModifier")?,
            &format!("{field}.requestHeaderModifier"),
        )?),
        "ResponseHeaderModifier" => HttpFilter::ResponseHeaders(header_modifier(
            &body(&f.response_header_modifier, "responseHeaderModifier")?,
            &format!("{field}.responseHeaderModifier"),
        )?),
        "RequestRedirect" => HttpFilter::Redirect(redirect(
            &body(&f.request_redirect, "requestRedirect")?,
            &format!("{field}.requestRedirect"),
        )?),
        "URLRewrite" => HttpFilter::Rewrite(rewrite(
            &body(&f.url_rewrite, "urlRewrite")?,
            &format!("{field}.urlRewrite"),
        )?),
        "RequestMirror" => return Ok(None),
        other => {
            return Err((
                format!("{field}.type"),
                format!(
                    "{other:?} is not supported (RequestHeaderModifier, ResponseHeaderModifier, \
                     RequestRedirect, URLRewrite are)"
                ),
            ));
        }
    }))
}

fn header_modifier(v: &Value, field: &str) -> Result<HeaderModifier, FieldError> {
    let pairs = |key: &str| -> Result<Vec<(String, String)>, FieldError> {
        let Some(items) = v.get(key) else {
            return Ok(Vec::new());
        };
        let items = items
            .as_array()
            .ok_or_else(|| (format!("{field}.{key}"), "must be a list".to_owned()))?;
        items
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let name = h.get("name").and_then(Value::as_str);
                let value = h.get("value").and_then(Value::as_str);
                match (name, value) {
                    (Some(n), Some(v))
                        if http::HeaderName::from_bytes(n.as_bytes()).is_ok()
                            && http::HeaderValue::from_str(v).is_ok() =>
                    {
                        Ok((n.to_ascii_lowercase(), v.to_owned()))
                    }
                    _ => Err((
                        format!("{field}.{key}[{i}]"),
                        "needs a valid header name and value".to_owned(),
                    )),
                }
            })
            .collect()
    };
    Ok(HeaderModifier {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: remove_list(v, field)?,
    })
}

/// A header modifier's `remove` list (Gateway API's and Istio's alike), lower-cased.
pub(super) fn remove_list(v: &Value, field: &str) -> Result<Vec<String>, FieldError> {
    match v.get("remove") {
        None => Ok(Vec::new()),
        Some(r) => r
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|n| n.as_str().map(str::to_ascii_lowercase))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                (
                    format!("{field}.remove"),
                    "must be a list of header names".to_owned(),
                )
            }),
    }
}

fn path_modifier(v: &Value, field: &str) -> Result<Option<PathModifier>, FieldError> {
    let Some(p) = v.get("path") else {
        return Ok(None);
    };
    let field = format!("{field}.path");
    let s = |key: &str| p.get(key).and_then(Value::as_str).map(str::to_owned);
    let modifier = match p.get("type").and_then(Value::as_str) {
        Some("ReplaceFullPath") => s("replaceFullPath").map(PathModifier::ReplaceFullPath),
        Some("ReplacePrefixMatch") => s("replacePrefixMatch").map(PathModifier::ReplacePrefixMatch),
        other => {
            return Err((
                format!("{field}.type"),
                format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
            ));
        }
    };
    match modifier {
        Some(PathModifier::ReplaceFullPath(p) | PathModifier::ReplacePrefixMatch(p))
            if !p.starts_with('/') =>
        {
            Err((field, format!("{p:?} does not start with /")))
        }
        Some(m) => Ok(Some(m)),
        None => Err((field, "the value for its type is missing".to_owned())),
    }
}

fn hostname(v: &Value, field: &str) -> Result<Option<String>, FieldError> {
    match v.get("hostname") {
        None => Ok(None),
        Some(h) => match h.as_str() {
            Some(h) if valid_hostname(h) && !h.starts_with('*') => Ok(Some(h.to_owned())),
            _ => Err((
                format!("{field}.hostname"),
                format!("{h} is not a host name"),
            )),
        },
    }
}

fn redirect(v: &Value, field: &str) -> Result<Redirect, FieldError> {
    let scheme = match v.get("scheme").map(|s| s.as_str()) {
        None => None,
        Some(Some(s @ ("http" | "https"))) => Some(s.to_owned()),
        Some(other) => {
            return Err((
                format!("{field}.scheme"),
                format!("{other:?} is not http or https"),
            ));
        }
    };
    let port = match v.get("port") {
        None => None,
        Some(p) => Some(
            p.as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| (format!("{field}.port"), format!("{p} is not a port")))?,
        ),
    };
    let status = match v.get("statusCode") {
        None => 302,
        Some(c) => match c.as_u64() {
            Some(301) => 301,
            Some(302) => 302,
            _ => {
                return Err((
                    format!("{field}.statusCode"),
                    format!("{c} is not 301 or 302"),
                ));
            }
        },
    };
    Ok(Redirect {
        scheme,
        hostname: hostname(v, field)?,
        path: path_modifier(v, field)?,
        port,
        status,
    })
}

fn rewrite(v: &Value, field: &str) -> Result<Rewrite, FieldError> {
    Ok(Rewrite {
        hostname: hostname(v, field)?,
        path: path_modifier(v, field)?,
    })
}

/// Normalises a rule's `timeouts` (Gateway API durations such as `10s`, `1m30s`, `500ms`).
pub fn timeouts(t: Option<&HttpRouteTimeouts>, field: &str) -> Result<RouteTimeouts, FieldError> {
    let Some(t) = t else {
        return Ok(RouteTimeouts::default());
    };
    let one = |v: &Option<String>, name: &str| -> Result<Option<Duration>, FieldError> {
        match v {
            None => Ok(None),
            Some(s) => match duration(s) {
                // Zero means no timeout, as the spec says.
                Some(d) if d.is_zero() => Ok(None),
                Some(d) => Ok(Some(d)),
                None => Err((
                    format!("{field}.{name}"),
                    format!("{s:?} is not a duration (e.g. 10s, 1m30s, 500ms)"),
                )),
            },
        }
    };
    let out = RouteTimeouts {
        request: one(&t.request, "request")?,
        backend_request: one(&t.backend_request, "backendRequest")?,
    };
    if let (Some(r), Some(b)) = (out.request, out.backend_request)
        && b > r
    {
        return Err((
            format!("{field}.backendRequest"),
            "must not be longer than request".to_owned(),
        ));
    }
    Ok(out)
}

/// A Gateway API duration: one to four `<number><unit>` parts, units `h`, `m`, `s`, `ms`.
pub fn duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.bytes().next()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).ok()?;
        parts += 1;
    }
    (parts > 0 && parts <= 4).then_some(total)
}

/// True for a DNS-1123 subdomain, optionally with a leading `*.` label (a Gateway API
/// `Hostname`: no IP addresses, no port).
pub fn valid_hostname(h: &str) -> bool {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if rest.is_empty() || rest.len() > 253 || rest.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    rest.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

/// Header or query matches by lower-cased (headers) or exact (query) name.
pub type ValueMatches = BTreeMap<String, ValueMatch>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_the_gateway_api_grammar() {
        assert_eq!(duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(duration("0s"), Some(Duration::ZERO));
        for bad in ["", "10", "s", "1.5s", "-1s", "1d", "123456s", "1h1m1s1ms1s"] {
            assert_eq!(duration(bad), None, "{bad:?}");
        }
    }

    fn f(yaml: &str) -> Result<Option<HttpFilter>, FieldError> {
        let f: HttpRouteFilter = serde_yaml::from_str(yaml).expect("filter yaml");
        filter(&f, "spec.rules[0].filters[0]")
    }

    #[test]
    fn filters_are_typed_and_errors_name_the_field() {
        assert_eq!(
            f(
                "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: b}], remove: [X-Gone]}}"
            ),
            Ok(Some(HttpFilter::RequestHeaders(HeaderModifier {
                set: vec![("x-a".into(), "b".into())],
                add: vec![],
                remove: vec!["x-gone".into()],
            })))
        );
        assert_eq!(
            f("{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}"),
            Ok(Some(HttpFilter::Redirect(Redirect {
                scheme: Some("https".into()),
                hostname: None,
                path: None,
                port: None,
                status: 301
            })))
        );
        assert_eq!(
            f(
                "{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}"
            ),
            Ok(Some(HttpFilter::Rewrite(Rewrite {
                hostname: None,
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into()))
            })))
        );
        assert_eq!(
            f("{type: RequestRedirect, requestRedirect: {statusCode: 307}}").map_err(|e| e.0),
            Err("spec.rules[0].filters[0].requestRedirect.statusCode".into())
        );
        assert_eq!(
            f("{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: nope}}}")
                .map_err(|e| e.0),
            Err("spec.rules[0].filters[0].urlRewrite.path".into())
        );
        assert_eq!(
            f("{type: RequestHeaderModifier}").map_err(|e| e.0),
            Err("spec.rules[0].filters[0].requestHeaderModifier".into())
        );
        assert_eq!(
            f("{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}").map_err(|e| e.0),
            Err("spec.rules[0].filters[0].type".into())
        );
    }

    #[test]
    fn bad_regexes_and_timeouts_are_refused() {
        assert!(value_match(Some("RegularExpression"), "(", "m").is_err());
        assert_eq!(
            value_match(Some("RegularExpression"), "^v[0-9]+$", "m"),
            Ok(ValueMatch::RegularExpression("^v[0-9]+$".into()))
        );
        let t = HttpRouteTimeouts {
            request: Some("1s".into()),
            backend_request: Some("2s".into()),
        };
        assert_eq!(
            timeouts(Some(&t), "spec.rules[0].timeouts").map_err(|e| e.0),
            Err("spec.rules[0].timeouts.backendRequest".into())
        );
    }
}
