//! The agent's own configuration: the `AgentConfig` document of the config file, read and
//! checked once at startup. A leaf: it imports nothing else of the crate, and every room reads
//! its settings (and their defaults) from here.
mod hbone;
mod identity;
mod ingress;
mod kube;
mod proxy;
mod tls;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use hbone::{
    FRAME_SIZE_RANGE, H2Limits, HboneLimits, Keepalive, MAX_WINDOW, MIN_CONNECTION_WINDOW,
    PoolLimits, ServerLimits,
};
pub use identity::{CertTtl, IdentityConfig, IdentityConfigError, ca_host_port};
pub use ingress::{CertificateFiles, IngressConfig};
pub use kube::KubeConfig;
pub use proxy::{DEFAULT_MAX_CONNECTIONS_PER_NODE, DEFAULT_MAX_CONNECTIONS_PER_POD, ProxyConfig};
pub use tls::{KeyExchange, TlsConfig};

/// Default bound on the bytes the proxy peeks for a host name (a ClientHello with large key
/// shares fits easily).
pub const DEFAULT_PEEK_BYTES: usize = 8192;
/// Default bound on the time it waits for them.
pub const DEFAULT_PEEK_TIMEOUT: Duration = Duration::from_millis(1000);

/// Level of the eBPF programs' own log lines (forwarded through aya-log).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfLogLevel {
    Off,
    Error,
    #[default]
    Warn,
    Info,
    Debug,
    Trace,
}

impl EbpfLogLevel {
    /// The number the programs compare against (`sluice_common::log_level`).
    pub fn as_u32(self) -> u32 {
        use sluice_common::log_level::*;
        match self {
            Self::Off => OFF,
            Self::Error => ERROR,
            Self::Warn => WARN,
            Self::Info => INFO,
            Self::Debug => DEBUG,
            Self::Trace => TRACE,
        }
    }
}

/// Which traffic is never captured.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureConfig {
    /// Ports captured in neither direction.
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    /// Destination ports never captured on the way out.
    #[serde(default)]
    pub excluded_outbound_ports: Vec<u16>,
    /// Pod ports never steered on the way in.
    #[serde(default)]
    pub excluded_inbound_ports: Vec<u16>,
    /// Destination networks never captured on the way out.
    #[serde(default)]
    pub excluded_cidrs: Vec<IpNet>,
    /// Plaintext from the node's own addresses (kubelet probes) reaches pods whatever their
    /// PeerAuthentication and AuthorizationPolicy say, as in Istio's ambient mode.
    #[serde(default = "defaults::yes")]
    pub node_traffic_bypasses_policy: bool,
}

/// `kind: AgentConfig` (`apiVersion: sluice.dev/v1alpha1`), under `spec`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of the node this agent serves (`--node` or `NODE_NAME` override it).
    #[serde(default)]
    pub node_name: String,
    #[serde(default = "defaults::trust_domain")]
    pub trust_domain: String,
    #[serde(default = "defaults::root_namespace")]
    pub root_namespace: String,
    #[serde(default)]
    pub capture: CaptureConfig,
    /// The built-in CA's root and workload certificate lifetime.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// cgroup v2 directory above every pod's cgroup; the capture programs attach here once.
    #[serde(default = "defaults::cgroup_root")]
    pub cgroup_root: PathBuf,
    /// bpffs directory for Sluice's pinned maps, programs and links.
    #[serde(default = "defaults::bpf_pin_path")]
    pub bpf_pin_path: PathBuf,
    /// Directory for enrollment records, which survive agent restarts.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// Unix socket of the enrollment API (CNI plugin and tests).
    #[serde(default = "defaults::enrollment_socket")]
    pub enrollment_socket: PathBuf,
    #[serde(default)]
    pub ebpf_log_level: EbpfLogLevel,
    /// Admin endpoint (`/config_dump`); loopback only.
    #[serde(default = "defaults::admin_addr")]
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics`.
    #[serde(default = "defaults::metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`.
    #[serde(default = "defaults::readiness_addr")]
    pub readiness_addr: SocketAddr,
    /// The mesh config ConfigMap (Istio's `istio` in the root namespace when unset; the AKS
    /// add-on's is `istio-shared-configmap-<revision>` in `aks-istio-system`).
    #[serde(default)]
    pub mesh_config: Option<ConfigMapRef>,
    #[serde(default)]
    pub egress: EgressConfig,
    /// HBONE connection pool and HTTP/2 limits, checked when read.
    #[serde(default)]
    pub hbone: HboneLimits,
    /// Caps on the connections the node proxy holds at once.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Reading the mesh from a Kubernetes API server.
    #[serde(default)]
    pub kube: KubeConfig,
    /// Key exchange of the mesh-facing TLS (`keyExchange: default | pqc`).
    #[serde(default)]
    pub tls: TlsConfig,
    /// What a `sluice gateway` instance serves (read by that command only).
    #[serde(default)]
    pub ingress: IngressConfig,
    /// Handing the listeners over to a successor, and draining after it.
    #[serde(default)]
    pub upgrade: UpgradeConfig,
}

/// How an agent hands over to its successor on the same node (`spec.upgrade`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpgradeConfig {
    /// Unix socket where this agent hands its listeners to a successor, and where a starting
    /// agent asks its predecessor for them; `<stateDir>/handover.sock` when unset.
    #[serde(default)]
    pub handover_socket: Option<PathBuf>,
    /// After handing over, how long connections in flight may go on before the agent exits
    /// anyway (seconds).
    #[serde(default = "defaults::drain_deadline_seconds")]
    pub drain_deadline_seconds: u64,
}

/// Bounds of `spec.upgrade.drainDeadlineSeconds`.
pub const DRAIN_DEADLINE_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;

impl Default for UpgradeConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl UpgradeConfig {
    /// The handover socket, under `state_dir` unless set.
    pub fn socket(&self, state_dir: &Path) -> PathBuf {
        self.handover_socket
            .clone()
            .unwrap_or_else(|| state_dir.join("handover.sock"))
    }

    /// The drain deadline.
    pub fn drain_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.drain_deadline_seconds)
    }
}

/// Names a ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
}

/// Egress settings of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressConfig {
    /// Egress prefix per StaticGatewayConfiguration (`namespace/name` → CIDR), for SGCs whose
    /// `status.egressIpPrefix` no cloud controller fills.
    #[serde(default)]
    pub static_gateway_prefixes: BTreeMap<String, IpNet>,
    /// DNS server for `resolution: DNS` ServiceEntries and gateway upstreams (`ip:port`); the
    /// first `nameserver` of `/etc/resolv.conf` when unset.
    #[serde(default)]
    pub dns_server: Option<SocketAddr>,
    /// How many of a client's first bytes the proxy peeks for an HTTP `Host` or TLS SNI.
    #[serde(default = "defaults::peek_bytes")]
    pub peek_bytes: usize,
    /// How long it waits for them.
    #[serde(default = "defaults::peek_timeout_ms")]
    pub peek_timeout_ms: u64,
    /// The service account egress gateways present (in `gatewayNamespace`): pods' proxies
    /// require it of the gateway, and a gateway-role agent serves with it.
    #[serde(default = "defaults::gateway_service_account")]
    pub gateway_service_account: String,
    /// Namespace of that service account; the root namespace when unset.
    #[serde(default)]
    pub gateway_namespace: Option<String>,
    /// Gateway role: when set, this agent accepts HBONE from pods on its node address and
    /// forwards what the egress decision routes to a gateway this node hosts.
    #[serde(default)]
    pub gateway: Option<GatewayRoleConfig>,
    /// Static prefix pinning on this node.
    #[serde(default)]
    pub pinning: PinningSettings,
}

/// Gateway role of an agent.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRoleConfig {
    /// Where to accept HBONE (the node's address, port 15008).
    #[serde(default = "defaults::gateway_listen")]
    pub listen: SocketAddr,
    /// CA certificates (PEM) to verify upstreams with when TLS-originating and the
    /// DestinationRule names none; the system roots when unset.
    #[serde(default)]
    pub upstream_ca_file: Option<PathBuf>,
}

/// How this node programs static egress prefixes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PinningSettings {
    /// Program the prefixes of StaticGatewayConfigurations placed on this node.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// The uplink interface; the interface of the main table's default route when unset.
    #[serde(default)]
    pub uplink_interface: Option<String>,
    /// The uplink's IPv4 next hop; the main table's default gateway when unset.
    #[serde(default)]
    pub uplink_gateway_v4: Option<std::net::Ipv4Addr>,
    /// The uplink's IPv6 next hop.
    #[serde(default)]
    pub uplink_gateway_v6: Option<std::net::Ipv6Addr>,
}

impl Default for PinningSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            uplink_interface: None,
            uplink_gateway_v4: None,
            uplink_gateway_v6: None,
        }
    }
}

impl Default for CaptureConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl Default for EgressConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

mod defaults {
    use std::{net::SocketAddr, path::PathBuf};

    pub fn peek_bytes() -> usize {
        super::DEFAULT_PEEK_BYTES
    }
    pub fn peek_timeout_ms() -> u64 {
        super::DEFAULT_PEEK_TIMEOUT.as_millis() as u64
    }
    pub fn gateway_service_account() -> String {
        "sluice-egress-gateway".into()
    }
    pub fn gateway_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15008))
    }
    pub fn yes() -> bool {
        true
    }
    pub fn drain_deadline_seconds() -> u64 {
        30
    }

    pub fn trust_domain() -> String {
        "cluster.local".into()
    }
    pub fn root_namespace() -> String {
        "istio-system".into()
    }
    pub fn cgroup_root() -> PathBuf {
        "/sys/fs/cgroup".into()
    }
    pub fn bpf_pin_path() -> PathBuf {
        "/sys/fs/bpf/sluice".into()
    }
    pub fn state_dir() -> PathBuf {
        "/var/run/sluice".into()
    }
    pub fn enrollment_socket() -> PathBuf {
        "/var/run/sluice/enroll.sock".into()
    }
    pub fn admin_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15000))
    }
    pub fn metrics_addr() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15020))
    }
    pub fn readiness_addr() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15021))
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        // An empty mapping takes every serde default.
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

/// Why a configuration is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("spec.nodeName: missing (set it in the file, with --node, or with NODE_NAME)")]
    NoNodeName,
    #[error(
        "spec.identity.caAddress: required when spec.kube.enabled: agents on different nodes \
         must share the mesh root, so a CA service signs (`sluice ca`, deploy/05-ca.yaml, or \
         istiod); or, without a CA service, spec.identity.rootCertFile and rootKeyFile"
    )]
    KubeWithoutRoot,
    #[error(transparent)]
    Identity(#[from] IdentityConfigError),
    #[error("spec.capture.{field}: port 0 is not a port")]
    ZeroPort { field: &'static str },
    #[error("spec.egress.staticGatewayPrefixes: {key:?} is not namespace/name")]
    StaticGatewayKey { key: String },
    #[error(
        "spec.egress.staticGatewayPrefixes[{key}]: {prefix} has host bits set; did you mean {network}?"
    )]
    StaticGatewayPrefix {
        key: String,
        prefix: IpNet,
        network: IpNet,
    },
    #[error(
        "spec.capture.excludedCidrs[{index}]: {cidr} has host bits set; did you mean {network}?"
    )]
    HostBits {
        index: usize,
        cidr: IpNet,
        network: IpNet,
    },
    #[error("spec.upgrade.drainDeadlineSeconds: {0} is outside 1 ..= 3600")]
    DrainDeadline(u64),
    #[error("spec.hbone.{field}: {value} is outside {min} ..= {max}")]
    HboneRange {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

/// Settings that shape how resources become state (not resources themselves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshSettings {
    /// SPIFFE trust domain of this mesh.
    pub trust_domain: String,
    /// Istio's root namespace: mesh-wide policies live there.
    pub root_namespace: String,
    /// Namespace and name of the mesh config ConfigMap (`outboundTrafficPolicy`); Istio's
    /// default (`istio` in the root namespace) when unset.
    pub mesh_config: Option<(String, String)>,
    /// Egress prefixes for StaticGatewayConfigurations (`namespace/name` → prefix), used when
    /// an SGC's `status.egressIpPrefix` is empty.
    pub static_gateway_prefixes: BTreeMap<String, IpNet>,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            mesh_config: None,
            static_gateway_prefixes: BTreeMap::new(),
        }
    }
}

impl AgentConfig {
    /// Checks what serde cannot (`spec.hbone` is checked as it is read).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::NoNodeName);
        }
        // A throw-away root per node would make every cross-node connection fail its handshake.
        if self.kube.enabled
            && self.identity.root_cert_file.is_none()
            && self.identity.ca_address.is_none()
        {
            return Err(ConfigError::KubeWithoutRoot);
        }
        self.identity.validate()?;
        for (field, ports) in [
            ("excludedPorts", &self.capture.excluded_ports),
            (
                "excludedOutboundPorts",
                &self.capture.excluded_outbound_ports,
            ),
            ("excludedInboundPorts", &self.capture.excluded_inbound_ports),
        ] {
            if ports.contains(&0) {
                return Err(ConfigError::ZeroPort { field });
            }
        }
        for (key, prefix) in &self.egress.static_gateway_prefixes {
            let valid_key = key.split_once('/').is_some_and(|(ns, name)| {
                !ns.is_empty() && !name.is_empty() && !name.contains('/')
            });
            if !valid_key {
                return Err(ConfigError::StaticGatewayKey { key: key.clone() });
            }
            if prefix.trunc() != *prefix {
                return Err(ConfigError::StaticGatewayPrefix {
                    key: key.clone(),
                    prefix: *prefix,
                    network: prefix.trunc(),
                });
            }
        }
        if !DRAIN_DEADLINE_RANGE.contains(&self.upgrade.drain_deadline_seconds) {
            return Err(ConfigError::DrainDeadline(
                self.upgrade.drain_deadline_seconds,
            ));
        }
        for (index, cidr) in self.capture.excluded_cidrs.iter().enumerate() {
            if cidr.trunc() != *cidr {
                return Err(ConfigError::HostBits {
                    index,
                    cidr: *cidr,
                    network: cidr.trunc(),
                });
            }
        }
        Ok(())
    }

    /// The settings that shape MeshState.
    pub fn mesh_settings(&self) -> MeshSettings {
        MeshSettings {
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
            mesh_config: self
                .mesh_config
                .as_ref()
                .map(|c| (c.namespace.clone(), c.name.clone())),
            static_gateway_prefixes: self.egress.static_gateway_prefixes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_mode_needs_a_shared_root() {
        let mut c: AgentConfig =
            serde_yaml::from_str("nodeName: n1\nkube: {enabled: true}").unwrap();
        assert_eq!(c.validate(), Err(ConfigError::KubeWithoutRoot));
        c.identity.root_cert_file = Some("/etc/sluice/ca/root-cert.pem".into());
        c.identity.root_key_file = Some("/etc/sluice/ca/root-key.pem".into());
        assert_eq!(c.validate(), Ok(()));
        // Or a CA service, whose root alone is on the node.
        c.identity.root_cert_file = None;
        c.identity.ca_address = Some("https://sluice-ca.sluice-system.svc:15012".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::Identity(IdentityConfigError::NoCaRoot))
        );
        c.identity.ca_root_file = Some("/etc/sluice/ca/root-cert.pem".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::Identity(IdentityConfigError::KeyWithRemoteCa))
        );
        c.identity.root_key_file = None;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let c = AgentConfig::default();
        assert_eq!(c.bpf_pin_path, PathBuf::from("/sys/fs/bpf/sluice"));
        assert_eq!(c.ebpf_log_level, EbpfLogLevel::Warn);
        assert!(c.capture.node_traffic_bypasses_policy);
        assert_eq!(c.validate(), Err(ConfigError::NoNodeName));
    }

    #[test]
    fn the_upgrade_drain_deadline_defaults_to_30_s_and_is_bounded() {
        let c: AgentConfig = serde_yaml::from_str("nodeName: n\nstateDir: /run/x").unwrap();
        assert_eq!(
            c.upgrade.drain_deadline(),
            std::time::Duration::from_secs(30)
        );
        assert_eq!(
            c.upgrade.socket(&c.state_dir),
            PathBuf::from("/run/x/handover.sock")
        );
        for (seconds, ok) in [(0, false), (1, true), (3600, true), (3601, false)] {
            let c: AgentConfig = serde_yaml::from_str(&format!(
                "nodeName: n\nupgrade: {{drainDeadlineSeconds: {seconds}}}"
            ))
            .unwrap();
            let want = if ok {
                Ok(())
            } else {
                Err(ConfigError::DrainDeadline(seconds))
            };
            assert_eq!(c.validate(), want, "{seconds}");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = serde_yaml::from_str::<AgentConfig>("nodeName: n\ncaptur: {}").unwrap_err();
        assert!(err.to_string().contains("captur"), "{err}");
    }

    #[test]
    fn egress_settings_reach_mesh_settings() {
        let c: AgentConfig = serde_yaml::from_str(
            "nodeName: n\nmeshConfig: {namespace: aks-istio-system, name: istio-shared-configmap-asm-1-24}\negress: {staticGatewayPrefixes: {apps/sgc: 203.0.113.0/28}}",
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        let s = c.mesh_settings();
        assert_eq!(
            s.mesh_config,
            Some((
                "aks-istio-system".to_owned(),
                "istio-shared-configmap-asm-1-24".to_owned()
            ))
        );
        assert_eq!(
            s.static_gateway_prefixes["apps/sgc"],
            "203.0.113.0/28".parse::<IpNet>().unwrap()
        );
        let bad: AgentConfig = serde_yaml::from_str(
            "nodeName: n\negress: {staticGatewayPrefixes: {apps/sgc: 203.0.113.1/28}}",
        )
        .unwrap();
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::StaticGatewayPrefix { .. })
        ));
        let bad_key: AgentConfig = serde_yaml::from_str(
            "nodeName: n\negress: {staticGatewayPrefixes: {sgc: 203.0.113.0/28}}",
        )
        .unwrap();
        assert!(matches!(
            bad_key.validate(),
            Err(ConfigError::StaticGatewayKey { .. })
        ));
    }

    #[test]
    fn hbone_limits_are_configurable_and_checked() {
        let d = AgentConfig::default();
        assert_eq!(d.hbone.pool, PoolLimits::default());
        assert_eq!(d.hbone.h2, H2Limits::default());
        let c: AgentConfig = serde_yaml::from_str(
            "nodeName: n\nhbone: {maxStreamsPerConnection: 8, maxConnectionsPerPeer: 2, \
             idleTimeoutSeconds: 30, connectTimeoutSeconds: 2, maxConnectionAgeSeconds: 600, \
             maxConcurrentStreams: 50, streamWindowBytes: 1048576, maxFrameBytes: 32768, \
             keepaliveIntervalSeconds: 0, windowBudgetBytes: 33554432}",
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        let pool = &c.hbone.pool;
        assert_eq!(pool.max_streams_per_conn.get(), 8);
        assert_eq!(pool.max_conns_per_key.get(), 2);
        assert_eq!(pool.idle_timeout, Duration::from_secs(30));
        assert_eq!(pool.connect_timeout, Duration::from_secs(2));
        assert_eq!(pool.max_connection_age, Some(Duration::from_secs(600)));
        let h2 = &c.hbone.h2;
        assert_eq!(h2.max_concurrent_streams, 50);
        assert_eq!(h2.stream_window, 1 << 20);
        assert_eq!(h2.max_frame_size, 32 * 1024);
        assert_eq!(h2.keepalive, None);
        assert_eq!(c.hbone.server.window_budget, 32 << 20);
        // What was read is what the config dump writes back.
        let written = serde_yaml::to_string(&c.hbone).unwrap();
        assert_eq!(
            serde_yaml::from_str::<HboneLimits>(&written).unwrap(),
            c.hbone
        );
        assert!(written.contains("maxFrameBytes: 32768"), "{written}");

        // Zero where it would stall traffic: refused by the type, naming the field.
        let err =
            serde_yaml::from_str::<AgentConfig>("nodeName: n\nhbone: {maxStreamsPerConnection: 0}")
                .unwrap_err();
        assert!(err.to_string().contains("maxStreamsPerConnection"), "{err}");
        // Out of HTTP/2's range: refused as the file is read, naming the field.
        for (yaml, field) in [
            ("hbone: {maxFrameBytes: 1024}", "maxFrameBytes"),
            ("hbone: {maxFrameBytes: 16777216}", "maxFrameBytes"),
            ("hbone: {streamWindowBytes: 100}", "streamWindowBytes"),
            (
                "hbone: {connectionWindowBytes: 4294967295}",
                "connectionWindowBytes",
            ),
            (
                "hbone: {windowBudgetBytes: 1125899906842625}",
                "windowBudgetBytes",
            ),
        ] {
            let err =
                serde_yaml::from_str::<AgentConfig>(&format!("nodeName: n\n{yaml}")).unwrap_err();
            assert!(
                err.to_string().contains(&format!("spec.hbone.{field}")),
                "{yaml}: {err}"
            );
        }
    }

    #[test]
    fn cidrs_with_host_bits_are_refused() {
        let c: AgentConfig =
            serde_yaml::from_str("nodeName: n\ncapture: {excludedCidrs: [10.1.2.3/8]}").unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HostBits { index: 0, .. })
        ));
    }
}
