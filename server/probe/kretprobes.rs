//! kprobe mode's return probes, on `tcp_sendmsg`, `tcp_recvmsg` and
//! `tcp_splice_read`.
//!
//! A kretprobe tracks a bounded number of calls in flight, its `maxactive`,
//! and misses the return of any call beyond it. The kernel's default is
//! max(10, 2 × CPUs): a thread-per-connection server with more receives
//! blocked than that would lose events without a word. The kernel's
//! perf-event interface (what libbpf uses) cannot raise it; tracefs'
//! `kprobe_events` can (`rN:`, at most [`MAXACTIVE`], socktapd's default).
//! So socktapd creates its return probes there when it may write to
//! tracefs (root), attaches
//! the programs to them through a perf event, and reads their missed
//! returns from `kprobe_profile`. Otherwise (e.g. the systemd unit's
//! dynamic user) it attaches at the default and reads the missed returns
//! from the link, where the kernel tells them (Linux >= 6.7).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use libbpf_rs::libbpf_sys;
use libbpf_rs::Link;
use tracing::{debug, warn};

/// The most calls in flight a kretprobe may track (the kernel's
/// `KRETPROBE_MAXACTIVE_MAX`). Each costs the kernel ~100 bytes, allocated
/// when the probe is created.
pub const MAXACTIVE: u32 = 4096;

/// tracefs' group for socktap's probes; each event's name carries the pid
/// that made it (`st<pid>_<n>_<function>`), since `kprobe_profile` lists
/// events by name alone.
const GROUP: &str = "socktap";

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// How kprobe mode's return probes were made, and so how their missed
/// returns are counted.
#[derive(Debug, Default)]
pub enum ReturnProbes {
    /// Not kprobe mode, or the probe is gone.
    #[default]
    None,
    /// tracefs events tracking `maxactive` calls in flight each; missed
    /// returns from `kprobe_profile`, by event name.
    Tracefs {
        tracefs: PathBuf,
        events: Vec<String>,
        maxactive: u32,
    },
    /// The kernel's default `maxactive`; missed returns from the links
    /// (duplicated fds), when the kernel tells them.
    Default { links: Vec<OwnedFd> },
}

impl ReturnProbes {
    /// The returns the probes missed since they were made: of calls in
    /// flight beyond `maxactive`, and ones hit while a kprobe handler ran
    /// on the same CPU. None when the kernel does not say.
    pub fn missed(&self) -> Option<u64> {
        match self {
            ReturnProbes::None => Some(0),
            ReturnProbes::Tracefs { tracefs, events, .. } => {
                let profile = std::fs::read_to_string(tracefs.join("kprobe_profile")).ok()?;
                Some(missed_in_profile(&profile, events))
            }
            ReturnProbes::Default { links } => links.iter().map(|l| link_missed(l.as_fd())).sum(),
        }
    }

    /// What they are, for a status; None when not kprobe mode.
    pub fn info(&self) -> Option<ReturnProbeInfo> {
        let (max_active, tracefs) = match self {
            ReturnProbes::None => return None,
            ReturnProbes::Tracefs { maxactive, .. } => (*maxactive, true),
            ReturnProbes::Default { .. } => (default_maxactive(), false),
        };
        Some(ReturnProbeInfo {
            max_active,
            tracefs,
            misses_counted: self.missed().is_some(),
        })
    }

    /// What they are, for the log.
    pub fn describe(&self) -> String {
        match self {
            ReturnProbes::None => String::new(),
            ReturnProbes::Tracefs { maxactive, .. } => {
                format!("return probes through tracefs, tracking {maxactive} calls in flight each")
            }
            ReturnProbes::Default { .. } => format!(
                "return probes at the kernel's default, tracking {} calls in flight each{}",
                default_maxactive(),
                if self.missed().is_some() {
                    ""
                } else {
                    "; returns missed beyond that cannot be counted on this kernel"
                }
            ),
        }
    }
}

/// kprobe mode's return probes, as a status reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnProbeInfo {
    /// How many calls in flight each tracks (its `maxactive`).
    pub max_active: u32,
    /// Made in tracefs' `kprobe_events`; else at the kernel's default.
    pub tracefs: bool,
    /// Whether the returns they miss are counted (as skipped calls).
    pub misses_counted: bool,
}

/// The kernel's default `maxactive` for a kretprobe made without one.
pub fn default_maxactive() -> u32 {
    let cpus = libbpf_rs::num_possible_cpus().unwrap_or(1) as u32;
    cpus.saturating_mul(2).max(10)
}

/// A return probe made in tracefs, removed on drop (after the link that
/// uses it: [`Attached`] drops its links first).
#[derive(Debug)]
struct TracefsEvent {
    tracefs: PathBuf,
    name: String,
}

impl TracefsEvent {
    fn create(tracefs: &Path, function: &str, maxactive: u32) -> std::io::Result<TracefsEvent> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "st{}_{}_{function}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Appended: opening kprobe_events without O_APPEND clears every
        // kprobe event on the host.
        write_kprobe_events(tracefs, &format!("r{maxactive}:{GROUP}/{name} {function}"))?;
        Ok(TracefsEvent {
            tracefs: tracefs.to_owned(),
            name,
        })
    }

    /// The event's tracepoint id, for perf_event_open.
    fn id(&self) -> std::io::Result<u64> {
        let path = self.tracefs.join("events").join(GROUP).join(&self.name).join("id");
        std::fs::read_to_string(&path)?
            .trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
    }
}

impl Drop for TracefsEvent {
    fn drop(&mut self) {
        if let Err(e) = write_kprobe_events(&self.tracefs, &format!("-:{GROUP}/{}", self.name)) {
            warn!("cannot remove the tracefs kprobe event {GROUP}/{}: {e}", self.name);
        }
    }
}

fn write_kprobe_events(tracefs: &Path, line: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(tracefs.join("kprobe_events"))?;
    f.write_all(format!("{line}\n").as_bytes())
}

/// The return probes' links, and the tracefs events under them. Fields
/// drop in order: the links first, then the events they use.
#[derive(Debug, Default)]
pub struct Attached {
    links: Vec<Link>,
    events: Vec<TracefsEvent>,
}

/// Attaches `programs` (function name, return program) as return probes:
/// through tracefs, tracking `maxactive` calls in flight each, if it can;
/// else (or with `maxactive` 0) at the kernel's default. Returns what keeps
/// them attached, and how to count what they miss.
pub fn attach(
    programs: &mut [(&str, &mut libbpf_rs::ProgramMut<'_>)],
    maxactive: u32,
) -> Result<(Attached, ReturnProbes), libbpf_rs::Error> {
    if maxactive > 0 {
        match attach_through_tracefs(programs, maxactive) {
            Ok(done) => return Ok(done),
            Err(e) => warn!("cannot make return probes through tracefs ({e}); attaching at the kernel's default"),
        }
    }
    let mut attached = Attached::default();
    let mut links = Vec::new();
    for (function, prog) in programs.iter_mut() {
        let link = prog.attach_kprobe(true, *function)?;
        links.push(link.as_fd().try_clone_to_owned().map_err(libbpf_rs::Error::from)?);
        attached.links.push(link);
    }
    let probes = ReturnProbes::Default { links };
    if probes.missed().is_none() {
        warn!("{}", probes.describe());
    }
    Ok((attached, probes))
}

fn attach_through_tracefs(
    programs: &mut [(&str, &mut libbpf_rs::ProgramMut<'_>)],
    maxactive: u32,
) -> Result<(Attached, ReturnProbes), String> {
    let tracefs = TRACEFS
        .iter()
        .map(Path::new)
        .find(|p| p.join("kprobe_events").exists())
        .ok_or("no kprobe_events in tracefs: is it mounted?")?;
    remove_stale_events(tracefs);
    let mut attached = Attached::default();
    for (function, prog) in programs.iter_mut() {
        let event = TracefsEvent::create(tracefs, function, maxactive).map_err(|e| format!("creating it: {e}"))?;
        let id = event.id().map_err(|e| format!("its id: {e}"))?;
        attached.events.push(event);
        let pfd = open_tracepoint_event(id)
            .map_err(|e| format!("perf_event_open: {e}"))?
            .into_raw_fd();
        match prog.attach_perf_event(pfd) {
            // The link owns the perf event's fd now, and closes it.
            Ok(link) => attached.links.push(link),
            Err(e) => {
                // SAFETY: the attach failed, so `pfd` is still ours alone.
                drop(unsafe { OwnedFd::from_raw_fd(pfd) });
                return Err(format!("{e:#}"));
            }
        }
    }
    let events = attached.events.iter().map(|e| e.name.clone()).collect();
    Ok((
        attached,
        ReturnProbes::Tracefs {
            tracefs: tracefs.to_owned(),
            events,
            maxactive,
        },
    ))
}

/// Removes the events a socktapd that is gone left behind (it was killed
/// before it could): their names carry its pid.
fn remove_stale_events(tracefs: &Path) {
    let Ok(events) = std::fs::read_to_string(tracefs.join("kprobe_events")) else {
        return;
    };
    for name in stale_events(&events, |pid| Path::new(&format!("/proc/{pid}")).exists()) {
        match write_kprobe_events(tracefs, &format!("-:{GROUP}/{name}")) {
            Ok(()) => debug!("removed the stale tracefs kprobe event {GROUP}/{name}"),
            Err(e) => debug!("cannot remove the stale tracefs kprobe event {GROUP}/{name}: {e}"),
        }
    }
}

/// The names of socktap's events in `kprobe_events` whose pid is not
/// `alive`. Lines look like `r4096:socktap/st1234_0_tcp_recvmsg tcp_recvmsg`.
fn stale_events(kprobe_events: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    kprobe_events
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.split_once(':')?.1.strip_prefix("socktap/"))
        .filter(|name| {
            let pid = name.strip_prefix("st").and_then(|r| r.split('_').next()?.parse().ok());
            pid.is_some_and(|p| !alive(p))
        })
        .map(str::to_owned)
        .collect()
}

/// The sum of the missed counts of `events` in `kprobe_profile`, whose
/// lines are `name hits missed`.
fn missed_in_profile(profile: &str, events: &[String]) -> u64 {
    profile
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            let missed = f.nth(1)?.parse::<u64>().ok()?;
            events.iter().any(|e| e == name).then_some(missed)
        })
        .sum()
}

/// A perf event on the tracepoint `id`, on CPU 0 for every process: a BPF
/// program attached to it runs wherever the tracepoint fires.
fn open_tracepoint_event(id: u64) -> std::io::Result<OwnedFd> {
    let mut attr = libbpf_sys::perf_event_attr {
        type_: libbpf_sys::PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<libbpf_sys::perf_event_attr>() as u32,
        config: id,
        ..Default::default()
    };
    // SAFETY: FFI; `attr` is a valid, zero-initialised perf_event_attr of
    // `size` bytes that outlives the call; the other arguments are plain
    // integers. It returns a new fd we own, or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &mut attr as *mut libbpf_sys::perf_event_attr,
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            libbpf_sys::PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor the kernel returned to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A kprobe perf link's missed count, or None where the kernel does not
/// give it (before Linux 6.7, or not a perf event link).
fn link_missed(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut info = libbpf_sys::bpf_link_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: FFI; `info` is a zeroed bpf_link_info of `len` bytes, which
    // the kernel fills up to `len`; its name pointer is null with length 0,
    // so the kernel writes nowhere else.
    let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if rc != 0 || info.type_ != libbpf_sys::BPF_LINK_TYPE_PERF_EVENT {
        return None;
    }
    // SAFETY: a perf event link's info is the `perf_event` member of the
    // union, and for a kprobe its `kprobe` member; both plain integers.
    let (kind, missed) = unsafe {
        let pe = info.__bindgen_anon_1.perf_event;
        (pe.type_, pe.__bindgen_anon_1.kprobe.missed)
    };
    let is_kprobe = kind == libbpf_sys::BPF_PERF_EVENT_KPROBE || kind == libbpf_sys::BPF_PERF_EVENT_KRETPROBE;
    // Linux 6.6 describes these links without the count: it stays 0.
    (is_kprobe && !crate::probe::loader::kernel_before(6, 7)).then_some(missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_events_are_those_of_pids_that_are_gone() {
        let events = "r4096:socktap/st100_0_tcp_sendmsg tcp_sendmsg\n\
                      r4096:socktap/st200_1_tcp_recvmsg tcp_recvmsg\n\
                      p:kprobes/other do_sys_open\n\
                      r:socktap/notours x\n";
        assert_eq!(stale_events(events, |pid| pid == 200), ["st100_0_tcp_sendmsg"]);
        assert!(stale_events(events, |_| true).is_empty());
    }

    #[test]
    fn missed_sums_only_the_named_events() {
        let profile = "  st7_0_tcp_sendmsg                         1000               3\n\
                       \x20 st7_1_tcp_recvmsg                          900              40\n\
                       \x20 st8_0_tcp_recvmsg                          900             500\n";
        let ours = ["st7_0_tcp_sendmsg".to_owned(), "st7_1_tcp_recvmsg".to_owned()];
        assert_eq!(missed_in_profile(profile, &ours), 43);
        assert_eq!(missed_in_profile(profile, &[]), 0);
    }
}
