//! `socktap top`: per-socket, per-process and per-cgroup totals over each
//! refresh interval, computed on the client from the event stream.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::SystemTime;

use socktap_proto::v1 as api;

use crate::cgroups::CgroupNames;
use crate::format::endpoint;

/// Bytes and calls in each direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// send calls.
    pub tx_calls: u64,
    /// recv calls.
    pub rx_calls: u64,
}

impl Traffic {
    fn add(&mut self, e: &api::Event) {
        match e.kind() {
            api::EventKind::Send => {
                self.tx_bytes += e.bytes as u64;
                self.tx_calls += 1;
            }
            api::EventKind::Recv => {
                self.rx_bytes += e.bytes as u64;
                self.rx_calls += 1;
            }
            api::EventKind::Unspecified => {}
        }
    }
    /// Bytes both ways.
    pub fn total(&self) -> u64 {
        self.tx_bytes + self.rx_bytes
    }
}

/// One socket's row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketRow {
    /// The socket cookie.
    pub cookie: u64,
    /// The last process seen using it.
    pub pid: u32,
    /// Its thread name.
    pub comm: String,
    /// Its local address and port (`10.0.0.2:40000`, `[::1]:8080`).
    pub local: String,
    /// Its remote address and port.
    pub remote: String,
    /// Its traffic.
    pub traffic: Traffic,
}

/// One process's row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessRow {
    /// pid (tgid).
    pub pid: u32,
    /// Thread name last seen.
    pub comm: String,
    /// Distinct sockets seen.
    pub sockets: usize,
    /// Its traffic.
    pub traffic: Traffic,
}

/// One cgroup's row: a service's or a container's traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupRow {
    /// The cgroup v2 id.
    pub cgroup_id: u64,
    /// Distinct processes seen.
    pub processes: usize,
    /// Distinct sockets seen.
    pub sockets: usize,
    /// Its traffic.
    pub traffic: Traffic,
}

/// Aggregates one interval of events.
#[derive(Debug, Default)]
pub struct Top {
    sockets: HashMap<u64, SocketRow>,
    processes: HashMap<u32, (ProcessRow, HashSet<u64>)>,
    /// Each cgroup with its processes and sockets.
    cgroups: HashMap<u64, (CgroupRow, HashSet<u32>, HashSet<u64>)>,
    events: u64,
    lost: u64,
    /// Why the stream was down during the interval, if it was.
    disconnected: Option<String>,
}

impl Top {
    /// Counts one event.
    pub fn add(&mut self, e: &api::Event) {
        self.events += 1;
        let s = self.sockets.entry(e.cookie).or_insert_with(|| SocketRow {
            cookie: e.cookie,
            local: endpoint(&e.local_addr, e.local_port),
            remote: endpoint(&e.remote_addr, e.remote_port),
            ..Default::default()
        });
        s.pid = e.pid;
        s.comm.clone_from(&e.comm);
        s.traffic.add(e);
        let (p, cookies) = self.processes.entry(e.pid).or_default();
        p.pid = e.pid;
        p.comm.clone_from(&e.comm);
        p.traffic.add(e);
        cookies.insert(e.cookie);
        p.sockets = cookies.len();
        let (c, pids, cookies) = self.cgroups.entry(e.cgroup_id).or_default();
        c.cgroup_id = e.cgroup_id;
        c.traffic.add(e);
        pids.insert(e.pid);
        cookies.insert(e.cookie);
        (c.processes, c.sockets) = (pids.len(), cookies.len());
    }

    /// Counts lost events (they are missing from the totals).
    pub fn lost(&mut self, n: u64) {
        self.lost += n;
    }

    /// Notes that the stream was down during the interval (events in that
    /// time are missing from the totals), and why.
    pub fn disconnected(&mut self, why: &str) {
        self.disconnected = Some(why.to_owned());
    }

    /// Sockets, busiest first.
    pub fn sockets(&self) -> Vec<&SocketRow> {
        let mut v: Vec<_> = self.sockets.values().collect();
        v.sort_by(|a, b| b.traffic.total().cmp(&a.traffic.total()).then(a.cookie.cmp(&b.cookie)));
        v
    }

    /// Processes, busiest first.
    pub fn processes(&self) -> Vec<&ProcessRow> {
        let mut v: Vec<_> = self.processes.values().map(|(p, _)| p).collect();
        v.sort_by(|a, b| b.traffic.total().cmp(&a.traffic.total()).then(a.pid.cmp(&b.pid)));
        v
    }

    /// cgroups, busiest first.
    pub fn cgroups(&self) -> Vec<&CgroupRow> {
        let mut v: Vec<_> = self.cgroups.values().map(|(c, _, _)| c).collect();
        v.sort_by(|a, b| {
            b.traffic
                .total()
                .cmp(&a.traffic.total())
                .then(a.cgroup_id.cmp(&b.cgroup_id))
        });
        v
    }

    /// The frame for this interval, at most `rows` rows per table; each
    /// cgroup by its path in `names`, or its id.
    pub fn render(&self, rows: usize, interval_secs: f64, names: &CgroupNames) -> String {
        let mut out = String::new();
        let lost = if self.lost > 0 {
            format!("  lost {} (totals are short)", self.lost)
        } else {
            String::new()
        };
        let _ = writeln!(out, "socktap top: {} events in {interval_secs:.1}s{lost}", self.events);
        if let Some(why) = &self.disconnected {
            let _ = writeln!(out, "disconnected (totals are short): {why}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>12} {:<15} {:>7} {:>10} {:>10} {:>7} {:>7}  FLOW",
            "COOKIE", "COMM", "PID", "TX_BYTES", "RX_BYTES", "TX", "RX"
        );
        for s in self.sockets().into_iter().take(rows) {
            let t = &s.traffic;
            let _ = writeln!(
                out,
                "{:>12} {:<15} {:>7} {:>10} {:>10} {:>7} {:>7}  {} → {}",
                s.cookie, s.comm, s.pid, t.tx_bytes, t.rx_bytes, t.tx_calls, t.rx_calls, s.local, s.remote
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>7} {:<15} {:>7} {:>10} {:>10} {:>7} {:>7}",
            "PID", "COMM", "SOCKETS", "TX_BYTES", "RX_BYTES", "TX", "RX"
        );
        for p in self.processes().into_iter().take(rows) {
            let t = &p.traffic;
            let _ = writeln!(
                out,
                "{:>7} {:<15} {:>7} {:>10} {:>10} {:>7} {:>7}",
                p.pid, p.comm, p.sockets, t.tx_bytes, t.rx_bytes, t.tx_calls, t.rx_calls
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>7} {:>7} {:>10} {:>10} {:>7} {:>7}  CGROUP",
            "PROCS", "SOCKETS", "TX_BYTES", "RX_BYTES", "TX", "RX"
        );
        for c in self.cgroups().into_iter().take(rows) {
            let t = &c.traffic;
            let id = c.cgroup_id.to_string();
            let _ = writeln!(
                out,
                "{:>7} {:>7} {:>10} {:>10} {:>7} {:>7}  {}",
                c.processes,
                c.sockets,
                t.tx_bytes,
                t.rx_bytes,
                t.tx_calls,
                t.rx_calls,
                names.name(c.cgroup_id).unwrap_or(&id)
            );
        }
        out
    }

    /// The interval as one JSON object (`socktap top -o json`, a line per
    /// interval): when it ended, its length, the events counted and lost,
    /// why the stream was down (if it was), and the three tables, busiest
    /// first, each at most `rows` rows (every row without). Keys come in
    /// that order, a row's identity before its traffic. Field names and
    /// 64-bit ids are as in the events' proto3 JSON (`cookie` and
    /// `cgroupId` strings); counts and bytes are numbers; a cgroup has
    /// `cgroupPath` where `names` knows it.
    pub fn json(&self, rows: Option<usize>, interval_secs: f64, ended: SystemTime, names: &CgroupNames) -> String {
        let rows = rows.unwrap_or(usize::MAX);
        let sockets = self.sockets();
        let processes = self.processes();
        let cgroups = self.cgroups();
        let frame = json::Frame {
            time: chrono::DateTime::<chrono::Utc>::from(ended).to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            interval_seconds: interval_secs,
            events: self.events,
            lost: self.lost,
            disconnected: self.disconnected.as_deref(),
            sockets: sockets
                .iter()
                .take(rows)
                .map(|s| json::Socket {
                    cookie: s.cookie.to_string(),
                    pid: s.pid,
                    comm: &s.comm,
                    local: &s.local,
                    remote: &s.remote,
                    traffic: &s.traffic,
                })
                .collect(),
            processes: processes
                .iter()
                .take(rows)
                .map(|p| json::Process {
                    pid: p.pid,
                    comm: &p.comm,
                    sockets: p.sockets,
                    traffic: &p.traffic,
                })
                .collect(),
            cgroups: cgroups
                .iter()
                .take(rows)
                .map(|c| json::Cgroup {
                    cgroup_id: c.cgroup_id.to_string(),
                    cgroup_path: names.name(c.cgroup_id),
                    processes: c.processes,
                    sockets: c.sockets,
                    traffic: &c.traffic,
                })
                .collect(),
        };
        serde_json::to_string(&frame).unwrap_or_default()
    }
}

/// `top -o json`'s shapes: structs, so that keys keep this order.
mod json {
    use serde::Serialize;

    use super::Traffic;

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Frame<'a> {
        pub time: String,
        pub interval_seconds: f64,
        pub events: u64,
        pub lost: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub disconnected: Option<&'a str>,
        pub sockets: Vec<Socket<'a>>,
        pub processes: Vec<Process<'a>>,
        pub cgroups: Vec<Cgroup<'a>>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Socket<'a> {
        pub cookie: String,
        pub pid: u32,
        pub comm: &'a str,
        pub local: &'a str,
        pub remote: &'a str,
        #[serde(flatten)]
        pub traffic: &'a Traffic,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Process<'a> {
        pub pid: u32,
        pub comm: &'a str,
        pub sockets: usize,
        #[serde(flatten)]
        pub traffic: &'a Traffic,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Cgroup<'a> {
        pub cgroup_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cgroup_path: Option<&'a str>,
        pub processes: usize,
        pub sockets: usize,
        #[serde(flatten)]
        pub traffic: &'a Traffic,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn ev(cookie: u64, pid: u32, kind: api::EventKind, bytes: u32) -> api::Event {
        api::Event {
            cookie,
            pid,
            kind: kind as i32,
            bytes,
            comm: format!("p{pid}"),
            // Two processes per cgroup.
            cgroup_id: u64::from(pid / 20),
            ..Default::default()
        }
    }

    #[test]
    fn sums_and_sorts_by_total() {
        let mut t = Top::default();
        t.add(&ev(1, 10, api::EventKind::Send, 100));
        t.add(&ev(2, 10, api::EventKind::Recv, 5000));
        t.add(&ev(1, 10, api::EventKind::Recv, 50));
        t.add(&ev(3, 20, api::EventKind::Send, 1));
        t.lost(4);
        let s = t.sockets();
        assert_eq!(s.iter().map(|r| r.cookie).collect::<Vec<_>>(), vec![2, 1, 3]);
        assert_eq!(
            s[1].traffic,
            Traffic {
                tx_bytes: 100,
                rx_bytes: 50,
                tx_calls: 1,
                rx_calls: 1
            }
        );
        let p = t.processes();
        assert_eq!((p[0].pid, p[0].sockets, p[0].traffic.total()), (10, 2, 5150));
        t.add(&ev(4, 30, api::EventKind::Send, 7));
        t.add(&ev(5, 40, api::EventKind::Send, 3));
        let c = t.cgroups();
        let row = |c: &CgroupRow| (c.cgroup_id, c.processes, c.sockets, c.traffic.total());
        assert_eq!(
            c.iter().map(|c| row(c)).collect::<Vec<_>>(),
            vec![(0, 1, 2, 5150), (1, 2, 2, 8), (2, 1, 1, 3)]
        );
        let mut names = CgroupNames::default();
        names.learn(
            &[1],
            api::GetCgroupPathsResponse {
                paths: [(1, "/system.slice/app.service".to_owned())].into(),
            },
        );
        let line = t.json(None, 1.5, SystemTime::UNIX_EPOCH, &names);
        // Keys in a reader's order: the interval first, then the tables;
        // a row's identity, then its traffic.
        assert!(
            line.starts_with(r#"{"time":"1970-01-01T00:00:00.000000Z","intervalSeconds":1.5,"events":6,"lost":4,"sockets":[{"cookie":"2","pid":10,"comm":"p10","local":"#),
            "{line}"
        );
        assert!(
            line.contains(r#"{"cgroupId":"1","cgroupPath":"/system.slice/app.service","processes":2,"sockets":2,"txBytes":8,"rxBytes":0,"txCalls":2,"rxCalls":0}"#),
            "{line}"
        );
        let frame: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(frame["time"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            (&frame["intervalSeconds"], &frame["events"], &frame["lost"]),
            (&1.5.into(), &6.into(), &4.into())
        );
        assert!(frame.get("disconnected").is_none());
        assert_eq!(
            frame["cgroups"],
            json!([
                {"cgroupId": "0", "processes": 1, "sockets": 2, "txBytes": 100, "rxBytes": 5050, "txCalls": 1, "rxCalls": 2},
                {"cgroupId": "1", "cgroupPath": "/system.slice/app.service", "processes": 2, "sockets": 2, "txBytes": 8, "rxBytes": 0, "txCalls": 2, "rxCalls": 0},
                {"cgroupId": "2", "processes": 1, "sockets": 1, "txBytes": 3, "rxBytes": 0, "txCalls": 1, "rxCalls": 0},
            ])
        );
        assert_eq!(
            frame["processes"][0],
            json!({"pid": 10, "comm": "p10", "sockets": 2, "txBytes": 100, "rxBytes": 5050, "txCalls": 1, "rxCalls": 2})
        );
        assert_eq!(frame["sockets"].as_array().unwrap().len(), 5);
        assert_eq!(frame["sockets"][0]["cookie"], "2");
        let two: Value = serde_json::from_str(&t.json(Some(2), 1.0, SystemTime::UNIX_EPOCH, &names)).unwrap();
        assert_eq!(two["sockets"].as_array().unwrap().len(), 2);
        let text = t.render(10, 1.0, &names);
        let cgroups: Vec<&str> = text.lines().skip_while(|l| !l.ends_with("CGROUP")).collect();
        assert_eq!(
            cgroups,
            [
                "  PROCS SOCKETS   TX_BYTES   RX_BYTES      TX      RX  CGROUP",
                "      1       2        100       5050       1       2  0",
                "      2       2          8          0       2       0  /system.slice/app.service",
                "      1       1          3          0       1       0  2",
            ]
        );
        assert_eq!(
            t.render(2, 1.0, &names)
                .lines()
                .filter(|l| l.ends_with("app.service"))
                .count(),
            1
        );
        assert!(t.render(10, 1.0, &names).contains("lost 4"));
        assert!(!t.render(10, 1.0, &names).contains("disconnected"));
        t.disconnected("socktapd at x ended the stream; reconnecting");
        let text = t.render(10, 1.0, &names);
        assert_eq!(
            text.lines().nth(1),
            Some("disconnected (totals are short): socktapd at x ended the stream; reconnecting"),
            "{text}"
        );
        let frame: Value = serde_json::from_str(&t.json(None, 1.0, SystemTime::UNIX_EPOCH, &names)).unwrap();
        assert_eq!(frame["disconnected"], "socktapd at x ended the stream; reconnecting");
    }
}
