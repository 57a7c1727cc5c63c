//! Compiles socktap/v1/socktap.proto without a system protoc (protox), then
//! generates the prost types, the tonic client and server, and pbjson's
//! proto3-JSON serde impls. The encoded descriptor set is kept for reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO: &str = "socktap/v1/socktap.proto";

/// The message the server-side view generates itself: the one that holds the
/// pre-encoded batch.
const WIRE_OWN: [&str; 1] = ["WatchEventsResponse"];

/// The message the server-side view replaces with a hand-written type.
const WIRE_ENCODED: (&str, &str) = ("EventBatch", "crate::wire::EncodedEventBatch");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile([PROTO], ["."])?;
    let descriptor = fds.encode_to_vec();
    std::fs::write(out.join("socktap_descriptor.bin"), &descriptor)?;

    // Well-known types from pbjson-types (proto3 JSON included), except
    // Timestamp: pbjson-types writes it with `+00:00`, where the JSON
    // mapping writes `Z` (crate::Timestamp, src/timestamp.rs).
    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(".google.protobuf.Timestamp", "crate::Timestamp")
        .compile_fds(fds.clone())?;
    // The server's view of the same service: identical on the wire, but an
    // EventBatch is runs of pre-encoded events (`wire::EncodedEventBatch`),
    // so socktapd encodes each event once and shares the bytes among
    // subscribers. Every other type is the public one.
    let wire_out = out.join("wire");
    std::fs::create_dir_all(&wire_out)?;
    let mut wire = tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::wire::WireCodec")
        .out_dir(&wire_out)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(".google.protobuf.Timestamp", "crate::Timestamp")
        .extern_path(format!(".socktap.v1.{}", WIRE_ENCODED.0), WIRE_ENCODED.1);
    for file in &fds.file {
        if file.package() != "socktap.v1" {
            continue;
        }
        let names = file
            .message_type
            .iter()
            .map(|m| m.name())
            .chain(file.enum_type.iter().map(|e| e.name()));
        for name in names {
            if !WIRE_OWN.contains(&name) && name != WIRE_ENCODED.0 {
                wire = wire.extern_path(format!(".socktap.v1.{name}"), format!("crate::v1::{name}"));
            }
        }
    }
    wire.compile_fds(fds.clone())?;

    // Every field in the JSON, zeros included (as `grpcurl -emit-defaults`
    // prints): a JSON-lines consumer finds `seq`, `uid`, `errno` on every
    // line, not only when they are non-zero.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .emit_fields()
        .build(&[".socktap.v1"])?;
    Ok(())
}
