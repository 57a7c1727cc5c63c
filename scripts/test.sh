#!/usr/bin/env bash
# Runs every test:
#   1. cargo test: unit, unprivileged, and the tests that load BPF programs
#      into the running kernel (root: when not root, the test binaries run
#      through sudo; the build stays unprivileged);
#   2. the kernel matrix (tests/vm/matrix.sh): fentry and kprobe on Debian
#      kernels under QEMU;
#   3. contrib/socktapd.service through systemd-analyze verify;
#   4. the benchmark's smoke test (zero loss at a modest rate, every
#      configuration produces numbers; no timing is asserted).
# SOCKTAP_SKIP_VM=1 skips step 2 outside CI (with a printed reason).
# Usage: scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# iperf3: the byte-exactness test against a program we did not write;
# bpftrace: the benchmark's peer configuration; systemd: systemd-analyze,
# which checks contrib/socktapd.service; busybox-static: nc, run inside a
# cgroup by the cgroup path test (and the kernel matrix's VMs);
# python3-grpcio, python3-protobuf: the client on gRPC's C core
# (tests/interop_kernel.rs).
scripts/deps.sh iperf3 bpftrace systemd busybox-static python3-grpcio python3-protobuf

if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="sudo -E"
fi
cargo test --workspace --all-targets --locked "$@"

if [ "${SOCKTAP_SKIP_VM:-}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "SKIPPED kernel matrix: SOCKTAP_SKIP_VM=1"
else
  tests/vm/matrix.sh
fi

# The debug binaries the tests just built: no second build of the world.
cargo build --workspace --bins --locked

# The systemd unit: systemd-analyze checks every directive, with this
# build's socktapd in ExecStart. It only warns about unknown keys and bad
# values, so any output is a failure.
if command -v systemd-analyze >/dev/null; then
  unit_dir=$(mktemp -d)
  sed "s|/usr/local/bin/socktapd|$PWD/target/debug/socktapd|" contrib/socktapd.service >"$unit_dir/socktapd.service"
  verdict=$(systemd-analyze verify "$unit_dir/socktapd.service" 2>&1) || true
  rm -rf "$unit_dir"
  if [ -n "$verdict" ]; then
    echo "contrib/socktapd.service: $verdict" >&2
    exit 1
  fi
  echo "contrib/socktapd.service: systemd-analyze verify clean"
elif [ "${CI:-}" = true ]; then
  echo "systemd-analyze is missing: cannot check contrib/socktapd.service" >&2
  exit 1
else
  echo "SKIPPED systemd unit check: no systemd-analyze"
fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" target/debug/socktap-bench --quick --seconds 0.5
# The same smoke test with the subscribers on a unix socket, each on a
# thread of its own (W1, 1 subscriber and 16 full-copy ones).
"${sudo[@]}" target/debug/socktap-bench --quick --seconds 0.5 --transport unix --thread-per-subscriber \
  --workloads w1 --configs untraced,sub1,sub16-full --out target/bench/unix
