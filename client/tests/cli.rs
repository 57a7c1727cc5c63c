//! The `socktap` binary against an in-test gRPC server that serves canned
//! events and records what it was asked. Needs no privileges and no BPF.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socktap_client::api;
use socktap_client::api::socktap_server::{Socktap, SocktapServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_socktap");

fn events() -> Vec<api::Event> {
    vec![
        api::Event {
            seq: 7,
            time: Some(socktap_proto::Timestamp {
                seconds: 1_764_000_000,
                nanos: 250_000_000,
            }),
            monotonic_ns: 99,
            cookie: 4097,
            kind: api::EventKind::Send as i32,
            bytes: 1448,
            pid: 321,
            tid: 322,
            comm: "curl".into(),
            uid: 1000,
            cgroup_id: 55,
            netns: 4026531833,
            family: api::AddressFamily::Ipv4 as i32,
            local_addr: "10.0.0.2".into(),
            local_port: 40000,
            remote_addr: "10.0.0.9".into(),
            remote_port: 443,
            cpu: 1,
            mode: api::AttachMode::Tracepoint as i32,
            ..Default::default()
        },
        api::Event {
            seq: 9,
            time: Some(socktap_proto::Timestamp {
                seconds: 1_764_000_001,
                nanos: 0,
            }),
            cookie: 4098,
            kind: api::EventKind::Recv as i32,
            errno: 11,
            pid: 400,
            tid: 400,
            comm: "nginx".into(),
            family: api::AddressFamily::Ipv6 as i32,
            local_addr: "::1".into(),
            local_port: 8080,
            remote_addr: "fd00::7".into(),
            remote_port: 51000,
            mode: api::AttachMode::Tracepoint as i32,
            ..Default::default()
        },
    ]
}

fn lost() -> api::LostEvents {
    api::LostEvents {
        source: api::LossSource::SubscriberQueue as i32,
        count: 12,
        first_seq: 20,
        last_seq: 40,
        ..Default::default()
    }
}

#[derive(Clone, Default)]
struct Fake {
    requests: Arc<Mutex<Vec<api::WatchEventsRequest>>>,
    /// Keep sending events until the client goes away.
    endless: bool,
    /// Fail the stream after the first events, as a broken connection does.
    broken: bool,
    /// Act as a socktapd that restarts after each stream: the n-th stream
    /// (from 0) comes from instance n + 1, and a resume from another
    /// instance starts with a RESTART notice.
    restarting: bool,
    /// Act as a socktapd without GetCgroupPaths.
    no_cgroup_paths: bool,
    /// Fail this many GetCgroupPaths calls (UNAVAILABLE) before answering.
    cgroup_failures: Arc<std::sync::atomic::AtomicUsize>,
    /// The cgroup ids asked about, request by request.
    cgroup_requests: Arc<Mutex<Vec<Vec<u64>>>>,
}

/// The path the fake gives cgroup 55 (the first canned event's); it knows
/// no other cgroup.
const CGROUP_55: &str = "/user.slice/user-1000.slice/session-2.scope";

#[tonic::async_trait]
impl Socktap for Fake {
    type WatchEventsStream = ReceiverStream<Result<api::WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        req: Request<api::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = req.into_inner();
        if req
            .allow
            .first()
            .is_some_and(|f| f.comms.iter().any(|c| c == "rejectme"))
        {
            return Err(Status::invalid_argument(
                "allow[0].comms[0]: rejected by the test server",
            ));
        }
        let instance_id = if self.restarting {
            self.requests.lock().unwrap().len() as u64 + 1
        } else {
            1
        };
        let restarted = req.resume_instance_id.is_some_and(|i| i != instance_id);
        self.requests.lock().unwrap().push(req);
        let (tx, rx) = mpsc::channel(4);
        let (endless, broken) = (self.endless, self.broken);
        tokio::spawn(async move {
            use api::watch_events_response::Message;
            let batch = |events| {
                Ok(api::WatchEventsResponse {
                    message: Some(Message::Events(api::EventBatch { events })),
                    instance_id,
                })
            };
            let notice = |l| {
                Ok(api::WatchEventsResponse {
                    message: Some(Message::Lost(l)),
                    instance_id,
                })
            };
            if restarted {
                let restart = api::LostEvents {
                    source: api::LossSource::Restart as i32,
                    ..Default::default()
                };
                let _ = tx.send(notice(restart)).await;
            }
            let _ = tx.send(batch(vec![events()[0].clone()])).await;
            let _ = tx.send(notice(lost())).await;
            let _ = tx.send(batch(vec![events()[1].clone()])).await;
            if broken {
                let _ = tx
                    .send(Err(Status::unknown("error reading a body from connection")))
                    .await;
            }
            if endless {
                while tx.send(batch(events())).await.is_ok() {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_status(&self, _: Request<api::GetStatusRequest>) -> Result<Response<api::GetStatusResponse>, Status> {
        Ok(Response::new(api::GetStatusResponse {
            version: "9.9.9".into(),
            kernel_release: "6.18.0-test".into(),
            attach_mode: api::AttachMode::Tracepoint as i32,
            events_read: 1234,
            kernel_drops: 5,
            kernel_gate_open: true,
            kernel_prefilter: true,
            kernel_prefilter_keys: 7,
            kernel_cgroup_roots: 2,
            instance_id: 0xfeed_beef_0000_0001,
            subscribers: vec![api::SubscriberStatus {
                id: 3,
                peer: "127.0.0.1:9".into(),
                lost: 2,
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    async fn get_cgroup_paths(
        &self,
        req: Request<api::GetCgroupPathsRequest>,
    ) -> Result<Response<api::GetCgroupPathsResponse>, Status> {
        if self.no_cgroup_paths {
            return Err(Status::unimplemented("unknown method GetCgroupPaths"));
        }
        let failures = &self.cgroup_failures;
        if failures.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(Status::unavailable("busy"));
        }
        let ids = req.into_inner().cgroup_ids;
        self.cgroup_requests.lock().unwrap().push(ids.clone());
        let paths = ids
            .into_iter()
            .filter(|&id| id == 55)
            .map(|id| (id, CGROUP_55.to_owned()))
            .collect();
        Ok(Response::new(api::GetCgroupPathsResponse { paths }))
    }
}

/// Serves `fake` on a loopback port on a background thread; returns its address.
fn serve(fake: Fake) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            tonic::transport::Server::builder()
                .add_service(SocktapServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(l))
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn socktap(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("SOCKTAP_ADDR")
        .output()
        .unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[test]
fn table_output_field_by_field() {
    let addr = serve(Fake::default());
    // The fake sends two events, then ends the stream.
    let r = socktap(&["--addr", &addr, "watch", "--limit", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    // Without a limit, a stream that socktapd ends (it does so when it shuts
    // down) is not done: said on stderr, exit code 1, output unchanged.
    let ended = socktap(&["--addr", &addr, "watch"]);
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert_eq!(ended.stderr.lines().count(), 1, "{}", ended.stderr);
    assert!(ended.stderr.contains("ended the stream"), "{}", ended.stderr);
    assert_eq!(ended.stdout, r.stdout);
    // A stream that breaks is said so, with the cause.
    let addr = serve(Fake {
        broken: true,
        ..Default::default()
    });
    let broke = socktap(&["--addr", &addr, "watch"]);
    assert_eq!(broke.code, 1, "{}", broke.stderr);
    assert_eq!(broke.stderr.lines().count(), 1, "{}", broke.stderr);
    assert!(
        broke.stderr.contains("the stream broke: Unknown: error reading a body"),
        "{}",
        broke.stderr
    );
    assert_eq!(broke.stdout, r.stdout);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    assert!(lines[0].starts_with("TIME") && lines[0].contains("COOKIE") && lines[0].ends_with("ERR"));
    let c: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        c[0].len(),
        "HH:MM:SS.ffffff".len(),
        "local time with microseconds: {}",
        lines[1]
    );
    assert!(c[0].ends_with(".250000"));
    assert_eq!(
        &c[1..],
        &[
            "curl",
            "321",
            "4097",
            "send",
            "1448",
            "10.0.0.2:40000",
            "→",
            "10.0.0.9:443"
        ]
    );
    assert_eq!(
        lines[2],
        "-- lost 12 events in socktapd: this client read too slowly (seq 20..=40) --"
    );
    let c: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(
        &c[1..],
        &[
            "nginx",
            "400",
            "4098",
            "recv",
            "0",
            "[::1]:8080",
            "←",
            "[fd00::7]:51000",
            "EAGAIN"
        ]
    );
}

#[test]
fn a_wide_table_shows_thread_uid_netns_and_the_cgroups_path() {
    let fake = Fake::default();
    let asked = fake.cgroup_requests.clone();
    let addr = serve(fake);
    let r = socktap(&["--addr", &addr, "watch", "--limit", "2", "--wide"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(&header[..6], &["TIME", "COMM", "PID", "TID", "UID", "NETNS"]);
    assert_eq!(header.last(), Some(&"CGROUP"));
    let c: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&c[1..7], &["curl", "321", "322", "1000", "4026531833", "4097"]);
    assert_eq!(c.last(), Some(&CGROUP_55), "named by socktapd: {}", lines[1]);
    // The second event's cgroup (0) has no path: its id. Each batch asked
    // about its own new cgroups, once.
    let last = lines.last().unwrap();
    assert!(last.ends_with("EAGAIN       0"), "{}", r.stdout);
    assert_eq!(*asked.lock().unwrap(), vec![vec![55], vec![0]]);
    // -w is the same.
    assert_eq!(
        socktap(&["--addr", &addr, "watch", "--limit", "2", "-w"]).stdout,
        r.stdout
    );
}

/// JSON lines with --wide also carry the cgroup's path, where socktapd
/// names it, after the proto3 JSON fields, which are unchanged.
#[test]
fn wide_json_lines_add_the_cgroups_path() {
    let addr = serve(Fake::default());
    let wide = socktap(&["--addr", &addr, "watch", "--limit", "2", "-o", "json", "-w"]);
    assert_eq!(wide.code, 0, "{}", wide.stderr);
    // The fake's loss notice, as JSON lines have it; nothing else.
    assert_eq!(
        wide.stderr.lines().filter(|l| !l.contains("LOSS_SOURCE")).count(),
        0,
        "{}",
        wide.stderr
    );
    let plain = socktap(&["--addr", &addr, "watch", "--limit", "2", "-o", "json"]);
    let (wide, plain): (Vec<&str>, Vec<&str>) = (wide.stdout.lines().collect(), plain.stdout.lines().collect());
    assert_eq!(wide.len(), 2);
    let mut first: serde_json::Value = serde_json::from_str(wide[0]).unwrap();
    assert_eq!(first["cgroupId"], "55");
    assert_eq!(first["cgroupPath"], CGROUP_55, "{}", wide[0]);
    first.as_object_mut().unwrap().remove("cgroupPath");
    assert_eq!(first, serde_json::from_str::<serde_json::Value>(plain[0]).unwrap());
    // cgroup 0 has no path: the line is as without --wide.
    assert_eq!(wide[1], plain[1]);
}

/// A socktapd that cannot name cgroups (older, or no cgroup2 on its host):
/// the table shows their ids, and says why once.
#[test]
fn a_wide_table_without_cgroup_paths_shows_ids_and_says_why_once() {
    let addr = serve(Fake {
        no_cgroup_paths: true,
        ..Fake::default()
    });
    let r = socktap(&["--addr", &addr, "watch", "--limit", "2", "-w"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr.lines().collect::<Vec<_>>(),
        [format!(
            "socktap: cannot name cgroups (socktapd at {addr}: Unimplemented: unknown method GetCgroupPaths); CGROUP shows their ids"
        )]
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[1].ends_with(" 55"), "{}", lines[1]);
    assert!(lines.last().unwrap().ends_with(" 0"), "{}", r.stdout);
    // JSON lines go without cgroupPath, and say so.
    let r = socktap(&["--addr", &addr, "watch", "--limit", "2", "-o", "json", "-w"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr.lines().filter(|l| !l.contains("LOSS_SOURCE")).collect::<Vec<_>>(),
        [format!(
            "socktap: cannot name cgroups (socktapd at {addr}: Unimplemented: unknown method GetCgroupPaths); no cgroupPath until it can"
        )]
    );
    assert!(!r.stdout.contains("cgroupPath"), "{}", r.stdout);
    assert_eq!(r.stdout.lines().count(), 2);
}

#[test]
fn reconnect_resumes_after_the_last_event_and_shows_the_restart() {
    let fake = Fake {
        restarting: true,
        ..Default::default()
    };
    let addr = serve(fake.clone());
    // Each stream sends 2 events, then ends as a shutting-down socktapd
    // does; the next comes from a new instance.
    let r = socktap(&["--addr", &addr, "watch", "--reconnect", "--limit", "5", "--port", "443"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "{requests:?}");
    let resumed: Vec<_> = requests
        .iter()
        .map(|q| (q.resume_after_seq, q.resume_instance_id, q.limit))
        .collect();
    assert_eq!(
        resumed,
        [(None, None, 5), (Some(9), Some(1), 3), (Some(9), Some(2), 1)],
        "each resumes after the last event seen, in its instance, for what is left of the limit"
    );
    assert!(
        requests.iter().all(|q| q.allow == requests[0].allow),
        "the same filters"
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    // 3 streams of 2 events and a loss notice each (the fake does not
    // apply the limit, socktapd does), 2 of them after a restart notice.
    assert_eq!(lines.len(), 1 + 3 * 3 + 2, "{}", r.stdout);
    let restarts = lines.iter().filter(|l| l.starts_with("-- socktapd restarted")).count();
    assert_eq!(restarts, 2, "{}", r.stdout);
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("TIME")).count(),
        1,
        "one header: {}",
        r.stdout
    );
    let reconnects = r.stderr.lines().filter(|l| l.contains("reconnecting")).count();
    assert_eq!(reconnects, 2, "{}", r.stderr);
    assert_eq!(r.stderr.matches("reconnected to socktapd").count(), 2, "{}", r.stderr);

    // Without --reconnect, the end is final.
    let r = socktap(&["--addr", &addr, "watch"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    // --resume-instance is passed on, and needs --resume-after.
    let r = socktap(&[
        "--addr",
        &addr,
        "watch",
        "--resume-after",
        "40",
        "--resume-instance",
        "77",
        "--limit",
        "1",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let last = fake.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.resume_after_seq, last.resume_instance_id), (Some(40), Some(77)));
    assert!(r.stdout.contains("-- socktapd restarted"), "{}", r.stdout);
    let r = socktap(&["--addr", &addr, "watch", "--resume-instance", "77"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--resume-after"), "{}", r.stderr);
}

#[test]
fn json_lines_are_proto3_json_and_losses_go_to_stderr() {
    let addr = serve(Fake::default());
    let r = socktap(&["--addr", &addr, "watch", "-o", "json", "--limit", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let parsed: Vec<api::Event> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed, events(), "every field survives the JSON round trip");
    let first: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["cookie"], "4097", "uint64 as a string, as grpcurl prints it");
    assert_eq!(first["kind"], "EVENT_KIND_SEND");
    assert_eq!(first["localAddr"], "10.0.0.2");
    assert_eq!(first["time"], "2025-11-24T16:00:00.250Z");
    assert_eq!(first["errno"], 0, "zeros are written, not left out");
    // Every line has the same keys, whatever its values (the second event
    // has no bytes and uid 0).
    let keys = |l: &str| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
    };
    for l in r.stdout.lines() {
        assert_eq!(keys(l), keys(r.stdout.lines().next().unwrap()), "{l}");
    }
    let l: api::LostEvents = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!(l, lost());
    assert_eq!(
        socktap(&["--addr", &addr, "watch", "--json", "--limit", "2"]).stdout,
        r.stdout,
        "--json is -o json"
    );
}

#[test]
fn filter_flags_become_the_request() {
    let fake = Fake::default();
    let addr = serve(fake.clone());
    let child = Command::new(BIN)
        .args([
            "--addr",
            &addr,
            "watch",
            "--pid",
            "1",
            "--pid",
            "2,3",
            "--comm",
            "curl",
            "--comm-prefix",
            "ngi",
        ])
        .args([
            "--cookie",
            "77",
            "--port",
            "80",
            "--remote-port",
            "443",
            "--cidr",
            "10.0.0.0/8",
            "--cidr",
            "fd00::/8",
        ])
        .args([
            "--uid", "1000", "--cgroup", "9", "--kind", "send", "--family", "ipv6", "--errors",
        ])
        // A cgroup by path or by id, in one condition.
        .args([
            "--cgroup",
            "/system.slice/app.service",
            "--exclude-cgroup",
            "user.slice,12",
        ])
        .args([
            "--exclude-uid",
            "0",
            "--exclude-comm",
            "sshd",
            "--exclude-cidr",
            "192.168.0.0/16",
        ])
        .args(["--replay", "50", "--limit", "2"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    let got = fake.requests.lock().unwrap().pop().expect("request recorded");
    let want = api::WatchEventsRequest {
        allow: vec![api::EventFilter {
            cookies: vec![77],
            pids: vec![1, 2, 3],
            comms: vec!["curl".into()],
            comm_prefixes: vec!["ngi".into()],
            uids: vec![1000],
            cgroup_ids: vec![9],
            cgroup_paths: vec!["/system.slice/app.service".into()],
            local_ports: vec![80],
            remote_ports: vec![443],
            remote_cidrs: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
            families: vec![api::AddressFamily::Ipv6 as i32],
            kinds: vec![api::EventKind::Send as i32],
            errors_only: true,
        }],
        deny: vec![
            api::EventFilter {
                pids: vec![pid],
                ..Default::default()
            },
            api::EventFilter {
                comms: vec!["sshd".into()],
                ..Default::default()
            },
            api::EventFilter {
                remote_cidrs: vec!["192.168.0.0/16".into()],
                ..Default::default()
            },
            api::EventFilter {
                uids: vec![0],
                ..Default::default()
            },
            api::EventFilter {
                cgroup_ids: vec![12],
                cgroup_paths: vec!["user.slice".into()],
                ..Default::default()
            },
        ],
        replay_last: 50,
        limit: 2,
        ..Default::default()
    };
    assert_eq!(got, want);

    let r = socktap(&[
        "--addr",
        &addr,
        "watch",
        "--include-self",
        "--since",
        "10s",
        "--limit",
        "1",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got = fake.requests.lock().unwrap().pop().unwrap();
    assert!(
        got.deny.iter().all(|f| f.pids.is_empty()) || got.deny.is_empty(),
        "{got:?}"
    );
    let since = got.since.expect("since sent").seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - 12..=now - 9).contains(&since),
        "since is 10 s ago: {since} vs {now}"
    );
}

#[test]
fn exit_codes_and_one_line_messages() {
    // Unreachable: 1, naming the address and the cause.
    let r = socktap(&["--addr", "127.0.0.1:1", "status"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("127.0.0.1:1") && r.stderr.contains("refused"),
        "{}",
        r.stderr
    );

    // Bad flag values: 2, naming the flag, one line.
    for (args, flag) in [
        (vec!["watch", "--pid", "x"], "--pid"),
        (vec!["watch", "--port", "70000"], "--port"),
        (vec!["watch", "--cidr", "10.0.0.0/99"], "--cidr"),
        (vec!["watch", "--cgroup", "99999999999999999999999"], "--cgroup"),
        (vec!["watch", "--kind", "sideways"], "--kind"),
        (vec!["watch", "--since", "yesterday-ish"], "--since"),
        (vec!["--addr", "ftp://x:1", "status"], "--addr"),
        (vec!["top", "--interval", "1ms"], "--interval"),
        (vec!["completions", "tcsh"], "<SHELL>"),
        (vec!["watch", "--replay", "3", "--resume-after", "4"], "--replay"),
        (vec!["watch", "--limit", "0"], "--limit"),
        (vec!["--client-cert", "c.pem", "status"], "--client-key"),
        (
            vec!["watch", "--comm-prefx", "x"],
            "similar argument exists: '--comm-prefix'",
        ),
    ] {
        let r = socktap(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{args:?} names {flag}: {}", r.stderr);
    }

    // The server's INVALID_ARGUMENT: 2, with the server's message.
    let addr = serve(Fake::default());
    let r = socktap(&["--addr", &addr, "watch", "--comm", "rejectme"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("allow[0].comms[0]"), "{}", r.stderr);

    // Help has examples, for every command.
    for cmd in [
        vec!["--help"],
        vec!["watch", "--help"],
        vec!["status", "--help"],
        vec!["top", "--help"],
        vec!["completions", "--help"],
    ] {
        let r = socktap(&cmd);
        assert_eq!(r.code, 0);
        assert!(r.stdout.contains("Examples:"), "{cmd:?}");
    }

    // Flags are grouped: a command's own options, then filters, then
    // exclusions, then how to reach socktapd.
    let r = socktap(&["watch", "--help"]);
    let at = |s: &str| r.stdout.find(s).unwrap_or_else(|| panic!("{s} in {}", r.stdout));
    assert!(at("--replay") < at("\nFilters:"));
    assert!(at("\nFilters:") < at("--pid") && at("--pid") < at("\nExclusions:"));
    assert!(at("\nExclusions:") < at("--exclude-pid") && at("--exclude-pid") < at("\nConnection:"));
    assert!(at("\nConnection:") < at("--token-file"));
}

/// `socktap completions SHELL` prints a script that shell loads, without
/// reaching socktapd (or reading the token file).
#[test]
fn completion_scripts_complete_commands_and_flags() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let r = socktap(&["--token-file", "/nonexistent", "completions", shell]);
        assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{shell}");
        for word in ["watch", "top", "remote-port", "exclude-comm"] {
            assert!(r.stdout.contains(word), "{shell}: {word}");
        }
    }
    // bash loads it: `socktap` completes with its function, which offers
    // the commands, and a command's flags.
    let script = socktap(&["completions", "bash"]).stdout;
    let complete = |words: &str| {
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "{script}\ncomplete -p socktap\nCOMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); _socktap socktap \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[@]}}\""
                ),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let commands = complete("socktap ''");
    assert!(
        commands.starts_with("complete ") && commands.lines().next().unwrap().contains(" -F _socktap socktap"),
        "{commands}"
    );
    for c in ["watch", "status", "top", "completions"] {
        assert!(commands.split_whitespace().any(|w| w == c), "{c}: {commands}");
    }
    let flags = complete("socktap watch --remote-p");
    assert_eq!(flags.lines().last(), Some("--remote-port"), "{flags}");
}

#[test]
fn a_closed_stdout_exits_quietly() {
    let addr = serve(Fake {
        endless: true,
        ..Default::default()
    });
    let mut child = Command::new(BIN)
        .args(["--addr", &addr, "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        lines.next().unwrap().unwrap();
    }
    drop(lines); // what `| head -3` does
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn status_table_and_json() {
    let addr = serve(Fake::default());
    let r = socktap(&["--addr", &addr, "status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("socktapd 9.9.9  kernel 6.18.0-test  attach mode tracepoint"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("1234 read") && r.stdout.contains("kernel drops 5"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("#3 127.0.0.1:9") && r.stdout.contains("lost 2"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("kernel cgroup trees: 2 cgroups named by path"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("kernel prefilter: on, 7 values"), "{}", r.stdout);
    // The instance, as --resume-instance takes it.
    let instance = 0xfeed_beef_0000_0001u64.to_string();
    assert!(r.stdout.contains(&format!("instance {instance}\n")), "{}", r.stdout);
    let r = socktap(&["--addr", &addr, "status", "-o", "json"]);
    let s: api::GetStatusResponse = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!((s.events_read, s.kernel_drops), (1234, 5));
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["instanceId"], instance.as_str(), "a fixed64 as a decimal string");
}

#[test]
fn top_sums_per_socket_and_process_and_marks_losses() {
    let addr = serve(Fake::default());
    // The fake ends the stream before the first refresh: top shows what it
    // got, then says the stream ended (exit code 1).
    let r = socktap(&["--addr", &addr, "top", "--interval", "300ms", "--iterations", "1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("ended the stream"), "{}", r.stderr);
    assert!(
        r.stdout.contains("2 events") && r.stdout.contains("lost 12"),
        "{}",
        r.stdout
    );
    let row = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("4097"))
        .expect("socket row");
    let c: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&c[..7], &["4097", "curl", "321", "1448", "0", "1", "0"], "{row}");
    let prow = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("400 "))
        .expect("process row");
    assert_eq!(
        prow.split_whitespace().collect::<Vec<_>>(),
        vec!["400", "nginx", "1", "0", "0", "0", "1"]
    );
}

/// top's third table sums each cgroup's traffic and shows it by its path,
/// which socktapd gives (GetCgroupPaths), or by its id where it has none.
#[test]
fn top_names_the_busiest_cgroups() {
    let fake = Fake {
        endless: true,
        ..Fake::default()
    };
    let asked = fake.cgroup_requests.clone();
    let addr = serve(fake);
    let r = socktap(&["--addr", &addr, "top", "--interval", "300ms", "--iterations", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let last = r.stdout.split("socktap top: ").last().unwrap();
    let cgroups: Vec<Vec<&str>> = last
        .lines()
        .skip_while(|l| !l.ends_with("CGROUP"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    // The fake's first event (1448 bytes sent) is curl's in cgroup 55, its
    // second (0 bytes) nginx's in cgroup 0.
    assert_eq!(cgroups.len(), 2, "{last}");
    assert_eq!(&cgroups[0][..2], &["1", "1"], "{last}");
    assert_eq!(cgroups[0].last(), Some(&CGROUP_55), "{last}");
    assert_eq!(cgroups[1].last(), Some(&"0"), "{last}");
    let asked = asked.lock().unwrap();
    assert!(
        !asked.is_empty() && asked.iter().flatten().filter(|&&id| id == 55).count() == 1,
        "each id asked once: {asked:?}"
    );
}

/// `top -o json`: an object per interval, with every row unless --rows,
/// each cgroup by its path where socktapd names it.
#[test]
fn top_as_json_lines_has_every_row_and_the_cgroups_paths() {
    let fake = Fake {
        endless: true,
        ..Fake::default()
    };
    let addr = serve(fake);
    let r = socktap(&[
        "--addr",
        &addr,
        "top",
        "-o",
        "json",
        "--interval",
        "300ms",
        "--iterations",
        "2",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    let frames: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(frames.len(), 2, "{}", r.stdout);
    let last = &frames[1];
    assert!(last["time"].as_str().unwrap().ends_with('Z'), "{last}");
    assert!(last["intervalSeconds"].as_f64().unwrap() > 0.2, "{last}");
    let events = last["events"].as_u64().unwrap();
    assert!(events > 0, "{last}");
    // The fake's events come in pairs: curl sends 1448 bytes on 4097, nginx
    // receives 0 on 4098.
    let sockets = last["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 2, "{last}");
    let curl = &sockets[0];
    assert_eq!(
        (
            &curl["cookie"],
            &curl["comm"],
            &curl["pid"],
            &curl["local"],
            &curl["remote"]
        ),
        (
            &"4097".into(),
            &"curl".into(),
            &321.into(),
            &"10.0.0.2:40000".into(),
            &"10.0.0.9:443".into()
        ),
        "{last}"
    );
    let sends = curl["txCalls"].as_u64().unwrap();
    assert_eq!(curl["txBytes"].as_u64().unwrap(), 1448 * sends, "{last}");
    assert_eq!(sockets[1]["rxCalls"].as_u64().unwrap() + sends, events, "{last}");
    let cgroups = last["cgroups"].as_array().unwrap();
    assert_eq!(cgroups[0]["cgroupId"], "55", "{last}");
    assert_eq!(cgroups[0]["cgroupPath"], CGROUP_55, "{last}");
    assert_eq!(cgroups[1]["cgroupId"], "0", "{last}");
    assert!(cgroups[1].get("cgroupPath").is_none(), "no path for cgroup 0: {last}");
    assert_eq!(last["processes"].as_array().unwrap().len(), 2, "{last}");
    // --rows bounds each table.
    let r = socktap(&[
        "--addr",
        &addr,
        "top",
        "-o",
        "json",
        "--rows",
        "1",
        "--interval",
        "300ms",
        "--iterations",
        "1",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let frame: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    for table in ["sockets", "processes", "cgroups"] {
        assert_eq!(frame[table].as_array().unwrap().len(), 1, "{table}: {frame}");
    }
}

/// A lookup that fails shows ids, says why once, and is tried again a
/// second later: the cgroups then get their paths.
#[test]
fn a_failed_cgroup_lookup_is_tried_again() {
    let fake = Fake {
        endless: true,
        cgroup_failures: Arc::new(1.into()),
        ..Fake::default()
    };
    let asked = fake.cgroup_requests.clone();
    let addr = serve(fake);
    let r = socktap(&["--addr", &addr, "top", "--interval", "300ms", "--iterations", "8"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr,
        format!("socktap: cannot name cgroups (socktapd at {addr}: Unavailable: busy); CGROUP shows their ids\n")
    );
    let frames: Vec<&str> = r.stdout.split("socktap top: ").skip(1).collect();
    let curl = |f: &str| {
        f.lines()
            .skip_while(|l| !l.ends_with("CGROUP"))
            .nth(1)
            .unwrap_or("")
            .to_owned()
    };
    assert!(curl(frames[0]).ends_with(" 55"), "{}", frames[0]);
    let last = frames.last().unwrap();
    assert!(curl(last).ends_with(CGROUP_55), "{last}");
    // Only answered calls are recorded: one, however many frames followed.
    assert_eq!(asked.lock().unwrap().len(), 1, "{:?}", asked.lock().unwrap());
}

/// Serves `fake` on a unix socket at `path` on a background thread, and
/// returns once the socket is there.
fn serve_unix(fake: Fake, path: &std::path::Path) {
    let p = path.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let l = tokio::net::UnixListener::bind(&p).unwrap();
            tonic::transport::Server::builder()
                .add_service(SocktapServer::new(fake))
                .serve_with_incoming(UnixListenerStream::new(l))
                .await
                .unwrap();
        });
    });
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not appear", path.display());
}

/// A fresh directory for a test's unix sockets.
fn socket_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("socktap-cli-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn reconnect_waits_for_a_socktapd_that_is_not_up_yet() {
    let dir = socket_dir("wait");
    let path = dir.join("socktapd.sock");
    let addr = format!("unix:{}", path.display());
    // Without --reconnect, nobody there is an error at once.
    let r = socktap(&["--addr", &addr, "watch"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    for cmd in [
        &["watch", "--limit", "2"][..],
        &["top", "--interval", "200ms", "--iterations", "6"],
    ] {
        let _ = std::fs::remove_file(&path);
        let child = Command::new(BIN)
            .args(["--addr", &addr])
            .args(cmd)
            .arg("--reconnect")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Let it try and wait at least once before socktapd is there.
        std::thread::sleep(Duration::from_millis(400));
        let fake = Fake::default();
        serve_unix(fake.clone(), &path);
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {stderr}");
        assert!(!fake.requests.lock().unwrap().is_empty(), "{cmd:?}");
        if cmd[0] == "watch" {
            assert_eq!(stderr.matches("waiting for it").count(), 1, "said once: {stderr}");
            assert!(stderr.contains(&format!("connected to socktapd at {addr}")), "{stderr}");
            let lines: Vec<&str> = stdout.lines().collect();
            // The header once, then the fake's two events and its loss notice.
            assert_eq!(lines.len(), 4, "{stdout}");
            assert!(lines[0].starts_with("TIME"), "{stdout}");
        } else {
            // The frames before socktapd was there say why they are empty;
            // the fake's events arrive once it is.
            assert!(stdout.contains("disconnected (totals are short):"), "{stdout}");
            assert!(stdout.contains("reconnecting"), "{stdout}");
            assert!(
                stdout
                    .split("socktap top: ")
                    .skip(1)
                    .any(|f| !f.starts_with("0 events")),
                "{stdout}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn top_reconnect_goes_on_across_restarts() {
    let fake = Fake {
        restarting: true,
        ..Default::default()
    };
    let addr = serve(fake.clone());
    // Every stream sends two events and ends, as a socktapd shutting down does.
    let r = socktap(&[
        "--addr",
        &addr,
        "top",
        "--reconnect",
        "--interval",
        "300ms",
        "--iterations",
        "4",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let streams = fake.requests.lock().unwrap().len();
    assert!(streams >= 2, "connected again: {streams} streams");
    let frames: Vec<&str> = r.stdout.split("socktap top: ").skip(1).collect();
    assert_eq!(frames.len(), 4, "{}", r.stdout);
    assert!(
        frames
            .iter()
            .any(|f| f.contains("disconnected (totals are short): socktapd at") && f.contains("ended the stream")),
        "{}",
        r.stdout
    );
    let events: u64 = frames
        .iter()
        .map(|f| f.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    // The last stream's events may come after the last frame.
    let streams = streams as u64;
    assert!(
        (2 * (streams - 1)..=2 * streams).contains(&events),
        "every stream's events counted once: {events} events from {streams} streams: {}",
        r.stdout
    );
}

#[test]
fn unix_socket_addresses_work() {
    let dir = socket_dir("unix");
    let path = dir.join("socktapd.sock");
    serve_unix(Fake::default(), &path);
    let addr = format!("unix:{}", path.display());
    let r = Command::new(BIN)
        .args(["status"])
        .env("SOCKTAP_ADDR", &addr)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("9.9.9"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctrl_c_ends_watch_and_top_cleanly() {
    let addr = serve(Fake {
        endless: true,
        ..Default::default()
    });
    for cmd in ["watch", "top"] {
        let mut child = Command::new(BIN)
            .args(["--addr", &addr, cmd])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until it streams (watch prints at once; top after its first second).
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        // SAFETY: FFI; signals our own child, as a terminal's Ctrl-C would.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{cmd}: {stderr}");
        assert!(!stderr.contains("panicked"), "{cmd}: {stderr}");
    }
}
