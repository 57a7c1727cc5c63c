//! Dropping root once everything privileged is done.
//!
//! After the BPF programs are loaded and attached and the listener is bound,
//! socktapd keeps serving through file descriptors it already holds: maps
//! (the gate, counters), programs (re-attached with BPF_RAW_TRACEPOINT_OPEN),
//! the ring buffer (mmap + epoll) and the listening socket. None of that
//! needs a capability on kernels that check `bpf()` capabilities per command
//! (Linux ≥ 6.5), so `--user` drops them all.

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, User};

/// Why the drop failed.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// The kernel checks bpf() capabilities for every command before 6.5,
    /// so the gate could not be switched without CAP_BPF.
    #[error("--user needs Linux >= 6.5 (this is {0}): older kernels require CAP_BPF for every bpf() call; use contrib/socktapd.service's capabilities instead")]
    OldKernel(String),
    /// No such user.
    #[error("--user: no user named {0}")]
    NoSuchUser(String),
    /// A system call failed.
    #[error("--user {user}: {what} failed: {errno}")]
    Call {
        /// The user asked for.
        user: String,
        /// Which call.
        what: &'static str,
        /// The error.
        errno: nix::errno::Errno,
    },
}

/// The user socktapd will run as: looked up, and the kernel checked, at
/// start, so that a bad `--user` is refused before anything is loaded.
#[derive(Debug, Clone)]
pub struct Account {
    user: User,
}

impl Account {
    /// Looks up `name`, and refuses kernels on which the drop would break
    /// the daemon (see [`DropError::OldKernel`]).
    pub fn resolve(name: &str) -> Result<Account, DropError> {
        // An unparseable release counts as too old: refuse rather than guess.
        if crate::probe::kernel_version().unwrap_or((0, 0)) < (6, 5) {
            return Err(DropError::OldKernel(crate::probe::kernel_release()));
        }
        let user = User::from_name(name)
            .map_err(|errno| DropError::Call {
                user: name.to_owned(),
                what: "looking up the user",
                errno,
            })?
            .ok_or_else(|| DropError::NoSuchUser(name.to_owned()))?;
        Ok(Account { user })
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.user.name
    }

    /// Switches every thread of the process to this user's uid and gid
    /// (glibc applies set*id to all threads). Leaving uid 0 without
    /// keep-caps clears each thread's permitted, effective and ambient
    /// capabilities. First, while still root, RLIMIT_NICE is set so that
    /// the ring buffer reader may still lower its nice value to
    /// `reader_nice` (`--reader-nice`) without CAP_SYS_NICE; that needs
    /// CAP_SYS_RESOURCE, and without it socktapd warns and goes on. So is
    /// RLIMIT_RTPRIO, for a reading thread to take `SCHED_FIFO` priority
    /// `realtime` (`--realtime-priority`) after the drop.
    pub fn switch_to(&self, reader_nice: i32, realtime: Option<u8>) -> Result<(), DropError> {
        let call = |what, errno| DropError::Call {
            user: self.user.name.clone(),
            what,
            errno,
        };
        if reader_nice < 0 {
            // RLIMIT_NICE's unit: 20 - the lowest nice value allowed.
            let limit = (20 - reader_nice) as libc::rlim_t;
            if let Err(e) = setrlimit(Resource::RLIMIT_NICE, limit, limit) {
                // Raising a hard limit needs CAP_SYS_RESOURCE, which a
                // container's root may lack: the reader then reads at the
                // default priority (and says so when it tries).
                tracing::warn!(
                    "--user {}: cannot let the ring buffer reader keep nice {reader_nice} (setrlimit(RLIMIT_NICE): {e})",
                    self.user.name
                );
            }
        }
        if let Some(p) = realtime {
            let limit = libc::rlim_t::from(p);
            if let Err(e) = setrlimit(Resource::RLIMIT_RTPRIO, limit, limit) {
                tracing::warn!(
                    "--user {}: a thread that reads the ring buffer after the drop cannot take real-time priority {p} (setrlimit(RLIMIT_RTPRIO): {e})",
                    self.user.name
                );
            }
        }
        let (uid, gid) = (self.user.uid, self.user.gid);
        setgroups(&[gid]).map_err(|e| call("setgroups", e))?;
        setresgid(gid, gid, gid).map_err(|e| call("setresgid", e))?;
        setresuid(uid, uid, uid).map_err(|e| call("setresuid", e))?;
        Ok(())
    }
}
