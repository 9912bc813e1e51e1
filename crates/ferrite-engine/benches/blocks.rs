//! The CPU's block-panel products (GGUF Q8_0, Q5_0, Q4_0 and the K-quants Q4_K, Q5_K, Q6_K) at
//! SmolLM2-135M's MLP shapes: decode (1 token, where panels run side by side) and prefill (128
//! tokens); the K-quants only where rows are whole 256-blocks (the down projection), also
//! through candle's kernels ("candle"), which they replace; each also with int8 activations
//! ("int8": the same as exact below the VNNI level). Throughput is the weights' bytes as
//! the file holds them, so a decode figure reads against the machine's memory bandwidth.
//!
//! `cargo bench -p ferrite-engine --bench blocks`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::ops::blocks::BlockPanels;
use ferrite_engine::ops::quantized::{Activations, KQuants, QuantizedMatrix};

/// (tokens, k, n): the MLP's up and down projections at decode and prefill, the down
/// projection at a few streams' decode (4, 8, 16 tokens: where AMX takes over from VNNI), and
/// a decode product far larger than the cache (64–120 MB: read from memory, as a decode
/// step's are).
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 576, 1536),
    (1, 1536, 576),
    (4, 1536, 576),
    (8, 1536, 576),
    (16, 1536, 576),
    (128, 576, 1536),
    (128, 1536, 576),
    (1, 576, 196_608),
];

const FORMATS: [GgmlDType; 6] =
    [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

fn products(c: &mut Criterion) {
    let mut g = c.benchmark_group("blocks");
    g.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    for (tokens, k, n) in SHAPES {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (tokens, k), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xt = Tensor::from_vec(x.clone(), (tokens, k), &Device::Cpu).unwrap();
        for dtype in FORMATS {
            if k % dtype.block_size() != 0 {
                continue;
            }
            let q = QuantizedMatrix::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap();
            g.throughput(Throughput::Bytes((n * k / dtype.block_size() * dtype.type_size()) as u64));
            if let Some(panels) = BlockPanels::from_quantized(&q, KQuants::Exact).unwrap() {
                g.bench_function(format!("{tokens}x{k}x{n} {dtype:?}"), |b| {
                    b.iter(|| black_box(panels.matmul(black_box(&x), tokens)))
                });
                let int8 = panels.with_activations(Activations::Int8);
                g.bench_function(format!("{tokens}x{k}x{n} {dtype:?} int8"), |b| {
                    b.iter(|| black_box(int8.matmul(black_box(&x), tokens)))
                });
            }
            if dtype.block_size() == 256 {
                g.bench_function(format!("{tokens}x{k}x{n} {dtype:?} candle"), |b| {
                    b.iter(|| black_box(q.matmul(black_box(&xt)).unwrap()))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
