//! `socktap-bench --hub-only`: socktapd's own work per event, alone, in
//! this process. Synthetic batches shaped like W2's (16 loopback sockets,
//! 16 threads, sends and receives, 4096 events a batch) go through the
//! hub's fan-out (matching, encoding, queueing, history) and are taken
//! from each subscriber's queue into gRPC messages, as a stream does. No
//! kernel, no transport, no other process on the CPU: the figures move
//! little from run to run, unlike the workload runs, so they show what a
//! change to that path is worth.

use std::time::Instant;

use serde_json::json;
use socktap::event::{AttachMode, Comm, Event, EventKind};
use socktap::hub::{FilterLimits, Hub, HubConfig, Item, Selector, Source, Start};
use socktap::probe::Batch;
use socktap_proto::v1 as pb;
use socktap_proto::wire;

const BATCH: usize = 4096;
const SOCKETS: u64 = 16;

/// Who subscribes.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// One subscriber taking every event.
    One,
    /// 16 subscribers, one socket each.
    Disjoint16,
    /// 16 subscribers, each taking every event.
    Full16,
}

/// The results of one shape: ns per event read (fan-out, then taking and
/// framing for all subscribers), per round.
struct Measured {
    shape: Shape,
    dispatch_ns: Vec<f64>,
    take_ns: Vec<f64>,
    bytes_per_event: f64,
}

fn event(seq: u64) -> Event {
    let socket = seq % SOCKETS;
    Event {
        seq,
        timestamp_ns: 1_000_000_000 + seq * 650,
        cookie: 8192 + socket,
        kind: if seq.is_multiple_of(2) {
            EventKind::Send
        } else {
            EventKind::Recv
        },
        bytes: 64,
        errno: 0,
        pid: 4242,
        tid: 4243 + socket as u32,
        uid: 0,
        cgroup_id: 7711,
        cgroup_tree: 0,
        netns: 4_026_531_840,
        cpu: (seq % 2) as u32,
        comm: Comm::from_kernel(b"socktap-bench"),
        local: std::net::SocketAddr::from(([127, 0, 0, 1], 40_000 + socket as u16)).into(),
        remote: std::net::SocketAddr::from(([127, 0, 0, 1], 5201)).into(),
        mode: AttachMode::Tracepoint,
    }
}

fn selectors(shape: Shape) -> Vec<Selector> {
    let cookies = |c: Vec<u64>| {
        let allow = [pb::EventFilter {
            cookies: c,
            ..Default::default()
        }];
        Selector::compile(&allow, &[], FilterLimits::default()).expect("a valid filter")
    };
    match shape {
        Shape::One => vec![Selector::default()],
        Shape::Full16 => vec![Selector::default(); 16],
        Shape::Disjoint16 => (0..16).map(|i| cookies(vec![8192 + i])).collect(),
    }
}

fn measure(shape: Shape, batches: usize, rounds: u32) -> Measured {
    let mut m = Measured {
        shape,
        dispatch_ns: Vec::new(),
        take_ns: Vec::new(),
        bytes_per_event: 0.0,
    };
    for _ in 0..rounds {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let subs: Vec<_> = selectors(shape)
            .into_iter()
            .map(|s| {
                hub.subscribe("bench".into(), Default::default(), s, Start::Live)
                    .expect("subscribed")
            })
            .collect();
        let mut seq = 0;
        let input: Vec<Vec<Event>> = (0..batches)
            .map(|_| {
                (0..BATCH)
                    .map(|_| {
                        seq += 1;
                        event(seq)
                    })
                    .collect()
            })
            .collect();
        let (mut dispatch, mut take, mut bytes) = (0.0, 0.0, 0usize);
        for events in input {
            let t = Instant::now();
            hub.dispatch(Batch {
                events,
                ..Default::default()
            });
            dispatch += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for s in &subs {
                loop {
                    let mut items = Vec::new();
                    s.take(1024, socktap::service::MAX_MESSAGE_BYTES, &mut items);
                    if items.is_empty() {
                        break;
                    }
                    let runs = items
                        .into_iter()
                        .filter_map(|i| match i {
                            Item::Events(run) => Some(run),
                            Item::Lost(_) => None,
                        })
                        .collect();
                    let msg = wire::WatchEventsResponse {
                        message: Some(wire::watch_events_response::Message::Events(wire::EncodedEventBatch {
                            runs,
                        })),
                        instance_id: hub.instance_id(),
                    };
                    bytes += prost::Message::encode_to_vec(&msg).len();
                }
            }
            take += t.elapsed().as_secs_f64();
        }
        let n = (batches * BATCH) as f64;
        m.dispatch_ns.push(dispatch / n * 1e9);
        m.take_ns.push(take / n * 1e9);
        m.bytes_per_event = bytes as f64 / n;
    }
    m
}

/// Runs every shape, prints the table, writes `hub.json` under `out`.
pub fn run(out: &std::path::Path, rounds: u32) {
    let batches = 250;
    let results: Vec<Measured> = [Shape::One, Shape::Disjoint16, Shape::Full16]
        .into_iter()
        .map(|s| measure(s, batches, rounds))
        .collect();
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{:.0} ({lo:.0}–{hi:.0})", crate::median(v.to_vec()))
    };
    println!(
        "hub alone: {batches} batches of {BATCH} W2-like events per round, {rounds} rounds; ns per event read, median (range)"
    );
    println!(
        "{:<14} {:>22} {:>22} {:>14}",
        "subscribers", "fan-out", "take into messages", "bytes sent/ev"
    );
    for m in &results {
        println!(
            "{:<14} {:>22} {:>22} {:>14.0}",
            format!("{:?}", m.shape),
            range(&m.dispatch_ns),
            range(&m.take_ns),
            m.bytes_per_event
        );
    }
    let doc = json!({
        "batches_per_round": batches, "events_per_batch": BATCH, "rounds": rounds,
        "shapes": results.iter().map(|m| json!({
            "subscribers": format!("{:?}", m.shape),
            "fan_out_ns_per_event": m.dispatch_ns,
            "take_ns_per_event": m.take_ns,
            "bytes_sent_per_event": m.bytes_per_event,
        })).collect::<Vec<_>>(),
    });
    let _ = std::fs::create_dir_all(out);
    let path = out.join("hub.json");
    match std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("socktap-bench: cannot write {}: {e}", path.display()),
    }
}
