//! Rust values to API messages. The hub sends events as the bytes of
//! [`encode_event`], written once for all subscribers; [`event`] builds the
//! same message as a value (for library users, and as the reference the
//! encoder is tested against).

use std::time::SystemTime;

use std::io::Write;

use prost::bytes::{BufMut, BytesMut};
use prost::encoding::{encoded_len_varint, WireType};
use socktap_proto::v1 as pb;
use socktap_proto::wire::{EncodedEvents, EVENTS_ENTRY_KEY};
use socktap_proto::{Duration, Timestamp};

use crate::event::{AttachMode, Event, EventKind, WallClock};
use crate::hub::{Loss, LossSource};

/// A wall-clock timestamp from ns since the Unix epoch.
pub fn timestamp(unix_ns: i128) -> Timestamp {
    if let Ok(ns) = u64::try_from(unix_ns) {
        // The usual case, without 128-bit division.
        return Timestamp {
            seconds: (ns / 1_000_000_000) as i64,
            nanos: (ns % 1_000_000_000) as i32,
        };
    }
    Timestamp {
        seconds: unix_ns.div_euclid(1_000_000_000) as i64,
        nanos: unix_ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// A timestamp from a `SystemTime`.
pub fn system_timestamp(t: SystemTime) -> Timestamp {
    let ns = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    timestamp(ns)
}

/// A protobuf duration.
pub fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The API's attach mode.
pub fn mode(m: Option<AttachMode>) -> pb::AttachMode {
    match m {
        Some(AttachMode::Fentry) => pb::AttachMode::Fentry,
        Some(AttachMode::Kprobe) => pb::AttachMode::Kprobe,
        Some(AttachMode::Tracepoint) => pb::AttachMode::Tracepoint,
        None => pb::AttachMode::Synthetic,
    }
}

/// Where events' cookies come from, as the API says it.
pub fn cookie_source(c: crate::probe::CookieSource) -> pb::CookieSource {
    use crate::probe::CookieSource;
    match c {
        CookieSource::Programs => pb::CookieSource::Programs,
        CookieSource::AtConnect => pb::CookieSource::AtConnect,
        CookieSource::AskedOnly => pb::CookieSource::AskedOnly,
    }
}

/// One event as the API shows it.
pub fn event(e: &Event, clock: &WallClock) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: Some(timestamp(clock.unix_ns(e.timestamp_ns))),
        monotonic_ns: e.timestamp_ns,
        cookie: e.cookie,
        kind: match e.kind {
            EventKind::Send => pb::EventKind::Send,
            EventKind::Recv => pb::EventKind::Recv,
        } as i32,
        bytes: e.bytes,
        errno: e.errno,
        pid: e.pid,
        tid: e.tid,
        comm: e.comm.to_string(),
        uid: e.uid,
        cgroup_id: e.cgroup_id,
        netns: e.netns,
        family: if e.remote.is_ipv4() {
            pb::AddressFamily::Ipv4
        } else {
            pb::AddressFamily::Ipv6
        } as i32,
        local_addr: e.local.ip().to_string(),
        local_port: e.local.port().into(),
        remote_addr: e.remote.ip().to_string(),
        remote_port: e.remote.port().into(),
        cpu: e.cpu,
        mode: mode(Some(e.mode)) as i32,
    }
}

/// Appends the protobuf encoding of `convert::event(e, clock)` to `buf`,
/// byte for byte what prost would write, without building the message:
/// no allocation, the fields written into a stack buffer and appended in
/// one copy (addresses formatted on the stack, IPv4 digit by digit).
pub fn encode_event(e: &Event, clock: &WallClock, buf: &mut impl BufMut) {
    let mut w = FieldWriter::default();
    write_event_fields(&mut w, e, clock, None);
    buf.put_slice(w.written());
}

/// Writes events as entries of `socktap.v1.EventBatch.events`: each its
/// key, its length, then [`encode_event`]'s bytes. The hub encodes each
/// event once this way; a run of consecutive entries is a ready part of a
/// batch. One scratch buffer serves every event (a fresh one per event
/// would be zeroed per event).
///
/// It also keeps, per thread and per socket, the encoded bytes of the
/// fields that come from them and sit next to each other in field order:
/// the caller's (`pid` to `cgroup_id`, 8–12) and the socket's (`netns` to
/// `remote_port`, 13–18). An event whose values are the same as the ones
/// kept copies those bytes instead of encoding the fields again (the
/// addresses as text, above all); any difference encodes them afresh.
/// Keep one encoder for many batches: that is what its memory is for.
#[derive(Default)]
pub struct EntryEncoder {
    w: FieldWriter,
    kept: Kept,
}

impl EntryEncoder {
    /// Appends `e` as an entry of `socktap.v1.EventBatch.events`.
    pub fn encode(&mut self, e: &Event, clock: &WallClock, buf: &mut impl BufMut) {
        self.w.len = ENTRY_HEAD;
        write_event_fields(&mut self.w, e, clock, Some(&mut self.kept));
        buf.put_slice(self.w.framed());
    }
}

/// The values that fields 8–12 are encoded from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct CallerKey {
    pid: u32,
    tid: u32,
    comm: crate::event::Comm,
    uid: u32,
    cgroup_id: u64,
}

/// The values that fields 13–18 are encoded from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct SocketKey {
    netns: u32,
    local: crate::event::Endpoint,
    remote: crate::event::Endpoint,
}

/// Fields 8–12 take at most 76 bytes: four varints with their keys (6, 6,
/// 6 and 11 bytes) and a 15-byte name that may grow to 45 as lossy UTF-8.
const CALLER_BYTES: usize = 80;
/// Fields 13–18 take at most 110 bytes: two 45-byte IPv6 texts with key
/// and length, two ports, the namespace and the family.
const SOCKET_BYTES: usize = 112;
/// Threads and sockets kept, each in the slot its tid or cookie picks.
const KEPT_SLOTS: usize = 64;

/// Encoded fields, and the values they were encoded from.
#[derive(Clone, Copy)]
struct Encoded<K, const N: usize> {
    key: Option<K>,
    len: usize,
    bytes: [u8; N],
}

impl<K, const N: usize> Default for Encoded<K, N> {
    fn default() -> Self {
        Encoded {
            key: None,
            len: 0,
            bytes: [0; N],
        }
    }
}

struct Kept {
    callers: Box<[Encoded<CallerKey, CALLER_BYTES>]>,
    sockets: Box<[Encoded<SocketKey, SOCKET_BYTES>]>,
}

impl Default for Kept {
    fn default() -> Self {
        Kept {
            callers: vec![Encoded::default(); KEPT_SLOTS].into_boxed_slice(),
            sockets: vec![Encoded::default(); KEPT_SLOTS].into_boxed_slice(),
        }
    }
}

impl<K: PartialEq + Copy, const N: usize> Encoded<K, N> {
    /// Writes the fields `write` writes for `key`: from the bytes kept when
    /// they were written for an equal key, or by `write`, keeping them.
    fn write(&mut self, key: K, w: &mut FieldWriter, write: impl FnOnce(&mut FieldWriter)) {
        if self.key == Some(key) {
            w.buf[w.len..w.len + self.len].copy_from_slice(&self.bytes[..self.len]);
            w.len += self.len;
            return;
        }
        let start = w.len;
        write(w);
        let n = w.len - start;
        if n <= N {
            self.bytes[..n].copy_from_slice(&w.buf[start..w.len]);
            self.len = n;
            self.key = Some(key);
        } else {
            self.key = None;
        }
    }
}

/// Events as one run of batch entries (history replay; the hub encodes live
/// batches itself with an [`EntryEncoder`]).
pub fn encoded_events(
    events: impl IntoIterator<Item = impl std::borrow::Borrow<Event>>,
    clock: &WallClock,
    buf: &mut BytesMut,
) -> EncodedEvents {
    let mut count = 0;
    let mut encoder = EntryEncoder::default();
    for e in events {
        encoder.encode(e.borrow(), clock, buf);
        count += 1;
    }
    EncodedEvents::from_framed(buf.split().freeze(), count)
}

/// Writes `e`'s fields into `w` (empty: at [`ENTRY_HEAD`]), with the
/// caller's and the socket's fields from `kept` when it has them.
fn write_event_fields(w: &mut FieldWriter, e: &Event, clock: &WallClock, kept: Option<&mut Kept>) {
    w.varint(1, e.seq);
    let t = timestamp(clock.unix_ns(e.timestamp_ns));
    let (secs, nanos) = (t.seconds as u64, t.nanos as i64 as u64);
    let t_len = if secs != 0 { 1 + encoded_len_varint(secs) } else { 0 }
        + if nanos != 0 { 1 + encoded_len_varint(nanos) } else { 0 };
    w.key(2, WireType::LengthDelimited);
    w.raw_varint(t_len as u64);
    w.varint(1, secs);
    w.varint(2, nanos);
    w.varint(3, e.timestamp_ns);
    w.varint(4, e.cookie);
    let kind = match e.kind {
        EventKind::Send => pb::EventKind::Send,
        EventKind::Recv => pb::EventKind::Recv,
    };
    w.varint(5, kind as i32 as u64);
    w.varint(6, e.bytes.into());
    w.varint(7, e.errno.into());
    let caller = |w: &mut FieldWriter| {
        w.varint(8, e.pid.into());
        w.varint(9, e.tid.into());
        // Thread names are nearly always ASCII, which is UTF-8 and checked
        // inline; anything else goes through the full check.
        let comm = e.comm.as_bytes();
        if comm.is_ascii() {
            w.bytes(10, comm);
        } else {
            w.bytes(10, e.comm.to_string_lossy().as_bytes());
        }
        w.varint(11, e.uid.into());
        w.varint(12, e.cgroup_id);
    };
    let socket = |w: &mut FieldWriter| {
        w.varint(13, e.netns.into());
        let family = if e.remote.is_ipv4() {
            pb::AddressFamily::Ipv4
        } else {
            pb::AddressFamily::Ipv6
        };
        w.varint(14, family as i32 as u64);
        w.ip(15, e.local.ip());
        w.varint(16, e.local.port().into());
        w.ip(17, e.remote.ip());
        w.varint(18, e.remote.port().into());
    };
    match kept {
        Some(kept) => {
            let key = CallerKey {
                pid: e.pid,
                tid: e.tid,
                comm: e.comm,
                uid: e.uid,
                cgroup_id: e.cgroup_id,
            };
            kept.callers[e.tid as usize % KEPT_SLOTS].write(key, w, caller);
            let key = SocketKey {
                netns: e.netns,
                local: e.local,
                remote: e.remote,
            };
            kept.sockets[e.cookie as usize % KEPT_SLOTS].write(key, w, socket);
        }
        None => {
            caller(w);
            socket(w);
        }
    }
    w.varint(19, e.cpu.into());
    w.varint(20, mode(Some(e.mode)) as i32 as u64);
}

/// A protobuf writer into a fixed stack buffer, for [`encode_event`]: an
/// event takes at most ~330 bytes (20 varint fields, a 16-byte name, two
/// 45-byte addresses). The fields start after [`ENTRY_HEAD`] free bytes, so
/// that [`FieldWriter::framed`] can put the entry's key and length in front
/// without moving them.
struct FieldWriter {
    buf: [u8; 512],
    len: usize,
}

/// Room for an entry's key (one byte) and length (at most two varint bytes:
/// the buffer is smaller than 2^14).
const ENTRY_HEAD: usize = 3;

impl Default for FieldWriter {
    fn default() -> Self {
        FieldWriter {
            buf: [0; 512],
            len: ENTRY_HEAD,
        }
    }
}

impl FieldWriter {
    /// The fields written.
    fn written(&self) -> &[u8] {
        &self.buf[ENTRY_HEAD..self.len]
    }

    /// The fields as an entry of `EventBatch.events`: key, length, fields.
    fn framed(&mut self) -> &[u8] {
        let n = self.len - ENTRY_HEAD;
        let start = if n < 0x80 {
            self.buf[2] = n as u8;
            2
        } else {
            self.buf[1] = n as u8 | 0x80;
            self.buf[2] = (n >> 7) as u8;
            1
        };
        self.buf[start - 1] = EVENTS_ENTRY_KEY;
        &self.buf[start - 1..self.len]
    }

    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf[self.len] = v as u8 | 0x80;
            self.len += 1;
            v >>= 7;
        }
        self.buf[self.len] = v as u8;
        self.len += 1;
    }

    fn key(&mut self, tag: u32, wire_type: WireType) {
        self.raw_varint(u64::from(tag << 3 | wire_type as u32));
    }

    /// A varint field; proto3 leaves out zero.
    fn varint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, WireType::Varint);
            self.raw_varint(v);
        }
    }

    /// A string or bytes field; proto3 leaves out empty ones.
    fn bytes(&mut self, tag: u32, v: &[u8]) {
        if !v.is_empty() {
            self.key(tag, WireType::LengthDelimited);
            self.raw_varint(v.len() as u64);
            self.buf[self.len..self.len + v.len()].copy_from_slice(v);
            self.len += v.len();
        }
    }

    /// An address as text, the same as `Display`.
    fn ip(&mut self, tag: u32, addr: std::net::IpAddr) {
        let mut text = [0u8; 48];
        let n = match addr {
            // The common case, digit by digit (the formatter costs several
            // times more).
            std::net::IpAddr::V4(v4) => {
                let mut n = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text[n] = b'.';
                        n += 1;
                    }
                    if octet >= 100 {
                        text[n] = b'0' + octet / 100;
                        n += 1;
                    }
                    if octet >= 10 {
                        text[n] = b'0' + octet / 10 % 10;
                        n += 1;
                    }
                    text[n] = b'0' + octet % 10;
                    n += 1;
                }
                n
            }
            std::net::IpAddr::V6(_) => {
                let mut c = std::io::Cursor::new(&mut text[..]);
                // 48 bytes hold the longest IPv6 text form (45).
                let _ = write!(c, "{addr}");
                c.position() as usize
            }
        };
        self.bytes(tag, &text[..n]);
    }
}

/// A loss notice as the API shows it.
pub fn loss(l: &Loss, clock: &WallClock) -> pb::LostEvents {
    let time = |ns: u64| (ns != 0).then(|| timestamp(clock.unix_ns(ns)));
    pb::LostEvents {
        source: match l.source {
            LossSource::KernelRingBuffer => pb::LossSource::KernelRingBuffer,
            LossSource::SubscriberQueue => pb::LossSource::SubscriberQueue,
            LossSource::History => pb::LossSource::History,
            LossSource::Restart => pb::LossSource::Restart,
            LossSource::KernelSkipped => pb::LossSource::KernelSkipped,
        } as i32,
        count: l.count,
        first_seq: l.first_seq,
        last_seq: l.last_seq,
        first_time: time(l.first_ns),
        last_time: time(l.last_ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Comm;
    use proptest::prelude::*;
    use prost::Message;
    use socktap_proto::wire;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
            (any::<u128>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
            Just(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)),
        ]
    }

    /// Thread names: any bytes (invalid UTF-8 included), or the usual
    /// ASCII ones.
    fn comm_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..16),
            "[ -~]{0,16}".prop_map(String::into_bytes),
        ]
    }

    fn any_event() -> impl Strategy<Value = Event> {
        (
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<u32>(),
                any::<u32>(),
            ),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
            ),
            (comm_bytes(), addr(), addr(), 0..3u8),
        )
            .prop_map(|(a, b, c)| Event {
                seq: a.0,
                timestamp_ns: a.1,
                cookie: a.2,
                kind: if a.3 { EventKind::Send } else { EventKind::Recv },
                bytes: a.4,
                errno: a.5,
                pid: b.0,
                tid: b.1,
                uid: b.2,
                cgroup_id: b.3,
                cgroup_tree: 0,
                netns: b.4,
                cpu: b.5,
                comm: Comm::from_kernel(&c.0),
                local: c.1.into(),
                remote: c.2.into(),
                mode: AttachMode::ALL[c.3 as usize],
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The hand-written encoder writes exactly prost's bytes for the
        /// converted message (so clients decode the same event), for any
        /// event and clock offset, including zero fields, invalid UTF-8
        /// names, negative wall times and every address form.
        #[test]
        fn encode_event_is_byte_identical_to_prost(e in any_event(), offset in any::<i64>()) {
            let clock = WallClock::with_offset(offset as i128);
            let mut direct = BytesMut::new();
            encode_event(&e, &clock, &mut direct);
            prop_assert_eq!(&direct[..], &event(&e, &clock).encode_to_vec()[..]);
        }

        /// One encoder over many events whose every caller and socket
        /// field takes one of two values, drawn independently (so two
        /// events often differ in one field only), with tids and cookies
        /// 64 apart that share a slot: every entry is prost's bytes for its
        /// own event, never fields kept for another.
        #[test]
        fn kept_fields_are_used_only_for_equal_values(
            picks in prop::collection::vec(prop::collection::vec(any::<bool>(), 10), 1..300),
            base in any_event(),
            other in any_event(),
        ) {
            let clock = WallClock::with_offset(0);
            let mut encoder = EntryEncoder::default();
            for (i, p) in picks.iter().enumerate() {
                macro_rules! pick {
                    ($k:expr, $a:expr, $b:expr) => {
                        if p[$k] { $a } else { $b }
                    };
                }
                let e = Event {
                    seq: i as u64,
                    tid: pick!(0, 7, 7 + 64),
                    cookie: pick!(1, 9, 9 + 64),
                    pid: pick!(2, base.pid, other.pid),
                    comm: pick!(3, base.comm, other.comm),
                    uid: pick!(4, base.uid, other.uid),
                    cgroup_id: pick!(5, base.cgroup_id, other.cgroup_id),
                    netns: pick!(6, base.netns, other.netns),
                    local: pick!(7, base.local, other.local),
                    remote: pick!(8, base.remote, other.remote),
                    ..base
                };
                // Ports alone, addresses kept.
                let e = if p[9] {
                    Event {
                        local: crate::event::Endpoint::new(e.local.ip(), e.local.port() ^ 1),
                        ..e
                    }
                } else {
                    e
                };
                let mut buf = BytesMut::new();
                encoder.encode(&e, &clock, &mut buf);
                let want = pb::EventBatch { events: vec![event(&e, &clock)] }.encode_to_vec();
                prop_assert_eq!(&buf[..], &want[..], "event {}", i);
            }
        }

        /// A response built from runs of framed entries, cut anywhere by
        /// `split_fitting` (by count, and by bytes), is byte for byte the
        /// response prost writes for the same events: what clients decode.
        #[test]
        fn batches_of_framed_runs_are_byte_identical_to_prost(
            events in prop::collection::vec(any_event(), 1..40),
            cuts in prop::collection::vec((0..45usize, 0..2000usize), 0..6),
        ) {
            let clock = WallClock::with_offset(0);
            let mut buf = BytesMut::new();
            let mut all = encoded_events(&events, &clock, &mut buf);
            prop_assert_eq!(all.count(), events.len());
            let mut runs = Vec::new();
            for (n, max_bytes) in cuts {
                let run = all.split_fitting(n, max_bytes);
                prop_assert!(run.bytes().len() <= max_bytes);
                if run.count() > 0 {
                    runs.push(run);
                }
            }
            runs.push(all);
            prop_assert_eq!(runs.iter().map(EncodedEvents::count).sum::<usize>(), events.len());
            // Each run alone holds exactly its events: the cuts fall between
            // entries, where the counts say.
            let mut first = 0;
            for run in &runs {
                let alone = wire::WatchEventsResponse {
                    message: Some(wire::watch_events_response::Message::Events(wire::EncodedEventBatch {
                        runs: vec![run.clone()],
                    })),
                    instance_id: 0,
                };
                let decoded = pb::WatchEventsResponse::decode(&alone.encode_to_vec()[..])
                    .map_err(|e| TestCaseError::fail(format!("a run does not decode alone: {e}")))?;
                let Some(pb::watch_events_response::Message::Events(b)) = decoded.message else {
                    return Err(TestCaseError::fail("not a batch"));
                };
                let want: Vec<_> = events[first..first + run.count()].iter().map(|e| event(e, &clock)).collect();
                prop_assert_eq!(b.events, want);
                first += run.count();
            }
            let ours = wire::WatchEventsResponse {
                message: Some(wire::watch_events_response::Message::Events(wire::EncodedEventBatch { runs })),
                instance_id: 0x5eed_0000_0000_0001,
            };
            let reference = pb::WatchEventsResponse {
                message: Some(pb::watch_events_response::Message::Events(pb::EventBatch {
                    events: events.iter().map(|e| event(e, &clock)).collect(),
                })),
                instance_id: 0x5eed_0000_0000_0001,
            };
            prop_assert_eq!(ours.encode_to_vec(), reference.encode_to_vec());
        }
    }
}
