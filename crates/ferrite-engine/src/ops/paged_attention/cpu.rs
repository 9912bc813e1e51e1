//! The CPU reference of the attention op: every output row an independent rayon task that
//! attends its query heads over the visible keys through the block table, in f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::{attention_dtype_error, bail, AttentionMetadata, AttentionParams, Elem};
use crate::ops::math::exp_nonpositive;
use crate::ops::simd::{self, SimdLevel};

pub(super) struct PagedAttention<'a> {
    pub(super) meta: &'a AttentionMetadata,
    pub(super) params: &'a AttentionParams,
}

/// Shapes of one call, checked before any read.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) num_tokens: usize,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) block_size: usize,
}

impl PagedAttention<'_> {
    pub(super) fn check(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> candle_core::Result<Dims> {
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
        match self.run_tiled(d, q, k, v) {
            Some(out) => out,
            None => self.run_rows(d, q, k, v),
        }
    }

    /// Every output row (a token's query heads of one KV head) an independent task.
    fn run_rows<T: Elem>(&self, d: Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        // token -> its sequence, so every output row is an independent task.
        let mut seq_of_token = Vec::with_capacity(d.num_tokens);
        for (i, s) in self.meta.seqs.iter().enumerate() {
            seq_of_token.extend(std::iter::repeat_n(i, s.query_len));
        }
        let group = d.num_heads / d.num_kv_heads;
        let mut out = vec![T::from_f32(0.0); d.num_tokens * d.num_heads * d.head_dim];
        let wide = simd::level();
        let f32_kernel = T::as_f32(k).is_some() && super::avx2::usable(d.head_dim);
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

/// Query positions of a sequence that go through the tiled kernel together.
const QUERY_TILE: usize = 8;

impl PagedAttention<'_> {
    /// A step with a prompt chunk, on f32 caches with AVX-512, in tiles: a task is up to
    /// [`QUERY_TILE`] consecutive query positions of one sequence against one KV head, so each K
    /// and V chunk is read once for all their rows ([`super::avx2::attend_tile`], which gives
    /// every row the bits of the per-token path). `None` where the per-token path runs: other
    /// dtypes or CPUs, sliding windows (rows would not share their first key), and steps
    /// without a chunk of at least two tiles (decodes gain nothing).
    fn run_tiled<T: Elem>(&self, d: Dims, q: &[T], k: &[T], v: &[T]) -> Option<Vec<T>> {
        let (q, k, v) = (T::as_f32(q)?, T::as_f32(k)?, T::as_f32(v)?);
        let tiled = self.params.sliding_window.is_none()
            && super::avx2::usable(d.head_dim)
            && super::avx2::wide_usable(d.head_dim)
            && self.meta.seqs.iter().any(|s| s.query_len >= 2 * QUERY_TILE);
        if !tiled {
            return None;
        }
        let group = d.num_heads / d.num_kv_heads;
        let group_width = group * d.head_dim;
        // (sequence, first query of the tile, queries in it, KV head).
        let mut tasks = Vec::new();
        for (si, s) in self.meta.seqs.iter().enumerate() {
            for t0 in (0..s.query_len).step_by(QUERY_TILE) {
                let len = QUERY_TILE.min(s.query_len - t0);
                tasks.extend((0..d.num_kv_heads).map(|h| (si, t0, len, h)));
            }
        }
        let row_stride = d.num_kv_heads * d.head_dim;
        let tiles: Vec<Vec<f32>> = tasks
            .par_iter()
            .map_init(TileScratch::default, |scratch, &(si, t0, len, h)| {
                let s = &self.meta.seqs[si];
                let first_pos = s.context_len - s.query_len + t0;
                let keys = first_pos + len;
                let rows = KeyRows { block_table: &s.block_table, block_size: d.block_size, row_stride };
                rows.offsets(0..keys, h * d.head_dim, &mut scratch.offsets);
                scratch.q.clear();
                scratch.visible.clear();
                for r in 0..len {
                    let first = ((s.query_start + t0 + r) * d.num_heads + h * group) * d.head_dim;
                    scratch.q.extend_from_slice(&q[first..first + group_width]);
                    scratch.visible.extend(std::iter::repeat_n(first_pos + r + 1, group));
                }
                let tile = super::avx2::Tile {
                    q_rows: &scratch.q,
                    head_dim: d.head_dim,
                    k,
                    v,
                    offsets: &scratch.offsets,
                    visible: &scratch.visible,
                    scale: self.params.scale,
                    softcap: self.params.softcap,
                };
                let mut out = vec![0f32; len * group_width];
                super::avx2::attend_tile(&tile, &mut scratch.scores, &mut scratch.inv_sums, &mut out);
                out
            })
            .collect();
        let mut out = vec![T::from_f32(0.0); d.num_tokens * d.num_heads * d.head_dim];
        let dst = T::as_f32_mut(&mut out).expect("invariant: T is f32 here (q was)");
        for (&(si, t0, len, h), tile) in tasks.iter().zip(&tiles) {
            let s = &self.meta.seqs[si];
            for r in 0..len {
                let first = ((s.query_start + t0 + r) * d.num_heads + h * group) * d.head_dim;
                dst[first..first + group_width]
                    .copy_from_slice(&tile[r * group_width..(r + 1) * group_width]);
            }
        }
        Some(out)
    }
}

/// Where a sequence's keys sit in a cache of `[blocks, block_size, kv_heads, head_dim]`.
struct KeyRows<'a> {
    block_table: &'a [u32],
    block_size: usize,
    /// Floats per slot (`kv_heads · head_dim`).
    row_stride: usize,
}

impl KeyRows<'_> {
    /// Into `out` (cleared first): the offset of each key row of `positions` for the KV head at
    /// `kv_offset` in its slot. Block by block: one table lookup per block, no division per key.
    fn offsets(&self, positions: std::ops::Range<usize>, kv_offset: usize, out: &mut Vec<usize>) {
        out.clear();
        let mut pos = positions.start;
        while pos < positions.end {
            let (block_index, in_block) = (pos / self.block_size, pos % self.block_size);
            let first_slot = self.block_table[block_index] as usize * self.block_size;
            let stop = positions.end.min(pos - in_block + self.block_size);
            let slots = first_slot + in_block..first_slot + in_block + (stop - pos);
            out.extend(slots.map(|slot| slot * self.row_stride + kv_offset));
            pos = stop;
        }
    }
}

/// Per-thread buffers of the tiled path.
#[derive(Default)]
struct TileScratch {
    q: Vec<f32>,
    offsets: Vec<usize>,
    visible: Vec<usize>,
    scores: Vec<f32>,
    inv_sums: Vec<f32>,
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

/// [`attend_row`] for f32 storage through the AVX2 kernel ([`super::avx2::attend`]).
fn attend_row_f32<T: Elem>(job: &RowJob<'_, T>, scratch: &mut RowScratch, out_rows: &mut [T]) {
    let (Some(q_rows), Some(k), Some(v), Some(out)) =
        (T::as_f32(job.q_rows), T::as_f32(job.k), T::as_f32(job.v), T::as_f32_mut(out_rows))
    else {
        unreachable!("invariant: attend_row_f32 runs on f32 storage only")
    };
    let d = job.dims;
    let row_stride = d.num_kv_heads * d.head_dim;
    let rows = KeyRows { block_table: job.block_table, block_size: d.block_size, row_stride };
    rows.offsets(job.first..job.last + 1, job.kv_offset, &mut scratch.offsets);
    let rows = super::avx2::Rows {
        q_rows,
        head_dim: d.head_dim,
        k,
        v,
        offsets: &scratch.offsets,
        scale: job.params.scale,
        softcap: job.params.softcap,
        wide: super::avx2::wide_usable(d.head_dim),
    };
    super::avx2::attend(&rows, &mut scratch.scores, &mut scratch.max, out);
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
pub(super) fn lane_sum(xs: &[f32]) -> f32 {
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
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe {
            attend_row_avx512(job, scratch, out_row)
        },
        // SAFETY: `simd::level` saw AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { attend_row_avx2(job, scratch, out_row) },
        SimdLevel::Baseline => attend_row(job, scratch, out_row),
    }
}

fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    super::super::contiguous_elems(s, l, "paged_attention: inputs")
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

#[cfg(test)]
mod tests {
    use super::super::{AttentionMetadata, SeqAttention};
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// The tiled path gives every row the per-token path's bits: a prompt chunk after a cached
    /// prefix, a decode and a whole prompt in one step, scattered blocks, with and without a
    /// soft cap, at group sizes 3, 2 and 1 and head sizes 64 and 128.
    #[test]
    fn tiles_give_the_per_token_bits() {
        if !(super::super::avx2::usable(16) && super::super::avx2::wide_usable(16)) {
            eprintln!("skipped: this CPU (or FERRITE_SIMD) lacks AVX-512F/VL: the tiled path does not run");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for (heads, kv_heads, head_dim, softcap) in
            [(9, 3, 64, None), (4, 2, 128, Some(30.0)), (4, 4, 64, None)]
        {
            let block_size = 16usize;
            // (context, queried): a chunk after a prefix, a decode, a whole prompt.
            let cases: [(usize, usize); 3] = [(83, 37), (20, 1), (16, 16)];
            let num_blocks: usize = cases.iter().map(|(c, _)| c.div_ceil(block_size)).sum::<usize>() + 3;
            let mut blocks: Vec<u32> = (0..num_blocks as u32).collect();
            blocks.shuffle(&mut rng);
            let (mut seqs, mut query_start, mut next) = (Vec::new(), 0, 0);
            for (context_len, query_len) in cases {
                let used = context_len.div_ceil(block_size);
                seqs.push(SeqAttention {
                    query_start,
                    query_len,
                    context_len,
                    block_table: blocks[next..next + used].to_vec(),
                });
                (query_start, next) = (query_start + query_len, next + used);
            }
            let meta = AttentionMetadata::new(vec![0; query_start], seqs, block_size);
            let params = AttentionParams { scale: 0.125, sliding_window: None, softcap };
            let random = |rng: &mut StdRng, n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
            };
            let cache = num_blocks * block_size * kv_heads * head_dim;
            let (k, v) = (random(&mut rng, cache), random(&mut rng, cache));
            let q = random(&mut rng, query_start * heads * head_dim);
            let d = Dims {
                num_tokens: query_start,
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim,
                block_size,
            };
            let op = PagedAttention { meta: &meta, params: &params };
            let tiled = op.run_tiled(d, &q, &k, &v).expect("a 37-token chunk takes the tiled path");
            let rows = op.run_rows(d, &q, &k, &v);
            let differ = tiled.iter().zip(&rows).position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differ, None, "heads {heads}/{kv_heads}, head_dim {head_dim}: first differing value");
        }
    }
}
