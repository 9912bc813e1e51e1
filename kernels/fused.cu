// Fused elementwise steps of a decoder layer. Each replaces several candle launches (and the
// small host-to-device copies of strides candle makes for non-contiguous operands): at batch 1
// a GPU step is bound by the host's launches, not by the kernels.
//
// Every kernel computes in f32 and rounds to the storage type where the unfused ops it replaces
// stored a tensor, so it follows their CPU reference (crates/ferrite-engine/src/ops/fused.rs).
//
// Launch (all three): grid (num_tokens), block FUSED_THREADS, no dynamic shared memory; one
// block per token row. The host checked every shape and length before launch.
#include "common.cuh"

namespace ferrite {

// Mirrored by `FUSED_THREADS` in crates/ferrite-kernels/src/plan.rs.
constexpr int FUSED_THREADS = 256;
constexpr int FUSED_WARPS = FUSED_THREADS / 32;

// qkv [num_tokens, (num_heads + 2 num_kv_heads) * head_dim], the stacked projection's output
// (heads q, then k, then v), plus `bias` of one row when has_bias. cos, sin [num_tokens,
// head_dim / 2]. Writes `out` planar: q [num_tokens, num_heads, head_dim], then k and then v
// [num_tokens, num_kv_heads, head_dim], q and k rotated (rotate-half: element j pairs with
// j + head_dim / 2).
template <typename T>
__device__ void qkv_rope(T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ bias,
                         const T* __restrict__ cos, const T* __restrict__ sin, int has_bias,
                         int num_tokens, int num_heads, int num_kv_heads, int head_dim) {
    const size_t t = blockIdx.x;
    const int half = head_dim / 2;
    const int row_elems = (num_heads + 2 * num_kv_heads) * head_dim;
    const T* src = qkv + t * row_elems;
    const size_t q_elems = (size_t)num_tokens * num_heads * head_dim;
    const size_t kv_elems = (size_t)num_tokens * num_kv_heads * head_dim;
    // The stacked row's element `c`, biased and rounded as the biased product was stored.
    auto load = [&](int c) {
        float x = to_float(src[c]);
        if (has_bias) x = to_float(from_float<T>(x + to_float(bias[c])));
        return x;
    };
    // Where stacked head `head` (q heads, then k, then v) goes in the planar output.
    auto dst = [&](int head) -> T* {
        if (head < num_heads) return out + (t * num_heads + head) * head_dim;
        head -= num_heads;
        if (head < num_kv_heads) return out + q_elems + (t * num_kv_heads + head) * head_dim;
        head -= num_kv_heads;
        return out + q_elems + kv_elems + (t * num_kv_heads + head) * head_dim;
    };
    const int rotated_pairs = (num_heads + num_kv_heads) * half;
    for (int i = threadIdx.x; i < rotated_pairs; i += blockDim.x) {
        const int head = i / half, j = i % half;
        const int c = head * head_dim + j;
        const float x0 = load(c), x1 = load(c + half);
        const float cs = to_float(cos[t * half + j]), sn = to_float(sin[t * half + j]);
        T* d = dst(head);
        d[j] = from_float<T>(x0 * cs - x1 * sn);
        d[j + half] = from_float<T>(x1 * cs + x0 * sn);
    }
    const int v_start = (num_heads + num_kv_heads) * head_dim;
    const int v_elems = num_kv_heads * head_dim;
    for (int i = threadIdx.x; i < v_elems; i += blockDim.x) {
        const int head = num_heads + num_kv_heads + i / head_dim;
        dst(head)[i % head_dim] = from_float<T>(load(v_start + i));
    }
}

// gate_up [num_tokens, 2 * width] (gate, then up) -> out [num_tokens, width]:
// SiLU(gate), rounded as candle's SiLU stores it, times up.
// Grid (num_tokens, ceil(width / FUSED_THREADS)): one element per thread. (One block per row
// walked a 4,864-wide row in 19 dependent steps: 17 us for one token on an H200.)
template <typename T>
__device__ void silu_mul(T* __restrict__ out, const T* __restrict__ gate_up, int width) {
    const size_t t = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= width) return;
    const T* gate = gate_up + t * 2 * width;
    const T* up = gate + width;
    const float g = to_float(gate[i]);
    const float s = to_float(from_float<T>(g / (1.0f + expf(-g))));
    out[t * width + i] = from_float<T>(s * to_float(up[i]));
}

// x, y [num_tokens, hidden], weight [hidden] -> out planar [2, num_tokens, hidden]:
// out[0] = x + y (the new residual stream, rounded), out[1] = RMSNorm of out[0] times weight.
template <typename T>
__device__ void add_rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y,
                             const T* __restrict__ weight, int num_tokens, int hidden, float eps) {
    const size_t t = blockIdx.x;
    const size_t row = t * hidden;
    T* sum_out = out + row;
    T* norm_out = out + (size_t)num_tokens * hidden + row;
    __shared__ float scratch[FUSED_WARPS];
    float squares = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const T s = from_float<T>(to_float(x[row + i]) + to_float(y[row + i]));
        sum_out[i] = s;
        const float f = to_float(s);
        squares += f * f;
    }
    const float scale = rsqrtf(block_sum<FUSED_WARPS>(squares, scratch) / hidden + eps);
    // Each thread reads back only the elements it wrote: no barrier needed for sum_out.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        norm_out[i] = from_float<T>(to_float(sum_out[i]) * scale * to_float(weight[i]));
    }
}

}  // namespace ferrite

#define FERRITE_FUSED(T, SUFFIX)                                                                     \
    extern "C" __global__ void __launch_bounds__(ferrite::FUSED_THREADS) qkv_rope_##SUFFIX(          \
        T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ bias,                  \
        const T* __restrict__ cos, const T* __restrict__ sin, int has_bias, int num_tokens,          \
        int num_heads, int num_kv_heads, int head_dim) {                                             \
        ferrite::qkv_rope<T>(out, qkv, bias, cos, sin, has_bias, num_tokens, num_heads,             \
                             num_kv_heads, head_dim);                                                \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(ferrite::FUSED_THREADS) silu_mul_##SUFFIX(          \
        T* __restrict__ out, const T* __restrict__ gate_up, int width) {                             \
        ferrite::silu_mul<T>(out, gate_up, width);                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(ferrite::FUSED_THREADS) add_rms_norm_##SUFFIX(      \
        T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y,                       \
        const T* __restrict__ weight, int num_tokens, int hidden, float eps) {                       \
        ferrite::add_rms_norm<T>(out, x, y, weight, num_tokens, hidden, eps);                        \
    }

FERRITE_FUSED(float, f32)
FERRITE_FUSED(__half, f16)
FERRITE_FUSED(__nv_bfloat16, bf16)
