//! The hub's history: the last `capacity` events, for replay and resume,
//! in chunks of [`CHUNK`] events. A batch the reader filled most of is
//! kept as the vector it came in (moved, not copied: at high rates copying
//! every event into history was socktapd's largest copy); other batches
//! are copied into the chunks. Every chunk has the same capacity as the
//! reader's batches, so the allocator reuses each freed chunk for the
//! next batch (chunks of many sizes cost 3–5 MiB more peak memory).

use std::collections::VecDeque;

use crate::event::Event;

/// The capacity of every chunk: the reader's batch size.
pub const CHUNK: usize = crate::probe::MAX_BATCH_EVENTS;

/// The last `capacity` events, oldest first.
#[derive(Debug)]
pub struct History {
    chunks: VecDeque<Vec<Event>>,
    /// Events at the start of the first chunk that are no longer held.
    skip: usize,
    len: usize,
    capacity: usize,
}

impl History {
    /// An empty history that holds at most `capacity` events (0: none).
    pub fn new(capacity: usize) -> Self {
        History {
            chunks: VecDeque::new(),
            skip: 0,
            len: 0,
            capacity,
        }
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest event held.
    pub fn front(&self) -> Option<&Event> {
        self.iter().next()
    }

    /// The events held, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Event> {
        let skip = self.skip;
        self.chunks
            .iter()
            .enumerate()
            .flat_map(move |(i, c)| if i == 0 { &c[skip..] } else { &c[..] })
    }

    /// Appends a batch (in sequence order), dropping the oldest events
    /// beyond the capacity.
    pub fn push(&mut self, mut events: Vec<Event>) {
        if self.capacity == 0 || events.is_empty() {
            return;
        }
        if events.len() >= self.capacity {
            events.drain(..events.len() - self.capacity);
            self.chunks.clear();
            self.skip = 0;
            self.len = 0;
        }
        let n = events.len();
        if events.capacity() == CHUNK && n * 4 >= CHUNK * 3 {
            // Mostly full, and a chunk's size: keep the batch's own vector.
            self.chunks.push_back(events);
        } else {
            let mut rest = &events[..];
            while !rest.is_empty() {
                match self.chunks.back_mut() {
                    Some(last) if last.len() < last.capacity() => {
                        let k = rest.len().min(last.capacity() - last.len());
                        last.extend_from_slice(&rest[..k]);
                        rest = &rest[k..];
                    }
                    _ => self.chunks.push_back(Vec::with_capacity(CHUNK)),
                }
            }
        }
        self.len += n;
        while self.len > self.capacity {
            let excess = self.len - self.capacity;
            let first = self.chunks[0].len() - self.skip;
            if excess >= first {
                self.chunks.pop_front();
                self.skip = 0;
                self.len -= first;
            } else {
                self.skip += excess;
                self.len -= excess;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(seqs: std::ops::Range<u64>, capacity: usize) -> Vec<Event> {
        let mut v = Vec::with_capacity(capacity.max((seqs.end - seqs.start) as usize));
        v.extend(seqs.map(|s| Event::sample(s, 1)));
        v
    }

    #[test]
    fn a_full_batch_is_moved_and_others_copied_into_chunks_of_one_size() {
        let mut h = History::new(20_000);
        let big = batch(0..4000, CHUNK);
        let at = big.as_ptr();
        h.push(big);
        assert_eq!(h.chunks.back().unwrap().as_ptr(), at, "the batch's own vector");
        // A few events in a reader-sized vector: copied, into the room
        // the last chunk has left, then into a new chunk.
        h.push(batch(4000..4004, CHUNK));
        h.push(batch(4004..4200, CHUNK + 10));
        assert_eq!(h.chunks.len(), 2);
        assert!(h.chunks.iter().all(|c| c.capacity() == CHUNK));
        assert_eq!(h.len(), 4200);
        assert!(h.iter().map(|e| e.seq).eq(0..4200));
    }

    proptest! {
        /// Any sequence of batches: it holds exactly the newest `capacity`
        /// events, in order, forwards and backwards, in chunks of one size,
        /// and not many more chunks than the events need.
        #[test]
        fn holds_exactly_the_newest_events(
            capacity in prop_oneof![0..300usize, 0..20_000usize],
            batches in prop::collection::vec((prop_oneof![0..200usize, 3000..=CHUNK], 0..3usize), 0..20),
        ) {
            let mut h = History::new(capacity);
            let mut next = 0u64;
            for (n, room) in batches {
                // The vector exactly as long as the batch, twice as long, or
                // a reader's (which history may keep as it is).
                let room = [n, 2 * n, CHUNK.max(n)][room];
                h.push(batch(next..next + n as u64, room));
                next += n as u64;
            }
            let held = (next as usize).min(capacity);
            prop_assert_eq!(h.len(), held);
            prop_assert!(h.iter().map(|e| e.seq).eq(next - held as u64..next));
            prop_assert!(h.iter().rev().map(|e| e.seq).eq((next - held as u64..next).rev()));
            prop_assert_eq!(h.front().map(|e| e.seq), (held > 0).then(|| next - held as u64));
            let allocated: usize = h.chunks.iter().map(Vec::capacity).sum();
            prop_assert!(h.chunks.iter().all(|c| c.capacity() == CHUNK));
            // Kept batches are at least 3/4 full; the first chunk may be
            // mostly dropped, the last mostly empty.
            prop_assert!(allocated <= (capacity * 4 / (3 * CHUNK) + 3) * CHUNK, "{} for {}", allocated, capacity);
        }
    }
}
