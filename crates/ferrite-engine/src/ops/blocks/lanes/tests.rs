//! The limbs against the inputs they stand for, and the SIMD variants' bits against the
//! portable ones'.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::super::tests::{inputs, matrix, FORMATS};
use super::*;
use crate::ops::quantized::KQuants;
use crate::ops::simd;

/// Blocks of inputs: random at several magnitudes, and the edges (zeros, one large value
/// among tiny ones, subnormals, the largest finite, ties of the rounding).
fn blocks() -> Vec<[f32; BLOCK]> {
    let random: Vec<f32> = Tensor::randn(0f32, 1.0, 64 * BLOCK, &Device::Cpu).unwrap().to_vec1().unwrap();
    let mut out: Vec<[f32; BLOCK]> = random
        .chunks_exact(BLOCK)
        .enumerate()
        .map(|(i, c)| std::array::from_fn(|j| c[j] * 10f32.powi(i as i32 % 9 - 4)))
        .collect();
    out.push([0.0; BLOCK]);
    out.push(std::array::from_fn(|j| if j == 5 { 1e4 } else { j as f32 * 1e-6 }));
    out.push(std::array::from_fn(|j| f32::from_bits(j as u32 + 1)));
    out.push(std::array::from_fn(|j| TINY * (1.0 + j as f32 / 64.0)));
    out.push(std::array::from_fn(|j| TINY * (j as f32 / 64.0)));
    out.push(std::array::from_fn(|j| if j % 2 == 0 { f32::MAX } else { -f32::MAX / 3.0 }));
    out.push(std::array::from_fn(|j| (j as f32 - 16.0) * 0.5));
    out
}

/// `s · (a + b/254 + c/254²)` gives back x to 2⁻²² of the block's largest (all zeros below
/// [`TINY`]), and the sums are the limbs'.
#[test]
fn limbs_stand_for_their_inputs() {
    for x in blocks() {
        let (mut limbs, mut sums) = ([0i8; LIMB_BYTES], [[0i32; LIMBS]; 2]);
        let s = split(&x, &mut limbs, &mut sums);
        let max = x.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        for (c, &v) in x.iter().enumerate() {
            let parts: Vec<f64> = (0..LIMBS).map(|l| f64::from(limbs[l * BLOCK + c])).collect();
            let back = f64::from(s) * (parts[0] + parts[1] / 254.0 + parts[2] / 64516.0);
            let bound = if max < f64::from(TINY) { max } else { max * 2f64.powi(-22) };
            assert!((back - f64::from(v)).abs() <= bound, "{v} came back as {back} (max {max})");
        }
        for (half, sums) in sums.iter().enumerate() {
            for (l, &sum) in sums.iter().enumerate() {
                let limb = &limbs[l * BLOCK + half * BLOCK / 2..][..BLOCK / 2];
                assert_eq!(sum, limb.iter().map(|&v| i32::from(v)).sum::<i32>());
            }
        }
    }
    // A block with an infinity or a NaN makes NaN outputs, as in f32.
    for bad in [f32::INFINITY, f32::NAN] {
        let mut x = [1.0; BLOCK];
        x[7] = bad;
        assert!(split(&x, &mut [0; LIMB_BYTES], &mut [[0; LIMBS]; 2]).is_nan(), "{bad}");
    }
}

/// A random `[n, k]` matrix of `dtype` in [`Order::Lanes`], and the same with its values as
/// int8 (as a stack of parts whose values differ holds them).
fn lanes(n: usize, k: usize, dtype: GgmlDType) -> [BlockPanels; 2] {
    let panels = BlockPanels::from_quantized_in(&matrix(n, k, dtype), KQuants::Exact, Some(Order::Lanes))
        .unwrap()
        .unwrap();
    let int8 = BlockPanels::pack_in(&panels.rows(0..n), k, Values::Int8, panels.scaling, Order::Lanes);
    [panels, int8]
}

/// Whether this CPU runs the VNNI variants; says so when it does not.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd::detected() >= SimdLevel::Avx512Vnni {
        return true;
    }
    println!(
        "skipped: this CPU has no AVX-512 VNNI ({}); the portable variant ran alone",
        simd::detected().name()
    );
    false
}

#[test]
#[cfg(target_arch = "x86_64")]
fn the_simd_split_gives_the_portable_limbs() {
    if !vnni() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for x in blocks().into_iter().chain([[f32::NAN; BLOCK], [f32::NEG_INFINITY; BLOCK]]) {
        let (mut want, mut want_sums, mut got, mut got_sums) =
            ([0; LIMB_BYTES], [[0; LIMBS]; 2], [0; LIMB_BYTES], [[0; LIMBS]; 2]);
        let s = split(&x, &mut want, &mut want_sums);
        // SAFETY: this CPU has AVX-512 with BW (vnni() said so).
        let t = unsafe { vnni::split_avx512(&x, &mut got, &mut got_sums) };
        assert!(s.to_bits() == t.to_bits() || (s.is_nan() && t.is_nan()), "{s} vs {t}");
        assert_eq!((want, want_sums), (got, got_sums), "{x:?}");
    }
}

/// Every tile shape of the VNNI variant, for each format: the portable variant's bits.
#[test]
#[cfg(target_arch = "x86_64")]
fn the_vnni_tiles_give_the_portable_bits() {
    if !vnni() {
        return;
    }
    for panels in FORMATS.into_iter().flat_map(|dtype| lanes(4 * PANEL_ROWS, 3 * dtype.block_size(), dtype)) {
        let (n, k, m) = (4 * PANEL_ROWS, panels.k, 4);
        let x = inputs(m, k);
        let limbs = Limbs::new(&x, k, SimdLevel::Baseline, bias(panels.values), Layout::Rows);
        for (count, tokens) in
            [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4)]
        {
            let run = |level: SimdLevel| {
                let mut out = vec![0f32; m * n];
                let job = Job {
                    panels: &panels,
                    first: 0,
                    blocks: k / BLOCK,
                    limbs: &limbs,
                    token: 0,
                    out: out.as_mut_ptr(),
                    out_stride: n,
                };
                // SAFETY: `count` of 4 panels, `tokens` of 4; outputs in `out`; VNNI only
                // where this CPU has it.
                unsafe { job.run(count, tokens, level) };
                out
            };
            let (got, want) = (run(SimdLevel::Avx512Vnni), run(SimdLevel::Baseline));
            assert!(want.iter().any(|&v| v != 0.0));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{panels:?} {count} panels × {tokens} tokens at {i}: {g} vs {w}"
                );
            }
        }
    }
}

/// The whole product through the VNNI driver (the tails of the 4-token tile and of the
/// 96-token task, a panel the rows do not fill, the SIMD split of x): the portable bits.
#[test]
#[cfg(target_arch = "x86_64")]
fn the_vnni_products_give_the_portable_bits() {
    if !vnni() {
        return;
    }
    for panels in FORMATS.into_iter().flat_map(|dtype| lanes(37, 3 * dtype.block_size(), dtype)) {
        let k = panels.k;
        for m in [1, 2, 3, 5, 100] {
            let x = inputs(m, k);
            let bits =
                |level| matmul_at(&panels, &x, m, level).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(SimdLevel::Avx512Vnni), bits(SimdLevel::Baseline), "{panels:?} m {m}");
        }
    }
}

/// The products of many tokens on AMX tiles (whole tiles, the tail of a tile and of the
/// 96-token task, a panel the rows do not fill, every format and int8 stacks): the bits of
/// the portable variant, hence of VNNI's.
#[test]
#[cfg(target_arch = "x86_64")]
fn the_amx_products_give_the_portable_bits() {
    if simd::detected() < SimdLevel::Amx {
        println!("skipped: this CPU (or OS) gives no AMX tiles ({})", simd::detected().name());
        return;
    }
    for panels in FORMATS.into_iter().flat_map(|dtype| lanes(37, 3 * dtype.block_size(), dtype)) {
        let k = panels.k;
        for m in [amx::MIN_TOKENS, 16, 17, 100, 200] {
            let x = inputs(m, k);
            let bits =
                |level| matmul_at(&panels, &x, m, level).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(SimdLevel::Amx), bits(SimdLevel::Baseline), "{panels:?} m {m}");
        }
    }
}
