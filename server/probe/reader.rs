//! The ring buffer reader: runs on its own thread, owns the skeleton (and so
//! the attached programs), and hands decoded batches to the consumer.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, RingBufferBuilder};
use std::sync::Mutex;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, warn};

use super::skel::SocktapSkel;
use super::{Batch, Consumer, ProbeControl, ProbeOptions, BATCH_ABOVE_RATE, RATE_WINDOW, UNBATCH_BELOW_RATE};
use crate::event::Event;

/// How long the reader sleeps between polls when nothing can arrive
/// unannounced: the gate is closed, or the kernel wakes the reader for the
/// first record after it has caught up (wakeup interval 0). It bounds how
/// long a change of the gate or of the interval goes unnoticed.
const QUIET_POLL: Duration = Duration::from_millis(200);
/// After the kernel's wakeup interval changes to 0, how long the reader
/// keeps its timed polls: a program that read the old interval may still
/// commit a record without a wakeup (programs run for about a microsecond).
const SWITCH_GRACE: Duration = Duration::from_millis(10);
/// How long to wait before retrying a hand-off to a full consumer channel.
const BACKOFF: Duration = Duration::from_micros(200);
/// The most records taken from the ring per batch. Draining "everything"
/// never ends while the kernel writes faster than the reader decodes: the
/// batch, and memory, would grow without bound and nothing would be handed
/// on. Above this the reader hands on what it has and goes on at once.
pub const MAX_BATCH_EVENTS: usize = 4096;

/// Reads until `shared.stop` is set. Returns when the skeleton may be dropped.
pub(crate) fn run(skel: &SocktapSkel<'_>, control: &ProbeControl, consumer: &Mutex<Consumer>, opts: &ProbeOptions) {
    let shared = &control.shared;
    let poll = opts.poll_interval;
    let mut pacing = Pacing::new(opts);
    let pending: RefCell<Vec<Event>> = RefCell::new(Vec::with_capacity(MAX_BATCH_EVENTS));
    let mut builder = RingBufferBuilder::new();
    let added = builder.add(&skel.maps.events, |data: &[u8]| {
        match Event::decode(data) {
            Ok(e) => pending.borrow_mut().push(e),
            Err(e) => {
                shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                warn!("dropping undecodable ring buffer record: {e}");
            }
        }
        0
    });
    let ring = match added.map(|_| ()).and_then(|()| builder.build()) {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot read the ring buffer: {e:#}");
            return;
        }
    };

    let mut drops_seen = 0u64;
    let mut consumer_gone = false;
    let mut ring_full_batch = false;
    while !shared.stop.load(Ordering::Acquire) {
        // With the gate open and the ring buffer's own wakeup rule, every
        // record that finds the reader caught up wakes it: a timed poll
        // would find nothing (and cost a wakeup a millisecond while a
        // subscriber waits on a quiet host). Only batched wakeups leave
        // records unannounced, for the timed poll to pick up.
        let timeout = if shared.enabled.load(Ordering::Relaxed) && !pacing.kernel_wakes_on_catch_up(Instant::now()) {
            poll
        } else {
            QUIET_POLL
        };
        // After a full batch more is waiting: take it without sleeping.
        if !ring_full_batch {
            wait_readable(ring.epoll_fd(), timeout);
        }
        // Wakeups are batched in the kernel, so records may be waiting
        // without having woken us: always drain after the timed wait.
        let taken = ring.consume_raw_n(MAX_BATCH_EVENTS);
        if taken < 0 {
            warn!(
                "ring buffer consume failed: {}",
                std::io::Error::from_raw_os_error(-taken)
            );
        }
        ring_full_batch = taken >= MAX_BATCH_EVENTS as i32;

        let drops_total = read_drops(skel);
        let new_drops = drops_total.saturating_sub(drops_seen);
        drops_seen = drops_total;
        shared.kernel_drops.store(drops_total, Ordering::Relaxed);

        let mut events = std::mem::take(&mut *pending.borrow_mut());
        if let Some(ns) = pacing.observe(events.len(), Instant::now()) {
            if let Err(e) = control.set_wakeup_interval(ns) {
                warn!("{e}");
            }
        }
        if events.is_empty() && new_drops == 0 {
            continue;
        }
        // Records from different CPUs can be committed slightly out of
        // order; hand them on in sequence order (cheap: nearly sorted).
        events.sort_by_key(|e| e.seq);
        shared.events_read.fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut batch = Batch {
            events,
            kernel_drops: new_drops,
        };
        let mut consumer = consumer.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *consumer {
            Consumer::Sink(sink) => sink(batch),
            Consumer::Channel(tx) => loop {
                match tx.try_send(batch) {
                    Ok(()) => break,
                    Err(TrySendError::Closed(_)) => {
                        if !consumer_gone {
                            debug!("probe consumer went away; discarding events until a sink is installed");
                            consumer_gone = true;
                        }
                        break;
                    }
                    Err(TrySendError::Full(b)) => {
                        // The consumer is behind: wait for it. Meanwhile the
                        // kernel ring fills, and what it cannot hold is
                        // counted there as drops.
                        if shared.stop.load(Ordering::Acquire) {
                            break;
                        }
                        batch = b;
                        std::thread::sleep(BACKOFF);
                    }
                }
            },
        }
        drop(consumer);
        pending.borrow_mut().reserve(MAX_BATCH_EVENTS);
    }
}

/// Waits until the ring buffer has data or `timeout` passes, without
/// consuming (`RingBuffer::poll` also consumes, with no bound). The timeout
/// has microsecond resolution (epoll_pwait2, Linux >= 5.11); where that is
/// missing, whole milliseconds, at least one.
fn wait_readable(epoll_fd: i32, timeout: Duration) {
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // SAFETY: FFI; `epoll_fd` is the ring buffer manager's epoll instance,
    // alive while the ring buffer is, `event` is a live, writable
    // epoll_event for the one event asked for, `ts` a live timespec, and a
    // null signal mask leaves the mask alone. Its result (ready, timed out,
    // interrupted) needs no handling: the caller drains the ring either way.
    let r = unsafe { libc::epoll_pwait2(epoll_fd, &mut event, 1, &ts, std::ptr::null()) };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: as above, with a timeout in milliseconds.
        unsafe { libc::epoll_wait(epoll_fd, &mut event, 1, ms) };
    }
}

/// Adapts the kernel's wakeup interval to the event rate: at low rates each
/// event wakes the reader (with `wakeup_interval` 0, whenever the reader
/// has caught up; low latency); above
/// [`BATCH_ABOVE_RATE`] events/s it wakes at most once per `batch_interval`
/// (fewer, larger batches: a wakeup costs microseconds of scheduler time on
/// both sides). Hysteresis down to [`UNBATCH_BELOW_RATE`].
struct Pacing {
    low_ns: u32,
    high_ns: u32,
    batching: bool,
    /// When the interval last changed.
    switched_at: Option<Instant>,
    window_start: Instant,
    window_events: u64,
}

impl Pacing {
    fn new(opts: &ProbeOptions) -> Self {
        Pacing {
            low_ns: opts.wakeup_interval.as_nanos() as u32,
            high_ns: opts.batch_interval.as_nanos() as u32,
            batching: false,
            switched_at: None,
            window_start: Instant::now(),
            window_events: 0,
        }
    }

    /// Whether the kernel's wakeup interval is now 0: it wakes the reader
    /// for every record committed after the reader has caught up.
    /// Records committed just before a switch to 0 may still carry the
    /// old "no wakeup" flag, so the first [`SWITCH_GRACE`] after a switch
    /// does not count.
    fn kernel_wakes_on_catch_up(&self, now: Instant) -> bool {
        let interval = if self.batching { self.high_ns } else { self.low_ns };
        interval == 0
            && self
                .switched_at
                .is_none_or(|at| now.saturating_duration_since(at) >= SWITCH_GRACE)
    }

    /// Counts a drain of `events` at `now`; returns the interval to switch
    /// to, if it changes.
    fn observe(&mut self, events: usize, now: Instant) -> Option<u32> {
        self.window_events += events as u64;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < RATE_WINDOW || self.low_ns == self.high_ns {
            return None;
        }
        let rate = self.window_events as f64 / elapsed.as_secs_f64();
        self.window_start = now;
        self.window_events = 0;
        let batching = if self.batching {
            rate >= UNBATCH_BELOW_RATE as f64
        } else {
            rate > BATCH_ABOVE_RATE as f64
        };
        if batching == self.batching {
            return None;
        }
        self.batching = batching;
        self.switched_at = Some(now);
        debug!(rate, batching, "wakeup pacing changed");
        Some(if batching { self.high_ns } else { self.low_ns })
    }
}

fn read_drops(skel: &SocktapSkel<'_>) -> u64 {
    match skel.maps.drops.lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY) {
        Ok(Some(per_cpu)) => per_cpu.iter().map(|v| u64_of(v)).sum(),
        Ok(None) => 0,
        Err(e) => {
            warn!("reading the drop counter failed: {e:#}");
            0
        }
    }
}

pub(crate) fn u64_of(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `rate` events/s for `ms` milliseconds in 1 ms drains; returns
    /// the last switch made, if any.
    fn feed(p: &mut Pacing, t: &mut Instant, rate: u64, ms: u64) -> Option<u32> {
        let mut last = None;
        for _ in 0..ms {
            *t += Duration::from_millis(1);
            if let Some(ns) = p.observe((rate / 1000) as usize, *t) {
                last = Some(ns);
            }
        }
        last
    }

    #[test]
    fn pacing_batches_above_20k_per_second_and_returns_below_10k() {
        let opts = ProbeOptions::default();
        let mut p = Pacing::new(&opts);
        let mut t = p.window_start;
        let (low, high) = (0, 500_000);
        assert_eq!(
            feed(&mut p, &mut t, 5_000, 50),
            None,
            "low rate: stays at the short interval"
        );
        assert_eq!(
            feed(&mut p, &mut t, 15_000, 50),
            None,
            "between the thresholds: no change"
        );
        assert_eq!(feed(&mut p, &mut t, 300_000, 50), Some(high), "high rate: batches");
        assert_eq!(feed(&mut p, &mut t, 15_000, 50), None, "hysteresis: keeps batching");
        assert_eq!(feed(&mut p, &mut t, 2_000, 50), Some(low), "low again: short interval");
    }

    #[test]
    fn timed_polls_are_needed_while_batching_and_just_after_it() {
        let opts = ProbeOptions::default();
        let mut p = Pacing::new(&opts);
        let mut t = p.window_start;
        assert!(p.kernel_wakes_on_catch_up(t), "interval 0 from the start");
        feed(&mut p, &mut t, 300_000, 50);
        assert!(
            !p.kernel_wakes_on_catch_up(t),
            "batched wakeups leave records unannounced"
        );
        assert_eq!(feed(&mut p, &mut t, 2_000, 50), Some(0));
        let switched = p.switched_at.unwrap();
        assert!(
            !p.kernel_wakes_on_catch_up(switched + SWITCH_GRACE / 2),
            "a record may still carry the old flag"
        );
        assert!(p.kernel_wakes_on_catch_up(switched + SWITCH_GRACE));

        let opts = ProbeOptions {
            wakeup_interval: Duration::from_micros(50),
            ..Default::default()
        };
        assert!(
            !Pacing::new(&opts).kernel_wakes_on_catch_up(t),
            "a nonzero interval at low rates too"
        );
    }

    #[test]
    fn pacing_is_off_when_both_intervals_are_equal() {
        let opts = ProbeOptions {
            batch_interval: ProbeOptions::default().wakeup_interval,
            ..Default::default()
        };
        let mut p = Pacing::new(&opts);
        let mut t = p.window_start;
        assert_eq!(feed(&mut p, &mut t, 1_000_000, 100), None);
    }
}
