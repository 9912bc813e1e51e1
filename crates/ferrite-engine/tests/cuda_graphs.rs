//! CUDA graphs of decode steps (`runner::StepRunner`) against the eager pass over the same
//! padded batch, bit for bit: logits and the whole KV cache, for every capture size up to 16,
//! batches padded up to one (3 → 4, 5 → 8, 13 → 16), batch sizes that change every step (as
//! requests arrive and finish), contexts that grow across a bucket (new graphs) and inside one
//! (replays with refilled inputs). Sliding windows (mistral) and the unfused Qwen3 path too.
//! Runs only with `--features cuda` on a GPU machine (scripts/gpu-check.sh); without a usable
//! device it fails loudly.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use ferrite_engine::forward_input::HostInput;
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::runner::{capture_sizes, StepRunner};
use ferrite_engine::sched::{BlockId, ScheduledChunk};
use ferrite_engine::{load, LoadOptions, LoadedModel};

const BLOCK_SIZE: usize = 16;
const MAX_SEQS: usize = 16;

fn gpu() -> Device {
    match ferrite_engine::device::open_cuda(0) {
        Ok(dev) => dev,
        Err(e) => panic!("CUDA device 0 is unavailable, so the CUDA graph tests cannot run: {e}"),
    }
}

/// One sequence of the test: its tokens so far and its blocks.
struct Seq {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
}

/// A small deterministic generator (no dependency on the rand crate's stream).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % below
    }
}

fn cache_values(kv: &KvCache) -> Vec<Vec<f32>> {
    kv.layers
        .iter()
        .flat_map(|(k, v)| [k, v])
        .map(|t| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn rows(t: &Tensor, n: usize) -> Vec<Vec<f32>> {
    t.narrow(0, 0, n).unwrap().to_vec2::<f32>().unwrap()
}

/// Runs the schedule of batch sizes through a graph runner and through the eager pass of the
/// same padded batches (each on a cache of its own, both prefilled alike) and compares.
fn graphs_match_eager(m: &LoadedModel, schedule: &[usize], context: std::ops::Range<usize>) {
    let model = m.model.as_ref();
    let dev = model.device().clone();
    let vocab = model.vocab_size();
    let num_blocks = 256;
    let mut kv_graph = KvCache::new(model.kv_cache_spec(), BLOCK_SIZE, num_blocks, &dev).unwrap();
    let mut kv_eager = KvCache::new(model.kv_cache_spec(), BLOCK_SIZE, num_blocks, &dev).unwrap();
    let mut rng = Lcg(7);
    // MAX_SEQS sequences with prompts of various lengths, prefilled alike into both caches
    // (block 0 stays free: padded rows read it).
    let mut next_block = 1;
    let mut seqs: Vec<Seq> = (0..MAX_SEQS)
        .map(|_| {
            let len = context.start + rng.next(context.end - context.start);
            let tokens: Vec<u32> = (0..len).map(|_| rng.next(vocab) as u32).collect();
            let need = (len + 64).div_ceil(BLOCK_SIZE);
            let blocks = (next_block..next_block + need).map(|b| BlockId(b as u32)).collect();
            next_block += need;
            Seq { tokens, blocks }
        })
        .collect();
    assert!(next_block <= num_blocks, "the test's cache holds its sequences");
    for s in &seqs {
        let chunk = ScheduledChunk {
            token_ids: &s.tokens,
            num_computed_tokens: 0,
            block_table: &s.blocks,
            all_logits: false,
            hidden: Default::default(),
        };
        for kv in [&mut kv_graph, &mut kv_eager] {
            let input = HostInput::build(&[chunk], BLOCK_SIZE).unwrap().upload(&dev).unwrap();
            model.forward(&input, kv).unwrap();
        }
    }
    let mut runner = StepRunner::new(model, true, MAX_SEQS);
    let sizes = capture_sizes(MAX_SEQS);
    for (step, &n) in schedule.iter().enumerate() {
        // A different subset each step: sequences join and leave the batch.
        let first = step % (MAX_SEQS - n + 1);
        let batch = first..first + n;
        for s in &mut seqs[batch.clone()] {
            s.tokens.push(rng.next(vocab) as u32);
        }
        let chunks: Vec<ScheduledChunk<'_>> = seqs[batch]
            .iter()
            .map(|s| ScheduledChunk {
                token_ids: &s.tokens[s.tokens.len() - 1..],
                num_computed_tokens: s.tokens.len() - 1,
                block_table: &s.blocks,
                all_logits: false,
                hidden: Default::default(),
            })
            .collect();
        let host = HostInput::build(&chunks, BLOCK_SIZE).unwrap();
        let graph_logits = runner.forward(model, &mut kv_graph, host.clone()).unwrap().logits;
        assert_eq!(runner.graph_failure(), None, "step {step}: a capture failed");
        let graph_rows = rows(&graph_logits, n);
        let mut padded = host;
        padded.pad_to(*sizes.iter().find(|&&s| s >= n).unwrap());
        let eager_logits = model.forward(&padded.upload(&dev).unwrap(), &mut kv_eager).unwrap();
        assert_eq!(graph_logits.dims(), &[n, vocab], "step {step}: one logits row per sequence");
        assert_eq!(graph_rows, rows(&eager_logits, n), "step {step} (batch {n}): logits differ from eager");
        assert!(graph_rows.iter().flatten().all(|v| v.is_finite()), "step {step}: finite logits");
    }
    assert_eq!(cache_values(&kv_graph), cache_values(&kv_eager), "the KV caches differ");
    let stats = runner.graph_stats();
    // Every step ran through a graph: captured once per size and geometry, replayed after.
    assert_eq!(stats.captures + stats.replays, schedule.len(), "{stats:?}");
    assert!(stats.replays >= schedule.len() / 2, "graphs were replayed: {stats:?}");
}

fn load_bf16(name: &str) -> LoadedModel {
    let opts = LoadOptions { dtype: Some(DType::BF16), device: gpu(), ..Default::default() };
    load(fixture(name).to_str().unwrap(), &opts).unwrap()
}

/// Every capture size, padded sizes, and sizes changing each step.
const SCHEDULE: [usize; 24] = [1, 1, 2, 2, 3, 4, 4, 5, 8, 8, 7, 16, 16, 13, 9, 1, 3, 2, 16, 12, 4, 1, 6, 11];

#[test]
fn decode_graphs_replay_the_eager_pass_bit_for_bit() {
    // llama: the fused q/k/v + RoPE path; qwen3: q/k norms (candle's ops); mistral: a window.
    for name in ["llama", "qwen3", "mistral"] {
        let m = load_bf16(name);
        graphs_match_eager(&m, &SCHEDULE, 5..40);
    }
}

#[test]
fn graphs_follow_contexts_that_grow_across_buckets() {
    // Contexts around 100-200 tokens, 60 steps at batch 1 and 2: table rows grow from 8 to 16
    // blocks (a new graph), and within a bucket replays see longer contexts.
    let m = load_bf16("llama");
    let schedule: Vec<usize> = (0..60).map(|i| 1 + i % 2).collect();
    graphs_match_eager(&m, &schedule, 100..200);
}

#[test]
fn the_cpu_runs_eagerly() {
    let opts = LoadOptions::default();
    let m = load(fixture("llama").to_str().unwrap(), &opts).unwrap();
    let mut kv = KvCache::new(m.model.kv_cache_spec(), BLOCK_SIZE, 8, &Device::Cpu).unwrap();
    let mut runner = StepRunner::new(m.model.as_ref(), true, 4);
    let blocks = [BlockId(1)];
    let chunk = ScheduledChunk {
        token_ids: &[3],
        num_computed_tokens: 0,
        block_table: &blocks,
        all_logits: false,
        hidden: Default::default(),
    };
    let host = HostInput::build(&[chunk], BLOCK_SIZE).unwrap();
    let logits = runner.forward(m.model.as_ref(), &mut kv, host).unwrap().logits;
    assert_eq!(logits.dims()[0], 1);
    assert_eq!(runner.graph_stats(), Default::default());
}
