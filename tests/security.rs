//! Security and limits of the gRPC server: bearer token, TLS and mTLS with
//! certificates made at test time, unix socket permissions, request size.
//! No privileges needed (a synthetic event source).

mod common;

use common::TestDaemon;
use socktap::daemon::{ListenAddr, Listener, ServeOptions, TlsOptions};
use socktap::hub::{Hub, HubConfig, Source};
use socktap_client::{connect_with, ConnectOptions, DaemonAddr};
use socktap_proto::v1 as pb;
use tonic::Code;

fn hub() -> Hub {
    Hub::new(HubConfig::default(), Source::default())
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn a_bearer_token_is_required_when_configured() {
    let d = TestDaemon::start_with(
        hub(),
        ServeOptions {
            auth_token: Some("s3cret".into()),
            ..Default::default()
        },
    )
    .await;
    let mut c = d.client().await;
    let err = c.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token");
    let err = c
        .get_status(authed(pb::GetStatusRequest {}, "wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "wrong token");
    let err = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "streams too");
    let cgroups = || pb::GetCgroupPathsRequest { cgroup_ids: vec![1] };
    let err = c.get_cgroup_paths(cgroups()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "cgroup paths too");
    let named = c.get_cgroup_paths(authed(cgroups(), "s3cret")).await;
    assert!(
        !named.is_err_and(|s| s.code() == Code::Unauthenticated),
        "cgroup paths with the right token"
    );
    c.get_status(authed(pb::GetStatusRequest {}, "s3cret"))
        .await
        .expect("the right token");

    // Health stays open for probes.
    let channel = tonic::transport::Endpoint::from_shared(d.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health without token");

    // The CLI: --token-file, and a clear failure without it.
    let dir = std::env::temp_dir().join(format!("socktap-sec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let addr = d.url.trim_start_matches("http://").to_owned();
    let run = |args: Vec<String>| async move {
        let cli = socktap_client::cli::parse(args.into_iter().map(Into::into), &mut std::io::stderr()).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = socktap_client::cli::run(cli, &mut out, &mut err).await;
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    };
    let (code, out, _) = run(vec![
        "socktap".into(),
        "--addr".into(),
        addr.clone(),
        "--token-file".into(),
        token.display().to_string(),
        "status".into(),
    ])
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("socktapd"), "{out}");
    let (code, _, err) = run(vec!["socktap".into(), "--addr".into(), addr, "status".into()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("Unauthenticated") && err.contains("bearer token"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    d.stop().await;
}

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    other_client: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, issuer: &rcgen::Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf(vec!["localhost".into(), "127.0.0.1".into()], &ca);
    let client = leaf(vec!["socktap-client".into()], &ca);
    // A client certificate from a CA socktapd does not trust.
    let mut rogue_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    rogue_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let rogue = CertifiedIssuer::self_signed(rogue_params, KeyPair::generate().unwrap()).unwrap();
    let other_client = leaf(vec!["intruder".into()], &rogue);
    Pki {
        ca: ca.pem(),
        server,
        client,
        other_client,
    }
}

async fn status_over(url: &str, opts: &ConnectOptions) -> Result<pb::GetStatusResponse, String> {
    let addr: DaemonAddr = url.parse().unwrap();
    let mut c = connect_with(&addr, opts).await.map_err(|e| e.to_string())?;
    c.get_status(pb::GetStatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

/// A daemon serving TLS with the PKI's server certificate; with
/// `client_ca`, clients must present a certificate signed by it (mTLS).
async fn tls_daemon(p: &Pki, client_ca: Option<&str>) -> TestDaemon {
    let tls = TlsOptions {
        cert_pem: p.server.0.clone().into_bytes(),
        key_pem: p.server.1.clone().into_bytes(),
        client_ca_pem: client_ca.map(|ca| ca.as_bytes().to_vec()),
    };
    TestDaemon::start_with(
        hub(),
        ServeOptions {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_trusted_certificate() {
    let p = pki();
    let d = tls_daemon(&p, Some(&p.ca)).await;
    let trusted = |id: &(String, String)| ConnectOptions {
        ca_cert_pem: Some(p.ca.clone().into_bytes()),
        client_identity_pem: Some((id.0.clone().into_bytes(), id.1.clone().into_bytes())),
    };
    status_over(&d.url, &trusted(&p.client))
        .await
        .expect("a client with a certificate from the CA");
    let no_cert = ConnectOptions {
        ca_cert_pem: Some(p.ca.clone().into_bytes()),
        client_identity_pem: None,
    };
    assert!(status_over(&d.url, &no_cert).await.is_err(), "no client certificate");
    assert!(
        status_over(&d.url, &trusted(&p.other_client)).await.is_err(),
        "a certificate from another CA"
    );
    let plain = d.url.replace("https://", "http://");
    assert!(
        status_over(&plain, &ConnectOptions::default()).await.is_err(),
        "plain text to a TLS server"
    );
    d.stop().await;
}

#[tokio::test]
async fn tls_without_client_certificates() {
    let p = pki();
    let d = tls_daemon(&p, None).await;
    let opts = ConnectOptions {
        ca_cert_pem: Some(p.ca.into_bytes()),
        client_identity_pem: None,
    };
    status_over(&d.url, &opts).await.expect("TLS with the CA trusted");
    assert!(
        status_over(&d.url, &ConnectOptions::default()).await.is_err(),
        "the system roots do not trust the test CA"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_unix_socket_gets_mode_0660_and_its_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::env::temp_dir().join(format!("socktap-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("socktapd.sock");
    // root may give the socket to another group; others only to their own.
    let gid = if nix::unistd::geteuid().is_root() {
        1
    } else {
        nix::unistd::getegid().as_raw()
    };
    let l = Listener::bind_with(&ListenAddr::Unix(path.clone()), Some(gid))
        .await
        .unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    drop(l);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_live_unix_socket_is_never_taken_over() {
    let dir = std::env::temp_dir().join(format!("socktap-unix-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("socktapd.sock");
    let addr = ListenAddr::Unix(path.clone());
    let reachable = || std::os::unix::net::UnixStream::connect(&path).is_ok();

    // A socket file that nothing answers on (its process died) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(!reachable());
    let first = Listener::bind(&addr).await.expect("a stale socket file is replaced");
    assert!(reachable());

    // One that accepts connections is left alone: a second daemon on the
    // same path is refused, and the first stays reachable.
    let refused = Listener::bind(&addr).await.err().expect("a live socket is refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse, "{refused}");
    assert!(reachable(), "the first listener is still reachable");

    // A listener removes its file when it goes, but only while the file
    // is still its own.
    std::fs::remove_file(&path).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(first);
    assert!(reachable(), "another server's socket file stays");
    drop(other);
    std::fs::remove_file(&path).unwrap();
    let l = Listener::bind(&addr).await.unwrap();
    drop(l);
    assert!(!path.exists(), "a dropped listener's file is removed");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_oversized_request_is_refused_naming_the_limit() {
    let (h, _tx) = (hub(), ());
    let d = TestDaemon::start_with(
        h.clone(),
        ServeOptions {
            max_request_bytes: 4096,
            ..Default::default()
        },
    )
    .await;
    let mut c = d.client().await;
    let big = pb::WatchEventsRequest {
        allow: vec![pb::EventFilter {
            comm_prefixes: vec!["x".repeat(15); 1000],
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = c.watch_events(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("max_request_bytes: ") && err.message().contains("4096"),
        "names the limit: {}",
        err.message()
    );
    assert_eq!(h.subscriber_count(), 0);
    c.get_status(pb::GetStatusRequest {})
        .await
        .expect("the server carries on");
    d.stop().await;
}

#[tokio::test]
async fn garbage_on_the_wire_costs_nothing_lasting() {
    use tokio::io::AsyncWriteExt;
    let h = hub();
    let d = TestDaemon::start(h.clone()).await;
    let addr = d.url.trim_start_matches("http://").to_owned();
    let junk: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect(),
        // A valid HTTP/2 preface, then a frame header claiming 16 MB.
        [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
            &[0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 1],
        ]
        .concat(),
        Vec::new(),
    ];
    for j in &junk {
        for _ in 0..20 {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let _ = s.write_all(j).await;
            drop(s);
        }
    }
    let st = d
        .client()
        .await
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("still serving");
    assert_eq!(st.into_inner().subscribers.len(), 0);
    d.stop().await;
}

/// Relays one TCP connection until `freeze` is set; then holds both sockets
/// open and forwards nothing, like a peer whose host vanished.
async fn freezable_relay(target: String, freeze: tokio::sync::watch::Receiver<bool>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        for (mut r, mut w) in [(cr, sw), (sr, cw)] {
            let mut freeze = freeze.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 65536];
                loop {
                    tokio::select! {
                        n = r.read(&mut buf) => match n {
                            Ok(0) | Err(_) => return,
                            Ok(n) => if w.write_all(&buf[..n]).await.is_err() { return },
                        },
                        _ = async {
                            while !*freeze.borrow_and_update() {
                                if freeze.changed().await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            }
                        } => {
                            // Hold both halves open (the task owns them) forever,
                            // forwarding nothing.
                            std::future::pending::<()>().await;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_client_that_vanishes_is_dropped_by_keepalive() {
    let h = hub();
    let opts = ServeOptions {
        keepalive_interval: std::time::Duration::from_secs(1),
        keepalive_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let d = TestDaemon::start_with(h.clone(), opts).await;
    let (freeze_tx, freeze_rx) = tokio::sync::watch::channel(false);
    let relay = freezable_relay(d.url.trim_start_matches("http://").to_owned(), freeze_rx).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{relay}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::socktap_client::SocktapClient::new(channel);
    let _stream = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap();
    assert_eq!(h.subscriber_count(), 1);
    freeze_tx.send(true).unwrap();
    // The client's process still holds the stream, but its host is gone.
    let start = std::time::Instant::now();
    while h.subscriber_count() > 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "keepalive never dropped the vanished client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "vanished client dropped after {:?} (keepalive 1 s + timeout 1 s)",
        start.elapsed()
    );
    d.stop().await;
}
