//! `y = x Wᵀ` on the CPU for GGUF weights of one scale per 32 (Q8_0, Q5_0, Q4_0), held as
//! int8 panels, computed in f32. candle's kernels for these formats quantize x to 8 bits and
//! run one dependent FMA chain per output row with software f16 conversions (Q8_0), or have no
//! SIMD at all (Q5_0, most of a Q4_K_M file whose rows are not whole K-quant blocks): 0.07–0.7×
//! llama.cpp on this machine (BENCHMARKS.md, session 15). Here, as in `ops::packed`:
//!
//! - a panel holds 16 rows: for each column, their 16 int8 values side by side, and for each
//!   block of 32 columns their 16 f16 scales; each x element is broadcast against two 8-lane
//!   vectors of widened weights, so 16 outputs accumulate with no horizontal sums;
//! - each output is `Σ_blocks scale · (Σ_32 x · q)`: every product `x · q` is exact in f32 but
//!   for its rounding, so the result is the dequantized matrix's product up to f32 rounding
//!   (no 8-bit rounding of x), and one fixed order per output makes a token's row the same
//!   bits alone or in any batch.
//!
//! The values are read from the file's blocks: each weight is `q · d` with `d` the block's f16
//! scale and `q` a small integer, a product f32 holds exactly (the tests check the panels
//! against candle's dequantization).

use half::f16;
use rayon::prelude::*;

use super::packed::OutPtr;
use super::quantized::QuantizedMatrix;
use super::simd::{self, SimdLevel};
use candle_core::quantized::GgmlDType;

/// Rows per panel: two 8-lane vectors.
const PANEL_ROWS: usize = 16;
/// Columns per scale.
pub const BLOCK: usize = 32;
/// Tokens per register tile (`2 · TILE_TOKENS` accumulators and as many partial sums), on AVX2
/// and the portable path; AVX-512 holds a panel's 16 sums in one register, so twice as many.
const TILE_TOKENS: usize = 3;
const TILE_TOKENS_512: usize = 6;
/// Tokens per task.
const TOKEN_BLOCK: usize = 96;
/// A tile of at most this many tokens (decode) runs several panels side by side: each output
/// is one FMA chain (4 cycles a link), so a panel alone keeps the core waiting at one token;
/// neighbouring panels' chains are independent. Each output's order is unchanged, so its bits.
const FEW_TOKENS: usize = 3;
/// Panels side by side for few tokens: AVX-512 (up to 4 × 3 sums and 4 × 3 partial sums in its
/// 32 registers), AVX2 (2 panels' two halves at one token in 16).
const FEW_TOKEN_PANELS_512: usize = 4;
const FEW_TOKEN_PANELS_AVX2: usize = 2;

/// A `[n, k]` matrix of int8 values with an f16 scale per row and 32 columns, in panels of 16
/// rows: value `(16p + j, 32b + c)` at `((p · k/32 + b) · 32 + c) · 16 + j`, its scale at
/// `(p · k/32 + b) · 16 + j` (zeros past `n`).
pub struct BlockPanels {
    /// The values: one byte each, or (Q4_0) two to a byte (see [`Values`]).
    q: Vec<u8>,
    values: Values,
    scales: Vec<f16>,
    n: usize,
    k: usize,
}

/// How a block-panel (16 rows × 32 columns) holds its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    /// 512 int8 values: column c's 16 rows at `16c` (value `n = 16c + j` at byte n).
    Int8,
    /// Values in `[-bias, 2^(4 + high) - bias)` biased by `bias`, at their file's size: the
    /// low four bits as nibbles in 256 bytes (byte `16c + j` holds row j of column c in its
    /// low nibble and of column c + 16 in its high one), then `high` planes of 64 bytes, plane
    /// h holding bit 4 + h of value n at bit n. Q4_0: no plane, bias 8; Q5_0: one, bias 16.
    /// A tile unpacks a block-panel to the int8 form before using it, so the products are the
    /// same.
    Packed { high: u8, bias: u8 },
}

/// Q4_0's values: nibbles less 8.
const Q4_0_VALUES: Values = Values::Packed { high: 0, bias: 8 };
/// Q5_0's: five bits less 16.
const Q5_0_VALUES: Values = Values::Packed { high: 1, bias: 16 };

/// Bytes of a block-panel's nibbles; each bit plane is a quarter of that.
const NIBBLE_BYTES: usize = BLOCK * PANEL_ROWS / 2;
const PLANE_BYTES: usize = BLOCK * PANEL_ROWS / 8;

impl Values {
    /// Bytes of one block-panel.
    const fn block_bytes(self) -> usize {
        match self {
            Values::Int8 => BLOCK * PANEL_ROWS,
            Values::Packed { high, .. } => NIBBLE_BYTES + high as usize * PLANE_BYTES,
        }
    }

    /// Writes value `n` (`16c + j`: row j of column c) of the block-panel at `block`.
    fn put(self, block: &mut [u8], n: usize, v: i8) {
        match self {
            Values::Int8 => block[n] = v as u8,
            Values::Packed { high, bias } => {
                let u = (i16::from(v) + i16::from(bias)) as u16;
                debug_assert!(u < 1 << (4 + high), "invariant: {v} fits {self:?}");
                let (byte, shift) = if n < NIBBLE_BYTES { (n, 0) } else { (n - NIBBLE_BYTES, 4) };
                block[byte] |= ((u & 0xF) as u8) << shift;
                for h in 0..usize::from(high) {
                    if (u >> (4 + h)) & 1 == 1 {
                        block[NIBBLE_BYTES + h * PLANE_BYTES + n / 8] |= 1 << (n % 8);
                    }
                }
            }
        }
    }

    /// The block-panel at `block` as its 512 int8 values, in order.
    fn unpack(self, block: &[u8], out: &mut [i8; BLOCK * PANEL_ROWS]) {
        match self {
            Values::Int8 => {
                for (o, &b) in out.iter_mut().zip(block) {
                    *o = b as i8;
                }
            }
            Values::Packed { high, bias } => {
                for (n, o) in out.iter_mut().enumerate() {
                    let byte = block[n % NIBBLE_BYTES];
                    let mut u = if n < NIBBLE_BYTES { byte & 0xF } else { byte >> 4 };
                    for h in 0..usize::from(high) {
                        u |= ((block[NIBBLE_BYTES + h * PLANE_BYTES + n / 8] >> (n % 8)) & 1) << (4 + h);
                    }
                    *o = (i16::from(u) - i16::from(bias)) as i8;
                }
            }
        }
    }
}

impl std::fmt::Debug for BlockPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockPanels [{}, {}]", self.n, self.k)
    }
}

impl BlockPanels {
    /// `rows`: each row's values (`k` of them, in the range `values` holds) and scales
    /// (`k / 32`), in order.
    fn pack(rows: &[(Vec<i8>, Vec<f16>)], k: usize, values: Values) -> Self {
        let n = rows.len();
        let (panels, nb) = (n.div_ceil(PANEL_ROWS), k / BLOCK);
        let bytes = values.block_bytes();
        let mut q = vec![0u8; panels * nb * bytes];
        let mut scales = vec![f16::ZERO; panels * PANEL_ROWS * nb];
        let panel_rows = rows.par_chunks(PANEL_ROWS);
        q.par_chunks_mut(nb * bytes).zip(scales.par_chunks_mut(nb * PANEL_ROWS)).zip(panel_rows).for_each(
            |((q, scales), rows)| {
                for (j, (row, row_scales)) in rows.iter().enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        let block = (c / BLOCK) * bytes;
                        values.put(&mut q[block..block + bytes], (c % BLOCK) * PANEL_ROWS + j, v);
                    }
                    for (b, &s) in row_scales.iter().enumerate() {
                        scales[b * PANEL_ROWS + j] = s;
                    }
                }
            },
        );
        Self { q, values, scales, n, k }
    }

    /// Rows `rows`' values and scales, in order (each block-panel unpacked once).
    fn rows(&self, rows: std::ops::Range<usize>) -> Vec<(Vec<i8>, Vec<f16>)> {
        let nb = self.k / BLOCK;
        let bytes = self.values.block_bytes();
        let first = rows.start / PANEL_ROWS;
        let panels = first..rows.end.div_ceil(PANEL_ROWS);
        let per_panel: Vec<Vec<(Vec<i8>, Vec<f16>)>> = panels
            .into_par_iter()
            .map(|p| {
                let live = PANEL_ROWS.min(self.n - p * PANEL_ROWS);
                let mut out: Vec<_> =
                    (0..live).map(|_| (Vec::with_capacity(self.k), Vec::with_capacity(nb))).collect();
                let mut block = [0i8; BLOCK * PANEL_ROWS];
                for b in 0..nb {
                    let at = (p * nb + b) * bytes;
                    self.values.unpack(&self.q[at..at + bytes], &mut block);
                    for (j, (values, scales)) in out.iter_mut().enumerate() {
                        values.extend((0..BLOCK).map(|c| block[c * PANEL_ROWS + j]));
                        scales.push(self.scales[(p * nb + b) * PANEL_ROWS + j]);
                    }
                }
                out
            })
            .collect();
        let skip = rows.start - first * PANEL_ROWS;
        per_panel.into_iter().flatten().skip(skip).take(rows.len()).collect()
    }

    /// A Q8_0, Q5_0 or Q4_0 matrix on the CPU as panels; `None` for other formats.
    pub fn from_quantized(m: &QuantizedMatrix) -> candle_core::Result<Option<Self>> {
        let dtype = m.dtype();
        let values = match dtype {
            GgmlDType::Q8_0 => Values::Int8,
            GgmlDType::Q5_0 => Q5_0_VALUES,
            GgmlDType::Q4_0 => Q4_0_VALUES,
            _ => return Ok(None),
        };
        if !m.is_cpu() {
            return Ok(None);
        }
        let (_, k) = m.dims();
        let bytes = m.raw_bytes()?;
        let row_bytes = k / BLOCK * dtype.type_size();
        let rows: Vec<(Vec<i8>, Vec<f16>)> = bytes
            .par_chunks_exact(row_bytes)
            .map(|row| {
                let mut q = Vec::with_capacity(k);
                let mut scales = Vec::with_capacity(k / BLOCK);
                for block in row.chunks_exact(dtype.type_size()) {
                    scales.push(f16::from_le_bytes([block[0], block[1]]));
                    block_values(dtype, &block[2..], &mut q);
                }
                (q, scales)
            })
            .collect();
        Ok(Some(Self::pack(&rows, k, values)))
    }

    /// The parts' rows one after another; `None` unless they share `k`.
    pub fn stack(parts: &[&BlockPanels]) -> Option<Self> {
        let (k, values) = (parts.first()?.k, parts.first()?.values);
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        // Packed bits only when every part's values fit them (every format's fit int8).
        let values = if parts.iter().all(|p| p.values == values) { values } else { Values::Int8 };
        let rows: Vec<_> = parts.iter().flat_map(|p| p.rows(0..p.n)).collect();
        Some(Self::pack(&rows, k, values))
    }

    /// `(n, k)`: output and input sizes.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes the values and scales occupy.
    pub fn num_bytes(&self) -> usize {
        self.q.len() + 2 * self.scales.len()
    }

    /// Rows `ids` as f32 `[ids.len(), k]` (an embedding lookup on a tied head).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.n) {
            return Err(format!("token id {id} is outside the vocabulary ({} rows)", self.n));
        }
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            let (values, scales) = self.rows(id as usize..id as usize + 1).remove(0);
            out.extend(values.iter().enumerate().map(|(c, &v)| f32::from(v) * scales[c / BLOCK].to_f32()));
        }
        Ok(out)
    }

    /// Panels `panels`' values as int8 block-panels, one after another (reusing `buf`'s
    /// allocation).
    fn unpacked_panels(&self, panels: std::ops::Range<usize>, mut buf: Vec<i8>) -> Vec<i8> {
        let blocks = self.k / BLOCK;
        let bytes = self.values.block_bytes();
        buf.clear();
        buf.resize(panels.len() * blocks * BLOCK * PANEL_ROWS, 0);
        let packed = &self.q[panels.start * blocks * bytes..panels.end * blocks * bytes];
        for (block, out) in packed.chunks_exact(bytes).zip(buf.chunks_exact_mut(BLOCK * PANEL_ROWS)) {
            let out: &mut [i8; BLOCK * PANEL_ROWS] = out.try_into().expect("invariant: a whole block-panel");
            // SAFETY: a whole block-panel in and out.
            unsafe { unpack(self.values, block.as_ptr(), out, simd::level()) };
        }
        buf
    }

    /// Panel `p` over the tokens whose inputs start `x` (rows of `k`), writing to `out` (rows
    /// of `out_stride`, panel p's 16 columns from `16p` on).
    fn tile(&self, p: usize, x: &[f32], out: *mut f32, out_stride: usize) -> Tile {
        Tile {
            q: self.q[p * (self.k / BLOCK) * self.values.block_bytes()..].as_ptr(),
            values: self.values,
            scales: self.scales[p * PANEL_ROWS * (self.k / BLOCK)..].as_ptr(),
            blocks: self.k / BLOCK,
            x: x.as_ptr(),
            x_stride: self.k,
            out: out.wrapping_add(p * PANEL_ROWS),
            out_stride,
        }
    }

    /// `x`: `[m, k]` row-major → `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "invariant: matmul takes an [m, k] input");
        let panels = self.n.div_ceil(PANEL_ROWS);
        let stride = panels * PANEL_ROWS;
        let mut out = vec![0f32; m * stride];
        // One answer for the whole process, so every product of a run takes the same path.
        let level = simd::level();
        let tile_tokens = tile_tokens(level);
        let side_by_side = few_token_panels(level, m);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let token_blocks = m.div_ceil(TOKEN_BLOCK);
        let threads = rayon::current_num_threads();
        // Side by side, a task takes up to `side_by_side` panels, fewer where the threads
        // would otherwise go idle (many cores, few panels).
        let per_task = (panels * token_blocks / (4 * threads))
            .clamp(1, 4)
            .max(side_by_side.min(panels.div_ceil(threads)));
        let groups = panels.div_ceil(per_task);
        (0..token_blocks * groups).into_par_iter().for_each(|task| {
            let tokens = (task / groups) * TOKEN_BLOCK..m.min((task / groups + 1) * TOKEN_BLOCK);
            let task_panels = (task % groups) * per_task..panels.min((task % groups + 1) * per_task);
            let tile = |p: usize, t: usize| {
                self.tile(p, &x[t * self.k..], out_ptr.get().wrapping_add(t * stride), stride)
            };
            if side_by_side > 1 {
                for p in task_panels.step_by(side_by_side) {
                    let count = side_by_side.min(panels - p).min((task % groups + 1) * per_task - p);
                    // SAFETY: panels p..p + count and this task's tokens (at most
                    // FEW_TOKENS) are in bounds; their outputs are this task's alone; this
                    // CPU runs `level`.
                    unsafe { tile(p, tokens.start).run_side_by_side(count, tokens.len(), level) };
                }
                return;
            }
            // Panels in pairs where the level has the registers (each x broadcast feeds both),
            // nibbles used by more than one tile unpacked once per panel, not per tile.
            let together = many_token_panels(level);
            let task_end = task_panels.end;
            let mut unpacked = Vec::new();
            for p in task_panels.step_by(together) {
                let count = together.min(task_end - p);
                let whole = self.values != Values::Int8 && tokens.len() > tile_tokens;
                if whole {
                    unpacked = self.unpacked_panels(p..p + count, unpacked);
                }
                for t in tokens.clone().step_by(tile_tokens) {
                    let mut tile = tile(p, t);
                    if whole {
                        (tile.q, tile.values) = (unpacked.as_ptr().cast(), Values::Int8);
                    }
                    // SAFETY: panels p..p + count and tokens t.. (at most `tile_tokens`, within
                    // this task's range) are in bounds; their outputs are this task's alone;
                    // this CPU runs `level`.
                    unsafe { tile.run_side_by_side(count, tile_tokens.min(tokens.end - t), level) };
                }
            }
        });
        if stride != self.n {
            out = out.chunks_exact(stride).flat_map(|row| &row[..self.n]).copied().collect();
        }
        out
    }
}

/// One panel × up to [`TILE_TOKENS`] tokens over all of K.
struct Tile {
    /// The panel's values, as `values` says.
    q: *const u8,
    values: Values,
    scales: *const f16,
    blocks: usize,
    x: *const f32,
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
}

impl Tile {
    /// # Safety
    /// The panel's `blocks` block-panels of values (as `values` holds them) and `blocks · 16`
    /// scales, the tokens' `32 · blocks`
    /// inputs each and 16 outputs each are in bounds, the outputs this caller's alone; this
    /// CPU runs `level`; `tokens` is at most that level's tile.
    unsafe fn run(&self, tokens: usize, level: SimdLevel) {
        // SAFETY (each arm): forwarded.
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => unsafe {
                match tokens {
                    1 => tile_avx512::<1>(self),
                    2 => tile_avx512::<2>(self),
                    3 => tile_avx512::<3>(self),
                    4 => tile_avx512::<4>(self),
                    5 => tile_avx512::<5>(self),
                    _ => tile_avx512::<6>(self),
                }
            },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => unsafe {
                match tokens {
                    1 => tile_avx2::<1>(self),
                    2 => tile_avx2::<2>(self),
                    _ => tile_avx2::<3>(self),
                }
            },
            SimdLevel::Baseline => unsafe { tile_generic(self, tokens) },
        }
    }
}

/// Tokens per register tile on `level`.
fn tile_tokens(level: SimdLevel) -> usize {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => TILE_TOKENS_512,
        _ => TILE_TOKENS,
    }
}

/// How many panels a full tile of tokens runs side by side on `level`: two on AVX-512, where
/// 2 × 6 sums and partial sums fit its registers (each x broadcast then feeds 32 rows).
fn many_token_panels(level: SimdLevel) -> usize {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => 2,
        _ => 1,
    }
}

/// How many panels a tile of `m` tokens runs side by side on `level` (1: one at a time).
fn few_token_panels(level: SimdLevel, m: usize) -> usize {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if m <= FEW_TOKENS => FEW_TOKEN_PANELS_512,
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if m == 1 => FEW_TOKEN_PANELS_AVX2,
        _ => 1,
    }
}

impl Tile {
    /// Block `b` of the `panel`-th panel from this tile's one, as 512 int8 values (column c's
    /// 16 rows at `16c`): in place, or unpacked into `buf` (with AVX2 when `SIMD`).
    ///
    /// # Safety
    /// The block is in bounds; `SIMD` only where the CPU has AVX2.
    #[inline(always)]
    unsafe fn block<const SIMD: bool>(
        &self,
        panel: usize,
        b: usize,
        buf: &mut [i8; BLOCK * PANEL_ROWS],
    ) -> *const i8 {
        // SAFETY: in bounds (the caller's contract).
        let at = unsafe { self.q.add((panel * self.blocks + b) * self.values.block_bytes()) };
        if self.values == Values::Int8 {
            return at.cast();
        }
        #[cfg(target_arch = "x86_64")]
        if let (Values::Packed { high, bias }, true) = (self.values, SIMD) {
            // SAFETY: a whole block-panel at `at`; AVX2 present (the caller's contract).
            unsafe { unpack_avx2(at, high, bias, buf) };
            return buf.as_ptr();
        }
        // SAFETY: a whole block-panel at `at`.
        self.values.unpack(unsafe { std::slice::from_raw_parts(at, self.values.block_bytes()) }, buf);
        buf.as_ptr()
    }

    /// `panels` panels from this tile's one on (each `PANEL_ROWS · k` values and
    /// `PANEL_ROWS · k/32` scales further on, its outputs 16 further on) × `tokens` tokens.
    ///
    /// # Safety
    /// As [`Tile::run`] for each of the panels; `panels` at most [`few_token_panels`] for
    /// `level` and `tokens` with `tokens` at most [`FEW_TOKENS`], or at most
    /// [`many_token_panels`] with `tokens` at most the level's tile.
    unsafe fn run_side_by_side(&self, panels: usize, tokens: usize, level: SimdLevel) {
        // SAFETY (each arm): forwarded.
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => unsafe {
                match (panels, tokens) {
                    (1, _) => self.run(tokens, level),
                    (2, 1) => tiles_avx512::<2, 1>(self),
                    (2, 2) => tiles_avx512::<2, 2>(self),
                    (2, 3) => tiles_avx512::<2, 3>(self),
                    (2, 4) => tiles_avx512::<2, 4>(self),
                    (2, 5) => tiles_avx512::<2, 5>(self),
                    (2, _) => tiles_avx512::<2, 6>(self),
                    (3, 1) => tiles_avx512::<3, 1>(self),
                    (3, 2) => tiles_avx512::<3, 2>(self),
                    (3, _) => tiles_avx512::<3, 3>(self),
                    (_, 1) => tiles_avx512::<4, 1>(self),
                    (_, 2) => tiles_avx512::<4, 2>(self),
                    (_, _) => tiles_avx512::<4, 3>(self),
                }
            },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 if panels == 2 => unsafe { tiles_avx2_two(self) },
            _ => unsafe { self.run(tokens, level) },
        }
    }
}

/// [`tile_avx2`] without intrinsics: the same operations per output, in the same order (one
/// fused multiply-add per weight into the block's partial sum, one per block into the total).
///
/// # Safety
/// As [`Tile::run`].
unsafe fn tile_generic(tile: &Tile, tokens: usize) {
    let mut buf = [0i8; BLOCK * PANEL_ROWS];
    for t in 0..tokens {
        let mut acc = [0f32; PANEL_ROWS];
        for b in 0..tile.blocks {
            // SAFETY: block b of the panel (the caller's contract).
            let values = unsafe { tile.block::<false>(0, b, &mut buf) };
            let mut partial = [0f32; PANEL_ROWS];
            for c in 0..BLOCK {
                // SAFETY: in bounds (the caller's contract).
                let x = unsafe { *tile.x.add(t * tile.x_stride + b * BLOCK + c) };
                for (j, p) in partial.iter_mut().enumerate() {
                    let q = unsafe { *values.add(c * PANEL_ROWS + j) };
                    *p = x.mul_add(f32::from(q), *p);
                }
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let s = unsafe { *tile.scales.add(b * PANEL_ROWS + j) }.to_f32();
                *a = partial[j].mul_add(s, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: in bounds and this caller's alone.
            unsafe { *tile.out.add(t * tile.out_stride + j) = *a };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
use x86::{tile_avx2, tile_avx512, tiles_avx2_two, tiles_avx512, unpack_avx2};

/// Appends the 32 values of a GGUF block of `dtype` (Q8_0, Q5_0 or Q4_0) from its bytes after
/// the f16 scale, as ggml lays them out: Q8_0 32 int8; Q4_0 16 bytes, value c in the low
/// nibble of byte c and value 16 + c in its high one, less 8; Q5_0 a little-endian u32 of
/// fifth bits (value c's at bit c) before those nibbles, less 16.
fn block_values(dtype: GgmlDType, block: &[u8], out: &mut Vec<i8>) {
    match dtype {
        GgmlDType::Q8_0 => out.extend(block[..BLOCK].iter().map(|&b| b as i8)),
        GgmlDType::Q4_0 => {
            let nibbles = &block[..BLOCK / 2];
            out.extend(nibbles.iter().map(|&b| (b & 0xF) as i8 - 8));
            out.extend(nibbles.iter().map(|&b| (b >> 4) as i8 - 8));
        }
        GgmlDType::Q5_0 => {
            let fifth = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            let nibbles = &block[4..4 + BLOCK / 2];
            let value = |c: usize, nibble: u8| (nibble | (((fifth >> c) & 1) as u8) << 4) as i8 - 16;
            out.extend(nibbles.iter().enumerate().map(|(c, &b)| value(c, b & 0xF)));
            out.extend(nibbles.iter().enumerate().map(|(c, &b)| value(BLOCK / 2 + c, b >> 4)));
        }
        _ => unreachable!("invariant: only the formats of one scale per 32 come here"),
    }
}

/// The block-panel at `block` (as `values` holds it) as its 512 int8 values, with AVX2 where
/// `level` has it.
///
/// # Safety
/// A whole block-panel at `block`; this CPU runs `level`.
#[inline(always)]
unsafe fn unpack(values: Values, block: *const u8, out: &mut [i8; BLOCK * PANEL_ROWS], level: SimdLevel) {
    #[cfg(target_arch = "x86_64")]
    if let (Values::Packed { high, bias }, true) = (values, level >= SimdLevel::Avx2) {
        // SAFETY: forwarded.
        return unsafe { unpack_avx2(block, high, bias, out) };
    }
    // SAFETY: a whole block-panel (the caller's contract).
    let block = unsafe { std::slice::from_raw_parts(block, values.block_bytes()) };
    values.unpack(block, out);
}

#[cfg(test)]
mod tests;
