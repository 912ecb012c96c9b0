//! Who may have which certificate: the caller is authenticated by its ServiceAccount token
//! (TokenReview), placed on a node (the token's pod, then that pod's `spec.nodeName`), and
//! granted an identity only when a pod of that identity is scheduled on the same node.
//!
//! Node of the caller: API servers from 1.30 put `authentication.kubernetes.io/node-name` into
//! a bound token's review; older ones (the 1.20 test server among them) only name the pod
//! (`…/pod-name`, `…/pod-uid`). Then the pod is read, its uid compared with the token's (a pod
//! deleted and re-created under the same name does not inherit the token), and its
//! `spec.nodeName` taken.
use std::time::Duration;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use rcgen::{CertificateSigningRequestParams, SanType};
use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject};

use crate::{
    identity::ca_wire::{CertificateRequest, GrpcCode, IMPERSONATED_IDENTITY},
    state::Identity,
};

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Why a request is refused; each maps to a gRPC status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denial {
    #[error("no bearer token")]
    NoToken,
    #[error("token not accepted: {0}")]
    BadToken(String),
    #[error("{0} is not a ServiceAccount")]
    NotServiceAccount(String),
    #[error("the token of {0} is not bound to a pod (project a token, not a legacy Secret)")]
    NotBound(String),
    #[error("the token's pod {0}: {1}")]
    CallerPod(String, String),
    #[error("{caller} may only ask for its own identity, not {requested}")]
    NotAnAgent { caller: String, requested: Identity },
    #[error("no pod of {requested} is scheduled on the caller's node {node}")]
    NotOnNode { requested: Identity, node: String },
    #[error("certificate request: {0}")]
    BadCsr(String),
    #[error("API server: {0}")]
    Api(String),
}

impl Denial {
    /// The gRPC status this refusal is sent with.
    pub fn code(&self) -> GrpcCode {
        match self {
            Self::NoToken | Self::BadToken(_) => GrpcCode::Unauthenticated,
            Self::BadCsr(_) => GrpcCode::InvalidArgument,
            Self::Api(_) => GrpcCode::Unavailable,
            _ => GrpcCode::PermissionDenied,
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node: Option<String>,
}

impl Caller {
    fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// What a request is granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub identity: Identity,
    pub csr: CertificateSigningRequestDer<'static>,
    pub ttl: Duration,
    pub caller: Caller,
    /// The caller's node, when it asked for another identity than its own.
    pub node: Option<String>,
}

/// Checks callers and requests against the API server.
#[derive(Clone)]
pub struct Authorizer {
    client: Client,
    trust_domain: String,
    audience: String,
    /// `namespace/name` of the ServiceAccounts that may ask for identities of their node's pods.
    agents: Vec<String>,
    max_ttl: Duration,
}

impl Authorizer {
    /// An authorizer reviewing tokens for `audience`.
    pub fn new(
        client: Client,
        trust_domain: String,
        audience: String,
        agents: Vec<String>,
        max_ttl: Duration,
    ) -> Self {
        Self {
            client,
            trust_domain,
            audience,
            agents,
            max_ttl,
        }
    }

    /// The grant for `request` from the holder of `token`, or why not.
    pub async fn authorize(
        &self,
        token: &str,
        request: &CertificateRequest,
    ) -> Result<Grant, Denial> {
        let caller = self.review(token).await?;
        let (identity, csr) = requested_identity(request, &self.trust_domain)?;
        let ttl = granted_ttl(request.validity_duration, self.max_ttl);
        let own = Identity::new(
            &self.trust_domain,
            &caller.namespace,
            &caller.service_account,
        );
        if identity == own {
            // Any pod may have its own ServiceAccount's identity (Istio grants it too).
            return Ok(Grant {
                identity,
                csr,
                ttl,
                caller,
                node: None,
            });
        }
        if !self.agents.contains(&caller.name()) {
            return Err(Denial::NotAnAgent {
                caller: caller.name(),
                requested: identity,
            });
        }
        let node = self.caller_node(&caller).await?;
        let pods = Api::<Pod>::namespaced(self.client.clone(), &identity.namespace)
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Denial::Api(format!("listing pods in {}: {e}", identity.namespace)))?;
        if !pods
            .items
            .iter()
            .any(|p| runs_as(p, &identity.service_account, &node))
        {
            return Err(Denial::NotOnNode {
                requested: identity,
                node,
            });
        }
        Ok(Grant {
            identity,
            csr,
            ttl,
            caller,
            node: Some(node),
        })
    }

    /// The token's ServiceAccount and pod, through a TokenReview for our audience.
    async fn review(&self, token: &str) -> Result<Caller, Denial> {
        if token.is_empty() {
            return Err(Denial::NoToken);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denial::Api(format!("TokenReview: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Denial::BadToken(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        // An API server that does not check audiences answers without them: refuse then.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(Denial::BadToken(format!(
                "not issued for the audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|s| s.split_once(':'))
            .ok_or_else(|| Denial::NotServiceAccount(username.clone()))?;
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        Ok(Caller {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name: first(EXTRA_POD_NAME),
            pod_uid: first(EXTRA_POD_UID),
            node: first(EXTRA_NODE_NAME),
        })
    }

    /// The node of the caller's pod: from the review, or from the pod itself.
    async fn caller_node(&self, caller: &Caller) -> Result<String, Denial> {
        if let Some(node) = &caller.node {
            return Ok(node.clone());
        }
        let (Some(name), Some(uid)) = (&caller.pod_name, &caller.pod_uid) else {
            return Err(Denial::NotBound(caller.name()));
        };
        let key = format!("{}/{name}", caller.namespace);
        let pod = Api::<Pod>::namespaced(self.client.clone(), &caller.namespace)
            .get_opt(name)
            .await
            .map_err(|e| Denial::Api(format!("reading pod {key}: {e}")))?
            .ok_or_else(|| Denial::CallerPod(key.clone(), "not found".into()))?;
        if pod.metadata.uid.as_ref() != Some(uid) {
            return Err(Denial::CallerPod(
                key,
                "has another uid than the token's".into(),
            ));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(Denial::CallerPod(key, "is being deleted".into()));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Denial::CallerPod(key, "is not scheduled".into()))
    }
}

/// The one SPIFFE identity `request`'s CSR asks for, in `trust_domain`, agreeing with the
/// `ImpersonatedIdentity` metadata when that is sent.
pub fn requested_identity(
    request: &CertificateRequest,
    trust_domain: &str,
) -> Result<(Identity, CertificateSigningRequestDer<'static>), Denial> {
    let bad = Denial::BadCsr;
    let der = CertificateSigningRequestDer::from_pem_slice(request.csr.as_bytes())
        .map_err(|e| bad(format!("not a PEM CERTIFICATE REQUEST: {e}")))?;
    let params = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| bad(format!("not a valid PKCS#10 request: {e}")))?;
    let uris: Vec<String> = params
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str().to_owned()),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(bad(format!(
            "wants exactly one URI SAN, found {}",
            uris.len()
        )));
    };
    let identity: Identity = uri.parse().map_err(|e| bad(format!("{e}")))?;
    if identity.trust_domain != trust_domain {
        return Err(bad(format!(
            "{identity} is outside the trust domain {trust_domain:?}"
        )));
    }
    if let Some(impersonated) = request.metadata.get(IMPERSONATED_IDENTITY)
        && impersonated != uri
    {
        return Err(bad(format!(
            "{IMPERSONATED_IDENTITY} {impersonated:?} is not the CSR's {uri:?}"
        )));
    }
    Ok((identity, der))
}

/// The lifetime granted for a requested `validity_duration` (seconds; 0 or less: the maximum).
pub fn granted_ttl(validity_duration: i64, max: Duration) -> Duration {
    match u64::try_from(validity_duration) {
        Ok(secs) if secs > 0 => Duration::from_secs(secs).min(max),
        _ => max,
    }
}

/// Whether `pod` runs as `service_account` on `node` and has not finished.
fn runs_as(pod: &Pod, service_account: &str, node: &str) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    #[allow(deprecated)] // `serviceAccount` is the old spelling some objects still carry.
    let sa = spec
        .service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
        .unwrap_or("default");
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    sa == service_account && spec.node_name.as_deref() == Some(node) && !finished
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::identity::{certificate_request, generate_key};

    const TD: &str = "cluster.local";

    fn request_for(identity: &Identity) -> CertificateRequest {
        let key = generate_key(identity).unwrap();
        let der = certificate_request(identity, &key).unwrap();
        CertificateRequest {
            csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec())),
            validity_duration: 3600,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn the_csr_names_the_identity() {
        let web = Identity::new(TD, "shop", "web");
        let (got, _) = requested_identity(&request_for(&web), TD).unwrap();
        assert_eq!(got, web);
    }

    #[test]
    fn foreign_domains_garbage_and_mismatched_impersonation_are_refused() {
        let web = Identity::new(TD, "shop", "web");
        let other = Identity::new("evil.td", "shop", "web");
        let err = requested_identity(&request_for(&other), TD).unwrap_err();
        assert!(
            err.to_string().contains("outside the trust domain"),
            "{err}"
        );
        assert_eq!(err.code(), GrpcCode::InvalidArgument);

        let mut req = request_for(&web);
        req.metadata.insert(
            IMPERSONATED_IDENTITY.into(),
            "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
        );
        assert!(matches!(
            requested_identity(&req, TD),
            Err(Denial::BadCsr(_))
        ));

        let garbage = CertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .into(),
            ..Default::default()
        };
        assert!(matches!(
            requested_identity(&garbage, TD),
            Err(Denial::BadCsr(_))
        ));
    }

    #[test]
    fn lifetimes_are_capped() {
        let max = Duration::from_secs(86400);
        assert_eq!(granted_ttl(3600, max), Duration::from_secs(3600));
        assert_eq!(granted_ttl(10 * 86400, max), max);
        assert_eq!(granted_ttl(0, max), max);
        assert_eq!(granted_ttl(-5, max), max);
    }

    #[test]
    fn only_running_pods_of_the_service_account_on_the_node_count() {
        let pod = |sa: Option<&str>, node: &str, phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        assert!(runs_as(&pod(Some("web"), "a", "Running"), "web", "a"));
        assert!(!runs_as(&pod(Some("web"), "b", "Running"), "web", "a"));
        assert!(!runs_as(&pod(Some("api"), "a", "Running"), "web", "a"));
        assert!(!runs_as(&pod(Some("web"), "a", "Succeeded"), "web", "a"));
        assert!(runs_as(&pod(None, "a", "Pending"), "default", "a"));
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        assert_eq!(Denial::NoToken.code(), GrpcCode::Unauthenticated);
        assert_eq!(
            Denial::BadToken("x".into()).code(),
            GrpcCode::Unauthenticated
        );
        assert_eq!(
            Denial::NotOnNode {
                requested: Identity::new(TD, "a", "b"),
                node: "n".into()
            }
            .code(),
            GrpcCode::PermissionDenied
        );
    }
}
