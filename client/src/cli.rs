//! The `socktap` command line: argument definitions and the commands.
//! [`run`] writes to the writers it is given and returns the exit code, so
//! tests can drive it in-process as well as through the binary.

use std::io::{self, Write};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use socktap_proto::v1 as api;
use tokio::time::Instant;

use std::path::PathBuf;

use socktap_proto::v1::socktap_client::SocktapClient;
use tonic::transport::Channel;

use crate::addr::{connect_with, root_cause, ConnectError, ConnectOptions, DaemonAddr};
use crate::cgroups::CgroupNames;
use crate::format;
use crate::resume::Position;
use crate::top::Top;

const EXAMPLES: &str = "Examples:
  socktap watch                              every TCP send/recv, live
  socktap watch --comm curl --remote-port 443
  socktap watch --pid 1234 --pid 5678 --kind recv --errors
  socktap watch --cidr 10.0.0.0/8 --exclude-comm sshd -o json | jq .
  socktap watch --replay 100 --limit 100     the last 100 events, then exit
  socktap status
  socktap top --interval 2s
  SOCKTAP_ADDR=unix:/run/socktap.sock socktap status";

/// Per-socket TCP telemetry: watch what every TCP connection does, live,
/// from socktapd.
#[derive(Parser, Debug)]
#[command(name = "socktap", version, after_help = EXAMPLES)]
pub struct Cli {
    /// socktapd's address: host:port, http://host:port, https://host:port or unix:/path.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "SOCKTAP_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: DaemonAddr,
    /// File holding the bearer token socktapd requires (--auth-token-file there).
    #[arg(long, global = true, help_heading = "Connection", env = "SOCKTAP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// instead of the system's roots.
    #[arg(long, global = true, help_heading = "Connection", env = "SOCKTAP_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM), for socktapd with mTLS.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "SOCKTAP_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "SOCKTAP_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach and authenticate to socktapd.
struct Session {
    addr: DaemonAddr,
    connect: ConnectOptions,
    token: Option<String>,
}

impl Session {
    fn new(cli: &Cli) -> Result<Session, Failure> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| Failure::Input(format!("reading {}: {e}", p.display())));
        let token = match &cli.token_file {
            Some(p) => Some(String::from_utf8_lossy(&read(p)?).trim().to_owned()),
            None => None,
        };
        let identity = match (&cli.client_cert, &cli.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let connect = ConnectOptions {
            ca_cert_pem: cli.ca_cert.as_ref().map(read).transpose()?,
            client_identity_pem: identity,
        };
        Ok(Session {
            addr: cli.addr.clone(),
            connect,
            token,
        })
    }

    async fn client(&self) -> Result<SocktapClient<Channel>, Failure> {
        Ok(connect_with(&self.addr, &self.connect).await?)
    }

    /// A request carrying the bearer token, when there is one.
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Failure> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Failure::Input("the token file holds characters a header cannot carry".into()))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream events live (table, or JSON lines with -o json).
    #[command(after_help = "Examples:
  socktap watch --comm nginx --kind send
  socktap watch --cookie 4097 -o json
  socktap watch --port 5432 --exclude-uid 0
  socktap watch --since 30s --limit 1000      from history, 30 s back
  socktap watch --resume-after 123456         continue after a seen seq
  socktap watch -o json --reconnect           survive socktapd restarts")]
    Watch(WatchArgs),
    /// Show socktapd's status: attach mode, kernel, rates, drops, subscribers.
    #[command(after_help = "Examples:\n  socktap status\n  socktap status -o json")]
    Status(StatusArgs),
    /// A live view refreshed every interval: busiest sockets and processes.
    #[command(
        after_help = "Examples:\n  socktap top\n  socktap top --comm postgres --rows 10\n  socktap top --interval 5s --iterations 1\n  socktap top -o json --interval 10s     a JSON object per interval, every row"
    )]
    Top(TopArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  socktap completions bash > /etc/bash_completion.d/socktap\n  socktap completions zsh > \"${fpath[1]}/_socktap\"\n  socktap completions fish > ~/.config/fish/completions/socktap.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people.
    Table,
    /// One proto3 JSON object per line (the mapping grpcurl prints).
    Json,
}

/// Event kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// send calls.
    Send,
    /// recv calls.
    Recv,
}

/// Address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    /// IPv4 (including v4-mapped IPv6).
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// Server-side filters. Different flags must all match; a repeated flag (or
/// a comma list) matches any of its values; `--exclude-*` flags drop what
/// they match.
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only this process id (tgid).
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Only this thread name (exact).
    #[arg(long, value_delimiter = ',', value_parser = comm)]
    pub comm: Vec<String>,
    /// Only thread names starting with this.
    #[arg(long, value_delimiter = ',', value_parser = comm)]
    pub comm_prefix: Vec<String>,
    /// Only this socket cookie (SO_COOKIE).
    #[arg(long, value_delimiter = ',')]
    pub cookie: Vec<u64>,
    /// Only this local port.
    #[arg(long, value_delimiter = ',', value_parser = port)]
    pub port: Vec<u32>,
    /// Only this remote port.
    #[arg(long, value_delimiter = ',', value_parser = port)]
    pub remote_port: Vec<u32>,
    /// Only remote addresses in this CIDR (10.0.0.0/8, fd00::/8) or equal to this address.
    #[arg(long, value_delimiter = ',', value_parser = cidr)]
    pub cidr: Vec<String>,
    /// Only this uid.
    #[arg(long, value_delimiter = ',')]
    pub uid: Vec<u32>,
    /// Only this cgroup and those below it: a path as /proc/PID/cgroup shows it (/system.slice/nginx.service), resolved by socktapd on its host, a cgroup created below it later matched from its first call; or a cgroup v2 id (that cgroup only).
    #[arg(long, value_delimiter = ',', value_parser = cgroup)]
    pub cgroup: Vec<CgroupArg>,
    /// Only sends or only receives.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub kind: Vec<KindArg>,
    /// Only this address family.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub family: Vec<FamilyArg>,
    /// Only failed calls (errno set).
    #[arg(long)]
    pub errors: bool,
    /// Drop this process id.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',')]
    pub exclude_pid: Vec<u32>,
    /// Drop this thread name (exact).
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',', value_parser = comm)]
    pub exclude_comm: Vec<String>,
    /// Drop thread names starting with this.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',', value_parser = comm)]
    pub exclude_comm_prefix: Vec<String>,
    /// Drop this socket cookie.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',')]
    pub exclude_cookie: Vec<u64>,
    /// Drop this local port.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',', value_parser = port)]
    pub exclude_port: Vec<u32>,
    /// Drop this remote port.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',', value_parser = port)]
    pub exclude_remote_port: Vec<u32>,
    /// Drop remote addresses in this CIDR.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',', value_parser = cidr)]
    pub exclude_cidr: Vec<String>,
    /// Drop this uid.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',')]
    pub exclude_uid: Vec<u32>,
    /// Drop this cgroup and those below it (a path), or this cgroup v2 id.
    #[arg(long, help_heading = "Exclusions", value_delimiter = ',', value_parser = cgroup)]
    pub exclude_cgroup: Vec<CgroupArg>,
    /// Also show this socktap process's own calls (receiving the stream
    /// produces events; by default they are dropped to avoid a feedback loop).
    #[arg(long)]
    pub include_self: bool,
}

/// `socktap watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Start with the last N matching events from socktapd's history.
    #[arg(long, value_name = "N", conflicts_with_all = ["since", "resume_after"])]
    pub replay: Option<u32>,
    /// Start from history at this time: RFC 3339 (2026-11-25T14:00:00Z) or a duration ago (30s, 5m).
    #[arg(long, value_parser = since, conflicts_with = "resume_after")]
    pub since: Option<SystemTime>,
    /// Start from history after this sequence number (resume a stream).
    #[arg(long, value_name = "SEQ")]
    pub resume_after: Option<u64>,
    /// With --resume-after: the socktapd instance that seq came from (`socktap status` shows it). If socktapd has restarted since, the stream says so, then starts with all of its history.
    #[arg(long, value_name = "ID", requires = "resume_after")]
    pub resume_instance: Option<u64>,
    /// When socktapd ends the stream or the connection breaks (a restart), connect again and resume after the last event seen; socktapd announces what was lost. Also waits for a socktapd that is not up yet.
    #[arg(long)]
    pub reconnect: bool,
    /// Exit after N events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// Same as -o json.
    #[arg(long)]
    pub json: bool,
    /// Table: also each call's thread id, uid and network namespace, and its cgroup's path (asked of socktapd; the id when it has none) last. JSON lines always have every field; with --wide also `cgroupPath`, where socktapd can name the cgroup.
    #[arg(short, long)]
    pub wide: bool,
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `socktap status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

/// `socktap top`.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// Refresh interval (1s, 500ms, 5s).
    #[arg(long, value_parser = interval, default_value = "1s")]
    pub interval: Duration,
    /// Rows per table (default 20; JSON lines have every row unless given).
    #[arg(long)]
    pub rows: Option<usize>,
    /// Output format: a table per interval, or one JSON object per interval (-o json).
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// Exit after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    pub iterations: Option<u64>,
    /// When socktapd ends the stream or the connection breaks (a restart), or is not up yet, keep refreshing and connect again (each frame says so while it is down).
    #[arg(long)]
    pub reconnect: bool,
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// A `--cgroup` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupArg {
    /// A cgroup v2 id.
    Id(u64),
    /// A cgroup's path, resolved by socktapd.
    Path(String),
}

impl CgroupArg {
    fn ids(v: &[CgroupArg]) -> Vec<u64> {
        v.iter()
            .filter_map(|c| match c {
                CgroupArg::Id(id) => Some(*id),
                CgroupArg::Path(_) => None,
            })
            .collect()
    }
    fn paths(v: &[CgroupArg]) -> Vec<String> {
        v.iter()
            .filter_map(|c| match c {
                CgroupArg::Path(p) => Some(p.clone()),
                CgroupArg::Id(_) => None,
            })
            .collect()
    }
}

fn cgroup(s: &str) -> Result<CgroupArg, String> {
    if let Ok(id) = s.parse() {
        return Ok(CgroupArg::Id(id));
    }
    if s.is_empty() || s.chars().all(|c| c.is_ascii_digit() || c == '-' || c == '+') {
        return Err("a cgroup is a path (/system.slice/nginx.service) or a cgroup v2 id".into());
    }
    Ok(CgroupArg::Path(s.to_owned()))
}

fn comm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 {
        return Err("a thread name has 1 to 15 bytes".into());
    }
    Ok(s.to_owned())
}

fn port(s: &str) -> Result<u32, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p.into()),
        _ => Err("a port is 1-65535".into()),
    }
}

fn cidr(s: &str) -> Result<String, String> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| "expected a CIDR like 10.0.0.0/8 or an IP address".to_string())?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(format!("the prefix length must be 0-{max}")),
        }
    }
    Ok(s.to_owned())
}

fn since(s: &str) -> Result<SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| "too far back".to_string());
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| "expected RFC 3339 (2026-11-25T14:00:00Z) or a duration (30s)".into())
}

fn interval(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_millis(100) => Ok(d),
        Ok(_) => Err("at least 100ms".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl FilterArgs {
    /// The API's allow and deny lists for these flags.
    pub fn to_filters(&self) -> (Vec<api::EventFilter>, Vec<api::EventFilter>) {
        let allow = api::EventFilter {
            cookies: self.cookie.clone(),
            pids: self.pid.clone(),
            comms: self.comm.clone(),
            comm_prefixes: self.comm_prefix.clone(),
            uids: self.uid.clone(),
            cgroup_ids: CgroupArg::ids(&self.cgroup),
            cgroup_paths: CgroupArg::paths(&self.cgroup),
            local_ports: self.port.clone(),
            remote_ports: self.remote_port.clone(),
            remote_cidrs: self.cidr.clone(),
            families: self
                .family
                .iter()
                .map(|f| match f {
                    FamilyArg::Ipv4 => api::AddressFamily::Ipv4 as i32,
                    FamilyArg::Ipv6 => api::AddressFamily::Ipv6 as i32,
                })
                .collect(),
            kinds: self
                .kind
                .iter()
                .map(|k| match k {
                    KindArg::Send => api::EventKind::Send as i32,
                    KindArg::Recv => api::EventKind::Recv as i32,
                })
                .collect(),
            errors_only: self.errors,
        };
        // Each exclude flag is its own deny filter: any of them drops an event.
        let mut deny = Vec::new();
        let mut add = |f: api::EventFilter| deny.push(f);
        let mut exclude_pid = self.exclude_pid.clone();
        if !self.include_self {
            exclude_pid.push(std::process::id());
        }
        if !exclude_pid.is_empty() {
            add(api::EventFilter {
                pids: exclude_pid,
                ..Default::default()
            });
        }
        if !self.exclude_comm.is_empty() {
            add(api::EventFilter {
                comms: self.exclude_comm.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_comm_prefix.is_empty() {
            add(api::EventFilter {
                comm_prefixes: self.exclude_comm_prefix.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_cookie.is_empty() {
            add(api::EventFilter {
                cookies: self.exclude_cookie.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_port.is_empty() {
            add(api::EventFilter {
                local_ports: self.exclude_port.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_remote_port.is_empty() {
            add(api::EventFilter {
                remote_ports: self.exclude_remote_port.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_cidr.is_empty() {
            add(api::EventFilter {
                remote_cidrs: self.exclude_cidr.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_uid.is_empty() {
            add(api::EventFilter {
                uids: self.exclude_uid.clone(),
                ..Default::default()
            });
        }
        if !self.exclude_cgroup.is_empty() {
            add(api::EventFilter {
                cgroup_ids: CgroupArg::ids(&self.exclude_cgroup),
                cgroup_paths: CgroupArg::paths(&self.exclude_cgroup),
                ..Default::default()
            });
        }
        let allow = if allow == api::EventFilter::default() {
            vec![]
        } else {
            vec![allow]
        };
        (allow, deny)
    }
}

impl WatchArgs {
    /// The WatchEvents request for these flags.
    pub fn to_request(&self) -> api::WatchEventsRequest {
        let (allow, deny) = self.filters.to_filters();
        let since = self.since.map(|t| {
            let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            socktap_proto::Timestamp {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }
        });
        api::WatchEventsRequest {
            allow,
            deny,
            replay_last: self.replay.unwrap_or(0),
            since,
            resume_after_seq: self.resume_after,
            resume_instance_id: self.resume_instance,
            limit: self.limit.unwrap_or(0),
            max_batch_events: None,
            max_flush_delay: None,
        }
    }
}

/// How a command ended badly.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("socktapd at {addr} refused the request: {message}")]
    Rejected { addr: DaemonAddr, message: String },
    #[error("socktapd at {addr}: {status}")]
    Rpc {
        addr: DaemonAddr,
        code: tonic::Code,
        status: String,
    },
    /// The stream ended before the command was done: socktapd ends every
    /// stream when it shuts down.
    #[error("socktapd at {addr} ended the stream (it is shutting down or restarting)")]
    Ended { addr: DaemonAddr },
    /// A file named on the command line could not be used.
    #[error("{0}")]
    Input(String),
    /// Our stdout was closed (e.g. `| head`): not an error.
    #[error("stdout closed")]
    Closed,
    #[error("writing output: {0}")]
    Io(io::Error),
}

impl Failure {
    fn rpc(addr: &DaemonAddr, s: tonic::Status) -> Failure {
        if s.code() == tonic::Code::InvalidArgument {
            return Failure::Rejected {
                addr: addr.clone(),
                message: s.message().to_owned(),
            };
        }
        let detail = if s.message().is_empty() {
            std::error::Error::source(&s)
                .map(root_cause)
                .unwrap_or_else(|| format!("{:?}", s.code()))
        } else {
            s.message().to_owned()
        };
        Failure::Rpc {
            addr: addr.clone(),
            code: s.code(),
            status: format!("{:?}: {detail}", s.code()),
        }
    }
    /// An error in the middle of a stream: the connection broke (socktapd
    /// killed, the network gone), which tonic reports as a bare status.
    fn mid_stream(addr: &DaemonAddr, s: tonic::Status) -> Failure {
        match Failure::rpc(addr, s) {
            Failure::Rpc { addr, code, status } => Failure::Rpc {
                addr,
                code,
                status: format!("the stream broke: {status}"),
            },
            other => other,
        }
    }
    /// Whether `--reconnect` tries again after this: socktapd gone or
    /// restarting, not a request or credentials it refuses.
    fn passes(&self) -> bool {
        match self {
            Failure::Connect(_) | Failure::Ended { .. } => true,
            Failure::Rpc { code, .. } => !matches!(
                code,
                tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unimplemented
                    | tonic::Code::FailedPrecondition
            ),
            _ => false,
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            Failure::Closed => 0,
            Failure::Rejected { .. } | Failure::Input(_) => 2,
            _ => 1,
        }
    }
}

fn write_line(out: &mut (dyn Write + Send), line: &str) -> Result<(), Failure> {
    writeln!(out, "{line}").map_err(io_failure)
}

fn flush(out: &mut (dyn Write + Send)) -> Result<(), Failure> {
    out.flush().map_err(io_failure)
}

fn io_failure(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::Closed
    } else {
        Failure::Io(e)
    }
}

/// Parses arguments; on a usage error prints one line and gives exit code 2
/// (help and version print in full and give 0).
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>, err: &mut (dyn Write + Send)) -> Result<Cli, i32> {
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(0)
        }
        Err(e) => {
            let _ = writeln!(err, "socktap: {}", one_line(&e));
            Err(2)
        }
    }
}

/// A clap error as one line for a command-line tool's exit-2 message: its
/// first paragraph with its lines joined (so that "the following required
/// arguments were not provided:" keeps the flags it lists), then any
/// `tip:` (a similar flag's name) in parentheses; without the `error: `
/// prefix, the usage and the help hint.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let join = |p: &str| {
        p.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut paragraphs = text.split("\n\n").map(join);
    let first = paragraphs.next().unwrap_or_default();
    let mut line = match first.strip_prefix("error: ") {
        Some(rest) => rest.to_owned(),
        None if first.is_empty() => "invalid arguments".to_owned(),
        None => first,
    };
    for tip in paragraphs.filter(|p| p.starts_with("tip:")) {
        line.push_str(&format!(" ({tip})"));
    }
    line
}

/// Runs a command; returns the process exit code: 0 done (or stdout
/// closed), 1 socktapd unreachable or failing (or it ended a stream before
/// the command was done), 2 bad input.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send), err: &mut (dyn Write + Send)) -> i32 {
    // Ctrl-C ends a stream cleanly; the handler is installed before
    // anything else, so an early Ctrl-C is not fatal either.
    let mut interrupt = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "socktap: cannot watch SIGINT: {e}");
            return 1;
        }
    };
    if let Command::Completions { shell } = &cli.command {
        use clap::CommandFactory;
        // Into memory first: clap_complete panics on a failed write.
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "socktap", &mut script);
        return match out.write_all(&script).map_err(io_failure).and_then(|()| flush(out)) {
            Ok(()) => 0,
            Err(f) => f.exit_code(),
        };
    }
    let result = match Session::new(&cli) {
        Err(f) => Err(f),
        Ok(session) => match &cli.command {
            Command::Watch(a) => watch(&session, a, &mut interrupt, out, err).await,
            Command::Status(a) => status(&session, a, out).await,
            Command::Top(a) => top(&session, a, &mut interrupt, out, err).await,
            Command::Completions { .. } => Ok(()),
        },
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            let code = f.exit_code();
            if code != 0 {
                let _ = writeln!(err, "socktap: {f}");
            }
            code
        }
    }
}

async fn watch(
    session: &Session,
    a: &WatchArgs,
    interrupt: &mut tokio::signal::unix::Signal,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let json = a.json || a.output == Output::Json;
    let addr = &session.addr;
    let original = a.to_request();
    let opened_at = SystemTime::now();
    let mut position = Position::from_request(&original);
    let mut request = original.clone();
    let mut received = 0u64;
    let mut table = if a.wide {
        format::Table::wide()
    } else {
        format::Table::default()
    };
    let mut lookups = if json {
        CgroupLookups::for_json()
    } else {
        CgroupLookups::for_table()
    };
    // Set while (re)connecting: how long to wait before the next attempt.
    let mut retry: Option<Duration> = None;
    let mut connected = false;
    loop {
        if let Some(wait) = retry {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = interrupt.recv() => return Ok(()),
            }
        }
        let opened = tokio::select! {
            o = open_stream(session, &request) => o,
            _ = interrupt.recv() => return Ok(()),
        };
        let (mut client, mut stream) = match opened {
            Ok(s) => s,
            Err(f) if a.reconnect && f.passes() => {
                retry = Some(match retry {
                    Some(w) => (w * 2).min(MAX_RECONNECT_WAIT),
                    // socktapd is not up yet: wait for it, and say so once.
                    None => {
                        let _ = writeln!(err, "socktap: {f}; waiting for it (Ctrl-C to stop)");
                        FIRST_RECONNECT_WAIT
                    }
                });
                continue;
            }
            Err(f) => return Err(f),
        };
        let waited = retry.take().is_some();
        if connected {
            let _ = writeln!(err, "socktap: reconnected to socktapd at {addr}");
        } else {
            connected = true;
            if waited {
                let _ = writeln!(err, "socktap: connected to socktapd at {addr}");
            }
            if !json {
                write_line(out, &table.header())?;
                flush(out)?;
            }
        }
        let ended = loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = interrupt.recv() => return Ok(()),
            };
            let msg = match msg {
                Ok(Some(m)) => m,
                Err(s) => break Failure::mid_stream(addr, s),
                // socktapd ends a stream at --limit, and when it shuts down.
                Ok(None) => match a.limit {
                    Some(n) if received >= n => return Ok(()),
                    _ => break Failure::Ended { addr: addr.clone() },
                },
            };
            position.observe(&msg);
            match msg.message {
                Some(api::watch_events_response::Message::Events(batch)) => {
                    received += batch.events.len() as u64;
                    if table.is_wide() {
                        let ids = batch.events.iter().map(|e| e.cgroup_id);
                        lookups.name(session, &mut client, table.cgroups_mut(), ids, err).await;
                    }
                    for e in &batch.events {
                        if json {
                            let path = if table.is_wide() {
                                table.cgroups().name(e.cgroup_id)
                            } else {
                                None
                            };
                            write_line(out, &format::event_json_line(e, path))?;
                        } else {
                            for line in table.rows(e) {
                                write_line(out, &line)?;
                            }
                        }
                    }
                }
                Some(api::watch_events_response::Message::Lost(l)) => {
                    if json {
                        let _ = writeln!(err, "{}", format::json_line(&l));
                    } else {
                        write_line(out, &format::lost_line(&l))?;
                    }
                }
                None => {}
            }
            flush(out)?;
        };
        if !a.reconnect || !ended.passes() {
            return Err(ended);
        }
        let _ = writeln!(err, "socktap: {ended}; reconnecting");
        request = position.resume_request(&original, opened_at, received);
        retry = Some(FIRST_RECONNECT_WAIT);
    }
}

/// The first wait before reconnecting, doubled after each failed attempt
/// up to [`MAX_RECONNECT_WAIT`].
const FIRST_RECONNECT_WAIT: Duration = Duration::from_millis(100);
/// See [`FIRST_RECONNECT_WAIT`].
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// Opens a WatchEvents stream; also gives the client, whose connection
/// the stream uses, for other calls on it.
async fn open_stream(
    session: &Session,
    request: &api::WatchEventsRequest,
) -> Result<(SocktapClient<Channel>, tonic::Streaming<api::WatchEventsResponse>), Failure> {
    let mut client = session.client().await?;
    let stream = client
        .watch_events(session.request(request.clone())?)
        .await
        .map_err(|s| Failure::rpc(&session.addr, s))?
        .into_inner();
    Ok((client, stream))
}

/// How long `watch --wide` and `top` wait for socktapd to name cgroups
/// before they show their ids instead.
const CGROUP_LOOKUP_WAIT: Duration = Duration::from_secs(2);
/// How long they show ids after a failed lookup before they ask again.
const CGROUP_LOOKUP_RETRY: Duration = Duration::from_secs(1);

/// Asks socktapd to name cgroups, and holds off after a failure.
struct CgroupLookups {
    /// After a failure: no lookups before then.
    paused_until: Option<Instant>,
    /// What the output shows of a cgroup it cannot name, for the notice.
    unnamed: &'static str,
}

impl CgroupLookups {
    /// For a table, whose CGROUP column shows the ids of cgroups it cannot
    /// name.
    fn for_table() -> Self {
        CgroupLookups {
            paused_until: None,
            unnamed: "CGROUP shows their ids",
        }
    }

    /// For JSON lines (`watch`) or objects (`top`), which then have no
    /// `cgroupPath`.
    fn for_json() -> Self {
        CgroupLookups {
            paused_until: None,
            unnamed: "no cgroupPath until it can",
        }
    }

    /// Asks socktapd (through `client`) for the paths of the cgroups among
    /// `ids` that `names` does not know yet. When a lookup fails (a
    /// socktapd without GetCgroupPaths, no cgroup2 on its host, no answer
    /// in time), those cgroups show their ids, it says why on `err` (once
    /// until a lookup succeeds again), and asks again after
    /// [`CGROUP_LOOKUP_RETRY`].
    async fn name(
        &mut self,
        session: &Session,
        client: &mut SocktapClient<Channel>,
        names: &mut CgroupNames,
        ids: impl Iterator<Item = u64>,
        err: &mut (dyn Write + Send),
    ) {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        for request in names.requests(ids) {
            let asked = request.cgroup_ids.clone();
            let answer = match session.request(request) {
                Ok(r) => match tokio::time::timeout(CGROUP_LOOKUP_WAIT, client.get_cgroup_paths(r)).await {
                    Ok(Ok(answer)) => Ok(answer.into_inner()),
                    Ok(Err(s)) => Err(Failure::rpc(&session.addr, s).to_string()),
                    Err(_) => Err(format!("socktapd did not answer within {CGROUP_LOOKUP_WAIT:?}")),
                },
                Err(f) => Err(f.to_string()),
            };
            match answer {
                Ok(answer) => {
                    names.learn(&asked, answer);
                    self.paused_until = None;
                }
                Err(why) => {
                    if self.paused_until.is_none() {
                        let _ = writeln!(err, "socktap: cannot name cgroups ({why}); {}", self.unnamed);
                    }
                    self.paused_until = Some(Instant::now() + CGROUP_LOOKUP_RETRY);
                    return;
                }
            }
        }
    }
}

async fn status(session: &Session, a: &StatusArgs, out: &mut (dyn Write + Send)) -> Result<(), Failure> {
    let mut client = session.client().await?;
    let addr = &session.addr;
    let s = client
        .get_status(session.request(api::GetStatusRequest {})?)
        .await
        .map_err(|s| Failure::rpc(addr, s))?
        .into_inner();
    match a.output {
        Output::Json => write_line(out, &format::json_line(&s))?,
        Output::Table => out.write_all(format::status_text(&s).as_bytes()).map_err(io_failure)?,
    }
    flush(out)
}

async fn top(
    session: &Session,
    a: &TopArgs,
    interrupt: &mut tokio::signal::unix::Signal,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let clear = io::stdout().is_terminal();
    let addr = &session.addr;
    let (allow, deny) = a.filters.to_filters();
    let req = api::WatchEventsRequest {
        allow,
        deny,
        ..Default::default()
    };
    // None while (re)connecting under --reconnect.
    let mut stream = None;
    // The stream's client, which names the cgroups shown.
    let mut client = None;
    let mut names = CgroupNames::default();
    let mut lookups = if a.output == Output::Json {
        CgroupLookups::for_json()
    } else {
        CgroupLookups::for_table()
    };
    // While disconnected: the next attempt, and the wait after it.
    let mut retry_at = Instant::now();
    let mut wait = FIRST_RECONNECT_WAIT;
    // Why the stream is down, shown in every frame until it is back.
    let mut down: Option<String> = None;
    let mut ticker = frame_ticker(a.interval);
    let mut frame = Top::default();
    let mut frames = 0u64;
    let mut last = Instant::now();
    let json = a.output == Output::Json;
    let show =
        |frame: &Top, names: &CgroupNames, last: &mut Instant, out: &mut (dyn Write + Send)| -> Result<(), Failure> {
            let now = Instant::now();
            let secs = now.duration_since(*last).as_secs_f64();
            *last = now;
            if json {
                write_line(out, &frame.json(a.rows, secs, SystemTime::now(), names))?;
                return flush(out);
            }
            let text = frame.render(a.rows.unwrap_or(TOP_ROWS), secs, names);
            if clear {
                out.write_all(b"\x1b[H\x1b[2J").map_err(io_failure)?;
            }
            out.write_all(text.as_bytes()).map_err(io_failure)?;
            write_line(out, "")?;
            flush(out)
        };
    loop {
        if stream.is_none() && Instant::now() >= retry_at {
            let opened = tokio::select! {
                o = open_stream(session, &req) => o,
                _ = interrupt.recv() => return Ok(()),
            };
            match opened {
                Ok((c, s)) => {
                    client = Some(c);
                    stream = Some(s);
                    wait = FIRST_RECONNECT_WAIT;
                    down = None;
                }
                Err(f) if a.reconnect && f.passes() => {
                    let why = format!("{f}; reconnecting");
                    frame.disconnected(&why);
                    down = Some(why);
                    retry_at = Instant::now() + wait;
                    wait = (wait * 2).min(MAX_RECONNECT_WAIT);
                }
                Err(f) => return Err(f),
            }
        }
        tokio::select! {
            m = next_message(&mut stream) => {
                let ended = match m {
                    Ok(Some(api::WatchEventsResponse { message: Some(m), .. })) => {
                        match m {
                            api::watch_events_response::Message::Events(b) => b.events.iter().for_each(|e| frame.add(e)),
                            api::watch_events_response::Message::Lost(l) => frame.lost(l.count),
                        }
                        continue;
                    }
                    Ok(Some(_)) => continue,
                    Err(s) => Failure::mid_stream(addr, s),
                    // socktapd ended the stream (shutting down).
                    Ok(None) => Failure::Ended { addr: addr.clone() },
                };
                if !a.reconnect || !ended.passes() {
                    // Show what there is, then say why it stopped.
                    show(&frame, &names, &mut last, out)?;
                    return Err(ended);
                }
                let why = format!("{ended}; reconnecting");
                frame.disconnected(&why);
                down = Some(why);
                stream = None;
                retry_at = Instant::now() + wait;
            }
            _ = tokio::time::sleep_until(retry_at), if stream.is_none() => {}
            _ = ticker.tick() => {
                if let Some(client) = client.as_mut() {
                    let rows = match (a.rows, json) {
                        (Some(n), _) => n,
                        (None, true) => usize::MAX,
                        (None, false) => TOP_ROWS,
                    };
                    let shown = frame.cgroups().into_iter().take(rows).map(|c| c.cgroup_id);
                    lookups.name(session, client, &mut names, shown, err).await;
                }
                show(&frame, &names, &mut last, out)?;
                frame = Top::default();
                if let Some(why) = &down {
                    frame.disconnected(why);
                }
                frames += 1;
                if a.iterations.is_some_and(|n| frames >= n) {
                    return Ok(());
                }
            }
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

/// `socktap top`'s rows per table in a table, unless `--rows`.
const TOP_ROWS: usize = 20;

/// The next message of `stream`, or never while there is none.
async fn next_message(
    stream: &mut Option<tonic::Streaming<api::WatchEventsResponse>>,
) -> Result<Option<api::WatchEventsResponse>, tonic::Status> {
    match stream {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// `top`'s refresh: a tick every `period`, the first one period from now.
/// A tick that comes late (the loop was busy connecting, say) moves the
/// next ones back rather than firing them at once to catch up, so no frame
/// covers much less than the period asked for.
fn frame_ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's run had a frame of 0.175 s with `--interval 300ms`: the first
    /// tick came late and the second caught up on the original schedule.
    #[tokio::test(start_paused = true)]
    async fn a_late_tick_does_not_make_the_next_frame_short() {
        let period = Duration::from_millis(300);
        let mut ticker = frame_ticker(period);
        // Busy past the first tick's time, then take it late.
        tokio::time::sleep(Duration::from_millis(425)).await;
        let late = ticker.tick().await;
        assert_eq!(
            Instant::now() - late,
            Duration::from_millis(125),
            "the tick was due at 300 ms"
        );
        let taken = Instant::now();
        ticker.tick().await;
        assert!(
            Instant::now() - taken >= period,
            "the next frame covered {:?}",
            Instant::now() - taken
        );
    }
}
