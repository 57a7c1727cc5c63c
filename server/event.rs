//! The decoded form of one kernel event (`struct socktap_event` in
//! `bpf/event.h`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::probe::skel::types;

/// Which call the event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `tcp_sendmsg` / `sock_sendmsg` on a TCP socket.
    Send,
    /// `tcp_recvmsg` / `sock_recvmsg` on a TCP socket (MSG_PEEK excluded);
    /// in fentry and kprobe modes also `tcp_splice_read` (splice()).
    Recv,
}

/// How the BPF programs are attached to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// fexit programs (BPF trampolines) on `tcp_sendmsg` / `tcp_recvmsg` /
    /// `tcp_splice_read`.
    Fentry,
    /// kprobe + kretprobe on `tcp_sendmsg` / `tcp_recvmsg` / `tcp_splice_read`.
    Kprobe,
    /// BTF tracepoints `sock_send_length` / `sock_recv_length`, TCP only.
    Tracepoint,
}

impl AttachMode {
    /// Every mode, in the order `auto` tries them.
    pub const ALL: [AttachMode; 3] = [AttachMode::Fentry, AttachMode::Kprobe, AttachMode::Tracepoint];

    /// The mode's name as used on the command line and in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Fentry => "fentry",
            AttachMode::Kprobe => "kprobe",
            AttachMode::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The calling thread's name, as the kernel keeps it (at most 15 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm {
    bytes: [u8; 16],
    len: u8,
}

impl Comm {
    /// Builds a `Comm` from a NUL-padded kernel buffer.
    pub fn from_kernel(raw: &[u8]) -> Self {
        let len = raw.iter().take(15).position(|&b| b == 0).unwrap_or(raw.len().min(15));
        let mut bytes = [0u8; 16];
        bytes[..len].copy_from_slice(&raw[..len]);
        Comm { bytes, len: len as u8 }
    }

    /// The raw bytes, without padding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name, with any invalid UTF-8 replaced.
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string_lossy(), f)
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

/// An address and port, as [`SocketAddr`] has them without IPv6's flow
/// info and scope id: 20 bytes instead of 32. History holds tens of
/// thousands of events, two of these each.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    ip: IpAddr,
    port: u16,
}

impl Endpoint {
    /// The address and port.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Endpoint { ip, port }
    }

    /// The address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The port, host byte order.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// True for an IPv4 address.
    pub fn is_ipv4(&self) -> bool {
        self.ip.is_ipv4()
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint::new(a.ip(), a.port())
    }
}

impl From<Endpoint> for SocketAddr {
    fn from(e: Endpoint) -> Self {
        SocketAddr::new(e.ip, e.port)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = std::net::AddrParseError;
    /// `"127.0.0.1:80"` or `"[::1]:80"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<SocketAddr>().map(Endpoint::from)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&SocketAddr::from(*self), f)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One send or receive call on a TCP socket. Plain data (`Copy`), so the hub
/// can queue it per subscriber without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Kernel sequence number: one per event the kernel tried to emit, so a
    /// gap means events were lost (ring buffer full).
    pub seq: u64,
    /// When the call returned, CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// The socket cookie: the same number `getsockopt(SO_COOKIE)` returns.
    pub cookie: u64,
    /// Send or receive.
    pub kind: EventKind,
    /// Bytes the call moved; 0 for a failed call (see `errno`) or EOF.
    pub bytes: u32,
    /// The error the call returned (e.g. `EAGAIN`), 0 when it succeeded.
    pub errno: u32,
    /// Process id (tgid) of the caller.
    pub pid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// cgroup v2 id of the caller.
    pub cgroup_id: u64,
    /// The nearest cgroup at or above the caller's that a stream's filter
    /// names by path (`EventFilter.cgroup_paths`), as the kernel found it
    /// when the call was made; 0 when none. It lets such a filter match a
    /// cgroup created below the path from its first call, before socktapd
    /// has seen that cgroup. Not part of the API.
    pub cgroup_tree: u64,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// CPU the call ran on.
    pub cpu: u32,
    /// The calling thread's name.
    pub comm: Comm,
    /// Local address and port. IPv4-mapped IPv6 addresses are shown as IPv4.
    pub local: Endpoint,
    /// Remote address and port. IPv4-mapped IPv6 addresses are shown as IPv4.
    pub remote: Endpoint,
    /// The attach mode whose program produced the event.
    pub mode: AttachMode,
}

// History holds tens of thousands of events (65,536 by default): 16 bytes
// more per event is 1 MiB more of socktapd's memory.
const _: () = assert!(std::mem::size_of::<Event>() <= 128);

/// Why a ring buffer record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is shorter than `struct socktap_event`.
    #[error("record of {got} bytes is shorter than an event ({want} bytes)")]
    Short { got: usize, want: usize },
    /// A field holds a value the kernel program never writes.
    #[error("record has an invalid {field}: {value}")]
    Invalid { field: &'static str, value: u64 },
}

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

// SAFETY: `socktap_event` is a #[repr(C)] struct generated from the BPF
// object's BTF; it holds only integers and integer arrays, so every bit
// pattern is a valid value, and it has no padding (see bpf/event.h).
unsafe impl plain::Plain for types::socktap_event {}

/// The size of one kernel record.
pub const RECORD_SIZE: usize = std::mem::size_of::<types::socktap_event>();

impl Event {
    /// An IPv4 send on 127.0.0.1:1 → 127.0.0.1:2, for unit tests.
    #[cfg(test)]
    pub(crate) fn sample(seq: u64, cookie: u64) -> Event {
        Event {
            seq,
            timestamp_ns: 1,
            cookie,
            kind: EventKind::Send,
            bytes: 1,
            errno: 0,
            pid: 1,
            tid: 1,
            uid: 0,
            cgroup_id: 1,
            cgroup_tree: 0,
            netns: 1,
            cpu: 0,
            comm: Comm::from_kernel(b"t"),
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            mode: AttachMode::Tracepoint,
        }
    }

    /// Decodes one ring buffer record.
    pub fn decode(data: &[u8]) -> Result<Event, DecodeError> {
        // Ring buffer records are 8-byte aligned: read them in place.
        if let Ok(raw) = plain::from_bytes::<types::socktap_event>(data) {
            return Event::from_raw(raw);
        }
        let mut raw = types::socktap_event::default();
        plain::copy_from_bytes(&mut raw, data).map_err(|_| DecodeError::Short {
            got: data.len(),
            want: RECORD_SIZE,
        })?;
        Event::from_raw(&raw)
    }

    fn from_raw(raw: &types::socktap_event) -> Result<Event, DecodeError> {
        let kind = match types::socktap_event_kind(raw.kind.into()) {
            types::socktap_event_kind::SOCKTAP_KIND_SEND => EventKind::Send,
            types::socktap_event_kind::SOCKTAP_KIND_RECV => EventKind::Recv,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "kind",
                    value: raw.kind.into(),
                })
            }
        };
        let mode = match types::socktap_attach_mode(raw.mode.into()) {
            types::socktap_attach_mode::SOCKTAP_MODE_FENTRY => AttachMode::Fentry,
            types::socktap_attach_mode::SOCKTAP_MODE_KPROBE => AttachMode::Kprobe,
            types::socktap_attach_mode::SOCKTAP_MODE_TRACEPOINT => AttachMode::Tracepoint,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "mode",
                    value: raw.mode.into(),
                })
            }
        };
        let (local_ip, remote_ip) = match raw.family {
            AF_INET => (ipv4(&raw.saddr), ipv4(&raw.daddr)),
            AF_INET6 => (ipv6(&raw.saddr), ipv6(&raw.daddr)),
            other => {
                return Err(DecodeError::Invalid {
                    field: "family",
                    value: other.into(),
                })
            }
        };
        let (bytes, errno) = if raw.ret < 0 {
            (0, raw.ret.unsigned_abs())
        } else {
            (raw.ret as u32, 0)
        };
        let comm: [u8; 16] = raw.comm.map(|c| c as u8);
        Ok(Event {
            seq: raw.seq,
            timestamp_ns: raw.ts_ns,
            cookie: raw.cookie,
            kind,
            bytes,
            errno,
            pid: raw.pid,
            tid: raw.tid,
            uid: raw.uid,
            cgroup_id: raw.cgroup_id,
            cgroup_tree: raw.cgroup_tree,
            netns: raw.netns,
            cpu: raw.cpu,
            comm: Comm::from_kernel(&comm),
            local: Endpoint::new(local_ip, raw.sport),
            remote: Endpoint::new(remote_ip, raw.dport),
            mode,
        })
    }

    /// True when the call failed.
    pub fn is_error(&self) -> bool {
        self.errno != 0
    }
}

/// CLOCK_MONOTONIC now, in ns: the clock of [`Event::timestamp_ns`].
pub fn monotonic_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: FFI; `ts` is a live, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts kernel monotonic timestamps to wall-clock time, with the offset
/// between the two clocks taken once, when it is created.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    realtime_minus_monotonic_ns: i128,
}

impl Default for WallClock {
    fn default() -> Self {
        Self::now()
    }
}

impl WallClock {
    /// Takes the current offset between CLOCK_REALTIME and CLOCK_MONOTONIC.
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as i128;
        let real = clock_ns(libc::CLOCK_REALTIME) as i128;
        WallClock {
            realtime_minus_monotonic_ns: real - mono,
        }
    }

    /// A clock with a given offset (for tests and replays).
    pub fn with_offset(realtime_minus_monotonic_ns: i128) -> Self {
        WallClock {
            realtime_minus_monotonic_ns,
        }
    }

    /// Wall-clock nanoseconds since the Unix epoch of a monotonic timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> i128 {
        monotonic_ns as i128 + self.realtime_minus_monotonic_ns
    }

    /// The monotonic timestamp of a wall-clock time (ns since the epoch),
    /// saturating at 0.
    pub fn monotonic_ns(&self, unix_ns: i128) -> u64 {
        (unix_ns - self.realtime_minus_monotonic_ns).clamp(0, u64::MAX as i128) as u64
    }
}

fn ipv4(b: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn ipv6(b: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> types::socktap_event {
        let mut r = types::socktap_event {
            seq: 7,
            ts_ns: 1_000,
            cookie: 42,
            ret: 100,
            pid: 10,
            tid: 11,
            family: AF_INET6,
            sport: 8080,
            dport: 5555,
            kind: 2,
            mode: 3,
            ..Default::default()
        };
        r.saddr = Ipv6Addr::LOCALHOST.octets();
        r.daddr = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        r.comm[..4].copy_from_slice(&[b'c' as i8, b'u' as i8, b'r' as i8, b'l' as i8]);
        r
    }

    fn bytes_of(r: &types::socktap_event) -> Vec<u8> {
        // SAFETY: see the Plain impl above: the struct has no padding.
        unsafe { plain::as_bytes(r) }.to_vec()
    }

    #[test]
    fn decodes_every_field() {
        let e = Event::decode(&bytes_of(&raw())).unwrap();
        assert_eq!(e.seq, 7);
        assert_eq!(e.cookie, 42);
        assert_eq!(e.kind, EventKind::Recv);
        assert_eq!(e.mode, AttachMode::Tracepoint);
        assert_eq!((e.bytes, e.errno), (100, 0));
        assert_eq!(e.local, "[::1]:8080".parse().unwrap());
        assert_eq!(e.remote, "10.1.2.3:5555".parse().unwrap(), "v4-mapped shown as IPv4");
        assert_eq!(e.comm.to_string(), "curl");
    }

    #[test]
    fn negative_return_is_an_errno_not_bytes() {
        let mut r = raw();
        r.ret = -libc::EAGAIN;
        let e = Event::decode(&bytes_of(&r)).unwrap();
        assert_eq!((e.bytes, e.errno), (0, libc::EAGAIN as u32));
        assert!(e.is_error());
    }

    #[test]
    fn rejects_short_and_invalid_records() {
        let b = bytes_of(&raw());
        assert!(matches!(Event::decode(&b[..10]), Err(DecodeError::Short { .. })));
        let mut r = raw();
        r.kind = 9;
        assert_eq!(
            Event::decode(&bytes_of(&r)),
            Err(DecodeError::Invalid {
                field: "kind",
                value: 9
            })
        );
        let mut r = raw();
        r.family = 1;
        assert!(matches!(
            Event::decode(&bytes_of(&r)),
            Err(DecodeError::Invalid { field: "family", .. })
        ));
    }

    #[test]
    fn comm_stops_at_nul_and_caps_at_15() {
        assert_eq!(Comm::from_kernel(b"ab\0cd").as_bytes(), b"ab");
        assert_eq!(Comm::from_kernel(&[b'x'; 16]).as_bytes().len(), 15);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn raw_strategy() -> impl Strategy<Value = types::socktap_event> {
            (
                any::<[u64; 5]>(),
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                any::<i32>(),
                any::<[u32; 5]>(),
                any::<[u16; 2]>(),
                prop_oneof![Just(AF_INET), Just(AF_INET6), any::<u16>()],
                0u8..4,
                0u8..5,
                any::<[u8; 16]>(),
            )
                .prop_map(|(w, saddr, daddr, ret, ids, ports, family, kind, mode, comm)| {
                    types::socktap_event {
                        seq: w[0],
                        ts_ns: w[1],
                        cookie: w[2],
                        cgroup_id: w[3],
                        cgroup_tree: w[4],
                        saddr,
                        daddr,
                        ret,
                        pid: ids[0],
                        tid: ids[1],
                        uid: ids[2],
                        netns: ids[3],
                        cpu: ids[4],
                        sport: ports[0],
                        dport: ports[1],
                        family,
                        kind,
                        mode,
                        comm: comm.map(|b| b as i8),
                    }
                })
        }

        proptest! {
            /// Any bytes at all: an event or an error, never a panic.
            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = Event::decode(&bytes);
            }

            /// A well-formed record decodes to exactly its fields.
            #[test]
            fn decoding_keeps_every_field(raw in raw_strategy()) {
                match Event::decode(&bytes_of(&raw)) {
                    Ok(e) => {
                        prop_assert_eq!((e.seq, e.timestamp_ns, e.cookie, e.cgroup_id, e.cgroup_tree), (raw.seq, raw.ts_ns, raw.cookie, raw.cgroup_id, raw.cgroup_tree));
                        prop_assert_eq!((e.pid, e.tid, e.uid, e.netns, e.cpu), (raw.pid, raw.tid, raw.uid, raw.netns, raw.cpu));
                        prop_assert_eq!((e.local.port(), e.remote.port()), (raw.sport, raw.dport));
                        if raw.ret < 0 {
                            prop_assert_eq!((e.bytes, e.errno as i64), (0, -(raw.ret as i64)));
                        } else {
                            prop_assert_eq!((e.bytes, e.errno), (raw.ret as u32, 0));
                        }
                        prop_assert!(e.comm.as_bytes().len() <= 15);
                    }
                    Err(DecodeError::Invalid { field, .. }) => {
                        let bad_kind = !(1..=2).contains(&raw.kind);
                        let bad_mode = !(1..=3).contains(&raw.mode);
                        let bad_family = raw.family != AF_INET && raw.family != AF_INET6;
                        prop_assert!(bad_kind || bad_mode || bad_family, "rejected a valid record on {}", field);
                    }
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
        }
    }
}
