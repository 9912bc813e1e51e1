# shellcheck shell=bash
# scripts/cuda-env.sh — sourced by cuda-build.sh and check-kernels.sh: installs the pinned CUDA
# 13.0.x toolkit pieces from PyPI wheels into a venv (once) and exports CUDA_HOME, NVCC, PATH and
# CUDARC_CUDA_VERSION. No GPU, no system CUDA toolkit and no NVIDIA apt repository needed.
#
#   CUDA_BUILD_HOME=/some/dir; source scripts/cuda-env.sh; cuda_env nvcc   # nvcc --ptx only (~100 MB, 300 MB on disk)
#   CUDA_BUILD_HOME=/some/dir; source scripts/cuda-env.sh; cuda_env full   # + nvrtc, cuBLAS, cuRAND: 675 MB, 1.2 GB
#
# Why 13.0.x exactly: the lent H100/H200 machines run driver 580 (CUDA 13.0). A newer nvcc emits a
# newer PTX ISA that this driver refuses to JIT (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), so these
# pins must not float to 13.1+. They are the same pins as ../shared/gpu/cuda-build.sh, in the same
# order, so a venv that script populated (e.g. /opt/cuda-build) is recognised and reused as is.

# What `nvcc --ptx` needs: the driver program and cudafe++ (nvcc), cicc + libdevice (nvvm), the
# crt/ headers, cuda_runtime.h / cuda_bf16.h (runtime) and <nv/target>, which cuda_bf16.h
# includes (cccl).
CUDA_NVCC_WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
)
# What linking and running candle's CUDA backend adds: libnvrtc.so.13, libcublas(Lt).so.13,
# libcurand.so.10 (libcudart.so.13 comes with nvidia-cuda-runtime above).
CUDA_LIB_WHEELS=(
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)

_cuda_log() { printf '== %s\n' "$*" >&2; }

# A stamp file per wheel set records a finished install; its name hashes the pins, so changing a
# pin reinstalls.
_cuda_stamp() { printf '%s/venv/.wheels-%s' "$CUDA_BUILD_HOME" "$(printf '%s\n' "$@" | md5sum | cut -c1-12)"; }

# Installs what `nvcc` needs to run at all on this host: a C++ host compiler (nvcc preprocesses
# with it even for --ptx) and python3 with venv.
_cuda_host_tools() {
    local need=()
    command -v g++ >/dev/null || need+=(g++)
    command -v python3 >/dev/null || need+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
    ((${#need[@]})) || return 0
    if [[ $(id -u) != 0 ]]; then
        echo "cuda-env: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
        return 1
    fi
    _cuda_log "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# cuda_env nvcc|full — make sure the wheel set is installed under $CUDA_BUILD_HOME/venv, then
# export CUDA_HOME, NVCC, PATH (nvcc first) and CUDARC_CUDA_VERSION.
cuda_env() {
    local set=${1:?usage: cuda_env nvcc|full} wheels full_stamp stamp
    : "${CUDA_BUILD_HOME:?set CUDA_BUILD_HOME before calling cuda_env}"
    case $set in
        nvcc) wheels=("${CUDA_NVCC_WHEELS[@]}") ;;
        full) wheels=("${CUDA_NVCC_WHEELS[@]}" "${CUDA_LIB_WHEELS[@]}") ;;
        *) echo "cuda_env: unknown set '$set' (nvcc|full)" >&2; return 2 ;;
    esac
    full_stamp=$(_cuda_stamp "${CUDA_NVCC_WHEELS[@]}" "${CUDA_LIB_WHEELS[@]}")
    stamp=$(_cuda_stamp "${wheels[@]}")
    if [[ ! -f $stamp && ! -f $full_stamp ]]; then
        _cuda_host_tools || return 1
        mkdir -p "$CUDA_BUILD_HOME" || return 1
        _cuda_log "installing CUDA 13.0 wheels ($set) into $CUDA_BUILD_HOME/venv"
        # flock: two builds starting together on one machine must not pip into one venv at once.
        (
            flock 9
            [[ -f $stamp ]] && exit 0
            [[ -x $CUDA_BUILD_HOME/venv/bin/python ]] || python3 -m venv "$CUDA_BUILD_HOME/venv" || exit 1
            # --no-deps: each wheel is self-contained; --no-cache-dir: the venv is the cache.
            "$CUDA_BUILD_HOME/venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir \
                --no-deps --only-binary=:all: "${wheels[@]}" || exit 1
            touch "$stamp"
        ) 9>"$CUDA_BUILD_HOME/.lock" || return 1
    fi
    CUDA_HOME=$("$CUDA_BUILD_HOME/venv/bin/python" -c \
        'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))') || return 1
    export CUDA_HOME
    export NVCC="$CUDA_HOME/bin/nvcc"
    case ":$PATH:" in *":$CUDA_HOME/bin:"*) ;; *) export PATH="$CUDA_HOME/bin:$PATH" ;; esac
    # cudarc: pick the CUDA 13.0 bindings without parsing `nvcc --version`.
    export CUDARC_CUDA_VERSION=13000
    [[ -x $NVCC ]] || { echo "cuda-env: $NVCC missing; delete $CUDA_BUILD_HOME/venv and retry" >&2; return 1; }
}
