//! gRPC subscribers that take events from socktapd and measure what they
//! get: counts, losses by source, and kernel→client latency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use socktap_proto::v1::socktap_client::SocktapClient;
use socktap_proto::v1::watch_events_response::Message;
use socktap_proto::v1::{EventFilter, LossSource, WatchEventsRequest};
use tokio::task::JoinHandle;

/// What one subscriber saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Events received.
    pub events: u64,
    /// Lost events announced, by source: kernel, subscriber queue, history.
    pub lost_kernel: u64,
    /// See `lost_kernel`.
    pub lost_queue: u64,
    /// See `lost_kernel`.
    pub lost_history: u64,
    /// Latency samples, ns.
    pub latencies_ns: Vec<u64>,
}

/// Keep at most this many latency samples per subscriber.
const MAX_SAMPLES: usize = 200_000;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: FFI; `ts` is a live, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Running subscribers.
pub struct Subscribers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Result<Seen, String>>>,
}

impl Subscribers {
    /// Subscribes once per cookie list.
    pub fn start(url: &str, filters: Vec<Vec<u64>>) -> Subscribers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = filters
            .into_iter()
            .enumerate()
            .map(|(i, cookies)| {
                let url = url.to_owned();
                let stop = stop.clone();
                tokio::spawn(async move { run(url, cookies, i as u64, stop).await })
            })
            .collect();
        Subscribers { stop, tasks }
    }

    /// Lets them drain briefly, then stops them and returns what they saw.
    pub async fn finish(self, drain: std::time::Duration) -> Result<Vec<Seen>, String> {
        tokio::time::sleep(drain).await;
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.map_err(|e| e.to_string())??);
        }
        Ok(out)
    }
}

async fn run(url: String, cookies: Vec<u64>, seed: u64, stop: Arc<AtomicBool>) -> Result<Seen, String> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = SocktapClient::new(channel).max_decoding_message_size(64 << 20);
    let req = WatchEventsRequest {
        allow: vec![EventFilter {
            cookies,
            ..Default::default()
        }],
        max_batch_events: Some(4096),
        ..Default::default()
    };
    let mut stream = client.watch_events(req).await.map_err(|e| e.to_string())?.into_inner();
    let mut seen = Seen::default();
    let mut tick = seed;
    let ticker = tokio::time::sleep(std::time::Duration::from_millis(20));
    tokio::pin!(ticker);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|e| e.to_string())?,
            _ = &mut ticker => {
                if stop.load(Ordering::Relaxed) { return Ok(seen) }
                ticker.as_mut().reset(tokio::time::Instant::now() + std::time::Duration::from_millis(20));
                continue;
            }
        };
        let Some(msg) = msg.and_then(|m| m.message) else {
            return Ok(seen);
        };
        match msg {
            Message::Events(b) => {
                let now = monotonic_ns();
                seen.events += b.events.len() as u64;
                for e in &b.events {
                    // A cheap deterministic sampler once the buffer is full.
                    tick = tick.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    if seen.latencies_ns.len() < MAX_SAMPLES {
                        seen.latencies_ns.push(now.saturating_sub(e.monotonic_ns));
                    } else {
                        let j = (tick >> 33) as usize % (seen.events as usize);
                        if j < MAX_SAMPLES {
                            seen.latencies_ns[j] = now.saturating_sub(e.monotonic_ns);
                        }
                    }
                }
            }
            Message::Lost(l) => match l.source() {
                LossSource::KernelRingBuffer => seen.lost_kernel += l.count,
                LossSource::SubscriberQueue => seen.lost_queue += l.count,
                _ => seen.lost_history += l.count,
            },
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(seen);
        }
    }
}
