//! Bounded soak tests against the real kernel: subscribe/cancel cycles and
//! many concurrent subscribers leave nothing behind, and neither do 20
//! restarts of socktapd. They print their figures (run with --nocapture;
//! docs/reliability.md records the last run). Needs root.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use libbpf_rs::query::{LinkInfoIter, ProgInfoIter};
use socktap::hub::HubConfig;
use socktap::probe::ProbeOptions;
use socktap_proto::v1 as pb;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn socktap_programs() -> HashSet<u32> {
    ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("st_"))
        .map(|p| p.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_cancel_cycles_and_200_subscribers_leave_nothing_behind() {
    let Some(_bpf) = bpf_available("soak") else {
        return;
    };
    // Like socktapd, ignore this process: it is both the server and the 200
    // clients, and serving its own events to 200 streams would feed back.
    let KernelDaemon {
        probe, hub, daemon: d, ..
    } = kernel_daemon(
        ProbeOptions {
            ignore_pid: Some(std::process::id()),
            ..Default::default()
        },
        HubConfig {
            max_subscribers: 256,
            ..Default::default()
        },
    )
    .await;
    let ids: HashSet<u32> = probe.control().program_ids().iter().copied().collect();
    let mut client = d.client().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let links = || LinkInfoIter::default().filter(|l| ids.contains(&l.prog_id)).count();

    let cycle = |client: &mut socktap_proto::v1::socktap_client::SocktapClient<tonic::transport::Channel>| {
        let mut c = client.clone();
        async move {
            let s = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap();
            drop(s);
        }
    };
    // 8 connections of 25: one connection carries at most
    // max_subscribers_per_connection (32) streams.
    let two_hundred = || async {
        let mut streams = Vec::new();
        for _ in 0..8 {
            let mut c = d.client().await;
            for _ in 0..25 {
                streams.push(
                    c.watch_events(pb::WatchEventsRequest::default())
                        .await
                        .unwrap()
                        .into_inner(),
                );
            }
        }
        wait_for("200 subscribers", || hub.subscriber_count() == 200).await;
        streams
    };
    // Warm up (the allocator keeps what 200 streams needed once), then
    // take the baseline: a leak shows as growth over a second round.
    for _ in 0..50 {
        cycle(&mut client).await;
    }
    drop(two_hundred().await);
    wait_for("no subscriber after warm-up", || hub.subscriber_count() == 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (rss0, tasks0) = (rss_kib(), metrics.num_alive_tasks());

    for _ in 0..1000 {
        cycle(&mut client).await;
    }
    let streams = two_hundred().await;
    assert!(probe.control().is_attached(), "programs attached while subscribed");
    let rss_peak = rss_kib();
    drop(streams);
    wait_for("every subscriber gone", || hub.subscriber_count() == 0).await;
    wait_for("tasks back to baseline", || metrics.num_alive_tasks() <= tasks0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (rss1, tasks1) = (rss_kib(), metrics.num_alive_tasks());
    println!(
        "soak: 1000 subscribe/cancel cycles + 200 concurrent subscribers: RSS {rss0} KiB before, {rss_peak} KiB with 200, \
         {rss1} KiB after; tasks {tasks0} before, {tasks1} after; mode {}",
        probe.mode()
    );
    assert!(
        (rss1 as f64) <= rss0 as f64 * 1.10 && (rss1 as f64) >= rss0 as f64 * 0.90,
        "RSS returns to baseline ±10 %: {rss0} -> {rss1} KiB"
    );
    assert!(tasks1 <= tasks0, "task count back to baseline: {tasks0} -> {tasks1}");
    assert!(
        !probe.control().is_attached() || probe.mode() == socktap::event::AttachMode::Kprobe,
        "detached once idle"
    );
    if probe.mode() != socktap::event::AttachMode::Kprobe {
        assert_eq!(links(), 0, "no link left while idle");
    }
    d.stop().await;
    drop(probe);
    wait_for("programs unloaded", || socktap_programs().is_disjoint(&ids)).await;
}

/// socktapd started and stopped with SIGTERM 20 times: each exit clean, its
/// log (to a pipe) plain text, and no BPF program left behind.
#[test]
fn twenty_socktapd_restarts_leave_no_bpf_objects() {
    let Some(_bpf) = bpf_available("restarts") else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_socktapd");
    let before = socktap_programs();
    for i in 0..20 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new(bin)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--mode",
                &test_mode().to_string(),
            ])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until it serves: the first stdout line says so.
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        assert!(line.contains("serving"), "start {i}: {line}");
        // SAFETY: FFI; signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "restart {i}: socktapd exited with {}", out.status);
        // Its log, written to a pipe: plain text, no terminal colours.
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("SIGTERM"), "restart {i}: {log}");
        assert!(
            !log.contains('\x1b'),
            "restart {i}: escape codes in a piped log: {log:?}"
        );
    }
    let mut extra = HashSet::new();
    for _ in 0..500 {
        extra = socktap_programs().difference(&before).copied().collect();
        if extra.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "restarts: 20 starts and SIGTERMs, socktap programs left behind: {}",
        extra.len()
    );
    assert!(extra.is_empty(), "programs left after 20 restarts: {extra:?}");
}
