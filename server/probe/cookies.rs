//! kprobe mode's socket cookies. The kernel gives a socket its cookie the
//! first time something asks for it, and kprobe programs may not ask: they
//! read what the socket holds, 0 until then. So in kprobe mode socktapd
//! asks for them itself:
//! - a sock_ops program (`st_sockops_cookie`) on the root of the cgroup2
//!   hierarchy asks for the cookie of every TCP connection made or accepted
//!   from then on, in any network namespace;
//! - then one sock_diag dump of every TCP socket in socktapd's network
//!   namespace gives those already open theirs (the kernel assigns a
//!   socket's cookie as a dump reports it, as for `ss`), and one in each
//!   other network namespace a process is in (a container's) or that is
//!   mounted (`ip netns add`), which socktapd enters to dump it when it may
//!   (CAP_SYS_ADMIN).
//!
//! fentry and tracepoint programs ask for each cookie as they read it.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_ALIGNTO, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Where the cookies in events come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieSource {
    /// fentry and tracepoint modes: the programs ask the kernel for each
    /// socket's cookie, so every event has it.
    Programs,
    /// kprobe mode, whose programs may not ask: a sock_ops program on the
    /// root cgroup gives every connection made or accepted since the probe
    /// started its cookie, and sock_diag dumps then gave those open at the
    /// time theirs: socktapd's network namespace's, and every other one's
    /// that a process is in or that is mounted, and socktapd may enter
    /// (CAP_SYS_ADMIN). A
    /// namespace not dumped is logged, and its sockets open before report
    /// 0 until something asks for their cookie (SO_COOKIE, `ss`).
    AtConnect,
    /// kprobe mode without that program (no CAP_NET_ADMIN, or no cgroup2):
    /// a socket reports 0 until something asks for its cookie.
    AskedOnly,
}

/// Whether the kernel will load a sock_ops program for this process: it
/// takes CAP_NET_ADMIN. Without it the program is left out, so that the
/// rest of kprobe mode still loads.
pub(crate) fn may_load_program() -> bool {
    let effective = super::loader::effective_capabilities();
    effective & (1u64 << CAP_NET_ADMIN | 1u64 << CAP_SYS_ADMIN) != 0
}

/// kprobe mode's cookie program, attached.
pub(crate) struct Attached {
    pub link: libbpf_rs::Link,
    pub dumps: StartDumps,
}

/// What kprobe mode's dumps at the start left out: sockets open then in
/// these network namespaces report cookie 0 until something asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartDumps {
    /// Network namespaces found and not dumped: one socktapd could not
    /// enter, or whose dump failed (its own included).
    pub namespaces_missed: u32,
    /// Only socktapd's own network namespace was dumped: it may not enter
    /// others (CAP_SYS_ADMIN).
    pub own_namespace_only: bool,
}

/// Attaches the cookie program (when the loader loaded it: see
/// `may_load_program`) to the root of the cgroup2 hierarchy, then gives
/// the sockets already open their cookies: those of socktapd's network
/// namespace and of every other one a process is in or that is mounted.
/// None (and a warning)
/// when the program cannot be attached; socktapd goes on, with cookie 0 for
/// sockets that nothing asked.
pub(crate) fn attach_program(program: &libbpf_rs::ProgramMut<'_>) -> Option<Attached> {
    let unassigned = "sockets nothing has asked for their cookie report cookie 0";
    // The loader left the program out when this process may not load it.
    if !program.autoload() {
        tracing::warn!("kprobe mode: {unassigned} (assigning cookies takes CAP_NET_ADMIN)");
        return None;
    }
    let Some(root) = crate::mounts::cgroup2_root() else {
        tracing::warn!("kprobe mode: {unassigned} (no cgroup2 hierarchy to attach the cookie program to)");
        return None;
    };
    // The link holds its own reference to the cgroup: the directory may
    // close after the attach.
    let attached = std::fs::File::open(&root)
        .map_err(|e| e.to_string())
        .and_then(|dir| program.attach_cgroup(dir.as_raw_fd()).map_err(|e| format!("{e:#}")));
    let link = match attached {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(
                "kprobe mode: {unassigned} (attaching the cookie program to {}: {e})",
                root.display()
            );
            return None;
        }
    };
    tracing::info!(
        "kprobe mode: connections get their cookie as they are made or accepted (sock_ops on {})",
        root.display()
    );
    // After the attach, so that no connection falls between the two.
    let mut n = 0usize;
    let mut namespaces_missed = 0u32;
    match dump_tcp_sockets(|_| n += 1) {
        Ok(()) => {
            tracing::info!("kprobe mode: {n} TCP sockets already open in socktapd's network namespace got theirs")
        }
        Err(e) => {
            namespaces_missed += 1;
            tracing::warn!(
                "kprobe mode: TCP sockets already open in socktapd's network namespace report 0 until something asks (sock_diag dump: {e})"
            )
        }
    }
    if !may_enter_namespaces() {
        tracing::warn!(
            "kprobe mode: TCP sockets other network namespaces (containers) had open report 0 until something asks (entering those namespaces to dump them takes CAP_SYS_ADMIN)"
        );
        return Some(Attached {
            link,
            dumps: StartDumps {
                namespaces_missed,
                own_namespace_only: true,
            },
        });
    }
    let others = dump_other_namespaces(|_, _| {});
    if others.unreadable > 0 {
        tracing::warn!(
            "kprobe mode: the network namespaces of {} processes could not be read (/proc/PID/ns/net: permission denied; another user's takes CAP_SYS_PTRACE): if they are in namespaces of their own, TCP sockets open there report 0 until something asks",
            others.unreadable
        );
    }
    if others.dumped > 0 {
        tracing::info!(
            "kprobe mode: {} TCP sockets already open in {} other network namespaces got theirs",
            others.sockets,
            others.dumped
        );
    }
    for (namespace, e) in &others.failed {
        tracing::warn!(
            "kprobe mode: TCP sockets already open in the network namespace of {} report 0 until something asks ({e})",
            namespace.display()
        );
    }
    namespaces_missed += u32::try_from(others.failed.len()).unwrap_or(u32::MAX);
    Some(Attached {
        link,
        dumps: StartDumps {
            namespaces_missed,
            own_namespace_only: false,
        },
    })
}

/// Whether this process may enter other network namespaces (setns), to
/// dump their sockets: it takes CAP_SYS_ADMIN.
fn may_enter_namespaces() -> bool {
    super::loader::effective_capabilities() & (1u64 << CAP_SYS_ADMIN) != 0
}

/// What [`dump_other_namespaces`] did.
#[derive(Debug, Default)]
pub struct NamespaceDumps {
    /// Network namespaces dumped.
    pub dumped: usize,
    /// TCP sockets those dumps reported.
    pub sockets: usize,
    /// Network namespaces not dumped (by their mount point or a process's
    /// `/proc/PID/ns/net`), and why.
    pub failed: Vec<(PathBuf, String)>,
    /// Processes whose `/proc/PID/ns/net` this process was denied (another
    /// user's takes CAP_SYS_PTRACE, and a security module may deny it even
    /// then).
    pub unreadable: usize,
}

/// Dumps the TCP sockets of every network namespace that is mounted
/// (`/run/netns/NAME`) or that a process is in (`/proc/PID/ns/net`, a
/// container's, say), other than socktapd's own, so that those sockets
/// get their cookies too, and calls `each` with the namespace's path (its
/// mount point if it has one) and each socket's local address. Entering a
/// namespace takes CAP_SYS_ADMIN, and reading another user's
/// `/proc/PID/ns/net` CAP_SYS_PTRACE. A namespace with neither a mount nor
/// a process in it (only sockets left, held by processes elsewhere) is not
/// found.
pub fn dump_other_namespaces(mut each: impl FnMut(&Path, SocketAddr) + Send) -> NamespaceDumps {
    let (namespaces, unreadable) = other_network_namespaces();
    let mut out = NamespaceDumps {
        unreadable,
        ..NamespaceDumps::default()
    };
    if namespaces.is_empty() {
        return out;
    }
    // setns() moves only the calling thread: a thread of its own, which
    // enters each namespace in turn and ends there.
    std::thread::scope(|scope| {
        let dumping = scope.spawn(|| {
            for path in namespaces {
                let entered = std::fs::File::open(&path)
                    .map_err(|e| format!("opening it: {e}"))
                    .and_then(|ns| {
                        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                            let needs = if e == Errno::EPERM { ": takes CAP_SYS_ADMIN" } else { "" };
                            format!("entering it: {e}{needs}")
                        })
                    });
                let mut n = 0usize;
                let dumped = entered.and_then(|()| {
                    dump_tcp_sockets(|local| {
                        n += 1;
                        each(&path, local);
                    })
                    .map_err(|e| format!("sock_diag dump: {e}"))
                });
                match dumped {
                    Ok(()) => {
                        out.dumped += 1;
                        out.sockets += n;
                    }
                    Err(e) => out.failed.push((path, e)),
                }
            }
        });
        if dumping.join().is_err() {
            tracing::warn!("kprobe mode: the thread dumping other network namespaces panicked");
        }
    });
    out
}

/// One path for each network namespace that is mounted (its mount point)
/// or that some process is in (a `/proc/PID/ns/net`), socktapd's own left
/// out, and how many processes' namespaces this process may not read. A
/// process that is gone is passed over.
fn other_network_namespaces() -> (Vec<PathBuf>, usize) {
    use std::os::unix::fs::MetadataExt;
    let ours = match std::fs::metadata("/proc/self/ns/net") {
        Ok(m) => (m.dev(), m.ino()),
        Err(_) => return (Vec::new(), 0),
    };
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return (Vec::new(), 0);
    };
    let mut seen = std::collections::HashSet::from([ours]);
    let mut found = Vec::new();
    // stat() follows a process's link to the namespace itself, and a mount
    // point is the namespace's own inode.
    let mut add = |path: PathBuf| -> std::io::Result<()> {
        let m = std::fs::metadata(&path)?;
        if seen.insert((m.dev(), m.ino())) {
            found.push(path);
        }
        Ok(())
    };
    // Mount points first: a namespace both mounted and with processes in
    // it is named by its mount point, which says more in a log.
    for path in crate::mounts::network_namespace_mounts() {
        if let Err(e) = add(path.clone()) {
            tracing::debug!("kprobe mode: the network namespace mounted at {}: {e}", path.display());
        }
    }
    let mut unreadable = 0;
    for entry in proc_dir.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        match add(entry.path().join("ns/net")) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => unreadable += 1,
            _ => {}
        }
    }
    (found, unreadable)
}

/// Asks sock_diag for every TCP socket of this network namespace, IPv4 and
/// IPv6, in every state, and calls `each` with the local address of every
/// socket reported. The kernel gives each socket a dump reports its cookie.
pub fn dump_tcp_sockets(mut each: impl FnMut(SocketAddr)) -> Result<(), String> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|e| format!("netlink socket: {e}"))?;
    socket.bind_auto().map_err(|e| format!("netlink bind: {e}"))?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;
    let mut buf = vec![0u8; 64 << 10];
    for (family, socket_id) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0u8; request.buffer_len()];
        request.serialize(&mut bytes);
        socket
            .send(&bytes, 0)
            .map_err(|e| format!("sending the dump request: {e}"))?;
        'dump: loop {
            let n = socket
                .recv(&mut &mut buf[..], 0)
                .map_err(|e| format!("reading the dump: {e}"))?;
            if n == 0 {
                return Err("the dump ended before its last message".into());
            }
            let mut at = 0;
            while at < n {
                let message = NetlinkBuffer::new_checked(&buf[at..n]).map_err(|e| format!("a malformed reply: {e}"))?;
                match message.message_type() {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => {
                        let error = ErrorBuffer::new_checked(message.payload())
                            .map_err(|e| format!("a malformed error reply: {e}"))?;
                        if let Some(code) = error.code() {
                            return Err(std::io::Error::from_raw_os_error(-code.get()).to_string());
                        }
                    }
                    _ => {
                        let socket = InetResponseHeader::parse(message.payload())
                            .map_err(|e| format!("a malformed socket in the dump: {e}"))?;
                        let id = socket.socket_id;
                        each(SocketAddr::new(id.source_address, id.source_port));
                    }
                }
                let len = message.length() as usize;
                if len == 0 {
                    break;
                }
                let align = usize::from(NLMSG_ALIGNTO);
                at += len.div_ceil(align) * align;
            }
        }
    }
    Ok(())
}
