//! Rust values to API messages (used by the hub, which converts each event
//! once for all the subscribers that take it, and by the service).

use std::time::SystemTime;

use std::io::Write;

use prost::bytes::{BufMut, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use socktap_proto::v1 as pb;
use socktap_proto::wire::EncodedEvent;
use socktap_proto::{Duration, Timestamp};

use crate::event::{AttachMode, Event, EventKind, WallClock};
use crate::hub::{Loss, LossSource};

/// A wall-clock timestamp from ns since the Unix epoch.
pub fn timestamp(unix_ns: i128) -> Timestamp {
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
/// no allocation (addresses are formatted on the stack). The hub encodes
/// each event once this way and every stream sends the same bytes.
pub fn encode_event(e: &Event, clock: &WallClock, buf: &mut impl BufMut) {
    fn varint(tag: u32, v: u64, buf: &mut impl BufMut) {
        if v != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(v, buf);
        }
    }
    fn bytes(tag: u32, v: &[u8], buf: &mut impl BufMut) {
        if !v.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(v.len() as u64, buf);
            buf.put_slice(v);
        }
    }
    fn ip(addr: std::net::IpAddr, out: &mut [u8; 48]) -> usize {
        match addr {
            // The common case, written digit by digit (the formatter costs
            // several times more); the same text as `Display`.
            std::net::IpAddr::V4(v4) => {
                let mut n = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out[n] = b'.';
                        n += 1;
                    }
                    if octet >= 100 {
                        out[n] = b'0' + octet / 100;
                        n += 1;
                    }
                    if octet >= 10 {
                        out[n] = b'0' + octet / 10 % 10;
                        n += 1;
                    }
                    out[n] = b'0' + octet % 10;
                    n += 1;
                }
                n
            }
            std::net::IpAddr::V6(_) => {
                let mut w = std::io::Cursor::new(&mut out[..]);
                // 48 bytes hold the longest IPv6 text form (45).
                let _ = write!(w, "{addr}");
                w.position() as usize
            }
        }
    }

    varint(1, e.seq, buf);
    let t = timestamp(clock.unix_ns(e.timestamp_ns));
    let t_len = if t.seconds != 0 {
        1 + encoded_len_varint(t.seconds as u64)
    } else {
        0
    } + if t.nanos != 0 {
        1 + encoded_len_varint(t.nanos as i64 as u64)
    } else {
        0
    };
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(t_len as u64, buf);
    varint(1, t.seconds as u64, buf);
    varint(2, t.nanos as i64 as u64, buf);
    varint(3, e.timestamp_ns, buf);
    varint(4, e.cookie, buf);
    let kind = match e.kind {
        EventKind::Send => pb::EventKind::Send,
        EventKind::Recv => pb::EventKind::Recv,
    };
    varint(5, kind as i32 as u64, buf);
    varint(6, e.bytes.into(), buf);
    varint(7, e.errno.into(), buf);
    varint(8, e.pid.into(), buf);
    varint(9, e.tid.into(), buf);
    match std::str::from_utf8(e.comm.as_bytes()) {
        Ok(c) => bytes(10, c.as_bytes(), buf),
        Err(_) => bytes(10, e.comm.to_string_lossy().as_bytes(), buf),
    }
    varint(11, e.uid.into(), buf);
    varint(12, e.cgroup_id, buf);
    varint(13, e.netns.into(), buf);
    let family = if e.remote.is_ipv4() {
        pb::AddressFamily::Ipv4
    } else {
        pb::AddressFamily::Ipv6
    };
    varint(14, family as i32 as u64, buf);
    let mut text = [0u8; 48];
    let n = ip(e.local.ip(), &mut text);
    bytes(15, &text[..n], buf);
    varint(16, e.local.port().into(), buf);
    let n = ip(e.remote.ip(), &mut text);
    bytes(17, &text[..n], buf);
    varint(18, e.remote.port().into(), buf);
    varint(19, e.cpu.into(), buf);
    varint(20, mode(Some(e.mode)) as i32 as u64, buf);
}

/// [`encode_event`] into a shared buffer: the returned bytes are split off
/// `buf`, so the events of a batch share one allocation.
pub fn encoded_event(e: &Event, clock: &WallClock, buf: &mut BytesMut) -> EncodedEvent {
    encode_event(e, clock, buf);
    EncodedEvent(buf.split().freeze())
}

/// A loss notice as the API shows it.
pub fn loss(l: &Loss, clock: &WallClock) -> pb::LostEvents {
    let time = |ns: u64| (ns != 0).then(|| timestamp(clock.unix_ns(ns)));
    pb::LostEvents {
        source: match l.source {
            LossSource::KernelRingBuffer => pb::LossSource::KernelRingBuffer,
            LossSource::SubscriberQueue => pb::LossSource::SubscriberQueue,
            LossSource::History => pb::LossSource::History,
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
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
            (any::<u128>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
            Just(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)),
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
            (prop::collection::vec(any::<u8>(), 0..16), addr(), addr(), 0..3u8),
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
                netns: b.4,
                cpu: b.5,
                comm: Comm::from_kernel(&c.0),
                local: c.1,
                remote: c.2,
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
            let enc = encoded_event(&e, &clock, &mut direct);
            prop_assert_eq!(&enc.0[..], &event(&e, &clock).encode_to_vec()[..]);
        }
    }
}
