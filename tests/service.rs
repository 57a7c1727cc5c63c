//! The gRPC service and hub over a synthetic event source: filters, fan-out,
//! slow subscribers, history, limits, validation, health, reflection and
//! shutdown. No privileges needed.

mod common;

use std::time::Duration;

use common::{next_msg, wait_for, wait_subscribers, TestDaemon};
use socktap::event::{AttachMode, Comm, Event, EventKind};
use socktap::hub::{Hub, HubConfig, Source};
use socktap::probe::Batch;
use socktap_proto::v1 as pb;
use socktap_proto::v1::watch_events_response::Message;
use tokio::sync::mpsc;
use tonic::Code;

fn event(seq: u64, cookie: u64, pid: u32) -> Event {
    Event {
        seq,
        timestamp_ns: socktap::event::monotonic_now_ns(),
        cookie,
        kind: if seq.is_multiple_of(2) {
            EventKind::Send
        } else {
            EventKind::Recv
        },
        bytes: 100 + seq as u32,
        errno: 0,
        pid,
        tid: pid,
        uid: 0,
        cgroup_id: 1,
        cgroup_tree: 0,
        netns: 1,
        cpu: 0,
        comm: Comm::from_kernel(b"synthetic"),
        local: "127.0.0.1:1000".parse().unwrap(),
        remote: "127.0.0.1:2000".parse().unwrap(),
        mode: AttachMode::Tracepoint,
    }
}

/// A hub fed by a channel the test writes to.
fn synthetic(config: HubConfig) -> (Hub, mpsc::Sender<Batch>) {
    let hub = Hub::new(config, Source::default());
    let (tx, rx) = mpsc::channel(64);
    let h = hub.clone();
    tokio::spawn(async move { h.run(rx).await });
    (hub, tx)
}

fn by_cookie(cookies: &[u64]) -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        allow: vec![pb::EventFilter {
            cookies: cookies.to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Reads events until `n` have arrived, returning them and any loss notices.
async fn read_events(
    stream: &mut tonic::Streaming<pb::WatchEventsResponse>,
    n: usize,
) -> (Vec<pb::Event>, Vec<pb::LostEvents>) {
    let (mut events, mut lost) = (Vec::new(), Vec::new());
    while events.len() < n {
        match next_msg(stream).await {
            Some(Message::Events(b)) => events.extend(b.events),
            Some(Message::Lost(l)) => lost.push(l),
            None => break,
        }
    }
    (events, lost)
}

#[tokio::test]
async fn two_subscribers_get_their_own_events_field_by_field() {
    let (hub, tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub.clone()).await;
    let mut a = d.watch(by_cookie(&[1])).await;
    let mut b = d.watch(by_cookie(&[2, 3])).await;
    wait_subscribers(&hub, 2).await;

    let events: Vec<Event> = (0..30).map(|i| event(i, 1 + i % 3, 77)).collect();
    tx.send(Batch {
        events: events.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let (got_a, lost_a) = read_events(&mut a, 10).await;
    let (got_b, lost_b) = read_events(&mut b, 20).await;
    assert!(lost_a.is_empty() && lost_b.is_empty());
    assert_eq!(
        got_a.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..30).filter(|i: &u64| i.is_multiple_of(3)).collect::<Vec<_>>()
    );
    assert!(got_b.iter().all(|e| e.cookie == 2 || e.cookie == 3));
    assert_eq!(got_b.len(), 20);

    let e = &got_a[1];
    let src = &events[3];
    assert_eq!(e.cookie, 1);
    assert_eq!(e.seq, 3);
    assert_eq!(e.kind, pb::EventKind::Recv as i32);
    assert_eq!(e.bytes, 103);
    assert_eq!((e.pid, e.tid, e.comm.as_str()), (77, 77, "synthetic"));
    assert_eq!((e.local_addr.as_str(), e.local_port), ("127.0.0.1", 1000));
    assert_eq!((e.remote_addr.as_str(), e.remote_port), ("127.0.0.1", 2000));
    assert_eq!(e.family, pb::AddressFamily::Ipv4 as i32);
    assert_eq!(e.monotonic_ns, src.timestamp_ns);
    assert_eq!(e.mode, pb::AttachMode::Tracepoint as i32);
    let wall = e.time.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((wall.seconds - now).abs() < 60, "wall time is now-ish: {wall:?}");
    d.stop().await;
}

#[tokio::test]
async fn a_stalled_subscriber_costs_a_fast_one_nothing_and_its_losses_add_up() {
    let (hub, tx) = synthetic(HubConfig {
        queue_events: 5000,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    let mut fast = d.watch(pb::WatchEventsRequest::default()).await;
    let mut slow = d.watch(pb::WatchEventsRequest::default()).await;
    wait_subscribers(&hub, 2).await;

    // Lockstep with the fast reader: each batch is fed once the fast one has
    // read the previous one, while the slow one reads nothing at all.
    const BATCH: u64 = 1000;
    const TOTAL: u64 = 200 * BATCH;
    for chunk in 0..TOTAL / BATCH {
        let events = (chunk * BATCH..(chunk + 1) * BATCH).map(|s| event(s, 9, 1)).collect();
        tx.send(Batch {
            events,
            ..Default::default()
        })
        .await
        .unwrap();
        let (got, lost) = read_events(&mut fast, BATCH as usize).await;
        assert!(lost.is_empty(), "fast subscriber lost events: {lost:?}");
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (chunk * BATCH..(chunk + 1) * BATCH).collect::<Vec<_>>(),
            "in order, none missing"
        );
    }

    // The slow one's queue holds what it has not read, in the status too.
    let st = d.status().await;
    let per_sub: u64 = st.subscribers.iter().map(|s| s.queued_bytes).sum();
    assert!(st.queued_bytes > 0, "the stalled subscriber's queue is not empty");
    assert_eq!(st.queued_bytes, per_sub, "the daemon's total is the subscribers' sum");

    // Now the slow one drains: delivered + lost == matched.
    let (mut delivered, mut lost_count, mut notices) = (0u64, 0u64, 0);
    while delivered + lost_count < TOTAL {
        match next_msg(&mut slow).await.unwrap() {
            Message::Events(b) => delivered += b.events.len() as u64,
            Message::Lost(l) => {
                assert_eq!(l.source, pb::LossSource::SubscriberQueue as i32);
                assert!(
                    l.first_seq <= l.last_seq && l.count <= l.last_seq - l.first_seq + 1,
                    "{l:?}"
                );
                lost_count += l.count;
                notices += 1;
            }
        }
    }
    assert!(lost_count > 0 && notices > 0, "the stalled subscriber lost events");
    assert_eq!(delivered + lost_count, TOTAL);
    let status = d.status().await;
    let s = status
        .subscribers
        .iter()
        .find(|s| s.lost > 0)
        .expect("slow subscriber in status");
    assert_eq!(s.lost, lost_count);
    assert_eq!(s.matched, TOTAL);
    // The daemon's totals: both subscribers' deliveries, the slow one's
    // losses; and they stay when the subscribers go.
    assert_eq!(status.subscriber_lost, lost_count);
    assert_eq!(status.events_delivered, TOTAL + delivered);
    drop((fast, slow));
    wait_subscribers(&hub, 0).await;
    let after = d.status().await;
    assert!(after.subscribers.is_empty());
    assert_eq!(
        (after.subscriber_lost, after.events_delivered),
        (lost_count, TOTAL + delivered),
        "totals of subscribers gone"
    );
    d.stop().await;
}

#[tokio::test]
async fn replay_resume_since_and_limit() {
    let (hub, tx) = synthetic(HubConfig {
        history_events: 100,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    tx.send(Batch {
        events: (0..150).map(|s| event(s, s % 2, 1)).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for("150 events read", || hub.status().events_read == 150).await;
    let mut c = d.client().await;

    // The last 5 events with cookie 1 from history, then a limit ends it.
    let req = pb::WatchEventsRequest {
        replay_last: 5,
        limit: 5,
        ..by_cookie(&[1])
    };
    let mut s = c.watch_events(req).await.unwrap().into_inner();
    let (ev, _) = read_events(&mut s, 5).await;
    assert_eq!(
        ev.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![141, 143, 145, 147, 149]
    );
    assert!(next_msg(&mut s).await.is_none(), "limit ends the stream");

    // Resume after 140: history still has it.
    let req = pb::WatchEventsRequest {
        resume_after_seq: Some(140),
        limit: 9,
        ..Default::default()
    };
    let mut s = c.watch_events(req).await.unwrap().into_inner();
    let (ev, lost) = read_events(&mut s, 9).await;
    assert!(lost.is_empty());
    assert_eq!(
        ev.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (141..150).collect::<Vec<_>>()
    );

    // Resume after 10: history starts at 50, so 39 are announced lost.
    let req = pb::WatchEventsRequest {
        resume_after_seq: Some(10),
        limit: 100,
        ..Default::default()
    };
    let mut s = c.watch_events(req).await.unwrap().into_inner();
    let Some(Message::Lost(l)) = next_msg(&mut s).await else {
        panic!("a history loss notice first")
    };
    assert_eq!(
        (l.source, l.count, l.first_seq, l.last_seq),
        (pb::LossSource::History as i32, 39, 11, 49)
    );
    let (ev, _) = read_events(&mut s, 100).await;
    assert_eq!(ev.first().map(|e| e.seq), Some(50));

    // Resume after an event this socktapd never read (another socktapd's,
    // or one from before a restart, which starts the numbers again):
    // refused, naming the field, rather than silently resuming elsewhere.
    let err = c
        .watch_events(pb::WatchEventsRequest {
            resume_after_seq: Some(150),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("resume_after_seq: 150 is after the newest event this socktapd has read (149)"),
        "{}",
        err.message()
    );

    // Since the epoch: all of history; then follow live events.
    let req = pb::WatchEventsRequest {
        since: Some(socktap_proto::Timestamp { seconds: 0, nanos: 0 }),
        limit: 101,
        ..Default::default()
    };
    let mut s = c.watch_events(req).await.unwrap().into_inner();
    let (ev, _) = read_events(&mut s, 100).await;
    assert_eq!(ev.len(), 100);
    tx.send(Batch {
        events: vec![event(150, 0, 1)],
        ..Default::default()
    })
    .await
    .unwrap();
    let (ev, _) = read_events(&mut s, 1).await;
    assert_eq!(ev[0].seq, 150, "then follows live");
    assert!(next_msg(&mut s).await.is_none());

    // Batching: at most 7 events per message.
    let req = pb::WatchEventsRequest {
        replay_last: 20,
        limit: 20,
        max_batch_events: Some(7),
        ..Default::default()
    };
    let mut s = c.watch_events(req).await.unwrap().into_inner();
    let mut sizes = Vec::new();
    while let Some(Message::Events(b)) = next_msg(&mut s).await {
        sizes.push(b.events.len());
    }
    assert_eq!(sizes.iter().sum::<usize>(), 20);
    assert!(sizes.iter().all(|&n| n <= 7), "{sizes:?}");
    d.stop().await;
}

#[tokio::test]
async fn a_resume_names_its_instance_and_a_restart_is_announced() {
    // The socktapd a client was watching, then the one started after it.
    let (before, tx_before) = synthetic(HubConfig::default());
    let (after, tx_after) = synthetic(HubConfig::default());
    let d = TestDaemon::start(before.clone()).await;
    let mut c = d.client().await;
    let status = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.instance_id, before.instance_id());
    assert_ne!(before.instance_id(), after.instance_id());
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_subscribers(&before, 1).await;
    tx_before
        .send(Batch {
            events: (0..5).map(|seq| event(seq, 1, 1)).collect(),
            kernel_drops: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    // Every message, events or loss notice, names the instance.
    let mut last_seq = None;
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(m.instance_id, before.instance_id(), "{m:?}");
        if let Some(Message::Events(b)) = m.message {
            last_seq = b.events.last().map(|e| e.seq);
        }
    }
    assert_eq!(last_seq, Some(4));
    d.stop().await;

    // socktapd restarts; its new instance reads events 0..=2 (numbers
    // start again) before the client comes back.
    let d = TestDaemon::start(after.clone()).await;
    let mut c = d.client().await;
    tx_after
        .send(Batch {
            events: (0..3).map(|seq| event(seq, 1, 1)).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for("3 events read", || after.status().events_read == 3).await;
    // Resumed with the old instance: told of the restart first, then all
    // of the new instance's history, although seq 4 is behind it and 2
    // ahead of it.
    let resume = |seq, instance| pb::WatchEventsRequest {
        resume_after_seq: Some(seq),
        resume_instance_id: Some(instance),
        limit: 3,
        ..Default::default()
    };
    let mut s = c
        .watch_events(resume(4, before.instance_id()))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.instance_id, after.instance_id());
    let Some(Message::Lost(l)) = first.message else {
        panic!("a restart notice first: {first:?}")
    };
    assert_eq!((l.source(), l.count), (pb::LossSource::Restart, 0));
    let (ev, lost) = read_events(&mut s, 3).await;
    assert!(lost.is_empty(), "{lost:?}");
    assert_eq!(ev.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
    // Resumed with its own instance: exactly after the seq, no notice.
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            limit: 2,
            ..resume(0, after.instance_id())
        })
        .await
        .unwrap()
        .into_inner();
    let (ev, lost) = read_events(&mut s, 2).await;
    assert!(lost.is_empty(), "{lost:?}");
    assert_eq!(ev.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    // An instance without a seq to resume after is refused, by name.
    let err = c
        .watch_events(pb::WatchEventsRequest {
            resume_instance_id: Some(before.instance_id()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("resume_instance_id:"), "{}", err.message());
    d.stop().await;
}

/// Ring buffer drops and calls the kernel skipped the programs on are lost
/// for every subscriber (which would have matched is unknown): each gets
/// a notice, and the status counts them.
#[tokio::test]
async fn kernel_drops_and_skipped_calls_are_announced_to_every_subscriber() {
    let (hub, tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub.clone()).await;
    let mut a = d.watch(by_cookie(&[1])).await;
    let mut b = d.watch(by_cookie(&[2])).await;
    wait_subscribers(&hub, 2).await;
    tx.send(Batch {
        events: vec![],
        kernel_drops: 17,
        kernel_skipped: 4,
    })
    .await
    .unwrap();
    for s in [&mut a, &mut b] {
        let Some(Message::Lost(l)) = next_msg(s).await else {
            panic!("loss notice")
        };
        assert_eq!((l.source, l.count), (pb::LossSource::KernelRingBuffer as i32, 17));
        let Some(Message::Lost(l)) = next_msg(s).await else {
            panic!("loss notice")
        };
        assert_eq!((l.source, l.count), (pb::LossSource::KernelSkipped as i32, 4));
        assert_eq!((l.first_seq, l.last_seq), (0, 0), "skipped calls took no seq");
    }
    let st = d.status().await;
    assert_eq!((st.kernel_drops, st.kernel_skipped), (17, 4));
    d.stop().await;
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let (hub, _tx) = synthetic(HubConfig {
        history_events: 1000,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    let mut c = d.client().await;
    let filter = |f: pb::EventFilter| pb::WatchEventsRequest {
        allow: vec![f],
        ..Default::default()
    };
    let cases: Vec<(pb::WatchEventsRequest, &str)> = vec![
        (
            filter(pb::EventFilter {
                remote_cidrs: vec!["10.0.0.0/40".into()],
                ..Default::default()
            }),
            "allow[0].remote_cidrs[0]",
        ),
        (
            filter(pb::EventFilter {
                remote_cidrs: vec!["nonsense".into()],
                ..Default::default()
            }),
            "allow[0].remote_cidrs[0]",
        ),
        (
            filter(pb::EventFilter {
                local_ports: vec![0],
                ..Default::default()
            }),
            "allow[0].local_ports[0]",
        ),
        (
            filter(pb::EventFilter {
                remote_ports: vec![65536],
                ..Default::default()
            }),
            "allow[0].remote_ports[0]",
        ),
        (
            filter(pb::EventFilter {
                kinds: vec![42],
                ..Default::default()
            }),
            "allow[0].kinds[0]",
        ),
        (
            filter(pb::EventFilter {
                families: vec![0],
                ..Default::default()
            }),
            "allow[0].families[0]",
        ),
        (
            filter(pb::EventFilter {
                cookies: vec![1; 5000],
                ..Default::default()
            }),
            "allow[0].cookies",
        ),
        (
            // Resolved on the host (in a blocking task): no such cgroup.
            filter(pb::EventFilter {
                cgroup_paths: vec!["/socktap-no-such-cgroup/x".into()],
                ..Default::default()
            }),
            "allow[0].cgroup_paths[0]",
        ),
        (
            filter(pb::EventFilter {
                cgroup_paths: vec!["/../etc".into()],
                ..Default::default()
            }),
            "allow[0].cgroup_paths[0]",
        ),
        (
            pb::WatchEventsRequest {
                deny: vec![
                    pb::EventFilter {
                        pids: vec![1],
                        ..Default::default()
                    };
                    100
                ],
                ..Default::default()
            },
            "deny",
        ),
        (
            pb::WatchEventsRequest {
                deny: vec![pb::EventFilter::default()],
                ..Default::default()
            },
            "deny[0]",
        ),
        (
            pb::WatchEventsRequest {
                max_batch_events: Some(0),
                ..Default::default()
            },
            "max_batch_events",
        ),
        (
            pb::WatchEventsRequest {
                max_batch_events: Some(10_000_000),
                ..Default::default()
            },
            "max_batch_events",
        ),
        (
            pb::WatchEventsRequest {
                replay_last: 1_000_000,
                ..Default::default()
            },
            "replay_last",
        ),
        (
            pb::WatchEventsRequest {
                since: Some(socktap_proto::Timestamp {
                    seconds: i64::MAX / 2_000_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "since",
        ),
    ];
    for (req, field) in cases {
        let err = c
            .watch_events(req.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted: {req:?}"));
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "message {:?} names {field}",
            err.message()
        );
    }
    assert_eq!(hub.subscriber_count(), 0, "nothing was subscribed");
    d.stop().await;
}

#[tokio::test]
async fn subscriber_limit_is_resource_exhausted_and_disconnects_are_cleaned_up() {
    let (hub, _tx) = synthetic(HubConfig {
        max_subscribers: 2,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    let mut c = d.client().await;
    let s1 = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap();
    let s2 = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap();
    let err = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("max_subscribers"), "{}", err.message());
    drop(s1);
    drop(s2);
    wait_subscribers(&hub, 0).await;
    d.stop().await;
}

#[tokio::test]
async fn streams_per_connection_are_limited_with_resource_exhausted() {
    let (hub, _tx) = synthetic(HubConfig {
        max_subscribers_per_connection: 3,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    let mut one = d.client().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(one.watch_events(pb::WatchEventsRequest::default()).await.unwrap());
    }
    let err = one.watch_events(pb::WatchEventsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().starts_with("max_subscribers_per_connection"),
        "{}",
        err.message()
    );
    // Another connection is not affected, and unary calls still pass.
    let mut other = d.client().await;
    held.push(other.watch_events(pb::WatchEventsRequest::default()).await.unwrap());
    one.get_status(pb::GetStatusRequest {}).await.unwrap();
    drop(held);
    wait_subscribers(&hub, 0).await;
    d.stop().await;
}

#[tokio::test]
async fn health_serving_then_not_serving_and_shutdown_ends_streams() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (hub, _tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub.clone()).await;
    let channel = tonic::transport::Endpoint::from_shared(d.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let resp = health
        .check(HealthCheckRequest {
            service: "socktap.v1.Socktap".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "socktap.v1.Socktap".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1);

    let mut stream = d.watch(pb::WatchEventsRequest::default()).await;
    wait_subscribers(&hub, 1).await;
    let stop = tokio::spawn(d.stop());
    let not_serving = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap();
    if let Ok(Some(m)) = not_serving {
        assert_eq!(m.status, 2, "NOT_SERVING while shutting down");
    }
    assert!(next_msg(&mut stream).await.is_none(), "the stream ends with status OK");
    stop.await.unwrap();
    assert_eq!(hub.subscriber_count(), 0);
}

/// GetCgroupPaths names this process's own cgroup, as /proc/self/cgroup
/// shows it, leaves out ids with no cgroup, and refuses too many ids with
/// INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn cgroup_paths_name_this_processs_cgroup() {
    use std::os::unix::fs::MetadataExt;
    let (hub, _tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub).await;
    let mut c = d.client().await;

    let too_many = pb::GetCgroupPathsRequest {
        cgroup_ids: (1..=1025).collect(),
    };
    let err = c.get_cgroup_paths(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("cgroup_ids: "), "{}", err.message());
    let none = c.get_cgroup_paths(pb::GetCgroupPathsRequest::default()).await.unwrap();
    assert!(none.into_inner().paths.is_empty());

    let tree = socktap::service::cgroups::CgroupTree::discover();
    let ask = |ids: Vec<u64>| pb::GetCgroupPathsRequest { cgroup_ids: ids };
    let Some(mount) = tree.mount() else {
        let err = c.get_cgroup_paths(ask(vec![1])).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "no cgroup2 here: {err:?}");
        d.stop().await;
        return;
    };
    // cgroup v2's line in /proc/self/cgroup: "0::/user.slice/...".
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_owned();
    let id = std::fs::metadata(mount.join(path.trim_start_matches('/')))
        .unwrap()
        .ino();
    let root = std::fs::metadata(mount).unwrap().ino();
    let paths = c
        .get_cgroup_paths(ask(vec![id, 0, u64::MAX, id, root]))
        .await
        .unwrap()
        .into_inner()
        .paths;
    let want = std::collections::HashMap::from([(id, path), (root, "/".to_owned())]);
    assert_eq!(paths, want, "each id once; 0 and an unused id are absent");
    d.stop().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_service() {
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic_prost::ProstCodec;
    let (hub, _tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub).await;
    let channel = tonic::transport::Endpoint::from_shared(d.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    macro_rules! list_services {
        ($pb:path, $path:literal) => {{
            use $pb as r;
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let req = r::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(r::server_reflection_request::MessageRequest::ListServices(String::new())),
            };
            let codec: ProstCodec<r::ServerReflectionRequest, r::ServerReflectionResponse> = ProstCodec::default();
            let mut resp = grpc
                .streaming(
                    tonic::Request::new(tokio_stream::iter(vec![req])),
                    PathAndQuery::from_static($path),
                    codec,
                )
                .await
                .unwrap()
                .into_inner();
            let msg = resp.message().await.unwrap().unwrap();
            match msg.message_response.unwrap() {
                r::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
                    l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
                }
                other => panic!("unexpected {other:?}"),
            }
        }};
    }
    let v1 = list_services!(
        tonic_reflection::pb::v1,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    );
    let v1alpha = list_services!(
        tonic_reflection::pb::v1alpha,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    );
    for names in [&v1, &v1alpha] {
        assert!(names.contains(&"socktap.v1.Socktap".to_string()), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    }
    d.stop().await;
}

#[tokio::test]
async fn status_reports_source_subscribers_and_counters() {
    let (hub, tx) = synthetic(HubConfig {
        history_events: 10,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    let mut c = d.client().await;
    let req = by_cookie(&[5]);
    let mut s = c.watch_events(req.clone()).await.unwrap().into_inner();
    wait_subscribers(&hub, 1).await;
    tx.send(Batch {
        events: (0..20).map(|i| event(i, 5, 1)).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    read_events(&mut s, 20).await;
    let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.attach_mode, pb::AttachMode::Synthetic as i32);
    assert!(!st.kernel_release.is_empty());
    assert_eq!(st.events_read, 20);
    assert_eq!((st.history_len, st.history_capacity), (10, 10));
    assert!(st.kernel_gate_open);
    assert_eq!(st.subscribers.len(), 1);
    let sub = &st.subscribers[0];
    assert_eq!(sub.request.as_ref(), Some(&req));
    assert_eq!((sub.matched, sub.delivered, sub.lost), (20, 20, 0));
    assert_eq!((sub.queued, sub.queued_bytes), (0, 0));
    assert_eq!(
        (st.queued_bytes, st.queue_bytes_limit),
        (0, HubConfig::default().queue_bytes as u64),
        "drained; the daemon's limit"
    );
    assert_eq!(
        sub.queue_byte_share,
        HubConfig::default().queue_bytes as u64 / 2,
        "alone, half the queue memory is its own"
    );
    assert!(sub.peer.starts_with("127.0.0.1:"), "{}", sub.peer);
    let _other = c.watch_events(req.clone()).await.unwrap().into_inner();
    wait_subscribers(&hub, 2).await;
    let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    for sub in &st.subscribers {
        assert_eq!(
            sub.queue_byte_share,
            HubConfig::default().queue_bytes as u64 / 4,
            "two share that half"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn a_large_max_batch_never_makes_a_message_a_default_client_refuses() {
    let (hub, tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub.clone()).await;
    // The test client keeps tonic's default 4 MiB limit on decoded messages.
    const N: u64 = 60_000;
    let req = pb::WatchEventsRequest {
        max_batch_events: Some(65_536),
        // Everything is queued before the stream takes any of it.
        max_flush_delay: Some(socktap_proto::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        limit: N,
        ..Default::default()
    };
    let mut s = d.watch(req).await;
    wait_subscribers(&hub, 1).await;
    tx.send(Batch {
        events: (0..N).map(|i| event(i, 1, 1)).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut seqs, mut messages) = (Vec::new(), 0);
    let started = std::time::Instant::now();
    while let Some(msg) = s.message().await.expect("every message within the client's limit") {
        let encoded = prost::Message::encoded_len(&msg);
        assert!(encoded <= (64 << 10) + 64, "a {encoded}-byte message");
        match msg.message {
            Some(Message::Events(b)) => seqs.extend(b.events.iter().map(|e| e.seq)),
            other => panic!("unexpected {other:?}"),
        }
        messages += 1;
    }
    assert_eq!(seqs, (0..N).collect::<Vec<_>>(), "all of them, in order");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a queue holding full messages is not held back by max_flush_delay: {:?}",
        started.elapsed()
    );
    assert!(
        messages > 20,
        "{N} events of ~100 bytes need over 20 messages of at most 64 KiB: {messages}"
    );
    d.stop().await;
}

#[tokio::test]
async fn max_flush_delay_gathers_separate_dispatches_into_one_message() {
    let (hub, tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub.clone()).await;
    let req = pb::WatchEventsRequest {
        max_flush_delay: Some(socktap_proto::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        max_batch_events: Some(1000),
        limit: 30,
        ..Default::default()
    };
    let mut s = d.watch(req).await;
    wait_subscribers(&hub, 1).await;
    for chunk in 0..3u64 {
        let events = (chunk * 10..chunk * 10 + 10).map(|i| event(i, 1, 1)).collect();
        tx.send(Batch {
            events,
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(Message::Events(b)) = next_msg(&mut s).await else {
        panic!("events")
    };
    assert_eq!(b.events.len(), 30, "three dispatches held back into one message");
    assert!(next_msg(&mut s).await.is_none(), "limit reached");
    d.stop().await;
}

/// The accepted sockets of this process whose local port is `port` (the
/// in-process daemon's connections), as `(fd, TCP_NODELAY)`.
fn accepted_nodelay(port: u16) -> Vec<(i32, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
        let mut local: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let mut plen = len;
        // SAFETY: FFI on an fd of this process; the buffers are live and
        // their sizes are given. A non-socket fd just fails.
        let (rl, rp) = unsafe {
            (
                libc::getsockname(fd, (&mut local as *mut libc::sockaddr_storage).cast(), &mut len),
                libc::getpeername(fd, (&mut peer as *mut libc::sockaddr_storage).cast(), &mut plen),
            )
        };
        if rl != 0 || rp != 0 || local.ss_family != libc::AF_INET as libc::sa_family_t {
            continue;
        }
        // SAFETY: the family is AF_INET, so the storage holds a sockaddr_in.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read((&local as *const libc::sockaddr_storage).cast()) };
        if u16::from_be(sin.sin_port) != port {
            continue;
        }
        let mut v: libc::c_int = 0;
        let mut vlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: FFI; `v` and `vlen` are live locals of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut v as *mut libc::c_int).cast(),
                &mut vlen,
            )
        };
        assert_eq!(r, 0, "TCP_NODELAY of fd {fd}: {}", std::io::Error::last_os_error());
        out.push((fd, v != 0));
    }
    out
}

/// Without TCP_NODELAY a small batch waits behind an unacknowledged one
/// for the client's delayed ACK (it cost 15 ms at p99 at low rates).
#[tokio::test]
async fn accepted_connections_have_tcp_nodelay() {
    let (hub, _tx) = synthetic(HubConfig::default());
    let d = TestDaemon::start(hub.clone()).await;
    let port: u16 = d.url.rsplit(':').next().unwrap().parse().unwrap();
    let mut client = d.client().await;
    client.get_status(pb::GetStatusRequest {}).await.unwrap();
    let accepted = accepted_nodelay(port);
    assert!(!accepted.is_empty(), "found the daemon's accepted connection");
    assert!(accepted.iter().all(|&(_, nodelay)| nodelay), "{accepted:?}");
}

/// One HTTP/1.1 GET on `addr`: the status code, the headers and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// `socktapd --metrics-listen`: the status's counters as OpenMetrics text,
/// losses by source, each equal to what GetStatus says.
#[tokio::test]
async fn metrics_are_the_status_counters_in_openmetrics_text() {
    let (hub, tx) = synthetic(HubConfig {
        queue_events: 100,
        ..Default::default()
    });
    let d = TestDaemon::start(hub.clone()).await;
    // A subscriber that reads nothing: its queue overflows.
    let _stalled = d.watch(pb::WatchEventsRequest::default()).await;
    wait_subscribers(&hub, 1).await;
    tx.send(Batch {
        events: (0..1000).map(|s| event(s, 1, 7)).collect(),
        kernel_drops: 17,
        kernel_skipped: 4,
    })
    .await
    .unwrap();
    wait_for("the subscriber's losses", || {
        hub.status().subscribers.iter().any(|s| s.counters().lost > 0)
    })
    .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(socktap::metrics::serve(hub.clone(), listener, async {
        let _ = stopped.await;
    }));
    let (code, head, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    };
    let st = d.status().await;
    assert!(st.subscriber_lost > 0);
    assert_eq!(value("socktap_events_read_total"), 1000.0);
    assert_eq!(value(r#"socktap_events_lost_total{source="kernel_ring_buffer"}"#), 17.0);
    assert_eq!(value(r#"socktap_events_lost_total{source="kernel_skipped"}"#), 4.0);
    assert_eq!(
        value(r#"socktap_events_lost_total{source="subscriber_queue"}"#),
        st.subscriber_lost as f64
    );
    assert_eq!(value("socktap_events_delivered_total"), st.events_delivered as f64);
    assert_eq!(value("socktap_subscribers"), 1.0);
    assert_eq!(value("socktap_history_events"), st.history_len as f64);
    assert_eq!(value("socktap_queued_bytes"), st.queued_bytes as f64);
    assert!(
        body.contains(&format!(r#"socktap_info{{version="{}","#, st.version)),
        "{body}"
    );
    // A synthetic source has no return probes; kprobe mode's are in the
    // daemon's kernel test.
    assert!(!body.contains("socktap_return_probe"), "{body}");
    assert_eq!(http_get(addr, "/other").await.0, 404);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the metrics server stops")
        .unwrap()
        .unwrap();
    d.stop().await;
}
