//! `/config_dump?format=ztunnel`: the mesh state in the shape ztunnel's admin endpoint writes
//! (top-level `workloads`, `services`, `policies`, `certificates`, camelCase fields), so that
//! people and scripts used to `istioctl ztunnel-config` find their way.
//!
//! Only fields Sluice knows are written; where ztunnel has a field Sluice has no notion of
//! (waypoints, networks, locality), it is left out rather than invented. Policy rules keep
//! ztunnel's nesting (rules → clauses → matches) with Sluice's match lists.
use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;

use serde::Serialize;

use super::server::DumpWriter;
use crate::identity::CertInfo;
use crate::state::policy::{AuthzAction, PolicyScope};
use crate::state::{MeshState, Workload};

/// A workload as ztunnel dumps it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZWorkload<'a> {
    pub uid: &'a str,
    pub workload_ips: &'a [IpAddr],
    /// `HBONE` for a captured (in-mesh) workload, `TCP` otherwise.
    pub protocol: &'static str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub trust_domain: &'a str,
    pub service_account: &'a str,
    pub workload_name: &'a str,
    pub workload_type: &'static str,
    pub canonical_name: &'a str,
    pub canonical_revision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<&'a str>,
    /// `Healthy` when ready for Service traffic, else `Unhealthy`.
    pub status: &'static str,
    /// The Services selecting it, as `namespace/hostname`.
    pub services: Vec<String>,
    /// The AuthorizationPolicies that select it, as `namespace/name`.
    pub authorization_policies: Vec<String>,
}

/// A Service as ztunnel dumps it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZService<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub hostname: &'a str,
    /// `network/address`, with the default (empty) network.
    pub vips: Vec<String>,
    /// Service port → target port (0 where the target is a named port).
    pub ports: BTreeMap<u16, u16>,
    /// By workload uid (or the first address for an endpoint without a known pod).
    pub endpoints: BTreeMap<String, ZEndpoint>,
}

/// One endpoint of a [`ZService`].
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZEndpoint {
    pub workload_uid: String,
    /// Service port → this endpoint's port.
    pub port: BTreeMap<u16, u16>,
    pub status: &'static str,
}

/// An AuthorizationPolicy as ztunnel dumps it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZPolicy<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// `Global`, `Namespace` or `WorkloadSelector`.
    pub scope: &'static str,
    /// `Allow` or `Deny`.
    pub action: &'static str,
    /// Any rule; every clause of a rule; any match of a clause.
    pub rules: Vec<Vec<Vec<serde_json::Value>>>,
    pub dry_run: bool,
}

/// A certificate as ztunnel dumps it (without PEM: Sluice's dump never carries certificates).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZCerts<'a> {
    pub identity: &'a str,
    pub state: &'static str,
    pub cert_chain: [ZCert<'a>; 1],
}

/// The leaf of a [`ZCerts`].
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZCert<'a> {
    pub serial_number: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    pub valid_from: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expiration_time: time::OffsetDateTime,
}

/// Writes `state` and `certs` in ztunnel's shape.
pub fn write(w: &mut DumpWriter<'_>, state: &MeshState, certs: &[CertInfo]) -> io::Result<()> {
    // Which Services each workload backs, read once (not every Service per workload).
    let mut backs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in state.services.values() {
        let name = format!("{}/{}", s.namespace, s.hostname);
        for uid in s.endpoints.iter().filter_map(|e| e.workload.as_ref()) {
            let names = backs.entry(uid.0.as_str()).or_default();
            if names.last() != Some(&name) {
                names.push(name.clone());
            }
        }
    }
    let workloads: Vec<ZWorkload<'_>> = state
        .workloads
        .values()
        .map(|wl| {
            workload(
                state,
                wl,
                backs.remove(wl.uid.0.as_str()).unwrap_or_default(),
            )
        })
        .collect();
    w.section(None, "workloads", &workloads)?;
    drop(workloads);
    let services: Vec<ZService<'_>> = state.services.values().map(service).collect();
    w.section(None, "services", &services)?;
    drop(services);
    let policies: Vec<ZPolicy<'_>> = state
        .policy
        .authorizations
        .iter()
        .map(|p| ZPolicy {
            name: &p.name,
            namespace: &p.namespace,
            scope: match &p.scope {
                PolicyScope::Mesh => "Global",
                PolicyScope::Namespace { .. } => "Namespace",
                PolicyScope::Workloads { .. } => "WorkloadSelector",
            },
            action: match p.action {
                AuthzAction::Allow => "Allow",
                AuthzAction::Deny => "Deny",
            },
            rules: p
                .rules
                .iter()
                .map(|rule| {
                    rule.clauses
                        .iter()
                        .map(|c| c.any_of.iter().map(camel_case_match).collect())
                        .collect()
                })
                .collect(),
            dry_run: false,
        })
        .collect();
    w.section(None, "policies", &policies)?;
    let certificates: Vec<ZCerts<'_>> = certs
        .iter()
        .map(|c| ZCerts {
            identity: &c.identity,
            state: "Available",
            cert_chain: [ZCert {
                serial_number: &c.serial,
                valid_from: c.not_before,
                expiration_time: c.not_after,
            }],
        })
        .collect();
    w.section(None, "certificates", &certificates)
}

/// `wl` in ztunnel's shape; `services` are those it backs, as `namespace/hostname`.
fn workload<'a>(state: &'a MeshState, wl: &'a Workload, services: Vec<String>) -> ZWorkload<'a> {
    let (kind, owner) = wl.owner();
    let authorization_policies = state
        .policy
        .authorizations
        .selecting(wl)
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    ZWorkload {
        uid: &wl.uid.0,
        workload_ips: &wl.ips,
        protocol: if wl.membership.in_mesh() {
            "HBONE"
        } else {
            "TCP"
        },
        name: &wl.name,
        namespace: &wl.namespace,
        trust_domain: &state.trust_domain,
        service_account: &wl.service_account,
        workload_name: owner,
        workload_type: kind,
        canonical_name: wl.canonical_service(),
        canonical_revision: wl.canonical_revision(),
        node: wl.node.as_deref(),
        status: health(wl.ready),
        services,
        authorization_policies,
    }
}

fn service(s: &crate::state::Service) -> ZService<'_> {
    use crate::state::service::TargetPort;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            let target = match p.target_port {
                TargetPort::Number(n) => n,
                TargetPort::Named(_) => 0,
            };
            (p.port, target)
        })
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .filter_map(|e| {
            let key = match &e.workload {
                Some(uid) => uid.0.clone(),
                None => e.ips.first()?.to_string(),
            };
            let port = s
                .ports
                .iter()
                .filter_map(|p| Some((p.port, e.target_port(p)?)))
                .collect();
            let endpoint = ZEndpoint {
                workload_uid: key.clone(),
                port,
                status: health(e.ready),
            };
            Some((key, endpoint))
        })
        .collect();
    ZService {
        name: &s.name,
        namespace: &s.namespace,
        hostname: &s.hostname,
        vips: s.vips.iter().map(|ip| format!("/{ip}")).collect(),
        ports,
        endpoints,
    }
}

fn health(ready: bool) -> &'static str {
    if ready { "Healthy" } else { "Unhealthy" }
}

/// A match's lists with ztunnel's camelCase field names (`not_principals` → `notPrincipals`).
fn camel_case_match(m: &impl Serialize) -> serde_json::Value {
    match serde_json::to_value(m) {
        Ok(serde_json::Value::Object(fields)) => fields
            .into_iter()
            .map(|(k, v)| (camel_case(&k), v))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Ok(other) => other,
        Err(e) => serde_json::Value::String(format!("unserializable match: {e}")),
    }
}

fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::server::{DumpFilter, DumpFormat};

    fn dump(state: &MeshState, query: &str) -> serde_json::Value {
        let filter = DumpFilter::parse(Some(query)).expect("a valid query");
        assert_eq!(filter.format, DumpFormat::Ztunnel);
        let mut out = Vec::new();
        let mut w = DumpWriter::new(&mut out, &filter);
        write(&mut w, state, &[]).expect("written");
        w.finish().expect("finished");
        serde_json::from_slice(&out).expect("JSON")
    }

    #[test]
    fn camel_cases_match_fields() {
        assert_eq!(camel_case("not_destination_ports"), "notDestinationPorts");
        assert_eq!(camel_case("principals"), "principals");
    }

    #[test]
    fn a_world_reads_as_ztunnel_writes_it() {
        let resources = crate::resources::ResourceSet::from_yaml(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-5d8f7c9b4-x2x9z
  namespace: shop
  uid: u-web
  labels: {app: web, version: v2, pod-template-hash: 5d8f7c9b4}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-bank, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {notNamespaces: [other]}}]}]
"#,
        )
        .expect("resources parse");
        let state = crate::state::build(&resources, &Default::default()).state;
        let all = dump(&state, "format=ztunnel");
        let wl = &all["workloads"][0];
        assert_eq!(wl["uid"], "u-web");
        assert_eq!(wl["workloadIps"], serde_json::json!(["10.1.0.5"]));
        assert_eq!(wl["protocol"], "HBONE");
        assert_eq!(wl["serviceAccount"], "web");
        assert_eq!(wl["workloadName"], "web");
        assert_eq!(wl["workloadType"], "deployment");
        assert_eq!(wl["canonicalName"], "web");
        assert_eq!(wl["canonicalRevision"], "v2");
        assert_eq!(wl["node"], "n1");
        assert_eq!(
            wl["services"],
            serde_json::json!(["shop/web.shop.svc.cluster.local"])
        );
        assert_eq!(
            wl["authorizationPolicies"],
            serde_json::json!(["shop/only-bank"])
        );
        let svc = &all["services"][0];
        assert_eq!(svc["vips"], serde_json::json!(["/10.96.0.10"]));
        assert_eq!(svc["ports"], serde_json::json!({"80": 8080}));
        assert_eq!(
            svc["endpoints"]["u-web"]["port"],
            serde_json::json!({"80": 8080})
        );
        let policy = &all["policies"][0];
        assert_eq!(policy["scope"], "WorkloadSelector");
        assert_eq!(policy["action"], "Allow");
        assert_eq!(
            policy["rules"],
            serde_json::json!([[[{"notNamespaces": [{"exact": "other"}]}]]])
        );
        // The dump's filters apply to this shape too.
        let none = dump(&state, "format=ztunnel&kind=workloads&namespace=bank");
        assert_eq!(none, serde_json::json!({"workloads": []}));
    }
}
