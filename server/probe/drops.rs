//! The kernel's count of ring-buffer records it could not write (the ring
//! was full), read from the `drops` map's mapped pages.
//!
//! The map is an array with a cache line of slots per possible CPU (see
//! `SOCKTAP_DROPS_STRIDE` in `bpf/event.h`); CPU n adds to slot
//! n × stride. The reader sums it after every pass. Read with a `bpf()`
//! lookup, it cost a system call per pass, on the way from the ring to
//! the subscribers; from memory it is a few loads (at 8000 events/s:
//! ~15 µs off the median latency, ~15 % less CPU; docs/performance.md).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::skel::types;

/// `u64` slots per CPU in the `drops` map.
pub(crate) const STRIDE: u32 = types::socktap_drops_layout::SOCKTAP_DROPS_STRIDE.0;

/// The `drops` map's `max_entries` for `cpus` possible CPUs.
pub(crate) fn entries_for(cpus: usize) -> u32 {
    u32::try_from(cpus.max(1))
        .unwrap_or(u32::MAX / STRIDE)
        .saturating_mul(STRIDE)
}

/// The `drops` map, mapped read-only.
pub(crate) struct MappedDrops {
    base: *mut libc::c_void,
    len: usize,
    cpus: usize,
}

// SAFETY: the mapping is process-wide memory with no tie to the thread that
// made it; it is only read, with atomic loads.
unsafe impl Send for MappedDrops {}

impl MappedDrops {
    /// Maps the `drops` map `map`, created with `entries` (from
    /// [`entries_for`]) `u64` values and `BPF_F_MMAPABLE`.
    pub fn new(map: BorrowedFd<'_>, entries: u32) -> io::Result<MappedDrops> {
        if entries == 0 || !entries.is_multiple_of(STRIDE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("drops map of {entries} entries is not whole strides of {STRIDE}"),
            ));
        }
        let len = entries as usize * std::mem::size_of::<u64>();
        // SAFETY: FFI; maps the array's values read-only from offset 0, as
        // the kernel allows for a BPF_F_MMAPABLE array (a length short of
        // the last page is rounded up by the kernel). The result is checked
        // for MAP_FAILED before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedDrops {
            base,
            len,
            cpus: (entries / STRIDE) as usize,
        })
    }

    /// Records dropped so far, over all CPUs.
    pub fn total(&self) -> u64 {
        (0..self.cpus)
            .map(|cpu| {
                // SAFETY: slot cpu × STRIDE < entries, so the 8-byte value
                // lies inside the mapping, which lives as long as `self`;
                // array values are 8-byte aligned, and the programs only
                // add to them atomically.
                let slot = unsafe { &*self.base.cast::<AtomicU64>().add(cpu * STRIDE as usize) };
                slot.load(Ordering::Relaxed)
            })
            .fold(0u64, u64::wrapping_add)
    }
}

impl Drop for MappedDrops {
    fn drop(&mut self) {
        // SAFETY: FFI; unmaps exactly the mapping made in `new`, which
        // nothing uses after this.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn each_cpu_gets_a_stride_of_slots() {
        assert_eq!(STRIDE, 8, "a 64-byte cache line of u64s");
        assert_eq!(entries_for(2), 16);
        assert_eq!(entries_for(0), STRIDE, "at least one CPU");
    }

    #[test]
    fn a_map_that_is_not_whole_strides_is_refused_before_mapping() {
        let stdin = std::io::stdin();
        for entries in [0, STRIDE - 1, STRIDE + 1] {
            let err = MappedDrops::new(stdin.as_fd(), entries).err().expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{entries}: {err}");
        }
    }
}
