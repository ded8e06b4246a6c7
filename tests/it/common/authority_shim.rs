//! A client-side connection that sends the `:authority` of our choosing,
//! as gRPC C-core, grpc-java and grpcurl do on a Unix socket: the h2 and
//! tonic clients cannot, since `http::Uri` refuses such authorities. It sits
//! under the client and rewrites each outgoing header block with
//! httlib-hpack, an HPACK implementation independent of the broker's. Used
//! by the tests and by `examples/loadgen/main.rs`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use httlib_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the client puts in `:authority`.
#[derive(Clone, Debug)]
pub enum Authority {
    /// These bytes, whatever they are.
    Bytes(Vec<u8>),
    /// No `:authority` field at all.
    Absent,
}

const PREFACE_LEN: usize = 24;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const MAX_FRAME: usize = 16 * 1024;

/// A connection whose outgoing header blocks carry [`Authority`].
pub struct AuthorityShim<IO> {
    io: IO,
    authority: Authority,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    /// Bytes written by the client, not yet parsed.
    written: Vec<u8>,
    preface_left: usize,
    /// An open header block: stream, HEADERS flags, fragment.
    block: Option<(u32, u8, Vec<u8>)>,
    /// Rewritten bytes not yet sent.
    out: Vec<u8>,
}

impl<IO> AuthorityShim<IO> {
    /// Wraps a client connection.
    pub fn new(io: IO, authority: Authority) -> Self {
        Self {
            io,
            authority,
            decoder: Decoder::with_dynamic_size(4096),
            encoder: Encoder::with_dynamic_size(4096),
            written: Vec::new(),
            preface_left: PREFACE_LEN,
            block: None,
            out: Vec::new(),
        }
    }

    fn parse(&mut self) {
        let preface = self.preface_left.min(self.written.len());
        self.out.extend(self.written.drain(..preface));
        self.preface_left -= preface;
        while self.written.len() >= 9 {
            let head = &self.written[..9];
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            if self.written.len() < 9 + len {
                return;
            }
            let frame: Vec<u8> = self.written.drain(..9 + len).collect();
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes(frame[5..9].try_into().unwrap());
            match kind {
                HEADERS => {
                    assert_eq!(flags & (PADDED | PRIORITY), 0, "the h2 client pads nothing");
                    self.block = Some((stream, flags, Vec::new()));
                }
                CONTINUATION => {}
                _ => {
                    self.out.extend_from_slice(&frame);
                    continue;
                }
            }
            let block = self.block.as_mut().expect("CONTINUATION follows HEADERS");
            block.2.extend_from_slice(&frame[9..]);
            if flags & END_HEADERS != 0 {
                let (stream, flags, fragment) = self.block.take().unwrap();
                self.rewrite(stream, flags, fragment);
            }
        }
    }

    fn rewrite(&mut self, stream: u32, flags: u8, mut fragment: Vec<u8>) {
        let mut fields = Vec::new();
        self.decoder.decode(&mut fragment, &mut fields).unwrap();
        let mut encoded = Vec::new();
        for (name, value, _) in fields {
            let value = match (&name[..], &self.authority) {
                (b":authority", Authority::Absent) => continue,
                (b":authority", Authority::Bytes(bytes)) => bytes.clone(),
                _ => value,
            };
            // Indexed like a real client, so the broker follows a table.
            let flags = Encoder::BEST_FORMAT | Encoder::WITH_INDEXING | Encoder::HUFFMAN_VALUE;
            self.encoder
                .encode((name, value, flags), &mut encoded)
                .unwrap();
        }
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        let mut first_flags = flags & !END_HEADERS;
        while let Some(chunk) = chunks.next() {
            let end = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            let len = (chunk.len() as u32).to_be_bytes();
            self.out.extend_from_slice(&len[1..]);
            self.out.push(kind);
            self.out.push(first_flags | end);
            self.out.extend(stream.to_be_bytes());
            self.out.extend_from_slice(chunk);
            kind = CONTINUATION;
            first_flags = 0;
        }
    }
}

impl<IO: AsyncWrite + Unpin> AuthorityShim<IO> {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityShim<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        this.written.extend_from_slice(buf);
        this.parse();
        // Whatever is left goes out on the next write or flush.
        let _ = this.poll_send(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
