//! One decode step and one 512-token prefill of a SmolLM2-135M-shaped llama (random weights,
//! tied embeddings; computing in f32 over f32 weights, then over bf16 ones), plus this
//! machine's memory read bandwidth measured in the same run, which sets the floor for decode:
//! every weight byte is read once per step. Steps run on a rayon worker, as the engine runs
//! them.
//!
//! Then a mixture of experts against the dense model of the same active parameters
//! (`bench_moe`).
//!
//! `cargo bench --bench forward` (threads: RAYON_NUM_THREADS, default all cores);
//! `cargo bench --bench forward -- moe` for the mixture alone.

use std::hint::black_box;
use std::time::Duration;

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_model, smollm2_135m, smollm2_135m_moe, step_in_pool};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::forward_input::ForwardInput;
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::model::arch::CpuWeights;
use ferrite_engine::ops::linear::Linear;
use ferrite_engine::sched::{BlockAllocator, BlockId, ScheduledChunk};
use rayon::prelude::*;

/// A sequence with `context` tokens already cached, scheduled for `new` more.
struct Seq {
    tokens: Vec<u32>,
    table: Vec<BlockId>,
}

fn seq(alloc: &mut BlockAllocator, total: usize, block_size: usize) -> Seq {
    Seq {
        tokens: (0..total as u32).map(|t| (t * 7919) % 49152).collect(),
        table: alloc.allocate_n(total.div_ceil(block_size)).expect("blocks"),
    }
}

/// Prefill, decode and the floor's read for one weight dtype.
fn bench_model(
    c: &mut Criterion,
    cfg: &ferrite_engine::model::hf_config::ModelConfig,
    weights: CpuWeights,
    name: &str,
) {
    let (mut model, weight_bytes) = random_model(cfg, weights);
    let block_size = 16;
    let num_blocks = 128;
    let mut kv = KvCache::new(model.kv_cache_spec(), block_size, num_blocks, &Device::Cpu).expect("cache");
    let mut alloc = BlockAllocator::new(num_blocks);
    eprintln!("weights: {:.1} MB, linear ones {name}", weight_bytes as f64 / 1e6);

    let mut g = c.benchmark_group(format!("smollm2-135m-{name}-weights"));
    g.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(3));

    // Prefill: 512 prompt tokens in one step.
    let s = seq(&mut alloc, 512, block_size);
    let chunk = [ScheduledChunk {
        token_ids: &s.tokens,
        num_computed_tokens: 0,
        block_table: &s.table,
        all_logits: false,
        hidden: Default::default(),
    }];
    let input = ForwardInput::build(&chunk, block_size, &Device::Cpu).expect("input");
    g.throughput(Throughput::Elements(512));
    g.bench_function("prefill_512_tokens", |b| {
        b.iter(|| black_box(step_in_pool(model.as_mut(), &input, &mut kv)))
    });

    // Decode: one token at position 128 after a 128-token context (batch 1).
    let s = seq(&mut alloc, 129, block_size);
    let chunk = [ScheduledChunk {
        token_ids: &s.tokens[..128],
        num_computed_tokens: 0,
        block_table: &s.table,
        all_logits: false,
        hidden: Default::default(),
    }];
    model
        .forward(&ForwardInput::build(&chunk, block_size, &Device::Cpu).expect("input"), &mut kv)
        .expect("fwd");
    let chunk = [ScheduledChunk {
        token_ids: &s.tokens[128..],
        num_computed_tokens: 128,
        block_table: &s.table,
        all_logits: false,
        hidden: Default::default(),
    }];
    let input = ForwardInput::build(&chunk, block_size, &Device::Cpu).expect("input");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_1_token_ctx128", |b| {
        b.iter(|| black_box(step_in_pool(model.as_mut(), &input, &mut kv)))
    });

    // The floor's denominator: reading as many bytes as the weights, on all threads. An
    // integer wrapping sum vectorizes, so this measures memory, not an add-latency chain.
    let buf: Vec<u64> = (0..weight_bytes as u64 / 8).collect();
    g.throughput(Throughput::Bytes(weight_bytes as u64));
    g.bench_function("read_weight_bytes", |b| {
        b.iter(|| {
            let sum = buf
                .par_chunks(1 << 15)
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add);
            black_box(sum)
        })
    });
    g.finish();
}

/// `num_seqs` sequences of `context` cached tokens each, decoding one token each in one step.
fn decode_step(
    model: &mut dyn ferrite_engine::model::arch::Model,
    kv: &mut KvCache,
    alloc: &mut BlockAllocator,
    num_seqs: usize,
    context: usize,
) -> ForwardInput {
    let block_size = 16;
    let seqs: Vec<Seq> = (0..num_seqs)
        .map(|i| {
            let mut s = seq(alloc, context + 1, block_size);
            let len = s.tokens.len();
            s.tokens.rotate_left(i % len);
            s
        })
        .collect();
    let prefill: Vec<ScheduledChunk> = seqs
        .iter()
        .map(|s| ScheduledChunk {
            token_ids: &s.tokens[..context],
            num_computed_tokens: 0,
            block_table: &s.table,
            all_logits: false,
            hidden: Default::default(),
        })
        .collect();
    model.forward(&ForwardInput::build(&prefill, block_size, &Device::Cpu).expect("input"), kv).expect("fwd");
    let decode: Vec<ScheduledChunk> = seqs
        .iter()
        .map(|s| ScheduledChunk {
            token_ids: &s.tokens[context..],
            num_computed_tokens: context,
            block_table: &s.table,
            all_logits: false,
            hidden: Default::default(),
        })
        .collect();
    ForwardInput::build(&decode, block_size, &Device::Cpu).expect("input")
}

/// A mixture (8 experts of the SmolLM2-135M MLP, top 2) against the dense model with the same
/// parameters active per token (one MLP twice as wide), bf16 weights: decode steps of 1 and
/// of 64 sequences. At batch 1 both read the same bytes, so the difference is the routing;
/// at 64 the mixture reads every expert.
fn bench_moe(c: &mut Criterion) {
    let dense = ferrite_engine::model::hf_config::ModelConfig {
        intermediate_size: 2 * smollm2_135m().intermediate_size,
        ..smollm2_135m()
    };
    for (cfg, name) in [(dense, "dense-ffn3072"), (smollm2_135m_moe(8, 2), "moe-8x1536-top2")] {
        let (mut model, weight_bytes) = random_model(&cfg, CpuWeights::Cast(DType::BF16));
        eprintln!("{name}: weights {:.1} MB (bf16)", weight_bytes as f64 / 1e6);
        let mut g = c.benchmark_group(format!("smollm2-135m-{name}"));
        g.sample_size(10).measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(2));
        for num_seqs in [1, 64] {
            let mut kv = KvCache::new(model.kv_cache_spec(), 16, 320, &Device::Cpu).expect("cache");
            let mut alloc = BlockAllocator::new(320);
            let input = decode_step(model.as_mut(), &mut kv, &mut alloc, num_seqs, 48);
            g.throughput(Throughput::Elements(num_seqs as u64));
            g.bench_function(format!("decode_{num_seqs}_seqs_ctx48"), |b| {
                b.iter(|| black_box(step_in_pool(model.as_mut(), &input, &mut kv)))
            });
        }
        g.finish();
    }
}

fn bench_forward(c: &mut Criterion) {
    let cfg = smollm2_135m();
    for (weights, name) in [(CpuWeights::AsStored, "f32"), (CpuWeights::Cast(DType::BF16), "bf16")] {
        bench_model(c, &cfg, weights, name);
    }
    // Same-run baseline for the batch-1 decode matmul: candle's gemm (gemv, one thread)
    // against ferrite's packed product over f32 and bf16 weights, on the model's largest
    // per-layer projection shape (throughput: the f32 matrix's bytes).
    let mut g = c.benchmark_group("matmul-1-token");
    g.sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    let x = Tensor::randn(0f32, 1.0, (1, 576), &Device::Cpu).expect("x");
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &Device::Cpu).expect("w");
    let lin = Linear::new(w.clone(), None, DType::F32).expect("linear");
    let lin_bf16 = Linear::new(w.to_dtype(DType::BF16).expect("bf16"), None, DType::F32).expect("linear");
    g.throughput(Throughput::Bytes((1536 * 576 * 4) as u64));
    g.bench_function("1x576x1536_candle", |b| {
        b.iter(|| black_box(x.matmul(&w.t().expect("t")).expect("mm")))
    });
    g.bench_function("1x576x1536_ferrite", |b| b.iter(|| black_box(lin.forward(&x).expect("mm"))));
    g.bench_function("1x576x1536_ferrite_bf16", |b| b.iter(|| black_box(lin_bf16.forward(&x).expect("mm"))));
    g.finish();

    // Same-run baseline for steps of many tokens: candle's gemm against ferrite's packed
    // product (f32 and bf16 weights), on the MLP's up (576 -> 1536) and down (1536 -> 576)
    // shapes, decode to prefill.
    let mut g = c.benchmark_group("matmul-f32");
    g.sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    let w_down = Tensor::randn(0f32, 1.0, (576, 1536), &Device::Cpu).expect("w");
    let down = Linear::new(w_down.clone(), None, DType::F32).expect("linear");
    let down_bf16 =
        Linear::new(w_down.to_dtype(DType::BF16).expect("bf16"), None, DType::F32).expect("linear");
    for (tokens, w, lin, lin_bf16, k, n) in [
        (16, &w, &lin, &lin_bf16, 576, 1536),
        (64, &w, &lin, &lin_bf16, 576, 1536),
        (64, &w_down, &down, &down_bf16, 1536, 576),
        (128, &w, &lin, &lin_bf16, 576, 1536),
        (256, &w, &lin, &lin_bf16, 576, 1536),
        (1024, &w, &lin, &lin_bf16, 576, 1536),
    ] {
        let x = Tensor::randn(0f32, 1.0, (tokens, k), &Device::Cpu).expect("x");
        g.throughput(Throughput::Elements((2 * tokens * k * n) as u64)); // FLOPs
        g.bench_function(format!("{tokens}x{k}x{n}_candle"), |b| {
            b.iter(|| black_box(x.matmul(&w.t().expect("t")).expect("mm")))
        });
        g.bench_function(format!("{tokens}x{k}x{n}_ferrite"), |b| {
            b.iter(|| black_box(lin.forward(&x).expect("mm")))
        });
        g.bench_function(format!("{tokens}x{k}x{n}_ferrite_bf16"), |b| {
            b.iter(|| black_box(lin_bf16.forward(&x).expect("mm")))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_forward, bench_moe);
criterion_main!(benches);
