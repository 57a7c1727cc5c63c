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

pub mod addr;
pub mod cli;
pub mod format;
pub mod top;

pub use addr::{channel_with, connect, connect_with, ConnectError, ConnectOptions, DaemonAddr};
/// The `socktap.v1` API types and client.
pub use socktap_proto::v1 as api;
