//! `socktapd --realtime-priority N`: the runtime's workers run at
//! `SCHED_FIFO` N and no other thread does (the blocking threads that
//! answer GetStatus stay ordinary), events flow with the socket's cookie
//! and exact bytes, and GetStatus names the worker that reads. Needs root.

mod common;

use common::*;
use socktap_client::DaemonAddr;

/// Each thread of `pid`: its name, scheduling policy and real-time
/// priority, from /proc.
fn threads(pid: u32) -> Vec<(u32, String, u32, u32)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.unwrap().path();
            let tid = t.file_name()?.to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            // After the name, state is field 3: rt_priority is field 40,
            // policy field 41.
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some((tid, name, fields[38].parse().ok()?, fields[37].parse().ok()?))
        })
        .collect()
}

/// socktapd, stopped when dropped: also when an assertion fails.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_priority_puts_the_workers_and_nothing_else_at_sched_fifo() {
    let Some(_bpf) = bpf_available("realtime") else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = Daemon(spawn_socktapd(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--realtime-priority",
        "2",
        "--worker-threads",
        "2",
    ]));
    let pid = daemon.0.id();

    // Events flow: a subscriber gets a socket's exact bytes.
    // (Its GetStatus calls run on a blocking thread, which a worker creates.)
    let addr: DaemonAddr = format!("127.0.0.1:{port}").parse().unwrap();
    a_subscriber_gets_exact_bytes(&addr, 777).await;

    let all = threads(pid);
    let fifo: Vec<_> = all.iter().filter(|t| t.2 == libc::SCHED_FIFO as u32).collect();
    assert_eq!(fifo.len(), 2, "the two workers, nothing else: {all:?}");
    assert!(
        fifo.iter().all(|t| t.1 == "tokio-rt-worker" && t.3 == 2),
        "workers at priority 2: {all:?}"
    );
    assert!(
        all.iter()
            .any(|t| t.1 == "tokio-rt-worker" && t.2 == libc::SCHED_OTHER as u32),
        "a blocking thread (GetStatus's), ordinary: {all:?}"
    );
    let main = all.iter().find(|t| t.0 == pid).unwrap();
    assert_eq!(main.2, libc::SCHED_OTHER as u32, "the main thread is ordinary: {all:?}");

    // GetStatus says so: at this low rate a worker reads, woken by the kernel.
    // (The reading moves to the runtime after the reader thread's first
    // pass, which delivered the event: the move may just be under way.)
    let mut client = socktap_client::connect(&addr).await.unwrap();
    let mut reader = None;
    for _ in 0..200 {
        let st = client
            .get_status(socktap_client::api::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        reader = st.reader;
        if reader.as_ref().is_some_and(|r| r.on_runtime) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let reader = reader.expect("a kernel probe's reader");
    assert!(reader.on_runtime && !reader.drains_on_timer, "{reader:?}");
    assert!(
        fifo.iter().any(|t| t.0 == reader.thread_id),
        "the reader is a worker: {reader:?}, {all:?}"
    );
    assert_eq!(reader.realtime_priority, 2, "{reader:?}");

    // SAFETY: FFI; signals our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success(), "clean exit");
}
