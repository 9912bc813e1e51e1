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
#   - half_precision: bf16 and f16 within what their mantissas allow;
#   - `ferrite bench latency` and `bench throughput` on the qwen3 fixture (and on
#     $GPU_CHECK_MODEL, a local model folder, when set).
# Knobs: CUDA_COMPUTE_CAP (bundle; default 90 = H100/H200), GPU_CHECK_MODEL (run).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$root/gpu-bundle"
cd "$root"

bundle() {
    rm -rf "$bundle" && mkdir -p "$bundle/bin"
    local list
    list=$(mktemp)
    scripts/cuda-build.sh --bin ferrite | tee -a "$list"
    scripts/cuda-build.sh -p ferrite-engine --test cuda_ops --test parity --test half_precision | tee -a "$list"
    sed -n 's/^binary: \(.*\) (.*)$/\1/p' "$list" | sort -u | while read -r bin; do
        name=$(basename "$bin")
        name=${name%-*} # test binaries carry a hash suffix
        strip -o "$bundle/bin/$name" "$bin"
    done
    rm -f "$list"
    tar -C "$bundle" -cJf "$bundle/bin.tar.xz" bin && rm -rf "${bundle:?}/bin"
    echo "gpu-bundle/bin.tar.xz: $(du -h "$bundle/bin.tar.xz" | cut -f1) (carry gpu-bundle and tests/fixtures)"
}

run() {
    [[ -f $bundle/bin.tar.xz ]] || { echo "no $bundle/bin.tar.xz: run '$0 bundle' on a build machine" >&2; exit 2; }
    local work
    work=$(mktemp -d)
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
    for t in cuda_ops parity half_precision; do
        local log="$work/$t.log" status
        if "$bin/$t" --test-threads=1 >"$log" 2>&1; then status=ok; else status=FAILED; fi
        local counts
        counts=$(awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed", p, f }' "$log")
        summary+=("$(printf '%-16s %-7s %s' "$t" "$status" "$counts")")
        [[ $status == ok ]] || tail -40 "$log"
    done
    local models=("$root/tests/fixtures/qwen3")
    [[ -n ${GPU_CHECK_MODEL:-} ]] && models+=("$GPU_CHECK_MODEL")
    for model in "${models[@]}"; do
        local m
        m=$(basename "$model")
        if "$bin/ferrite" bench latency --model "$model" --device cuda --input-len 128 --output-len 64 \
            --batch-size 1 --num-iters-warmup 3 --num-iters 10 --output-json "$work/lat.json" >"$work/lat.log" 2>&1; then
            summary+=("$(printf '%-16s %-7s %s' "latency $m" ok \
                "$(python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print("avg %.4f s per batch-1 run of 128+64 tokens" % d["avg_latency"])' "$work/lat.json")")")
        else
            summary+=("$(printf '%-16s %-7s' "latency $m" FAILED)"); tail -20 "$work/lat.log"
        fi
        if "$bin/ferrite" bench throughput --model "$model" --device cuda --input-len 128 --output-len 64 \
            --num-prompts 256 --output-json "$work/thr.json" >"$work/thr.log" 2>&1; then
            summary+=("$(printf '%-16s %-7s %s' "throughput $m" ok \
                "$(python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print("%.1f tok/s, %.2f req/s" % (d["tokens_per_second"], d["requests_per_second"]))' "$work/thr.json")")")
        else
            summary+=("$(printf '%-16s %-7s' "throughput $m" FAILED)"); tail -20 "$work/thr.log"
        fi
    done
    echo
    printf '%s\n' "== gpu-check $(date -u +%F) ==" "${summary[@]}"
    ! printf '%s\n' "${summary[@]}" | grep -q FAILED
}

case ${1:-} in
    bundle) bundle ;;
    run) run ;;
    *) echo "usage: $0 bundle|run" >&2; exit 2 ;;
esac
