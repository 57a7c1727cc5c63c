//! `socktap watch -o json` against socktapd and the real kernel: the CLI's
//! JSON lines carry the socket's cookie and its exact bytes, and with
//! `--reconnect` a watch goes on across a restart of socktapd. Needs root.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use socktap::hub::HubConfig;
use socktap::probe::ProbeOptions;
use socktap_client::api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_reports_a_sockets_exact_bytes() {
    let Some(_bpf) = bpf_available("cli_kernel") else {
        return;
    };
    let KernelDaemon {
        probe: _probe,
        daemon: d,
        ..
    } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;

    let (mut c, mut s) = tcp_pair(true);
    let cookie = so_cookie(&c);
    let mut watch = InProcessCli::watch_json(&d, &["--cookie", &cookie.to_string(), "--limit", "3"]).await;
    std::thread::spawn(move || {
        for n in [5usize, 5000, 50_000] {
            c.write_all(&vec![9u8; n]).unwrap();
            s.read_exact(&mut vec![0u8; n]).unwrap();
        }
    })
    .join()
    .unwrap();

    // On a kernel that preempts the programs (7.3 in the kernel matrix) a
    // send can be a call the kernel skipped them on: then it never comes,
    // and the skip is announced (on stderr, where JSON mode puts loss
    // notices). Without one, everything is exact.
    let code = tokio::time::timeout(Duration::from_secs(10), &mut watch.run).await;
    if code.is_err() {
        watch.run.abort();
    }
    let (out, err) = (watch.out.text(), watch.err.text());
    let events: Vec<api::Event> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("proto3 JSON"))
        .collect();
    assert!(
        events
            .iter()
            .all(|e| e.cookie == cookie && e.kind() == api::EventKind::Send),
        "{out}"
    );
    let bytes: Vec<u32> = events.iter().map(|e| e.bytes).collect();
    let skipped: u64 = err
        .lines()
        .filter(|l| l.contains("LOSS_SOURCE_KERNEL_SKIPPED"))
        .filter_map(|l| serde_json::from_str::<api::LostEvents>(l).ok())
        .map(|l| l.count)
        .sum();
    if skipped == 0 {
        let code =
            code.unwrap_or_else(|_| panic!("no 3 events within 10 s, and no call announced as skipped:\n{out}{err}"));
        assert_eq!(code.unwrap(), 0, "{err}");
        assert_eq!(events.len(), 3);
        assert_eq!((bytes[0], bytes[1]), (5, 5000));
        // A 50 KB write may take more than one send call if the socket
        // buffer fills.
        assert!(bytes[2] > 0 && bytes[2] <= 50_000);
    } else {
        // What came is in order: the 5, the 5000, then sends of the 50 KB
        // write, each of them possibly skipped.
        let mut rest = &bytes[..];
        for first in [5, 5000] {
            if rest.first() == Some(&first) {
                rest = &rest[1..];
            }
        }
        assert!(
            rest.iter().all(|&n| n > 0) && rest.iter().sum::<u32>() <= 50_000,
            "sends of 5, 5000, then up to 50,000 bytes, in order: {bytes:?}"
        );
        let missing = 3 - events.len() as u64;
        assert!(
            code.is_ok() || (missing > 0 && skipped >= missing),
            "no 3 events in 10 s: {missing} missing, {skipped} calls announced as skipped\n{out}{err}"
        );
        eprintln!("{skipped} calls the kernel skipped the programs on; sends seen: {bytes:?}");
    }
    for e in &events {
        assert_eq!((e.local_addr.as_str(), e.pid), ("::1", std::process::id()));
    }
    d.stop().await;
}

/// What the in-process CLI writes, readable while it runs.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The socktap CLI run in this process (so `--include-self` keeps this
/// test's own traffic), its stdout and stderr readable while it runs.
struct InProcessCli {
    out: Shared,
    err: Shared,
    /// Its exit code, when it ends.
    run: tokio::task::JoinHandle<i32>,
}

impl InProcessCli {
    /// Starts `socktap` with `args` (after the program name).
    fn start(args: &[&str]) -> InProcessCli {
        let args = std::iter::once("socktap").chain(args.iter().copied()).map(Into::into);
        let cli = socktap_client::cli::parse(args, &mut std::io::stderr()).expect("valid arguments");
        let (out, err) = (Shared::default(), Shared::default());
        let run = {
            let (mut out, mut err) = (out.clone(), err.clone());
            tokio::spawn(async move { socktap_client::cli::run(cli, &mut out, &mut err).await })
        };
        InProcessCli { out, err, run }
    }

    /// `socktap watch -o json --include-self` with `filters` against the
    /// in-process socktapd `d`, once it has subscribed.
    async fn watch_json(d: &TestDaemon, filters: &[&str]) -> InProcessCli {
        let addr = d.url.trim_start_matches("http://");
        let args = ["--addr", addr, "watch", "-o", "json", "--include-self"];
        let watch = InProcessCli::start(&[&args[..], filters].concat());
        wait_for("the watch to subscribe", || d.hub.subscriber_count() == 1).await;
        watch
    }
}

/// A watch's stderr without the notices of calls the kernel skipped the
/// programs on, which a kernel that preempts them (7.3 in the kernel
/// matrix) announces to every subscriber whenever one happens, anywhere on
/// the host: in the JSON lines and in the table's words.
fn without_skipped_notices(err: &str) -> String {
    err.lines()
        .filter(|l| !l.contains("LOSS_SOURCE_KERNEL_SKIPPED") && !l.contains("the kernel skipped socktap's program"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnect_goes_on_across_a_socktapd_restart() {
    let Some(_bpf) = bpf_available("cli_kernel reconnect") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("socktap-reconnect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("socktap.sock").to_str().unwrap().to_owned();
    let daemon = spawn_socktapd(&["--listen", &format!("unix:{socket}")]);

    // The socket outlives the restart: its cookie stays the same.
    let (mut c, mut s) = tcp_pair(false);
    let cookie = so_cookie(&c);
    let addr = format!("unix:{socket}");
    let cookie_arg = cookie.to_string();
    let watch = InProcessCli::start(&[
        "--addr",
        &addr,
        "watch",
        "-o",
        "json",
        "--reconnect",
        "--cookie",
        &cookie_arg,
        "--limit",
        "4",
        "--include-self",
    ]);
    let (out, err) = (watch.out.clone(), watch.err.clone());
    let subscribers = |addr: &str| {
        let addr: socktap_client::DaemonAddr = addr.parse().unwrap();
        async move {
            let Ok(mut client) = socktap_client::connect(&addr).await else {
                return 0;
            };
            client
                .get_status(api::GetStatusRequest {})
                .await
                .map(|s| s.into_inner().subscribers.len())
                .unwrap_or(0)
        }
    };
    for _ in 0..2000 {
        if subscribers(&addr).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut write = |n: usize| {
        c.write_all(&vec![7u8; n]).unwrap();
        s.read_exact(&mut vec![0u8; n]).unwrap();
    };
    write(11);
    write(22);
    wait_for("the first two events", || out.text().lines().count() == 2).await;

    stop_socktapd(daemon);
    let daemon = spawn_socktapd(&["--listen", &format!("unix:{socket}")]);
    wait_for("the watch to reconnect", || err.text().contains("reconnected")).await;
    write(33);
    write(44);
    let code = tokio::time::timeout(Duration::from_secs(10), watch.run)
        .await
        .expect("4 events")
        .unwrap();
    stop_socktapd(daemon);
    let _ = std::fs::remove_dir_all(&dir);

    let (out, err) = (out.text(), err.text());
    assert_eq!(code, 0, "{err}");
    let events: Vec<api::Event> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("proto3 JSON"))
        .collect();
    assert_eq!(
        events.iter().map(|e| (e.cookie, e.bytes)).collect::<Vec<_>>(),
        [(cookie, 11), (cookie, 22), (cookie, 33), (cookie, 44)],
        "{out}"
    );
    // The restart is told: the CLI's own lines, and socktapd's notice (a
    // JSON loss line, as every loss is with -o json). Calls the kernel
    // skipped the programs on (a kernel that preempts them, 7.3 in the
    // kernel matrix) are told to every subscriber too: not counted here.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("LOSS_SOURCE_KERNEL_SKIPPED"))
        .collect();
    assert!(
        lines[0].contains("ended the stream") && lines[0].ends_with("reconnecting"),
        "{err}"
    );
    assert!(
        lines[1].starts_with("socktap: reconnected to socktapd at unix:"),
        "{err}"
    );
    let notice: api::LostEvents = serde_json::from_str(lines[2]).expect("a JSON loss line");
    assert_eq!(notice.source(), api::LossSource::Restart, "{err}");
    assert_eq!(lines.len(), 3, "{err}");
}

/// A cgroup of the test's own under the host's cgroup2 mount, with one
/// below it; removed when dropped (once no process is left in it), with
/// any made below it since.
struct TestCgroup {
    /// Its path in the hierarchy, as `/proc/PID/cgroup` shows it.
    path: String,
    top: std::path::PathBuf,
    inner: std::path::PathBuf,
}

impl TestCgroup {
    fn create() -> TestCgroup {
        let tree = socktap::service::cgroups::CgroupTree::discover();
        let mount = tree.mount().expect("a cgroup2 mount: --cgroup paths need cgroup v2");
        // Tests run in parallel: one cgroup each.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("socktap-test-{}-{n}", std::process::id());
        let top = mount.join(&name);
        let inner = top.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        TestCgroup {
            path: format!("/{name}"),
            top,
            inner,
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Deepest first: a cgroup with children cannot be removed.
        fn remove(dir: &std::path::Path) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&entry.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.top);
    }
}

/// What one run of [`nc_in`] was: who sent, from where, to where.
#[derive(Debug, PartialEq)]
struct NcRun {
    cgroup_id: u64,
    pid: u32,
    local_port: u32,
    remote_port: u32,
}

/// busybox nc, moved into the cgroup at `dir` before it starts, sends
/// `bytes` bytes to a listener of this test process (outside that
/// cgroup), which reads them and answers.
fn nc_in(dir: &std::path::Path, bytes: usize) -> NcRun {
    use std::os::unix::fs::MetadataExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "echo 0 > {}/cgroup.procs && exec busybox nc 127.0.0.1 {port}",
        dir.display()
    );
    let mut nc = std::process::Command::new("busybox")
        .args(["sh", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("busybox (Debian's busybox-static) runs a process in a cgroup");
    nc.stdin.take().unwrap().write_all(&vec![7u8; bytes]).unwrap();
    let (mut conn, nc_addr) = listener.accept().unwrap();
    conn.read_exact(&mut vec![0u8; bytes]).unwrap();
    let _ = conn.write_all(b"ok");
    drop(conn);
    assert!(nc.wait().unwrap().success());
    NcRun {
        cgroup_id: std::fs::metadata(dir).unwrap().ino(),
        pid: nc.id(),
        local_port: nc_addr.port().into(),
        remote_port: port.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_by_cgroup_path_takes_the_processes_in_that_tree_only() {
    let Some(_bpf) = bpf_available("cli_kernel") else {
        return;
    };
    let cgroup = TestCgroup::create();
    let KernelDaemon {
        probe: _probe,
        hub,
        daemon: d,
        ..
    } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;

    // The watch names the top cgroup; the senders run in cgroups below it.
    let watch = InProcessCli::watch_json(&d, &["--cgroup", &cgroup.path]).await;
    let out = watch.out.clone();
    let keys = || hub.status().prefilter.keys;
    assert_eq!(keys(), 2, "the kernel prefilter has the two cgroups' ids");
    assert_eq!(
        hub.status().prefilter.cgroup_roots,
        1,
        "the kernel has the named cgroup"
    );

    let events = || -> Vec<api::Event> {
        out.text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("proto3 JSON"))
            .collect()
    };
    let sent_by = |pid: u32| -> u64 {
        events()
            .iter()
            .filter(|e| e.pid == pid && e.kind() == api::EventKind::Send)
            .map(|e| u64::from(e.bytes))
            .sum()
    };
    let first = nc_in(&cgroup.inner, 1234);
    wait_for("nc's 1234 bytes in the watch", || sent_by(first.pid) >= 1234).await;

    // Cgroups made below the named one after the stream opened are matched
    // from their first call, before socktapd resolves the path again (once
    // a second): the kernel finds the named cgroup above them. Two levels,
    // used at once.
    let later = cgroup.top.join("later/deeper");
    std::fs::create_dir_all(&later).unwrap();
    let second = nc_in(&later, 4321);
    wait_for("the second nc's 4321 bytes in the watch", || {
        sent_by(second.pid) >= 4321
    })
    .await;
    // And socktapd follows the path: the new cgroups become prefilter keys.
    wait_for("the new cgroups in the kernel prefilter", || keys() == 4).await;

    // This process's receives and sends, made at the same time, had time
    // to arrive too, were they let through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch.run.abort();
    let text = out.text();
    assert_eq!((sent_by(first.pid), sent_by(second.pid)), (1234, 4321), "{text}");
    for e in events() {
        let run = NcRun {
            cgroup_id: e.cgroup_id,
            pid: e.pid,
            local_port: e.local_port,
            remote_port: e.remote_port,
        };
        assert!(
            run == first || run == second,
            "only the two nc sockets, each in its cgroup below the one named: {run:?} in {text}"
        );
    }
    d.stop().await;
}

/// `socktap watch --wide` shows each call's cgroup by its path: the id the
/// kernel recorded, named by socktapd (GetCgroupPaths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_wide_names_the_callers_cgroup() {
    let Some(_bpf) = bpf_available("cli_kernel") else {
        return;
    };
    let cgroup = TestCgroup::create();
    let KernelDaemon {
        probe: _probe,
        daemon: d,
        ..
    } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;
    let addr = d.url.trim_start_matches("http://");
    let watch = InProcessCli::start(&["--addr", addr, "watch", "--wide", "--cgroup", &cgroup.path]);
    let json = InProcessCli::start(&[
        "--addr",
        addr,
        "watch",
        "-o",
        "json",
        "--wide",
        "--cgroup",
        &cgroup.path,
    ]);
    wait_for("the watches to subscribe", || d.hub.subscriber_count() == 2).await;

    let nc = nc_in(&cgroup.inner, 1234);
    let inner = format!("{}/inner", cgroup.path);
    let rows = || -> Vec<String> {
        let pid = nc.pid.to_string();
        watch
            .out
            .text()
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(pid.as_str()))
            .map(str::to_owned)
            .collect()
    };
    let objects = || -> Vec<serde_json::Value> {
        json.out
            .text()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["pid"] == nc.pid)
            .collect()
    };
    wait_for("nc's send in the table and the JSON lines", || {
        !rows().is_empty() && !objects().is_empty()
    })
    .await;
    watch.run.abort();
    json.run.abort();
    for v in objects() {
        assert_eq!(v["cgroupId"], nc.cgroup_id.to_string(), "{v}");
        assert_eq!(v["cgroupPath"], inner.as_str(), "nc's cgroup by its path: {v}");
    }
    assert_eq!(without_skipped_notices(&json.err.text()), "");
    let text = watch.out.text();
    assert!(
        text.starts_with("TIME") && text.lines().next().unwrap().ends_with("CGROUP"),
        "{text}"
    );
    for row in rows() {
        assert!(
            row.ends_with(&format!(" {inner}")),
            "nc's cgroup {} ({inner}) by its path: {row}\n{text}",
            nc.cgroup_id
        );
    }
    assert_eq!(without_skipped_notices(&watch.err.text()), "");
    d.stop().await;
}
