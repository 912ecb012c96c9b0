//! Marks the pods this node captured with `ambient.istio.io/redirection: enabled`, as Istio's
//! CNI does, so tools that read the annotation (istioctl, ztunnel-aware dashboards) see them as
//! ambient pods.
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::state::build::REDIRECTION_ANNOTATION;

/// The RBAC the annotation needs: `patch` on core `pods`.
pub const GRANT: (&str, &str, &str) = ("", "pods", "patch");

/// Writes the annotation on `namespace/name` (a merge patch: other annotations stay).
pub async fn mark_captured(client: &Client, namespace: &str, name: &str) -> kube::Result<()> {
    let patch = serde_json::json!({
        "metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}
    });
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Marks every pod `(namespace, name)` received, until the sender is dropped. Failures are
/// logged (the capture itself does not depend on the annotation).
pub async fn run(client: Client, mut captured: mpsc::UnboundedReceiver<(String, String)>) {
    while let Some((namespace, name)) = captured.recv().await {
        match mark_captured(&client, &namespace, &name).await {
            Ok(()) => debug!(%namespace, %name, "marked {REDIRECTION_ANNOTATION}: enabled"),
            Err(e) => warn!(%namespace, %name, error = %e, "writing {REDIRECTION_ANNOTATION}"),
        }
    }
}
