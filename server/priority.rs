//! The priority of the threads that carry events: the thread that reads
//! the ring buffer, and (with `--realtime-priority`) the runtime's workers,
//! which read it at low rates and write every stream.
//!
//! Under a load that keeps every CPU busy (W2: 16 threads on 2 CPUs), a
//! thread at the default nice value gets its fair share of the CPU and no
//! more, and waits its turn after each timer tick: the reader then fell
//! behind for tens of milliseconds at a time, and when the load started,
//! the kernel ring (65,536 records) overflowed. A lower nice value gives
//! the reading thread a larger share only while it has work: it drains on
//! a timer, so it cannot take more than the events cost (auditd raises its
//! own priority for the same reason).
//!
//! Real-time priority (`SCHED_FIFO`) is the operator's choice, never the
//! default: a woken real-time thread runs at once, preempting any ordinary
//! thread on its CPU, which takes tens of microseconds off each event's
//! way at low rates and costs more CPU (docs/performance.md);
//! a real-time thread that misbehaves takes a CPU from everything else.
//! Threads that a real-time thread creates start at the default policy
//! (`SCHED_RESET_ON_FORK`): the runtime's blocking threads (status, the
//! metrics scrape) stay ordinary.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, warn};

/// Said once per process: lowering the nice value needs CAP_SYS_NICE or an
/// RLIMIT_NICE that allows it.
static NICE_REFUSED: AtomicBool = AtomicBool::new(false);
/// Said once per process: `SCHED_FIFO` needs CAP_SYS_NICE or RLIMIT_RTPRIO.
static REALTIME_REFUSED: AtomicBool = AtomicBool::new(false);

/// The highest `SCHED_FIFO` priority Linux takes.
pub const MAX_REALTIME_PRIORITY: u8 = 99;

/// The calling thread at a higher priority, until dropped.
pub(crate) struct RaisedPriority {
    tid: libc::pid_t,
    previous: Previous,
}

/// What a thread had before it was raised.
enum Previous {
    Nice(i32),
    Policy {
        policy: libc::c_int,
        param: libc::sched_param,
    },
}

impl RaisedPriority {
    /// Raises the calling thread: to `SCHED_FIFO` at `realtime` if given,
    /// else to nice value `nice` if that is lower than its own. `None`
    /// when nothing changed: the thread is there already, or the kernel
    /// refused (said once, as a warning; a refused real-time priority
    /// falls back to `nice`).
    pub(crate) fn raise(nice: i32, realtime: Option<u8>) -> Option<RaisedPriority> {
        let tid = gettid();
        if let Some(priority) = realtime {
            let (policy, param) = thread_policy(tid)?;
            if policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_FIFO && param.sched_priority >= i32::from(priority) {
                return None;
            }
            match set_fifo(tid, priority, true) {
                Ok(()) => {
                    debug!(tid, priority, "reader thread at real-time priority");
                    return Some(RaisedPriority {
                        tid,
                        previous: Previous::Policy { policy, param },
                    });
                }
                Err(e) => {
                    if !REALTIME_REFUSED.swap(true, Ordering::Relaxed) {
                        warn!(
                            "the ring buffer reader is not at real-time priority {priority} ({e}); it needs CAP_SYS_NICE or RLIMIT_RTPRIO (systemd: LimitRTPRIO={priority}); it reads at nice {nice} instead, if it may"
                        );
                    }
                }
            }
        }
        let previous = thread_nice(tid)?;
        if nice >= previous {
            return None;
        }
        // SAFETY: plain system call on this thread's id; no memory passed.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
            let e = io::Error::last_os_error();
            if !NICE_REFUSED.swap(true, Ordering::Relaxed) {
                warn!(
                    "the ring buffer reader runs at nice {previous}: setting {nice} failed ({e}); it needs CAP_SYS_NICE or RLIMIT_NICE (systemd: LimitNICE={nice}); under a load that keeps every CPU busy the reader may then fall behind and the kernel drop events (counted)"
                );
            }
            return None;
        }
        debug!(tid, nice, previous, "reader thread priority raised");
        Some(RaisedPriority {
            tid,
            previous: Previous::Nice(previous),
        })
    }
}

impl Drop for RaisedPriority {
    fn drop(&mut self) {
        match &self.previous {
            // Raising a nice value back needs no privilege.
            // SAFETY: plain system call on the id of the thread that raised
            // it; no memory passed.
            Previous::Nice(n) => unsafe {
                libc::setpriority(libc::PRIO_PROCESS, self.tid as libc::id_t, *n);
            },
            // Leaving a real-time policy for the one it had needs none
            // either, but turning SCHED_RESET_ON_FORK off does: without
            // CAP_SYS_NICE (after `--user`, or under a unit that grants
            // LimitRTPRIO only) the thread goes back keeping the flag,
            // which only says what the threads it creates start with.
            Previous::Policy { policy, param } => {
                if set_policy(self.tid, *policy, param).is_err() {
                    let _ = set_policy(self.tid, *policy | libc::SCHED_RESET_ON_FORK, param);
                }
            }
        }
    }
}

/// Whether this process may run threads at `SCHED_FIFO` `priority`: tried
/// on the calling thread, which then gets its own policy back. For a daemon
/// to refuse the flag at its start rather than warn later.
pub fn check_realtime(priority: u8) -> io::Result<()> {
    let tid = gettid();
    let (policy, param) = thread_policy(tid).ok_or_else(io::Error::last_os_error)?;
    // Without SCHED_RESET_ON_FORK: a thread without CAP_SYS_NICE could
    // not turn it off again.
    set_fifo(tid, priority, false)?;
    set_policy(tid, policy, &param)
}

/// For tokio's `Builder::on_thread_park`, which only a runtime's workers
/// call: the first time each worker parks (as soon as it starts idle), it
/// moves to `SCHED_FIFO` at `priority`. Blocking threads never call it,
/// and those a worker creates start at the default policy. A refusal is
/// logged once; the worker goes on at its priority.
pub fn realtime_workers(priority: u8) -> impl Fn() + Send + Sync + 'static {
    thread_local! {
        static TRIED: Cell<bool> = const { Cell::new(false) };
    }
    move || {
        if TRIED.with(|t| t.replace(true)) {
            return;
        }
        match set_fifo(gettid(), priority, true) {
            Ok(()) => debug!(tid = gettid(), priority, "runtime worker at real-time priority"),
            Err(e) => {
                if !REALTIME_REFUSED.swap(true, Ordering::Relaxed) {
                    warn!("a runtime worker is not at real-time priority {priority} ({e})");
                }
            }
        }
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// How a thread is scheduled now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduling {
    /// Its `SCHED_FIFO` or `SCHED_RR` priority; None for the ordinary
    /// policies (`SCHED_OTHER`, `SCHED_BATCH`, `SCHED_IDLE`).
    pub realtime: Option<u8>,
    /// Its nice value (which real-time threads do not use).
    pub nice: i32,
}

/// How thread `tid` of this process is scheduled now; None if it is gone.
pub fn scheduling(tid: u32) -> Option<Scheduling> {
    let tid = tid as libc::pid_t;
    let (policy, param) = thread_policy(tid)?;
    let policy = policy & !libc::SCHED_RESET_ON_FORK;
    let realtime = (policy == libc::SCHED_FIFO || policy == libc::SCHED_RR)
        .then(|| u8::try_from(param.sched_priority).unwrap_or(MAX_REALTIME_PRIORITY));
    Some(Scheduling {
        realtime,
        nice: thread_nice(tid)?,
    })
}

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// The calling thread's kernel id, asked of the kernel once per thread.
pub(crate) fn current_tid() -> u32 {
    TID.with(|t| {
        if t.get() == 0 {
            t.set(gettid() as u32);
        }
        t.get()
    })
}

/// `SCHED_FIFO` at `priority` for thread `tid`, with `SCHED_RESET_ON_FORK`
/// if `reset_on_fork`.
fn set_fifo(tid: libc::pid_t, priority: u8, reset_on_fork: bool) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    let flag = if reset_on_fork { libc::SCHED_RESET_ON_FORK } else { 0 };
    set_policy(tid, libc::SCHED_FIFO | flag, &param)
}

fn set_policy(tid: libc::pid_t, policy: libc::c_int, param: &libc::sched_param) -> io::Result<()> {
    // SAFETY: a thread id of this process and a pointer to a live
    // sched_param the call only reads.
    if unsafe { libc::sched_setscheduler(tid, policy, param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A thread's scheduling policy (with its `SCHED_RESET_ON_FORK` flag) and
/// parameters.
fn thread_policy(tid: libc::pid_t) -> Option<(libc::c_int, libc::sched_param)> {
    // SAFETY: plain system call on a thread id; no memory passed.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return None;
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a pointer to a live sched_param the call fills.
    if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return None;
    }
    Some((policy, param))
}

/// A thread's nice value (`PRIO_PROCESS` takes a thread id on Linux).
fn thread_nice(tid: libc::pid_t) -> Option<i32> {
    // getpriority returns -1 both for nice -1 and for an error: errno tells.
    // SAFETY: errno is this thread's; writing it is what the manual asks.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain system call; no memory passed.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if nice == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return None;
    }
    Some(nice)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process may use `SCHED_FIFO`; outside CI a test skips
    /// with the reason when it may not, under CI=true (root) it fails.
    fn realtime_allowed(test: &str) -> bool {
        match check_realtime(1) {
            Ok(()) => true,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{test}: SCHED_FIFO refused ({e}), and CI=true: CI runs as root")
            }
            Err(e) => {
                eprintln!("skipping {test}: SCHED_FIFO refused ({e}); run as root");
                false
            }
        }
    }

    fn policy_of(tid: libc::pid_t) -> (libc::c_int, i32) {
        let (policy, param) = thread_policy(tid).expect("sched_getscheduler");
        (policy & !libc::SCHED_RESET_ON_FORK, param.sched_priority)
    }

    #[test]
    fn a_realtime_reader_is_fifo_its_children_are_not_and_it_gets_its_policy_back() {
        if !realtime_allowed("a_realtime_reader_is_fifo") {
            return;
        }
        std::thread::spawn(|| {
            let tid = gettid();
            assert_eq!(policy_of(tid), (libc::SCHED_OTHER, 0));
            assert_eq!(current_tid(), tid as u32);
            // The nice value the tests run at (0, or more under `nice`).
            let nice = thread_nice(tid).expect("its nice value");
            let raised = RaisedPriority::raise(-5, Some(3)).expect("raised");
            assert_eq!(policy_of(tid), (libc::SCHED_FIFO, 3), "the reader at SCHED_FIFO 3");
            assert_eq!(
                scheduling(tid as u32),
                Some(Scheduling {
                    realtime: Some(3),
                    nice
                }),
                "as status shows it"
            );
            assert_eq!(
                thread_nice(tid),
                Some(nice),
                "real-time instead of the nice value, not with it"
            );
            let child = std::thread::spawn(|| policy_of(gettid())).join().unwrap();
            assert_eq!(child, (libc::SCHED_OTHER, 0), "a thread it creates is ordinary");
            assert!(
                RaisedPriority::raise(-5, Some(3)).is_none(),
                "already there: nothing to undo later"
            );
            drop(raised);
            assert_eq!(policy_of(tid), (libc::SCHED_OTHER, 0), "its own policy back");
            assert_eq!(thread_nice(tid), Some(nice));
            let _nice = RaisedPriority::raise(-5, None).expect("raised");
            assert_eq!(
                scheduling(tid as u32),
                Some(Scheduling {
                    realtime: None,
                    nice: -5
                }),
                "ordinary, at nice -5"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_reader_without_privilege_still_gets_its_policy_back() {
        if !realtime_allowed("a_reader_without_privilege_still_gets_its_policy_back") {
            return;
        }
        std::thread::spawn(|| {
            let tid = gettid();
            let raised = RaisedPriority::raise(0, Some(3)).expect("raised");
            // As after `--user nobody`, for this thread only: the raw
            // system call changes the calling thread's ids (glibc's
            // wrapper would change every thread's), and leaving uid 0
            // clears its capabilities, CAP_SYS_NICE among them.
            // SAFETY: plain system call with integer arguments.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(r, 0, "setresuid: {}", io::Error::last_os_error());
            assert_eq!(policy_of(tid), (libc::SCHED_FIFO, 3));
            drop(raised);
            assert_eq!(
                policy_of(tid),
                (libc::SCHED_OTHER, 0),
                "back to its own policy without CAP_SYS_NICE"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn only_the_runtime_workers_become_realtime() {
        if !realtime_allowed("only_the_runtime_workers_become_realtime") {
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_park(realtime_workers(4))
            .build()
            .unwrap();
        // A worker moves at its first park, which it reaches as soon as it
        // has started and found nothing to do.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let main = policy_of(gettid());
        let (on_workers, on_blocking) = rt.block_on(async {
            let mut on_workers = Vec::new();
            for _ in 0..8 {
                on_workers.push(tokio::spawn(async { (gettid(), policy_of(gettid())) }).await.unwrap());
            }
            let on_blocking = tokio::spawn(async {
                tokio::task::spawn_blocking(|| (gettid(), policy_of(gettid())))
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
            (on_workers, on_blocking)
        });
        assert!(
            on_workers.iter().all(|(_, p)| *p == (libc::SCHED_FIFO, 4)),
            "every task ran at SCHED_FIFO 4: {on_workers:?}"
        );
        assert_eq!(on_blocking.1, (libc::SCHED_OTHER, 0), "a blocking thread is ordinary");
        assert!(on_workers.iter().all(|(tid, _)| *tid != on_blocking.0));
        assert_eq!(policy_of(gettid()), main, "the thread that built it is unchanged");
    }
}
