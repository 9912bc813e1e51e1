// Samples a step's plain rows where the logits are (the CUDA side of `sample_rows`,
// crates/ferrite-engine/src/sampler/device.rs). The reference it follows is `pick_row` in
// crates/ferrite-engine/src/sampler/mod.rs: the first maximum when greedy, else the token where the
// running sum of weights exp((logit - max) * inv_temperature), those under min_p left out, first
// passes u times their total; the logprob is the raw row's log-softmax at that token.
//
// logits: [num_rows, vocab] f32, row-major
// picks:  [num_picks] PickRow: which row, and how (the host checked every row is in range)
// out:    [num_picks, 2] u32: the token id, then the bits of its f32 logprob
//
// Launch: grid (num_picks), block SAMPLE_THREADS. The maximum and the normalizer read the row
// strided (thread t takes t, t + SAMPLE_THREADS, ...: each warp load is one coalesced line);
// a draw needs order, so there thread t owns the contiguous span [t * span, (t + 1) * span):
// the spans' weight sums, their prefix sums across the block (f64), and one walk through the
// span that holds the target. (256 threads walking contiguous spans for all three passes
// took 239 us for one greedy row of 151,936 logits on an H200.)
#include <climits>

#include "common.cuh"

namespace ferrite {

constexpr int SAMPLE_THREADS = 1024;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;

// Mirrors the six u32 words per pick that `sample_rows` uploads.
struct PickRow {
    uint32_t row;
    float inv_temperature;  // 0: greedy
    float min_p;            // 0: none
    uint32_t pad;
    double u;               // the sequence's uniform draw in [0, 1)
};

// A weight as the CPU sampler counts it (`exp_nonpositive`, crates/ferrite-engine/src/ops/
// math.rs): 0 below an exponent of -87 (f32's smallest normal), for NaN and masked logits, and
// under min_p.
__device__ __forceinline__ float pick_weight(float v, float row_max, float inv_temperature, float min_p) {
    const float x = (v - row_max) * inv_temperature;
    const float w = x >= -87.0f ? expf(x) : 0.0f;
    return w >= min_p ? w : 0.0f;
}

// Block-wide (value, index) maximum, lower index on equal values; every thread gets it.
__device__ __forceinline__ void block_argmax(float& value, int& index, float* vals, int* idxs) {
    for (int offset = 16; offset > 0; offset /= 2) {
        const float v = __shfl_xor_sync(FULL_MASK, value, offset);
        const int i = __shfl_xor_sync(FULL_MASK, index, offset);
        if (v > value || (v == value && i < index)) {
            value = v;
            index = i;
        }
    }
    __syncthreads();
    if (threadIdx.x % 32 == 0) {
        vals[threadIdx.x / 32] = value;
        idxs[threadIdx.x / 32] = index;
    }
    __syncthreads();
    value = vals[0];
    index = idxs[0];
#pragma unroll
    for (int w = 1; w < SAMPLE_WARPS; ++w) {
        if (vals[w] > value || (vals[w] == value && idxs[w] < index)) {
            value = vals[w];
            index = idxs[w];
        }
    }
}

// Inclusive prefix sum of `v` over the block's threads, in thread order; `total` gets the sum.
__device__ __forceinline__ double block_inclusive_scan_f64(double v, double* scratch, double& total) {
    const int lane = threadIdx.x % 32;
    for (int offset = 1; offset < 32; offset *= 2) {
        const double up = __shfl_up_sync(FULL_MASK, v, offset);
        if (lane >= offset) v += up;
    }
    __syncthreads();
    if (lane == 31) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    double before = 0.0;
    total = 0.0;
#pragma unroll
    for (int w = 0; w < SAMPLE_WARPS; ++w) {
        if (w < (int)threadIdx.x / 32) before += scratch[w];
        total += scratch[w];
    }
    return before + v;
}

__device__ void sample_row(const float* __restrict__ logits, const PickRow* __restrict__ picks,
                           uint32_t* __restrict__ out, int vocab) {
    __shared__ float vals[SAMPLE_WARPS];
    __shared__ int idxs[SAMPLE_WARPS];
    __shared__ double scratch[SAMPLE_WARPS];
    __shared__ int chosen;

    const PickRow pick = picks[blockIdx.x];
    const float* row = logits + (size_t)pick.row * vocab;
    const int span = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int begin = min(vocab, (int)threadIdx.x * span);
    const int end = min(vocab, begin + span);

    // The first maximum (NaN is never above anything; no element above -inf: token 0). Each
    // thread meets its indices in increasing order, so its first maximum is its lowest index.
    float row_max = -INFINITY;
    int argmax = vocab;
    int has_nan = 0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        const float v = row[i];
        has_nan |= isnan(v);
        if (v > row_max) {
            row_max = v;
            argmax = i;
        }
    }
    has_nan = __syncthreads_or(has_nan);
    block_argmax(row_max, argmax, vals, idxs);
    if (argmax == vocab) argmax = 0;

    // The raw log-softmax's normalizer, for the chosen token's logprob.
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) sum += pick_weight(row[i], row_max, 1.0f, 0.0f);
    const double ln_sum = has_nan ? (double)NAN : log(block_sum<SAMPLE_WARPS>(sum, scratch));

    int token = argmax;
    const float inv_t = pick.inv_temperature;
    const bool drawable = inv_t != 0.0f && isfinite(inv_t) && isfinite(row_max);
    if (drawable) {
        double mine = 0.0;
        for (int i = begin; i < end; ++i) mine += pick_weight(row[i], row_max, inv_t, pick.min_p);
        double total;
        const double through = block_inclusive_scan_f64(mine, scratch, total);
        const double before = through - mine;
        const double target = pick.u * total;
        if (threadIdx.x == 0) chosen = INT_MAX;
        __syncthreads();
        // Every span that ends past the target claims its token; the first such span wins.
        // (The scan's sums are not exactly contiguous from span to span: a later claimant
        // whose start rounded past the target takes its first kept token, and loses anyway.)
        if (mine > 0.0 && target < through) {
            // Walk the span; rounding within it: its last kept token.
            double left = target - before;
            int found = -1, last = -1;
            for (int i = begin; i < end; ++i) {
                const float w = pick_weight(row[i], row_max, inv_t, pick.min_p);
                if (w > 0.0f) {
                    last = i;
                    if (left < w) {
                        found = i;
                        break;
                    }
                    left -= w;
                }
            }
            atomicMin(&chosen, found >= 0 ? found : last);
        }
        __syncthreads();
        if (chosen != INT_MAX) {
            token = chosen;
        } else {
            // The target rounded past every span: the row's last kept token.
            int last = -1;
            for (int i = end - 1; i >= begin; --i) {
                if (pick_weight(row[i], row_max, inv_t, pick.min_p) > 0.0f) {
                    last = i;
                    break;
                }
            }
            float key = (float)last;  // exact: vocab < 2^24, checked by the host
            block_argmax(key, last, vals, idxs);
            if (last >= 0) token = last;
        }
    }
    if (threadIdx.x == 0) {
        const float logprob = (float)((double)(row[token] - row_max) - ln_sum);
        out[2 * (size_t)blockIdx.x] = (uint32_t)token;
        out[2 * (size_t)blockIdx.x + 1] = __float_as_uint(logprob);
    }
}

}  // namespace ferrite

extern "C" __global__ void __launch_bounds__(ferrite::SAMPLE_THREADS)
    sample_rows_f32(const float* __restrict__ logits, const ferrite::PickRow* __restrict__ picks,
                    uint32_t* __restrict__ out, int vocab) {
    ferrite::sample_row(logits, picks, out, vocab);
}
