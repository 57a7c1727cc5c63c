//! Compiles the API's allow/deny filters into a matcher, validating them on
//! the way. Matching is OR between filters, AND between the fields of one
//! filter, OR within a field's values; deny wins.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use socktap_proto::v1 as pb;

use crate::event::{Event, EventKind};
use crate::probe::{comm_key, WantDim, WantKey, PREFILTER_CAPACITY};

/// Limits on a filter request.
#[derive(Clone, Copy, Debug)]
pub struct FilterLimits {
    /// Filters per allow or deny list.
    pub max_filters: usize,
    /// Values per field of one filter.
    pub max_values: usize,
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            max_filters: 64,
            max_values: 1024,
        }
    }
}

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field's path in the request, e.g. `allow[0].remote_cidrs[1]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A small set with binary-search lookups; empty means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AnyOf<T: Ord>(Vec<T>);

impl<T: Ord + Copy> AnyOf<T> {
    fn new(mut v: Vec<T>) -> Self {
        v.sort_unstable();
        v.dedup();
        AnyOf(v)
    }
    fn admits(&self, x: T) -> bool {
        self.0.is_empty() || self.has(x)
    }
    fn has(&self, x: T) -> bool {
        self.0.binary_search(&x).is_ok()
    }
}

/// One compiled `EventFilter`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Compiled {
    cookies: AnyOf<u64>,
    pids: AnyOf<u32>,
    uids: AnyOf<u32>,
    /// The ids given, and the cgroups of the paths given as resolved.
    cgroup_ids: AnyOf<u64>,
    /// Of those, the cgroups of the paths: an event whose
    /// [`Event::cgroup_tree`] is one of them is in their trees too.
    cgroup_trees: AnyOf<u64>,
    /// The cgroups the paths name (the first id of each).
    cgroup_roots: Vec<u64>,
    local_ports: AnyOf<u16>,
    remote_ports: AnyOf<u16>,
    /// 4 or 6.
    families: AnyOf<u8>,
    kinds: AnyOf<u8>,
    comms: Vec<Vec<u8>>,
    comm_prefixes: Vec<Vec<u8>>,
    remote_nets: Vec<IpNet>,
    errors_only: bool,
}

impl Compiled {
    fn matches(&self, e: &Event) -> bool {
        self.cookies.admits(e.cookie)
            && self.pids.admits(e.pid)
            && self.uids.admits(e.uid)
            && (self.cgroup_ids.admits(e.cgroup_id) || (e.cgroup_tree != 0 && self.cgroup_trees.has(e.cgroup_tree)))
            && self.local_ports.admits(e.local.port())
            && self.remote_ports.admits(e.remote.port())
            && self.families.admits(if e.remote.is_ipv4() { 4 } else { 6 })
            && self.kinds.admits(kind_code(e.kind))
            && (!self.errors_only || e.is_error())
            && (self.comms.is_empty() || self.comms.iter().any(|c| c == e.comm.as_bytes()))
            && (self.comm_prefixes.is_empty() || self.comm_prefixes.iter().any(|p| e.comm.as_bytes().starts_with(p)))
            && (self.remote_nets.is_empty() || self.remote_nets.iter().any(|n| n.contains(&e.remote.ip())))
    }
}

impl Compiled {
    /// Whether this filter constrains one field only, and that field is
    /// one where an event's key ([`key_of`]) equals one of the filter's
    /// keys exactly when the filter admits the event: cookies, pids, uids
    /// or ports. (Not cgroups: a path's ids also match through
    /// [`Event::cgroup_tree`], and a plain id must not. Not comms: the key
    /// folds the name.) Every other field is compared with its default,
    /// "any", so a field added later counts as a constraint.
    fn constrains_one_exact_field(&self) -> bool {
        // Each takes one exact field out, saying whether it had values.
        let exact: [fn(&mut Compiled) -> bool; 5] = [
            |c| !std::mem::take(&mut c.cookies).0.is_empty(),
            |c| !std::mem::take(&mut c.pids).0.is_empty(),
            |c| !std::mem::take(&mut c.uids).0.is_empty(),
            |c| !std::mem::take(&mut c.local_ports).0.is_empty(),
            |c| !std::mem::take(&mut c.remote_ports).0.is_empty(),
        ];
        exact.iter().any(|take| {
            let mut rest = self.clone();
            take(&mut rest) && rest == Compiled::default()
        })
    }

    /// Values of one field that every event this filter matches has one
    /// of: the field the kernel prefilter can check that has the fewest
    /// values. None when the filter constrains none of those fields.
    fn kernel_keys(&self) -> Option<impl Iterator<Item = WantKey> + '_> {
        let fields: [(WantDim, Vec<u64>); 7] = [
            (WantDim::Cookie, self.cookies.0.clone()),
            (WantDim::Pid, self.pids.0.iter().map(|&v| v.into()).collect()),
            (WantDim::Cgroup, self.cgroup_ids.0.clone()),
            (
                WantDim::LocalPort,
                self.local_ports.0.iter().map(|&v| v.into()).collect(),
            ),
            (
                WantDim::RemotePort,
                self.remote_ports.0.iter().map(|&v| v.into()).collect(),
            ),
            (WantDim::Uid, self.uids.0.iter().map(|&v| v.into()).collect()),
            (WantDim::Comm, self.comms.iter().map(|c| comm_key(c)).collect()),
        ];
        let (dim, values) = fields
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .min_by_key(|(_, v)| v.len())?;
        Some(values.into_iter().map(move |value| WantKey { dim, value }))
    }
}

fn kind_code(k: EventKind) -> u8 {
    match k {
        EventKind::Send => 1,
        EventKind::Recv => 2,
    }
}

/// The compiled allow and deny lists of one subscriber. Equal selectors
/// select the same events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    allow: Vec<Compiled>,
    deny: Vec<Compiled>,
    /// See [`Selector::kernel_keys`]; computed once, when compiled.
    kernel: Option<BTreeSet<WantKey>>,
    /// An event that has one of the kernel keys matches: no deny filter,
    /// and each allow filter constrains one exact field only (see
    /// [`Compiled::constrains_one_exact_field`]), whose values are its
    /// keys. [`match_all`] then takes such events without matching them.
    keys_decide: bool,
}

/// Resolves a filter's `cgroup_paths` entry to cgroup ids, the named
/// cgroup's first and then those below it, at most the given number of
/// them; the error says why, for the client.
pub type CgroupResolver<'a> = &'a dyn Fn(&str, usize) -> Result<Vec<u64>, String>;

impl Selector {
    /// Validates and compiles a request's filters, which must not name
    /// cgroup paths (see [`Selector::compile_with`]).
    pub fn compile(
        allow: &[pb::EventFilter],
        deny: &[pb::EventFilter],
        limits: FilterLimits,
    ) -> Result<Self, FieldError> {
        Self::compile_with(allow, deny, limits, &|_, _| {
            Err("cgroup paths are not resolved here".to_owned())
        })
    }

    /// Validates and compiles a request's filters, with `cgroups` to turn
    /// their cgroup paths into ids.
    pub fn compile_with(
        allow: &[pb::EventFilter],
        deny: &[pb::EventFilter],
        limits: FilterLimits,
        cgroups: CgroupResolver<'_>,
    ) -> Result<Self, FieldError> {
        let allow = compile_list("allow", allow, limits, cgroups)?;
        let deny = compile_list("deny", deny, limits, cgroups)?;
        let kernel = kernel_keys_of(&allow);
        let keys_decide = kernel.is_some() && deny.is_empty() && allow.iter().all(Compiled::constrains_one_exact_field);
        Ok(Selector {
            kernel,
            allow,
            deny,
            keys_decide,
        })
    }

    /// True when the event should be delivered.
    pub fn matches(&self, e: &Event) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|f| f.matches(e))) && !self.deny.iter().any(|f| f.matches(e))
    }

    /// Keys for the kernel prefilter such that every event this selector
    /// matches has at least one of them; None when it needs every event:
    /// no allow filter, one without a cookie, pid, cgroup, port, uid or
    /// exact comm, or more keys than the kernel's map holds
    /// ([`PREFILTER_CAPACITY`]). Deny filters are left to the hub.
    pub fn kernel_keys(&self) -> Option<&BTreeSet<WantKey>> {
        self.kernel.as_ref()
    }

    /// The cgroups its filters name by path (allow and deny), for the
    /// kernel to find below them the cgroups created since they were
    /// resolved (see [`Event::cgroup_tree`]).
    pub fn cgroup_roots(&self) -> impl Iterator<Item = u64> + '_ {
        self.allow
            .iter()
            .chain(&self.deny)
            .flat_map(|f| f.cgroup_roots.iter().copied())
    }
}

/// The value an event has in a prefilter field (ports and pids widened,
/// the comm folded as the BPF programs fold it).
fn key_of(e: &Event, dim: WantDim) -> WantKey {
    let value = match dim {
        WantDim::Cookie => e.cookie,
        WantDim::Pid => e.pid.into(),
        WantDim::Cgroup => e.cgroup_id,
        WantDim::LocalPort => e.local.port().into(),
        WantDim::RemotePort => e.remote.port().into(),
        WantDim::Uid => e.uid.into(),
        WantDim::Comm => comm_key(e.comm.as_bytes()),
    };
    WantKey { dim, value }
}

/// Which events each of `selectors` matches: for each selector, the
/// indexes of its events, ascending. Selectors with kernel keys are looked
/// up by the events' own values (every event a selector matches has one of
/// its keys), so an event is matched against only the selectors that may
/// want it, not all of them (16 subscribers watching a socket each: one
/// lookup per event instead of 16 matches). The others see every event.
pub fn match_all(selectors: &[&Selector], events: &[Event]) -> Vec<Vec<u32>> {
    let mut taken = vec![Vec::new(); selectors.len()];
    let mut index: Vec<(WantKey, usize)> = Vec::new();
    let mut scan = Vec::new();
    for (k, s) in selectors.iter().enumerate() {
        match s.kernel_keys() {
            Some(keys) => index.extend(keys.iter().map(|&key| (key, k))),
            None => scan.push(k),
        }
    }
    index.sort_unstable();
    let mut dims: Vec<WantDim> = index.iter().map(|(key, _)| key.dim).collect();
    dims.dedup();
    // The last event each selector was matched against: one event may
    // reach a selector through several of its keys.
    let mut seen = vec![u32::MAX; selectors.len()];
    for (i, e) in events.iter().enumerate() {
        let i = i as u32;
        for &dim in &dims {
            let key = key_of(e, dim);
            // A cgroup created below a path since it was resolved is not a
            // key yet; the nearest named cgroup above it is.
            let tree =
                (dim == WantDim::Cgroup && e.cgroup_tree != 0 && e.cgroup_tree != e.cgroup_id).then_some(WantKey {
                    dim,
                    value: e.cgroup_tree,
                });
            for key in std::iter::once(key).chain(tree) {
                let from = index.partition_point(|(k, _)| *k < key);
                for &(_, k) in index[from..].iter().take_while(|(k, _)| *k == key) {
                    if seen[k] != i {
                        seen[k] = i;
                        if selectors[k].keys_decide || selectors[k].matches(e) {
                            taken[k].push(i);
                        }
                    }
                }
            }
        }
        for &k in &scan {
            if selectors[k].matches(e) {
                taken[k].push(i);
            }
        }
    }
    taken
}

/// See [`Selector::kernel_keys`].
fn kernel_keys_of(allow: &[Compiled]) -> Option<BTreeSet<WantKey>> {
    if allow.is_empty() {
        return None;
    }
    let mut keys = BTreeSet::new();
    for f in allow {
        keys.extend(f.kernel_keys()?);
        if keys.len() > PREFILTER_CAPACITY {
            return None;
        }
    }
    Some(keys)
}

fn compile_list(
    name: &str,
    list: &[pb::EventFilter],
    limits: FilterLimits,
    cgroups: CgroupResolver<'_>,
) -> Result<Vec<Compiled>, FieldError> {
    if list.len() > limits.max_filters {
        return Err(FieldError::new(
            name,
            format!(
                "{} filters is more than the limit of {}",
                list.len(),
                limits.max_filters
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, f)| {
            let path = format!("{name}[{i}]");
            if name == "deny" && *f == pb::EventFilter::default() {
                return Err(FieldError::new(
                    path,
                    "an empty filter matches every event, so it would deny them all",
                ));
            }
            compile_one(&path, f, limits, cgroups)
        })
        .collect()
}

fn compile_one(
    path: &str,
    f: &pb::EventFilter,
    limits: FilterLimits,
    cgroups: CgroupResolver<'_>,
) -> Result<Compiled, FieldError> {
    let field = |name: &str| format!("{path}.{name}");
    let check_len = |name: &str, len: usize| {
        if len > limits.max_values {
            Err(FieldError::new(
                field(name),
                format!("{len} values is more than the limit of {}", limits.max_values),
            ))
        } else {
            Ok(())
        }
    };
    check_len("cookies", f.cookies.len())?;
    check_len("pids", f.pids.len())?;
    check_len("comms", f.comms.len())?;
    check_len("comm_prefixes", f.comm_prefixes.len())?;
    check_len("uids", f.uids.len())?;
    check_len("cgroup_ids", f.cgroup_ids.len())?;
    check_len("cgroup_paths", f.cgroup_paths.len())?;
    check_len("local_ports", f.local_ports.len())?;
    check_len("remote_ports", f.remote_ports.len())?;
    check_len("remote_cidrs", f.remote_cidrs.len())?;
    check_len("families", f.families.len())?;
    check_len("kinds", f.kinds.len())?;

    let ports = |name: &str, v: &[u32]| -> Result<AnyOf<u16>, FieldError> {
        v.iter()
            .enumerate()
            .map(|(i, &p)| match u16::try_from(p) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(FieldError::new(
                    format!("{}[{i}]", field(name)),
                    format!("{p} is not a port (1-65535)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(AnyOf::new)
    };
    let comms = |name: &str, v: &[String], exact: bool| -> Result<Vec<Vec<u8>>, FieldError> {
        v.iter()
            .enumerate()
            .map(|(i, c)| {
                if c.is_empty() || c.len() > 15 || c.contains('\0') {
                    let what = if exact { "a thread name" } else { "a thread name prefix" };
                    Err(FieldError::new(
                        format!("{}[{i}]", field(name)),
                        format!("{c:?} is not {what} (1-15 bytes)"),
                    ))
                } else {
                    Ok(c.as_bytes().to_vec())
                }
            })
            .collect()
    };
    // cgroup_ids and cgroup_paths are one condition: any of their cgroups.
    let mut cgroup_ids = f.cgroup_ids.clone();
    let mut cgroup_trees = Vec::new();
    let mut cgroup_roots = Vec::new();
    for (i, p) in f.cgroup_paths.iter().enumerate() {
        let room = limits.max_values.saturating_sub(cgroup_ids.len());
        let at = || format!("{}[{i}]", field("cgroup_paths"));
        let ids = cgroups(p, room).map_err(|r| FieldError::new(at(), r))?;
        if ids.is_empty() {
            // An empty list would admit every cgroup.
            return Err(FieldError::new(at(), format!("{p:?} is no cgroup")));
        }
        cgroup_roots.push(ids[0]);
        cgroup_trees.extend_from_slice(&ids);
        cgroup_ids.extend(ids);
    }
    let remote_nets = f
        .remote_cidrs
        .iter()
        .enumerate()
        .map(|(i, c)| parse_cidr(c).map_err(|r| FieldError::new(format!("{}[{i}]", field("remote_cidrs")), r)))
        .collect::<Result<Vec<_>, _>>()?;
    let families = f
        .families
        .iter()
        .enumerate()
        .map(|(i, &v)| match pb::AddressFamily::try_from(v) {
            Ok(pb::AddressFamily::Ipv4) => Ok(4),
            Ok(pb::AddressFamily::Ipv6) => Ok(6),
            _ => Err(FieldError::new(
                format!("{}[{i}]", field("families")),
                format!("{v} is not an address family (IPV4 or IPV6)"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kinds = f
        .kinds
        .iter()
        .enumerate()
        .map(|(i, &v)| match pb::EventKind::try_from(v) {
            Ok(pb::EventKind::Send) => Ok(1),
            Ok(pb::EventKind::Recv) => Ok(2),
            _ => Err(FieldError::new(
                format!("{}[{i}]", field("kinds")),
                format!("{v} is not an event kind (SEND or RECV)"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Compiled {
        cookies: AnyOf::new(f.cookies.clone()),
        pids: AnyOf::new(f.pids.clone()),
        uids: AnyOf::new(f.uids.clone()),
        cgroup_ids: AnyOf::new(cgroup_ids),
        cgroup_trees: AnyOf::new(cgroup_trees),
        cgroup_roots,
        local_ports: ports("local_ports", &f.local_ports)?,
        remote_ports: ports("remote_ports", &f.remote_ports)?,
        families: AnyOf::new(families),
        kinds: AnyOf::new(kinds),
        comms: comms("comms", &f.comms, true)?,
        comm_prefixes: comms("comm_prefixes", &f.comm_prefixes, false)?,
        remote_nets,
        errors_only: f.errors_only,
    })
}

/// Parses "10.0.0.0/8", "fd00::/8" or a bare address (a single host).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8, fd00::/8) or an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AttachMode, Comm};

    pub(crate) fn ev(cookie: u64, pid: u32, comm: &str, remote: &str, kind: EventKind, errno: u32) -> Event {
        Event {
            seq: 0,
            timestamp_ns: 1,
            cookie,
            kind,
            bytes: if errno == 0 { 10 } else { 0 },
            errno,
            pid,
            tid: pid,
            uid: 1000,
            cgroup_id: 7,
            cgroup_tree: 0,
            netns: 1,
            cpu: 0,
            comm: Comm::from_kernel(comm.as_bytes()),
            local: "127.0.0.1:4000".parse().unwrap(),
            remote: remote.parse().unwrap(),
            mode: AttachMode::Tracepoint,
        }
    }

    fn sel(allow: Vec<pb::EventFilter>, deny: Vec<pb::EventFilter>) -> Selector {
        Selector::compile(&allow, &deny, FilterLimits::default()).unwrap()
    }

    /// What the BPF programs' prefilter (`wanted_call`) lets through.
    pub(crate) fn kernel_admits(keys: Option<&BTreeSet<WantKey>>, e: &Event) -> bool {
        let Some(keys) = keys else { return true };
        [
            (WantDim::Cookie, e.cookie),
            (WantDim::Pid, e.pid.into()),
            (WantDim::Cgroup, e.cgroup_id),
            (WantDim::LocalPort, e.local.port().into()),
            (WantDim::RemotePort, e.remote.port().into()),
            (WantDim::Uid, e.uid.into()),
            (WantDim::Comm, comm_key(e.comm.as_bytes())),
        ]
        .into_iter()
        .any(|(dim, value)| keys.contains(&WantKey { dim, value }))
    }

    #[test]
    fn comm_keys_fold_the_padded_name() {
        let sel_comm = |c: &str| {
            sel(
                vec![pb::EventFilter {
                    comms: vec![c.into()],
                    ..Default::default()
                }],
                vec![],
            )
            .kernel_keys()
            .cloned()
        };
        let nginx = ev(1, 1, "nginx", "1.2.3.4:80", EventKind::Send, 0);
        assert!(kernel_admits(sel_comm("nginx").as_ref(), &nginx));
        assert!(!kernel_admits(sel_comm("nginx2").as_ref(), &nginx));
        assert!(
            !kernel_admits(sel_comm("ngin").as_ref(), &nginx),
            "exact names, not prefixes"
        );
        // 15 bytes: both halves count.
        let long = ev(1, 1, "kworker/u8:1-ev", "1.2.3.4:80", EventKind::Send, 0);
        assert!(kernel_admits(sel_comm("kworker/u8:1-ev").as_ref(), &long));
        assert!(!kernel_admits(sel_comm("kworker/u8:1-ex").as_ref(), &long));
        assert_eq!(comm_key(b"ab"), u64::from_ne_bytes(*b"ab\0\0\0\0\0\0"));
    }

    #[test]
    fn kernel_keys_take_each_allow_filters_smallest_field() {
        let key = |dim, value| WantKey { dim, value };
        let web = pb::EventFilter {
            pids: vec![10, 11, 12],
            local_ports: vec![80, 443],
            comm_prefixes: vec!["ngin".into()], // not a kernel field
            ..Default::default()
        };
        let sock = pb::EventFilter {
            cookies: vec![99],
            ..Default::default()
        };
        let keys = sel(vec![web.clone(), sock], vec![]).kernel_keys().cloned();
        assert_eq!(
            keys,
            Some(
                [
                    key(WantDim::LocalPort, 80),
                    key(WantDim::LocalPort, 443),
                    key(WantDim::Cookie, 99)
                ]
                .into()
            )
        );
        let matched = ev(5, 10, "nginx", "1.2.3.4:5000", EventKind::Send, 0);
        let mut on_80 = matched;
        on_80.local = "127.0.0.1:80".parse().unwrap();
        assert!(kernel_admits(keys.as_ref(), &on_80));
        assert!(
            !kernel_admits(keys.as_ref(), &matched),
            "port 4000, cookie 5: not wanted"
        );

        let by_prefix = pb::EventFilter {
            comm_prefixes: vec!["cur".into()],
            ..Default::default()
        };
        assert_eq!(
            sel(vec![web.clone(), by_prefix], vec![]).kernel_keys().cloned(),
            None,
            "one filter needs everything"
        );
        assert_eq!(
            sel(vec![], vec![web.clone()]).kernel_keys().cloned(),
            None,
            "deny only needs everything"
        );
        assert_eq!(sel(vec![], vec![]).kernel_keys(), None);
        let with_deny = sel(vec![web.clone()], vec![web]).kernel_keys().cloned();
        assert_eq!(with_deny.map(|k| k.len()), Some(2), "deny filters add nothing");

        let cookies = |from: u64| pb::EventFilter {
            cookies: (from..from + 1024).collect(),
            ..Default::default()
        };
        let four: Vec<_> = (0..4).map(|i| cookies(i * 1024)).collect();
        assert_eq!(
            sel(four.clone(), vec![]).kernel_keys().map(|k| k.len()),
            Some(PREFILTER_CAPACITY)
        );
        let five: Vec<_> = (0..5).map(|i| cookies(i * 1024)).collect();
        assert_eq!(sel(five, vec![]).kernel_keys(), None, "more than the map holds");
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(sel(vec![], vec![]).matches(&ev(1, 1, "a", "10.0.0.1:80", EventKind::Send, 0)));
    }

    #[test]
    fn and_within_a_filter_or_between_filters_deny_wins() {
        let curl_to_443 = pb::EventFilter {
            comms: vec!["curl".into()],
            remote_ports: vec![443],
            ..Default::default()
        };
        let pid_9 = pb::EventFilter {
            pids: vec![9],
            ..Default::default()
        };
        let s = sel(vec![curl_to_443, pid_9.clone()], vec![]);
        assert!(s.matches(&ev(1, 1, "curl", "1.2.3.4:443", EventKind::Send, 0)));
        assert!(
            !s.matches(&ev(1, 1, "curl", "1.2.3.4:80", EventKind::Send, 0)),
            "AND within a filter"
        );
        assert!(
            s.matches(&ev(1, 9, "nginx", "1.2.3.4:80", EventKind::Send, 0)),
            "OR between filters"
        );
        let s = sel(vec![], vec![pid_9]);
        assert!(
            !s.matches(&ev(1, 9, "x", "1.2.3.4:80", EventKind::Send, 0)),
            "deny wins"
        );
        assert!(s.matches(&ev(1, 8, "x", "1.2.3.4:80", EventKind::Send, 0)));
    }

    #[test]
    fn every_field_filters() {
        let e = ev(42, 5, "postgres", "10.1.2.3:5432", EventKind::Recv, 11);
        let cases: Vec<(pb::EventFilter, bool)> = vec![
            (
                pb::EventFilter {
                    cookies: vec![42],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::EventFilter {
                    cookies: vec![43],
                    ..Default::default()
                },
                false,
            ),
            (
                pb::EventFilter {
                    comm_prefixes: vec!["post".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::EventFilter {
                    comms: vec!["post".into()],
                    ..Default::default()
                },
                false,
            ),
            (
                pb::EventFilter {
                    uids: vec![1000],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::EventFilter {
                    cgroup_ids: vec![8],
                    ..Default::default()
                },
                false,
            ),
            (
                pb::EventFilter {
                    local_ports: vec![4000],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::EventFilter {
                    remote_cidrs: vec!["10.0.0.0/8".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::EventFilter {
                    remote_cidrs: vec!["fd00::/8".into()],
                    ..Default::default()
                },
                false,
            ),
            (
                pb::EventFilter {
                    families: vec![pb::AddressFamily::Ipv6 as i32],
                    ..Default::default()
                },
                false,
            ),
            (
                pb::EventFilter {
                    kinds: vec![pb::EventKind::Recv as i32],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::EventFilter {
                    errors_only: true,
                    ..Default::default()
                },
                true,
            ),
        ];
        for (f, want) in cases {
            assert_eq!(sel(vec![f.clone()], vec![]).matches(&e), want, "{f:?}");
        }
        let ok = ev(42, 5, "postgres", "10.1.2.3:5432", EventKind::Recv, 0);
        assert!(!sel(
            vec![pb::EventFilter {
                errors_only: true,
                ..Default::default()
            }],
            vec![]
        )
        .matches(&ok));
        let v6 = ev(1, 1, "a", "[fd00::1]:80", EventKind::Send, 0);
        assert!(sel(
            vec![pb::EventFilter {
                remote_cidrs: vec!["fd00::/8".into()],
                ..Default::default()
            }],
            vec![]
        )
        .matches(&v6));
    }

    #[test]
    fn cgroup_paths_resolve_into_the_cgroup_condition_with_the_ids() {
        // "/app" is cgroup 7 with 70 and 71 below it; "/empty" resolves to
        // nothing; anything else is unknown.
        let resolve = |p: &str, room: usize| -> Result<Vec<u64>, String> {
            match p {
                "/app" if room >= 3 => Ok(vec![7, 70, 71]),
                "/app" => Err(format!("more than the {room} cgroups this filter has room for")),
                "/empty" => Ok(vec![]),
                _ => Err(format!("no cgroup {p:?}")),
            }
        };
        let compile = |f: pb::EventFilter, limits: FilterLimits| Selector::compile_with(&[f], &[], limits, &resolve);
        let with = |ids: Vec<u64>, paths: &[&str]| pb::EventFilter {
            cgroup_ids: ids,
            cgroup_paths: paths.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        let cgroup = |id: u64| Event {
            cgroup_id: id,
            ..ev(1, 1, "a", "10.0.0.1:80", EventKind::Send, 0)
        };
        // Ids and paths are one condition: any of their cgroups.
        let s = compile(with(vec![5], &["/app"]), FilterLimits::default()).unwrap();
        for (id, want) in [(5, true), (7, true), (70, true), (71, true), (6, false), (72, false)] {
            assert_eq!(s.matches(&cgroup(id)), want, "cgroup {id}");
        }
        let keys: Vec<u64> = s.kernel_keys().unwrap().iter().map(|k| k.value).collect();
        assert_eq!(keys, [5, 7, 70, 71], "the kernel prefilter has them all");
        // In a deny list, the tree is dropped.
        let deny = Selector::compile_with(&[], &[with(vec![], &["/app"])], FilterLimits::default(), &resolve).unwrap();
        assert!(!deny.matches(&cgroup(70)) && deny.matches(&cgroup(6)));

        let err = |f, limits| compile(f, limits).unwrap_err();
        let e = err(with(vec![], &["/app", "/nope"]), FilterLimits::default());
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("allow[0].cgroup_paths[1]", "no cgroup \"/nope\"")
        );
        let e = err(with(vec![], &["/empty"]), FilterLimits::default());
        assert_eq!(
            e.field, "allow[0].cgroup_paths[0]",
            "an empty tree would admit every cgroup"
        );
        // The ids leave the paths what room is left of max_values.
        let tight = FilterLimits {
            max_values: 4,
            ..Default::default()
        };
        assert!(compile(with(vec![1], &["/app"]), tight).is_ok());
        let e = err(with(vec![1, 2], &["/app"]), tight);
        assert_eq!(e.field, "allow[0].cgroup_paths[0]");
        assert!(e.reason.contains("room for"), "{}", e.reason);
        // Without a resolver, a path is refused, never ignored.
        let e = Selector::compile(&[with(vec![], &["/app"])], &[], FilterLimits::default()).unwrap_err();
        assert_eq!(e.field, "allow[0].cgroup_paths[0]");
    }

    #[test]
    fn a_cgroup_below_a_path_matches_through_the_named_cgroup_the_kernel_found() {
        // "/app" is cgroup 7 with 70 below it, "/app/web" is 70; 99 is a
        // cgroup made below 70 since they were resolved: its events carry
        // the nearest cgroup the kernel knows was named, 70 or 7.
        let resolve = |p: &str, _room: usize| -> Result<Vec<u64>, String> {
            match p {
                "/app" => Ok(vec![7, 70]),
                "/app/web" => Ok(vec![70]),
                _ => Err(format!("no cgroup {p:?}")),
            }
        };
        let filter = |ids: Vec<u64>, paths: &[&str]| pb::EventFilter {
            cgroup_ids: ids,
            cgroup_paths: paths.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        let allow = |f| Selector::compile_with(&[f], &[], FilterLimits::default(), &resolve).unwrap();
        let app = allow(filter(vec![], &["/app"]));
        let web = allow(filter(vec![], &["/app/web"]));
        let by_id = allow(filter(vec![70], &[]));
        let deny =
            Selector::compile_with(&[], &[filter(vec![], &["/app"])], FilterLimits::default(), &resolve).unwrap();
        let event = |cgroup_id, cgroup_tree| Event {
            cgroup_id,
            cgroup_tree,
            ..ev(1, 1, "a", "10.0.0.1:80", EventKind::Send, 0)
        };
        for (tree, app_too, web_too) in [(70, true, true), (7, true, false), (0, false, false), (5, false, false)] {
            let e = event(99, tree);
            assert_eq!(app.matches(&e), app_too, "/app, nearest named {tree}");
            assert_eq!(web.matches(&e), web_too, "/app/web, nearest named {tree}");
            assert!(!by_id.matches(&e), "an id names that cgroup only, not those below it");
            assert_eq!(deny.matches(&e), !app_too, "deny /app, nearest named {tree}");
        }
        assert_eq!(app.cgroup_roots().collect::<Vec<_>>(), [7]);
        assert_eq!(deny.cgroup_roots().collect::<Vec<_>>(), [7]);
        assert_eq!(by_id.cgroup_roots().count(), 0);

        // The hub's index finds them by that cgroup too, not only by the
        // event's own (which is no key of theirs).
        let events = [event(99, 70), event(99, 7), event(70, 70), event(98, 0)];
        assert_eq!(
            match_all(&[&app, &web, &by_id], &events),
            [vec![0, 1, 2], vec![0, 2], vec![2]]
        );
    }

    #[test]
    fn the_keys_decide_only_where_having_a_key_is_matching() {
        let f = |g: fn(&mut pb::EventFilter)| {
            let mut f = pb::EventFilter::default();
            g(&mut f);
            f
        };
        let cookie_1 = f(|f| f.cookies = vec![1]);
        let pid_5 = f(|f| f.pids = vec![5]);
        let port_80 = f(|f| f.remote_ports = vec![80]);
        let cookie_1_sends = f(|f| {
            f.cookies = vec![1];
            f.kinds = vec![1];
        });
        let cookie_1_errors = f(|f| {
            f.cookies = vec![1];
            f.errors_only = true;
        });
        let comm = f(|f| f.comms = vec!["curl".into()]);
        let cgroup = f(|f| f.cgroup_ids = vec![7]);
        let cases = [
            (sel(vec![cookie_1.clone()], vec![]), true, "cookies alone"),
            (
                sel(vec![cookie_1.clone(), pid_5.clone()], vec![]),
                true,
                "one exact field each",
            ),
            (sel(vec![port_80], vec![]), true, "ports alone"),
            (sel(vec![cookie_1_sends], vec![]), false, "and a kind"),
            (sel(vec![cookie_1_errors], vec![]), false, "and errors only"),
            (
                sel(vec![cookie_1.clone(), comm.clone()], vec![]),
                false,
                "a comm: its key is folded",
            ),
            (
                sel(vec![cgroup], vec![]),
                false,
                "a cgroup: ids and paths differ below it",
            ),
            (sel(vec![cookie_1], vec![pid_5]), false, "a deny list"),
            (sel(vec![], vec![]), false, "no keys at all"),
        ];
        // Events with cookie 1 or pid 5, of every kind: the keys' events,
        // which only some of the selectors match.
        let events = [
            ev(1, 5, "curl", "10.0.0.1:80", EventKind::Send, 0),
            ev(1, 6, "curl", "10.0.0.1:80", EventKind::Recv, 0),
            ev(1, 6, "nc", "10.0.0.1:81", EventKind::Send, 11),
            ev(2, 5, "wget", "10.0.0.1:80", EventKind::Recv, 0),
            ev(2, 7, "curlx", "10.0.0.1:81", EventKind::Send, 0),
        ];
        let refs: Vec<&Selector> = cases.iter().map(|(s, _, _)| s).collect();
        let taken = match_all(&refs, &events);
        for ((s, decide, what), got) in cases.iter().zip(&taken) {
            assert_eq!(s.keys_decide, *decide, "{what}");
            let want: Vec<u32> = (0..events.len() as u32)
                .filter(|&i| s.matches(&events[i as usize]))
                .collect();
            assert_eq!(got, &want, "{what}");
        }
        assert_eq!(taken[3], [0, 2], "cookie 1 sends: not the recv with the same key");
    }

    #[test]
    fn invalid_filters_name_the_field() {
        let err = |allow: Vec<pb::EventFilter>| Selector::compile(&allow, &[], FilterLimits::default()).unwrap_err();
        let cidr = pb::EventFilter {
            remote_cidrs: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
            ..Default::default()
        };
        assert_eq!(
            err(vec![pb::EventFilter::default(), cidr]).field,
            "allow[1].remote_cidrs[1]"
        );
        let port = pb::EventFilter {
            remote_ports: vec![70000],
            ..Default::default()
        };
        assert_eq!(err(vec![port]).field, "allow[0].remote_ports[0]");
        let kind = pb::EventFilter {
            kinds: vec![7],
            ..Default::default()
        };
        assert_eq!(err(vec![kind]).field, "allow[0].kinds[0]");
        let fam = pb::EventFilter {
            families: vec![0],
            ..Default::default()
        };
        assert_eq!(err(vec![fam]).field, "allow[0].families[0]");
        let comm = pb::EventFilter {
            comms: vec!["x".repeat(16)],
            ..Default::default()
        };
        assert_eq!(err(vec![comm]).field, "allow[0].comms[0]");
        let many = pb::EventFilter {
            pids: (0..2000).collect(),
            ..Default::default()
        };
        assert_eq!(err(vec![many]).field, "allow[0].pids");
        assert_eq!(err(vec![pb::EventFilter::default(); 65]).field, "allow");
        let deny = Selector::compile(&[], &[pb::EventFilter::default()], FilterLimits::default()).unwrap_err();
        assert_eq!(deny.field, "deny[0]");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn filter_strategy() -> impl Strategy<Value = pb::EventFilter> {
            let small = |n| proptest::collection::vec(any::<u32>(), 0..n);
            (
                proptest::collection::vec(any::<u64>(), 0..4),
                small(4),
                proptest::collection::vec("[a-z]{0,17}", 0..3),
                proptest::collection::vec("[a-z]{0,17}", 0..3),
                small(3),
                proptest::collection::vec(any::<u64>(), 0..3),
                proptest::collection::vec(0u32..70_000, 0..3),
                proptest::collection::vec(0u32..70_000, 0..3),
                proptest::collection::vec(
                    "([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,2})?|[0-9a-f:]{2,12}(/[0-9]{1,3})?|[a-z/]{0,6}",
                    0..3,
                ),
                proptest::collection::vec(-1i32..4, 0..3),
                proptest::collection::vec(-1i32..4, 0..3),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        cookies,
                        pids,
                        comms,
                        comm_prefixes,
                        uids,
                        cgroup_ids,
                        local_ports,
                        remote_ports,
                        remote_cidrs,
                        families,
                        kinds,
                        errors_only,
                    )| pb::EventFilter {
                        cookies,
                        pids,
                        comms,
                        comm_prefixes,
                        uids,
                        cgroup_ids,
                        local_ports,
                        remote_ports,
                        remote_cidrs,
                        families,
                        kinds,
                        errors_only,
                        // Resolved against the host; see
                        // cgroup_paths_resolve_into_the_cgroup_condition_with_the_ids.
                        cgroup_paths: vec![],
                    },
                )
        }

        fn event_strategy() -> impl Strategy<Value = Event> {
            (
                any::<u64>(),
                any::<u32>(),
                "[a-z]{0,15}",
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<bool>(),
                any::<bool>(),
                0u32..120,
            )
                .prop_map(|(cookie, pid, comm, ip, port, send, v6, errno)| {
                    let remote = if v6 {
                        std::net::SocketAddr::new(
                            std::net::Ipv6Addr::from([
                                0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ip[0], ip[1], ip[2], ip[3],
                            ])
                            .into(),
                            port,
                        )
                    } else {
                        std::net::SocketAddr::new(std::net::Ipv4Addr::from(ip).into(), port)
                    };
                    let mut e = tests::ev(
                        cookie,
                        pid,
                        &comm,
                        "127.0.0.1:1",
                        if send { EventKind::Send } else { EventKind::Recv },
                        errno,
                    );
                    e.remote = remote.into();
                    e
                })
        }

        proptest! {
            /// Any request: a compiled selector or a field error, never a
            /// panic; and a compiled one matches any event without panicking.
            #[test]
            fn compiling_and_matching_never_panic(
                allow in proptest::collection::vec(filter_strategy(), 0..3),
                deny in proptest::collection::vec(filter_strategy(), 0..3),
                events in proptest::collection::vec(event_strategy(), 0..8),
            ) {
                match Selector::compile(&allow, &deny, FilterLimits::default()) {
                    Ok(sel) => for e in &events { let _ = sel.matches(e); },
                    Err(err) => prop_assert!(err.field.starts_with("allow") || err.field.starts_with("deny"), "{}", err),
                }
            }

            /// The kernel prefilter never drops an event a selector matches:
            /// an allow filter made of some of the event's own fields (and
            /// other values), among random filters.
            #[test]
            fn the_kernel_prefilter_keeps_every_matching_event(
                e in event_strategy(),
                fields in any::<[bool; 7]>(),
                others in proptest::collection::vec(filter_strategy(), 0..3),
                extra in proptest::collection::vec(1u32..65_536, 0..3),
            ) {
                // The event's own value of a field, if chosen, plus others.
                let own = |on: bool, v: u32| -> Vec<u32> {
                    if on { std::iter::once(v).chain(extra.iter().copied()).collect() } else { vec![] }
                };
                let mut mine = pb::EventFilter {
                    cookies: if fields[0] { vec![e.cookie, 7] } else { vec![] },
                    pids: own(fields[1], e.pid),
                    cgroup_ids: if fields[2] { vec![e.cgroup_id] } else { vec![] },
                    local_ports: own(fields[3], e.local.port().into()),
                    remote_ports: own(fields[4] && e.remote.port() != 0, e.remote.port().into()),
                    uids: own(fields[6], e.uid),
                    ..Default::default()
                };
                if fields[5] && !e.comm.as_bytes().is_empty() {
                    mine.comms = vec![e.comm.to_string()];
                }
                let mut allow = others.clone();
                allow.push(mine);
                let Ok(sel) = Selector::compile(&allow, &[], FilterLimits::default()) else {
                    return Ok(()); // one of the random filters is invalid
                };
                prop_assert!(sel.matches(&e));
                prop_assert!(tests::kernel_admits(sel.kernel_keys(), &e));
            }

            /// Matching many selectors at once through their keys finds, for
        /// each, exactly the events it matches alone, once: random
        /// filters, and filters made of the events' own values, alone and
        /// in pairs (an event may then reach a selector through two keys).
        #[test]
        fn matching_through_the_keys_is_matching_each_selector(
            events in proptest::collection::vec(event_strategy(), 1..12),
            picks in proptest::collection::vec((any::<[bool; 7]>(), 0..12usize, any::<bool>()), 0..8),
            others in proptest::collection::vec((filter_strategy(), any::<bool>()), 0..4),
        ) {
            let mut selectors = Vec::new();
            let mut last: Option<pb::EventFilter> = None;
            for (fields, which, deny_other) in picks {
                let e = &events[which % events.len()];
                let mine = pb::EventFilter {
                    cookies: if fields[0] { vec![e.cookie] } else { vec![] },
                    pids: if fields[1] { vec![e.pid, 9] } else { vec![] },
                    cgroup_ids: if fields[2] { vec![e.cgroup_id] } else { vec![] },
                    local_ports: if fields[3] { vec![e.local.port().into()] } else { vec![] },
                    remote_ports: if fields[4] && e.remote.port() != 0 { vec![e.remote.port().into()] } else { vec![] },
                    uids: if fields[6] { vec![e.uid] } else { vec![] },
                    comms: if fields[5] && !e.comm.as_bytes().is_empty() { vec![e.comm.to_string()] } else { vec![] },
                    ..Default::default()
                };
                let deny = if deny_other {
                    vec![pb::EventFilter { pids: vec![events[0].pid], ..Default::default() }]
                } else {
                    vec![]
                };
                if let Ok(sel) = Selector::compile(std::slice::from_ref(&mine), &deny, FilterLimits::default()) {
                    selectors.push(sel);
                }
                if let Some(prev) = last.replace(mine.clone()) {
                    if let Ok(sel) = Selector::compile(&[prev, mine], &[], FilterLimits::default()) {
                        selectors.push(sel);
                    }
                }
            }
            for (f, as_deny) in others {
                let (allow, deny) = if as_deny { (vec![], vec![f]) } else { (vec![f], vec![]) };
                if let Ok(sel) = Selector::compile(&allow, &deny, FilterLimits::default()) {
                    selectors.push(sel);
                }
            }
            let refs: Vec<&Selector> = selectors.iter().collect();
            let taken = match_all(&refs, &events);
            for (sel, got) in selectors.iter().zip(&taken) {
                let want: Vec<u32> = (0..events.len() as u32).filter(|&i| sel.matches(&events[i as usize])).collect();
                prop_assert_eq!(got, &want);
            }
        }

        /// A filter made of an event's own fields allows it; the same
            /// filter as a deny drops it, even alongside an allow.
            #[test]
            fn an_events_own_fields_match_it(e in event_strategy(), with_comm in any::<bool>()) {
                let mut f = pb::EventFilter {
                    cookies: vec![e.cookie],
                    pids: vec![e.pid],
                    remote_ports: if e.remote.port() == 0 { vec![] } else { vec![e.remote.port().into()] },
                    remote_cidrs: vec![e.remote.ip().to_string()],
                    kinds: vec![if e.kind == EventKind::Send { 1 } else { 2 }],
                    errors_only: e.is_error(),
                    ..Default::default()
                };
                if with_comm && !e.comm.as_bytes().is_empty() {
                    f.comms = vec![e.comm.to_string()];
                }
                let allow = Selector::compile(std::slice::from_ref(&f), &[], FilterLimits::default()).unwrap();
                prop_assert!(allow.matches(&e));
                let deny = Selector::compile(&[f.clone()], &[f], FilterLimits::default()).unwrap();
                prop_assert!(!deny.matches(&e), "deny wins");
            }
        }
    }
}
