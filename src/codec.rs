//! The protobuf codec of the gRPC service. tonic's default codec allocates
//! an 8 KiB buffer per call, and a watch stream keeps its encode buffer for
//! its whole life; tokens are about 1 KiB, so 1 KiB buffers (grown in 1 KiB
//! steps when a message needs more) keep each idle watcher small.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size, and growth step, of the encode and decode buffers (1 KiB).
pub const BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a stream yields to the runtime (tonic's 32 KiB).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_BYTES`] buffers; the generated
/// client and server use it (see `build.rs`).
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
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
