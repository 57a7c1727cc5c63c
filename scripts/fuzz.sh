#!/usr/bin/env bash
# Property-based fuzzing of the three input boundaries (proptest; cargo-fuzz
# needs a nightly toolchain): the event-record decoder, the filter compiler
# and matcher, and WatchEvents request validation. Each target runs for
# MINUTES (default 10) in batches of fresh random cases; a failure is
# shrunk, printed, and its seed saved under proptest-regressions/, where it
# becomes a regression test of the normal test run (commit that file).
# Usage: scripts/fuzz.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
batch=${FUZZ_BATCH:-20000}
targets=(
  "event::tests::props::"
  "hub::filter::tests::props::"
  "service::validate::tests::props::"
)
cargo test --release --locked --lib --no-run >/dev/null 2>&1
for t in "${targets[@]}"; do
  end=$(( $(date +%s) + minutes * 60 ))
  runs=0
  while [ "$(date +%s)" -lt "$end" ]; do
    PROPTEST_CASES=$batch cargo test --release --locked --lib -q "$t" >/tmp/socktap-fuzz.log 2>&1 || {
      cat /tmp/socktap-fuzz.log
      echo "fuzz: $t FAILED after $runs batches; the seed is saved under proptest-regressions/" >&2
      exit 1
    }
    n=$(grep -o '[0-9]* passed' /tmp/socktap-fuzz.log | head -1 | cut -d' ' -f1)
    runs=$((runs + 1))
    tests_per_batch=${n:-0}
  done
  echo "fuzz: ${t%::} ${minutes} min: $runs batches x $tests_per_batch properties x $batch cases = $((runs * tests_per_batch * batch)) cases, no failure"
done
