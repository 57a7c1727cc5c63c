//! The socktap client: the `socktap` command (watch, status, top) and a
//! small Rust library for talking to socktapd.
//!
//! It does not depend on libbpf: it builds where there is no clang and no
//! BPF.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use socktap_client::{api, connect, DaemonAddr};
//! let addr: DaemonAddr = "127.0.0.1:50051".parse()?;
//! let mut client = connect(&addr).await?;
//! let status = client.get_status(api::GetStatusRequest {}).await?.into_inner();
//! println!("attach mode {:?}", status.attach_mode());
//! # Ok(()) }
//! ```
//!
//! A pipeline subscribes with `WatchEvents`: the filters run in socktapd,
//! and every loss (kernel ring buffer full, this subscriber too slow) comes
//! in the stream, in its place, as a `LostEvents` notice.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use socktap_client::{api, connect, DaemonAddr};
//! use api::watch_events_response::Message;
//! let mut client = connect(&"127.0.0.1:50051".parse::<DaemonAddr>()?).await?;
//! let request = api::WatchEventsRequest {
//!     // Calls to port 443, except sshd's; deny wins over allow.
//!     allow: vec![api::EventFilter { remote_ports: vec![443], ..Default::default() }],
//!     deny: vec![api::EventFilter { comms: vec!["sshd".into()], ..Default::default() }],
//!     ..Default::default()
//! };
//! let mut stream = client.watch_events(request).await?.into_inner();
//! // None: socktapd ended the stream (it does so when it shuts down).
//! while let Some(response) = stream.message().await? {
//!     match response.message {
//!         Some(Message::Events(batch)) => {
//!             for e in batch.events {
//!                 println!("{} {} {:?} {} bytes", e.cookie, e.comm, e.kind(), e.bytes);
//!             }
//!         }
//!         Some(Message::Lost(l)) => eprintln!("lost {} events: {:?}", l.count, l.source()),
//!         None => {}
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod addr;
pub mod cgroups;
pub mod cli;
pub mod format;
pub mod resume;
pub mod top;

pub use addr::{channel_with, connect, connect_with, ConnectError, ConnectOptions, DaemonAddr};
/// The `socktap.v1` API types and client.
pub use socktap_proto::v1 as api;
