//! `egressgateway.kubernetes.azure.com/v1alpha1` StaticGatewayConfiguration, in the shape the
//! AKS Static Egress Gateway (Azure/kube-egress-gateway) defines it.
//!
//! A StaticGatewayConfiguration (SGC) names a gateway node pool and the public IP prefix its
//! egress traffic leaves from. Pods opt in with the annotation
//! [`STATIC_GATEWAY_ANNOTATION`]`: <sgc name>` (same namespace as the SGC).
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of [`StaticGatewayConfiguration`].
pub const GROUP: &str = "egressgateway.kubernetes.azure.com";
/// `apiVersion` of [`StaticGatewayConfiguration`] documents.
pub const API_VERSION: &str = "egressgateway.kubernetes.azure.com/v1alpha1";
/// Pod annotation that binds a pod to an SGC of its namespace.
pub const STATIC_GATEWAY_ANNOTATION: &str = "kubernetes.azure.com/static-gateway-configuration";

/// Desired state of a static egress gateway.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "egressgateway.kubernetes.azure.com",
    version = "v1alpha1",
    kind = "StaticGatewayConfiguration",
    plural = "staticgatewayconfigurations",
    namespaced,
    status = "StaticGatewayConfigurationStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct StaticGatewayConfigurationSpec {
    /// Name of the gateway node pool the configuration applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_nodepool_name: Option<String>,
    /// The gateway VMSS, for clusters that name it rather than a node pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_vmss_profile: Option<GatewayVmssProfile>,
    /// `staticEgressGateway` (default: pod traffic goes to the gateway) or `azureNetworking`
    /// (pod traffic stays on the pod's own interface). Kept as a string so that an unknown
    /// value is reported by normalisation, naming the field, instead of failing the parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_route: Option<String>,
    /// Whether the cloud provisions public IP prefixes for outbound (AKS default `true`).
    #[serde(default = "default_true")]
    pub provision_public_ips: bool,
    /// Azure resource ID of a bring-your-own public IP prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip_prefix_id: Option<String>,
    /// Destination CIDRs that take the other path than `defaultRoute`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_cidrs: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// An existing gateway VMSS (virtual machine scale set).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayVmssProfile {
    /// Resource group of the VMSS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmss_resource_group: Option<String>,
    /// Name of the VMSS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmss_name: Option<String>,
    /// Size of the public IP prefix for this VMSS (0–31).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31))]
    pub public_ip_prefix_size: Option<i32>,
}

/// Observed state of a static egress gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticGatewayConfigurationStatus {
    /// The egress IP prefix (CIDR) of this configuration, once programmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ip_prefix: Option<String>,
    /// Gateway-side server profile (WireGuard endpoint in kube-egress-gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_server_profile: Option<GatewayServerProfile>,
}

/// Where pods reach the gateway, as kube-egress-gateway reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServerProfile {
    /// Gateway IP for connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Listening port of the gateway server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Gateway server public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Secret that holds the gateway's private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_secret_ref: Option<ObjectReference>,
}

/// A core/v1 `ObjectReference` (k8s-openapi's type has no JSON schema for the CRD).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn upstream_sample_parses() {
        let sgc: StaticGatewayConfiguration = serde_yaml::from_str(
            r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: my-sgc, namespace: apps}
spec:
  gatewayVmssProfile: {vmssResourceGroup: rg, vmssName: gw, publicIpPrefixSize: 31}
  provisionPublicIps: false
  defaultRoute: azureNetworking
  excludeCidrs: [10.244.0.0/16, 10.245.0.0/16]
status:
  egressIpPrefix: 203.0.113.8/31
"#,
        )
        .expect("parses");
        let profile = sgc.spec.gateway_vmss_profile.as_ref().expect("profile");
        assert_eq!(profile.public_ip_prefix_size, Some(31));
        assert!(!sgc.spec.provision_public_ips);
        assert_eq!(sgc.spec.default_route.as_deref(), Some("azureNetworking"));
        assert_eq!(sgc.spec.exclude_cidrs.len(), 2);
        let status = sgc.status.expect("status");
        assert_eq!(status.egress_ip_prefix.as_deref(), Some("203.0.113.8/31"));
    }

    #[test]
    fn provision_public_ips_defaults_to_true() {
        let spec: StaticGatewayConfigurationSpec =
            serde_yaml::from_str("gatewayNodepoolName: gwpool").expect("parses");
        assert!(spec.provision_public_ips);
    }

    #[test]
    fn crd_has_the_upstream_names() {
        let crd = StaticGatewayConfiguration::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.plural, "staticgatewayconfigurations");
        let yaml = serde_yaml::to_string(&crd).expect("serialises");
        for field in [
            "gatewayNodepoolName",
            "vmssResourceGroup",
            "publicIpPrefixSize",
            "provisionPublicIps",
            "publicIpPrefixId",
            "defaultRoute",
            "excludeCidrs",
            "egressIpPrefix",
        ] {
            assert!(yaml.contains(field), "{field} missing from CRD");
        }
    }
}
