// Shared pieces of ferrite's CUDA kernels: storage types, widening loads, warp and block
// reductions, and the scalar configuration every attention kernel receives.
//
// Storage is f32, f16 or bf16; all arithmetic is f32, as in the CPU reference
// (crates/ferrite-engine/src/ops/paged_attention.rs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace ferrite {

// Largest head_dim the attention kernels accept (the host rejects larger ones). Mirrored by
// `MAX_HEAD_DIM` in crates/ferrite-kernels/src/lib.rs.
constexpr int MAX_HEAD_DIM = 256;
// Elements per vector load: head_dim must be a multiple of it, and every row start is then
// 16-byte aligned (the host checks the tensors' offsets). Mirrored by `HEAD_DIM_MULTIPLE`.
constexpr int VEC = 8;

// Scalar configuration of one attention call, passed by value. Mirrors `AttnConfig` in
// crates/ferrite-kernels/src/lib.rs field for field (all 4-byte fields: no padding).
struct AttnConfig {
    int num_heads;
    int num_kv_heads;
    int head_dim;
    int block_size;
    // Row length of the padded block-table matrix `[num_seqs, max_blocks_per_seq]`.
    int max_blocks_per_seq;
    // A query at position p sees keys p - sliding_window + 1 ..= p; 0 means no window
    // (the host maps `None` to 0 and rejects `Some(0)`).
    int sliding_window;
    float scale;
    // score = softcap * tanh(score / softcap) after scaling; 0 means no soft-capping.
    float softcap;
};

// Per-sequence metadata, three u32 per sequence in the packed metadata buffer.
struct SeqInfo {
    uint32_t query_start;  // first query row of the sequence in the flat batch
    uint32_t query_len;    // query rows scheduled this step
    uint32_t context_len;  // tokens in the context, this step's included
};

__device__ __forceinline__ SeqInfo load_seq_info(const uint32_t* seq_info, int seq) {
    const uint32_t* s = seq_info + 3 * (size_t)seq;
    return SeqInfo{s[0], s[1], s[2]};
}

// First key position a query at `pos` may see (the window's start, or 0).
__device__ __forceinline__ int first_visible_key(int pos, const AttnConfig& cfg) {
    return cfg.sliding_window > 0 ? max(0, pos - cfg.sliding_window + 1) : 0;
}

// Scaling then optional soft-capping of a raw q.k dot product, as the CPU reference does.
__device__ __forceinline__ float finish_score(float dot, const AttnConfig& cfg) {
    float s = dot * cfg.scale;
    if (cfg.softcap != 0.0f) {
        s = cfg.softcap * tanhf(s / cfg.softcap);
    }
    return s;
}

// Element offset of (position `pos`, kv head `kv_head`, dim 0) in a paged cache
// `[num_blocks, block_size, num_kv_heads, head_dim]`, through the sequence's block table.
// 64-bit: a large cache holds more than 2^31 elements.
__device__ __forceinline__ size_t cache_row_offset(const uint32_t* block_table, int pos, int kv_head,
                                                   const AttnConfig& cfg) {
    const size_t block = block_table[pos / cfg.block_size];
    const size_t slot = block * cfg.block_size + pos % cfg.block_size;
    return (slot * cfg.num_kv_heads + kv_head) * cfg.head_dim;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, like `half::f16::from_f32` / `half::bf16::from_f32` on the CPU.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Loads VEC consecutive elements from a 16-byte-aligned address and widens them to f32.
__device__ __forceinline__ void load_vec(const float* p, float (&out)[VEC]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void load_vec(const __half* p, float (&out)[VEC]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
        const float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float (&out)[VEC]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

constexpr unsigned FULL_MASK = 0xffffffffu;

// Sum over aligned groups of `width` lanes (a power of two <= 32). Every lane of the warp must
// call it (full-mask shuffles); each lane gets its own group's sum. F: float or double.
template <typename F>
__device__ __forceinline__ F group_sum(F v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

template <typename F>
__device__ __forceinline__ F warp_sum(F v) { return group_sum(v, 32); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Block-wide sum / max for blocks of NUM_WARPS full warps; every thread gets the result.
// `scratch` holds NUM_WARPS values; the leading __syncthreads makes it safe to call twice in a
// row with the same scratch. The sum is of floats or doubles.
template <int NUM_WARPS, typename F>
__device__ __forceinline__ F block_sum(F v, F* scratch) {
    v = warp_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    F total = 0;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) total += scratch[w];
    return total;
}

template <int NUM_WARPS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

}  // namespace ferrite
