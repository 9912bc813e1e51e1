//! A decoder layer's products alone, at Qwen2.5-0.5B's shapes (hidden 896, MLP 4864, q/k/v
//! 896 + 2 × 128, vocabulary 151,936), for 1, 16 and 256 tokens; and what one small candle op
//! costs the host. Criterion's throughput for a product is the weight bytes it must read, so at
//! one token "thrpt" is the achieved bandwidth against the memory's.
//!
//! `cargo bench -p ferrite-engine --bench linear` runs it on the CPU in f32 (packed weights).
//! Built with `--features cuda` and run with `FERRITE_BENCH_DEVICE=cuda` it runs candle's cuBLAS
//! products in bf16, synchronized after each call (scripts/gpu-check.sh does this on a GPU
//! machine). A GPU batch-1 decode step takes ~150 µs per layer where its weights read in
//! ~10 µs: this tells whether the products (cuBLAS at M = 1) or the host's per-op cost is
//! where the rest goes.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::ops::linear::Linear;

/// (name, in, out) of the products of one layer, and the LM head.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 896, 1152),
    ("o", 896, 896),
    ("gate_up", 896, 9728),
    ("down", 4864, 896),
    ("lm_head", 896, 151_936),
];
const TOKENS: [usize; 3] = [1, 16, 256];
/// Small ops issued per measured iteration of the host-cost bench (one synchronize at the end).
const SMALL_OPS: usize = 100;

fn products(c: &mut Criterion) {
    let (dev, dtype) = device();
    let mut group =
        c.benchmark_group(format!("linear-{}-{dtype:?}", if dev.is_cuda() { "cuda" } else { "cpu" }));
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for (name, k, n) in SHAPES {
        let weight = (Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).expect("weight"))
            .to_dtype(dtype)
            .and_then(|w| w.to_device(&dev))
            .expect("weight on the device");
        let linear = Linear::new(weight, None, dtype).expect("linear");
        group.throughput(Throughput::Bytes((n * k * dtype.size_in_bytes()) as u64));
        for tokens in TOKENS {
            let x = Tensor::randn(0f32, 1.0, (tokens, k), &Device::Cpu)
                .and_then(|x| x.to_dtype(dtype))
                .and_then(|x| x.to_device(&dev))
                .expect("input");
            group.bench_function(format!("{name} {tokens} x {k} -> {n}"), |b| {
                b.iter(|| {
                    let y = linear.forward(black_box(&x)).expect("product");
                    dev.synchronize().expect("synchronize");
                    y
                })
            });
        }
    }
    group.finish();
}

/// [`SMALL_OPS`] adds of two 896-element rows, then one synchronize: on a GPU, the host's cost
/// of issuing one candle op (the kernels themselves take a few µs in all).
fn host_cost(c: &mut Criterion) {
    let (dev, dtype) = device();
    let mut group = c.benchmark_group(format!("small-ops-{}", if dev.is_cuda() { "cuda" } else { "cpu" }));
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let row = |seed: f32| {
        Tensor::full(seed, (1, 896), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&dev))
            .expect("row")
    };
    let (a, b) = (row(1.0), row(2.0));
    group.throughput(Throughput::Elements(SMALL_OPS as u64));
    group.bench_function(format!("{SMALL_OPS} adds of 896 elements"), |bench| {
        bench.iter(|| {
            let mut x = a.clone();
            for _ in 0..SMALL_OPS {
                x = (&x + black_box(&b)).expect("add");
            }
            dev.synchronize().expect("synchronize");
            x
        })
    });
    group.finish();
}

criterion_group!(benches, products, host_cost);
criterion_main!(benches);
