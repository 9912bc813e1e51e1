//! The sampler's passes over a vocabulary-sized row, written so the compiler vectorizes them:
//! a branch-free `exp` for the non-positive arguments softmax needs (libm's `expf` is a call per
//! element, which no compiler vectorizes, and it was two thirds of a step's CPU time with a
//! 152k-token vocabulary), and sums in f64 over independent lanes (one running sum is a chain
//! of dependent adds the compiler may not reorder).

use crate::ops::simd::{self, SimdLevel};

/// Elements per block: weights are summed per block (vectorized, into f32 lanes, then f64), and
/// a draw walks the block sums first and one block's weights after.
pub const BLOCK: usize = 64;

/// Below this `exp` is 0 in these passes (f32's smallest normal is `exp(-87.34)`).
const MIN_ARG: f32 = -87.0;

/// `e^x` for `x <= 0`, within 1 ulp of `f32::exp` for `x` in `[-87, 0]` (tested to 2); 0 below
/// -87 and for -inf or NaN (a masked or broken logit weighs nothing). No branches or calls:
/// `x = n ln2 + r` with `|r| <= ln2/2`, a degree-7 polynomial for `e^r`, and `2^n` written into
/// the exponent bits.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let in_range = x >= MIN_ARG; // false for NaN and -inf too
    let x = if !in_range {
        MIN_ARG
    } else if x > 0.0 {
        0.0
    } else {
        x
    };
    // Round to nearest by adding 1.5 * 2^23 (f32::round is a call on baseline x86-64, which
    // would stop the vectorization); `t`'s low mantissa bits then hold n itself.
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two so that n * LN2_HI is exact in f32.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients 1/k! to k = 7: the remainder on |r| <= 0.347 is under 1e-8.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits()); // n, two's complement
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if in_range {
        p * scale
    } else {
        0.0
    }
}

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
        SimdLevel::Avx512 => unsafe { block_sum_avx512(block, max, inv_temperature, min_weight) },
        // SAFETY: `simd::level` saw AVX2 and FMA on this CPU.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { block_sum_avx2(block, max, inv_temperature, min_weight) },
        SimdLevel::Baseline => block_sum(block, max, inv_temperature, min_weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against std's exp (libm), every 1/4096 step over the range softmax uses.
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = f32::from_bits(want.to_bits() + 1) - want;
            worst = worst.max((got - want).abs() / ulp);
            x += 1.0 / 4096.0;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn exp_is_zero_below_the_range_and_for_masked_or_broken_logits() {
        for x in [-87.5, -1000.0, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(exp_nonpositive(x), 0.0, "exp({x})");
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
