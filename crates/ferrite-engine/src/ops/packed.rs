//! `y = x Wᵀ` on the CPU with W packed once, at load time, into panels of [`PANEL_ROWS`] rows
//! stored K-major, the layout a register-tiled product wants. candle's gemm packs both operands
//! on every call (at a 64-token decode step that moved as many bytes as the product), and dot
//! product tiles over row-major W end every output in a horizontal sum. Here:
//!
//! - for each K element, a panel gives 16 outputs' weights as two 8-lane vectors, and each
//!   token's x element is broadcast: `16 × C` outputs accumulate in registers with no
//!   horizontal sums and no per-call packing;
//! - every output is one fused multiply-add chain over K in order, whatever the step's token
//!   count, its tile shape or its task: a token's output is bit-identical alone or in any batch,
//!   decode or prefill, and whichever tiles run: AVX-512F (one 16-lane vector a panel column,
//!   up to 4 panels × 6 tokens), AVX2 + FMA + F16C (two 8-lane vectors, 6 panel-tokens) give the
//!   same bits; the portable loop without FMA rounds each product and add apart;
//! - K is cut into chunks of [`K_CHUNK`] so a panel's chunk stays in L1, and tokens into blocks
//!   of [`TOKEN_BLOCK`] so their chunk of x stays in L2;
//! - panels may hold bf16 or f16, half the bytes a decode step streams. The tiles widen each
//!   weight vector to f32 as they load it (exact), so the products are the bits of the widened
//!   f32 matrix's. A bf16 panel column stores rows `0, 8, 1, 9, …, 7, 15`: one 256-bit load
//!   then gives rows 0–7 by a shift and rows 8–15 by a mask, with no shuffle;
//! - bf16 panels may instead be paired for AVX-512 BF16's dot products, their activations
//!   rounded to bf16 (`pairs`, `--bf16-activations`).

use half::{bf16, f16};
use rayon::prelude::*;

use super::simd::{self, SimdLevel};

mod pairs;
pub use pairs::{dots_available, Bf16Products};

/// Weight rows per panel: two 8-lane vectors.
pub const PANEL_ROWS: usize = 16;
/// Elements of K per pass: a task's 4 panels' chunk is at most 4 × 16 × 128 × 4 B = 32 KB, in
/// L1 while its token tiles sweep it (256 measured 1.3× slower on AVX-512 at 2,048 tokens).
pub const K_CHUNK: usize = 128;
/// Tokens per task (their chunk of x is at most 96 × 128 × 4 B = 48 KB).
pub const TOKEN_BLOCK: usize = 96;
/// Panels per task at most (64 output columns); fewer where that would leave threads idle.
const PANELS_PER_TASK: usize = 4;
/// Accumulators of one AVX2 register tile (`2 × panels × tokens`), of its 16 registers.
const MAX_ACCUMULATORS: usize = 12;
/// Panel-token pairs of one AVX-512 tile (a register each), of its 32 registers.
const MAX_PAIRS_512: usize = 24;
/// Tokens per register tile at most, on every path (AVX-512 measured 1.5–2.2× slower with
/// tiles of 8 or 12 tokens over 3 or 2 panels than with 6 over 4).
const MAX_TILE_TOKENS: usize = 6;

mod sealed {
    /// Only this module's element types: `Panels` and the tiles' pointer arithmetic assume them.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// An element type panels store (f32, bf16 or f16). Products widen it to f32, exactly.
pub trait PanelElement: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn into_panels(data: Vec<Self>) -> Panels;
    /// Where row `j` of a panel column sits among its 16 elements.
    fn slot(j: usize) -> usize {
        j
    }
    /// The 16 weights of one panel column as f32: rows 0–7 and rows 8–15.
    ///
    /// # Safety
    /// `p` points at 16 readable elements; the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2];
    /// The 16 weights of one panel column as f32 in one vector, lane `slot(j)` holding row `j`
    /// (an AVX-512 tile keeps its sums in that order and puts them in row order on store).
    ///
    /// # Safety
    /// `p` points at 16 readable elements; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_512(p: *const Self) -> std::arch::x86_64::__m512;
}

impl PanelElement for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn into_panels(data: Vec<Self>) -> Panels {
        Panels::F32(data)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: 16 elements from p (the caller's contract).
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_512(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: 16 elements from p (the caller's contract).
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl PanelElement for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn into_panels(data: Vec<Self>) -> Panels {
        Panels::Bf16(data)
    }
    /// Rows `j` and `j + 8` share 32-bit lane `j`, in its low and high half.
    fn slot(j: usize) -> usize {
        if j < 8 {
            2 * j
        } else {
            2 * (j - 8) + 1
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: 16 elements (32 bytes) from p (the caller's contract).
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        // A bf16 is the high half of its f32: the low halves shifted up are rows 0–7, the
        // high halves with the low ones cleared are rows 8–15.
        let low = _mm256_slli_epi32::<16>(v);
        let high = _mm256_and_si256(v, _mm256_set1_epi32(0xffff_0000_u32 as i32));
        [_mm256_castsi256_ps(low), _mm256_castsi256_ps(high)]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_512(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: 16 elements (32 bytes) from p (the caller's contract).
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        // Each bf16 zero-extended to 32 bits and shifted up is its f32, in storage (slot) order.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
}

impl PanelElement for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn into_panels(data: Vec<Self>) -> Panels {
        Panels::F16(data)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: 16 elements (32 bytes) from p (the caller's contract).
        unsafe {
            [_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast()))]
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_512(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: 16 elements (32 bytes) from p (the caller's contract).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// A packed matrix's elements, in the dtype the checkpoint (or `--weight-dtype`) gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    /// bf16 paired for `vdpbf16ps` ([`Bf16Products::Dots`]; the layout `pairs` describes).
    Bf16Pairs(Vec<bf16>),
}

impl Panels {
    fn len(&self) -> usize {
        match self {
            Panels::F32(d) => d.len(),
            Panels::Bf16(d) => d.len(),
            Panels::F16(d) => d.len(),
            Panels::Bf16Pairs(d) => d.len(),
        }
    }

    /// The element type's name, for messages and logs.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Panels::F32(_) => "f32",
            Panels::Bf16(_) | Panels::Bf16Pairs(_) => "bf16",
            Panels::F16(_) => "f16",
        }
    }
}

/// A `[n, k]` matrix as panels: panel `p` holds rows `16p..16p + 16` (zeros past `n`), with
/// element `(row 16p + j, column c)` at `p·16k + 16c + slot(j)` (`slot(j) = j` but for bf16),
/// or for [`Panels::Bf16Pairs`] where `pairs` puts it.
#[derive(Clone)]
pub struct PackedMatrix {
    data: Panels,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix [{}, {}] {}", self.n, self.k, self.data.dtype_name())
    }
}

impl PackedMatrix {
    /// `w`: `[n, k]`, row-major, stored as it comes (f32, bf16 or f16).
    pub fn pack<E: PanelElement>(w: &[E], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "invariant: pack takes an [n, k] matrix");
        let panels = n.div_ceil(PANEL_ROWS);
        let mut data = vec![E::default(); panels * PANEL_ROWS * k];
        if k > 0 {
            data.par_chunks_mut(PANEL_ROWS * k).enumerate().for_each(|(p, panel)| {
                let rows: Vec<&[E]> = w.chunks_exact(k).skip(p * PANEL_ROWS).take(PANEL_ROWS).collect();
                // Written column by column, read from the panel's rows side by side.
                for (c, column) in panel.chunks_exact_mut(PANEL_ROWS).enumerate() {
                    for (j, row) in rows.iter().enumerate() {
                        column[E::slot(j)] = row[c];
                    }
                }
            });
        }
        Self { data: E::into_panels(data), n, k }
    }

    /// The element type the panels store.
    pub fn dtype_name(&self) -> &'static str {
        self.data.dtype_name()
    }

    /// Bytes the panels occupy.
    pub fn num_bytes(&self) -> usize {
        self.data.len()
            * match self.data {
                Panels::F32(_) => 4,
                Panels::Bf16(_) | Panels::F16(_) | Panels::Bf16Pairs(_) => 2,
            }
    }

    /// This matrix as `products` multiplies it: bf16 panels paired for `vdpbf16ps` where
    /// [`Bf16Products::Dots`] asks and [`dots_available`]; otherwise as it is.
    pub fn for_products(self, products: Bf16Products) -> Self {
        if products == Bf16Products::Dots && dots_available() {
            self.paired()
        } else {
            self
        }
    }

    /// bf16 panels paired for `vdpbf16ps` (whose portable chain runs on any CPU); other
    /// panels as they are.
    fn paired(self) -> Self {
        match self.data {
            Panels::Bf16(ref d) => {
                let paired = pairs::pair_up(self.n, self.k, |r, c| element(d, self.k, r, c));
                Self { data: Panels::Bf16Pairs(paired), ..self }
            }
            _ => self,
        }
    }

    /// Whether the panels are paired for `vdpbf16ps` (their activations rounded to bf16).
    pub fn takes_bf16_activations(&self) -> bool {
        matches!(self.data, Panels::Bf16Pairs(_))
    }

    /// The matrices' rows one after another, as [`pack`](Self::pack) of their concatenation
    /// gives, in their element type; `None` unless they share `k` and their element type.
    /// Where all but the last fill whole panels, the panels are simply laid end to end.
    pub fn stack(parts: &[&PackedMatrix]) -> Option<Self> {
        let last = parts.last()?;
        if parts.iter().any(|p| p.k != last.k) {
            return None;
        }
        match last.data {
            Panels::F32(_) => {
                Self::stack_as::<f32>(parts, |d| if let Panels::F32(v) = d { Some(v) } else { None })
            }
            Panels::Bf16(_) => {
                Self::stack_as::<bf16>(parts, |d| if let Panels::Bf16(v) = d { Some(v) } else { None })
            }
            Panels::F16(_) => {
                Self::stack_as::<f16>(parts, |d| if let Panels::F16(v) = d { Some(v) } else { None })
            }
            Panels::Bf16Pairs(_) => {
                let (_, init) = parts.split_last()?;
                let data = parts
                    .iter()
                    .map(|p| if let Panels::Bf16Pairs(v) = &p.data { Some(v) } else { None })
                    .collect::<Option<Vec<_>>>()?;
                let n = parts.iter().map(|p| p.n).sum();
                let data = if init.iter().all(|p| p.n % PANEL_ROWS == 0) {
                    data.iter().flat_map(|d| d.iter().copied()).collect()
                } else {
                    // A part ends mid-panel: its rows, in order, paired again.
                    let k = last.k;
                    let mut rows = Vec::with_capacity(n);
                    for (p, d) in parts.iter().zip(&data) {
                        rows.extend((0..p.n).map(|r| (d.as_slice(), r)));
                    }
                    pairs::pair_up(n, k, |r, c| rows[r].0[pairs::index(k, rows[r].1, c)])
                };
                Some(Self { data: Panels::Bf16Pairs(data), n, k: last.k })
            }
        }
    }

    fn stack_as<E: PanelElement>(
        parts: &[&PackedMatrix],
        get: fn(&Panels) -> Option<&Vec<E>>,
    ) -> Option<Self> {
        let data: Vec<&Vec<E>> = parts.iter().map(|p| get(&p.data)).collect::<Option<_>>()?;
        let (n, k) = (parts.iter().map(|p| p.n).sum(), parts[0].k);
        let (_, init) = parts.split_last()?;
        if init.iter().all(|p| p.n % PANEL_ROWS == 0) {
            let mut all = Vec::with_capacity(data.iter().map(|d| d.len()).sum());
            for d in data {
                all.extend_from_slice(d);
            }
            return Some(Self { data: E::into_panels(all), n, k });
        }
        // A part ends mid-panel: its rows, in order, packed again.
        let mut rows = Vec::with_capacity(n * k);
        for (p, d) in parts.iter().zip(data) {
            for r in 0..p.n {
                rows.extend((0..k).map(|c| element(d, k, r, c)));
            }
        }
        Some(Self::pack(&rows, n, k))
    }

    /// Rows `ids` as `[ids.len(), k]`, row-major (an embedding lookup on a tied LM head).
    /// Errors on an id past `n`, naming it.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.n) {
            return Err(format!("token id {id} is outside the vocabulary ({} rows)", self.n));
        }
        fn gather<E: PanelElement>(data: &[E], ids: &[u32], k: usize) -> Vec<f32> {
            let mut out = vec![0f32; ids.len() * k];
            for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = element(data, k, id as usize, c).to_f32();
                }
            }
            out
        }
        Ok(match &self.data {
            Panels::F32(d) => gather(d, ids, self.k),
            Panels::Bf16(d) => gather(d, ids, self.k),
            Panels::F16(d) => gather(d, ids, self.k),
            Panels::Bf16Pairs(d) => {
                let k = self.k;
                ids.iter()
                    .flat_map(|&id| (0..k).map(move |c| d[pairs::index(k, id as usize, c)].to_f32()))
                    .collect()
            }
        })
    }

    /// The matrix back as `[n, k]`, row-major, widened to f32.
    pub fn unpack(&self) -> Vec<f32> {
        let n = u32::try_from(self.n).expect("invariant: a packed matrix has at most u32::MAX rows");
        let ids: Vec<u32> = (0..n).collect();
        self.gather_rows(&ids).expect("invariant: every row id is below n")
    }

    /// `(n, k)`: output and input sizes.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `x`: `[m, k]` row-major → `[m, n]`, by the tiles of this process's [`simd::level`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, simd::level())
    }

    /// [`matmul`](Self::matmul) by the tiles of `level`, to compare the variants in one run.
    /// Panics when this CPU lacks `level` ([`simd::detected`] is below it).
    pub fn matmul_with(&self, x: &[f32], m: usize, level: SimdLevel) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "invariant: matmul takes an [m, k] input");
        assert!(level <= simd::detected(), "this CPU has no {} tiles", level.name());
        match &self.data {
            Panels::F32(d) => self.matmul_over(d, x, m, level),
            Panels::Bf16(d) => self.matmul_over(d, x, m, level),
            Panels::F16(d) => self.matmul_over(d, x, m, level),
            Panels::Bf16Pairs(d) => pairs::matmul(d, self.n, self.k, x, m, level),
        }
    }

    /// [`matmul_with`](Self::matmul_with) over `data`, this matrix's panels.
    fn matmul_over<E: PanelElement>(&self, data: &[E], x: &[f32], m: usize, level: SimdLevel) -> Vec<f32> {
        let k = self.k;
        panel_product(self.n, m, |tokens, panels, out| {
            for k0 in (0..k).step_by(K_CHUNK) {
                let chunk = Chunk { k0, len: K_CHUNK.min(k - k0), first: k0 == 0 };
                // SAFETY: the task's tokens and panels are in range, and its outputs (those
                // tokens' rows at those panels' columns) are written by this task alone.
                unsafe { self.block(data, x, tokens.clone(), panels.clone(), chunk, out.get(), level) };
            }
        })
    }

    /// One K chunk of one task: register tiles over its panels × tokens.
    ///
    /// # Safety
    /// `data` is this matrix's panels; `tokens` within `x`'s `m` rows, `panels` within this
    /// matrix; `out` is `[m, stride]` with those outputs this caller's alone; this CPU runs
    /// `level`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<E: PanelElement>(
        &self,
        data: &[E],
        x: &[f32],
        tokens: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        chunk: Chunk,
        out: *mut f32,
        level: SimdLevel,
    ) {
        let stride = self.n.div_ceil(PANEL_ROWS) * PANEL_ROWS;
        // Tokens per tile, then as many panels as the accumulators allow.
        let c = tokens.len().min(MAX_TILE_TOKENS);
        let panels_per_tile = match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => {
                (MAX_PAIRS_512 / c).min(PANELS_PER_TASK)
            }
            _ => MAX_ACCUMULATORS / (2 * c),
        };
        for p in panels.clone().step_by(panels_per_tile) {
            let tile_panels = panels_per_tile.min(panels.end - p);
            for t in tokens.clone().step_by(c) {
                let tile = Tile {
                    a: data[p * PANEL_ROWS * self.k + chunk.k0 * PANEL_ROWS..].as_ptr(),
                    panel_stride: PANEL_ROWS * self.k,
                    x: unsafe { x.as_ptr().add(t * self.k + chunk.k0) },
                    x_stride: self.k,
                    len: chunk.len,
                    out: unsafe { out.add(t * stride + p * PANEL_ROWS) },
                    out_stride: stride,
                    first: chunk.first,
                };
                // SAFETY: `tile_panels` panels from p and `c.min(end - t)` tokens from t lie
                // inside the task's ranges, so every pointer above covers what the tile reads
                // (`len` elements of K from k0) and writes.
                unsafe { tile.run(tile_panels, c.min(tokens.end - t), level) };
            }
        }
    }
}

/// `[m, n]` outputs of `n` rows' panels, computed by `task(tokens, panels, out)` over tasks of
/// up to [`TOKEN_BLOCK`] tokens × [`PANELS_PER_TASK`] panels in parallel, each writing only its
/// tokens' outputs at its panels' rows into `out` (`[m, stride]`, stride `n` rounded up to
/// whole panels, zeros to start).
fn panel_product(
    n: usize,
    m: usize,
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, OutPtr) + Sync,
) -> Vec<f32> {
    let panels = n.div_ceil(PANEL_ROWS);
    let stride = panels * PANEL_ROWS;
    let mut out = vec![0f32; m * stride];
    let out_ptr = OutPtr(out.as_mut_ptr());
    // At least ~4 tasks a thread where the matrix allows: a 576-row projection at batch 1
    // is 9 tasks of 4 panels, enough for 2 cores but not for 16.
    let token_blocks = m.div_ceil(TOKEN_BLOCK);
    let per_task = (panels * token_blocks / (4 * rayon::current_num_threads())).clamp(1, PANELS_PER_TASK);
    let groups = panels.div_ceil(per_task);
    (0..token_blocks * groups).into_par_iter().for_each(|t| {
        let tokens = (t / groups) * TOKEN_BLOCK..(m.min((t / groups + 1) * TOKEN_BLOCK));
        let panels = (t % groups) * per_task..panels.min((t % groups + 1) * per_task);
        task(tokens, panels, out_ptr);
    });
    if stride != n {
        out = out.chunks_exact(stride).flat_map(|row| &row[..n]).copied().collect();
    }
    out
}

/// Element `(r, c)` of a `[n, k]` matrix from its panels (the layout [`PackedMatrix`] describes).
fn element<E: PanelElement>(data: &[E], k: usize, r: usize, c: usize) -> E {
    data[(r / PANEL_ROWS) * PANEL_ROWS * k + c * PANEL_ROWS + E::slot(r % PANEL_ROWS)]
}

/// Which part of K a pass covers; the first pass writes its outputs, later ones add to them.
#[derive(Clone, Copy)]
struct Chunk {
    k0: usize,
    len: usize,
    first: bool,
}

/// One register tile: `P` panels × `C` tokens over `len` elements of K.
struct Tile<E> {
    /// The first panel's first element of this chunk; panels `panel_stride` apart.
    a: *const E,
    panel_stride: usize,
    /// The first token's first element of this chunk; tokens `x_stride` apart.
    x: *const f32,
    x_stride: usize,
    len: usize,
    /// The first token's output at the first panel's first row; tokens `out_stride` apart.
    out: *mut f32,
    out_stride: usize,
    first: bool,
}

impl<E: PanelElement> Tile<E> {
    /// # Safety
    /// The tile's `panels` panels and `tokens` token rows hold `len` readable elements from
    /// `a` and `x`; its outputs (`16 · panels` per token) are writable and its alone; this CPU
    /// runs `level`.
    unsafe fn run(&self, panels: usize, tokens: usize, level: SimdLevel) {
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded; the caller saw AVX-512F.
            SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe {
                self.run_avx512(panels, tokens)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded; the caller saw AVX2, FMA and F16C.
            SimdLevel::Avx2 => unsafe { self.run_avx2(panels, tokens, true) },
            // SAFETY: forwarded.
            SimdLevel::Baseline => unsafe { self.run_avx2(panels, tokens, false) },
        }
    }

    /// The AVX2 tiles, or their portable twins when `!avx2`.
    ///
    /// # Safety
    /// As [`Tile::run`], with AVX2, FMA and F16C present when `avx2`.
    unsafe fn run_avx2(&self, panels: usize, tokens: usize, avx2: bool) {
        macro_rules! dispatch {
            ($($p:literal, $c:literal);*) => {
                match (panels, tokens) {
                    $(($p, $c) => {
                        #[cfg(target_arch = "x86_64")]
                        if avx2 {
                            // SAFETY: forwarded; the caller saw AVX2, FMA and F16C.
                            return unsafe { tile_avx2::<E, $p, $c>(self) };
                        }
                        // SAFETY: forwarded.
                        unsafe { tile_generic::<E, $p, $c>(self) }
                    })*
                    _ => unreachable!("invariant: no tile of {panels} panels x {tokens} tokens"),
                }
            };
        }
        // Every (panels, tokens) with 2 · panels · tokens <= MAX_ACCUMULATORS that `block` asks
        // for: `tokens` up to 6, and at most 12 / (2 · tokens) panels.
        dispatch!(
            1, 1; 2, 1; 3, 1; 4, 1; 5, 1; 6, 1;
            1, 2; 2, 2; 3, 2;
            1, 3; 2, 3;
            1, 4; 1, 5; 1, 6
        )
    }

    /// # Safety
    /// As [`Tile::run`], with AVX-512F present.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_avx512(&self, panels: usize, tokens: usize) {
        macro_rules! dispatch {
            ($($p:literal: $($c:literal)*);*) => {
                match (panels, tokens) {
                    // SAFETY: forwarded; the caller saw AVX-512F.
                    $($(($p, $c) => unsafe { tile_avx512::<E, $p, $c>(self) },)*)*
                    _ => unreachable!("invariant: no tile of {panels} panels x {tokens} tokens"),
                }
            };
        }
        // Up to PANELS_PER_TASK (4) panels of MAX_TILE_TOKENS (6): at most 24 sums.
        dispatch!(1: 1 2 3 4 5 6; 2: 1 2 3 4 5 6; 3: 1 2 3 4 5 6; 4: 1 2 3 4 5 6)
    }
}

/// [`tile_avx2`] without intrinsics, for CPUs without AVX2 + FMA + F16C.
///
/// # Safety
/// As [`Tile::run`].
#[inline(always)]
unsafe fn tile_generic<E: PanelElement, const P: usize, const C: usize>(t: &Tile<E>) {
    let mut acc = [[[0f32; PANEL_ROWS]; C]; P];
    for (p, acc_p) in acc.iter_mut().enumerate() {
        for (c, acc_pc) in acc_p.iter_mut().enumerate() {
            if !t.first {
                // SAFETY: this tile's outputs.
                let out = unsafe {
                    std::slice::from_raw_parts(t.out.add(c * t.out_stride + p * PANEL_ROWS), PANEL_ROWS)
                };
                acc_pc.copy_from_slice(out);
            }
        }
    }
    for kk in 0..t.len {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            // SAFETY: element kk of panel p's chunk: 16 weights.
            let column = unsafe {
                std::slice::from_raw_parts(t.a.add(p * t.panel_stride + kk * PANEL_ROWS), PANEL_ROWS)
            };
            let w: [f32; PANEL_ROWS] = std::array::from_fn(|j| column[E::slot(j)].to_f32());
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: element kk of token c's chunk.
                let xc = unsafe { *t.x.add(c * t.x_stride + kk) };
                for (a, &wj) in acc_pc.iter_mut().zip(&w) {
                    *a += wj * xc;
                }
            }
        }
    }
    for (p, acc_p) in acc.iter().enumerate() {
        for (c, acc_pc) in acc_p.iter().enumerate() {
            // SAFETY: this tile's outputs.
            let out = unsafe {
                std::slice::from_raw_parts_mut(t.out.add(c * t.out_stride + p * PANEL_ROWS), PANEL_ROWS)
            };
            out.copy_from_slice(acc_pc);
        }
    }
}

/// Per element of K: `2P` weight vectors (widened as loaded), `C` broadcasts, `2PC` fused
/// multiply-adds into registers.
///
/// # Safety
/// As [`Tile::run`], on a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<E: PanelElement, const P: usize, const C: usize>(t: &Tile<E>) {
    use std::arch::x86_64::*;
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; P];
    if !t.first {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: this tile's outputs: 16 floats per (panel, token).
                let o = unsafe { t.out.add(c * t.out_stride + p * PANEL_ROWS) };
                *acc_pc = unsafe { [_mm256_loadu_ps(o), _mm256_loadu_ps(o.add(8))] };
            }
        }
    }
    for kk in 0..t.len {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            // SAFETY: element kk of panel p's chunk: 16 weights.
            let [w0, w1] = unsafe { E::load16(t.a.add(p * t.panel_stride + kk * PANEL_ROWS)) };
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: element kk of token c's chunk.
                let xc = _mm256_set1_ps(unsafe { *t.x.add(c * t.x_stride + kk) });
                acc_pc[0] = _mm256_fmadd_ps(w0, xc, acc_pc[0]);
                acc_pc[1] = _mm256_fmadd_ps(w1, xc, acc_pc[1]);
            }
        }
    }
    for (p, acc_p) in acc.iter().enumerate() {
        for (c, acc_pc) in acc_p.iter().enumerate() {
            // SAFETY: this tile's outputs.
            let o = unsafe { t.out.add(c * t.out_stride + p * PANEL_ROWS) };
            unsafe {
                _mm256_storeu_ps(o, acc_pc[0]);
                _mm256_storeu_ps(o.add(8), acc_pc[1]);
            }
        }
    }
}

/// Per element of K: `P` weight vectors (widened as loaded, in slot order), `C` broadcasts,
/// `PC` fused multiply-adds into registers: each output the same chain as [`tile_avx2`]'s.
///
/// # Safety
/// As [`Tile::run`], on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile_avx512<E: PanelElement, const P: usize, const C: usize>(t: &Tile<E>) {
    use std::arch::x86_64::*;
    // Lane s of a sum holds row `row_of[s]`; row j is in lane `slot_of[j]`.
    let slot_of: [i32; PANEL_ROWS] = std::array::from_fn(|j| E::slot(j) as i32);
    let mut row_of = [0i32; PANEL_ROWS];
    for (j, &s) in slot_of.iter().enumerate() {
        row_of[s as usize] = j as i32;
    }
    let in_rows = slot_of.iter().enumerate().all(|(j, &s)| s as usize == j);
    // SAFETY: 16 i32s each.
    let (to_slots, to_rows) =
        unsafe { (_mm512_loadu_si512(row_of.as_ptr().cast()), _mm512_loadu_si512(slot_of.as_ptr().cast())) };
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    if !t.first {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: this tile's outputs: 16 floats per (panel, token).
                let o = unsafe { _mm512_loadu_ps(t.out.add(c * t.out_stride + p * PANEL_ROWS)) };
                *acc_pc = if in_rows { o } else { _mm512_permutexvar_ps(to_slots, o) };
            }
        }
    }
    for kk in 0..t.len {
        for (p, acc_p) in acc.iter_mut().enumerate() {
            // SAFETY: element kk of panel p's chunk: 16 weights.
            let w = unsafe { E::load16_512(t.a.add(p * t.panel_stride + kk * PANEL_ROWS)) };
            for (c, acc_pc) in acc_p.iter_mut().enumerate() {
                // SAFETY: element kk of token c's chunk.
                let xc = _mm512_set1_ps(unsafe { *t.x.add(c * t.x_stride + kk) });
                *acc_pc = _mm512_fmadd_ps(w, xc, *acc_pc);
            }
        }
    }
    for (p, acc_p) in acc.iter().enumerate() {
        for (c, &acc_pc) in acc_p.iter().enumerate() {
            let rows = if in_rows { acc_pc } else { _mm512_permutexvar_ps(to_rows, acc_pc) };
            // SAFETY: this tile's outputs.
            unsafe { _mm512_storeu_ps(t.out.add(c * t.out_stride + p * PANEL_ROWS), rows) };
        }
    }
}

/// The output buffer the tasks of one product share; each writes only its own tiles.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint elements (their tokens' rows at their panels' columns), and the
// product waits for every task before the buffer is read.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so a closure captures the `Sync` wrapper, not the raw pointer field.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests;
