//! socktap's gRPC API, package `socktap.v1`: the generated message types,
//! the tonic client and server, and proto3-JSON (serde) impls that match
//! what grpcurl prints.
//!
//! The `.proto` file (`proto/socktap/v1/socktap.proto`) documents every
//! message and field.

/// The `socktap.v1` package.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("socktap.v1");
    include!(concat!(env!("OUT_DIR"), "/socktap.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of the API (and the well-known types it
/// imports), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/socktap_descriptor.bin"));

pub use pbjson_types::{Duration, Timestamp};
