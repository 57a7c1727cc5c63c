//! The kernel probe: loads socktap's BPF programs in the best attach mode
//! the kernel accepts, and delivers decoded events to Rust code: on a
//! channel, to a sink called on the reader thread ([`Probe::deliver_to`]),
//! or to a sink on a tokio runtime that also does the reading while it
//! keeps up ([`Probe::deliver_on_runtime`]).
//!
//! The probe's thread owns the BPF objects and reads the ring buffer until
//! a runtime consumer takes the reading over; dropping the [`Probe`] stops
//! the reading and detaches and unloads every program and map.

mod barrier;
mod cgroup_trees;
mod cookies;
mod drops;
mod error;
mod kretprobes;
mod loader;
mod prefilter;
mod reader;
mod ring;
pub mod skel;

use std::collections::BTreeSet;
use std::fmt;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use libbpf_rs::skel::Skel;
use libbpf_rs::{MapCore, MapFlags, MapHandle, PrintLevel};
use tokio::sync::mpsc;

pub use cgroup_trees::CGROUP_ROOTS_CAPACITY;
pub use cookies::{dump_other_namespaces, dump_tcp_sockets, CookieSource, NamespaceDumps, StartDumps};
pub use error::{errno_name, ModeRefusal, ProbeError, Stage};
pub use kretprobes::ReturnProbeInfo;
pub use loader::{kernel_release, kernel_version};
pub use prefilter::{comm_key, Prefilter, PrefilterStatus, WantDim, WantKey, PREFILTER_CAPACITY};
pub use reader::MAX_BATCH_EVENTS;

use crate::event::{AttachMode, Event};
use barrier::ProgramBarrier;
use cgroup_trees::KernelCgroupTrees;
use prefilter::KernelPrefilter;
use skel::types;

/// Which attach mode to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModeRequest {
    /// Try fentry, then kprobe, then tracepoint; use the first that works.
    #[default]
    Auto,
    /// Use this mode or fail.
    Only(AttachMode),
}

impl FromStr for ModeRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ModeRequest::Auto),
            "fentry" => Ok(ModeRequest::Only(AttachMode::Fentry)),
            "kprobe" => Ok(ModeRequest::Only(AttachMode::Kprobe)),
            "tracepoint" => Ok(ModeRequest::Only(AttachMode::Tracepoint)),
            other => Err(format!(
                "unknown attach mode {other:?}: expected auto, fentry, kprobe or tracepoint"
            )),
        }
    }
}

impl fmt::Display for ModeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModeRequest::Auto => f.write_str("auto"),
            ModeRequest::Only(m) => m.fmt(f),
        }
    }
}

/// How to start the probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Attach mode; `auto` by default.
    pub mode: ModeRequest,
    /// Kernel ring buffer size in bytes: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// At low event rates: zero (the default) lets the kernel wake the
    /// reader whenever it has caught up, so every event is read at once; a
    /// positive interval wakes it at most once per interval instead, and
    /// events in between wait for the next wakeup or timed poll.
    pub wakeup_interval: Duration,
    /// At high event rates (above [`BATCH_ABOVE_RATE`] events/s) the reader
    /// drains the ring on its own timer, once per this interval, and the
    /// kernel stops waking it ([`WAKEUPS_OFF`]): fewer, larger batches,
    /// each event delayed at most about this long. A wakeup from the
    /// kernel costs an interrupt on the CPU that wrote the record, inside
    /// the traced call, and usually a wakeup across CPUs; a timer costs
    /// neither. Equal to `wakeup_interval`, the reader never switches.
    pub batch_interval: Duration,
    /// How long the reader waits for a wakeup before draining anyway, while
    /// a nonzero `wakeup_interval` (at low rates) leaves records
    /// unannounced. With interval 0 the kernel announces every record that
    /// finds the reader caught up, and the reader waits up to 200 ms (or
    /// this interval, if longer).
    pub poll_interval: Duration,
    /// Capacity, in batches, of the channel to the consumer. When it is
    /// full the reader waits and the kernel ring absorbs, then drops.
    pub channel_batches: usize,
    /// Whether events flow from the start (see [`ProbeControl::set_enabled`]).
    pub enabled: bool,
    /// A process whose calls are not reported: socktapd passes its own pid,
    /// so that serving events does not produce more events.
    pub ignore_pid: Option<u32>,
    /// Turn on the kernel's BPF run-time statistics (BPF_ENABLE_STATS) while
    /// the probe lives. Costs two clock reads per program run.
    pub bpf_stats: bool,
    /// The nice value of a thread while it reads the ring (-20..=19; the
    /// default -5). Under a load that keeps every CPU busy, a reader at the
    /// workload's priority gets no more than its fair share and falls
    /// behind until the kernel drops events; a lower value gives it the
    /// CPU when it has work, and it takes no more than the events cost.
    /// Needs CAP_SYS_NICE or RLIMIT_NICE; without them the reader warns
    /// once and reads at its own priority. A value at or above the
    /// thread's own changes nothing.
    pub reader_nice: i32,
    /// `SCHED_FIFO` priority (1..=99) of a thread while it reads the ring,
    /// in place of `reader_nice`; `None` (the default): not real-time.
    /// Needs CAP_SYS_NICE or RLIMIT_RTPRIO; without them the reader warns
    /// once and reads at `reader_nice`. See [`crate::priority`].
    pub realtime_priority: Option<u8>,
    /// kprobe mode: how many calls in flight each return probe tracks
    /// (0..=4096, the default 4096; the returns of calls beyond it are
    /// missed, and counted as skipped calls). Raising it past the kernel's
    /// default of max(10, 2 × CPUs) takes writing to tracefs, i.e. root;
    /// without, or with 0, the kernel's default is used.
    pub kretprobe_maxactive: u32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            mode: ModeRequest::Auto,
            ring_buffer_bytes: 8 << 20,
            wakeup_interval: Duration::ZERO,
            batch_interval: Duration::from_micros(500),
            poll_interval: Duration::from_millis(1),
            channel_batches: 256,
            enabled: true,
            ignore_pid: None,
            bpf_stats: false,
            reader_nice: -5,
            realtime_priority: None,
            kretprobe_maxactive: kretprobes::MAXACTIVE,
        }
    }
}

impl ProbeOptions {
    /// Checks the options without loading anything (`Probe::start` does it
    /// too), so that a daemon can refuse bad flags before it loads.
    pub fn validate(&self) -> Result<(), ProbeError> {
        let page = page_size();
        let rb = self.ring_buffer_bytes;
        if !rb.is_power_of_two() || rb < page {
            return Err(ProbeError::InvalidOption {
                option: "ring_buffer_bytes",
                reason: format!("{rb} is not a power of two of at least the page size ({page})"),
            });
        }
        if self.channel_batches == 0 {
            return Err(ProbeError::InvalidOption {
                option: "channel_batches",
                reason: "must be at least 1".into(),
            });
        }
        for (option, d) in [
            ("wakeup_interval", self.wakeup_interval),
            ("batch_interval", self.batch_interval),
        ] {
            if d.as_nanos() > u32::MAX as u128 {
                return Err(ProbeError::InvalidOption {
                    option,
                    reason: "must be below 4.29 s".into(),
                });
            }
        }
        if self.kretprobe_maxactive > kretprobes::MAXACTIVE {
            return Err(ProbeError::InvalidOption {
                option: "kretprobe_maxactive",
                reason: format!(
                    "{} is above the kernel's limit of {}",
                    self.kretprobe_maxactive,
                    kretprobes::MAXACTIVE
                ),
            });
        }
        if !(-20..=19).contains(&self.reader_nice) {
            return Err(ProbeError::InvalidOption {
                option: "reader_nice",
                reason: format!("{} is not a nice value (-20..=19)", self.reader_nice),
            });
        }
        if let Some(p) = self.realtime_priority {
            if !(1..=crate::priority::MAX_REALTIME_PRIORITY).contains(&p) {
                return Err(ProbeError::InvalidOption {
                    option: "realtime_priority",
                    reason: format!("{p} is not a SCHED_FIFO priority (1..=99)"),
                });
            }
        }
        if self.batch_interval < self.wakeup_interval {
            return Err(ProbeError::InvalidOption {
                option: "batch_interval",
                reason: "must be at least wakeup_interval".into(),
            });
        }
        Ok(())
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u32
    } else {
        4096
    }
}

/// A chunk of events read in one pass over the ring buffer, in sequence order.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// The decoded events.
    pub events: Vec<Event>,
    /// Events the kernel dropped (ring buffer full) since the previous batch.
    pub kernel_drops: u64,
    /// Calls on which the kernel skipped the programs since the previous
    /// batch ([`ProbeControl::skipped_calls`]).
    pub kernel_skipped: u64,
}

/// A function the reader thread hands each batch to, on its own thread (see
/// [`Probe::deliver_to`]).
pub type Sink = Box<dyn FnMut(Batch) + Send>;

/// Where the reader hands batches: the channel of [`Probe::take_receiver`]
/// until [`Probe::deliver_to`] or [`Probe::deliver_on_runtime`] installs a
/// sink.
pub(crate) enum Consumer {
    Channel(mpsc::Sender<Batch>),
    Sink(Sink),
    /// The reader moves to `handle` and takes the sink along (it is None
    /// once taken).
    Runtime {
        handle: tokio::runtime::Handle,
        sink: Option<Sink>,
    },
}

/// Above this many events per second (over [`RATE_WINDOW`]) the reader
/// drains the ring every [`ProbeOptions::batch_interval`] and turns the
/// kernel's wakeups off; below [`UNBATCH_BELOW_RATE`] it goes back to
/// [`ProbeOptions::wakeup_interval`].
pub const BATCH_ABOVE_RATE: u64 = 20_000;
/// See [`BATCH_ABOVE_RATE`].
pub const UNBATCH_BELOW_RATE: u64 = 10_000;
/// The kernel's wakeup interval while the reader drains on its timer
/// ([`ProbeOptions::batch_interval`]): the programs force a wakeup at most
/// once per 4.29 s, which in effect is never, except when the ring is more
/// than half full (at most once per 100 µs then).
pub const WAKEUPS_OFF: Duration = Duration::from_nanos(u32::MAX as u64);
/// The window over which the reader measures the event rate.
pub const RATE_WINDOW: Duration = Duration::from_millis(10);

/// Counters shared between the reader and everyone else.
#[derive(Default, Debug)]
pub(crate) struct Shared {
    stop: AtomicBool,
    enabled: AtomicBool,
    /// The kernel's wakeup interval now, ns.
    wakeup_interval_ns: AtomicU32,
    /// The prefilter's control word now (`socktap_control.prefilter`).
    prefilter_dims: AtomicU32,
    /// `socktap_control.cgroup_trees` now.
    cgroup_trees: AtomicU32,
    events_read: AtomicU64,
    kernel_drops: AtomicU64,
    /// [`ProbeControl::skipped_calls`] as the reader last read it.
    kernel_skipped: AtomicU64,
    /// [`ProbeControl::skipped_calls`] when the gate last opened: what the
    /// kernel skipped before (kprobe mode stays attached while the gate is
    /// closed) was no one's loss, and is not announced.
    skipped_floor: AtomicU64,
    decode_errors: AtomicU64,
    /// The ring is read on the consumer's runtime now (not on a thread).
    on_runtime: AtomicBool,
    /// The thread that read the ring last (its kernel id).
    reader_tid: AtomicU32,
}

/// A snapshot of the probe's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCounters {
    /// Events the kernel tried to emit (the next sequence number).
    pub produced: u64,
    /// Events read from the ring buffer and decoded.
    pub events_read: u64,
    /// Events the kernel dropped because the ring buffer was full.
    pub kernel_drops: u64,
    /// Calls on which the kernel skipped the programs, as the reader last
    /// read them ([`ProbeControl::skipped_calls`]).
    pub kernel_skipped: u64,
    /// Records that could not be decoded (never expected).
    pub decode_errors: u64,
}

/// Where and how the ring buffer is read ([`ProbeControl::reader_state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaderState {
    /// On the consumer's runtime (low and moderate rates); false while on
    /// a thread of its own (it fell behind at a high rate), or with no
    /// runtime consumer.
    pub on_runtime: bool,
    /// It drains the ring on its own timer and the kernel wakes nobody
    /// (above [`BATCH_ABOVE_RATE`] events/s); false while the kernel wakes it.
    pub drains_on_timer: bool,
    /// The kernel id of the thread that read the ring last; None before
    /// the first read.
    pub thread: Option<u32>,
    /// How that thread is scheduled now; None if it is gone. A thread of
    /// its own is raised for as long as the reading stays on it.
    pub scheduling: Option<crate::priority::Scheduling>,
}

/// Run statistics of one loaded BPF program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's name.
    pub name: String,
    /// The kernel's program id.
    pub id: u32,
    /// Total run time in ns (0 unless BPF stats are enabled).
    pub run_time_ns: u64,
    /// Number of runs (0 unless BPF stats are enabled).
    pub run_count: u64,
    /// Calls on which the kernel skipped the program: it was already
    /// running on that CPU (counted whether or not stats are enabled).
    pub recursion_misses: u64,
}

/// A cloneable handle to a running probe's controls and counters, for use
/// from other threads (the hub keeps one to gate the kernel side).
#[derive(Clone)]
pub struct ProbeControl {
    control: Arc<MapHandle>,
    counters: Arc<MapHandle>,
    shared: Arc<Shared>,
    ignore_tgid: u32,
    program_ids: Arc<[u32]>,
    /// The loaded programs, for their counters; emptied when the probe is
    /// dropped, so that they unload.
    program_fds: Arc<Mutex<Vec<OwnedFd>>>,
    /// kprobe mode's return probes, for the returns they missed; emptied
    /// when the probe is dropped, so that their links go.
    return_probes: Arc<Mutex<kretprobes::ReturnProbes>>,
    cookies: CookieSource,
    cookie_dumps: StartDumps,
    /// Also serializes writes of the control entry.
    attachments: Arc<Mutex<Attachments>>,
    prefilter: Arc<Mutex<KernelPrefilter>>,
    /// Whether a thread is taking the prefilter's stale keys out.
    reaping: Arc<AtomicBool>,
    barrier: Arc<ProgramBarrier>,
    cgroup_trees: Arc<Mutex<KernelCgroupTrees>>,
}

/// The links of a mode whose programs can be detached while nobody wants
/// events (fentry and tracepoint): then the programs do not run at all, and
/// the traced calls pay nothing. kprobe mode stays attached and relies on the
/// gate in the control map.
#[derive(Debug, Default)]
struct Attachments {
    /// The loaded programs (duplicated fds); empty when not detachable or
    /// once the probe is dropped.
    programs: Vec<OwnedFd>,
    /// Live links, one per program, while attached.
    links: Vec<OwnedFd>,
}

impl Attachments {
    fn attach(&mut self) -> Result<(), ProbeError> {
        if !self.links.is_empty() {
            return Ok(());
        }
        for p in &self.programs {
            // SAFETY: FFI; a NULL name attaches a tracing program (fexit,
            // tp_btf) to the target it was loaded for. Returns a new link fd
            // that we own, or a negative errno.
            let fd = unsafe { libbpf_rs::libbpf_sys::bpf_raw_tracepoint_open(std::ptr::null(), p.as_raw_fd()) };
            if fd < 0 {
                self.links.clear();
                return Err(ProbeError::Setup(format!(
                    "re-attaching a program: {}",
                    std::io::Error::from_raw_os_error(-fd)
                )));
            }
            // SAFETY: `fd` is a fresh descriptor returned by the kernel to us alone.
            self.links.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(())
    }
}

impl fmt::Debug for ProbeControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeControl")
            .field("program_ids", &self.program_ids)
            .finish_non_exhaustive()
    }
}

impl ProbeControl {
    /// Opens or closes the gate in the kernel: while closed, the programs
    /// return before writing anything to the ring buffer.
    pub fn set_enabled(&self, enabled: bool) -> Result<(), ProbeError> {
        let mut attachments = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        if enabled {
            attachments.attach()?;
            if !self.shared.enabled.load(Ordering::Relaxed) {
                self.shared
                    .skipped_floor
                    .fetch_max(self.skipped_calls(), Ordering::Release);
            }
        }
        self.write_control(enabled, self.shared.wakeup_interval_ns.load(Ordering::Relaxed))?;
        if !enabled {
            attachments.links.clear(); // closing a link detaches it
        }
        self.shared.enabled.store(enabled, Ordering::Relaxed);
        Ok(())
    }

    /// Sets the kernel's wakeup interval (the reader adapts it to the rate).
    pub(crate) fn set_wakeup_interval(&self, ns: u32) -> Result<(), ProbeError> {
        let _serial = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        self.write_control(self.shared.enabled.load(Ordering::Relaxed), ns)?;
        self.shared.wakeup_interval_ns.store(ns, Ordering::Relaxed);
        Ok(())
    }

    /// Sets the kernel prefilter: which calls the programs turn into
    /// events. On an error the kernel is left writing every call (or as it
    /// was, if even that could not be written).
    pub fn set_prefilter(&self, want: &Prefilter) -> Result<(), ProbeError> {
        let applied = self.prefilter.lock().unwrap_or_else(|e| e.into_inner()).apply(
            want,
            |dims| self.write_control_word(&self.shared.prefilter_dims, dims),
            || self.barrier.wait(),
        );
        self.take_out_stale_prefilter_keys();
        applied
    }

    /// Takes the keys the prefilter no longer wants out of its map once no
    /// program can still look them up: on a thread of its own, because the
    /// wait for the programs (an RCU grace period) takes milliseconds.
    /// Until then they only let more calls through.
    fn take_out_stale_prefilter_keys(&self) {
        let stale = |p: &Mutex<KernelPrefilter>| p.lock().unwrap_or_else(|e| e.into_inner()).stale_up_to();
        if stale(&self.prefilter).is_none() || self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let (prefilter, barrier, reaping) = (self.prefilter.clone(), self.barrier.clone(), self.reaping.clone());
        let spawned = std::thread::Builder::new()
            .name("socktap-prefilter".into())
            .spawn(move || loop {
                let Some(word) = stale(&prefilter) else {
                    reaping.store(false, Ordering::Release);
                    // Keys that went stale just now found this thread
                    // still running: take them too, unless another has.
                    if stale(&prefilter).is_some() && !reaping.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    return;
                };
                if let Err(e) = barrier.wait() {
                    tracing::warn!("{e}; stale prefilter keys leave the map after 1 s instead");
                    std::thread::sleep(Duration::from_secs(1));
                }
                prefilter.lock().unwrap_or_else(|e| e.into_inner()).remove_stale(word);
            });
        if let Err(e) = spawned {
            self.reaping.store(false, Ordering::Release);
            tracing::warn!("stale prefilter keys stay in the map for now (starting a thread: {e})");
        }
    }

    /// Gives the kernel the cgroups that filters name by path (`roots`:
    /// the named cgroups themselves), so that it finds, for each call, the
    /// nearest one at or above the caller's cgroup (`Event::cgroup_tree`).
    /// On an error the kernel finds none, and cgroup paths are matched as
    /// socktapd last resolved them.
    pub fn set_cgroup_roots(&self, roots: &BTreeSet<u64>) -> Result<(), ProbeError> {
        let mut trees = self.cgroup_trees.lock().unwrap_or_else(|e| e.into_inner());
        trees.apply(roots, |generation| {
            self.write_control_word(&self.shared.cgroup_trees, generation)
        })
    }

    /// Sets one word of the control entry (`word`, one of [`Shared`]'s) and
    /// writes the entry.
    fn write_control_word(&self, word: &AtomicU32, value: u32) -> Result<(), ProbeError> {
        let _serial = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        word.store(value, Ordering::Relaxed);
        self.write_control(
            self.shared.enabled.load(Ordering::Relaxed),
            self.shared.wakeup_interval_ns.load(Ordering::Relaxed),
        )
    }

    /// How many cgroups named by path the kernel matches below (0 while it
    /// matches none).
    pub fn cgroup_roots(&self) -> usize {
        self.cgroup_trees.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The kernel prefilter in force.
    pub fn prefilter(&self) -> PrefilterStatus {
        let prefilter = self.prefilter.lock().unwrap_or_else(|e| e.into_inner());
        PrefilterStatus {
            on: self.shared.prefilter_dims.load(Ordering::Relaxed) != 0,
            keys: prefilter.len(),
            stale_keys: prefilter.stale_len(),
            cgroup_roots: self.cgroup_roots(),
        }
    }

    /// Where and how the ring is read now.
    pub fn reader_state(&self) -> ReaderState {
        let thread = Some(self.shared.reader_tid.load(Ordering::Relaxed)).filter(|&tid| tid != 0);
        ReaderState {
            on_runtime: self.reads_on_runtime(),
            drains_on_timer: self.wakeup_interval() == WAKEUPS_OFF,
            thread,
            scheduling: thread.and_then(crate::priority::scheduling),
        }
    }

    /// The kernel's wakeup interval now: [`WAKEUPS_OFF`] while the reader
    /// drains on its timer (high rates).
    pub fn wakeup_interval(&self) -> Duration {
        Duration::from_nanos(self.shared.wakeup_interval_ns.load(Ordering::Relaxed).into())
    }

    /// Writes the control entry; callers hold the attachments lock.
    fn write_control(&self, enabled: bool, wakeup_interval_ns: u32) -> Result<(), ProbeError> {
        let value = types::socktap_control {
            enabled: enabled.into(),
            wakeup_interval_ns,
            ignore_tgid: self.ignore_tgid,
            prefilter: self.shared.prefilter_dims.load(Ordering::Relaxed),
            cgroup_trees: self.shared.cgroup_trees.load(Ordering::Relaxed),
        };
        // SAFETY: socktap_control is Plain (see skel.rs): no padding.
        let bytes = unsafe { plain::as_bytes(&value) };
        self.control
            .update(&0u32.to_ne_bytes(), bytes, MapFlags::ANY)
            .map_err(|e| ProbeError::Setup(format!("updating the control map: {e:#}")))
    }

    fn adopt_links(&self, skel: &mut skel::SocktapSkel<'_>) -> Result<(), ProbeError> {
        let links = std::mem::take(&mut skel.links);
        let mut a = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        for link in [
            links.st_fexit_send,
            links.st_fexit_recv,
            links.st_fexit_splice,
            links.st_tp_send,
            links.st_tp_recv,
        ]
        .into_iter()
        .flatten()
        {
            let fd = link
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| ProbeError::Setup(format!("duplicating a link fd: {e}")))?;
            a.links.push(fd);
        }
        Ok(())
    }

    /// Whether the programs are attached now (always, in kprobe mode).
    pub fn is_attached(&self) -> bool {
        let a = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        a.programs.is_empty() || !a.links.is_empty()
    }

    /// Whether the ring is read on the consumer's runtime now (see
    /// [`Probe::deliver_on_runtime`]); false while it is read on a thread.
    pub fn reads_on_runtime(&self) -> bool {
        self.shared.on_runtime.load(Ordering::Relaxed)
    }

    /// Whether the kernel side currently emits events.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    /// The probe's counters now.
    pub fn counters(&self) -> ProbeCounters {
        let mut c = types::socktap_counters::default();
        if let Ok(Some(bytes)) = self.counters.lookup(&0u32.to_ne_bytes(), MapFlags::ANY) {
            let _ = plain::copy_from_bytes(&mut c, &bytes);
        }
        ProbeCounters {
            produced: c.next_seq,
            events_read: self.shared.events_read.load(Ordering::Relaxed),
            kernel_drops: self.shared.kernel_drops.load(Ordering::Relaxed),
            kernel_skipped: self.shared.kernel_skipped.load(Ordering::Relaxed),
            decode_errors: self.shared.decode_errors.load(Ordering::Relaxed),
        }
    }

    /// The kernel's run statistics for the probe's programs.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        libbpf_rs::query::ProgInfoIter::default()
            .filter(|p| self.program_ids.contains(&p.id))
            .map(|p| ProgramStats {
                name: p.name.to_string_lossy().into_owned(),
                id: p.id,
                run_time_ns: p.run_time_ns,
                run_count: p.run_cnt,
                recursion_misses: p.recursion_misses,
            })
            .collect()
    }

    /// Where the cookies in events come from.
    pub fn cookies(&self) -> CookieSource {
        self.cookies
    }

    /// kprobe mode: which network namespaces' sockets open at the start did
    /// not get their cookies (socktapd's log says which and why). Nothing in
    /// the other modes.
    pub fn cookie_dumps(&self) -> StartDumps {
        self.cookie_dumps
    }

    /// kprobe mode's return probes: how many calls in flight each tracks,
    /// and whether what they miss is counted. None in the other modes.
    pub fn return_probes(&self) -> Option<ReturnProbeInfo> {
        self.return_probes.lock().unwrap_or_else(|e| e.into_inner()).info()
    }

    /// The kernel ids of the loaded programs.
    pub fn program_ids(&self) -> &[u32] {
        &self.program_ids
    }

    /// Calls on which the kernel skipped the probe's programs since they
    /// were loaded: the sum of their `recursion_misses`, and in kprobe
    /// mode the returns its return probes missed (more calls in flight at
    /// once than they track; kretprobes.rs). A tracing program
    /// does not run on a CPU where it is already running, and fentry and
    /// tp_btf programs can be preempted mid-run on kernels that preempt
    /// kernel code (Linux 7's default), so the next call on that CPU goes
    /// unrecorded (kprobe handlers run with preemption off). A `bpf()`
    /// call per program (in kprobe mode also a read of tracefs'
    /// `kprobe_profile`, or a `bpf()` call per return probe): the reader
    /// asks about every [`SKIPPED_CHECK`] while events flow, and at each
    /// quiet poll (200 ms) while the gate is open.
    pub fn skipped_calls(&self) -> u64 {
        let fds = self.program_fds.lock().unwrap_or_else(|e| e.into_inner());
        let skipped: u64 = fds.iter().filter_map(|fd| recursion_misses(fd.as_fd())).sum();
        let missed = self.return_probes.lock().unwrap_or_else(|e| e.into_inner()).missed();
        skipped + missed.unwrap_or(0)
    }
}

/// The running probe. Dropping it detaches and unloads everything.
pub struct Probe {
    mode: AttachMode,
    refused: Vec<ModeRefusal>,
    control: ProbeControl,
    receiver: Option<mpsc::Receiver<Batch>>,
    consumer: Arc<Mutex<Consumer>>,
    thread: Option<JoinHandle<()>>,
    _stats: Option<OwnedFd>,
}

struct Started {
    mode: AttachMode,
    refused: Vec<ModeRefusal>,
    control: ProbeControl,
}

impl Probe {
    /// Loads and attaches the programs and starts the reader thread.
    pub fn start(opts: ProbeOptions) -> Result<Probe, ProbeError> {
        route_libbpf_logs();
        opts.validate()?;
        loader::preflight()?;
        let stats = if opts.bpf_stats { enable_bpf_stats() } else { None };

        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(opts.channel_batches);
        let consumer = Arc::new(Mutex::new(Consumer::Channel(tx)));
        let thread_consumer = consumer.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<Started, ProbeError>>(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("socktap-reader".into())
            .spawn(move || {
                let mut storage = [const { MaybeUninit::uninit() }; 3];
                let loaded = match loader::load(&opts, &mut storage) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut loaded = loaded;
                let return_probes = std::mem::take(&mut loaded.return_probes);
                let cookies = (loaded.cookies(), loaded.cookie_dumps);
                let started = control_of(&loaded.skel, loaded.mode, return_probes, cookies, &thread_shared, &opts)
                    .and_then(|control| {
                        if loaded.mode != AttachMode::Kprobe {
                            // From here on the control owns the links: it keeps
                            // duplicates of the skeleton's link fds (a BPF link
                            // lives while any fd refers to it) and detaches and
                            // re-attaches with the gate.
                            control.adopt_links(&mut loaded.skel)?;
                        }
                        control.set_enabled(opts.enabled)?;
                        Ok(Started {
                            mode: loaded.mode,
                            refused: loaded.refused,
                            control,
                        })
                    });
                let control = started.as_ref().ok().map(|s| s.control.clone());
                let _ = ready_tx.send(started);
                if let Some(control) = control {
                    match reader::Reader::new(&loaded.skel, &control, &opts) {
                        Ok(r) => reader::run(r, &thread_consumer),
                        Err(e) => tracing::error!("{e}; no events will be read"),
                    }
                    // The reading may have moved to a runtime: keep the
                    // skeleton, and so the programs, until the stop.
                    while !control.shared.stop.load(Ordering::Acquire) {
                        std::thread::park(); // Drop unparks
                    }
                }
            })
            .map_err(|e| ProbeError::Setup(format!("spawning the reader thread: {e}")))?;

        let started = ready_rx
            .recv()
            .map_err(|_| ProbeError::Setup("the reader thread died while loading".into()))?;
        match started {
            Ok(s) => Ok(Probe {
                mode: s.mode,
                refused: s.refused,
                control: s.control,
                receiver: Some(rx),
                consumer,
                thread: Some(thread),
                _stats: stats,
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The attach mode in use.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The modes tried before the one in use, and why each was refused.
    pub fn refused_modes(&self) -> &[ModeRefusal] {
        &self.refused
    }

    /// Takes the channel the batches arrive on (once).
    pub fn take_receiver(&mut self) -> Option<mpsc::Receiver<Batch>> {
        self.receiver.take()
    }

    /// Hands every batch from now on to `sink`, called on the reader thread
    /// itself: no channel, task or wakeup between the ring buffer and the
    /// consumer (socktapd dispatches to its subscribers this way). The sink
    /// must not block: while it runs, nothing is read and the kernel ring
    /// fills. Batches already waiting in the channel go to the sink first,
    /// in order; the channel is closed.
    pub fn deliver_to(&mut self, sink: impl FnMut(Batch) + Send + 'static) {
        self.install(Box::new(sink), Consumer::Sink);
    }

    /// Hands every batch from now on to `sink`, and moves the reading to
    /// the tokio runtime `handle`: a task there reads the ring and calls
    /// `sink`, so a consumer that wakes tasks on the same runtime
    /// (socktapd's subscriber streams) costs one wakeup per batch instead of
    /// two. When that task falls behind at a high rate (above
    /// [`BATCH_ABOVE_RATE`] events/s, a pass finds a whole batch of
    /// [`MAX_BATCH_EVENTS`] records waiting) it hands the reading to a
    /// blocking thread of the runtime, and takes it back when the rate
    /// falls below [`UNBATCH_BELOW_RATE`]. `sink` must not block. Batches already waiting in the channel
    /// go to the sink first, in order; the channel is closed. Once the
    /// reading has moved, it stays with this sink: a later `deliver_to` or
    /// `deliver_on_runtime` has no effect (and logs a warning).
    pub fn deliver_on_runtime(&mut self, handle: tokio::runtime::Handle, sink: impl FnMut(Batch) + Send + 'static) {
        self.install(Box::new(sink), |sink| Consumer::Runtime {
            handle,
            sink: Some(sink),
        });
    }

    /// Installs the consumer `wrap(sink)`, after handing `sink` what waits
    /// in the channel; refused (logged) once the reading has moved to a
    /// runtime with its sink.
    fn install(&mut self, mut sink: Sink, wrap: impl FnOnce(Sink) -> Consumer) {
        let mut consumer = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*consumer, Consumer::Runtime { sink: None, .. }) {
            tracing::warn!("the probe's reading already moved to a runtime with its sink; the new sink is not used");
            return;
        }
        if let Some(mut rx) = self.receiver.take() {
            while let Ok(batch) = rx.try_recv() {
                sink(batch);
            }
        }
        *consumer = wrap(sink);
    }

    /// A cloneable handle to the probe's gate and counters.
    pub fn control(&self) -> &ProbeControl {
        &self.control
    }

    /// The probe's counters now.
    pub fn counters(&self) -> ProbeCounters {
        self.control.counters()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Clones of the control may outlive the probe: let go of the links
        // and program fds they hold, so everything unloads now.
        *self.control.attachments.lock().unwrap_or_else(|e| e.into_inner()) = Attachments::default();
        self.control
            .program_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        *self.control.return_probes.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
        self.control.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn control_of(
    skel: &skel::SocktapSkel<'_>,
    mode: AttachMode,
    return_probes: kretprobes::ReturnProbes,
    (cookies, cookie_dumps): (CookieSource, StartDumps),
    shared: &Arc<Shared>,
    opts: &ProbeOptions,
) -> Result<ProbeControl, ProbeError> {
    let handle = |m: &libbpf_rs::MapMut<'_>, what: &str| {
        MapHandle::try_from(m).map_err(|e| ProbeError::Setup(format!("duplicating the {what} map: {e:#}")))
    };
    // Copies of the loaded programs' fds: one set for their counters, one
    // for re-attaching (each let go of on its own when the probe drops).
    let loaded = || {
        skel.object()
            .progs()
            .filter(|p| p.autoload())
            .map(|p| p.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ProbeError::Setup(format!("duplicating a program fd: {e}")))
    };
    let program_fds = loaded()?;
    let program_ids = program_fds
        .iter()
        .filter_map(|fd| libbpf_rs::Program::id_from_fd(fd.as_fd()).ok())
        .collect::<Vec<_>>();
    let programs = if mode == AttachMode::Kprobe {
        Vec::new()
    } else {
        loaded()?
    };
    Ok(ProbeControl {
        control: Arc::new(handle(&skel.maps.control, "control")?),
        counters: Arc::new(handle(&skel.maps.counters, "counters")?),
        shared: {
            shared
                .wakeup_interval_ns
                .store(opts.wakeup_interval.as_nanos() as u32, Ordering::Relaxed);
            shared.clone()
        },
        ignore_tgid: opts.ignore_pid.unwrap_or(0),
        program_ids: program_ids.into(),
        program_fds: Arc::new(Mutex::new(program_fds)),
        return_probes: Arc::new(Mutex::new(return_probes)),
        cookies,
        cookie_dumps,
        attachments: Arc::new(Mutex::new(Attachments {
            programs,
            links: Vec::new(),
        })),
        prefilter: Arc::new(Mutex::new(KernelPrefilter::new(handle(&skel.maps.wanted, "wanted")?)?)),
        reaping: Arc::new(AtomicBool::new(false)),
        barrier: Arc::new(ProgramBarrier::new(
            handle(&skel.maps.program_barrier, "program_barrier")?,
            handle(&skel.maps.program_barrier_inner, "program_barrier_inner")?,
        )),
        cgroup_trees: Arc::new(Mutex::new(KernelCgroupTrees::new(handle(
            &skel.maps.cgroup_roots,
            "cgroup_roots",
        )?)?)),
    })
}

/// How often the reader reads [`ProbeControl::skipped_calls`] while events
/// flow.
pub const SKIPPED_CHECK: Duration = Duration::from_millis(100);

/// A program's `recursion_misses`, or None if the kernel does not say.
fn recursion_misses(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut info = libbpf_rs::libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: FFI; `info` is a zeroed bpf_prog_info of `len` bytes, which
    // the kernel fills up to `len`. Its pointer fields are null with zero
    // counts, so the kernel writes nowhere else.
    let rc = unsafe { libbpf_rs::libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    (rc == 0).then_some(info.recursion_misses)
}

fn enable_bpf_stats() -> Option<OwnedFd> {
    // SAFETY: plain FFI call; it returns a new fd we own, or a negative error.
    let fd = unsafe { libbpf_rs::libbpf_sys::bpf_enable_stats(libbpf_rs::libbpf_sys::BPF_STATS_RUN_TIME) };
    if fd < 0 {
        tracing::warn!(
            "BPF_ENABLE_STATS failed ({}); program run times stay 0",
            std::io::Error::from_raw_os_error(-fd)
        );
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor returned by the kernel to us alone.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends libbpf's own messages to `tracing` (target `libbpf`).
fn route_libbpf_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Debug, |level, msg| {
            let msg = msg.trim_end();
            match level {
                PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
                PrintLevel::Info => tracing::info!(target: "libbpf", "{msg}"),
                PrintLevel::Debug => tracing::debug!(target: "libbpf", "{msg}"),
            }
        })));
    });
}
