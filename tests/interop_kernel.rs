//! socktapd against a client on another gRPC stack: Python's grpcio, on
//! gRPC's C core (`tests/interop/grpc_core_client.py`). Like grpcurl, the
//! client has no socktap .proto: it builds the messages from what the
//! server's reflection (v1alpha and v1) returns, then checks health,
//! GetStatus, a WatchEvents stream of its own connection (cookies from
//! SO_COOKIE, the exact sizes it sent) and INVALID_ARGUMENT for a bad CIDR.
//! Over TCP and over a unix socket. Needs root, and Debian's python3-grpcio
//! and python3-protobuf (scripts/test.sh installs them).

mod common;

use std::process::{Command, Stdio};

use common::*;

const PYTHON: &str = "/usr/bin/python3";
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/grpc_core_client.py");

/// Whether the system Python has grpcio and protobuf: skips the test with a
/// printed reason when not (under CI=true it fails it).
fn grpcio_available() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import grpc, google.protobuf"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match ok {
        true => true,
        false if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{PYTHON} lacks grpcio or protobuf (python3-grpcio, python3-protobuf), and CI=true")
        }
        false => {
            eprintln!("SKIPPED interop: {PYTHON} lacks grpcio or protobuf (scripts/test.sh installs python3-grpcio and python3-protobuf)");
            false
        }
    }
}

/// Runs the client against `addr` and fails the test with its output
/// unless it passes.
fn client_passes_against(addr: &str) {
    let out = Command::new(PYTHON)
        .args([CLIENT, addr])
        .output()
        .expect("run the grpcio client");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("grpcio client against {addr}:\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the grpcio client failed against {addr}: {stderr}"
    );
    assert!(stdout.contains("grpc_core_client: ok"), "{stdout}");
}

#[test]
fn a_grpc_core_client_works_from_reflection_alone() {
    let Some(_bpf) = bpf_available("interop grpc-core") else {
        return;
    };
    if !grpcio_available() {
        return;
    }
    // TCP, on a port the kernel picks; the first line names it.
    let (daemon, line) = spawn_socktapd_serving(&["--listen", "127.0.0.1:0"]);
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    client_passes_against(&addr);
    stop_socktapd(daemon);

    let dir = std::env::temp_dir().join(format!("socktap-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("socktap.sock");
    let addr = format!("unix:{}", socket.display());
    let daemon = spawn_socktapd(&["--listen", &addr]);
    client_passes_against(&addr);
    stop_socktapd(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
