//! The CPU's packed products by SIMD level (AVX2 against AVX-512 in the same run, on the
//! same panels), at SmolLM2-135M's MLP shapes for 1, 128, 512 and 2,048 tokens, over f32 and
//! bf16 weights, and bf16 weights paired for AVX-512 BF16's dot products (`bf16-dots`,
//! `--bf16-activations`) where the CPU has them; and each level's fused multiply-add peak on
//! the same threads (and `vdpbf16ps`'s), measured, so a product's GFLOP/s can be read against
//! what its instructions allow.
//!
//! `cargo bench -p ferrite-engine --bench packed` (threads: RAYON_NUM_THREADS, default all
//! cores). Throughput is FLOPs (2 · tokens · k · n), shown as elements/s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::ops::packed::{dots_available, Bf16Products, PackedMatrix};
use ferrite_engine::ops::simd::{self, SimdLevel};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// (tokens, k, n): the MLP's up projection at decode and prefill sizes, and its down.
const SHAPES: [(usize, usize, usize); 5] =
    [(1, 576, 1536), (128, 576, 1536), (512, 576, 1536), (2048, 576, 1536), (512, 1536, 576)];

fn levels() -> Vec<SimdLevel> {
    SimdLevel::all().iter().copied().filter(|&l| l != SimdLevel::Baseline && l <= simd::detected()).collect()
}

fn products(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut g = c.benchmark_group("packed");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for (tokens, k, n) in SHAPES {
        let w: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>() - 0.5).collect();
        let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let x: Vec<f32> = (0..tokens * k).map(|_| rng.random::<f32>() - 0.5).collect();
        g.throughput(Throughput::Elements((2 * tokens * k * n) as u64));
        for (dtype, packed) in
            [("f32", PackedMatrix::pack(&w, n, k)), ("bf16", PackedMatrix::pack(&w_bf16, n, k))]
        {
            for level in levels() {
                g.bench_function(format!("{tokens}x{k}x{n} {dtype} {}", level.name()), |b| {
                    b.iter(|| black_box(packed.matmul_with(black_box(&x), tokens, level)))
                });
            }
        }
        if dots_available() {
            let paired = PackedMatrix::pack(&w_bf16, n, k).for_products(Bf16Products::Dots);
            g.bench_function(format!("{tokens}x{k}x{n} bf16-dots"), |b| {
                b.iter(|| black_box(paired.matmul(black_box(&x), tokens)))
            });
        }
    }
    g.finish();
}

/// Independent fused multiply-add chains on every pool thread: the level's compute peak.
fn fma_peak(c: &mut Criterion) {
    const ITERS: usize = 1_000_000;
    let threads = rayon::current_num_threads();
    let mut g = c.benchmark_group("fma-peak");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for level in levels() {
        let Some((flops_per_iter, chains)) = peak_kernel(level) else { continue };
        g.throughput(Throughput::Elements((flops_per_iter * ITERS * threads) as u64));
        g.bench_function(format!("{} x {threads} threads", level.name()), |b| {
            b.iter(|| (0..threads).into_par_iter().map(|_| chains(black_box(ITERS))).sum::<f32>())
        });
    }
    #[cfg(target_arch = "x86_64")]
    if dots_available() {
        // 24 chains of 16 lanes, 2 products (4 FLOPs) each.
        g.throughput(Throughput::Elements((24 * 16 * 4 * ITERS * threads) as u64));
        g.bench_function(format!("bf16-dots x {threads} threads"), |b| {
            // SAFETY: dots_available saw AVX-512 BF16.
            b.iter(|| {
                (0..threads)
                    .into_par_iter()
                    .map(|_| unsafe { x86::chains_bf16(black_box(ITERS)) })
                    .sum::<f32>()
            })
        });
    }
    g.finish();
}

/// `n` iterations of independent multiply-add chains.
type Chains = fn(usize) -> f32;

/// FLOPs per iteration and the loop, for the levels with fused multiply-adds.
fn peak_kernel(level: SimdLevel) -> Option<(usize, Chains)> {
    match level {
        #[cfg(target_arch = "x86_64")]
        // 12 chains of 8 lanes, 2 FLOPs each. SAFETY: only levels this CPU has are asked for.
        SimdLevel::Avx2 => Some((12 * 8 * 2, |n| unsafe { x86::chains_avx2(n) })),
        #[cfg(target_arch = "x86_64")]
        // 24 chains of 16 lanes. SAFETY: as above.
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni | SimdLevel::Amx => {
            Some((24 * 16 * 2, |n| unsafe { x86::chains_avx512(n) }))
        }
        _ => None,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA are present (the bench runs levels `simd::detected` allows).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_avx2(n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 12];
        let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-3));
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut out = [0f32; 8];
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// # Safety
    /// AVX-512F is present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_avx512(n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-3));
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)))
    }

    /// # Safety
    /// AVX-512F and AVX-512 BF16 are present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn chains_bf16(n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let (a, b) = (
            _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25)),
            _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3)),
        );
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)))
    }
}

criterion_group!(benches, fma_peak, products);
criterion_main!(benches);
