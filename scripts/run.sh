#!/usr/bin/env bash
# The main job: installs what is missing, builds in release mode, starts
# socktapd (through sudo when not root) and shows live events until Ctrl-C,
# which stops both.
# Usage: scripts/run.sh [socktapd flags...]     e.g. scripts/run.sh --mode tracepoint
# Environment: SOCKTAP_ADDR (default 127.0.0.1:50051), WATCH_ARGS (flags for
# `socktap watch`, e.g. WATCH_ARGS="--comm curl").
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release --locked --workspace --bins

addr=${SOCKTAP_ADDR:-127.0.0.1:50051}
export SOCKTAP_ADDR=$addr
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

"${sudo[@]}" target/release/socktapd --listen "$addr" "$@" &
daemon=$!
stop() {
  trap - EXIT INT TERM
  kill -TERM "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
}
trap stop EXIT INT TERM

for _ in $(seq 100); do
  target/release/socktap status >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { wait "$daemon"; exit 1; }
  sleep 0.1
done
target/release/socktap status
echo "-- live TCP events (try: curl -s http://example.com in another terminal); Ctrl-C stops --"
# shellcheck disable=SC2086 # WATCH_ARGS is a list of flags
target/release/socktap watch ${WATCH_ARGS:-} || true
