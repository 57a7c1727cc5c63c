//! cgroup v2 paths in filters (`EventFilter.cgroup_paths`), resolved on
//! socktapd's host to the cgroup ids its events carry (a cgroup v2 id is
//! the inode number of the cgroup's directory), and followed while the
//! streams that name them live.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use socktap_proto::v1 as pb;
use tracing::debug;

use crate::hub::{Hub, Selector, Subscriber};

/// How often the followed streams' cgroup paths are resolved anew, so that
/// a cgroup created below one (a container started, a service restarted)
/// becomes one of the filter's ids: a kernel prefilter key, and matched in
/// history. Its calls are matched before that, from the first, through the
/// named cgroup above it ([`crate::event::Event::cgroup_tree`]).
pub const CGROUP_REFRESH: Duration = Duration::from_secs(1);

/// Resolves the cgroup paths of every stream that names some, every
/// [`CGROUP_REFRESH`], and gives the hub a subscriber's new ids when they
/// changed. Each distinct path is walked once per round, however many
/// streams name it. A path that no longer resolves (its cgroup removed, or
/// its tree now larger than the filter's room) keeps the ids it had until
/// it resolves again. Its task runs only while some stream is followed.
pub struct CgroupFollower {
    hub: Hub,
    tree: Arc<CgroupTree>,
    /// The followed streams; None while no task runs.
    streams: Mutex<Option<Vec<Followed>>>,
}

/// A request's allow and deny filters.
type Filters = Arc<(Vec<pb::EventFilter>, Vec<pb::EventFilter>)>;

/// One followed stream: its subscriber and its request's filters.
struct Followed {
    sub: Weak<Subscriber>,
    filters: Filters,
}

impl CgroupFollower {
    /// A follower for `hub`'s subscribers, resolving in `tree`.
    pub fn new(hub: Hub, tree: Arc<CgroupTree>) -> CgroupFollower {
        CgroupFollower {
            hub,
            tree,
            streams: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Followed>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows `sub`, subscribed with these filters, until it is gone.
    /// Starts the task when none runs; needs a tokio runtime.
    pub fn follow(self: &Arc<Self>, sub: &Arc<Subscriber>, allow: Vec<pb::EventFilter>, deny: Vec<pb::EventFilter>) {
        let followed = Followed {
            sub: Arc::downgrade(sub),
            filters: Arc::new((allow, deny)),
        };
        let mut streams = self.lock();
        match streams.as_mut() {
            Some(v) => v.push(followed),
            None => {
                *streams = Some(vec![followed]);
                tokio::spawn(self.clone().run());
            }
        }
    }

    async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CGROUP_REFRESH).await;
            let streams: Vec<(u64, Filters)> = {
                let mut guard = self.lock();
                let Some(v) = guard.as_mut() else { return };
                v.retain(|f| f.sub.strong_count() > 0);
                if v.is_empty() {
                    *guard = None;
                    return;
                }
                v.iter()
                    .filter_map(|f| Some((f.sub.upgrade()?.id, f.filters.clone())))
                    .collect()
            };
            let tree = self.tree.clone();
            let limits = self.hub.config().filter_limits;
            let resolved = tokio::task::spawn_blocking(move || {
                // Each distinct path once, however many streams name it.
                let paths: BTreeSet<&str> = streams
                    .iter()
                    .flat_map(|(_, f)| f.0.iter().chain(&f.1))
                    .flat_map(|f| f.cgroup_paths.iter().map(String::as_str))
                    .collect();
                let ids: HashMap<&str, Result<Vec<u64>, String>> =
                    paths.into_iter().map(|p| (p, tree.resolve(p, limits.max_values))).collect();
                let resolve = |p: &str, room: usize| match ids.get(p) {
                    Some(Ok(ids)) if ids.len() <= room => Ok(ids.clone()),
                    Some(Ok(ids)) => Err(format!(
                        "{p:?} has {} cgroups (itself and those below it), more than the {room} this filter has room for",
                        ids.len()
                    )),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err(format!("{p:?} was not resolved")),
                };
                streams
                    .iter()
                    .map(|(id, f)| (*id, Selector::compile_with(&f.0, &f.1, limits, &resolve)))
                    .collect::<Vec<_>>()
            })
            .await;
            // Err: the runtime is shutting down.
            let Ok(resolved) = resolved else { return };
            for (id, selector) in resolved {
                match selector {
                    Ok(selector) => {
                        self.hub.reselect(id, selector);
                    }
                    Err(e) => debug!(id, "cgroup paths kept as they were: {e}"),
                }
            }
        }
    }
}

/// The host's cgroup v2 hierarchy, as socktapd sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupTree {
    /// Where cgroup2 is mounted (`/sys/fs/cgroup`, or
    /// `/sys/fs/cgroup/unified` on a hybrid host); None when it is not.
    mount: Option<PathBuf>,
}

impl CgroupTree {
    /// The hierarchy mounted on this host: the first cgroup2 mount of its
    /// root in `/proc/self/mountinfo`.
    pub fn discover() -> CgroupTree {
        CgroupTree {
            mount: crate::mounts::cgroup2_root(),
        }
    }

    /// A hierarchy mounted at `mount`.
    #[cfg(test)]
    fn at(mount: impl Into<PathBuf>) -> CgroupTree {
        CgroupTree {
            mount: Some(mount.into()),
        }
    }

    /// Where cgroup2 is mounted, if it is.
    pub fn mount(&self) -> Option<&Path> {
        self.mount.as_deref()
    }

    /// The ids of the cgroup at `path` and of every cgroup below it, as
    /// they are now; at most `max` of them. `path` is the cgroup's
    /// directory (under the mount point), or its path in the hierarchy as
    /// `/proc/PID/cgroup` shows it (`/system.slice/nginx.service`; the
    /// leading `/` is optional). The error says why, in words for a
    /// client.
    pub fn resolve(&self, path: &str, max: usize) -> Result<Vec<u64>, String> {
        let mount = self
            .mount
            .as_deref()
            .ok_or("no cgroup2 file system is mounted on socktapd's host")?;
        if path.is_empty() {
            return Err("is empty: name a cgroup, e.g. /system.slice/nginx.service".into());
        }
        let given = Path::new(path);
        let within = given
            .strip_prefix(mount)
            .unwrap_or_else(|_| given.strip_prefix("/").unwrap_or(given));
        if within.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("{path:?} has a . or .. in it; name the cgroup itself"));
        }
        let dir = mount.join(within);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{path:?} is not a cgroup (cgroup2 is mounted at {})",
                    mount.display()
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "no cgroup {path:?} (cgroup2 is mounted at {})",
                    mount.display()
                ))
            }
            Err(e) => return Err(format!("{path:?}: {e}")),
        }
        let mut ids = Vec::new();
        let mut todo = vec![dir];
        while let Some(dir) = todo.pop() {
            let meta = match std::fs::symlink_metadata(&dir) {
                Ok(m) => m,
                // Removed while we looked: it has no events to match.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            };
            if ids.len() == max {
                return Err(format!(
                    "{path:?} has more than the {max} cgroups this filter has room for (itself and those below it); name cgroups further down"
                ));
            }
            ids.push(meta.ino());
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            };
            for entry in entries.flatten() {
                // A cgroup's children are its subdirectories; the rest are
                // its control files.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(entry.path());
                }
            }
        }
        if ids.is_empty() {
            return Err(format!("no cgroup {path:?} (it was removed)"));
        }
        Ok(ids)
    }

    /// The paths of the cgroups among `ids` that exist now, as
    /// `/proc/PID/cgroup` shows them (`/system.slice/nginx.service`, `/`
    /// for the root), found by walking the hierarchy until every id is
    /// found or none is left to look at. An id with no cgroup is absent.
    pub fn paths_of(&self, ids: &HashSet<u64>) -> Result<HashMap<u64, String>, String> {
        let mount = self
            .mount
            .as_deref()
            .ok_or("no cgroup2 file system is mounted on socktapd's host")?;
        let mut paths = HashMap::new();
        let mut todo = vec![mount.to_path_buf()];
        while let Some(dir) = todo.pop() {
            if paths.len() == ids.len() {
                break;
            }
            // A cgroup removed while we looked has no path to give, and
            // one we may not read (not root) hides only its own subtree.
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            if ids.contains(&meta.ino()) {
                let within = dir.strip_prefix(mount).unwrap_or(&dir);
                paths.insert(meta.ino(), format!("/{}", within.display()));
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(entry.path());
                }
            }
        }
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_follower_gives_new_cgroups_to_every_stream_then_stops() {
        use crate::event::Event;
        use crate::hub::{FilterLimits, HubConfig, Item, Source, Start};
        use crate::probe::Batch;

        let root = std::env::temp_dir().join(format!("socktap-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("app")).unwrap();
        let tree = Arc::new(CgroupTree::at(&root));
        let hub = Hub::new(HubConfig::default(), Source::default());
        let follower = Arc::new(CgroupFollower::new(hub.clone(), tree.clone()));
        let filter = pb::EventFilter {
            cgroup_paths: vec!["/app".into()],
            ..Default::default()
        };
        let subscribe = |peer: &str| {
            let r = pb::WatchEventsRequest {
                allow: vec![filter.clone()],
                ..Default::default()
            };
            let resolve = |p: &str, max: usize| tree.resolve(p, max);
            let selector = Selector::compile_with(&r.allow, &r.deny, FilterLimits::default(), &resolve).unwrap();
            let sub = hub.subscribe(peer.into(), r, selector, Start::Live).unwrap();
            follower.follow(&sub, vec![filter.clone()], vec![]);
            sub
        };
        let (a, b) = (subscribe("a"), subscribe("b"));

        // A cgroup made below /app after both subscribed.
        let new = root.join("app/new");
        std::fs::create_dir(&new).unwrap();
        let event = |seq| Event {
            cgroup_id: std::fs::metadata(&new).unwrap().ino(),
            ..Event::sample(seq, 1)
        };
        let taken = |s: &Subscriber| {
            let mut items = Vec::new();
            s.take(100, usize::MAX, &mut items);
            items
                .iter()
                .map(|i| match i {
                    Item::Events(run) => run.count(),
                    Item::Lost(_) => 0,
                })
                .sum::<usize>()
        };
        hub.dispatch(Batch {
            events: vec![event(1)],
            ..Default::default()
        });
        assert_eq!((taken(&a), taken(&b)), (0, 0), "not resolved yet");
        let mut seq = 1;
        let (mut got_a, mut got_b) = (0, 0);
        for _ in 0..50 {
            tokio::time::sleep(CGROUP_REFRESH / 10).await;
            seq += 1;
            hub.dispatch(Batch {
                events: vec![event(seq)],
                ..Default::default()
            });
            got_a += taken(&a);
            got_b += taken(&b);
            if got_a > 0 && got_b > 0 {
                break;
            }
        }
        assert!(got_a > 0 && got_b > 0, "both streams follow the new cgroup");

        hub.unsubscribe(a.id);
        hub.unsubscribe(b.id);
        drop((a, b));
        for _ in 0..50 {
            if follower.lock().is_none() {
                break;
            }
            tokio::time::sleep(CGROUP_REFRESH / 10).await;
        }
        assert!(follower.lock().is_none(), "its task stopped with no stream left");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn resolves_a_tree_to_its_inodes_in_either_form() {
        let root = std::env::temp_dir().join(format!("socktap-cgroups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let app = root.join("system.slice/app.service");
        std::fs::create_dir_all(app.join("worker")).unwrap();
        std::fs::write(app.join("cgroup.procs"), "").unwrap();
        std::fs::create_dir_all(root.join("user.slice")).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let tree = CgroupTree::at(&root);

        let mut ids = tree.resolve("/system.slice/app.service", 10).unwrap();
        ids.sort_unstable();
        let mut want = vec![ino(&app), ino(&app.join("worker"))];
        want.sort_unstable();
        assert_eq!(ids, want, "the cgroup and the one below it, not its files");
        let full = format!("{}", app.display());
        let mut same = tree.resolve(&full, 10).unwrap();
        same.sort_unstable();
        assert_eq!(same, want, "its directory names it too");
        assert_eq!(
            tree.resolve("system.slice/app.service/worker", 10).unwrap(),
            vec![ino(&app.join("worker"))]
        );
        assert_eq!(tree.resolve("/", 10).unwrap().len(), 5, "the root and all four below");

        let err = tree.resolve("/system.slice/nope.service", 10).unwrap_err();
        assert!(err.starts_with("no cgroup \"/system.slice/nope.service\""), "{err}");
        let err = tree.resolve("/system.slice/app.service/cgroup.procs", 10).unwrap_err();
        assert!(err.contains("is not a cgroup"), "{err}");
        let err = tree.resolve("/system.slice/../user.slice", 10).unwrap_err();
        assert!(err.contains(".."), "{err}");
        assert!(tree.resolve("", 10).unwrap_err().contains("empty"));
        let err = tree.resolve("/", 4).unwrap_err();
        assert!(err.contains("more than the 4 cgroups"), "{err}");
        let err = CgroupTree { mount: None }.resolve("/x", 4).unwrap_err();
        assert!(err.contains("no cgroup2"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn names_cgroups_by_their_ids() {
        let root = std::env::temp_dir().join(format!("socktap-cgroup-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let app = root.join("system.slice/app.service");
        std::fs::create_dir_all(app.join("worker")).unwrap();
        std::fs::create_dir_all(root.join("user.slice")).unwrap();
        let file = app.join("cgroup.procs");
        std::fs::write(&file, "").unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let tree = CgroupTree::at(&root);

        let gone = root.join("gone");
        std::fs::create_dir(&gone).unwrap();
        let gone_id = ino(&gone);
        std::fs::remove_dir(&gone).unwrap();
        let ids: HashSet<u64> = [ino(&root), ino(&app.join("worker")), ino(&file), gone_id].into();
        let paths = tree.paths_of(&ids).unwrap();
        let want: HashMap<u64, String> = [
            (ino(&root), "/".to_owned()),
            (ino(&app.join("worker")), "/system.slice/app.service/worker".to_owned()),
        ]
        .into();
        assert_eq!(paths, want, "cgroups only (not their files), removed ones absent");
        assert_eq!(tree.paths_of(&HashSet::new()).unwrap(), HashMap::new());
        let err = CgroupTree { mount: None }.paths_of(&ids).unwrap_err();
        assert!(err.contains("no cgroup2"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
