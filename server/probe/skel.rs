//! The libbpf skeleton that `build.rs` generates from `bpf/socktap.bpf.c`.
#![allow(clippy::all, missing_docs, non_camel_case_types, unused_imports)]

include!(concat!(env!("OUT_DIR"), "/socktap.skel.rs"));

// SAFETY: the generated #[repr(C)] structs below hold only integers; every bit
// pattern is a valid value and bpf/event.h lays them out without padding, so
// they may be read from and written as raw map bytes.
unsafe impl plain::Plain for types::socktap_control {}
// SAFETY: as above.
unsafe impl plain::Plain for types::socktap_counters {}
// SAFETY: as above.
unsafe impl plain::Plain for types::socktap_want_key {}
