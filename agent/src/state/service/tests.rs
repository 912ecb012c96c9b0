use std::{collections::HashMap, sync::Mutex};

use super::*;
use crate::state::{Identity, MeshState, load_balance::*};
use crate::{
    resources::{
        ResourceSet,
        endpoint_slice::{EndpointSliceV1beta1, Slice},
    },
    state::{MeshSettings, build},
};

/// Deterministic load, stickiness and chance.
#[derive(Debug)]
struct Fake {
    rng: Mutex<fastrand::Rng>,
    load: HashMap<IpAddr, usize>,
    sticky: Option<IpAddr>,
}

impl Fake {
    fn new() -> Self {
        Self {
            rng: Mutex::new(fastrand::Rng::with_seed(7)),
            load: HashMap::new(),
            sticky: None,
        }
    }
}

impl Balance for Fake {
    fn in_flight(&self, ip: IpAddr) -> usize {
        self.load.get(&ip).copied().unwrap_or(0)
    }
    fn sticky(&self, _: IpAddr, _: &str, _: Duration) -> Option<IpAddr> {
        self.sticky
    }
    fn random_below(&self, n: usize) -> usize {
        self.rng.lock().unwrap().usize(..n)
    }
}

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: mesh, uid: ua}
spec: {nodeName: node1, serviceAccountName: a, containers: []}
status: {podIPs: [{ip: 10.0.1.2}, {ip: "fd00:1::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: mesh, uid: ub, labels: {app: b}}
spec:
  nodeName: node2
  serviceAccountName: b
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIPs: [{ip: 10.0.2.2}, {ip: "fd00:2::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: mesh, uid: uc, labels: {app: b}}
spec:
  nodeName: node1
  serviceAccountName: c
  containers: [{name: app, ports: [{name: http, containerPort: 9090}]}]
status: {podIPs: [{ip: 10.0.1.3}, {ip: "fd00:1::3"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: mesh, uid: ud, labels: {app: b}}
spec: {nodeName: node2, serviceAccountName: d, containers: []}
status: {podIPs: [{ip: 10.0.2.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: plain, uid: up, labels: {app: p}}
spec: {nodeName: node2, containers: []}
status: {podIP: 10.0.2.9}
"#;

fn state(extra: &str) -> MeshState {
    let out = build(
        &ResourceSet::from_yaml(&format!("{BASE}---\n{extra}")).unwrap(),
        &MeshSettings::default(),
    );
    assert!(out.rejections.is_empty(), "{:?}", out.rejections);
    out.state
}

fn source(s: &MeshState) -> &Workload {
    s.workload_by_name("mesh", "a").unwrap()
}

fn go(s: &MeshState, dst: &str, b: &Fake) -> Option<ServiceRoute> {
    let src = source(s);
    route(s, Some(src), Some(src.ips[0]), dst.parse().unwrap(), b)
}

fn dsts(r: &Option<ServiceRoute>) -> Vec<String> {
    match r {
        Some(ServiceRoute::Endpoints { attempts, .. }) => {
            attempts.iter().map(|a| a.hop.dst().to_string()).collect()
        }
        other => panic!("no endpoints: {other:?}"),
    }
}

fn is_uh(r: &Option<ServiceRoute>) -> bool {
    matches!(r, Some(ServiceRoute::NoHealthyUpstream { .. }))
}

const ONE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec: {clusterIP: 10.96.77.7, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
"#;

#[test]
fn vip_goes_over_hbone_to_an_endpoint_at_its_target_port() {
    let s = state(ONE);
    let r = go(&s, "10.96.77.7:80", &Fake::new());
    let Some(ServiceRoute::Endpoints { service, attempts }) = &r else {
        panic!("{r:?}");
    };
    assert_eq!(service.hostname, "web.mesh.svc.cluster.local");
    assert_eq!(
        (service.name.as_str(), service.namespace.as_str()),
        ("web", "mesh")
    );
    assert_eq!(attempts.len(), 3, "three endpoints, three tries");
    let b = attempts
        .iter()
        .find(|a| a.workload == Some(WorkloadUid("ub".into())))
        .unwrap();
    assert_eq!(
        b.hop,
        Hop::Hbone {
            dst: "10.0.2.2:8080".parse().unwrap(),
            peer: "10.0.2.2:15008".parse().unwrap(),
            identity: Identity::new("cluster.local", "mesh", "b"),
        }
    );
    let mut all = dsts(&r);
    all.sort();
    assert_eq!(all, ["10.0.1.3:8080", "10.0.2.2:8080", "10.0.2.3:8080"]);
}

#[test]
fn not_a_vip_and_headless_are_none() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: mesh}
spec: {clusterIP: None, selector: {app: b}, ports: [{port: 80}]}
"#,
    );
    assert!(s.services["mesh/headless"].vips.is_empty());
    assert_eq!(go(&s, "10.0.2.2:80", &Fake::new()), None);
    assert_eq!(go(&s, "10.96.0.1:80", &Fake::new()), None);
}

#[test]
fn an_unlisted_port_and_no_endpoints_are_no_healthy_upstream() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec: {clusterIP: 10.96.77.7, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: mesh}
spec: {clusterIP: 10.96.77.8, selector: {app: nobody}, ports: [{port: 80}]}
"#,
    );
    assert!(is_uh(&go(&s, "10.96.77.7:81", &Fake::new())));
    assert!(is_uh(&go(&s, "10.96.77.8:80", &Fake::new())));
}

#[test]
fn dual_stack_vips_pick_endpoint_addresses_of_their_family() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 10.96.77.7
  clusterIPs: [10.96.77.7, "fd96::77:7"]
  selector: {app: b}
  ports: [{port: 80, targetPort: 8080}]
"#,
    );
    assert_eq!(s.services["mesh/web"].vips.len(), 2);
    let mut v6 = dsts(&go(&s, "[fd96::77:7]:80", &Fake::new()));
    v6.sort();
    // d has no IPv6 address: only b and c serve the IPv6 VIP.
    assert_eq!(v6, ["[fd00:1::3]:8080", "[fd00:2::2]:8080"]);
}

#[test]
fn named_target_ports_resolve_per_pod_and_skip_pods_without_the_name() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec: {clusterIP: 10.96.77.7, selector: {app: b}, ports: [{name: web, port: 80, targetPort: http}]}
"#,
    );
    let mut all = dsts(&go(&s, "10.96.77.7:80", &Fake::new()));
    all.sort();
    assert_eq!(
        all,
        ["10.0.1.3:9090", "10.0.2.2:8080"],
        "d has no port named http"
    );
}

#[test]
fn not_ready_and_deleted_pods_take_no_connections() {
    let s = state(&format!(
        r#"{ONE}
---
apiVersion: v1
kind: Pod
metadata: {{name: e, namespace: mesh, uid: ue, labels: {{app: b}}}}
spec: {{nodeName: node2, containers: []}}
status: {{podIP: 10.0.2.4, conditions: [{{type: Ready, status: "False"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: f, namespace: mesh, uid: uf, labels: {{app: b}}, deletionTimestamp: "2026-01-01T00:00:00Z"}}
spec: {{nodeName: node2, containers: []}}
status: {{podIP: 10.0.2.5}}
"#
    ));
    for _ in 0..20 {
        let d = dsts(&go(&s, "10.96.77.7:80", &Fake::new()));
        assert!(
            !d.iter()
                .any(|d| d.starts_with("10.0.2.4") || d.starts_with("10.0.2.5"))
        );
    }
}

#[test]
fn endpoints_outside_the_mesh_are_reached_directly() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: p, namespace: plain}
spec: {clusterIP: 10.96.9.9, selector: {app: p}, ports: [{port: 80, targetPort: 8080}]}
"#,
    );
    let r = go(&s, "10.96.9.9:80", &Fake::new());
    let Some(ServiceRoute::Endpoints { attempts, .. }) = r else {
        panic!()
    };
    assert_eq!(
        attempts[0].hop,
        Hop::Direct {
            dst: "10.0.2.9:8080".parse().unwrap()
        }
    );
}

#[test]
fn internal_traffic_policy_local_keeps_to_the_source_node() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec: {clusterIP: 10.96.77.7, selector: {app: b}, internalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080}]}
"#,
    );
    for _ in 0..10 {
        assert_eq!(
            dsts(&go(&s, "10.96.77.7:80", &Fake::new())),
            ["10.0.1.3:8080"]
        );
    }
    // A source the state does not know has no node: nothing is local to it.
    let r = route(
        &s,
        None,
        Some("10.0.9.9".parse().unwrap()),
        "10.96.77.7:80".parse().unwrap(),
        &Fake::new(),
    );
    assert!(is_uh(&r));
}

#[test]
fn client_ip_affinity_tries_the_sticky_endpoint_first() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 10.96.77.7
  selector: {app: b}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80, targetPort: 8080}]
"#,
    );
    assert_eq!(
        s.services["mesh/web"].affinity,
        Some(Duration::from_secs(60))
    );
    let mut b = Fake::new();
    b.sticky = Some("10.0.2.3".parse().unwrap());
    for _ in 0..10 {
        assert_eq!(dsts(&go(&s, "10.96.77.7:80", &b))[0], "10.0.2.3:8080");
    }
    // Without ClientIP affinity the same memory is not asked.
    let s = state(ONE);
    let firsts: BTreeSet<String> = (0..30)
        .map(|_| dsts(&go(&s, "10.96.77.7:80", &b))[0].clone())
        .collect();
    assert!(firsts.len() > 1, "{firsts:?}");
}

#[test]
fn two_choices_prefer_the_endpoint_with_fewer_connections_and_spread_evenly() {
    let s = state(ONE);
    let mut b = Fake::new();
    b.load.insert("10.0.1.3".parse().unwrap(), 50);
    b.load.insert("10.0.2.2".parse().unwrap(), 10);
    // Of any two, the busier loses: the busiest endpoint is never the first choice.
    for _ in 0..50 {
        assert_ne!(dsts(&go(&s, "10.96.77.7:80", &b))[0], "10.0.1.3:8080");
    }
    // Even load: each of three endpoints is first about a third of the time.
    let b = Fake::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..3000 {
        *counts
            .entry(dsts(&go(&s, "10.96.77.7:80", &b))[0].clone())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3);
    assert!(
        counts.values().all(|n| (800..1200).contains(n)),
        "{counts:?}"
    );
}

#[test]
fn attempts_are_distinct_and_at_most_three() {
    let s = state(&format!(
        r#"{ONE}
---
apiVersion: v1
kind: Pod
metadata: {{name: g, namespace: mesh, uid: ug, labels: {{app: b}}}}
spec: {{nodeName: node2, containers: []}}
status: {{podIP: 10.0.2.6}}
"#
    ));
    for _ in 0..20 {
        let d = dsts(&go(&s, "10.96.77.7:80", &Fake::new()));
        assert_eq!(d.len(), MAX_ATTEMPTS);
        assert_eq!(d.iter().collect::<BTreeSet<_>>().len(), MAX_ATTEMPTS);
    }
}

#[test]
fn a_vip_claimed_twice_goes_to_the_older_service() {
    let s = state(
        r#"
apiVersion: v1
kind: Service
metadata: {name: young, namespace: mesh, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {clusterIP: 10.96.77.7, selector: {app: p}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: mesh, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {clusterIP: 10.96.77.7, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
"#,
    );
    assert_eq!(
        s.service_by_vip("10.96.77.7".parse().unwrap())
            .unwrap()
            .name,
        "old"
    );
    assert!(s.services["mesh/young"].vips.is_empty());
    assert_eq!(
        *s.service_conflicts,
        [VipConflict {
            vip: "10.96.77.7".parse().unwrap(),
            kept_by: "mesh/old".into(),
            lost_by: "mesh/young".into(),
        }]
    );
}

#[test]
fn a_service_entry_that_loses_a_vip_gets_a_rejection_naming_the_field() {
    let out = build(
        &ResourceSet::from_yaml(&format!(
            r#"{BASE}---
apiVersion: v1
kind: Service
metadata: {{name: old, namespace: mesh, creationTimestamp: "2026-01-01T00:00:00Z"}}
spec: {{clusterIP: 240.0.0.7, selector: {{app: b}}, ports: [{{port: 80}}]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: young, namespace: mesh, creationTimestamp: "2026-02-01T00:00:00Z"}}
spec:
  hosts: [web.internal]
  addresses: [240.0.0.7, 240.0.0.9]
  ports: [{{number: 80, name: http, protocol: TCP}}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{app: b}}}}
"#
        ))
        .unwrap(),
        &MeshSettings::default(),
    );
    let [r] = out.rejections.as_slice() else {
        panic!("{:?}", out.rejections)
    };
    assert_eq!(
        (r.kind.as_str(), r.name.as_str(), r.field.as_str()),
        (
            "ServiceEntry.networking.istio.io",
            "young",
            "spec.addresses"
        )
    );
    assert!(r.message.contains("mesh/old"), "{}", r.message);
    // The entry keeps the VIP nobody else claims.
    assert_eq!(
        out.state.services["mesh/young"].vips,
        ["240.0.0.9".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn in_mesh_service_entries_route_like_services() {
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: selected, namespace: mesh}
spec:
  hosts: [web.internal]
  addresses: [240.0.0.7]
  ports: [{number: 80, name: http, protocol: TCP, targetPort: 8080}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: b}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: listed, namespace: mesh}
spec:
  hosts: [db.internal]
  addresses: [240.0.0.8]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.2.2, ports: {tcp: 15432}}, {address: 192.0.2.10}]
"#,
    );
    let r = go(&s, "240.0.0.7:80", &Fake::new());
    let Some(ServiceRoute::Endpoints { service, .. }) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(service.hostname, "web.internal");
    let mut d = dsts(&r);
    d.sort();
    assert_eq!(d, ["10.0.1.3:8080", "10.0.2.2:8080", "10.0.2.3:8080"]);
    let Some(ServiceRoute::Endpoints { attempts, .. }) = go(&s, "240.0.0.8:5432", &Fake::new())
    else {
        panic!()
    };
    let hops: BTreeSet<String> = attempts.iter().map(|a| format!("{:?}", a.hop)).collect();
    assert!(
        hops.iter()
            .any(|h| h.starts_with("Hbone") && h.contains("10.0.2.2:15432")),
        "{hops:?}"
    );
    assert!(
        hops.iter()
            .any(|h| h.starts_with("Direct") && h.contains("192.0.2.10:5432")),
        "{hops:?}"
    );
}

/// Builds with `slices` (v1beta1 YAML documents) next to the resources.
fn with_slices(extra: &str, slices: &str) -> MeshState {
    let resources = ResourceSet::from_yaml(&format!("{BASE}---\n{extra}")).unwrap();
    let slices: Vec<Slice> = serde_yaml::Deserializer::from_str(slices)
        .map(|d| {
            let s: EndpointSliceV1beta1 = serde::Deserialize::deserialize(d).unwrap();
            Slice::from_v1beta1(&s)
        })
        .collect();
    let mut base = build(&resources, &MeshSettings::default()).state;
    let index = super::build(
        &Inputs {
            services: &resources.services,
            slices: &slices,
            workloads: &base.workloads,
            by_ip: &base.by_ip,
            registry: &base.egress.registry,
            entry_created: &BTreeMap::new(),
        },
        &mut Rejections::default(),
    );
    base.services = index.services.into();
    base.services_by_vip = index.by_vip.into();
    base
}

#[test]
fn endpoint_slices_drive_services_without_selectors() {
    let s = with_slices(
        r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: mesh}
spec: {clusterIP: 10.96.5.5, ports: [{name: web, port: 80, targetPort: http}]}
"#,
        r#"
metadata: {name: ext-1, namespace: mesh, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: web, port: 7070}]
endpoints:
- addresses: [10.0.2.2]
  targetRef: {kind: Pod, namespace: mesh, name: b}
- addresses: [192.0.2.20]
  conditions: {ready: false}
"#,
    );
    let r = go(&s, "10.96.5.5:80", &Fake::new());
    let Some(ServiceRoute::Endpoints { attempts, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(attempts.len(), 1, "the not-ready endpoint is left out");
    assert_eq!(
        attempts[0].hop,
        Hop::Hbone {
            dst: "10.0.2.2:7070".parse().unwrap(),
            peer: "10.0.2.2:15008".parse().unwrap(),
            identity: Identity::new("cluster.local", "mesh", "b"),
        }
    );
}

#[test]
fn slices_replace_the_selector_and_terminating_endpoints_serve_only_as_a_last_resort() {
    let svc = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec: {clusterIP: 10.96.77.7, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
"#;
    let slice = |b_ready: bool| {
        format!(
            r#"
metadata: {{name: web-1, namespace: mesh, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: [10.0.2.2]
  conditions: {{ready: {b_ready}, serving: true, terminating: {}}}
- addresses: [10.0.2.3]
  conditions: {{ready: false, serving: true, terminating: true}}
"#,
            !b_ready
        )
    };
    let s = with_slices(svc, &slice(true));
    assert_eq!(
        dsts(&go(&s, "10.96.77.7:80", &Fake::new())),
        ["10.0.2.2:8080"]
    );
    let s = with_slices(svc, &slice(false));
    let mut d = dsts(&go(&s, "10.96.77.7:80", &Fake::new()));
    d.sort();
    assert_eq!(d, ["10.0.2.2:8080", "10.0.2.3:8080"]);
}
