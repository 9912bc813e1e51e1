//! AVX-512 VNNI variants of `lanes.rs`: the limb split, and the products, each the portable
//! variant's operations in its order (one 32-bit lane per output row).

use std::arch::x86_64::*;

use super::super::layout::{Scaling, Values, NIBBLE_BYTES, PLANE_BYTES};
use super::super::{BLOCK, PANEL_ROWS};
use super::{Job, LIMBS, LIMB_BYTES, TINY, W1, W2};

/// The scalings, as the kernels' const parameter: `d` per 32 ([`Scaling::Block`]), `d · sc`
/// per 16 ([`Scaling::Super16`]), `d · sc` per 32 less `dmin · m` ([`Scaling::SuperMin`]).
const PER_32: u8 = 0;
const PER_16: u8 = 1;
const OFFSET: u8 = 2;

/// `split` (lanes.rs) with AVX-512: the same limbs, sums and `s`.
///
/// # Safety
/// This CPU has AVX-512F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn split_avx512(
    x: &[f32; BLOCK],
    limbs: &mut [i8; LIMB_BYTES],
    sums: &mut [[i32; LIMBS]; 2],
) -> f32 {
    *limbs = [0; LIMB_BYTES];
    *sums = [[0; LIMBS]; 2];
    // SAFETY: 32 floats in `x`.
    let v = unsafe { [_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16))] };
    let abs = [_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])];
    // Not finite: greater than the largest finite, or unordered (NaN).
    let bad = |a: __m512| _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a, _mm512_set1_ps(f32::MAX));
    if bad(abs[0]) | bad(abs[1]) != 0 {
        return f32::NAN;
    }
    let max = _mm512_reduce_max_ps(_mm512_max_ps(abs[0], abs[1]));
    if max < TINY {
        return 1.0;
    }
    let s = max / 127.0;
    let base = _mm512_set1_ps(254.0);
    for (half, v) in v.into_iter().enumerate() {
        let mut r = _mm512_div_ps(v, _mm512_set1_ps(s));
        for (l, sum) in sums[half].iter_mut().enumerate() {
            let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
            let ints = _mm512_cvtps_epi32(q);
            // SAFETY: 16 bytes at limb l's half `half`.
            unsafe {
                _mm_storeu_si128(
                    limbs.as_mut_ptr().add(l * BLOCK + 16 * half).cast(),
                    _mm512_cvtepi32_epi8(ints),
                )
            };
            *sum += _mm512_reduce_add_epi32(ints);
            r = _mm512_mul_ps(_mm512_sub_ps(r, q), base);
        }
    }
    s
}

/// [`Job::run`] with VNNI.
///
/// # Safety
/// As [`Job::run`]; this CPU has AVX-512F, BW and VNNI.
pub(super) unsafe fn run(job: &Job, panels: usize, tokens: usize) {
    // SAFETY (each arm): forwarded. The pairs are the formats' (Q8_0, Q5_0, Q4_0; Q4_K, Q5_K,
    // Q6_K) and int8 for stacks of formats whose values differ.
    unsafe {
        match (job.panels.values, job.panels.scaling) {
            (Values::Int8, Scaling::Block) => by_shape::<0, true, PER_32>(job, panels, tokens),
            (Values::Int8, Scaling::Super16) => by_shape::<0, true, PER_16>(job, panels, tokens),
            (Values::Int8, Scaling::SuperMin) => by_shape::<0, true, OFFSET>(job, panels, tokens),
            (Values::Packed { high: 0, .. }, Scaling::Block) => {
                by_shape::<0, false, PER_32>(job, panels, tokens)
            }
            (Values::Packed { high: 0, .. }, Scaling::SuperMin) => {
                by_shape::<0, false, OFFSET>(job, panels, tokens)
            }
            (Values::Packed { high: 1, .. }, Scaling::Block) => {
                by_shape::<1, false, PER_32>(job, panels, tokens)
            }
            (Values::Packed { high: 1, .. }, Scaling::SuperMin) => {
                by_shape::<1, false, OFFSET>(job, panels, tokens)
            }
            (Values::Packed { high: 2, .. }, Scaling::Super16) => {
                by_shape::<2, false, PER_16>(job, panels, tokens)
            }
            (values, scaling) => unreachable!("invariant: no format has {values:?} under {scaling:?}"),
        }
    }
}

/// # Safety
/// As [`run`], the values having `HIGH` planes (int8 when `INT8`), the scaling `S`'s.
#[inline(always)]
unsafe fn by_shape<const HIGH: usize, const INT8: bool, const S: u8>(
    job: &Job,
    panels: usize,
    tokens: usize,
) {
    debug_assert!(
        if tokens == 1 { panels <= 4 } else { panels <= 2 && tokens <= 4 },
        "invariant: a tile shape the kernels have ({panels} panels, {tokens} tokens)"
    );
    // SAFETY (each arm): forwarded.
    unsafe {
        match (panels, tokens) {
            (1, 1) => tile::<1, 1, HIGH, INT8, S>(job),
            (2, 1) => tile::<2, 1, HIGH, INT8, S>(job),
            (3, 1) => tile::<3, 1, HIGH, INT8, S>(job),
            (_, 1) => tile::<4, 1, HIGH, INT8, S>(job),
            (1, 2) => tile::<1, 2, HIGH, INT8, S>(job),
            (1, 3) => tile::<1, 3, HIGH, INT8, S>(job),
            (1, _) => tile::<1, 4, HIGH, INT8, S>(job),
            (_, 2) => tile::<2, 2, HIGH, INT8, S>(job),
            (_, 3) => tile::<2, 3, HIGH, INT8, S>(job),
            _ => tile::<2, 4, HIGH, INT8, S>(job),
        }
    }
}

/// Columns `4g..4g + 4` of a block-panel's 16 rows as unsigned values (biased), row j's four
/// in lane j.
///
/// # Safety
/// A whole block-panel at `block`; AVX-512F and BW.
#[inline(always)]
unsafe fn weights<const HIGH: usize, const INT8: bool>(block: *const u8, g: usize) -> __m512i {
    // SAFETY: within the block-panel (the caller's contract).
    unsafe {
        if INT8 {
            return _mm512_xor_si512(_mm512_loadu_si512(block.add(64 * g).cast()), _mm512_set1_epi8(i8::MIN));
        }
        let nibbles = _mm512_loadu_si512(block.add(64 * (g % 4)).cast());
        let nibbles = if g < 4 { nibbles } else { _mm512_srli_epi16::<4>(nibbles) };
        let mut w = _mm512_and_si512(nibbles, _mm512_set1_epi8(0x0F));
        for h in 0..HIGH {
            let bits = block.add(NIBBLE_BYTES + h * PLANE_BYTES + 8 * g).cast::<u64>().read_unaligned();
            w = _mm512_mask_add_epi8(w, bits, w, _mm512_set1_epi8(16 << h));
        }
        w
    }
}

/// `P` panels for `T` tokens (side by side at decode: `T` = 1): per four columns, each panel's
/// values once and each token's limbs once, against each other (`3PT` independent sums, so
/// the dot products' latency hides); closed per block, or per half block for `PER_16`.
///
/// # Safety
/// As [`run`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn tile<const P: usize, const T: usize, const HIGH: usize, const INT8: bool, const S: u8>(job: &Job) {
    let halves = if S == PER_16 { 2 } else { 1 };
    let groups = BLOCK / 4 / halves;
    for b in 0..job.blocks {
        let xs: [*const i8; T] = std::array::from_fn(|t| job.x(t, b).0);
        let blocks: [*const u8; P] = std::array::from_fn(|p| job.block(p, b));
        for half in 0..halves {
            // Per token, per limb, per panel.
            let mut sums = [[[_mm512_setzero_si512(); P]; LIMBS]; T];
            for g in half * groups..(half + 1) * groups {
                // SAFETY: the panels' block-panels b (the caller's contract).
                let w: [__m512i; P] = std::array::from_fn(|p| unsafe { weights::<HIGH, INT8>(blocks[p], g) });
                for (sums, &limbs) in sums.iter_mut().zip(&xs) {
                    for (l, sums) in sums.iter_mut().enumerate() {
                        // SAFETY: the token's limbs for block b.
                        let x = _mm512_set1_epi32(unsafe {
                            limbs.add(l * BLOCK + 4 * g).cast::<i32>().read_unaligned()
                        });
                        for (sum, &w) in sums.iter_mut().zip(&w) {
                            *sum = _mm512_dpbusd_epi32(*sum, w, x);
                        }
                    }
                }
            }
            // SAFETY (both): the panels' scales for block b.
            let scales: [__m512; P] = std::array::from_fn(|p| unsafe { scale::<S>(job, p, b, half) });
            let offsets: [__m512; P] = std::array::from_fn(|p| {
                if S == OFFSET {
                    unsafe { offset(job, p, b) }
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (t, sums) in sums.iter().enumerate() {
                for p in 0..P {
                    let row = Row { scale: scales[p], offset: offsets[p] };
                    // SAFETY: forwarded.
                    unsafe { close::<S>(job, (p, t), (b, half), &sums.map(|limb| limb[p]), row) };
                }
            }
        }
    }
}

/// The `panel`-th panel's 16 rows' scales for half `half` of block `b` (the only one but for
/// `PER_16`): `d`, `d · sc` (as i8 for `PER_16`), exact in f32.
///
/// # Safety
/// In bounds (as [`run`]); AVX-512F.
#[inline(always)]
unsafe fn scale<const S: u8>(job: &Job, panel: usize, b: usize, half: usize) -> __m512 {
    // SAFETY: forwarded.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(job.d(panel, b, 0).cast()));
        let bytes = || _mm_loadu_si128(job.factors(panel, b, if S == PER_16 { half } else { 0 }).cast());
        match S {
            PER_32 => d,
            PER_16 => _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes()))),
            _ => _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes()))),
        }
    }
}

/// The `panel`-th panel's 16 rows' offsets for block `b`: `dmin · m`, exact in f32.
///
/// # Safety
/// In bounds (as [`run`]), the scaling [`Scaling::SuperMin`]; AVX-512F.
#[inline(always)]
unsafe fn offset(job: &Job, panel: usize, b: usize) -> __m512 {
    // SAFETY: forwarded.
    unsafe {
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(job.d(panel, b, 1).cast()));
        let m = _mm_loadu_si128(job.factors(panel, b, 1).cast());
        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)))
    }
}

/// A panel's 16 rows' scales and offsets (zeros but for [`OFFSET`]) for one block.
#[derive(Clone, Copy)]
struct Row {
    scale: __m512,
    offset: __m512,
}

/// The `panel`-th panel's half `half` of block `b` for token `t`: its biased limb sums, less
/// the bias times the limbs' own sums (over the half, or the whole block), into the outputs
/// (`epilogue` in lanes.rs, a lane a row), then for [`OFFSET`] less the offset times `Σx`.
///
/// # Safety
/// As [`run`] for that panel and token.
#[inline(always)]
unsafe fn close<const S: u8>(
    job: &Job,
    (panel, t): (usize, usize),
    (b, half): (usize, usize),
    sums: &[__m512i; LIMBS],
    row: Row,
) {
    let (_, biased, s, x_sum) = job.x(t, b);
    // SAFETY: AVX-512F (the caller's); the token's biased sums, `s` and `Σx` for block b and
    // the panel's 16 outputs for token t (the caller's contract).
    unsafe {
        let bias = |l: usize| match S {
            PER_16 => *biased.add(half * LIMBS + l),
            _ => *biased.add(l) + *biased.add(LIMBS + l),
        };
        let exact = |l: usize| _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[l], _mm512_set1_epi32(bias(l))));
        let mut acc = _mm512_mul_ps(exact(2), _mm512_set1_ps(W2));
        acc = _mm512_fmadd_ps(exact(1), _mm512_set1_ps(W1), acc);
        acc = _mm512_add_ps(exact(0), acc);
        let ds = _mm512_mul_ps(row.scale, _mm512_set1_ps(*s));
        let out = job.out.add(t * job.out_stride + panel * PANEL_ROWS);
        let mut y = _mm512_fmadd_ps(acc, ds, _mm512_loadu_ps(out));
        if S == OFFSET {
            y = _mm512_fnmadd_ps(row.offset, _mm512_set1_ps(*x_sum), y);
        }
        _mm512_storeu_ps(out, y);
    }
}
