//! The mesh model itself: what every consumer reads.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use super::{
    egress, ingress, policy,
    service::{self, Service},
    workload::{Namespace, Node, Workload, WorkloadUid},
};

/// Everything the data path knows about the mesh at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshState {
    pub trust_domain: String,
    pub root_namespace: String,
    pub namespaces: BTreeMap<String, Namespace>,
    pub workloads: BTreeMap<WorkloadUid, Workload>,
    /// Services (and in-mesh ServiceEntries) by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    /// VIP → `namespace/name` in `services`.
    #[serde(skip)]
    pub services_by_vip: BTreeMap<IpAddr, String>,
    /// VIPs two Services claimed; the older keeps each.
    pub service_conflicts: Vec<service::VipConflict>,
    pub nodes: BTreeMap<String, Node>,
    pub policy: policy::Policies,
    pub egress: egress::Egress,
    pub ingress: ingress::Ingress,
    /// Address → workload, for every workload IP.
    #[serde(skip)]
    pub by_ip: BTreeMap<IpAddr, WorkloadUid>,
}

impl MeshState {
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
