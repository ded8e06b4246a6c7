//! Compiles the gRPC contract with `protox` (pure Rust, no `protoc`) and
//! keeps the encoded descriptor set for gRPC reflection.

use prost::Message;

const PROTO: &str = "proto/tokenbroker/v1/tokenbroker.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tokenbroker_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Small per-call buffers: see `src/proto/codec.rs`.
        .codec_path("crate::proto::codec::CompactCodec")
        // These carry credentials: `src/proto.rs` gives them a redacting `Debug`.
        .skip_debug([
            ".tokenbroker.v1.AccessToken",
            ".tokenbroker.v1.IdToken",
            ".tokenbroker.v1.InvalidateTokenRequest",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}
