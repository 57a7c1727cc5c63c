//! How events, loss notices and status look: a table for people, proto3
//! JSON lines (the mapping grpcurl prints) for programs.

use std::fmt::Write as _;

use chrono::{Local, TimeZone};
use socktap_proto::v1 as api;

use crate::cgroups::CgroupNames;

/// The `watch` table. Its address columns fit an IPv4 endpoint; a wider
/// one (IPv6) widens its column from that row on, and the header is
/// written again above that row, so the rows below line up with it.
#[derive(Clone, Debug)]
pub struct Table {
    local: usize,
    remote: usize,
    /// Also the caller's thread id and uid and the socket's network
    /// namespace after PID, and the caller's cgroup last (`socktap watch
    /// --wide`).
    wide: bool,
    /// The cgroups' paths, where known; a cgroup without one shows its id.
    cgroups: CgroupNames,
}

impl Default for Table {
    fn default() -> Self {
        // "255.255.255.255:65535"
        Table {
            local: 21,
            remote: 21,
            wide: false,
            cgroups: CgroupNames::default(),
        }
    }
}

impl Table {
    /// The table with the thread, uid and network namespace columns after
    /// PID, and the cgroup (its path where known) last.
    pub fn wide() -> Self {
        Table {
            wide: true,
            ..Table::default()
        }
    }

    /// Whether it is the wide table, which shows cgroups.
    pub fn is_wide(&self) -> bool {
        self.wide
    }

    /// The cgroup paths it knows.
    pub fn cgroups(&self) -> &CgroupNames {
        &self.cgroups
    }

    /// The cgroup paths it shows, for the caller to fill.
    pub fn cgroups_mut(&mut self) -> &mut CgroupNames {
        &mut self.cgroups
    }

    /// The header line for the current widths.
    pub fn header(&self) -> String {
        self.line(
            ["TID", "UID", "NETNS", "CGROUP"],
            [
                "TIME", "COMM", "PID", "COOKIE", "DIR", "BYTES", "LOCAL", " ", "REMOTE", "ERR",
            ],
        )
    }

    /// The lines for one event: its row, after a header when a column
    /// widened for it.
    pub fn rows(&mut self, e: &api::Event) -> Vec<String> {
        let local = endpoint(&e.local_addr, e.local_port);
        let remote = endpoint(&e.remote_addr, e.remote_port);
        let mut lines = Vec::with_capacity(1);
        let (l, r) = (local.chars().count(), remote.chars().count());
        if l > self.local || (r > self.remote && e.errno != 0) {
            self.local = self.local.max(l);
            // The remote column matters only for what follows it (ERR).
            self.remote = self.remote.max(r);
            lines.push(self.header());
        }
        let time = e
            .time
            .as_ref()
            .and_then(|t| Local.timestamp_opt(t.seconds, t.nanos.max(0) as u32).single())
            .map(|t| t.format("%H:%M:%S%.6f").to_string())
            .unwrap_or_else(|| "-".into());
        // The arrow points the way the bytes went.
        let (dir, arrow) = match e.kind() {
            api::EventKind::Send => ("send", "→"),
            api::EventKind::Recv => ("recv", "←"),
            api::EventKind::Unspecified => ("?", "-"),
        };
        let err = if e.errno == 0 {
            String::new()
        } else {
            errno_name(e.errno)
        };
        let (pid, cookie, bytes) = (e.pid.to_string(), e.cookie.to_string(), e.bytes.to_string());
        let (tid, uid, netns) = (e.tid.to_string(), e.uid.to_string(), e.netns.to_string());
        let cgroup = match self.cgroups.name(e.cgroup_id) {
            Some(path) => path.to_owned(),
            None => e.cgroup_id.to_string(),
        };
        lines.push(self.line(
            [&tid, &uid, &netns, &cgroup],
            [&time, &e.comm, &pid, &cookie, dir, &bytes, &local, arrow, &remote, &err],
        ));
        lines
    }

    /// One line: every column padded to its width (numbers to the right),
    /// trailing spaces trimmed. The wide columns only in a wide table: the
    /// cgroup last, since a path may be long.
    fn line(
        &self,
        [tid, uid, netns, cgroup]: [&str; 4],
        [time, comm, pid, cookie, dir, bytes, local, arrow, remote, err]: [&str; 10],
    ) -> String {
        let (lw, rw) = (self.local, self.remote);
        let (ids, last) = if self.wide {
            (
                format!(" {tid:>7} {uid:>6} {netns:>10}"),
                format!("{err:<ERR_WIDTH$} {cgroup}"),
            )
        } else {
            (String::new(), err.to_owned())
        };
        format!(
            "{time:<15} {comm:<15} {pid:>7}{ids} {cookie:>12} {dir:<4} {bytes:>9} {local:<lw$} {arrow} {remote:<rw$} {last}"
        )
        .trim_end()
        .to_owned()
    }
}

/// The ERR column's width when a column follows it: the longest name
/// [`errno_name`] gives.
const ERR_WIDTH: usize = 12;

/// One event as a row of a [`Table`] whose columns fit it.
pub fn table_row(e: &api::Event) -> String {
    Table::default().rows(e).pop().unwrap_or_default()
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
        api::LossSource::KernelSkipped => {
            return format!(
                "-- up to {} calls not traced: the kernel skipped socktap's program on them (it was already running on that CPU) --",
                l.count
            );
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

/// An event's JSON line; with `cgroup_path`, it also has a `cgroupPath`
/// field, the path of its cgroup on socktapd's host (`watch -o json
/// --wide`), after the proto3 JSON mapping's fields.
pub fn event_json_line(e: &api::Event, cgroup_path: Option<&str>) -> String {
    let line = json_line(e);
    match cgroup_path {
        Some(path) => with_string_field(line, "cgroupPath", path),
        None => line,
    }
}

/// A JSON object's text with one more string field at its end.
fn with_string_field(mut object: String, key: &str, value: &str) -> String {
    if object.ends_with('}') {
        object.pop();
        if !object.ends_with('{') {
            object.push(',');
        }
        object.push_str(&json_line(&key));
        object.push(':');
        object.push_str(&json_line(&value));
        object.push('}');
    }
    object
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

/// Events the kernel has written (or is writing) that socktapd has not
/// read yet: what waits in the ring buffer. The counters are read one
/// after the other, so under load this is approximate.
fn not_yet_read(s: &api::GetStatusResponse) -> u64 {
    s.kernel_events_produced
        .saturating_sub(s.events_read.saturating_add(s.kernel_drops))
}

/// ", skipped N (calls the kernel did not run the program on)", or
/// nothing while there are none.
fn skipped(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", skipped {n} calls (the program was already running on that CPU)")
    }
}

/// kprobe mode's return probes: the calls in flight they track, and
/// whether what they miss is counted.
fn return_probes_text(r: &api::ReturnProbeStatus) -> String {
    let made = if r.tracefs {
        "made in tracefs"
    } else {
        "the kernel's default: socktapd could not write to tracefs, or --kretprobe-maxactive 0"
    };
    let missed = if r.misses_counted {
        "returns missed beyond that are counted as skipped calls"
    } else {
        "returns missed beyond that are NOT counted on this kernel (before 6.7): run socktapd as root to track more"
    };
    format!(
        "return probes: {} calls in flight each ({made}); {missed}",
        r.max_active
    )
}

/// Where events' cookies come from, when a socket may report 0 (kprobe
/// mode); None where every event has its socket's cookie.
fn cookies_text(s: &api::GetStatusResponse) -> Option<String> {
    match s.cookies() {
        api::CookieSource::AtConnect => {
            let mut text = String::from(
                "cookies: given by socktapd to each connection made or accepted since it started, and to those open then",
            );
            if s.cookie_own_namespace_only {
                text.push_str(" in its own network namespace (entering others takes CAP_SYS_ADMIN)");
            }
            match s.cookie_namespaces_missed {
                0 => {}
                1 => text.push_str(", except in 1 network namespace it could not dump (see socktapd's log)"),
                n => {
                    let _ = write!(text, ", except in {n} network namespaces it could not dump (see socktapd's log)");
                }
            }
            if s.cookie_own_namespace_only || s.cookie_namespaces_missed > 0 {
                text.push_str(
                    ": an older socket elsewhere reports 0 until something asks for its cookie (SO_COOKIE, ss)",
                );
            }
            Some(text)
        }
        api::CookieSource::AskedOnly => Some(
            "cookies: a socket reports 0 until something asks for its cookie (SO_COOKIE, ss): socktapd could not attach kprobe mode's cookie program (it takes CAP_NET_ADMIN; see socktapd's log)".into(),
        ),
        api::CookieSource::Programs | api::CookieSource::Unspecified => None,
    }
}

fn reader_text(r: &api::ReaderStatus) -> String {
    let place = if r.on_runtime {
        "on a runtime worker"
    } else {
        "on a thread of its own"
    };
    let woken = if r.drains_on_timer {
        "drains on its timer, kernel wakeups off"
    } else {
        "woken by the kernel"
    };
    if r.thread_id == 0 {
        return format!("reader: {place}, {woken}, no read yet");
    }
    let priority = if r.realtime_priority > 0 {
        format!("real-time priority {}", r.realtime_priority)
    } else {
        format!("nice {}", r.nice)
    };
    format!("reader: {place} (thread {}, {priority}), {woken}", r.thread_id)
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
        "events: {} read, {:.0}/s, kernel drops {}{}, kernel produced {} ({} not yet read), gate {}",
        s.events_read,
        s.events_per_second,
        s.kernel_drops,
        if s.return_probes.is_some() && s.kernel_skipped > 0 {
            format!(
                ", skipped {} calls (the program was already running on that CPU, or more calls were in flight than the return probes track)",
                s.kernel_skipped
            )
        } else {
            skipped(s.kernel_skipped)
        },
        s.kernel_events_produced,
        not_yet_read(s),
        if s.kernel_gate_open {
            "open"
        } else {
            "closed (no subscriber)"
        }
    );
    if let Some(r) = &s.return_probes {
        let _ = writeln!(out, "{}", return_probes_text(r));
    }
    if let Some(c) = cookies_text(s) {
        let _ = writeln!(out, "{c}");
    }
    if let Some(r) = &s.reader {
        let _ = writeln!(out, "{}", reader_text(r));
    }
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
        if s.kernel_cgroup_roots > 0 {
            let _ = writeln!(
                out,
                "kernel cgroup trees: {} cgroups named by path (a cgroup created below one is matched from its first call)",
                s.kernel_cgroup_roots
            );
        }
    }
    let _ = writeln!(out, "history: {}/{} events", s.history_len, s.history_capacity);
    let _ = writeln!(
        out,
        "queues: {} of {} KiB",
        s.queued_bytes.div_ceil(1024),
        s.queue_bytes_limit / 1024
    );
    let _ = writeln!(
        out,
        "subscribers: {} (since start, all together: {} events delivered, {} lost in their queues)",
        s.subscribers.len(),
        s.events_delivered,
        s.subscriber_lost
    );
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
            let _ = writeln!(out, "  {} (id {}){}", p.name, p.id, skipped(p.recursion_misses));
        }
    } else {
        let _ = writeln!(out, "programs:");
        for p in &s.programs {
            let avg = if p.run_count > 0 {
                p.run_time_ns as f64 / p.run_count as f64
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "  {} (id {})  runs {}  avg {avg:.0} ns{}",
                p.name,
                p.id,
                p.run_count,
                skipped(p.recursion_misses)
            );
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

    /// Where each header label sits: left-aligned columns start with
    /// their label, numbers end under it.
    fn assert_lined_up(header: &str, row: &str) {
        let h: Vec<char> = header.chars().collect();
        let r: Vec<char> = row.chars().collect();
        let starts = |s: &[char], i: usize| s[i] != ' ' && (i == 0 || s[i - 1] == ' ');
        let ends = |s: &[char], i: usize| s[i] != ' ' && s.get(i + 1).is_none_or(|&c| c == ' ');
        for (label, right) in [
            ("COMM", false),
            ("PID", true),
            ("COOKIE", true),
            ("DIR", false),
            ("BYTES", true),
            ("LOCAL", false),
            ("REMOTE", false),
            ("ERR", false),
        ] {
            let at = header.find(label).unwrap();
            let at = header[..at].chars().count();
            let i = if right { at + label.len() - 1 } else { at };
            let ok = if right { ends(&r, i) } else { starts(&r, i) };
            assert!(ok && h[i] != ' ', "{label} does not line up:\n{header}\n{row}");
        }
    }

    fn ipv6_error() -> api::Event {
        api::Event {
            comm: "envoy".into(),
            pid: 4_194_303,
            cookie: 987_654_321_012,
            kind: api::EventKind::Send as i32,
            errno: 104,
            local_addr: "2001:db8:85a3::8a2e:370:7334".into(),
            local_port: 51000,
            remote_addr: "2001:db8:ffff:ffff:ffff:ffff:ffff:1".into(),
            remote_port: 443,
            ..Default::default()
        }
    }

    #[test]
    fn a_wide_address_widens_its_column_and_the_header_comes_again() {
        let mut table = Table::default();
        let v4 = api::Event {
            comm: "curl".into(),
            pid: 42,
            cookie: 9001,
            kind: api::EventKind::Recv as i32,
            errno: 11,
            local_addr: "10.0.0.2".into(),
            local_port: 40000,
            remote_addr: "10.0.0.1".into(),
            remote_port: 443,
            ..Default::default()
        };
        let header = table.header();
        let rows = table.rows(&v4);
        assert_eq!(rows.len(), 1);
        assert_lined_up(&header, &rows[0]);
        // IPv6 does not fit: a new header, wider, and the row under it.
        let rows = table.rows(&ipv6_error());
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows[0].starts_with("TIME") && rows[0].len() > header.len(), "{rows:?}");
        assert_lined_up(&rows[0], &rows[1]);
        assert!(rows[1]
            .contains("[2001:db8:85a3::8a2e:370:7334]:51000 → [2001:db8:ffff:ffff:ffff:ffff:ffff:1]:443 ECONNRESET"));
        // From then on every row lines up with it, IPv4 too, and no new
        // header comes until something wider does.
        let wide = rows[0].clone();
        for e in [&v4, &ipv6_error()] {
            let rows = table.rows(e);
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_lined_up(&wide, &rows[0]);
        }
    }

    #[test]
    fn the_ring_backlog_is_what_the_kernel_produced_and_nobody_read_or_dropped() {
        let text = status_text(&api::GetStatusResponse {
            events_read: 1_000,
            kernel_drops: 20,
            kernel_events_produced: 1_500,
            ..Default::default()
        });
        assert!(
            text.contains("kernel drops 20, kernel produced 1500 (480 not yet read)"),
            "{text}"
        );
        // Counters read at different moments never make it negative.
        let text = status_text(&api::GetStatusResponse {
            events_read: 1_000,
            kernel_events_produced: 990,
            ..Default::default()
        });
        assert!(text.contains("(0 not yet read)"), "{text}");
    }

    #[test]
    fn a_wide_table_adds_thread_uid_and_netns_after_pid_and_the_cgroup_last() {
        let e = api::Event {
            comm: "nginx".into(),
            pid: 812,
            tid: 815,
            uid: 33,
            cgroup_id: 4711,
            netns: 4_026_531_840,
            cookie: 9001,
            kind: api::EventKind::Send as i32,
            bytes: 512,
            local_addr: "10.0.0.2".into(),
            local_port: 80,
            remote_addr: "10.0.0.1".into(),
            remote_port: 51000,
            errno: 32,
            ..Default::default()
        };
        let mut wide = Table::wide();
        let header = wide.header();
        // Not named yet: the cgroup's id.
        let row = wide.rows(&e).pop().unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cols[1..],
            &[
                "nginx",
                "812",
                "815",
                "33",
                "4026531840",
                "9001",
                "send",
                "512",
                "10.0.0.2:80",
                "→",
                "10.0.0.1:51000",
                "EPIPE",
                "4711"
            ]
        );
        assert_lined_up(&header, &row);
        for (label, value) in [("TID", "815"), ("UID", "33"), ("NETNS", "4026531840")] {
            let end = header.find(label).unwrap() + label.len();
            assert_eq!(
                &row[end - value.len()..end],
                value,
                "{label} does not line up:\n{header}\n{row}"
            );
        }
        // Named: its path, left-aligned under CGROUP, with or without an
        // error before it.
        let path = "/system.slice/nginx.service";
        wide.cgroups_mut().learn(
            &[4711],
            api::GetCgroupPathsResponse {
                paths: [(4711, path.to_owned())].into(),
            },
        );
        // Columns count characters: the arrow is one, of three bytes.
        let column = |line: &str, label: &str| line[..line.find(label).unwrap()].chars().count();
        for e in [e.clone(), api::Event { errno: 0, ..e.clone() }] {
            let row = wide.rows(&e).pop().unwrap();
            assert!(row.ends_with(path), "{row}");
            assert_eq!(
                column(&row, path),
                column(&header, "CGROUP"),
                "CGROUP does not line up:\n{header}\n{row}"
            );
        }
        // The narrow table has none of them.
        let narrow = Table::default();
        assert!(!narrow.header().contains("TID") && !narrow.header().contains("CGROUP"));
        assert!(!table_row(&e).contains("4711"));
    }

    #[test]
    fn program_run_times_only_when_counted() {
        let program = |run_count, run_time_ns| api::ProgramStatus {
            name: "st_tp_send".into(),
            id: 7,
            run_count,
            run_time_ns,
            recursion_misses: 0,
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
        assert!(!on.contains("skipped"), "{on}");
    }

    #[test]
    fn a_cgroup_path_is_added_to_an_events_json_as_a_json_string() {
        let e = api::Event {
            cookie: 7,
            cgroup_id: 9,
            ..Default::default()
        };
        assert_eq!(event_json_line(&e, None), json_line(&e));
        let line = event_json_line(&e, Some("/a \"b\"\\c"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["cgroupPath"], "/a \"b\"\\c", "{line}");
        assert_eq!(v["cookie"], "7", "{line}");
        assert!(line.ends_with(r#","cgroupPath":"/a \"b\"\\c"}"#), "{line}");
        assert_eq!(with_string_field("{}".into(), "k", "v"), r#"{"k":"v"}"#);
    }

    #[test]
    fn the_reader_is_shown_with_its_thread_and_priority() {
        let none = status_text(&api::GetStatusResponse::default());
        assert!(!none.contains("reader:"), "{none}");
        let text = |r: api::ReaderStatus| {
            status_text(&api::GetStatusResponse {
                reader: Some(r),
                ..Default::default()
            })
        };
        let low = text(api::ReaderStatus {
            on_runtime: true,
            thread_id: 41,
            ..Default::default()
        });
        assert!(
            low.contains("reader: on a runtime worker (thread 41, nice 0), woken by the kernel\n"),
            "{low}"
        );
        let high = text(api::ReaderStatus {
            drains_on_timer: true,
            thread_id: 42,
            nice: -5,
            ..Default::default()
        });
        assert!(
            high.contains(
                "reader: on a thread of its own (thread 42, nice -5), drains on its timer, kernel wakeups off\n"
            ),
            "{high}"
        );
        let realtime = text(api::ReaderStatus {
            on_runtime: true,
            thread_id: 43,
            realtime_priority: 2,
            ..Default::default()
        });
        assert!(realtime.contains("(thread 43, real-time priority 2)"), "{realtime}");
        let unread = text(api::ReaderStatus::default());
        assert!(
            unread.contains("reader: on a thread of its own, woken by the kernel, no read yet\n"),
            "{unread}"
        );
    }

    #[test]
    fn the_subscribers_totals_are_shown() {
        let text = status_text(&api::GetStatusResponse {
            events_delivered: 900,
            subscriber_lost: 12,
            ..Default::default()
        });
        assert!(
            text.contains(
                "subscribers: 0 (since start, all together: 900 events delivered, 12 lost in their queues)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn kprobe_modes_return_probes_are_shown_with_whether_their_misses_count() {
        let none = status_text(&api::GetStatusResponse::default());
        assert!(!none.contains("return probes"), "{none}");
        let tracefs = status_text(&api::GetStatusResponse {
            kernel_skipped: 5,
            return_probes: Some(api::ReturnProbeStatus {
                max_active: 4096,
                tracefs: true,
                misses_counted: true,
            }),
            ..Default::default()
        });
        assert!(
            tracefs.contains(
                "return probes: 4096 calls in flight each (made in tracefs); returns missed beyond that are counted as skipped calls\n"
            ),
            "{tracefs}"
        );
        assert!(
            tracefs.contains("skipped 5 calls (the program was already running on that CPU, or more calls were in flight than the return probes track)"),
            "{tracefs}"
        );
        let uncounted = status_text(&api::GetStatusResponse {
            return_probes: Some(api::ReturnProbeStatus {
                max_active: 10,
                tracefs: false,
                misses_counted: false,
            }),
            ..Default::default()
        });
        assert!(
            uncounted.contains("return probes: 10 calls in flight each (the kernel's default: socktapd could not write to tracefs, or --kretprobe-maxactive 0); returns missed beyond that are NOT counted on this kernel (before 6.7)"),
            "{uncounted}"
        );
    }

    #[test]
    fn cookies_are_explained_only_where_a_socket_may_report_0() {
        let missing = |c: api::CookieSource, missed: u32| {
            status_text(&api::GetStatusResponse {
                cookies: c as i32,
                cookie_namespaces_missed: missed,
                ..Default::default()
            })
        };
        let with = |c: api::CookieSource| missing(c, 0);
        for c in [api::CookieSource::Programs, api::CookieSource::Unspecified] {
            assert!(!with(c).contains("cookies:"), "{}", with(c));
        }
        let at_connect = with(api::CookieSource::AtConnect);
        assert!(
            at_connect
                .contains("cookies: given by socktapd to each connection made or accepted since it started, and to those open then\n"),
            "{at_connect}"
        );
        let two_missed = missing(api::CookieSource::AtConnect, 2);
        assert!(
            two_missed.contains(
                "and to those open then, except in 2 network namespaces it could not dump (see socktapd's log): an older socket elsewhere reports 0"
            ),
            "{two_missed}"
        );
        let own_only = status_text(&api::GetStatusResponse {
            cookies: api::CookieSource::AtConnect as i32,
            cookie_own_namespace_only: true,
            ..Default::default()
        });
        assert!(
            own_only.contains(
                "and to those open then in its own network namespace (entering others takes CAP_SYS_ADMIN): an older socket elsewhere reports 0"
            ),
            "{own_only}"
        );
        let asked = with(api::CookieSource::AskedOnly);
        assert!(
            asked.contains("cookies: a socket reports 0 until something asks for its cookie (SO_COOKIE, ss): socktapd could not attach"),
            "{asked}"
        );
    }

    #[test]
    fn calls_the_kernel_skipped_are_shown_where_there_are_some() {
        let skipping = api::ProgramStatus {
            name: "st_fexit_send".into(),
            id: 9,
            recursion_misses: 3,
            ..Default::default()
        };
        let text = status_text(&api::GetStatusResponse {
            kernel_drops: 2,
            kernel_skipped: 3,
            programs: vec![skipping.clone()],
            ..Default::default()
        });
        assert!(
            text.contains(
                "kernel drops 2, skipped 3 calls (the program was already running on that CPU), kernel produced"
            ),
            "{text}"
        );
        assert!(
            text.contains("  st_fexit_send (id 9), skipped 3 calls (the program was already running on that CPU)"),
            "{text}"
        );
        let counted = status_text(&api::GetStatusResponse {
            programs: vec![api::ProgramStatus {
                run_count: 10,
                run_time_ns: 1000,
                ..skipping
            }],
            ..Default::default()
        });
        assert!(counted.contains("runs 10  avg 100 ns, skipped 3 calls"), "{counted}");
        let line = lost_line(&api::LostEvents {
            source: api::LossSource::KernelSkipped as i32,
            count: 5,
            ..Default::default()
        });
        assert_eq!(
            line,
            "-- up to 5 calls not traced: the kernel skipped socktap's program on them (it was already running on that CPU) --"
        );
    }
}
