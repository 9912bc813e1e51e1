//! The block-panel products against the dequantized matrix, and each tile's bits against the
//! portable tile's.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::*;

/// `rows` random inputs of `k` values, row-major.
fn inputs(rows: usize, k: usize) -> Vec<f32> {
    Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn matrix(n: usize, k: usize, dtype: GgmlDType) -> QuantizedMatrix {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    QuantizedMatrix::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap()
}

/// Against the dequantized matrix's product in f64, for each format, token counts of
/// decode and prefill (tails of the 3-token tile and of the 96-token task), rows that do
/// not fill the last panel; and each row alone gives the same bits as among the others,
/// on the SIMD path and on the portable one.
#[test]
fn products_match_the_dequantized_matrix_and_are_batch_invariant() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0] {
        let (n, k) = (37, 96);
        let q = matrix(n, k, dtype);
        let panels = BlockPanels::from_quantized(&q).unwrap().expect("a format of one scale per 32");
        // Held at the file's size: Q4_0 as 16 nibble bytes and an f16 scale per 32, Q5_0 with
        // 4 bytes of fifth bits more (three panels of 16 rows for 37).
        let per_32 = match dtype {
            GgmlDType::Q4_0 => 18,
            GgmlDType::Q5_0 => 22,
            _ => 34,
        };
        assert_eq!(panels.num_bytes(), 3 * PANEL_ROWS * (k / BLOCK) * per_32, "{dtype:?}");
        let w = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
        for m in [1, 2, 4, 100] {
            let x: Vec<f32> = inputs(m, k);
            let y = panels.matmul(&x, m);
            for r in 0..m {
                for c in 0..n {
                    let want: f64 = (0..k).map(|i| f64::from(x[r * k + i]) * f64::from(w[c][i])).sum();
                    let got = f64::from(y[r * n + c]);
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype:?} m {m} [{r}][{c}]: {got} vs {want}"
                    );
                }
                let alone = panels.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(alone, y[r * n..(r + 1) * n], "{dtype:?}: row {r} of {m} differs alone");
            }
        }
        // Every tile size on every level this CPU has: the same bits as the portable tile.
        let x: Vec<f32> = inputs(TILE_TOKENS_512, k);
        let run = |tokens: usize, level: Option<SimdLevel>| {
            let mut out = vec![f32::NAN; tokens * 48];
            let tile = panels.tile(0, &x, out.as_mut_ptr(), 48);
            // SAFETY: panel 0, `tokens` tokens of x, outputs in `out`; only levels this CPU
            // has run.
            unsafe {
                match level {
                    Some(level) => tile.run(tokens, level),
                    None => tile_generic(&tile, tokens),
                }
            }
            out
        };
        for &level in SimdLevel::all().iter().filter(|&&l| l <= simd::detected()) {
            for tokens in 1..=tile_tokens(level) {
                let (got, want) = (run(tokens, Some(level)), run(tokens, None));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{dtype:?} {} tile of {tokens} at {i}: {g} vs {w}",
                        level.name()
                    );
                }
            }
        }
    }
}

/// Panels side by side (decode) give each panel's bits as the portable tile gives them,
/// for every panel count and token count the levels this CPU has run.
#[test]
fn side_by_side_panels_give_each_panels_bits() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0] {
        side_by_side_case(dtype);
    }
}

fn side_by_side_case(dtype: GgmlDType) {
    let (n, k) = (4 * PANEL_ROWS, 64);
    let q = matrix(n, k, dtype);
    let panels = BlockPanels::from_quantized(&q).unwrap().unwrap();
    let x: Vec<f32> = inputs(TILE_TOKENS_512, k);
    let stride = n;
    let tile = |out: &mut Vec<f32>, p: usize| panels.tile(p, &x, out.as_mut_ptr(), stride);
    let mut checked = 0;
    for &level in SimdLevel::all().iter().filter(|&&l| l <= simd::detected()) {
        for tokens in 1..=tile_tokens(level) {
            let most =
                if tokens <= FEW_TOKENS { few_token_panels(level, tokens) } else { many_token_panels(level) };
            for count in 2..=most {
                let mut want = vec![f32::NAN; TILE_TOKENS_512 * stride];
                let mut got = want.clone();
                // SAFETY: panels 0..count of 4, `tokens` rows of x, outputs in the vectors;
                // only levels this CPU has run.
                unsafe {
                    for p in 0..count {
                        tile_generic(&tile(&mut want, p), tokens);
                    }
                    tile(&mut got, 0).run_side_by_side(count, tokens, level);
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{dtype:?} {} {count} panels × {tokens} tokens at {i}: {g} vs {w}",
                        level.name()
                    );
                }
                checked += 1;
            }
        }
    }
    // Where the CPU has AVX2 or more, something ran side by side.
    if simd::detected() > SimdLevel::Baseline {
        assert!(checked > 0);
    }
}

#[test]
fn stacked_panels_and_gathered_rows_are_the_rows() {
    // Packed bits stacked stay packed; a mixture falls back to one byte a value.
    for (first, second, values) in [
        (GgmlDType::Q8_0, GgmlDType::Q8_0, Values::Int8),
        (GgmlDType::Q4_0, GgmlDType::Q4_0, Q4_0_VALUES),
        (GgmlDType::Q5_0, GgmlDType::Q5_0, Q5_0_VALUES),
        (GgmlDType::Q5_0, GgmlDType::Q4_0, Values::Int8),
        (GgmlDType::Q4_0, GgmlDType::Q8_0, Values::Int8),
    ] {
        stacked_case(first, second, values);
    }
    assert!(BlockPanels::from_quantized(&matrix(4, 256, GgmlDType::Q4K)).unwrap().is_none(), "K-quants stay");
}

fn stacked_case(first: GgmlDType, second: GgmlDType, values: Values) {
    let (a, b) = (matrix(20, 64, first), matrix(7, 64, second));
    let (pa, pb) = (
        BlockPanels::from_quantized(&a).unwrap().unwrap(),
        BlockPanels::from_quantized(&b).unwrap().unwrap(),
    );
    let both = BlockPanels::stack(&[&pa, &pb]).unwrap();
    assert_eq!((both.dims(), both.values), ((27, 64), values));
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let (ya, yb, y) = (pa.matmul(&x, 1), pb.matmul(&x, 1), both.matmul(&x, 1));
    assert_eq!(y, [ya, yb].concat());
    let ids = [3u32, 26, 0];
    let want = Tensor::cat(&[a.dequantize().unwrap(), b.dequantize().unwrap()], 0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let got = both.gather_rows(&ids).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(got[i * 64..(i + 1) * 64], want[id as usize][..], "row {id}");
    }
    assert!(both.gather_rows(&[27]).unwrap_err().contains("token id 27 is outside the vocabulary (27 rows)"));
}
