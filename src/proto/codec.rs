//! The protobuf codec of the gRPC service. tonic's default codec allocates
//! an 8 KiB encode buffer per call, and a watch stream keeps its encode
//! buffer for its whole life. This codec starts with no encode buffer and
//! reserves exactly what each message needs, so an idle watcher keeps only
//! the last token it was sent (about 0.5 KiB) instead of kilobytes of slack.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// Initial size, and growth step, of the decode buffer (1 KiB): requests
/// are small and their buffer lives only while a request is read.
pub const DECODE_BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a stream yields to the runtime (tonic's 32 KiB).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec with an [`ExactEncoder`] and [`DECODE_BUFFER_BYTES`]
/// decode buffers; the generated client and server use it (see `build.rs`).
#[derive(Debug, Clone, Copy)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ExactEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ExactEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_THRESHOLD))
    }
}

/// Encodes prost messages into a buffer that starts empty and is grown to
/// exactly each message's encoded length.
#[derive(Debug, Clone, Copy)]
pub struct ExactEncoder<T>(PhantomData<T>);

impl<T: prost::Message> Encoder for ExactEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|error| Status::internal(format!("cannot encode a message: {error}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(0, YIELD_THRESHOLD)
    }
}
