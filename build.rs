//! Compiles `bpf/socktap.bpf.c` into a libbpf skeleton in `OUT_DIR`.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "bpf/socktap.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("socktap.skel.rs");
    SkeletonBuilder::new()
        .source(SRC)
        // v3: atomic fetch-and-add for the kernel sequence number.
        .clang_args(["-mcpu=v3", "-Wall", "-Ibpf"])
        .build_and_generate(&out)
        .unwrap_or_else(|e| panic!("building the BPF skeleton from {SRC} failed: {e:#}"));
    for f in ["bpf/socktap.bpf.c", "bpf/event.h", "bpf/kernel.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
}
