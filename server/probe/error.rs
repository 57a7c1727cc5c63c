//! Why the probe could not start, in words an operator can act on.

use std::fmt;

use crate::event::AttachMode;

/// Which step of bringing up an attach mode failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening the BPF object.
    Open,
    /// Loading (verifying) the mode's programs.
    Load,
    /// Attaching the loaded programs.
    Attach,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Open => "open",
            Stage::Load => "load",
            Stage::Attach => "attach",
        })
    }
}

/// One attach mode the kernel refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeRefusal {
    /// The refused mode.
    pub mode: AttachMode,
    /// Where it failed.
    pub stage: Stage,
    /// The kernel's errno, when one was reported.
    pub errno: Option<i32>,
    /// libbpf's description of the failure.
    pub detail: String,
}

impl ModeRefusal {
    /// What usually causes this refusal.
    pub fn hint(&self) -> &'static str {
        match (self.mode, self.errno) {
            (AttachMode::Fentry, Some(libc::EPERM)) => {
                "the kernel refuses BPF trampolines here (lockdown, or a kernel built without them); try --mode kprobe or --mode tracepoint"
            }
            (AttachMode::Fentry, _) => "fentry/fexit needs Linux >= 5.17 with BTF and BPF trampolines",
            (AttachMode::Kprobe, Some(libc::ENOENT | libc::EOPNOTSUPP | libc::EINVAL)) => {
                "kprobes are not available on this kernel (CONFIG_KPROBES) or tcp_sendmsg is not probeable"
            }
            (AttachMode::Kprobe, Some(libc::EACCES)) => {
                "perf_event_open refused: where kernel.perf_event_paranoid is above 2 (Debian's and Ubuntu's kernels, 3 or 4 by default) it takes CAP_SYS_ADMIN, not CAP_PERFMON; give socktapd CAP_SYS_ADMIN, or set kernel.perf_event_paranoid=2"
            }
            (AttachMode::Kprobe, _) => "kprobes need CONFIG_KPROBES and a traceable tcp_sendmsg/tcp_recvmsg/tcp_splice_read",
            (AttachMode::Tracepoint, Some(libc::ESRCH | libc::ENOENT)) => {
                "the kernel lacks the sock_send_length/sock_recv_length tracepoints (added in Linux 6.3)"
            }
            (AttachMode::Tracepoint, _) => "tp_btf tracepoints need Linux >= 6.3 with BTF",
        }
    }
}

impl fmt::Display for ModeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mode: {} failed", self.mode, self.stage)?;
        if let Some(errno) = self.errno {
            write!(
                f,
                " with {} ({})",
                errno_name(errno),
                std::io::Error::from_raw_os_error(errno)
            )?;
        }
        write!(f, "; hint: {}", self.hint())
    }
}

/// Why [`Probe::start`](super::Probe::start) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The process lacks the privileges to load BPF tracing programs.
    #[error("not permitted to load BPF programs: run as root or grant CAP_BPF and CAP_PERFMON (effective capabilities: {effective:#x})")]
    NotPermitted {
        /// The effective capability mask from /proc/self/status.
        effective: u64,
    },
    /// The kernel exposes no BTF, which CO-RE needs.
    #[error("no kernel BTF at {path}: socktap needs a kernel built with CONFIG_DEBUG_INFO_BTF (Linux >= 5.8)")]
    NoBtf {
        /// Where BTF was looked for.
        path: &'static str,
    },
    /// The one mode asked for could not be used.
    #[error("{0}")]
    ModeUnavailable(ModeRefusal),
    /// `auto` tried every mode and the kernel refused them all.
    #[error("no attach mode works on this kernel: {}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" | "))]
    NoModeAvailable(Vec<ModeRefusal>),
    /// The options are not usable.
    #[error("invalid probe option {option}: {reason}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Setting up the ring buffer reader or the control maps failed.
    #[error("setting up the probe failed: {0}")]
    Setup(String),
}

/// The errno a libbpf error carries, if any. libbpf-rs keeps it inside an
/// `io::Error` that is only reachable through its text.
pub(crate) fn errno_of(err: &libbpf_rs::Error) -> Option<i32> {
    let text = format!("{err:#}");
    let start = text.rfind("(os error ")? + "(os error ".len();
    let end = text[start..].find(')')? + start;
    text[start..end].parse().ok()
}

/// The symbolic name of an errno, for messages.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::E2BIG => "E2BIG",
        libc::ENOTSUP => "EOPNOTSUPP",
        libc::ENOMEM => "ENOMEM",
        libc::EBUSY => "EBUSY",
        libc::EAGAIN => "EAGAIN",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_recovered_from_libbpf_errors() {
        let e = libbpf_rs::Error::from_raw_os_error(libc::ESRCH);
        assert_eq!(errno_of(&e), Some(libc::ESRCH));
    }

    #[test]
    fn refusal_names_mode_errno_and_hint() {
        let r = ModeRefusal {
            mode: AttachMode::Fentry,
            stage: Stage::Load,
            errno: Some(libc::EPERM),
            detail: String::new(),
        };
        let s = r.to_string();
        assert!(s.starts_with("fentry mode: load failed with EPERM"), "{s}");
        assert!(s.contains("hint: "), "{s}");
    }

    /// Seen in the kernel matrix: Debian's 7.3, a probe started without
    /// CAP_SYS_ADMIN in kprobe mode.
    #[test]
    fn kprobes_refused_by_perf_event_paranoid_say_so() {
        let r = ModeRefusal {
            mode: AttachMode::Kprobe,
            stage: Stage::Attach,
            errno: Some(libc::EACCES),
            detail: String::new(),
        };
        let s = r.to_string();
        assert!(s.starts_with("kprobe mode: attach failed with EACCES"), "{s}");
        assert!(
            s.contains("hint: perf_event_open refused: where kernel.perf_event_paranoid is above 2"),
            "{s}"
        );
    }
}
