#!/usr/bin/env bash
# scripts/check-kernels.sh — compile every CUDA kernel in kernels/ to PTX with the pinned nvcc
# 13.0 (no GPU needed), warnings as errors, and stop at the first one that does not compile.
# CI runs it so a kernel that breaks is caught on machines without a GPU.
#
#   scripts/check-kernels.sh                  # kernels/*.cu
#   scripts/check-kernels.sh DIR|FILE.cu ...  # or KERNELS_DIR=DIR scripts/check-kernels.sh
#
# Knobs (environment):
#   CUDA_COMPUTE_CAP  virtual arch to compile for (default 80: A100, the oldest GPU we build for;
#                     90 = H100/H200, 89 = L4)
#   NVCC_FLAGS        extra nvcc flags (e.g. "-DFOO=1")
#   CUDA_BUILD_HOME   where the nvcc wheels live (default: /opt/cuda-build when it has them, else
#                     ${TMPDIR:-/tmp}/ferrite-cuda; the first run downloads ~100 MB: ~15 s, 300 MB)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cap=${CUDA_COMPUTE_CAP:-80}

shopt -s nullglob
sources=()
(($#)) || set -- "${KERNELS_DIR:-$root/kernels}"
for arg in "$@"; do
    if [[ -d $arg ]]; then
        sources+=("$arg"/*.cu)
    elif [[ -f $arg ]]; then
        sources+=("$arg")
    elif [[ $arg == "$root/kernels" ]]; then
        : # no kernels/ folder yet: same as an empty one
    else
        echo "check-kernels: $arg: no such file or directory" >&2
        exit 2
    fi
done
if ((${#sources[@]} == 0)); then
    echo "check-kernels: no .cu files in $* - nothing to check"
    exit 0
fi

if [[ -z ${CUDA_BUILD_HOME:-} ]]; then
    # Reuse the full toolkit cuda-build.sh installed, when there is one we may use.
    if [[ -x /opt/cuda-build/venv/bin/python ]] &&
        { [[ -w /opt/cuda-build ]] || compgen -G '/opt/cuda-build/venv/.wheels-*' >/dev/null; }; then
        CUDA_BUILD_HOME=/opt/cuda-build
    else
        CUDA_BUILD_HOME=${TMPDIR:-/tmp}/ferrite-cuda
    fi
fi
export CUDA_BUILD_HOME
# shellcheck source=SCRIPTDIR/cuda-env.sh
source "$root/scripts/cuda-env.sh"
cuda_env nvcc
echo "check-kernels: $("$NVCC" --version | tail -1), -arch=compute_$cap, ${#sources[@]} file(s)"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Same language flags as candle's kernels; warnings are errors so they get fixed while small.
# shellcheck disable=SC2206 # NVCC_FLAGS is a flag list: word splitting is the point
flags=(--ptx "-arch=compute_$cap" -std=c++17 -O3 --expt-relaxed-constexpr --Werror all-warnings ${NVCC_FLAGS:-})
total_start=$EPOCHREALTIME
for src in "${sources[@]}"; do
    name=$(basename "$src" .cu)
    shown=${src#"$root"/}
    start=$EPOCHREALTIME
    if ! log=$("$NVCC" "${flags[@]}" -o "$out/$name.ptx" "$src" 2>&1); then
        printf '%s\n' "$log" >&2
        echo "FAILED $shown: nvcc ${flags[*]} $shown" >&2
        exit 1
    fi
    secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
    # The PTX ISA version decides which drivers can load it (9.0 = CUDA 13.0 = driver 580).
    isa=$(sed -n 's/^\.version //p' "$out/$name.ptx")
    printf 'ok %6s s  %s  (PTX %s, %d entry points)\n' "$secs" "$shown" "$isa" \
        "$(grep -c '^\.visible \.entry' "$out/$name.ptx" || true)"
    [[ -z $log ]] || printf '%s\n' "$log"
done
echo "check-kernels: ${#sources[@]} kernel file(s) ok in $(awk -v a="$total_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
