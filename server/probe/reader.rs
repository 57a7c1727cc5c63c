//! The ring buffer reader: turns ring-buffer records into batches for the
//! consumer. It starts on the probe's thread (which owns the skeleton, and
//! so the attached programs); with a runtime consumer it reads on that
//! runtime, and on a blocking thread while it cannot keep up there.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libbpf_rs::MapCore;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, error, warn};

use super::drops::MappedDrops;
use super::ring::MappedRing;
use super::skel::SocktapSkel;
use super::{
    Batch, Consumer, ProbeControl, ProbeOptions, Sink, BATCH_ABOVE_RATE, RATE_WINDOW, SKIPPED_CHECK,
    UNBATCH_BELOW_RATE, WAKEUPS_OFF,
};
use crate::event::Event;
use crate::priority::RaisedPriority;

/// How long the reader sleeps between polls when nothing can arrive
/// unannounced: the gate is closed, or the kernel wakes the reader for the
/// first record after it has caught up (wakeup interval 0). It bounds how
/// long a change of the gate or of the interval goes unnoticed. A longer
/// `poll_interval` lengthens it.
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

/// The ring buffer and everything needed to turn its records into
/// batches: moved between the reader thread, a tokio task and a blocking
/// thread, used by one at a time.
pub(crate) struct Reader {
    ring: MappedRing,
    control: ProbeControl,
    drops: MappedDrops,
    drops_seen: u64,
    pacing: Pacing,
    poll: Duration,
    pending: Vec<Event>,
    /// The last pass took a full batch: more is waiting.
    full_batch: bool,
    /// A record header was malformed: nothing more can be read.
    broken: bool,
    /// The nice value of a thread while it reads ([`ProbeOptions::reader_nice`]).
    nice: i32,
    /// Its `SCHED_FIFO` priority instead, if any ([`ProbeOptions::realtime_priority`]).
    realtime: Option<u8>,
    /// [`ProbeControl::skipped_calls`] when last read.
    skipped_seen: u64,
    skipped_check: SkippedCheck,
}

/// When the reader reads the programs' skipped-call counters: at most every
/// [`SKIPPED_CHECK`], while records come or the gate is open. A call the
/// kernel skipped leaves no record, so a quiet ring does not mean that none
/// was skipped: the last calls of a burst, or calls on a host whose every
/// other call the prefilter refuses, are told at the next quiet poll (every
/// 200 ms while the gate is open). With the gate closed nothing is
/// announced (no subscriber), and reading stops.
struct SkippedCheck {
    read_at: Instant,
}

impl SkippedCheck {
    fn due(&mut self, records: usize, gate_open: bool, now: Instant) -> bool {
        let due = (records > 0 || gate_open) && now.duration_since(self.read_at) >= SKIPPED_CHECK;
        if due {
            self.read_at = now;
        }
        due
    }
}

impl Reader {
    pub(crate) fn new(skel: &SocktapSkel<'_>, control: &ProbeControl, opts: &ProbeOptions) -> Result<Reader, String> {
        let events = &skel.maps.events;
        let ring = MappedRing::new(events.as_fd(), events.max_entries() as usize)
            .map_err(|e| format!("cannot map the ring buffer: {e}"))?;
        let drops = &skel.maps.drops;
        let drops = MappedDrops::new(drops.as_fd(), drops.max_entries())
            .map_err(|e| format!("cannot map the drops map: {e}"))?;
        Ok(Reader {
            ring,
            control: control.clone(),
            drops,
            drops_seen: 0,
            pacing: Pacing::new(opts),
            poll: opts.poll_interval,
            pending: Vec::with_capacity(MAX_BATCH_EVENTS),
            full_batch: false,
            broken: false,
            nice: opts.reader_nice,
            realtime: opts.realtime_priority,
            skipped_seen: control.skipped_calls(),
            skipped_check: SkippedCheck {
                read_at: Instant::now(),
            },
        })
    }

    fn stopped(&self) -> bool {
        self.broken || self.control.shared.stop.load(Ordering::Acquire)
    }

    /// Notes the calling thread as the one that reads
    /// ([`ProbeControl::reader_state`]): when a thread starts reading, and
    /// at each pass; on the runtime, whose task may wake on another worker,
    /// also before each wait. So it is right from the moment the reading
    /// moves.
    fn mark_thread(&self) {
        self.control
            .shared
            .reader_tid
            .store(crate::priority::current_tid(), Ordering::Relaxed);
    }

    /// Whether the reader drains on its timer now (the event rate is high).
    fn batching(&self) -> bool {
        self.pacing.batching
    }

    /// How long to wait for a wakeup before the next pass; None: more is
    /// waiting, do not wait.
    fn wait(&self) -> Option<Duration> {
        if self.full_batch {
            return None;
        }
        // At high rates the reader drains on its own timer, and the kernel
        // wakes nobody. Otherwise, with the gate open and the ring buffer's
        // own wakeup rule, every record that finds the reader caught up
        // wakes it: a timed poll would find nothing (and cost a wakeup a
        // millisecond while a subscriber waits on a quiet host). Only a
        // nonzero low-rate interval leaves records unannounced, for the
        // timed poll to pick up.
        let open = self.control.shared.enabled.load(Ordering::Relaxed);
        Some(self.pacing.wait_timeout(open, self.poll, Instant::now()))
    }

    /// One pass: takes at most [`MAX_BATCH_EVENTS`] records, adapts the
    /// kernel's wakeup interval to the rate, and returns the batch, if
    /// there is anything to report.
    fn pass(&mut self) -> Option<Batch> {
        self.mark_thread();
        let shared = &self.control.shared;
        let pending = &mut self.pending;
        // Wakeups are batched in the kernel, so records may be waiting
        // without having woken us: always drain after the timed wait.
        let taken = self.ring.consume(MAX_BATCH_EVENTS, |data| match Event::decode(data) {
            Ok(e) => pending.push(e),
            Err(e) => {
                shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                warn!("dropping undecodable ring buffer record: {e}");
            }
        });
        if taken.malformed {
            // The kernel never writes one; past it nothing can be found.
            // What the ring cannot hold from now on is counted as drops.
            error!("ring buffer record longer than the ring: the reader stops");
            self.broken = true;
        }
        self.full_batch = taken.records >= MAX_BATCH_EVENTS;

        let drops_total = self.drops.total();
        let new_drops = drops_total.saturating_sub(self.drops_seen);
        self.drops_seen = drops_total;
        shared.kernel_drops.store(drops_total, Ordering::Relaxed);

        // Calls the kernel skipped took no record and no seq: only the
        // programs' counters know them (SkippedCheck says when to ask).
        let now = Instant::now();
        let mut new_skipped = 0;
        let gate_open = shared.enabled.load(Ordering::Relaxed);
        if self.skipped_check.due(taken.records, gate_open, now) {
            self.skipped_seen = self.skipped_seen.max(shared.skipped_floor.load(Ordering::Acquire));
            let skipped = self.control.skipped_calls();
            new_skipped = skipped.saturating_sub(self.skipped_seen);
            self.skipped_seen = skipped;
            shared.kernel_skipped.store(skipped, Ordering::Relaxed);
        }

        if let Some(ns) = self.pacing.observe(taken.records, now) {
            if let Err(e) = self.control.set_wakeup_interval(ns) {
                warn!("{e}");
            }
        }
        // Records from different CPUs can be committed slightly out of
        // order; hand them on in sequence order. A record the reader
        // stopped at (still being written, or left for the next batch) may
        // carry a lower number than some taken before it: what is numbered
        // at or above its bound waits for the next pass (its commit wakes
        // the reader). Not covered: a record after it numbered below what
        // is handed on, which takes two programs stalled at once (README).
        sort_by_seq(&mut self.pending);
        let ready = match self.ring.peek_first_u64() {
            Some(bound) => self.pending.partition_point(|e| e.seq < bound),
            None => self.pending.len(),
        };
        if ready == 0 && new_drops == 0 && new_skipped == 0 {
            return None;
        }
        // What is held back starts the next batch, with room for a whole one
        // (growing from nothing would copy the batch several times a pass).
        let mut held = self.pending.split_off(ready);
        held.reserve(MAX_BATCH_EVENTS);
        let events = std::mem::replace(&mut self.pending, held);
        shared.events_read.fetch_add(events.len() as u64, Ordering::Relaxed);
        Some(Batch {
            events,
            kernel_drops: new_drops,
            kernel_skipped: new_skipped,
        })
    }
}

/// Reads on the reader thread until `shared.stop` is set, or until a
/// runtime consumer is installed: then the reading moves to that runtime
/// ([`read_on_runtime`]) and this returns at once. The caller keeps the
/// skeleton until the stop.
pub(crate) fn run(mut reader: Reader, consumer: &Mutex<Consumer>) {
    let _raised = RaisedPriority::raise(reader.nice, reader.realtime);
    let mut consumer_gone = false;
    reader.mark_thread();
    while !reader.stopped() {
        if let Some(timeout) = reader.wait() {
            reader.ring.wait_readable(timeout);
        }
        let batch = reader.pass();
        let mut consumer = consumer.lock().unwrap_or_else(|e| e.into_inner());
        if let Consumer::Runtime { handle, sink } = &mut *consumer {
            if let Some(mut sink) = sink.take() {
                if let Some(b) = batch {
                    sink(b);
                }
                handle.spawn(read_on_runtime(reader, sink));
                return;
            }
        }
        let Some(mut batch) = batch else {
            continue;
        };
        match &mut *consumer {
            Consumer::Sink(sink) => sink(batch),
            // The sink left with the reading, which returned above.
            Consumer::Runtime { .. } => {}
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
                        if reader.stopped() {
                            break;
                        }
                        batch = b;
                        std::thread::sleep(BACKOFF);
                    }
                }
            },
        }
    }
}

/// Reads on a tokio runtime: the task that reads also runs the consumer,
/// and the subscribers' streams are woken on the same thread, so a batch
/// costs one wakeup instead of two (the reader's, then the runtime's).
/// Above [`BATCH_ABOVE_RATE`] events/s it drains on a [`DrainTimer`]. When
/// the reading falls behind at a high rate (a pass still finds a whole
/// batch of [`MAX_BATCH_EVENTS`] records waiting) it moves to a blocking
/// thread, so that decoding and dispatch run beside the runtime's
/// HTTP/2 writes instead of taking turns with them; it comes back when the
/// rate falls below [`UNBATCH_BELOW_RATE`].
pub(crate) async fn read_on_runtime(mut reader: Reader, mut sink: Sink) {
    let shared = reader.control.shared.clone();
    shared.on_runtime.store(true, Ordering::Relaxed);
    let ready = match reader.ring.map_fd().try_clone_to_owned().and_then(|fd| {
        // SAFETY: `fd` is an owned duplicate of the ring buffer map's
        // descriptor, moved into the AsyncFd: it stays open and the
        // same for the AsyncFd's whole life. This runs inside a task on
        // the runtime, so a reactor is current.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)
    }) {
        Ok(r) => r,
        Err(e) => {
            error!("cannot watch the ring buffer on the runtime ({e}); reading on a thread instead");
            shared.on_runtime.store(false, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || read_on_thread(reader, sink, |_| false)).await;
            return;
        }
    };
    // Drains every batch interval while batching: tokio's own timers tick
    // in milliseconds, twice the default interval of 500 µs.
    let mut timer = match DrainTimer::new() {
        Ok(t) => Some(t),
        Err(e) => {
            warn!("no timerfd for the batched drain ({e}); draining on tokio's millisecond timers");
            None
        }
    };
    while !reader.stopped() {
        reader.mark_thread();
        let to_thread = reader.batching() && reader.full_batch;
        if let Some(t) = &mut timer {
            // Disarmed while a thread reads: it drains on its own, and the
            // timer would wake the runtime for nothing.
            let period = if to_thread { None } else { reader.pacing.drain_period() };
            if let Err(e) = t.set(period) {
                warn!("cannot set the drain timer ({e}); draining on tokio's millisecond timers");
                timer = None;
            }
        }
        if to_thread {
            shared.on_runtime.store(false, Ordering::Relaxed);
            let back = tokio::task::spawn_blocking(move || read_on_thread(reader, sink, |r| !r.batching())).await;
            match back {
                Ok((r, s)) => (reader, sink) = (r, s),
                Err(e) => {
                    error!("the ring buffer reader failed: {e}");
                    return;
                }
            }
            shared.on_runtime.store(true, Ordering::Relaxed);
            continue;
        }
        if let Some(timeout) = reader.wait() {
            let ticking = timer.as_ref().filter(|t| t.period.is_some());
            tokio::select! {
                r = ready.readable() => {
                    // Clear first, then read: a wakeup after the clear is
                    // kept for the next wait.
                    if let Ok(mut guard) = r {
                        guard.clear_ready();
                    }
                }
                _ = DrainTimer::tick(ticking) => {}
                _ = tokio::time::sleep(timeout), if ticking.is_none() => {}
            }
        }
        if let Some(b) = reader.pass() {
            sink(b);
        }
        if reader.full_batch {
            // Let the streams write what was just dispatched.
            tokio::task::yield_now().await;
        }
    }
}

/// A periodic timer with microsecond resolution for the reader on the
/// runtime, whose own timers tick in milliseconds: a timerfd watched by the
/// runtime's reactor.
struct DrainTimer {
    fd: AsyncFd<TimerFdRaw>,
    /// The period it is armed with; `None` while disarmed.
    period: Option<Duration>,
}

/// A timerfd as tokio's `AsyncFd` takes it (nix's implements `AsFd` only).
struct TimerFdRaw(TimerFd);

impl AsRawFd for TimerFdRaw {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DrainTimer {
    /// A disarmed timer. Must run inside the runtime.
    fn new() -> std::io::Result<DrainTimer> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: the TimerFd is moved into the AsyncFd, which owns it from
        // here on: its descriptor stays open and the same for the
        // AsyncFd's whole life (`TimerFdRaw` hands out no other). Called
        // inside a task on the runtime, so a reactor is current.
        let fd = unsafe { AsyncFd::register_with_interest(TimerFdRaw(fd), Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(DrainTimer { fd, period: None })
    }

    /// Arms it to fire every `period`, or disarms it (`None`); a no-op when
    /// it is already so.
    fn set(&mut self, period: Option<Duration>) -> std::io::Result<()> {
        if period == self.period {
            return Ok(());
        }
        let timer = &self.fd.get_ref().0;
        match period {
            Some(p) => {
                let p = TimeSpec::from_duration(p.max(Duration::from_micros(1)));
                timer.set(Expiration::Interval(p), TimerSetTimeFlags::empty())?;
            }
            None => timer.unset()?,
        }
        self.period = period;
        Ok(())
    }

    /// Waits for the next expiry of `timer`; never returns for `None`.
    async fn tick(timer: Option<&DrainTimer>) {
        let Some(t) = timer else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = t.fd.readable().await else {
                return std::future::pending().await;
            };
            // Reading takes the expiry count, and nothing is left to read
            // once it is taken: a later expiry makes the fd readable again.
            match guard.try_io(|fd| fd.get_ref().0.wait().map_err(std::io::Error::from)) {
                Ok(_) => return,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads on the calling (blocking) thread until the stop, or until `done`
/// says so; returns the reader and the sink.
fn read_on_thread(mut reader: Reader, mut sink: Sink, done: impl Fn(&Reader) -> bool) -> (Reader, Sink) {
    // A blocking thread of the runtime's pool: its priority goes back
    // with it (the guard drops before it returns).
    let _raised = RaisedPriority::raise(reader.nice, reader.realtime);
    reader.mark_thread();
    while !reader.stopped() && !done(&reader) {
        if let Some(timeout) = reader.wait() {
            reader.ring.wait_readable(timeout);
        }
        if let Some(b) = reader.pass() {
            sink(b);
        }
    }
    (reader, sink)
}

/// Adapts the reading to the event rate: at low rates each event wakes the
/// reader (with `wakeup_interval` 0, whenever the reader has caught up;
/// low latency); above [`BATCH_ABOVE_RATE`] events/s the reader drains the
/// ring once per `batch_interval` on its own timer and the kernel wakes
/// nobody ([`WAKEUPS_OFF`]): fewer, larger batches, and no interrupt in the
/// traced calls. Hysteresis down to [`UNBATCH_BELOW_RATE`].
struct Pacing {
    low_ns: u32,
    /// How often the reader drains while batching.
    batch: Duration,
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
            batch: opts.batch_interval,
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
        !self.batching && self.low_ns == 0 && self.grace_left(now).is_none()
    }

    /// What is left of the [`SWITCH_GRACE`] after the last switch of the
    /// interval; None once it is over (or before any switch).
    fn grace_left(&self, now: Instant) -> Option<Duration> {
        self.switched_at
            .map(|at| (at + SWITCH_GRACE).saturating_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    /// How long the reader may wait for a wakeup before its next pass, with
    /// the gate `open` and timed polls every `poll`: the drain period while
    /// batching; `poll` while records may come unannounced (a nonzero
    /// interval), and, in the grace after a switch to 0, no later than its
    /// end, so that one pass takes what came with the old flag whatever
    /// `poll` is (after it, a record with the old flag left in the ring
    /// would keep every later one from waking the reader: the kernel wakes
    /// it only for a record where it stands); otherwise the quiet poll.
    fn wait_timeout(&self, open: bool, poll: Duration, now: Instant) -> Duration {
        if let Some(period) = self.drain_period() {
            return period;
        }
        if !open || self.kernel_wakes_on_catch_up(now) {
            return QUIET_POLL.max(poll);
        }
        match self.grace_left(now) {
            Some(left) if self.low_ns == 0 => poll.min(left),
            _ => poll,
        }
    }

    /// While batching: how often the reader drains the ring.
    fn drain_period(&self) -> Option<Duration> {
        self.batching.then_some(self.batch)
    }

    /// Counts a drain of `events` at `now`; returns the kernel's wakeup
    /// interval to switch to, if it changes.
    fn observe(&mut self, events: usize, now: Instant) -> Option<u32> {
        self.window_events += events as u64;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < RATE_WINDOW || self.batch.as_nanos() == u128::from(self.low_ns) {
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
        Some(if batching {
            WAKEUPS_OFF.as_nanos() as u32
        } else {
            self.low_ns
        })
    }
}

/// Sorts a batch by sequence number. Records from different CPUs are
/// committed nearly in order: most batches are sorted already (~94 % under
/// W1), and the others have a few events a few places late (~8 in 4096
/// under W2). Moving those few into place is cheaper than a general sort,
/// which merges whole runs of 144-byte events; it is the fallback when
/// more than a few events would have to move.
fn sort_by_seq(events: &mut [Event]) {
    let mut budget = 4 * events.len();
    for i in 1..events.len() {
        let seq = events[i].seq;
        if events[i - 1].seq <= seq {
            continue;
        }
        // events[..i] is sorted: find where this one belongs.
        let at = events[..i].partition_point(|e| e.seq <= seq);
        let moves = i - at;
        if moves > budget {
            events.sort_by_key(|e| e.seq);
            return;
        }
        budget -= moves;
        events[at..=i].rotate_right(1);
    }
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
        let (low, off) = (0, WAKEUPS_OFF.as_nanos() as u32);
        assert_eq!(p.drain_period(), None, "the kernel wakes the reader");
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
        assert_eq!(
            feed(&mut p, &mut t, 300_000, 50),
            Some(off),
            "high rate: the kernel's wakeups off"
        );
        assert_eq!(
            p.drain_period(),
            Some(opts.batch_interval),
            "high rate: the reader drains on its timer"
        );
        assert_eq!(feed(&mut p, &mut t, 15_000, 50), None, "hysteresis: keeps batching");
        assert_eq!(feed(&mut p, &mut t, 2_000, 50), Some(low), "low again: short interval");
        assert_eq!(p.drain_period(), None, "low again: the kernel wakes the reader");
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
            "while batching the kernel announces nothing"
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
    fn after_a_switch_to_kernel_wakeups_the_reader_looks_again_when_the_grace_ends() {
        let (poll, long) = (Duration::from_millis(1), Duration::from_secs(2));
        let mut p = Pacing::new(&ProbeOptions::default());
        let mut t = p.window_start;
        assert_eq!(
            p.wait_timeout(true, long, t),
            long,
            "woken by the kernel: the quiet poll"
        );
        assert_eq!(
            p.wait_timeout(true, poll, t),
            QUIET_POLL,
            "never shorter than the quiet poll"
        );
        assert_eq!(p.wait_timeout(false, poll, t), QUIET_POLL, "gate closed");
        feed(&mut p, &mut t, 300_000, 50);
        assert_eq!(p.wait_timeout(true, long, t), p.batch, "batching: the drain period");
        feed(&mut p, &mut t, 2_000, 50);
        let switched = p.switched_at.unwrap();
        // In the grace a record may carry the old "no wakeup" flag: the
        // timed polls, and however long they are, one at its end.
        assert_eq!(p.wait_timeout(true, poll, switched), poll);
        assert_eq!(
            p.wait_timeout(true, long, switched),
            SWITCH_GRACE,
            "a long poll: the grace's end"
        );
        let later = switched + SWITCH_GRACE / 4;
        assert_eq!(p.wait_timeout(true, long, later), SWITCH_GRACE * 3 / 4);
        assert_eq!(
            p.wait_timeout(true, long, switched + SWITCH_GRACE),
            long,
            "then the kernel wakes it"
        );

        let low = ProbeOptions {
            wakeup_interval: Duration::from_micros(50),
            ..Default::default()
        };
        assert_eq!(
            Pacing::new(&low).wait_timeout(true, long, t),
            long,
            "a nonzero low-rate interval: the timed poll"
        );
    }

    #[test]
    fn batches_are_sorted_by_seq_however_shuffled() {
        let event = |seq| Event {
            timestamp_ns: seq,
            ..Event::sample(seq, 1)
        };
        let check = |seqs: Vec<u64>| {
            let mut events: Vec<Event> = seqs.iter().map(|&s| event(s)).collect();
            sort_by_seq(&mut events);
            let mut want = seqs.clone();
            want.sort();
            assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), want, "from {seqs:?}");
            assert!(events.iter().all(|e| e.timestamp_ns == e.seq), "each event moved whole");
        };
        check(vec![]);
        check(vec![1]);
        check((0..100).collect());
        check(vec![2, 1, 4, 3, 6, 5]);
        check(vec![1, 2, 3, 0, 4, 5, 9, 6, 7, 8]);
        check((0..100).rev().collect()); // over the budget: the general sort
                                         // Two CPUs' records interleaved with small delays, and random orders.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let n = 1 + (rand() % 300) as usize;
            let mut seqs: Vec<u64> = (0..n as u64).collect();
            for _ in 0..(rand() % 20) {
                let i = (rand() as usize) % n;
                let j = (i + (rand() as usize) % 5).min(n - 1);
                seqs.swap(i, j);
            }
            check(seqs);
            let mut seqs: Vec<u64> = (0..n as u64).map(|_| rand() % 1000).collect();
            seqs.dedup();
            check(seqs);
        }
    }

    /// A skipped call leaves no record: the counters are read on quiet
    /// passes too while the gate is open, not only once after the last
    /// record (a call skipped after that read went untold until the next
    /// record; CI, 7.3 fentry: 1,792 of 1,793 announced).
    #[test]
    fn skipped_calls_are_read_on_quiet_passes_while_the_gate_is_open() {
        let start = Instant::now();
        let mut check = SkippedCheck { read_at: start };
        let at = |ms| start + Duration::from_millis(ms);
        assert!(!check.due(10, true, at(50)), "at most every SKIPPED_CHECK");
        assert!(check.due(10, true, at(100)), "records came");
        assert!(!check.due(0, true, at(150)));
        assert!(check.due(0, true, at(300)), "a quiet pass, gate open");
        assert!(
            check.due(0, true, at(500)),
            "and the next: a call may be skipped any time"
        );
        assert!(check.due(0, true, at(700)));
        assert!(
            !check.due(0, false, at(900)),
            "gate closed, nothing came: no subscriber to tell"
        );
        assert!(check.due(5, false, at(1000)), "records from before the gate closed");
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
