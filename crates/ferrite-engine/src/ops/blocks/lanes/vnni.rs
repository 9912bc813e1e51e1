//! AVX-512 VNNI variants of `lanes.rs`: the limb split, and the products, each the portable
//! variant's operations in its order (one 32-bit lane per output row).

use std::arch::x86_64::*;

use super::super::layout::{Scaling, Values, NIBBLE_BYTES, PLANE_BYTES};
use super::super::{BLOCK, PANEL_ROWS};
use super::{scales, Job, LIMBS, LIMB_BYTES, TINY, W1, W2};

/// The scalings, as the kernels' const parameter: `d` per 32 ([`Scaling::Block`]), `d · sc`
/// per 16 ([`Scaling::Super16`]), `d · sc` per 32 less `dmin · m` ([`Scaling::SuperMin`]).
pub(super) const PER_32: u8 = 0;
pub(super) const PER_16: u8 = 1;
pub(super) const OFFSET: u8 = 2;

/// `split` (lanes.rs) with AVX-512: the same limbs, sums and `s`.
///
/// # Safety
/// This CPU has AVX-512F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn split_avx512(
    x: &[f32; BLOCK],
    limbs: &mut [i8; LIMB_BYTES],
    sums: &mut [[i32; LIMBS]; 2],
    count: usize,
) -> f32 {
    // SAFETY: 32 floats in `x`.
    let v = unsafe { [_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16))] };
    let abs = [_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])];
    // Not finite: greater than the largest finite, or unordered (NaN).
    let bad = |a: __m512| _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a, _mm512_set1_ps(f32::MAX));
    let finite = bad(abs[0]) | bad(abs[1]) == 0;
    let max = _mm512_reduce_max_ps(_mm512_max_ps(abs[0], abs[1]));
    if !finite || max < TINY {
        *limbs = [0; LIMB_BYTES];
        *sums = [[0; LIMBS]; 2];
        return if finite { 1.0 } else { f32::NAN };
    }
    let (s, inverse) = scales(max, count);
    let base = _mm512_set1_ps(254.0);
    // Each limb's 16 bytes per half, kept for their sums.
    let mut bytes = [[_mm_setzero_si128(); 2]; LIMBS];
    for (half, v) in v.into_iter().enumerate() {
        let mut r = _mm512_mul_ps(v, _mm512_set1_ps(inverse));
        for bytes in bytes.iter_mut().take(count) {
            let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
            bytes[half] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));
            r = _mm512_mul_ps(_mm512_sub_ps(r, q), base);
        }
    }
    for (l, bytes) in bytes.iter().enumerate() {
        let limb = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(bytes[0]), bytes[1]);
        // SAFETY: limb l's 32 bytes, in one store (so that a 32-byte read of them forwards).
        unsafe { _mm256_storeu_si256(limbs.as_mut_ptr().add(l * BLOCK).cast(), limb) };
    }
    // The sums of each 16 limb bytes: as unsigned (+128) bytes, eight at a time (`vpsadbw`),
    // from the registers (reading back the stores would stall on forwarding).
    let flip = _mm512_set1_epi8(i8::MIN);
    let four = |b: [__m128i; 4]| {
        let low = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(b[0]), b[1]);
        let high = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(b[2]), b[3]);
        _mm512_xor_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high), flip)
    };
    let zero = _mm_setzero_si128();
    let (ab, c) = (
        four([bytes[0][0], bytes[0][1], bytes[1][0], bytes[1][1]]),
        four([bytes[2][0], bytes[2][1], zero, zero]),
    );
    let mut eights = [0i64; 16];
    // SAFETY: 16 i64 out.
    unsafe {
        _mm512_storeu_si512(eights.as_mut_ptr().cast(), _mm512_sad_epu8(ab, _mm512_setzero_si512()));
        _mm512_storeu_si512(eights.as_mut_ptr().add(8).cast(), _mm512_sad_epu8(c, _mm512_setzero_si512()));
    }
    for (l, pairs) in eights.chunks_exact(4).take(LIMBS).enumerate() {
        for half in 0..2 {
            sums[half][l] = (pairs[2 * half] + pairs[2 * half + 1]) as i32 - 16 * 128;
        }
    }
    s
}

/// [`Job::run`] with VNNI.
///
/// # Safety
/// As [`Job::run`]; this CPU has AVX-512F, BW and VNNI.
pub(super) unsafe fn run(job: &Job, panels: usize, tokens: usize) {
    struct Shape<'a, 'b>(&'a Job<'b>, usize, usize);
    impl ByFormat for Shape<'_, '_> {
        unsafe fn call<const HIGH: usize, const INT8: bool, const S: u8>(self) {
            // SAFETY (both): forwarded.
            if self.0.limbs.count == 1 {
                unsafe { by_shape::<1, HIGH, INT8, S>(self.0, self.1, self.2) }
            } else {
                unsafe { by_shape::<LIMBS, HIGH, INT8, S>(self.0, self.1, self.2) }
            }
        }
    }
    // SAFETY: forwarded.
    unsafe { by_format(job.panels.values, job.panels.scaling, Shape(job, panels, tokens)) }
}

/// A kernel compiled once per format: its values' `HIGH` planes (int8 when `INT8`) and its
/// scaling `S` ([`PER_32`], [`PER_16`], [`OFFSET`]).
pub(super) trait ByFormat {
    /// # Safety
    /// The kernel's.
    unsafe fn call<const HIGH: usize, const INT8: bool, const S: u8>(self);
}

/// Runs `kernel` compiled for `values` under `scaling`.
///
/// # Safety
/// The kernel's.
pub(super) unsafe fn by_format(values: Values, scaling: Scaling, kernel: impl ByFormat) {
    // SAFETY (each arm): forwarded. The pairs are the formats' (Q8_0, Q5_0, Q4_0; Q4_K, Q5_K,
    // Q6_K) and int8 for stacks of formats whose values differ.
    unsafe {
        match (values, scaling) {
            (Values::Int8, Scaling::Block) => kernel.call::<0, true, PER_32>(),
            (Values::Int8, Scaling::Super16) => kernel.call::<0, true, PER_16>(),
            (Values::Int8, Scaling::SuperMin) => kernel.call::<0, true, OFFSET>(),
            (Values::Packed { high: 0, .. }, Scaling::Block) => kernel.call::<0, false, PER_32>(),
            (Values::Packed { high: 0, .. }, Scaling::SuperMin) => kernel.call::<0, false, OFFSET>(),
            (Values::Packed { high: 1, .. }, Scaling::Block) => kernel.call::<1, false, PER_32>(),
            (Values::Packed { high: 1, .. }, Scaling::SuperMin) => kernel.call::<1, false, OFFSET>(),
            (Values::Packed { high: 2, .. }, Scaling::Super16) => kernel.call::<2, false, PER_16>(),
            (values, scaling) => unreachable!("invariant: no format has {values:?} under {scaling:?}"),
        }
    }
}

/// # Safety
/// As [`run`], the values having `HIGH` planes (int8 when `INT8`), the scaling `S`'s, the
/// job's limbs `L` (the rest zeros).
#[inline(always)]
unsafe fn by_shape<const L: usize, const HIGH: usize, const INT8: bool, const S: u8>(
    job: &Job,
    panels: usize,
    tokens: usize,
) {
    debug_assert!(
        panels <= 4 && tokens <= 4 && (tokens == 1 || L == 1 || panels <= 2),
        "invariant: a tile shape the kernels have ({panels} panels, {tokens} tokens, {L} limbs)"
    );
    // SAFETY (each arm): forwarded.
    unsafe {
        match (panels, tokens) {
            (1, 1) => tile::<1, 1, L, HIGH, INT8, S>(job),
            (2, 1) => tile::<2, 1, L, HIGH, INT8, S>(job),
            (3, 1) => tile::<3, 1, L, HIGH, INT8, S>(job),
            (_, 1) => tile::<4, 1, L, HIGH, INT8, S>(job),
            (1, 2) => tile::<1, 2, L, HIGH, INT8, S>(job),
            (1, 3) => tile::<1, 3, L, HIGH, INT8, S>(job),
            (1, _) => tile::<1, 4, L, HIGH, INT8, S>(job),
            (2, 2) => tile::<2, 2, L, HIGH, INT8, S>(job),
            (2, 3) => tile::<2, 3, L, HIGH, INT8, S>(job),
            (2, _) => tile::<2, 4, L, HIGH, INT8, S>(job),
            // Three or four panels by several tokens: one limb's tiles only (three limbs'
            // would need more sums than registers).
            _ if L != 1 => unreachable!("invariant: {panels} panels by {tokens} tokens take one limb"),
            (3, 2) => tile::<3, 2, 1, HIGH, INT8, S>(job),
            (3, 3) => tile::<3, 3, 1, HIGH, INT8, S>(job),
            (3, _) => tile::<3, 4, 1, HIGH, INT8, S>(job),
            (_, 2) => tile::<4, 2, 1, HIGH, INT8, S>(job),
            (_, 3) => tile::<4, 3, 1, HIGH, INT8, S>(job),
            _ => tile::<4, 4, 1, HIGH, INT8, S>(job),
        }
    }
}

/// Columns `4g..4g + 4` of a block-panel's 16 rows as unsigned values (biased), row j's four
/// in lane j.
///
/// # Safety
/// A whole block-panel at `block`; AVX-512F and BW.
#[inline(always)]
pub(super) unsafe fn weights<const HIGH: usize, const INT8: bool>(block: *const u8, g: usize) -> __m512i {
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
/// values once and each token's `L` limbs once, against each other (`LPT` independent sums, so
/// the dot products' latency hides); closed per block, or per half block for `PER_16`.
///
/// # Safety
/// As [`run`], the job's limbs past `L` zeros.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn tile<
    const P: usize,
    const T: usize,
    const L: usize,
    const HIGH: usize,
    const INT8: bool,
    const S: u8,
>(
    job: &Job,
) {
    let halves = halves(S);
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
                    for (l, sums) in sums.iter_mut().enumerate().take(L) {
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
            // SAFETY: the panels' scales for block b.
            let rows: [Row; P] = std::array::from_fn(|p| unsafe { Row::load::<S>(job, p, b, half) });
            for (t, sums) in sums.iter().enumerate() {
                for (p, &row) in rows.iter().enumerate() {
                    // SAFETY: forwarded.
                    unsafe { close::<S, L>(job, (p, t), (b, half), &sums.map(|limb| limb[p]), row) };
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
pub(super) unsafe fn scale<const S: u8>(job: &Job, panel: usize, b: usize, half: usize) -> __m512 {
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
pub(super) unsafe fn offset(job: &Job, panel: usize, b: usize) -> __m512 {
    // SAFETY: forwarded.
    unsafe {
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(job.d(panel, b, 1).cast()));
        let m = _mm_loadu_si128(job.factors(panel, b, 1).cast());
        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)))
    }
}

/// A panel's 16 rows' scales and offsets (zeros but for [`OFFSET`]) for one block.
#[derive(Clone, Copy)]
pub(super) struct Row {
    pub scale: __m512,
    pub offset: __m512,
}

impl Row {
    /// The `panel`-th panel's rows for half `half` of block `b` ([`scale`], [`offset`]).
    ///
    /// # Safety
    /// In bounds (as [`run`]); AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn load<const S: u8>(job: &Job, panel: usize, b: usize, half: usize) -> Row {
        // SAFETY: forwarded.
        unsafe {
            Row {
                scale: scale::<S>(job, panel, b, half),
                offset: if S == OFFSET { offset(job, panel, b) } else { _mm512_setzero_ps() },
            }
        }
    }
}

/// Parts of a block closed apart under scaling `S`: its two halves for [`PER_16`].
pub(super) const fn halves(s: u8) -> usize {
    if s == PER_16 {
        2
    } else {
        1
    }
}

/// The `panel`-th panel's half `half` of block `b` for token `t`: [`step`] on its outputs.
///
/// # Safety
/// As [`run`] for that panel and token.
#[inline(always)]
pub(super) unsafe fn close<const S: u8, const L: usize>(
    job: &Job,
    (panel, t): (usize, usize),
    (b, half): (usize, usize),
    sums: &[__m512i; LIMBS],
    row: Row,
) {
    // SAFETY: the panel's 16 outputs for token t (the caller's contract); forwarded.
    unsafe {
        let out = job.out.add(t * job.out_stride + panel * PANEL_ROWS);
        _mm512_storeu_ps(out, step::<S, true, L>(job, t, (b, half), sums, row, _mm512_loadu_ps(out)));
    }
}

/// Token `t`'s half `half` of block `b` (the whole block but for [`PER_16`]) into a panel's 16
/// outputs `y`: its limb sums (where `BIASED`, less the bias times the limbs' own sums over
/// the half or the block), as `epilogue` in lanes.rs (a lane a row), then for [`OFFSET`] less
/// the offset times `Σx`. With one limb (`L`), `b`'s and `c`'s sums are zeros, whose part of
/// the epilogue (`0 · w₂`, `0 · w₁ + 0`, `Σa + 0`) leaves `Σa` as it is: skipped, same bits.
///
/// # Safety
/// Token t's block b is in the job's limbs; AVX-512F.
#[inline(always)]
pub(super) unsafe fn step<const S: u8, const BIASED: bool, const L: usize>(
    job: &Job,
    t: usize,
    (b, half): (usize, usize),
    sums: &[__m512i; LIMBS],
    row: Row,
    y: __m512,
) -> __m512 {
    let (_, biased, s, x_sum) = job.x(t, b);
    // SAFETY: AVX-512F (the caller's); the token's biased sums, `s` and `Σx` for block b (the
    // caller's contract).
    unsafe {
        let exact = |l: usize| {
            if !BIASED {
                return _mm512_cvtepi32_ps(sums[l]);
            }
            let bias = match S {
                PER_16 => *biased.add(half * LIMBS + l),
                _ => *biased.add(l) + *biased.add(LIMBS + l),
            };
            _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[l], _mm512_set1_epi32(bias)))
        };
        let acc = if L == 1 {
            exact(0)
        } else {
            let acc = _mm512_mul_ps(exact(2), _mm512_set1_ps(W2));
            let acc = _mm512_fmadd_ps(exact(1), _mm512_set1_ps(W1), acc);
            _mm512_add_ps(exact(0), acc)
        };
        let ds = _mm512_mul_ps(row.scale, _mm512_set1_ps(*s));
        let y = _mm512_fmadd_ps(acc, ds, y);
        if S == OFFSET {
            return _mm512_fnmadd_ps(row.offset, _mm512_set1_ps(*x_sum), y);
        }
        y
    }
}
