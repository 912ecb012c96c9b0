//! `security.istio.io` resources: PeerAuthentication and AuthorizationPolicy, with the fields of
//! Istio's own CRDs (`v1`; `v1beta1` is served with the same schema and read the same way).
//!
//! As in [`istio_networking`](super::istio_networking), enumerations (mTLS modes, actions) and
//! ports stay as written: an unknown value is a normalisation
//! [`Rejection`](crate::state::Rejection) naming the field, not a parse failure of the document.
use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::istio_networking::IstioStatus;

/// API group of every kind in this module.
pub const GROUP: &str = "security.istio.io";
/// The versions Istio serves for these kinds; `v1` is the storage version.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// True if `api_version` is one Istio serves for `security.istio.io`.
pub fn is_api_version(api_version: &str) -> bool {
    api_version
        .strip_prefix(GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .is_some_and(|v| VERSIONS.contains(&v))
}

/// A port as written: Istio's schema has a string (AuthorizationPolicy ports) or a map key
/// (`portLevelMtls`), and YAML files often write a bare number. Both are accepted here;
/// normalisation checks that it is a port and names the field when it is not.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PortText(pub String);

impl fmt::Display for PortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PortText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a string holding one")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortText, E> {
                Ok(PortText(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortText, E> {
                Ok(PortText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortText, E> {
                Ok(PortText(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl JsonSchema for PortText {
    fn schema_name() -> Cow<'static, str> {
        "PortText".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string"})
    }
}

/// `{matchLabels}`: selects workloads in the policy's namespace (or in every namespace, for an
/// AuthorizationPolicy in the root namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A reference to a Gateway API or Service resource a policy attaches to (waypoints and
/// gateways enforce those; the node proxy does not).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

/// Whether connections to workloads must, may or must not use mutual TLS.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    shortname = "pa",
    namespaced,
    status = "IstioStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads this applies to; without it, the whole namespace (the mesh, in the root
    /// namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Mode for the selected workloads; absent means `UNSET` (inherit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Workload port → mode; honoured only together with a selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<PortText, MutualTls>,
}

/// `{mode}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// `UNSET`, `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

/// Access control on workloads: who may connect to what.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    namespaced,
    status = "IstioStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads this applies to; without it, the whole namespace (the mesh, in the root
    /// namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Attaches the policy to a gateway or waypoint instead of workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Any rule matching triggers the action; no rules match nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The extension provider of a `CUSTOM` action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// `{name}` of an external authorizer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    #[serde(default)]
    pub name: String,
}

/// Matches when every present part matches: any of `from`, any of `to`, all of `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `{source}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

/// Who connects. Every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities `<td>/ns/<ns>/sa/<sa>`; `*` prefix/suffix wildcards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Service accounts, `<sa>` (in the policy's namespace) or `<ns>/<sa>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source addresses: an IP or a CIDR.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client addresses from `X-Forwarded-For` (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `{operation}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

/// What is connected to. Every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// HTTP hosts (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Workload ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortText>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<PortText>,
    /// HTTP methods (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP paths (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `{key, values, notValues}`: an extra condition on a connection or request attribute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `source.ip`, `source.namespace`, `source.principal`, `destination.ip`,
    /// `destination.port`, or an HTTP attribute (`request.headers[...]`, …).
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// CRDs

/// The CRDs of this module, each serving `v1` (storage) and `v1beta1` with the same schema, as
/// Istio installs them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [PeerAuthentication::crd(), AuthorizationPolicy::crd()]
        .into_iter()
        .map(|mut crd| {
            let Some(v1) = crd.spec.versions.first().cloned() else {
                return crd;
            };
            for old in &VERSIONS[1..] {
                let mut version = v1.clone();
                version.name = (*old).to_owned();
                version.storage = false;
                crd.spec.versions.push(version);
            }
            crd
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_are_recognised() {
        assert!(is_api_version("security.istio.io/v1"));
        assert!(is_api_version("security.istio.io/v1beta1"));
        assert!(!is_api_version("security.istio.io/v1alpha3"));
        assert!(!is_api_version("networking.istio.io/v1"));
    }

    #[test]
    fn peer_authentication_reads_numeric_and_string_port_keys() {
        let pa: PeerAuthentication = serde_yaml::from_str(
            r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    "9090": {mode: PERMISSIVE}
"#,
        )
        .expect("parses");
        assert_eq!(pa.spec.mtls.and_then(|m| m.mode).as_deref(), Some("STRICT"));
        let ports: Vec<&str> = pa
            .spec
            .port_level_mtls
            .keys()
            .map(|p| p.0.as_str())
            .collect();
        assert_eq!(ports, ["8080", "9090"]);
        // The JSON the API server sends has string keys.
        let json = serde_json::json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}});
        let spec: PeerAuthenticationSpec = serde_json::from_value(json).expect("parses");
        assert!(spec.port_level_mtls.contains_key(&PortText("8080".into())));
    }

    #[test]
    fn authorization_policy_keeps_every_upstream_field() {
        let ap: AuthorizationPolicy = serde_yaml::from_str(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/curl"]
        notNamespaces: [prod]
        ipBlocks: [10.0.0.0/8, 1.2.3.4]
        requestPrincipals: ["*"]
    to:
    - operation: {ports: ["8080", 9090], methods: [GET], paths: ["/info*"]}
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.example.com"]
"#,
        )
        .expect("parses");
        let rule = &ap.spec.rules[0];
        assert_eq!(rule.from[0].source.ip_blocks, ["10.0.0.0/8", "1.2.3.4"]);
        assert_eq!(rule.from[0].source.request_principals, ["*"]);
        let ports: Vec<&str> = rule.to[0]
            .operation
            .ports
            .iter()
            .map(|p| p.0.as_str())
            .collect();
        assert_eq!(ports, ["8080", "9090"]);
        assert_eq!(rule.when[0].key, "request.auth.claims[iss]");
        let back = serde_yaml::to_value(&ap.spec).expect("serialises");
        assert_eq!(back["rules"][0]["to"][0]["operation"]["ports"][1], "9090");
    }

    #[test]
    fn crds_serve_both_versions_with_string_ports() {
        let crds = crds();
        assert_eq!(crds.len(), 2);
        for crd in &crds {
            let names: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
            assert_eq!(names, VERSIONS, "{}", crd.spec.names.kind);
            assert_eq!(crd.spec.versions.iter().filter(|v| v.storage).count(), 1);
        }
        let ap = serde_json::to_value(&crds[1]).expect("serialises");
        let ports = &ap["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["rules"]["items"]["properties"]["to"]["items"]["properties"]["operation"]["properties"]
            ["ports"];
        assert_eq!(ports["items"]["type"], "string", "{ports}");
    }
}
