#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repository root, with .gpu/ carried (../shared/tools/gpu-pack):
# every packed test binary with MILA_REQUIRE_CUDA=1 (all of them, not stopping at a failure), the CUDA parity
# runs, then compute-sanitizer memcheck and racecheck over the CUDA tests. Logs go to $OUT.
#   scripts/gpu-check.sh [tests] [parity] [sanitize] [bench] [train]   (default: the first three)
# Environment: LOGS (default $OUT), SAN_TOOLS (default "memcheck racecheck"), SAN_TIMEOUT, TRAIN_TIMEOUT.
set -uo pipefail
cd "$(dirname "$0")/.."
.gpu/unpack || exit 1
OUT=${OUT:-/tmp/out}; LOGS=${LOGS:-$OUT}; mkdir -p "$OUT" "$LOGS"
steps=${*:-tests parity sanitize}
export MILA_REQUIRE_CUDA=1
nvidia-smi -L
.gpu/bin/mila info
status=0
for step in $steps; do
  case $step in
  tests)
    for t in .gpu/tests/*; do
      echo "== ${t##*/}"
      timeout 300 "$t" --test-threads=4 >"$LOGS/test-${t##*/}.log" 2>&1
      rc=$?
      grep -E "^test result|FAILED|panicked|failures:" "$LOGS/test-${t##*/}.log" | head -20
      ((rc == 0)) || { status=1; echo "FAILED (rc $rc): ${t##*/}"; tail -40 "$LOGS/test-${t##*/}.log"; }
    done ;;
  parity)
    for f in fixtures/*.safetensors; do
      .gpu/bin/mila parity "$f" --device cuda --dtype f32 | tail -1 || status=1
      .gpu/bin/mila parity "$f" --device cuda --dtype f64 | tail -1 || status=1
    done ;;
  sanitize)
    for tool in ${SAN_TOOLS:-memcheck racecheck}; do
      for t in .gpu/tests/*; do
        # Only binaries holding CUDA tests; the filter 'cuda' selects them by name.
        n=$("$t" --list 2>/dev/null | grep -c 'cuda.*: test')
        ((n > 0)) || continue
        echo "== $tool ${t##*/} ($n tests)"
        # nvrtc_errors_carry_the_log asks the driver for a kernel that is not there, on purpose (the error path
        # under test): memcheck counts that refused API call as an error, so it is left out of this run.
        timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool $tool --print-limit 20 "$t" cuda --test-threads=1 --skip nvrtc_errors_carry_the_log >"$LOGS/$tool-${t##*/}.log" 2>&1
        echo "rc $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$LOGS/$tool-${t##*/}.log" | tail -3
      done
    done ;;
  bench)
    for b in ops vision scan; do
      .gpu/bin/mila bench $b --device cuda --json "$OUT/bench-$b.json" >"$OUT/bench-$b.log" 2>&1 || status=1
      cat "$OUT/bench-$b.log"
    done ;;
  train)
    timeout ${TRAIN_TIMEOUT:-300} .gpu/bin/mila bench train --device cuda --out /tmp/bench-train \
      --json "$OUT/bench-train.json" >"$OUT/bench-train.log" 2>&1 || status=1
    tail -30 "$OUT/bench-train.log" ;;
  esac
done
exit $status
