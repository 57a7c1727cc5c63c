//! One subscriber's bounded queue. The hub pushes into it without ever
//! waiting; when it is full, what does not fit is counted as a loss, kept in
//! order with the events, and announced in the subscriber's own stream;
//! then it takes nothing until it is half empty.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prost::bytes::{Bytes, BytesMut};
use socktap_proto::wire::EncodedEvents;
use std::time::SystemTime;

use socktap_proto::v1 as pb;
use tokio::sync::Notify;

use super::filter::Selector;
use crate::convert;
use crate::event::{Event, WallClock};

/// Where events were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossSource {
    /// The kernel ring buffer was full.
    KernelRingBuffer,
    /// This subscriber's queue was full.
    SubscriberQueue,
    /// History no longer held what a resume asked for.
    History,
    /// A resume named another instance: socktapd restarted since.
    Restart,
    /// The kernel skipped the probe's program on some calls (it was
    /// already running on that CPU): an upper bound of the events lost.
    KernelSkipped,
}

/// A run of lost events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    /// Where they were lost.
    pub source: LossSource,
    /// How many.
    pub count: u64,
    /// seq of the first and last lost event (0 when unknown).
    pub first_seq: u64,
    /// See `first_seq`.
    pub last_seq: u64,
    /// Monotonic ns of the first and last lost event.
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
}

/// A subscriber shares the hub's buffer of a batch only when it takes at
/// least 1/SHARE_AT_LEAST of its bytes; a sparser one (a narrow filter)
/// gets a copy of its events, so that its queue never holds a large buffer
/// alive for a few events.
const SHARE_AT_LEAST: usize = 4;

/// The most bytes of one queued run of shared entries (a run may exceed it
/// only to carry a single larger entry). A stream's message holds
/// [`crate::service::MAX_MESSAGE_BYTES`], at least two whole runs.
pub const RUN_BYTES: usize = 32 << 10;

/// What a subscriber's stream delivers, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// Consecutive events, already encoded in their API form; the bytes
    /// are shared by every subscriber that takes them.
    Events(EncodedEvents),
    /// A loss notice.
    Lost(Loss),
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Item>,
    events: usize,
    /// Encoded bytes of the queued events.
    bytes: usize,
    /// The queue overflowed and takes nothing until it is half empty.
    overflowed: bool,
    closed: bool,
}

/// One WatchEvents stream as the hub sees it.
#[derive(Debug)]
pub struct Subscriber {
    /// Unique while the daemon runs.
    pub id: u64,
    /// The client's address, when known.
    pub peer: String,
    /// The request it subscribed with (for status).
    pub request: pb::WatchEventsRequest,
    /// When it subscribed.
    pub subscribed_at: SystemTime,
    /// Shared with every subscriber whose request has the same filters, so
    /// that the hub matches each event once per distinct filter set. The
    /// hub replaces it when the filters' cgroup paths resolve anew.
    selector: Mutex<Arc<Selector>>,
    capacity: usize,
    /// This subscriber's guaranteed share of the hub's queue memory (see
    /// [`super::HubConfig::queue_bytes`]); the hub changes it as
    /// subscribers come and go.
    byte_share: AtomicUsize,
    queue: Mutex<Queue>,
    notify: Arc<Notify>,
    matched: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
}

/// A subscriber's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriberCounters {
    /// Events that matched its filters.
    pub matched: u64,
    /// Events handed to its transport.
    pub delivered: u64,
    /// Events lost because its queue was full.
    pub lost: u64,
    /// Events waiting in its queue.
    pub queued: u64,
    /// Their encoded bytes.
    pub queued_bytes: u64,
    /// Its guaranteed share of the hub's queue memory; it may hold more
    /// while the hub's shared reserve has room.
    pub queue_byte_share: u64,
}

impl Subscriber {
    pub(super) fn new(
        id: u64,
        peer: String,
        request: pb::WatchEventsRequest,
        selector: Arc<Selector>,
        capacity: usize,
        byte_share: usize,
    ) -> Self {
        Subscriber {
            id,
            peer,
            request,
            subscribed_at: SystemTime::now(),
            selector: Mutex::new(selector),
            capacity,
            byte_share: AtomicUsize::new(byte_share),
            queue: Mutex::new(Queue::default()),
            notify: Arc::new(Notify::new()),
            matched: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its filters, compiled.
    pub(super) fn selector(&self) -> Arc<Selector> {
        self.selector.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces its filters (the hub does, under its lock).
    pub(super) fn set_selector(&self, selector: Arc<Selector>) {
        *self.selector.lock().unwrap_or_else(|e| e.into_inner()) = selector;
    }

    /// Queues the events of a batch that this subscriber takes; never
    /// waits. `taken` lists their indexes in `events`, ascending;
    /// `entries[i]` is the byte range of `events[i]`'s framed entry in
    /// `encoded`, where the hub wrote every event that anyone takes, in
    /// order. Events whose entries touch go in as one run (one slice of
    /// `encoded`), unless the subscriber takes little of `encoded` (see
    /// [`SHARE_AT_LEAST`]). What does not fit in the queue is counted as
    /// lost: the queue holds at most its event capacity, and bytes up to
    /// its guaranteed share plus what it borrows from `reserve` (the bytes
    /// of the hub's shared reserve still free, reduced by what it takes).
    /// Once it has lost events, it takes none until it is half empty (half
    /// its capacity and half its share).
    pub(super) fn offer(
        &self,
        events: &[Event],
        taken: &[u32],
        entries: &[(u32, u32)],
        encoded: &Bytes,
        reserve: &mut usize,
    ) {
        if taken.is_empty() {
            return;
        }
        let span = |&k: &u32| {
            let (start, end) = entries[k as usize];
            start as usize..end as usize
        };
        let share = self.byte_share.load(Ordering::Relaxed);
        let mut q = self.lock();
        if q.overflowed && q.events <= self.capacity / 2 && q.bytes <= share / 2 {
            q.overflowed = false;
        }
        let own_room = share.saturating_sub(q.bytes);
        let room = if q.overflowed {
            0
        } else {
            taken.len().min(self.capacity.saturating_sub(q.events))
        };
        let (fits, mine) = if room == events.len() && encoded.len() <= own_room + *reserve {
            // It takes every event of the batch, and they all fit: their
            // entries are the whole buffer.
            (room, encoded.len())
        } else {
            let (mut fits, mut mine) = (0, 0);
            for k in &taken[..room] {
                let len = span(k).len();
                if mine + len > own_room + *reserve {
                    break;
                }
                mine += len;
                fits += 1;
            }
            (fits, mine)
        };
        *reserve -= mine.saturating_sub(own_room);
        if mine * SHARE_AT_LEAST < encoded.len() {
            // A few events of a large buffer: a run would keep all of it
            // alive while queued. Copy them into one buffer of their own.
            if fits > 0 {
                let mut own = BytesMut::with_capacity(mine);
                for k in &taken[..fits] {
                    own.extend_from_slice(&encoded[span(k)]);
                }
                q.items
                    .push_back(Item::Events(EncodedEvents::from_framed(own.freeze(), fits)));
            }
        } else {
            // Events whose entries touch go in as runs of the shared
            // buffer, each at most RUN_BYTES (the entries' offsets are at
            // hand here), so that a stream fills its messages with whole
            // runs instead of walking entries to split them.
            let mut i = 0;
            while i < fits {
                let (start, mut end) = entries[taken[i] as usize];
                let mut j = i + 1;
                while j < fits {
                    let (next_start, next_end) = entries[taken[j] as usize];
                    if next_start != end || (next_end - start) as usize > RUN_BYTES {
                        break;
                    }
                    end = next_end;
                    j += 1;
                }
                let run = EncodedEvents::from_framed(encoded.slice(start as usize..end as usize), j - i);
                q.items.push_back(Item::Events(run));
                i = j;
            }
        }
        q.events += fits;
        q.bytes += mine;
        if let (Some(&first), Some(&last)) = (taken.get(fits), taken.last()) {
            let (first, last) = (&events[first as usize], &events[last as usize]);
            push_loss(
                &mut q,
                Loss {
                    source: LossSource::SubscriberQueue,
                    count: (taken.len() - fits) as u64,
                    first_seq: first.seq,
                    last_seq: last.seq,
                    first_ns: first.timestamp_ns,
                    last_ns: last.timestamp_ns,
                },
            );
            // Take nothing more until the client has read half of what is
            // queued: the losses then come as a few long gaps rather than
            // a gap after every few events, and what it gets is fresh.
            q.overflowed = true;
        }
        drop(q);
        self.matched.fetch_add(taken.len() as u64, Ordering::Relaxed);
        self.lost.fetch_add((taken.len() - fits) as u64, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Queues events from history, regardless of capacity (they are few and
    /// were asked for explicitly).
    pub(super) fn preload(&self, loss: Option<Loss>, events: impl Iterator<Item = Event>, clock: &WallClock) {
        let mut q = self.lock();
        if let Some(l) = loss {
            q.items.push_back(Item::Lost(l));
        }
        let run = convert::encoded_events(events, clock, &mut BytesMut::new());
        let n = run.count();
        if n > 0 {
            q.events += n;
            q.bytes += run.bytes().len();
            q.items.push_back(Item::Events(run));
        }
        self.matched.fetch_add(n as u64, Ordering::Relaxed);
        drop(q);
        self.notify.notify_one();
    }

    /// Queues a loss notice.
    pub(super) fn announce(&self, loss: Loss) {
        push_loss(&mut self.lock(), loss);
        self.notify.notify_one();
    }

    /// Ends the stream once the queue is drained.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Moves up to `max_events` events of up to `max_bytes` encoded bytes
    /// (at least one event, however large) and any loss notices among
    /// them into `out`, splitting a run if needed. Returns true when the
    /// queue is drained and closed.
    pub fn take(&self, max_events: usize, max_bytes: usize, out: &mut Vec<Item>) -> bool {
        let mut q = self.lock();
        let (mut events, mut bytes) = (0, 0);
        while events < max_events {
            match q.items.front_mut() {
                Some(Item::Events(run)) if run.count() == 0 => {
                    q.items.pop_front();
                }
                Some(Item::Events(run)) => {
                    let mut part = run.split_fitting(max_events - events, max_bytes.saturating_sub(bytes));
                    if part.count() == 0 && events == 0 {
                        part = run.split_to(1);
                    }
                    if part.count() == 0 {
                        break;
                    }
                    if run.count() == 0 {
                        q.items.pop_front();
                    }
                    events += part.count();
                    bytes += part.bytes().len();
                    q.events -= part.count();
                    q.bytes -= part.bytes().len();
                    out.push(Item::Events(part));
                }
                Some(Item::Lost(_)) => {
                    if let Some(item) = q.items.pop_front() {
                        out.push(item);
                    }
                }
                None => break,
            }
        }
        q.closed && q.items.is_empty()
    }

    /// True when there is something to take, or the stream should end.
    pub fn is_ready(&self) -> bool {
        let q = self.lock();
        !q.items.is_empty() || q.closed
    }

    /// Events waiting now, and their encoded bytes.
    pub fn queued(&self) -> (usize, usize) {
        let q = self.lock();
        (q.events, q.bytes)
    }

    /// Sets this subscriber's guaranteed share of the hub's queue memory.
    /// Events already queued stay; new ones wait for room.
    pub(super) fn set_byte_share(&self, bytes: usize) {
        self.byte_share.store(bytes, Ordering::Relaxed);
    }

    /// Queued bytes beyond its guaranteed share: what it borrows from the
    /// hub's shared reserve.
    pub(super) fn borrowed_bytes(&self) -> usize {
        let share = self.byte_share.load(Ordering::Relaxed);
        self.lock().bytes.saturating_sub(share)
    }

    /// A future that completes when something was queued or the queue was
    /// closed since it was created or since the last wakeup (a wakeup may
    /// be spurious: check [`Self::is_ready`]).
    pub fn changed(&self) -> tokio::sync::futures::OwnedNotified {
        self.notify.clone().notified_owned()
    }

    /// Records events handed to the transport.
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    /// The subscriber's counters now.
    pub fn counters(&self) -> SubscriberCounters {
        let (queued, queued_bytes) = self.queued();
        SubscriberCounters {
            matched: self.matched.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queued: queued as u64,
            queued_bytes: queued_bytes as u64,
            queue_byte_share: self.byte_share.load(Ordering::Relaxed) as u64,
        }
    }
}

/// Appends a loss, merging it into a notice of the same source at the tail.
fn push_loss(q: &mut Queue, loss: Loss) {
    if let Some(Item::Lost(tail)) = q.items.back_mut() {
        if tail.source == loss.source {
            tail.count += loss.count;
            tail.last_seq = loss.last_seq;
            tail.last_ns = loss.last_ns;
            return;
        }
    }
    q.items.push_back(Item::Lost(loss));
}
