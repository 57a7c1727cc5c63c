#!/usr/bin/env bash
# Builds socktapd and the benchmark in release mode and runs it (as root:
# through sudo when not root). Prints a table, writes JSON under target/bench/.
# Usage: scripts/bench.sh [socktap-bench flags...]     e.g. scripts/bench.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh bpftrace
cargo build --release --locked --workspace --bins
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
exec "${sudo[@]}" target/release/socktap-bench "$@"
