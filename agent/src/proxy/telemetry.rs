//! What the proxy reports about connections: Istio-style metric labels, the `baggage` that
//! names a source workload, and [`ConnectionResult`], the one place an outbound connection's
//! bytes, metrics and access-log line are written, whatever its route and outcome.
use std::{net::SocketAddr, time::Instant};

use tracing::info;

use super::{copy::Transferred, hbone::Baggage};
use crate::{
    admin::{ConnectionLabels, ConnectionMetrics, metrics::Metrics},
    state::{Identity, MeshState, Node, Service, Workload, load_balance::ServiceRef},
};

/// Istio's `response_flags` when a Service has no endpoint to take a connection.
pub const NO_HEALTHY_UPSTREAM: &str = "UH";
/// Istio's `response_flags` when every endpoint tried failed.
pub const UPSTREAM_FAILURE: &str = "UF";
/// The refusal label of [`NO_HEALTHY_UPSTREAM`] (not an egress refusal).
pub const NO_HEALTHY_UPSTREAM_LABEL: &str = "no_healthy_upstream";

/// Sets the `destination_service*` labels to `service`'s.
pub fn set_service(labels: &mut ConnectionLabels, service: &ServiceRef) {
    labels.destination_service = service.hostname.clone();
    labels.destination_service_name = service.name.clone();
    labels.destination_service_namespace = service.namespace.clone();
}

/// The Service a connection to `workload`'s `port` serves, as the receiving side can tell it:
/// the first (by `namespace/name`) with `workload` among its endpoints and a port landing on
/// `port` there.
pub fn service_of<'a>(state: &'a MeshState, workload: &Workload, port: u16) -> Option<&'a Service> {
    state.services.values().find(|s| {
        s.endpoints.iter().any(|e| {
            e.workload.as_ref() == Some(&workload.uid)
                && s.ports.iter().any(|p| e.target_port(p) == Some(port))
        })
    })
}

/// Sets the `destination_service*` labels of a connection arriving for `workload`'s `port`.
pub fn set_service_of(
    labels: &mut ConnectionLabels,
    state: &MeshState,
    workload: &Workload,
    port: u16,
) {
    if let Some(s) = service_of(state, workload, port) {
        labels.destination_service = s.hostname.clone();
        labels.destination_service_name = s.name.clone();
        labels.destination_service_namespace = s.namespace.clone();
    }
}

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
        destination_service: unknown(),
        destination_service_name: unknown(),
        destination_service_namespace: unknown(),
    }
}

/// Istio's default cluster id, which ztunnel sends as `k8s.cluster.name` when none is set.
pub const CLUSTER_NAME: &str = "Kubernetes";

/// The `baggage` an HBONE request from `w` carries, with the keys ztunnel writes: cluster,
/// namespace, the workload by kind (the Deployment when the pod's name shows one, else the
/// pod), Istio's canonical service and revision, and its node's region and zone.
pub fn baggage(w: &Workload, node: Option<&Node>) -> Baggage {
    let (kind, name) = w.owner();
    let topology = |k: &str| node.and_then(|n| n.labels.get(k)).cloned();
    Baggage {
        cluster: Some(CLUSTER_NAME.to_owned()),
        namespace: Some(w.namespace.clone()),
        workload_kind: Some(kind.to_owned()),
        workload_name: Some(name.to_owned()),
        service: Some(w.canonical_service().to_owned()),
        revision: Some(w.canonical_revision().to_owned()),
        region: topology("topology.kubernetes.io/region"),
        zone: topology("topology.kubernetes.io/zone"),
    }
}

/// The service account Istio's node proxy (ztunnel) runs as, in the root namespace.
pub const NODE_PROXY_SERVICE_ACCOUNT: &str = "ztunnel";

/// How far the `baggage` a peer sent may be believed. Baggage only ever labels telemetry; the
/// source identity is always the verified certificate's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaggageTrust {
    /// No baggage was sent.
    Absent,
    /// The peer's certificate names a node proxy (`<root namespace>/sa/ztunnel` of this trust
    /// domain), which speaks for the workloads it carries.
    NodeProxy,
    /// The baggage names the namespace of the peer's certificate, and every workload MeshState
    /// knows by that namespace and name runs as the certificate's service account.
    SameWorkload,
    /// Anything else: logged as sent, used for nothing.
    Untrusted,
}

impl BaggageTrust {
    /// The access log's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::NodeProxy => "node_proxy",
            Self::SameWorkload => "same_workload",
            Self::Untrusted => "untrusted",
        }
    }

    /// True when the baggage may label telemetry.
    pub fn is_trusted(self) -> bool {
        matches!(self, Self::NodeProxy | Self::SameWorkload)
    }
}

/// The trust rule for `baggage` received from a peer proven to be `peer` (see [`BaggageTrust`]).
pub fn baggage_trust(baggage: &Baggage, peer: &Identity, state: &MeshState) -> BaggageTrust {
    if baggage.is_empty() {
        return BaggageTrust::Absent;
    }
    if peer.trust_domain == state.trust_domain
        && peer.namespace == state.root_namespace
        && peer.service_account == NODE_PROXY_SERVICE_ACCOUNT
    {
        return BaggageTrust::NodeProxy;
    }
    let (Some(namespace), Some(name)) = (&baggage.namespace, &baggage.workload_name) else {
        return BaggageTrust::Untrusted;
    };
    if *namespace != peer.namespace {
        return BaggageTrust::Untrusted;
    }
    // A workload this node does not know (another cluster's, say) is believed within the
    // certificate's namespace: it can name no workload MeshState knows under another account.
    let impostor = state.workloads.values().any(|w| {
        w.namespace == *namespace
            && w.owner().1 == name.as_str()
            && w.service_account != peer.service_account
    });
    if impostor {
        return BaggageTrust::Untrusted;
    }
    BaggageTrust::SameWorkload
}

/// Fills the source labels MeshState could not (a source it does not know) from `baggage`,
/// when it is trusted: workload and namespace, as ztunnel does.
pub fn set_source_from_baggage(
    labels: &mut ConnectionLabels,
    baggage: &Baggage,
    trust: BaggageTrust,
) {
    if !trust.is_trusted() {
        return;
    }
    let unknown = |v: &str| v == ConnectionLabels::UNKNOWN;
    if let (true, Some(name)) = (unknown(&labels.source_workload), &baggage.workload_name) {
        labels.source_workload = name.clone();
    }
    if let (true, Some(ns)) = (
        unknown(&labels.source_workload_namespace),
        &baggage.namespace,
    ) {
        labels.source_workload_namespace = ns.clone();
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Closed after moving these bytes.
    Done(Transferred),
    /// Failed at `stage` (`peek`, `identity`, `connect`, `copy`, …), after moving `moved`.
    Failed {
        stage: &'static str,
        error: String,
        moved: Transferred,
    },
    /// Refused by the decision: `label` for `sluice_egress_refusals_total`, `reason` to log.
    Refused { label: &'static str, reason: String },
}

impl Outcome {
    /// A failure before any byte moved.
    pub fn failed(stage: &'static str, error: impl ToString) -> Self {
        Self::Failed {
            stage,
            error: error.to_string(),
            moved: Transferred::default(),
        }
    }
}

/// A pod as the access log names it (`src.workload`/`src.namespace`, `dst.workload`/
/// `dst.namespace`, as ztunnel writes them): the pod's own name, not Istio's workload label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogWorkload {
    pub namespace: String,
    pub name: String,
}

impl LogWorkload {
    /// The pod `w`.
    pub fn of(w: &Workload) -> Self {
        Self {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        }
    }
}

/// What the access-log line of an outbound connection names.
#[derive(Debug)]
pub struct OutboundLog {
    /// The source pod.
    pub src_workload: LogWorkload,
    /// The application's socket: the pod's address (of the destination's family) and its port
    /// (`src.addr`).
    pub src: SocketAddr,
    /// What the application dialled.
    pub orig_dst: SocketAddr,
    /// The destination pod, when MeshState knows it (for a Service, the endpoint's).
    pub dst_workload: Option<LogWorkload>,
    /// `direct`, `hbone`, `egress_gateway` or `egress` (refused).
    pub route: &'static str,
    /// The identity the destination had to prove (HBONE and egress gateway).
    pub dst_identity: Option<Identity>,
    /// The host the decision went by, if any.
    pub host: Option<String>,
    /// For a connection to a Service address: the Service and the endpoint(s) tried.
    pub service: Option<ServiceLog>,
}

impl OutboundLog {
    /// `dst.addr`: the endpoint that answered (or the first tried) for a Service, else what the
    /// application dialled.
    pub fn dst_addr(&self) -> SocketAddr {
        self.service
            .as_ref()
            .and_then(|s| s.endpoint)
            .unwrap_or(self.orig_dst)
    }
}

/// A metric label as an access-log value: empty where the label says `unknown`.
pub fn service_label(label: &str) -> &str {
    if label == ConnectionLabels::UNKNOWN {
        ""
    } else {
        label
    }
}

/// An access log's `duration`, as ztunnel writes it: whole milliseconds and `ms`.
pub fn log_duration(start: Instant) -> String {
    format!("{}ms", start.elapsed().as_millis())
}

/// What the access log says of a connection to a Service address.
#[derive(Debug, Default)]
pub struct ServiceLog {
    /// Istio's `destination_service` (`<name>.<ns>.svc.cluster.local`, a ServiceEntry host).
    pub hostname: String,
    /// The endpoint that answered (or, when none did, the first tried).
    pub endpoint: Option<SocketAddr>,
    /// Endpoints tried, the one that answered included.
    pub attempts: usize,
    /// `ip:port: error` of each endpoint that failed, comma-separated.
    pub failed_endpoints: String,
}

impl ServiceLog {
    /// The log of a connection to `service`, before any endpoint is tried.
    pub fn new(service: &ServiceRef) -> Self {
        Self {
            hostname: service.hostname.clone(),
            ..Default::default()
        }
    }
}

/// One outbound connection's report, from the decision to the close (ztunnel's
/// `ConnectionResult`): making it counts the open; [`ConnectionResult::finish`] counts the bytes
/// and the close, a refusal, and writes the one access-log line.
pub struct ConnectionResult {
    start: Instant,
    metrics: ConnectionMetrics,
    refusals: std::sync::Arc<Metrics>,
    log: OutboundLog,
}

impl ConnectionResult {
    /// Starts the report of a connection labelled `labels`, begun at `start`.
    pub fn new(
        metrics: &std::sync::Arc<Metrics>,
        labels: &ConnectionLabels,
        log: OutboundLog,
        start: Instant,
    ) -> Self {
        Self {
            start,
            metrics: metrics.connection(labels),
            refusals: metrics.clone(),
            log,
        }
    }

    /// Reports how the connection ended.
    pub fn finish(self, outcome: Outcome) {
        let moved = match &outcome {
            Outcome::Done(t) | Outcome::Failed { moved: t, .. } => *t,
            Outcome::Refused { .. } => Transferred::default(),
        };
        // Istio's names: "received" are request bytes, "sent" response bytes.
        self.metrics.received(moved.sent);
        self.metrics.sent(moved.received);
        drop(self.metrics);
        let l = &self.log;
        let duration = log_duration(self.start);
        let dst_identity = l.dst_identity.as_ref().map(ToString::to_string);
        let dst_identity = dst_identity.as_deref().unwrap_or("");
        let host = l.host.as_deref().unwrap_or("");
        let svc = l.service.as_ref();
        let dst_service = svc.map_or("", |s| s.hostname.as_str());
        let attempts = svc.map_or(0, |s| s.attempts);
        let failed_endpoints = svc.map_or("", |s| s.failed_endpoints.as_str());
        let dst_addr = l.dst_addr();
        let dst = l.dst_workload.clone().unwrap_or_default();
        match outcome {
            Outcome::Done(t) => info!(
                target: "sluice::access",
                direction = "outbound",
                src.addr = %l.src,
                src.workload = %l.src_workload.name,
                src.namespace = %l.src_workload.namespace,
                dst.addr = %dst_addr,
                dst.service = dst_service,
                dst.workload = %dst.name,
                dst.namespace = %dst.namespace,
                dst.identity = dst_identity,
                orig_dst = %l.orig_dst,
                route = l.route,
                host,
                attempts,
                failed_endpoints,
                bytes_sent = t.sent,
                bytes_recv = t.received,
                duration,
                outcome = "ok",
                "connection complete"
            ),
            Outcome::Failed {
                stage,
                error,
                moved,
            } => info!(
                target: "sluice::access",
                direction = "outbound",
                src.addr = %l.src,
                src.workload = %l.src_workload.name,
                src.namespace = %l.src_workload.namespace,
                dst.addr = %dst_addr,
                dst.service = dst_service,
                dst.workload = %dst.name,
                dst.namespace = %dst.namespace,
                dst.identity = dst_identity,
                orig_dst = %l.orig_dst,
                route = l.route,
                host,
                attempts,
                failed_endpoints,
                bytes_sent = moved.sent,
                bytes_recv = moved.received,
                duration,
                outcome = stage,
                error,
                "connection failed"
            ),
            Outcome::Refused { label, reason } => {
                if label != NO_HEALTHY_UPSTREAM_LABEL {
                    self.refusals.egress_refused(label);
                }
                info!(
                    target: "sluice::access",
                    direction = "outbound",
                    src.addr = %l.src,
                    src.workload = %l.src_workload.name,
                    src.namespace = %l.src_workload.namespace,
                    dst.addr = %dst_addr,
                    dst.service = dst_service,
                    orig_dst = %l.orig_dst,
                    route = l.route,
                    host,
                    duration,
                    outcome = "refused",
                    reason_label = label,
                    reason,
                    "connection refused"
                );
            }
        }
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
            ports: Default::default(),
            ready: true,
        }
    }

    #[test]
    fn baggage_is_trusted_from_a_node_proxy_or_the_workload_it_names() {
        let mut state = MeshState {
            trust_domain: "td".into(),
            root_namespace: "istio-system".into(),
            ..MeshState::default()
        };
        let w = pod(&[]);
        std::sync::Arc::make_mut(&mut state.workloads).insert(w.uid.clone(), w.clone());
        let own = baggage(&w, None);
        let web = Identity::new("td", "shop", "web");
        let other = Identity::new("td", "shop", "db");
        let ztunnel = Identity::new("td", "istio-system", "ztunnel");
        assert_eq!(
            baggage_trust(&Baggage::default(), &web, &state),
            BaggageTrust::Absent
        );
        assert_eq!(
            baggage_trust(&own, &web, &state),
            BaggageTrust::SameWorkload
        );
        assert_eq!(
            baggage_trust(&own, &ztunnel, &state),
            BaggageTrust::NodeProxy
        );
        // Another account claiming web-7f9c, or a namespace not its own: untrusted.
        assert_eq!(baggage_trust(&own, &other, &state), BaggageTrust::Untrusted);
        let elsewhere = Baggage {
            namespace: Some("kube-system".into()),
            ..own.clone()
        };
        assert_eq!(
            baggage_trust(&elsewhere, &web, &state),
            BaggageTrust::Untrusted
        );
        // Another trust domain's ztunnel is no node proxy of ours.
        let foreign = Identity::new("evil", "istio-system", "ztunnel");
        assert_eq!(
            baggage_trust(&own, &foreign, &state),
            BaggageTrust::Untrusted
        );
        // An unknown workload in the certificate's own namespace labels telemetry…
        let remote = Baggage {
            workload_name: Some("remote".into()),
            ..own.clone()
        };
        assert_eq!(
            baggage_trust(&remote, &other, &state),
            BaggageTrust::SameWorkload
        );
        let mut labels = labels(
            Reporter::Destination,
            Peer::default(),
            Peer::default(),
            true,
        );
        set_source_from_baggage(&mut labels, &remote, BaggageTrust::SameWorkload);
        assert_eq!(labels.source_workload, "remote");
        assert_eq!(labels.source_workload_namespace, "shop");
        // …untrusted baggage labels nothing.
        let mut l2 = super::labels(
            Reporter::Destination,
            Peer::default(),
            Peer::default(),
            true,
        );
        set_source_from_baggage(&mut l2, &elsewhere, BaggageTrust::Untrusted);
        assert_eq!(l2.source_workload_namespace, ConnectionLabels::UNKNOWN);
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
    fn baggage_names_the_source_as_ztunnel_does() {
        let mut w = pod(&[
            ("app", "web"),
            ("version", "v2"),
            ("pod-template-hash", "7f9c"),
        ]);
        w.name = "web-7f9c-x2x4q".into();
        let node = Node {
            name: "node1".into(),
            addresses: vec![],
            labels: [
                ("topology.kubernetes.io/region", "eu-west"),
                ("topology.kubernetes.io/zone", "eu-west-1a"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        assert_eq!(
            baggage(&w, Some(&node)).header_value(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,\
             service.name=web,service.version=v2,cloud.region=eu-west,\
             cloud.availability_zone=eu-west-1a"
        );
        // A bare pod: named as a pod, its canonical service its name, revision `latest`.
        let bare = pod(&[]);
        let b = baggage(&bare, None);
        assert_eq!(
            b.header_value(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-7f9c,\
             service.name=web-7f9c,service.version=latest"
        );
        // Istio's canonical labels win.
        let canon = pod(&[
            ("app", "x"),
            ("service.istio.io/canonical-name", "web"),
            ("service.istio.io/canonical-revision", "r1"),
        ]);
        let c = baggage(&canon, None);
        assert_eq!(c.service.as_deref(), Some("web"));
        assert_eq!(c.revision.as_deref(), Some("r1"));
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
