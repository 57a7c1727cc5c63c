//! The kernel prefilter: which calls the BPF programs turn into events.
//!
//! While it is on, the programs write only calls that match at least one
//! key of the `wanted` map: a value of the socket cookie, the process id,
//! the cgroup id, the local or remote port, the uid, or the thread name. The hub sets it to the
//! union of what its subscribers' filters can match, so a subscriber
//! watching one port on a busy host costs the other calls a map lookup, not
//! a ring-buffer record. Unwanted calls take no sequence number: a gap in
//! `seq` still means a loss.

use std::collections::BTreeSet;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::skel::types;
use super::ProbeError;

/// The most keys the kernel prefilter holds: the `wanted` map's size in
/// bpf/socktap.bpf.c (checked when the probe loads).
pub const PREFILTER_CAPACITY: usize = 4096;

/// A field the kernel prefilter can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WantDim {
    /// The socket cookie.
    Cookie,
    /// The process id (tgid).
    Pid,
    /// The cgroup v2 id.
    Cgroup,
    /// The local port.
    LocalPort,
    /// The remote port.
    RemotePort,
    /// The real uid.
    Uid,
    /// The thread name (comm), as [`comm_key`] folds it.
    Comm,
}

/// The value of a [`WantDim::Comm`] key for a thread name of at most 15
/// bytes: its two NUL-padded 8-byte halves XORed, as the BPF programs
/// compute it from the kernel's comm. Different names may share a value;
/// the prefilter then lets both through.
pub fn comm_key(comm: &[u8]) -> u64 {
    let mut padded = [0u8; 16];
    let n = comm.len().min(15);
    padded[..n].copy_from_slice(&comm[..n]);
    let (lo, hi) = padded.split_at(8);
    u64::from_ne_bytes(lo.try_into().expect("8 bytes")) ^ u64::from_ne_bytes(hi.try_into().expect("8 bytes"))
}

impl WantDim {
    fn code(self) -> u32 {
        use types::socktap_want_dim as d;
        let dim = match self {
            WantDim::Cookie => d::SOCKTAP_WANT_COOKIE,
            WantDim::Pid => d::SOCKTAP_WANT_PID,
            WantDim::Cgroup => d::SOCKTAP_WANT_CGROUP,
            WantDim::LocalPort => d::SOCKTAP_WANT_LOCAL_PORT,
            WantDim::RemotePort => d::SOCKTAP_WANT_REMOTE_PORT,
            WantDim::Uid => d::SOCKTAP_WANT_UID,
            WantDim::Comm => d::SOCKTAP_WANT_COMM,
        };
        dim.0
    }
}

/// One value of one field: a call with that value is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WantKey {
    /// The field.
    pub dim: WantDim,
    /// Its value (ports and pids widened).
    pub value: u64,
}

/// What the kernel writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Prefilter {
    /// Every call.
    #[default]
    Everything,
    /// Only calls matching one of these keys.
    Keys(BTreeSet<WantKey>),
}

/// The prefilter in force, for status reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterStatus {
    /// Whether the kernel writes only wanted calls.
    pub on: bool,
    /// The keys it holds.
    pub keys: usize,
    /// The cgroups named by path that the kernel matches below (see
    /// [`crate::event::Event::cgroup_tree`]); 0 while it matches none.
    pub cgroup_roots: usize,
}

/// The `wanted` map and what it holds; lives behind the probe's lock.
pub(crate) struct KernelPrefilter {
    map: MapHandle,
    /// The keys in the map.
    keys: BTreeSet<WantKey>,
}

impl KernelPrefilter {
    pub(crate) fn new(map: MapHandle) -> Result<Self, ProbeError> {
        let size = map.max_entries() as usize;
        if size != PREFILTER_CAPACITY {
            return Err(ProbeError::Setup(format!(
                "the wanted map holds {size} keys, not {PREFILTER_CAPACITY}: rebuild socktapd"
            )));
        }
        Ok(KernelPrefilter {
            map,
            keys: BTreeSet::new(),
        })
    }

    /// The keys in the map (none while the prefilter is off).
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Moves to `want` without a moment in which a call wanted both before
    /// and after is dropped: new keys go in before the programs look for
    /// them, old keys go out after they stopped. `write_dims` stores a
    /// control word in the kernel.
    pub(crate) fn apply(
        &mut self,
        want: &Prefilter,
        mut write_dims: impl FnMut(u32) -> Result<(), ProbeError>,
    ) -> Result<(), ProbeError> {
        let Prefilter::Keys(want) = want else {
            return self.turn_off(write_dims);
        };
        if want.is_empty() || want.len() > PREFILTER_CAPACITY {
            return self.turn_off(write_dims);
        }
        let new: Vec<WantKey> = want.difference(&self.keys).copied().collect();
        if let Err(e) = self.insert(&new) {
            self.turn_off(write_dims)?;
            return Err(e);
        }
        let dims = want.iter().fold(0u32, |d, k| d | 1 << k.dim.code());
        write_dims(dims)?;
        let stale: Vec<WantKey> = self.keys.difference(want).copied().collect();
        self.remove(&stale)
    }

    fn turn_off(&mut self, mut write_dims: impl FnMut(u32) -> Result<(), ProbeError>) -> Result<(), ProbeError> {
        write_dims(0)?;
        let all: Vec<WantKey> = self.keys.iter().copied().collect();
        self.remove(&all)
    }

    /// Adds keys in one system call (a map update costs tens of µs each
    /// here, so 4096 of them one by one held the hub for ~0.2 s). On an
    /// error some may be in: they count as present, so they are removed
    /// with the rest.
    fn insert(&mut self, keys: &[WantKey]) -> Result<(), ProbeError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.keys.extend(keys.iter().copied());
        let values = vec![1u8; keys.len()];
        self.map
            .update_batch(
                &keys_bytes(keys),
                &values,
                keys.len() as u32,
                MapFlags::ANY,
                MapFlags::ANY,
            )
            .map_err(|e| ProbeError::Setup(format!("adding {} prefilter keys: {e:#}", keys.len())))
    }

    /// Removes keys in one system call; if that fails (a key that an
    /// earlier failed insert left out), one by one, missing ones ignored.
    fn remove(&mut self, keys: &[WantKey]) -> Result<(), ProbeError> {
        if keys.is_empty() {
            return Ok(());
        }
        for k in keys {
            self.keys.remove(k);
        }
        if self
            .map
            .delete_batch(&keys_bytes(keys), keys.len() as u32, MapFlags::ANY, MapFlags::ANY)
            .is_ok()
        {
            return Ok(());
        }
        for k in keys {
            let _ = self.map.delete(&keys_bytes(std::slice::from_ref(k)));
        }
        Ok(())
    }
}

/// The map keys, one after the other, as the kernel lays them out.
fn keys_bytes(keys: &[WantKey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * std::mem::size_of::<types::socktap_want_key>());
    for k in keys {
        let key = types::socktap_want_key {
            dim: k.dim.code(),
            pad: 0,
            value: k.value,
        };
        // SAFETY: socktap_want_key is Plain (see skel.rs): no padding.
        out.extend_from_slice(unsafe { plain::as_bytes(&key) });
    }
    out
}
