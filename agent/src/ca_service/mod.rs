//! `sluice ca`: the mesh's certificate authority as a service, so that no node holds the root
//! key. It speaks Istio's certificate API (`istio.v1.auth.IstioCertificateService/
//! CreateCertificate`, gRPC over TLS) and signs a workload certificate only when
//!
//! 1. the caller's bearer token passes a TokenReview for the configured audience (`istio-ca`),
//! 2. the CSR names exactly one SPIFFE identity of the trust domain, and
//! 3. that identity is the caller's own ServiceAccount, or the caller is a node agent
//!    ServiceAccount (`--agent-service-account`, default `sluice-system/sluice`) and a pod of
//!    that identity is scheduled on the caller's node ([`authorize`]).
//!
//! Signing keeps no state, so any number of replicas serve side by side behind one Service
//! (no leader election).
//!
//! - [`authorize`]: the TokenReview, the caller's node, the pod check.
//! - [`server`]: TLS, HTTP/2 and gRPC framing.
pub mod authorize;
pub mod server;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{
    config::CertTtl,
    identity::{BuiltinCa, CaError},
    sources::kube::KubeError,
};

/// Lifetime of the service's own TLS certificate, made from the root at every start.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The flags of `sluice ca`.
#[derive(Clone, Debug)]
pub struct CaServiceArgs {
    /// Where to serve (Istio's CA port is 15012).
    pub listen: SocketAddr,
    /// The mesh root and its key (the Secret the Deployment alone mounts).
    pub root_cert_file: PathBuf,
    pub root_key_file: PathBuf,
    pub trust_domain: String,
    /// Names the serving certificate carries: the Service's DNS names (or IPs).
    pub serving_names: Vec<String>,
    /// The audience tokens are reviewed for.
    pub token_audience: String,
    /// `namespace/name` of the node agents' ServiceAccounts.
    pub agent_service_accounts: Vec<String>,
    /// Longest certificate lifetime granted.
    pub max_ttl: CertTtl,
    /// Kubeconfig; default: in-cluster or `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaServiceError {
    #[error("the mesh root: {0}")]
    Root(#[from] CaError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--agent-service-account {0:?} is not namespace/name")]
    AgentServiceAccount(String),
    #[error("--serving-name: at least one name is needed")]
    NoServingName,
}

/// Runs the CA service until the process is stopped.
pub async fn run(args: CaServiceArgs) -> Result<(), CaServiceError> {
    for sa in &args.agent_service_accounts {
        let valid = sa
            .split_once('/')
            .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'));
        if !valid {
            return Err(CaServiceError::AgentServiceAccount(sa.clone()));
        }
    }
    if args.serving_names.is_empty() {
        return Err(CaServiceError::NoServingName);
    }
    let ca = BuiltinCa::load(
        &args.root_cert_file,
        &args.root_key_file,
        &args.trust_domain,
    )?;
    let (chain, key) = ca.issue_serving(&args.serving_names, SERVING_CERT_LIFETIME)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];

    let client = crate::sources::kube::client(args.kubeconfig.as_deref()).await?;
    let authorizer = authorize::Authorizer::new(
        client,
        args.trust_domain.clone(),
        args.token_audience.clone(),
        args.agent_service_accounts.clone(),
        args.max_ttl.get(),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| CaServiceError::Listen {
            addr: args.listen,
            source,
        })?;
    tracing::info!(
        target: "sluice::ca",
        listen = %args.listen,
        trust_domain = %args.trust_domain,
        serving_names = ?args.serving_names,
        audience = %args.token_audience,
        agents = ?args.agent_service_accounts,
        "serving istio.v1.auth.IstioCertificateService"
    );
    let signer = Arc::new(server::Signer { ca, authorizer });
    server::serve(listener, Arc::new(tls), signer)
        .await
        .map_err(|source| CaServiceError::Listen {
            addr: args.listen,
            source,
        })
}
