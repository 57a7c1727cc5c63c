//! Where the host's cgroup v2 hierarchy is mounted: the service resolves
//! cgroup paths under it, and kprobe mode attaches its cookie program to
//! its root.

use std::path::PathBuf;

/// The mount point of the cgroup2 hierarchy's root, from
/// `/proc/self/mountinfo`; None when cgroup2 is not mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| cgroup2_mount(&info))
}

/// The mount point of the first cgroup2 mount of the hierarchy's root in
/// `mountinfo` (proc(5)). Its lines read `ID PARENT MAJ:MIN ROOT
/// MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER_OPTIONS`, with spaces and
/// the like in paths written as octal escapes.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next() != Some("cgroup2") {
            return None;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        // A bind mount of a subtree has another root: its inode numbers
        // are the same, but its paths start lower.
        if fields.get(3) != Some(&"/") {
            return None;
        }
        fields.get(4).map(|p| PathBuf::from(unescape(p)))
    })
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
}
