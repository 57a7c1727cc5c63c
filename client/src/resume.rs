//! Resuming a WatchEvents stream after it ended or broke (socktapd
//! restarted, the connection dropped): [`Position`] follows a stream's
//! messages and builds the request that continues it, so that no event is
//! repeated and every loss is announced by socktapd.
//!
//! Sequence numbers compare only within one run of socktapd (its
//! `instance_id`, sent in every message). Resumed with the last seq and its
//! instance, socktapd either continues after that seq, or, when it is
//! another instance (it restarted), starts with a `LostEvents` notice of
//! source `RESTART` and then everything in its history.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use socktap_client::{api, connect, resume::Position, DaemonAddr};
//! let addr: DaemonAddr = "unix:/run/socktap/socktap.sock".parse()?;
//! let request = api::WatchEventsRequest::default();
//! let opened_at = std::time::SystemTime::now();
//! let mut position = Position::from_request(&request);
//! let mut next = request.clone();
//! loop {
//!     let Ok(mut client) = connect(&addr).await else {
//!         tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!         continue;
//!     };
//!     if let Ok(stream) = client.watch_events(next.clone()).await {
//!         let mut stream = stream.into_inner();
//!         while let Ok(Some(response)) = stream.message().await {
//!             position.observe(&response);
//!             // ... use the events and loss notices ...
//!         }
//!     }
//!     next = position.resume_request(&request, opened_at, 0);
//! }
//! # }
//! ```

use std::time::SystemTime;

use socktap_proto::v1 as api;

/// How far a stream got: the seq of the last event seen, and the socktapd
/// instance it belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    seq: Option<u64>,
    instance: Option<u64>,
}

impl Position {
    /// Where a stream opened with `request` starts: after its
    /// `resume_after_seq`, if it has one.
    pub fn from_request(request: &api::WatchEventsRequest) -> Position {
        Position {
            seq: request.resume_after_seq,
            instance: request.resume_instance_id,
        }
    }

    /// Takes note of one message of the stream.
    pub fn observe(&mut self, response: &api::WatchEventsResponse) {
        // 0: a socktapd that does not send its instance id.
        let id = response.instance_id;
        if id != 0 && self.instance != Some(id) {
            if self.instance.is_some() {
                // The seq was another instance's: socktapd restarted, and
                // said so in the stream; nothing of this one is seen yet.
                self.seq = None;
            }
            self.instance = Some(id);
        }
        if let Some(api::watch_events_response::Message::Events(batch)) = &response.message {
            if let Some(last) = batch.events.last() {
                self.seq = Some(last.seq);
            }
        }
    }

    /// The seq of the last event seen (or resumed after).
    pub fn last_seq(&self) -> Option<u64> {
        self.seq
    }

    /// The instance of socktapd that seq belongs to, once known.
    pub fn instance(&self) -> Option<u64> {
        self.instance
    }

    /// The request that continues a stream opened at `opened_at` with
    /// `original`, after `delivered` events: the same filters, resuming
    /// after the last event seen; if none was seen, history from
    /// `original`'s `since`, or else from `opened_at`. A limit counts what
    /// was delivered already.
    pub fn resume_request(
        &self,
        original: &api::WatchEventsRequest,
        opened_at: SystemTime,
        delivered: u64,
    ) -> api::WatchEventsRequest {
        let mut next = original.clone();
        next.replay_last = 0;
        next.since = None;
        next.resume_after_seq = self.seq;
        next.resume_instance_id = self.seq.and(self.instance);
        if self.seq.is_none() {
            next.since = original.since.or_else(|| Some(timestamp(opened_at)));
        }
        if original.limit != 0 {
            next.limit = original.limit.saturating_sub(delivered).max(1);
        }
        next
    }
}

fn timestamp(t: SystemTime) -> socktap_proto::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    socktap_proto::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::watch_events_response::Message;

    fn events(instance_id: u64, seqs: &[u64]) -> api::WatchEventsResponse {
        api::WatchEventsResponse {
            instance_id,
            message: Some(Message::Events(api::EventBatch {
                events: seqs
                    .iter()
                    .map(|&seq| api::Event {
                        seq,
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }

    fn restarted(instance_id: u64) -> api::WatchEventsResponse {
        api::WatchEventsResponse {
            instance_id,
            message: Some(Message::Lost(api::LostEvents {
                source: api::LossSource::Restart as i32,
                ..Default::default()
            })),
        }
    }

    fn filtered() -> api::WatchEventsRequest {
        api::WatchEventsRequest {
            allow: vec![api::EventFilter {
                local_ports: vec![443],
                ..Default::default()
            }],
            replay_last: 10,
            limit: 100,
            ..Default::default()
        }
    }

    #[test]
    fn resumes_after_the_last_event_seen_in_its_instance() {
        let original = filtered();
        let mut p = Position::from_request(&original);
        p.observe(&events(7, &[3, 4]));
        p.observe(&events(7, &[9]));
        let next = p.resume_request(&original, SystemTime::now(), 3);
        assert_eq!((next.resume_after_seq, next.resume_instance_id), (Some(9), Some(7)));
        assert_eq!(next.allow, original.allow, "the same filters");
        assert_eq!((next.replay_last, next.since), (0, None), "no replay again");
        assert_eq!(next.limit, 97, "the limit counts what was delivered");
    }

    #[test]
    fn with_nothing_seen_it_asks_for_history_since_it_opened() {
        let original = filtered();
        let opened = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 5);
        let mut p = Position::from_request(&original);
        p.observe(&api::WatchEventsResponse {
            instance_id: 7,
            message: Some(Message::Lost(api::LostEvents::default())),
        });
        let next = p.resume_request(&original, opened, 0);
        assert_eq!((next.resume_after_seq, next.resume_instance_id), (None, None));
        assert_eq!(
            next.since,
            Some(socktap_proto::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5
            })
        );
        let since = socktap_proto::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        let original = api::WatchEventsRequest {
            since: Some(since),
            ..Default::default()
        };
        let next = Position::from_request(&original).resume_request(&original, opened, 0);
        assert_eq!(next.since, Some(since), "its own since, when it had one");
        assert_eq!(next.limit, 0, "no limit stays no limit");
    }

    #[test]
    fn a_seq_from_before_a_restart_is_dropped() {
        // Resumed with instance 7's seq 50, from a socktapd that is now 8.
        let original = api::WatchEventsRequest {
            resume_after_seq: Some(50),
            resume_instance_id: Some(7),
            ..Default::default()
        };
        let mut p = Position::from_request(&original);
        assert_eq!((p.last_seq(), p.instance()), (Some(50), Some(7)));
        p.observe(&restarted(8));
        assert_eq!((p.last_seq(), p.instance()), (None, Some(8)));
        let next = p.resume_request(&original, SystemTime::now(), 0);
        assert_eq!((next.resume_after_seq, next.resume_instance_id), (None, None));
        assert!(next.since.is_some());
        p.observe(&events(8, &[2]));
        assert_eq!((p.last_seq(), p.instance()), (Some(2), Some(8)));
    }

    #[test]
    fn a_seq_given_without_instance_takes_the_first_instance_seen() {
        let original = api::WatchEventsRequest {
            resume_after_seq: Some(50),
            ..Default::default()
        };
        let mut p = Position::from_request(&original);
        p.observe(&api::WatchEventsResponse {
            instance_id: 7,
            message: None,
        });
        assert_eq!((p.last_seq(), p.instance()), (Some(50), Some(7)));
        // A socktapd without instance ids: seqs are still followed.
        let mut p = Position::default();
        p.observe(&events(0, &[5]));
        let next = p.resume_request(&original, SystemTime::now(), 0);
        assert_eq!((next.resume_after_seq, next.resume_instance_id), (Some(5), None));
    }
}
