//! The gRPC service: validates each request, then hands it to the hub. Each
//! WatchEvents stream drains its subscriber's queue into messages as the
//! transport asks for them; it ends when the client goes away, the limit is
//! reached, or the hub shuts down. The cgroup paths in streams' filters
//! are resolved again every second by one task for all of them
//! ([`cgroups::CgroupFollower`]), which gives the hub the new ids; until
//! then the kernel matches a new cgroup through the named one above it
//! (`Event::cgroup_tree`).

pub mod cgroups;
pub mod validate;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use socktap_proto::v1 as pb;
use socktap_proto::wire;
use socktap_proto::wire::socktap_server::Socktap;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::event::monotonic_now_ns;
use crate::hub::{Hub, Item, SubscribeError, Subscriber};
use crate::probe::kernel_release;
use cgroups::{CgroupFollower, CgroupTree};
use validate::StreamControls;

/// The `socktap.v1.Socktap` service (its server view, [`wire`]: events go
/// out as the bytes the hub encoded once).
#[derive(Clone)]
pub struct SocktapService {
    hub: Hub,
    max_request_bytes: usize,
    cgroups: Arc<CgroupTree>,
    follower: Arc<CgroupFollower>,
}

impl SocktapService {
    /// A service over `hub`.
    pub fn new(hub: Hub) -> Self {
        Self::with_max_request_bytes(hub, usize::MAX)
    }

    /// A service that refuses requests whose encoding is larger than
    /// `max_request_bytes` with RESOURCE_EXHAUSTED.
    pub fn with_max_request_bytes(hub: Hub, max_request_bytes: usize) -> Self {
        let cgroups = Arc::new(CgroupTree::discover());
        let follower = Arc::new(CgroupFollower::new(hub.clone(), cgroups.clone()));
        SocktapService {
            hub,
            max_request_bytes,
            cgroups,
            follower,
        }
    }
}

#[tonic::async_trait]
impl Socktap for SocktapService {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "local".into());
        let req = request.into_inner();
        let size = prost::Message::encoded_len(&req);
        if size > self.max_request_bytes {
            return Err(Status::resource_exhausted(format!(
                "max_request_bytes: the request has {size} bytes, over the limit of {}",
                self.max_request_bytes
            )));
        }
        let clock = self.hub.clock();
        let now = clock.unix_ns(monotonic_now_ns());
        let cfg = *self.hub.config();
        let check = {
            let tree = self.cgroups.clone();
            move |req: &pb::WatchEventsRequest| {
                let resolve = |p: &str, max: usize| tree.resolve(p, max);
                validate::watch(req, cfg.filter_limits, cfg.history_events, &clock, now, &resolve)
            }
        };
        let paths = req.allow.iter().chain(&req.deny).any(|f| !f.cgroup_paths.is_empty());
        let watch = if paths {
            // Resolving walks the cgroup file system: off the runtime's
            // worker, which every stream shares.
            let (req, checked) = tokio::task::spawn_blocking(move || {
                let checked = check(&req);
                (req, checked)
            })
            .await
            .map_err(|e| Status::internal(format!("validating the request: {e}")))?;
            checked.map(|w| (req, w))
        } else {
            check(&req).map(|w| (req, w))
        };
        let (req, watch) = watch.map_err(|e| Status::invalid_argument(e.to_string()))?;
        let filters = paths.then(|| (req.allow.clone(), req.deny.clone()));
        let sub = self
            .hub
            .subscribe(peer, req, watch.selector, watch.start)
            .map_err(|e| match e {
                SubscribeError::TooMany(_) | SubscribeError::TooManyOnConnection(_) => {
                    Status::resource_exhausted(e.to_string())
                }
                SubscribeError::ShuttingDown => Status::unavailable(e.to_string()),
                SubscribeError::ResumeAhead { .. } => Status::invalid_argument(e.to_string()),
            })?;
        if let Some((allow, deny)) = filters {
            self.follower.follow(&sub, allow, deny);
        }
        Ok(Response::new(EventStream::new(self.hub.clone(), sub, watch.controls)))
    }

    async fn get_status(&self, _: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        // Off the runtime's worker, which may be reading the ring: the
        // programs' statistics take a bpf() call per BPF program on the host.
        let hub = self.hub.clone();
        tokio::task::spawn_blocking(move || status(&hub))
            .await
            .map(Response::new)
            .map_err(|e| Status::internal(format!("status: {e}")))
    }

    async fn get_cgroup_paths(
        &self,
        request: Request<pb::GetCgroupPathsRequest>,
    ) -> Result<Response<pb::GetCgroupPathsResponse>, Status> {
        let ids = validate::cgroup_paths(request.get_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if ids.is_empty() {
            return Ok(Response::new(pb::GetCgroupPathsResponse::default()));
        }
        let tree = self.cgroups.clone();
        // Walking the cgroup file system: off the runtime's worker, which
        // every stream shares.
        let paths = tokio::task::spawn_blocking(move || tree.paths_of(&ids))
            .await
            .map_err(|e| Status::internal(format!("looking up cgroups: {e}")))?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::GetCgroupPathsResponse { paths }))
    }
}

/// The most encoded event bytes in one EventBatch message (a message may
/// exceed it only to carry a single larger event). Well under the 4 MiB
/// that gRPC clients accept by default (tonic, grpc-go, grpcurl), whatever
/// `max_batch_events` asks for; and small enough that a stream buffers
/// little in the transport while its client reads slowly.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

// A message takes whole queued runs; splitting one walks its entries.
const _: () = assert!(MAX_MESSAGE_BYTES >= 2 * crate::hub::subscriber::RUN_BYTES);

/// One WatchEvents stream: the transport polls it, and it takes events
/// straight from its subscriber's queue (no task or channel in between).
/// Dropping it (the client went away, or the stream ended) unsubscribes.
pub struct EventStream {
    hub: Hub,
    sub: Arc<Subscriber>,
    ctl: StreamControls,
    remaining: u64,
    /// Messages built but not yet handed out (a loss notice splits a batch).
    ready: VecDeque<wire::WatchEventsResponse>,
    changed: Pin<Box<OwnedNotified>>,
    /// Running while holding events back to fill a batch.
    flush: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl EventStream {
    fn new(hub: Hub, sub: Arc<Subscriber>, ctl: StreamControls) -> Self {
        let changed = Box::pin(sub.changed());
        EventStream {
            hub,
            sub,
            remaining: ctl.limit,
            ctl,
            ready: VecDeque::new(),
            changed,
            flush: None,
            done: false,
        }
    }

    /// Moves what is queued into `ready`. Returns true when the stream ends
    /// after what was moved.
    fn fill(&mut self) -> bool {
        let clock = self.hub.clock();
        let want = self.ctl.max_batch.min(self.remaining.try_into().unwrap_or(usize::MAX));
        let mut items = Vec::with_capacity(want.min(4096));
        let ended = self.sub.take(want, MAX_MESSAGE_BYTES, &mut items);
        let mut events = Vec::new();
        for item in items {
            match item {
                // Encoded once by the hub; the bytes are shared.
                Item::Events(run) => events.push(run),
                Item::Lost(l) => {
                    self.push_events(&mut events);
                    let msg = wire::watch_events_response::Message::Lost(convert::loss(&l, &clock));
                    self.ready.push_back(wire::WatchEventsResponse {
                        message: Some(msg),
                        instance_id: self.hub.instance_id(),
                    });
                }
            }
        }
        self.push_events(&mut events);
        ended || self.remaining == 0
    }

    /// Whether the queue holds a full message (`max_batch` events or
    /// [`MAX_MESSAGE_BYTES`]): no reason then to hold it back.
    fn can_fill_a_message(&self) -> bool {
        let (events, bytes) = self.sub.queued();
        events >= self.ctl.max_batch || bytes >= MAX_MESSAGE_BYTES
    }

    fn push_events(&mut self, runs: &mut Vec<wire::EncodedEvents>) {
        if runs.is_empty() {
            return;
        }
        let n = runs.iter().map(|r| r.count() as u64).sum();
        self.sub.delivered(n);
        self.remaining = self.remaining.saturating_sub(n);
        let batch = wire::EncodedEventBatch {
            runs: std::mem::take(runs),
        };
        self.ready.push_back(wire::WatchEventsResponse {
            message: Some(wire::watch_events_response::Message::Events(batch)),
            instance_id: self.hub.instance_id(),
        });
    }
}

impl Stream for EventStream {
    type Item = Result<wire::WatchEventsResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(msg) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(msg)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if !this.sub.is_ready() {
                // Re-arm first, then check again: a push in between leaves
                // a permit, so no wakeup is lost.
                match this.changed.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.changed = Box::pin(this.sub.changed());
                        continue;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !this.ctl.flush_delay.is_zero() && !this.can_fill_a_message() {
                let delay = this.ctl.flush_delay;
                let sleep = this.flush.get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    // The queue filling up also ends the wait.
                    if let Poll::Ready(()) = this.changed.as_mut().poll(cx) {
                        this.changed = Box::pin(this.sub.changed());
                        continue;
                    }
                    return Poll::Pending;
                }
                this.flush = None;
            }
            this.done = this.fill();
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.sub.id);
    }
}

/// The status message.
pub fn status(hub: &Hub) -> pb::GetStatusResponse {
    let s = hub.status();
    let source = hub.source();
    let probe = source.probe.as_ref();
    let subscribers: Vec<pb::SubscriberStatus> = s
        .subscribers
        .iter()
        .map(|sub| {
            let c = sub.counters();
            pb::SubscriberStatus {
                id: sub.id,
                peer: sub.peer.clone(),
                request: Some(sub.request.clone()),
                subscribed_at: Some(convert::system_timestamp(sub.subscribed_at)),
                matched: c.matched,
                delivered: c.delivered,
                lost: c.lost,
                queued: c.queued,
                queued_bytes: c.queued_bytes,
                queue_byte_share: c.queue_byte_share,
            }
        })
        .collect();
    pb::GetStatusResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        instance_id: hub.instance_id(),
        kernel_release: kernel_release(),
        attach_mode: convert::mode(source.mode) as i32,
        refused_modes: source.refused_modes.clone(),
        uptime: Some(convert::duration(hub.uptime())),
        events_read: s.events_read,
        events_per_second: s.events_per_second,
        kernel_drops: s.kernel_drops,
        kernel_skipped: s.kernel_skipped,
        subscriber_lost: s.subscriber_lost_total,
        events_delivered: s.delivered_total,
        return_probes: probe.and_then(|p| p.return_probes()).map(|r| pb::ReturnProbeStatus {
            max_active: r.max_active,
            tracefs: r.tracefs,
            misses_counted: r.misses_counted,
        }),
        cookies: probe.map_or(pb::CookieSource::Unspecified, |p| convert::cookie_source(p.cookies())) as i32,
        cookie_namespaces_missed: probe.map_or(0, |p| p.cookie_dumps().namespaces_missed),
        cookie_own_namespace_only: probe.is_some_and(|p| p.cookie_dumps().own_namespace_only),
        kernel_events_produced: probe
            .map(|p| p.counters().produced)
            .unwrap_or(s.events_read + s.kernel_drops),
        reader: probe.map(|p| {
            let r = p.reader_state();
            pb::ReaderStatus {
                on_runtime: r.on_runtime,
                drains_on_timer: r.drains_on_timer,
                thread_id: r.thread.unwrap_or(0),
                realtime_priority: r.scheduling.and_then(|s| s.realtime).map_or(0, u32::from),
                nice: r.scheduling.map_or(0, |s| s.nice),
            }
        }),
        kernel_gate_open: s.gate_open,
        kernel_prefilter: s.prefilter.on,
        kernel_prefilter_keys: s.prefilter.keys as u32,
        kernel_cgroup_roots: s.prefilter.cgroup_roots as u32,
        history_len: s.history_len as u64,
        history_capacity: s.history_capacity as u64,
        queued_bytes: subscribers.iter().map(|sub| sub.queued_bytes).sum(),
        queue_bytes_limit: hub.config().queue_bytes as u64,
        subscribers,
        programs: probe
            .map(|p| {
                p.program_stats()
                    .into_iter()
                    .map(|ps| pb::ProgramStatus {
                        name: ps.name,
                        id: ps.id,
                        run_time_ns: ps.run_time_ns,
                        run_count: ps.run_count,
                        recursion_misses: ps.recursion_misses,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
