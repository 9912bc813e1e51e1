//! The CPU attention row kernel for f32 caches whose `head_dim` is a multiple of 8, written
//! with AVX2 + FMA intrinsics: the portable loop in the parent keeps each head's 64 partial
//! sums in memory and reduces every score horizontally, and ran at ~10 % of memory bandwidth.
//!
//! - Scores: 8 keys at a time, one 8-lane accumulator per key, then one horizontal reduction
//!   of all 8 (`hsum8`), so a score costs `head_dim / 8` FMAs and an eighth of a reduction.
//! - Weighted sum of V: each head's output columns (up to 64 at a time) stay in registers
//!   while the keys stream through.
//! - Keys go in chunks of [`KEY_CHUNK`], every head of the group over one chunk before the
//!   next, so the group reads each K and V row from memory once and from L1 after that.
//! - With AVX-512 (`Rows::wide`), heads of the group go through both passes together, up to
//!   three at a time ([`dot_rows_heads`], [`weighted_sum_512_heads`]): each K or V load then feeds
//!   every head's multiply-adds, and there are enough independent accumulators to keep both
//!   FMA ports busy (one head's 64 columns are only four 16-lane chains, half the FMA rate).
//!   Each score and each output column is still the same chain of FMAs in the same order,
//!   so the bits do not change with the tiling, the level, or what else is in the batch.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Keys per chunk: K or V rows of a chunk (64 × 256 B at head_dim 64) stay in L1 while every
/// head of the group passes over them.
const KEY_CHUNK: usize = 64;

/// One task: some query heads sharing a KV head, against visible keys given by row offsets.
pub(super) struct Rows<'a> {
    /// `group` query rows of `head_dim`, one per head.
    pub q_rows: &'a [f32],
    pub head_dim: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Offset in `k` and `v` of each visible key's row, in position order.
    pub offsets: &'a [usize],
    pub scale: f32,
    pub softcap: Option<f32>,
    /// The weighted sum of V may take AVX-512F and heads may go through together (the same
    /// bits: each score and each output column is the same FMA chain over the same operands);
    /// only where [`wide_usable`] said yes.
    pub wide: bool,
}

/// Heads of a group that go through the passes together (24 of the 32 registers for scores).
const HEADS_TILE: usize = 3;

/// Whether the weighted sum of V can run 16 columns a register: AVX-512F present (at the
/// process's SIMD level) and `head_dim` a multiple of 16.
pub(super) fn wide_usable(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::ops::simd::level() >= crate::ops::simd::SimdLevel::Avx512
            && head_dim.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// Whether this CPU and these shapes can take [`attend`].
pub(super) fn usable(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim > 0
            && head_dim.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// Attends every query row of `job` and writes `out_rows` (`group × head_dim`). `scores` and
/// `inv_sums` are scratch. Panics (before any read) if an offset leaves `k` or `v`; call only where
/// [`usable`] said yes.
#[cfg(target_arch = "x86_64")]
pub(super) fn attend(job: &Rows<'_>, scores: &mut Vec<f32>, inv_sums: &mut Vec<f32>, out_rows: &mut [f32]) {
    let hd = job.head_dim;
    assert!(
        usable(hd),
        "invariant: the AVX2 attention kernel needs AVX2, FMA and a head_dim that is a multiple of 8"
    );
    let group = job.q_rows.len() / hd;
    assert_eq!(group * hd, job.q_rows.len());
    assert_eq!(out_rows.len(), job.q_rows.len());
    let end = job.offsets.iter().max().map_or(0, |&o| o + hd);
    assert!(end <= job.k.len() && end <= job.v.len(), "attention row offsets leave the cache");
    assert!(
        !job.wide || wide_usable(hd),
        "invariant: the wide weighted sum needs AVX-512F and head_dim % 16 == 0"
    );
    // SAFETY: AVX2 and FMA are present (`usable`); every row read is `offset..offset + hd`,
    // inside `k` and `v` (checked just above); q, scores and out are indexed within their
    // lengths (group × hd, group × n, group × hd).
    unsafe { attend_avx2(job, group, scores, inv_sums, out_rows) }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn attend(_: &Rows<'_>, _: &mut Vec<f32>, _: &mut Vec<f32>, _: &mut [f32]) {
    unreachable!("invariant: `usable` is false off x86_64")
}

/// # Safety
/// AVX2 and FMA present; `head_dim` a multiple of 8; every offset's row inside `k` and `v`;
/// `q_rows` and `out_rows` of `group × head_dim`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    job: &Rows<'_>,
    group: usize,
    scores: &mut Vec<f32>,
    inv_sums: &mut Vec<f32>,
    out_rows: &mut [f32],
) {
    let hd = job.head_dim;
    let n = job.offsets.len();
    scores.clear();
    scores.resize(group * n, 0.0);
    let tile = if job.wide { HEADS_TILE } else { 1 };
    for start in (0..n).step_by(KEY_CHUNK) {
        let offsets = &job.offsets[start..n.min(start + KEY_CHUNK)];
        let mut g = 0;
        while g < group {
            let heads = (group - g).min(tile);
            let q = &job.q_rows[g * hd..(g + heads) * hd];
            let at = ScoreRows { scores: &mut scores[..], n, first_head: g, start };
            // SAFETY: forwarded from `attend_avx2`'s contract; several heads only where `wide`
            // (AVX-512F and VL present, checked in `attend`).
            unsafe {
                match heads {
                    3 => dot_rows_heads::<3>(q, job.k, offsets, job.scale, at),
                    2 => dot_rows_heads::<2>(q, job.k, offsets, job.scale, at),
                    _ => {
                        let out = &mut scores[g * n + start..g * n + start + offsets.len()];
                        dot_rows(q, job.k, offsets, job.scale, out)
                    }
                }
            };
            g += heads;
        }
    }
    // Softmax per head; each head's sum's reciprocal scales its output at the end.
    inv_sums.clear();
    inv_sums.resize(group, 0.0);
    for (g, inv_sum) in inv_sums.iter_mut().enumerate() {
        let row = &mut scores[g * n..(g + 1) * n];
        *inv_sum = softmax(row, job.softcap);
    }
    out_rows.fill(0.0);
    // Heads that go through the weighted sum together: all 16W accumulators of each in
    // registers beside the W loaded V vectors.
    let pv_tile = match hd / 16 {
        _ if !job.wide => 1,
        1..=4 => 3,
        5..=8 => 2,
        _ => 1,
    };
    for start in (0..n).step_by(KEY_CHUNK) {
        let end = n.min(start + KEY_CHUNK);
        let offsets = &job.offsets[start..end];
        let mut g = 0;
        while g < group {
            let heads = (group - g).min(pv_tile);
            let p = |h: usize| &scores[(g + h) * n + start..(g + h) * n + end];
            let out = &mut out_rows[g * hd..(g + heads) * hd];
            // SAFETY: forwarded from `attend_avx2`'s contract; `wide` (and so several heads)
            // only where AVX-512F and VL are present and head_dim is a multiple of 16 (checked
            // in `attend`); up to 128 columns for two heads, 64 for three (`pv_tile`).
            unsafe {
                match heads {
                    3 => weighted_sum_512_heads::<3>([p(0), p(1), p(2)], job.v, offsets, 0, out),
                    2 => weighted_sum_512_heads::<2>([p(0), p(1)], job.v, offsets, 0, out),
                    _ if job.wide => weighted_sum_512(p(0), job.v, offsets, out),
                    _ => weighted_sum(p(0), job.v, offsets, out),
                }
            };
            g += heads;
        }
    }
    normalize(out_rows, inv_sums, hd);
}

/// Consecutive query positions of one sequence against one KV head (a prefill's tile): their
/// rows, token-major then head, all against the keys of the last one; row `i` sees the first
/// `visible[i]` of them (causal). AVX-512 only ([`wide_usable`]).
pub(super) struct Tile<'a> {
    /// `visible.len()` rows of `head_dim`.
    pub q_rows: &'a [f32],
    pub head_dim: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Offset of each key's row, for the most any row sees.
    pub offsets: &'a [usize],
    /// Keys each row sees, not decreasing, each at least 1.
    pub visible: &'a [usize],
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// [`attend`] for a [`Tile`]: each K and V chunk is read from memory once for every row of
/// every token of the tile, instead of once per token. Every row gets the bits [`attend`] gives
/// it alone over its own keys: the same FMA chain per score (a score's key in a full group of 8
/// of the row's own keys goes through the grouped reduction, one in its last, partial group
/// through the serial one, as there), the same softmax over the row's own scores, and the
/// same FMA chain per output column over the row's own keys. Panics (before any read) if an
/// offset leaves `k` or `v`, or AVX-512 cannot run.
#[cfg(target_arch = "x86_64")]
pub(super) fn attend_tile(
    tile: &Tile<'_>,
    scores: &mut Vec<f32>,
    inv_sums: &mut Vec<f32>,
    out_rows: &mut [f32],
) {
    let hd = tile.head_dim;
    assert!(usable(hd) && wide_usable(hd), "invariant: a tile needs AVX-512F/VL and head_dim % 16 == 0");
    let rows = tile.visible.len();
    assert_eq!(tile.q_rows.len(), rows * hd);
    assert_eq!(out_rows.len(), rows * hd);
    let n = tile.offsets.len();
    assert!(
        tile.visible.windows(2).all(|w| w[0] <= w[1]) && tile.visible.iter().all(|&m| (1..=n).contains(&m))
    );
    let end = tile.offsets.iter().max().map_or(0, |&o| o + hd);
    assert!(end <= tile.k.len() && end <= tile.v.len(), "attention row offsets leave the cache");
    // SAFETY: AVX2, FMA, AVX-512F and VL present (asserted); every row read is `offset..offset
    // + hd`, inside `k` and `v` (checked just above); q, scores and out are indexed within
    // their lengths (rows × hd, rows × n, rows × hd); each row's keys are within `offsets`.
    unsafe { attend_tile_512(tile, scores, inv_sums, out_rows) }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn attend_tile(_: &Tile<'_>, _: &mut Vec<f32>, _: &mut Vec<f32>, _: &mut [f32]) {
    unreachable!("invariant: `wide_usable` is false off x86_64")
}

/// # Safety
/// As [`attend_tile`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn attend_tile_512(
    tile: &Tile<'_>,
    scores: &mut Vec<f32>,
    inv_sums: &mut Vec<f32>,
    out_rows: &mut [f32],
) {
    let hd = tile.head_dim;
    let (rows, n) = (tile.visible.len(), tile.offsets.len());
    scores.clear();
    scores.resize(rows * n, 0.0);
    for start in (0..n).step_by(KEY_CHUNK) {
        let offsets = &tile.offsets[start..n.min(start + KEY_CHUNK)];
        // Rows that see none of this chunk skip it (the tile's first tokens, at its end).
        let mut row = tile.visible.partition_point(|&m| m <= start);
        while row < rows {
            let heads = (rows - row).min(HEADS_TILE);
            let q = &tile.q_rows[row * hd..(row + heads) * hd];
            let at = ScoreRows { scores: &mut scores[..], n, first_head: row, start };
            // SAFETY: forwarded.
            unsafe {
                match heads {
                    3 => dot_rows_heads::<3>(q, tile.k, offsets, tile.scale, at),
                    2 => dot_rows_heads::<2>(q, tile.k, offsets, tile.scale, at),
                    _ => dot_rows(
                        q,
                        tile.k,
                        offsets,
                        tile.scale,
                        &mut scores[row * n + start..row * n + start + offsets.len()],
                    ),
                }
            }
            row += heads;
        }
    }
    inv_sums.clear();
    inv_sums.resize(rows, 0.0);
    for (r, inv_sum) in inv_sums.iter_mut().enumerate() {
        let m = tile.visible[r];
        // The keys of the row's last, partial group of 8: the serial reduction, as alone.
        let tail = m - m % 8;
        if tail < m {
            let q = &tile.q_rows[r * hd..(r + 1) * hd];
            // SAFETY: forwarded; fewer than 8 offsets take `dot_rows`'s serial path.
            unsafe {
                dot_rows(q, tile.k, &tile.offsets[tail..m], tile.scale, &mut scores[r * n + tail..r * n + m])
            };
        }
        let row = &mut scores[r * n..r * n + m];
        *inv_sum = softmax(row, tile.softcap);
    }
    out_rows.fill(0.0);
    let pv_tile = if hd / 16 <= 4 {
        3
    } else if hd / 16 <= 8 {
        2
    } else {
        1
    };
    for start in (0..n).step_by(KEY_CHUNK) {
        let end = n.min(start + KEY_CHUNK);
        let mut row = tile.visible.partition_point(|&m| m <= start);
        while row < rows {
            let heads = (rows - row).min(pv_tile);
            // Keys every row of the group sees in this chunk, then each row's own further ones.
            let common = end.min(tile.visible[row]);
            let offsets = &tile.offsets[start..common];
            let p = |h: usize| &scores[(row + h) * n + start..(row + h) * n + common];
            let out = &mut out_rows[row * hd..(row + heads) * hd];
            // SAFETY: forwarded; up to 64 columns for three rows, 128 for two (`pv_tile`).
            unsafe {
                match heads {
                    3 => weighted_sum_512_heads::<3>([p(0), p(1), p(2)], tile.v, offsets, 0, out),
                    2 => weighted_sum_512_heads::<2>([p(0), p(1)], tile.v, offsets, 0, out),
                    _ => weighted_sum_512(p(0), tile.v, offsets, out),
                }
            }
            for h in 0..heads {
                let own = end.min(tile.visible[row + h]);
                if own > common {
                    let p = &scores[(row + h) * n + common..(row + h) * n + own];
                    let out = &mut out_rows[(row + h) * hd..(row + h + 1) * hd];
                    // SAFETY: forwarded.
                    unsafe { weighted_sum_512(p, tile.v, &tile.offsets[common..own], out) };
                }
            }
            row += heads;
        }
    }
    normalize(out_rows, inv_sums, hd);
}

/// `row`'s scores become their softmax's numerators (after the soft cap, if any), in place;
/// returns the reciprocal of their sum, which scales the row's output at the end.
#[inline]
fn softmax(row: &mut [f32], softcap: Option<f32>) -> f32 {
    if let Some(cap) = softcap {
        for s in row.iter_mut() {
            *s = cap * (*s / cap).tanh();
        }
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in row.iter_mut() {
        *s = crate::ops::math::exp_nonpositive(*s - max);
    }
    1.0 / super::cpu::lane_sum(row)
}

/// Each `head_dim` row of `out_rows` times its softmax's reciprocal sum.
#[inline]
fn normalize(out_rows: &mut [f32], inv_sums: &[f32], head_dim: usize) {
    for (out, inv_sum) in out_rows.chunks_exact_mut(head_dim).zip(inv_sums) {
        for o in out {
            *o *= inv_sum;
        }
    }
}

/// `out[i] = scale · (q · k[offsets[i]..][..q.len()])`.
///
/// # Safety
/// AVX2 and FMA present; `q.len()` a multiple of 8; every `offset + q.len() <= k.len()`;
/// `out.len() == offsets.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows(q: &[f32], k: &[f32], offsets: &[usize], scale: f32, out: &mut [f32]) {
    let lanes = q.len() / 8;
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let scale8 = _mm256_set1_ps(scale);
    let mut eights = offsets.chunks_exact(8);
    let mut i = 0;
    for rows in eights.by_ref() {
        // SAFETY (every pointer below): rows[j] + 8c + 8 <= rows[j] + q.len() <= k.len(), and
        // 8c + 8 <= q.len(), by the caller's contract.
        let r: [*const f32; 8] = std::array::from_fn(|j| unsafe { kp.add(rows[j]) });
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..lanes {
            let qv = unsafe { _mm256_loadu_ps(qp.add(c * 8)) };
            for (a, row) in acc.iter_mut().zip(&r) {
                *a = _mm256_fmadd_ps(qv, unsafe { _mm256_loadu_ps(row.add(c * 8)) }, *a);
            }
        }
        let mut sums = [0f32; 8];
        // SAFETY: 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_mul_ps(hsum8(acc), scale8)) };
        out[i..i + 8].copy_from_slice(&sums);
        i += 8;
    }
    for (o, &row) in out[i..].iter_mut().zip(eights.remainder()) {
        let mut acc = _mm256_setzero_ps();
        for c in 0..lanes {
            // SAFETY: as above.
            let (qv, kv) = unsafe { (_mm256_loadu_ps(qp.add(c * 8)), _mm256_loadu_ps(kp.add(row + c * 8))) };
            acc = _mm256_fmadd_ps(qv, kv, acc);
        }
        let mut lanes8 = [0f32; 8];
        // SAFETY: 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(lanes8.as_mut_ptr(), acc) };
        *o = lanes8.iter().sum::<f32>() * scale;
    }
}

/// Where [`dot_rows_heads`] writes: head `h`'s scores go to `scores[(first_head + h) · n +
/// start..]`.
struct ScoreRows<'a> {
    scores: &'a mut [f32],
    n: usize,
    first_head: usize,
    start: usize,
}

/// [`dot_rows`] for `H` heads at once (`q`: `H` rows of `head_dim`): each K load feeds every
/// head's FMA. Per score the same FMA chain over the same 8-lane partial sums, the same
/// horizontal reduction and scaling: the same bits as `H` calls of [`dot_rows`].
///
/// # Safety
/// AVX2, FMA, AVX-512F and AVX-512VL present; `q.len()` is `H` times a multiple of 8; every
/// `offset + q.len() / H <= k.len()`; `out` holds `(first_head + H) · n` scores and `start +
/// offsets.len() <= n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn dot_rows_heads<const H: usize>(
    q: &[f32],
    k: &[f32],
    offsets: &[usize],
    scale: f32,
    out: ScoreRows<'_>,
) {
    let hd = q.len() / H;
    let lanes = hd / 8;
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let scale8 = _mm256_set1_ps(scale);
    let row_of = |h: usize| (out.first_head + h) * out.n + out.start;
    let mut eights = offsets.chunks_exact(8);
    let mut i = 0;
    for rows in eights.by_ref() {
        // SAFETY (every pointer below): rows[j] + 8c + 8 <= rows[j] + hd <= k.len(), and
        // h·hd + 8c + 8 <= q.len(), by the caller's contract.
        let r: [*const f32; 8] = std::array::from_fn(|j| unsafe { kp.add(rows[j]) });
        let mut acc = [[_mm256_setzero_ps(); 8]; H];
        for c in 0..lanes {
            let qv: [__m256; H] = std::array::from_fn(|h| unsafe { _mm256_loadu_ps(qp.add(h * hd + c * 8)) });
            for (j, row) in r.iter().enumerate() {
                let kv = unsafe { _mm256_loadu_ps(row.add(c * 8)) };
                for h in 0..H {
                    acc[h][j] = _mm256_fmadd_ps(qv[h], kv, acc[h][j]);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            let at = row_of(h) + i;
            let dst = &mut out.scores[at..at + 8];
            // SAFETY: 8 floats into an 8-float slice.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_mul_ps(hsum8(*a), scale8)) };
        }
        i += 8;
    }
    for (j, &row) in eights.remainder().iter().enumerate() {
        for h in 0..H {
            let mut acc = _mm256_setzero_ps();
            for c in 0..lanes {
                // SAFETY: as above.
                let (qv, kv) = unsafe {
                    (_mm256_loadu_ps(qp.add(h * hd + c * 8)), _mm256_loadu_ps(kp.add(row + c * 8)))
                };
                acc = _mm256_fmadd_ps(qv, kv, acc);
            }
            let mut lanes8 = [0f32; 8];
            // SAFETY: 8 floats into an 8-float array.
            unsafe { _mm256_storeu_ps(lanes8.as_mut_ptr(), acc) };
            out.scores[row_of(h) + i + j] = lanes8.iter().sum::<f32>() * scale;
        }
    }
}

/// The 8 horizontal sums of `a[0..8]`, as lanes 0..8 of one vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn hsum8(a: [__m256; 8]) -> __m256 {
    // hadd adds neighbours within each 128-bit half. After two rounds u0's low half holds the
    // sums of a[0..4]'s low halves, its high half those of their high halves; u1 the same for
    // a[4..8]. Regrouping the halves and adding gives the 8 totals in order.
    let t01 = _mm256_hadd_ps(a[0], a[1]);
    let t23 = _mm256_hadd_ps(a[2], a[3]);
    let t45 = _mm256_hadd_ps(a[4], a[5]);
    let t67 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t01, t23);
    let u1 = _mm256_hadd_ps(t45, t67);
    let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
    let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
    _mm256_add_ps(lo, hi)
}

/// `out += Σ_i p[i] · v[offsets[i]..][..out.len()]`, 64 columns at a time in registers.
///
/// # Safety
/// AVX2 and FMA present; `out.len()` a multiple of 8; every `offset + out.len() <= v.len()`;
/// `p.len() == offsets.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum(p: &[f32], v: &[f32], offsets: &[usize], out: &mut [f32]) {
    let hd = out.len();
    for col in (0..hd).step_by(64) {
        let out = &mut out[col..hd.min(col + 64)];
        // SAFETY: forwarded, with `col + out.len() <= hd`.
        unsafe {
            match out.len() / 8 {
                1 => columns::<1>(p, v, offsets, col, out),
                2 => columns::<2>(p, v, offsets, col, out),
                3 => columns::<3>(p, v, offsets, col, out),
                4 => columns::<4>(p, v, offsets, col, out),
                5 => columns::<5>(p, v, offsets, col, out),
                6 => columns::<6>(p, v, offsets, col, out),
                7 => columns::<7>(p, v, offsets, col, out),
                8 => columns::<8>(p, v, offsets, col, out),
                n => unreachable!("invariant: 1..=8 vectors of columns (head_dim a multiple of 8), not {n}"),
            }
        }
    }
}

/// `out` (`8·W` columns, from column `col` of the rows) `+= Σ_i p[i] · v row i`.
///
/// # Safety
/// AVX2 and FMA present; `out.len() == 8 * W`; every `offset + col + 8W <= v.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns<const W: usize>(p: &[f32], v: &[f32], offsets: &[usize], col: usize, out: &mut [f32]) {
    let op = out.as_mut_ptr();
    // SAFETY (every pointer below): out holds 8W floats; v rows by the caller's contract.
    let mut acc: [__m256; W] = std::array::from_fn(|w| unsafe { _mm256_loadu_ps(op.add(w * 8)) });
    for (&pi, &row) in p.iter().zip(offsets) {
        let pv = _mm256_set1_ps(pi);
        let r = unsafe { v.as_ptr().add(row + col) };
        for (w, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pv, unsafe { _mm256_loadu_ps(r.add(w * 8)) }, *a);
        }
    }
    for (w, a) in acc.iter().enumerate() {
        unsafe { _mm256_storeu_ps(op.add(w * 8), *a) };
    }
}

/// [`weighted_sum`] 16 columns a register, up to 128 columns at a time: per column the same
/// fused multiply-adds in the same key order, so the same bits, with half the loads.
///
/// # Safety
/// AVX-512F present; `out.len()` a multiple of 16; every `offset + out.len() <= v.len()`;
/// `p.len() == offsets.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_512(p: &[f32], v: &[f32], offsets: &[usize], out: &mut [f32]) {
    let hd = out.len();
    for col in (0..hd).step_by(128) {
        // SAFETY: forwarded, with `col + pass width <= hd`: one head of at most 128 columns.
        unsafe { weighted_sum_512_heads::<1>([p], v, offsets, col, &mut out[col..hd.min(col + 128)]) };
    }
}

/// [`weighted_sum_512`] for `H` heads at once (`out`: `H` rows of at most 128 columns, from
/// column `col` of the V rows; `p[h]` head `h`'s weights): each V load feeds every head's FMA.
/// Per column the same FMAs in the same key order: the same bits as `H` calls of
/// [`weighted_sum_512`].
///
/// # Safety
/// AVX-512F present; `out.len()` is `H` times a multiple of 16, at most `H · 128`; every
/// `offset + col + out.len() / H <= v.len()`; each `p[h].len() == offsets.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_512_heads<const H: usize>(
    p: [&[f32]; H],
    v: &[f32],
    offsets: &[usize],
    col: usize,
    out: &mut [f32],
) {
    let width = out.len() / H;
    // SAFETY: forwarded.
    unsafe {
        match width / 16 {
            1 => columns_512::<1, H>(p, v, offsets, col, out),
            2 => columns_512::<2, H>(p, v, offsets, col, out),
            3 => columns_512::<3, H>(p, v, offsets, col, out),
            4 => columns_512::<4, H>(p, v, offsets, col, out),
            5 => columns_512::<5, H>(p, v, offsets, col, out),
            6 => columns_512::<6, H>(p, v, offsets, col, out),
            7 => columns_512::<7, H>(p, v, offsets, col, out),
            8 => columns_512::<8, H>(p, v, offsets, col, out),
            n => unreachable!("invariant: 1..=8 vectors of columns per head, not {n}"),
        }
    }
}

/// `out` (`H` rows of `16·W` columns, from column `col` of the V rows) `+= Σ_i p[h][i] · v row i`.
///
/// # Safety
/// AVX-512F present; `out.len() == H · 16W`; every `offset + col + 16W <= v.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns_512<const W: usize, const H: usize>(
    p: [&[f32]; H],
    v: &[f32],
    offsets: &[usize],
    col: usize,
    out: &mut [f32],
) {
    let op = out.as_mut_ptr();
    // SAFETY (every pointer below): out holds H·16W floats; v rows by the caller's contract.
    let mut acc: [[__m512; W]; H] = std::array::from_fn(|h| {
        std::array::from_fn(|w| unsafe { _mm512_loadu_ps(op.add((h * W + w) * 16)) })
    });
    for (i, &row) in offsets.iter().enumerate() {
        let r = unsafe { v.as_ptr().add(row + col) };
        let vv: [__m512; W] = std::array::from_fn(|w| unsafe { _mm512_loadu_ps(r.add(w * 16)) });
        for h in 0..H {
            let pv = _mm512_set1_ps(p[h][i]);
            for w in 0..W {
                acc[h][w] = _mm512_fmadd_ps(pv, vv[w], acc[h][w]);
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (w, a) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(op.add((h * W + w) * 16), *a) };
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The AVX-512 weighted sum gives the AVX2 one's bits, at head sizes of one to eight
    /// registers and past one 128-column pass, from a nonzero start (a later key chunk).
    #[test]
    fn the_wide_weighted_sum_gives_the_same_bits() {
        if !(std::arch::is_x86_feature_detected!("avx512f") && usable(16)) {
            eprintln!("skipped: this CPU lacks AVX-512F (or AVX2), nothing to compare");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        for hd in [16, 48, 64, 128, 256] {
            let keys = 77;
            let v: Vec<f32> = (0..(keys + 3) * hd).map(|_| rng.random::<f32>() - 0.5).collect();
            let offsets: Vec<usize> = (0..keys).map(|i| ((i * 31) % (keys + 3)) * hd).collect();
            let p: Vec<f32> = (0..keys).map(|_| rng.random::<f32>()).collect();
            let start: Vec<f32> = (0..hd).map(|_| rng.random::<f32>()).collect();
            let (mut narrow, mut wide) = (start.clone(), start);
            // SAFETY: AVX2, FMA and AVX-512F present (checked above); hd a multiple of 16;
            // every offset + hd within v.
            unsafe {
                weighted_sum(&p, &v, &offsets, &mut narrow);
                weighted_sum_512(&p, &v, &offsets, &mut wide);
            }
            let same = narrow.iter().zip(&wide).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "head_dim {hd}: {narrow:?} vs {wide:?}");
        }
    }

    /// Heads of a group together give each head's bits alone: the scores (with a tail of
    /// fewer than 8 keys) and the weighted sums, for 2 and 3 heads at the head sizes they take.
    #[test]
    fn heads_together_give_each_heads_bits() {
        if !wide_usable(16) || !usable(16) {
            eprintln!("skipped: this CPU (or FERRITE_SIMD) lacks AVX-512F/VL, nothing to compare");
            return;
        }
        let mut rng = StdRng::seed_from_u64(9);
        for (hd, heads) in [(16, 3), (64, 3), (64, 2), (128, 2), (48, 3)] {
            let keys = 61;
            let k: Vec<f32> = (0..(keys + 2) * hd).map(|_| rng.random::<f32>() - 0.5).collect();
            let offsets: Vec<usize> = (0..keys).map(|i| ((i * 17) % (keys + 2)) * hd).collect();
            let q: Vec<f32> = (0..heads * hd).map(|_| rng.random::<f32>() - 0.5).collect();
            let n = keys + 5;
            let (mut alone, mut together) = (vec![0f32; heads * n], vec![0f32; heads * n]);
            let p: Vec<Vec<f32>> =
                (0..heads).map(|_| (0..keys).map(|_| rng.random::<f32>()).collect()).collect();
            let start: Vec<f32> = (0..heads * hd).map(|_| rng.random::<f32>()).collect();
            let (mut sum_alone, mut sum_together) = (start.clone(), start);
            // SAFETY: AVX2, FMA, AVX-512F and VL present (checked above); hd a multiple of
            // 16; every offset + hd within k; scores of heads × n with 5 + keys <= n.
            unsafe {
                for h in 0..heads {
                    let out = &mut alone[h * n + 5..h * n + 5 + keys];
                    dot_rows(&q[h * hd..(h + 1) * hd], &k, &offsets, 0.125, out);
                    weighted_sum_512(&p[h], &k, &offsets, &mut sum_alone[h * hd..(h + 1) * hd]);
                }
                let at = ScoreRows { scores: &mut together, n, first_head: 0, start: 5 };
                match heads {
                    3 => {
                        dot_rows_heads::<3>(&q, &k, &offsets, 0.125, at);
                        weighted_sum_512_heads::<3>(
                            [&p[0], &p[1], &p[2]],
                            &k,
                            &offsets,
                            0,
                            &mut sum_together,
                        );
                    }
                    _ => {
                        dot_rows_heads::<2>(&q, &k, &offsets, 0.125, at);
                        weighted_sum_512_heads::<2>([&p[0], &p[1]], &k, &offsets, 0, &mut sum_together);
                    }
                }
            }
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&alone, &together), "scores, head_dim {hd}, {heads} heads");
            assert!(same(&sum_alone, &sum_together), "weighted sums, head_dim {hd}, {heads} heads");
        }
    }
}
