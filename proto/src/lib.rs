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

mod timestamp;

pub use pbjson_types::Duration;
pub use timestamp::Timestamp;

/// The most ids one `GetCgroupPaths` request may name (socktapd refuses
/// more with INVALID_ARGUMENT).
pub const MAX_CGROUP_IDS_PER_REQUEST: usize = 1024;

/// The server's view of `socktap.v1.Socktap`, identical on the wire: an
/// [`EventBatch`](v1::EventBatch) travels as [`EncodedEventBatch`](wire::EncodedEventBatch), runs of
/// events that the server encoded once, each event already framed as an
/// entry of the batch's `events` field, and shared by every stream that
/// sends them. Clients use [`v1`].
pub mod wire {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/wire/socktap.v1.rs"));

    use prost::bytes::{Buf, BufMut, Bytes};
    use prost::encoding::{decode_varint, skip_field, DecodeContext, WireType};
    use prost::DecodeError;

    /// The key of an entry of `EventBatch.events`: field 1, length-delimited.
    pub const EVENTS_ENTRY_KEY: u8 = (1 << 3) | WireType::LengthDelimited as u8;

    /// Consecutive entries of `socktap.v1.EventBatch.events`, already
    /// encoded: for each event its key ([`EVENTS_ENTRY_KEY`]), its length
    /// and its fields. A slice of the buffer the hub encodes a batch into,
    /// so a run costs one reference count however many events it holds.
    #[derive(Clone, Default, PartialEq, Eq)]
    pub struct EncodedEvents {
        bytes: Bytes,
        count: usize,
    }

    impl std::fmt::Debug for EncodedEvents {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "EncodedEvents({} events, {} bytes)", self.count, self.bytes.len())
        }
    }

    impl EncodedEvents {
        /// `count` framed entries, as the encoder wrote them. The caller
        /// vouches for the framing; [`Self::split_to`] walks it.
        pub fn from_framed(bytes: Bytes, count: usize) -> Self {
            EncodedEvents { bytes, count }
        }

        /// The number of events.
        pub fn count(&self) -> usize {
            self.count
        }

        /// The framed entries.
        pub fn bytes(&self) -> &Bytes {
            &self.bytes
        }

        /// Removes the first `n` events (all, if fewer) and returns them.
        pub fn split_to(&mut self, n: usize) -> EncodedEvents {
            self.split_fitting(n, usize::MAX)
        }

        /// Removes and returns the longest prefix of at most `max_events`
        /// events and at most `max_bytes` bytes (possibly none).
        pub fn split_fitting(&mut self, max_events: usize, max_bytes: usize) -> EncodedEvents {
            if max_events >= self.count && max_bytes >= self.bytes.len() {
                return std::mem::take(self);
            }
            let mut rest = &self.bytes[..];
            let mut n = 0;
            while n < max_events.min(self.count) {
                // Each entry: the one-byte key, a varint length, the event.
                // The encoder wrote it, so it is well formed; a malformed
                // one ends the walk at the end of the buffer, never past it.
                let mut entry = &rest[1.min(rest.len())..];
                let len = decode_varint(&mut entry).unwrap_or(entry.len() as u64) as usize;
                let next = &entry[len.min(entry.len())..];
                if self.bytes.len() - next.len() > max_bytes {
                    break;
                }
                rest = next;
                n += 1;
            }
            let at = self.bytes.len() - rest.len();
            self.count -= n;
            EncodedEvents {
                bytes: self.bytes.split_to(at),
                count: n,
            }
        }
    }

    /// `socktap.v1.EventBatch` as the server sends it: runs of pre-encoded
    /// events, written into the frame as they are and never decoded on the
    /// server.
    #[derive(Clone, Default, PartialEq)]
    pub struct EncodedEventBatch {
        /// The events, in seq order.
        pub runs: Vec<EncodedEvents>,
    }

    impl std::fmt::Debug for EncodedEventBatch {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let events: usize = self.runs.iter().map(EncodedEvents::count).sum();
            write!(f, "EncodedEventBatch({events} events in {} runs)", self.runs.len())
        }
    }

    impl prost::Message for EncodedEventBatch {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            for run in &self.runs {
                buf.put_slice(&run.bytes);
            }
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), DecodeError> {
            // The server only sends batches; should one ever be decoded,
            // its fields are skipped rather than misread.
            skip_field(wire_type, tag, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            self.runs.iter().map(|r| r.bytes.len()).sum()
        }

        fn clear(&mut self) {
            self.runs.clear();
        }
    }

    /// The codec of the server's view: prost's, except that its encoder
    /// reserves room for a whole message before writing it. tonic's
    /// buffer starts at 8 KiB, and a batch of up to 64 KiB written into it
    /// run by run made it grow, and copy what it held, several times per
    /// message.
    #[derive(Debug, Clone)]
    pub struct WireCodec<T, U>(std::marker::PhantomData<(T, U)>);

    impl<T, U> Default for WireCodec<T, U> {
        fn default() -> Self {
            WireCodec(std::marker::PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for WireCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ReservingEncoder<T>;
        type Decoder = tonic_prost::ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ReservingEncoder(std::marker::PhantomData)
        }

        fn decoder(&mut self) -> Self::Decoder {
            tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::default())
        }
    }

    /// Encodes a message into tonic's buffer after reserving its length.
    #[derive(Debug, Clone)]
    pub struct ReservingEncoder<T>(std::marker::PhantomData<T>);

    impl<T: prost::Message> tonic::codec::Encoder for ReservingEncoder<T> {
        type Item = T;
        type Error = tonic::Status;

        fn encode(&mut self, item: T, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
            buf.reserve(item.encoded_len());
            item.encode(buf)
                .map_err(|e| tonic::Status::internal(format!("encoding a response: {e}")))
        }
    }
}
