//! The paged-attention op alone, at Qwen2.5-0.5B's head shape (14 query heads, 2 KV heads,
//! head_dim 64, block size 16): decode over long contexts and many sequences, and one 2k-token
//! prefill. Criterion's throughput is the K/V cache bytes the op must read (each sequence's
//! context, K and V, once), so "thrpt" is the achieved bandwidth against the memory's.
//!
//! `cargo bench -p ferrite-engine --bench attention` runs it on the CPU in f32. Built with
//! `--features cuda` and run with `FERRITE_BENCH_DEVICE=cuda` it runs ferrite's CUDA kernels in
//! bf16 (scripts/gpu-check.sh does this on a GPU machine). Block tables are shuffled, as a
//! long-running server's are.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use common::device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_engine::ops::paged_attention::{
    paged_attention, AttentionMetadata, AttentionParams, SeqAttention,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

const NUM_HEADS: usize = 14;
const NUM_KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const BLOCK_SIZE: usize = 16;

/// One step's inputs: `seqs` are `(context_len, query_len)`.
struct Step {
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttentionMetadata,
    kv_bytes: u64,
}

fn step(seqs: &[(usize, usize)], dev: &Device, dtype: DType) -> candle_core::Result<Step> {
    let mut rng = StdRng::seed_from_u64(0);
    let num_blocks: usize = seqs.iter().map(|(ctx, _)| ctx.div_ceil(BLOCK_SIZE)).sum();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut free = ids.into_iter();
    let (mut metas, mut slots, mut query_start) = (Vec::new(), Vec::new(), 0);
    for &(context_len, query_len) in seqs {
        let block_table: Vec<u32> = free.by_ref().take(context_len.div_ceil(BLOCK_SIZE)).collect();
        for pos in context_len - query_len..context_len {
            slots.push(block_table[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32);
        }
        metas.push(SeqAttention { query_start, query_len, context_len, block_table });
        query_start += query_len;
    }
    let cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM);
    let random = |shape: (usize, usize, usize, usize)| {
        Tensor::randn(0f32, 1.0, shape, dev).and_then(|t| t.to_dtype(dtype))
    };
    let q = Tensor::randn(0f32, 1.0, (query_start, NUM_HEADS, HEAD_DIM), dev)?.to_dtype(dtype)?;
    let context: usize = seqs.iter().map(|(ctx, _)| ctx).sum();
    Ok(Step {
        q,
        k_cache: random(cache_shape)?,
        v_cache: random(cache_shape)?,
        meta: AttentionMetadata::new(slots, metas, BLOCK_SIZE),
        kv_bytes: (2 * context * NUM_KV_HEADS * HEAD_DIM * dtype.size_in_bytes()) as u64,
    })
}

fn bench_attention(c: &mut Criterion) {
    let (dev, dtype) = device();
    let params =
        AttentionParams { scale: 1.0 / (HEAD_DIM as f32).sqrt(), sliding_window: None, softcap: None };
    let cases: [(&str, Vec<(usize, usize)>); 5] = [
        ("decode 1 seq x 8192 ctx", vec![(8192, 1)]),
        ("decode 64 seqs x 256 ctx", vec![(256, 1); 64]),
        ("decode 64 seqs x 2048 ctx", vec![(2048, 1); 64]),
        ("decode 256 seqs x 512 ctx", vec![(512, 1); 256]),
        ("prefill 1 seq x 2048 tokens", vec![(2048, 2048)]),
    ];
    let mut g = c
        .benchmark_group(format!("paged-attention-{}-{dtype:?}", if dev.is_cuda() { "cuda" } else { "cpu" }));
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (name, seqs) in cases {
        let s = step(&seqs, &dev, dtype).expect("bench inputs");
        g.throughput(Throughput::Bytes(s.kv_bytes));
        g.bench_function(name, |b| {
            b.iter(|| {
                let out = paged_attention(&s.q, &s.k_cache, &s.v_cache, &s.meta, &params).expect("attention");
                // Launches are asynchronous on CUDA: time the kernels, not their queueing.
                dev.synchronize().expect("synchronize");
                black_box(out)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
