//! Telling an uninstall from a restart: when a Sluice pod is told to stop, it asks whether its
//! DaemonSet is going away. Only then does it take down what it put on the node (capture, the
//! CNI entry, egress addresses); a restart or an upgrade keeps them, so pods stay captured.
use anyhow::Context;

/// The RBAC the question needs: `get` on `apps/daemonsets`, limited to Sluice's DaemonSet.
pub const GRANT: (&str, &str, &str) = ("apps", "daemonsets", "get");

/// The DaemonSet every Sluice agent asks about (the egress gateway's agents too: an uninstall
/// deletes both DaemonSets before it waits for either).
pub const DAEMONSET: &str = "sluice";

/// Whether Sluice is being uninstalled rather than restarted, asked when a Sluice pod is told
/// to stop: its DaemonSet `namespace/name` is gone or being deleted, or the API server no longer
/// accepts the pod's credentials (its ServiceAccount or RBAC were removed with it). A rollout or
/// a restart leaves the DaemonSet in place, so pinned capture and the CNI entry stay.
pub async fn uninstalling(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<bool> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let api = kube::Api::<DaemonSet>::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(None) => Ok(true),
        Ok(Some(ds)) => Ok(ds.metadata.deletion_timestamp.is_some()),
        Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403) => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading DaemonSet {namespace}/{name}")),
    }
}
