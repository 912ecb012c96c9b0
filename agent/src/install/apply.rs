//! `sluice install` and `sluice uninstall`: the rendered objects onto the API server by
//! server-side apply (field manager `sluice-install`), and off it again in reverse order.
use std::time::Duration;

use anyhow::Context;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
    discovery::{ApiCapabilities, ApiResource, Scope},
};
use tracing::info;

use super::render::{Object, Rendered};

/// The field manager of Sluice's installer.
pub const FIELD_MANAGER: &str = "sluice-install";

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// A CRD that already exists: left as the cluster has it (never replaced by a reduced copy).
    KeptExisting,
    /// The cluster does not serve the kind (e.g. GatewayClass without Gateway API).
    NotServed,
    /// `--dry-run`: the API server checked the object and persisted nothing.
    Checked,
    /// `--dry-run`: its namespace is created by the install itself, so the API server could only
    /// confirm that it serves the kind.
    KindServed,
    Deleted,
    Absent,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Step {
    pub object: String,
    pub outcome: Outcome,
}

async fn resolve(
    client: &Client,
    o: &Object,
) -> anyhow::Result<Option<(ApiResource, ApiCapabilities)>> {
    let (group, version) = match o.api_version().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", o.api_version()),
    };
    let gvk = GroupVersionKind::gvk(group, version, o.kind());
    match kube::discovery::pinned_kind(client, &gvk).await {
        Ok(found) => Ok(Some(found)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(kube::Error::Discovery(_)) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("discovering {}", o.api_version())),
    }
}

fn api(
    client: &Client,
    o: &Object,
    ar: &ApiResource,
    caps: &ApiCapabilities,
) -> Api<DynamicObject> {
    match (caps.scope.clone(), o.namespace()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, ar),
        _ => Api::all_with(client.clone(), ar),
    }
}

fn dynamic(o: &Object) -> anyhow::Result<DynamicObject> {
    serde_json::from_value(o.value.clone())
        .with_context(|| format!("{} is not an object", o.describe()))
}

/// Applies `rendered` in order: CRDs (created only where absent), then `deploy/`, then the
/// GatewayClass when the cluster serves it. `dry_run` asks the API server to check every object
/// without persisting it.
pub async fn install(
    client: &Client,
    rendered: &Rendered,
    dry_run: bool,
) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut apply_params = PatchParams::apply(FIELD_MANAGER).force();
    apply_params.dry_run = dry_run;
    for o in &rendered.crds {
        let (ar, caps) = resolve(client, o)
            .await?
            .context("the API server does not serve CustomResourceDefinitions")?;
        let api = api(client, o, &ar, &caps);
        let post = PostParams {
            dry_run,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        let outcome = match api.create(&post, &dynamic(o)?).await {
            Ok(_) if dry_run => Outcome::Checked,
            Ok(_) => Outcome::Applied,
            Err(kube::Error::Api(s)) if s.code == 409 => Outcome::KeptExisting,
            Err(e) => return Err(e).with_context(|| format!("creating {}", o.describe())),
        };
        steps.push(Step {
            object: o.describe(),
            outcome,
        });
    }
    for o in &rendered.objects {
        let Some((ar, caps)) = resolve(client, o).await? else {
            anyhow::bail!(
                "{} (deploy/{}): the API server does not serve {}",
                o.describe(),
                o.file,
                o.api_version()
            );
        };
        let applied = api(client, o, &ar, &caps)
            .patch(o.name(), &apply_params, &Patch::Apply(&o.value))
            .await;
        let outcome = match applied {
            Ok(_) if dry_run => Outcome::Checked,
            Ok(_) => Outcome::Applied,
            Err(kube::Error::Api(s)) if dry_run && s.code == 404 && o.namespace().is_some() => {
                Outcome::KindServed
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("applying {} (deploy/{})", o.describe(), o.file));
            }
        };
        steps.push(Step {
            object: o.describe(),
            outcome,
        });
    }
    for o in &rendered.gateway_api {
        let outcome = match resolve(client, o).await? {
            None => Outcome::NotServed,
            Some((ar, caps)) => {
                api(client, o, &ar, &caps)
                    .patch(o.name(), &apply_params, &Patch::Apply(&o.value))
                    .await
                    .with_context(|| format!("applying {} (deploy/{})", o.describe(), o.file))?;
                if dry_run {
                    Outcome::Checked
                } else {
                    Outcome::Applied
                }
            }
        };
        steps.push(Step {
            object: o.describe(),
            outcome,
        });
    }
    Ok(steps)
}

/// How long `uninstall` waits for the agents' pods to finish their own cleanup before it
/// removes their RBAC.
pub const AGENT_EXIT_WAIT: Duration = Duration::from_secs(90);

/// Deletes what `install` applied, in reverse order; CRDs are never deleted (they may hold
/// the cluster's resources). The DaemonSets go first, and their pods get [`AGENT_EXIT_WAIT`] to
/// take capture off their nodes while their RBAC still exists.
pub async fn uninstall(client: &Client, rendered: &Rendered) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut order: Vec<&Object> = rendered
        .objects
        .iter()
        .chain(&rendered.gateway_api)
        .collect();
    order.reverse();
    // Agents first: they ask whether their DaemonSet is being deleted when told to stop.
    order.sort_by_key(|o| o.kind() != "DaemonSet");
    // Every DaemonSet is deleted before any is waited for: an agent asks about the `sluice`
    // DaemonSet, so the egress gateway's agents must find it deleted too.
    let mut deleted_daemonsets = Vec::new();
    for o in order {
        if o.kind() != "DaemonSet" {
            for ds in deleted_daemonsets.drain(..) {
                wait_for_agents_to_exit(client, ds).await?;
            }
        }
        let Some((ar, caps)) = resolve(client, o).await? else {
            steps.push(Step {
                object: o.describe(),
                outcome: Outcome::NotServed,
            });
            continue;
        };
        let api = api(client, o, &ar, &caps);
        let outcome = match api.delete(o.name(), &DeleteParams::background()).await {
            Ok(_) => Outcome::Deleted,
            Err(kube::Error::Api(s)) if s.code == 404 => Outcome::Absent,
            Err(e) => return Err(e).with_context(|| format!("deleting {}", o.describe())),
        };
        if o.kind() == "DaemonSet" && outcome == Outcome::Deleted {
            deleted_daemonsets.push(o);
        }
        steps.push(Step {
            object: o.describe(),
            outcome,
        });
    }
    for ds in deleted_daemonsets {
        wait_for_agents_to_exit(client, ds).await?;
    }
    Ok(steps)
}

async fn wait_for_agents_to_exit(client: &Client, ds: &Object) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let Some(ns) = ds.namespace() else {
        return Ok(());
    };
    let labels = ds.value["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let started = std::time::Instant::now();
    loop {
        let left = pods
            .list(&ListParams::default().labels(&labels))
            .await?
            .items
            .len();
        if left == 0 {
            return Ok(());
        }
        if started.elapsed() > AGENT_EXIT_WAIT {
            anyhow::bail!(
                "{left} Sluice agent pods still run {}s after their DaemonSet was deleted; \
                 run `sluice cleanup` on their nodes",
                AGENT_EXIT_WAIT.as_secs()
            );
        }
        info!(
            left,
            "waiting for the agents to take capture off their nodes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Whether the API server takes DaemonSet `maxSurge` (beta, on by default, from 1.22).
pub async fn supports_daemonset_surge(client: &Client) -> anyhow::Result<bool> {
    let v = client
        .apiserver_version()
        .await
        .context("reading the API server's version")?;
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    };
    Ok((digits(&v.major), digits(&v.minor)) >= (1, 22))
}
