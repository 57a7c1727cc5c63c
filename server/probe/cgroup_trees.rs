//! The cgroups that filters name by path, for the kernel to match the
//! cgroups below them that socktapd has not seen yet.
//!
//! socktapd resolves a path to the cgroup and the cgroups below it when a
//! stream opens, and again every second; a container started below the
//! path in between would be missed until then. So the hub also gives the
//! kernel the named cgroups themselves (the `cgroup_roots` map): each call
//! finds the nearest one at or above its cgroup (`socktap_event.cgroup_tree`,
//! remembered per calling cgroup), and the kernel prefilter and the hub's
//! filters match that one too.

use std::collections::BTreeSet;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::ProbeError;

/// The most named cgroups the kernel holds: the `cgroup_roots` map's size
/// in bpf/socktap.bpf.c (checked when the probe loads). With more, the
/// kernel matches none of them and paths are matched as socktapd last
/// resolved them.
pub const CGROUP_ROOTS_CAPACITY: usize = 1024;

/// The `cgroup_roots` map and what it holds; lives behind the probe's lock.
pub(crate) struct KernelCgroupTrees {
    map: MapHandle,
    /// The cgroup ids in the map.
    roots: BTreeSet<u64>,
    /// `socktap_control.cgroup_trees`: 0 while the map is not in use, else
    /// changed with every change of the map.
    generation: u32,
    /// The last generation given out: one is never given out twice (until
    /// the counter wraps), or a cgroup's nearest root remembered under an
    /// old one would count again.
    last: u32,
}

impl KernelCgroupTrees {
    pub(crate) fn new(map: MapHandle) -> Result<Self, ProbeError> {
        let size = map.max_entries() as usize;
        if size != CGROUP_ROOTS_CAPACITY {
            return Err(ProbeError::Setup(format!(
                "the cgroup_roots map holds {size} cgroups, not {CGROUP_ROOTS_CAPACITY}: rebuild socktapd"
            )));
        }
        Ok(KernelCgroupTrees {
            map,
            roots: BTreeSet::new(),
            generation: 0,
            last: 0,
        })
    }

    /// The cgroups in the map while it is in use.
    pub(crate) fn len(&self) -> usize {
        if self.generation == 0 {
            0
        } else {
            self.roots.len()
        }
    }

    /// Moves to `want`, then gives the programs a new control word
    /// (`write_generation`), so that each calling cgroup's remembered
    /// nearest root is looked up again. An empty set, or one larger than
    /// the map, turns the matching off.
    pub(crate) fn apply(
        &mut self,
        want: &BTreeSet<u64>,
        mut write_generation: impl FnMut(u32) -> Result<(), ProbeError>,
    ) -> Result<(), ProbeError> {
        if want.is_empty() || want.len() > CGROUP_ROOTS_CAPACITY {
            if self.generation != 0 {
                self.generation = 0;
                write_generation(0)?;
            }
            let all: Vec<u64> = self.roots.iter().copied().collect();
            self.remove(&all);
            return if want.len() > CGROUP_ROOTS_CAPACITY {
                Err(ProbeError::Setup(format!(
                    "{} cgroups are named by path, more than the kernel's {CGROUP_ROOTS_CAPACITY}: a cgroup created below one is matched once socktapd has resolved the path again",
                    want.len()
                )))
            } else {
                Ok(())
            };
        }
        if *want == self.roots && self.generation != 0 {
            return Ok(());
        }
        let stale: Vec<u64> = self.roots.difference(want).copied().collect();
        self.remove(&stale);
        let new: Vec<u64> = want.difference(&self.roots).copied().collect();
        for id in new {
            if let Err(e) = self.map.update(&id.to_ne_bytes(), &[1], MapFlags::ANY) {
                // Off rather than half right: a root missing from the map
                // would leave its new cgroups unmatched in the kernel.
                self.generation = 0;
                write_generation(0)?;
                return Err(ProbeError::Setup(format!("adding cgroup {id} to cgroup_roots: {e:#}")));
            }
            self.roots.insert(id);
        }
        // Never 0, which means off.
        self.last = self.last.wrapping_add(1).max(1);
        self.generation = self.last;
        write_generation(self.generation)
    }

    /// Removes ids from the map; missing ones are ignored.
    fn remove(&mut self, ids: &[u64]) {
        for id in ids {
            self.roots.remove(id);
            let _ = self.map.delete(&id.to_ne_bytes());
        }
    }
}
