// y = x · Wᵀ for the few rows of a decode step (the CUDA side of `Linear::forward` for up to
// GEMV_MAX_ROWS rows of f16/bf16). cuBLAS took 5-8 us of device time per product at one row
// on an H200, whatever the matrix (ncu: 896x1152 in 5.6 us, 1.6 us of bytes at 1.3 TB/s): its
// tiles are made for many rows.
//
// x: [m, k], w: [n, k] (a linear layer's weight, rows are output features), y: [m, n]; all
// row-major, k a multiple of VEC, x and w 16-byte aligned (the host checked). Accumulation in
// f32, the result rounded once to T.
//
// Launch: grid (ceil(n / GEMV_WARPS)), block GEMV_THREADS: one warp per output feature. Lane l
// reads VEC weights at k-offsets l * VEC, l * VEC + 32 * VEC, ...; GEMV_UNROLL of those loads
// are issued before their products, so each warp has several 16-byte loads in flight.
#include "common.cuh"

namespace ferrite {

constexpr int GEMV_THREADS = 256;
constexpr int GEMV_WARPS = GEMV_THREADS / 32;
// The most rows of x one launch takes. Mirrored by `GEMV_MAX_ROWS` in
// crates/ferrite-kernels/src/plan.rs.
constexpr int GEMV_MAX_ROWS = 8;
constexpr int GEMV_UNROLL = 4;

template <typename T>
__device__ void gemv(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m,
                     int n, int k) {
    const int lane = threadIdx.x % 32;
    const int col = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
    if (col >= n) return;  // uniform over the warp
    const T* row = w + (size_t)col * k;
    float acc[GEMV_MAX_ROWS] = {};
    constexpr int STRIDE = 32 * VEC;
    for (int base = lane * VEC; base < k; base += STRIDE * GEMV_UNROLL) {
        float wv[GEMV_UNROLL][VEC];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int i = base + u * STRIDE;
            if (i < k) {
                load_vec(row + i, wv[u]);
            } else {
#pragma unroll
                for (int e = 0; e < VEC; ++e) wv[u][e] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int i = base + u * STRIDE;
            if (i >= k) break;
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                if (r >= m) break;
                float xv[VEC];
                load_vec(x + (size_t)r * k + i, xv);
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[r] += wv[u][e] * xv[e];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r >= m) break;
        const float v = warp_sum(acc[r]);
        if (lane == 0) y[(size_t)r * n + col] = from_float<T>(v);
    }
}

}  // namespace ferrite

#define FERRITE_GEMV(T, SUFFIX)                                                                    \
    extern "C" __global__ void __launch_bounds__(ferrite::GEMV_THREADS)                           \
        gemv_##SUFFIX(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, \
                      int n, int k) {                                                             \
        ferrite::gemv<T>(y, x, w, m, n, k);                                                       \
    }

FERRITE_GEMV(float, f32)
FERRITE_GEMV(__half, f16)
FERRITE_GEMV(__nv_bfloat16, bf16)
