//! The mesh model itself: what every consumer reads.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Serialize, Serializer};

use super::{
    egress, ingress, policy,
    service::{self, Service},
    workload::{Namespace, Node, Workload, WorkloadUid},
};

/// Everything the data path knows about the mesh at one moment.
///
/// Each part sits behind an `Arc`, so that a rebuild after a change shares the parts the change
/// did not touch with the previous snapshot ([`Incremental`](super::incremental::Incremental)).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshState {
    pub trust_domain: String,
    pub root_namespace: String,
    #[serde(serialize_with = "shared")]
    pub namespaces: Arc<BTreeMap<String, Namespace>>,
    #[serde(serialize_with = "shared")]
    pub workloads: Arc<BTreeMap<WorkloadUid, Workload>>,
    /// Services (and in-mesh ServiceEntries) by `namespace/name`.
    #[serde(serialize_with = "shared")]
    pub services: Arc<BTreeMap<String, Service>>,
    /// VIP → `namespace/name` in `services`.
    #[serde(skip)]
    pub services_by_vip: Arc<BTreeMap<IpAddr, String>>,
    /// VIPs two Services claimed; the older keeps each.
    #[serde(serialize_with = "shared")]
    pub service_conflicts: Arc<Vec<service::VipConflict>>,
    #[serde(serialize_with = "shared")]
    pub nodes: Arc<BTreeMap<String, Node>>,
    #[serde(serialize_with = "shared")]
    pub policy: Arc<policy::Policies>,
    #[serde(serialize_with = "shared")]
    pub egress: Arc<egress::Egress>,
    #[serde(serialize_with = "shared")]
    pub ingress: Arc<ingress::Ingress>,
    /// Address → workload, for every workload IP.
    #[serde(skip)]
    pub by_ip: Arc<BTreeMap<IpAddr, WorkloadUid>>,
}

/// Serializes a shared part as the part itself.
fn shared<T: Serialize, S: Serializer>(part: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    (**part).serialize(s)
}

/// Receives the serialized fields of a [`MeshState`] one at a time (`/config_dump` writes and
/// filters them so, without serializing the whole state at once).
pub trait SectionVisitor {
    type Error;
    fn section<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), Self::Error>;
}

impl MeshState {
    /// Hands every serialized field, under its serialized name, to `v`, in order.
    pub fn visit_sections<V: SectionVisitor>(&self, v: &mut V) -> Result<(), V::Error> {
        v.section("trust_domain", &self.trust_domain)?;
        v.section("root_namespace", &self.root_namespace)?;
        v.section("namespaces", &*self.namespaces)?;
        v.section("workloads", &*self.workloads)?;
        v.section("services", &*self.services)?;
        v.section("service_conflicts", &*self.service_conflicts)?;
        v.section("nodes", &*self.nodes)?;
        v.section("policy", &*self.policy)?;
        v.section("egress", &*self.egress)?;
        v.section("ingress", &*self.ingress)
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|uid| self.workloads.get(uid))
    }

    /// The workload named `namespace/name`.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .values()
            .find(|w| w.namespace == namespace && w.name == name)
    }
}

impl MeshState {
    /// The Service (or in-mesh ServiceEntry) that owns VIP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.services_by_vip
            .get(&ip)
            .and_then(|k| self.services.get(k))
    }
}

#[cfg(test)]
mod section_tests {
    use super::*;

    /// `visit_sections` hands over every field that serializes, so a dump written section by
    /// section is the whole state.
    #[test]
    fn sections_are_every_serialized_field() {
        struct Names(Vec<&'static str>);
        impl SectionVisitor for Names {
            type Error = std::convert::Infallible;
            fn section<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                _: &T,
            ) -> Result<(), Self::Error> {
                self.0.push(name);
                Ok(())
            }
        }
        let mut names = Names(Vec::new());
        let Ok(()) = MeshState::default().visit_sections(&mut names);
        let whole = serde_json::to_value(MeshState::default()).unwrap();
        let fields: Vec<&str> = whole
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut visited = names.0.clone();
        visited.sort_unstable();
        let mut fields = fields.clone();
        fields.sort_unstable();
        assert_eq!(visited, fields);
    }
}
