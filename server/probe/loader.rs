//! Opens, loads and attaches the BPF programs of one attach mode, trying the
//! modes in order when asked for `auto`.

use std::mem::MaybeUninit;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::OpenObject;
use tracing::debug;

use super::cookies::{self, CookieSource, StartDumps};
use super::drops;
use super::error::{errno_of, ModeRefusal, ProbeError, Stage};
use super::kretprobes::{self, ReturnProbes};
use super::skel::{OpenSocktapSkel, SocktapSkel, SocktapSkelBuilder};
use super::{ModeRequest, ProbeOptions};
use crate::event::AttachMode;

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A loaded and attached skeleton, with the refusals met on the way.
pub(crate) struct Loaded<'obj> {
    pub skel: SocktapSkel<'obj>,
    /// kprobe mode's return probes, attached apart from the skeleton.
    pub _return_links: kretprobes::Attached,
    /// How to count what they miss.
    pub return_probes: ReturnProbes,
    /// kprobe mode's cookie program on the root cgroup, when attached.
    pub cookie_link: Option<libbpf_rs::Link>,
    /// kprobe mode: what the cookie dumps at the start left out.
    pub cookie_dumps: StartDumps,
    pub mode: AttachMode,
    pub refused: Vec<ModeRefusal>,
}

impl Loaded<'_> {
    /// Where the cookies in this mode's events come from.
    pub fn cookies(&self) -> CookieSource {
        match (self.mode, &self.cookie_link) {
            (AttachMode::Kprobe, Some(_)) => CookieSource::AtConnect,
            (AttachMode::Kprobe, None) => CookieSource::AskedOnly,
            _ => CookieSource::Programs,
        }
    }
}

/// Checks what every mode needs before trying any: privileges and BTF.
pub(crate) fn preflight() -> Result<(), ProbeError> {
    let effective = effective_capabilities();
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        return Err(ProbeError::NotPermitted { effective });
    }
    if !std::path::Path::new(BTF_PATH).exists() {
        return Err(ProbeError::NoBtf { path: BTF_PATH });
    }
    Ok(())
}

/// The calling thread's effective capabilities. They are per thread, and
/// the kernel checks the calling thread's: a thread's own, not the main
/// thread's (`/proc/self`).
pub(crate) fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Loads the first mode the kernel accepts. `storage` holds one object slot
/// per mode, since a refused attempt's object must outlive its borrow.
pub(crate) fn load<'obj>(
    opts: &ProbeOptions,
    storage: &'obj mut [MaybeUninit<OpenObject>; 3],
) -> Result<Loaded<'obj>, ProbeError> {
    let modes: Vec<AttachMode> = match opts.mode {
        ModeRequest::Auto => AttachMode::ALL.to_vec(),
        ModeRequest::Only(m) => vec![m],
    };
    let mut refused = Vec::new();
    for (mode, slot) in modes.into_iter().zip(storage.iter_mut()) {
        match try_mode(mode, opts, slot) {
            Ok((skel, return_links, return_probes)) => {
                debug!(mode = %mode, "attached");
                let cookie_program = (mode == AttachMode::Kprobe)
                    .then(|| cookies::attach_program(&skel.progs.st_sockops_cookie))
                    .flatten();
                let cookie_dumps = cookie_program.as_ref().map(|a| a.dumps).unwrap_or_default();
                let cookie_link = cookie_program.map(|a| a.link);
                return Ok(Loaded {
                    skel,
                    _return_links: return_links,
                    return_probes,
                    cookie_link,
                    cookie_dumps,
                    mode,
                    refused,
                });
            }
            Err(r) => {
                debug!(mode = %mode, "refused: {r} ({})", r.detail);
                refused.push(r);
            }
        }
    }
    Err(match opts.mode {
        ModeRequest::Only(_) => ProbeError::ModeUnavailable(refused.remove(0)),
        ModeRequest::Auto => ProbeError::NoModeAvailable(refused),
    })
}

fn refusal(mode: AttachMode, stage: Stage, err: libbpf_rs::Error) -> ModeRefusal {
    ModeRefusal {
        mode,
        stage,
        errno: errno_of(&err),
        detail: format!("{err:#}"),
    }
}

fn try_mode<'obj>(
    mode: AttachMode,
    opts: &ProbeOptions,
    slot: &'obj mut MaybeUninit<OpenObject>,
) -> Result<(SocktapSkel<'obj>, kretprobes::Attached, ReturnProbes), ModeRefusal> {
    let mut open = SocktapSkelBuilder::default()
        .open(slot)
        .map_err(|e| refusal(mode, Stage::Open, e))?;
    select_programs(&mut open, mode);
    open.maps
        .events
        .set_max_entries(opts.ring_buffer_bytes)
        .map_err(|e| refusal(mode, Stage::Open, e))?;
    let cpus = libbpf_rs::num_possible_cpus().map_err(|e| refusal(mode, Stage::Open, e))?;
    open.maps
        .drops
        .set_max_entries(drops::entries_for(cpus))
        .map_err(|e| refusal(mode, Stage::Open, e))?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.recvmsg_flags_arg = if kernel_before(5, 19) { 4 } else { 3 };
        rodata.ring_half_bytes = u64::from(opts.ring_buffer_bytes / 2);
    }
    let mut skel = open.load().map_err(|e| refusal(mode, Stage::Load, e))?;
    skel.attach().map_err(|e| refusal(mode, Stage::Attach, e))?;
    if mode != AttachMode::Kprobe {
        return Ok((skel, kretprobes::Attached::default(), ReturnProbes::None));
    }
    let p = &mut skel.progs;
    let (links, probes) = kretprobes::attach(
        &mut [
            ("tcp_sendmsg", &mut p.st_kret_send),
            ("tcp_recvmsg", &mut p.st_kret_recv),
            ("tcp_splice_read", &mut p.st_kret_splice),
        ],
        opts.kretprobe_maxactive,
    )
    .map_err(|e| refusal(mode, Stage::Attach, e))?;
    tracing::info!("kprobe mode: {}", probes.describe());
    Ok((skel, links, probes))
}

/// Loads only the programs of `mode`.
fn select_programs(open: &mut OpenSocktapSkel<'_>, mode: AttachMode) {
    let p = &mut open.progs;
    let fentry = mode == AttachMode::Fentry;
    let kprobe = mode == AttachMode::Kprobe;
    let tracepoint = mode == AttachMode::Tracepoint;
    // A sock_ops program takes CAP_NET_ADMIN to load: without it, it is left
    // out, so that the rest of kprobe mode still loads.
    p.st_sockops_cookie.set_autoload(kprobe && cookies::may_load_program());
    // Attached to a cgroup apart, after the mode is in place.
    p.st_sockops_cookie.set_autoattach(false);
    p.st_fexit_send.set_autoload(fentry);
    p.st_fexit_recv.set_autoload(fentry);
    p.st_fexit_splice.set_autoload(fentry);
    p.st_kp_send.set_autoload(kprobe);
    p.st_kret_send.set_autoload(kprobe);
    // Attached apart, with room for more calls in flight (kretprobes.rs).
    p.st_kret_send.set_autoattach(false);
    p.st_kret_recv.set_autoattach(false);
    p.st_kret_splice.set_autoattach(false);
    p.st_kp_recv.set_autoload(kprobe);
    p.st_kret_recv.set_autoload(kprobe);
    p.st_kp_splice.set_autoload(kprobe);
    p.st_kret_splice.set_autoload(kprobe);
    p.st_tp_send.set_autoload(tracepoint);
    p.st_tp_recv.set_autoload(tracepoint);
}

/// The running kernel's release, e.g. "6.18.44".
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The running kernel's (major, minor) version, if its release parses.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    Some((parts.next()?, parts.next()?))
}

pub(crate) fn kernel_before(major: u32, minor: u32) -> bool {
    kernel_version().is_some_and(|v| v < (major, minor))
}
