//! Engine-side costs that must stay small next to a forward pass: planning a step with 1,000
//! running sequences, and sampling a [256, 49152] logits batch with mixed parameters.
//!
//! `cargo bench --bench engine`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferrite_engine::sampler::{sample_batch, SequenceSampler};
use ferrite_engine::sched::{Scheduler, SeqId, Sequence};
use ferrite_engine::{CacheConfig, SamplingParams, SchedulerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// 1,000 sequences of 128 prompt tokens, all admitted and decoding.
fn busy_scheduler() -> Scheduler {
    let mut s = Scheduler::new(
        SchedulerConfig { max_num_batched_tokens: 2048, max_num_seqs: 1024, ..Default::default() },
        CacheConfig { block_size: 16, num_blocks: 20_000, enable_prefix_caching: true },
    )
    .expect("scheduler");
    for i in 0..1000u64 {
        s.add(Sequence::new(SeqId(i), (0..128).map(|t| (t * 31 + i as u32 * 7) % 49152).collect()));
    }
    while s.stats().num_waiting > 0 || s.get(SeqId(999)).is_some_and(|q| q.num_computed_tokens < 128) {
        let plan = s.schedule();
        s.complete_step(&plan);
        for p in plan.seqs.iter().filter(|p| p.samples) {
            s.append_token(p.seq_id, 1);
        }
    }
    s
}

fn bench_scheduler(c: &mut Criterion) {
    c.bench_function("schedule_step_1000_running", |b| {
        b.iter_batched_ref(
            busy_scheduler,
            |s| {
                let plan = s.schedule();
                s.complete_step(&plan);
                black_box(plan.num_batched_tokens)
            },
            BatchSize::LargeInput,
        )
    });
}

fn bench_sampler(c: &mut Criterion) {
    let (rows, vocab) = (256, 49152);
    let mut rng = StdRng::seed_from_u64(0);
    let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect();
    // A quarter each: greedy; temperature + top-p; top-k + penalties; min-p + logprobs + bias.
    let params = |i: usize| match i % 4 {
        0 => SamplingParams::default(),
        1 => SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(i as u64), ..Default::default() },
        2 => SamplingParams {
            temperature: 1.0,
            top_k: Some(50),
            repetition_penalty: 1.1,
            frequency_penalty: 0.5,
            presence_penalty: 0.5,
            seed: Some(i as u64),
            ..Default::default()
        },
        _ => SamplingParams {
            temperature: 0.7,
            min_p: 0.05,
            top_logprobs: 5,
            logit_bias: BTreeMap::from([(7, 5.0), (11, -100.0)]),
            seed: Some(i as u64),
            ..Default::default()
        },
    };
    let prompt: Vec<u32> = (0..128).collect();
    c.bench_function("sample_256x49152_mixed", |b| {
        b.iter_batched_ref(
            || (0..rows).map(|i| SequenceSampler::new(params(i), &prompt, &[2])).collect::<Vec<_>>(),
            |samplers| {
                let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
                black_box(sample_batch(&logits, vocab, &mut refs))
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_scheduler, bench_sampler
}
criterion_main!(benches);
