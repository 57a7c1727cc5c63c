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
/// Calls the kernel skipped the program on (announced by KERNEL_SKIPPED
/// notices: on a kernel that preempts kernel code) may leave
/// the sums short: by at most `largest_call` bytes each, the test's
/// biggest single call, such a shortfall counts as arrived (and says so).
async fn sums(
    stream: &mut tonic::Streaming<pb::WatchEventsResponse>,
    cookie: u64,
    (send, recv): (u64, u64),
    largest_call: u64,
) -> (u64, u64) {
    let (s, r, _) = sums_and_callers(stream, cookie, (send, recv), largest_call).await;
    (s, r)
}

/// Who made a call: cgroup id, uid, thread name.
type Caller = (u64, u32, String);

/// [`sums`], and the callers the events named.
async fn sums_and_callers(
    stream: &mut tonic::Streaming<pb::WatchEventsResponse>,
    cookie: u64,
    (send, recv): (u64, u64),
    largest_call: u64,
) -> (u64, u64, HashSet<Caller>) {
    let (mut s, mut r, mut skipped, mut callers) = (0u64, 0u64, 0u64, HashSet::new());
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message()).await;
        let Ok(msg) = msg else { break };
        match msg.expect("stream ok").and_then(|m| m.message) {
            Some(Message::Events(b)) => tally(b, cookie, (&mut s, &mut r), &mut callers),
            Some(Message::Lost(l)) if l.source() == pb::LossSource::KernelSkipped => {
                skipped += l.count;
                // The shortfall may be all there is: settle from now on.
                deadline = deadline.min(tokio::time::Instant::now() + Duration::from_secs(2));
            }
            Some(Message::Lost(l)) => panic!("unexpected loss: {l:?}"),
            None => break,
        }
        if s >= send && r >= recv {
            // Settle: a surplus event would show up now.
            deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        }
    }
    let short = send.saturating_sub(s) + recv.saturating_sub(r);
    if short > 0 && skipped > 0 && short <= skipped * largest_call {
        eprintln!("{short} bytes short, covered by {skipped} calls the kernel skipped the program on (announced)");
        return (s.max(send), r.max(recv), callers);
    }
    (s, r, callers)
}

/// Adds a batch's bytes per kind, checking that every event is `cookie`'s,
/// and notes its callers.
fn tally(b: pb::EventBatch, cookie: u64, (sent, received): (&mut u64, &mut u64), callers: &mut HashSet<Caller>) {
    for e in b.events {
        assert_eq!(e.cookie, cookie, "only the filtered socket: {e:?}");
        callers.insert((e.cgroup_id, e.uid, e.comm.clone()));
        match pb::EventKind::try_from(e.kind).unwrap() {
            pb::EventKind::Send => *sent += e.bytes as u64,
            pb::EventKind::Recv => *received += e.bytes as u64,
            pb::EventKind::Unspecified => panic!("unspecified kind"),
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
    wait_subscribers(&hub, 2).await;
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
        sums(&mut watch_c, cc, (sent, 777), 300_000).await,
        (sent, 777),
        "client socket: send, recv bytes"
    );
    assert_eq!(
        sums(&mut watch_s, sc, (777, sent), 300_000).await,
        (777, sent),
        "server socket: send, recv bytes"
    );

    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.subscribers.len(), 2);
    assert_eq!(st.attach_mode, socktap::convert::mode(Some(probe.mode())) as i32);
    assert_eq!(st.programs.len(), ids.len(), "status lists the loaded programs");
    // kprobe mode's return probes, made in tracefs (the tests run as root).
    let return_probes = (probe.mode() == socktap::event::AttachMode::Kprobe).then_some(pb::ReturnProbeStatus {
        max_active: 4096,
        tracefs: true,
        misses_counted: true,
    });
    assert_eq!(st.return_probes, return_probes);
    // kprobe mode gives connections their cookies at connect (root has
    // CAP_NET_ADMIN); the other modes' programs ask for them.
    let cookies = if probe.mode() == socktap::event::AttachMode::Kprobe {
        pb::CookieSource::AtConnect
    } else {
        pb::CookieSource::Programs
    };
    assert_eq!(st.cookies(), cookies);
    // Root may enter every network namespace, whose dumps all succeed.
    assert_eq!((st.cookie_namespaces_missed, st.cookie_own_namespace_only), (0, false));
    // The same in the metrics.
    let metrics = socktap::metrics::encode(&d.hub).unwrap();
    let mode = format!("{:?}", probe.mode()).to_lowercase();
    assert!(metrics.contains(&format!(r#"attach_mode="{mode}"}} 1"#)), "{metrics}");
    assert_eq!(
        metrics.contains("\nsocktap_return_probe_max_active 4096\n"),
        return_probes.is_some(),
        "{metrics}"
    );
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

/// Sends `n` bytes each way over a connection, in `calls` writes.
fn ping(c: &mut std::net::TcpStream, s: &mut std::net::TcpStream, calls: usize, n: usize) {
    for _ in 0..calls {
        c.write_all(&vec![1u8; n]).unwrap();
        s.read_exact(&mut vec![0u8; n]).unwrap();
        s.write_all(&vec![2u8; n]).unwrap();
        c.read_exact(&mut vec![0u8; n]).unwrap();
    }
}

/// Events the kernel wrote (took a seq for) while `f` ran.
/// The events the kernel wrote while `f` ran, and the calls it skipped the
/// programs on (they take no seq: fentry and tracepoint programs on a
/// kernel that preempts them, as 7.3 in the kernel matrix does). A lower
/// bound on the calls written counts both; an upper bound, the events.
fn produced_during(probe: &socktap::probe::Probe, f: impl FnOnce()) -> (u64, u64) {
    let (before, skipped) = (probe.counters().produced, probe.control().skipped_calls());
    f();
    (
        probe.counters().produced - before,
        probe.control().skipped_calls() - skipped,
    )
}

/// Waits until the values the prefilter no longer wants have left the
/// kernel's map: they stay until no program can still be looking them up.
async fn stale_prefilter_keys_gone(probe: &socktap::probe::Probe) {
    for _ in 0..2000 {
        if probe.control().prefilter().stale_keys == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("stale prefilter keys after 10 s: {:?}", probe.control().prefilter());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_writes_only_calls_some_subscriber_may_want() {
    let Some(_bpf) = bpf_available("daemon_kernel") else {
        return;
    };
    let KernelDaemon { probe, hub, daemon: d } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;
    let mut client = d.client().await;
    let (mut wc, mut ws) = tcp_pair(false);
    let (mut uc, mut us) = tcp_pair(false);
    let (cookie_wc, cookie_ws) = (so_cookie(&wc), so_cookie(&ws));

    // One subscriber by the wanted server socket's local port, one by the
    // wanted client socket's cookie: the prefilter holds those two values.
    let by_port = pb::WatchEventsRequest {
        allow: vec![pb::EventFilter {
            local_ports: vec![ws.local_addr().unwrap().port().into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut watch_ws = client.watch_events(by_port).await.unwrap().into_inner();
    let mut watch_wc = client.watch_events(by_cookie(cookie_wc)).await.unwrap().into_inner();
    wait_subscribers(&hub, 2).await;
    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(st.kernel_gate_open && st.kernel_prefilter, "{st:?}");
    assert_eq!(st.kernel_prefilter_keys, 2);

    // 8000 calls on an unwanted connection: the kernel writes none of them
    // (what it writes meanwhile is other traffic on the host).
    let (unwanted, _) = produced_during(&probe, || ping(&mut uc, &mut us, 2000, 10));
    assert!(
        unwanted < 800,
        "prefilter on: {unwanted} events written for 8000 unwanted calls"
    );

    // The wanted connection: each subscriber gets exactly its socket's bytes,
    // with no loss and no seq gap announced.
    let (wanted, skipped) = produced_during(&probe, || ping(&mut wc, &mut ws, 100, 1000));
    assert!(
        wanted + skipped >= 400,
        "{wanted} events written for 400 wanted calls ({skipped} skipped)"
    );
    assert_eq!(
        sums(&mut watch_wc, cookie_wc, (100_000, 100_000), 1000).await,
        (100_000, 100_000)
    );
    assert_eq!(
        sums(&mut watch_ws, cookie_ws, (100_000, 100_000), 1000).await,
        (100_000, 100_000)
    );

    // A subscriber without filters needs every call: the prefilter goes off.
    let everything = client
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    wait_subscribers(&hub, 3).await;
    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(!st.kernel_prefilter && st.kernel_prefilter_keys == 0, "{st:?}");
    let (all, skipped) = produced_during(&probe, || ping(&mut uc, &mut us, 2000, 10));
    assert!(
        all + skipped >= 8000,
        "prefilter off: {all} events written for 8000 calls ({skipped} skipped)"
    );

    // It leaves: the prefilter is back, with the same two values.
    drop(everything);
    wait_subscribers(&hub, 2).await;
    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(st.kernel_prefilter && st.kernel_prefilter_keys == 2, "{st:?}");
    let (unwanted, _) = produced_during(&probe, || ping(&mut uc, &mut us, 2000, 10));
    assert!(unwanted < 800, "prefilter on again: {unwanted} events written");
    ping(&mut wc, &mut ws, 10, 500);
    assert_eq!(sums(&mut watch_wc, cookie_wc, (5000, 5000), 500).await, (5000, 5000));
    assert_eq!(sums(&mut watch_ws, cookie_ws, (5000, 5000), 500).await, (5000, 5000));

    // Another port is wanted, then the first port's subscriber leaves: its
    // value leaves the kernel too (the field stays in use), once no program
    // can still look it up, so of the wanted connection only the client
    // socket's 200 calls are written.
    let by_other_port = pb::WatchEventsRequest {
        allow: vec![pb::EventFilter {
            local_ports: vec![uc.local_addr().unwrap().port().into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let _watch_uc = client.watch_events(by_other_port).await.unwrap().into_inner();
    wait_subscribers(&hub, 3).await;
    drop(watch_ws);
    wait_subscribers(&hub, 2).await;
    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(st.kernel_prefilter && st.kernel_prefilter_keys == 2, "{st:?}");
    stale_prefilter_keys_gone(&probe).await;
    let (written, skipped) = produced_during(&probe, || ping(&mut wc, &mut ws, 100, 10));
    assert!(
        written + skipped >= 200 && written < 300,
        "{written} events written for 200 wanted and 200 unwanted calls ({skipped} skipped)"
    );
    d.stop().await;
}

/// Each field the kernel prefilter can check lets the calls it names
/// through: a subscriber whose filter puts one value in that field and two
/// in `cookies` (so that field, having fewer, is the one the prefilter
/// uses) gets every byte of its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prefilter_field_lets_its_calls_through() {
    let Some(_bpf) = bpf_available("daemon_kernel") else {
        return;
    };
    let KernelDaemon { probe, hub, daemon: d } = kernel_daemon(ProbeOptions::default(), HubConfig::default()).await;
    let mut client = d.client().await;
    let (mut c, mut s) = tcp_pair(false);
    let cookie = so_cookie(&c);

    // By cookie first, which also tells the test its cgroup id, uid and
    // thread name as the kernel sees them.
    let mut w = client.watch_events(by_cookie(cookie)).await.unwrap().into_inner();
    wait_subscribers(&hub, 1).await;
    ping(&mut c, &mut s, 5, 100);
    let (sent, received, callers) = sums_and_callers(&mut w, cookie, (500, 500), 100).await;
    assert_eq!((sent, received), (500, 500), "by cookie");
    assert_eq!(callers.len(), 1, "{callers:?}");
    let (cgroup, uid, comm) = callers.into_iter().next().unwrap();
    drop(w);
    wait_subscribers(&hub, 0).await;

    let narrow = |f: pb::EventFilter| pb::WatchEventsRequest {
        allow: vec![pb::EventFilter {
            cookies: vec![cookie, u64::MAX],
            ..f
        }],
        ..Default::default()
    };
    let cases = [
        (
            "pids",
            pb::EventFilter {
                pids: vec![std::process::id()],
                ..Default::default()
            },
        ),
        (
            "cgroup_ids",
            pb::EventFilter {
                cgroup_ids: vec![cgroup],
                ..Default::default()
            },
        ),
        (
            "uids",
            pb::EventFilter {
                uids: vec![uid],
                ..Default::default()
            },
        ),
        (
            "comms",
            pb::EventFilter {
                comms: vec![comm.clone()],
                ..Default::default()
            },
        ),
        (
            "local_ports",
            pb::EventFilter {
                local_ports: vec![c.local_addr().unwrap().port().into()],
                ..Default::default()
            },
        ),
        (
            "remote_ports",
            pb::EventFilter {
                remote_ports: vec![c.peer_addr().unwrap().port().into()],
                ..Default::default()
            },
        ),
    ];
    for (field, f) in cases {
        let mut w = client.watch_events(narrow(f)).await.unwrap().into_inner();
        wait_subscribers(&hub, 1).await;
        let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        assert!(st.kernel_prefilter && st.kernel_prefilter_keys == 1, "{field}: {st:?}");
        // 10 calls on `c` (and 10 on its peer, which only pids and
        // cgroup_ids name).
        let (produced, skipped) = produced_during(&probe, || ping(&mut c, &mut s, 5, 100));
        assert!(
            produced + skipped >= 10,
            "{field}: {produced} events written for 10 calls ({skipped} skipped)"
        );
        assert_eq!(sums(&mut w, cookie, (500, 500), 100).await, (500, 500), "{field}");
        drop(w);
        wait_subscribers(&hub, 0).await;
    }

    // More values than the kernel map holds (4096): the prefilter goes off
    // and every call is written; the hub still filters.
    let many = pb::WatchEventsRequest {
        allow: (0..5)
            .map(|i| pb::EventFilter {
                // Made-up cookies far above any real one (the kernel counts
                // them up from 1: small values are other sockets, gRPC's).
                cookies: std::iter::once(cookie)
                    .chain((1..1000).map(|v| u64::MAX - v - i * 1000))
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut w = client.watch_events(many).await.unwrap().into_inner();
    wait_subscribers(&hub, 1).await;
    let st = client.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(!st.kernel_prefilter && st.kernel_prefilter_keys == 0, "{st:?}");
    ping(&mut c, &mut s, 5, 100);
    assert_eq!(sums(&mut w, cookie, (500, 500), 100).await, (500, 500), "prefilter off");
    d.stop().await;
}

/// While other subscribers come and go (each changing the prefilter: other
/// values, another field, off and on again), a connected subscriber's
/// socket keeps moving bytes, and every byte is reported, but for calls
/// the kernel skipped the program on and said so (fentry or tracepoint
/// mode on a kernel that preempts kernel code: the kernel matrix's 7.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefilter_changes_never_drop_a_connected_subscribers_calls() {
    let Some(_bpf) = bpf_available("daemon_kernel") else {
        return;
    };
    // Queues that hold every event of the test even if the drain stalls (a
    // debug build on a busy machine): what is checked is the kernel side.
    let queues = HubConfig {
        queue_events: 1 << 22,
        queue_bytes: 1 << 30,
        ..HubConfig::default()
    };
    let KernelDaemon {
        probe: _probe, // dropping it unloads the programs
        hub,
        daemon: d,
    } = kernel_daemon(ProbeOptions::default(), queues).await;
    let mut client = d.client().await;
    let (mut c, mut s) = tcp_pair(false);
    let cookie = so_cookie(&c);
    let mut watch = client.watch_events(by_cookie(cookie)).await.unwrap().into_inner();
    wait_subscribers(&hub, 1).await;
    // Drained as it comes, until the daemon stops (which flushes the queue).
    let drained = tokio::spawn(async move {
        let (mut send, mut recv, mut skipped, mut callers) = (0u64, 0u64, 0u64, HashSet::new());
        while let Some(m) = watch.message().await.expect("stream ok") {
            match m.message {
                Some(Message::Events(b)) => tally(b, cookie, (&mut send, &mut recv), &mut callers),
                Some(Message::Lost(l)) if l.source() == pb::LossSource::KernelSkipped => skipped += l.count,
                Some(Message::Lost(l)) => panic!("unexpected loss: {l:?}"),
                None => {}
            }
        }
        (send, recv, skipped)
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = std::thread::spawn({
        let stop = stop.clone();
        move || {
            // Paced a little (each sleep takes ~50-60 µs with the default
            // timer slack), so the reader keeps up in a debug build too.
            let mut round_trips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ping(&mut c, &mut s, 1, 100);
                round_trips += 1;
                std::thread::sleep(Duration::from_micros(1));
            }
            round_trips
        }
    });
    let others = [
        pb::EventFilter {
            local_ports: vec![1],
            ..Default::default()
        },
        pb::EventFilter {
            cookies: vec![u64::MAX],
            pids: vec![1],
            ..Default::default()
        },
        pb::EventFilter {
            comm_prefixes: vec!["nothing".into()], // not a kernel field: off
            ..Default::default()
        },
    ];
    let mut changes = 0;
    for round in 0..10 {
        for f in &others {
            let other = pb::WatchEventsRequest {
                allow: vec![f.clone()],
                ..Default::default()
            };
            let w = client.watch_events(other).await.unwrap().into_inner();
            wait_subscribers(&hub, 2).await;
            tokio::time::sleep(Duration::from_millis(2 + round)).await;
            drop(w);
            wait_subscribers(&hub, 1).await;
            changes += 2;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let round_trips = traffic.join().unwrap();
    assert!(
        round_trips > 100,
        "traffic ran during the {changes} changes: {round_trips} round trips"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // the last calls reach the hub
    d.stop().await;
    let bytes = round_trips * 100;
    let (send, recv, skipped) = drained.await.unwrap();
    if skipped > 0 {
        eprintln!(
            "the kernel skipped the program on {skipped} calls (announced); missing: {} bytes sent, {} received of {bytes} each",
            bytes - send,
            bytes - recv
        );
    }
    // Each skipped call moved at most 100 bytes.
    assert!(
        send <= bytes && recv <= bytes && (bytes - send) + (bytes - recv) <= skipped * 100,
        "{send} sent and {recv} received of {bytes} each, {skipped} calls announced as skipped"
    );
}
