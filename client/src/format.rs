//! How events, loss notices and status look: a table for people, proto3
//! JSON lines (the mapping grpcurl prints) for programs.

use std::fmt::Write as _;

use chrono::{Local, TimeZone};
use socktap_proto::v1 as api;

/// The table's header line.
pub const TABLE_HEADER: &str =
    "TIME            COMM             PID       COOKIE DIR     BYTES LOCAL                   REMOTE                 ERR";

/// One event as a table row.
pub fn table_row(e: &api::Event) -> String {
    let time = e
        .time
        .as_ref()
        .and_then(|t| Local.timestamp_opt(t.seconds, t.nanos.max(0) as u32).single())
        .map(|t| t.format("%H:%M:%S%.6f").to_string())
        .unwrap_or_else(|| "-".into());
    // The arrow points the way the bytes went.
    let (dir, arrow) = match e.kind() {
        api::EventKind::Send => ("send", '→'),
        api::EventKind::Recv => ("recv", '←'),
        api::EventKind::Unspecified => ("?", '-'),
    };
    let err = if e.errno == 0 {
        String::new()
    } else {
        errno_name(e.errno)
    };
    format!(
        "{time:<15} {comm:<15} {pid:>5} {cookie:>12} {dir:<4} {bytes:>9} {local:<21} {arrow} {remote:<21} {err}",
        comm = e.comm,
        pid = e.pid,
        cookie = e.cookie,
        bytes = e.bytes,
        local = endpoint(&e.local_addr, e.local_port),
        remote = endpoint(&e.remote_addr, e.remote_port),
    )
    .trim_end()
    .to_owned()
}

/// `addr:port`, with brackets around IPv6 addresses.
pub fn endpoint(addr: &str, port: u32) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// A loss notice as one line for people.
pub fn lost_line(l: &api::LostEvents) -> String {
    let source = match l.source() {
        api::LossSource::KernelRingBuffer => "in the kernel ring buffer (full)",
        api::LossSource::SubscriberQueue => "in socktapd: this client read too slowly",
        api::LossSource::History => "from history: too old to replay",
        api::LossSource::Restart => {
            return "-- socktapd restarted: what it had not sent, and calls made while it was down, are lost (how many is unknown) --".into();
        }
        api::LossSource::Unspecified => "(unknown source)",
    };
    let mut s = format!("-- lost {} events {source}", l.count);
    if l.first_seq != 0 || l.last_seq != 0 {
        let _ = write!(s, " (seq {}..={})", l.first_seq, l.last_seq);
    }
    s.push_str(" --");
    s
}

/// Any API message as one line of proto3 JSON.
pub fn json_line<T: serde::Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).unwrap_or_else(|e| format!("{{\"error\":\"cannot encode: {e}\"}}"))
}

/// The symbolic name of a socket errno (Linux numbering).
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        1 => "EPERM",
        4 => "EINTR",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        14 => "EFAULT",
        22 => "EINVAL",
        32 => "EPIPE",
        90 => "EMSGSIZE",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        105 => "ENOBUFS",
        107 => "ENOTCONN",
        108 => "ESHUTDOWN",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}

/// The status for people.
pub fn status_text(s: &api::GetStatusResponse) -> String {
    let mode = match s.attach_mode() {
        api::AttachMode::Fentry => "fentry",
        api::AttachMode::Kprobe => "kprobe",
        api::AttachMode::Tracepoint => "tracepoint",
        api::AttachMode::Synthetic => "synthetic",
        api::AttachMode::Unspecified => "unknown",
    };
    let uptime = s.uptime.as_ref().map(|d| d.seconds).unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "socktapd {}  kernel {}  attach mode {mode}  up {}s  instance {}",
        s.version, s.kernel_release, uptime, s.instance_id
    );
    for r in &s.refused_modes {
        let _ = writeln!(out, "  passed over: {r}");
    }
    let _ = writeln!(
        out,
        "events: {} read, {:.0}/s, kernel drops {}, kernel produced {}, gate {}",
        s.events_read,
        s.events_per_second,
        s.kernel_drops,
        s.kernel_events_produced,
        if s.kernel_gate_open {
            "open"
        } else {
            "closed (no subscriber)"
        }
    );
    if s.kernel_gate_open {
        let _ = writeln!(
            out,
            "kernel prefilter: {}",
            if s.kernel_prefilter {
                format!(
                    "on, {} values (only calls some subscriber may want)",
                    s.kernel_prefilter_keys
                )
            } else {
                "off (every call is an event)".to_string()
            }
        );
    }
    let _ = writeln!(out, "history: {}/{} events", s.history_len, s.history_capacity);
    let _ = writeln!(
        out,
        "queues: {} of {} KiB",
        s.queued_bytes.div_ceil(1024),
        s.queue_bytes_limit / 1024
    );
    let _ = writeln!(out, "subscribers: {}", s.subscribers.len());
    for sub in &s.subscribers {
        let filters = sub.request.as_ref().map(json_line).unwrap_or_default();
        let _ = writeln!(
            out,
            "  #{} {}  matched {} delivered {} lost {} queued {} ({} KiB, share {} KiB)  {filters}",
            sub.id,
            sub.peer,
            sub.matched,
            sub.delivered,
            sub.lost,
            sub.queued,
            sub.queued_bytes.div_ceil(1024),
            sub.queue_byte_share / 1024
        );
    }
    if s.programs.iter().all(|p| p.run_count == 0) {
        // The kernel counts runs only with BPF statistics on: "runs 0, avg
        // 0 ns" would read as measured.
        if !s.programs.is_empty() {
            let _ = writeln!(
                out,
                "programs (no runs counted: run statistics need socktapd --bpf-stats):"
            );
        }
        for p in &s.programs {
            let _ = writeln!(out, "  {} (id {})", p.name, p.id);
        }
    } else {
        let _ = writeln!(out, "programs:");
        for p in &s.programs {
            let avg = if p.run_count > 0 {
                p.run_time_ns as f64 / p.run_count as f64
            } else {
                0.0
            };
            let _ = writeln!(out, "  {} (id {})  runs {}  avg {avg:.0} ns", p.name, p.id, p.run_count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_has_every_column() {
        let e = api::Event {
            time: Some(socktap_proto::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_000,
            }),
            comm: "curl".into(),
            pid: 42,
            cookie: 9001,
            kind: api::EventKind::Recv as i32,
            bytes: 1448,
            errno: 0,
            local_addr: "::1".into(),
            local_port: 5555,
            remote_addr: "10.0.0.1".into(),
            remote_port: 443,
            ..Default::default()
        };
        let row = table_row(&e);
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(cols[0].ends_with(".123456"), "{row}");
        assert_eq!(&cols[1..8], &["curl", "42", "9001", "recv", "1448", "[::1]:5555", "←"]);
        assert_eq!(cols[8], "10.0.0.1:443");
        let sent = table_row(&api::Event {
            kind: api::EventKind::Send as i32,
            ..e.clone()
        });
        assert!(sent.contains("[::1]:5555            → 10.0.0.1:443"), "{sent}");
        let err = table_row(&api::Event { errno: 11, ..e });
        assert!(err.ends_with("EAGAIN"), "{err}");
    }

    #[test]
    fn program_run_times_only_when_counted() {
        let program = |run_count, run_time_ns| api::ProgramStatus {
            name: "st_tp_send".into(),
            id: 7,
            run_count,
            run_time_ns,
        };
        let off = status_text(&api::GetStatusResponse {
            programs: vec![program(0, 0)],
            ..Default::default()
        });
        assert!(off.contains("need socktapd --bpf-stats"), "{off}");
        assert!(!off.contains("avg"), "{off}");
        let on = status_text(&api::GetStatusResponse {
            programs: vec![program(4, 2000)],
            ..Default::default()
        });
        assert!(on.contains("st_tp_send (id 7)  runs 4  avg 500 ns"), "{on}");
    }
}
