//! The status writer: conditions back to the cluster, by server-side apply with field manager
//! [`FIELD_MANAGER`], from the one agent that holds the status Lease.
//!
//! * Istio kinds (networking and security): a condition of type [`ISTIO_CONDITION`] in
//!   `status.conditions`, shaped like the conditions istiod writes for ambient mode
//!   (`ZtunnelAccepted`, `WaypointAccepted`): `True`/`Accepted`, or `False`/`Invalid` with the
//!   offending field in the message; `observedGeneration` as Istio writes it (a string). Istio's
//!   status schema keeps unknown fields, so lists there are atomic: the writer re-applies the other
//!   conditions it sees unchanged.
//! * Gateway API Gateways of Sluice's class and the HTTPRoutes attached to them: see
//!   [`gateway_status`](super::gateway_status).
//! * StaticGatewayConfiguration: its schema has no conditions; [`set_egress_ip_prefix`] writes the
//!   `egressIpPrefix` the egress manager programs. Rejections of SGCs are logged only.
//!
//! The writer compares what it wants with what the reflector stores show and writes only the
//! difference, so a steady cluster costs no writes; it also remembers what it last wrote, so a
//! store that has not yet seen its own write does not cause a second one.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    gateway_status::{self, CONTROLLER_NAME, same_conditions},
    watch::Stores,
};
use crate::{
    resources::{
        NamespacedName, gateway_api,
        kinds::{self, KindVisitor, StatusWrite, WatchedKind, watched},
        static_egress,
    },
    state::{Rejection, StateHandle},
};

/// The field manager of every write Sluice makes.
pub const FIELD_MANAGER: &str = "sluice";

/// One rebuild's outcome, for the status writer.
#[derive(Clone, Debug, Default)]
pub struct Rebuilt {
    /// Counts rebuilds; 0 until the first.
    pub generation: u64,
    pub rejections: Vec<Rejection>,
    /// Kinds (`Kind.group`) that could not be listed when the source first synced: CRD not
    /// installed, or forbidden.
    pub absent: Vec<String>,
    /// Security kinds (`Kind.group`) that RBAC forbids listing now: their policies are
    /// unknown, and the agent is not ready while any is.
    pub forbidden: Vec<String>,
}

/// Condition type Sluice writes on Istio resources (after istiod's `<Component>Accepted`).
pub const ISTIO_CONDITION: &str = "SluiceAccepted";

/// How often the writer re-checks everything even without changes (repairs writes that failed).
const RESYNC: Duration = Duration::from_secs(60);

/// The writer's inputs.
pub struct StatusWriter {
    pub client: Client,
    pub stores: Stores,
    pub state: StateHandle,
    pub rebuilt: watch::Receiver<Arc<Rebuilt>>,
    /// GatewayClass whose Gateways Sluice reports on.
    pub gateway_class: String,
    /// What was last applied per object (kind index, namespace, name) → fingerprint.
    applied: HashMap<(usize, String, String), String>,
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn rejection_for<'a>(
    rejections: &'a [Rejection],
    kind: usize,
    namespace: &str,
    name: &str,
) -> Option<&'a Rejection> {
    let qualified = watched()[kind].qualified();
    rejections.iter().find(|r| {
        r.kind == qualified && r.namespace.as_deref() == Some(namespace) && r.name == name
    })
}

/// The Istio-style condition Sluice wants on an object of `generation`.
pub fn istio_condition(
    rejection: Option<&Rejection>,
    generation: Option<i64>,
    now: Timestamp,
) -> Value {
    let (status, reason, message) = match rejection {
        None => ("True", "Accepted", "accepted by Sluice".to_owned()),
        Some(r) => ("False", "Invalid", format!("{}: {}", r.field, r.message)),
    };
    json!({
        "type": ISTIO_CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0).to_string(),
        "lastTransitionTime": now.to_string(),
    })
}

/// The parts of a condition that matter (not its time).
fn fingerprint(v: &Value) -> String {
    let mut v = v.clone();
    strip_times(&mut v);
    v.to_string()
}

fn strip_times(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("lastTransitionTime");
            map.remove("lastProbeTime");
            for (_, x) in map.iter_mut() {
                strip_times(x);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_times),
        _ => {}
    }
}

impl StatusWriter {
    /// A writer over `stores`; call [`run`](Self::run).
    pub fn new(
        client: Client,
        stores: Stores,
        state: StateHandle,
        rebuilt: watch::Receiver<Arc<Rebuilt>>,
        gateway_class: String,
    ) -> Self {
        Self {
            client,
            stores,
            state,
            rebuilt,
            gateway_class,
            applied: HashMap::new(),
        }
    }

    /// Writes status whenever `leader` says this agent holds the lease; runs forever.
    pub async fn run(mut self, mut leader: watch::Receiver<bool>) {
        loop {
            if leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            // A new term: trust nothing remembered from the last one.
            self.applied.clear();
            loop {
                self.reconcile().await;
                tokio::select! {
                    r = self.rebuilt.changed() => if r.is_err() { return },
                    r = leader.changed() => {
                        if r.is_err() { return }
                        if !*leader.borrow() { break }
                    }
                    _ = tokio::time::sleep(RESYNC) => { self.applied.clear(); }
                }
            }
        }
    }

    /// Brings every status Sluice owns in line with the current rebuild.
    pub async fn reconcile(&mut self) {
        let rebuilt = self.rebuilt.borrow_and_update().clone();
        if rebuilt.generation == 0 {
            return;
        }
        let now = Timestamp::now();
        let stores = self.stores.clone();
        let r = &rebuilt.rejections;
        // Istio kinds, in registry order: decide first, then write.
        let mut istio = IstioConditions {
            stores: &stores,
            rejections: r,
            now,
            patches: Vec::new(),
        };
        kinds::for_each_kind(&mut istio);
        for p in istio.patches {
            self.apply(p).await;
        }
        self.gateway_api(&stores, r, now).await;
    }

    async fn apply(&mut self, p: StatusPatch) {
        let key = (p.kind, p.namespace.clone(), p.name.clone());
        if self.applied.get(&key) == Some(&p.print) {
            return;
        }
        let k = &watched()[p.kind];
        let body = json!({
            "apiVersion": k.api_version(),
            "kind": k.kind,
            "metadata": {"name": p.name, "namespace": p.namespace},
            "status": p.status,
        });
        let (namespace, name) = (p.namespace.as_str(), p.name.as_str());
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &p.resource);
        match api
            .patch_status(name, &apply_params(), &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                debug!(kind = %k.qualified(), %namespace, %name, "status written");
                self.applied.insert(key, p.print);
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                warn!(kind = %k.qualified(), %namespace, %name, error = %e, "writing status failed; will retry");
            }
        }
    }

    async fn gateway_api(&mut self, stores: &Stores, rejections: &[Rejection], now: Timestamp) {
        let state = self.state.current();
        let gateways: Vec<Arc<gateway_api::Gateway>> = stores.get::<gateway_api::Gateway>().state();
        let routes: Vec<gateway_api::HTTPRoute> = stores
            .get::<gateway_api::HTTPRoute>()
            .state()
            .iter()
            .map(|r| (**r).clone())
            .collect();
        let by_key: BTreeMap<String, &gateway_api::Gateway> = gateways
            .iter()
            .filter_map(|g| {
                Some((
                    NamespacedName::new(
                        g.metadata.namespace.as_deref()?,
                        g.metadata.name.as_deref()?,
                    )
                    .key(),
                    g.as_ref(),
                ))
            })
            .collect();
        let route_rejections: Vec<&Rejection> = rejections
            .iter()
            .filter(|r| r.kind == gateway_api::HTTPRoute::qualified())
            .collect();
        for (key, gw) in &by_key {
            if gw.spec.gateway_class_name != self.gateway_class {
                continue;
            }
            let Some(NamespacedName { namespace, name }) = NamespacedName::parse(key) else {
                continue;
            };
            let rejection = rejection_for(rejections, gateway_api::Gateway::INDEX, namespace, name);
            let normalised = state.ingress.gateways.get(key.as_str());
            let attached = normalised
                .map(|g| gateway_status::attached_routes(g, &route_rejections))
                .unwrap_or_default();
            let want = gateway_status::gateway_status(
                gw,
                &state.ingress.reference_grants,
                rejection,
                normalised,
                &attached,
                now,
            );
            let have = gw.status.clone().unwrap_or_default();
            let same = same_conditions(&want.conditions, &have.conditions)
                && want.addresses == have.addresses
                && want.listeners.len() == have.listeners.len()
                && want.listeners.iter().all(|w| {
                    have.listeners.iter().any(|h| {
                        h.name == w.name
                            && h.attached_routes == w.attached_routes
                            && h.supported_kinds == w.supported_kinds
                            && same_conditions(&h.conditions, &w.conditions)
                    })
                });
            if same {
                continue;
            }
            let value = serde_json::to_value(&want).unwrap_or(Value::Null);
            let print = fingerprint(&value);
            self.apply(StatusPatch::new::<gateway_api::Gateway>(
                namespace, name, value, print,
            ))
            .await;
        }
        for route in &routes {
            let (Some(namespace), Some(name)) = (
                route.metadata.namespace.as_deref(),
                route.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let rejection =
                rejection_for(rejections, gateway_api::HTTPRoute::INDEX, namespace, name);
            let want = gateway_status::route_status(
                route,
                rejection,
                &by_key,
                &self.gateway_class,
                &state,
                now,
            );
            let have = route.status.clone().unwrap_or_default().parents;
            let ours = |p: &&gateway_api::RouteParentStatus| p.controller_name == CONTROLLER_NAME;
            let want_ours: Vec<_> = want.iter().filter(ours).collect();
            let have_ours: Vec<_> = have.iter().filter(ours).collect();
            let same = want_ours.len() == have_ours.len()
                && want_ours.iter().all(|w| {
                    have_ours.iter().any(|h| {
                        h.parent_ref == w.parent_ref
                            && same_conditions(&h.conditions, &w.conditions)
                    })
                });
            if same {
                continue;
            }
            let value = json!({"parents": want});
            let print = fingerprint(&value);
            self.apply(StatusPatch::new::<gateway_api::HTTPRoute>(
                namespace, name, value, print,
            ))
            .await;
        }
    }
}

/// One status to apply: kind, object, the status and its fingerprint.
struct StatusPatch {
    kind: usize,
    resource: ApiResource,
    namespace: String,
    name: String,
    status: Value,
    print: String,
}

impl StatusPatch {
    fn new<K: WatchedKind>(namespace: &str, name: &str, status: Value, print: String) -> Self {
        Self {
            kind: K::INDEX,
            resource: ApiResource::erase::<K>(&()),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            status,
            print,
        }
    }
}

/// The `SluiceAccepted` conditions every Istio-condition kind wants, as patches.
struct IstioConditions<'a> {
    stores: &'a Stores,
    rejections: &'a [Rejection],
    now: Timestamp,
    patches: Vec<StatusPatch>,
}

impl KindVisitor for IstioConditions<'_> {
    fn visit<K: WatchedKind>(&mut self) {
        if K::STATUS != StatusWrite::IstioCondition {
            return;
        }
        for obj in self.stores.get::<K>().state() {
            let meta = obj.meta();
            let (Some(namespace), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else {
                continue;
            };
            let rejection = rejection_for(self.rejections, K::INDEX, &namespace, &name);
            let want = istio_condition(rejection, meta.generation, self.now);
            let current = serde_json::to_value(&*obj).unwrap_or(Value::Null);
            let conditions: Vec<Value> = current
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ours = conditions
                .iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(ISTIO_CONDITION));
            if ours.is_some_and(|c| fingerprint(c) == fingerprint(&want)) {
                continue;
            }
            // Keep the transition time when only the generation moved.
            let mut want = want;
            if let Some(old) = ours
                && old.get("status") == want.get("status")
                && let Some(t) = old.get("lastTransitionTime")
            {
                want["lastTransitionTime"] = t.clone();
            }
            let print = fingerprint(&want);
            let mut list: Vec<Value> = conditions
                .into_iter()
                .filter(|c| c.get("type").and_then(Value::as_str) != Some(ISTIO_CONDITION))
                .collect();
            list.push(want);
            if let Some(r) = rejection {
                info!(rejection = %r, "reporting the rejection in status.conditions");
            }
            self.patches.push(StatusPatch::new::<K>(
                &namespace,
                &name,
                json!({"conditions": list}),
                print,
            ));
        }
    }
}

/// Writes `status.egressIpPrefix` of the StaticGatewayConfiguration `namespace/name` (server-side
/// apply, field manager `sluice`), for the egress manager once it has programmed the prefix.
pub async fn set_egress_ip_prefix(
    client: &Client,
    namespace: &str,
    name: &str,
    prefix: ipnet::IpNet,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": static_egress::API_VERSION,
        "kind": static_egress::StaticGatewayConfiguration::kind(&()),
        "metadata": {"name": name, "namespace": namespace},
        "status": {"egressIpPrefix": prefix.to_string()},
    });
    let api: Api<static_egress::StaticGatewayConfiguration> =
        Api::namespaced(client.clone(), namespace);
    api.patch_status(name, &apply_params(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_conditions_name_the_field_and_generation() {
        let r = Rejection {
            kind: "PeerAuthentication.security.istio.io".into(),
            namespace: Some("a".into()),
            name: "p".into(),
            field: "spec.mtls.mode".into(),
            message: "\"SOMETIMES\" is not a mode".into(),
        };
        let now = Timestamp::now();
        let bad = istio_condition(Some(&r), Some(4), now);
        assert_eq!(bad["status"], "False");
        assert_eq!(bad["reason"], "Invalid");
        assert_eq!(bad["observedGeneration"], "4");
        assert!(
            bad["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("spec.mtls.mode: ")
        );
        let good = istio_condition(None, Some(4), now);
        assert_eq!(
            (good["status"].as_str(), good["type"].as_str()),
            (Some("True"), Some(ISTIO_CONDITION))
        );
        let later = istio_condition(None, Some(4), Timestamp::now());
        assert_eq!(
            fingerprint(&good),
            fingerprint(&later),
            "times do not count"
        );
        assert_ne!(fingerprint(&good), fingerprint(&bad));
    }

    #[test]
    fn rejections_are_found_by_qualified_kind() {
        use crate::resources::istio_networking;
        let r = Rejection {
            kind: "Gateway.networking.istio.io".into(),
            namespace: Some("a".into()),
            name: "g".into(),
            field: "f".into(),
            message: "m".into(),
        };
        let list = [r];
        assert!(rejection_for(&list, istio_networking::Gateway::INDEX, "a", "g").is_some());
        assert!(
            rejection_for(&list, gateway_api::Gateway::INDEX, "a", "g").is_none(),
            "Gateway API is another kind"
        );
    }
}
