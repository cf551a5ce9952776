#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repository root: times one `mila bench models` workload with
# several builds of `mila`, alternating them round by round so that drifts of the machine fall on all alike.
#   scripts/ab-step.sh [-w WORKLOAD] [-r ROUNDS] [-n REPS] [-d DEVICE] [-q] NAME=PATH [NAME=PATH ...]
# e.g. scripts/ab-step.sh main=.gpu/bin/mila tap=.gpu/mila_tap   (default workload mlla_t_train_fp32, 2 rounds,
# 10 repetitions, device cuda; -q: the benches' --quick sizes, for a smoke run on the CPU). Prints one line per
# run: round, name, the bench's line (median ms, peak MiB).
set -uo pipefail
workload=mlla_t_train_fp32 rounds=2 reps=10 device=cuda quick=
while getopts "w:r:n:d:q" o; do
  case $o in
  w) workload=$OPTARG ;;
  r) rounds=$OPTARG ;;
  n) reps=$OPTARG ;;
  d) device=$OPTARG ;;
  q) quick=--quick ;;
  *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# > 0)) || { echo "usage: $0 [-w WORKLOAD] [-r ROUNDS] [-n REPS] [-d DEVICE] [-q] NAME=PATH ..." >&2; exit 2; }
status=0
for ((r = 1; r <= rounds; r++)); do
  for pair in "$@"; do
    name=${pair%%=*} bin=${pair#*=}
    line=$("$bin" bench models --device "$device" $quick --only "$workload" --reps "$reps" --warmup 2 2>&1 | grep "^$workload")
    [[ -n $line ]] || { status=1; line="(no result)"; }
    echo "round $r  $name  $line"
  done
done
exit $status
