//! Checks requests: a WatchEvents request before anything is subscribed,
//! a GetCgroupPaths request before the cgroups are looked up. Every error
//! names the field at fault.

use std::collections::HashSet;
use std::time::Duration;

use socktap_proto::v1 as pb;
use socktap_proto::MAX_CGROUP_IDS_PER_REQUEST as MAX_CGROUP_IDS;

use crate::event::WallClock;
use crate::hub::filter::CgroupResolver;
use crate::hub::{FieldError, FilterLimits, Selector, Start};

/// Default and limits of `max_batch_events`.
pub const DEFAULT_BATCH: u32 = 1024;
/// See [`DEFAULT_BATCH`].
pub const MAX_BATCH: u32 = 65_536;
/// The longest `max_flush_delay`.
pub const MAX_FLUSH_DELAY: Duration = Duration::from_secs(1);

/// How a stream is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamControls {
    /// End after this many events (`u64::MAX`: never).
    pub limit: u64,
    /// Events per message.
    pub max_batch: usize,
    /// How long to hold events to fill a batch.
    pub flush_delay: Duration,
}

/// Checks a GetCgroupPaths request and gives the distinct ids it names.
pub fn cgroup_paths(req: &pb::GetCgroupPathsRequest) -> Result<HashSet<u64>, FieldError> {
    if req.cgroup_ids.len() > MAX_CGROUP_IDS {
        return Err(FieldError::new(
            "cgroup_ids",
            format!(
                "names {} cgroups, more than the {MAX_CGROUP_IDS} one request may; ask in parts",
                req.cgroup_ids.len()
            ),
        ));
    }
    Ok(req.cgroup_ids.iter().copied().collect())
}

/// A validated request.
#[derive(Debug)]
pub struct Watch {
    /// The compiled filters.
    pub selector: Selector,
    /// Where the stream starts.
    pub start: Start,
    /// How it is delivered.
    pub controls: StreamControls,
}

/// Validates `req` against the limits and the history's capacity, with
/// `cgroups` to resolve its filters' cgroup paths.
pub fn watch(
    req: &pb::WatchEventsRequest,
    limits: FilterLimits,
    history_capacity: usize,
    clock: &WallClock,
    now_unix_ns: i128,
    cgroups: CgroupResolver<'_>,
) -> Result<Watch, FieldError> {
    let selector = Selector::compile_with(&req.allow, &req.deny, limits, cgroups)?;

    let starts = [
        req.replay_last != 0,
        req.since.is_some(),
        req.resume_after_seq.is_some(),
    ];
    if starts.iter().filter(|&&s| s).count() > 1 {
        return Err(FieldError::new(
            "replay_last",
            "at most one of replay_last, since and resume_after_seq may be set",
        ));
    }
    if req.resume_instance_id.is_some() && req.resume_after_seq.is_none() {
        return Err(FieldError::new(
            "resume_instance_id",
            "only with resume_after_seq (the seq it names comes from that instance)",
        ));
    }
    let start = if req.replay_last != 0 {
        if req.replay_last as usize > history_capacity {
            return Err(FieldError::new(
                "replay_last",
                format!(
                    "{} is more than the history holds ({history_capacity} events)",
                    req.replay_last
                ),
            ));
        }
        Start::ReplayLast(req.replay_last as usize)
    } else if let Some(since) = &req.since {
        if !(0..1_000_000_000).contains(&since.nanos) {
            return Err(FieldError::new(
                "since.nanos",
                format!("{} is not in 0..999999999", since.nanos),
            ));
        }
        let unix_ns = since.seconds as i128 * 1_000_000_000 + since.nanos as i128;
        // A second of grace for clock skew between client and host.
        if unix_ns > now_unix_ns + 1_000_000_000 {
            return Err(FieldError::new("since", "is in the future"));
        }
        Start::Since(clock.monotonic_ns(unix_ns))
    } else if let Some(seq) = req.resume_after_seq {
        Start::ResumeAfter {
            seq,
            instance: req.resume_instance_id,
        }
    } else {
        Start::Live
    };

    let max_batch = match req.max_batch_events {
        None => DEFAULT_BATCH,
        Some(n) if (1..=MAX_BATCH).contains(&n) => n,
        Some(n) => {
            return Err(FieldError::new(
                "max_batch_events",
                format!("{n} is not in 1..={MAX_BATCH}"),
            ));
        }
    };
    let flush_delay = match &req.max_flush_delay {
        None => Duration::ZERO,
        Some(d) => {
            let ok = d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos);
            let dur = Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
            if !ok || dur > MAX_FLUSH_DELAY {
                return Err(FieldError::new(
                    "max_flush_delay",
                    format!("must be between 0 and {MAX_FLUSH_DELAY:?}"),
                ));
            }
            dur
        }
    };
    let limit = if req.limit == 0 { u64::MAX } else { req.limit };
    Ok(Watch {
        selector,
        start,
        controls: StreamControls {
            limit,
            max_batch: max_batch as usize,
            flush_delay,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(req: pb::WatchEventsRequest) -> Result<Watch, FieldError> {
        let clock = WallClock::now();
        watch(
            &req,
            FilterLimits::default(),
            1000,
            &clock,
            clock.unix_ns(crate::event::monotonic_now_ns()),
            &|p, _| Err(format!("no cgroup {p:?} in this test")),
        )
    }

    #[test]
    fn defaults_are_live_unbatched_unlimited() {
        let w = check(Default::default()).unwrap();
        assert_eq!(w.start, Start::Live);
        assert_eq!(
            w.controls,
            StreamControls {
                limit: u64::MAX,
                max_batch: 1024,
                flush_delay: Duration::ZERO
            }
        );
    }

    #[test]
    fn bad_controls_name_their_field() {
        let field = |req| check(req).unwrap_err().field;
        assert_eq!(
            field(pb::WatchEventsRequest {
                max_batch_events: Some(0),
                ..Default::default()
            }),
            "max_batch_events"
        );
        assert_eq!(
            field(pb::WatchEventsRequest {
                max_batch_events: Some(1 << 20),
                ..Default::default()
            }),
            "max_batch_events"
        );
        assert_eq!(
            field(pb::WatchEventsRequest {
                replay_last: 1001,
                ..Default::default()
            }),
            "replay_last"
        );
        assert_eq!(
            field(pb::WatchEventsRequest {
                replay_last: 5,
                resume_after_seq: Some(3),
                ..Default::default()
            }),
            "replay_last"
        );
        let future = socktap_proto::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        };
        assert_eq!(
            field(pb::WatchEventsRequest {
                since: Some(future),
                ..Default::default()
            }),
            "since"
        );
        assert_eq!(
            field(pb::WatchEventsRequest {
                resume_instance_id: Some(77),
                ..Default::default()
            }),
            "resume_instance_id"
        );
        let delay = socktap_proto::Duration { seconds: 5, nanos: 0 };
        assert_eq!(
            field(pb::WatchEventsRequest {
                max_flush_delay: Some(delay),
                ..Default::default()
            }),
            "max_flush_delay"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any combination of stream controls: validated or refused with
            /// a named field, never a panic.
            #[test]
            fn validation_never_panics(
                replay in any::<u32>(),
                since in proptest::option::of((any::<i64>(), any::<i32>())),
                resume in proptest::option::of(any::<u64>()),
                instance in proptest::option::of(any::<u64>()),
                limit in any::<u64>(),
                batch in proptest::option::of(any::<u32>()),
                delay in proptest::option::of((any::<i64>(), any::<i32>())),
            ) {
                let req = pb::WatchEventsRequest {
                    replay_last: replay,
                    since: since.map(|(seconds, nanos)| socktap_proto::Timestamp { seconds, nanos }),
                    resume_after_seq: resume,
                    resume_instance_id: instance,
                    limit,
                    max_batch_events: batch,
                    max_flush_delay: delay.map(|(seconds, nanos)| socktap_proto::Duration { seconds, nanos }),
                    ..Default::default()
                };
                match check(req) {
                    Ok(w) => {
                        prop_assert!((1..=MAX_BATCH as usize).contains(&w.controls.max_batch));
                        prop_assert!(w.controls.flush_delay <= MAX_FLUSH_DELAY);
                    }
                    Err(e) => prop_assert!(
                        ["replay_last", "since", "since.nanos", "resume_instance_id", "max_batch_events", "max_flush_delay"].contains(&e.field.as_str()),
                        "unexpected field {}", e.field
                    ),
                }
            }
        }
    }
}
