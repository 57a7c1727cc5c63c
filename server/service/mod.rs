//! The gRPC service: validates each request, then hands it to the hub. Each
//! WatchEvents stream gets a task that drains its subscriber's queue into
//! messages; it ends when the client goes away, the limit is reached, or the
//! hub shuts down.

pub mod convert;
pub mod validate;

use std::sync::Arc;

use socktap_proto::v1 as pb;
use socktap_proto::v1::socktap_server::Socktap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::event::monotonic_now_ns;
use crate::hub::{Hub, Item, SubscribeError, Subscriber};
use crate::probe::kernel_release;
use validate::StreamControls;

/// Messages buffered between a stream's task and the transport. Kept small:
/// a slow client's backlog belongs in its subscriber queue, where it is
/// counted.
const STREAM_BUFFER: usize = 4;

/// The `socktap.v1.Socktap` service.
#[derive(Clone)]
pub struct SocktapService {
    hub: Hub,
}

impl SocktapService {
    /// A service over `hub`.
    pub fn new(hub: Hub) -> Self {
        SocktapService { hub }
    }
}

type WatchStream = ReceiverStream<Result<pb::WatchEventsResponse, Status>>;

#[tonic::async_trait]
impl Socktap for SocktapService {
    type WatchEventsStream = WatchStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "local".into());
        let req = request.into_inner();
        let clock = self.hub.clock();
        let now = clock.unix_ns(monotonic_now_ns());
        let cfg = self.hub.config();
        let watch = validate::watch(&req, cfg.filter_limits, cfg.history_events, &clock, now)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sub = self
            .hub
            .subscribe(peer, req, watch.selector, watch.start)
            .map_err(|e| match e {
                SubscribeError::TooMany(_) => Status::resource_exhausted(e.to_string()),
                SubscribeError::ShuttingDown => Status::unavailable(e.to_string()),
            })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(stream_task(self.hub.clone(), sub, watch.controls, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_status(&self, _: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(status(&self.hub)))
    }
}

/// Drains one subscriber's queue into its stream.
async fn stream_task(
    hub: Hub,
    sub: Arc<Subscriber>,
    ctl: StreamControls,
    tx: mpsc::Sender<Result<pb::WatchEventsResponse, Status>>,
) {
    let clock = hub.clock();
    let mut remaining = ctl.limit;
    let mut items = Vec::with_capacity(ctl.max_batch);
    'stream: loop {
        while !sub.is_ready() {
            tokio::select! {
                _ = sub.changed() => {}
                _ = tx.closed() => break 'stream,
            }
        }
        if !ctl.flush_delay.is_zero() && sub.queued() < ctl.max_batch {
            tokio::select! {
                _ = tokio::time::sleep(ctl.flush_delay) => {}
                _ = tx.closed() => break 'stream,
            }
        }
        items.clear();
        let want = ctl.max_batch.min(remaining.try_into().unwrap_or(usize::MAX));
        let ended = sub.take(want, &mut items);
        let mut events = Vec::new();
        for item in &items {
            match item {
                Item::Event(e) => events.push(convert::event(e, &clock)),
                Item::Lost(l) => {
                    if !send_events(&tx, &sub, &mut events, &mut remaining).await {
                        break 'stream;
                    }
                    let msg = pb::watch_events_response::Message::Lost(convert::loss(l, &clock));
                    if tx
                        .send(Ok(pb::WatchEventsResponse { message: Some(msg) }))
                        .await
                        .is_err()
                    {
                        break 'stream;
                    }
                }
            }
        }
        if !send_events(&tx, &sub, &mut events, &mut remaining).await || remaining == 0 || ended {
            break;
        }
    }
    hub.unsubscribe(sub.id);
}

/// Sends the gathered events as one batch. False when the client is gone.
async fn send_events(
    tx: &mpsc::Sender<Result<pb::WatchEventsResponse, Status>>,
    sub: &Subscriber,
    events: &mut Vec<pb::Event>,
    remaining: &mut u64,
) -> bool {
    if events.is_empty() {
        return true;
    }
    let n = events.len() as u64;
    let batch = pb::EventBatch {
        events: std::mem::take(events),
    };
    let msg = pb::WatchEventsResponse {
        message: Some(pb::watch_events_response::Message::Events(batch)),
    };
    if tx.send(Ok(msg)).await.is_err() {
        return false;
    }
    sub.delivered(n);
    *remaining = remaining.saturating_sub(n);
    true
}

/// The status message.
pub fn status(hub: &Hub) -> pb::GetStatusResponse {
    let s = hub.status();
    let source = hub.source();
    let probe = source.probe.as_ref();
    pb::GetStatusResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: kernel_release(),
        attach_mode: convert::mode(source.mode) as i32,
        refused_modes: source.refused_modes.clone(),
        uptime: Some(convert::duration(hub.uptime())),
        events_read: s.events_read,
        events_per_second: s.events_per_second,
        kernel_drops: s.kernel_drops,
        kernel_events_produced: probe
            .map(|p| p.counters().produced)
            .unwrap_or(s.events_read + s.kernel_drops),
        kernel_gate_open: s.gate_open,
        history_len: s.history_len as u64,
        history_capacity: s.history_capacity as u64,
        subscribers: s
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
                }
            })
            .collect(),
        programs: probe
            .map(|p| {
                p.program_stats()
                    .into_iter()
                    .map(|ps| pb::ProgramStatus {
                        name: ps.name,
                        id: ps.id,
                        run_time_ns: ps.run_time_ns,
                        run_count: ps.run_count,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
