// Paged attention for chunks of queries (prefill, chunked prefill, mixed batches) on tensor
// cores, for f16 and bf16 caches with head_dim a multiple of 16, at most TC_MAX_HEAD_DIM. The
// same attention as paged_attention_prefill.cu (which serves f32 and the other head sizes):
// causal inside the chunk, optional sliding window, GQA, optional soft-capping.
//
// FlashAttention-2-style (Dao, 2023) with WMMA 16x16x16 products, f32 accumulation:
// - a block takes TC_ROWS rows of one (sequence, KV head), numbered as in the CUDA-core kernel
//   (row = query * group + head_in_group), so one K/V tile serves every head of the group;
//   each of its 4 warps owns a strip of 16 rows;
// - per tile of TC_KEYS keys (gathered through the block table into shared memory): a warp
//   computes its strip's scores S = Q K^T on tensor cores, runs the online softmax on them in
//   f32 (two lanes per row), rescales its output strip, and adds P V on tensor cores, with P
//   rounded to the storage type (as FlashAttention does) and the softmax sums kept in f32.
// The output accumulator lives in shared memory (f32), so rows can be rescaled without relying
// on the accumulator fragments' register layout.
//
// Launch: grid (num_work_items, num_kv_heads), block TC_THREADS threads, dynamic shared memory
// prefill_tc_smem_bytes(head_dim) (crates/ferrite-kernels/src/plan.rs mirrors the layout
// below; the host opts in above 48 KiB and uses this kernel only where the card allows it).
// Work items (sequence, first row) step by TC_ROWS rows.
//
// Tensors as in paged_attention_prefill.cu; the host checked shapes, block ids, alignment and
// head_dim before launch.
#include "common.cuh"

#include <mma.h>

namespace ferrite {

constexpr int TC_THREADS = 128;
constexpr int TC_WARPS = TC_THREADS / 32;
constexpr int TC_STRIP = 16;  // rows per warp (one WMMA tile high)
// Mirrored by `PREFILL_TC_ROWS`, `PREFILL_TC_KEYS` and `PREFILL_TC_MAX_HEAD_DIM` in
// crates/ferrite-kernels/src/plan.rs.
constexpr int TC_ROWS = TC_WARPS * TC_STRIP;
constexpr int TC_KEYS = 64;
constexpr int TC_MAX_HEAD_DIM = 128;
static_assert(TC_MAX_HEAD_DIM % 16 == 0 && TC_MAX_HEAD_DIM <= MAX_HEAD_DIM, "whole WMMA tiles");
// Row padding in shared memory, in elements (16-bit and f32 rows): it staggers the rows over
// the banks and keeps every 16x16 tile's start 32-byte aligned, as WMMA needs.
constexpr int PAD_HALF = 8;
constexpr int PAD_FLOAT = 4;
constexpr int KEYS_PER_LANE = TC_KEYS / 2;  // two lanes per row in the softmax

template <typename T>
__device__ void paged_attention_prefill_tc(T* __restrict__ out, const T* __restrict__ q,
                                           const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                           const uint32_t* __restrict__ seq_info,
                                           const uint32_t* __restrict__ block_tables,
                                           const uint32_t* __restrict__ work, const AttnConfig cfg) {
    namespace wmma = nvcuda::wmma;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int head_dim = cfg.head_dim;
    const int ld_t = head_dim + PAD_HALF;    // rows of q, k, v
    const int ld_s = TC_KEYS + PAD_FLOAT;    // rows of the scores
    const int ld_p = TC_KEYS + PAD_HALF;     // rows of the probabilities
    const int ld_o = head_dim + PAD_FLOAT;   // rows of the output accumulator
    T* q_s = reinterpret_cast<T*>(smem_raw);                     // [TC_ROWS, ld_t]
    T* k_s = q_s + TC_ROWS * ld_t;                               // [TC_KEYS, ld_t]
    T* v_s = k_s + TC_KEYS * ld_t;                               // [TC_KEYS, ld_t]
    float* s_s = reinterpret_cast<float*>(v_s + TC_KEYS * ld_t); // [TC_ROWS, ld_s]
    T* p_s = reinterpret_cast<T*>(s_s + TC_ROWS * ld_s);         // [TC_ROWS, ld_p]
    float* o_s = reinterpret_cast<float*>(p_s + TC_ROWS * ld_p); // [TC_ROWS, ld_o]
    float* row_s = o_s + TC_ROWS * ld_o;                         // [TC_ROWS]: alpha, then 1/sum

    const int seq = work[2 * blockIdx.x];
    const int row0 = work[2 * blockIdx.x + 1];
    const int kv_head = blockIdx.y;
    const int group = cfg.num_heads / cfg.num_kv_heads;
    const SeqInfo info = load_seq_info(seq_info, seq);
    const int num_rows = info.query_len * group;
    const int pos0 = info.context_len - info.query_len;  // position of the chunk's first query
    const uint32_t* block_table = block_tables + (size_t)seq * cfg.max_blocks_per_seq;
    const int chunks = head_dim / VEC;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    // Q rows as stored (rows past the sequence are zeros, never written out); O at zero.
    for (int idx = threadIdx.x; idx < TC_ROWS * chunks; idx += TC_THREADS) {
        const int r = idx / chunks;
        const int c = idx % chunks;
        const int row = row0 + r;
        uint4 raw = zero;
        if (row < num_rows) {
            const int head = kv_head * group + row % group;
            const size_t token = info.query_start + row / group;
            raw = *reinterpret_cast<const uint4*>(q + (token * cfg.num_heads + head) * head_dim + c * VEC);
        }
        *reinterpret_cast<uint4*>(q_s + r * ld_t + c * VEC) = raw;
    }
    for (int i = threadIdx.x; i < TC_ROWS * ld_o; i += TC_THREADS) o_s[i] = 0.0f;

    // The softmax's view: lanes 2r and 2r + 1 share row r of the warp's strip, half the keys
    // of a tile each.
    const int strip = warp * TC_STRIP;
    const int my_r = lane / 2;
    const int my_keys = (lane % 2) * KEYS_PER_LANE;
    const int my_row = row0 + strip + my_r;
    const bool my_valid = my_row < num_rows;
    const int my_pos = pos0 + my_row / group;
    const int my_first = first_visible_key(my_pos, cfg);
    float run_max = -INFINITY;
    float run_sum = 0.0f;

    // Keys any row of the block sees: from the first query's window start to the last query.
    const int last_row = min(row0 + TC_ROWS, num_rows) - 1;
    const int key_lo = first_visible_key(pos0 + row0 / group, cfg);
    const int key_hi = pos0 + last_row / group;

    for (int tile = key_lo; tile <= key_hi; tile += TC_KEYS) {
        __syncthreads();  // Q and O are in place; the previous tile is no longer read
        for (int idx = threadIdx.x; idx < TC_KEYS * chunks; idx += TC_THREADS) {
            const int j = idx / chunks;
            const int c = idx % chunks;
            const int key = tile + j;
            uint4 kr = zero, vr = zero;
            if (key <= key_hi) {  // every key up to key_hi is in the context, so written
                const size_t offset = cache_row_offset(block_table, key, kv_head, cfg) + c * VEC;
                kr = *reinterpret_cast<const uint4*>(k_cache + offset);
                vr = *reinterpret_cast<const uint4*>(v_cache + offset);
            }
            *reinterpret_cast<uint4*>(k_s + j * ld_t + c * VEC) = kr;
            *reinterpret_cast<uint4*>(v_s + j * ld_t + c * VEC) = vr;
        }
        __syncthreads();

        // S = Q K^T for the strip: K rows stored [key][dim] are K^T in column-major order.
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag[TC_KEYS / 16];
#pragma unroll
            for (int n = 0; n < TC_KEYS / 16; ++n) wmma::fill_fragment(s_frag[n], 0.0f);
            for (int kk = 0; kk < head_dim; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::load_matrix_sync(a, q_s + strip * ld_t + kk, ld_t);
#pragma unroll
                for (int n = 0; n < TC_KEYS / 16; ++n) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(b, k_s + n * 16 * ld_t + kk, ld_t);
                    wmma::mma_sync(s_frag[n], a, b, s_frag[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < TC_KEYS / 16; ++n) {
                wmma::store_matrix_sync(s_s + strip * ld_s + n * 16, s_frag[n], ld_s, wmma::mem_row_major);
            }
        }
        __syncwarp();

        // Online softmax of this lane's half row, in f32.
        float score[KEYS_PER_LANE];
        float tile_max = -INFINITY;
        const float* s_row = s_s + (strip + my_r) * ld_s + my_keys;
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            const int key = tile + my_keys + j;
            const bool visible = my_valid && key >= my_first && key <= my_pos;
            score[j] = visible ? finish_score(s_row[j], cfg) : -INFINITY;
            tile_max = fmaxf(tile_max, score[j]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL_MASK, tile_max, 1));
        const float new_max = fmaxf(run_max, tile_max);
        // new_max is -inf while the row has seen no key: its state stays at zero.
        const float alpha = new_max == -INFINITY ? 1.0f : expf(run_max - new_max);
        float tile_sum = 0.0f;
        T* p_row = p_s + (strip + my_r) * ld_p + my_keys;
#pragma unroll
        for (int j = 0; j < KEYS_PER_LANE; ++j) {
            const float p = score[j] == -INFINITY ? 0.0f : expf(score[j] - new_max);
            tile_sum += p;
            p_row[j] = from_float<T>(p);
        }
        tile_sum += __shfl_xor_sync(FULL_MASK, tile_sum, 1);
        run_sum = run_sum * alpha + tile_sum;
        run_max = new_max;
        if (lane % 2 == 0) row_s[strip + my_r] = alpha;
        __syncwarp();

        // O = alpha O + P V for the strip.
        for (int i = lane; i < TC_STRIP * head_dim; i += 32) {
            const int r = i / head_dim;
            o_s[(strip + r) * ld_o + i % head_dim] *= row_s[strip + r];
        }
        __syncwarp();
        for (int n = 0; n < head_dim; n += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
            wmma::load_matrix_sync(o_frag, o_s + strip * ld_o + n, ld_o, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < TC_KEYS; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::load_matrix_sync(a, p_s + strip * ld_p + kk, ld_p);
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(b, v_s + kk * ld_t + n, ld_t);
                wmma::mma_sync(o_frag, a, b, o_frag);
            }
            wmma::store_matrix_sync(o_s + strip * ld_o + n, o_frag, ld_o, wmma::mem_row_major);
        }
        __syncwarp();
    }

    // Every valid row sees at least its own key, so its sum is positive.
    if (lane % 2 == 0) row_s[strip + my_r] = my_valid ? 1.0f / run_sum : 0.0f;
    __syncwarp();
    for (int i = lane; i < TC_STRIP * head_dim; i += 32) {
        const int r = i / head_dim;
        const int d = i % head_dim;
        const int row = row0 + strip + r;
        if (row >= num_rows) continue;
        const int head = kv_head * group + row % group;
        const size_t token = info.query_start + row / group;
        out[(token * cfg.num_heads + head) * head_dim + d] =
            from_float<T>(o_s[(strip + r) * ld_o + d] * row_s[strip + r]);
    }
}

}  // namespace ferrite

#define FERRITE_PREFILL_TC(T, SUFFIX)                                                                  \
    extern "C" __global__ void __launch_bounds__(ferrite::TC_THREADS)                                 \
        paged_attention_prefill_tc_##SUFFIX(                                                           \
            T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,               \
            const T* __restrict__ v_cache, const uint32_t* __restrict__ seq_info,                      \
            const uint32_t* __restrict__ block_tables, const uint32_t* __restrict__ work,              \
            const ferrite::AttnConfig cfg) {                                                           \
        ferrite::paged_attention_prefill_tc<T>(out, q, k_cache, v_cache, seq_info, block_tables, work, \
                                               cfg);                                                   \
    }

FERRITE_PREFILL_TC(__half, f16)
FERRITE_PREFILL_TC(__nv_bfloat16, bf16)
