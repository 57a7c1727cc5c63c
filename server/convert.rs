//! Rust values to API messages (used by the hub, which converts each event
//! once for all the subscribers that take it, and by the service).

use std::time::SystemTime;

use socktap_proto::v1 as pb;
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
