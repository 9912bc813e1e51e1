// Paged attention for decode steps: one query per sequence (every query_len is 1), so query
// row `query_start` sits at position context_len - 1 and sees the keys
// first_visible_key(pos) ..= pos.
//
// Flash-decoding split (Dao et al., "Flash-Decoding for long-context inference", 2023; the
// same two-pass shape as vLLM's paged_attention_v2): the visible keys of a sequence are cut
// into partitions of `partition_keys` (a power of two, at most PARTITION_KEYS; the host picks
// it per call so that a small batch still fills the card), one thread block per (heads,
// sequence, partition), so a long context spreads over many SMs even at batch 1. A sequence with one partition writes its
// output directly; otherwise each partition writes its normalized partial output with its max
// score and exp-sum, and `paged_attention_decode_reduce_*` merges them. A block serves up to
// DECODE_HEADS query heads of one KV head's group, so each K/V row it reads serves them all
// (the KV traffic of a GQA model is divided by its group size, up to 8).
//
// Launch (both kernels): block DECODE_THREADS threads, no dynamic shared memory.
//   paged_attention_decode_*:        grid (num_kv_heads * ceil(group / DECODE_HEADS), num_seqs,
//                                          max_partitions), group = num_heads / num_kv_heads
//   paged_attention_decode_reduce_*: grid (num_heads, num_seqs), only when max_partitions > 1
// max_partitions = max over sequences of ceil(visible keys / partition_keys) (host side:
// `visible_keys` and `decode_partition_keys` in crates/ferrite-kernels/src/plan.rs).
//
// Tensors: q and out [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size,
// num_kv_heads, head_dim]; part_out [num_seqs, num_heads, max_partitions, head_dim] (f32);
// part_max, part_sum [num_seqs, num_heads, max_partitions] (f32). The host checked shapes,
// block ids, alignment and head_dim (multiple of VEC, at most MAX_HEAD_DIM) before launch.
#include "common.cuh"

namespace ferrite {

constexpr int DECODE_THREADS = 128;
constexpr int DECODE_WARPS = DECODE_THREADS / 32;
// Query heads of one GQA group a decode block serves (a larger group takes several blocks).
// Mirrored by `DECODE_HEADS` in crates/ferrite-kernels/src/plan.rs.
constexpr int DECODE_HEADS = 8;
// The largest partition (sizes the scores in shared memory). Mirrored by
// `DECODE_PARTITION_KEYS` in crates/ferrite-kernels/src/plan.rs.
constexpr int PARTITION_KEYS = 512;
// Partition weights the reduce kernel stages in shared memory at a time.
constexpr int REDUCE_CHUNK = 1024;

// The keys one decode query sees, cut into partitions.
struct DecodeSpan {
    int first;           // first visible key position
    int num_keys;        // visible keys
    int num_partitions;  // ceil(num_keys / partition_keys)
};

__device__ __forceinline__ DecodeSpan decode_span(const SeqInfo& info, const AttnConfig& cfg,
                                                  int partition_keys) {
    const int pos = static_cast<int>(info.context_len) - 1;
    const int first = first_visible_key(pos, cfg);
    const int num_keys = pos - first + 1;
    return DecodeSpan{first, num_keys, (num_keys + partition_keys - 1) / partition_keys};
}

// Threads that share one key row: one VEC-chunk of head_dim each, rounded up to a power of
// two (head_dim 128 -> 16 lanes, so a warp reads two key rows per step).
__device__ __forceinline__ int lanes_per_key(int chunks) {
    int lanes = 1;
    while (lanes < chunks) lanes *= 2;
    return lanes;
}

template <typename T>
__device__ void paged_attention_decode(T* __restrict__ out, float* __restrict__ part_out,
                                       float* __restrict__ part_max, float* __restrict__ part_sum,
                                       const T* __restrict__ q, const T* __restrict__ k_cache,
                                       const T* __restrict__ v_cache,
                                       const uint32_t* __restrict__ seq_info,
                                       const uint32_t* __restrict__ block_tables,
                                       const AttnConfig cfg, const int max_partitions,
                                       const int partition_keys) {
    const int group_size = cfg.num_heads / cfg.num_kv_heads;
    const int head_blocks = (group_size + DECODE_HEADS - 1) / DECODE_HEADS;
    const int kv_head = blockIdx.x / head_blocks;
    const int first_head = kv_head * group_size + (blockIdx.x % head_blocks) * DECODE_HEADS;
    // Query heads of this block: uniform over the block, at most DECODE_HEADS.
    const int heads = min(DECODE_HEADS, kv_head * group_size + group_size - first_head);
    const int seq = blockIdx.y;
    const int partition = blockIdx.z;
    const SeqInfo info = load_seq_info(seq_info, seq);
    const DecodeSpan span = decode_span(info, cfg, partition_keys);
    if (partition >= span.num_partitions) return;  // uniform over the block

    const int head_dim = cfg.head_dim;
    const int key_begin = span.first + partition * partition_keys;
    const int num_keys = min(partition_keys, span.num_keys - partition * partition_keys);
    const int chunks = head_dim / VEC;
    const int lanes = lanes_per_key(chunks);
    const int key_groups = DECODE_THREADS / lanes;
    const int group = threadIdx.x / lanes;
    const int lane = threadIdx.x % lanes;
    const bool has_chunk = lane < chunks;
    const uint32_t* block_table = block_tables + (size_t)seq * cfg.max_blocks_per_seq;
    const size_t first_row = ((size_t)info.query_start * cfg.num_heads + first_head) * head_dim;

    __shared__ float logits[DECODE_HEADS][PARTITION_KEYS];
    // [key_groups, head_dim]: key_groups * head_dim <= (DECODE_THREADS / lanes) * (VEC * lanes).
    __shared__ float group_out[DECODE_THREADS * VEC];
    __shared__ float scratch[DECODE_WARPS];

    // The block's query rows (adjacent heads): each K and V row is read once for all of them.
    // Loops over h run to DECODE_HEADS with `h < heads` guards, so the arrays stay in registers.
    float qv[DECODE_HEADS][VEC] = {};
#pragma unroll
    for (int h = 0; h < DECODE_HEADS; ++h) {
        if (h < heads && has_chunk) load_vec(q + first_row + (size_t)h * head_dim + lane * VEC, qv[h]);
    }

    // Scores. Every thread runs the same number of iterations so the group shuffles always
    // see full warps.
    for (int base = 0; base < num_keys; base += key_groups) {
        const int i = base + group;
        float dot[DECODE_HEADS] = {};
        if (i < num_keys && has_chunk) {
            float kv[VEC];
            load_vec(k_cache + cache_row_offset(block_table, key_begin + i, kv_head, cfg) + lane * VEC, kv);
#pragma unroll
            for (int h = 0; h < DECODE_HEADS; ++h) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) dot[h] += qv[h][e] * kv[e];
            }
        }
#pragma unroll
        for (int h = 0; h < DECODE_HEADS; ++h) {
            if (h < heads) {
                const float d = group_sum(dot[h], lanes);
                if (i < num_keys && lane == 0) logits[h][i] = finish_score(d, cfg);
            }
        }
    }
    __syncthreads();

    // Exact softmax over the partition for each head (max, then exp and sum), f32.
    float max_score[DECODE_HEADS], exp_sum[DECODE_HEADS];
#pragma unroll
    for (int h = 0; h < DECODE_HEADS; ++h) {
        max_score[h] = -INFINITY;
        exp_sum[h] = 0.0f;
        if (h >= heads) continue;
        float m = -INFINITY;
        for (int i = threadIdx.x; i < num_keys; i += DECODE_THREADS) m = fmaxf(m, logits[h][i]);
        m = block_max<DECODE_WARPS>(m, scratch);
        float sum = 0.0f;
        for (int i = threadIdx.x; i < num_keys; i += DECODE_THREADS) {
            const float p = expf(logits[h][i] - m);
            logits[h][i] = p;
            sum += p;
        }
        max_score[h] = m;
        exp_sum[h] = block_sum<DECODE_WARPS>(sum, scratch);  // its barrier publishes `logits[h]`
    }

    // Weighted sum of V: each group accumulates its keys for every head, reading each V row
    // once; then the groups are summed, one head at a time.
    float acc[DECODE_HEADS][VEC] = {};
    if (has_chunk) {
        for (int i = group; i < num_keys; i += key_groups) {
            float vv[VEC];
            load_vec(v_cache + cache_row_offset(block_table, key_begin + i, kv_head, cfg) + lane * VEC, vv);
#pragma unroll
            for (int h = 0; h < DECODE_HEADS; ++h) {
                if (h >= heads) continue;
                const float p = logits[h][i];
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[h][e] += p * vv[e];
            }
        }
    }
#pragma unroll
    for (int h = 0; h < DECODE_HEADS; ++h) {
        if (h >= heads) continue;
        if (has_chunk) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) group_out[group * head_dim + lane * VEC + e] = acc[h][e];
        }
        __syncthreads();
        const int head = first_head + h;
        const float inv_sum = 1.0f / exp_sum[h];
        const size_t part = ((size_t)seq * cfg.num_heads + head) * max_partitions + partition;
        for (int d = threadIdx.x; d < head_dim; d += DECODE_THREADS) {
            float o = 0.0f;
            for (int g = 0; g < key_groups; ++g) o += group_out[g * head_dim + d];
            if (span.num_partitions == 1) {
                out[first_row + (size_t)h * head_dim + d] = from_float<T>(o * inv_sum);
            } else {
                part_out[part * head_dim + d] = o * inv_sum;
            }
        }
        if (span.num_partitions > 1 && threadIdx.x == 0) {
            part_max[part] = max_score[h];
            part_sum[part] = exp_sum[h];
        }
        __syncthreads();  // group_out is rewritten for the next head
    }
}

// Merges the partitions of one (head, sequence): weights exp_sum_p * exp(max_p - max) over the
// normalized partial outputs (the log-sum-exp merge of flash-decoding).
template <typename T>
__device__ void paged_attention_decode_reduce(T* __restrict__ out, const float* __restrict__ part_out,
                                              const float* __restrict__ part_max,
                                              const float* __restrict__ part_sum,
                                              const uint32_t* __restrict__ seq_info,
                                              const AttnConfig cfg, const int max_partitions,
                                              const int partition_keys) {
    const int head = blockIdx.x;
    const int seq = blockIdx.y;
    const SeqInfo info = load_seq_info(seq_info, seq);
    const int num_partitions = decode_span(info, cfg, partition_keys).num_partitions;
    if (num_partitions <= 1) return;  // written directly by the first kernel

    const int head_dim = cfg.head_dim;
    const size_t base = ((size_t)seq * cfg.num_heads + head) * max_partitions;
    __shared__ float scratch[DECODE_WARPS];
    __shared__ float weights[REDUCE_CHUNK];

    float max_score = -INFINITY;
    for (int p = threadIdx.x; p < num_partitions; p += DECODE_THREADS) {
        max_score = fmaxf(max_score, part_max[base + p]);
    }
    max_score = block_max<DECODE_WARPS>(max_score, scratch);
    float total = 0.0f;
    for (int p = threadIdx.x; p < num_partitions; p += DECODE_THREADS) {
        total += part_sum[base + p] * expf(part_max[base + p] - max_score);
    }
    total = block_sum<DECODE_WARPS>(total, scratch);

    constexpr int DIMS_PER_THREAD = MAX_HEAD_DIM / DECODE_THREADS;
    float acc[DIMS_PER_THREAD] = {};
    for (int p0 = 0; p0 < num_partitions; p0 += REDUCE_CHUNK) {
        const int count = min(REDUCE_CHUNK, num_partitions - p0);
        __syncthreads();  // the previous chunk's weights are no longer read
        for (int p = threadIdx.x; p < count; p += DECODE_THREADS) {
            weights[p] = part_sum[base + p0 + p] * expf(part_max[base + p0 + p] - max_score);
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < DIMS_PER_THREAD; ++j) {
            const int d = threadIdx.x + j * DECODE_THREADS;
            if (d >= head_dim) break;
            for (int p = 0; p < count; ++p) acc[j] += weights[p] * part_out[(base + p0 + p) * head_dim + d];
        }
    }

    const float inv_total = 1.0f / total;
    const size_t out_row = ((size_t)info.query_start * cfg.num_heads + head) * head_dim;
#pragma unroll
    for (int j = 0; j < DIMS_PER_THREAD; ++j) {
        const int d = threadIdx.x + j * DECODE_THREADS;
        if (d < head_dim) out[out_row + d] = from_float<T>(acc[j] * inv_total);
    }
}

}  // namespace ferrite

#define FERRITE_DECODE(T, SUFFIX)                                                                    \
    extern "C" __global__ void __launch_bounds__(ferrite::DECODE_THREADS) paged_attention_decode_##SUFFIX( \
        T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,               \
        float* __restrict__ part_sum, const T* __restrict__ q, const T* __restrict__ k_cache,          \
        const T* __restrict__ v_cache, const uint32_t* __restrict__ seq_info,                          \
        const uint32_t* __restrict__ block_tables, const ferrite::AttnConfig cfg,                      \
        const int max_partitions, const int partition_keys) {                                          \
        ferrite::paged_attention_decode<T>(out, part_out, part_max, part_sum, q, k_cache, v_cache,     \
                                           seq_info, block_tables, cfg, max_partitions,               \
                                           partition_keys);                                           \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(ferrite::DECODE_THREADS)                             \
        paged_attention_decode_reduce_##SUFFIX(                                                        \
            T* __restrict__ out, const float* __restrict__ part_out,                                   \
            const float* __restrict__ part_max, const float* __restrict__ part_sum,                    \
            const uint32_t* __restrict__ seq_info, const ferrite::AttnConfig cfg,                      \
            const int max_partitions, const int partition_keys) {                                      \
        ferrite::paged_attention_decode_reduce<T>(out, part_out, part_max, part_sum, seq_info, cfg,   \
                                                  max_partitions, partition_keys);                     \
    }

FERRITE_DECODE(float, f32)
FERRITE_DECODE(__half, f16)
FERRITE_DECODE(__nv_bfloat16, bf16)
