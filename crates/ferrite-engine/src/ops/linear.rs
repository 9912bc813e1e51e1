//! `y = x Wᵀ + b` for the decoder's projections, with CPU paths for the step sizes of decoding.
//!
//! - At most [`SKINNY_MAX_TOKENS`] tokens (batch-1 and small-batch decode, memory-bound):
//!   candle hands a one-row product to gemm's gemv, which runs on one thread and leaves half the
//!   machine's bandwidth unused. Here W's rows are split across threads instead; each weight
//!   row is read once and dotted with every token's row while it is in L1.
//! - Up to [`TILED_MAX_TOKENS`] (decode with many sequences, compute-bound): candle's gemm packs
//!   both operands on every call, which for a 64-token step moves as many bytes as the product
//!   itself. Here register tiles of [`TILE_ROWS`] weight rows × [`TILE_TOKENS`] tokens take both
//!   operands where they lie (both are contiguous along K), 8 lanes at a time.
//! - Larger steps (prefill) stay on candle's blocked gemm.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{self, SimdLevel};

/// Steps with at most this many tokens take the row-parallel path.
pub const SKINNY_MAX_TOKENS: usize = 8;

/// Weight rows per rayon task: big enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// Steps with more tokens than the skinny path but at most this many take the tiled path.
pub const TILED_MAX_TOKENS: usize = 128;
/// One register tile: weight rows × tokens, each an 8-lane accumulator (12 of AVX2's 16
/// registers; the 6 weight rows, 24 KB of one K chunk, stay in L1 while token rows stream).
pub const TILE_ROWS: usize = 6;
pub const TILE_TOKENS: usize = 2;
/// K is cut into chunks of this many, so a tile's weight rows stay in L1 (6 rows × 1024 × 4 B).
const K_CHUNK: usize = 1024;
/// Weight rows per rayon task on the tiled path.
const TILED_ROWS_PER_TASK: usize = TILE_ROWS * 4;
// `tile` instantiates every shape up to 6 × 2 (12 accumulators fit AVX2's 16 registers).
const _: () = assert!(TILE_ROWS <= 6 && TILE_TOKENS <= 2);

/// A linear layer: `weight` `[out, in]` as stored in the checkpoint, optional `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// One layer computing `parts` side by side: their weights' rows (and biases) stacked in
    /// order, so `forward` gives `[tokens, sum of their outputs]` in one product. The parts
    /// must share their input size, dtype and device, and all have a bias or none.
    pub fn stacked(parts: &[Linear]) -> candle_core::Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            n => candle_core::bail!("stacked linear: {n} of {} parts have a bias", parts.len()),
        };
        Ok(Self { weight, bias })
    }

    /// x: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let tokens = x.dim(0)?;
        let cpu_f32 = matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.weight.is_contiguous();
        let y = if cpu_f32 && tokens <= SKINNY_MAX_TOKENS {
            x.contiguous()?.apply_op2_no_bwd(&self.weight, &SkinnyMatmul)?
        } else if cpu_f32 && tokens <= TILED_MAX_TOKENS {
            x.contiguous()?.apply_op2_no_bwd(&self.weight, &TiledMatmul)?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct SkinnyMatmul;

/// The operands of `x Wᵀ` on the CPU: `x` `[m, k]` and `w` `[n, k]`, f32 and contiguous.
struct Operands<'a> {
    x: &'a [f32],
    w: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
}

impl<'a> Operands<'a> {
    /// The op's inputs, checked: shapes that agree on K, f32, contiguous.
    fn of(
        op: &str,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
    ) -> candle_core::Result<Self> {
        let (m, k) = l1.shape().dims2()?;
        let (n, wk) = l2.shape().dims2()?;
        if k != wk {
            candle_core::bail!("{op}: x {:?} does not match weight {:?}", l1.shape(), l2.shape());
        }
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("{op}: f32 only");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("{op}: inputs must be contiguous");
        };
        Ok(Self { x: &x[x0..x1], w: &w[w0..w1], m, k, n })
    }
}

/// `out_t[r * tokens + t] = dot(w[r], x[t])` for the rows `r` of one task.
#[inline(always)]
fn rows_generic(x: &[f32], w_rows: &[f32], k: usize, tokens: usize, out_t: &mut [f32]) {
    for (w_row, out) in w_rows.chunks_exact(k).zip(out_t.chunks_exact_mut(tokens)) {
        for (t, o) in out.iter_mut().enumerate() {
            *o = dot(w_row, &x[t * k..(t + 1) * k]);
        }
    }
}

/// Dot product with 32 independent partial sums, so the compiler vectorizes and pipelines it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &[f32], w_rows: &[f32], k: usize, tokens: usize, out_t: &mut [f32]) {
    rows_generic(x, w_rows, k, tokens, out_t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(x: &[f32], w_rows: &[f32], k: usize, tokens: usize, out_t: &mut [f32]) {
    rows_generic(x, w_rows, k, tokens, out_t)
}

fn rows(level: SimdLevel, x: &[f32], w_rows: &[f32], k: usize, tokens: usize, out_t: &mut [f32]) {
    match level {
        // SAFETY: `simd::level` saw AVX-512F on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { rows_avx512(x, w_rows, k, tokens, out_t) },
        // SAFETY: `simd::level` saw AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { rows_avx2(x, w_rows, k, tokens, out_t) },
        SimdLevel::Baseline => rows_generic(x, w_rows, k, tokens, out_t),
    }
}

impl CustomOp2 for SkinnyMatmul {
    fn name(&self) -> &'static str {
        "skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Operands { x, w, m: tokens, k, n: out_dim } = Operands::of(self.name(), (s1, l1), (s2, l2))?;
        if k == 0 {
            return Ok((CpuStorage::F32(vec![0f32; tokens * out_dim]), Shape::from_dims(&[tokens, out_dim])));
        }
        // Computed as [out, tokens] so each task writes one contiguous block.
        let level = simd::level();
        let mut out_t = vec![0f32; out_dim * tokens];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * tokens)
            .zip(w.par_chunks(ROWS_PER_TASK * k))
            .for_each(|(o, w_rows)| rows(level, x, w_rows, k, tokens, o));
        let out = if tokens == 1 {
            out_t
        } else {
            let mut out = vec![0f32; out_dim * tokens];
            for (r, row) in out_t.chunks_exact(tokens).enumerate() {
                for (t, &v) in row.iter().enumerate() {
                    out[t * out_dim + r] = v;
                }
            }
            out
        };
        Ok((CpuStorage::F32(out), Shape::from_dims(&[tokens, out_dim])))
    }
}

struct TiledMatmul;

/// `out[t * n + r]` for one tile: `R` weight rows (`w`, stride `k`) × `C` token rows (`x`,
/// stride `k`), over `len` elements of K starting at each row's pointer; added to `out` when
/// `accumulate`, else written. Each result is 8 lanes summed in a fixed order, so on the tiled
/// path (steps of 9..=128 tokens) a token's output does not depend on its tile or its step.
///
/// # Safety
/// `w` and `x` point at `R` and `C` rows of at least `len` readable elements, `k` apart; `out`
/// at `C` rows, `n` apart, of `R` writable elements that are this tile's alone.
#[inline(always)]
unsafe fn tile_generic<const R: usize, const C: usize>(
    w: *const f32,
    x: *const f32,
    k: usize,
    len: usize,
    out: *mut f32,
    n: usize,
    accumulate: bool,
) {
    let mut acc = [[[0f32; 8]; C]; R];
    let mut i = 0;
    while i + 8 <= len {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            for (c, acc_rc) in acc_r.iter_mut().enumerate() {
                for (l, a) in acc_rc.iter_mut().enumerate() {
                    // SAFETY: i + l < len, within the rows the caller vouched for.
                    unsafe { *a += *w.add(r * k + i + l) * *x.add(c * k + i + l) };
                }
            }
        }
        i += 8;
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, lanes) in acc_r.iter().enumerate() {
            // SAFETY: forwarded: rows r and c, K from i to len; out row c, column r.
            unsafe { finish(lanes, w.add(r * k), x.add(c * k), i, len, out.add(c * n + r), accumulate) };
        }
    }
}

/// One tile element: the 8 lane sums added in a fixed order, K's tail (`from..len`) added
/// after, then written or added to `*out`.
///
/// # Safety
/// `w` and `x` hold `len` readable elements; `out` is writable.
#[inline(always)]
unsafe fn finish(
    a: &[f32; 8],
    w: *const f32,
    x: *const f32,
    from: usize,
    len: usize,
    out: *mut f32,
    accumulate: bool,
) {
    let mut v = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for j in from..len {
        // SAFETY: j < len.
        v += unsafe { *w.add(j) * *x.add(j) };
    }
    // SAFETY: the caller's element.
    unsafe { *out = if accumulate { *out + v } else { v } };
}

/// [`tile_generic`] with AVX2 + FMA intrinsics: per 8 elements of K, `R + C` loads and `R × C`
/// fused multiply-adds into registers. The lane sum is the same order as the generic tile's.
///
/// # Safety
/// As [`tile_generic`], on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const C: usize>(
    w: *const f32,
    x: *const f32,
    k: usize,
    len: usize,
    out: *mut f32,
    n: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut i = 0;
    while i + 8 <= len {
        let mut xv = [_mm256_setzero_ps(); C];
        for (c, v) in xv.iter_mut().enumerate() {
            // SAFETY: i + 8 <= len, within token row c.
            *v = unsafe { _mm256_loadu_ps(x.add(c * k + i)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8 <= len, within weight row r.
            let wv = unsafe { _mm256_loadu_ps(w.add(r * k + i)) };
            for (a, &xc) in acc_r.iter_mut().zip(&xv) {
                *a = _mm256_fmadd_ps(wv, xc, *a);
            }
        }
        i += 8;
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, &v) in acc_r.iter().enumerate() {
            let mut lanes = [0f32; 8];
            // SAFETY: 8 floats into an 8-float array.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            // SAFETY: forwarded: rows r and c, K from i to len; out row c, column r.
            unsafe { finish(&lanes, w.add(r * k), x.add(c * k), i, len, out.add(c * n + r), accumulate) };
        }
    }
}

/// One tile of any shape up to `TILE_ROWS × TILE_TOKENS`, dispatched to its monomorphization.
///
/// # Safety
/// As [`tile_generic`]; `rows <= TILE_ROWS`, `tokens <= TILE_TOKENS`; AVX2 + FMA when `avx2`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile(
    avx2: bool,
    rows: usize,
    tokens: usize,
    w: *const f32,
    x: *const f32,
    k: usize,
    len: usize,
    out: *mut f32,
    n: usize,
    accumulate: bool,
) {
    macro_rules! dispatch {
        ($($r:literal, $c:literal);*) => {
            match (rows, tokens) {
                $(($r, $c) => {
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: forwarded; the caller saw AVX2 and FMA.
                        return unsafe { tile_avx2::<$r, $c>(w, x, k, len, out, n, accumulate) };
                    }
                    // SAFETY: forwarded.
                    unsafe { tile_generic::<$r, $c>(w, x, k, len, out, n, accumulate) }
                })*
                _ => unreachable!("tile of {rows} x {tokens}"),
            }
        };
    }
    dispatch!(6, 2; 6, 1; 5, 2; 5, 1; 4, 2; 4, 1; 3, 2; 3, 1; 2, 2; 2, 1; 1, 2; 1, 1)
}

/// A raw pointer the tasks of one product share; each writes only its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own weight rows' columns), and the product
// waits for every task before the buffer is read.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so a closure captures the `Sync` wrapper, not the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl TiledMatmul {
    /// Whether this CPU runs [`tile_avx2`] (AVX2 and FMA, detected once by the standard library).
    fn avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `x` `[m, k]`, `w` `[n, k]` → `[m, n]`; `avx2` only where [`Self::avx2`] says so.
    fn run(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, avx2: bool) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        let ptr = OutPtr(out.as_mut_ptr());
        // Tasks of weight rows; inside, K chunks, then row tiles, then tokens.
        let rows_per_task = TILED_ROWS_PER_TASK;
        (0..n.div_ceil(rows_per_task)).into_par_iter().for_each(|task| {
            let (r0, r1) = (task * rows_per_task, ((task + 1) * rows_per_task).min(n));
            for k0 in (0..k).step_by(K_CHUNK) {
                let len = K_CHUNK.min(k - k0);
                for r in (r0..r1).step_by(TILE_ROWS) {
                    let rows = TILE_ROWS.min(r1 - r);
                    for t in (0..m).step_by(TILE_TOKENS) {
                        let tokens = TILE_TOKENS.min(m - t);
                        // SAFETY: rows r..r + rows of w and t..t + tokens of x hold len
                        // elements from offset k0; out's rows t.. at columns r.. are this task's.
                        unsafe {
                            tile(
                                avx2,
                                rows,
                                tokens,
                                w.as_ptr().add(r * k + k0),
                                x.as_ptr().add(t * k + k0),
                                k,
                                len,
                                ptr.get().add(t * n + r),
                                n,
                                k0 > 0,
                            )
                        };
                    }
                }
            }
        });
        out
    }
}

impl CustomOp2 for TiledMatmul {
    fn name(&self) -> &'static str {
        "tiled-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Operands { x, w, m, k, n } = Operands::of(self.name(), (s1, l1), (s2, l2))?;
        let out = Self::run(x, w, m, k, n, Self::avx2());
        Ok((CpuStorage::F32(out), Shape::from_dims(&[m, n])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive f64 triple loop, for token counts on every path (skinny, tiled, gemm)
    /// and sizes that are not multiples of the vector width, the tile or the task size, with K
    /// under and over one chunk.
    #[test]
    fn matches_naive_matmul_with_bias() {
        let dev = Device::Cpu;
        for (k, out_dim) in [(77, 70), (K_CHUNK + 45, 9)] {
            let w = Tensor::randn(0f32, 1.0, (out_dim, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
            let lin = Linear::new(w.clone(), Some(b.clone()));
            let wv = w.to_vec2::<f32>().unwrap();
            let bv = b.to_vec1::<f32>().unwrap();
            for tokens in [1, 3, SKINNY_MAX_TOKENS, SKINNY_MAX_TOKENS + 5, 64, TILED_MAX_TOKENS + 1] {
                let x = Tensor::randn(0f32, 1.0, (tokens, k), &dev).unwrap();
                let xv = x.to_vec2::<f32>().unwrap();
                let y = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for t in 0..tokens {
                    for o in 0..out_dim {
                        let expected: f64 =
                            (0..k).map(|i| f64::from(xv[t][i]) * f64::from(wv[o][i])).sum::<f64>()
                                + f64::from(bv[o]);
                        assert!(
                            (f64::from(y[t][o]) - expected).abs() < 1e-4 * (k as f64).sqrt(),
                            "k {k}, tokens {tokens}, [{t}][{o}]: {} vs {expected}",
                            y[t][o]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stacked_layers_equal_their_parts_side_by_side() {
        let dev = Device::Cpu;
        let part = |out: usize| {
            let w = Tensor::randn(0f32, 1.0, (out, 24), &dev).unwrap();
            Linear::new(w, Some(Tensor::randn(0f32, 1.0, out, &dev).unwrap()))
        };
        let parts = [part(16), part(8), part(8)];
        let both = Linear::stacked(&parts).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 24), &dev).unwrap();
        let want = Tensor::cat(&parts.iter().map(|p| p.forward(&x).unwrap()).collect::<Vec<_>>(), 1).unwrap();
        let got = both.forward(&x).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        let unbiased = Linear::new(Tensor::zeros((4, 24), DType::F32, &dev).unwrap(), None);
        let err = Linear::stacked(&[parts[0].clone(), unbiased]).unwrap_err();
        assert!(err.to_string().contains("1 of 2 parts have a bias"), "{err}");
    }

    /// A token's output on the tiled path does not depend on where in the step it sits or how
    /// many tokens share the step: the same bits among 9 (at another tile slot) and among 128,
    /// with a K tail and two K chunks.
    #[test]
    fn tiled_rows_do_not_depend_on_the_step() {
        let dev = Device::Cpu;
        let (k, out_dim) = (K_CHUNK + 45, 37);
        let lin = Linear::new(Tensor::randn(0f32, 1.0, (out_dim, k), &dev).unwrap(), None);
        let x = Tensor::randn(0f32, 1.0, (TILED_MAX_TOKENS, k), &dev).unwrap();
        let all = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let some = lin.forward(&x.narrow(0, 51, 9).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in some.iter().enumerate() {
            assert_eq!(row, &all[51 + i], "token {} of the step", 51 + i);
        }
    }

    /// The AVX2 tiles and the generic ones compute the same products (within rounding: FMA);
    /// K shorter than one vector too.
    #[test]
    fn avx2_and_generic_tiles_agree() {
        let mut rng = 1u64;
        let mut next = move || {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (m, k, n) in [(9, 5, 7), (13, 77, 70), (40, K_CHUNK + 3, 25)] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let generic = TiledMatmul::run(&x, &w, m, k, n, false);
            if TiledMatmul::avx2() {
                let avx2 = TiledMatmul::run(&x, &w, m, k, n, true);
                for (i, (a, b)) in avx2.iter().zip(&generic).enumerate() {
                    assert!((a - b).abs() < 1e-4, "({m}, {k}, {n}) element {i}: {a} vs {b}");
                }
            }
            for t in 0..m {
                for r in 0..n {
                    let want: f64 = (0..k).map(|i| f64::from(x[t * k + i]) * f64::from(w[r * k + i])).sum();
                    let got = generic[t * n + r];
                    assert!(
                        (f64::from(got) - want).abs() < 1e-4,
                        "({m}, {k}, {n}) [{t}][{r}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
