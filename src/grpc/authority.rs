//! Accepts any HTTP/2 `:authority` on the broker's socket.
//!
//! gRPC C-core clients (Python, Ruby, PHP, C++), grpc-java and grpcurl send
//! the socket path as `:authority`, raw or percent-encoded. h2, under tonic,
//! answers such a request with RST_STREAM(PROTOCOL_ERROR), and a non-UTF-8
//! authority with a connection error. The broker never uses the authority
//! (a caller is known by SO_PEERCRED), so [`AnyAuthority`] sits between each
//! accepted connection and h2. It passes the client's bytes through as they
//! are, decoding each header block to follow the client's HPACK table, until
//! a block carries an authority h2 would refuse. From then on, for that
//! connection only, it re-encodes every header block without dynamic-table
//! references, with [`REPLACEMENT_AUTHORITY`] in place of such an authority.
//! What h2 would refuse anyway (bad HPACK, oversized header lists, broken
//! framing) closes the connection with a connection error. The server's
//! replies pass untouched. docs/authority.md tells why this is not a patched h2.

mod frames;
mod header_block;
mod hpack;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tonic::transport::server::Connected;

use crate::peer::Peer;

use frames::Rewriter;

/// The SETTINGS_MAX_FRAME_SIZE the broker's server advertises: RFC 9113's
/// default (16 KiB), which re-encoded blocks are split to.
pub const MAX_FRAME_SIZE: usize = 16 * 1024;
/// The SETTINGS_MAX_HEADER_LIST_SIZE the broker's server advertises (16
/// KiB, hyper's default); a longer header list closes the connection.
pub const MAX_HEADER_LIST_SIZE: usize = 16 * 1024;
/// The HPACK dynamic table size h2 allows clients (SETTINGS_HEADER_TABLE_SIZE,
/// RFC 9113's default 4096, which the server does not change).
pub const HEADER_TABLE_SIZE: usize = 4096;
/// What h2 sees in place of an authority it would refuse.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";

/// A connection whose client may send any `:authority`; see the module
/// documentation.
pub struct AnyAuthority<IO> {
    io: IO,
    rewriter: Rewriter,
    /// Who is at the other end, for the log line of a refused connection.
    peer: Option<Peer>,
}

impl<IO> AnyAuthority<IO> {
    /// Wraps a newly accepted connection from `peer`.
    pub fn new(io: IO, peer: Option<Peer>) -> Self {
        Self {
            io,
            rewriter: Rewriter::new(),
            peer,
        }
    }
}

impl<IO: Connected> Connected for AnyAuthority<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AnyAuthority<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let ready = this.rewriter.ready();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.rewriter.advance_ready(n);
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_closed() {
                return Poll::Ready(Ok(()));
            }
            // Read straight into h2's buffer; only a header block is taken
            // out of it, to be passed on once complete.
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            let (passed, refusal) = this.rewriter.accept(&buf.filled()[before..]);
            if let Some(refusal) = refusal {
                tracing::debug!(
                    uid = this.peer.map(|p| p.uid),
                    pid = this.peer.and_then(|p| p.pid),
                    %refusal,
                    "closing an HTTP/2 connection with a connection error"
                );
            }
            buf.set_filled(before + passed);
            if passed > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

crate::connections::write_through!(AnyAuthority);

#[cfg(test)]
mod tests;
