//! gRPC subscribers that take events from socktapd and measure what they
//! get: counts, losses by source, and kernel→client latency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;
use prost::bytes::Buf;
use prost::encoding::{decode_varint, WireType};
use prost::Message;
use socktap_client::DaemonAddr;
use socktap_proto::v1::{EventFilter, LossSource, LostEvents, WatchEventsRequest};
use tokio::task::JoinHandle;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::{ProstCodec, ProstEncoder};

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
    /// Walks each event's wire bytes to its timestamp and skips the rest
    /// by the event's length: no field after the timestamp is looked at.
    Scan,
    /// prost decodes each event, keeping only the timestamp (it still
    /// reads every field's tag and length to skip it).
    Lean,
    /// Every field, into `socktap.v1.Event` (strings allocated).
    Full,
}

/// What one subscriber saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Events received.
    pub events: u64,
    /// Lost events announced, by source: kernel, subscriber queue, history.
    pub lost_kernel: u64,
    /// See `lost_kernel`.
    pub lost_queue: u64,
    /// See `lost_kernel`.
    pub lost_history: u64,
    /// The kernel→client latency of every event received, ns.
    pub latency_ns: Histogram<u64>,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen {
            events: 0,
            lost_kernel: 0,
            lost_queue: 0,
            lost_history: 0,
            latency_ns: latency_histogram(),
        }
    }
}

/// An empty latency histogram: 1 ns to an hour, to 3 significant digits
/// (0.1 %); longer latencies count as an hour. Recording is a few
/// arithmetic operations and one increment in a counts array whose busy
/// part stays in cache: the subscribers share the 2 vCPUs with the
/// workload they measure, so what they spend per event counts as
/// socktap's overhead.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

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
    /// Subscribes once per cookie list, each subscriber placed as `place`
    /// says.
    pub fn start(
        addr: &DaemonAddr,
        filters: Vec<Vec<u64>>,
        decode: Decode,
        rt: &tokio::runtime::Handle,
        place: Placement,
    ) -> Subscribers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = filters
            .into_iter()
            .map(|cookies| {
                let subscriber = subscribe(addr.clone(), cookies, decode, stop.clone());
                match place {
                    Placement::Tasks => rt.spawn(subscriber),
                    Placement::ThreadEach { nice } => rt.spawn_blocking(move || {
                        if let Some(nice) = nice {
                            set_nice(nice);
                        }
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| format!("a subscriber's runtime: {e}"))?
                            .block_on(subscriber)
                    }),
                }
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

/// Where the subscribers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Tasks on the runtime [`Subscribers::start`] is given (its threads
    /// serve them all).
    Tasks,
    /// Each on a thread of its own, with a runtime of its own, as
    /// separate client processes would be; at this nice value, if any.
    ThreadEach {
        /// The threads' nice value (`None`: the workload's).
        nice: Option<i32>,
    },
}

/// Sets the calling thread's nice value; a refusal is printed, not fatal.
pub fn set_nice(nice: i32) {
    // SAFETY: plain system call on the calling thread (who 0); no memory
    // passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        eprintln!(
            "socktap-bench: a subscriber thread stays at its nice value: setting {nice} failed ({})",
            std::io::Error::last_os_error()
        );
    }
}

/// One subscriber, decoding as `decode` says.
async fn subscribe(addr: DaemonAddr, cookies: Vec<u64>, decode: Decode, stop: Arc<AtomicBool>) -> Result<Seen, String> {
    match decode {
        Decode::Scan => run::<ScanCodec>(addr, cookies, stop).await,
        Decode::Lean => run::<ProstCodec<WatchEventsRequest, LeanResponse>>(addr, cookies, stop).await,
        Decode::Full => {
            run::<ProstCodec<WatchEventsRequest, socktap_proto::v1::WatchEventsResponse>>(addr, cookies, stop).await
        }
    }
}

/// What the subscriber needs of a response, whichever way it was decoded.
trait Response: Send + Sync + 'static {
    /// Event timestamps (monotonic ns), or the loss notice; `None` for a
    /// response with neither.
    fn view(self) -> Result<Option<Result<Vec<u64>, LostEvents>>, String>;
}

impl Response for LeanResponse {
    fn view(self) -> Result<Option<Result<Vec<u64>, LostEvents>>, String> {
        Ok(self.message.map(|m| match m {
            LeanMessage::Events(b) => Ok(b.events.into_iter().map(|e| e.monotonic_ns).collect()),
            LeanMessage::Lost(l) => Err(l),
        }))
    }
}

impl Response for socktap_proto::v1::WatchEventsResponse {
    fn view(self) -> Result<Option<Result<Vec<u64>, LostEvents>>, String> {
        use socktap_proto::v1::watch_events_response::Message;
        Ok(self.message.map(|m| match m {
            Message::Events(b) => Ok(b.events.into_iter().map(|e| e.monotonic_ns).collect()),
            Message::Lost(l) => Err(l),
        }))
    }
}

/// A `WatchEventsResponse` as [`scan`] read it, in the decoder, from the
/// received bytes where they lie.
struct Scanned(Option<Result<Vec<u64>, LostEvents>>);

impl Response for Scanned {
    fn view(self) -> Result<Option<Result<Vec<u64>, LostEvents>>, String> {
        Ok(self.0)
    }
}

/// The `scan` decode: requests encoded by prost, responses handed over as
/// their bytes.
#[derive(Default)]
struct ScanCodec;

impl Codec for ScanCodec {
    type Encode = WatchEventsRequest;
    type Decode = Scanned;
    type Encoder = ProstEncoder<WatchEventsRequest>;
    type Decoder = ScanDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ScanDecoder
    }
}

struct ScanDecoder;

impl Decoder for ScanDecoder {
    type Item = Scanned;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Scanned>, tonic::Status> {
        let len = src.remaining();
        // A message is one contiguous buffer in tonic's decoder; scanning
        // it there saves copying every message out first.
        let scanned = if src.chunk().len() >= len {
            let s = scan(&src.chunk()[..len]);
            src.advance(len);
            s
        } else {
            scan(&src.copy_to_bytes(len))
        };
        scanned
            .map(|v| Some(Scanned(v)))
            .map_err(|e| tonic::Status::internal(format!("malformed WatchEventsResponse: {e}")))
    }
}

/// Reads a `WatchEventsResponse`: each event's `monotonic_ns` (field 3 of
/// `Event`), found by walking the event's fields up to it; the rest of the
/// event is skipped by its length. A loss notice is decoded whole.
fn scan(mut msg: &[u8]) -> Result<Option<Result<Vec<u64>, LostEvents>>, String> {
    let mut out = None;
    while !msg.is_empty() {
        let (field, wire) = key(&mut msg)?;
        match (field, wire) {
            (1, WireType::LengthDelimited) => {
                let mut batch = delimited(&mut msg)?;
                let mut stamps = Vec::new();
                while !batch.is_empty() {
                    let (field, wire) = key(&mut batch)?;
                    if (field, wire) != (1, WireType::LengthDelimited) {
                        skip(wire, &mut batch)?;
                        continue;
                    }
                    let mut event = delimited(&mut batch)?;
                    let mut stamp = 0;
                    while !event.is_empty() {
                        let (field, wire) = key(&mut event)?;
                        if (field, wire) == (3, WireType::Varint) {
                            stamp = varint(&mut event)?;
                            break;
                        }
                        skip(wire, &mut event)?;
                    }
                    stamps.push(stamp);
                }
                out = Some(Ok(stamps));
            }
            (2, WireType::LengthDelimited) => {
                let lost = LostEvents::decode(delimited(&mut msg)?).map_err(|e| e.to_string())?;
                out = Some(Err(lost));
            }
            _ => skip(wire, &mut msg)?,
        }
    }
    Ok(out)
}

#[inline]
fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    decode_varint(buf).map_err(|e| e.to_string())
}

#[inline]
fn key(buf: &mut &[u8]) -> Result<(u64, WireType), String> {
    let key = varint(buf)?;
    let wire = WireType::try_from(key & 7).map_err(|e| e.to_string())?;
    Ok((key >> 3, wire))
}

fn delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = varint(buf)?;
    if len > buf.len() as u64 {
        return Err(format!("a field of {len} bytes where {} are left", buf.len()));
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(field)
}

fn skip(wire: WireType, buf: &mut &[u8]) -> Result<(), String> {
    let len = match wire {
        WireType::Varint => return varint(buf).map(drop),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => return delimited(buf).map(drop),
        WireType::StartGroup | WireType::EndGroup => return Err("a group (socktap.v1 has none)".into()),
    };
    if len > buf.len() {
        return Err(format!("a field of {len} bytes where {} are left", buf.len()));
    }
    *buf = &buf[len..];
    Ok(())
}

async fn run<C>(addr: DaemonAddr, cookies: Vec<u64>, stop: Arc<AtomicBool>) -> Result<Seen, String>
where
    C: Codec<Encode = WatchEventsRequest> + Default + Send + 'static,
    C::Decode: Response,
{
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
    let codec = C::default();
    let path = PathAndQuery::from_static("/socktap.v1.Socktap/WatchEvents");
    let mut stream = client
        .server_streaming(tonic::Request::new(req), path, codec)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut seen = Seen::default();
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
        let Some(msg) = msg.map(Response::view).transpose()?.flatten() else {
            return Ok(seen);
        };
        match msg {
            Ok(stamps) => {
                let now = monotonic_ns();
                seen.events += stamps.len() as u64;
                for ts in stamps {
                    seen.latency_ns.saturating_record(now.saturating_sub(ts));
                }
            }
            Err(l) => match l.source() {
                // Both lost in the kernel: the ring full, or the program
                // skipped on a call (an upper bound).
                LossSource::KernelRingBuffer | LossSource::KernelSkipped => seen.lost_kernel += l.count,
                LossSource::SubscriberQueue => seen.lost_queue += l.count,
                _ => seen.lost_history += l.count,
            },
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socktap_proto::v1::watch_events_response::Message as Msg;
    use socktap_proto::v1::{Event, EventBatch, WatchEventsResponse};

    fn event(seq: u64, monotonic_ns: u64) -> Event {
        Event {
            seq,
            time: Some(socktap_proto::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            monotonic_ns,
            cookie: u64::MAX - seq,
            bytes: 64,
            pid: 4242,
            comm: "writer".into(),
            local_addr: "127.0.0.1".into(),
            local_port: 40000,
            remote_addr: "::1".into(),
            remote_port: 443,
            ..Default::default()
        }
    }

    #[test]
    fn scan_reads_every_timestamp_of_a_batch() {
        let stamps: Vec<u64> = vec![1, 127, 128, 1 << 35, u64::MAX];
        let msg = WatchEventsResponse {
            instance_id: 0x0123_4567_89ab_cdef,
            message: Some(Msg::Events(EventBatch {
                events: stamps
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| event(i as u64 + 1, t))
                    .collect(),
            })),
        };
        assert_eq!(scan(&msg.encode_to_vec()).unwrap(), Some(Ok(stamps)));
    }

    #[test]
    fn scan_reads_a_loss_notice_whole() {
        let lost = LostEvents {
            source: LossSource::SubscriberQueue as i32,
            count: 17,
            first_seq: 100,
            last_seq: 116,
            ..Default::default()
        };
        let msg = WatchEventsResponse {
            instance_id: 0x0123_4567_89ab_cdef,
            message: Some(Msg::Lost(lost)),
        };
        assert_eq!(scan(&msg.encode_to_vec()).unwrap(), Some(Err(lost)));
        assert_eq!(scan(&[]).unwrap(), None);
    }

    #[test]
    fn scan_refuses_a_cut_message() {
        // No instance id: a message cut right before it would be whole.
        let msg = WatchEventsResponse {
            instance_id: 0,
            message: Some(Msg::Events(EventBatch {
                events: vec![event(1, 99), event(2, 100)],
            })),
        }
        .encode_to_vec();
        for cut in 1..msg.len() {
            assert!(scan(&msg[..cut]).is_err(), "cut at {cut} of {}", msg.len());
        }
    }
}
