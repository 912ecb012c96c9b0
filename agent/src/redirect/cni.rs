//! `sluice cni`: a chained CNI plugin that reports pod sandboxes to the agent.
//!
//! It follows the CNI spec (1.0): the command in `CNI_COMMAND`, the network configuration on
//! stdin (with the previous plugin's result in `prevResult`), the result on stdout, and an
//! error object on stdout with a non-zero exit on failure.
use std::{collections::BTreeMap, io::Read, net::IpAddr, path::PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::enroll::{Request, Sandbox, call};

/// Where the agent listens unless the network configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/sluice/enroll.sock";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<Value>,
    /// Sluice's own key in the plugin's configuration.
    #[serde(default)]
    enrollment_socket: Option<PathBuf>,
    /// A kubeconfig the plugin uses only when the agent cannot be reached, to tell whether the
    /// pod belongs to the mesh (and must wait for the agent) or not (and may start).
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    /// Namespaces whose pods are passed through without asking the agent.
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

/// CNI spec versions whose ADD/DEL this plugin understands.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The CNI error codes this plugin uses (spec: 1-99 reserved, 100+ plugin-specific).
const CODE_INCOMPATIBLE: u32 = 1;
const CODE_DECODE: u32 = 6;
const CODE_INVALID_ENV: u32 = 4;
const CODE_AGENT: u32 = 100;

/// Runs one CNI invocation; returns the process exit code.
pub fn main() -> i32 {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    let result = std::io::stdin()
        .read_to_string(&mut stdin)
        .context("reading stdin")
        .and_then(|_| run(&env, &stdin));
    match result {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            0
        }
        Err(e) => {
            let code = e
                .downcast_ref::<CniError>()
                .map(|c| c.0)
                .unwrap_or(CODE_AGENT);
            let version = serde_json::from_str::<Value>(&stdin)
                .ok()
                .and_then(|v| {
                    v.get("cniVersion")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "1.0.0".into());
            println!(
                "{}",
                json!({"cniVersion": version, "code": code, "msg": "sluice", "details": format!("{e:#}")})
            );
            1
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("CNI error {0}")]
struct CniError(u32);

fn fail(code: u32, msg: String) -> anyhow::Error {
    anyhow::Error::new(CniError(code)).context(msg)
}

/// What one invocation asks for, decoded from its environment and stdin with no side effect
/// (the fuzz targets call this with untrusted bytes; [`run`] carries it out).
#[doc(hidden)]
#[derive(Debug)]
pub enum Invocation {
    /// `VERSION`: print the versions this plugin supports.
    Version,
    /// `ADD`: report `sandbox` to the agent at `socket`, then pass `prev` on.
    Add {
        socket: PathBuf,
        sandbox: Sandbox,
        prev: Value,
        /// The pod's namespace is excluded: pass `prev` on without asking the agent.
        excluded: bool,
        /// The kubeconfig to look the pod up with when the agent is away.
        kubeconfig: Option<PathBuf>,
    },
    /// `DEL`: tell the agent at `socket` that the sandbox `uid` is gone.
    Del { socket: PathBuf, uid: String },
    /// `CHECK`, `STATUS`, `GC`: nothing to do.
    Nothing,
}

/// Decodes a command's environment and stdin; the errors are those [`run`] reports.
#[doc(hidden)]
pub fn decode(env: &BTreeMap<String, String>, stdin: &str) -> anyhow::Result<Invocation> {
    let command = env
        .get("CNI_COMMAND")
        .map(String::as_str)
        .unwrap_or_default();
    if command == "VERSION" {
        return Ok(Invocation::Version);
    }
    let conf: NetConf = serde_json::from_str(stdin)
        .map_err(|e| fail(CODE_DECODE, format!("network configuration: {e}")))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(fail(
            CODE_INCOMPATIBLE,
            format!("cniVersion {:?} is not supported", conf.cni_version),
        ));
    }
    let socket = conf
        .enrollment_socket
        .clone()
        .unwrap_or_else(|| DEFAULT_SOCKET.into());
    let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default());
    let uid = || {
        args.get("K8S_POD_UID")
            .or_else(|| env.get("CNI_CONTAINERID"))
            .cloned()
            .unwrap_or_default()
    };
    match command {
        "ADD" => {
            let Some(prev) = conf.prev_result else {
                return Err(fail(
                    CODE_INCOMPATIBLE,
                    "sluice is a chained plugin: no prevResult from the plugin before it".into(),
                ));
            };
            let uid = uid();
            let netns = env
                .get("CNI_NETNS")
                .cloned()
                .ok_or_else(|| fail(CODE_INVALID_ENV, "CNI_NETNS is not set".into()))?;
            let sandbox = Sandbox {
                uid,
                namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default(),
                name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
                netns: netns.into(),
                cgroup: None,
                ips: prev_result_ips(&prev)?,
            };
            Ok(Invocation::Add {
                socket,
                excluded: conf.exclude_namespaces.contains(&sandbox.namespace),
                sandbox,
                prev,
                kubeconfig: conf.kubeconfig,
            })
        }
        "DEL" => Ok(Invocation::Del { socket, uid: uid() }),
        "CHECK" | "STATUS" | "GC" => Ok(Invocation::Nothing),
        other => Err(fail(
            CODE_INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )),
    }
}

/// Handles a command with its environment and stdin; `Ok(Some(json))` is printed.
pub fn run(env: &BTreeMap<String, String>, stdin: &str) -> anyhow::Result<Option<String>> {
    match decode(env, stdin)? {
        Invocation::Version => Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        )),
        Invocation::Add {
            socket,
            sandbox,
            prev,
            excluded,
            kubeconfig,
        } => {
            if excluded {
                return Ok(Some(prev.to_string()));
            }
            let (namespace, name) = (sandbox.namespace.clone(), sandbox.name.clone());
            let answer = match call(&socket, &Request::Add { pod: sandbox }) {
                Ok(answer) => answer,
                Err(unreachable) => {
                    // Without the agent a mesh pod would start uncaptured: refuse it (the
                    // kubelet retries), but let every other pod on the node start.
                    let why = format!("the agent is unreachable ({unreachable:#})");
                    return match without_agent(kubeconfig.as_deref(), &namespace, &name) {
                        Ok(false) => Ok(Some(prev.to_string())),
                        Ok(true) => Err(fail(
                            CODE_AGENT,
                            format!(
                                "pod {namespace}/{name} is in the mesh and {why}: its sandbox \
                                 waits for the agent (the kubelet retries)"
                            ),
                        )),
                        Err(e) => Err(fail(
                            CODE_AGENT,
                            format!(
                                "{why}, and whether pod {namespace}/{name} is in the mesh is \
                                 unknown: {e:#}"
                            ),
                        )),
                    };
                }
            };
            if !answer.ok {
                // Only a mesh pod may be kept from starting; any other pod goes on.
                let why = answer.error.unwrap_or_default();
                return match without_agent(kubeconfig.as_deref(), &namespace, &name) {
                    Ok(false) => {
                        eprintln!(
                            "sluice: pod {namespace}/{name} is outside the mesh; the agent's \
                             refusal ({why}) does not hold it"
                        );
                        Ok(Some(prev.to_string()))
                    }
                    Ok(true) => bail!("agent refused mesh pod {namespace}/{name}: {why}"),
                    Err(e) => bail!(
                        "agent refused pod {namespace}/{name} ({why}), and whether it is in \
                         the mesh is unknown: {e:#}"
                    ),
                };
            }
            // A chained plugin passes the previous result on unchanged.
            Ok(Some(prev.to_string()))
        }
        Invocation::Del { socket, uid } => {
            // DEL must succeed when the agent is gone or the pod unknown (spec: idempotent).
            if let Ok(answer) = call(&socket, &Request::Del { uid })
                && !answer.ok
            {
                eprintln!("sluice: agent: {}", answer.error.unwrap_or_default());
            }
            Ok(None)
        }
        Invocation::Nothing => Ok(None),
    }
}

/// How long the plugin waits for the API server when the agent is away.
const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether pod `namespace/name` belongs to the mesh, asked of the API server (through the
/// network configuration's `kubeconfig`) because the agent cannot answer.
fn without_agent(
    kubeconfig: Option<&std::path::Path>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<bool> {
    let Some(kubeconfig) = kubeconfig else {
        bail!("the network configuration names no kubeconfig to look the pod up with");
    };
    if namespace.is_empty() || name.is_empty() {
        bail!("CNI_ARGS carries no K8S_POD_NAMESPACE and K8S_POD_NAME");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the API lookup")?;
    rt.block_on(async {
        tokio::time::timeout(API_TIMEOUT, in_mesh(kubeconfig, namespace, name))
            .await
            .map_err(|_| anyhow::anyhow!("the API server did not answer within {API_TIMEOUT:?}"))?
    })
}

async fn in_mesh(
    kubeconfig: &std::path::Path,
    namespace: &str,
    name: &str,
) -> anyhow::Result<bool> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let client = crate::sources::kube::client(Some(kubeconfig)).await?;
    // `list` by name: the agent's ClusterRole grants list and watch, not get.
    let by_name = |n: &str| kube::api::ListParams::default().fields(&format!("metadata.name={n}"));
    let pod = kube::Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&by_name(name))
        .await
        .with_context(|| format!("reading pod {namespace}/{name}"))?
        .items
        .pop()
        .with_context(|| format!("pod {namespace}/{name} does not exist"))?;
    let ns = kube::Api::<Namespace>::all(client)
        .list(&by_name(namespace))
        .await
        .with_context(|| format!("reading namespace {namespace}"))?
        .items
        .pop()
        .with_context(|| format!("namespace {namespace} does not exist"))?;
    let ns = crate::state::Namespace {
        name: namespace.to_owned(),
        labels: ns.metadata.labels.unwrap_or_default(),
    };
    Ok(crate::state::build::pod_membership(&pod, Some(&ns)).in_mesh())
}

fn parse_cni_args(raw: &str) -> BTreeMap<String, String> {
    raw.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Pod addresses from a CNI result (`ips[].address`, CIDR notation).
fn prev_result_ips(prev: &Value) -> anyhow::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for (i, entry) in prev
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let addr = entry
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ip = addr.split('/').next().unwrap_or_default();
        ips.push(ip.parse().map_err(|_| {
            fail(
                CODE_DECODE,
                format!("prevResult.ips[{i}].address: {addr:?} is not an address"),
            )
        })?);
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> BTreeMap<String, String> {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_NETNS", "/run/netns/x"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=a;K8S_POD_NAME=p;K8S_POD_UID=u",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }

    #[test]
    fn version_lists_supported_versions() {
        let out = run(&env("VERSION"), "").unwrap().unwrap();
        assert!(out.contains("1.0.0"));
    }

    #[test]
    fn add_without_prev_result_is_refused() {
        let err = run(
            &env("ADD"),
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"sluice"}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("chained"), "{err:#}");
    }

    #[test]
    fn bad_addresses_name_the_field() {
        let prev = serde_json::json!({"ips": [{"address": "10.0.0.2/24"}, {"address": "nope"}]});
        let err = prev_result_ips(&prev).unwrap_err();
        assert!(format!("{err:#}").contains("prevResult.ips[1].address"));
    }

    #[test]
    fn without_an_agent_an_excluded_pod_passes_and_others_wait() {
        let prev = r#""prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}"#;
        let excluded = format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"sluice","enrollmentSocket":"/nonexistent/sock","excludeNamespaces":["a"],{prev}}}"#
        );
        let out = run(&env("ADD"), &excluded).unwrap().unwrap();
        assert!(out.contains("10.0.0.2/24"), "{out}");

        let unknown = format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"sluice","enrollmentSocket":"/nonexistent/sock",{prev}}}"#
        );
        let err = format!("{:#}", run(&env("ADD"), &unknown).unwrap_err());
        assert!(err.contains("agent is unreachable"), "{err}");
        assert!(err.contains("no kubeconfig"), "{err}");
    }

    #[test]
    fn del_succeeds_without_an_agent() {
        let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"sluice","enrollmentSocket":"/nonexistent/sock"}"#;
        assert_eq!(run(&env("DEL"), conf).unwrap(), None);
    }
}
