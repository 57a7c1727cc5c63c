//! socktapd: loads the probe, serves the socktap.v1 gRPC API.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

use socktap::daemon::{self, ListenAddr, Listener, ServeOptions, TlsOptions};
use socktap::hub::{FilterLimits, Hub, HubConfig, Source};
use socktap::privileges::Account;
use socktap::probe::{ModeRequest, Probe, ProbeError, ProbeOptions};
use tracing::{error, info};

/// Per-socket TCP telemetry daemon: streams every TCP send/recv, tagged with
/// its socket cookie, to gRPC subscribers.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  socktapd\n  socktapd --listen unix:/run/socktap.sock\n  socktapd --metrics-listen 127.0.0.1:9464      Prometheus counters at /metrics\n  socktapd --mode tracepoint --ring-buffer-bytes 33554432\n  RUST_LOG=debug,libbpf=debug socktapd"
)]
struct Args {
    /// Attach mode: auto (fentry, then kprobe, then tracepoint), fentry, kprobe or tracepoint.
    #[arg(long, env = "SOCKTAPD_MODE", default_value = "auto")]
    mode: ModeRequest,
    /// Where to serve gRPC: host:port, or unix:/path for a unix socket.
    #[arg(long, env = "SOCKTAPD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: ListenAddr,
    /// Nice value of the thread that reads the ring buffer while it reads
    /// (-20..=19). Under a load that keeps every CPU busy, a reader at the
    /// default priority falls behind and the kernel drops events; a lower
    /// value gives it the CPU when it has work. Needs CAP_SYS_NICE or
    /// RLIMIT_NICE (systemd: LimitNICE=); without, socktapd warns once.
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_READER_NICE", default_value_t = -5, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    reader_nice: i32,
    /// Real-time priority (SCHED_FIFO, 1..=99) for the threads that carry
    /// events: the runtime's workers (which read the ring at low rates and
    /// write every stream) and the thread that reads it at high rates, in
    /// place of --reader-nice. Lower latency for more CPU (README); a
    /// real-time thread that misbehaves takes a CPU from everything else.
    /// Needs CAP_SYS_NICE or RLIMIT_RTPRIO (systemd: LimitRTPRIO=). Off by
    /// default.
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_REALTIME_PRIORITY", value_parser = clap::value_parser!(u8).range(1..=99))]
    realtime_priority: Option<u8>,
    /// kprobe mode: calls in flight each return probe tracks (0..=4096).
    /// The returns of calls beyond it are missed (counted as skipped
    /// calls): a server with many threads blocked in recv needs many.
    /// Above the kernel's default (max(10, 2 × CPUs)) it takes writing to
    /// tracefs, i.e. root; 0, or no tracefs, uses the kernel's default.
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_KRETPROBE_MAXACTIVE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(0..=4096))]
    kretprobe_maxactive: u32,
    /// Kernel ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_RING_BUFFER_BYTES", default_value_t = 8 << 20)]
    ring_buffer_bytes: u32,
    /// Events each subscriber may have queued before it loses some.
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_QUEUE_EVENTS", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    queue_events: u32,
    /// Bytes of encoded events all subscribers' queues may hold together:
    /// half in equal shares, half a reserve that lagging subscribers borrow
    /// from. Memory stays bounded however many subscribe.
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_QUEUE_BYTES", default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(65_536..=(1 << 40)))]
    queue_bytes: u64,
    /// Events kept in memory for replay and resume (0: none).
    #[arg(
        long,
        help_heading = "Subscribers",
        env = "SOCKTAPD_HISTORY_EVENTS",
        default_value_t = 65_536
    )]
    history_events: u32,
    /// Concurrent WatchEvents streams.
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_MAX_SUBSCRIBERS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    max_subscribers: u32,
    /// Filters per allow/deny list in one request.
    #[arg(
        long,
        help_heading = "Subscribers",
        env = "SOCKTAPD_MAX_FILTERS",
        default_value_t = 64
    )]
    max_filters: u32,
    /// Values per field of one filter.
    #[arg(
        long,
        help_heading = "Subscribers",
        env = "SOCKTAPD_MAX_FILTER_VALUES",
        default_value_t = 1024
    )]
    max_filter_values: u32,
    /// Record events (and fill history) even with no subscriber. By default
    /// the BPF programs write nothing while nobody watches.
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_RECORD_ALWAYS")]
    record_always: bool,
    /// Also report socktapd's own TCP calls. Off by default: serving events
    /// produces sends, which would produce more events.
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_TRACE_SELF")]
    trace_self: bool,
    /// After loading the programs and binding the listener, switch to this
    /// user and drop every capability (needs Linux >= 6.5; see README).
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_USER")]
    user: Option<String>,
    /// Group that may connect to a unix socket listener (the socket gets mode 0660).
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Serve socktapd's own counters (events read, delivered and lost by
    /// source, subscribers, queues, programs) for Prometheus at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9464. Plain HTTP, no token: the
    /// counts only, nothing per socket or process. Off by default.
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// File holding a bearer token that Socktap RPCs must present
    /// (`authorization: Bearer <token>`). Health and reflection stay open.
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM). With --tls-key, serves TLS.
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: turns on mTLS.
    #[arg(long, help_heading = "Access", env = "SOCKTAPD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Seconds between HTTP/2 keepalive PINGs (dead clients are dropped).
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_KEEPALIVE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_secs: u64,
    /// Seconds a keepalive PING may go unanswered.
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_KEEPALIVE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_timeout_secs: u64,
    /// Largest request message, in bytes.
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    max_request_bytes: usize,
    /// Concurrent WatchEvents streams per client connection (TCP); more get
    /// RESOURCE_EXHAUSTED. HTTP/2 allows 16 more streams for unary calls.
    #[arg(long, help_heading = "Subscribers", env = "SOCKTAPD_MAX_STREAMS_PER_CONNECTION", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..1_000_000))]
    max_streams_per_connection: u32,
    /// Enable the kernel's BPF run-time statistics (shown by status; costs
    /// two clock reads per program run).
    #[arg(long, help_heading = "Kernel", env = "SOCKTAPD_BPF_STATS")]
    bpf_stats: bool,
    /// At low event rates, 0 wakes the reader as soon as it has caught up
    /// (every event is read at once); N wakes it at most once per N
    /// microseconds.
    #[arg(
        long,
        help_heading = "Tuning",
        env = "SOCKTAPD_WAKEUP_INTERVAL_US",
        default_value_t = 0
    )]
    wakeup_interval_us: u64,
    /// Above 20k events/s, the reader drains the ring every this many
    /// microseconds on its own timer, and the kernel stops waking it (fewer,
    /// larger batches, and no interrupt inside the traced calls); never less
    /// than --wakeup-interval-us.
    #[arg(
        long,
        help_heading = "Tuning",
        env = "SOCKTAPD_BATCH_INTERVAL_US",
        default_value_t = 500
    )]
    batch_interval_us: u64,
    /// With a nonzero --wakeup-interval-us, the reader drains the ring at
    /// least this often below 20k events/s, in microseconds (above, it
    /// drains every --batch-interval-us).
    #[arg(long, help_heading = "Tuning", env = "SOCKTAPD_POLL_INTERVAL_US", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    poll_interval_us: u64,
    /// Threads that serve gRPC (the ring buffer reader has its own). One is
    /// cheapest: a second one is woken with the first for every batch.
    #[arg(long, help_heading = "Tuning", env = "SOCKTAPD_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
}

fn main() -> ExitCode {
    // Before any other thread exists: threads that come later share it.
    let one_arena = one_malloc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libbpf=error")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in journald, files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if one_arena {
        tracing::debug!("malloc: one arena for all threads");
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&socktap_client::cli::one_line(&e)),
    };
    let prepared = match Prepared::from_args(&args) {
        Ok(p) => p,
        Err(e) => return usage_error(&format!("{e:#}")),
    };
    match run(args, prepared) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socktapd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes glibc's malloc use one arena for all of socktapd's threads, unless
/// the environment sets the arena count (`MALLOC_ARENA_MAX`, or
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`). By default glibc gives
/// each thread that allocates an arena of its own (up to 8 per CPU): the
/// ring-buffer reader, the runtime's worker and its blocking threads each
/// keep their own free memory and trim it on their own, and batches made
/// on one thread are freed on another. One arena took 1–3 MiB off peak RSS
/// under load with one subscriber, ~6 MiB with 16, and cost no measurable
/// CPU (docs/performance.md). Returns whether it was set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() -> bool {
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    if arena_count_set_by_environment(std::env::var_os("MALLOC_ARENA_MAX").is_some(), tunables.as_deref()) {
        return false;
    }
    // SAFETY: FFI; mallopt takes two integers and no pointers. It runs first
    // in main, before any thread of ours exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() -> bool {
    false
}

/// Whether the environment already says how many malloc arenas to use.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn arena_count_set_by_environment(malloc_arena_max: bool, glibc_tunables: Option<&str>) -> bool {
    malloc_arena_max
        || glibc_tunables.is_some_and(|t| {
            t.split(':')
                .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == "glibc.malloc.arena_max"))
        })
}

/// Bad flags: one line naming the flag, exit code 2, before anything is
/// loaded or bound.
fn usage_error(message: &str) -> ExitCode {
    eprintln!("socktapd: {message}");
    ExitCode::from(2)
}

/// What the flags name, checked and read before anything is loaded: a
/// mistake in them is the caller's (exit code 2), not the kernel's.
struct Prepared {
    probe: ProbeOptions,
    serve: ServeOptions,
    socket_group: Option<u32>,
    user: Option<Account>,
}

impl Prepared {
    fn from_args(args: &Args) -> anyhow::Result<Prepared> {
        let probe = ProbeOptions {
            mode: args.mode,
            ring_buffer_bytes: args.ring_buffer_bytes,
            wakeup_interval: Duration::from_micros(args.wakeup_interval_us),
            batch_interval: Duration::from_micros(args.batch_interval_us.max(args.wakeup_interval_us)),
            poll_interval: Duration::from_micros(args.poll_interval_us),
            enabled: args.record_always,
            ignore_pid: (!args.trace_self).then(std::process::id),
            bpf_stats: args.bpf_stats,
            reader_nice: args.reader_nice,
            realtime_priority: args.realtime_priority,
            kretprobe_maxactive: args.kretprobe_maxactive,
            ..Default::default()
        };
        match probe.validate() {
            Ok(()) => {}
            Err(ProbeError::InvalidOption { option, reason }) => {
                let flag = match option {
                    "ring_buffer_bytes" => "ring-buffer-bytes",
                    "wakeup_interval" => "wakeup-interval-us",
                    "batch_interval" => "batch-interval-us",
                    "kretprobe_maxactive" => "kretprobe-maxactive",
                    "realtime_priority" => "realtime-priority",
                    other => anyhow::bail!("invalid probe option {other}: {reason}"),
                };
                anyhow::bail!("--{flag}: {reason}");
            }
            Err(e) => return Err(e.into()),
        }
        let socket_group = match &args.socket_group {
            None => None,
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .with_context(|| format!("--socket-group: looking up group {name}"))?
                    .with_context(|| format!("--socket-group: no group named {name}"))?
                    .gid
                    .as_raw(),
            ),
        };
        let serve = serve_options(args)?;
        if let Some(tls) = &serve.tls {
            tls.validate().context("--tls-cert, --tls-key, --tls-client-ca")?;
        }
        Ok(Prepared {
            probe,
            serve,
            socket_group,
            user: args.user.as_deref().map(Account::resolve).transpose()?,
        })
    }
}

fn run(args: Args, prepared: Prepared) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(args.worker_threads.into()).enable_all();
    if let Some(p) = args.realtime_priority {
        // Asked for by name: refused, it is an error at the start, not a
        // warning later.
        socktap::priority::check_realtime(p).with_context(|| {
            format!("--realtime-priority {p}: SCHED_FIFO refused; it needs CAP_SYS_NICE or RLIMIT_RTPRIO (systemd: LimitRTPRIO={p})")
        })?;
        runtime.on_thread_park(socktap::priority::realtime_workers(p));
        info!(
            priority = p,
            "runtime workers and the ring buffer reader at real-time priority (SCHED_FIFO)"
        );
    }
    let runtime = runtime.build().context("starting the async runtime")?;
    runtime.block_on(async_main(args, prepared))
}

async fn async_main(args: Args, prepared: Prepared) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    // Bind first: a port in use is found before anything is loaded.
    let listener = Listener::bind_with(&args.listen, prepared.socket_group)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?,
        ),
        None => None,
    };
    let mut probe = Probe::start(prepared.probe)?;
    let refused: Vec<String> = probe.refused_modes().iter().map(|r| r.to_string()).collect();
    for r in &refused {
        info!("passed over: {r}");
    }
    info!(mode = %probe.mode(), "probe attached");
    let hub = Hub::new(
        HubConfig {
            queue_events: args.queue_events as usize,
            queue_bytes: usize::try_from(args.queue_bytes)?,
            history_events: args.history_events as usize,
            max_subscribers: args.max_subscribers as usize,
            max_subscribers_per_connection: args.max_streams_per_connection as usize,
            record_always: args.record_always,
            filter_limits: FilterLimits {
                max_filters: args.max_filters as usize,
                max_values: args.max_filter_values as usize,
            },
        },
        Source {
            mode: Some(probe.mode()),
            refused_modes: refused,
            probe: Some(probe.control().clone()),
        },
    );
    // Read and dispatch on this runtime while the rate is low (one wakeup
    // per batch: the streams are woken on the same thread), on a thread of
    // its own when it is high.
    probe.deliver_on_runtime(tokio::runtime::Handle::current(), {
        let hub = hub.clone();
        move |batch| hub.dispatch(batch)
    });
    if let Some(account) = &prepared.user {
        account.switch_to(args.reader_nice, args.realtime_priority)?;
        info!(user = %account.name(), "dropped root and every capability");
    }
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = metrics_listener.map(|l| {
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = socktap::metrics::serve(hub, l, async {
                let _ = metrics_stopped.await;
            })
            .await
            {
                error!("metrics: {e}");
            }
        })
    });
    let addr = listener.local_addr();
    println!("socktapd: serving socktap.v1 on {addr} (attach mode {})", probe.mode());
    let served = daemon::serve(hub, listener, prepared.serve, shutdown).await;
    let _ = stop_metrics.send(());
    if let Some(m) = metrics {
        let _ = tokio::time::timeout(daemon::SHUTDOWN_GRACE, m).await;
    }
    drop(probe); // detach and unload before exiting
    if let Err(e) = served {
        error!("{e}");
        return Err(e.into());
    }
    info!("stopped");
    Ok(())
}

fn serve_options(args: &Args) -> anyhow::Result<ServeOptions> {
    let read = |flag: &str, p: &PathBuf| std::fs::read(p).with_context(|| format!("{flag} {}", p.display()));
    let auth_token = match &args.auth_token_file {
        None => None,
        Some(p) => {
            let token = String::from_utf8(read("--auth-token-file", p)?)
                .with_context(|| format!("--auth-token-file {}: not UTF-8", p.display()))?
                .trim()
                .to_owned();
            anyhow::ensure!(!token.is_empty(), "--auth-token-file {} is empty", p.display());
            Some(token)
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsOptions {
            cert_pem: read("--tls-cert", cert)?,
            key_pem: read("--tls-key", key)?,
            client_ca_pem: args
                .tls_client_ca
                .as_ref()
                .map(|p| read("--tls-client-ca", p))
                .transpose()?,
        }),
        _ => None,
    };
    Ok(ServeOptions {
        auth_token,
        tls,
        keepalive_interval: Duration::from_secs(args.keepalive_secs),
        keepalive_timeout: Duration::from_secs(args.keepalive_timeout_secs),
        max_request_bytes: args.max_request_bytes,
        max_streams_per_connection: args.max_streams_per_connection + 16,
    })
}

/// Installs the SIGINT/SIGTERM handlers now (so a signal that comes early,
/// even while loading, is not fatal) and returns a future that completes
/// on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => info!("SIGINT"),
            _ = term.recv() => info!("SIGTERM"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::arena_count_set_by_environment as set_by_env;

    #[test]
    fn the_arena_count_is_left_to_the_environment_when_it_names_one() {
        assert!(!set_by_env(false, None));
        assert!(set_by_env(true, None), "MALLOC_ARENA_MAX");
        assert!(set_by_env(false, Some("glibc.malloc.arena_max=4")));
        assert!(set_by_env(
            false,
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2")
        ));
        assert!(!set_by_env(false, Some("glibc.malloc.arena_test=2")), "another tunable");
        assert!(!set_by_env(false, Some("glibc.malloc.arena_max")), "no value");
        assert!(!set_by_env(false, Some("")));
    }
}
