//! The benchmark issue's targets, judged on one invocation's summary: a
//! verdict per target, printed after the table and written to the JSON.
//! It reads a run; it never fails one (the quick mode's checks are loss
//! and that every configuration produced numbers, never speed).

use clap::ValueEnum;
use serde_json::{json, Value};

use crate::workload::Workload;
use crate::Config;

/// How a workload or configuration is named on the command line.
fn flag(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

/// One configuration of one workload over its rounds, as the table shows it.
#[derive(Clone, Debug)]
pub struct Row {
    pub workload: Workload,
    pub config: Config,
    /// Median ops/s over the untraced configuration's; None without it.
    pub ratio: Option<f64>,
    /// How far its rounds' ops/s lie apart: (max − min) / median; None
    /// with one round. The untraced configuration's is the run's noise.
    pub spread: Option<f64>,
    /// Events delivered per second to all subscribers together.
    pub delivered_per_sec: f64,
    /// Events lost from every source, over all rounds.
    pub lost: u64,
    /// Latency p50 and p99 in µs.
    pub latency_us: Option<[f64; 2]>,
    /// socktapd's CPU in cores.
    pub cores: Option<f64>,
    /// socktapd's peak RSS in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Why a round produced no numbers, if one did not.
    pub note: Option<String>,
}

/// The paced run.
#[derive(Clone, Copy, Debug)]
pub struct Paced {
    pub events_per_sec: f64,
    /// None when nothing arrived.
    pub p50_us: Option<f64>,
}

/// How long each configuration ran.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub seconds: f64,
    pub rounds: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Met,
    NotMet,
    /// This invocation did not run what the target needs.
    NotMeasured,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::NotMet => "not met",
            Status::NotMeasured => "not measured",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub status: Status,
}

impl Verdict {
    fn new(target: impl Into<String>, measured: impl Into<String>, status: Status) -> Verdict {
        Verdict {
            target: target.into(),
            measured: measured.into(),
            status,
        }
    }

    fn met_if(target: impl Into<String>, measured: impl Into<String>, met: bool) -> Verdict {
        Verdict::new(target, measured, if met { Status::Met } else { Status::NotMet })
    }

    pub fn line(&self) -> String {
        format!("  {:<13} {}: {}", self.status.label(), self.target, self.measured)
    }

    pub fn json(&self) -> Value {
        json!({"target": self.target, "measured": self.measured, "status": self.status.label().replace(' ', "_")})
    }
}

/// ", W2 at 54.3 % of untraced": the loss targets are "at the full W2
/// rate", and tracing every call slows W2 itself.
fn of_untraced(r: &Row) -> String {
    r.ratio
        .map(|x| format!(", {:?} at {:.1} % of untraced", r.workload, 100.0 * x))
        .unwrap_or_default()
}

const IDLE_RATIO: f64 = 0.99;
const FULL_COPY_EACH: f64 = 250_000.0;
const P99_US: f64 = 1000.0;
const P50_US: f64 = 50.0;
const CORES_PER_MILLION: f64 = 0.2;
const IDLE_CORES: f64 = 0.001;
const RSS_MIB: f64 = 48.0;
const LOW_RATE: f64 = 10_000.0;
const ZERO_LOSS_SECONDS: f64 = 60.0;

/// Every target, in the order.
pub fn evaluate(rows: &[Row], paced: Option<&Paced>, span: Span) -> Vec<Verdict> {
    let find = |w: Workload, c: Config| rows.iter().find(|r| r.workload == w && r.config == c);
    // The row if it has numbers; otherwise a "not measured" verdict saying why.
    let need = |target: &str, w: Workload, c: Config| -> Result<&Row, Verdict> {
        match find(w, c) {
            None => Err(Verdict::new(
                target,
                format!("not run (needs --workloads {} --configs {})", flag(w), flag(c)),
                Status::NotMeasured,
            )),
            Some(r) => match &r.note {
                Some(n) => Err(Verdict::new(target, n.clone(), Status::NotMeasured)),
                None => Ok(r),
            },
        }
    };
    let mut out = Vec::new();

    for (w, min) in [(Workload::W1, 0.95), (Workload::W2, 0.90)] {
        let target = format!("{w:?}, every call to 1 subscriber, ≥ {:.0} % of untraced", 100.0 * min);
        out.push(match need(&target, w, Config::Sub1) {
            Err(v) => v,
            Ok(r) => match r.ratio {
                None => Verdict::new(target, "needs the untraced configuration", Status::NotMeasured),
                Some(x) => Verdict::met_if(target, format!("{:.1} %", 100.0 * x), x >= min),
            },
        });
    }

    let target = "socktapd with no subscriber, ≥ 99 % of untraced";
    let idle: Vec<&Row> = rows
        .iter()
        .filter(|r| r.config == Config::Idle && r.note.is_none())
        .collect();
    let ratios: Vec<(Workload, f64)> = idle.iter().filter_map(|r| Some((r.workload, r.ratio?))).collect();
    out.push(if ratios.is_empty() {
        Verdict::new(target, "not run (needs --configs untraced,idle)", Status::NotMeasured)
    } else {
        // A miss by less than the untraced rounds lie apart is said so:
        // with the programs detached, that is the machine's noise.
        let text = ratios
            .iter()
            .map(|&(w, x)| {
                let noise = find(w, Config::Untraced)
                    .and_then(|r| r.spread)
                    .filter(|&s| x < IDLE_RATIO && 1.0 - x <= s);
                match noise {
                    Some(s) => format!(
                        "{w:?} {:.1} % (within noise: its untraced rounds lie {:.1} % apart)",
                        100.0 * x,
                        100.0 * s
                    ),
                    None => format!("{w:?} {:.1} %", 100.0 * x),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        Verdict::met_if(target, text, ratios.iter().all(|&(_, x)| x >= IDLE_RATIO))
    });

    let target = "zero loss for 60 s of W2, 1 subscriber";
    out.push(match need(target, Workload::W2, Config::Sub1) {
        Err(v) => v,
        Ok(r) => {
            let over = format!(
                "{} × {} s, {:.0} events/s delivered{}",
                span.rounds,
                span.seconds,
                r.delivered_per_sec,
                of_untraced(r)
            );
            if r.lost > 0 {
                Verdict::new(target, format!("{} lost in {over}", r.lost), Status::NotMet)
            } else if span.seconds >= ZERO_LOSS_SECONDS {
                Verdict::new(target, format!("none lost in {over}"), Status::Met)
            } else {
                Verdict::new(
                    target,
                    format!("none lost in {over} (the target is 60 s in one run: --seconds 60)"),
                    Status::NotMeasured,
                )
            }
        }
    });

    let target = "16 disjoint subscribers under W2, zero loss";
    out.push(match need(target, Workload::W2, Config::Sub16Disjoint) {
        Err(v) => v,
        Ok(r) => Verdict::met_if(
            target,
            format!(
                "{} lost, {:.0} events/s delivered{}",
                r.lost,
                r.delivered_per_sec,
                of_untraced(r)
            ),
            r.lost == 0,
        ),
    });

    for w in [Workload::W1, Workload::W2] {
        let target = format!("16 full-copy subscribers under {w:?}, ≥ 250k events/s each");
        if find(w, Config::Sub16Full).is_none() {
            continue;
        }
        out.push(match need(&target, w, Config::Sub16Full) {
            Err(v) => v,
            Ok(r) => {
                let each = r.delivered_per_sec / 16.0;
                Verdict::met_if(target, format!("{:.0}k each", each / 1000.0), each >= FULL_COPY_EACH)
            }
        });
    }

    for w in [Workload::W1, Workload::W2] {
        let target = format!("{w:?} latency p99 ≤ 1 ms at full load, 1 subscriber");
        out.push(match need(&target, w, Config::Sub1) {
            Err(v) => v,
            Ok(r) => match r.latency_us {
                None => Verdict::new(target, "no events received", Status::NotMet),
                Some([_, p99]) => Verdict::met_if(target, format!("{:.2} ms", p99 / 1000.0), p99 <= P99_US),
            },
        });
    }

    let target = "latency p50 ≤ 50 µs at ≤ 10k events/s";
    out.push(match paced {
        None => Verdict::new(target, "not run (--paced-round-trips 0)", Status::NotMeasured),
        Some(p) if p.events_per_sec > LOW_RATE => Verdict::new(
            target,
            format!("paced at {:.0} events/s, above 10k", p.events_per_sec),
            Status::NotMeasured,
        ),
        Some(Paced { p50_us: None, .. }) => Verdict::new(target, "no events received", Status::NotMet),
        Some(&Paced {
            events_per_sec,
            p50_us: Some(p50),
        }) => Verdict::met_if(
            target,
            format!("{p50:.1} µs at {events_per_sec:.0} events/s"),
            p50 <= P50_US,
        ),
    });

    for w in [Workload::W1, Workload::W2] {
        let target = format!("socktapd ≤ 0.2 core per M events/s, {w:?}, 1 subscriber");
        out.push(match need(&target, w, Config::Sub1) {
            Err(v) => v,
            Ok(r) => match r.cores {
                Some(cores) if r.delivered_per_sec > 0.0 => {
                    let per_million = cores / (r.delivered_per_sec / 1e6);
                    Verdict::met_if(
                        target,
                        format!(
                            "{per_million:.3} ({cores:.3} core for {:.0}k events/s)",
                            r.delivered_per_sec / 1000.0
                        ),
                        per_million <= CORES_PER_MILLION,
                    )
                }
                _ => Verdict::new(target, "nothing delivered", Status::NotMet),
            },
        });
    }

    let target = "socktapd ≤ 0.1 % of a core when idle";
    let idle_cores = idle.iter().filter_map(|r| r.cores).reduce(f64::max);
    out.push(match idle_cores {
        None => Verdict::new(target, "not run (needs --configs idle)", Status::NotMeasured),
        Some(c) => Verdict::met_if(target, format!("{c:.5} core at most"), c <= IDLE_CORES),
    });

    let target = "socktapd RSS ≤ 48 MiB under load";
    let loaded = rows
        .iter()
        .filter(|r| !matches!(r.config, Config::Untraced | Config::Idle | Config::Bpftrace));
    let rss = loaded.clone().filter_map(|r| r.peak_rss_mib).reduce(f64::max);
    out.push(match rss {
        None => Verdict::new(
            target,
            "not run (needs a configuration with subscribers)",
            Status::NotMeasured,
        ),
        Some(m) => {
            let at = loaded
                .filter(|r| r.peak_rss_mib == Some(m))
                .map(|r| format!("{:?} {:?}", r.workload, r.config).to_lowercase())
                .next()
                .unwrap_or_default();
            Verdict::met_if(target, format!("{m:.1} MiB at most ({at})"), m <= RSS_MIB)
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: Workload, config: Config) -> Row {
        Row {
            workload,
            config,
            ratio: Some(1.0),
            spread: None,
            delivered_per_sec: 0.0,
            lost: 0,
            latency_us: None,
            cores: None,
            peak_rss_mib: None,
            note: None,
        }
    }

    const SHORT: Span = Span {
        seconds: 3.0,
        rounds: 2,
    };

    fn status(vs: &[Verdict], prefix: &str) -> Status {
        let found: Vec<&Verdict> = vs.iter().filter(|v| v.target.starts_with(prefix)).collect();
        assert_eq!(found.len(), 1, "one verdict for {prefix:?} in {vs:#?}");
        found[0].status
    }

    #[test]
    fn ratios_are_met_at_the_line_and_missed_below_it() {
        let mut w1 = row(Workload::W1, Config::Sub1);
        let mut w2 = row(Workload::W2, Config::Sub1);
        w1.ratio = Some(0.95);
        w2.ratio = Some(0.8999);
        let vs = evaluate(&[w1.clone(), w2.clone()], None, SHORT);
        assert_eq!(status(&vs, "W1, every call"), Status::Met);
        assert_eq!(status(&vs, "W2, every call"), Status::NotMet);
        w1.ratio = None;
        let vs = evaluate(&[w1], None, SHORT);
        assert_eq!(status(&vs, "W1, every call"), Status::NotMeasured);
        assert_eq!(status(&vs, "W2, every call"), Status::NotMeasured);
    }

    #[test]
    fn zero_loss_needs_a_whole_minute_and_no_loss_from_any_source() {
        let mut r = row(Workload::W2, Config::Sub1);
        r.delivered_per_sec = 640_000.0;
        let minute = Span {
            seconds: 60.0,
            rounds: 1,
        };
        let vs = evaluate(std::slice::from_ref(&r), None, minute);
        assert_eq!(status(&vs, "zero loss for 60 s"), Status::Met);
        let vs = evaluate(std::slice::from_ref(&r), None, SHORT);
        assert_eq!(status(&vs, "zero loss for 60 s"), Status::NotMeasured);
        r.lost = 1;
        let vs = evaluate(std::slice::from_ref(&r), None, minute);
        assert_eq!(status(&vs, "zero loss for 60 s"), Status::NotMet);
        let mut d = row(Workload::W2, Config::Sub16Disjoint);
        d.lost = 1;
        assert_eq!(status(&evaluate(&[d], None, SHORT), "16 disjoint"), Status::NotMet);
    }

    #[test]
    fn full_copies_are_judged_per_subscriber_for_each_workload_run() {
        let mut w1 = row(Workload::W1, Config::Sub16Full);
        let mut w2 = row(Workload::W2, Config::Sub16Full);
        w1.delivered_per_sec = 16.0 * 250_000.0;
        w2.delivered_per_sec = 16.0 * 249_000.0;
        let vs = evaluate(&[w1.clone(), w2], None, SHORT);
        assert_eq!(status(&vs, "16 full-copy subscribers under W1"), Status::Met);
        assert_eq!(status(&vs, "16 full-copy subscribers under W2"), Status::NotMet);
        // A workload that did not run this configuration gets no line.
        let vs = evaluate(&[w1], None, SHORT);
        assert!(!vs
            .iter()
            .any(|v| v.target.starts_with("16 full-copy subscribers under W2")));
    }

    #[test]
    fn latency_cpu_idle_and_memory_use_their_own_limits() {
        let mut w1 = row(Workload::W1, Config::Sub1);
        w1.latency_us = Some([300.0, 1000.0]);
        w1.delivered_per_sec = 1_000_000.0;
        w1.cores = Some(0.2);
        w1.peak_rss_mib = Some(48.0);
        let mut w2 = row(Workload::W2, Config::Sub1);
        w2.latency_us = Some([300.0, 1000.1]);
        w2.delivered_per_sec = 1_000_000.0;
        w2.cores = Some(0.2001);
        let mut idle = row(Workload::W1, Config::Idle);
        idle.cores = Some(0.0011);
        idle.peak_rss_mib = Some(99.0); // idle is not "under load"
        let paced = Paced {
            events_per_sec: 8000.0,
            p50_us: Some(50.0),
        };
        let vs = evaluate(&[w1.clone(), w2.clone(), idle.clone()], Some(&paced), SHORT);
        assert_eq!(status(&vs, "W1 latency p99"), Status::Met);
        assert_eq!(status(&vs, "W2 latency p99"), Status::NotMet);
        assert_eq!(status(&vs, "latency p50"), Status::Met);
        assert_eq!(status(&vs, "socktapd ≤ 0.2 core per M events/s, W1"), Status::Met);
        assert_eq!(status(&vs, "socktapd ≤ 0.2 core per M events/s, W2"), Status::NotMet);
        assert_eq!(status(&vs, "socktapd ≤ 0.1 %"), Status::NotMet);
        assert_eq!(status(&vs, "socktapd RSS"), Status::Met);
        assert_eq!(status(&vs, "socktapd with no subscriber"), Status::Met);
        let fast = Paced {
            events_per_sec: 400_000.0,
            p50_us: Some(10.0),
        };
        let vs = evaluate(&[w1.clone()], Some(&fast), SHORT);
        assert_eq!(status(&vs, "latency p50"), Status::NotMeasured);
        let silent = Paced {
            events_per_sec: 8000.0,
            p50_us: None,
        };
        let vs = evaluate(&[w1.clone()], Some(&silent), SHORT);
        assert_eq!(status(&vs, "latency p50"), Status::NotMet);
        idle.cores = Some(0.001);
        let vs = evaluate(std::slice::from_ref(&idle), None, SHORT);
        assert_eq!(status(&vs, "socktapd ≤ 0.1 %"), Status::Met);
        w1.peak_rss_mib = Some(48.1);
        idle.cores = Some(0.001);
        idle.ratio = Some(0.98);
        let vs = evaluate(&[w1, idle], None, SHORT);
        assert_eq!(status(&vs, "socktapd RSS"), Status::NotMet);
        assert_eq!(status(&vs, "socktapd ≤ 0.1 %"), Status::Met);
        assert_eq!(status(&vs, "socktapd with no subscriber"), Status::NotMet);
        assert_eq!(status(&vs, "latency p50"), Status::NotMeasured);
    }

    #[test]
    fn an_idle_miss_within_the_untraced_rounds_spread_is_said_to_be_noise() {
        let mut untraced = row(Workload::W3, Config::Untraced);
        untraced.spread = Some(0.27);
        let mut idle = row(Workload::W3, Config::Idle);
        idle.ratio = Some(0.839);
        let mut w1_idle = row(Workload::W1, Config::Idle);
        w1_idle.ratio = Some(0.95);
        let mut w1_untraced = row(Workload::W1, Config::Untraced);
        w1_untraced.spread = Some(0.02);
        let vs = evaluate(&[untraced.clone(), idle.clone(), w1_untraced, w1_idle], None, SHORT);
        let v = vs
            .iter()
            .find(|v| v.target.starts_with("socktapd with no subscriber"))
            .unwrap();
        // The verdict still reads the numbers; the text says what they are worth.
        assert_eq!(v.status, Status::NotMet);
        assert_eq!(
            v.measured,
            "W3 83.9 % (within noise: its untraced rounds lie 27.0 % apart), W1 95.0 %"
        );
        // Met, or a miss wider than the spread: no remark.
        idle.ratio = Some(0.995);
        untraced.spread = Some(0.001);
        let vs = evaluate(&[untraced, idle], None, SHORT);
        let v = vs
            .iter()
            .find(|v| v.target.starts_with("socktapd with no subscriber"))
            .unwrap();
        assert_eq!((v.status, v.measured.as_str()), (Status::Met, "W3 99.5 %"));
    }

    #[test]
    fn a_configuration_without_numbers_is_not_measured_and_says_why() {
        let mut r = row(Workload::W1, Config::Sub1);
        r.note = Some("socktapd exited at start".into());
        let vs = evaluate(&[r], None, SHORT);
        let v = vs.iter().find(|v| v.target.starts_with("W1, every call")).unwrap();
        assert_eq!(v.status, Status::NotMeasured);
        assert_eq!(v.measured, "socktapd exited at start");
        assert_eq!(v.json()["status"], "not_measured");
    }
}
