//! `y = x Wᵀ + b` for the decoder's projections, with a CPU path for the few-token steps that
//! dominate decoding.
//!
//! candle hands a one-row product to gemm's gemv, which runs on one thread: a batch-1 decode
//! step then reads the weights with one core and leaves half the machine's bandwidth unused.
//! Here a step of at most [`SKINNY_MAX_TOKENS`] tokens splits W's rows across threads instead;
//! each weight row is read once and dotted with every token's row while it is in L1.
//! Larger steps (prefill) stay on candle's blocked gemm, which is compute-bound and already
//! parallel.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{self, SimdLevel};

/// Steps with at most this many tokens take the row-parallel path.
pub const SKINNY_MAX_TOKENS: usize = 8;

/// Weight rows per rayon task: big enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

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

    /// x: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let tokens = x.dim(0)?;
        let skinny = matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && tokens <= SKINNY_MAX_TOKENS
            && self.weight.is_contiguous();
        let y = if skinny {
            x.contiguous()?.apply_op2_no_bwd(&self.weight, &SkinnyMatmul)?
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
        let (tokens, k) = l1.shape().dims2()?;
        let (out_dim, wk) = l2.shape().dims2()?;
        if k != wk {
            candle_core::bail!("skinny-matmul: x {:?} does not match weight {:?}", l1.shape(), l2.shape());
        }
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("skinny-matmul: f32 only");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("skinny-matmul: inputs must be contiguous");
        };
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive f64 triple loop, for token counts on both sides of the threshold and
    /// sizes that are not multiples of the vector width or the task size.
    #[test]
    fn matches_naive_matmul_with_bias() {
        let (k, out_dim) = (77, 70);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (out_dim, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let wv = w.to_vec2::<f32>().unwrap();
        let bv = b.to_vec1::<f32>().unwrap();
        for tokens in [1, 3, SKINNY_MAX_TOKENS, SKINNY_MAX_TOKENS + 5] {
            let x = Tensor::randn(0f32, 1.0, (tokens, k), &dev).unwrap();
            let xv = x.to_vec2::<f32>().unwrap();
            let y = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for t in 0..tokens {
                for o in 0..out_dim {
                    let expected: f64 =
                        (0..k).map(|i| f64::from(xv[t][i]) * f64::from(wv[o][i])).sum::<f64>()
                            + f64::from(bv[o]);
                    assert!(
                        (f64::from(y[t][o]) - expected).abs() < 1e-4,
                        "tokens {tokens}, [{t}][{o}]: {} vs {expected}",
                        y[t][o]
                    );
                }
            }
        }
    }
}
