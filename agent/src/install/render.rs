//! Rendering: `deploy/NN-*.yaml` (embedded at build time, in name order) with [`Values`]
//! applied to the parsed objects. The files in `deploy/` are the output for the default values,
//! so GitOps users can apply them as they are.
use serde_json::{Value, json};

use super::values::{DEPLOY_IMAGE, Values};

mod files {
    include!(concat!(env!("OUT_DIR"), "/deploy_files.rs"));
}

/// Why rendering failed (a `deploy/` file no longer has what the renderer edits).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("deploy/{file}: {reason}")]
    Deploy { file: String, reason: String },
}

/// One object, with the file it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub file: String,
    pub value: Value,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    pub fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
    /// `Kind namespace/name` for messages.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
}

/// What `render` produces, in apply order.
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    /// The CRDs of deploy/crds when `crds.install` (applied first, only where absent).
    pub crds: Vec<Object>,
    /// deploy/NN-*.yaml, in name order.
    pub objects: Vec<Object>,
    /// deploy/gateway-api when `gatewayClass.enabled` (needs the Gateway API CRDs).
    pub gateway_api: Vec<Object>,
}

impl Rendered {
    /// Everything in apply order.
    pub fn all(&self) -> impl Iterator<Item = &Object> {
        self.crds
            .iter()
            .chain(&self.objects)
            .chain(&self.gateway_api)
    }

    /// One YAML stream, each document headed by the file it comes from.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for o in self.all() {
            out.push_str(&format!("---\n# Source: deploy/{}\n", o.file));
            out.push_str(&serde_yaml::to_string(&o.value).unwrap_or_default());
        }
        out
    }
}

/// The numbered `deploy/` files, parsed, without values applied.
pub fn plain() -> Result<Vec<Object>, RenderError> {
    parse_all(files::DEPLOY_FILES)
}

fn parse_all(files: &[(&str, &str)]) -> Result<Vec<Object>, RenderError> {
    let mut out = Vec::new();
    for (file, text) in files {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).map_err(|e| RenderError::Deploy {
                file: (*file).to_owned(),
                reason: e.to_string(),
            })?;
            if value.is_null() {
                continue;
            }
            out.push(Object {
                file: (*file).to_owned(),
                value,
            });
        }
    }
    Ok(out)
}

use serde::Deserialize;

/// `deploy/` with `values` applied.
pub fn render(values: &Values) -> Result<Rendered, RenderError> {
    let mut objects = plain()?;
    for o in &mut objects {
        apply(values, o)?;
    }
    Ok(Rendered {
        crds: if values.crds.install {
            parse_all(files::CRD_FILES)?
                .into_iter()
                .map(|mut o| {
                    o.file = format!("crds/{}", o.file);
                    o
                })
                .collect()
        } else {
            Vec::new()
        },
        objects,
        gateway_api: if values.gateway_class.enabled {
            parse_all(files::GATEWAY_API_FILES)?
                .into_iter()
                .map(|mut o| {
                    o.file = format!("gateway-api/{}", o.file);
                    o
                })
                .collect()
        } else {
            Vec::new()
        },
    })
}

fn deploy_err(o: &Object, reason: impl Into<String>) -> RenderError {
    RenderError::Deploy {
        file: o.file.clone(),
        reason: format!("{}: {}", o.describe(), reason.into()),
    }
}

/// Sets `name=value` in a container's `env`, replacing an entry of that name.
fn set_env(container: &mut Value, name: &str, value: &str) {
    let env = container
        .as_object_mut()
        .expect("a container is an object")
        .entry("env")
        .or_insert_with(|| json!([]));
    let Some(list) = env.as_array_mut() else {
        return;
    };
    let entry = json!({"name": name, "value": value});
    match list.iter_mut().find(|e| e["name"] == name) {
        Some(e) => *e = entry,
        None => list.push(entry),
    }
}

fn apply(values: &Values, o: &mut Object) -> Result<(), RenderError> {
    let kind = o.kind().to_owned();
    let name = o.name().to_owned();
    match (kind.as_str(), name.as_str()) {
        ("DaemonSet" | "Deployment", _) => workload(values, o)?,
        // The node agent's config, and the egress gateway role's (the same config plus the role).
        ("ConfigMap", "sluice-config" | "sluice-egress-gateway-config") => agent_config(values, o)?,
        ("ClusterRole", "sluice") => {
            // The agent may read only the mesh config ConfigMap it is configured with.
            let rules = o.value["rules"].as_array_mut();
            let rule = rules.into_iter().flatten().find(|r| {
                r["resources"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x == "configmaps"))
            });
            let Some(rule) = rule else {
                return Err(deploy_err(o, "no rule for configmaps"));
            };
            rule["resourceNames"] = json!([values.mesh_config_name]);
        }
        _ => {}
    }
    Ok(())
}

fn workload(values: &Values, o: &mut Object) -> Result<(), RenderError> {
    let is_agent = o.kind() == "DaemonSet";
    let file_err = |o: &Object, r: &str| deploy_err(o, r);
    if is_agent {
        let rollout = if values.daemon_set_max_surge {
            json!({"maxSurge": 1, "maxUnavailable": 0})
        } else {
            json!({"maxUnavailable": 1})
        };
        o.value["spec"]["updateStrategy"]["rollingUpdate"] = rollout;
        let template = &mut o.value["spec"]["template"];
        template["metadata"]["annotations"] = json!(values.pod_annotations);
        if values.pod_annotations.is_empty() {
            template["metadata"]
                .as_object_mut()
                .map(|m| m.remove("annotations"));
        }
        template["spec"]["priorityClassName"] = json!(values.priority_class_name);
    }
    let spec = &mut o.value["spec"]["template"]["spec"];
    if !spec.is_object() {
        return Err(file_err(o, "no spec.template.spec"));
    }
    // The values' selector, keeping the role's own (`sluice.dev/…`, the egress gateway nodes).
    let mut selector = json!(values.node_selector);
    if let (Some(own), Some(merged)) = (spec["nodeSelector"].as_object(), selector.as_object_mut())
    {
        for (k, v) in own.iter().filter(|(k, _)| k.starts_with("sluice.dev/")) {
            merged.insert(k.clone(), v.clone());
        }
    }
    spec["nodeSelector"] = selector;
    let spec = &mut o.value["spec"]["template"]["spec"];
    if is_agent {
        for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
            match volume["name"].as_str() {
                Some("cni-bin") => volume["hostPath"]["path"] = json!(values.cni_bin_dir),
                Some("cni-conf") => volume["hostPath"]["path"] = json!(values.cni_conf_dir),
                _ => {}
            }
        }
    }
    let mut found_image = false;
    for container in spec["containers"].as_array_mut().into_iter().flatten() {
        if container["image"] != DEPLOY_IMAGE {
            continue;
        }
        found_image = true;
        container["image"] = json!(values.image_ref());
        if let Some(policy) = &values.image_pull_policy {
            container["imagePullPolicy"] = json!(policy);
        }
        set_env(
            container,
            "SLUICE_LOG_FORMAT",
            if values.log_as_json { "json" } else { "text" },
        );
        set_env(container, "SLUICE_LOG", &values.log_level);
        match container["name"].as_str() {
            Some("agent") => {
                if let Some(r) = &values.resources {
                    container["resources"] = r.clone();
                }
            }
            Some("install-cni") => {
                container["args"] = json!([
                    "install-cni",
                    "--watch",
                    "--exclude-namespace",
                    values.exclude_namespaces.join(","),
                    "--host-conf-dir",
                    values.cni_conf_dir,
                ]);
            }
            Some("ca") => {
                for arg in container["args"].as_array_mut().into_iter().flatten() {
                    if arg
                        .as_str()
                        .is_some_and(|a| a.starts_with("--trust-domain="))
                    {
                        *arg = json!(format!("--trust-domain={}", values.trust_domain));
                    }
                }
            }
            _ => {}
        }
    }
    if !found_image {
        return Err(deploy_err(
            o,
            format!("no container with image {DEPLOY_IMAGE}"),
        ));
    }
    Ok(())
}

/// Edits the AgentConfig text line by line, so that its comments stay.
fn agent_config(values: &Values, o: &mut Object) -> Result<(), RenderError> {
    let Some(text) = o.value["data"]["config.yaml"].as_str().map(str::to_owned) else {
        return Err(deploy_err(o, "no data.config.yaml"));
    };
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut set = |key: &str, value: &str| -> Result<(), RenderError> {
        let line = lines
            .iter_mut()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .ok_or_else(|| deploy_err(o, format!("config.yaml has no `{key}:` line")))?;
        let indent = line.len() - line.trim_start().len();
        *line = format!("{}{key}: {value}", " ".repeat(indent));
        Ok(())
    };
    set("trustDomain", &values.trust_domain)?;
    set("caAddress", &values.ca_address)?;
    if values.mesh_config_name != "istio" {
        let root_ns = lines
            .iter()
            .find_map(|l| l.trim_start().strip_prefix("rootNamespace:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "istio-system".into());
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("rootNamespace:"))
            .ok_or_else(|| deploy_err(o, "config.yaml has no `rootNamespace:` line"))?;
        let indent = lines[at].len() - lines[at].trim_start().len();
        lines.insert(
            at + 1,
            format!(
                "{}meshConfig: {{namespace: {root_ns}, name: {}}}",
                " ".repeat(indent),
                values.mesh_config_name
            ),
        );
    }
    let mut out = lines.join("\n");
    out.push('\n');
    o.value["data"]["config.yaml"] = json!(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_render_deploy_as_it_is() {
        let plain = plain().unwrap();
        let rendered = render(&Values::default()).unwrap();
        assert!(rendered.crds.is_empty(), "CRDs only with crds.install");
        assert_eq!(rendered.objects.len(), plain.len());
        for (r, p) in rendered.objects.iter().zip(&plain) {
            assert_eq!(
                r.value,
                p.value,
                "{} differs from deploy/{}",
                r.describe(),
                p.file
            );
        }
        assert_eq!(rendered.gateway_api.len(), 1);
        assert_eq!(rendered.gateway_api[0].kind(), "GatewayClass");
        assert_eq!(
            rendered.gateway_api[0].value["spec"]["controllerName"],
            "sluice.dev/gateway-controller"
        );
    }

    #[test]
    fn files_come_in_order_namespace_first() {
        let objects = plain().unwrap();
        let files: Vec<&str> = objects.iter().map(|o| o.file.as_str()).collect();
        let mut sorted = files.clone();
        sorted.sort();
        assert_eq!(files, sorted);
        assert_eq!(objects[0].kind(), "Namespace");
        let pos = |kind: &str| objects.iter().position(|o| o.kind() == kind).unwrap();
        assert!(pos("ClusterRole") < pos("DaemonSet"));
        assert!(pos("ConfigMap") < pos("DaemonSet"));
    }

    #[test]
    fn values_reach_every_place_they_belong() {
        let values = Values::load(
            None,
            &[
                "hub=registry.local/m".into(),
                "tag=9.9".into(),
                "logLevel=debug".into(),
                "logAsJson=false".into(),
                "trustDomain=corp.example".into(),
                "caAddress=https://istiod.istio-system.svc:15012".into(),
                "meshConfigName=istio-asm-1-24".into(),
                "cniConfDir=/etc/cni/multus/net.d".into(),
                "cniBinDir=/var/lib/cni/bin".into(),
                "excludeNamespaces=[kube-system, infra]".into(),
                "priorityClassName=mesh-critical".into(),
                "daemonSetMaxSurge=false".into(),
                "resources={requests: {cpu: 500m}}".into(),
                "crds.install=true".into(),
            ],
        )
        .unwrap();
        let r = render(&values).unwrap();
        assert!(!r.crds.is_empty());
        assert!(
            r.crds
                .iter()
                .all(|o| o.kind() == "CustomResourceDefinition")
        );
        let find = |kind: &str| {
            r.objects
                .iter()
                .find(|o| o.kind() == kind)
                .unwrap()
                .value
                .clone()
        };
        let ds = find("DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().unwrap() {
            assert_eq!(c["image"], "registry.local/m/sluice:9.9");
            let env = c["env"].as_array().unwrap();
            assert!(env.contains(&json!({"name": "SLUICE_LOG", "value": "debug"})));
            assert!(env.contains(&json!({"name": "SLUICE_LOG_FORMAT", "value": "text"})));
        }
        let agent = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .unwrap();
        assert_eq!(agent["resources"], json!({"requests": {"cpu": "500m"}}));
        let cni = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "install-cni")
            .unwrap();
        let args: Vec<&str> = cni["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--exclude-namespace", "kube-system,infra"]),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--host-conf-dir", "/etc/cni/multus/net.d"]),
            "{args:?}"
        );
        let paths: Vec<&Value> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| &v["hostPath"]["path"])
            .collect();
        assert!(paths.contains(&&json!("/etc/cni/multus/net.d")));
        assert!(paths.contains(&&json!("/var/lib/cni/bin")));
        assert_eq!(pod["priorityClassName"], "mesh-critical");
        assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
        assert_eq!(
            ds["spec"]["updateStrategy"]["rollingUpdate"],
            json!({"maxUnavailable": 1})
        );
        assert_eq!(
            ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
            "true"
        );

        let cm = find("ConfigMap");
        let text = cm["data"]["config.yaml"].as_str().unwrap();
        let parsed: Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(parsed["spec"]["trustDomain"], "corp.example");
        assert_eq!(
            parsed["spec"]["identity"]["caAddress"],
            "https://istiod.istio-system.svc:15012"
        );
        assert_eq!(
            parsed["spec"]["meshConfig"],
            json!({"namespace": "istio-system", "name": "istio-asm-1-24"})
        );
        let role = find("ClusterRole");
        let cm_rule = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resources"] == json!(["configmaps"]))
            .unwrap();
        assert_eq!(cm_rule["resourceNames"], json!(["istio-asm-1-24"]));
        let ca = r.objects.iter().find(|o| o.kind() == "Deployment").unwrap();
        assert!(
            ca.value["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--trust-domain=corp.example"))
        );
    }
}
