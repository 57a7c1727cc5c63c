//! The loopback workloads: W1 ping-pong, W2 many small writers, W3 bulk.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Which workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// 64-byte ping-pong on 2 connections (ops = round trips).
    W1,
    /// 8 writers of 64-byte messages, readers draining (ops = sends).
    W2,
    /// Bulk 64 KiB writes on 2 connections (ops = writes).
    W3,
}

impl Workload {
    fn connections(self) -> usize {
        match self {
            Workload::W1 | Workload::W3 => 2,
            Workload::W2 => 8,
        }
    }
}

/// Connected pairs, ready to run; their cookies are known beforehand so
/// subscribers can filter on them.
pub struct Prepared {
    workload: Workload,
    pairs: Vec<(TcpStream, TcpStream)>,
    /// The cookies of every socket of the workload.
    pub cookies: Vec<u64>,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Operations done.
    pub ops: u64,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Outcome {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.seconds.max(1e-9)
    }
}

/// SO_COOKIE of a socket.
pub fn cookie(s: &TcpStream) -> u64 {
    let mut c = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: FFI; the pointers reference live locals of the sizes given.
    unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut c as *mut u64).cast(),
            &mut len,
        )
    };
    c
}

/// Opens the workload's connections.
pub fn prepare(workload: Workload) -> std::io::Result<Prepared> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut pairs = Vec::new();
    let mut cookies = Vec::new();
    for _ in 0..workload.connections() {
        let c = TcpStream::connect(listener.local_addr()?)?;
        let (s, _) = listener.accept()?;
        c.set_nodelay(true)?;
        s.set_nodelay(true)?;
        cookies.push(cookie(&c));
        cookies.push(cookie(&s));
        pairs.push((c, s));
    }
    Ok(Prepared {
        workload,
        pairs,
        cookies,
    })
}

impl Prepared {
    /// Runs for `duration`; `rate` paces W1 to that many round trips/s in all.
    pub fn run(self, duration: Duration, rate: Option<f64>) -> Outcome {
        let ops = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + duration;
        let per_conn_interval = rate.map(|r| Duration::from_secs_f64(self.pairs.len() as f64 / r));
        let mut threads = Vec::new();
        for (mut c, mut s) in self.pairs {
            let ops = ops.clone();
            let w = self.workload;
            let (msg, buf) = match w {
                Workload::W1 | Workload::W2 => (64usize, 64usize),
                Workload::W3 => (65536, 65536),
            };
            // The receiving side: echo (W1) or drain (W2, W3) until EOF.
            threads.push(thread::spawn(move || {
                let mut b = vec![0u8; if w == Workload::W1 { buf } else { 65536 }];
                loop {
                    let n = if w == Workload::W1 {
                        match s.read_exact(&mut b) {
                            Ok(()) => b.len(),
                            Err(_) => 0,
                        }
                    } else {
                        s.read(&mut b).unwrap_or(0)
                    };
                    if n == 0 {
                        break;
                    }
                    if w == Workload::W1 && s.write_all(&b).is_err() {
                        break;
                    }
                }
            }));
            // The driving side.
            threads.push(thread::spawn(move || {
                let data = vec![7u8; msg];
                let mut back = vec![0u8; msg];
                let mut n = 0u64;
                let mut next = Instant::now();
                while Instant::now() < deadline {
                    if c.write_all(&data).is_err() {
                        break;
                    }
                    if w == Workload::W1 && c.read_exact(&mut back).is_err() {
                        break;
                    }
                    n += 1;
                    if let Some(iv) = per_conn_interval {
                        next += iv;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                }
                ops.fetch_add(n, Ordering::Relaxed);
                let _ = c.shutdown(Shutdown::Write);
                // Drain until the peer closes, so its last writes complete.
                let mut sink = [0u8; 4096];
                while matches!(c.read(&mut sink), Ok(k) if k > 0) {}
            }));
        }
        // Both sides close when the driver is done.
        for t in threads {
            let _ = t.join();
        }
        Outcome {
            ops: ops.load(Ordering::Relaxed),
            seconds: duration.as_secs_f64(),
        }
    }
}
