//! Egress normalisation and decisions, end to end from YAML through `state::build`.
use std::net::SocketAddr;

use super::*;
use crate::{
    resources::ResourceSet,
    state::{BuildOutput, MeshSettings, MeshState, Rejection, build},
};

/// Seed 002's scenario: REGISTRY_ONLY in the AKS add-on's shared mesh ConfigMap, a ServiceEntry
/// for an external host, and the egress Gateway + VirtualService + DestinationRule trio, with
/// the egress gateway pods pinned to a StaticGatewayConfiguration.
const SEED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: aks-istio-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio-shared-configmap-asm-1-24, namespace: aks-istio-system}
data:
  mesh: |-
    accessLogFile: /dev/stdout
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: v1
kind: Namespace
metadata: {name: client, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: aks-istio-egress}
---
apiVersion: v1
kind: Pod
metadata: {name: curl, namespace: client, uid: curl-uid, labels: {app: curl}}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata:
  name: egressgw-0
  namespace: aks-istio-egress
  uid: gw-uid
  labels: {istio: asm-egress-test}
  annotations: {kubernetes.azure.com/static-gateway-configuration: asm-egress-test-sgc}
spec: {nodeName: gw1, containers: []}
status: {podIP: 10.0.9.2}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: asm-egress-test-sgc, namespace: aks-istio-egress}
spec:
  gatewayNodepoolName: gwpool
  excludeCidrs: [10.0.0.0/8]
status:
  egressIpPrefix: 203.0.113.16/28
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin-ext, namespace: client}
spec:
  hosts: [httpbin.org]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: tls, protocol: TLS}
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secure-ext, namespace: client}
spec:
  hosts: [secure.example.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: asm-egress-test, namespace: aks-istio-egress}
spec:
  selector: {istio: asm-egress-test}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [httpbin.org, secure.example.com]
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [httpbin.org]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: egressgateway-for-httpbin, namespace: aks-istio-egress}
spec:
  host: asm-egress-test.aks-istio-egress.svc.cluster.local
  subsets: [{name: httpbin}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: direct-httpbin-through-egress-gateway, namespace: aks-istio-egress}
spec:
  hosts: [httpbin.org]
  gateways: [mesh, aks-istio-egress/asm-egress-test]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route:
    - destination: {host: asm-egress-test.aks-istio-egress.svc.cluster.local, subset: httpbin, port: {number: 80}}
  - match: [{gateways: [aks-istio-egress/asm-egress-test], port: 80}]
    route:
    - destination: {host: httpbin.org, port: {number: 80}}
      weight: 100
  tls:
  - match: [{gateways: [mesh], port: 443, sniHosts: [httpbin.org]}]
    route:
    - destination: {host: asm-egress-test.aks-istio-egress.svc.cluster.local, port: {number: 443}}
  - match: [{gateways: [aks-istio-egress/asm-egress-test], port: 443, sniHosts: [httpbin.org]}]
    route:
    - destination: {host: httpbin.org, port: {number: 443}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: secure-through-egress-gateway, namespace: aks-istio-egress}
spec:
  hosts: [secure.example.com]
  gateways: [asm-egress-test, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route:
    - destination: {host: asm-egress-test, port: {number: 80}}
  - match: [{gateways: [asm-egress-test], port: 80}]
    route:
    - destination: {host: secure.example.com, port: {number: 443}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: originate-tls-for-secure, namespace: aks-istio-egress}
spec:
  host: secure.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, sni: secure.example.com, caCertificates: /etc/sluice/test-ca.pem}
"#;

fn settings() -> MeshSettings {
    MeshSettings {
        root_namespace: "aks-istio-system".into(),
        mesh_config: Some((
            "aks-istio-system".into(),
            "istio-shared-configmap-asm-1-24".into(),
        )),
        ..MeshSettings::default()
    }
}

fn parse(yaml: &str) -> ResourceSet {
    ResourceSet::from_yaml(yaml).expect("known kinds")
}

fn build_with(extra: &str, settings: &MeshSettings) -> BuildOutput {
    build(&parse(&format!("{SEED}\n---\n{extra}")), settings)
}

fn seed() -> MeshState {
    let out = build(&parse(SEED), &settings());
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    out.state
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn decide(
    state: &MeshState,
    pod: (&str, &str),
    dest: &str,
    host: Option<HostHint<'_>>,
) -> EgressDecision {
    let w = state.workload_by_name(pod.0, pod.1).expect("workload");
    state.egress.outbound_decision(
        w,
        addr(dest),
        host,
        DestinationScope::OutsideMesh,
        &resolved(),
    )
}

/// What the agent's resolver knows in these tests: `httpbin.org` is at 34.1.2.3.
fn resolved() -> BTreeMap<String, Vec<std::net::IpAddr>> {
    [(
        "httpbin.org".to_owned(),
        vec!["34.1.2.3".parse().expect("ip")],
    )]
    .into()
}

fn rejected_field(out: &BuildOutput, name: &str) -> String {
    out.rejections
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{name} not rejected: {:?}", out.rejections))
        .field
        .clone()
}

const CURL: (&str, &str) = ("client", "curl");
const EXAMPLE: &str = "93.184.216.34:80";

#[test]
fn seed_mesh_config_makes_registry_only() {
    let state = seed();
    let policy = &state.egress.policy;
    assert_eq!(policy.mesh_mode, OutboundMode::RegistryOnly);
    assert_eq!(
        policy.mesh_config,
        Some(ObjectKey::new(
            "aks-istio-system",
            "istio-shared-configmap-asm-1-24"
        ))
    );
    // The same documents with the mesh config under another name: Istio's default applies.
    let other = build(&parse(SEED), &MeshSettings::default()).state;
    assert_eq!(other.egress.policy.mesh_mode, OutboundMode::AllowAny);
}

/// Seed 002 applied without `spec.meshConfig`: the AKS add-on's ConfigMap is read by nobody.
/// That is said, naming the ConfigMap, instead of leaving the node silently ALLOW_ANY.
#[test]
fn an_add_on_mesh_config_not_in_force_is_noticed() {
    let labels = |rev: Option<&str>| -> BTreeMap<String, String> {
        rev.map(|r| [("istio.io/rev".to_owned(), r.to_owned())].into())
            .unwrap_or_default()
    };
    let (asm, plain, upstream) = (
        labels(Some("asm-1-24")),
        labels(None),
        labels(Some("canary")),
    );
    let namespaces = || {
        [
            ("shop", &asm),
            ("bank", &asm),
            ("web", &plain),
            ("beta", &upstream),
        ]
    };

    // The default setting: `istio` in the root namespace, which does not exist here.
    let unset = build(&parse(SEED), &MeshSettings::default()).state;
    let notices = unset.egress.policy.notices(namespaces());
    let names: Vec<&str> = notices.iter().map(|n| n.config_map.as_str()).collect();
    assert_eq!(
        names,
        [
            "istio-system/istio",
            "aks-istio-system/istio-shared-configmap-asm-1-24",
            "istio-system/istio-canary"
        ]
    );
    assert!(
        notices[0].message.contains("does not exist"),
        "{}",
        notices[0].message
    );
    let add_on = &notices[1].message;
    assert!(
        add_on.contains("istio.io/rev=asm-1-24 (bank, shop)") && add_on.contains("not in force"),
        "{add_on}"
    );

    // Named by spec.meshConfig, as README says to: nothing to say about asm-1-24.
    let named = seed().egress.policy.notices(namespaces());
    let names: Vec<&str> = named.iter().map(|n| n.config_map.as_str()).collect();
    assert_eq!(names, ["istio-system/istio-canary"]);
}

#[test]
fn registry_only_refuses_unlisted_host_and_ip() {
    let state = seed();
    for host in [Some(HostHint::Http("example.com")), None] {
        match decide(&state, CURL, EXAMPLE, host) {
            EgressDecision::Refuse(reason) => {
                assert_eq!(reason.label(), "registry_only");
                assert!(reason.to_string().contains("93.184.216.34:80"), "{reason}");
            }
            other => panic!("{host:?}: {other:?}"),
        }
    }
}

#[test]
fn mesh_destinations_always_pass() {
    let state = seed();
    let w = state.workload_by_name("client", "curl").expect("curl");
    let d = state.egress.outbound_decision(
        w,
        addr("10.0.9.2:8080"),
        None,
        DestinationScope::Mesh,
        &NothingResolved,
    );
    assert_eq!(
        d,
        EgressDecision::Passthrough {
            allowed: Allowed::Mesh,
            dst: addr("10.0.9.2:8080"),
        }
    );
}

#[test]
fn http_goes_through_the_egress_gateway_by_host() {
    let state = seed();
    let d = decide(
        &state,
        CURL,
        "34.1.2.3:80",
        Some(HostHint::Http("HTTPBIN.org:80")),
    );
    let EgressDecision::ViaGateway(hop) = d else {
        panic!("{d:?}");
    };
    assert_eq!(
        hop.target,
        GatewayTarget::Istio {
            gateway: ObjectKey::new("aks-istio-egress", "asm-egress-test"),
            service_host: "asm-egress-test.aks-istio-egress.svc.cluster.local".into(),
            service_port: 80,
            route: ObjectKey::new("aks-istio-egress", "direct-httpbin-through-egress-gateway"),
        }
    );
    assert_eq!(hop.mode, GatewayMode::Http);
    assert_eq!(
        hop.upstream,
        Upstream::Host {
            host: "httpbin.org".into(),
            port: 80
        }
    );
    assert_eq!(
        hop.source_prefix,
        Some(ObjectKey::new("aks-istio-egress", "asm-egress-test-sgc"))
    );
    assert_eq!(
        hop.allowed,
        Allowed::Registered(ObjectKey::new("client", "httpbin-ext"))
    );
}

#[test]
fn tls_passes_through_the_gateway_by_sni() {
    let state = seed();
    let d = decide(
        &state,
        CURL,
        "34.1.2.3:443",
        Some(HostHint::Tls("httpbin.org")),
    );
    let EgressDecision::ViaGateway(hop) = d else {
        panic!("{d:?}");
    };
    assert_eq!(hop.mode, GatewayMode::TlsPassthrough);
    assert_eq!(
        hop.upstream,
        Upstream::Host {
            host: "httpbin.org".into(),
            port: 443
        }
    );
}

#[test]
fn plain_http_is_originated_as_tls_at_the_gateway() {
    let state = seed();
    let d = decide(
        &state,
        CURL,
        "34.9.9.9:80",
        Some(HostHint::Http("secure.example.com")),
    );
    let EgressDecision::ViaGateway(hop) = d else {
        panic!("{d:?}");
    };
    let GatewayMode::TlsOrigination(tls) = &hop.mode else {
        panic!("{:?}", hop.mode);
    };
    assert_eq!(tls.mode, TlsMode::Simple);
    assert_eq!(tls.sni.as_deref(), Some("secure.example.com"));
    assert_eq!(
        tls.ca_certificates.as_deref(),
        Some("/etc/sluice/test-ca.pem")
    );
    assert_eq!(
        hop.upstream,
        Upstream::Host {
            host: "secure.example.com".into(),
            port: 443
        }
    );
    // Short gateway service names expand in the VirtualService's namespace.
    let GatewayTarget::Istio { service_host, .. } = &hop.target else {
        panic!("{:?}", hop.target);
    };
    assert_eq!(
        service_host,
        "asm-egress-test.aks-istio-egress.svc.cluster.local"
    );
}

#[test]
fn the_gateway_refuses_hosts_it_has_no_route_for() {
    let state = seed();
    let gw = ObjectKey::new("aks-istio-egress", "asm-egress-test");
    let ok = state
        .egress
        .gateway_decision(&gw, 80, Some(HostHint::Http("httpbin.org")))
        .expect("routed");
    assert_eq!(
        (ok.upstream_host.as_str(), ok.upstream_port),
        ("httpbin.org", 80)
    );
    assert!(matches!(
        state
            .egress
            .gateway_decision(&gw, 80, Some(HostHint::Http("evil.example"))),
        Err(GatewayRefusal::NoServer { .. })
    ));
    assert!(matches!(
        state.egress.gateway_decision(&gw, 443, None),
        Err(GatewayRefusal::NoServer { .. })
    ));
    let passthrough = state
        .egress
        .gateway_decision(&gw, 443, Some(HostHint::Tls("httpbin.org")))
        .expect("routed");
    assert_eq!(passthrough.mode, GatewayMode::TlsPassthrough);
    assert!(matches!(
        state.egress.gateway_decision(
            &ObjectKey::new("aks-istio-egress", "nope"),
            80,
            Some(HostHint::Http("httpbin.org"))
        ),
        Err(GatewayRefusal::UnknownGateway(_))
    ));
}

#[test]
fn a_mesh_route_to_a_gateway_without_a_route_is_refused_at_the_source() {
    // The gateway takes the host on port 80, but no gateway-bound route sends it anywhere.
    let out = build_with(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: orphan, namespace: client}
spec: {hosts: [orphan.example], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: orphan-gw, namespace: aks-istio-egress}
spec:
  selector: {istio: asm-egress-test}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [orphan.example]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orphan, namespace: aks-istio-egress}
spec:
  hosts: [orphan.example]
  gateways: [mesh, orphan-gw]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: asm-egress-test, port: {number: 80}}}]
"#,
        &settings(),
    );
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    match decide(
        &out.state,
        CURL,
        "34.1.1.1:80",
        Some(HostHint::Http("orphan.example")),
    ) {
        EgressDecision::Refuse(r) => assert_eq!(r.label(), "gateway_no_route"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sidecars_override_the_mesh_default() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: client}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: v1
kind: Pod
metadata: {name: locked, namespace: client, uid: locked-uid, labels: {app: locked}}
spec: {containers: []}
status: {podIP: 10.0.1.6}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: locked, namespace: client}
spec:
  workloadSelector: {labels: {app: locked}}
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#;
    let out = build_with(extra, &settings());
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    assert_eq!(
        decide(&out.state, CURL, EXAMPLE, None),
        EgressDecision::Passthrough {
            allowed: Allowed::AllowAny,
            dst: addr(EXAMPLE),
        }
    );
    match decide(&out.state, ("client", "locked"), EXAMPLE, None) {
        EgressDecision::Refuse(RefuseReason::NotRegistered { policy, .. }) => {
            assert_eq!(
                policy,
                PolicySource::Sidecar(ObjectKey::new("client", "locked"))
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_root_namespace_sidecar_is_the_mesh_wide_default() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: aks-istio-system}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: no-policy, namespace: aks-istio-egress}
spec: {}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: aks-istio-egress, uid: other-uid}
spec: {containers: []}
status: {podIP: 10.0.9.9}
"#;
    let out = build_with(extra, &settings());
    assert_eq!(
        decide(&out.state, CURL, EXAMPLE, None),
        EgressDecision::Passthrough {
            allowed: Allowed::AllowAny,
            dst: addr(EXAMPLE),
        }
    );
    // A namespace's own Sidecar without a policy falls back to the mesh config, not the root's.
    assert!(matches!(
        decide(&out.state, ("aks-istio-egress", "other"), EXAMPLE, None),
        EgressDecision::Refuse(RefuseReason::NotRegistered {
            policy: PolicySource::MeshConfig,
            ..
        })
    ));
}

#[test]
fn registry_matches_addresses_wildcards_and_respects_export_to() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: client}
spec:
  hosts: [db.internal]
  addresses: [192.0.2.0/24]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: client}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: aks-istio-egress}
spec:
  hosts: [private.example]
  ports: [{number: 443, name: tls, protocol: TLS}]
  exportTo: ["."]
"#;
    let out = build_with(extra, &settings());
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    let s = &out.state;
    assert!(matches!(
        decide(s, CURL, "192.0.2.77:5432", None),
        EgressDecision::Passthrough { allowed: Allowed::Registered(k), .. } if k.name == "db"
    ));
    // Right address, wrong port.
    assert!(matches!(
        decide(s, CURL, "192.0.2.77:5433", None),
        EgressDecision::Refuse(_)
    ));
    // A NONE entry without addresses gives no address: its SNI alone sends nothing anywhere.
    assert!(matches!(
        decide(s, CURL, "1.2.3.4:443", Some(HostHint::Tls("en.wikipedia.org"))),
        EgressDecision::Refuse(RefuseReason::NoListedAddress { entry, .. }) if entry.name == "wiki"
    ));
    assert!(matches!(
        decide(s, CURL, "1.2.3.4:443", Some(HostHint::Tls("wikipedia.org"))),
        EgressDecision::Refuse(_)
    ));
    // Exported to its own namespace only.
    assert!(matches!(
        decide(
            s,
            CURL,
            "1.2.3.4:443",
            Some(HostHint::Tls("private.example"))
        ),
        EgressDecision::Refuse(_)
    ));
    let own = s.egress.registered(
        "aks-istio-egress",
        addr("1.2.3.4:443"),
        Some("private.example"),
    );
    assert_eq!(own.map(|se| se.key.name.as_str()), Some("private"));
    // A resolver answer counts as the host.
    assert!(matches!(
        decide(s, CURL, "34.1.2.3:443", Some(HostHint::Dns("httpbin.org"))),
        EgressDecision::Passthrough { allowed: Allowed::Registered(k), .. } if k.name == "httpbin-ext"
    ));
}

const PINNED: &str = r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: client}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: v1
kind: Pod
metadata:
  name: pinned
  namespace: client
  uid: pinned-uid
  annotations: {kubernetes.azure.com/static-gateway-configuration: client-sgc}
spec: {containers: []}
status: {podIP: 10.0.1.7}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: client-sgc, namespace: client}
spec:
  gatewayNodepoolName: gwpool
  defaultRoute: DEFAULT_ROUTE
  excludeCidrs: [10.0.0.0/8]
"#;

fn pinned(default_route: &str, prefix: Option<&str>) -> BuildOutput {
    let mut s = settings();
    if let Some(p) = prefix {
        s.static_gateway_prefixes
            .insert("client/client-sgc".into(), p.parse().expect("prefix"));
    }
    build_with(&PINNED.replace("DEFAULT_ROUTE", default_route), &s)
}

#[test]
fn pinned_pods_leave_through_their_static_gateway() {
    let out = pinned("staticEgressGateway", Some("198.51.100.0/29"));
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    let s = &out.state;
    let sgc = &s.egress.static_gateways.configs[&ObjectKey::new("client", "client-sgc")];
    assert_eq!(sgc.prefix_source, Some(PrefixSource::AgentConfig));
    let d = decide(s, ("client", "pinned"), EXAMPLE, None);
    let EgressDecision::ViaGateway(hop) = d else {
        panic!("{d:?}");
    };
    assert_eq!(
        hop.target,
        GatewayTarget::Static {
            sgc: ObjectKey::new("client", "client-sgc")
        }
    );
    assert_eq!(hop.mode, GatewayMode::Tcp);
    assert_eq!(hop.upstream, Upstream::Addr(addr(EXAMPLE)));
    // excludeCidrs bypass the gateway.
    assert!(matches!(
        decide(s, ("client", "pinned"), "10.20.0.1:80", None),
        EgressDecision::Passthrough { .. }
    ));
    // The unpinned pod passes straight out.
    assert!(matches!(
        decide(s, CURL, EXAMPLE, None),
        EgressDecision::Passthrough { .. }
    ));
    // The gateway's node pool is found by the AKS agentpool label.
    let node = crate::state::Node {
        name: "gw1".into(),
        addresses: vec![],
        labels: [(
            static_gateway::AGENTPOOL_LABEL.to_owned(),
            "gwpool".to_owned(),
        )]
        .into(),
    };
    assert!(sgc.hosted_on(&node));
}

#[test]
fn azure_networking_sends_only_excluded_cidrs_to_the_gateway() {
    let out = pinned("azureNetworking", Some("198.51.100.0/29"));
    let s = &out.state;
    assert!(matches!(
        decide(s, ("client", "pinned"), EXAMPLE, None),
        EgressDecision::Passthrough { .. }
    ));
    assert!(matches!(
        decide(s, ("client", "pinned"), "10.20.0.1:80", None),
        EgressDecision::ViaGateway(_)
    ));
}

#[test]
fn a_pinned_pod_without_a_known_prefix_is_refused() {
    let out = pinned("staticEgressGateway", None);
    match decide(&out.state, ("client", "pinned"), EXAMPLE, None) {
        EgressDecision::Refuse(r) => assert_eq!(r.label(), "static_prefix_unknown"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn status_prefix_wins_over_agent_config() {
    let state = seed();
    let sgc = &state.egress.static_gateways.configs
        [&ObjectKey::new("aks-istio-egress", "asm-egress-test-sgc")];
    assert_eq!(sgc.prefix, Some("203.0.113.16/28".parse().expect("net")));
    assert_eq!(sgc.prefix_source, Some(PrefixSource::Status));
}

#[test]
fn invalid_resources_are_rejected_naming_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "bad-cidr",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad-cidr, namespace: client}
spec: {hosts: [a.example], addresses: [10.0.0.0/33], ports: [{number: 80, name: http, protocol: HTTP}]}
"#,
            "spec.addresses[0]",
        ),
        (
            "bad-port",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad-port, namespace: client}
spec: {hosts: [a.example], ports: [{number: 70000, name: http, protocol: HTTP}]}
"#,
            "spec.ports[0].number",
        ),
        (
            "bad-resolution",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad-resolution, namespace: client}
spec: {hosts: [a.example], ports: [{number: 80, name: http, protocol: HTTP}], resolution: MAGIC}
"#,
            "spec.resolution",
        ),
        (
            "star-host",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: star-host, namespace: client}
spec: {hosts: ["*"], ports: [{number: 80, name: http, protocol: HTTP}]}
"#,
            "spec.hosts[0]",
        ),
        (
            "Bad_Gateway",
            r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: Bad_Gateway, namespace: aks-istio-egress}
spec: {servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.example]}]}
"#,
            "metadata.name",
        ),
        (
            "gw-bad-tls",
            r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw-bad-tls, namespace: aks-istio-egress}
spec: {servers: [{port: {number: 443, name: tls, protocol: TLS}, hosts: [a.example], tls: {mode: SOMETIMES}}]}
"#,
            "spec.servers[0].tls.mode",
        ),
        (
            "vs-bad-port",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs-bad-port, namespace: client}
spec:
  hosts: [a.example]
  http: [{match: [{port: 0}], route: [{destination: {host: a.example}}]}]
"#,
            "spec.http[0].match[0].port",
        ),
        (
            "dr-bad-mode",
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr-bad-mode, namespace: client}
spec: {host: a.example, trafficPolicy: {tls: {mode: OPPORTUNISTIC}}}
"#,
            "spec.trafficPolicy.tls.mode",
        ),
        (
            "sc-bad-mode",
            r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: sc-bad-mode, namespace: client}
spec: {outboundTrafficPolicy: {mode: DENY_ALL}}
"#,
            "spec.outboundTrafficPolicy.mode",
        ),
        (
            "sgc-host-bits",
            r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: sgc-host-bits, namespace: client}
spec: {gatewayNodepoolName: gwpool}
status: {egressIpPrefix: 198.51.100.5/29}
"#,
            "status.egressIpPrefix",
        ),
        (
            "sgc-route",
            r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: sgc-route, namespace: client}
spec: {gatewayNodepoolName: gwpool, defaultRoute: viaTheMoon}
"#,
            "spec.defaultRoute",
        ),
        (
            "sgc-exclude",
            r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: sgc-exclude, namespace: client}
spec: {gatewayNodepoolName: gwpool, excludeCidrs: [not-a-cidr]}
"#,
            "spec.excludeCidrs[0]",
        ),
        (
            "sgc-overlap",
            r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: sgc-overlap, namespace: client}
spec: {gatewayNodepoolName: gwpool}
status: {egressIpPrefix: 203.0.113.24/29}
"#,
            "status.egressIpPrefix",
        ),
        (
            "stray",
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: stray
  namespace: client
  annotations: {kubernetes.azure.com/static-gateway-configuration: missing}
spec: {containers: []}
status: {podIP: 10.9.9.9}
"#,
            "metadata.annotations[kubernetes.azure.com/static-gateway-configuration]",
        ),
    ];
    for (name, yaml, field) in cases {
        let out = build_with(yaml, &settings());
        assert_eq!(rejected_field(&out, name), *field, "{name}");
        // Everything else keeps working.
        assert!(
            matches!(
                decide(
                    &out.state,
                    CURL,
                    "34.1.2.3:80",
                    Some(HostHint::Http("httpbin.org"))
                ),
                EgressDecision::ViaGateway(_)
            ),
            "{name} broke the seed"
        );
    }
    let long = "a".repeat(54);
    let out = build_with(
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {long}, namespace: aks-istio-egress}}
spec: {{servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: [a.example]}}]}}
"#
        ),
        &settings(),
    );
    assert_eq!(rejected_field(&out, &long), "metadata.name");
}

#[test]
fn a_broken_mesh_config_is_reported() {
    let mut s = settings();
    s.mesh_config = Some(("client".into(), "broken".into()));
    let out = build_with(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: broken, namespace: client}
data: {mesh: "outboundTrafficPolicy: {mode: CLOSED}"}
"#,
        &s,
    );
    assert_eq!(
        rejected_field(&out, "broken"),
        "data.mesh: outboundTrafficPolicy.mode"
    );
}

#[test]
fn host_hints_are_wanted_only_where_they_matter() {
    let state = seed();
    let curl = state.workload_by_name("client", "curl").expect("curl");
    assert!(state.egress.needs_host_hint(curl, 80));
    assert!(state.egress.needs_host_hint(curl, 443));
    assert!(!state.egress.needs_host_hint(curl, 5432));
    assert_eq!(
        state.egress.dns_hosts().into_iter().collect::<Vec<_>>(),
        vec!["httpbin.org".to_owned(), "secure.example.com".to_owned()]
    );
}

#[test]
fn the_model_serialises_for_config_dump() {
    let state = seed();
    let json = serde_json::to_value(&*state.egress).expect("serialises");
    assert_eq!(
        json["static_gateways"]["bindings"]["gw-uid"],
        "aks-istio-egress/asm-egress-test-sgc"
    );
    assert_eq!(json["policy"]["mesh_mode"], "REGISTRY_ONLY");
}

#[test]
fn a_listed_name_goes_only_where_its_entry_says() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dnsweb, namespace: client}
spec:
  hosts: [dnsweb.example]
  ports: [{number: 8081, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: client}
spec:
  hosts: [fixed.example]
  ports: [{number: 8081, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}, {address: "2001:db8::10"}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bare, namespace: client}
spec:
  hosts: [bare.example]
  addresses: [198.51.100.7/32]
  ports: [{number: 8081, name: http, protocol: HTTP}]
  resolution: NONE
"#;
    let out = build_with(extra, &settings());
    assert_eq!(out.rejections, Vec::<Rejection>::new());
    let s = &out.state;
    let w = s.workload_by_name(CURL.0, CURL.1).expect("curl");
    let answers: BTreeMap<String, Vec<std::net::IpAddr>> = [(
        "dnsweb.example".to_owned(),
        vec![
            "203.0.113.5".parse().expect("ip"),
            "203.0.113.6".parse().expect("ip"),
        ],
    )]
    .into();
    let go = |dest: &str, host: &str, r: &dyn Resolved| {
        s.egress.outbound_decision(
            w,
            addr(dest),
            Some(HostHint::Http(host)),
            DestinationScope::OutsideMesh,
            r,
        )
    };
    let dst = |d: EgressDecision| match d {
        EgressDecision::Passthrough { dst, .. } => Ok(dst),
        other => Err(other),
    };
    // DNS: a resolved address as dialled; a forged one goes to a resolved address instead.
    assert_eq!(
        dst(go("203.0.113.6:8081", "dnsweb.example", &answers)),
        Ok(addr("203.0.113.6:8081"))
    );
    assert_eq!(
        dst(go("6.6.6.6:8081", "dnsweb.example", &answers)),
        Ok(addr("203.0.113.5:8081"))
    );
    // Nothing resolved (yet): refused, not sent where dialled.
    assert!(matches!(
        go("6.6.6.6:8081", "dnsweb.example", &NothingResolved),
        EgressDecision::Refuse(RefuseReason::NoListedAddress { .. })
    ));
    // STATIC: a listed endpoint, of the dialled family.
    assert_eq!(
        dst(go("6.6.6.6:8081", "fixed.example", &answers)),
        Ok(addr("192.0.2.10:8081"))
    );
    assert_eq!(
        dst(go("[2001:db8::66]:8081", "fixed.example", &answers)),
        Ok(addr("[2001:db8::10]:8081"))
    );
    // NONE: only within its addresses.
    assert_eq!(
        dst(go("198.51.100.7:8081", "bare.example", &answers)),
        Ok(addr("198.51.100.7:8081"))
    );
    let refused = go("6.6.6.6:8081", "bare.example", &answers);
    assert!(
        matches!(&refused, EgressDecision::Refuse(r) if r.label() == "registry_only_address"
            && r.to_string().contains("bare")),
        "{refused:?}"
    );
}
