//! Attach-mode selection, startup errors and clean detach, against the real
//! kernel. These tests load and unload programs, so they run one at a time.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use libbpf_rs::query::{LinkInfoIter, ProgInfoIter, ProgInfoQueryOptions};
use libbpf_rs::{MapCore, MapHandle};
use socktap::event::AttachMode;
use socktap::probe::{ModeRequest, Prefilter, Probe, ProbeError, ProbeOptions, WantDim, WantKey, WAKEUPS_OFF};

fn our_programs() -> HashSet<u32> {
    ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("st_"))
        .map(|p| p.id)
        .collect()
}

fn links_to(ids: &HashSet<u32>) -> Vec<u32> {
    LinkInfoIter::default()
        .filter(|l| ids.contains(&l.prog_id))
        .map(|l| l.id)
        .collect()
}

/// tracefs' kprobe_events, if tracefs is mounted.
fn kprobe_events() -> Option<(std::path::PathBuf, String)> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|d| {
            let path = std::path::Path::new(d).join("kprobe_events");
            Some((path.clone(), std::fs::read_to_string(&path).ok()?))
        })
}

/// The kprobe events this process made (kprobe mode's return probes).
fn our_kprobe_events() -> Vec<String> {
    let ours = format!("socktap/st{}_", std::process::id());
    let events = kprobe_events().map(|(_, e)| e).unwrap_or_default();
    events
        .lines()
        .filter(|l| l.contains(&ours))
        .map(str::to_owned)
        .collect()
}

#[test]
fn auto_picks_the_first_mode_the_kernel_accepts_and_says_why() {
    let Some(_bpf) = bpf_available("auto_mode") else {
        return;
    };
    // What each mode does when forced.
    let forced: Vec<(AttachMode, Result<(), ProbeError>)> = AttachMode::ALL
        .iter()
        .map(|&m| {
            (
                m,
                Probe::start(ProbeOptions {
                    mode: ModeRequest::Only(m),
                    ..Default::default()
                })
                .map(drop),
            )
        })
        .collect();
    for (m, r) in &forced {
        eprintln!(
            "{m}: {}",
            r.as_ref().map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string())
        );
    }
    let first_ok = forced
        .iter()
        .find(|(_, r)| r.is_ok())
        .map(|(m, _)| *m)
        .expect("some mode works");

    let probe = Probe::start(ProbeOptions::default()).expect("auto starts");
    assert_eq!(
        probe.mode(),
        first_ok,
        "auto takes the first mode that works when forced"
    );
    let refused: Vec<AttachMode> = probe.refused_modes().iter().map(|r| r.mode).collect();
    let expected: Vec<AttachMode> = AttachMode::ALL.iter().copied().take_while(|&m| m != first_ok).collect();
    assert_eq!(refused, expected, "auto reports every mode it passed over");
    for r in probe.refused_modes() {
        assert!(r.errno.is_some(), "a refusal carries the kernel's errno: {r}");
        assert!(r.to_string().contains("hint: "), "{r}");
    }
    // On the CI host the kernel is known: fentry EPERM, no kprobes.
    if let Ok(want) = std::env::var("SOCKTAP_EXPECT_AUTO_MODE") {
        assert_eq!(probe.mode().as_str(), want, "SOCKTAP_EXPECT_AUTO_MODE");
        if want == "tracepoint" {
            assert_eq!(
                probe.refused_modes()[0].errno,
                Some(libc::EPERM),
                "fentry is refused with EPERM here"
            );
        }
    }
}

#[test]
fn a_forced_unavailable_mode_is_a_clear_error() {
    let Some(_bpf) = bpf_available("forced_mode_error") else {
        return;
    };
    let mut refused_any = false;
    for m in AttachMode::ALL {
        if let Err(e) = Probe::start(ProbeOptions {
            mode: ModeRequest::Only(m),
            ..Default::default()
        }) {
            refused_any = true;
            let ProbeError::ModeUnavailable(r) = &e else {
                panic!("unexpected error for {m}: {e}")
            };
            assert_eq!(r.mode, m);
            let text = e.to_string();
            assert!(text.starts_with(&format!("{m} mode: ")), "{text}");
            assert!(
                text.contains(" with E") && text.contains("hint: "),
                "names errno and hint: {text}"
            );
        }
    }
    if std::env::var("SOCKTAP_EXPECT_AUTO_MODE").as_deref() == Ok("tracepoint") {
        assert!(refused_any, "this kernel refuses fentry");
    }
}

#[test]
fn bad_options_are_rejected_before_loading() {
    let e = Probe::start(ProbeOptions {
        ring_buffer_bytes: 5000,
        ..Default::default()
    })
    .err()
    .expect("rejected");
    assert!(e.to_string().contains("ring_buffer_bytes"), "{e}");
    assert!("bogus".parse::<ModeRequest>().unwrap_err().contains("bogus"));
}

#[test]
fn dropping_the_probe_leaves_no_program_or_link_behind() {
    let Some(_bpf) = bpf_available("no_leaks") else {
        return;
    };
    let before = our_programs();
    let probe = start_probe(ProbeOptions::default());
    let ids: HashSet<u32> = probe.control().program_ids().iter().copied().collect();
    // send, recv and splice: an fexit each, or a kprobe and a kretprobe
    // each and the sock_ops program that gives connections their cookies
    // (on the root cgroup, by a link too); tracepoint mode has none for
    // splice.
    let per_mode = match probe.mode() {
        AttachMode::Fentry => 3,
        AttachMode::Kprobe => 7,
        AttachMode::Tracepoint => 2,
    };
    assert_eq!(ids.len(), per_mode, "programs of {} mode: {ids:?}", probe.mode());
    let live = our_programs();
    assert!(ids.is_subset(&live), "loaded programs are listed by the kernel");
    assert_eq!(links_to(&ids).len(), ids.len(), "each program is attached by one link");
    if probe.mode() == AttachMode::Kprobe && kprobe_events().is_some() {
        assert_eq!(
            our_kprobe_events().len(),
            3,
            "return probes in tracefs: {:?}",
            our_kprobe_events()
        );
    }
    drop(probe);
    assert_eq!(
        our_kprobe_events(),
        Vec::<String>::new(),
        "tracefs events left after drop"
    );
    // The kernel frees programs after an RCU grace period, from a workqueue.
    let mut after = our_programs();
    for _ in 0..500 {
        if ids.is_disjoint(&after) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        after = our_programs();
    }
    assert!(
        ids.is_disjoint(&after),
        "programs still loaded after drop: {:?}",
        ids.intersection(&after).collect::<Vec<_>>()
    );
    assert!(links_to(&ids).is_empty(), "links left after drop");
    // `before` may still list programs of an earlier test that the kernel
    // had not freed yet; nothing may have been added to it.
    assert!(
        after.is_subset(&before),
        "new socktap programs remain: {:?}",
        after.difference(&before).collect::<Vec<_>>()
    );
}

#[test]
fn a_closed_gate_detaches_fentry_and_tracepoint_programs() {
    use std::io::{Read, Write};
    let Some(_bpf) = bpf_available("gate_detach") else {
        return;
    };
    let mut probe = start_probe(ProbeOptions {
        enabled: false,
        ..Default::default()
    });
    let mut rx = probe.take_receiver().unwrap();
    let ids: HashSet<u32> = probe.control().program_ids().iter().copied().collect();
    let kprobe = probe.mode() == AttachMode::Kprobe;
    // kprobe mode cannot re-attach cheaply: it stays attached, gated by the map.
    assert_eq!(
        links_to(&ids).is_empty(),
        !kprobe,
        "closed gate: detached unless kprobe"
    );
    assert_eq!(probe.control().is_attached(), kprobe);

    for round in 0..2 {
        probe.control().set_enabled(true).unwrap();
        assert_eq!(links_to(&ids).len(), ids.len(), "round {round}: attached");
        let (mut c, mut s) = tcp_pair(false);
        let cookie = so_cookie(&c);
        c.write_all(b"ping").unwrap();
        s.read_exact(&mut [0u8; 4]).unwrap();
        let got = collect(
            &mut rx,
            |e| e.cookie == cookie,
            |ev| !ev.is_empty(),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        assert!(!got.is_empty(), "round {round}: events flow once re-attached");
        probe.control().set_enabled(false).unwrap();
        assert_eq!(links_to(&ids).is_empty(), !kprobe, "round {round}: detached again");
    }
}

#[test]
fn bpf_stats_report_run_counts_and_time() {
    use std::io::{Read, Write};
    let Some(_bpf) = bpf_available("bpf_stats") else {
        return;
    };
    let probe = start_probe(ProbeOptions {
        bpf_stats: true,
        ..Default::default()
    });
    let (mut c, mut s) = tcp_pair(false);
    for _ in 0..10 {
        c.write_all(b"x").unwrap();
        s.read_exact(&mut [0u8; 1]).unwrap();
    }
    let stats = probe.control().program_stats();
    assert_eq!(stats.len(), probe.control().program_ids().len(), "{stats:?}");
    let runs: u64 = stats.iter().map(|p| p.run_count).sum();
    let time: u64 = stats.iter().map(|p| p.run_time_ns).sum();
    assert!(runs >= 20, "10 sends and 10 receives ran the programs: {stats:?}");
    assert!(time > 0, "{stats:?}");
}

#[test]
fn a_sink_gets_queued_batches_first_then_everything_in_order() {
    let Some(_bpf) = bpf_available("deliver_to") else {
        return;
    };
    use std::io::{Read, Write};
    let mut probe = start_probe(ProbeOptions::default());
    let (mut c, mut s) = tcp_pair(false);
    let sc = so_cookie(&s);
    let mut exchange = |n: usize| {
        c.write_all(&vec![1u8; n]).unwrap();
        s.read_exact(&mut vec![0u8; n]).unwrap();
    };
    exchange(11); // lands in the channel
    std::thread::sleep(Duration::from_millis(100));
    let seen = Arc::new(Mutex::new(Vec::new()));
    probe.deliver_to({
        let seen = seen.clone();
        move |batch| seen.lock().unwrap().extend(batch.events)
    });
    assert!(probe.take_receiver().is_none(), "the channel is gone");
    exchange(22); // goes straight to the sink
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let recvs = loop {
        let recvs: Vec<u32> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.cookie == sc && e.kind == socktap::event::EventKind::Recv)
            .map(|e| e.bytes)
            .collect();
        if recvs.len() >= 2 || std::time::Instant::now() > deadline {
            break recvs;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(recvs, [11, 22], "both receives, in order");
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence order kept: {seqs:?}");
}

/// Above 20k events/s the reader drains the ring on its own timer, every
/// batch interval, and turns the kernel's wakeups off; below 10k it turns
/// them back on. The timed poll is 2 s here, so only the drain timer can
/// keep batches coming while the kernel wakes nobody.
#[test]
fn under_load_the_reader_drains_on_its_timer_with_the_kernels_wakeups_off() {
    let Some(_bpf) = bpf_available("pacing") else {
        return;
    };
    use std::time::Instant;
    let opts = ProbeOptions {
        poll_interval: Duration::from_secs(2),
        ring_buffer_bytes: UNFILLED_RING_BYTES,
        ..Default::default()
    };
    let low = opts.wakeup_interval;
    let mut probe = start_probe(opts);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    probe.deliver_to({
        let arrivals = arrivals.clone();
        move |b| {
            if !b.events.is_empty() {
                arrivals.lock().unwrap().push(Instant::now());
            }
        }
    });
    let control = probe.control().clone();
    assert_eq!(control.wakeup_interval(), low, "starts with the low-rate interval");
    let load = std::thread::spawn(|| ping_pong_for(Duration::from_millis(500)));
    let mut batched_from = None;
    while !load.is_finished() {
        if batched_from.is_none() && control.wakeup_interval() == WAKEUPS_OFF {
            batched_from = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let load_end = Instant::now();
    let rate = load.join().unwrap() * 2; // calls per second
    eprintln!("pacing: {rate} events/s, batched: {}", batched_from.is_some());
    // A slow machine (the TCG VMs of the kernel matrix) may not reach the
    // threshold. `rate` is a mean over 500 ms and the reader measures 10 ms
    // windows, so a bursty VM can pass 20k events/s in some window at a
    // mean of 8.7k (seen in CI): only a mean ten times below the threshold
    // says that no window reached it. The rule itself is unit-tested.
    if rate > socktap::probe::BATCH_ABOVE_RATE * 5 / 4 {
        assert!(
            batched_from.is_some(),
            "{rate} events/s should turn the kernel's wakeups off"
        );
    } else if rate < socktap::probe::BATCH_ABOVE_RATE / 10 {
        assert!(
            batched_from.is_none(),
            "{rate} events/s must keep the low-rate interval"
        );
    }
    if let Some(from) = batched_from {
        // A copy, so that a failed assert leaves the reader's lock unpoisoned.
        let arrivals = arrivals.lock().unwrap().clone();
        assert_batches_kept_coming(from, &arrivals, load_end);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while control.wakeup_interval() != low {
        assert!(Instant::now() < deadline, "back to the low-rate interval once quiet");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// At low rates no event waits in the ring for a later one: the reader's
/// timed poll is set to 2 s here (its quiet wait is never shorter) and each
/// burst gets 1 s, so only the kernel's wakeups can deliver a burst's
/// trailing events. With the earlier
/// rule ("at most one wakeup per 50 µs") the last call of a burst often
/// came after the reader had drained and gone back to sleep, and waited
/// for the next burst: this test failed in 2 of 3 runs with 40 bursts.
/// Batching is off (both intervals 0): the probe sees the whole host, and
/// other traffic above 20k events/s (the other tests of this binary, run
/// back to back) switched it to batched wakeups, which this test is not
/// about; it failed so in 1 of 10 back-to-back runs.
#[test]
fn trailing_events_of_a_burst_wake_the_reader() {
    let Some(_bpf) = bpf_available("burst") else {
        return;
    };
    use std::io::{Read, Write};
    let mut probe = start_probe(ProbeOptions {
        poll_interval: Duration::from_secs(2),
        wakeup_interval: Duration::ZERO,
        batch_interval: Duration::ZERO,
        ..Default::default()
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    probe.deliver_to({
        let seen = seen.clone();
        move |batch| seen.lock().unwrap().extend(batch.events)
    });
    let (mut c, mut s) = tcp_pair(false);
    let cookies = [so_cookie(&c), so_cookie(&s)];
    for round in 0..100u8 {
        // One burst: a round trip, four calls within microseconds, then
        // silence until every event of it has arrived.
        let mut b = [round; 8];
        c.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
        c.read_exact(&mut b).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            let n = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|e| cookies.contains(&e.cookie))
                .count();
            if n == 4 * (round as usize + 1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "burst {round}: {n} of {} events delivered; the rest wait in the ring",
                4 * (round as usize + 1)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A socktapd killed before it could remove its return probes from tracefs
/// leaves them behind; the next one in kprobe mode removes them (their
/// names carry the pid that made them).
#[test]
fn return_probes_a_killed_socktapd_left_in_tracefs_are_removed() {
    let Some(_bpf) = bpf_available("stale_kprobes") else {
        return;
    };
    let Some((path, _)) = kprobe_events() else {
        eprintln!("no kprobe_events in tracefs (not mounted, or no kprobes in this kernel): nothing to leave behind");
        return;
    };
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = format!("st{dead}_0_tcp_sendmsg");
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    use std::io::Write;
    if let Err(e) = f.write_all(format!("r:socktap/{stale} tcp_sendmsg\n").as_bytes()) {
        eprintln!("this kernel makes no kprobes ({e}): kprobe mode is refused here (tested above)");
        return;
    }
    drop(f);
    let listed = || kprobe_events().unwrap().1.contains(&stale);
    assert!(listed(), "the stale event was made");
    let probe = Probe::start(ProbeOptions {
        mode: ModeRequest::Only(AttachMode::Kprobe),
        ..Default::default()
    });
    if let Err(e) = &probe {
        // Remove it ourselves, so that no other run trips on it.
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("-:socktap/{stale}\n").as_bytes()));
        panic!("kprobe mode, on a kernel that makes kprobes: {e}");
    }
    assert!(!listed(), "the stale event was removed");
}

/// How many keys the probe's `wanted` map (the kernel prefilter's) holds,
/// found through the maps its programs use.
fn wanted_map_entries(probe: &Probe) -> usize {
    let ours: HashSet<u32> = probe.control().program_ids().iter().copied().collect();
    let map_ids: HashSet<u32> = ProgInfoIter::with_query_opts(ProgInfoQueryOptions::default().include_map_ids(true))
        .filter(|p| ours.contains(&p.id))
        .flat_map(|p| p.map_ids)
        .collect();
    let wanted = map_ids
        .into_iter()
        .filter_map(|id| MapHandle::from_map_id(id).ok())
        .find(|m| m.name() == "wanted")
        .expect("the probe's programs use a map named wanted");
    wanted.keys().count()
}

/// Keys the prefilter no longer wants stay in the kernel's map while a
/// program that read the control word before may still look them up; a
/// thread of the probe's takes them out once the programs that were
/// running have returned (an RCU grace period, through
/// `program_barrier`).
#[test]
fn keys_the_prefilter_no_longer_wants_leave_the_kernel_map() {
    let Some(_bpf) = bpf_available("stale_prefilter_keys") else {
        return;
    };
    let probe = start_probe(ProbeOptions::default());
    let control = probe.control();
    let cookies = |values: &[u64]| {
        Prefilter::Keys(
            values
                .iter()
                .map(|&value| WantKey {
                    dim: WantDim::Cookie,
                    value,
                })
                .collect(),
        )
    };
    control.set_prefilter(&cookies(&[u64::MAX - 1, u64::MAX - 2])).unwrap();
    control.set_prefilter(&cookies(&[u64::MAX - 1])).unwrap();
    let st = control.prefilter();
    assert_eq!((st.on, st.keys), (true, 1), "{st:?}");
    control.set_prefilter(&Prefilter::Everything).unwrap();
    let st = control.prefilter();
    assert_eq!((st.on, st.keys), (false, 0), "{st:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while control.prefilter().stale_keys > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(control.prefilter().stale_keys, 0, "still stale after 10 s");
    assert_eq!(wanted_map_entries(&probe), 0);
    // And a key wanted again goes back in.
    control.set_prefilter(&cookies(&[u64::MAX - 3])).unwrap();
    assert_eq!(wanted_map_entries(&probe), 1);
}
