//! The outbound decision as a table: one row per case, from YAML through `state::build`.
use std::net::SocketAddr;

use super::*;
use crate::{
    resources::ResourceSet,
    state::{MeshSettings, Rejection, build},
};

/// Namespaces `shop` (ambient, ALLOW_ANY) and `locked` (ambient, REGISTRY_ONLY by Sidecar),
/// `legacy` outside the mesh; a Service; ServiceEntries; an egress Gateway on node2 (which
/// also hosts the static gateway pool) and one that no node carries.
const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: locked, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Node
metadata: {name: node1}
status: {addresses: [{type: InternalIP, address: 172.30.12.1}]}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {kubernetes.azure.com/agentpool: gwpool, istio: egressgateway}
status: {addresses: [{type: InternalIP, address: 172.30.12.2}, {type: InternalIP, address: "fd00:30::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: web-uid, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: []}
status: {podIPs: [{ip: 10.0.1.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, uid: db-uid, labels: {app: db}}
spec: {nodeName: node1, serviceAccountName: db, containers: []}
status: {podIPs: [{ip: 10.0.1.6}, {ip: "fd00::6"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: shop, uid: optout-uid, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.0.1.8}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, uid: old-uid}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.0.2.9}
---
apiVersion: v1
kind: Pod
metadata: {name: curl, namespace: locked, uid: curl-uid, labels: {app: curl}}
spec: {nodeName: node1, serviceAccountName: curl, containers: []}
status: {podIPs: [{ip: 10.0.3.5}, {ip: "fd00::3:5"}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: pinned
  namespace: shop
  uid: pinned-uid
  annotations: {kubernetes.azure.com/static-gateway-configuration: pinned-sgc}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.0.1.7}
---
apiVersion: v1
kind: Pod
metadata:
  name: pinless
  namespace: shop
  uid: pinless-uid
  annotations: {kubernetes.azure.com/static-gateway-configuration: pinless-sgc}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.0.1.9}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: pinned-sgc, namespace: shop}
spec: {gatewayNodepoolName: gwpool, excludeCidrs: [10.0.0.0/8, 172.30.0.0/16]}
status: {egressIpPrefix: 198.51.100.16/28}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: pinless-sgc, namespace: shop}
spec: {gatewayNodepoolName: gwpool, excludeCidrs: [10.0.0.0/8]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: db}, ports: [{port: 5432, targetPort: 5432}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: locked}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: locked}
spec:
  hosts: [web.example, lost.example, plain.example]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-address, namespace: locked}
spec:
  hosts: [db.example]
  addresses: [203.0.113.77]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.77}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [web.example]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: nowhere, namespace: istio-system}
spec:
  selector: {istio: nowhere}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [lost.example]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-via-egress, namespace: istio-system}
spec:
  hosts: [web.example]
  gateways: [mesh, egress]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 80}}}]
  - match: [{gateways: [egress], port: 80}]
    route: [{destination: {host: web.example, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: lost-via-nowhere, namespace: istio-system}
spec:
  hosts: [lost.example]
  gateways: [mesh, nowhere]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: nowhere.istio-system.svc.cluster.local, port: {number: 80}}}]
  - match: [{gateways: [nowhere], port: 80}]
    route: [{destination: {host: lost.example, port: {number: 80}}}]
"#;

const TD: &str = "cluster.local";

fn world() -> MeshState {
    let resources = ResourceSet::from_yaml(WORLD).expect("known kinds");
    let out = build(&resources, &MeshSettings::default());
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    out.state
}

fn gateway_peer() -> GatewayPeer {
    GatewayPeer {
        port: 15008,
        namespace: "istio-system".into(),
        service_account: "sluice-egress-gateway".into(),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

/// What a row expects.
#[derive(Debug)]
enum Want {
    Direct,
    /// Direct, but to this address rather than the one dialled (where the ServiceEntry says).
    DirectTo(&'static str),
    /// HBONE to the destination's own HBONE port, expecting `identity`.
    Hbone(Identity),
    /// HBONE to this gateway node address.
    Gateway(&'static str),
    /// Refused with this metric label (and this host in the log, if any).
    Refuse(&'static str, Option<&'static str>),
    /// To a Service address: HBONE to this one endpoint (`ip:targetPort`), expecting `identity`.
    ServiceHbone(&'static str, Identity),
}

/// One case: source pod (`ns/name`, or none), destination, peeked host, whether the decision
/// asks for a peek first, a name resolved for the destination, and the plan.
struct Case {
    name: &'static str,
    source: Option<(&'static str, &'static str)>,
    dst: &'static str,
    peeked: Option<HostHint<'static>>,
    resolved: Option<&'static str>,
    peeks: bool,
    want: Want,
}

const fn case(
    name: &'static str,
    source: Option<(&'static str, &'static str)>,
    dst: &'static str,
    peeks: bool,
    peeked: Option<HostHint<'static>>,
    want: Want,
) -> Case {
    Case {
        name,
        source,
        dst,
        peeked,
        resolved: None,
        peeks,
        want,
    }
}

const WEB: Option<(&str, &str)> = Some(("shop", "web"));
const CURL: Option<(&str, &str)> = Some(("locked", "curl"));
const PINNED: Option<(&str, &str)> = Some(("shop", "pinned"));

fn cases() -> Vec<Case> {
    use HostHint::{Http, Tls};
    let db = || Want::Hbone(id("shop", "db"));
    vec![
        case(
            "mesh workload: HBONE",
            WEB,
            "10.0.1.6:5432",
            false,
            None,
            db(),
        ),
        case(
            "mesh workload over IPv6: HBONE",
            WEB,
            "[fd00::6]:5432",
            false,
            None,
            db(),
        ),
        case(
            "mesh workload, HTTP port: HBONE without a peek",
            CURL,
            "10.0.1.6:80",
            false,
            None,
            db(),
        ),
        case(
            "a pod to itself: HBONE",
            WEB,
            "10.0.1.5:8080",
            false,
            None,
            Want::Hbone(id("shop", "web")),
        ),
        case(
            "mesh workload's HBONE port: direct",
            WEB,
            "10.0.1.6:15008",
            false,
            None,
            Want::Direct,
        ),
        case(
            "unknown source to a mesh workload: HBONE",
            None,
            "10.0.1.6:5432",
            false,
            None,
            db(),
        ),
        case(
            "opted-out pod: direct",
            WEB,
            "10.0.1.8:80",
            false,
            None,
            Want::Direct,
        ),
        case(
            "pod of a namespace outside the mesh: direct",
            CURL,
            "10.0.2.9:80",
            false,
            None,
            Want::Direct,
        ),
        case(
            "Service VIP: HBONE to its one endpoint at the target port",
            CURL,
            "10.96.0.10:5432",
            false,
            None,
            Want::ServiceHbone("10.0.1.6:5432", id("shop", "db")),
        ),
        case(
            "Service VIP on a port it does not list: refused, no healthy upstream",
            CURL,
            "10.96.0.10:80",
            false,
            None,
            Want::Refuse("no_healthy_upstream", None),
        ),
        case(
            "non-mesh address, ALLOW_ANY: direct",
            WEB,
            "93.184.216.34:443",
            false,
            None,
            Want::Direct,
        ),
        case(
            "non-mesh IPv6 address, ALLOW_ANY: direct",
            WEB,
            "[2001:db8::1]:443",
            false,
            None,
            Want::Direct,
        ),
        case(
            "unknown source, REGISTRY_ONLY nowhere to apply: direct",
            None,
            "93.184.216.34:80",
            false,
            None,
            Want::Direct,
        ),
        case(
            "REGISTRY_ONLY, unlisted IP: refused",
            CURL,
            "93.184.216.34:443",
            false,
            None,
            Want::Refuse("registry_only", None),
        ),
        case(
            "REGISTRY_ONLY, unlisted IPv6: refused",
            CURL,
            "[2001:db8::1]:443",
            false,
            None,
            Want::Refuse("registry_only", None),
        ),
        case(
            "REGISTRY_ONLY, listed address: direct",
            CURL,
            "203.0.113.77:5432",
            false,
            None,
            Want::Direct,
        ),
        case(
            "REGISTRY_ONLY, HTTP port, unlisted Host: refused",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Http("other.example")),
            Want::Refuse("registry_only", Some("other.example")),
        ),
        case(
            "REGISTRY_ONLY, HTTP port, nothing peeked: refused",
            CURL,
            "93.184.216.34:80",
            true,
            None,
            Want::Refuse("registry_only", None),
        ),
        case(
            "REGISTRY_ONLY, IP literal as Host says nothing: refused",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Http("93.184.216.34")),
            Want::Refuse("registry_only", None),
        ),
        case(
            "REGISTRY_ONLY, listed Host: direct",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Http("plain.example")),
            Want::Direct,
        ),
        case(
            "egress gateway route by Host",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Http("WEB.example:80")),
            Want::Gateway("172.30.12.2:15008"),
        ),
        case(
            "egress gateway route by Host, IPv6 destination",
            CURL,
            "[2001:db8::1]:80",
            true,
            Some(Http("web.example")),
            Want::Gateway("[fd00:30::2]:15008"),
        ),
        case(
            "egress gateway route for an ALLOW_ANY source",
            WEB,
            "93.184.216.34:80",
            true,
            Some(Http("web.example")),
            Want::Gateway("172.30.12.2:15008"),
        ),
        case(
            "listed host as TLS SNI where only HTTP is routed: direct",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Tls("web.example")),
            Want::Direct,
        ),
        case(
            "REGISTRY_ONLY, unlisted TLS SNI: refused",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Tls("other.example")),
            Want::Refuse("registry_only", Some("other.example")),
        ),
        case(
            "egress gateway no node carries: refused",
            CURL,
            "93.184.216.34:80",
            true,
            Some(Http("lost.example")),
            Want::Refuse("gateway_unavailable", Some("lost.example")),
        ),
        case(
            "pinned pod: its static gateway",
            PINNED,
            "93.184.216.34:443",
            false,
            None,
            Want::Gateway("172.30.12.2:15008"),
        ),
        case(
            "pinned pod, excluded CIDR: direct",
            PINNED,
            "10.20.0.1:443",
            false,
            None,
            Want::Direct,
        ),
        case(
            "pinned pod, excluded node CIDR: direct",
            PINNED,
            "172.30.99.1:443",
            false,
            None,
            Want::Direct,
        ),
        case(
            "pinned pod without a known prefix: refused",
            Some(("shop", "pinless")),
            "93.184.216.34:443",
            false,
            None,
            Want::Refuse("static_prefix_unknown", None),
        ),
        Case {
            resolved: Some("db.example"),
            ..case(
                "REGISTRY_ONLY, a name resolved for a STATIC entry's host: to its listed endpoint",
                CURL,
                "203.0.113.99:5432",
                false,
                None,
                Want::DirectTo("203.0.113.77:5432"),
            )
        },
        Case {
            resolved: Some("unknown.example"),
            ..case(
                "REGISTRY_ONLY, a resolved name nothing lists: refused, naming it",
                CURL,
                "203.0.113.99:5432",
                false,
                None,
                Want::Refuse("registry_only", Some("unknown.example")),
            )
        },
        Case {
            resolved: Some("web.example"),
            ..case(
                "a resolved name when the peek found none: admitted, but only HTTP routes to the gateway",
                CURL,
                "93.184.216.34:80",
                true,
                None,
                Want::Direct,
            )
        },
    ]
}

/// Runs one case the way the proxy does: decide, peek when asked, decide again.
fn run(state: &MeshState, c: &Case) -> (bool, Plan) {
    let source = c.source.map(|(ns, name)| {
        state
            .workload_by_name(ns, name)
            .unwrap_or_else(|| panic!("{}: no workload {ns}/{name}", c.name))
    });
    let conn = Connection {
        source,
        dst: addr(c.dst),
        resolved_host: c.resolved,
        resolved: &resolved_answers(),
        balance: None,
    };
    let gw = gateway_peer();
    match decide(state, &gw, &conn) {
        Decision::Plan(p) => {
            assert!(
                c.peeked.is_none(),
                "{}: a peeked host was never asked for",
                c.name
            );
            (false, p)
        }
        Decision::PeekFirst(next) => (true, next.plan(state, &gw, &conn, c.peeked)),
    }
}

#[test]
fn outbound_decisions() {
    let state = world();
    let cases = cases();
    assert!(cases.len() >= 20);
    for c in &cases {
        let (peeked, plan) = run(&state, c);
        assert_eq!(peeked, c.peeks, "{}: peek asked for: {plan:?}", c.name);
        let dst = addr(c.dst);
        let expected = match &c.want {
            Want::Direct => Plan::Direct { dst },
            Want::DirectTo(to) => Plan::Direct { dst: addr(to) },
            Want::Hbone(identity) => Plan::Hbone {
                dst,
                peer: SocketAddr::new(dst.ip(), 15008),
                identity: identity.clone(),
            },
            Want::Gateway(gw) => Plan::EgressGateway {
                dst,
                gateway: addr(gw),
                identity: id("istio-system", "sluice-egress-gateway"),
            },
            Want::Refuse(label, host) => match &plan {
                Plan::Refuse { reason, host: got } => {
                    assert_eq!(reason.label(), *label, "{}: {reason}", c.name);
                    assert_eq!(got.as_deref(), *host, "{}", c.name);
                    continue;
                }
                other => panic!("{}: want a refusal ({label}), got {other:?}", c.name),
            },
            Want::ServiceHbone(endpoint, identity) => match &plan {
                Plan::Service { attempts, .. } => {
                    let endpoint = addr(endpoint);
                    let hops: Vec<_> = attempts.iter().map(|a| a.hop.clone()).collect();
                    assert_eq!(
                        hops,
                        [crate::state::load_balance::Hop::Hbone {
                            dst: endpoint,
                            peer: SocketAddr::new(endpoint.ip(), 15008),
                            identity: identity.clone(),
                        }],
                        "{}",
                        c.name
                    );
                    continue;
                }
                other => panic!("{}: want a Service plan, got {other:?}", c.name),
            },
        };
        assert_eq!(plan, expected, "{}", c.name);
    }
}

#[test]
fn refusals_name_their_reason() {
    let state = world();
    let curl = state.workload_by_name("locked", "curl").expect("curl");
    let conn = Connection {
        source: Some(curl),
        dst: addr("93.184.216.34:443"),
        resolved_host: None,
        resolved: &crate::state::egress::NothingResolved,
        balance: None,
    };
    let Decision::Plan(Plan::Refuse { reason, .. }) = decide(&state, &gateway_peer(), &conn) else {
        panic!("not refused");
    };
    assert!(reason.to_string().contains("REGISTRY_ONLY"), "{reason}");
    let lost = Refusal::GatewayUnavailable(GatewayTarget::Static {
        sgc: crate::state::egress::ObjectKey::new("shop", "x"),
    });
    assert!(lost.to_string().contains("no node"), "{lost}");
}

#[test]
fn picks_are_stable_and_in_range() {
    for n in 1..5 {
        let a = pick("uid-a", n);
        assert!(a < n);
        assert_eq!(a, pick("uid-a", n));
    }
    assert_eq!(pick("x", 0), 0);
}

/// What the agent's resolver knows in these cases.
fn resolved_answers() -> std::collections::BTreeMap<String, Vec<std::net::IpAddr>> {
    [
        ("web.example", "93.184.216.34"),
        ("plain.example", "93.184.216.34"),
        ("db.example", "203.0.113.99"),
    ]
    .into_iter()
    .map(|(h, ip)| (h.to_owned(), vec![ip.parse().expect("ip")]))
    .collect()
}
