//! `y = x Wᵀ` on the CPU for the GGUF formats llama.cpp's files are mostly made of: Q8_0,
//! Q5_0 and Q4_0 (an f16 scale per 32 columns) and the K-quants Q4_K, Q5_K and Q6_K (small
//! integer scales per 16 or 32 columns under f16s per 256), held at about their file's size
//! and computed in f32. candle's kernels for these formats quantize x to 8 bits and run one
//! dependent FMA chain per output row with software f16 conversions (Q8_0), or have no SIMD at
//! all (Q5_0, most of a Q4_K_M file whose rows are not whole K-quant blocks): 0.07–0.7×
//! llama.cpp on this machine (BENCHMARKS.md, session 15). Here, as in `ops::packed`:
//!
//! - a panel holds 16 rows: for each block of 32 columns, their values side by side (a byte
//!   each for Q8_0; nibbles and bit planes for the others, [`Values`]) and the factors of their
//!   scales ([`Scaling`]); each x element is broadcast against the 16 rows' values widened to
//!   f32, so 16 outputs accumulate with no horizontal sums;
//! - each output is `Σ_groups s · (Σ x · q)`, less `o · Σ x` per 32 columns for the formats
//!   with an offset (Q4_K, Q5_K): `s = d` or `d · sc` and `o = dmin · m` are exact in f32, and
//!   every product `x · q` is exact in f32 but for its rounding, so the result is the
//!   dequantized matrix's product up to f32 rounding (no 8-bit rounding of x), and one fixed
//!   order per output makes a token's row the same bits alone or in any batch.
//!
//! A process at the VNNI or AMX level (the default where the CPU has them) keeps the panels
//! in another order and multiplies them on int8 dot products instead (AMX tiles for many
//! tokens), each input kept to about 2⁻²³ of its block's largest ([`lanes`]): faster at one
//! token for 4- and 5-bit values, and on AMX in batches. There, `--int8-activations` rounds
//! each block of inputs to int8 instead ([`Activations::Int8`]), as llama.cpp does: one
//! integer product where exact takes three.
//!
//! The values and scales are read from the file's blocks ([`formats`]); the tests check the
//! panels against candle's dequantization.

use half::f16;
use rayon::prelude::*;

use super::packed::OutPtr;
use super::quantized::{Activations, KQuants, QuantizedMatrix};
use super::simd::{self, SimdLevel};
use candle_core::quantized::GgmlDType;

mod formats;
mod lanes;
mod layout;
use formats::Row;
use layout::{Order, Scaling, Values, Q4_0_VALUES, Q4_K_VALUES, Q5_0_VALUES, Q5_K_VALUES, Q6_K_VALUES};

/// Rows per panel: two 8-lane vectors.
const PANEL_ROWS: usize = 16;
/// Columns per block-panel (and per scale, but for Q6_K's two).
pub const BLOCK: usize = 32;
/// Columns per K-quant super-block (one `d`, and `dmin`).
const SUPER: usize = 256;
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

/// A `[n, k]` matrix in panels of 16 rows (zeros past `n`): per panel, its `k / 32`
/// block-panels of values one after another ([`Values`]), and the f16s and factors of their
/// scales ([`Scaling`]) in runs of 16, row j at j.
#[derive(Clone)]
pub struct BlockPanels {
    /// The values: block-panel b of panel p at `(p · k/32 + b) · values.block_bytes()`.
    q: Vec<u8>,
    values: Values,
    /// Lanes where this process computes the products on int8 dot products ([`lanes`]).
    order: Order,
    /// How those int8 products take x (ignored in [`Order::Columns`]).
    activations: Activations,
    scaling: Scaling,
    /// Per panel and group of columns ([`Scaling::group_blocks`]), [`Scaling::d_runs`] runs.
    d: Vec<f16>,
    /// Per panel and block-panel, [`Scaling::factor_runs`] runs.
    factors: Vec<u8>,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for BlockPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockPanels [{}, {}] {:?} {:?} {:?} {:?}",
            self.n, self.k, self.values, self.scaling, self.order, self.activations
        )
    }
}

/// One panel's parts, as [`BlockPanels`] lays them out.
type PanelParts = (Vec<u8>, Vec<f16>, Vec<u8>);

impl BlockPanels {
    /// `rows`: each row's `k` values (in the range `values` holds) and its scales' f16s and
    /// factors as `scaling` reads them, in order; in the order this process's products take.
    fn pack(rows: &[Row], k: usize, values: Values, scaling: Scaling) -> Self {
        Self::pack_in(rows, k, values, scaling, lanes::order(simd::level()))
    }

    fn pack_in(rows: &[Row], k: usize, values: Values, scaling: Scaling, order: Order) -> Self {
        let n = rows.len();
        let blocks = k / BLOCK;
        let bytes = values.block_bytes();
        let per_panel: Vec<PanelParts> = rows
            .par_chunks(PANEL_ROWS)
            .map(|rows| {
                let mut q = vec![0u8; blocks * bytes];
                let mut d = vec![f16::ZERO; scaling.d_index(blocks, 1, 0, 0)];
                let mut factors = vec![0u8; scaling.factor_index(blocks, 1, 0, 0)];
                for (j, row) in rows.iter().enumerate() {
                    for (c, &v) in row.values.iter().enumerate() {
                        let block = (c / BLOCK) * bytes;
                        values.put(&mut q[block..block + bytes], order.index(c % BLOCK, j), v);
                    }
                    for (r, &s) in row.d.iter().enumerate() {
                        d[r * PANEL_ROWS + j] = s;
                    }
                    for (r, &f) in row.factors.iter().enumerate() {
                        factors[r * PANEL_ROWS + j] = f;
                    }
                }
                (q, d, factors)
            })
            .collect();
        let activations = Activations::Exact;
        let mut panels = Self {
            q: Vec::new(),
            values,
            order,
            activations,
            scaling,
            d: Vec::new(),
            factors: Vec::new(),
            n,
            k,
        };
        for (q, d, factors) in per_panel {
            panels.q.extend(q);
            panels.d.extend(d);
            panels.factors.extend(factors);
        }
        panels
    }

    /// Rows `rows`, in order (each block-panel unpacked once).
    fn rows(&self, rows: std::ops::Range<usize>) -> Vec<Row> {
        let blocks = self.k / BLOCK;
        let bytes = self.values.block_bytes();
        let scaling = self.scaling;
        let first = rows.start / PANEL_ROWS;
        let panels = first..rows.end.div_ceil(PANEL_ROWS);
        let per_panel: Vec<Vec<Row>> = panels
            .into_par_iter()
            .map(|p| {
                let live = PANEL_ROWS.min(self.n - p * PANEL_ROWS);
                let d_runs = scaling.d_index(blocks, p + 1, 0, 0) - scaling.d_index(blocks, p, 0, 0);
                let d = &self.d[scaling.d_index(blocks, p, 0, 0)..][..d_runs];
                let factors = &self.factors[scaling.factor_index(blocks, p, 0, 0)..]
                    [..blocks * scaling.factor_runs() * PANEL_ROWS];
                let mut out: Vec<Row> = (0..live)
                    .map(|j| Row {
                        values: Vec::with_capacity(self.k),
                        d: d.iter().skip(j).step_by(PANEL_ROWS).copied().collect(),
                        factors: factors.iter().skip(j).step_by(PANEL_ROWS).copied().collect(),
                    })
                    .collect();
                let mut block = [0i8; BLOCK * PANEL_ROWS];
                for b in 0..blocks {
                    let at = (p * blocks + b) * bytes;
                    self.values.unpack(&self.q[at..at + bytes], &mut block);
                    for (j, row) in out.iter_mut().enumerate() {
                        row.values.extend((0..BLOCK).map(|c| block[self.order.index(c, j)]));
                    }
                }
                out
            })
            .collect();
        let skip = rows.start - first * PANEL_ROWS;
        per_panel.into_iter().flatten().skip(skip).take(rows.len()).collect()
    }

    /// A Q8_0, Q5_0 or Q4_0 matrix on the CPU as panels, and a Q4_K, Q5_K or Q6_K one where
    /// `k_quants` asks for exact products; `None` otherwise.
    pub fn from_quantized(m: &QuantizedMatrix, k_quants: KQuants) -> candle_core::Result<Option<Self>> {
        Self::from_quantized_in(m, k_quants, None)
    }

    /// [`BlockPanels::from_quantized`] in `order` where given (tests take both on one CPU).
    fn from_quantized_in(
        m: &QuantizedMatrix,
        k_quants: KQuants,
        order: Option<Order>,
    ) -> candle_core::Result<Option<Self>> {
        let dtype = m.dtype();
        let exact = k_quants == KQuants::Exact;
        let (values, scaling) = match dtype {
            GgmlDType::Q8_0 => (Values::Int8, Scaling::Block),
            GgmlDType::Q5_0 => (Q5_0_VALUES, Scaling::Block),
            GgmlDType::Q4_0 => (Q4_0_VALUES, Scaling::Block),
            GgmlDType::Q4K if exact => (Q4_K_VALUES, Scaling::SuperMin),
            GgmlDType::Q5K if exact => (Q5_K_VALUES, Scaling::SuperMin),
            GgmlDType::Q6K if exact => (Q6_K_VALUES, Scaling::Super16),
            _ => return Ok(None),
        };
        if !m.is_cpu() {
            return Ok(None);
        }
        let (_, k) = m.dims();
        let bytes = m.raw_bytes()?;
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let rows: Vec<Row> = bytes.par_chunks_exact(row_bytes).map(|row| formats::row(dtype, row)).collect();
        let order = order.unwrap_or_else(|| lanes::order(simd::level()));
        Ok(Some(Self::pack_in(&rows, k, values, scaling, order)))
    }

    /// The parts' rows one after another; `None` unless they share `k`, their scaling and their
    /// activations.
    pub fn stack(parts: &[&BlockPanels]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.k != first.k || p.scaling != first.scaling || p.activations != first.activations)
        {
            return None;
        }
        // Packed bits only when every part's values fit them (every format's fit int8).
        let values = if parts.iter().all(|p| p.values == first.values) { first.values } else { Values::Int8 };
        let rows: Vec<Row> = parts.iter().flat_map(|p| p.rows(0..p.n)).collect();
        Some(Self::pack(&rows, first.k, values, first.scaling).with_activations(first.activations))
    }

    /// These panels with their int8 products (where this process has them) taking x as
    /// `activations` says.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    /// `(n, k)`: output and input sizes.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes the values and scales occupy.
    pub fn num_bytes(&self) -> usize {
        self.q.len() + 2 * self.d.len() + self.factors.len()
    }

    /// Rows `ids` as f32 `[ids.len(), k]` (an embedding lookup on a tied head), each weight as
    /// candle's dequantization gives it.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.n) {
            return Err(format!("token id {id} is outside the vocabulary ({} rows)", self.n));
        }
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            let row = self.rows(id as usize..id as usize + 1).remove(0);
            out.extend(row.values.iter().enumerate().map(|(c, &v)| self.scaling.weight(&row, c, v)));
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

    /// Each token's sums of its inputs per block of 32 (`[m, k/32]`), which the formats with an
    /// offset take (`o · Σ x`); empty for the others.
    fn block_sums(&self, x: &[f32]) -> Vec<f32> {
        if self.scaling != Scaling::SuperMin {
            return Vec::new();
        }
        x.chunks_exact(BLOCK).map(|block| block.iter().fold(0.0, |sum, &v| sum + v)).collect()
    }

    /// Panel `p` over the tokens whose inputs start `x` (rows of `k`) and whose block sums
    /// start `sums` ([`BlockPanels::block_sums`]), writing to `out` (rows of `out_stride`,
    /// panel p's 16 columns from `16p` on).
    fn tile(&self, p: usize, x: *const f32, sums: *const f32, out: *mut f32, out_stride: usize) -> Tile {
        let blocks = self.k / BLOCK;
        Tile {
            q: self.q[p * blocks * self.values.block_bytes()..].as_ptr(),
            values: self.values,
            scaling: self.scaling,
            d: self.d[self.scaling.d_index(blocks, p, 0, 0)..].as_ptr(),
            factors: self.factors.as_ptr().wrapping_add(self.scaling.factor_index(blocks, p, 0, 0)),
            blocks,
            x,
            x_stride: self.k,
            sums,
            out: out.wrapping_add(p * PANEL_ROWS),
            out_stride,
        }
    }

    /// `x`: `[m, k]` row-major → `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "invariant: matmul takes an [m, k] input");
        if self.order == Order::Lanes {
            return lanes::matmul(self, x, m);
        }
        let panels = self.n.div_ceil(PANEL_ROWS);
        let stride = panels * PANEL_ROWS;
        let mut out = vec![0f32; m * stride];
        let sums = self.block_sums(x);
        let blocks = self.k / BLOCK;
        // One answer for the whole process, so every product of a run takes the same path.
        let level = simd::level();
        let tile_tokens = tile_tokens(level);
        let side_by_side = few_token_panels(level, m);
        let out_ptr = OutPtr(out.as_mut_ptr());
        for_each_task(panels, m, side_by_side, |tokens, task_panels| {
            let tile = |p: usize, t: usize| {
                let (x, sums) = (x[t * self.k..].as_ptr(), sums.as_ptr().wrapping_add(t * blocks));
                self.tile(p, x, sums, out_ptr.get().wrapping_add(t * stride), stride)
            };
            if side_by_side > 1 {
                let task_end = task_panels.end;
                for p in task_panels.step_by(side_by_side) {
                    let count = side_by_side.min(task_end - p);
                    // SAFETY: panels p..p + count and this task's tokens (at most
                    // FEW_TOKENS) are in bounds; their outputs are this task's alone; this
                    // CPU runs `level`.
                    unsafe { tile(p, tokens.start).run_side_by_side(count, tokens.len(), level) };
                }
                return;
            }
            // Panels in pairs where the level has the registers (each x broadcast feeds both),
            // packed values used by more than one tile unpacked once per panel, not per tile.
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
        unpadded(out, stride, self.n)
    }
}

/// Whether this process multiplies block formats on int8 dot products ([`lanes`]), where
/// [`Activations::Int8`] applies.
pub fn int8_products() -> bool {
    lanes::order(simd::level()) == Order::Lanes
}

/// Runs `task(tokens, panels)` on the pool over `count` panels × `m` tokens: tokens in blocks
/// of [`TOKEN_BLOCK`], panels in groups of up to 4, at least `side` (the panels a tile runs side
/// by side) but fewer where the threads would otherwise go idle (many cores, few panels).
fn for_each_task(
    count: usize,
    m: usize,
    side: usize,
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync + Send,
) {
    let token_blocks = m.div_ceil(TOKEN_BLOCK);
    let threads = rayon::current_num_threads();
    let per_task = (count * token_blocks / (4 * threads)).clamp(1, 4).max(side.min(count.div_ceil(threads)));
    let groups = count.div_ceil(per_task);
    (0..token_blocks * groups).into_par_iter().for_each(|i| {
        let tokens = (i / groups) * TOKEN_BLOCK..m.min((i / groups + 1) * TOKEN_BLOCK);
        task(tokens, (i % groups) * per_task..count.min((i % groups + 1) * per_task));
    });
}

/// `out`'s rows of `stride` cut to their first `n` (the panels' padding dropped).
fn unpadded(out: Vec<f32>, stride: usize, n: usize) -> Vec<f32> {
    if stride == n {
        return out;
    }
    out.chunks_exact(stride).flat_map(|row| &row[..n]).copied().collect()
}

/// One panel × up to [`TILE_TOKENS`] tokens over all of K.
struct Tile {
    /// The panel's values, as `values` says.
    q: *const u8,
    values: Values,
    scaling: Scaling,
    /// The panel's scale f16s and factors, as `scaling` lays them out.
    d: *const f16,
    factors: *const u8,
    blocks: usize,
    x: *const f32,
    x_stride: usize,
    /// The tokens' block sums (rows of `blocks`), where `scaling` has offsets.
    sums: *const f32,
    out: *mut f32,
    out_stride: usize,
}

impl Tile {
    /// # Safety
    /// The panel's `blocks` block-panels of values (as `values` holds them) and scales (as
    /// `scaling` lays them out), the tokens' `32 · blocks` inputs (and `blocks` sums where
    /// `scaling` has offsets) each and 16 outputs each are in bounds, the outputs this caller's
    /// alone; this CPU runs `level`; `tokens` is at most that level's tile.
    unsafe fn run(&self, tokens: usize, level: SimdLevel) {
        // SAFETY (each arm): forwarded.
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe {
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

    /// Where `d` run `i` of block-panel `b` of the `panel`-th panel from this tile's one is.
    /// `scaling` is this tile's, passed so that a kernel which knows it when compiled folds it.
    #[inline(always)]
    fn d_at(&self, scaling: Scaling, panel: usize, b: usize, i: usize) -> *const f16 {
        self.d.wrapping_add(scaling.d_index(self.blocks, panel, b, i))
    }

    /// Where factor run `i` of block-panel `b` of the `panel`-th panel from this one is
    /// (`scaling` as for [`Tile::d_at`]).
    #[inline(always)]
    fn factors_at(&self, scaling: Scaling, panel: usize, b: usize, i: usize) -> *const u8 {
        self.factors.wrapping_add(scaling.factor_index(self.blocks, panel, b, i))
    }

    /// Row j's scale for half `half` of block-panel `b` of the `panel`-th panel (the second
    /// half's, or the only one, unless [`Scaling::per_16`]): `d`, or `d · sc` (exact in f32).
    ///
    /// # Safety
    /// The block-panel is in bounds.
    unsafe fn scale(&self, panel: usize, b: usize, half: usize, j: usize) -> f32 {
        // SAFETY (each read): in bounds (the caller's contract).
        let d = unsafe { *self.d_at(self.scaling, panel, b, 0).add(j) }.to_f32();
        match self.scaling {
            Scaling::Block => d,
            Scaling::Super16 => {
                d * f32::from(unsafe { *self.factors_at(self.scaling, panel, b, half).add(j) } as i8)
            }
            Scaling::SuperMin => d * f32::from(unsafe { *self.factors_at(self.scaling, panel, b, 0).add(j) }),
        }
    }

    /// Row j's offset for block-panel `b` of the `panel`-th panel (`dmin · m`, exact in f32).
    ///
    /// # Safety
    /// The block-panel is in bounds and `scaling` has offsets.
    unsafe fn offset(&self, panel: usize, b: usize, j: usize) -> f32 {
        // SAFETY (each read): in bounds (the caller's contract).
        let dmin = unsafe { *self.d_at(self.scaling, panel, b, 1).add(j) }.to_f32();
        dmin * f32::from(unsafe { *self.factors_at(self.scaling, panel, b, 1).add(j) })
    }

    /// Token t's sum of its inputs over block-panel `b`.
    ///
    /// # Safety
    /// `scaling` has offsets; t and b are in bounds.
    unsafe fn sum(&self, t: usize, b: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        unsafe { *self.sums.add(t * self.blocks + b) }
    }
}

/// Tokens per register tile on `level`.
fn tile_tokens(level: SimdLevel) -> usize {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => TILE_TOKENS_512,
        _ => TILE_TOKENS,
    }
}

/// How many panels a full tile of tokens runs side by side on `level`: two on AVX-512, where
/// 2 × 6 sums and partial sums fit its registers (each x broadcast then feeds 32 rows).
fn many_token_panels(level: SimdLevel) -> usize {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => 2,
        _ => 1,
    }
}

/// How many panels a tile of `m` tokens runs side by side on `level` (1: one at a time).
fn few_token_panels(level: SimdLevel, m: usize) -> usize {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx if m <= FEW_TOKENS => FEW_TOKEN_PANELS_512,
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

    /// `panels` panels from this tile's one on (each `PANEL_ROWS · k` values and its scales
    /// further on, its outputs 16 further on) × `tokens` tokens.
    ///
    /// # Safety
    /// As [`Tile::run`] for each of the panels; `panels` at most [`few_token_panels`] for
    /// `level` and `tokens` with `tokens` at most [`FEW_TOKENS`], or at most
    /// [`many_token_panels`] with `tokens` at most the level's tile.
    unsafe fn run_side_by_side(&self, panels: usize, tokens: usize, level: SimdLevel) {
        // SAFETY (each arm): forwarded.
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe {
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

/// [`tile_avx2`] without intrinsics: the same operations per output, in the same order. Per
/// block of 32 columns: one fused multiply-add per weight into the partial sum; at the end of
/// the block (and, for [`Scaling::per_16`], after its first 16 columns too, starting the
/// partial sum again) one into the total by the scale; then, for the formats with an offset,
/// one more, of minus the offset by the token's block sum.
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
            for half in 0..2 {
                for c in half * BLOCK / 2..(half + 1) * BLOCK / 2 {
                    // SAFETY: in bounds (the caller's contract).
                    let x = unsafe { *tile.x.add(t * tile.x_stride + b * BLOCK + c) };
                    for (j, p) in partial.iter_mut().enumerate() {
                        let q = unsafe { *values.add(c * PANEL_ROWS + j) };
                        *p = x.mul_add(f32::from(q), *p);
                    }
                }
                if half == 1 || tile.scaling.per_16() {
                    for (j, (a, p)) in acc.iter_mut().zip(&mut partial).enumerate() {
                        // SAFETY: block b of the panel.
                        *a = p.mul_add(unsafe { tile.scale(0, b, half, j) }, *a);
                        *p = 0.0;
                    }
                }
            }
            if tile.scaling == Scaling::SuperMin {
                // SAFETY: block b of the panel, token t; the scaling has offsets.
                let sum = unsafe { tile.sum(t, b) };
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = (-unsafe { tile.offset(0, b, j) }).mul_add(sum, *a);
                }
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
