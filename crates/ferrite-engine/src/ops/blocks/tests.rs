//! The block-panel products against the dequantized matrix, and each tile's bits against the
//! portable tile's.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::*;

/// `rows` random inputs of `k` values, row-major.
pub(super) fn inputs(rows: usize, k: usize) -> Vec<f32> {
    Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Every format the panels take.
pub(super) const FORMATS: [GgmlDType; 6] =
    [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

pub(super) fn matrix(n: usize, k: usize, dtype: GgmlDType) -> QuantizedMatrix {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    QuantizedMatrix::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap()
}

/// Against the dequantized matrix's product in f64, for each format in each order it takes
/// (f32 tiles; int8 dot products), token counts of decode and prefill
/// (tails of the 3-token tile and of the 96-token task), rows that do not fill the last
/// panel; and each row alone gives the same bits as among the others, on the SIMD path and on
/// the portable one.
#[test]
fn products_match_the_dequantized_matrix_and_are_batch_invariant() {
    for dtype in FORMATS {
        for order in [Order::Columns, Order::Lanes] {
            products_case(dtype, order);
        }
    }
}

fn products_case(dtype: GgmlDType, order: Order) {
    let n = 37;
    let k = if dtype.block_size() == SUPER { 2 * SUPER } else { 96 };
    let q = matrix(n, k, dtype);
    let panels = BlockPanels::from_quantized_in(&q, KQuants::Exact, Some(order))
        .unwrap()
        .expect("a format the panels take");
    // Held at the file's size (three panels of 16 rows for 37): the file's bytes per block
    // of 32 (Q4_0 16 nibble bytes and an f16 scale, Q5_0 4 bytes of fifth bits more; Q6_K
    // its 210 bytes per 256), but Q4_K's and Q5_K's six-bit `sc` and `m` a byte each (4
    // bytes more per 256).
    let per_row = match dtype {
        GgmlDType::Q4K | GgmlDType::Q5K => k / SUPER * (dtype.type_size() + 4),
        _ => k / dtype.block_size() * dtype.type_size(),
    };
    assert_eq!(panels.num_bytes(), 3 * PANEL_ROWS * per_row, "{dtype:?}");
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
                    "{dtype:?} {order:?} m {m} [{r}][{c}]: {got} vs {want}"
                );
            }
            let alone = panels.matmul(&x[r * k..(r + 1) * k], 1);
            assert_eq!(alone, y[r * n..(r + 1) * n], "{dtype:?} {order:?}: row {r} of {m} differs alone");
        }
    }
    if order == Order::Lanes {
        return; // its variants' bits: lanes/tests.rs
    }
    // Every tile size on every level this CPU has: the same bits as the portable tile.
    let x: Vec<f32> = inputs(TILE_TOKENS_512, k);
    let sums = panels.block_sums(&x);
    let run = |tokens: usize, level: Option<SimdLevel>| {
        let mut out = vec![f32::NAN; tokens * 48];
        let tile = panels.tile(0, x.as_ptr(), sums.as_ptr(), out.as_mut_ptr(), 48);
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

/// Panels side by side (decode) give each panel's bits as the portable tile gives them,
/// for every panel count and token count the levels this CPU has run.
#[test]
fn side_by_side_panels_give_each_panels_bits() {
    for dtype in FORMATS {
        side_by_side_case(dtype);
    }
}

fn side_by_side_case(dtype: GgmlDType) {
    let (n, k) = (4 * PANEL_ROWS, dtype.block_size().max(64));
    let q = matrix(n, k, dtype);
    let panels = BlockPanels::from_quantized_in(&q, KQuants::Exact, Some(Order::Columns)).unwrap().unwrap();
    let x: Vec<f32> = inputs(TILE_TOKENS_512, k);
    let sums = panels.block_sums(&x);
    let stride = n;
    let tile =
        |out: &mut Vec<f32>, p: usize| panels.tile(p, x.as_ptr(), sums.as_ptr(), out.as_mut_ptr(), stride);
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
    // Packed bits stacked stay packed; a mixture of one scale per 32 falls back to one byte a
    // value; K-quants stack with their own format only.
    for (first, second, values) in [
        (GgmlDType::Q8_0, GgmlDType::Q8_0, Some(Values::Int8)),
        (GgmlDType::Q4_0, GgmlDType::Q4_0, Some(Q4_0_VALUES)),
        (GgmlDType::Q5_0, GgmlDType::Q5_0, Some(Q5_0_VALUES)),
        (GgmlDType::Q5_0, GgmlDType::Q4_0, Some(Values::Int8)),
        (GgmlDType::Q4_0, GgmlDType::Q8_0, Some(Values::Int8)),
        (GgmlDType::Q4K, GgmlDType::Q4K, Some(Q4_K_VALUES)),
        (GgmlDType::Q5K, GgmlDType::Q5K, Some(Q5_K_VALUES)),
        (GgmlDType::Q6K, GgmlDType::Q6K, Some(Q6_K_VALUES)),
        (GgmlDType::Q4K, GgmlDType::Q5K, Some(Values::Int8)),
        (GgmlDType::Q4K, GgmlDType::Q6K, None),
        (GgmlDType::Q8_0, GgmlDType::Q6K, None),
    ] {
        stacked_case(first, second, values);
    }
    // Unless asked for exact products, the K-quants stay in candle's kernels.
    for k_quant in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let q = matrix(4, 256, k_quant);
        assert!(BlockPanels::from_quantized(&q, KQuants::Rounded).unwrap().is_none(), "{k_quant:?} rounded");
    }
    for other in [GgmlDType::Q2K, GgmlDType::Q3K, GgmlDType::Q4_1] {
        assert!(
            BlockPanels::from_quantized(&matrix(4, 256, other), KQuants::Exact).unwrap().is_none(),
            "{other:?} stays"
        );
    }
}

fn stacked_case(first: GgmlDType, second: GgmlDType, values: Option<Values>) {
    let k = SUPER;
    let (a, b) = (matrix(20, k, first), matrix(7, k, second));
    let (pa, pb) = (
        BlockPanels::from_quantized(&a, KQuants::Exact).unwrap().unwrap(),
        BlockPanels::from_quantized(&b, KQuants::Exact).unwrap().unwrap(),
    );
    let Some(both) = BlockPanels::stack(&[&pa, &pb]) else {
        assert_eq!(values, None, "{first:?} + {second:?} stack");
        return;
    };
    assert_eq!((both.dims(), Some(both.values)), ((27, k), values), "{first:?} + {second:?}");
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    let (ya, yb, y) = (pa.matmul(&x, 1), pb.matmul(&x, 1), both.matmul(&x, 1));
    assert_eq!(y, [ya, yb].concat());
    // Each gathered row is candle's dequantization of it, bit for bit.
    let ids = [3u32, 26, 0];
    let want = Tensor::cat(&[a.dequantize().unwrap(), b.dequantize().unwrap()], 0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let got = both.gather_rows(&ids).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(got[i * k..(i + 1) * k], want[id as usize][..], "{first:?} + {second:?} row {id}");
    }
    assert!(both.gather_rows(&[27]).unwrap_err().contains("token id 27 is outside the vocabulary (27 rows)"));
}
