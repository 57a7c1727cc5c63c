//! `socktap watch -o json` against socktapd and the real kernel: the CLI's
//! JSON lines carry the socket's cookie and its exact bytes. Needs root.

mod common;

use std::io::{Read, Write};
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
        hub,
        daemon: d,
        ..
    } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;

    let (mut c, mut s) = tcp_pair(true);
    let cookie = so_cookie(&c);
    let addr = d.url.trim_start_matches("http://").to_owned();
    // In process, the CLI is this test process: --include-self keeps our traffic.
    let args = [
        "socktap",
        "--addr",
        &addr,
        "watch",
        "-o",
        "json",
        "--cookie",
        &cookie.to_string(),
        "--limit",
        "3",
        "--include-self",
    ];
    let cli = socktap_client::cli::parse(args.map(Into::into), &mut std::io::stderr()).expect("valid arguments");
    let watcher = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = socktap_client::cli::run(cli, &mut out, &mut err).await;
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    });
    for _ in 0..1000 {
        if hub.subscriber_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::thread::spawn(move || {
        for n in [5usize, 5000, 50_000] {
            c.write_all(&vec![9u8; n]).unwrap();
            s.read_exact(&mut vec![0u8; n]).unwrap();
        }
    })
    .join()
    .unwrap();

    let (code, out, err) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("3 events")
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let events: Vec<api::Event> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("proto3 JSON"))
        .collect();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|e| e.cookie == cookie && e.kind() == api::EventKind::Send),
        "{out}"
    );
    assert_eq!((events[0].bytes, events[1].bytes), (5, 5000));
    // A 50 KB write may take more than one send call if the socket buffer fills.
    assert!(events[2].bytes > 0 && events[2].bytes <= 50_000);
    assert_eq!(events[0].local_addr, "::1");
    assert_eq!(events[0].pid, std::process::id());
    d.stop().await;
}
