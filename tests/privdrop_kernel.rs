//! `socktapd --user nobody`: after loading, attaching and binding, every
//! thread runs as nobody with no capability, and socktapd keeps serving:
//! the gate re-attaches the programs for a new subscriber, and the events
//! carry the socket's exact bytes. Needs root.

mod common;

use std::io::{Read, Write};

use common::*;
use socktap_client::DaemonAddr;

fn status_field(path: &std::path::Path, field: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socktapd_serves_as_nobody_with_no_capability() {
    let Some(_bpf) = bpf_available("privdrop") else {
        return;
    };
    let kernel_ok = socktap::probe::kernel_version().unwrap_or((0, 0)) >= (6, 5);
    if !kernel_ok {
        eprintln!("SKIPPED privdrop: bpf() checks capabilities per command only from Linux 6.5");
        return;
    }
    // Both listeners held until both ports are known: one dropped at once
    // can hand its port to the next bind (CI: socktapd's --metrics-listen
    // then found its own gRPC port taken).
    let (a, b) = (
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (port, metrics_port) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
    drop((a, b));
    let mut child = spawn_socktapd(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
        "--user",
        "nobody",
    ]);

    // Every thread: uid nobody, no capability at all.
    let pid = child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .collect();
    assert!(tasks.len() > 1, "socktapd runs several threads");
    for t in &tasks {
        let status = t.join("status");
        assert_eq!(
            status_field(&status, "Uid:").split_whitespace().collect::<Vec<_>>(),
            ["65534"; 4],
            "{t:?}"
        );
        assert_eq!(status_field(&status, "CapEff:"), "0000000000000000", "{t:?}");
        assert_eq!(status_field(&status, "CapPrm:"), "0000000000000000", "{t:?}");
    }

    // Still serving: a new subscriber opens the gate (re-attaching the
    // programs as nobody) and gets a socket's exact bytes.
    let addr: DaemonAddr = format!("127.0.0.1:{port}").parse().unwrap();
    a_subscriber_gets_exact_bytes(&addr, 1234).await;

    // The metrics (--metrics-listen, bound before the drop) say so too.
    let mut http = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut metrics = String::new();
    http.read_to_string(&mut metrics).unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let delivered: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("socktap_events_delivered_total ")?.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(delivered >= 1, "{metrics}");

    // SAFETY: FFI; signals our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "clean exit as nobody");
}
