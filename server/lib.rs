//! socktap: per-socket TCP telemetry.
//!
//! The crate is laid out along the data path:
//! - [`probe`]: loads the BPF program (`bpf/`) in the best attach mode the
//!   kernel allows and reads its ring buffer on a thread of its own;
//! - [`event`]: the decoded event record.
//!
//! Embedding the probe without gRPC:
//! ```no_run
//! let mut probe = socktap::probe::Probe::start(Default::default()).unwrap();
//! let mut batches = probe.take_receiver().unwrap();
//! while let Some(batch) = batches.blocking_recv() {
//!     for e in &batch.events {
//!         println!("{} {:?} {} bytes", e.cookie, e.kind, e.bytes);
//!     }
//! }
//! ```

pub mod convert;
pub mod daemon;
pub mod event;
pub mod hub;
pub mod metrics;
pub mod mounts;
pub mod priority;
pub mod privileges;
pub mod probe;
pub mod service;
