//! The BPF ring buffer, read from its mapped pages.
//!
//! Unlike libbpf's `ring_buffer`, a [`MappedRing`] is `Send`: the reader
//! hands it between a tokio task (low rates) and a thread of its own (high
//! rates). It stores the consumer position once per pass over the committed
//! records, and records are decoded where they lie.
//!
//! The layout is the kernel's (`kernel/bpf/ringbuf.c`): page 0 holds the
//! consumer position (the only page userspace writes), page 1 the producer
//! position, followed by the data area. The kernel offers the data area
//! twice in a row, so that a record wrapping past the end reads as one
//! slice; we map it once and copy the rare wrapping record instead. The
//! kernel maps every page of the mapping at mmap time, so the second copy
//! would add the whole ring again to socktapd's resident size (16 MiB
//! instead of 8 for the default ring), for one record per lap. Each record
//! starts with an 8-byte header: its length with a busy and a discard bit,
//! and a page offset the consumer does not need. Records are 8-byte
//! aligned, so a header never wraps.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Set while the record is reserved and not yet submitted.
const BUSY_BIT: u32 = 1 << 31;
/// Set when the record was discarded: skip it.
const DISCARD_BIT: u32 = 1 << 30;
/// Record header bytes (`struct bpf_ringbuf_hdr`).
const HEADER: usize = 8;

/// A record header's length word, decoded.
#[derive(Clone, Copy)]
struct Header {
    /// Reserved and not yet submitted.
    busy: bool,
    /// Submitted as discarded: to be skipped.
    discarded: bool,
    /// Body bytes.
    len: usize,
}

impl Header {
    fn from_word(word: u32) -> Header {
        Header {
            busy: word & BUSY_BIT != 0,
            discarded: word & DISCARD_BIT != 0,
            len: (word & !(BUSY_BIT | DISCARD_BIT)) as usize,
        }
    }

    /// The position of the record after this one, which is at `pos`.
    fn next(self, pos: u64) -> u64 {
        pos + (HEADER + self.len).next_multiple_of(8) as u64
    }
}

/// A mapped BPF ring buffer, a descriptor of its map and an epoll instance
/// that reports when it has data.
pub(crate) struct MappedRing {
    /// The consumer position's page (read-write).
    consumer: *mut libc::c_void,
    /// The producer position's page and the data area (read-only).
    producer: *mut libc::c_void,
    page: usize,
    /// Data area bytes: a power of two.
    size: usize,
    /// A record that wraps past the end of the data area, copied whole.
    wrapped: Vec<u8>,
    /// The map (a duplicate: the mapping outlives the skeleton's own fd).
    map: OwnedFd,
    epoll: OwnedFd,
}

// SAFETY: the mappings are process-wide memory with no tie to the thread
// that made them, and the descriptors are plain fds. Consuming takes
// `&mut self`, so one thread at a time moves the consumer position.
unsafe impl Send for MappedRing {}

/// What one call to [`MappedRing::consume`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Consumed {
    /// Records handed to the callback.
    pub records: usize,
    /// A record header claims a length past the ring: nothing after it
    /// can be found.
    pub malformed: bool,
}

impl MappedRing {
    /// Maps the ring buffer map `map`, whose data area is `size` bytes
    /// (its max_entries: a power of two, a multiple of the page size).
    pub fn new(map: BorrowedFd<'_>, size: usize) -> io::Result<MappedRing> {
        // SAFETY: FFI; sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("page size unknown"))?;
        if !size.is_power_of_two() || !size.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring buffer size {size} is not a power-of-two multiple of the page size"),
            ));
        }
        let map = map.try_clone_to_owned()?;
        let fd = map.as_raw_fd();
        let epoll = epoll_for(fd)?;
        // SAFETY: FFI; maps one page of the ring buffer map at offset 0
        // read-write, as the kernel allows for the consumer page. The result
        // is checked for MAP_FAILED before use.
        let consumer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if consumer == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: FFI; maps the producer page and (the first copy of) the
        // data area read-only, at the offset the kernel expects; a length
        // short of the second copy is allowed.
        let producer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page + size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                page as libc::off_t,
            )
        };
        if producer == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: FFI; unmaps the page mapped above, used by nothing else.
            unsafe { libc::munmap(consumer, page) };
            return Err(err);
        }
        let ring = MappedRing {
            consumer,
            producer,
            page,
            size,
            wrapped: Vec::new(),
            epoll,
            map,
        };
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer page is mapped read-write for the life of
        // `self`, page aligned, and starts with the kernel's `unsigned long
        // consumer_pos`, which both sides access atomically.
        unsafe { &*self.consumer.cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: as for the consumer position: the producer page starts
        // with the kernel's `unsigned long producer_pos`; only read here.
        unsafe { &*self.producer.cast::<AtomicU64>() }
    }

    /// The header of the record at ring position `pos`, read with acquire
    /// ordering (a clear busy bit makes the record's body visible).
    fn header_at(&self, pos: u64) -> Header {
        let off = self.page + (pos as usize & (self.size - 1));
        // SAFETY: `off` lies inside the data area, which is mapped for the
        // life of `self`; ring positions are 8-byte aligned, so the
        // header's length word is aligned and the header does not wrap;
        // the kernel writes it atomically (it clears the busy bit with
        // xchg).
        let word = unsafe { &*self.producer.byte_add(off).cast::<AtomicU32>() };
        Header::from_word(word.load(Ordering::Acquire))
    }

    /// `len` bytes of the data area from offset `start` (< size), which
    /// the caller checked do not wrap.
    fn data(&self, start: usize, len: usize) -> &[u8] {
        debug_assert!(start + len <= self.size);
        // SAFETY: `start + len <= size`, so the slice lies inside the data
        // area, mapped for the life of `self`. The caller reads only a
        // submitted record (its header's busy bit read clear with acquire
        // ordering), which the kernel does not write again until the
        // consumer position moves past it; only `consume` moves it, after
        // the slice's last use.
        unsafe { std::slice::from_raw_parts(self.producer.byte_add(self.page + start).cast::<u8>(), len) }
    }

    /// `len` bytes of record body after the header at `pos`: in place, or
    /// copied whole when it wraps past the end of the data area.
    fn body(&mut self, pos: u64, len: usize) -> &[u8] {
        let start = (pos as usize + HEADER) & (self.size - 1);
        if start + len <= self.size {
            return self.data(start, len);
        }
        let first = self.size - start;
        let mut wrapped = std::mem::take(&mut self.wrapped);
        wrapped.clear();
        wrapped.extend_from_slice(self.data(start, first));
        wrapped.extend_from_slice(self.data(0, len - first));
        self.wrapped = wrapped;
        &self.wrapped
    }

    /// Hands up to `max` submitted records to `f`, in ring order, then
    /// stores the consumer position once per pass (not per record).
    /// Discarded records are skipped. Stops at a record still being
    /// written, or when nothing more was committed.
    pub fn consume(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> Consumed {
        let mut done = Consumed::default();
        let mut pos = self.consumer_pos().load(Ordering::Acquire);
        loop {
            let prod = self.producer_pos().load(Ordering::Acquire);
            while pos < prod && done.records < max {
                let h = self.header_at(pos);
                if h.busy {
                    break;
                }
                if HEADER + h.len > self.size {
                    done.malformed = true;
                    return done;
                }
                if !h.discarded {
                    f(self.body(pos, h.len));
                    done.records += 1;
                }
                pos = h.next(pos);
            }
            self.consumer_pos().store(pos, Ordering::Release);
            if done.records >= max {
                return done; // the caller comes back without waiting
            }
            // The kernel wakes the reader only for a record submitted while
            // the consumer position equals the record's: one submitted
            // after we looked at it (busy, or not yet reserved) but before
            // our store was visible would never be announced, and the
            // reader would sleep on it. The submit is a full barrier
            // (xchg) before the kernel reads our position; this fence is
            // ours before we look again. So either the kernel sees our
            // position and wakes us, or we see its record now.
            fence(Ordering::SeqCst);
            if pos >= self.producer_pos().load(Ordering::Acquire) || self.header_at(pos).busy {
                return done;
            }
        }
    }

    /// The first 8 bytes of the next record not consumed yet (discarded
    /// ones skipped), written or still being written; None when nothing
    /// waits.
    ///
    /// For an event record those bytes are its `seq`. While the record is
    /// being written they may still hold the `seq` of the record that
    /// filled the same place a lap earlier (or 0 on the first lap): a
    /// lower number, since that record was read before this place could
    /// be reserved again, and the programs take a number after their
    /// reservation. Either way no event numbered below it can still come.
    pub fn peek_first_u64(&self) -> Option<u64> {
        let mut pos = self.consumer_pos().load(Ordering::Acquire);
        let prod = self.producer_pos().load(Ordering::Acquire);
        while pos < prod {
            let h = self.header_at(pos);
            if h.busy || !h.discarded {
                let off = self.page + ((pos as usize + HEADER) & (self.size - 1));
                // SAFETY: `off` lies inside the data area, mapped for the
                // life of `self`; positions are 8-byte aligned and so is the
                // header, so the record's first word is aligned and does not
                // wrap (the size is a multiple of 8). A program may be
                // writing it: it is read atomically, as the program's
                // aligned 8-byte store is atomic.
                let first = unsafe { &*self.producer.byte_add(off).cast::<AtomicU64>() };
                return Some(first.load(Ordering::Acquire));
            }
            if HEADER + h.len > self.size {
                return None;
            }
            pos = h.next(pos);
        }
        None
    }

    /// The ring buffer map: pollable, readable when it has data (for an
    /// async reactor).
    pub fn map_fd(&self) -> BorrowedFd<'_> {
        self.map.as_fd()
    }

    /// Waits until the ring has data or `timeout` passes, without
    /// consuming. The timeout has microsecond resolution (epoll_pwait2,
    /// Linux >= 5.11); where that is missing, whole milliseconds, at least
    /// one.
    pub fn wait_readable(&self, timeout: Duration) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos().into(),
        };
        let epoll = self.epoll.as_raw_fd();
        // SAFETY: FFI; `epoll` is owned by `self`, `event` is a live,
        // writable epoll_event for the one event asked for, `ts` a live
        // timespec, and a null signal mask leaves the mask alone. Its
        // result (ready, timed out, interrupted) needs no handling: the
        // caller drains the ring either way.
        let r = unsafe { libc::epoll_pwait2(epoll, &mut event, 1, &ts, std::ptr::null()) };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: as above, with a timeout in milliseconds.
            unsafe { libc::epoll_wait(epoll, &mut event, 1, ms) };
        }
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: FFI; unmaps the two mappings made in `new`, with their
        // lengths; no reference into them outlives `&self` borrows.
        unsafe {
            libc::munmap(self.consumer, self.page);
            libc::munmap(self.producer, self.page + self.size);
        }
    }
}

/// An epoll instance watching the ring buffer map `fd` for data.
fn epoll_for(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: FFI; epoll_create1 has no memory preconditions.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: FFI; both descriptors are open, `event` is a live epoll_event.
    if unsafe { libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(epoll)
}
