//! The CPU's block-panel products (GGUF Q8_0 and Q4_0 weights: one f16 scale per 32 values)
//! at SmolLM2-135M's MLP shapes: decode (1 token, where panels run side by side) and prefill
//! (128 tokens). Throughput is the weights' bytes as the file holds them (34 or 18 per 32), so
//! a decode figure reads against the machine's memory bandwidth.
//!
//! `cargo bench -p ferrite-engine --bench blocks`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::ops::blocks::BlockPanels;
use ferrite_engine::ops::quantized::QuantizedMatrix;

/// (tokens, k, n): the MLP's up projection at decode and prefill, and its down at decode.
const SHAPES: [(usize, usize, usize); 3] = [(1, 576, 1536), (1, 1536, 576), (128, 576, 1536)];

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
        for (dtype, per_32) in [(GgmlDType::Q8_0, 34), (GgmlDType::Q4_0, 18)] {
            let q = QuantizedMatrix::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap();
            let panels = BlockPanels::from_quantized(&q).unwrap().unwrap();
            g.throughput(Throughput::Bytes((n * k / 32 * per_32) as u64));
            g.bench_function(format!("{tokens}x{k}x{n} {dtype:?}"), |b| {
                b.iter(|| black_box(panels.matmul(black_box(&x), tokens)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
