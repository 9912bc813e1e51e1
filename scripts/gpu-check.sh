#!/usr/bin/env bash
# scripts/gpu-check.sh — verify ferrite's CUDA build on a GPU machine.
#
#   scripts/gpu-check.sh bundle   # here (Rust, no GPU): build the cuda feature's server and GPU
#                                 # test binaries into gpu-bundle/ (compressed, to carry)
#   scripts/gpu-check.sh run      # there (a GPU, no Rust): unpack and run, from the repo root
#
# `run` executes, each on CUDA device 0, and prints one summary table:
#   - cuda_ops: every CUDA op against its CPU reference (random shapes, poisoned outputs);
#   - parity: the fixtures' transformers references in f32 (within 1e-3 on a GPU);
#   - cuda_graphs: decode steps replayed from CUDA graphs against the eager pass, bit for bit;
#   - half_precision: bf16 and f16 within what their mantissas allow;
#   - the server on the GPU: requests until /metrics shows NVML energy charged to them (5 s at most);
#   - `ferrite bench latency` (batch 1: 128 and 2048-token prefills, 128+128) and `bench
#     throughput` (64 and 256 sequences), each with CUDA graphs and with `--enforce-eager`
#     (same machine, alternated), on the qwen3 fixture, on a random model of the shape
#     $GPU_CHECK_SHAPE (scripts/make_bench_model.py, e.g. qwen2.5-0.5b) made there, with the
#     card's copy bandwidth, and on $GPU_CHECK_MODEL (a local model folder) when set;
#   - the paged-attention benchmark (crates/ferrite-engine/benches/attention.rs) in bf16, and
#     the layer-products benchmark (benches/linear.rs: cuBLAS at 1, 16 and 256 tokens, and the
#     host's cost of one small op).
# Logs, bench JSON and summary.txt go to $OUT when set.
# Knobs: CUDA_COMPUTE_CAP (bundle; default 90 = H100/H200), GPU_CHECK_SHAPE, GPU_CHECK_MODEL,
# GPU_CHECK_BENCHES (run; the criterion benches to run, default "attention linear").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$root/gpu-bundle"
cd "$root"

bundle() {
    rm -rf "$bundle" && mkdir -p "$bundle/bin"
    local list
    list=$(mktemp)
    scripts/cuda-build.sh --bin ferrite | tee -a "$list"
    scripts/cuda-build.sh -p ferrite-engine --test cuda_ops --test parity --test half_precision --test cuda_graphs --bench attention --bench linear | tee -a "$list"
    sed -n 's/^binary: \(.*\) (.*)$/\1/p' "$list" | sort -u | while read -r bin; do
        name=$(basename "$bin")
        name=${name%-*} # test binaries carry a hash suffix
        strip -o "$bundle/bin/$name" "$bin"
    done
    rm -f "$list"
    # xz -3 on every core: ~25 s for ~42 MB (the default -6 took ~150 s for 35 MB).
    XZ_OPT=${XZ_OPT:--3 -T0} tar -C "$bundle" -cJf "$bundle/bin.tar.xz" bin && rm -rf "${bundle:?}/bin"
    echo "gpu-bundle/bin.tar.xz: $(du -h "$bundle/bin.tar.xz" | cut -f1) (carry gpu-bundle and tests/fixtures)"
}

# What a bench log says of CUDA graphs: how many were captured, the last capture, any failure.
graph_log() {
    local n
    n=$(grep -c 'captured a CUDA graph' "$1" || true)
    [[ $n == 0 ]] || echo "  $n CUDA graphs captured; last: $(grep 'captured a CUDA graph' "$1" | tail -1 | cut -c1-220)"
    grep -m2 'CUDA graph capture failed' "$1" | cut -c1-400 || true
}

# One summary line: name, ok/FAILED, detail.
line() { printf '%-22s %-7s %s' "$1" "$2" "${3:-}"; }

# A JSON field of a bench report, formatted: jq-free (python3 is there).
field() { python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2] % eval(sys.argv[3], {}, d))' "$@"; }

# A bench report's engine step phases, in ms per step: "steps 130: schedule 0.01, ... ms".
phases() {
    python3 -c '
import json, sys
p = json.load(open(sys.argv[1]))["step_phases"]
n = max(p["num_steps"], 1)
order = ["schedule", "inputs", "forward", "device", "sample", "emit"]
s = sorted(p["seconds"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
print("steps %d: " % p["num_steps"] + ", ".join("%s %.2f" % (k, v / n * 1e3) for k, v in s) + " ms")' "$1"
}

run() {
    [[ -f $bundle/bin.tar.xz ]] || { echo "no $bundle/bin.tar.xz: run '$0 bundle' on a build machine" >&2; exit 2; }
    local work out=${OUT:-}
    work=$(mktemp -d)
    [[ -n $out ]] || out=$work
    python3 -m tarfile -e "$bundle/bin.tar.xz" "$work" # no xz binary needed there
    local bin="$work/bin"
    local libs
    # The CUDA 13 libraries of the machine's PyTorch wheels: whichever nvidia/ namespace folder
    # holds them (there may be several site folders).
    libs=$(python3 -c '
import nvidia, os
print(next(d for d in (os.path.join(p, "cu13", "lib") for p in nvidia.__path__)
           if os.path.exists(os.path.join(d, "libcublas.so.13"))))' 2>/dev/null) || true
    [[ -n $libs ]] && export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    export FERRITE_TEST_DEVICE=cuda FERRITE_FIXTURES="$root/tests/fixtures"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    local summary=()
    for t in cuda_ops cuda_graphs parity half_precision; do
        local log="$out/$t.log" status
        if timeout 150 "$bin/$t" --test-threads=1 >"$log" 2>&1; then status=ok; else status=FAILED; fi
        local counts
        counts=$(awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed", p, f }' "$log")
        summary+=("$(line "$t" "$status" "$counts")")
        [[ $status == ok ]] || grep -E 'panicked|FAILED|failed|error' "$log" | head -30
    done
    summary+=("$(energy "$bin" "$work")")

    local models=("$root/tests/fixtures/qwen3")
    if [[ -n ${GPU_CHECK_SHAPE:-} ]]; then
        # A random model of a real shape, made here on the GPU (scripts/make_bench_model.py).
        python3 "$root/scripts/make_bench_model.py" "$work/$GPU_CHECK_SHAPE" --shape "$GPU_CHECK_SHAPE" | tail -1
        models+=("$work/$GPU_CHECK_SHAPE")
        summary+=("$(line "copy bandwidth" ok "$(python3 -c '
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
print("%.0f GB/s device-to-device (read + write)" % (2 * 20 * x.numel() / (s.elapsed_time(e) / 1e3) / 1e9))')")")
    fi
    [[ -n ${GPU_CHECK_MODEL:-} ]] && models+=("$GPU_CHECK_MODEL")
    for model in "${models[@]}"; do
        local m
        m=$(basename "$model")
        # Batch-1 latency: prefill only (128 and 2048 prompt tokens), then 128 + 128 tokens.
        local shapes=(128:1 2048:1 128:128) concurrency=(64 256)
        if [[ $model == "$root/tests/fixtures/"* ]]; then
            shapes=(128:128) concurrency=(256) # a smoke test: the fixtures are tiny
        fi
        # Each measure with decode graphs (the default) and eagerly, one after the other.
        local modes=(graphs eager)
        for shape in "${shapes[@]}"; do
            local i=${shape%:*} o=${shape#*:} shape_modes=("${modes[@]}")
            [[ $o == 1 ]] && shape_modes=(graphs) # a prefill alone has no decode step to replay
            for mode in "${shape_modes[@]}"; do
                local j="$work/lat-$m-$i-$o-$mode.json" flags=()
                [[ $mode == eager ]] && flags=(--enforce-eager)
                if timeout 120 "$bin/ferrite" bench latency --model "$model" --device cuda --input-len "$i" --output-len "$o" \
                    --batch-size 1 --num-iters-warmup 3 --num-iters 10 --output-json "$j" "${flags[@]}" >"$work/lat.log" 2>&1; then
                    summary+=("$(line "latency $m $i+$o $mode" ok "$(field "$j" "avg %.5f s, p50 %.5f s" '(avg_latency, percentiles["50"])')")")
                    summary+=("$(line "" "" "$(phases "$j")")")
                else
                    summary+=("$(line "latency $m $i+$o $mode" FAILED)"); tail -20 "$work/lat.log"
                fi
                graph_log "$work/lat.log"
            done
        done
        # Offline throughput, 128 + 128 tokens per request, at 64 and 256 concurrent sequences,
        # two waves of prompts each (four waves at 256 did not finish in 120 s before GPU sampling).
        for seqs in "${concurrency[@]}"; do
            for mode in "${modes[@]}"; do
                local j="$work/thr-$m-$seqs-$mode.json" flags=()
                [[ $mode == eager ]] && flags=(--enforce-eager)
                if timeout 180 "$bin/ferrite" bench throughput --model "$model" --device cuda --input-len 128 --output-len 128 \
                    --max-num-seqs "$seqs" --num-prompts $((2 * seqs)) --output-json "$j" "${flags[@]}" >"$work/thr.log" 2>&1; then
                    summary+=("$(line "throughput $m $seqs $mode" ok "$(field "$j" "%.0f tok/s, %.2f req/s" '(tokens_per_second, requests_per_second)')")")
                    summary+=("$(line "" "" "$(phases "$j")")")
                else
                    summary+=("$(line "throughput $m $seqs $mode" FAILED)"); tail -20 "$work/thr.log"
                fi
                graph_log "$work/thr.log"
            done
        done
    done
    # criterion benches on the GPU: paged attention, and the layer's products (cuBLAS) with the
    # host's cost of one small op.
    local bench
    for bench in ${GPU_CHECK_BENCHES:-attention linear}; do
        [[ -x $bin/$bench ]] || continue
        if FERRITE_BENCH_DEVICE=cuda timeout 120 "$bin/$bench" --bench --noplot >"$out/$bench.log" 2>&1; then
            summary+=("$(line "$bench bench" ok "see $bench.log")")
            grep -E -B1 -A1 'time:' "$out/$bench.log" | grep -v '^--$' || true
        else
            summary+=("$(line "$bench bench" FAILED)"); tail -20 "$out/$bench.log"
        fi
    done
    # Every bench report in one file (what comes back from a device machine is a few files).
    python3 -c 'import json,sys,os;print(json.dumps({os.path.basename(p): json.load(open(p)) for p in sys.argv[1:]}, indent=1))' \
        "$work"/lat-*.json "$work"/thr-*.json >"$out/bench.json" 2>/dev/null || true
    echo
    printf '%s\n' "== gpu-check $(date -u +%F) ==" "${summary[@]}" | tee "$out/summary.txt"
    ! printf '%s\n' "${summary[@]}" | grep -q FAILED
}

# Serves the qwen3 fixture on the GPU, completes requests and reads /metrics: with NVML the
# server must report energy_available 1 and, within 5 s of requests, a positive energy total.
energy() {
    local bin=$1 work=$2 port=18123
    "$bin/ferrite" serve --model "$root/tests/fixtures/qwen3" --device cuda --port $port >"$work/serve.log" 2>&1 &
    local pid=$!
    local result
    result=$(python3 - "$port" <<'PY' 2>&1
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except Exception:
        time.sleep(0.1)
model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 32}).encode()
# The card's counter refreshes on its own cadence (up to ~1 s): requests go on, for 5 s at
# most, until ended requests have been charged energy.
start, requests = time.time(), 0
while True:
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    requests += 1
    metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    # `ferrite:energy_joules_total{model_name="..."} 35.7` -> energy_joules_total=35.7
    vals = {l.split()[0].split("{")[0].split(":")[-1]: float(l.split()[-1])
            for l in metrics.splitlines() if "energy" in l and not l.startswith("#")}
    if vals.get("energy_joules_total", 0) > 0 or time.time() - start > 5:
        break
print(" ".join(f"{k}={v:g}" for k, v in vals.items()) + f" after {requests} requests, {time.time() - start:.2f} s")
PY
    ) || true
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    if [[ $result == *"energy_available=1"* && $result =~ energy_joules_total=[0-9.]*[1-9] ]]; then
        line "nvml energy" ok "$result"
    else
        line "nvml energy" FAILED "$result"; tail -5 "$work/serve.log" >&2
    fi
}

case ${1:-} in
    bundle) bundle ;;
    run) run ;;
    *) echo "usage: $0 bundle|run" >&2; exit 2 ;;
esac
