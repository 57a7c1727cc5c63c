//! socktapd against a client on another gRPC stack: Python's grpcio, on
//! gRPC's C core (`tests/interop/grpc_core_client.py`). Like grpcurl, the
//! client has no socktap .proto: it builds the messages from what the
//! server's reflection (v1alpha and v1) returns, then checks health,
//! GetStatus, a WatchEvents stream of its own connection (cookies from
//! SO_COOKIE, the exact sizes it sent) and INVALID_ARGUMENT for a bad CIDR,
//! over TCP, over a unix socket, and over mTLS with a bearer token. And `socktap watch -o json`'s lines,
//! its loss notices and `status -o json` are proto3 JSON as protobuf's own
//! implementation reads and prints it.
//! Needs root, and Debian's python3-grpcio and python3-protobuf
//! (scripts/test.sh installs them).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Runs the client against `addr` (with `more` arguments) and fails the
/// test with its output unless it passes.
fn client_passes_against(addr: &str, more: &[&str]) {
    let out = Command::new(PYTHON)
        .args([CLIENT, addr])
        .args(more)
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

/// The BPF slot when the test can run: BPF, and grpcio in the system
/// Python; otherwise `None`, having said why ([`bpf_available`]).
fn interop_available(test: &str) -> Option<BpfSlot> {
    bpf_available(test).filter(|_| grpcio_available())
}

/// The address socktapd's first line names ("... serving socktap.v1 on
/// 127.0.0.1:PORT ...").
fn address_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}

/// socktapd on a TCP port the kernel picks, and its address.
fn socktapd_on_tcp() -> (SocktapdChild, String) {
    let (daemon, line) = spawn_socktapd_serving(&["--listen", "127.0.0.1:0"]);
    (SocktapdChild::new(daemon), address_in(&line))
}

#[test]
fn a_grpc_core_client_works_from_reflection_alone() {
    let Some(_bpf) = interop_available("interop grpc-core") else {
        return;
    };
    let (daemon, addr) = socktapd_on_tcp();
    client_passes_against(&addr, &[]);
    daemon.stop();

    let dir = std::env::temp_dir().join(format!("socktap-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("unix:{}", dir.join("socktap.sock").display());
    let daemon = SocktapdChild::new(spawn_socktapd(&["--listen", &addr]));
    client_passes_against(&addr, &[]);
    daemon.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_grpc_core_client_over_mtls_with_a_token() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let Some(_bpf) = interop_available("interop grpc-core mTLS") else {
        return;
    };
    // A CA, socktapd's certificate (localhost, 127.0.0.1) and the client's.
    // Each with a name of its own: OpenSSL, under grpcio, takes a
    // certificate whose subject is its issuer's for self-issued.
    let named = |names: Vec<String>, common_name: &str| {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params
    };
    let mut ca_params = named(vec![], "socktap interop CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = named(names.clone(), &names[0]).signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let dir = std::env::temp_dir().join(format!("socktap-interop-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["socktap-interop".into()]);
    let ca_file = file("ca.pem", &ca.pem());
    let token = file("token", "s3cret-interop-token\n");
    let (server_cert, server_key) = (file("server.pem", &server_cert), file("server.key", &server_key));
    let (client_cert, client_key) = (file("client.pem", &client_cert), file("client.key", &client_key));

    let (daemon, line) = spawn_socktapd_serving(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &server_cert,
        "--tls-key",
        &server_key,
        "--tls-client-ca",
        &ca_file,
        "--auth-token-file",
        &token,
    ]);
    let daemon = SocktapdChild::new(daemon);
    client_passes_against(
        &address_in(&line),
        &["--tls", &ca_file, &client_cert, &client_key, "--token-file", &token],
    );
    daemon.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the socktap CLI in this process with `args` (after the program
/// name) to its end: its exit code, stdout and stderr.
async fn socktap(args: &[&str]) -> (i32, String, String) {
    let args = std::iter::once("socktap").chain(args.iter().copied()).map(Into::into);
    let cli = socktap_client::cli::parse(args, &mut std::io::stderr()).expect("valid arguments");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let rc = socktap_client::cli::run(cli, &mut out, &mut err).await;
    (rc, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

/// Checks with the grpcio client that each line of `text` is proto3 JSON of
/// `message`, as protobuf reads and prints it.
fn proto3_json_of(addr: &str, message: &str, text: &str) {
    let file = std::env::temp_dir().join(format!("socktap-interop-{}.jsonl", std::process::id()));
    std::fs::write(&file, text).unwrap();
    client_passes_against(addr, &["--json-lines", file.to_str().unwrap(), "--message", message]);
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_are_proto3_json_as_protobuf_itself_reads_and_prints_it() {
    let Some(_bpf) = interop_available("interop JSON lines") else {
        return;
    };
    let (daemon, addr) = socktapd_on_tcp();
    let (mut c, mut s) = tcp_pair(false);
    let cookies = [so_cookie(&c).to_string(), so_cookie(&s).to_string()];
    // The CLI in this process: --include-self keeps this test's own calls.
    let watch_json = ["--addr", &addr, "watch", "-o", "json", "--include-self"];
    let filters = ["--cookie", &cookies[0], "--cookie", &cookies[1], "--limit", "10"];
    let args: Vec<String> = [&watch_json[..], &filters]
        .concat()
        .into_iter()
        .map(String::from)
        .collect();
    let watch = tokio::spawn(async move { socktap(&args.iter().map(String::as_str).collect::<Vec<_>>()).await });
    let mut client = socktap_client::connect(&addr.parse().unwrap()).await.unwrap();
    // Subscribed, and the programs record (the gate opens for the first).
    for _ in 0..1000 {
        let status = client
            .get_status(socktap_client::api::GetStatusRequest {})
            .await
            .unwrap();
        let status = status.into_inner();
        if !status.subscribers.is_empty() && status.kernel_gate_open {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 5 sends and 5 receives.
    for n in [100usize, 2000, 37, 65536, 1] {
        c.write_all(&vec![7u8; n]).unwrap();
        s.read_exact(&mut vec![0u8; n]).unwrap();
    }
    let (rc, out, err) = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the watch ends after --limit 10")
        .unwrap();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out.lines().count(), 10, "{out}");
    proto3_json_of(&addr, "socktap.v1.Event", &out);

    // A loss notice, on stderr in JSON mode: a resume from another
    // instance starts with one (source RESTART), then the history.
    let resume = [
        "--resume-after",
        "1",
        "--resume-instance",
        "1",
        "--cookie",
        &cookies[0],
        "--limit",
        "1",
    ];
    let (rc, _, err) = socktap(&[&watch_json[..], &resume].concat()).await;
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("LOSS_SOURCE_RESTART"), "{err}");
    proto3_json_of(&addr, "socktap.v1.LostEvents", &err);

    // `socktap status -o json`: a duration (uptime), enums, maps.
    let (rc, out, err) = socktap(&["--addr", &addr, "status", "-o", "json"]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("\"uptime\""), "{out}");
    proto3_json_of(&addr, "socktap.v1.GetStatusResponse", &out);
    daemon.stop();
}
