//! The gRPC endpoint: TLS (a serving certificate from the mesh root), HTTP/2, one unary
//! method, `CreateCertificate`; answers in the gRPC way (`grpc-status` in trailers, or a
//! trailers-only response for refusals).
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::authorize::{Authorizer, Denial};
use crate::identity::{
    BuiltinCa, SignRequest,
    ca_client::percent_encode,
    ca_wire::{
        CREATE_CERTIFICATE_PATH, CertificateRequest, CertificateResponse, GrpcCode, MAX_MESSAGE,
        frame, unframe,
    },
};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of every answer: data frames, then trailers.
pub type GrpcBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// What each request needs.
pub struct Signer {
    pub ca: BuiltinCa,
    pub authorizer: Authorizer,
}

/// Serves `CreateCertificate` on `listener` with `tls` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    signer: Arc<Signer>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: keep serving the connections we have.
                tracing::warn!(target: "sluice::ca", %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let signer = signer.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(target: "sluice::ca", %peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| {
                let signer = signer.clone();
                async move { Ok::<_, Infallible>(signer.handle(req, peer).await) }
            });
            if let Err(error) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(target: "sluice::ca", %peer, %error, "connection ended");
            }
        });
    }
}

impl Signer {
    async fn handle(
        &self,
        req: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> http::Response<GrpcBody> {
        if req.uri().path() != CREATE_CERTIFICATE_PATH {
            return refusal(GrpcCode::Unimplemented, "unknown method");
        }
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let body = match Limited::new(req.into_body(), MAX_MESSAGE + 5)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => return refusal(GrpcCode::ResourceExhausted, &format!("request body: {e}")),
        };
        let request = match unframe(&body).and_then(CertificateRequest::decode) {
            Ok(r) => r,
            Err(e) => return refusal(GrpcCode::InvalidArgument, &e.to_string()),
        };
        let grant = match self.authorizer.authorize(&token, &request).await {
            Ok(grant) => grant,
            Err(denial) => {
                tracing::info!(target: "sluice::ca", %peer, reason = %denial, "refused");
                return deny(&denial);
            }
        };
        let signed = self.ca.sign_now(&SignRequest {
            identity: &grant.identity,
            csr: grant.csr.clone(),
            ttl: grant.ttl,
        });
        let chain = match signed {
            Ok(chain) => chain,
            Err(error) => {
                tracing::warn!(target: "sluice::ca", identity = %grant.identity, %error, "signing failed");
                return refusal(GrpcCode::Internal, &error.to_string());
            }
        };
        tracing::info!(
            target: "sluice::ca",
            identity = %grant.identity,
            caller = %format!("{}/{}", grant.caller.namespace, grant.caller.service_account),
            pod = grant.caller.pod_name.as_deref().unwrap_or(""),
            node = grant.node.as_deref().unwrap_or(""),
            ttl_s = grant.ttl.as_secs(),
            "signed"
        );
        let pem_of = |der: &[u8]| {
            pem::encode_config(
                &pem::Pem::new("CERTIFICATE", der.to_vec()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        };
        let mut cert_chain = vec![pem_of(chain.leaf())];
        cert_chain.extend(chain.intermediates().iter().map(|c| pem_of(c)));
        cert_chain.extend(chain.roots().iter().map(|c| pem_of(c)));
        let message = CertificateResponse { cert_chain }.encode();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        response(vec![
            Ok(Frame::data(Bytes::from(frame(&message)))),
            Ok(Frame::trailers(trailers)),
        ])
    }
}

fn deny(denial: &Denial) -> http::Response<GrpcBody> {
    refusal(denial.code(), &denial.to_string())
}

/// A refusal: no message, the status in the trailers (sent as a trailers frame, so that gRPC
/// clients that read the status only at the end of the stream find it).
fn refusal(code: GrpcCode, message: &str) -> http::Response<GrpcBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code as u32));
    if let Ok(v) = http::HeaderValue::from_str(&percent_encode(message)) {
        trailers.insert("grpc-message", v);
    }
    response(vec![Ok(Frame::trailers(trailers))])
}

fn response(frames: Vec<Result<Frame<Bytes>, Infallible>>) -> http::Response<GrpcBody> {
    let mut resp = http::Response::new(StreamBody::new(futures::stream::iter(frames)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}
