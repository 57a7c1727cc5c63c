//! Waiting for the BPF programs that are running to return.
//!
//! A program reads the control word once and then looks up the map keys it
//! names. A key taken out of a map right after a new control word went in
//! may still be looked up by a program that read the old word just before:
//! on another CPU, or preempted in the middle of a run. Updating an element
//! of a map of maps returns only after an RCU grace period, so that
//! userspace knows that no program still runs with the old value (the
//! kernel's `maybe_wait_bpf_programs`); the programs run inside RCU
//! read-side sections, so every run that had started has returned by then.
//! `program_barrier` in bpf/socktap.bpf.c is such a map, used for nothing
//! else.

use std::os::fd::{AsFd, AsRawFd};

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::ProbeError;

/// The map of maps whose update waits, and the map it holds.
pub(crate) struct ProgramBarrier {
    outer: MapHandle,
    inner: MapHandle,
}

impl ProgramBarrier {
    pub(crate) fn new(outer: MapHandle, inner: MapHandle) -> ProgramBarrier {
        ProgramBarrier { outer, inner }
    }

    /// Returns once every program run that had started when it was called
    /// has returned. Takes an RCU grace period: milliseconds, so never on a
    /// path that carries events.
    pub(crate) fn wait(&self) -> Result<(), ProbeError> {
        let inner = self.inner.as_fd().as_raw_fd() as u32;
        self.outer
            .update(&0u32.to_ne_bytes(), &inner.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| ProbeError::Setup(format!("waiting for running programs (program_barrier): {e:#}")))
    }
}
