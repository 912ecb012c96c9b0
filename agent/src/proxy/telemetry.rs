//! Istio-style labels for the proxy's per-connection metrics.
use crate::{
    admin::ConnectionLabels,
    state::{Identity, Workload},
};

/// Istio's workload name for a pod: the `app.kubernetes.io/name` or `app` label, else the pod.
pub fn workload_name(w: &Workload) -> &str {
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| w.labels.get(*k))
        .map(String::as_str)
        .unwrap_or(&w.name)
}

/// One end of a connection, as far as the reporting proxy knows it.
#[derive(Clone, Copy, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    /// Only known when the connection is mutual TLS.
    pub principal: Option<&'a Identity>,
}

/// Who reports a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// The label set of one connection.
pub fn labels(
    reporter: Reporter,
    source: Peer<'_>,
    destination: Peer<'_>,
    mutual_tls: bool,
) -> ConnectionLabels {
    let unknown = || ConnectionLabels::UNKNOWN.to_owned();
    let name = |p: &Peer<'_>| p.workload.map(|w| workload_name(w).to_owned());
    let namespace = |p: &Peer<'_>| p.workload.map(|w| w.namespace.clone());
    let principal = |p: &Peer<'_>| p.principal.map(ToString::to_string);
    ConnectionLabels {
        reporter: match reporter {
            Reporter::Source => ConnectionLabels::SOURCE,
            Reporter::Destination => ConnectionLabels::DESTINATION,
        }
        .to_owned(),
        source_workload: name(&source).unwrap_or_else(unknown),
        source_workload_namespace: namespace(&source).unwrap_or_else(unknown),
        source_principal: principal(&source).unwrap_or_else(unknown),
        destination_workload: name(&destination).unwrap_or_else(unknown),
        destination_workload_namespace: namespace(&destination).unwrap_or_else(unknown),
        destination_principal: principal(&destination).unwrap_or_else(unknown),
        connection_security_policy: if mutual_tls {
            ConnectionLabels::MUTUAL_TLS
        } else {
            ConnectionLabels::NONE
        }
        .to_owned(),
        request_protocol: ConnectionLabels::TCP.to_owned(),
        response_flags: ConnectionLabels::NO_FLAGS.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Membership, WorkloadUid};

    fn pod(labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: WorkloadUid("u".into()),
            name: "web-7f9c".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: None,
            ips: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Default::default(),
            membership: Membership::Pod,
        }
    }

    #[test]
    fn workload_name_prefers_the_app_labels() {
        assert_eq!(workload_name(&pod(&[])), "web-7f9c");
        assert_eq!(workload_name(&pod(&[("app", "web")])), "web");
        assert_eq!(
            workload_name(&pod(&[("app", "x"), ("app.kubernetes.io/name", "web")])),
            "web"
        );
    }

    #[test]
    fn labels_fill_unknowns_and_security_policy() {
        let w = pod(&[("app", "web")]);
        let id = w.identity("td");
        let l = labels(
            Reporter::Destination,
            Peer::default(),
            Peer {
                workload: Some(&w),
                principal: Some(&id),
            },
            true,
        );
        assert_eq!(l.reporter, "destination");
        assert_eq!(l.source_workload, "unknown");
        assert_eq!(l.source_principal, "unknown");
        assert_eq!(l.destination_workload, "web");
        assert_eq!(l.destination_workload_namespace, "shop");
        assert_eq!(l.destination_principal, "spiffe://td/ns/shop/sa/web");
        assert_eq!(l.connection_security_policy, "mutual_tls");
        let plain = labels(Reporter::Source, Peer::default(), Peer::default(), false);
        assert_eq!(plain.connection_security_policy, "none");
        assert_eq!(plain.reporter, "source");
    }
}
