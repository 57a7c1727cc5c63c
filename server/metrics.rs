//! socktapd's own counters for Prometheus (`--metrics-listen`): what
//! `GetStatus` says, as OpenMetrics text at `GET /metrics`, read afresh at
//! each scrape. Only the daemon's totals and gauges: nothing per socket or
//! per process, whose labels would grow without bound.

use std::future::Future;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use socktap_proto::v1 as pb;
use tracing::info;

use crate::hub::Hub;

/// The content type of OpenMetrics text.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    hub: Hub,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics at /metrics");
    }
    let app = Router::new().route("/metrics", get(move || scrape(hub.clone())));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn scrape(hub: Hub) -> impl IntoResponse {
    // Off the runtime's worker, as GetStatus is (service.rs).
    let encoded = tokio::task::spawn_blocking(move || encode(&hub).map_err(|e| e.to_string()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match encoded {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

/// The metrics as OpenMetrics text.
pub fn encode(hub: &Hub) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector { hub: hub.clone() }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Reads the status at each scrape.
struct StatusCollector {
    hub: Hub,
}

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = crate::service::status(&self.hub);
        let mode = pb::AttachMode::try_from(s.attach_mode)
            .map(|m| m.as_str_name().trim_start_matches("ATTACH_MODE_").to_lowercase())
            .unwrap_or_default();
        let info = [
            ("version", s.version.as_str()),
            ("kernel", s.kernel_release.as_str()),
            ("attach_mode", mode.as_str()),
        ];
        let mut info_encoder = encoder.encode_descriptor(
            "socktap_info",
            "socktapd's version, the kernel and the attach mode in use (always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(info_encoder.encode_family(&info)?)?;
        gauge(
            &mut encoder,
            "socktap_uptime_seconds",
            "Seconds since socktapd started",
            s.uptime
                .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
                .unwrap_or(0.0),
        )?;
        counter(
            &mut encoder,
            "socktap_events_read",
            "Events read from the kernel's ring buffer",
            s.events_read,
        )?;
        counter(
            &mut encoder,
            "socktap_kernel_events_produced",
            "Events the kernel numbered: read, dropped, or not read yet",
            s.kernel_events_produced,
        )?;
        counter(
            &mut encoder,
            "socktap_events_delivered",
            "Events handed to subscribers' streams, all subscribers together",
            s.events_delivered,
        )?;
        let lost = [
            ("kernel_ring_buffer", s.kernel_drops),
            ("kernel_skipped", s.kernel_skipped),
            ("subscriber_queue", s.subscriber_lost),
        ];
        let mut lost_encoder = encoder.encode_descriptor(
            "socktap_events_lost",
            "Events lost, by where: the ring buffer full, calls the kernel skipped the programs on (an upper bound), subscribers' queues full",
            None,
            MetricType::Counter,
        )?;
        for (source, n) in lost {
            ConstCounter::new(n).encode(lost_encoder.encode_family(&[("source", source)])?)?;
        }
        gauge(
            &mut encoder,
            "socktap_subscribers",
            "WatchEvents streams open",
            s.subscribers.len() as u64,
        )?;
        gauge(
            &mut encoder,
            "socktap_kernel_gate_open",
            "1 while some subscriber wants events and the programs record them",
            u32::from(s.kernel_gate_open),
        )?;
        gauge(
            &mut encoder,
            "socktap_queued_bytes",
            "Encoded events waiting in subscribers' queues",
            s.queued_bytes,
        )?;
        gauge(
            &mut encoder,
            "socktap_queue_limit_bytes",
            "The queue memory all subscribers share (--queue-bytes)",
            s.queue_bytes_limit,
        )?;
        gauge(
            &mut encoder,
            "socktap_history_events",
            "Events held for replay and resume",
            s.history_len,
        )?;
        per_program(
            &mut encoder,
            "socktap_program_runs",
            "Runs of each BPF program (0 unless BPF stats are on: socktapd --bpf-stats)",
            &s.programs,
            |p| p.run_count,
        )?;
        per_program(
            &mut encoder,
            "socktap_program_run_seconds",
            "Time spent in each BPF program (0 unless BPF stats are on)",
            &s.programs,
            |p| p.run_time_ns as f64 / 1e9,
        )?;
        per_program(
            &mut encoder,
            "socktap_program_skipped",
            "Calls the kernel skipped each BPF program on (it was already running on that CPU)",
            &s.programs,
            |p| p.recursion_misses,
        )?;
        if let Some(r) = &s.return_probes {
            gauge(
                &mut encoder,
                "socktap_return_probe_max_active",
                "kprobe mode: calls in flight each return probe tracks; returns beyond are missed",
                r.max_active,
            )?;
            gauge(
                &mut encoder,
                "socktap_return_probe_misses_counted",
                "kprobe mode: 1 when missed returns are counted (in kernel_skipped), 0 where the kernel cannot tell",
                u32::from(r.misses_counted),
            )?;
        }
        Ok(())
    }
}

fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter with a `program` label per loaded BPF program.
fn per_program<N: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    programs: &[pb::ProgramStatus],
    value: impl Fn(&pb::ProgramStatus) -> N,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for p in programs {
        ConstCounter::new(value(p)).encode(e.encode_family(&[("program", p.name.as_str())])?)?;
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}
