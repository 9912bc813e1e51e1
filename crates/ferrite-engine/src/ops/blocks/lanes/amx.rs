//! The products of many tokens on AMX tiles (`tdpbssd`: a 16 × 16 tile of 32-bit sums, each
//! of up to 64 int8 products, per instruction): the same exact integer sums `Σ q · limb` per
//! row, block and limb as `vnni.rs` takes from `vpdpbusd`, closed by the same per-block step
//! ([`step`]), so the same bits; only the order of exact integer additions differs.
//!
//! Per panel and 16 tokens, per block (per half block for [`PER_16`]): one B tile of the
//! block-panel's values (its [`Order::Lanes`] bytes are AMX's B layout: a row of 64 bytes per
//! four columns, row j's four in 32-bit lane j), three A tiles of the tokens' limbs (in
//! [`Layout::Tiles`], each tile 512 contiguous bytes), three products (`tdpbssd`, signed ×
//! signed) into three C tiles, stored, and closed a token at a time into its 16 outputs'
//! running totals (held over all of K, stored once). Int8 values are B as they lie; packed
//! values are unpacked per panel to their signed values, so no bias is taken off.
//!
//! [`Order::Lanes`]: super::super::layout::Order::Lanes

use std::arch::asm;
use std::arch::x86_64::*;

use super::super::{for_each_task, unpadded, BlockPanels, BLOCK, PANEL_ROWS, TOKEN_BLOCK};
use super::vnni::{by_format, halves, step, weights, ByFormat, Row};
use super::{bias, Job, Layout, Limbs, AMX_TILE_TOKENS as TILE_TOKENS, LIMBS, LIMB_BYTES};
use crate::ops::packed::OutPtr;
use crate::ops::simd::SimdLevel;

/// Tokens from which a product runs on the tiles (fewer: on VNNI, the same bits). A tile
/// costs the same for 1 token as for 16, and packed values are unpacked once per panel.
pub(super) const MIN_TOKENS: usize = 8;
// Tasks (`for_each_task`) start at whole tiles.
const _: () = assert!(TOKEN_BLOCK.is_multiple_of(TILE_TOKENS));

/// Bytes of one block-panel's values as B (and of one C tile).
const TILE_BYTES: usize = BLOCK * PANEL_ROWS;

/// The tile configuration `ldtilecfg` reads (palette 1): per tile its bytes per row and rows.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// tmm0–2: C, 16 tokens × 16 rows of i32 (one per limb); tmm3–5: A, 16 tokens × `width`
    /// limb bytes; tmm6: B, `width / 4` rows of 64 bytes (`width`: 32 columns, or 16).
    fn new(width: usize) -> Self {
        let mut config =
            TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        for c in 0..LIMBS {
            (config.bytes_per_row[c], config.rows[c]) = (64, TILE_TOKENS as u8);
            (config.bytes_per_row[LIMBS + c], config.rows[LIMBS + c]) = (width as u16, TILE_TOKENS as u8);
        }
        (config.bytes_per_row[2 * LIMBS], config.rows[2 * LIMBS]) = (64, (width / 4) as u8);
        config
    }
}

/// Three C tiles, stored.
#[repr(C, align(64))]
struct Sums([i32; LIMBS * TILE_TOKENS * PANEL_ROWS]);

/// `x Wᵀ` on the tiles: `[m, k]` → `[m, n]`, the bits of [`super::matmul_at`] on VNNI.
///
/// # Safety
/// This CPU runs `SimdLevel::Amx` (AVX-512 VNNI, and AMX tiles granted to this process).
pub(super) unsafe fn matmul(panels: &BlockPanels, x: &[f32], m: usize) -> Vec<f32> {
    // With int8 activations the tiles still take all three limbs (`b` and `c` zero): the
    // same bits, not yet the saving.
    let limbs = Limbs::new(x, panels.k, SimdLevel::Amx, 0, Layout::Tiles, panels.activations);
    let count = panels.n.div_ceil(PANEL_ROWS);
    let stride = count * PANEL_ROWS;
    let mut out = vec![0f32; m * stride];
    let out_ptr = OutPtr(out.as_mut_ptr());
    for_each_task(count, m, 1, |tokens, task_panels| {
        let task =
            Task { panels, limbs: &limbs, tokens, task_panels, out: out_ptr.get(), out_stride: stride };
        // SAFETY: the task's panels and tokens are in bounds and its outputs its own; the
        // limbs are padded for whole tiles; this CPU runs AMX (the caller's contract).
        unsafe { by_format(panels.values, panels.scaling, task) };
    });
    unpadded(out, stride, panels.n)
}

/// Some panels × some tokens, on one thread.
struct Task<'a> {
    panels: &'a BlockPanels,
    /// In [`Layout::Tiles`].
    limbs: &'a Limbs,
    tokens: std::ops::Range<usize>,
    task_panels: std::ops::Range<usize>,
    /// Token 0's first output: rows of `out_stride`.
    out: *mut f32,
    out_stride: usize,
}

impl ByFormat for Task<'_> {
    unsafe fn call<const HIGH: usize, const INT8: bool, const S: u8>(self) {
        // SAFETY: forwarded.
        unsafe { task::<HIGH, INT8, S>(&self) }
    }
}

/// # Safety
/// The task's panels and tokens are in bounds, its outputs its own, the limbs padded to whole
/// tiles; this CPU has AVX-512F, BW, VNNI and AMX-INT8, granted.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn task<const HIGH: usize, const INT8: bool, const S: u8>(task: &Task) {
    debug_assert_eq!(task.tokens.start % TILE_TOKENS, 0, "invariant: tasks start at whole tiles");
    let halves = halves(S);
    let width = BLOCK / halves;
    let config = TileConfig::new(width);
    // SAFETY: a valid palette-1 configuration; the tiles are this thread's until released.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    let blocks = task.panels.k / BLOCK;
    let value_bias = _mm512_set1_epi8(bias(task.panels.values) as i8);
    let mut unpacked = vec![0u8; if INT8 { 0 } else { blocks * TILE_BYTES }];
    let mut sums = [const { Sums([0; LIMBS * TILE_TOKENS * PANEL_ROWS]) }; 2];
    for p in task.task_panels.clone() {
        let job = |token: usize| Job {
            panels: task.panels,
            first: p,
            blocks,
            limbs: task.limbs,
            token,
            out: task.out.wrapping_add(token * task.out_stride + p * PANEL_ROWS),
            out_stride: task.out_stride,
        };
        if !INT8 {
            let first = job(0);
            for (b, out) in unpacked.chunks_exact_mut(TILE_BYTES).enumerate() {
                for (g, out) in out.chunks_exact_mut(64).enumerate() {
                    // SAFETY: block-panel b of panel p; 64 bytes out.
                    unsafe {
                        let w = _mm512_sub_epi8(weights::<HIGH, false>(first.block(0, b), g), value_bias);
                        _mm512_storeu_si512(out.as_mut_ptr().cast(), w);
                    }
                }
            }
        }
        for t0 in task.tokens.clone().step_by(TILE_TOKENS) {
            let job = job(t0);
            let tile = t0 / TILE_TOKENS;
            let mut y = [_mm512_setzero_ps(); TILE_TOKENS];
            // Step i is half `i % halves` of block `i / halves`. Its products are stored one
            // step before they are closed, so that the tile stores have landed when the
            // vector loads read them.
            let steps = blocks * halves;
            for i in 0..=steps {
                if i < steps {
                    let (b, half) = (i / halves, i % halves);
                    let values = if INT8 { job.block(0, b) } else { unpacked[b * TILE_BYTES..].as_ptr() };
                    // Tile `tile`'s limbs start after the earlier tiles' 16 tokens each.
                    let at = tile * TILE_TOKENS * blocks * LIMB_BYTES + Layout::Tiles.offset(blocks, 0, b, 0);
                    let a = task.limbs.limbs[at + half * width..].as_ptr();
                    let w = values.wrapping_add(half * TILE_BYTES / 2);
                    // SAFETY: three A tiles from `a`, a B tile at `w`, three C tiles into
                    // step i's sums; the tiles configured above.
                    unsafe { products(a, w, &mut sums[i % 2]) };
                }
                let Some(i) = i.checked_sub(1) else { continue };
                let (b, half) = (i / halves, i % halves);
                // SAFETY: the panel's scales for block b.
                let row = unsafe { Row::load::<S>(&job, 0, b, half) };
                let sums = &sums[i % 2];
                for (t, y) in y.iter_mut().enumerate() {
                    let sum = |l: usize| {
                        // SAFETY: token t's 16 sums of C tile l.
                        unsafe {
                            _mm512_load_si512(sums.0[(l * TILE_TOKENS + t) * PANEL_ROWS..].as_ptr().cast())
                        }
                    };
                    // SAFETY: token t of the tile's limbs (padded) for block b.
                    *y = unsafe {
                        step::<S, false, LIMBS>(&job, t, (b, half), &[sum(0), sum(1), sum(2)], row, *y)
                    };
                }
            }
            for (t, y) in y.iter().enumerate().take(task.tokens.end - t0) {
                // SAFETY: token t0 + t's 16 outputs of panel p, this task's.
                unsafe { _mm512_storeu_ps(job.out.add(t * job.out_stride), *y) };
            }
        }
    }
    // SAFETY: releases this thread's tiles.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// The three limbs' products of 16 tokens' limbs (A tiles of 16 rows × 32 bytes, limb l at
/// `a + 512 l`; the first `width` bytes of each row configured) by the B tile at `w` (rows of
/// 64 bytes), signed × signed, stored as three C tiles into `sums`.
///
/// # Safety
/// The memory in bounds; the tiles configured as [`TileConfig::new`].
#[inline(always)]
unsafe fn products(a: *const i8, w: *const u8, sums: &mut Sums) {
    // SAFETY: forwarded.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tileloadd tmm3, [{a} + {a_row}*1]",
            "tileloadd tmm4, [{a} + {a_row}*1 + 512]",
            "tileloadd tmm5, [{a} + {a_row}*1 + 1024]",
            "tileloadd tmm6, [{w} + {row}*1]",
            "tdpbssd tmm0, tmm3, tmm6",
            "tdpbssd tmm1, tmm4, tmm6",
            "tdpbssd tmm2, tmm5, tmm6",
            "tilestored [{sums} + {row}*1], tmm0",
            "tilestored [{sums} + {row}*1 + 1024], tmm1",
            "tilestored [{sums} + {row}*1 + 2048], tmm2",
            a = in(reg) a,
            a_row = in(reg) BLOCK,
            w = in(reg) w,
            row = in(reg) 64usize,
            sums = in(reg) sums.0.as_mut_ptr(),
            options(nostack),
        )
    }
}
