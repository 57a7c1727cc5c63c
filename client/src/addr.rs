//! Where socktapd is, and connecting to it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use socktap_proto::v1::socktap_client::SocktapClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// socktapd's address: `host:port`, `http://host:port`, `https://host:port`
/// or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonAddr {
    /// Plain-text HTTP/2 or TLS, at this URI.
    Uri {
        /// The URI with its scheme.
        uri: String,
        /// Whether to use TLS (https://).
        tls: bool,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl FromStr for DaemonAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/socktap.sock".into());
            }
            return Ok(DaemonAddr::Unix(path.into()));
        }
        let (uri, tls) = if s.starts_with("https://") {
            (s.to_owned(), true)
        } else if s.starts_with("http://") {
            (s.to_owned(), false)
        } else if s.contains("://") {
            return Err(format!(
                "{s:?}: unsupported scheme (use host:port, http://, https:// or unix:/path)"
            ));
        } else {
            (format!("http://{s}"), false)
        };
        let parsed: Uri = uri.parse().map_err(|e| format!("{s:?} is not an address: {e}"))?;
        if parsed.host().is_none() || parsed.port_u16().is_none() {
            return Err(format!("{s:?} needs a host and a port, e.g. 127.0.0.1:50051"));
        }
        Ok(DaemonAddr::Uri { uri, tls })
    }
}

impl fmt::Display for DaemonAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonAddr::Uri { uri, .. } => f.write_str(uri.strip_prefix("http://").unwrap_or(uri)),
            DaemonAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to socktapd at {addr}: {cause}")]
pub struct ConnectError {
    /// The address tried.
    pub addr: DaemonAddr,
    /// The innermost cause (e.g. "Connection refused (os error 111)").
    pub cause: String,
}

/// TLS material for `https://` addresses, PEM encoded.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Trust this CA instead of the system's roots.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Present this certificate and key (for socktapd with mTLS).
    pub client_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

/// Connects to socktapd, trusting the system's roots for `https://`.
pub async fn connect(addr: &DaemonAddr) -> Result<SocktapClient<Channel>, ConnectError> {
    connect_with(addr, &ConnectOptions::default()).await
}

/// Connects to socktapd.
pub async fn connect_with(addr: &DaemonAddr, opts: &ConnectOptions) -> Result<SocktapClient<Channel>, ConnectError> {
    Ok(SocktapClient::new(channel_with(addr, opts).await?).max_decoding_message_size(64 << 20))
}

/// Opens an HTTP/2 channel to socktapd, for clients that call its methods
/// through their own codec (a benchmark that decodes only timestamps, say).
pub async fn channel_with(addr: &DaemonAddr, opts: &ConnectOptions) -> Result<Channel, ConnectError> {
    let fail = |e: &dyn std::error::Error| ConnectError {
        addr: addr.clone(),
        cause: root_cause(e),
    };
    let channel = match addr {
        DaemonAddr::Uri { uri, tls } => {
            let mut ep = windows(Endpoint::from_shared(uri.clone()).map_err(|e| fail(&e))?);
            if *tls {
                let mut tls = ClientTlsConfig::new();
                tls = match &opts.ca_cert_pem {
                    Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                    None => tls.with_native_roots(),
                };
                if let Some((cert, key)) = &opts.client_identity_pem {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                ep = ep.tls_config(tls).map_err(|e| fail(&e))?;
            }
            ep.connect().await.map_err(|e| fail(&e))?
        }
        DaemonAddr::Unix(path) => {
            let path = path.clone();
            // The URI is required but unused: the connector dials the socket.
            windows(Endpoint::from_static("http://socktapd.local"))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
                .await
                .map_err(|e| fail(&e))?
        }
    };
    Ok(channel)
}

/// Large HTTP/2 receive windows: event batches are large, and the default
/// 64 KiB would stall the stream on WINDOW_UPDATE round trips.
fn windows(ep: Endpoint) -> Endpoint {
    ep.initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
}

/// The innermost error's text: the part that says what actually happened.
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "127.0.0.1:50051".parse::<DaemonAddr>().unwrap(),
            DaemonAddr::Uri {
                uri: "http://127.0.0.1:50051".into(),
                tls: false
            }
        );
        assert_eq!(
            "https://host:443".parse::<DaemonAddr>().unwrap(),
            DaemonAddr::Uri {
                uri: "https://host:443".into(),
                tls: true
            }
        );
        assert_eq!(
            "unix:/run/s.sock".parse::<DaemonAddr>().unwrap(),
            DaemonAddr::Unix("/run/s.sock".into())
        );
        assert!("unix:".parse::<DaemonAddr>().is_err());
        assert!("ftp://x:1".parse::<DaemonAddr>().is_err());
        assert!("localhost".parse::<DaemonAddr>().is_err());
        assert_eq!("[::1]:5".parse::<DaemonAddr>().unwrap().to_string(), "[::1]:5");
    }
}
