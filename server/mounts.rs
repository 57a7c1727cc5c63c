//! What this process's mount table (`/proc/self/mountinfo`) says: where
//! the host's cgroup v2 hierarchy is mounted (the service resolves cgroup
//! paths under it, and kprobe mode attaches its cookie program to its
//! root), and where network namespaces are bind-mounted (`ip netns add`,
//! a container runtime's), which kprobe mode dumps for their sockets'
//! cookies.

use std::path::PathBuf;

/// The mount point of the cgroup2 hierarchy's root, from
/// `/proc/self/mountinfo`; None when cgroup2 is not mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| cgroup2_mount(&info))
}

/// Where network namespaces are bind-mounted (`/run/netns/NAME` after `ip
/// netns add NAME`), from `/proc/self/mountinfo`: a namespace mounted so
/// lives on with no process in it. Empty when the table cannot be read.
pub fn network_namespace_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| network_namespaces(&info))
        .unwrap_or_default()
}

/// One line of `mountinfo` (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT
/// OPTIONS... - FSTYPE SOURCE SUPER_OPTIONS`, with spaces and the like in
/// paths written as octal escapes.
struct Mount<'a> {
    /// The mounted file system's own path of what is mounted: `/` for
    /// the whole of it, lower for a bind mount of a subtree, and
    /// `net:[INODE]` for a namespace.
    root: &'a str,
    /// Where it is mounted, escapes kept.
    mount_point: &'a str,
    fstype: &'a str,
}

fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fields = mount.split(' ').skip(3);
        Some(Mount {
            root: fields.next()?,
            mount_point: fields.next()?,
            fstype: fs.split(' ').next()?,
        })
    })
}

/// The mount point of the first cgroup2 mount of the hierarchy's root in
/// `mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // A bind mount of a subtree has another root: its inode numbers are
    // the same, but its paths start lower.
    mounts(mountinfo)
        .find(|m| m.fstype == "cgroup2" && m.root == "/")
        .map(|m| PathBuf::from(unescape(m.mount_point)))
}

/// The mount points of network namespaces in `mountinfo` (file system
/// nsfs, root `net:[INODE]`; other namespaces' mounts left out).
fn network_namespaces(mountinfo: &str) -> Vec<PathBuf> {
    mounts(mountinfo)
        .filter(|m| m.fstype == "nsfs" && m.root.starts_with("net:["))
        .map(|m| PathBuf::from(unescape(m.mount_point)))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_the_root() {
        let hybrid = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let bind_then_root = "\
40 1 0:31 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
41 1 0:31 / /mnt/cgroup\\040v2 rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(bind_then_root), Some(PathBuf::from("/mnt/cgroup v2")));
        assert_eq!(
            cgroup2_mount("26 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn finds_the_network_namespaces_mounted() {
        let table = "\
22 1 0:21 / /proc rw - proc proc rw
612 29 0:4 net:[4026532283] /run/netns/blue rw shared:285 - nsfs nsfs rw
613 29 0:4 mnt:[4026532290] /run/mnt-ns rw - nsfs nsfs rw
614 29 0:4 net:[4026532301] /run/netns/my\\040lab rw - nsfs nsfs rw
";
        assert_eq!(
            network_namespaces(table),
            [PathBuf::from("/run/netns/blue"), PathBuf::from("/run/netns/my lab")]
        );
        assert!(network_namespaces("22 1 0:21 / /proc rw - proc proc rw\n").is_empty());
    }
}
