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

/// The server's view of `socktap.v1.Socktap`, identical on the wire: an
/// [`Event`](v1::Event) travels as [`EncodedEvent`], bytes encoded once by
/// the server and shared by every stream that sends it. Clients use [`v1`].
pub mod wire {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/wire/socktap.v1.rs"));

    use prost::bytes::{Buf, BufMut, Bytes};
    use prost::encoding::{skip_field, DecodeContext, WireType};
    use prost::DecodeError;

    /// A `socktap.v1.Event` already encoded (the message's fields, without
    /// its tag and length). Sending it copies the bytes into the frame; it
    /// is never decoded on the server.
    #[derive(Clone, Default, PartialEq, Eq)]
    pub struct EncodedEvent(pub Bytes);

    impl std::fmt::Debug for EncodedEvent {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "EncodedEvent({} bytes)", self.0.len())
        }
    }

    impl prost::Message for EncodedEvent {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            buf.put_slice(&self.0);
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), DecodeError> {
            // The server only sends events; should one ever be decoded,
            // its fields are skipped rather than misread.
            skip_field(wire_type, tag, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            self.0.len()
        }

        fn clear(&mut self) {
            self.0 = Bytes::new();
        }
    }
}
