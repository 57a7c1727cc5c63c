//! socktapd as a child process: started per measurement so that its CPU
//! time and peak RSS belong to that measurement alone.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::time::{clock_getcpuclockid, clock_gettime, ClockId};
use nix::unistd::Pid;
use socktap_client::DaemonAddr;
use socktap_proto::v1::{GetStatusRequest, GetStatusResponse};

/// How the benchmark's subscribers reach socktapd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// TCP on 127.0.0.1 (socktapd's default kind of listener).
    Tcp,
    /// A unix socket (`--listen unix:/path`).
    Unix,
}

/// A running socktapd.
pub struct Daemon {
    child: Child,
    /// Where it serves gRPC.
    pub addr: DaemonAddr,
    /// The unix socket to remove when it stops, if it listens on one.
    socket: Option<PathBuf>,
    /// socktapd's CPU-time clock (every thread's, those that have ended
    /// included), read to the nanosecond.
    cpu_clock: ClockId,
    start_cpu: Duration,
    started: Instant,
}

/// CPU use and memory of a daemon over a measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// CPU time over wall time (1.0 = one core busy).
    pub cores: f64,
    /// Peak resident set (VmHWM) in MiB.
    pub peak_rss_mib: f64,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Daemon {
    /// Starts `socktapd` and waits until it answers GetStatus.
    pub async fn start(binary: &Path, extra: &[String], transport: Transport) -> Result<Daemon, String> {
        let (listen, socket) = match transport {
            Transport::Tcp => (format!("127.0.0.1:{}", free_port().map_err(|e| e.to_string())?), None),
            Transport::Unix => {
                let path = std::env::temp_dir().join(format!("socktap-bench-{}.sock", std::process::id()));
                (format!("unix:{}", path.display()), Some(path))
            }
        };
        let addr: DaemonAddr = listen.parse()?;
        let mut cmd = Command::new(binary);
        cmd.args(["--listen", &listen])
            .args(extra)
            .env("RUST_LOG", "warn,libbpf=off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: runs in the forked child before exec, where only
        // async-signal-safe calls are allowed; prctl is one. It makes the
        // kernel stop socktapd when the benchmark dies (killed by a timeout,
        // say), so no daemon is left attached and holding the output pipe.
        // The "parent" is the forking thread: a runtime worker, which lives
        // as long as the benchmark.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let cpu_clock = match clock_getcpuclockid(Pid::from_raw(child.id() as i32)) {
            Ok(clock) => clock,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("socktapd's CPU clock: {e}"));
            }
        };
        let mut d = Daemon {
            child,
            addr,
            socket,
            cpu_clock,
            start_cpu: Duration::ZERO,
            started: Instant::now(),
        };
        for _ in 0..200 {
            if d.status().await.is_ok() {
                d.reset_usage();
                return Ok(d);
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(format!("socktapd exited at start: {st}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("socktapd did not answer within 10 s".into())
    }

    /// Its status.
    pub async fn status(&self) -> Result<GetStatusResponse, String> {
        let mut c = socktap_client::connect(&self.addr).await.map_err(|e| e.to_string())?;
        Ok(c.get_status(GetStatusRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner())
    }

    /// Waits until `n` subscribers are registered.
    pub async fn wait_subscribers(&self, n: usize) -> Result<(), String> {
        for _ in 0..400 {
            if self.status().await?.subscribers.len() >= n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(format!("{n} subscribers did not register"))
    }

    /// socktapd's CPU time so far, user and system, to the nanosecond
    /// (`/proc/<pid>/stat` counts it in 10 ms ticks). Zero once it is gone.
    fn cpu_time(&self) -> Duration {
        clock_gettime(self.cpu_clock).map(Duration::from).unwrap_or_default()
    }

    /// CPU and memory since start (or the last reset).
    pub fn usage(&self) -> Usage {
        let cpu = self.cpu_time().saturating_sub(self.start_cpu).as_secs_f64();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let hwm_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        Usage {
            cores: cpu / self.started.elapsed().as_secs_f64().max(1e-9),
            peak_rss_mib: hwm_kib / 1024.0,
        }
    }

    /// Starts the CPU measurement window now.
    pub fn reset_usage(&mut self) {
        self.start_cpu = self.cpu_time();
        self.started = Instant::now();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> Result<(), String> {
        // SAFETY: FFI; signals our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let exit = self.child.wait();
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path); // socktapd removes it; this is for a crash
        }
        match exit {
            Ok(st) if st.success() => Ok(()),
            Ok(st) => Err(format!("socktapd exited with {st}")),
            Err(e) => Err(e.to_string()),
        }
    }
}
