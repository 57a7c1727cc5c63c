//! socktapd end to end against the real kernel: probe → hub → gRPC → client.
//! Needs root (CI is root).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use libbpf_rs::query::ProgInfoIter;
use socktap::hub::HubConfig;
use socktap::probe::ProbeOptions;
use socktap_proto::v1 as pb;
use socktap_proto::v1::watch_events_response::Message;

fn by_cookie(cookie: u64) -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        allow: vec![pb::EventFilter {
            cookies: vec![cookie],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Sums bytes per kind from a stream until `send` and `recv` bytes are seen
/// (or the stream stalls), then checks nothing more arrives for a while.
async fn sums(stream: &mut tonic::Streaming<pb::WatchEventsResponse>, cookie: u64, send: u64, recv: u64) -> (u64, u64) {
    let (mut s, mut r) = (0u64, 0u64);
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message()).await;
        let Ok(msg) = msg else { return (s, r) };
        match msg.expect("stream ok").and_then(|m| m.message) {
            Some(Message::Events(b)) => {
                for e in b.events {
                    assert_eq!(e.cookie, cookie, "only the filtered socket: {e:?}");
                    match pb::EventKind::try_from(e.kind).unwrap() {
                        pb::EventKind::Send => s += e.bytes as u64,
                        pb::EventKind::Recv => r += e.bytes as u64,
                        pb::EventKind::Unspecified => panic!("unspecified kind"),
                    }
                }
            }
            Some(Message::Lost(l)) => panic!("unexpected loss: {l:?}"),
            None => return (s, r),
        }
        if s >= send && r >= recv {
            // Settle: a surplus event would show up now.
            deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_subscribers_get_exactly_their_sockets_bytes_and_shutdown_detaches() {
    let Some(_bpf) = bpf_available("daemon_kernel") else {
        return;
    };
    let KernelDaemon { probe, hub, daemon: d } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;
    let ids: HashSet<u32> = probe.control().program_ids().iter().copied().collect();
    let mut client = d.client().await;

    // With no subscriber the gate is closed: the kernel writes nothing.
    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(!st.kernel_gate_open);
    let before = probe.counters().produced;
    {
        let (mut c, mut s) = tcp_pair(false);
        c.write_all(&[0u8; 1000]).unwrap();
        s.read_exact(&mut [0u8; 1000]).unwrap();
    }
    assert_eq!(probe.counters().produced, before, "gate closed: nothing produced");

    let (mut c, mut s) = tcp_pair(false);
    let (cc, sc) = (so_cookie(&c), so_cookie(&s));
    let mut watch_c = client.watch_events(by_cookie(cc)).await.unwrap().into_inner();
    let mut watch_s = client.watch_events(by_cookie(sc)).await.unwrap().into_inner();
    for _ in 0..1000 {
        if hub.subscriber_count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        client
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .kernel_gate_open
    );

    let traffic = std::thread::spawn(move || {
        let sizes = [10usize, 20_000, 1, 300_000];
        for n in sizes {
            c.write_all(&vec![1u8; n]).unwrap();
            s.read_exact(&mut vec![0u8; n]).unwrap();
        }
        s.write_all(&[2u8; 777]).unwrap();
        c.read_exact(&mut [0u8; 777]).unwrap();
        (sizes.iter().sum::<usize>() as u64, c, s)
    });
    let (sent, _c, _s) = traffic.join().unwrap();
    assert_eq!(
        sums(&mut watch_c, cc, sent, 777).await,
        (sent, 777),
        "client socket: send, recv bytes"
    );
    assert_eq!(
        sums(&mut watch_s, sc, 777, sent).await,
        (777, sent),
        "server socket: send, recv bytes"
    );

    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.subscribers.len(), 2);
    assert_eq!(st.attach_mode, socktap::convert::mode(Some(probe.mode())) as i32);
    assert_eq!(st.programs.len(), ids.len(), "status lists the loaded programs");
    assert!(st.kernel_events_produced >= st.events_read);

    // Shutdown ends both streams and, with the probe dropped, unloads everything.
    d.stop().await;
    assert!(watch_c.message().await.unwrap().is_none());
    assert!(watch_s.message().await.unwrap().is_none());
    drop(probe); // joins the reader thread, which dispatched to the hub
    let mut left = ids.clone();
    for _ in 0..500 {
        let live: HashSet<u32> = ProgInfoIter::default().map(|p| p.id).collect();
        left.retain(|id| live.contains(id));
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(left.is_empty(), "programs left after shutdown: {left:?}");
}
