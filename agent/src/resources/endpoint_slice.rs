//! `discovery.k8s.io` EndpointSlices, in both versions a cluster may serve, and their
//! normalisation into one [`Slice`] shape.
//!
//! Current clusters serve `v1` (k8s-openapi's [`EndpointSlice`]); 1.20, which the kube tests
//! run, serves only `v1beta1` ([`EndpointSliceV1beta1`], declared here: k8s-openapi dropped it).
//! The two differ in where an endpoint's node is (`nodeName` against the
//! `kubernetes.io/hostname` topology key); [`Slice`] is what both become.
use std::{collections::BTreeMap, net::IpAddr};

pub use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{core::v1::ObjectReference, discovery::v1::EndpointConditions},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize};

/// The label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The v1beta1 topology key that names an endpoint's node.
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

/// `discovery.k8s.io/v1beta1` EndpointSlice (Kubernetes 1.17–1.24).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceV1beta1 {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default)]
    pub address_type: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<EndpointV1beta1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<k8s_openapi::api::discovery::v1::EndpointPort>>,
}

/// A list the API server may send as `null` (1.20 does for a slice without endpoints).
fn null_as_empty<'de, D, T>(de: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(de)?.unwrap_or_default())
}

/// One endpoint of a v1beta1 slice.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointV1beta1 {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<EndpointConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<BTreeMap<String, String>>,
    /// Present from 1.20 on (behind a feature gate there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

impl k8s_openapi::Resource for EndpointSliceV1beta1 {
    const API_VERSION: &'static str = "discovery.k8s.io/v1beta1";
    const GROUP: &'static str = "discovery.k8s.io";
    const KIND: &'static str = "EndpointSlice";
    const VERSION: &'static str = "v1beta1";
    const URL_PATH_SEGMENT: &'static str = "endpointslices";
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for EndpointSliceV1beta1 {
    const LIST_KIND: &'static str = "EndpointSliceList";
}

impl k8s_openapi::Metadata for EndpointSliceV1beta1 {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// An EndpointSlice of either version, reduced to what Services need.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (`kubernetes.io/service-name`); `None` for a slice of no
    /// Service, which is ignored.
    pub service: Option<String>,
    /// Port name (the Service port's name, `""` when it has none) → port on the endpoints.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SliceEndpoint {
    /// Its addresses that are IPs (FQDN slices have none and are ignored).
    pub ips: Vec<IpAddr>,
    /// The pod behind it, as `namespace/name`, when the slice names one.
    pub pod: Option<String>,
    pub node: Option<String>,
    /// `conditions.ready`: an unset value means ready, as the API defines it.
    pub ready: bool,
    /// `conditions.serving`: unset means the same as `ready`.
    pub serving: bool,
    /// `conditions.terminating`: unset means not terminating.
    pub terminating: bool,
}

impl Slice {
    /// Normalises a `discovery.k8s.io/v1` slice.
    pub fn from_v1(s: &EndpointSlice) -> Self {
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| {
                endpoint(
                    &e.addresses,
                    e.conditions.as_ref(),
                    e.target_ref.as_ref(),
                    e.node_name.clone(),
                )
            })
            .collect();
        Self::new(&s.metadata, &s.address_type, s.ports.as_deref(), endpoints)
    }

    /// Normalises a `discovery.k8s.io/v1beta1` slice.
    pub fn from_v1beta1(s: &EndpointSliceV1beta1) -> Self {
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| {
                let node = e.node_name.clone().or_else(|| {
                    e.topology
                        .as_ref()
                        .and_then(|t| t.get(HOSTNAME_TOPOLOGY).cloned())
                });
                endpoint(
                    &e.addresses,
                    e.conditions.as_ref(),
                    e.target_ref.as_ref(),
                    node,
                )
            })
            .collect();
        Self::new(&s.metadata, &s.address_type, s.ports.as_deref(), endpoints)
    }

    fn new(
        meta: &ObjectMeta,
        address_type: &str,
        ports: Option<&[k8s_openapi::api::discovery::v1::EndpointPort]>,
        mut endpoints: Vec<SliceEndpoint>,
    ) -> Self {
        if address_type == "FQDN" {
            endpoints.clear();
        }
        let ports = ports
            .unwrap_or_default()
            .iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|n| *n != 0)?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        Self {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
            service: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned()),
            ports,
            endpoints,
        }
    }
}

fn endpoint(
    addresses: &[String],
    conditions: Option<&EndpointConditions>,
    target: Option<&ObjectReference>,
    node: Option<String>,
) -> SliceEndpoint {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    SliceEndpoint {
        ips: addresses.iter().filter_map(|a| a.parse().ok()).collect(),
        pod: target
            .filter(|t| t.kind.as_deref() == Some("Pod"))
            .and_then(|t| {
                Some(format!(
                    "{}/{}",
                    t.namespace.as_deref()?,
                    t.name.as_deref()?
                ))
            }),
        node,
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kubernetes 1.20 sends `"endpoints": null, "ports": null` for a Service without ready
    /// pods (seen in the cluster box); such a slice must read as empty, or the whole list fails
    /// to decode and the agent never becomes ready.
    #[test]
    fn null_lists_from_the_api_server_read_as_empty() {
        let v1beta1: EndpointSliceV1beta1 = serde_json::from_str(
            r#"{"metadata":{"name":"web-x","namespace":"shop"},"addressType":"IPv4","endpoints":null,"ports":null}"#,
        )
        .expect("a slice without endpoints");
        assert!(v1beta1.endpoints.is_empty());
        let v1: EndpointSlice = serde_json::from_str(
            r#"{"metadata":{"name":"web-x","namespace":"shop"},"addressType":"IPv4","endpoints":null,"ports":null}"#,
        )
        .expect("a v1 slice without endpoints");
        assert!(v1.endpoints.is_empty());
    }

    #[test]
    fn both_versions_normalise_alike() {
        let v1: EndpointSlice = serde_yaml::from_str(
            r#"
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.0.1.2]
  conditions: {ready: true}
  nodeName: node1
  targetRef: {kind: Pod, namespace: shop, name: web-a}
- addresses: [10.0.2.2]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node2
"#,
        )
        .unwrap();
        let beta: EndpointSliceV1beta1 = serde_yaml::from_str(
            r#"
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.0.1.2]
  conditions: {ready: true}
  topology: {kubernetes.io/hostname: node1}
  targetRef: {kind: Pod, namespace: shop, name: web-a}
- addresses: [10.0.2.2]
  conditions: {ready: false, serving: true, terminating: true}
  topology: {kubernetes.io/hostname: node2}
"#,
        )
        .unwrap();
        let a = Slice::from_v1(&v1);
        assert_eq!(a, Slice::from_v1beta1(&beta));
        assert_eq!(a.service.as_deref(), Some("web"));
        assert_eq!(a.ports, BTreeMap::from([("http".to_owned(), 8080)]));
        assert_eq!(a.endpoints[0].pod.as_deref(), Some("shop/web-a"));
        assert_eq!(a.endpoints[0].node.as_deref(), Some("node1"));
        assert!(a.endpoints[0].ready && a.endpoints[0].serving && !a.endpoints[0].terminating);
        let b = &a.endpoints[1];
        assert!(!b.ready && b.serving && b.terminating);
    }

    #[test]
    fn unset_conditions_mean_ready_and_fqdn_slices_are_empty() {
        let s: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: x}\naddressType: IPv4\nendpoints: [{addresses: [10.1.1.1]}]\n",
        )
        .unwrap();
        let s = Slice::from_v1(&s);
        assert!(s.endpoints[0].ready && s.endpoints[0].serving);
        assert_eq!(s.service, None);
        let f: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: x}\naddressType: FQDN\nendpoints: [{addresses: [a.example]}]\n",
        )
        .unwrap();
        assert!(Slice::from_v1(&f).endpoints.is_empty());
    }
}
