//! One HTTP/1.1 GET to the agent's admin endpoint, through hyper.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::OperatorError;

/// The agent answers from memory; a minute covers a large dump on a busy node.
const PATIENCE: Duration = Duration::from_secs(60);

/// The body of `GET path` at `addr`, if it answered 200.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Bytes, OperatorError> {
    let http = |message: String| OperatorError::Http {
        addr,
        path: path.to_owned(),
        message,
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| OperatorError::Connect { addr, source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(OperatorError::Status {
                addr,
                path: path.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        Ok(body)
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .map_err(|_| http(format!("no answer within {PATIENCE:?}")))?
}
