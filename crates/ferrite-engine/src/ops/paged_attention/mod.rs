//! Paged attention over a block-table KV cache, for one flat batch of many sequences.
//!
//! The cache of a layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and for V.
//! [`write_kv`] stores the step's new K/V rows at their slots (`slot_mapping`), then
//! [`paged_attention`] attends each sequence's queries over its whole context through its block
//! table: causal inside the chunk (query `i` of a sequence sits at position
//! `context_len - query_len + i`), an optional sliding window, GQA by head grouping, optional
//! logit soft-capping. No per-sequence contiguous copy, no padding, no `[T, T]` mask.
//!
//! The CPU version (`cpu`) is the reference: f32 accumulation whatever the storage dtype, one
//! rayon task per (token, KV head) group of output rows, vectorized with the widest SIMD the CPU
//! has (f32 caches with a head_dim that is a multiple of 8 take the AVX2 kernel in `avx2`). With
//! the `cuda` feature the same ops run ferrite's own kernels (`cuda`: `kernels/`, launched
//! through `ferrite_kernels`) after the same host-side checks; tests/cuda_ops.rs compares the
//! two. The cache write is `cache`; this file holds the metadata and the entry points.

use candle_core::{DType, Tensor};

mod avx2;
mod cache;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

/// One sequence's view of the flat batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqAttention {
    /// Index of the sequence's first query row in the flat batch.
    pub query_start: usize,
    /// Number of query rows (tokens scheduled this step).
    pub query_len: usize,
    /// Tokens in the context after this step (cached before + scheduled now).
    pub context_len: usize,
    /// Cache block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// Per-step attention metadata, built once per forward and shared by every layer. Read-only
/// once built, so that on a GPU the first layer uploads it and the others reuse the upload.
#[derive(Debug, Clone, Default)]
pub struct AttentionMetadata {
    slot_mapping: Vec<u32>,
    seqs: Vec<SeqAttention>,
    block_size: usize,
    /// The metadata on the GPU, as the kernels read it (a clone starts without it, unless it
    /// shares a graph's uploads).
    #[cfg(feature = "cuda")]
    uploads: cuda::Uploads,
}

#[cfg(feature = "cuda")]
pub use cuda::GraphUploads;

impl AttentionMetadata {
    /// `slot_mapping`: for each token of the flat batch, the cache slot (`block * block_size +
    /// offset`) its K/V go to, or [`PAD_SLOT`]; `seqs`: each sequence's share of the batch, in
    /// token order.
    pub fn new(slot_mapping: Vec<u32>, seqs: Vec<SeqAttention>, block_size: usize) -> Self {
        Self {
            slot_mapping,
            seqs,
            block_size,
            #[cfg(feature = "cuda")]
            uploads: cuda::Uploads::default(),
        }
    }

    /// This metadata's device copies live in `uploads`, a captured CUDA graph's buffers, and
    /// its launch plans are [bucketed](ferrite_kernels::plan::PlanShape::Bucketed).
    #[cfg(feature = "cuda")]
    pub fn with_graph_uploads(mut self, uploads: &GraphUploads) -> Self {
        self.uploads = cuda::Uploads::graph(uploads);
        self
    }

    pub fn slot_mapping(&self) -> &[u32] {
        &self.slot_mapping
    }

    pub fn seqs(&self) -> &[SeqAttention] {
        &self.seqs
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }
}

/// The slot of a row that only pads a batch up to a captured CUDA graph's size: [`write_kv`]
/// skips it (its K/V go nowhere), and nothing reads its output row.
pub const PAD_SLOT: u32 = u32::MAX;

/// Per-layer constants of the attention op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    pub scale: f32,
    /// A query at position p sees keys at positions `p - window + 1 ..= p` (Mistral's definition).
    pub sliding_window: Option<usize>,
    /// Scores become `cap * tanh(score / cap)` (Gemma 2).
    pub softcap: Option<f32>,
}

fn bail(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// Writes `key` and `value` (`[num_tokens, num_kv_heads, head_dim]`) into the caches at the
/// slots `meta.slot_mapping` names.
pub fn write_kv(
    key: &Tensor,
    value: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
) -> candle_core::Result<()> {
    let op = cache::WriteSlots { meta, slot_mapping: &meta.slot_mapping };
    k_cache.inplace_op2(&key.contiguous()?, &op)?;
    v_cache.inplace_op2(&value.contiguous()?, &op)
}

/// q: `[num_tokens, num_heads, head_dim]`; caches `[num_blocks, block_size, num_kv_heads,
/// head_dim]`. Returns `[num_tokens, num_heads, head_dim]`. The step's K/V must already be in the
/// cache ([`write_kv`]).
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    params: &AttentionParams,
) -> candle_core::Result<Tensor> {
    let op = cpu::PagedAttention { meta, params };
    let q = q.contiguous()?;
    // The CUDA kernels load 8 elements (16 bytes) at a time from the start of q: a view that
    // starts mid-vector (rare: a narrowed fused projection) gets its own, aligned copy.
    let q = if q.device().is_cuda() && !q.layout().start_offset().is_multiple_of(8) {
        q.force_contiguous()?
    } else {
        q
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// The element types the CPU op stores; arithmetic is f32.
trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The storage as f32, where it is f32 (the AVX2 kernel's case).
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}
impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}
impl Elem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
impl Elem for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

fn write_dtype_error(cache: DType, src: DType) -> candle_core::Error {
    bail(format!("write_kv: cache dtype {cache:?} and K/V dtype {src:?} must match and be f32, f16 or bf16"))
}

fn attention_dtype_error(q: DType, k: DType, v: DType) -> candle_core::Error {
    bail(format!("paged_attention: q {q:?}, K {k:?}, V {v:?} must share one of f32, f16, bf16"))
}

/// Allocates zeroed K and V caches of `[num_blocks, block_size, num_kv_heads, head_dim]`.
pub fn alloc_cache(
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let shape = (num_blocks, block_size, num_kv_heads, head_dim);
    Ok((Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// One sequence of the test batch: its whole context's K/V, dense, and how much of it is
    /// queried this step.
    struct Case {
        context_len: usize,
        query_len: usize,
    }

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// Dense reference: softmax(q k^T * scale + mask) v for one sequence, with an explicit
    /// mask built from positions, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        case: &Case,
        heads: usize,
        kv_heads: usize,
        d: usize,
        params: &AttentionParams,
    ) -> Vec<f32> {
        let mut out = vec![0f32; case.query_len * heads * d];
        let group = heads / kv_heads;
        for i in 0..case.query_len {
            let pos = case.context_len - case.query_len + i;
            for h in 0..heads {
                let kh = h / group;
                let mut scores = vec![f64::NEG_INFINITY; case.context_len];
                for (j, score) in scores.iter_mut().enumerate() {
                    let visible = j <= pos && params.sliding_window.is_none_or(|w| pos - j < w);
                    if visible {
                        let dot: f64 = (0..d)
                            .map(|x| {
                                f64::from(q[(i * heads + h) * d + x])
                                    * f64::from(k[(j * kv_heads + kh) * d + x])
                            })
                            .sum();
                        let mut s = dot * f64::from(params.scale);
                        if let Some(cap) = params.softcap {
                            s = f64::from(cap) * (s / f64::from(cap)).tanh();
                        }
                        *score = s;
                    }
                }
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for x in 0..d {
                    let acc: f64 = (0..case.context_len)
                        .map(|j| weights[j] * f64::from(v[(j * kv_heads + kh) * d + x]))
                        .sum();
                    out[(i * heads + h) * d + x] = (acc / total) as f32;
                }
            }
        }
        out
    }

    /// Fills a cache through shuffled block tables (earlier context written in a first step, the
    /// queried chunk in a second, as in chunked prefill) and compares with the dense reference.
    fn check(heads: usize, kv_heads: usize, params: AttentionParams, seed: u64) {
        check_shape(Heads { heads, kv_heads, head_dim: 8, block_size: 4 }, params, seed);
    }

    /// Head counts and sizes of one [`check_shape`] run.
    #[derive(Clone, Copy)]
    struct Heads {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
    }

    /// Dense K and V of every case's first `context_len - query_len` tokens, written into the
    /// cache through the cases' block tables.
    fn write_prefixes(
        cases: &[Case],
        tables: &[Vec<u32>],
        dense: &[(Vec<f32>, Vec<f32>, Vec<f32>)],
        shape: Heads,
        (kc, vc): (&Tensor, &Tensor),
    ) {
        let Heads { kv_heads, head_dim: d, block_size, .. } = shape;
        let mut slots = Vec::new();
        let (mut kp, mut vp) = (Vec::new(), Vec::new());
        for (c, (t, (_, k, v))) in cases.iter().zip(tables.iter().zip(dense)) {
            let cached = c.context_len - c.query_len;
            for pos in 0..cached {
                slots.push(t[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
            }
            kp.extend_from_slice(&k[..cached * kv_heads * d]);
            vp.extend_from_slice(&v[..cached * kv_heads * d]);
        }
        let n = slots.len();
        let meta = AttentionMetadata::new(slots, vec![], block_size);
        let kt = Tensor::from_vec(kp, (n, kv_heads, d), &Device::Cpu).unwrap();
        let vt = Tensor::from_vec(vp, (n, kv_heads, d), &Device::Cpu).unwrap();
        write_kv(&kt, &vt, kc, vc, &meta).unwrap();
    }

    fn check_shape(shape: Heads, params: AttentionParams, seed: u64) {
        let Heads { heads, kv_heads, head_dim: d, block_size } = shape;
        let cases = [
            Case { context_len: 1, query_len: 1 },
            Case { context_len: 13, query_len: 13 },
            Case { context_len: 30, query_len: 1 },
            Case { context_len: 21, query_len: 7 },
            Case { context_len: 40, query_len: 16 },
            // Past one 64-key chunk of the AVX2 kernel, with a tail of 8-key groups.
            Case { context_len: 203, query_len: 2 },
        ];
        let num_blocks = cases.iter().map(|c| c.context_len.div_ceil(block_size)).sum::<usize>() + 3;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let mut next_block = 0;
        let dev = Device::Cpu;
        let (kc, vc) = alloc_cache(num_blocks, block_size, kv_heads, d, DType::F32, &dev).unwrap();
        let mut tables = Vec::new();
        let mut dense = Vec::new();
        for c in &cases {
            let n = c.context_len.div_ceil(block_size);
            tables.push(ids[next_block..next_block + n].to_vec());
            next_block += n;
            let k = random(&mut rng, c.context_len * kv_heads * d);
            let v = random(&mut rng, c.context_len * kv_heads * d);
            let q = random(&mut rng, c.query_len * heads * d);
            dense.push((q, k, v));
        }
        // Step 1: the already-computed part of each context goes in through write_kv.
        write_prefixes(&cases, &tables, &dense, shape, (&kc, &vc));

        // Step 2: the queried chunk of every sequence, as one flat batch.
        let (mut slot_mapping, mut seqs) = (Vec::new(), Vec::new());
        let (mut qs, mut kn, mut vn) = (Vec::new(), Vec::new(), Vec::new());
        for (c, (t, (q, k, v))) in cases.iter().zip(tables.iter().zip(&dense)) {
            let cached = c.context_len - c.query_len;
            seqs.push(SeqAttention {
                query_start: slot_mapping.len(),
                query_len: c.query_len,
                context_len: c.context_len,
                block_table: t.clone(),
            });
            for pos in cached..c.context_len {
                slot_mapping.push(t[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
            }
            qs.extend_from_slice(q);
            kn.extend_from_slice(&k[cached * kv_heads * d..]);
            vn.extend_from_slice(&v[cached * kv_heads * d..]);
        }
        let meta = AttentionMetadata::new(slot_mapping, seqs, block_size);
        let t = meta.num_tokens();
        let q = Tensor::from_vec(qs, (t, heads, d), &dev).unwrap();
        let k = Tensor::from_vec(kn, (t, kv_heads, d), &dev).unwrap();
        let v = Tensor::from_vec(vn, (t, kv_heads, d), &dev).unwrap();
        write_kv(&k, &v, &kc, &vc, &meta).unwrap();
        let out = paged_attention(&q, &kc, &vc, &meta, &params).unwrap();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let mut row = 0;
        for (c, (q, k, v)) in cases.iter().zip(&dense) {
            let expected = naive(q, k, v, c, heads, kv_heads, d, &params);
            let got = &out[row * heads * d..(row + c.query_len) * heads * d];
            let err = expected.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(
                err < 1e-5,
                "head_dim {d}, block size {block_size}: context {} query {}: max abs error {err}",
                c.context_len,
                c.query_len
            );
            row += c.query_len;
        }
    }

    fn params(window: Option<usize>, softcap: Option<f32>) -> AttentionParams {
        AttentionParams { scale: 1.0 / 8f32.sqrt(), sliding_window: window, softcap }
    }

    #[test]
    fn matches_dense_attention_for_gqa_ratios() {
        for (heads, kv_heads) in [(4, 4), (4, 2), (8, 2)] {
            check(heads, kv_heads, params(None, None), heads as u64 * 10 + kv_heads as u64);
        }
    }

    #[test]
    fn matches_dense_attention_with_sliding_windows_and_softcap() {
        for window in [1, 5, 16] {
            check(4, 2, params(Some(window), None), window as u64);
        }
        check(8, 2, params(Some(9), Some(5.0)), 99);
    }

    /// Real head sizes (the f32 AVX2 kernel takes multiples of 8, in 64-column passes; 12 and
    /// 20 take the portable loop) at the block sizes servers use.
    #[test]
    fn matches_dense_attention_at_model_head_sizes() {
        for (head_dim, block_size) in [(64, 16), (128, 32), (80, 16), (96, 32), (12, 16), (20, 1)] {
            for (heads, kv_heads) in [(14, 2), (9, 3), (4, 4)] {
                let shape = Heads { heads, kv_heads, head_dim, block_size };
                let scale = 1.0 / (head_dim as f32).sqrt();
                check_shape(shape, AttentionParams { scale, ..params(None, None) }, head_dim as u64);
            }
        }
        let shape = Heads { heads: 8, kv_heads: 2, head_dim: 64, block_size: 16 };
        check_shape(shape, AttentionParams { scale: 0.125, ..params(Some(37), Some(3.0)) }, 7);
    }

    #[test]
    fn half_precision_caches_agree_with_f32() {
        let dev = Device::Cpu;
        let seq = SeqAttention { query_start: 0, query_len: 3, context_len: 3, block_table: vec![1, 0] };
        let meta = AttentionMetadata::new(vec![3, 0, 1], vec![seq], 2);
        let mut rng = StdRng::seed_from_u64(3);
        let q = Tensor::from_vec(random(&mut rng, 3 * 2 * 4), (3, 2, 4), &dev).unwrap();
        let k = Tensor::from_vec(random(&mut rng, 3 * 4), (3, 1, 4), &dev).unwrap();
        let v = Tensor::from_vec(random(&mut rng, 3 * 4), (3, 1, 4), &dev).unwrap();
        let p = params(None, None);
        let run = |dt: DType| {
            let (kc, vc) = alloc_cache(2, 2, 1, 4, dt, &dev).unwrap();
            write_kv(&k.to_dtype(dt).unwrap(), &v.to_dtype(dt).unwrap(), &kc, &vc, &meta).unwrap();
            let o = paged_attention(&q.to_dtype(dt).unwrap(), &kc, &vc, &meta, &p).unwrap();
            o.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let full = run(DType::F32);
        for dt in [DType::F16, DType::BF16] {
            let err = full.iter().zip(run(dt)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 2e-2, "{dt:?}: {err}");
        }
    }

    #[test]
    fn bad_shapes_and_tables_are_errors_not_reads() {
        let dev = Device::Cpu;
        let (kc, vc) = alloc_cache(2, 2, 1, 4, DType::F32, &dev).unwrap();
        let q = Tensor::zeros((1, 2, 4), DType::F32, &dev).unwrap();
        let p = params(None, None);
        let meta = |table: Vec<u32>, context_len| {
            let seq = SeqAttention { query_start: 0, query_len: 1, context_len, block_table: table };
            AttentionMetadata::new(vec![0], vec![seq], 2)
        };
        assert!(paged_attention(&q, &kc, &vc, &meta(vec![5], 1), &p).is_err(), "block id outside the cache");
        assert!(paged_attention(&q, &kc, &vc, &meta(vec![0], 3), &p).is_err(), "table shorter than context");
        let wrong_dim = Tensor::zeros((1, 2, 3), DType::F32, &dev).unwrap();
        assert!(paged_attention(&wrong_dim, &kc, &vc, &meta(vec![0], 1), &p).is_err());
        let k = Tensor::zeros((1, 1, 4), DType::F32, &dev).unwrap();
        let far = AttentionMetadata::new(vec![4], meta(vec![0], 1).seqs().to_vec(), 2);
        assert!(write_kv(&k, &k, &kc, &vc, &far).is_err(), "slot outside the cache");
        let err = paged_attention(&q, &kc, &vc, &meta(vec![0], 1), &params(Some(0), None)).unwrap_err();
        assert!(err.to_string().contains("sliding window of 0"), "{err}");
    }

    #[test]
    fn padding_rows_write_nothing() {
        let dev = Device::Cpu;
        let (kc, vc) = alloc_cache(2, 2, 1, 4, DType::F32, &dev).unwrap();
        let k = Tensor::arange(1f32, 9., &dev).unwrap().reshape((2, 1, 4)).unwrap();
        let seqs = vec![
            SeqAttention { query_start: 0, query_len: 1, context_len: 2, block_table: vec![1] },
            SeqAttention { query_start: 1, query_len: 1, context_len: 1, block_table: vec![0] },
        ];
        let meta = AttentionMetadata::new(vec![3, PAD_SLOT], seqs, 2);
        write_kv(&k, &k, &kc, &vc, &meta).unwrap();
        let cache = kc.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Slot 3 (block 1, offset 1) holds row 0; nothing else was written.
        let mut want = vec![0f32; 16];
        want[12..16].copy_from_slice(&[1., 2., 3., 4.]);
        assert_eq!(cache, want);
    }
}
