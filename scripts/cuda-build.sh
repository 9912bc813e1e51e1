#!/usr/bin/env bash
# scripts/cuda-build.sh — release-build ferrite with `--features cuda` on a machine with no GPU
# and no CUDA toolkit (the team's machines, CI), to carry the binary to a GPU machine.
#
#   scripts/cuda-build.sh                               # every binary of the root package
#   scripts/cuda-build.sh --bin ferrite                 # just the server
#   scripts/cuda-build.sh -p ferrite-engine --tests     # the engine's test binaries, to run on the GPU
#
# Extra arguments go to `cargo build --release --features cuda`.
#   CUDA_CARGO=clippy scripts/cuda-build.sh -p ferrite-engine --all-targets -- -D warnings
#                                                       # lint the cuda code (CI's clippy cannot)
# Knobs (environment):
#   CUDA_CARGO        the cargo subcommand (default build; clippy lints the cuda feature)
#   CUDA_BUILD_HOME   venv with the CUDA wheels + link dir (default /opt/cuda-build; ~675 MB
#                     download and 1.2 GB on disk the first time, nothing after that)
#   CUDA_COMPUTE_CAP  GPU the kernels are built for: 90 (default) = H100/H200 (candle builds
#                     sm_90a, which runs on nothing else), 80 = A100, 89 = L4/L40S
#   CARGO_TARGET_DIR  default target-cuda/, so CPU and CUDA builds do not rebuild each other
# A clean build takes ~15 minutes on 2 cores (mostly candle's own kernels); incremental, seconds.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CUDA_BUILD_HOME=${CUDA_BUILD_HOME:-/opt/cuda-build}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain first" >&2; exit 1; }
command -v gcc >/dev/null || { echo "gcc not found: apt-get install gcc" >&2; exit 1; }

# shellcheck source=SCRIPTDIR/cuda-env.sh
source "$root/scripts/cuda-env.sh"
cuda_env full
"$NVCC" --version | tail -1 >&2

# Link dir. The wheels ship only versioned sonames (libcublas.so.13) and no libcuda at all (that
# is the driver's), but candle 0.11 forces cudarc's `dynamic-linking`, so the link runs
# `-lcuda -lnvrtc -lcurand -lcublas -lcublasLt -lcudart`. Unversioned symlinks cover the wheels;
# a generated stub libcuda.so (SONAME libcuda.so.1, every cu* entry point returns
# CUDA_ERROR_STUB_LIBRARY = 34) covers the driver. The stub is for linking only: the binary
# records `NEEDED libcuda.so.1` and gets the real driver on the GPU machine. Never carry it there.
link="$CUDA_BUILD_HOME/link"
mkdir -p "$link/stubs"
for so in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
    ln -sfn "$CUDA_HOME/lib/lib$so" "$link/lib${so%.so.*}.so"
done
if [[ ! -f $link/stubs/libcuda.so ]]; then
    echo "== generating the link-time stub $link/stubs/libcuda.so" >&2
    {
        echo '/* LINK-TIME STUB ONLY: never put this on a GPU machine or in its LD_LIBRARY_PATH. */'
        grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDA_HOME/include/cuda.h" | sort -u |
            sed 's/.*/int &(void){return 34;}/'
    } >"$link/stubs/libcuda_stub.c"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$link/stubs/libcuda.so" "$link/stubs/libcuda_stub.c"
    ln -sfn libcuda.so "$link/stubs/libcuda.so.1"
fi
# Exactly this spelling: cargo fingerprints RUSTFLAGS, and ../shared/gpu/cuda-build.sh uses the
# same, so switching between the two scripts does not rebuild everything.
case " ${RUSTFLAGS:-} " in
    *" -Lnative=$link "*) ;;
    *) RUSTFLAGS="${RUSTFLAGS:-} -Lnative=$link -Lnative=$link/stubs" ;;
esac
export RUSTFLAGS="${RUSTFLAGS# }"

sub=${CUDA_CARGO:-build}
echo "== cargo $sub --release --features cuda${*:+ $*} (sm_$CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR)" >&2
start=$SECONDS
executables=$(mktemp)
trap 'rm -f "$executables"' EXIT
# JSON messages on stdout name every executable built (binaries and test binaries alike);
# diagnostics still go to the terminal as usual.
(cd "$root" && cargo "$sub" --release --features cuda --message-format=json-render-diagnostics "$@") |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        print(msg["executable"])
' >"$executables"
echo "== build took $((SECONDS - start)) s" >&2

while read -r bin; do
    echo "binary: $bin ($(du -h "$bin" | cut -f1))"
    readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  needs \1/p'
done <"$executables"
cat <<'EOF'

On the GPU machine (libcuda.so.1 comes with its driver; the CUDA 13 libraries from the nvidia-*
wheels of its python3, e.g. PyTorch cu130's):
  export LD_LIBRARY_PATH="$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))'):${LD_LIBRARY_PATH:-}"
  ./ferrite serve --device cuda ...
EOF
echo "(Never carry $link/stubs there.)"
