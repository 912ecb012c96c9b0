//! Who an enrolled pod is, as the proxy needs to know it for every connection: data and its
//! HBONE pool, no listeners (those are in [`super::pod`]).
use std::{
    io,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use sluice_common::PROXY_MARK;
use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};

use super::{
    ProxyInputs,
    hbone::{Dial, HbonePool, PoolKey},
};
use crate::resources::NamespacedName;
use crate::{
    netns::{HomeNetns, Netns},
    state::{MeshState, Workload, WorkloadUid},
};

/// Connections in flight that the proxy holds for one pod (outbound, inbound plaintext and
/// HBONE streams to it), counted against `spec.proxy.maxConnectionsPerPod` by
/// [`super::limits::ConnectionCaps`].
#[derive(Debug, Default)]
pub struct PodConnections(pub(crate) AtomicUsize);

impl PodConnections {
    /// How many are open now.
    pub fn current(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Who a pod is, as the proxy needs to know it for every connection.
pub struct PodContext {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub netns: Arc<Netns>,
    pub ips: Vec<IpAddr>,
    /// HBONE connections from this pod (dialled from its namespace, so they carry its address).
    pub pool: HbonePool,
    /// Connections the proxy holds for this pod now (`spec.proxy.maxConnectionsPerPod`).
    pub connections: PodConnections,
}

impl PodContext {
    /// A context for a pod, with its own HBONE pool (limits from `inputs.hbone`, counting into
    /// the node-wide pool metrics).
    pub fn new(
        uid: String,
        namespace: String,
        name: String,
        netns: Arc<Netns>,
        ips: Vec<IpAddr>,
        inputs: &ProxyInputs,
    ) -> Self {
        let dial = PodDial {
            netns: netns.clone(),
            home: inputs.home.clone(),
        };
        let tuning = &inputs.hbone;
        let pool = HbonePool::with_dialer(tuning.pool.clone(), tuning.h2.clone(), Arc::new(dial))
            .with_stats(inputs.metrics.hbone_pool_stats());
        Self {
            uid,
            namespace,
            name,
            netns,
            ips,
            pool,
            connections: PodConnections::default(),
        }
    }

    /// This pod's workload in `state`: by UID, else by namespace and name.
    pub fn workload<'s>(&self, state: &'s MeshState) -> Option<&'s Workload> {
        state
            .workloads
            .get(&WorkloadUid(self.uid.clone()))
            .or_else(|| state.workload_by_name(&self.namespace, &self.name))
    }

    /// `namespace/name`, for logs.
    pub fn display_name(&self) -> String {
        NamespacedName::new(&self.namespace, &self.name).key()
    }
}

impl std::fmt::Debug for PodContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodContext")
            .field("uid", &self.uid)
            .field("ips", &self.ips)
            .finish_non_exhaustive()
    }
}

/// Dials HBONE peers from inside a pod, with the proxy's mark (never captured).
struct PodDial {
    netns: Arc<Netns>,
    home: HomeNetns,
}

type DialFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<TcpStream>> + Send + 'a>>;

impl Dial for PodDial {
    fn dial<'a>(&'a self, key: &'a PoolKey) -> DialFuture<'a> {
        Box::pin(async move {
            let domain = if key.destination.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let socket = self.netns.tcp_socket(&self.home, domain, PROXY_MARK)?;
            let stream = TcpSocket::from_std_stream(socket.into())
                .connect(key.destination)
                .await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}
