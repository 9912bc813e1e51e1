//! Paged attention over a block-table KV cache, for one flat batch of many sequences.
//!
//! The cache of a layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and for V.
//! [`write_kv`] stores the step's new K/V rows at their slots (`slot_mapping`), then
//! [`paged_attention`] attends each sequence's queries over its whole context through its block
//! table: causal inside the chunk (query `i` of a sequence sits at position
//! `context_len - query_len + i`), an optional sliding window, GQA by head grouping, optional
//! logit soft-capping. No per-sequence contiguous copy, no padding, no `[T, T]` mask.
//!
//! The CPU version is the reference: f32 accumulation whatever the storage dtype, one rayon
//! task per (token, KV head) group of output rows, vectorized with the widest SIMD the CPU has
//! (f32 caches with a head_dim that is a multiple of 8 take the AVX2 kernel in `avx2`). With the
//! `cuda` feature the same ops run ferrite's own kernels (`kernels/`, launched through
//! `ferrite_kernels`) after the same host-side checks; tests/cuda_ops.rs compares the two.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::math::exp_nonpositive;
use super::simd::{self, SimdLevel};

mod avx2;

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
    let op = WriteSlots { meta, slot_mapping: &meta.slot_mapping };
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
    let op = PagedAttention { meta, params };
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

struct WriteSlots<'a> {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    meta: &'a AttentionMetadata,
    slot_mapping: &'a [u32],
}

/// Where a `write_kv` call reads and writes, checked before any copy.
struct WriteDims {
    /// Elements of one slot: `num_kv_heads * head_dim`.
    row_elems: usize,
    /// Element ranges of the cache and of the new K/V inside their storages.
    cache: std::ops::Range<usize>,
    src: std::ops::Range<usize>,
}

impl WriteSlots<'_> {
    /// Shapes, contiguity, and every slot inside the cache: a bad call is an error before
    /// anything is written (on the GPU, never an out-of-bounds write).
    fn check(&self, cache_l: &Layout, src_l: &Layout) -> candle_core::Result<WriteDims> {
        let (num_blocks, block_size, kv_heads, head_dim) = cache_l.shape().dims4()?;
        let (t, src_heads, src_dim) = src_l.shape().dims3()?;
        if (src_heads, src_dim) != (kv_heads, head_dim) || t != self.slot_mapping.len() {
            return Err(bail(format!(
                "write_kv: new K/V {:?} do not fit cache {:?} with {} slots",
                src_l.shape(),
                cache_l.shape(),
                self.slot_mapping.len()
            )));
        }
        let (Some((c0, c1)), Some((s0, s1))) = (cache_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            return Err(bail("write_kv: cache and K/V must be contiguous".into()));
        };
        let num_slots = num_blocks * block_size;
        if let Some(slot) = self.slot_mapping.iter().find(|&&s| s != PAD_SLOT && s as usize >= num_slots) {
            return Err(bail(format!("write_kv: slot {slot} is outside the cache ({num_slots} slots)")));
        }
        Ok(WriteDims { row_elems: kv_heads * head_dim, cache: c0..c1, src: s0..s1 })
    }

    fn write<T: Copy>(
        &self,
        cache: &mut [T],
        cache_l: &Layout,
        src: &[T],
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let w = self.check(cache_l, src_l)?;
        let cache = &mut cache[w.cache];
        let src = &src[w.src];
        let row = w.row_elems;
        for (token, &slot) in self.slot_mapping.iter().enumerate().filter(|(_, &s)| s != PAD_SLOT) {
            let slot = slot as usize;
            cache[slot * row..(slot + 1) * row].copy_from_slice(&src[token * row..(token + 1) * row]);
        }
        Ok(())
    }
}

impl InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "write-kv-slots"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => self.write(c, l1, s, l2),
            (CpuStorage::F16(c), CpuStorage::F16(s)) => self.write(c, l1, s, l2),
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => self.write(c, l1, s, l2),
            (c, s) => Err(write_dtype_error(c.dtype(), s.dtype())),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        self.cuda_write(s1, l1, s2, l2)
    }
}

fn write_dtype_error(cache: DType, src: DType) -> candle_core::Error {
    bail(format!("write_kv: cache dtype {cache:?} and K/V dtype {src:?} must match and be f32, f16 or bf16"))
}

fn attention_dtype_error(q: DType, k: DType, v: DType) -> candle_core::Error {
    bail(format!("paged_attention: q {q:?}, K {k:?}, V {v:?} must share one of f32, f16, bf16"))
}

struct PagedAttention<'a> {
    meta: &'a AttentionMetadata,
    params: &'a AttentionParams,
}

/// Shapes of one call, checked before any read.
#[derive(Clone, Copy)]
struct Dims {
    num_tokens: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

impl PagedAttention<'_> {
    fn check(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> candle_core::Result<Dims> {
        let (num_tokens, num_heads, head_dim) = lq.shape().dims3()?;
        let (num_blocks, block_size, num_kv_heads, kd) = lk.shape().dims4()?;
        if lk.shape() != lv.shape() {
            return Err(bail(format!(
                "paged_attention: K cache {:?} != V cache {:?}",
                lk.shape(),
                lv.shape()
            )));
        }
        if kd != head_dim || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(bail(format!(
                "paged_attention: q {:?} does not match cache {:?} (head_dim, or heads not a multiple of kv heads)",
                lq.shape(),
                lk.shape()
            )));
        }
        if block_size != self.meta.block_size || num_tokens != self.meta.num_tokens() {
            return Err(bail(format!(
                "paged_attention: metadata (block_size {}, {} tokens) does not match tensors (block_size {block_size}, {num_tokens} tokens)",
                self.meta.block_size,
                self.meta.num_tokens()
            )));
        }
        let mut covered = 0;
        for s in &self.meta.seqs {
            if s.query_start != covered || s.query_len == 0 || s.query_len > s.context_len {
                return Err(bail(format!("paged_attention: bad sequence ranges {s:?}")));
            }
            covered += s.query_len;
            if s.block_table.len() * block_size < s.context_len {
                return Err(bail(format!(
                    "paged_attention: block table of {} blocks cannot hold context of {} tokens",
                    s.block_table.len(),
                    s.context_len
                )));
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(bail(format!(
                    "paged_attention: block id {b} outside the cache ({num_blocks} blocks)"
                )));
            }
        }
        if covered != num_tokens {
            return Err(bail(format!("paged_attention: sequences cover {covered} of {num_tokens} tokens")));
        }
        if self.params.sliding_window == Some(0) {
            return Err(bail("paged_attention: a sliding window of 0 tokens sees no key".into()));
        }
        Ok(Dims { num_tokens, num_heads, num_kv_heads, head_dim, block_size })
    }

    fn run<T: Elem>(&self, d: Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        // token -> its sequence, so every output row is an independent task.
        let mut seq_of_token = Vec::with_capacity(d.num_tokens);
        for (i, s) in self.meta.seqs.iter().enumerate() {
            seq_of_token.extend(std::iter::repeat_n(i, s.query_len));
        }
        let group = d.num_heads / d.num_kv_heads;
        let mut out = vec![T::from_f32(0.0); d.num_tokens * d.num_heads * d.head_dim];
        let wide = simd::level();
        let f32_kernel = T::as_f32(k).is_some() && avx2::usable(d.head_dim);
        // One task per (token, KV head): the group's query heads are adjacent in q and out, and
        // each K/V row is read once for all of them. A step too small to keep every thread busy
        // that way (one long sequence on a many-core CPU) takes one task per head instead.
        let sub = if d.num_tokens * d.num_kv_heads < 2 * rayon::current_num_threads() { 1 } else { group };
        let rows = sub * d.head_dim;
        out.par_chunks_mut(rows).enumerate().for_each_init(
            || RowScratch {
                q: vec![0f32; rows],
                acc: vec![0f32; rows],
                scores: Vec::new(),
                max: Vec::with_capacity(sub),
                offsets: Vec::new(),
            },
            |scratch, (task, out_rows)| {
                let tasks_per_token = d.num_heads / sub;
                let token = task / tasks_per_token;
                let first_head = (task % tasks_per_token) * sub;
                let kv_head = first_head / group;
                let seq = &self.meta.seqs[seq_of_token[token]];
                let pos = seq.context_len - seq.query_len + (token - seq.query_start);
                let first_q = (token * d.num_heads + first_head) * d.head_dim;
                let job = RowJob {
                    q_rows: &q[first_q..first_q + rows],
                    group: sub,
                    k,
                    v,
                    block_table: &seq.block_table,
                    first: match self.params.sliding_window {
                        Some(w) => (pos + 1).saturating_sub(w),
                        None => 0,
                    },
                    last: pos,
                    kv_offset: kv_head * d.head_dim,
                    dims: d,
                    params: self.params,
                };
                if f32_kernel {
                    attend_row_f32(&job, scratch, out_rows);
                } else {
                    attend_row_dispatch(wide, &job, scratch, out_rows);
                }
            },
        );
        out
    }
}

/// The output rows of some of one token's query heads that share a KV head (all of its GQA
/// group, or one), against their visible keys.
struct RowJob<'a, T> {
    /// `group` query rows, one per head.
    q_rows: &'a [T],
    group: usize,
    k: &'a [T],
    v: &'a [T],
    block_table: &'a [u32],
    /// Visible key positions: `first..=last`.
    first: usize,
    last: usize,
    /// Offset of the KV head inside a slot.
    kv_offset: usize,
    dims: Dims,
    params: &'a AttentionParams,
}

/// Per-thread buffers, reused across rows.
struct RowScratch {
    q: Vec<f32>,
    acc: Vec<f32>,
    scores: Vec<f32>,
    /// Per head of the group: the score maximum, then the softmax sum's reciprocal.
    max: Vec<f32>,
    /// The visible keys' row offsets in the cache (AVX2 kernel).
    offsets: Vec<usize>,
}

/// [`attend_row`] for f32 storage through the AVX2 kernel ([`avx2::attend`]).
fn attend_row_f32<T: Elem>(job: &RowJob<'_, T>, scratch: &mut RowScratch, out_rows: &mut [T]) {
    let (Some(q_rows), Some(k), Some(v), Some(out)) =
        (T::as_f32(job.q_rows), T::as_f32(job.k), T::as_f32(job.v), T::as_f32_mut(out_rows))
    else {
        unreachable!("invariant: attend_row_f32 runs on f32 storage only")
    };
    let d = job.dims;
    let row_stride = d.num_kv_heads * d.head_dim;
    // Offsets block by block: one table lookup per block, no division per key.
    scratch.offsets.clear();
    let mut pos = job.first;
    while pos <= job.last {
        let (block_index, in_block) = (pos / d.block_size, pos % d.block_size);
        let first_slot = job.block_table[block_index] as usize * d.block_size;
        let stop = (job.last + 1).min(pos - in_block + d.block_size);
        let slots = first_slot + in_block..first_slot + in_block + (stop - pos);
        scratch.offsets.extend(slots.map(|slot| slot * row_stride + job.kv_offset));
        pos = stop;
    }
    let rows = avx2::Rows {
        q_rows,
        head_dim: d.head_dim,
        k,
        v,
        offsets: &scratch.offsets,
        scale: job.params.scale,
        softcap: job.params.softcap,
    };
    avx2::attend(&rows, &mut scratch.scores, &mut scratch.max, out);
}

/// Two passes over the keys: all scores (vectorized dot products, each K row read once for the
/// whole GQA group), then per head the softmax, and the weighted sum of V (each V row read once
/// for the group). Exact softmax with f32 accumulation, no online rescaling.
#[inline(always)]
fn attend_row<T: Elem>(job: &RowJob<'_, T>, scratch: &mut RowScratch, out_rows: &mut [T]) {
    let d = job.dims;
    let hd = d.head_dim;
    let row_stride = d.num_kv_heads * hd;
    let base_of = |key_pos: usize| {
        let block = job.block_table[key_pos / d.block_size] as usize;
        (block * d.block_size + key_pos % d.block_size) * row_stride + job.kv_offset
    };
    for (dst, &x) in scratch.q.iter_mut().zip(job.q_rows) {
        *dst = x.to_f32();
    }
    let n = job.last + 1 - job.first;
    // scores[g * n + i]: head g of the group against key first + i.
    scratch.scores.clear();
    scratch.scores.resize(job.group * n, 0.0);
    let maxes = &mut scratch.max;
    maxes.clear();
    maxes.resize(job.group, f32::NEG_INFINITY);
    for (i, key_pos) in (job.first..=job.last).enumerate() {
        let base = base_of(key_pos);
        let k_row = &job.k[base..base + hd];
        for (g, m) in maxes.iter_mut().enumerate() {
            let mut score = dot(&scratch.q[g * hd..(g + 1) * hd], k_row) * job.params.scale;
            if let Some(cap) = job.params.softcap {
                score = cap * (score / cap).tanh();
            }
            *m = m.max(score);
            scratch.scores[g * n + i] = score;
        }
    }
    // Exponentials vectorized (a map loop), then summed over independent lanes: libm's expf was
    // a call per key, a third of a short-context row's time.
    // Each head's maximum becomes the reciprocal of its softmax sum.
    for (g, m) in maxes.iter_mut().enumerate() {
        let scores = &mut scratch.scores[g * n..(g + 1) * n];
        for s in scores.iter_mut() {
            *s = exp_nonpositive(*s - *m);
        }
        *m = 1.0 / lane_sum(scores);
    }
    let inv_sum = &scratch.max;
    scratch.acc.fill(0.0);
    for (i, key_pos) in (job.first..=job.last).enumerate() {
        let base = base_of(key_pos);
        let v_row = &job.v[base..base + hd];
        for (g, acc) in scratch.acc.chunks_exact_mut(hd).enumerate() {
            let p = scratch.scores[g * n + i];
            for (a, b) in acc.iter_mut().zip(v_row) {
                *a += p * b.to_f32();
            }
        }
    }
    for (g, (out, acc)) in out_rows.chunks_exact_mut(hd).zip(scratch.acc.chunks_exact(hd)).enumerate() {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = T::from_f32(a * inv_sum[g]);
        }
    }
}

/// A sum over 8 independent lanes, so it vectorizes (differs from a serial sum only in
/// rounding).
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product with 16 partial sums so it vectorizes (the order differs from a serial sum
/// only in rounding).
#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.to_f32()).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_row_avx512<T: Elem>(job: &RowJob<'_, T>, scratch: &mut RowScratch, out_row: &mut [T]) {
    attend_row(job, scratch, out_row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2<T: Elem>(job: &RowJob<'_, T>, scratch: &mut RowScratch, out_row: &mut [T]) {
    attend_row(job, scratch, out_row)
}

fn attend_row_dispatch<T: Elem>(
    level: SimdLevel,
    job: &RowJob<'_, T>,
    scratch: &mut RowScratch,
    out_row: &mut [T],
) {
    match level {
        // SAFETY: `simd::level` saw AVX-512F on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { attend_row_avx512(job, scratch, out_row) },
        // SAFETY: `simd::level` saw AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { attend_row_avx2(job, scratch, out_row) },
        SimdLevel::Baseline => attend_row(job, scratch, out_row),
    }
}

fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    super::contiguous_elems(s, l, "paged_attention: inputs")
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.check(l1, l2, l3)?;
        let shape = Shape::from_dims(&[d.num_tokens, d.num_heads, d.head_dim]);
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(d, slice(q, l1)?, slice(k, l2)?, slice(v, l3)?))
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run(d, slice(q, l1)?, slice(k, l2)?, slice(v, l3)?))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(d, slice(q, l1)?, slice(k, l2)?, slice(v, l3)?))
            }
            (q, k, v) => return Err(attention_dtype_error(q.dtype(), k.dtype(), v.dtype())),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run([(s1, l1), (s2, l2), (s3, l3)])
    }
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

/// The CUDA path of both ops: the same host-side checks as the CPU reference, the kernels' own
/// limits (`ferrite_kernels::plan`), dtype dispatch, then the launches (`ferrite_kernels::launch`).
/// The step's metadata is uploaded once, by the first layer, and reused by the others.
#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
    use candle_core::{CudaStorage, DType, Layout, Shape};
    use ferrite_kernels::launch::{self, AttentionTensors, KernelDType};
    use ferrite_kernels::plan::{AttentionPlan, AttnSpec, PlanShape, SeqSpan, VEC_ELEMS};

    use super::{attention_dtype_error, bail, write_dtype_error, Dims, PagedAttention, WriteSlots};

    const _: () = assert!(super::PAD_SLOT == ferrite_kernels::plan::PAD_SLOT);

    /// An [`super::AttentionMetadata`]'s uploads: the slot mapping, and one launch plan with
    /// its packed metadata per attention shape (a model whose layers differ, say in sliding
    /// window, has several). 24 layers made 48 small host-to-device copies a step before. A
    /// step's own uploads, or a captured graph's (shared, refilled in place each replay).
    #[derive(Default)]
    pub(super) struct Uploads {
        uploaded: Arc<Mutex<Uploaded>>,
        shape: PlanShape,
    }

    #[derive(Default)]
    struct Uploaded {
        slots: Option<(DeviceId, Arc<CudaSlice<u32>>)>,
        plans: Vec<(DeviceId, AttnSpec, Arc<PlanOnDevice>)>,
    }

    /// A launch plan and its metadata words on the device.
    pub(super) struct PlanOnDevice {
        plan: AttentionPlan,
        words: CudaSlice<u32>,
    }

    impl Clone for Uploads {
        /// A clone uploads again when it is used (it could be used on another device), unless
        /// it shares a graph's buffers.
        fn clone(&self) -> Self {
            match self.shape {
                PlanShape::Exact => Self::default(),
                PlanShape::Bucketed => Self { uploaded: self.uploaded.clone(), shape: self.shape },
            }
        }
    }

    impl std::fmt::Debug for Uploads {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let u = lock(&self.uploaded);
            f.debug_struct("Uploads")
                .field("slots", &u.slots.is_some())
                .field("plans", &u.plans.len())
                .field("shape", &self.shape)
                .finish()
        }
    }

    fn lock(u: &Mutex<Uploaded>) -> std::sync::MutexGuard<'_, Uploaded> {
        u.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Host data to the device on `dev`'s stream, bypassing candle's upload cache (which, while
    /// a graph is prepared, hands out shared buffers keyed by their contents: these are
    /// rewritten in place).
    fn upload(dev: &CudaDevice, data: &[u32]) -> candle_core::Result<CudaSlice<u32>> {
        use candle_core::cuda_backend::WrapErr;
        // No zero-byte copies on CUDA: an empty batch (never launched) gets one unused word.
        if data.is_empty() {
            return dev.alloc_zeros::<u32>(1);
        }
        dev.cuda_stream().clone_htod(data).w()
    }

    impl Uploads {
        pub(super) fn graph(shared: &GraphUploads) -> Self {
            Self { uploaded: shared.0.clone(), shape: PlanShape::Bucketed }
        }

        /// The slot mapping on `dev`, uploaded by the first call.
        fn slots(&self, dev: &CudaDevice, slot_mapping: &[u32]) -> candle_core::Result<Arc<CudaSlice<u32>>> {
            let mut u = lock(&self.uploaded);
            match &u.slots {
                Some((id, slots)) if *id == dev.id() => Ok(slots.clone()),
                _ => {
                    let slots = Arc::new(upload(dev, slot_mapping)?);
                    u.slots = Some((dev.id(), slots.clone()));
                    Ok(slots)
                }
            }
        }

        /// The plan for `spec` on `dev` with its words uploaded, made by `plan` the first time.
        fn plan(
            &self,
            dev: &CudaDevice,
            spec: &AttnSpec,
            plan: impl FnOnce(PlanShape) -> candle_core::Result<AttentionPlan>,
        ) -> candle_core::Result<Arc<PlanOnDevice>> {
            let mut u = lock(&self.uploaded);
            if let Some((_, _, p)) = u.plans.iter().find(|(id, s, _)| *id == dev.id() && s == spec) {
                return Ok(p.clone());
            }
            let plan = plan(self.shape)?;
            let words = upload(dev, &plan.words)?;
            let on_device = Arc::new(PlanOnDevice { plan, words });
            u.plans.push((dev.id(), *spec, on_device.clone()));
            Ok(on_device)
        }
    }

    /// The device copies of the attention metadata a captured CUDA graph reads: filled by the
    /// eager run before the capture (the capture then finds them and bakes their addresses
    /// in), rewritten in place before each replay by [`Self::refill`].
    #[derive(Clone, Default)]
    pub struct GraphUploads(Arc<Mutex<Uploaded>>);

    impl GraphUploads {
        /// Writes `meta`'s slot mapping and launch plans into the buffers the graph reads, if
        /// they keep the geometry it was captured with (the same batch size, table row length,
        /// partitions and kernels for every attention shape the graph holds); otherwise writes
        /// nothing and returns false. `meta` must come from the same kind of step (decode) as
        /// the capture's.
        pub fn refill(&self, dev: &CudaDevice, meta: &super::AttentionMetadata) -> candle_core::Result<bool> {
            use candle_core::cuda_backend::WrapErr;
            let mut u = lock(&self.0);
            let Some((_, slots)) = &u.slots else { return Ok(false) };
            if slots.len() != meta.slot_mapping.len().max(1) {
                return Ok(false);
            }
            let seqs = spans(&meta.seqs);
            let mut plans = Vec::with_capacity(u.plans.len());
            for (_, spec, old) in &u.plans {
                let plan = AttentionPlan::shaped(spec, &seqs, PlanShape::Bucketed)
                    .map_err(|e| bail(format!("paged_attention (CUDA graph): {e}")))?;
                if plan.geometry() != old.plan.geometry() {
                    return Ok(false);
                }
                plans.push(plan);
            }
            let stream = dev.cuda_stream();
            let in_use = || bail("a CUDA graph's metadata is still referenced by a running step".into());
            let (_, slots) = u.slots.as_mut().expect("invariant: checked above");
            let slots = Arc::get_mut(slots).ok_or_else(in_use)?;
            if !meta.slot_mapping.is_empty() {
                stream.memcpy_htod(&meta.slot_mapping, slots).w()?;
            }
            for ((_, _, old), plan) in u.plans.iter_mut().zip(plans) {
                let old = Arc::get_mut(old).ok_or_else(in_use)?;
                if !plan.words.is_empty() {
                    stream.memcpy_htod(&plan.words, &mut old.words).w()?;
                }
                old.plan = plan;
            }
            Ok(true)
        }
    }

    fn spans(seqs: &[super::SeqAttention]) -> Vec<SeqSpan<'_>> {
        seqs.iter()
            .map(|s| SeqSpan {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: &s.block_table,
            })
            .collect()
    }

    impl WriteSlots<'_> {
        pub(super) fn cuda_write(
            &self,
            cache: &mut CudaStorage,
            cache_l: &Layout,
            src: &CudaStorage,
            src_l: &Layout,
        ) -> candle_core::Result<()> {
            match (cache.dtype(), src.dtype()) {
                (DType::F32, DType::F32) => self.cuda_write_as::<f32>(cache, cache_l, src, src_l),
                (DType::F16, DType::F16) => self.cuda_write_as::<half::f16>(cache, cache_l, src, src_l),
                (DType::BF16, DType::BF16) => self.cuda_write_as::<half::bf16>(cache, cache_l, src, src_l),
                (c, s) => Err(write_dtype_error(c, s)),
            }
        }

        fn cuda_write_as<T: KernelDType + CudaDType>(
            &self,
            cache: &mut CudaStorage,
            cache_l: &Layout,
            src: &CudaStorage,
            src_l: &Layout,
        ) -> candle_core::Result<()> {
            let w = self.check(cache_l, src_l)?;
            if self.slot_mapping.is_empty() {
                return Ok(());
            }
            let dev = cache.device.clone();
            let slots = self.meta.uploads.slots(&dev, self.slot_mapping)?;
            let src = src.as_cuda_slice::<T>()?.slice(w.src);
            let mut cache = cache.as_cuda_slice_mut::<T>()?.slice_mut(w.cache);
            // SAFETY: `check` verified every slot is below the cache's slot count.
            unsafe { launch::reshape_and_cache(&dev, &src, &mut cache, &slots, w.row_elems) }
        }
    }

    impl PagedAttention<'_> {
        pub(super) fn cuda_run(
            &self,
            inputs: [(&CudaStorage, &Layout); 3],
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let [(q, lq), (k, lk), (v, lv)] = inputs;
            let d = self.check(lq, lk, lv)?;
            let storage = match (q.dtype(), k.dtype(), v.dtype()) {
                (DType::F32, DType::F32, DType::F32) => self.cuda_run_as::<f32>(d, inputs)?,
                (DType::F16, DType::F16, DType::F16) => self.cuda_run_as::<half::f16>(d, inputs)?,
                (DType::BF16, DType::BF16, DType::BF16) => self.cuda_run_as::<half::bf16>(d, inputs)?,
                (q, k, v) => return Err(attention_dtype_error(q, k, v)),
            };
            Ok((storage, Shape::from_dims(&[d.num_tokens, d.num_heads, d.head_dim])))
        }

        fn cuda_run_as<T: KernelDType + CudaDType>(
            &self,
            d: Dims,
            [(q, lq), (k, lk), (v, lv)]: [(&CudaStorage, &Layout); 3],
        ) -> candle_core::Result<CudaStorage> {
            let dev = q.device.clone();
            // Tensor cores for prefill where the storage type is 16-bit and the card has the
            // kernel's shared memory (asked only for a prefill: a decode step, every layer of
            // it, needs no driver query).
            let half = T::SUFFIX != "f32";
            let prefill = self.meta.seqs.iter().any(|s| s.query_len != 1);
            let tensor_cores = half && prefill && launch::tensor_core_prefill_fits(&dev, d.head_dim)?;
            let spec = self.spec(d, tensor_cores);
            let plan = self.meta.uploads.plan(&dev, &spec, |shape| self.cuda_plan(&spec, shape))?;
            let tensors = AttentionTensors {
                q: aligned_view::<T>(q, lq, "q")?,
                k_cache: aligned_view::<T>(k, lk, "K cache")?,
                v_cache: aligned_view::<T>(v, lv, "V cache")?,
            };
            // No zero-byte allocations on CUDA: an empty batch gets one unused element.
            let len = (d.num_tokens * d.num_heads * d.head_dim).max(1);
            // SAFETY: the kernels write every (token, head) row: the checked sequences cover
            // every token, and the plan gives every head of every query a block.
            let mut out = unsafe { dev.alloc::<T>(len) }?;
            if cfg!(debug_assertions) {
                poison(&dev, &mut out)?;
            }
            // SAFETY: `check` verified the metadata against these tensors (ranges cover the
            // tokens, 1 <= query_len <= context_len, tables hold each context with block ids
            // inside the cache, head counts and head_dim match); `aligned_view` the alignment.
            unsafe { launch::paged_attention(&dev, &plan.plan, &plan.words, &tensors, &mut out) }?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }

        fn spec(&self, d: Dims, tensor_cores: bool) -> AttnSpec {
            AttnSpec {
                num_heads: d.num_heads,
                num_kv_heads: d.num_kv_heads,
                head_dim: d.head_dim,
                block_size: d.block_size,
                scale: self.params.scale,
                sliding_window: self.params.sliding_window,
                softcap: self.params.softcap,
                tensor_cores,
            }
        }

        /// The launch plan, or an error for shapes the kernels do not take (never launched).
        fn cuda_plan(&self, spec: &AttnSpec, shape: PlanShape) -> candle_core::Result<AttentionPlan> {
            AttentionPlan::shaped(spec, &spans(&self.meta.seqs), shape)
                .map_err(|e| bail(format!("paged_attention (CUDA): {e}")))
        }
    }

    /// The tensor's elements as a device view; its start must be 16-byte aligned for the
    /// kernels' vector loads (allocations are; `paged_attention` realigns q).
    fn aligned_view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let view = super::super::contiguous_cuda_view(s, l, &format!("paged_attention: {what}"))?;
        let start = l.start_offset();
        if !start.is_multiple_of(VEC_ELEMS) {
            return Err(bail(format!(
                "paged_attention (CUDA): {what} starts at element {start}, not a multiple of {VEC_ELEMS} (16-byte loads)"
            )));
        }
        Ok(view)
    }

    /// Fills `out` with NaN (all-ones bytes are a NaN in f32, f16 and bf16). Debug builds do it
    /// before the kernels run, so an output element they miss shows in the tests.
    fn poison<T>(dev: &CudaDevice, out: &mut CudaSlice<T>) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{result, DevicePtrMut};
        use candle_core::cuda_backend::WrapErr;
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let bytes = out.num_bytes();
        let (ptr, _record) = out.device_ptr_mut(&stream);
        // SAFETY: `ptr` is a live allocation of `bytes` bytes on this stream, and any byte
        // pattern is a valid float.
        unsafe { result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.w()
    }
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
        let mut slots = Vec::new();
        let (mut kp, mut vp) = (Vec::new(), Vec::new());
        for (c, (t, (_, k, v))) in cases.iter().zip(tables.iter().zip(&dense)) {
            let cached = c.context_len - c.query_len;
            for pos in 0..cached {
                slots.push(t[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
            }
            kp.extend_from_slice(&k[..cached * kv_heads * d]);
            vp.extend_from_slice(&v[..cached * kv_heads * d]);
        }
        let n = slots.len();
        let meta = AttentionMetadata::new(slots, vec![], block_size);
        let kt = Tensor::from_vec(kp, (n, kv_heads, d), &dev).unwrap();
        let vt = Tensor::from_vec(vp, (n, kv_heads, d), &dev).unwrap();
        write_kv(&kt, &vt, &kc, &vc, &meta).unwrap();

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
