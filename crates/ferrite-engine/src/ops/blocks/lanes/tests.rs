//! The limbs against the inputs they stand for, and the SIMD variants' bits against the
//! portable ones'.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::super::tests::{inputs, matrix, FORMATS};
use super::*;
use crate::ops::quantized::{Activations, KQuants};
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
        let s = split(&x, &mut limbs, &mut sums, LIMBS);
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
        for count in [LIMBS, 1] {
            assert!(split(&x, &mut [0; LIMB_BYTES], &mut [[0; LIMBS]; 2], count).is_nan(), "{bad}");
        }
    }
}

/// With one limb (int8 activations), `s · a` gives back x to half a step of `max / 127`
/// (`s`'s and `1/s`'s own rounding aside), `b` and `c` are zeros, and the sums are `a`'s.
#[test]
fn one_limb_rounds_each_block_to_int8() {
    for x in blocks() {
        let (mut limbs, mut sums) = ([0i8; LIMB_BYTES], [[0i32; LIMBS]; 2]);
        let s = split(&x, &mut limbs, &mut sums, 1);
        let max = x.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        assert!(limbs[BLOCK..].iter().all(|&v| v == 0), "b and c are zeros");
        let used = limbs[..BLOCK].iter().map(|v| v.unsigned_abs()).max().unwrap_or(0);
        for (c, &v) in x.iter().enumerate() {
            let back = f64::from(s) * f64::from(limbs[c]);
            let bound = if max < f64::from(TINY) { max } else { max / 254.0 * (1.0 + 1e-5) };
            assert!((back - f64::from(v)).abs() <= bound, "{v} came back as {back} (max {max})");
        }
        if max >= f64::from(TINY) {
            assert_eq!(used, 127, "the largest input takes the whole int8 range: {x:?}");
        }
        for (half, sums) in sums.iter().enumerate() {
            let a = &limbs[half * BLOCK / 2..][..BLOCK / 2];
            assert_eq!(sums, &[a.iter().map(|&v| i32::from(v)).sum::<i32>(), 0, 0]);
        }
    }
}

/// With int8 activations each output is the dequantized matrix's product of the rounded x: off
/// the exact product by no more than `Σ_blocks (s/2) · Σ|w|` (and f32's rounding), off it
/// somewhere, and batch-invariant, for every format (the process's level: VNNI here where the
/// CPU has it, else the portable variant).
#[test]
fn int8_activations_stay_within_their_rounding() {
    for dtype in FORMATS {
        let (n, k) = (37, 2 * dtype.block_size().max(64));
        let q = matrix(n, k, dtype);
        let panels = BlockPanels::from_quantized_in(&q, KQuants::Exact, Some(Order::Lanes))
            .unwrap()
            .unwrap()
            .with_activations(Activations::Int8);
        let w = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
        let m = 20;
        let x = inputs(m, k);
        let y = matmul_at(&panels, &x, m, crate::ops::simd::level());
        let mut largest_error = 0f64;
        for r in 0..m {
            let x = &x[r * k..(r + 1) * k];
            for c in 0..n {
                let want: f64 = (0..k).map(|i| f64::from(x[i]) * f64::from(w[c][i])).sum();
                let bound: f64 = (0..k / BLOCK)
                    .map(|b| {
                        let cols = b * BLOCK..(b + 1) * BLOCK;
                        let max = cols.clone().fold(0f64, |m, i| m.max(f64::from(x[i].abs())));
                        max / 254.0 * cols.map(|i| f64::from(w[c][i].abs())).sum::<f64>()
                    })
                    .sum::<f64>()
                    * (1.0 + 1e-4)
                    + 1e-4 * (1.0 + want.abs());
                let error = (f64::from(y[r * n + c]) - want).abs();
                assert!(error <= bound, "{dtype:?} [{r}][{c}]: {} vs {want} (bound {bound})", y[r * n + c]);
                largest_error = largest_error.max(error);
            }
            let alone = matmul_at(&panels, x, 1, crate::ops::simd::level());
            assert_eq!(alone, y[r * n..(r + 1) * n], "{dtype:?}: row {r} differs alone");
        }
        assert!(largest_error > 1e-4, "{dtype:?}: int8 activations changed nothing ({largest_error})");
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

/// Both ways of taking x.
const ACTIVATIONS: [Activations; 2] = [Activations::Exact, Activations::Int8];

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
        for count in [LIMBS, 1] {
            let (mut want, mut want_sums, mut got, mut got_sums) =
                ([0; LIMB_BYTES], [[0; LIMBS]; 2], [0; LIMB_BYTES], [[0; LIMBS]; 2]);
            let s = split(&x, &mut want, &mut want_sums, count);
            // SAFETY: this CPU has AVX-512 with BW (vnni() said so).
            let t = unsafe { vnni::split_avx512(&x, &mut got, &mut got_sums, count) };
            assert!(s.to_bits() == t.to_bits() || (s.is_nan() && t.is_nan()), "{s} vs {t}");
            assert_eq!((want, want_sums), (got, got_sums), "{count} limbs: {x:?}");
        }
    }
}

/// Every tile shape of the VNNI variant, for each format: the portable variant's bits.
#[test]
#[cfg(target_arch = "x86_64")]
fn the_vnni_tiles_give_the_portable_bits() {
    if !vnni() {
        return;
    }
    let all: Vec<BlockPanels> =
        FORMATS.into_iter().flat_map(|dtype| lanes(4 * PANEL_ROWS, 3 * dtype.block_size(), dtype)).collect();
    for (panels, activations) in all.iter().flat_map(|p| ACTIVATIONS.map(|a| (p, a))) {
        let (n, k, m) = (4 * PANEL_ROWS, panels.k, 4);
        let x = inputs(m, k);
        let limbs = Limbs::new(&x, k, SimdLevel::Baseline, bias(panels.values), Layout::Rows, activations);
        // One limb's tiles also run three and four panels by several tokens.
        let wide: &[(usize, usize)] = if activations == Activations::Int8 {
            &[(3, 2), (3, 3), (3, 4), (4, 2), (4, 3), (4, 4)]
        } else {
            &[]
        };
        for &(count, tokens) in
            [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4)]
                .iter()
                .chain(wide)
        {
            let run = |level: SimdLevel| {
                let mut out = vec![0f32; m * n];
                let job = Job {
                    panels,
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
                    "{panels:?} {activations:?} {count} panels × {tokens} tokens at {i}: {g} vs {w}"
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
        for panels in ACTIVATIONS.map(|a| panels.clone().with_activations(a)) {
            for m in [1, 2, 3, 5, 100] {
                let x = inputs(m, k);
                let bits =
                    |level| matmul_at(&panels, &x, m, level).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(SimdLevel::Avx512Vnni), bits(SimdLevel::Baseline), "{panels:?} m {m}");
            }
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
        for panels in ACTIVATIONS.map(|a| panels.clone().with_activations(a)) {
            for m in [amx::MIN_TOKENS, 16, 17, 100, 200] {
                let x = inputs(m, k);
                let bits =
                    |level| matmul_at(&panels, &x, m, level).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(SimdLevel::Amx), bits(SimdLevel::Baseline), "{panels:?} m {m}");
            }
        }
    }
}
