// Paged attention for a chunk of queries per sequence (prefill, chunked prefill, or a batch
// that mixes prefill and decode): causal inside the chunk, query i of a sequence at position
// context_len - query_len + i, optional sliding window, GQA, optional soft-capping.
//
// FlashAttention-style (Dao et al., 2022) online softmax on CUDA cores, f32 accumulation:
// K/V tiles of PREFILL_KEYS keys are gathered through the block table into shared memory (as
// f32) and every row of the block attends to them before the next tile is loaded.
//
// A row is one (query, head) pair. The heads of one GQA group read the same K/V, so the rows of
// one (sequence, kv head) are numbered row = query * group + head_in_group and a thread block
// takes PREFILL_ROWS consecutive rows: one K/V tile load then serves every head of the group.
// The host lists the blocks' work as (sequence, first row) pairs (`prefill_work` in
// crates/ferrite-kernels/src/lib.rs).
//
// Launch: grid (num_work_items, num_kv_heads), block PREFILL_THREADS threads (4 warps of
// ROWS_PER_WARP rows), dynamic shared memory prefill_smem_bytes(head_dim) =
// 4 * (PREFILL_ROWS * head_dim + PREFILL_KEYS * (head_dim + 1) + PREFILL_KEYS * head_dim) bytes
// (above 48 KiB for head_dim > 149: the host raises the function's dynamic shared memory limit).
//
// Tensors: q and out [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size,
// num_kv_heads, head_dim]. The host checked shapes, block ids, alignment and head_dim (multiple
// of VEC, at most MAX_HEAD_DIM) before launch.
#include "common.cuh"

namespace ferrite {

constexpr int PREFILL_THREADS = 128;
constexpr int PREFILL_WARPS = PREFILL_THREADS / 32;
constexpr int ROWS_PER_WARP = 4;
// Mirrored by `PREFILL_ROWS` and `PREFILL_KEYS` in crates/ferrite-kernels/src/lib.rs.
constexpr int PREFILL_ROWS = PREFILL_WARPS * ROWS_PER_WARP;
constexpr int PREFILL_KEYS = 32;  // one key per lane when scoring
constexpr int DIMS_PER_LANE = MAX_HEAD_DIM / 32;

// Gathers keys tile .. tile + PREFILL_KEYS - 1 (zeros past key_hi) into shared memory as f32.
// K rows are padded by one float: in the score loop the lanes read 32 different rows at the
// same column, and the padding puts them in 32 different banks.
template <typename T>
__device__ __forceinline__ void load_kv_tile(float* k_tile, float* v_tile, const T* __restrict__ k_cache,
                                             const T* __restrict__ v_cache, const uint32_t* block_table,
                                             int tile, int key_hi, int kv_head, const AttnConfig& cfg) {
    const int head_dim = cfg.head_dim;
    const int chunks = head_dim / VEC;
    for (int idx = threadIdx.x; idx < PREFILL_KEYS * chunks; idx += PREFILL_THREADS) {
        const int j = idx / chunks;
        const int c = idx % chunks;
        const int key = tile + j;
        float kv[VEC] = {};
        float vv[VEC] = {};
        if (key <= key_hi) {
            const size_t offset = cache_row_offset(block_table, key, kv_head, cfg) + c * VEC;
            load_vec(k_cache + offset, kv);
            load_vec(v_cache + offset, vv);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            k_tile[j * (head_dim + 1) + c * VEC + e] = kv[e];
            v_tile[j * head_dim + c * VEC + e] = vv[e];
        }
    }
}

template <typename T>
__device__ void paged_attention_prefill(T* __restrict__ out, const T* __restrict__ q,
                                        const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                        const uint32_t* __restrict__ seq_info,
                                        const uint32_t* __restrict__ block_tables,
                                        const uint32_t* __restrict__ work, const AttnConfig cfg) {
    extern __shared__ __align__(16) float smem[];
    const int head_dim = cfg.head_dim;
    float* q_tile = smem;                                   // [PREFILL_ROWS, head_dim]
    float* k_tile = q_tile + PREFILL_ROWS * head_dim;       // [PREFILL_KEYS, head_dim + 1]
    float* v_tile = k_tile + PREFILL_KEYS * (head_dim + 1); // [PREFILL_KEYS, head_dim]

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

    // Q rows of the block, as f32 (rows past the sequence are zeros and never written out).
    for (int idx = threadIdx.x; idx < PREFILL_ROWS * chunks; idx += PREFILL_THREADS) {
        const int r = idx / chunks;
        const int c = idx % chunks;
        const int row = row0 + r;
        float vals[VEC] = {};
        if (row < num_rows) {
            const int head = kv_head * group + row % group;
            const size_t token = info.query_start + row / group;
            load_vec(q + (token * cfg.num_heads + head) * head_dim + c * VEC, vals);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) q_tile[r * head_dim + c * VEC + e] = vals[e];
    }

    // This warp's rows: where each query sits and the keys it sees (first ..= pos).
    bool valid[ROWS_PER_WARP];
    int pos[ROWS_PER_WARP];
    int first[ROWS_PER_WARP];
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
        const int row = row0 + warp * ROWS_PER_WARP + rr;
        valid[rr] = row < num_rows;
        pos[rr] = pos0 + row / group;
        first[rr] = first_visible_key(pos[rr], cfg);
    }
    // Keys any row of the block sees: from the first query's window start to the last query.
    const int last_row = min(row0 + PREFILL_ROWS, num_rows) - 1;
    const int key_lo = first_visible_key(pos0 + row0 / group, cfg);
    const int key_hi = pos0 + last_row / group;

    float row_max[ROWS_PER_WARP];
    float row_sum[ROWS_PER_WARP];
    float acc[ROWS_PER_WARP][DIMS_PER_LANE];
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
        row_max[rr] = -INFINITY;
        row_sum[rr] = 0.0f;
#pragma unroll
        for (int x = 0; x < DIMS_PER_LANE; ++x) acc[rr][x] = 0.0f;
    }

    const float* q_rows = q_tile + warp * ROWS_PER_WARP * head_dim;
    for (int tile = key_lo; tile <= key_hi; tile += PREFILL_KEYS) {
        __syncthreads();  // Q is loaded; the previous tile is no longer read
        load_kv_tile(k_tile, v_tile, k_cache, v_cache, block_table, tile, key_hi, kv_head, cfg);
        __syncthreads();

        // Scores: lane j takes key tile + j against the warp's rows (Q reads are broadcasts).
        float dot[ROWS_PER_WARP] = {};
        const float* k_row = k_tile + lane * (head_dim + 1);
        for (int d = 0; d < head_dim; d += 4) {
            const float k0 = k_row[d], k1 = k_row[d + 1], k2 = k_row[d + 2], k3 = k_row[d + 3];
#pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
                const float4 qq = *reinterpret_cast<const float4*>(q_rows + rr * head_dim + d);
                dot[rr] += qq.x * k0 + qq.y * k1 + qq.z * k2 + qq.w * k3;
            }
        }

        // Online softmax (running max and sum per row, accumulator rescaled when the max grows).
        const int key = tile + lane;
        float p[ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
            const bool visible = valid[rr] && key >= first[rr] && key <= pos[rr];
            const float score = visible ? finish_score(dot[rr], cfg) : -INFINITY;
            const float new_max = fmaxf(row_max[rr], warp_max(score));
            // new_max is -inf while the row has seen no key: keep its state at zero.
            const float alpha = new_max == -INFINITY ? 1.0f : expf(row_max[rr] - new_max);
            p[rr] = visible ? expf(score - new_max) : 0.0f;
            row_sum[rr] = row_sum[rr] * alpha + warp_sum(p[rr]);
            row_max[rr] = new_max;
#pragma unroll
            for (int x = 0; x < DIMS_PER_LANE; ++x) acc[rr][x] *= alpha;
        }

        // P V: lane owns dims lane, lane + 32, ...; p of key j is broadcast from lane j.
        for (int j = 0; j < PREFILL_KEYS; ++j) {
            float pj[ROWS_PER_WARP];
#pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; ++rr) pj[rr] = __shfl_sync(FULL_MASK, p[rr], j);
            const float* v_row = v_tile + j * head_dim;
#pragma unroll
            for (int x = 0; x < DIMS_PER_LANE; ++x) {
                const int d = lane + 32 * x;
                if (d < head_dim) {
                    const float v = v_row[d];
#pragma unroll
                    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) acc[rr][x] += pj[rr] * v;
                }
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
        if (!valid[rr]) continue;
        const int row = row0 + warp * ROWS_PER_WARP + rr;
        const int head = kv_head * group + row % group;
        const size_t token = info.query_start + row / group;
        T* out_row = out + (token * cfg.num_heads + head) * head_dim;
        // Every valid row sees at least its own key, so row_sum > 0.
        const float inv_sum = 1.0f / row_sum[rr];
#pragma unroll
        for (int x = 0; x < DIMS_PER_LANE; ++x) {
            const int d = lane + 32 * x;
            if (d < head_dim) out_row[d] = from_float<T>(acc[rr][x] * inv_sum);
        }
    }
}

}  // namespace ferrite

#define FERRITE_PREFILL(T, SUFFIX)                                                                     \
    extern "C" __global__ void __launch_bounds__(ferrite::PREFILL_THREADS) paged_attention_prefill_##SUFFIX( \
        T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,                     \
        const T* __restrict__ v_cache, const uint32_t* __restrict__ seq_info,                            \
        const uint32_t* __restrict__ block_tables, const uint32_t* __restrict__ work,                    \
        const ferrite::AttnConfig cfg) {                                                                 \
        ferrite::paged_attention_prefill<T>(out, q, k_cache, v_cache, seq_info, block_tables, work, cfg); \
    }

FERRITE_PREFILL(float, f32)
FERRITE_PREFILL(__half, f16)
FERRITE_PREFILL(__nv_bfloat16, bf16)
