//! Moving bytes between the two sides of a proxied connection.
use tokio::io::{AsyncRead, AsyncWrite};

/// Read buffer per direction: large enough for bulk throughput, small enough that thousands of
/// idle connections stay cheap.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Bytes moved by a finished copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the connection's initiator to its destination.
    pub sent: u64,
    /// From the destination back to the initiator.
    pub received: u64,
}

/// Copies both ways until both sides are done; an EOF on one side is passed on as a
/// half-close (`shutdown(SHUT_WR)`) to the other, so request/response protocols that half-close
/// keep working. Memory is bounded by two buffers.
pub async fn bidirectional<A, B>(client: &mut A, upstream: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (sent, received) =
        tokio::io::copy_bidirectional_with_sizes(client, upstream, BUFFER_SIZE, BUFFER_SIZE)
            .await?;
    Ok(Transferred { sent, received })
}
