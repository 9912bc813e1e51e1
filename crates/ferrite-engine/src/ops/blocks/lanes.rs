//! The block formats' products on int8 dot products, where the CPU has them (AVX-512 VNNI:
//! `vpdpbusd` sums four u8 × i8 products into each 32-bit lane): the per-32 formats (Q8_0,
//! Q5_0, Q4_0) and the K-quants (Q4_K, Q5_K, Q6_K).
//!
//! The weights are integers already; x is made of integers per block of 32:
//! `x ≈ s · (a + b/254 + c/254²)` with `s` the power of two that puts `max|x| / s` in
//! [63.75, 127.5) (so `x / s` is exact, but for inputs that underflow) and int8 limbs
//! `a, b, c` (each the rounded remainder of the one before, times 254), so each x is kept to
//! `s / 254² / 2`, about 2⁻²³ of its block's largest: f32's own rounding for the largest,
//! coarser for an x far below it (an input 10⁸ times smaller than its block's largest is lost;
//! in f32 it would still add its share, far below the sum's last bit). Per row and block (per
//! half block of 16 for Q6_K, whose scales are per 16) the three sums `Σ q · limb` are exact
//! integers; then, in f32 and in this order, `t = Σc · w₂; t = Σb · w₁ + t; t = Σa + t; y = t · (r · s) + y`
//! (each `·  +` one fused multiply-add), `w₁, w₂` being 1/254 and 1/254² in f32 and `r` the
//! row's scale there (`d`, or `d · sc`, exact in f32); for Q4_K and Q5_K then
//! `y = −(dmin · m) · Σx + y`, with the block's `Σx` as its limbs give it
//! ([`Limbs::x_sums`]). The weights' block-panels are in [`Order::Lanes`], so one 64-byte
//! vector holds four columns of 16 rows, a lane a row.
//!
//! With int8 activations ([`Activations::Int8`], `--int8-activations`) x is one limb,
//! `x ≈ s · a` with `s = max|x| / 127` (llama.cpp's rounding of its Q8_0 activations), and `b`,
//! `c` are zeros: the arithmetic above on zeros, so the VNNI tiles skip their products (and,
//! with a third of the sums to hold, run four panels by four tokens) for the same bits; the
//! AMX tiles still take all three.
//!
//! Every variant (the portable one here, AVX-512 VNNI in `vnni.rs`, AMX tiles for many tokens
//! in `amx.rs`) does exactly this, so a row's bits are the same alone or in any batch, and
//! the tests check the SIMD variants' bits against the portable one's. Against the f32 path
//! (`Order::Columns`, which the other levels take) the outputs differ in the last bits only:
//! both are the dequantized product up to f32 rounding (and the limbs' 2⁻²³).

use rayon::prelude::*;

use super::layout::{Order, Scaling, Values};
use super::{for_each_task, unpadded, BlockPanels, BLOCK, PANEL_ROWS};
use crate::ops::packed::OutPtr;
use crate::ops::quantized::Activations;
use crate::ops::simd::SimdLevel;

/// Limbs per x.
pub(super) const LIMBS: usize = 3;
/// The weights of the second and third limbs: 1/254, 1/254² (in f32).
pub(super) const W1: f32 = 1.0 / 254.0;
pub(super) const W2: f32 = 1.0 / 64516.0;
/// Bytes of one token's limbs for one block: `a`'s 32, then `b`'s, then `c`'s.
pub(super) const LIMB_BYTES: usize = LIMBS * BLOCK;
/// Sums of one token's limbs for one block: per half (columns 0–15, 16–31), per limb.
pub(super) const HALF_SUMS: usize = 2 * LIMBS;
/// A block whose largest |x| is below this (2⁻¹⁰⁰) counts as zeros: its `s` would leave f32's
/// normal range, and its products lie below the resolution of any sum that also holds one
/// normal-sized input (a model's activations are of order 1).
pub(super) const TINY: f32 = 7.888_609e-31;

/// The order a process at `level` keeps its matrices in: lanes where its products run on int8
/// dot products (with VNNI).
pub(super) fn order(level: SimdLevel) -> Order {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx512Vnni {
        return Order::Lanes;
    }
    let _ = level;
    Order::Columns
}

/// Panels a token (decode) runs side by side.
const SIDE_BY_SIDE: usize = 4;
/// Panels and tokens a tile runs at once for more than one token: 2 × 4 × 3 sums in registers
/// (before the leaner per-block step, 1.1–1.4× and 1.3–2.1× faster than 1 × 6 and 2 × 3 at 128
/// tokens, one thread).
const MANY_PANELS: usize = 2;
const MANY_TOKENS: usize = 4;
/// With one limb (int8 activations) a third of the sums: four panels by four tokens.
const MANY_PANELS_ONE_LIMB: usize = 4;

/// Tokens' inputs as limbs, per token and block of 32.
pub(super) struct Limbs {
    /// [`LIMB_BYTES`] per token and block, laid out as [`Layout`] says.
    pub limbs: Vec<i8>,
    /// The weights' bias (see [`bias`]) times `Σa, Σb, Σc` over each half of a block
    /// ([`HALF_SUMS`] per token and block): what the biased sums exceed the true ones by.
    pub biased: Vec<i32>,
    /// `s` per token and block; NaN where the block holds an infinity or NaN (its limbs 0), so
    /// the outputs it feeds are NaN (where f32 would give NaN, or ±inf for an infinity).
    pub scales: Vec<f32>,
    /// `Σx` per token and block as the limbs give it: [`epilogue`] of the limbs' sums over
    /// the block, by `s` (the formats with an offset take `dmin · m · Σx`).
    pub x_sums: Vec<f32>,
    /// Where [`Limbs::limbs`] are.
    pub layout: Layout,
    /// How many limbs hold x: [`LIMBS`], or 1 for [`Activations::Int8`] (`x ≈ s · a` with
    /// `s = max|x| / 127`; `b` and `c` zero, so every variant's arithmetic below gives the
    /// same bits whether or not it skips them).
    pub count: usize,
}

/// Where [`Limbs::limbs`] puts limb l of token t's block b.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// A token's blocks one after another, each `a`'s 32 bytes, `b`'s, `c`'s
    /// (`(t · blocks + b) · 96 + 32 l`): one token's limbs broadcast against the weights.
    Rows,
    /// As AMX's A tiles: per 16 tokens, block and limb, their 16 rows of 32 bytes
    /// (`(((t / 16 · blocks + b) · 3 + l) · 16 + t % 16) · 32`), zeros past the last token,
    /// whose `s` and `Σx` are 0 as well.
    Tiles,
}

/// Tokens per AMX A tile ([`Layout::Tiles`]).
pub(super) const AMX_TILE_TOKENS: usize = 16;

impl Layout {
    /// Where limb `l` of token `t`'s block `b` starts, counted from the first token of `t`'s
    /// group ([`Layout::Rows`]: all tokens; [`Layout::Tiles`]: its tile of 16).
    pub(super) const fn offset(self, blocks: usize, t: usize, b: usize, l: usize) -> usize {
        match self {
            Layout::Rows => (t * blocks + b) * LIMB_BYTES + l * BLOCK,
            Layout::Tiles => ((b * LIMBS + l) * AMX_TILE_TOKENS + t % AMX_TILE_TOKENS) * BLOCK,
        }
    }
}

impl Limbs {
    /// `x` (`[m, k]`, `k` a multiple of 32) as limbs, with AVX-512 at the VNNI levels (the
    /// same limbs either way), for weights biased by `bias`, as `activations` says.
    pub fn new(
        x: &[f32],
        k: usize,
        level: SimdLevel,
        bias: i32,
        layout: Layout,
        activations: Activations,
    ) -> Self {
        let count = match activations {
            Activations::Exact => LIMBS,
            Activations::Int8 => 1,
        };
        let blocks = k / BLOCK;
        let m = x.len() / k;
        // Tokens per task: a tile's, or (splitting being a few operations per x) all of them
        // but for a prefill's worth.
        let (tokens, group) = match layout {
            Layout::Tiles => (m.next_multiple_of(AMX_TILE_TOKENS), AMX_TILE_TOKENS),
            Layout::Rows if m * blocks >= 4096 => (m, (512 / blocks).max(1)),
            Layout::Rows => (m, m.max(1)),
        };
        let mut limbs = Limbs {
            limbs: vec![0; tokens * blocks * LIMB_BYTES],
            biased: vec![0; tokens * blocks * HALF_SUMS],
            scales: vec![0.0; tokens * blocks],
            x_sums: vec![0.0; tokens * blocks],
            layout,
            count,
        };
        let per_block =
            limbs.scales.par_chunks_mut(group * blocks).zip(limbs.x_sums.par_chunks_mut(group * blocks));
        let outs = limbs
            .limbs
            .par_chunks_mut(group * blocks * LIMB_BYTES)
            .zip(limbs.biased.par_chunks_mut(group * blocks * HALF_SUMS));
        x.par_chunks(group * k).zip(outs.zip(per_block)).for_each(
            |(x, ((limbs, biased), (scales, x_sums)))| {
                let mut block = [0i8; LIMB_BYTES];
                for (i, x) in x.chunks_exact(BLOCK).enumerate() {
                    let x: &[f32; BLOCK] = x.try_into().expect("invariant: a whole block");
                    let mut halves = [[0i32; LIMBS]; 2];
                    let s = split_at(level, x, &mut block, &mut halves, count);
                    let (t, b) = (i / blocks, i % blocks);
                    for (l, limb) in block.chunks_exact(BLOCK).enumerate() {
                        let at = layout.offset(blocks, t, b, l);
                        limbs[at..at + BLOCK].copy_from_slice(limb);
                    }
                    scales[i] = s;
                    x_sums[i] = x_sum(level, std::array::from_fn(|l| halves[0][l] + halves[1][l]), s);
                    for (sum, &half) in
                        biased[i * HALF_SUMS..][..HALF_SUMS].iter_mut().zip(halves.as_flattened())
                    {
                        *sum = half * bias;
                    }
                }
            },
        );
        limbs
    }
}

/// A block's `Σx` from its limbs' sums and `s` ([`Limbs::x_sums`]), with the CPU's fused
/// multiply-add where `level` has it (the same bits as the software one).
fn x_sum(level: SimdLevel, sums: [i32; LIMBS], s: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        #[target_feature(enable = "fma")]
        fn with_fma(sums: [i32; LIMBS], s: f32) -> f32 {
            epilogue(sums, s, 0.0)
        }
        // SAFETY: this CPU has FMA (every level from AVX2 on).
        return unsafe { with_fma(sums, s) };
    }
    let _ = level;
    epilogue(sums, s, 0.0)
}

/// [`split`], with AVX-512 at the VNNI levels (the same limbs, sums and `s`).
fn split_at(
    level: SimdLevel,
    x: &[f32; BLOCK],
    limbs: &mut [i8; LIMB_BYTES],
    sums: &mut [[i32; LIMBS]; 2],
    count: usize,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx512Vnni {
        // SAFETY: this CPU runs AVX-512 with BW.
        return unsafe { vnni::split_avx512(x, limbs, sums, count) };
    }
    let _ = level;
    split(x, limbs, sums, count)
}

/// `s` for a block whose largest |x| is `max` (normal, at least [`TINY`]), and `1 / s`: the
/// power of two that puts `max / s` in [63.75, 127.5), so that `x · (1/s)` is exact and its
/// rounding at most 127.
pub(super) fn scale_for(max: f32) -> (f32, f32) {
    let exponent = ((max.to_bits() >> 23) & 0xFF) as i32 - 127;
    let power = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let e = if max * power(6 - exponent) < 127.5 { exponent - 6 } else { exponent - 5 };
    (power(e), power(-e))
}

/// `s` and `1 / s` for a block whose largest |x| is `max` (normal, at least [`TINY`]), split
/// into `count` limbs: [`scale_for`]'s power of two for all three, else `max / 127` (the
/// rounding to int8 then uses all of its range, as llama.cpp's Q8_0 activations do).
pub(super) fn scales(max: f32, count: usize) -> (f32, f32) {
    if count == LIMBS {
        scale_for(max)
    } else {
        (max / 127.0, 127.0 / max)
    }
}

/// One block of x as `count` limbs (the rest zeros) and their sums over each half of the
/// block; returns `s`.
pub(super) fn split(
    x: &[f32; BLOCK],
    limbs: &mut [i8; LIMB_BYTES],
    sums: &mut [[i32; LIMBS]; 2],
    count: usize,
) -> f32 {
    *limbs = [0; LIMB_BYTES];
    *sums = [[0; LIMBS]; 2];
    if x.iter().any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max < TINY {
        return 1.0;
    }
    let (s, inverse) = scales(max, count);
    for (c, &v) in x.iter().enumerate() {
        let mut r = v * inverse;
        for l in 0..count {
            let q = r.round_ties_even();
            debug_assert!(q.abs() <= 127.0, "invariant: a limb fits int8 ({q})");
            limbs[l * BLOCK + c] = q as i8;
            sums[c / (BLOCK / 2)][l] += q as i32;
            r = (r - q) * 254.0;
        }
    }
    s
}

/// `x Wᵀ` for panels in [`Order::Lanes`]: `[m, k]` → `[m, n]`.
pub(super) fn matmul(panels: &BlockPanels, x: &[f32], m: usize) -> Vec<f32> {
    matmul_at(panels, x, m, crate::ops::simd::level())
}

/// [`matmul`] at `level` (the process's; tests compare levels on one CPU).
fn matmul_at(panels: &BlockPanels, x: &[f32], m: usize, level: SimdLevel) -> Vec<f32> {
    debug_assert!(panels.order == Order::Lanes);
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Amx && m >= amx::MIN_TOKENS {
        // SAFETY: this CPU runs `level`.
        return unsafe { amx::matmul(panels, x, m) };
    }
    let limbs = Limbs::new(x, panels.k, level, bias(panels.values), Layout::Rows, panels.activations);
    let count = panels.n.div_ceil(PANEL_ROWS);
    let stride = count * PANEL_ROWS;
    let mut out = vec![0f32; m * stride];
    let blocks = panels.k / BLOCK;
    let out_ptr = OutPtr(out.as_mut_ptr());
    // One token: four panels side by side; more: two panels by up to four tokens, so each
    // panel's weights are read once for all of them.
    let (side, tile) = match (m, limbs.count) {
        (1, _) => (SIDE_BY_SIDE, 1),
        (_, 1) => (MANY_PANELS_ONE_LIMB, MANY_TOKENS),
        _ => (MANY_PANELS, MANY_TOKENS),
    };
    for_each_task(count, m, side, |tokens, task_panels| {
        for p in task_panels.clone().step_by(side) {
            let p_count = side.min(task_panels.end - p);
            for t in tokens.clone().step_by(tile) {
                let job = Job {
                    panels,
                    first: p,
                    blocks,
                    limbs: &limbs,
                    token: t,
                    out: out_ptr.get().wrapping_add(t * stride + p * PANEL_ROWS),
                    out_stride: stride,
                };
                let t_count = tile.min(tokens.end - t);
                // SAFETY: panels p..p + p_count and tokens t..t + t_count are in bounds; their
                // outputs are this task's alone.
                unsafe { job.run(p_count, t_count, level) };
            }
        }
    });
    unpadded(out, stride, panels.n)
}

/// Some panels from `first` × some tokens from `token`, over all of K.
pub(super) struct Job<'a> {
    pub panels: &'a BlockPanels,
    pub first: usize,
    pub blocks: usize,
    pub limbs: &'a Limbs,
    pub token: usize,
    /// Panel `first`'s first output of token `token`: rows of `out_stride`.
    pub out: *mut f32,
    pub out_stride: usize,
}

impl Job<'_> {
    /// # Safety
    /// `panels` panels and `tokens` tokens from the job's first are in bounds, and their
    /// outputs this caller's alone; `panels` at most [`SIDE_BY_SIDE`] with one token, or at
    /// most [`MANY_PANELS`] ([`MANY_PANELS_ONE_LIMB`] with one limb) with at most
    /// [`MANY_TOKENS`].
    unsafe fn run(&self, panels: usize, tokens: usize, level: SimdLevel) {
        debug_assert_eq!(self.limbs.layout, Layout::Rows, "invariant: a token's limbs read as a row");
        #[cfg(target_arch = "x86_64")]
        if level >= SimdLevel::Avx512Vnni {
            // SAFETY: forwarded; this CPU runs AVX-512 VNNI.
            return unsafe { vnni::run(self, panels, tokens) };
        }
        let _ = level;
        for p in 0..panels {
            for t in 0..tokens {
                // SAFETY: forwarded.
                unsafe { self.portable(p, t) };
            }
        }
    }

    /// Where the `panel`-th panel's block-panel `b` of values starts.
    pub fn block(&self, panel: usize, b: usize) -> *const u8 {
        let bytes = self.panels.values.block_bytes();
        self.panels.q.as_ptr().wrapping_add(((self.first + panel) * self.blocks + b) * bytes)
    }

    /// Where the `panel`-th panel's `d` run `i` ([`Scaling::d_runs`]: 16 `d`, then 16 `dmin`)
    /// for block-panel `b` starts.
    pub fn d(&self, panel: usize, b: usize, i: usize) -> *const half::f16 {
        let at = self.panels.scaling.d_index(self.blocks, self.first + panel, b, i);
        self.panels.d.as_ptr().wrapping_add(at)
    }

    /// Where the `panel`-th panel's factor run `i` ([`Scaling::factor_runs`]) for block-panel
    /// `b` starts.
    pub fn factors(&self, panel: usize, b: usize, i: usize) -> *const u8 {
        let at = self.panels.scaling.factor_index(self.blocks, self.first + panel, b, i);
        self.panels.factors.as_ptr().wrapping_add(at)
    }

    /// Where token `t`'s (from the job's first) limbs for block `b` start (limbs in
    /// [`Layout::Rows`]), their biased sums ([`Limbs::biased`], [`HALF_SUMS`]), its `s` and
    /// its `Σx`.
    pub fn x(&self, t: usize, b: usize) -> (*const i8, *const i32, *const f32, *const f32) {
        let at = (self.token + t) * self.blocks + b;
        (
            self.limbs.limbs.as_ptr().wrapping_add(at * LIMB_BYTES),
            self.limbs.biased.as_ptr().wrapping_add(at * HALF_SUMS),
            self.limbs.scales.as_ptr().wrapping_add(at),
            self.limbs.x_sums.as_ptr().wrapping_add(at),
        )
    }

    /// The `panel`-th panel for token `t`, one output row at a time: the module's arithmetic
    /// as written, on the values as they are (`Σ q · limb`, equal to the biased sums less the
    /// bias times the limbs' sum that the SIMD variant computes).
    ///
    /// # Safety
    /// As [`Job::run`].
    unsafe fn portable(&self, panel: usize, t: usize) {
        let (values, scaling) = (self.panels.values, self.panels.scaling);
        let width = if scaling.per_16() { BLOCK / 2 } else { BLOCK };
        // The panel's scales and offsets, read as the f32 tiles read them.
        let scales =
            self.panels.tile(self.first + panel, std::ptr::null(), std::ptr::null(), std::ptr::null_mut(), 0);
        let mut block = [0i8; BLOCK * PANEL_ROWS];
        let mut acc = [0f32; PANEL_ROWS];
        for b in 0..self.blocks {
            // SAFETY: a whole block-panel in bounds (the caller's contract).
            values.unpack(
                unsafe { std::slice::from_raw_parts(self.block(panel, b), values.block_bytes()) },
                &mut block,
            );
            let (limbs, _, s, x_sum) = self.x(t, b);
            // SAFETY: the token's block of limbs, its `s` and `Σx` (the caller's contract).
            let (limbs, s, x_sum) = unsafe { (std::slice::from_raw_parts(limbs, LIMB_BYTES), *s, *x_sum) };
            for (j, acc) in acc.iter_mut().enumerate() {
                for half in 0..BLOCK / width {
                    let columns = half * width..(half + 1) * width;
                    let sums: [i32; LIMBS] = std::array::from_fn(|l| {
                        let product =
                            |c| i32::from(block[Order::Lanes.index(c, j)]) * i32::from(limbs[l * BLOCK + c]);
                        columns.clone().map(product).sum()
                    });
                    // SAFETY: the panel's scales for block b (the caller's contract).
                    let r = unsafe { scales.scale(0, b, half, j) };
                    *acc = epilogue(sums, r * s, *acc);
                }
                if scaling == Scaling::SuperMin {
                    // SAFETY: as above; this scaling has offsets.
                    *acc = (-unsafe { scales.offset(0, b, j) }).mul_add(x_sum, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            // SAFETY: in bounds and this caller's alone.
            unsafe { *self.out.add(t * self.out_stride + panel * PANEL_ROWS + j) = *acc };
        }
    }
}

/// The bias the SIMD variant adds to each value to make it unsigned: 128 for int8 (its sign
/// bit flipped), the format's own for packed values (stored biased).
pub(super) fn bias(values: Values) -> i32 {
    match values {
        Values::Int8 => 128,
        Values::Packed { bias, .. } => i32::from(bias),
    }
}

/// One row's block (or half block): its three exact sums into its f32 total, `ds` being
/// `r · s`.
#[inline(always)]
pub(super) fn epilogue(sums: [i32; LIMBS], ds: f32, acc: f32) -> f32 {
    let t = sums[2] as f32 * W2;
    let t = (sums[1] as f32).mul_add(W1, t);
    let t = sums[0] as f32 + t;
    t.mul_add(ds, acc)
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(test)]
mod tests;
