#!/usr/bin/env bash
# scripts/gpu-profile.sh — where a decode step's device time goes, kernel by kernel (on the GPU
# machine, from a repository copy with gpu-bundle/, after `scripts/gpu-check.sh bundle`).
#
#   GPU_CHECK_SHAPE=qwen2.5-0.5b scripts/gpu-profile.sh
#
# Runs `ferrite bench latency` (batch 1, 128-token prompt, 8 tokens, eagerly so that each
# kernel is its own launch) under Nsight Compute, reading only each kernel's duration
# (`gpu__time_duration.sum`, one pass, clocks left alone), then prints the last decode step's
# kernels (steps end at the sampling kernel) and the kernels' totals grouped by name. The raw
# CSV goes to $OUT/ncu.csv when OUT is set. Knobs: GPU_CHECK_SHAPE (scripts/make_bench_model.py
# shape, default qwen2.5-0.5b), GPU_PROFILE_MODEL (a model folder instead).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$root/gpu-bundle"
[[ -f $bundle/bin.tar.xz ]] || { echo "no $bundle/bin.tar.xz: run 'scripts/gpu-check.sh bundle' on a build machine" >&2; exit 2; }
work=$(mktemp -d)
out=${OUT:-$work}
python3 -m tarfile -e "$bundle/bin.tar.xz" "$work"
libs=$(python3 -c '
import nvidia, os
print(next(d for d in (os.path.join(p, "cu13", "lib") for p in nvidia.__path__)
           if os.path.exists(os.path.join(d, "libcublas.so.13"))))' 2>/dev/null) || true
[[ -n $libs ]] && export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
model=${GPU_PROFILE_MODEL:-}
if [[ -z $model ]]; then
    shape=${GPU_CHECK_SHAPE:-qwen2.5-0.5b}
    python3 "$root/scripts/make_bench_model.py" "$work/$shape" --shape "$shape" | tail -1
    model="$work/$shape"
fi
ncu=$(command -v ncu || find /opt/nvidia/nsight-compute -maxdepth 2 -name ncu -type f 2>/dev/null | head -1) || true
[[ -n $ncu ]] || { echo "no ncu on this machine" >&2; exit 2; }
"$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$work/bin/ferrite" bench latency --model "$model" --device cuda --input-len 128 --output-len 8 \
    --batch-size 1 --num-iters-warmup 0 --num-iters 1 --enforce-eager >"$out/ncu.csv" 2>"$work/bench.err" ||
    { tail -20 "$work/bench.err" "$out/ncu.csv"; exit 1; }
python3 - "$out/ncu.csv" <<'PY'
import csv, collections, sys
rows = []
with open(sys.argv[1]) as f:  # ncu's CSV rows start with a quote; the bench's lines do not
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r["Metric Unit"]]
    name = r["Kernel Name"].split("(")[0]
    rows.append((name, float(r["Metric Value"].replace(",", "")) * scale, r["Grid Size"], r["Block Size"]))
print(f"{len(rows)} kernels profiled")
steps, cur = [], []
for row in rows:
    cur.append(row)
    if row[0].startswith("sample_rows"):
        steps.append(cur)
        cur = []
print(f"{len(steps)} steps (ending at sample_rows); kernels per step: {[len(s) for s in steps]}")
if steps:
    last = steps[-1]
    total = sum(t for _, t, _, _ in last)
    print(f"\nlast step: {len(last)} kernels, {total:.1f} us of kernel time")
    by = collections.OrderedDict()
    for name, t, grid, block in last:
        e = by.setdefault(name, [0, 0.0, grid, block])
        e[0] += 1
        e[1] += t
    print(f"{'kernel':60} {'n':>4} {'total us':>9} {'mean us':>8}  grid / block")
    for name, (n, t, grid, block) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:60]:60} {n:4d} {t:9.1f} {t / n:8.2f}  {grid} / {block}")
PY
