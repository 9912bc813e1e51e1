//! bf16 panels multiplied on AVX-512 BF16's dot products (`vdpbf16ps`), the activations rounded
//! to bf16 first (`--bf16-activations`). The widened path (`packed`'s tiles) keeps every x as
//! it is and does one f32 multiply-add a weight; `vdpbf16ps` does two bf16 products a lane
//! (measured 1.48× the FMAs' multiply-adds a second on AMD Zen 4), and reads its weights as
//! stored, with no widening.
//!
//! Layout: K is padded to even (`kp`), and panel `p` (rows `16p..16p + 16`) holds pair `q`
//! (columns `2q`, `2q + 1`) as 32 bf16 at `p·16·kp + 32q`, row `j`'s two at `2j` (column `2q`)
//! and `2j + 1`: one 512-bit load is the 16 rows' pair, lane `j` row `j`, as the instruction
//! takes it. Each token's x is rounded to bf16 (nearest even) and paired the same way, one
//! 32-bit broadcast a pair.
//!
//! Every output is one chain over the pairs in K order: `acc += w₂q₊₁·x₂q₊₁`, then
//! `acc += w₂q·x₂q`, each product exact and each sum rounded to nearest, bf16 denormals read
//! as zero and denormal sums flushed to zero (Intel's definition of the instruction; AMD Zen 4
//! measured to agree bit for bit). [`tile_portable`] is that chain in scalar code, the reference
//! the vector tiles are tested against; tiles, tasks and steps never reorder it, so a token's
//! output is the same bits alone or in any batch.

use half::bf16;
use rayon::prelude::*;

use super::{panel_product, Chunk, OutPtr, MAX_TILE_TOKENS, PANELS_PER_TASK, PANEL_ROWS};
use crate::ops::simd::{self, SimdLevel};

/// Elements of K per pass (even): a task's 4 panels' chunk is 4 × 16 × 512 × 2 B = 64 KB, from
/// L2 (at 128 tokens × 576 → 1536 on AMD Zen 4: chunks of 128 took 689 µs, 256 654–692, 512
/// 626, 1,024 627: fewer passes store and reload fewer sums).
const PAIR_K_CHUNK: usize = 512;

/// How bf16 weights multiply on the CPU (`--bf16-activations`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Bf16Products {
    /// Each weight widened to f32 as it is loaded, the activations as they are: the bits of
    /// the widened f32 matrix's products.
    #[default]
    Widened,
    /// The activations rounded to bf16 and multiplied in pairs by `vdpbf16ps`, where the CPU
    /// has AVX-512 BF16 ([`dots_available`]); elsewhere as [`Bf16Products::Widened`]. Each x is
    /// off by up to 2⁻⁹ of itself.
    Dots,
}

/// Whether this process's products can take [`Bf16Products::Dots`]: a level of AVX-512
/// ([`simd::level`], which `FERRITE_SIMD` caps) on a CPU with AVX-512 BF16.
pub fn dots_available() -> bool {
    level_has_dots(simd::level())
}

/// Whether the vector tiles run at `level` on this CPU.
pub(super) fn level_has_dots(level: SimdLevel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level >= SimdLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// K padded to a whole number of pairs.
pub(super) fn padded(k: usize) -> usize {
    k.next_multiple_of(2)
}

/// Where element `(r, c)` of a `[n, k]` matrix sits in its paired panels.
pub(super) fn index(k: usize, r: usize, c: usize) -> usize {
    (r / PANEL_ROWS) * PANEL_ROWS * padded(k) + (c / 2) * 2 * PANEL_ROWS + 2 * (r % PANEL_ROWS) + c % 2
}

/// Paired panels of a `[n, k]` matrix whose element `(r, c)` is `at(r, c)` (zeros past `n`
/// and past `k`), a panel a task.
pub(super) fn pair_up(n: usize, k: usize, at: impl Fn(usize, usize) -> bf16 + Sync) -> Vec<bf16> {
    let panel_len = PANEL_ROWS * padded(k);
    let mut data = vec![bf16::ZERO; n.div_ceil(PANEL_ROWS) * panel_len];
    if k > 0 {
        data.par_chunks_mut(panel_len).enumerate().for_each(|(p, panel)| {
            for r in p * PANEL_ROWS..n.min((p + 1) * PANEL_ROWS) {
                for c in 0..k {
                    panel[index(k, r, c) - p * panel_len] = at(r, c);
                }
            }
        });
    }
    data
}

/// `x` `[m, k]` rounded to bf16 ([`to_bf16`]) and paired: `[m, kp / 2]`, x₂q in each
/// pair's low half. In parallel, 16 tokens or more a task.
fn round_pairs(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let half = padded(k) / 2;
    let mut pairs = vec![0u32; m * half];
    if k == 0 {
        return pairs;
    }
    let round_row = |(row, out): (&[f32], &mut [u32])| {
        let (whole, tail) = row.split_at(2 * (k / 2));
        for (pair, two) in out.iter_mut().zip(whole.chunks_exact(2)) {
            *pair = u32::from(to_bf16(two[0])) | u32::from(to_bf16(two[1])) << 16;
        }
        if let (Some(&last), Some(pair)) = (tail.first(), out.last_mut()) {
            *pair = u32::from(to_bf16(last));
        }
    };
    x[..m * k].par_chunks_exact(k).zip(pairs.par_chunks_exact_mut(half)).with_min_len(16).for_each(round_row);
    pairs
}

/// `v` rounded to bf16, to nearest even, as `vcvtneps2bf16` rounds: a NaN stays a (quiet)
/// NaN, and a denormal `v` gives zero (which the products would read as zero anyway). No
/// branches, so the loop over a row vectorizes.
pub(super) fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = (bits >> 16) | 0x40;
    let signed_zero = (bits >> 16) & 0x8000;
    let magnitude = bits & 0x7fff_ffff;
    let out = if magnitude > 0x7f80_0000 {
        nan
    } else if magnitude < 0x0080_0000 {
        signed_zero
    } else {
        rounded
    };
    out as u16
}

/// `x` `[m, k]` → `[m, n]` over paired panels `data`, by the vector tiles where `level` has
/// them ([`level_has_dots`]), else by [`tile_portable`]: the same bits.
pub(super) fn matmul(data: &[bf16], n: usize, k: usize, x: &[f32], m: usize, level: SimdLevel) -> Vec<f32> {
    let pairs = round_pairs(x, m, k);
    let (kp, half) = (padded(k), padded(k) / 2);
    let vector = level_has_dots(level);
    panel_product(n, m, |tokens, panels, out: OutPtr| {
        let stride = n.div_ceil(PANEL_ROWS) * PANEL_ROWS;
        // Tokens per tile, then as many panels as 24 sums allow (the FMA tiles' shapes).
        let c = tokens.len().min(MAX_TILE_TOKENS);
        let panels_per_tile = (24 / c).min(PANELS_PER_TASK);
        for k0 in (0..kp).step_by(PAIR_K_CHUNK) {
            let chunk = Chunk { k0, len: PAIR_K_CHUNK.min(kp - k0), first: k0 == 0 };
            for p in panels.clone().step_by(panels_per_tile) {
                for t in tokens.clone().step_by(c) {
                    let tile = PairTile {
                        a: data[p * PANEL_ROWS * kp + chunk.k0 * PANEL_ROWS..].as_ptr(),
                        panel_stride: PANEL_ROWS * kp,
                        x: pairs[t * half + chunk.k0 / 2..].as_ptr(),
                        x_stride: half,
                        pairs: chunk.len / 2,
                        // SAFETY: token t's row at panel p's first column, inside `out`.
                        out: unsafe { out.get().add(t * stride + p * PANEL_ROWS) },
                        out_stride: stride,
                        first: chunk.first,
                    };
                    let shape = (panels_per_tile.min(panels.end - p), c.min(tokens.end - t));
                    // SAFETY: the tile's panels and tokens lie inside the task's ranges, whose
                    // outputs are this task's alone; `data` and `pairs` hold every pair the
                    // tile reads; the vector tiles only where `level_has_dots` saw them.
                    unsafe { tile.run(shape, vector) };
                }
            }
        }
    })
}

/// One register tile: `P` panels × `C` tokens over `pairs` pairs of K.
struct PairTile {
    /// The first panel's first pair of this chunk; panels `panel_stride` elements apart.
    a: *const bf16,
    panel_stride: usize,
    /// The first token's first pair of this chunk; tokens `x_stride` pairs apart.
    x: *const u32,
    x_stride: usize,
    pairs: usize,
    /// The first token's output at the first panel's first row; tokens `out_stride` apart.
    out: *mut f32,
    out_stride: usize,
    first: bool,
}

impl PairTile {
    /// # Safety
    /// The tile's panels and tokens hold `pairs` readable pairs from `a` and `x`; its outputs
    /// (16 per panel per token) are writable and its alone; `vector` only on a CPU with
    /// AVX-512F and AVX-512 BF16.
    unsafe fn run(&self, (panels, tokens): (usize, usize), vector: bool) {
        macro_rules! dispatch {
            ($($p:literal: $($c:literal)*);*) => {
                match (panels, tokens) {
                    $($(($p, $c) => {
                        #[cfg(target_arch = "x86_64")]
                        if vector {
                            // SAFETY: forwarded; the caller saw AVX-512 BF16.
                            return unsafe { tile_avx512_bf16::<$p, $c>(self) };
                        }
                        // SAFETY: forwarded.
                        unsafe { tile_portable::<$p, $c>(self) }
                    })*)*
                    _ => unreachable!("invariant: no tile of {panels} panels x {tokens} tokens"),
                }
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = vector;
        // Up to PANELS_PER_TASK (4) panels of MAX_TILE_TOKENS (6): at most 24 sums.
        dispatch!(1: 1 2 3 4 5 6; 2: 1 2 3 4 5 6; 3: 1 2 3 4 5 6; 4: 1 2 3 4 5 6)
    }

    /// # Safety
    /// Output `(p, c)` is inside the tile.
    unsafe fn output(&self, p: usize, c: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.out.add(c * self.out_stride + p * PANEL_ROWS) }
    }
}

/// A bf16's value as the instruction reads it: denormals as zero.
fn read(bits: u16) -> f32 {
    let v = f32::from_bits(u32::from(bits) << 16);
    if v != 0.0 && v.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// `acc + w·x`, the product exact and the sum rounded once, a denormal sum flushed to zero.
fn add_product(acc: f32, w: u16, x: u16) -> f32 {
    let sum = read(w).mul_add(read(x), acc);
    if sum != 0.0 && sum.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(sum)
    } else {
        sum
    }
}

/// The instruction's chain in scalar code: for each pair, the odd product, then the even one.
///
/// # Safety
/// As [`PairTile::run`].
#[inline(always)]
unsafe fn tile_portable<const P: usize, const C: usize>(t: &PairTile) {
    let mut acc = [[[0f32; PANEL_ROWS]; C]; P];
    for (p, acc_p) in acc.iter_mut().enumerate() {
        for (c, acc_pc) in acc_p.iter_mut().enumerate() {
            if !t.first {
                // SAFETY: this tile's outputs.
                acc_pc.copy_from_slice(unsafe { std::slice::from_raw_parts(t.output(p, c), PANEL_ROWS) });
            }
        }
    }
    for q in 0..t.pairs {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            // SAFETY: pair q of panel p's chunk: 16 rows' two weights.
            let w =
                unsafe { std::slice::from_raw_parts(t.a.add(p * t.panel_stride + 2 * PANEL_ROWS * q), 32) };
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: pair q of token c's chunk.
                let x = unsafe { *t.x.add(c * t.x_stride + q) };
                let (x_even, x_odd) = (x as u16, (x >> 16) as u16);
                for (j, a) in acc_pc.iter_mut().enumerate() {
                    let odd = add_product(*a, w[2 * j + 1].to_bits(), x_odd);
                    *a = add_product(odd, w[2 * j].to_bits(), x_even);
                }
            }
        }
    }
    for (p, acc_p) in acc.iter().enumerate() {
        for (c, acc_pc) in acc_p.iter().enumerate() {
            // SAFETY: this tile's outputs.
            unsafe { std::slice::from_raw_parts_mut(t.output(p, c), PANEL_ROWS) }.copy_from_slice(acc_pc);
        }
    }
}

/// Per pair of K: `P` weight vectors (16 rows × 2), `C` broadcasts, `PC` `vdpbf16ps`.
///
/// # Safety
/// As [`PairTile::run`], on a CPU with AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512_bf16<const P: usize, const C: usize>(t: &PairTile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    if !t.first {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: this tile's outputs: 16 floats per (panel, token).
                *acc_pc = unsafe { _mm512_loadu_ps(t.output(p, c)) };
            }
        }
    }
    for q in 0..t.pairs {
        // SAFETY: pair q of each panel's chunk: 64 bytes.
        let w: [__m512bh; P] = std::array::from_fn(|p| unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                t.a.add(p * t.panel_stride + 2 * PANEL_ROWS * q).cast(),
            ))
        });
        for c in 0..C {
            // SAFETY: pair q of token c's chunk.
            let x = _mm512_set1_epi32(unsafe { *t.x.add(c * t.x_stride + q) } as i32);
            // SAFETY: the same 512 bits, read as 32 bf16.
            let x = unsafe { std::mem::transmute::<__m512i, __m512bh>(x) };
            for (acc_p, &w_p) in acc.iter_mut().zip(&w) {
                acc_p[c] = _mm512_dpbf16_ps(acc_p[c], w_p, x);
            }
        }
    }
    for (p, acc_p) in acc.iter().enumerate() {
        for (c, &acc_pc) in acc_p.iter().enumerate() {
            // SAFETY: this tile's outputs.
            unsafe { _mm512_storeu_ps(t.output(p, c), acc_pc) };
        }
    }
}
