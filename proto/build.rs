//! Compiles socktap/v1/socktap.proto without a system protoc (protox), then
//! generates the prost types, the tonic client and server, and pbjson's
//! proto3-JSON serde impls. The encoded descriptor set is kept for reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO: &str = "socktap/v1/socktap.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile([PROTO], ["."])?;
    let descriptor = fds.encode_to_vec();
    std::fs::write(out.join("socktap_descriptor.bin"), &descriptor)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .build(&[".socktap.v1"])?;
    Ok(())
}
