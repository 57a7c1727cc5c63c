//! gRPC subscribers that take events from socktapd and measure what they
//! get: counts, losses by source, and kernel→client latency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use socktap_client::DaemonAddr;
use socktap_proto::v1::{EventFilter, LossSource, LostEvents, WatchEventsRequest};
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;

/// `socktap.v1.WatchEventsResponse` as the benchmark's subscriber reads it:
/// the same wire format, decoding of each event only the fields it uses
/// (prost skips the others without allocating). A consumer that decodes
/// every field into `socktap.v1.Event` spends more of the machine's CPU;
/// `--subscriber-decode full` measures that.
#[derive(Clone, PartialEq, prost::Message)]
struct LeanResponse {
    #[prost(oneof = "LeanMessage", tags = "1, 2")]
    message: Option<LeanMessage>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum LeanMessage {
    #[prost(message, tag = "1")]
    Events(LeanBatch),
    #[prost(message, tag = "2")]
    Lost(LostEvents),
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeanBatch {
    #[prost(message, repeated, tag = "1")]
    events: Vec<LeanEvent>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeanEvent {
    #[prost(uint64, tag = "3")]
    monotonic_ns: u64,
}

/// How the subscriber decodes events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Decode {
    /// Only the timestamp it measures latency with.
    Lean,
    /// Every field, into `socktap.v1.Event` (strings allocated).
    Full,
}

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
    pub fn start(addr: &DaemonAddr, filters: Vec<Vec<u64>>, decode: Decode) -> Subscribers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = filters
            .into_iter()
            .enumerate()
            .map(|(i, cookies)| {
                let addr = addr.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    match decode {
                        Decode::Lean => run::<LeanResponse>(addr, cookies, i as u64, stop).await,
                        Decode::Full => {
                            run::<socktap_proto::v1::WatchEventsResponse>(addr, cookies, i as u64, stop).await
                        }
                    }
                })
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

/// What the subscriber needs of a response, whichever way it was decoded.
trait Response: prost::Message + Default + Send + 'static {
    /// Event timestamps (monotonic ns), or the loss notice.
    fn view(self) -> Option<Result<Vec<u64>, LostEvents>>;
}

impl Response for LeanResponse {
    fn view(self) -> Option<Result<Vec<u64>, LostEvents>> {
        Some(match self.message? {
            LeanMessage::Events(b) => Ok(b.events.into_iter().map(|e| e.monotonic_ns).collect()),
            LeanMessage::Lost(l) => Err(l),
        })
    }
}

impl Response for socktap_proto::v1::WatchEventsResponse {
    fn view(self) -> Option<Result<Vec<u64>, LostEvents>> {
        use socktap_proto::v1::watch_events_response::Message;
        Some(match self.message? {
            Message::Events(b) => Ok(b.events.into_iter().map(|e| e.monotonic_ns).collect()),
            Message::Lost(l) => Err(l),
        })
    }
}

async fn run<R: Response>(
    addr: DaemonAddr,
    cookies: Vec<u64>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<Seen, String> {
    // The client library's channel: the same HTTP/2 windows as `socktap`.
    let channel = socktap_client::channel_with(&addr, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    let req = WatchEventsRequest {
        allow: vec![EventFilter {
            cookies,
            ..Default::default()
        }],
        max_batch_events: Some(4096),
        ..Default::default()
    };
    client.ready().await.map_err(|e| e.to_string())?;
    let codec = tonic_prost::ProstCodec::<WatchEventsRequest, R>::default();
    let path = PathAndQuery::from_static("/socktap.v1.Socktap/WatchEvents");
    let mut stream = client
        .server_streaming(tonic::Request::new(req), path, codec)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
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
        let Some(msg) = msg.and_then(R::view) else {
            return Ok(seen);
        };
        match msg {
            Ok(stamps) => {
                let now = monotonic_ns();
                seen.events += stamps.len() as u64;
                for ts in stamps {
                    // A cheap deterministic sampler once the buffer is full.
                    tick = tick.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    if seen.latencies_ns.len() < MAX_SAMPLES {
                        seen.latencies_ns.push(now.saturating_sub(ts));
                    } else {
                        let j = (tick >> 33) as usize % (seen.events as usize);
                        if j < MAX_SAMPLES {
                            seen.latencies_ns[j] = now.saturating_sub(ts);
                        }
                    }
                }
            }
            Err(l) => match l.source() {
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
