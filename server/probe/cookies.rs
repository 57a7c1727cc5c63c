//! kprobe mode's socket cookies. The kernel gives a socket its cookie the
//! first time something asks for it, and kprobe programs may not ask: they
//! read what the socket holds, 0 until then. So in kprobe mode socktapd
//! asks for them itself:
//! - a sock_ops program (`st_sockops_cookie`) on the root of the cgroup2
//!   hierarchy asks for the cookie of every TCP connection made or accepted
//!   from then on, in any network namespace;
//! - then one sock_diag dump of every TCP socket in socktapd's network
//!   namespace gives those already open theirs (the kernel assigns a
//!   socket's cookie as a dump reports it, as for `ss`).
//!
//! fentry and tracepoint programs ask for each cookie as they read it.

use std::os::fd::AsRawFd;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable, NLMSG_ALIGNTO, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

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
    /// started its cookie, and a sock_diag dump then gave those of
    /// socktapd's network namespace open at the time theirs (a failed dump
    /// is logged). A socket of another network namespace that was open
    /// before reports 0 until something asks for its cookie (SO_COOKIE,
    /// `ss`).
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

/// Attaches the cookie program (when the loader loaded it: see
/// `may_load_program`) to the root of the cgroup2 hierarchy, then
/// gives the sockets already open in socktapd's network namespace their
/// cookies. None (and a warning) when the program cannot be attached;
/// socktapd goes on, with cookie 0 for sockets that nothing asked.
pub(crate) fn attach_program(program: &libbpf_rs::ProgramMut<'_>) -> Option<libbpf_rs::Link> {
    let unassigned = "sockets nothing has asked for their cookie report cookie 0";
    // The loader left the program out when this process may not load it.
    if !program.autoload() {
        tracing::warn!("kprobe mode: {unassigned} (assigning cookies takes CAP_NET_ADMIN)");
        return None;
    }
    let Some(root) = crate::cgroup_mount::cgroup2_root() else {
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
    // After the attach, so that no connection falls between the two.
    let mut n = 0usize;
    match dump_tcp_sockets(|_| n += 1) {
        Ok(()) => tracing::info!(
            "kprobe mode: connections get their cookie as they are made or accepted (sock_ops on {}); {n} TCP sockets already open in this network namespace got theirs",
            root.display()
        ),
        Err(e) => tracing::warn!(
            "kprobe mode: connections get their cookie as they are made or accepted (sock_ops on {}); those already open report 0 until something asks (sock_diag dump: {e})",
            root.display()
        ),
    }
    Some(link)
}

/// Asks sock_diag for every TCP socket of this network namespace, IPv4 and
/// IPv6, in every state, and calls `each` with the local address of every
/// socket reported. The kernel gives each socket a dump reports its cookie.
pub fn dump_tcp_sockets(mut each: impl FnMut(std::net::SocketAddr)) -> Result<(), String> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|e| format!("netlink socket: {e}"))?;
    socket.bind_auto().map_err(|e| format!("netlink bind: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
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
                        each(std::net::SocketAddr::new(id.source_address, id.source_port));
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
