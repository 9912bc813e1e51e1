//! The block-panel tiles in AVX2 and AVX-512 intrinsics, and the nibble unpacking they use:
//! each does, per output, the portable tile's operations in its order (so its bits).

use super::layout::{Scaling, Values, NIBBLE_BYTES, PLANE_BYTES};
use super::{Tile, BLOCK, PANEL_ROWS};

/// A packed block-panel ([`Values::Packed`]) as its 512 int8 values: the low nibbles are
/// columns 0–15, the high ones 16–31, each with its `high` bits from the planes, less `bias`.
///
/// # Safety
/// A whole block-panel (256 + 64 · `high` bytes) at `packed`; AVX2 present.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_avx2(packed: *const u8, high: u8, bias: u8, out: &mut [i8; BLOCK * PANEL_ROWS]) {
    use std::arch::x86_64::*;
    let (mask, bias) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(bias as i8));
    // Byte k of 32 takes byte k / 8 of a broadcast u32, then tests its bit k % 8.
    let select = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    // 32 values' bits (value i + k at bit k) as bytes of 0xFF or 0.
    let spread = |bits: u32| {
        let picked = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), select), bit);
        _mm256_cmpeq_epi8(picked, bit)
    };
    for i in (0..NIBBLE_BYTES).step_by(32) {
        // SAFETY: bytes i..i + 32 of the nibbles; outputs i.. and 256 + i.. of the 512.
        unsafe {
            let v = _mm256_loadu_si256(packed.add(i).cast());
            let mut low = _mm256_and_si256(v, mask);
            let mut up = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            for h in 0..usize::from(high) {
                // Plane h: the bits of values i.. at byte i / 8, of values 256 + i.. 32 on.
                let plane = packed.add(NIBBLE_BYTES + h * PLANE_BYTES);
                let place = _mm256_set1_epi8(0x10 << h);
                let (bits_low, bits_up) = (
                    plane.add(i / 8).cast::<u32>().read_unaligned(),
                    plane.add((NIBBLE_BYTES + i) / 8).cast::<u32>().read_unaligned(),
                );
                low = _mm256_or_si256(low, _mm256_and_si256(spread(bits_low), place));
                up = _mm256_or_si256(up, _mm256_and_si256(spread(bits_up), place));
            }
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), _mm256_sub_epi8(low, bias));
            _mm256_storeu_si256(out.as_mut_ptr().add(NIBBLE_BYTES + i).cast(), _mm256_sub_epi8(up, bias));
        }
    }
}

/// # Safety
/// As [`Tile::run`], with AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<const T: usize>(tile: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut buf = [0i8; BLOCK * PANEL_ROWS];
    for b in 0..tile.blocks {
        // SAFETY: block b of the panel (the caller's contract).
        let values = unsafe { tile.block::<true>(0, b, &mut buf) };
        let mut partial = [[_mm256_setzero_ps(); 2]; T];
        for half in 0..2 {
            for c in half * BLOCK / 2..(half + 1) * BLOCK / 2 {
                // SAFETY: 16 values of column c of block b.
                let raw = unsafe { _mm_loadu_si128(values.add(c * PANEL_ROWS).cast()) };
                let low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                let high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw, raw)));
                for (t, p) in partial.iter_mut().enumerate() {
                    // SAFETY: token t's input at column 32b + c.
                    let x = _mm256_set1_ps(unsafe { *tile.x.add(t * tile.x_stride + b * BLOCK + c) });
                    p[0] = _mm256_fmadd_ps(x, low, p[0]);
                    p[1] = _mm256_fmadd_ps(x, high, p[1]);
                }
            }
            if half == 1 || tile.scaling.per_16() {
                // SAFETY: block b of the panel.
                let s = unsafe { scales_avx2(tile, 0, b, half) };
                for (a, p) in acc.iter_mut().zip(&mut partial) {
                    a[0] = _mm256_fmadd_ps(p[0], s[0], a[0]);
                    a[1] = _mm256_fmadd_ps(p[1], s[1], a[1]);
                    *p = [_mm256_setzero_ps(); 2];
                }
            }
        }
        if tile.scaling == Scaling::SuperMin {
            // SAFETY: block b of the panel; the scaling has offsets.
            let o = unsafe { offsets_avx2(tile, 0, b) };
            for (t, a) in acc.iter_mut().enumerate() {
                // SAFETY: token t's sum over block b.
                let sum = _mm256_set1_ps(unsafe { tile.sum(t, b) });
                a[0] = _mm256_fnmadd_ps(o[0], sum, a[0]);
                a[1] = _mm256_fnmadd_ps(o[1], sum, a[1]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: token t's 16 outputs, this caller's alone.
        unsafe {
            _mm256_storeu_ps(tile.out.add(t * tile.out_stride), a[0]);
            _mm256_storeu_ps(tile.out.add(t * tile.out_stride + 8), a[1]);
        }
    }
}

/// Rows 0–7 and 8–15 of a block-panel's scales for `half`, as [`Tile::scale`] computes them.
///
/// # Safety
/// As [`Tile::scale`], with AVX2 and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scales_avx2(tile: &Tile, panel: usize, b: usize, half: usize) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    // SAFETY: the block-panel's 16 f16s and 16 factors (the caller's contract).
    unsafe {
        let d = _mm256_loadu_si256(tile.d_at(tile.scaling, panel, b, 0).cast());
        let d =
            [_mm256_cvtph_ps(_mm256_castsi256_si128(d)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(d))];
        let factors = |run: usize, signed: bool| {
            let raw = _mm_loadu_si128(tile.factors_at(tile.scaling, panel, b, run).cast());
            let widen =
                |bytes| if signed { _mm256_cvtepi8_epi32(bytes) } else { _mm256_cvtepu8_epi32(bytes) };
            [_mm256_cvtepi32_ps(widen(raw)), _mm256_cvtepi32_ps(widen(_mm_unpackhi_epi64(raw, raw)))]
        };
        let times = |f: [__m256; 2]| [_mm256_mul_ps(d[0], f[0]), _mm256_mul_ps(d[1], f[1])];
        match tile.scaling {
            Scaling::Block => d,
            Scaling::Super16 => times(factors(half, true)),
            Scaling::SuperMin => times(factors(0, false)),
        }
    }
}

/// Rows 0–7 and 8–15 of a block-panel's offsets, as [`Tile::offset`] computes them.
///
/// # Safety
/// As [`Tile::offset`], with AVX2 and F16C present.
#[inline(always)]
unsafe fn offsets_avx2(tile: &Tile, panel: usize, b: usize) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    // SAFETY: the block-panel's 16 `dmin` and 16 `m` (the caller's contract).
    unsafe {
        let dmin = _mm256_loadu_si256(tile.d_at(tile.scaling, panel, b, 1).cast());
        let m = _mm_loadu_si128(tile.factors_at(tile.scaling, panel, b, 1).cast());
        [
            _mm256_mul_ps(
                _mm256_cvtph_ps(_mm256_castsi256_si128(dmin)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)),
            ),
            _mm256_mul_ps(
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(dmin)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(m, m))),
            ),
        ]
    }
}

/// [`tile_avx2`] with a panel's 16 rows in one 16-lane vector: the same operations per
/// output in the same order, so the same bits.
///
/// # Safety
/// As [`Tile::run`], with AVX-512F present.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile_avx512<const T: usize>(tile: &Tile) {
    // SAFETY: forwarded (one panel).
    unsafe { tiles_avx512::<1, T>(tile) }
}

/// [`tile_avx512`] over `P` panels side by side for `T` tokens: the same operations per
/// output in the same order (so the same bits), `P · T` independent chains. Packed values are
/// read in place, a column at a time ([`Packed512`]), not unpacked to int8 first.
///
/// # Safety
/// As [`Tile::run_side_by_side`], with AVX-512F present.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tiles_avx512<const P: usize, const T: usize>(tile: &Tile) {
    // Each pair of values and scaling the panels make has its own code (the scaling's steps
    // known when compiled): int8 with any scaling (stacked mixtures, or values unpacked for
    // many tokens), else each format's own.
    // SAFETY (each arm): forwarded.
    unsafe {
        match (tile.values, tile.scaling) {
            (Values::Int8, Scaling::Block) => panels_avx512::<P, T, _, ByBlock>(tile, Int8x16),
            (Values::Int8, Scaling::Super16) => panels_avx512::<P, T, _, By16>(tile, Int8x16),
            (Values::Int8, Scaling::SuperMin) => panels_avx512::<P, T, _, WithOffsets>(tile, Int8x16),
            (Values::Packed { high: 0, bias }, Scaling::Block) => {
                panels_avx512::<P, T, _, ByBlock>(tile, Packed512::<0>::new(bias))
            }
            (Values::Packed { high: 0, bias }, Scaling::SuperMin) => {
                panels_avx512::<P, T, _, WithOffsets>(tile, Packed512::<0>::new(bias))
            }
            (Values::Packed { high: 1, bias }, Scaling::Block) => {
                panels_avx512::<P, T, _, ByBlock>(tile, Packed512::<1>::new(bias))
            }
            (Values::Packed { high: 1, bias }, Scaling::SuperMin) => {
                panels_avx512::<P, T, _, WithOffsets>(tile, Packed512::<1>::new(bias))
            }
            (Values::Packed { high: 2, bias }, Scaling::Super16) => {
                panels_avx512::<P, T, _, By16>(tile, Packed512::<2>::new(bias))
            }
            (values, scaling) => unreachable!("invariant: no format holds {values:?} scaled {scaling:?}"),
        }
    }
}

/// A [`Scaling`] known when compiled.
trait Scaled {
    const SCALING: Scaling;
}

struct ByBlock;
struct By16;
struct WithOffsets;

impl Scaled for ByBlock {
    const SCALING: Scaling = Scaling::Block;
}

impl Scaled for By16 {
    const SCALING: Scaling = Scaling::Super16;
}

impl Scaled for WithOffsets {
    const SCALING: Scaling = Scaling::SuperMin;
}

/// How an AVX-512 tile reads a block-panel's column (16 rows) as f32.
trait Column512: Copy {
    /// Column `c` of the block-panel at `block`.
    ///
    /// # Safety
    /// A whole block-panel at `block`, `c` < 32; AVX-512F present.
    unsafe fn column(self, block: *const u8, c: usize) -> std::arch::x86_64::__m512;
}

/// Int8 values: column c's 16 bytes at `16c`.
#[derive(Clone, Copy)]
struct Int8x16;

impl Column512 for Int8x16 {
    #[inline(always)]
    unsafe fn column(self, block: *const u8, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: 16 bytes of the block-panel; AVX-512F (the caller's contract).
        unsafe {
            let raw = _mm_loadu_si128(block.add(c * PANEL_ROWS).cast());
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw))
        }
    }
}

/// [`Values::Packed`] with `H` bit planes: a column's nibbles, its planes' 16 bits as lane
/// masks, and the value looked up in a table of `u - bias` as f32 (exactly the int8 value's
/// conversion, so the bits of the unpacked path).
#[derive(Clone, Copy)]
struct Packed512<const H: usize> {
    /// `u - bias` for u in 0..32 and 32..64.
    table: [std::arch::x86_64::__m512; 4],
}

impl<const H: usize> Packed512<H> {
    #[inline(always)]
    fn new(bias: u8) -> Self {
        use std::arch::x86_64::*;
        let bias = i32::from(bias);
        let part = |i: i32| {
            let v: [f32; 16] = std::array::from_fn(|u| (16 * i + u as i32 - bias) as f32);
            // SAFETY: an unaligned load of 16 f32 from an array of 16 (AVX-512F: the caller's).
            unsafe { _mm512_loadu_ps(v.as_ptr()) }
        };
        Self { table: [part(0), part(1), part(2), part(3)] }
    }
}

impl<const H: usize> Column512 for Packed512<H> {
    #[inline(always)]
    unsafe fn column(self, block: *const u8, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the column's 16 nibble bytes and its 2 bytes in each plane are within the
        // block-panel; AVX-512F (the caller's contract).
        unsafe {
            let half = BLOCK / 2;
            let raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.add((c % half) * PANEL_ROWS).cast()));
            let nibble = if c < half {
                _mm512_and_si512(raw, _mm512_set1_epi32(0xF))
            } else {
                _mm512_srli_epi32::<4>(raw)
            };
            // Plane h's bits of column c: 16 bits at byte 2c.
            let plane =
                |h: usize| block.add(NIBBLE_BYTES + h * PLANE_BYTES + 2 * c).cast::<u16>().read_unaligned();
            match H {
                0 => _mm512_permutexvar_ps(nibble, self.table[0]),
                1 => {
                    let index = _mm512_mask_or_epi32(nibble, plane(0), nibble, _mm512_set1_epi32(16));
                    _mm512_permutex2var_ps(self.table[0], index, self.table[1])
                }
                _ => {
                    let index = _mm512_mask_or_epi32(nibble, plane(0), nibble, _mm512_set1_epi32(16));
                    let low = _mm512_permutex2var_ps(self.table[0], index, self.table[1]);
                    let high = _mm512_permutex2var_ps(self.table[2], index, self.table[3]);
                    _mm512_mask_blend_ps(plane(1), low, high)
                }
            }
        }
    }
}

/// [`tiles_avx512`] with the columns read by `C`, scaled as `S` says.
///
/// # Safety
/// As [`tiles_avx512`]; `columns` reads `tile.values`; `S` is `tile.scaling`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn panels_avx512<const P: usize, const T: usize, C: Column512, S: Scaled>(tile: &Tile, columns: C) {
    use std::arch::x86_64::*;
    let bytes = tile.values.block_bytes();
    let mut acc = [[_mm512_setzero_ps(); T]; P];
    for b in 0..tile.blocks {
        // SAFETY: block b of each panel (the caller's contract).
        let blocks: [*const u8; P] =
            std::array::from_fn(|p| unsafe { tile.q.add((p * tile.blocks + b) * bytes) });
        // Columns `first..first + 16` into the partial sums. Called with constants, so where a
        // column sits in its block-panel (the low or the high nibbles) is known when compiled.
        let accumulate = |first: usize, partial: &mut [[__m512; T]; P]| {
            for c in first..first + BLOCK / 2 {
                // SAFETY: token t's input at column 32b + c.
                let x: [__m512; T] = std::array::from_fn(|t| {
                    _mm512_set1_ps(unsafe { *tile.x.add(t * tile.x_stride + b * BLOCK + c) })
                });
                for (sums, &block) in partial.iter_mut().zip(&blocks) {
                    // SAFETY: column c of block b of this panel.
                    let w = unsafe { columns.column(block, c) };
                    for (sum, x) in sums.iter_mut().zip(&x) {
                        *sum = _mm512_fmadd_ps(*x, w, *sum);
                    }
                }
            }
        };
        // The partial sums into the totals by the scales of `half`, and started again.
        let close = |half: usize, partial: &mut [[__m512; T]; P], acc: &mut [[__m512; T]; P]| {
            for (p, (a, sums)) in acc.iter_mut().zip(partial.iter_mut()).enumerate() {
                // SAFETY: block b of panel p.
                let s = unsafe { scales512(tile, S::SCALING, p, b, half) };
                for (a, sum) in a.iter_mut().zip(sums.iter_mut()) {
                    *a = _mm512_fmadd_ps(*sum, s, *a);
                    *sum = _mm512_setzero_ps();
                }
            }
        };
        let mut partial = [[_mm512_setzero_ps(); T]; P];
        accumulate(0, &mut partial);
        if S::SCALING.per_16() {
            close(0, &mut partial, &mut acc);
        }
        accumulate(BLOCK / 2, &mut partial);
        close(1, &mut partial, &mut acc);
        if S::SCALING == Scaling::SuperMin {
            // SAFETY: each token's sum over block b (the scaling has offsets).
            let sums: [__m512; T] = std::array::from_fn(|t| _mm512_set1_ps(unsafe { tile.sum(t, b) }));
            for (p, a) in acc.iter_mut().enumerate() {
                // SAFETY: block b of panel p.
                let o = unsafe { offsets512(tile, p, b) };
                for (a, sum) in a.iter_mut().zip(&sums) {
                    *a = _mm512_fnmadd_ps(o, *sum, *a);
                }
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        for (t, a) in a.iter().enumerate() {
            // SAFETY: token t's 16 outputs of panel p, this caller's alone.
            unsafe { _mm512_storeu_ps(tile.out.add(t * tile.out_stride + p * PANEL_ROWS), *a) };
        }
    }
}

/// A block-panel's 16 scales for `half`, as [`Tile::scale`] computes them.
///
/// # Safety
/// As [`Tile::scale`], with AVX-512F present; `scaling` is the tile's (a constant where the
/// caller knows it).
#[inline(always)]
unsafe fn scales512(
    tile: &Tile,
    scaling: Scaling,
    panel: usize,
    b: usize,
    half: usize,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let d = tile.d_at(scaling, panel, b, 0);
    let factors = |run: usize| tile.factors_at(scaling, panel, b, run);
    // SAFETY: the block-panel's 16 f16s and 16 factors (the caller's contract).
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(d.cast()));
        match scaling {
            Scaling::Block => d,
            Scaling::Super16 => {
                let sc = _mm_loadu_si128(factors(half).cast());
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)))
            }
            Scaling::SuperMin => {
                let sc = _mm_loadu_si128(factors(0).cast());
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)))
            }
        }
    }
}

/// A block-panel's 16 offsets, as [`Tile::offset`] computes them.
///
/// # Safety
/// As [`Tile::offset`], with AVX-512F present.
#[inline(always)]
unsafe fn offsets512(tile: &Tile, panel: usize, b: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let scaling = Scaling::SuperMin;
    let dmin = tile.d_at(scaling, panel, b, 1);
    let m = tile.factors_at(scaling, panel, b, 1);
    // SAFETY: the block-panel's 16 `dmin` and 16 `m` (the caller's contract).
    unsafe {
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(dmin.cast()));
        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(m.cast()))))
    }
}

/// [`tile_avx2`] over two panels side by side for one token: the same operations per output
/// in the same order (so the same bits), four independent chains.
///
/// # Safety
/// As [`Tile::run_side_by_side`], with AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiles_avx2_two(tile: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; 2];
    let mut bufs = [[0i8; BLOCK * PANEL_ROWS]; 2];
    let mut values = [std::ptr::null::<i8>(); 2];
    for b in 0..tile.blocks {
        for (p, (v, buf)) in values.iter_mut().zip(&mut bufs).enumerate() {
            // SAFETY: block b of panel p (the caller's contract).
            *v = unsafe { tile.block::<true>(p, b, buf) };
        }
        let mut partial = [[_mm256_setzero_ps(); 2]; 2];
        for half in 0..2 {
            for c in half * BLOCK / 2..(half + 1) * BLOCK / 2 {
                // SAFETY: the token's input at column 32b + c.
                let x = _mm256_set1_ps(unsafe { *tile.x.add(b * BLOCK + c) });
                for (sums, v) in partial.iter_mut().zip(&values) {
                    // SAFETY: 16 values of column c of block b of this panel.
                    let raw = unsafe { _mm_loadu_si128(v.add(c * PANEL_ROWS).cast()) };
                    let low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                    let high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw, raw)));
                    sums[0] = _mm256_fmadd_ps(x, low, sums[0]);
                    sums[1] = _mm256_fmadd_ps(x, high, sums[1]);
                }
            }
            if half == 1 || tile.scaling.per_16() {
                for (p, (a, sums)) in acc.iter_mut().zip(&mut partial).enumerate() {
                    // SAFETY: block b of panel p.
                    let s = unsafe { scales_avx2(tile, p, b, half) };
                    a[0] = _mm256_fmadd_ps(sums[0], s[0], a[0]);
                    a[1] = _mm256_fmadd_ps(sums[1], s[1], a[1]);
                    *sums = [_mm256_setzero_ps(); 2];
                }
            }
        }
        if tile.scaling == Scaling::SuperMin {
            // SAFETY: the token's sum over block b (the scaling has offsets).
            let sum = _mm256_set1_ps(unsafe { tile.sum(0, b) });
            for (p, a) in acc.iter_mut().enumerate() {
                // SAFETY: block b of panel p.
                let o = unsafe { offsets_avx2(tile, p, b) };
                a[0] = _mm256_fnmadd_ps(o[0], sum, a[0]);
                a[1] = _mm256_fnmadd_ps(o[1], sum, a[1]);
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        // SAFETY: the token's 16 outputs of panel p, this caller's alone.
        unsafe {
            _mm256_storeu_ps(tile.out.add(p * PANEL_ROWS), a[0]);
            _mm256_storeu_ps(tile.out.add(p * PANEL_ROWS + 8), a[1]);
        }
    }
}
