//! The kernel prefilter: which calls the BPF programs turn into events.
//!
//! While it is on, the programs write only calls that match at least one
//! key of the `wanted` map: a value of the socket cookie, the process id,
//! the cgroup id, the local or remote port, the uid, or the thread name. The hub sets it to the
//! union of what its subscribers' filters can match, so a subscriber
//! watching one port on a busy host costs the other calls a map lookup, not
//! a ring-buffer record. Unwanted calls take no sequence number: a gap in
//! `seq` still means a loss.

use std::collections::{BTreeMap, BTreeSet};

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
    /// Keys no longer wanted and still in the kernel's map: they leave it
    /// once no program can still be looking them up (milliseconds).
    pub stale_keys: usize,
    /// The cgroups named by path that the kernel matches below (see
    /// [`crate::event::Event::cgroup_tree`]); 0 while it matches none.
    pub cgroup_roots: usize,
}

/// The `wanted` map and what it holds; lives behind the probe's lock.
pub(crate) struct KernelPrefilter<M = MapHandle> {
    map: M,
    /// The keys in the map: those wanted, and the stale ones.
    keys: BTreeSet<WantKey>,
    /// Keys in the map that are no longer wanted, each with the number of
    /// the control word that stopped the programs needing it (see
    /// `written`). A program that read an older word may still look one up,
    /// so it leaves the map only after the programs that may have read that
    /// word have returned ([`super::barrier`]).
    stale: BTreeMap<WantKey, u64>,
    /// How many control words this prefilter has written.
    written: u64,
}

impl<M: KeyMap> KernelPrefilter<M> {
    pub(crate) fn new(map: M) -> Result<Self, ProbeError> {
        let size = map.capacity();
        if size != PREFILTER_CAPACITY {
            return Err(ProbeError::Setup(format!(
                "the wanted map holds {size} keys, not {PREFILTER_CAPACITY}: rebuild socktapd"
            )));
        }
        Ok(KernelPrefilter {
            map,
            keys: BTreeSet::new(),
            stale: BTreeMap::new(),
            written: 0,
        })
    }

    /// The keys wanted (none while the prefilter is off).
    pub(crate) fn len(&self) -> usize {
        self.keys.len() - self.stale.len()
    }

    /// Moves to `want` without a moment in which a call wanted both before
    /// and after is dropped: new keys go in before the programs look for
    /// them, and old keys stay in (stale, see [`Self::stale_up_to`]) until
    /// no program may still look for them. `write_dims` stores a control
    /// word in the kernel. `wait_for_programs` (see [`super::barrier`]) is
    /// called only when stale keys leave no room for the new ones.
    pub(crate) fn apply(
        &mut self,
        want: &Prefilter,
        mut write_dims: impl FnMut(u32) -> Result<(), ProbeError>,
        wait_for_programs: impl FnOnce() -> Result<(), ProbeError>,
    ) -> Result<(), ProbeError> {
        let Prefilter::Keys(want) = want else {
            return self.turn_off(write_dims);
        };
        if want.is_empty() || want.len() > PREFILTER_CAPACITY {
            return self.turn_off(write_dims);
        }
        let mut new: Vec<WantKey> = want.difference(&self.keys).copied().collect();
        if self.keys.len() + new.len() > PREFILTER_CAPACITY && !self.stale.is_empty() {
            // Every stale key's word is written: after the wait, none is needed.
            wait_for_programs()?;
            self.remove_stale(self.written);
            new = want.difference(&self.keys).copied().collect();
        }
        if let Err(e) = self.insert(&new) {
            self.turn_off(write_dims)?;
            return Err(e);
        }
        for k in want {
            self.stale.remove(k);
        }
        let dims = want.iter().fold(0u32, |d, k| d | 1 << k.dim.code());
        write_dims(dims)?;
        self.written += 1;
        for k in self.keys.difference(want) {
            self.stale.entry(*k).or_insert(self.written);
        }
        Ok(())
    }

    fn turn_off(&mut self, mut write_dims: impl FnMut(u32) -> Result<(), ProbeError>) -> Result<(), ProbeError> {
        write_dims(0)?;
        self.written += 1;
        for k in &self.keys {
            self.stale.entry(*k).or_insert(self.written);
        }
        Ok(())
    }

    /// The keys no longer wanted, still in the map.
    pub(crate) fn stale_len(&self) -> usize {
        self.stale.len()
    }

    /// When there are stale keys, the number of the last control word
    /// written: once every program running now has returned, no program can
    /// need the keys stale up to that word, and [`Self::remove_stale`] may
    /// take them out.
    pub(crate) fn stale_up_to(&self) -> Option<u64> {
        (!self.stale.is_empty()).then_some(self.written)
    }

    /// Takes out of the map the keys that went stale with control word
    /// `word` or before and are still stale, after a wait for the programs
    /// that began before `stale_up_to` returned `word`.
    pub(crate) fn remove_stale(&mut self, word: u64) {
        let done: Vec<WantKey> = self
            .stale
            .iter()
            .filter(|(_, &since)| since <= word)
            .map(|(k, _)| *k)
            .collect();
        for k in &done {
            self.stale.remove(k);
        }
        self.remove(&done);
    }

    /// Adds keys to the map. On an error some may be in: they count as
    /// present, so they are removed with the rest.
    fn insert(&mut self, keys: &[WantKey]) -> Result<(), ProbeError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.keys.extend(keys.iter().copied());
        self.map.insert(keys)
    }

    fn remove(&mut self, keys: &[WantKey]) {
        if keys.is_empty() {
            return;
        }
        for k in keys {
            self.keys.remove(k);
        }
        self.map.remove(keys);
    }
}

/// Where the prefilter's keys go: the `wanted` map (a stand-in in tests).
pub(crate) trait KeyMap {
    /// The most keys it holds.
    fn capacity(&self) -> usize;
    fn insert(&mut self, keys: &[WantKey]) -> Result<(), ProbeError>;
    /// Missing keys are passed over.
    fn remove(&mut self, keys: &[WantKey]);
}

impl KeyMap for MapHandle {
    fn capacity(&self) -> usize {
        self.max_entries() as usize
    }

    /// In one system call (a map update costs tens of µs each here, so 4096
    /// of them one by one held the hub for ~0.2 s).
    fn insert(&mut self, keys: &[WantKey]) -> Result<(), ProbeError> {
        let values = vec![1u8; keys.len()];
        self.update_batch(
            &keys_bytes(keys),
            &values,
            keys.len() as u32,
            MapFlags::ANY,
            MapFlags::ANY,
        )
        .map_err(|e| ProbeError::Setup(format!("adding {} prefilter keys: {e:#}", keys.len())))
    }

    /// In one system call; if that fails (a key that an earlier failed
    /// insert left out), one by one.
    fn remove(&mut self, keys: &[WantKey]) {
        if self
            .delete_batch(&keys_bytes(keys), keys.len() as u32, MapFlags::ANY, MapFlags::ANY)
            .is_ok()
        {
            return;
        }
        for k in keys {
            let _ = self.delete(&keys_bytes(std::slice::from_ref(k)));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// What the prefilter did, in order.
    #[derive(Debug, PartialEq)]
    enum Step {
        Insert(Vec<u64>),
        Remove(Vec<u64>),
        Dims(u32),
        Wait,
    }

    type Log = Rc<RefCell<Vec<Step>>>;

    /// A map that holds at most PREFILTER_CAPACITY keys, as the kernel's.
    struct FakeMap {
        log: Log,
        held: BTreeSet<WantKey>,
    }

    impl KeyMap for FakeMap {
        fn capacity(&self) -> usize {
            PREFILTER_CAPACITY
        }
        fn insert(&mut self, keys: &[WantKey]) -> Result<(), ProbeError> {
            self.log
                .borrow_mut()
                .push(Step::Insert(keys.iter().map(|k| k.value).collect()));
            self.held.extend(keys.iter().copied());
            if self.held.len() > PREFILTER_CAPACITY {
                return Err(ProbeError::Setup("E2BIG".into()));
            }
            Ok(())
        }
        fn remove(&mut self, keys: &[WantKey]) {
            self.log
                .borrow_mut()
                .push(Step::Remove(keys.iter().map(|k| k.value).collect()));
            for k in keys {
                self.held.remove(k);
            }
        }
    }

    fn prefilter() -> (KernelPrefilter<FakeMap>, Log) {
        let log = Log::default();
        let map = FakeMap {
            log: log.clone(),
            held: BTreeSet::new(),
        };
        (KernelPrefilter::new(map).unwrap(), log)
    }

    fn cookies(values: impl IntoIterator<Item = u64>) -> Prefilter {
        Prefilter::Keys(
            values
                .into_iter()
                .map(|value| WantKey {
                    dim: WantDim::Cookie,
                    value,
                })
                .collect(),
        )
    }

    fn cookie_dims() -> u32 {
        1 << WantDim::Cookie.code()
    }

    fn apply(p: &mut KernelPrefilter<FakeMap>, log: &Log, want: &Prefilter) {
        let dims_log = log.clone();
        let wait_log = log.clone();
        p.apply(
            want,
            |dims| {
                dims_log.borrow_mut().push(Step::Dims(dims));
                Ok(())
            },
            || {
                wait_log.borrow_mut().push(Step::Wait);
                Ok(())
            },
        )
        .unwrap();
    }

    /// A program that read the word before may still look a key up: a key
    /// stays in the map when the prefilter turns off or stops wanting it,
    /// and one wanted again is not inserted twice.
    #[test]
    fn keys_no_longer_wanted_stay_in_until_taken_out() {
        let (mut p, log) = prefilter();
        apply(&mut p, &log, &cookies([7, 8]));
        apply(&mut p, &log, &cookies([7]));
        apply(&mut p, &log, &Prefilter::Everything);
        assert_eq!(
            *log.borrow(),
            [
                Step::Insert(vec![7, 8]),
                Step::Dims(cookie_dims()),
                Step::Dims(cookie_dims()),
                Step::Dims(0)
            ]
        );
        assert_eq!((p.len(), p.stale_up_to()), (0, Some(3)));
        apply(&mut p, &log, &cookies([7]));
        assert_eq!(log.borrow().last(), Some(&Step::Dims(cookie_dims())));
        assert_eq!(log.borrow().len(), 5, "7 was still in the map: {:?}", log.borrow());
        assert_eq!((p.len(), p.stale_up_to()), (1, Some(4)));
        p.remove_stale(4);
        assert_eq!(log.borrow().last(), Some(&Step::Remove(vec![8])));
        assert_eq!((p.len(), p.stale_up_to()), (1, None));
    }

    /// A key goes out only with a word at or after the one that made it
    /// stale: the wait began after that word was written. A key wanted
    /// again and then dropped again counts from the later word.
    #[test]
    fn stale_keys_go_out_only_after_a_wait_begun_after_their_word() {
        let (mut p, log) = prefilter();
        apply(&mut p, &log, &cookies([1, 2, 3])); // word 1
        apply(&mut p, &log, &cookies([1, 3])); // word 2: 2 stale
        let seen = p.stale_up_to();
        assert_eq!(seen, Some(2));
        apply(&mut p, &log, &cookies([3])); // word 3: 1 stale since 3
        apply(&mut p, &log, &cookies([2, 3])); // word 4: 2 wanted again
        apply(&mut p, &log, &cookies([3])); // word 5: 2 stale since 5
        p.remove_stale(seen.unwrap());
        assert!(
            !log.borrow().iter().any(|s| matches!(s, Step::Remove(_))),
            "nothing stale since word 2 or before: {:?}",
            log.borrow()
        );
        p.remove_stale(3);
        assert_eq!(log.borrow().last(), Some(&Step::Remove(vec![1])));
        p.remove_stale(5);
        assert_eq!(log.borrow().last(), Some(&Step::Remove(vec![2])));
        assert_eq!((p.len(), p.stale_up_to()), (1, None));
    }

    /// When stale keys leave no room for new ones, the prefilter waits for
    /// the programs, takes them out, and then inserts.
    #[test]
    fn stale_keys_that_leave_no_room_go_out_after_a_wait() {
        let (mut p, log) = prefilter();
        apply(&mut p, &log, &cookies(0..3000));
        apply(&mut p, &log, &cookies([9999]));
        log.borrow_mut().clear();
        apply(&mut p, &log, &cookies(3000..6000));
        let steps = log.borrow();
        assert_eq!(steps[0], Step::Wait, "{:?}", &steps[..2]);
        assert_eq!(steps[1], Step::Remove((0..3000).collect()));
        assert_eq!(steps[2], Step::Insert((3000..6000).collect()));
        assert_eq!(steps[3], Step::Dims(cookie_dims()));
        assert_eq!(p.len(), 3000);
    }
}
