#!/usr/bin/env bash
# Issue 19's GPU work (throughput, then the deep-cut rows) in one call on a lent GPU machine, resumable across
# calls and sessions. See benchmarks/README.md, "Deep cuts on a GPU".
#
#   bash scripts/gpu_session.sh pack            here: .gpu/ = the CIFAR-10 JPEG copy (tar.gz, ~20 MB), the ResNet-56
#                                               weights, the results so far and the checkpoints of unfinished rows
#   bash scripts/gpu_session.sh run SECONDS     on the device machine (carry .gpu): throughput rows, then deep rows
#                                               (4 processes on the GPU) until SECONDS have passed; everything
#                                               (results, logs, checkpoints) is written under $OUT
#   bash scripts/gpu_session.sh merge DIR       here, DIR = the call's files_at: finished rows into
#                                               benchmarks/results ($CKA_BENCH_RESULTS when set), checkpoints
#                                               into benchmarks/.cache/deep
#
# Environment for run: STAGES (default "long-recipe long"), PROCS (default 4), THROUGHPUT (default 1: measure it),
# DEVICE (default cuda), BUDGET (replace every row's budget: a dry run of this script, e.g. on the CPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
case "${1:-}" in
pack)
  data=${CKA_PRUNE_DATA:-$root/../shared/data}
  rm -rf .gpu && mkdir -p .gpu/weights .gpu/ckpt .gpu/results
  tar czf .gpu/cifar10-jpeg.tgz -C "$data" cifar10-jpeg
  cp "$data/weights/resnet56-cifar10jpeg.th" "$data/weights/README.md" .gpu/weights/
  cp benchmarks/results/deep.json benchmarks/results/throughput.json .gpu/results/
  if [ -d benchmarks/.cache/deep ]; then cp -r benchmarks/.cache/deep/. .gpu/ckpt/; fi
  du -sh .gpu
  ;;
run)
  secs=${2:?usage: run SECONDS}
  out=${OUT:?run on the device machine, where \$OUT is the folder that comes back}
  [ -f .gpu/cifar10-jpeg.tgz ] || { echo "no .gpu/: run 'bash scripts/gpu_session.sh pack' here and carry .gpu" >&2; exit 2; }
  start=$(date +%s)
  data=/tmp/cka-data && mkdir -p "$data/weights"
  tar xzf .gpu/cifar10-jpeg.tgz -C "$data" && cp .gpu/weights/* "$data/weights/"
  export CKA_PRUNE_DATA=$data CKA_BENCH_RESULTS=$out/results PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p "$out/results" "$out/ckpt" "$out/logs"
  if [ -n "${BUDGET:-}" ]; then  # a dry run: its rows are not the benchmark's and must never be merged
    echo "rows on a budget of $BUDGET images" > "$out/DRY_RUN"
  else
    cp .gpu/results/*.json "$out/results/" && cp -r .gpu/ckpt/. "$out/ckpt/"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/logs/gpu.txt" || true
  if [ "${THROUGHPUT:-1}" = 1 ]; then
    python3 -m benchmarks.throughput --device cuda --batch-size 64 --compile > "$out/logs/throughput-b64.log" 2>&1 || true
    python3 -m benchmarks.throughput --device cuda --batch-size 512 > "$out/logs/throughput-b512.log" 2>&1 || true
  fi
  # rows start only while a third of the time is left; a row still running at the end is stopped and goes on
  # from its checkpoint (written at most every 30 s) in the next call
  until=$(( start + secs - secs / 3 ))
  for stage in ${STAGES:-long-recipe long}; do
    pids=()
    for i in $(seq "${PROCS:-4}"); do
      python3 -m benchmarks.deep --stage "$stage" --device "${DEVICE:-cuda}" ${BUDGET:+--budget "$BUDGET"} --until "$until" --checkpoints "$out/ckpt" \
        > "$out/logs/deep-$stage-$i.log" 2>&1 & pids+=($!)
    done
    left=$(( start + secs - $(date +%s) ))
    if [ "$left" -le 5 ]; then kill "${pids[@]}" 2>/dev/null || true; break; fi
    ( sleep "$left"; kill -TERM "${pids[@]}" 2>/dev/null || true ) & watchdog=$!
    wait "${pids[@]}" || true
    kill "$watchdog" 2>/dev/null || true
  done
  rm -rf "$out/results/.claims"
  python3 -m benchmarks.deep --list --stage all > "$out/logs/rows.txt" 2>&1 || true
  ;;
merge)
  dir=${2:?usage: merge DIR}
  if [ -f "$dir/DRY_RUN" ]; then echo "$dir holds a dry run ($(cat "$dir/DRY_RUN")): not merged" >&2; exit 2; fi
  python3 - "$dir" <<'PY'
import sys
from pathlib import Path
from benchmarks.common import RowStore, load_rows  # the results folder: $CKA_BENCH_RESULTS or benchmarks/results
for name in ("deep.json", "throughput.json"):
    store, came_back = RowStore(name), load_rows(Path(sys.argv[1]) / "results" / name)["rows"]
    known = {r["id"]: r for r in store.load()["rows"]}
    new = [r for r in came_back if known.get(r["id"]) != r]
    for row in new:
        store.save(row)
    print(f"{name}: {len(new)} new or changed rows")
PY
  if [ -d "$dir/ckpt" ]; then mkdir -p benchmarks/.cache/deep && cp -r "$dir/ckpt/." benchmarks/.cache/deep/; fi
  python3 -m benchmarks.deep --write && python3 -m benchmarks.deep --list --stage all | grep -c todo || true
  ;;
*)
  echo "usage: bash scripts/gpu_session.sh pack | run SECONDS | merge DIR" >&2; exit 2
  ;;
esac
