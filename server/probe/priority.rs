//! The reading thread's priority. Under a load that keeps every CPU busy
//! (W2: 16 threads on 2 CPUs), a thread at the default nice value gets its
//! fair share of the CPU and no more, and waits its turn after each timer
//! tick: the reader then fell behind for tens of milliseconds at a time,
//! and when the load started, the kernel ring (65,536 records) overflowed.
//! A lower nice value gives the reading thread a larger share only while
//! it has work: it drains on a timer, so it cannot take more than the
//! events cost (auditd raises its own priority for the same reason).

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, warn};

/// Said once per process: lowering the nice value needs CAP_SYS_NICE or an
/// RLIMIT_NICE that allows it.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// The calling thread at a lower nice value, until dropped.
pub(crate) struct RaisedPriority {
    tid: libc::id_t,
    previous: i32,
}

impl RaisedPriority {
    /// Sets the calling thread's nice value to `nice` if that is lower than
    /// its own; `None` when it is not, or when the kernel refuses (said
    /// once, as a warning: the reading goes on at the thread's priority).
    pub(crate) fn raise(nice: i32) -> Option<RaisedPriority> {
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let previous = thread_nice(tid)?;
        if nice >= previous {
            return None;
        }
        // SAFETY: plain system call on this thread's id; no memory passed.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            if !REFUSED.swap(true, Ordering::Relaxed) {
                warn!(
                    "the ring buffer reader runs at nice {previous}: setting {nice} failed ({e}); it needs CAP_SYS_NICE or RLIMIT_NICE (systemd: LimitNICE={nice}); under a load that keeps every CPU busy the reader may then fall behind and the kernel drop events (counted)"
                );
            }
            return None;
        }
        debug!(tid, nice, previous, "reader thread priority raised");
        Some(RaisedPriority { tid, previous })
    }
}

impl Drop for RaisedPriority {
    fn drop(&mut self) {
        // Raising a nice value back needs no privilege.
        // SAFETY: plain system call on the id of the thread that raised it;
        // no memory passed.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, self.previous) };
    }
}

/// A thread's nice value (`PRIO_PROCESS` takes a thread id on Linux).
fn thread_nice(tid: libc::id_t) -> Option<i32> {
    // getpriority returns -1 both for nice -1 and for an error: errno tells.
    // SAFETY: errno is this thread's; writing it is what the manual asks.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain system call; no memory passed.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if nice == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
        return None;
    }
    Some(nice)
}
