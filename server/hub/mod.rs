//! The hub: takes batches from one event source (the probe's reader,
//! or a synthetic source in tests) and fans them out to any number of
//! subscribers, each with its own filter and bounded queue. It never waits
//! on a subscriber: a slow one loses events (counted, announced in its own
//! stream) and costs the others nothing.
//!
//! It also keeps the recent history for replay and resume, and keeps the
//! kernel gate closed while nobody wants events.

pub mod filter;
pub mod history;
pub mod subscriber;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::bytes::BytesMut;
use socktap_proto::v1 as pb;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::convert;
use crate::event::{monotonic_now_ns, AttachMode, Event, WallClock};
use crate::probe::{Batch, Prefilter, PrefilterStatus, ProbeControl, PREFILTER_CAPACITY};
pub use filter::{FieldError, FilterLimits, Selector};
pub use history::History;
pub use subscriber::{Item, Loss, LossSource, Subscriber, SubscriberCounters};

/// About the size of an encoded IPv4 event with its entry key and length;
/// buffers are sized by it.
const ENCODED_EVENT_BYTES: usize = 114;

/// Events encoded into one buffer (about 470 KB). A full ring buffer
/// drains as tens of thousands of events at once; one buffer for all of
/// them would stay alive, whole, while any subscriber still queues one.
const FAN_OUT_CHUNK: usize = 4096;

/// Sizes and limits of the hub.
#[derive(Clone, Copy, Debug)]
pub struct HubConfig {
    /// Events each subscriber may have waiting before it loses some.
    pub queue_events: usize,
    /// Encoded bytes all subscribers' queues may hold together, so that
    /// queue memory stays bounded however many subscribe. Half of it is
    /// divided equally (each subscriber's guaranteed share, recomputed as
    /// subscribers come and go); the other half is a reserve that lagging
    /// subscribers borrow from, first come first served. (Runs shared
    /// between subscribers count in full for each of them.)
    pub queue_bytes: usize,
    /// Events kept for replay and resume.
    pub history_events: usize,
    /// Concurrent subscribers.
    pub max_subscribers: usize,
    /// Concurrent subscribers on one client connection (TCP peers only: a
    /// unix socket gives every client the same peer name).
    pub max_subscribers_per_connection: usize,
    /// Keep the kernel gate open (and history filling) with no subscriber.
    pub record_always: bool,
    /// Limits on filters.
    pub filter_limits: FilterLimits,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            queue_events: 65_536,
            queue_bytes: 8 << 20,
            history_events: 65_536,
            max_subscribers: 128,
            max_subscribers_per_connection: 32,
            record_always: false,
            filter_limits: FilterLimits::default(),
        }
    }
}

/// Where the hub's events come from.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// The attach mode, or None for a synthetic source.
    pub mode: Option<AttachMode>,
    /// Modes refused before the one in use, with the reasons.
    pub refused_modes: Vec<String>,
    /// The probe's controls (gate, counters), when the source is the kernel.
    pub probe: Option<ProbeControl>,
}

/// Where a new subscriber starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Live events only.
    Live,
    /// The last N matching events from history, then live.
    ReplayLast(usize),
    /// Matching history events at or after this monotonic time, then live.
    Since(u64),
    /// Matching history events with a greater seq, then live.
    ResumeAfter {
        /// The last seq the client saw.
        seq: u64,
        /// The instance (see [`Hub::instance_id`]) that seq came from,
        /// when the client said. Another instance's seq means socktapd
        /// restarted since: the subscriber is told so, then gets all of
        /// history.
        instance: Option<u64>,
    },
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    /// The subscriber limit is reached.
    #[error("max_subscribers: the limit of {0} concurrent subscribers is reached")]
    TooMany(usize),
    /// The per-connection subscriber limit is reached.
    #[error("max_subscribers_per_connection: the limit of {0} streams on one connection is reached; open another connection")]
    TooManyOnConnection(usize),
    /// The hub is shutting down.
    #[error("socktapd is shutting down")]
    ShuttingDown,
    /// `resume_after_seq` names an event this socktapd has not read: the
    /// stream being resumed came from another socktapd, or from one before
    /// a restart (sequence numbers start again with every start).
    #[error("resume_after_seq: {asked} is after the newest event this socktapd has read ({}): the stream it resumes came from another socktapd, or from before a restart; start without it", newest.map_or("none yet".to_owned(), |n| n.to_string()))]
    ResumeAhead {
        /// The sequence number asked for.
        asked: u64,
        /// The newest one read, if any.
        newest: Option<u64>,
    },
}

/// A snapshot of the hub's state.
#[derive(Clone, Debug)]
pub struct HubStatus {
    /// Events received from the source.
    pub events_read: u64,
    /// Events per second over the last second.
    pub events_per_second: f64,
    /// Kernel ring buffer drops reported by the source.
    pub kernel_drops: u64,
    /// Calls the kernel skipped the programs on, reported by the source.
    pub kernel_skipped: u64,
    /// Events in history / its capacity.
    pub history_len: usize,
    /// See `history_len`.
    pub history_capacity: usize,
    /// Whether the kernel gate is open.
    pub gate_open: bool,
    /// The kernel prefilter in force (off without a kernel source).
    pub prefilter: PrefilterStatus,
    /// The live subscribers.
    pub subscribers: Vec<Arc<Subscriber>>,
    /// Events handed to subscribers' streams since start, all subscribers
    /// together (those gone too).
    pub delivered_total: u64,
    /// Events lost in subscribers' queues since start, all subscribers
    /// together (those gone too).
    pub subscriber_lost_total: u64,
}

struct State {
    history: History,
    /// The newest event's sequence number read so far (history or not).
    newest_seq: Option<u64>,
    subscribers: Vec<Arc<Subscriber>>,
    /// What the subscribers gone had delivered and lost, for the totals.
    departed_delivered: u64,
    departed_lost: u64,
    next_id: u64,
    gate_open: bool,
    shutting_down: bool,
    /// When the rate was last measured, and events_read then.
    rate_mark: (Instant, u64),
    /// Events per second over the second before `rate_mark`.
    rate: f64,
    /// Kept across batches: it remembers the encoded fields of recent
    /// threads and sockets.
    encoder: convert::EntryEncoder,
}

struct Inner {
    config: HubConfig,
    source: Source,
    instance_id: u64,
    clock: WallClock,
    started: Instant,
    state: Mutex<State>,
    events_read: AtomicU64,
    kernel_drops: AtomicU64,
    kernel_skipped: AtomicU64,
}

/// The fan-out hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// A hub for `source`. Closes the kernel gate unless `record_always`.
    pub fn new(config: HubConfig, source: Source) -> Hub {
        let hub = Hub {
            inner: Arc::new(Inner {
                config,
                source,
                instance_id: new_instance_id(),
                clock: WallClock::now(),
                started: Instant::now(),
                state: Mutex::new(State {
                    history: History::new(config.history_events),
                    newest_seq: None,
                    subscribers: Vec::new(),
                    departed_delivered: 0,
                    departed_lost: 0,
                    next_id: 1,
                    gate_open: true,
                    shutting_down: false,
                    rate_mark: (Instant::now(), 0),
                    rate: 0.0,
                    encoder: convert::EntryEncoder::default(),
                }),
                events_read: AtomicU64::new(0),
                kernel_drops: AtomicU64::new(0),
                kernel_skipped: AtomicU64::new(0),
            }),
        };
        hub.update_gate(&mut hub.lock());
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hub's configuration.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// The event source's description.
    pub fn source(&self) -> &Source {
        &self.inner.source
    }

    /// This hub's instance id: random, never 0, different for every hub
    /// (and so for every start of socktapd). Sequence numbers compare only
    /// within one instance.
    pub fn instance_id(&self) -> u64 {
        self.inner.instance_id
    }

    /// The clock used to turn event timestamps into wall time.
    pub fn clock(&self) -> WallClock {
        self.inner.clock
    }

    /// Time since the hub was created.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Dispatches batches until the source closes its channel. (socktapd
    /// instead calls [`Hub::dispatch`] where the probe reads, see
    /// [`crate::probe::Probe::deliver_on_runtime`].)
    pub async fn run(&self, mut batches: mpsc::Receiver<Batch>) {
        while let Some(b) = batches.recv().await {
            self.dispatch(b);
        }
        debug!("event source closed");
    }

    /// Events per second over the last measured second or so (a quiet source
    /// decays to 0).
    fn events_per_second(&self, st: &State) -> f64 {
        let read = self.inner.events_read.load(Ordering::Relaxed);
        let (at, mark) = st.rate_mark;
        let secs = at.elapsed().as_secs_f64();
        if secs > 2.0 {
            read.saturating_sub(mark) as f64 / secs
        } else {
            st.rate
        }
    }

    /// Hands one batch to every subscriber and to history.
    pub fn dispatch(&self, batch: Batch) {
        let Batch {
            events,
            kernel_drops,
            kernel_skipped,
        } = batch;
        self.inner.events_read.fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut st = self.lock();
        // A batch is in sequence order.
        if let Some(last) = events.last() {
            st.newest_seq = Some(st.newest_seq.map_or(last.seq, |n| n.max(last.seq)));
        }
        let secs = st.rate_mark.0.elapsed().as_secs_f64();
        if secs >= 1.0 {
            let read = self.inner.events_read.load(Ordering::Relaxed);
            st.rate = read.saturating_sub(st.rate_mark.1) as f64 / secs;
            st.rate_mark = (Instant::now(), read);
        }
        // Lost for every subscriber: which of them would have matched is
        // unknown.
        for (count, total, source) in [
            (kernel_drops, &self.inner.kernel_drops, LossSource::KernelRingBuffer),
            (kernel_skipped, &self.inner.kernel_skipped, LossSource::KernelSkipped),
        ] {
            if count == 0 {
                continue;
            }
            total.fetch_add(count, Ordering::Relaxed);
            let now = monotonic_now_ns();
            let loss = Loss {
                source,
                count,
                first_seq: 0,
                last_seq: 0,
                first_ns: now,
                last_ns: now,
            };
            for s in &st.subscribers {
                s.announce(loss);
            }
        }
        if !st.subscribers.is_empty() {
            // What the reserve has left; queues only shrink meanwhile.
            let borrowed: usize = st.subscribers.iter().map(|s| s.borrowed_bytes()).sum();
            let mut reserve = self.queue_reserve().saturating_sub(borrowed);
            let State {
                subscribers, encoder, ..
            } = &mut *st;
            // In chunks: a queued run keeps its whole buffer alive, so
            // small buffers bound what a lagging subscriber holds on to.
            for chunk in events.chunks(FAN_OUT_CHUNK) {
                fan_out(subscribers, chunk, &self.inner.clock, encoder, &mut reserve);
            }
        }
        // Moved, not copied: the batch was only borrowed until here.
        st.history.push(events);
    }

    /// Registers a subscriber and queues the history it asked for, all under
    /// one lock so that nothing is missed or repeated between history and
    /// live events. Subscribers with equal selectors share one.
    pub fn subscribe(
        &self,
        peer: String,
        request: pb::WatchEventsRequest,
        selector: Selector,
        start: Start,
    ) -> Result<Arc<Subscriber>, SubscribeError> {
        let mut st = self.lock();
        if st.shutting_down {
            return Err(SubscribeError::ShuttingDown);
        }
        if st.subscribers.len() >= self.inner.config.max_subscribers {
            return Err(SubscribeError::TooMany(self.inner.config.max_subscribers));
        }
        // A seq from another instance: socktapd has restarted since.
        let restarted = matches!(
            start,
            Start::ResumeAfter { instance: Some(other), .. } if other != self.inner.instance_id
        );
        if let Start::ResumeAfter { seq: asked, .. } = start {
            if !restarted && st.newest_seq.is_none_or(|n| asked > n) {
                return Err(SubscribeError::ResumeAhead {
                    asked,
                    newest: st.newest_seq,
                });
            }
        }
        let per_conn = self.inner.config.max_subscribers_per_connection;
        if peer.parse::<std::net::SocketAddr>().is_ok()
            && st.subscribers.iter().filter(|s| s.peer == peer).count() >= per_conn
        {
            return Err(SubscribeError::TooManyOnConnection(per_conn));
        }
        let id = st.next_id;
        st.next_id += 1;
        let selector = shared_selector(&st.subscribers, selector);
        let sub = Arc::new(Subscriber::new(
            id,
            peer,
            request,
            selector,
            self.inner.config.queue_events,
            self.queue_share(st.subscribers.len() + 1),
        ));
        let history = &st.history;
        let selector = sub.selector();
        let matching = |e: &&Event| selector.matches(e);
        match start {
            // This instance's history all came after the restart, so it is
            // all new to the client.
            _ if restarted => {
                let restart = Loss {
                    source: LossSource::Restart,
                    count: 0,
                    first_seq: 0,
                    last_seq: 0,
                    first_ns: 0,
                    last_ns: 0,
                };
                sub.preload(
                    Some(restart),
                    history.iter().filter(matching).copied(),
                    &self.inner.clock,
                );
            }
            Start::Live => {}
            Start::ReplayLast(n) => {
                let mut last: Vec<Event> = history.iter().rev().filter(matching).take(n).copied().collect();
                last.reverse();
                sub.preload(None, last.into_iter(), &self.inner.clock);
            }
            Start::Since(t) => sub.preload(
                None,
                history.iter().filter(|e| e.timestamp_ns >= t).filter(matching).copied(),
                &self.inner.clock,
            ),
            Start::ResumeAfter { seq, .. } => {
                let oldest = history.front().map(|e| e.seq);
                let loss = match oldest {
                    Some(o) if o > seq.saturating_add(1) => Some(Loss {
                        source: LossSource::History,
                        count: o - seq - 1,
                        first_seq: seq + 1,
                        last_seq: o - 1,
                        first_ns: 0,
                        last_ns: history.front().map(|e| e.timestamp_ns).unwrap_or(0),
                    }),
                    _ => None,
                };
                sub.preload(
                    loss,
                    history.iter().filter(|e| e.seq > seq).filter(matching).copied(),
                    &self.inner.clock,
                );
            }
        }
        st.subscribers.push(sub.clone());
        debug!(id, subscribers = st.subscribers.len(), "subscribed");
        self.share_queue_memory(&st);
        self.update_prefilter(&st);
        self.update_gate(&mut st);
        Ok(sub)
    }

    /// Gives subscriber `id` new filters (its cgroup paths resolved anew),
    /// from the next batch on, and sets the kernel prefilter to match.
    /// Returns false when they are the same as before, or the subscriber
    /// is gone.
    pub fn reselect(&self, id: u64, selector: Selector) -> bool {
        let st = self.lock();
        let Some(sub) = st.subscribers.iter().find(|s| s.id == id) else {
            return false;
        };
        if *sub.selector() == selector {
            return false;
        }
        let others: Vec<Arc<Subscriber>> = st.subscribers.iter().filter(|s| s.id != id).cloned().collect();
        sub.set_selector(shared_selector(&others, selector));
        debug!(id, "filters resolved anew");
        self.update_prefilter(&st);
        true
    }

    /// Removes a subscriber (its stream ended or its client went away).
    pub fn unsubscribe(&self, id: u64) {
        let mut st = self.lock();
        if let Some(i) = st.subscribers.iter().position(|s| s.id == id) {
            let gone = st.subscribers.remove(i).counters();
            st.departed_delivered += gone.delivered;
            st.departed_lost += gone.lost;
        }
        debug!(id, subscribers = st.subscribers.len(), "unsubscribed");
        self.share_queue_memory(&st);
        self.update_gate(&mut st);
        self.update_prefilter(&st);
    }

    /// The queue memory lent to lagging subscribers: half of it.
    fn queue_reserve(&self) -> usize {
        self.inner.config.queue_bytes / 2
    }

    /// One subscriber's guaranteed share of the queue memory when `n`
    /// subscribe: the other half, divided equally.
    fn queue_share(&self, n: usize) -> usize {
        (self.inner.config.queue_bytes - self.queue_reserve()) / n.max(1)
    }

    /// Gives every subscriber an equal share of the queue memory.
    fn share_queue_memory(&self, st: &State) {
        let share = self.queue_share(st.subscribers.len());
        for s in &st.subscribers {
            s.set_byte_share(share);
        }
    }

    /// Refuses new subscribers and ends every stream once drained.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutting_down = true;
        for s in &st.subscribers {
            s.close();
        }
    }

    /// The number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// A snapshot for the status RPC.
    pub fn status(&self) -> HubStatus {
        let st = self.lock();
        let live: Vec<_> = st.subscribers.iter().map(|s| s.counters()).collect();
        HubStatus {
            events_read: self.inner.events_read.load(Ordering::Relaxed),
            events_per_second: self.events_per_second(&st),
            kernel_drops: self.inner.kernel_drops.load(Ordering::Relaxed),
            kernel_skipped: self.inner.kernel_skipped.load(Ordering::Relaxed),
            history_len: st.history.len(),
            history_capacity: self.inner.config.history_events,
            gate_open: st.gate_open,
            prefilter: self
                .inner
                .source
                .probe
                .as_ref()
                .map(|p| p.prefilter())
                .unwrap_or_default(),
            subscribers: st.subscribers.clone(),
            delivered_total: st.departed_delivered + live.iter().map(|c| c.delivered).sum::<u64>(),
            subscriber_lost_total: st.departed_lost + live.iter().map(|c| c.lost).sum::<u64>(),
        }
    }

    /// What the kernel should write: the calls some subscriber's filters may
    /// match, or every call when one of them needs every call (or history
    /// records always).
    fn prefilter(&self, st: &State) -> Prefilter {
        if self.inner.config.record_always {
            return Prefilter::Everything;
        }
        let mut keys = BTreeSet::new();
        let selectors: Vec<Arc<Selector>> = st.subscribers.iter().map(|s| s.selector()).collect();
        for (i, s) in selectors.iter().enumerate() {
            // Subscribers with equal filters share one selector: once is enough.
            if selectors[..i].iter().any(|o| Arc::ptr_eq(o, s)) {
                continue;
            }
            match s.kernel_keys() {
                Some(k) => keys.extend(k.iter().copied()),
                None => return Prefilter::Everything,
            }
            if keys.len() > PREFILTER_CAPACITY {
                return Prefilter::Everything;
            }
        }
        Prefilter::Keys(keys)
    }

    /// Sets the kernel prefilter to what the subscribers want, and gives
    /// the kernel the cgroups they name by path. With no subscriber, the
    /// gate is closed and the prefilter is left for the next one.
    fn update_prefilter(&self, st: &State) {
        let Some(probe) = &self.inner.source.probe else { return };
        let roots: BTreeSet<u64> = st
            .subscribers
            .iter()
            .flat_map(|s| s.selector().cgroup_roots().collect::<Vec<_>>())
            .collect();
        if let Err(e) = probe.set_cgroup_roots(&roots) {
            warn!("cannot give the kernel the cgroups named by path: {e}");
        }
        if st.subscribers.is_empty() && !self.inner.config.record_always {
            return;
        }
        if let Err(e) = probe.set_prefilter(&self.prefilter(st)) {
            warn!("cannot set the kernel prefilter: {e}");
        }
    }

    /// Opens the kernel gate while someone wants events, closes it otherwise.
    fn update_gate(&self, st: &mut State) {
        let want = self.inner.config.record_always || !st.subscribers.is_empty();
        if want == st.gate_open {
            return;
        }
        if let Some(probe) = &self.inner.source.probe {
            if let Err(e) = probe.set_enabled(want) {
                warn!("cannot switch the kernel gate: {e}");
                return;
            }
        }
        debug!(open = want, "kernel gate");
        st.gate_open = want;
    }
}

/// `selector`, or an equal one that one of `subscribers` has: subscribers
/// with the same filters share one, and the hub then matches each event
/// once for all of them.
fn shared_selector(subscribers: &[Arc<Subscriber>], selector: Selector) -> Arc<Selector> {
    subscribers
        .iter()
        .map(|s| s.selector())
        .find(|s| **s == selector)
        .unwrap_or_else(|| Arc::new(selector))
}

/// A random instance id, never 0 (0 reads as "not set" in the API). The
/// OS's random source; should it fail, the clock and the process id, which
/// still differ from one start to the next.
fn new_instance_id() -> u64 {
    let mut bytes = [0u8; 8];
    let id = match getrandom::getrandom(&mut bytes) {
        Ok(()) => u64::from_ne_bytes(bytes),
        Err(e) => {
            warn!(error = %e, "no OS randomness for the instance id; using the clock");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_nanos() as u64).rotate_left(17) ^ u64::from(std::process::id())
        }
    };
    id.max(1)
}

/// Hands a batch to the subscribers: finds which events each one takes,
/// encodes every event that anyone takes once, in order, into one buffer
/// (as framed batch entries), and queues each subscriber's events as runs
/// of that buffer: a subscriber taking every event gets one slice.
fn fan_out(
    subscribers: &[Arc<Subscriber>],
    events: &[Event],
    clock: &WallClock,
    encoder: &mut convert::EntryEncoder,
    reserve: &mut usize,
) {
    // The distinct selectors, which of them each subscriber has, and what
    // each takes.
    let own: Vec<Arc<Selector>> = subscribers.iter().map(|s| s.selector()).collect();
    let mut selectors: Vec<&Selector> = Vec::new();
    let which: Vec<usize> = own
        .iter()
        .map(|sel| {
            if let Some(k) = selectors.iter().position(|&x| std::ptr::eq(x, &**sel)) {
                return k;
            }
            selectors.push(sel);
            selectors.len() - 1
        })
        .collect();
    let taken = filter::match_all(&selectors, events);
    let mut wanted = vec![false; events.len()];
    for &i in taken.iter().flatten() {
        wanted[i as usize] = true;
    }
    let mut buf = BytesMut::with_capacity(events.len() * ENCODED_EVENT_BYTES);
    let mut entries = vec![(0u32, 0u32); events.len()];
    for ((e, want), entry) in events.iter().zip(&wanted).zip(&mut entries) {
        if *want {
            let start = buf.len() as u32;
            encoder.encode(e, clock, &mut buf);
            *entry = (start, buf.len() as u32);
        }
    }
    let encoded = buf.freeze();
    for (s, &k) in subscribers.iter().zip(&which) {
        s.offer(events, &taken[k], &entries, &encoded, reserve);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socktap_proto::wire;

    fn event(seq: u64, cookie: u64) -> Event {
        Event::sample(seq, cookie)
    }

    /// A request that takes one cookie.
    fn cookie_request(cookie: u64) -> pb::WatchEventsRequest {
        pb::WatchEventsRequest {
            allow: vec![pb::EventFilter {
                cookies: vec![cookie],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The selector of [`cookie_request`].
    fn only_cookie(cookie: u64) -> Selector {
        let r = cookie_request(cookie);
        Selector::compile(&r.allow, &r.deny, FilterLimits::default()).unwrap()
    }

    /// A live subscriber of `hub` that takes one cookie.
    fn cookie_subscriber(hub: &Hub, peer: &str, cookie: u64) -> Arc<Subscriber> {
        hub.subscribe(peer.into(), cookie_request(cookie), only_cookie(cookie), Start::Live)
            .unwrap()
    }

    /// (seq, cookie) of the events in `runs`, as a client decodes them.
    fn decoded(runs: Vec<wire::EncodedEvents>) -> Vec<(u64, u64)> {
        let batch = wire::WatchEventsResponse {
            message: Some(wire::watch_events_response::Message::Events(wire::EncodedEventBatch {
                runs,
            })),
            instance_id: 0,
        };
        let bytes = prost::Message::encode_to_vec(&batch);
        match <pb::WatchEventsResponse as prost::Message>::decode(&bytes[..])
            .unwrap()
            .message
        {
            Some(pb::watch_events_response::Message::Events(b)) => b.events.iter().map(|e| (e.seq, e.cookie)).collect(),
            other => panic!("not a batch: {other:?}"),
        }
    }

    /// What a client reads next from `s`, up to `max` events: each event's
    /// seq, and each loss notice as (count, first_seq, last_seq).
    fn read(s: &Subscriber, max: usize) -> Vec<Result<u64, (u64, u64, u64)>> {
        let mut items = Vec::new();
        s.take(max, usize::MAX, &mut items);
        items
            .into_iter()
            .flat_map(|i| match i {
                Item::Events(run) => decoded(vec![run]).into_iter().map(|(seq, _)| Ok(seq)).collect(),
                Item::Lost(l) => vec![Err((l.count, l.first_seq, l.last_seq))],
            })
            .collect()
    }

    #[test]
    fn resuming_after_an_event_never_read_is_refused() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let resume = |seq| {
            hub.subscribe(
                "r".into(),
                Default::default(),
                Selector::default(),
                Start::ResumeAfter { seq, instance: None },
            )
        };
        let Err(err) = resume(0) else {
            panic!("nothing read yet")
        };
        assert!(err.to_string().contains("(none yet)"), "{err}");
        hub.dispatch(Batch {
            events: vec![event(4, 1), event(5, 1)],
            ..Default::default()
        });
        assert!(resume(5).is_ok(), "after the newest: nothing to replay, then live");
        match resume(6) {
            Err(SubscribeError::ResumeAhead {
                asked: 6,
                newest: Some(5),
            }) => {}
            other => panic!("{:?}", other.map(|s| s.id)),
        }
        assert_eq!(hub.subscriber_count(), 1, "a refused subscriber is not counted");
    }

    #[test]
    fn resuming_from_another_instance_says_so_then_replays_all_history() {
        let before_restart = Hub::new(HubConfig::default(), Source::default());
        let hub = Hub::new(HubConfig::default(), Source::default());
        assert_ne!(before_restart.instance_id(), hub.instance_id());
        assert_ne!(hub.instance_id(), 0);
        hub.dispatch(Batch {
            events: vec![event(1, 7), event(2, 8), event(3, 7)],
            ..Default::default()
        });
        let resume = |seq, instance, selector| {
            hub.subscribe(
                "r".into(),
                Default::default(),
                selector,
                Start::ResumeAfter {
                    seq,
                    instance: Some(instance),
                },
            )
        };
        // Another instance's seq, even one this hub has not reached: a
        // restart notice, then every matching event in history.
        let s = resume(900, before_restart.instance_id(), only_cookie(7)).unwrap();
        let mut items = Vec::new();
        s.take(100, usize::MAX, &mut items);
        match items.first() {
            Some(Item::Lost(l)) => assert_eq!((l.source, l.count), (LossSource::Restart, 0)),
            other => panic!("expected the restart notice first, got {other:?}"),
        }
        let runs = items[1..]
            .iter()
            .map(|i| match i {
                Item::Events(run) => run.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(decoded(runs), vec![(1, 7), (3, 7)]);
        // Its own instance: resumes after the seq, with no notice, and a
        // seq it has not reached is refused as before.
        let s = resume(1, hub.instance_id(), Selector::default()).unwrap();
        assert_eq!(read(&s, 10), vec![Ok(2), Ok(3)]);
        assert!(matches!(
            resume(900, hub.instance_id(), Selector::default()),
            Err(SubscribeError::ResumeAhead { asked: 900, .. })
        ));
    }

    #[test]
    fn queued_runs_are_small_enough_for_messages_to_take_whole() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let all = hub
            .subscribe("a".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        let odd = cookie_subscriber(&hub, "b", 1);
        hub.dispatch(Batch {
            events: (0..FAN_OUT_CHUNK as u64).map(|seq| event(seq, seq % 2)).collect(),
            ..Default::default()
        });
        for (sub, want) in [(&all, FAN_OUT_CHUNK), (&odd, FAN_OUT_CHUNK / 2)] {
            let mut items = Vec::new();
            sub.take(usize::MAX, usize::MAX, &mut items);
            let runs: Vec<_> = items
                .into_iter()
                .map(|i| match i {
                    Item::Events(run) => run,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert!(runs.len() > 1, "{} runs", runs.len());
            assert!(runs.iter().all(|r| r.bytes().len() <= subscriber::RUN_BYTES));
            let seqs: Vec<u64> = decoded(runs).into_iter().map(|(seq, _)| seq).collect();
            assert_eq!(seqs.len(), want);
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, once each");
        }
    }

    #[test]
    fn subscribers_taking_the_same_event_share_one_conversion() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let everything = Selector::default();
        let only_7 = only_cookie(7);
        let a = hub
            .subscribe("a".into(), Default::default(), everything.clone(), Start::Live)
            .unwrap();
        let b = hub
            .subscribe("b".into(), Default::default(), everything, Start::Live)
            .unwrap();
        let c = hub
            .subscribe("c".into(), cookie_request(7), only_7, Start::Live)
            .unwrap();
        hub.dispatch(Batch {
            events: vec![event(1, 5), event(2, 6)],
            ..Default::default()
        });
        let take = |s: &Subscriber| {
            let mut v = Vec::new();
            s.take(10, usize::MAX, &mut v);
            v.into_iter()
                .map(|i| match i {
                    Item::Events(run) => run,
                    Item::Lost(l) => panic!("unexpected loss {l:?}"),
                })
                .collect::<Vec<_>>()
        };
        let (ea, eb, ec) = (take(&a), take(&b), take(&c));
        assert_eq!(ea.len(), 1, "consecutive events go in as one run");
        assert_eq!(ea[0].count(), 2);
        assert_eq!(ea[0].bytes().as_ptr(), eb[0].bytes().as_ptr(), "encoded once, shared");
        assert_eq!(decoded(ea), [(1, 5), (2, 6)]);
        assert!(ec.is_empty(), "a subscriber that matches nothing gets nothing");
    }

    #[test]
    fn a_full_queue_keeps_what_fits_as_one_run_and_counts_the_rest_and_take_splits_runs() {
        let config = HubConfig {
            queue_events: 3,
            ..HubConfig::default()
        };
        let hub = Hub::new(config, Source::default());
        let sub = hub
            .subscribe("a".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        hub.dispatch(Batch {
            events: (1..=5).map(|seq| event(seq, 9)).collect(),
            ..Default::default()
        });
        let mut items = Vec::new();
        assert!(!sub.take(2, usize::MAX, &mut items));
        let first = match &items[..] {
            [Item::Events(first)] => first.clone(),
            _ => panic!("expected one run, got {items:?}"),
        };
        assert_eq!(first.count(), 2, "a run is split at the requested event count");
        items.clear();
        sub.take(10, usize::MAX, &mut items);
        let [Item::Events(rest), Item::Lost(lost)] = &items[..] else {
            panic!("expected the rest of the run, then the loss, got {items:?}");
        };
        assert_eq!(rest.count(), 1);
        assert_eq!(
            (lost.source, lost.count, lost.first_seq, lost.last_seq),
            (LossSource::SubscriberQueue, 2, 4, 5)
        );
        let c = sub.counters();
        assert_eq!((c.matched, c.lost, c.queued), (5, 2, 0));
        assert_eq!(decoded(vec![first]), [(1, 9), (2, 9)]);
        assert_eq!(decoded(vec![rest.clone()]), [(3, 9)]);
    }

    #[test]
    fn queue_memory_is_half_equal_shares_half_a_reserve_and_never_more_in_all() {
        let one = convert::encoded_events(std::iter::once(event(1, 9)), &WallClock::now(), &mut BytesMut::new());
        let per_event = one.bytes().len();
        // Room for 12 events in all: while two subscribe, 3 each for sure
        // and a reserve of 6 that the first to need it borrows.
        let config = HubConfig {
            queue_bytes: 12 * per_event,
            ..HubConfig::default()
        };
        let hub = Hub::new(config, Source::default());
        let a = hub
            .subscribe("a".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        assert_eq!(
            a.counters().queue_byte_share,
            6 * per_event as u64,
            "alone, half of it is its own"
        );
        let b = hub
            .subscribe("b".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        let counts = |s: &Subscriber| {
            let c = s.counters();
            (
                c.queued,
                c.lost,
                c.queued_bytes / per_event as u64,
                c.queue_byte_share / per_event as u64,
            )
        };
        hub.dispatch(Batch {
            events: (1..=10).map(|seq| event(seq, 9)).collect(),
            ..Default::default()
        });
        assert_eq!(counts(&a), (9, 1, 9, 3), "its share and the whole reserve");
        assert_eq!(counts(&b), (3, 7, 3, 3), "its share: the reserve is gone");

        // b drains; a, still full, borrows on; b's share stays b's.
        b.take(100, usize::MAX, &mut Vec::new());
        hub.dispatch(Batch {
            events: (11..=20).map(|seq| event(seq, 9)).collect(),
            ..Default::default()
        });
        assert_eq!(counts(&a), (9, 11, 9, 3));
        assert_eq!(counts(&b), (3, 14, 3, 3));

        hub.unsubscribe(b.id);
        assert_eq!(a.counters().queue_byte_share, 6 * per_event as u64);
        let mut got = read(&a, 7);
        hub.dispatch(Batch {
            events: (21..=30).map(|seq| event(seq, 9)).collect(),
            ..Default::default()
        });
        assert_eq!(
            counts(&a),
            (12, 11, 12, 6),
            "half empty, it takes events again: its share, and the leaver's reserve; 12 in all, never more"
        );
        got.extend(read(&a, 100));
        let expected: Vec<_> = (1..=9)
            .map(Ok)
            .chain([Err((11, 10, 20))])
            .chain((21..=30).map(Ok))
            .collect();
        assert_eq!(got, expected, "in order, the gap announced in its place");
        assert_eq!(a.counters().queued_bytes, 0, "taking frees the bytes");
    }

    #[test]
    fn subscribers_with_the_same_filters_share_one_selector() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let sub = |peer, cookie| cookie_subscriber(&hub, peer, cookie);
        let (a, b, c) = (sub("a", 7), sub("b", 7), sub("c", 8));
        assert!(Arc::ptr_eq(&a.selector(), &b.selector()), "same filters, one selector");
        assert!(!Arc::ptr_eq(&a.selector(), &c.selector()));
        let either = |cookies: Vec<u64>| {
            let r = pb::WatchEventsRequest {
                allow: vec![pb::EventFilter {
                    cookies,
                    ..Default::default()
                }],
                ..Default::default()
            };
            let selector = Selector::compile(&r.allow, &r.deny, FilterLimits::default()).unwrap();
            hub.subscribe("d".into(), r, selector, Start::Live).unwrap()
        };
        let (d, e) = (either(vec![7, 8]), either(vec![8, 7]));
        assert!(
            Arc::ptr_eq(&d.selector(), &e.selector()),
            "the same set in another order"
        );
        hub.unsubscribe(d.id);
        hub.unsubscribe(e.id);
        hub.dispatch(Batch {
            events: (1..=6).map(|seq| event(seq, 7 + seq % 2)).collect(),
            ..Default::default()
        });
        assert_eq!(read(&a, 100), [Ok(2), Ok(4), Ok(6)]);
        assert_eq!(read(&b, 100), [Ok(2), Ok(4), Ok(6)]);
        assert_eq!(read(&c, 100), [Ok(1), Ok(3), Ok(5)]);
    }

    #[test]
    fn reselect_changes_one_subscribers_filters_from_the_next_batch() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let sub = |peer, cookie| cookie_subscriber(&hub, peer, cookie);
        let (a, b, c) = (sub("a", 7), sub("b", 7), sub("c", 8));
        let batch = |seqs: std::ops::RangeInclusive<u64>| Batch {
            events: seqs.map(|seq| event(seq, 7 + seq % 2)).collect(),
            ..Default::default()
        };
        hub.dispatch(batch(1..=4));
        assert!(!hub.reselect(a.id, only_cookie(7)), "the same filters: nothing changes");
        assert!(hub.reselect(a.id, only_cookie(8)));
        assert!(Arc::ptr_eq(&a.selector(), &c.selector()), "it shares the equal one");
        assert!(!Arc::ptr_eq(&a.selector(), &b.selector()), "b keeps its own");
        hub.dispatch(batch(5..=8));
        assert_eq!(read(&a, 100), [Ok(2), Ok(4), Ok(5), Ok(7)]);
        assert_eq!(read(&b, 100), [Ok(2), Ok(4), Ok(6), Ok(8)]);
        assert_eq!(read(&c, 100), [Ok(1), Ok(3), Ok(5), Ok(7)]);
        hub.unsubscribe(a.id);
        assert!(!hub.reselect(a.id, only_cookie(9)), "gone");
    }

    #[test]
    fn a_queue_that_lost_events_takes_none_until_half_empty_and_counts_them_in_one_notice() {
        let config = HubConfig {
            queue_events: 4,
            ..HubConfig::default()
        };
        let hub = Hub::new(config, Source::default());
        let sub = hub
            .subscribe("a".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        let mut next = 1;
        let mut send = |n: u64| {
            hub.dispatch(Batch {
                events: (next..next + n).map(|seq| event(seq, 9)).collect(),
                ..Default::default()
            });
            next += n;
        };
        let mut got = Vec::new();
        let mut take = |n| got.extend(read(&sub, n));
        send(6); // 1-4 queued, 5-6 lost
        take(1); // 3 queued: more than half
        send(2); // 7-8 lost
        take(1); // 2 queued: half
        send(3); // 9-10 queued, 11 lost
        take(100);
        assert_eq!(
            got,
            [
                Ok(1),
                Ok(2),
                Ok(3),
                Ok(4),
                Err((4, 5, 8)),
                Ok(9),
                Ok(10),
                Err((1, 11, 11))
            ],
            "one notice for the whole gap, in its place"
        );
        let c = sub.counters();
        assert_eq!((c.matched, c.lost, c.delivered + c.queued), (11, 5, 0));
    }

    #[test]
    fn take_stops_at_a_byte_budget_but_always_moves_one_event() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let sub = hub
            .subscribe("a".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        hub.dispatch(Batch {
            events: (1..=10).map(|seq| event(seq, 9)).collect(),
            ..Default::default()
        });
        let per_event = sub.counters().queued_bytes as usize / 10;
        let counts = |max_bytes| {
            let mut items = Vec::new();
            sub.take(100, max_bytes, &mut items);
            items
                .iter()
                .map(|i| match i {
                    Item::Events(run) => run.count(),
                    Item::Lost(l) => panic!("unexpected loss {l:?}"),
                })
                .sum::<usize>()
        };
        assert_eq!(counts(1), 1, "one event even if it alone is over the budget");
        assert_eq!(counts(per_event * 5 / 2), 2);
        assert_eq!(counts(usize::MAX), 7);
        assert_eq!(sub.counters().queued_bytes, 0);
    }

    #[test]
    fn a_sparse_subscriber_gets_a_copy_and_a_full_one_shares_the_buffer() {
        let hub = Hub::new(HubConfig::default(), Source::default());
        let only_3 = only_cookie(3);
        let full = hub
            .subscribe("a".into(), Default::default(), Selector::default(), Start::Live)
            .unwrap();
        let sparse = hub
            .subscribe("b".into(), cookie_request(3), only_3, Start::Live)
            .unwrap();
        hub.dispatch(Batch {
            events: (1..=8).map(|seq| event(seq, seq)).collect(),
            ..Default::default()
        });
        let run = |s: &Subscriber| {
            let mut items = Vec::new();
            s.take(100, usize::MAX, &mut items);
            match &items[..] {
                [Item::Events(run)] => run.clone(),
                other => panic!("expected one run, got {other:?}"),
            }
        };
        let (all, mine) = (run(&full), run(&sparse));
        assert_eq!((all.count(), mine.count()), (8, 1));
        let shared = all.bytes().as_ptr_range();
        assert!(
            !shared.contains(&mine.bytes().as_ptr()),
            "a subscriber taking 1 of 8 events must not hold the batch's buffer"
        );
        assert_eq!(decoded(vec![mine]), [(3, 3)]);
    }
}
