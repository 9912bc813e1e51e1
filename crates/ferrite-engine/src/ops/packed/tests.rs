//! Unit tests of `packed`, beside it so that file stays about what it does.

use super::*;
use crate::ops::simd;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// f64 triple loop.
fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for t in 0..m {
        for r in 0..n {
            out[t * n + r] = (0..k).map(|i| f64::from(x[t * k + i]) * f64::from(w[r * k + i])).sum();
        }
    }
    out
}

#[test]
fn matches_naive_product_on_every_tile_shape() {
    let mut rng = StdRng::seed_from_u64(1);
    // Token counts through every tile shape and past a token block; n with partial panels
    // and partial task groups; k with partial chunks, and k = 0.
    for (m, k, n) in [
        (1, 576, 64),
        (2, 37, 100),
        (3, 300, 48),
        (4, 16, 17),
        (5, 513, 33),
        (6, 8, 16),
        (7, 260, 80),
        (13, 1, 5),
        (64, 96, 160),
        (97, 40, 24),
        (200, 257, 40),
        (3, 0, 20),
    ] {
        let x = random(&mut rng, m * k);
        let w = random(&mut rng, n * k);
        let got = PackedMatrix::pack(&w, n, k).matmul(&x, m);
        let want = naive(&x, &w, m, k, n);
        assert_eq!(got.len(), want.len());
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt().max(1.0);
            assert!((f64::from(*g) - e).abs() <= tol, "[{m}, {k}] x [{n}, {k}]ᵀ at {i}: {g} vs {e}");
        }
    }
}

#[test]
fn a_token_gets_the_same_bits_in_any_step() {
    let (k, n) = (700, 48);
    let mut rng = StdRng::seed_from_u64(2);
    let w = PackedMatrix::pack(&random(&mut rng, n * k), n, k);
    let rows = random(&mut rng, 150 * k);
    let alone = w.matmul(&rows[..k], 1);
    // Token 0 first, in the middle of a tile, in a tail tile, in a second token block.
    for (m, slot) in [(2, 1), (5, 3), (9, 7), (64, 40), (150, 121)] {
        let mut x = rows[..m * k].to_vec();
        x.copy_within(0..k, slot * k);
        let out = w.matmul(&x, m);
        assert_eq!(&out[slot * n..(slot + 1) * n], &alone[..], "step of {m} tokens, slot {slot}");
    }
}

/// The same bits whether a task takes 4, 2 or 1 panels (pools of 1, 2 and 64 threads; 20
/// panels, the last partial), and right against the naive product.
#[test]
fn the_task_split_does_not_change_the_bits() {
    let (k, n) = (300, 310);
    let mut rng = StdRng::seed_from_u64(6);
    let w_rows = random(&mut rng, n * k);
    let w = PackedMatrix::pack(&w_rows, n, k);
    for m in [1, 3, 100] {
        let x = random(&mut rng, m * k);
        let runs: Vec<Vec<f32>> = [1, 2, 64]
            .iter()
            .map(|&threads| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| w.matmul(&x, m))
            })
            .collect();
        assert_eq!(runs[0], runs[1], "m {m}: 1 vs 2 threads");
        assert_eq!(runs[0], runs[2], "m {m}: 1 vs 64 threads");
        for (g, e) in runs[0].iter().zip(naive(&x, &w_rows, m, k, n)) {
            assert!((f64::from(*g) - e).abs() <= 1e-4, "m {m}: {g} vs {e}");
        }
    }
}

#[test]
fn unpack_inverts_pack_and_gathered_rows_are_the_rows() {
    let mut rng = StdRng::seed_from_u64(3);
    for (n, k) in [(1, 1), (17, 5), (48, 33), (5, 0)] {
        let w = random(&mut rng, n * k);
        let packed = PackedMatrix::pack(&w, n, k);
        assert_eq!(packed.unpack(), w);
        let ids = [n as u32 - 1, 0, n as u32 / 2, 0];
        let want: Vec<f32> =
            ids.iter().flat_map(|&i| &w[i as usize * k..(i as usize + 1) * k]).copied().collect();
        assert_eq!(packed.gather_rows(&ids).unwrap(), want);
        let err = packed.gather_rows(&[n as u32]).unwrap_err();
        assert!(err.contains(&format!("token id {n} is outside the vocabulary ({n} rows)")), "{err}");
    }
}

#[test]
fn stacking_packed_parts_equals_packing_their_rows() {
    let mut rng = StdRng::seed_from_u64(5);
    let k = 19;
    let parts: Vec<Vec<f32>> = [32, 16, 7].iter().map(|n| random(&mut rng, n * k)).collect();
    let packed: Vec<PackedMatrix> = parts.iter().map(|w| PackedMatrix::pack(w, w.len() / k, k)).collect();
    let stacked = PackedMatrix::stack(&packed.iter().collect::<Vec<_>>()).unwrap();
    let all: Vec<f32> = parts.concat();
    assert_eq!(stacked.dims(), (55, k));
    assert_eq!(stacked.data, PackedMatrix::pack(&all, 55, k).data);
    // A part that ends mid-panel before another is packed again from its rows.
    let reordered = PackedMatrix::stack(&[&packed[2], &packed[0]]).unwrap();
    assert_eq!(reordered.data, PackedMatrix::pack(&[&parts[2][..], &parts[0][..]].concat(), 39, k).data);
    let other_k = PackedMatrix::pack(&random(&mut rng, 16 * 3), 16, 3);
    assert!(PackedMatrix::stack(&[&packed[0], &other_k]).is_none());
}

/// bf16 and f16 panels give exactly the bits of the f32 panels of their widened values (the
/// widening is exact and the FMA chains are the same), through decode and prefill shapes,
/// partial chunks and panels, and the naive product agrees.
#[test]
fn half_panels_give_the_bits_of_their_widened_matrix() {
    let mut rng = StdRng::seed_from_u64(7);
    for (m, k, n) in [(1, 576, 70), (3, 300, 48), (7, 513, 33), (100, 257, 40)] {
        let w = random(&mut rng, n * k);
        let x = random(&mut rng, m * k);
        let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for (name, half, widened) in [
            (
                "bf16",
                PackedMatrix::pack(&w_bf16, n, k),
                w_bf16.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            ),
            ("f16", PackedMatrix::pack(&w_f16, n, k), w_f16.iter().map(|v| v.to_f32()).collect()),
        ] {
            assert_eq!(half.dtype_name(), name);
            assert_eq!(half.num_bytes(), n.div_ceil(PANEL_ROWS) * PANEL_ROWS * k * 2);
            let got = half.matmul(&x, m);
            assert_eq!(
                got,
                PackedMatrix::pack(&widened, n, k).matmul(&x, m),
                "{name} [{m}, {k}] x [{n}, {k}]ᵀ"
            );
            for (g, e) in got.iter().zip(naive(&x, &widened, m, k, n)) {
                assert!((f64::from(*g) - e).abs() <= 1e-4, "{name}: {g} vs {e}");
            }
            assert_eq!(half.unpack(), widened, "{name}: unpack");
            let ids = [n as u32 - 1, 0, 5];
            let rows: Vec<f32> =
                ids.iter().flat_map(|&i| &widened[i as usize * k..(i as usize + 1) * k]).copied().collect();
            assert_eq!(half.gather_rows(&ids).unwrap(), rows, "{name}: gathered rows");
        }
    }
}

#[test]
fn half_parts_stack_and_mixed_ones_do_not() {
    let mut rng = StdRng::seed_from_u64(9);
    let k = 21;
    let parts: Vec<Vec<bf16>> =
        [16, 9].iter().map(|n| random(&mut rng, n * k).into_iter().map(bf16::from_f32).collect()).collect();
    let packed: Vec<PackedMatrix> = parts.iter().map(|w| PackedMatrix::pack(w, w.len() / k, k)).collect();
    let stacked = PackedMatrix::stack(&packed.iter().collect::<Vec<_>>()).unwrap();
    assert!(stacked.data == PackedMatrix::pack(&parts.concat(), 25, k).data);
    // Mid-panel first: repacked from the rows, still bf16.
    let reordered = PackedMatrix::stack(&[&packed[1], &packed[0]]).unwrap();
    assert!(reordered.data == PackedMatrix::pack(&[&parts[1][..], &parts[0][..]].concat(), 25, k).data);
    let f32_part = PackedMatrix::pack(&random(&mut rng, 16 * k), 16, k);
    assert!(PackedMatrix::stack(&[&f32_part, &packed[1]]).is_none());
}

/// Every tile path this CPU runs against the naive product, on every tile shape `block`
/// dispatches, for f32, bf16 and f16 panels, writing only their own outputs; and the SIMD
/// paths (AVX2, AVX-512) give the same bits as each other.
#[test]
fn every_tile_shape_on_every_path_matches_naive_product() {
    let levels: Vec<SimdLevel> =
        SimdLevel::all().iter().copied().filter(|&l| l <= simd::detected()).collect();
    for missing in SimdLevel::all().iter().filter(|&&l| l > simd::detected()) {
        eprintln!("skipped the {} tiles: this CPU lacks them", missing.name());
    }
    let (k, n) = (300, 6 * PANEL_ROWS);
    let mut rng = StdRng::seed_from_u64(4);
    let w = random(&mut rng, n * k);
    let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    check_tiles("f32", &w, &levels, &mut rng);
    check_tiles("bf16", &w_bf16, &levels, &mut rng);
    check_tiles("f16", &w_f16, &levels, &mut rng);
}

/// One task's product, K chunk by K chunk, through `block` at `level`, into outputs poisoned
/// with NaN (the first K chunk must write every output, not add to it).
fn run_block<T: PanelElement>(
    m: &PackedMatrix,
    data: &[T],
    x: &[f32],
    panels: usize,
    level: SimdLevel,
) -> Vec<f32> {
    let (n, k) = m.dims();
    let rows = x.len() / k;
    let mut out = vec![f32::NAN; rows * n];
    for k0 in (0..k).step_by(K_CHUNK) {
        let chunk = Chunk { k0, len: K_CHUNK.min(k - k0), first: k0 == 0 };
        // SAFETY: tokens 0..rows and `panels` panels as one task, inside `[rows, n]`; the
        // caller runs only levels this CPU has.
        unsafe { m.block(data, x, 0..rows, 0..panels, chunk, out.as_mut_ptr(), level) };
    }
    out
}

fn check_tiles<E: PanelElement>(name: &str, w: &[E], levels: &[SimdLevel], rng: &mut StdRng) {
    let (k, n) = (300, 6 * PANEL_ROWS);
    let packed = PackedMatrix::pack(w, n, k);
    let data: &[E] = match &packed.data {
        Panels::F32(d) => as_same_type(d),
        Panels::Bf16(d) => as_same_type(d),
        Panels::F16(d) => as_same_type(d),
        Panels::Bf16Pairs(_) => unreachable!("pack never pairs"),
    };
    let widened: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let widened_packed = PackedMatrix::pack(&widened, n, k);
    // Every tile shape on every path: 1..=7 tokens (tiles of up to 6 tokens, and a tail) over
    // 1..=6 panels (AVX2: up to 12 / (2 · tokens) panels a tile; AVX-512: up to 4).
    for m in 1..=7 {
        let x = random(rng, m * k);
        let want = naive(&x, &widened, m, k, n);
        for panels in 1..=6 {
            let mut simd_bits: Option<(SimdLevel, Vec<f32>)> = None;
            for &level in levels {
                // Each path widens exactly: the bits of its product over the widened matrix.
                let out = run_block(&packed, data, &x, panels, level);
                let want_bits = run_block(&widened_packed, f32s(&widened_packed), &x, panels, level);
                let what = format!("{name} {} m {m} panels {panels}", level.name());
                assert_same_bits(&out, &want_bits, &what);
                if level != SimdLevel::Baseline {
                    match &simd_bits {
                        Some((first, bits)) => {
                            assert_same_bits(&out, bits, &format!("{what} against {}", first.name()))
                        }
                        None => simd_bits = Some((level, out.clone())),
                    }
                }
                for t in 0..m {
                    for r in 0..n {
                        let (got, i) = (out[t * n + r], t * n + r);
                        if r < panels * PANEL_ROWS {
                            assert!(
                                (f64::from(got) - want[i]).abs() <= 1e-4,
                                "{what} [{t}][{r}]: {got} vs {}",
                                want[i]
                            );
                        } else {
                            assert!(got.is_nan(), "{what} wrote column {r}");
                        }
                    }
                }
            }
        }
    }
}

fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{what} at {i}: {g} vs {w}");
    }
}

fn f32s(m: &PackedMatrix) -> &[f32] {
    match &m.data {
        Panels::F32(d) => d,
        _ => panic!("f32 panels expected"),
    }
}

/// The panels as the element type the test packed (the same type, so the same slice).
fn as_same_type<A: 'static, B: 'static>(a: &[A]) -> &[B] {
    assert_eq!(std::any::TypeId::of::<A>(), std::any::TypeId::of::<B>(), "invariant: same element type");
    // SAFETY: A and B are the same type.
    unsafe { std::slice::from_raw_parts(a.as_ptr().cast(), a.len()) }
}

/// Whole products (task split, token blocks, K chunks, partial panels) give the same bits on
/// every SIMD level this CPU has, for every element type.
#[test]
fn simd_levels_give_the_same_bits_through_matmul() {
    let simd_levels: Vec<SimdLevel> = SimdLevel::all()
        .iter()
        .copied()
        .filter(|&l| l != SimdLevel::Baseline && l <= simd::detected())
        .collect();
    if simd_levels.len() < 2 {
        eprintln!("skipped: this CPU runs {} SIMD tile level(s), nothing to compare", simd_levels.len());
        return;
    }
    let mut rng = StdRng::seed_from_u64(9);
    for (m, k, n) in [(1, 576, 1536), (7, 1000, 70), (100, 513, 200), (200, 64, 33)] {
        let w = random(&mut rng, n * k);
        let x = random(&mut rng, m * k);
        let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for packed in [
            PackedMatrix::pack(&w, n, k),
            PackedMatrix::pack(&w_bf16, n, k),
            PackedMatrix::pack(&w_f16, n, k),
        ] {
            let first = packed.matmul_with(&x, m, simd_levels[0]);
            for &level in &simd_levels[1..] {
                let what =
                    format!("[{m}, {k}] x {packed:?} at {} against {}", level.name(), simd_levels[0].name());
                assert_same_bits(&packed.matmul_with(&x, m, level), &first, &what);
            }
        }
    }
}

/// bf16 weights paired for `vdpbf16ps` (`pairs`), on any CPU (the portable chain where the
/// CPU lacks AVX-512 BF16).
fn paired(w: &[f32], n: usize, k: usize) -> PackedMatrix {
    let w: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let packed = PackedMatrix::pack(&w, n, k).paired();
    assert!(packed.takes_bf16_activations());
    packed
}

/// The level whose tiles run `vdpbf16ps` here, or `None` (with the reason printed).
fn dots_level() -> Option<SimdLevel> {
    let level = simd::detected();
    if pairs::level_has_dots(level) {
        Some(level)
    } else {
        eprintln!("skipped: this CPU ({}) has no AVX-512 BF16, so only the portable chain ran", level.name());
        None
    }
}

/// Shapes through every tile shape, tails of panels, of chunks and of tasks, odd K (a padded
/// pair) and K = 0.
const PAIR_SHAPES: [(usize, usize, usize); 10] = [
    (1, 576, 64),
    (2, 37, 100),
    (3, 300, 48),
    (5, 513, 33),
    (6, 8, 16),
    (7, 1, 5),
    (13, 260, 80),
    (97, 40, 24),
    (130, 257, 40),
    (3, 0, 20),
];

/// The portable chain is the product of the bf16-rounded operands, up to f32 rounding (an
/// f64 sum of those products is the reference); and it is not the widened product (the
/// activations were rounded).
#[test]
fn paired_products_are_those_of_bf16_rounded_activations() {
    let mut rng = StdRng::seed_from_u64(11);
    let round = |v: f32| f64::from(bf16::from_f32(v).to_f32());
    for (m, k, n) in PAIR_SHAPES {
        let x = random(&mut rng, m * k);
        let w = random(&mut rng, n * k);
        let got = paired(&w, n, k).matmul_with(&x, m, SimdLevel::Baseline);
        let mut moved = false;
        let widened = PackedMatrix::pack(&w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), n, k)
            .matmul_with(&x, m, SimdLevel::Baseline);
        for t in 0..m {
            for r in 0..n {
                let (terms, scale): (f64, f64) = (0..k)
                    .map(|i| {
                        (
                            round(x[t * k + i]) * round(w[r * k + i]),
                            (round(x[t * k + i]) * round(w[r * k + i])).abs(),
                        )
                    })
                    .fold((0.0, 0.0), |(s, a), (p, q)| (s + p, a + q));
                let g = f64::from(got[t * n + r]);
                // Each of the 2k sums rounds by at most half an ulp of the running sum.
                let tol = 2.0 * k as f64 * scale * f64::from(f32::EPSILON);
                assert!((g - terms).abs() <= tol, "[{m}, {k}] x [{n}, {k}]ᵀ at ({t}, {r}): {g} vs {terms}");
                moved |= got[t * n + r] != widened[t * n + r];
            }
        }
        assert!(moved || k <= 1, "[{m}, {k}] x [{n}, {k}]ᵀ: bf16 activations changed nothing");
    }
}

/// The `vdpbf16ps` tiles give the portable chain's bits on every shape, including values
/// whose products or sums fall below f32's normal range (read or flushed as zero).
#[test]
fn paired_vector_tiles_give_the_portable_bits() {
    let Some(level) = dots_level() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    for (m, k, n) in PAIR_SHAPES {
        let x = random(&mut rng, m * k);
        let w = paired(&random(&mut rng, n * k), n, k);
        assert_eq!(
            w.matmul_with(&x, m, level),
            w.matmul_with(&x, m, SimdLevel::Baseline),
            "[{m}, {k}] x [{n}, {k}]ᵀ"
        );
    }
    // Tiny: x near 1e-19 and weights near 4e-19 (products about f32's smallest normals),
    // and activations that round to bf16 denormals.
    let (m, k, n) = (4, 64, 32);
    let x: Vec<f32> = random(&mut rng, m * k)
        .iter()
        .enumerate()
        .map(|(i, v)| v * if i % 3 == 0 { 1e-39 } else { 1e-19 })
        .collect();
    // Every fifth weight a bf16 denormal (read as zero by the instruction).
    let w: Vec<f32> = random(&mut rng, n * k)
        .iter()
        .enumerate()
        .map(|(i, v)| v * if i % 5 == 0 { 1e-39 } else { 4e-19 })
        .collect();
    let denormal =
        |v: &f32| bf16::from_f32(*v) != bf16::ZERO && bf16::from_f32(*v).to_f32().abs() < f32::MIN_POSITIVE;
    assert!(w.iter().any(denormal), "some weights are bf16 denormals");
    let w = paired(&w, n, k);
    let portable = w.matmul_with(&x, m, SimdLevel::Baseline);
    assert!(portable.contains(&0.0) && portable.iter().any(|&v| v != 0.0), "{portable:?}");
    assert_eq!(w.matmul_with(&x, m, level), portable, "near f32's smallest normals");
}

/// A token's paired outputs are the same bits alone, in any step and in any task split.
#[test]
fn paired_tokens_get_the_same_bits_in_any_step() {
    let (k, n) = (301, 48);
    let mut rng = StdRng::seed_from_u64(13);
    let w = paired(&random(&mut rng, n * k), n, k);
    let rows = random(&mut rng, 150 * k);
    for level in [Some(SimdLevel::Baseline), dots_level()].into_iter().flatten() {
        let alone = w.matmul_with(&rows[..k], 1, level);
        for (m, slot) in [(2, 1), (9, 7), (150, 121)] {
            let mut x = rows[..m * k].to_vec();
            x.copy_within(0..k, slot * k);
            let out = w.matmul_with(&x, m, level);
            assert_eq!(
                &out[slot * n..(slot + 1) * n],
                &alone[..],
                "{}: step of {m}, slot {slot}",
                level.name()
            );
            let pool = rayon::ThreadPoolBuilder::new().num_threads(64).build().unwrap();
            assert_eq!(pool.install(|| w.matmul_with(&x, m, level)), out, "{}: 64 threads", level.name());
        }
    }
}

/// Paired panels give back their rows, stack as pairing the rows' concatenation does, and
/// refuse to stack with unpaired ones.
#[test]
fn paired_panels_unpack_gather_and_stack() {
    let mut rng = StdRng::seed_from_u64(14);
    let k = 19;
    let parts: Vec<Vec<f32>> = [32, 16, 7, 9].iter().map(|n| random(&mut rng, n * k)).collect();
    let rounded = |w: &[f32]| w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
    for part in &parts {
        let n = part.len() / k;
        let p = paired(part, n, k);
        assert_eq!(p.unpack(), rounded(part));
        assert_eq!(
            p.gather_rows(&[n as u32 - 1, 0]).unwrap(),
            rounded(&[&part[(n - 1) * k..], &part[..k]].concat())
        );
        assert_eq!(p.num_bytes(), n.div_ceil(16) * 16 * 20 * 2);
    }
    // Whole panels end to end, then parts ending mid-panel (paired again from their rows).
    for chosen in [&parts[..3], &parts[1..]] {
        let each: Vec<PackedMatrix> = chosen.iter().map(|w| paired(w, w.len() / k, k)).collect();
        let stacked = PackedMatrix::stack(&each.iter().collect::<Vec<_>>()).unwrap();
        let all = chosen.concat();
        assert_eq!(stacked.data, paired(&all, all.len() / k, k).data);
    }
    let mixed = [
        paired(&parts[0], 32, k),
        PackedMatrix::pack(&parts[1].iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), 16, k),
    ];
    assert!(PackedMatrix::stack(&[&mixed[0], &mixed[1]]).is_none(), "paired with unpaired");
}

/// Activations round to bf16 as `half` rounds normal values (to nearest even, overflowing to
/// infinity), denormals to zero and NaNs to NaNs; and as the CPU's `vcvtneps2bf16` does
/// where it has one.
#[test]
fn activations_round_to_bf16_as_the_instruction_does() {
    let mut rng = StdRng::seed_from_u64(15);
    // The edge cases first (whole vectors of 16 go to the instruction below), then random bits.
    let mut values = vec![0.0, -0.0, 1.0, f32::MAX, -f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    values.extend([1e-40, -1e-45, f32::MIN_POSITIVE, f32::from_bits(0x007f_ffff)]);
    // Ties to even (down, up) and either side of a tie.
    values.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)]);
    values.extend([f32::from_bits(0x3f80_7fff), -f32::from_bits(0x3f81_8001)]);
    assert_eq!(values.len(), 16);
    values.extend((0..4096).map(|_| f32::from_bits(rng.random())));
    for &v in &values {
        let got = pairs::to_bf16(v);
        if v.is_nan() {
            assert!(bf16::from_bits(got).is_nan(), "{v:e}");
        } else if v.abs() < f32::MIN_POSITIVE {
            assert_eq!(got, (v.to_bits() >> 16) as u16 & 0x8000, "{v:e} is denormal");
        } else {
            assert_eq!(got, bf16::from_f32(v).to_bits(), "{v:e}");
        }
    }
    #[cfg(target_arch = "x86_64")]
    if dots_level().is_some() {
        use std::arch::x86_64::{__m256bh, _mm512_cvtneps_pbh, _mm512_loadu_ps};
        for chunk in values.chunks_exact(16) {
            // SAFETY: dots_level saw AVX-512 BF16; 16 floats in, 16 bf16 out.
            let hardware: [u16; 16] = unsafe {
                std::mem::transmute::<__m256bh, [u16; 16]>(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                    chunk.as_ptr(),
                )))
            };
            for (&v, &h) in chunk.iter().zip(&hardware) {
                let ours = pairs::to_bf16(v);
                assert!(
                    ours == h || (v.is_nan() && bf16::from_bits(h).is_nan()),
                    "{v:e}: {ours:#x} vs {h:#x}"
                );
            }
        }
    }
}
