//! The block-panel tiles in AVX2 and AVX-512 intrinsics, and the nibble unpacking they use:
//! each does, per output, the portable tile's operations in its order (so its bits).

use super::{Tile, BLOCK, PANEL_ROWS};

/// A nibble block-panel's 256 bytes as its 512 int8 values: the low nibbles are columns 0–15,
/// the high ones 16–31, each less 8.
///
/// # Safety
/// 256 bytes at `packed`; AVX2 present.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_nibbles_avx2(packed: *const u8, out: &mut [i8; BLOCK * PANEL_ROWS]) {
    use std::arch::x86_64::*;
    let (mask, bias) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(8));
    let half = BLOCK * PANEL_ROWS / 2;
    for i in (0..half).step_by(32) {
        // SAFETY: bytes i..i + 32 of the 256; outputs i.. and 256 + i.. of the 512.
        unsafe {
            let v = _mm256_loadu_si256(packed.add(i).cast());
            let low = _mm256_sub_epi8(_mm256_and_si256(v, mask), bias);
            let high = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(v), mask), bias);
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), low);
            _mm256_storeu_si256(out.as_mut_ptr().add(half + i).cast(), high);
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
        for c in 0..BLOCK {
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
        // SAFETY: the block's 16 scales.
        let scales = unsafe { _mm256_loadu_si256(tile.scales.add(b * PANEL_ROWS).cast()) };
        let s_low = _mm256_cvtph_ps(_mm256_castsi256_si128(scales));
        let s_high = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(scales));
        for (a, p) in acc.iter_mut().zip(&partial) {
            a[0] = _mm256_fmadd_ps(p[0], s_low, a[0]);
            a[1] = _mm256_fmadd_ps(p[1], s_high, a[1]);
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

/// [`tile_avx2`] with a panel's 16 rows in one 16-lane vector: the same operations per
/// output in the same order, so the same bits.
///
/// # Safety
/// As [`Tile::run`], with AVX-512F present.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile_avx512<const T: usize>(tile: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); T];
    let mut buf = [0i8; BLOCK * PANEL_ROWS];
    for b in 0..tile.blocks {
        // SAFETY: block b of the panel (the caller's contract).
        let values = unsafe { tile.block::<true>(0, b, &mut buf) };
        let mut partial = [_mm512_setzero_ps(); T];
        for c in 0..BLOCK {
            // SAFETY: 16 values of column c of block b.
            let raw = unsafe { _mm_loadu_si128(values.add(c * PANEL_ROWS).cast()) };
            let w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
            for (t, p) in partial.iter_mut().enumerate() {
                // SAFETY: token t's input at column 32b + c.
                let x = _mm512_set1_ps(unsafe { *tile.x.add(t * tile.x_stride + b * BLOCK + c) });
                *p = _mm512_fmadd_ps(x, w, *p);
            }
        }
        // SAFETY: the block's 16 scales.
        let scales = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(tile.scales.add(b * PANEL_ROWS).cast()) });
        for (a, p) in acc.iter_mut().zip(&partial) {
            *a = _mm512_fmadd_ps(*p, scales, *a);
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: token t's 16 outputs, this caller's alone.
        unsafe { _mm512_storeu_ps(tile.out.add(t * tile.out_stride), *a) };
    }
}

/// [`tile_avx512`] over `P` panels side by side for `T` tokens: the same operations per
/// output in the same order (so the same bits), `P · T` independent chains.
///
/// # Safety
/// As [`Tile::run_side_by_side`], with AVX-512F present.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tiles_avx512<const P: usize, const T: usize>(tile: &Tile) {
    use std::arch::x86_64::*;
    let s_stride = PANEL_ROWS * tile.blocks;
    let mut acc = [[_mm512_setzero_ps(); T]; P];
    let mut bufs = [[0i8; BLOCK * PANEL_ROWS]; P];
    let mut values = [std::ptr::null::<i8>(); P];
    for b in 0..tile.blocks {
        for (p, (v, buf)) in values.iter_mut().zip(&mut bufs).enumerate() {
            // SAFETY: block b of panel p (the caller's contract).
            *v = unsafe { tile.block::<true>(p, b, buf) };
        }
        let mut partial = [[_mm512_setzero_ps(); T]; P];
        for c in 0..BLOCK {
            // SAFETY: token t's input at column 32b + c.
            let x: [__m512; T] = std::array::from_fn(|t| {
                _mm512_set1_ps(unsafe { *tile.x.add(t * tile.x_stride + b * BLOCK + c) })
            });
            for (sums, v) in partial.iter_mut().zip(&values) {
                // SAFETY: 16 values of column c of block b of this panel.
                let raw = unsafe { _mm_loadu_si128(v.add(c * PANEL_ROWS).cast()) };
                let w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
                for (sum, x) in sums.iter_mut().zip(&x) {
                    *sum = _mm512_fmadd_ps(*x, w, *sum);
                }
            }
        }
        for (p, (a, sums)) in acc.iter_mut().zip(&partial).enumerate() {
            // SAFETY: block b's 16 scales of panel p.
            let scales = _mm512_cvtph_ps(unsafe {
                _mm256_loadu_si256(tile.scales.add(p * s_stride + b * PANEL_ROWS).cast())
            });
            for (a, sum) in a.iter_mut().zip(sums) {
                *a = _mm512_fmadd_ps(*sum, scales, *a);
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

/// [`tile_avx2`] over two panels side by side for one token: the same operations per output
/// in the same order (so the same bits), four independent chains.
///
/// # Safety
/// As [`Tile::run_side_by_side`], with AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiles_avx2_two(tile: &Tile) {
    use std::arch::x86_64::*;
    let s_stride = PANEL_ROWS * tile.blocks;
    let mut acc = [[_mm256_setzero_ps(); 2]; 2];
    let mut bufs = [[0i8; BLOCK * PANEL_ROWS]; 2];
    let mut values = [std::ptr::null::<i8>(); 2];
    for b in 0..tile.blocks {
        for (p, (v, buf)) in values.iter_mut().zip(&mut bufs).enumerate() {
            // SAFETY: block b of panel p (the caller's contract).
            *v = unsafe { tile.block::<true>(p, b, buf) };
        }
        let mut partial = [[_mm256_setzero_ps(); 2]; 2];
        for c in 0..BLOCK {
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
        for (p, (a, sums)) in acc.iter_mut().zip(&partial).enumerate() {
            // SAFETY: block b's 16 scales of panel p.
            let scales = unsafe { _mm256_loadu_si256(tile.scales.add(p * s_stride + b * PANEL_ROWS).cast()) };
            let s_low = _mm256_cvtph_ps(_mm256_castsi256_si128(scales));
            let s_high = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(scales));
            a[0] = _mm256_fmadd_ps(sums[0], s_low, a[0]);
            a[1] = _mm256_fmadd_ps(sums[1], s_high, a[1]);
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
