//! One decode step and one 512-token prefill of a SmolLM2-135M-shaped llama (random weights,
//! f32, tied embeddings), plus this machine's memory read bandwidth measured in the same run,
//! which sets the floor for decode: every weight byte is read once per step.
//!
//! `cargo bench --bench forward` (threads: RAYON_NUM_THREADS, default all cores).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::block_allocator::{BlockAllocator, BlockId};
use ferrite_engine::config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use ferrite_engine::forward_input::{ForwardInput, ScheduledChunk};
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::models::{build_model, Model};
use rayon::prelude::*;

fn smollm2_135m() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        rope: RopeConfig { theta: 100_000.0, scaling: RopeScaling::Default },
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        layer_sliding_windows: vec![None; 30],
        weight_dtype: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Random weights under the checkpoint's own names; returns the model and its weight bytes.
fn random_model(cfg: &ModelConfig) -> (Box<dyn Model>, usize) {
    let dev = Device::Cpu;
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            shapes.push((format!("{p}.{name}"), shape));
        }
    }
    let mut bytes = 0;
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(name, shape)| {
            bytes += shape.iter().product::<usize>() * 4;
            let t = if shape.len() == 1 {
                Tensor::ones(shape, DType::F32, &dev)
            } else {
                Tensor::randn(0f32, 0.02, shape, &dev)
            };
            (name, t.expect("random tensor"))
        })
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    (build_model(cfg, vb).expect("model builds"), bytes)
}

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

fn bench_forward(c: &mut Criterion) {
    let cfg = smollm2_135m();
    let (model, weight_bytes) = random_model(&cfg);
    let block_size = 16;
    let num_blocks = 128;
    let mut kv = KvCache::new(model.kv_cache_spec(), block_size, num_blocks, &Device::Cpu).expect("cache");
    let mut alloc = BlockAllocator::new(num_blocks);
    eprintln!("weights: {:.1} MB f32", weight_bytes as f64 / 1e6);

    let mut g = c.benchmark_group("smollm2-135m-f32");
    g.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(3));

    // Prefill: 512 prompt tokens in one step.
    let s = seq(&mut alloc, 512, block_size);
    let chunk = [ScheduledChunk { token_ids: &s.tokens, num_computed_tokens: 0, block_table: &s.table }];
    let input = ForwardInput::build(&chunk, block_size, &Device::Cpu).expect("input");
    g.throughput(Throughput::Elements(512));
    g.bench_function("prefill_512_tokens", |b| {
        b.iter(|| black_box(model.forward(&input, &mut kv).expect("fwd")))
    });

    // Decode: one token at position 128 after a 128-token context (batch 1).
    let s = seq(&mut alloc, 129, block_size);
    let chunk =
        [ScheduledChunk { token_ids: &s.tokens[..128], num_computed_tokens: 0, block_table: &s.table }];
    model
        .forward(&ForwardInput::build(&chunk, block_size, &Device::Cpu).expect("input"), &mut kv)
        .expect("fwd");
    let chunk =
        [ScheduledChunk { token_ids: &s.tokens[128..], num_computed_tokens: 128, block_table: &s.table }];
    let input = ForwardInput::build(&chunk, block_size, &Device::Cpu).expect("input");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_1_token_ctx128", |b| {
        b.iter(|| black_box(model.forward(&input, &mut kv).expect("fwd")))
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

    // Same-run baseline for the decode matmul: candle's gemm (gemv, one thread) against the
    // row-parallel path, on the model's largest per-layer projection shape.
    let x = Tensor::randn(0f32, 1.0, (1, 576), &Device::Cpu).expect("x");
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &Device::Cpu).expect("w");
    let lin = ferrite_engine::ops::linear::Linear::new(w.clone(), None);
    g.throughput(Throughput::Bytes((1536 * 576 * 4) as u64));
    g.bench_function("matmul_1x576x1536_candle", |b| {
        b.iter(|| black_box(x.matmul(&w.t().expect("t")).expect("mm")))
    });
    g.bench_function("matmul_1x576x1536_ferrite", |b| b.iter(|| black_box(lin.forward(&x).expect("mm"))));
    g.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
