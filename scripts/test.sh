#!/usr/bin/env bash
# Runs every test: unit, unprivileged, and the ones that load BPF programs
# into the running kernel. Those need root: when not root, the test binaries
# are run through sudo (the build stays unprivileged).
# Usage: scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# iperf3: the byte-exactness test against a program we did not write.
scripts/deps.sh iperf3

if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="sudo -E"
fi
cargo test --workspace --all-targets --locked "$@"
