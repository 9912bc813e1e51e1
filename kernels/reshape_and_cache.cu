// Writes the step's new K or V rows into a paged cache (the CUDA side of `write_kv`).
//
// src:   [num_tokens, num_kv_heads, head_dim]
// cache: [num_blocks, block_size, num_kv_heads, head_dim], i.e. [num_slots, row_elems]
// slot_mapping[token] = block * block_size + offset (u32), or PAD_SLOT (0xFFFFFFFF): a row that
// pads a batch up to a captured CUDA graph's size, whose K/V go nowhere. The host checked every
// other slot is inside the cache before launch.
//
// Launch: grid (num_tokens), block RESHAPE_THREADS; each block copies one row. Plain element
// copies: coalesced, no alignment requirement on either tensor.
#include "common.cuh"

namespace ferrite {

constexpr int RESHAPE_THREADS = 256;
// Mirrored by `PAD_SLOT` in crates/ferrite-kernels/src/plan.rs.
constexpr uint32_t PAD_SLOT = 0xFFFFFFFFu;

template <typename T>
__device__ void reshape_and_cache(const T* __restrict__ src, T* __restrict__ cache,
                                  const uint32_t* __restrict__ slot_mapping, int row_elems) {
    const size_t token = blockIdx.x;
    const uint32_t raw_slot = slot_mapping[token];
    if (raw_slot == PAD_SLOT) return;  // uniform over the block
    const size_t slot = raw_slot;
    const T* from = src + token * row_elems;
    T* to = cache + slot * row_elems;
    for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
        to[i] = from[i];
    }
}

}  // namespace ferrite

#define FERRITE_RESHAPE_AND_CACHE(T, SUFFIX)                                                     \
    extern "C" __global__ void __launch_bounds__(ferrite::RESHAPE_THREADS)                      \
        reshape_and_cache_##SUFFIX(const T* __restrict__ src, T* __restrict__ cache,            \
                                   const uint32_t* __restrict__ slot_mapping, int row_elems) { \
        ferrite::reshape_and_cache<T>(src, cache, slot_mapping, row_elems);                     \
    }

FERRITE_RESHAPE_AND_CACHE(float, f32)
FERRITE_RESHAPE_AND_CACHE(__half, f16)
FERRITE_RESHAPE_AND_CACHE(__nv_bfloat16, bf16)
