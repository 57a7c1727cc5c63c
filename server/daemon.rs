//! socktapd's serving side: the listener (loopback TCP or a unix socket),
//! the Socktap service, gRPC health and server reflection (v1 and v1alpha),
//! and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use socktap_proto::wire::socktap_server::SocktapServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::hub::Hub;
use crate::service::SocktapService;

/// Where socktapd listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, e.g. 127.0.0.1:50051.
    Tcp(SocketAddr),
    /// A unix socket path (`unix:/run/socktap.sock`).
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/socktap.sock".into());
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{s:?} is neither host:port (e.g. 127.0.0.1:50051) nor unix:/path"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener, ready to serve.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket; its file is removed when the listener is dropped or
    /// served out.
    Unix(UnixListener, SocketFile),
}

/// The file of a unix socket this process bound: its path, and the inode
/// and birth time it got, so that it is removed only while it is still
/// this process's (after someone removed it, another server may have bound
/// the path again, possibly getting the freed inode number back).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: Option<FileId>,
}

type FileId = (u64, u64, Option<std::time::SystemTime>);

impl SocketFile {
    fn identity(path: &std::path::Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.created().ok()))
    }
}

impl Drop for SocketFile {
    /// Removes the file if it is still the socket this process bound.
    fn drop(&mut self) {
        if self.id.is_some() && Self::identity(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Clears the way for a unix socket at `path`: a socket file that nothing
/// answers on (left by a process that died) is removed; one that accepts a
/// connection belongs to a live server and is left alone (AddrInUse), as
/// is anything that is not a socket.
fn clear_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Ok(()); // bind reports AddrInUse and the file stays
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is serving on this socket",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

impl Listener {
    /// Binds `addr`. A unix socket gets mode 0660 and, when given, the
    /// group `unix_group` (so members of that group may connect); a stale
    /// socket file is replaced.
    pub async fn bind_with(addr: &ListenAddr, unix_group: Option<u32>) -> std::io::Result<Listener> {
        let l = Self::bind(addr).await?;
        if let Listener::Unix(_, file) = &l {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(0o660))?;
            if let Some(gid) = unix_group {
                std::os::unix::fs::chown(&file.path, None, Some(gid))?;
            }
        }
        Ok(l)
    }

    /// Binds `addr`. A stale unix socket file (nothing accepts on it) is
    /// replaced; a live one is refused with AddrInUse.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                clear_stale_socket(p)?;
                let listener = UnixListener::bind(p)?;
                let file = SocketFile {
                    path: p.clone(),
                    id: SocketFile::identity(p),
                };
                Ok(Listener::Unix(listener, file))
            }
        }
    }

    /// The address actually bound (the port chosen for :0).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(ListenAddr::Tcp)
                .unwrap_or(ListenAddr::Tcp(([0, 0, 0, 0], 0).into())),
            Listener::Unix(_, file) => ListenAddr::Unix(file.path.clone()),
        }
    }
}

/// TLS material, PEM encoded.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// The server's certificate chain.
    pub cert_pem: Vec<u8>,
    /// The server's private key.
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl TlsOptions {
    fn server_config(&self) -> ServerTlsConfig {
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
        }
        cfg
    }

    /// Parses the certificates and key as serving would, so that bad
    /// material is refused at start rather than once everything is loaded.
    pub fn validate(&self) -> Result<(), ServeError> {
        Server::builder()
            .tls_config(self.server_config())
            .map(drop)
            .map_err(ServeError::Tls)
    }
}

/// Security and limits of the gRPC server.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// When set, Socktap RPCs need `authorization: Bearer <token>`; others
    /// get UNAUTHENTICATED. Health and reflection stay open.
    pub auth_token: Option<String>,
    /// TLS (and mTLS) when set; plain-text HTTP/2 otherwise.
    pub tls: Option<TlsOptions>,
    /// HTTP/2 PING interval, so that vanished clients are noticed.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            auth_token: None,
            tls: None,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_request_bytes: 1 << 20,
            max_streams_per_connection: 64,
        }
    }
}

/// Compares a request's `authorization` header with the expected bearer
/// token in constant time.
fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let expected = format!("Bearer {token}");
    let Some(got) = header else { return false };
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Building the reflection service failed.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS certificates or key were rejected.
    #[error("TLS certificate or key rejected")]
    Tls(#[source] tonic::transport::Error),
    /// The transport failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// HTTP/2 flow-control window per stream, in bytes.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window per connection, in bytes.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// How long shutdown waits for clients to close their connections (a health
/// Watch stream, for one, never ends by itself) before dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves the API on `listener` until `shutdown` completes. Then health
/// turns NOT_SERVING, every event stream ends (status OK) and the server
/// drains for at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    hub: Hub,
    listener: Listener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SocktapServer<SocktapService>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(socktap_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(socktap_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut builder = Server::builder()
        // Event batches are large: HTTP/2's default 64 KiB windows would
        // stall each stream on WINDOW_UPDATE round trips.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .max_concurrent_streams(opts.max_streams_per_connection);
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.server_config()).map_err(ServeError::Tls)?;
    }
    let socktap = SocktapServer::new(SocktapService::with_max_request_bytes(
        hub.clone(),
        opts.max_request_bytes,
    ))
    // The service answers RESOURCE_EXHAUSTED over the limit; the decoder
    // only bounds memory, far above it (OUT_OF_RANGE past that).
    .max_decoding_message_size(opts.max_request_bytes.saturating_mul(16).max(4 << 20));
    let token = opts.auth_token.clone();
    let socktap = InterceptedService::new(socktap, move |req: tonic::Request<()>| match &token {
        None => Ok(req),
        Some(t) if authorized(req.metadata().get("authorization").map(|v| v.as_bytes()), t) => Ok(req),
        Some(_) => Err(tonic::Status::unauthenticated(
            "missing or wrong bearer token (authorization: Bearer <token>)",
        )),
    });
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(socktap);

    let hub_for_shutdown = hub.clone();
    let triggered = Arc::new(Notify::new());
    let trigger = triggered.clone();
    let on_shutdown = async move {
        shutdown.await;
        trigger.notify_one();
        info!("shutting down: ending streams");
        health.set_not_serving::<SocktapServer<SocktapService>>().await;
        health.set_service_status("", ServingStatus::NotServing).await;
        hub_for_shutdown.shutdown();
    };
    let grace_expired = async move {
        triggered.notified().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        warn!("clients still connected after {SHUTDOWN_GRACE:?}: closing their connections");
    };
    let served = match listener {
        Listener::Tcp(l) => {
            info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving");
            // TCP_NODELAY: a stream's frames go out as soon as they are
            // written; with Nagle, a small batch behind an unacknowledged
            // one waited for the peer's delayed ACK (tens of ms).
            let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
            let serving = router.serve_with_incoming_shutdown(incoming, on_shutdown);
            with_grace(serving, grace_expired).await
        }
        Listener::Unix(l, file) => {
            info!(path = %file.path.display(), "serving");
            let serving = router.serve_with_incoming_shutdown(UnixListenerStream::new(l), on_shutdown);
            let served = with_grace(serving, grace_expired).await;
            drop(file); // the socket file goes once nothing is served on it
            served
        }
    };
    Ok(served?)
}

async fn with_grace<T: Default>(
    serving: impl Future<Output = Result<T, tonic::transport::Error>>,
    grace_expired: impl Future<Output = ()>,
) -> Result<T, tonic::transport::Error> {
    tokio::select! {
        r = serving => r,
        _ = grace_expired => Ok(T::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_must_match_exactly() {
        assert!(authorized(Some(b"Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3creT"), "s3cret"));
        assert!(!authorized(Some(b"s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
