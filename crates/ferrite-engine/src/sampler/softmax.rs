//! The sampler's passes over a vocabulary-sized row, written so the compiler vectorizes them:
//! [`exp_nonpositive`] instead of libm's `expf` (a call per element, which no compiler
//! vectorizes; it was two thirds of a step's CPU time with a 152k-token vocabulary), and sums
//! over independent lanes (one running sum is a chain of dependent adds the compiler may not
//! reorder).

use crate::ops::math::exp_nonpositive;
use crate::ops::simd::{self, SimdLevel};

/// Elements per block: weights are summed per block (vectorized, into f32 lanes, then f64), and
/// a draw walks the block sums first and one block's weights after.
pub const BLOCK: usize = 64;

/// A weight as the sampler counts it: `exp((v - max) * inv_temperature)`, 0 under `min_weight`.
#[inline(always)]
fn weight(v: f32, max: f32, inv_temperature: f32, min_weight: f32) -> f32 {
    let w = exp_nonpositive((v - max) * inv_temperature);
    if w >= min_weight {
        w
    } else {
        0.0
    }
}

/// The row's weights (as [`weight`] counts them), summed per [`BLOCK`]: `max` is the row's
/// maximum, `min_weight` min_p's threshold (0 for none).
#[derive(Debug, Clone)]
pub struct BlockSums {
    pub sums: Vec<f64>,
    pub total: f64,
    max: f32,
    inv_temperature: f32,
    min_weight: f32,
}

impl BlockSums {
    pub fn of(row: &[f32], max: f32, inv_temperature: f32, min_weight: f32) -> Self {
        let level = simd::level();
        let sums: Vec<f64> = row
            .chunks(BLOCK)
            .map(|b| block_sum_dispatch(level, b, max, inv_temperature, min_weight))
            .collect();
        let total = sums.iter().sum();
        BlockSums { sums, total, max, inv_temperature, min_weight }
    }

    /// Whether these sums count weights as `(max, inv_temperature, min_weight)` would.
    pub fn matches(&self, max: f32, inv_temperature: f32, min_weight: f32) -> bool {
        (self.max, self.inv_temperature, self.min_weight) == (max, inv_temperature, min_weight)
    }

    /// The last token of `row` with a weight above 0, if any.
    pub fn last_kept(&self, row: &[f32]) -> Option<usize> {
        row.iter().rposition(|&v| weight(v, self.max, self.inv_temperature, self.min_weight) > 0.0)
    }

    /// The index where the running sum of `row`'s weights first exceeds `u` (`u` in
    /// `[0, total)`); `None` when `u >= total` (rounding: the caller takes the last kept token).
    /// Walks the block sums, then one block's weights.
    pub fn draw(&self, row: &[f32], mut u: f64) -> Option<usize> {
        let b = self.sums.iter().position(|&s| {
            let past = u < s;
            if !past {
                u -= s;
            }
            past
        })?;
        let block = &row[b * BLOCK..(b * BLOCK + BLOCK).min(row.len())];
        let w = |v: f32| weight(v, self.max, self.inv_temperature, self.min_weight);
        for (i, &v) in block.iter().enumerate() {
            let w = f64::from(w(v));
            if w > 0.0 && u < w {
                return Some(b * BLOCK + i);
            }
            u -= w;
        }
        // The block's sum and this walk rounded apart: the block's last kept token.
        block.iter().rposition(|&v| w(v) > 0.0).map(|i| b * BLOCK + i)
    }
}

/// One block's weights summed: computed into a buffer by a plain map loop (which the compiler
/// vectorizes; accumulating lanes in the same loop it did not), then added in f32 lanes and f64.
#[inline(always)]
fn block_sum(block: &[f32], max: f32, inv_temperature: f32, min_weight: f32) -> f64 {
    const LANES: usize = 8;
    let mut buf = [0f32; BLOCK];
    let buf = &mut buf[..block.len()];
    for (w, &v) in buf.iter_mut().zip(block) {
        *w = weight(v, max, inv_temperature, min_weight);
    }
    let mut acc = [0f32; LANES];
    let chunks = buf.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, &w) in acc.iter_mut().zip(chunk) {
            *a += w;
        }
    }
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_sum_avx512(block: &[f32], max: f32, inv_temperature: f32, min_weight: f32) -> f64 {
    block_sum(block, max, inv_temperature, min_weight)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_sum_avx2(block: &[f32], max: f32, inv_temperature: f32, min_weight: f32) -> f64 {
    block_sum(block, max, inv_temperature, min_weight)
}

fn block_sum_dispatch(
    level: SimdLevel,
    block: &[f32],
    max: f32,
    inv_temperature: f32,
    min_weight: f32,
) -> f64 {
    match level {
        // SAFETY: `simd::level` saw AVX-512F on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe {
            block_sum_avx512(block, max, inv_temperature, min_weight)
        },
        // SAFETY: `simd::level` saw AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { block_sum_avx2(block, max, inv_temperature, min_weight) },
        SimdLevel::Baseline => block_sum(block, max, inv_temperature, min_weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_or_masked_logit_weighs_nothing() {
        for v in [f32::NAN, f32::NEG_INFINITY] {
            assert_eq!(weight(v, 0.0, 1.0, 0.0), 0.0, "weight({v})");
        }
    }

    /// Naive f64 references: the sum with libm exp, and the first index past `u`.
    fn naive(row: &[f32], max: f32, inv_t: f32, min_w: f32) -> Vec<f64> {
        row.iter()
            .map(|&v| {
                let w = f64::from((v - max) * inv_t).exp();
                if w >= f64::from(min_w) && w > 0.0 {
                    w
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn row(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0).collect()
    }

    #[test]
    fn sums_and_draws_match_a_naive_reference() {
        for (n, inv_t, min_w) in
            [(1, 1.0, 0.0), (7, 1.0, 0.0), (1000, 0.5, 0.0), (4099, 2.0, 0.01), (151_936, 1.0, 0.0)]
        {
            let mut r = row(n);
            if n > 10 {
                r[3] = f32::NEG_INFINITY; // a masked token weighs nothing
            }
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w = naive(&r, max, inv_t, min_w);
            let total: f64 = w.iter().sum();
            let sums = BlockSums::of(&r, max, inv_t, min_w);
            let got = sums.total;
            assert!((got - total).abs() <= 1e-6 * total, "n {n}: sum {got} vs {total}");
            for frac in [0.0, 0.1, 0.37, 0.5, 0.9, 0.999_999] {
                let u = frac * total;
                let mut acc = 0.0;
                let want = w.iter().position(|&x| {
                    acc += x;
                    acc > u
                });
                let got = sums.draw(&r, u);
                // Rounding may move a draw that sits on a boundary to a neighbour, never further.
                let (g, e) = (got.expect("a draw below the total"), want.expect("reference draw"));
                let near = g == e || w[g.min(e)..=g.max(e)].iter().filter(|&&x| x > 0.0).count() <= 2;
                assert!(near, "n {n}, u {frac}: drew {g}, reference {e}");
                assert!(w[g] > 0.0, "n {n}: drew a token of weight 0");
            }
            assert_eq!(sums.draw(&r, total * 1.01), None);
        }
    }
}
