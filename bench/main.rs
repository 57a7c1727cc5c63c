//! socktap-bench: what tracing costs a workload, and what socktapd delivers.
//!
//! For each workload (W1 ping-pong, W2 small writers, W3 bulk) it runs each
//! configuration (untraced, socktapd idle, 1 subscriber, 1 subscriber to
//! one socket, 16 disjoint subscribers, 16 full-copy subscribers, a
//! bpftrace one-liner), rounds interleaved so machine drift cancels out, then prints a table and writes
//! JSON under target/bench/. It measures; it asserts nothing about speed.
//! `--quick` (CI) checks only that every configuration produced numbers and
//! that a modest fixed rate loses nothing.

mod daemon;
mod hub;
mod steal;
mod subscribers;
mod targets;
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, ValueEnum};
use serde_json::json;

use daemon::{Daemon, Usage};
use hdrhistogram::Histogram;
use steal::CpuTimes;
use subscribers::{Placement, Seen, Subscribers};
use workload::{prepare, Workload};

/// What runs beside the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Config {
    /// Nothing traces.
    Untraced,
    /// socktapd attached, no subscriber (the kernel gate is closed).
    Idle,
    /// One subscriber taking every event of the workload.
    Sub1,
    /// One subscriber watching one of the workload's sockets: the kernel
    /// prefilter writes only that socket's calls.
    Sub1Narrow,
    /// 16 subscribers, each taking a disjoint share of the workload's sockets.
    Sub16Disjoint,
    /// 16 subscribers, each taking every event of the workload.
    Sub16Full,
    /// bpftrace printing one line per send/recv to a file.
    Bpftrace,
}

/// Measures socktap's overhead and delivery on loopback workloads.
#[derive(Parser, Debug)]
#[command(
    name = "socktap-bench",
    after_help = "Examples:\n  scripts/bench.sh\n  scripts/bench.sh --quick\n  scripts/bench.sh --workloads w2 --configs untraced,sub1 --seconds 60 --rounds 1\n  scripts/bench.sh --hub-only --rounds 5"
)]
struct Args {
    /// A smoke test: short runs, one round, then the zero-loss check.
    #[arg(long)]
    quick: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds (each runs every configuration once).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Workloads to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::W1, Workload::W2, Workload::W3])]
    workloads: Vec<Workload>,
    /// Configurations to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Config::Untraced, Config::Idle, Config::Sub1, Config::Sub1Narrow, Config::Sub16Disjoint, Config::Sub16Full, Config::Bpftrace])]
    configs: Vec<Config>,
    /// How the benchmark's subscribers decode events: `scan` walks each
    /// event's bytes to its timestamp and skips the rest by length, `lean`
    /// has prost decode only the timestamp (it still steps over every other
    /// field), `full` builds every `socktap.v1.Event`.
    #[arg(long, value_enum, default_value = "scan")]
    subscriber_decode: subscribers::Decode,
    /// How the subscribers reach socktapd: `tcp` (127.0.0.1) or `unix` (a
    /// unix socket, which skips the loopback TCP stack on both ends).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: daemon::Transport,
    /// Nice value of the benchmark's subscribers (-20..=19): they then run
    /// on a runtime of their own (2 threads) at that priority, apart from
    /// the workload. A consumer at the workload's priority gets its fair
    /// share of the CPUs among W2's 16 busy threads and no more; this
    /// shows how much of the latency and the queue losses is the
    /// consumer's. Default: the workload's priority, on the benchmark's
    /// runtime.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    subscriber_nice: Option<i32>,
    /// Each subscriber on a thread of its own, with a tokio runtime of its
    /// own, as separate client processes (16 `socktap watch`, say) would
    /// be. By default they are tasks that share 2 threads, which among
    /// W2's 16 busy threads get a fair share for 2 threads only, however
    /// many subscribers they serve. With --subscriber-nice, each thread at
    /// that nice value.
    #[arg(long)]
    thread_per_subscriber: bool,
    /// The socktapd binary (default: next to this one).
    #[arg(long)]
    socktapd: Option<PathBuf>,
    /// Extra socktapd flags, e.g. "--ring-buffer-bytes=33554432".
    #[arg(long, allow_hyphen_values = true)]
    socktapd_arg: Vec<String>,
    /// Round trips per second of the paced W1 run that follows the table
    /// (4 events each): 2000 measures low-rate latency; a higher rate on an
    /// unsaturated machine measures socktapd's CPU per event; 0 skips the
    /// paced run (not with --quick, whose zero-loss check it is).
    #[arg(long, default_value_t = 2000.0, value_parser = parse_rate)]
    paced_round_trips: f64,
    /// Measure only socktapd's own work per event (the hub's fan-out and
    /// the streams' messages), in this process, on W2-like synthetic
    /// batches: no kernel, no workload. Uses --rounds; writes hub.json.
    #[arg(long, conflicts_with_all = ["quick", "workloads", "configs"])]
    hub_only: bool,
    /// Where to write the JSON.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// One measurement.
#[derive(Clone, Debug, Default)]
struct Run {
    workload: String,
    config: String,
    round: u32,
    ops_per_sec: f64,
    events_produced: u64,
    events_delivered: u64,
    delivered_per_sec: f64,
    lost_kernel: u64,
    /// Calls the kernel skipped socktapd's programs on (an upper bound of
    /// events lost); counted with `lost_kernel` in the table.
    lost_skipped: u64,
    lost_queue: u64,
    lost_history: u64,
    latency_us: Option<[f64; 3]>,
    usage: Option<Usage>,
    attach_mode: String,
    /// Percent of the machine's CPU time stolen by the hypervisor while the
    /// workload ran.
    steal_pct: Option<f64>,
    note: Option<String>,
}

/// p50, p99 and p99.9 of `h` in µs; `None` when it is empty.
fn percentiles(h: &Histogram<u64>) -> Option<[f64; 3]> {
    if h.is_empty() {
        return None;
    }
    let p = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Some([p(0.5), p(0.99), p(0.999)])
}

fn cookie_sets(config: Config, cookies: &[u64]) -> Vec<Vec<u64>> {
    match config {
        Config::Sub1 => vec![cookies.to_vec()],
        Config::Sub1Narrow => vec![cookies[..1].to_vec()],
        Config::Sub16Full => vec![cookies.to_vec(); 16],
        // Socket i goes to subscriber i % 16; a subscriber without a socket
        // filters on a cookie that matches nothing.
        Config::Sub16Disjoint => (0..16)
            .map(|i| {
                let mine: Vec<u64> = cookies.iter().skip(i).step_by(16).copied().collect();
                if mine.is_empty() {
                    vec![u64::MAX]
                } else {
                    mine
                }
            })
            .collect(),
        _ => vec![],
    }
}

async fn measure(
    args: &Args,
    socktapd: &Path,
    subscriber_rt: &tokio::runtime::Handle,
    w: Workload,
    c: Config,
    round: u32,
    rate: Option<f64>,
) -> Run {
    let dur = Duration::from_secs_f64(args.seconds);
    let mut run = Run {
        workload: format!("{w:?}"),
        config: format!("{c:?}"),
        round,
        ..Default::default()
    };
    match c {
        Config::Untraced => {
            let p = prepare(w).expect("loopback connections");
            let cpu = CpuTimes::now();
            run.ops_per_sec = p.run(dur, rate).rate();
            run.steal_pct = steal_since(cpu);
        }
        Config::Bpftrace => match Bpftrace::start() {
            Ok(bt) => {
                let p = prepare(w).expect("loopback connections");
                let cpu = CpuTimes::now();
                let out = p.run(dur, rate);
                run.steal_pct = steal_since(cpu);
                run.ops_per_sec = out.rate();
                run.events_produced = bt.stop();
                run.events_delivered = run.events_produced;
                run.delivered_per_sec = run.events_delivered as f64 / out.seconds;
                run.attach_mode = "bpftrace tracepoint:sock:sock_*_length".into();
            }
            Err(why) => run.note = Some(format!("bpftrace unavailable: {why}")),
        },
        _ => {
            let mut d = match Daemon::start(socktapd, &args.socktapd_arg, args.transport).await {
                Ok(d) => d,
                Err(e) => {
                    run.note = Some(e);
                    return run;
                }
            };
            let p = prepare(w).expect("loopback connections");
            let sets = cookie_sets(c, &p.cookies);
            let n = sets.len();
            let place = if args.thread_per_subscriber {
                Placement::ThreadEach {
                    nice: args.subscriber_nice,
                }
            } else {
                Placement::Tasks
            };
            let subs = Subscribers::start(&d.addr, sets, args.subscriber_decode, subscriber_rt, place);
            if let Err(e) = d.wait_subscribers(n).await {
                run.note = Some(e);
            }
            let before = d.status().await.unwrap_or_default();
            d.reset_usage();
            let cpu = CpuTimes::now();
            let out = tokio::task::spawn_blocking(move || p.run(dur, rate))
                .await
                .expect("workload thread");
            run.steal_pct = steal_since(cpu);
            let seen: Vec<Seen> = subs.finish(Duration::from_millis(500)).await.unwrap_or_else(|e| {
                run.note = Some(e);
                vec![]
            });
            run.usage = Some(d.usage());
            let after = d.status().await.unwrap_or_default();
            run.attach_mode = format!("{:?}", after.attach_mode()).to_lowercase();
            run.ops_per_sec = out.rate();
            run.events_produced = after.kernel_events_produced - before.kernel_events_produced;
            run.lost_kernel = after.kernel_drops - before.kernel_drops;
            run.lost_skipped = after.kernel_skipped - before.kernel_skipped;
            run.events_delivered = seen.iter().map(|s| s.events).sum();
            run.delivered_per_sec = run.events_delivered as f64 / out.seconds;
            run.lost_queue = seen.iter().map(|s| s.lost_queue).sum();
            run.lost_history = seen.iter().map(|s| s.lost_history).sum();
            let mut latency = subscribers::latency_histogram();
            for s in &seen {
                // Same bounds for all, so adding cannot fail.
                latency.add(&s.latency_ns).expect("histograms of equal bounds");
            }
            run.latency_us = percentiles(&latency);
            if let Err(e) = d.stop() {
                run.note = Some(e);
            }
        }
    }
    run
}

/// Percent of CPU time stolen since `before` was read.
fn steal_since(before: Option<CpuTimes>) -> Option<f64> {
    before?.steal_percent_until(CpuTimes::now()?)
}

/// A bpftrace one-liner writing one line per TCP send/recv to a file.
struct Bpftrace {
    child: std::process::Child,
    out: PathBuf,
}

impl Bpftrace {
    const PROGRAM: &'static str = "tracepoint:sock:sock_send_length,tracepoint:sock:sock_recv_length \
        /args->protocol == 6/ { printf(\"%llu %d %d %d\\n\", nsecs, pid, tid, args->ret); }";

    fn start() -> Result<Bpftrace, String> {
        if !std::path::Path::new("/sys/kernel/tracing/events").exists() {
            let ok = Command::new("mount")
                .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
                .status();
            if !matches!(ok, Ok(s) if s.success()) {
                return Err("tracefs is not mounted at /sys/kernel/tracing and mounting it failed".into());
            }
        }
        let out = std::env::temp_dir().join(format!("socktap-bench-bpftrace-{}.txt", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new("bpftrace")
            .args(["-o"])
            .arg(&out)
            .args(["-e", Self::PROGRAM])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run bpftrace: {e}"))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::fs::read_to_string(&out).is_ok_and(|s| s.contains("Attaching")) {
                std::thread::sleep(Duration::from_millis(300));
                return Ok(Bpftrace { child, out });
            }
            if let Ok(Some(_)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                return Err(err.lines().next().unwrap_or("bpftrace exited").to_owned());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        Err("bpftrace did not attach within 30 s".into())
    }

    /// Whether it has not exited yet.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it; returns the number of event lines written.
    fn stop(mut self) -> u64 {
        // bpftrace 0.17 sometimes misses a SIGINT after a flood of events
        // and waits for more forever (a full run stalled 11 minutes on one
        // until a second SIGINT ended it): ask again every second, then kill
        // it. Its events are counted from the file either way.
        for _ in 0..10 {
            // SAFETY: FFI; signals our own child by pid, which has not been
            // reaped yet (nothing waited for it, or try_wait returned None),
            // so the pid is still ours.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let asked = Instant::now();
            while self.running() && asked.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !self.running() {
                break;
            }
        }
        if self.running() {
            eprintln!("  bpftrace did not stop on SIGINT within 10 s; killed");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let n = std::fs::read_to_string(&self.out)
            .map(|s| {
                s.lines()
                    .filter(|l| l.split_whitespace().count() == 4 && !l.starts_with("Attaching"))
                    .count()
            })
            .unwrap_or(0);
        let _ = std::fs::remove_file(&self.out);
        n as u64
    }
}

/// How far apart a configuration's rounds lie: (max − min) / median, as
/// a fraction; None with fewer than two rounds or nothing measured.
fn spread(v: &[f64]) -> Option<f64> {
    let mid = median(v.to_vec());
    if v.len() < 2 || mid <= 0.0 {
        return None;
    }
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
        (lo.min(x), hi.max(x))
    });
    Some((hi - lo) / mid)
}

/// The middle value; with an even count, the mean of the two middle ones.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A rate: a finite number, not negative.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a rate (a number of round trips per second, 0 or more)"
        )),
    }
}

fn main() -> ExitCode {
    let parsed = Args::try_parse().and_then(|args| {
        if args.quick && args.paced_round_trips == 0.0 {
            return Err(Args::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--quick needs the paced run (its zero-loss check): --paced-round-trips must be above 0",
            ));
        }
        Ok(args)
    });
    let mut args = match parsed {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("socktap-bench: {}", socktap_client::cli::one_line(&e));
            return ExitCode::from(2);
        }
    };
    if args.hub_only {
        hub::run(&args.out, args.rounds.max(1));
        return ExitCode::SUCCESS;
    }
    if args.quick {
        args.seconds = args.seconds.min(1.0);
        args.rounds = 1;
    }
    let socktapd = args.socktapd.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("socktapd")))
            .unwrap_or_else(|| "socktapd".into())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // With --subscriber-nice, the subscribers' own runtime, each of its
    // threads at that nice value.
    // (With --thread-per-subscriber each subscriber's thread sets it.)
    let subscriber_rt = args
        .subscriber_nice
        .filter(|_| !args.thread_per_subscriber)
        .map(|nice| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("bench-subscriber")
                .on_thread_start(move || subscribers::set_nice(nice))
                .enable_all()
                .build()
                .expect("subscriber runtime")
        });
    let handle = subscriber_rt
        .as_ref()
        .map_or_else(|| rt.handle().clone(), |r| r.handle().clone());
    rt.block_on(async_main(args, socktapd, handle))
}

async fn async_main(args: Args, socktapd: PathBuf, subscriber_rt: tokio::runtime::Handle) -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpu = cpu_model();
    eprintln!(
        "socktap-bench: kernel {kernel}, {cpu}, {} s per run, {} rounds",
        args.seconds, args.rounds
    );
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for &w in &args.workloads {
            for &c in &args.configs {
                let r = measure(&args, &socktapd, &subscriber_rt, w, c, round, None).await;
                eprintln!(
                    "  round {round} {w:?} {c:?}: {:.0} ops/s {}",
                    r.ops_per_sec,
                    r.note.clone().unwrap_or_default()
                );
                runs.push(r);
            }
        }
    }
    // The paced run: W1 at --paced-round-trips (2000/s: 8000 events/s), one
    // subscriber. It gives the low-rate latency, and in quick mode it is the
    // zero-loss check. 0 skips it (refused with --quick).
    let table_seconds = args.seconds;
    let low = Args {
        seconds: if args.quick { 2.0 } else { args.seconds },
        ..args
    };
    let paced = if low.paced_round_trips > 0.0 {
        Some(
            measure(
                &low,
                &socktapd,
                &subscriber_rt,
                Workload::W1,
                Config::Sub1,
                0,
                Some(low.paced_round_trips),
            )
            .await,
        )
    } else {
        None
    };
    let mut failures = Vec::new();
    if let (true, Some(r)) = (low.quick, &paced) {
        let lost = r.lost_kernel + r.lost_skipped + r.lost_queue + r.lost_history;
        if lost > 0 || r.events_delivered == 0 || r.note.is_some() {
            failures.push(format!(
                "zero-loss check: delivered {}, lost {lost} {}",
                r.events_delivered,
                r.note.clone().unwrap_or_default()
            ));
        }
        for r in &runs {
            let unavailable = r.note.as_deref().is_some_and(|n| n.starts_with("bpftrace unavailable"));
            if r.ops_per_sec <= 0.0 || (r.note.is_some() && !unavailable) {
                failures.push(format!(
                    "{} {}: no numbers ({})",
                    r.workload,
                    r.config,
                    r.note.clone().unwrap_or_default()
                ));
            }
        }
    }
    report(&low, table_seconds, &runs, paced.as_ref(), &kernel, &cpu);
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("socktap-bench: FAILED {f}");
        }
        ExitCode::FAILURE
    }
}

/// Prints the table, the paced run and the targets, and writes the JSON.
/// `args.seconds` is the paced run's length, `table_seconds` the table's
/// (they differ with --quick).
fn report(args: &Args, table_seconds: f64, runs: &[Run], zero_loss: Option<&Run>, kernel: &str, cpu: &str) {
    let mut summary = Vec::new();
    let mut rows = Vec::new();
    println!(
        "{:<4} {:<14} {:>11} {:>8} {:>9} {:>12} {:>16} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6}",
        "",
        "config",
        "ops/s",
        "vs base",
        "ns/event",
        "delivered/s",
        "lost k/q/h",
        "p50 µs",
        "p99 µs",
        "p99.9",
        "cores",
        "RSS MiB",
        "steal%"
    );
    for &w in &args.workloads {
        let wn = format!("{w:?}");
        let of = |c: Config| {
            runs.iter()
                .filter(|r| r.workload == wn && r.config == format!("{c:?}"))
                .collect::<Vec<_>>()
        };
        let base = median(of(Config::Untraced).iter().map(|r| r.ops_per_sec).collect());
        for &c in &args.configs {
            let rs = of(c);
            if rs.is_empty() {
                continue;
            }
            let ops = median(rs.iter().map(|r| r.ops_per_sec).collect());
            let ops_spread = spread(&rs.iter().map(|r| r.ops_per_sec).collect::<Vec<_>>());
            let n = rs.len() as f64;
            let mean = |f: &dyn Fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
            let produced = mean(&|r| r.events_produced as f64);
            let delivered = mean(&|r| r.delivered_per_sec);
            let per_op = produced / (ops * table_seconds).max(1.0);
            let ns_per_event = if base > 0.0 && ops > 0.0 && per_op > 0.0 && c != Config::Untraced {
                Some((1e9 / ops - 1e9 / base) / per_op)
            } else {
                None
            };
            let lat = rs.iter().filter_map(|r| r.latency_us).collect::<Vec<_>>();
            let lat =
                (!lat.is_empty()).then(|| [0, 1, 2].map(|i| lat.iter().map(|l| l[i]).sum::<f64>() / lat.len() as f64));
            let usage = rs.iter().filter_map(|r| r.usage).collect::<Vec<_>>();
            let cores = (!usage.is_empty()).then(|| usage.iter().map(|u| u.cores).sum::<f64>() / usage.len() as f64);
            let rss = usage.iter().map(|u| u.peak_rss_mib).reduce(f64::max);
            // In the kernel (ring buffer full, or the programs skipped), in
            // the subscribers' queues, from history.
            let skipped = rs.iter().map(|r| r.lost_skipped).sum::<u64>();
            let lost = [
                rs.iter().map(|r| r.lost_kernel).sum::<u64>() + skipped,
                rs.iter().map(|r| r.lost_queue).sum::<u64>(),
                rs.iter().map(|r| r.lost_history).sum::<u64>(),
            ];
            // The most of any round: a noisy round shows.
            let steal = rs.iter().filter_map(|r| r.steal_pct).reduce(f64::max);
            let note = rs.iter().find_map(|r| r.note.clone());
            rows.push(targets::Row {
                workload: w,
                config: c,
                ratio: (base > 0.0).then_some(ops / base),
                spread: ops_spread,
                delivered_per_sec: delivered,
                lost: lost.iter().sum(),
                latency_us: lat.map(|l| [l[0], l[1]]),
                cores,
                peak_rss_mib: rss,
                note: note.clone(),
            });
            let f = |v: Option<f64>, p: usize| v.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
            println!(
                "{:<4} {:<14} {:>11.0} {:>7.1}% {:>9} {:>12.0} {:>16} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6}{}",
                wn,
                format!("{c:?}").to_lowercase(),
                ops,
                if base > 0.0 { 100.0 * ops / base } else { 0.0 },
                f(ns_per_event, 0),
                delivered,
                format!("{}/{}/{}", lost[0], lost[1], lost[2]),
                f(lat.map(|l| l[0]), 1),
                f(lat.map(|l| l[1]), 1),
                f(lat.map(|l| l[2]), 1),
                f(cores, 3),
                f(rss, 1),
                f(steal, 1),
                note.as_ref().map(|n| format!("  ({n})")).unwrap_or_default(),
            );
            summary.push(json!({
                "workload": wn, "config": format!("{c:?}"), "ops_per_sec": ops,
                "ratio_to_untraced": if base > 0.0 { ops / base } else { 0.0 },
                "ops_spread": ops_spread,
                "added_ns_per_event": ns_per_event, "events_produced_per_run": produced,
                "delivered_per_sec": delivered,
                "lost": {"kernel_ring_buffer": lost[0] - skipped, "kernel_skipped": skipped, "subscriber_queue": lost[1], "history": lost[2]},
                "latency_us": lat.map(|l| json!({"p50": l[0], "p99": l[1], "p99_9": l[2]})),
                "socktapd_cores": cores, "socktapd_peak_rss_mib": rss, "max_steal_pct": steal, "note": note,
            }));
        }
    }
    let noise: Vec<String> = rows
        .iter()
        .filter(|r| r.config == Config::Untraced)
        .filter_map(|r| Some(format!("{:?} {:.1} %", r.workload, 100.0 * r.spread?)))
        .collect();
    if !noise.is_empty() {
        println!(
            "noise: the untraced rounds lie {} apart (max − min over the median): no ratio is more precise than that",
            noise.join(", ")
        );
    }
    if let Some(z) = zero_loss {
        let [p50, p99, p999] = z.latency_us.unwrap_or_default();
        let cores = z.usage.map(|u| u.cores).unwrap_or(0.0);
        let per_event_ns = 1e9 * cores / z.delivered_per_sec.max(1.0);
        println!(
            "paced (W1 at {:.0} round trips/s = {:.0} events/s, 1 subscriber, {} s): delivered {}, lost {}/{}/{}, latency p50 {p50:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs; socktapd {cores:.3} cores = {per_event_ns:.0} ns per delivered event; steal {}",
            args.paced_round_trips,
            4.0 * args.paced_round_trips,
            args.seconds,
            z.events_delivered,
            z.lost_kernel + z.lost_skipped,
            z.lost_queue,
            z.lost_history,
            z.steal_pct.map(|s| format!("{s:.1} %")).unwrap_or_else(|| "-".into())
        );
    }
    let paced = zero_loss.map(|z| targets::Paced {
        events_per_sec: 4.0 * args.paced_round_trips,
        p50_us: z.latency_us.map(|l| l[0]),
    });
    let span = targets::Span {
        seconds: table_seconds,
        rounds: args.rounds,
    };
    let verdicts = targets::evaluate(&rows, paced.as_ref(), span);
    if args.quick {
        println!("targets (the benchmark issue's; --quick runs are too short to judge them, so these lines only show the format):");
    } else {
        println!("targets (the benchmark issue's, judged on this run alone):");
    }
    for v in &verdicts {
        println!("{}", v.line());
    }
    // The paced run starts socktapd too, so a table of untraced runs alone
    // still names the mode it used.
    let mode = runs
        .iter()
        .chain(zero_loss)
        .find(|r| !r.attach_mode.is_empty() && !r.attach_mode.starts_with("bpftrace"))
        .map(|r| r.attach_mode.clone());
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let place = if args.thread_per_subscriber {
        ", each on a thread of its own"
    } else if args.subscriber_nice.is_some() {
        ", on a runtime of their own"
    } else {
        ""
    };
    let priority = args
        .subscriber_nice
        .map(|n| format!(" at nice {n}"))
        .unwrap_or_default()
        + place;
    println!(
        "socktapd attach mode {}, subscribers over {:?}{priority}, kernel {kernel}, {cpu}, {nproc} CPUs",
        mode.as_deref().unwrap_or("- (socktapd did not run)"),
        args.transport
    );
    let doc = json!({
        "kernel": kernel, "cpu_model": cpu, "attach_mode": mode,
        "nproc": nproc, "transport": format!("{:?}", args.transport).to_lowercase(),
        "subscriber_nice": args.subscriber_nice, "thread_per_subscriber": args.thread_per_subscriber,
        "seconds_per_run": table_seconds, "paced_seconds": zero_loss.map(|_| args.seconds), "rounds": args.rounds, "quick": args.quick,
        "summary": summary,
        "targets": verdicts.iter().map(targets::Verdict::json).collect::<Vec<_>>(),
        "runs": runs.iter().map(|r| json!({
            "workload": r.workload, "config": r.config, "round": r.round, "ops_per_sec": r.ops_per_sec,
            "events_produced": r.events_produced, "events_delivered": r.events_delivered,
            "lost": {"kernel_ring_buffer": r.lost_kernel, "kernel_skipped": r.lost_skipped, "subscriber_queue": r.lost_queue, "history": r.lost_history},
            "latency_us": r.latency_us, "socktapd_cores": r.usage.map(|u| u.cores),
            "socktapd_peak_rss_mib": r.usage.map(|u| u.peak_rss_mib), "steal_pct": r.steal_pct, "note": r.note,
        })).collect::<Vec<_>>(),
        "paced": zero_loss.map(|z| json!({
            "events_per_sec": 4.0 * args.paced_round_trips, "delivered": z.events_delivered,
            "lost": z.lost_kernel + z.lost_skipped + z.lost_queue + z.lost_history, "latency_us": z.latency_us,
            "socktapd_cores": z.usage.map(|u| u.cores),
            "socktapd_ns_per_delivered_event": z.usage.map(|u| 1e9 * u.cores / z.delivered_per_sec.max(1.0)),
            "steal_pct": z.steal_pct,
        })),
    });
    let _ = std::fs::create_dir_all(&args.out);
    let name = if args.quick { "quick.json" } else { "latest.json" };
    let path = args.out.join(name);
    match std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("socktap-bench: cannot write {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{median, percentiles, spread, subscribers::latency_histogram, Args};

    #[test]
    fn subscriber_nice_takes_a_nice_value_and_nothing_else() {
        let parse =
            |v: &str| Args::try_parse_from(["socktap-bench", "--subscriber-nice", v]).map(|a| a.subscriber_nice);
        assert_eq!(parse("-5").unwrap(), Some(-5));
        assert_eq!(parse("19").unwrap(), Some(19));
        assert!(parse("20").is_err());
        assert!(parse("-21").is_err());
        let default = Args::try_parse_from(["socktap-bench"]).unwrap();
        assert!(
            !default.thread_per_subscriber,
            "subscribers share the runtime unless asked"
        );
        assert_eq!(default.subscriber_nice, None, "the workload's priority unless asked");
    }

    #[test]
    fn percentiles_are_those_of_every_latency_recorded_to_three_digits() {
        let mut h = latency_histogram();
        assert_eq!(percentiles(&h), None);
        // 1..=100,000 µs, each once; and one hour-plus outlier, kept as an hour.
        for us in 1..=100_000u64 {
            h.record(us * 1000).unwrap();
        }
        h.saturating_record(u64::MAX);
        let [p50, p99, p999] = percentiles(&h).unwrap();
        for (got, want) in [(p50, 50_000.0), (p99, 99_000.0), (p999, 99_900.0)] {
            assert!((got - want).abs() <= want * 0.001, "{got} µs, want {want} µs to 0.1 %");
        }
        assert_eq!(h.max(), h.highest_equivalent(3_600_000_000_000));
    }

    #[test]
    fn spread_is_the_rounds_range_over_their_median() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[100.0]), None);
        assert_eq!(spread(&[0.0, 0.0]), None);
        assert_eq!(spread(&[90.0, 110.0]), Some(0.2));
        assert_eq!(spread(&[100.0, 50.0, 150.0]), Some(1.0));
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![5.0]), 5.0);
        assert_eq!(median(vec![300.0, 100.0]), 200.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
