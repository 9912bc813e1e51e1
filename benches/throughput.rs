//! Offline throughput of the engine: the SmolLM2-135M-shaped model (random f32 weights) with
//! 1, 8, 32 and 128 concurrent sequences of 128 prompt / 128 output tokens, EOS ignored,
//! through `spawn_engine` exactly as `ferrite generate` runs it. Prints generated tokens/s per
//! concurrency, the speed-up over one sequence at a time (the N = 1 run), and the batched run
//! against the compute floor (2 × parameters FLOPs per token at the measured gemm peak).
//!
//! `cargo bench --bench throughput [-- 1 8 32]` (concurrencies; default 1 8 32 128)

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use common::{random_model, smollm2_135m};
use ferrite_engine::model::tokenizer::TokenizerConfig;
use ferrite_engine::{
    spawn_engine, CacheConfig, DetokenizerParams, EngineConfig, Request, RequestEvent, SamplingParams,
    Tokenizer,
};

const PROMPT: usize = 128;
const OUTPUT: usize = 128;

/// Generated tokens per second with `n` sequences submitted at once.
fn run(n: usize) -> f64 {
    let cfg = smollm2_135m();
    let (model, _) = random_model(&cfg, ferrite_engine::model::arch::CpuWeights::AsStored);
    // Detokenization only needs some tokenizer; the fixture's knows fewer ids than the model
    // has, so its text is not meaningful here (and cheaper than a real one's).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let tokenizer =
        Tokenizer::load(&dir.join("tokenizer.json"), TokenizerConfig::default()).expect("tokenizer");
    let cache = CacheConfig {
        num_blocks: (n * (PROMPT + OUTPUT)).div_ceil(16) + 16,
        enable_prefix_caching: false,
        ..Default::default()
    };
    let config = EngineConfig { cache, max_model_len: 4096, max_waiting_requests: n, ..Default::default() };
    let (engine, _thread) = spawn_engine(model, Arc::new(tokenizer), vec![], config).expect("engine");
    let start = Instant::now();
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let prompt = (0..PROMPT as u32).map(|t| (t * 7919 + i as u32 * 104_729) % 49152).collect();
            engine
                .submit(Request {
                    request_id: i.to_string(),
                    prompt_token_ids: prompt,
                    sampling: SamplingParams { ignore_eos: true, ..Default::default() },
                    detokenize: DetokenizerParams::default(),
                    max_tokens: OUTPUT,
                    n: 1,
                    prompt_logprobs: None,
                    grammar: None,
                    arrival: Instant::now(),
                    priority: 0,
                    deadlines: Default::default(),
                })
                .expect("submit")
        })
        .collect();
    let mut generated = 0;
    for mut s in streams {
        while let Some(ev) = s.blocking_next() {
            match ev {
                RequestEvent::Token(_) => generated += 1,
                RequestEvent::Finished(_) => break,
                RequestEvent::Embedding { .. } => panic!("a generation request got an embedding"),
                RequestEvent::Stopped { .. } => panic!("a request without budgets was stopped by one"),
                RequestEvent::Error(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(generated, n * OUTPUT);
    generated as f64 / start.elapsed().as_secs_f64()
}

/// f32 matmul FLOP/s of candle's gemm on a prefill-sized product, as the machine's usable peak.
fn gemm_peak_flops() -> f64 {
    let a = Tensor::randn(0f32, 1.0, (512, 576), &Device::Cpu).expect("a");
    let b = Tensor::randn(0f32, 1.0, (576, 1536), &Device::Cpu).expect("b");
    let _ = a.matmul(&b).expect("warm");
    let iters = 20;
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(a.matmul(&b).expect("mm"));
    }
    (2.0 * 512.0 * 576.0 * 1536.0 * iters as f64) / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let levels = if args.is_empty() { vec![1, 8, 32, 128] } else { args };
    let params = 134_515_008f64; // SmolLM2-135M shape, tied embeddings
    let peak = gemm_peak_flops();
    let floor = peak / (2.0 * params);
    println!(
        "gemm peak: {:.1} GFLOP/s -> compute floor {:.0} tok/s (2 x {:.1}M params per token)",
        peak / 1e9,
        floor,
        params / 1e6
    );
    let mut single = None;
    for n in levels {
        let tps = run(n);
        let base = *single.get_or_insert(tps);
        println!(
            "concurrency {n:>4}: {tps:>8.1} generated tok/s  ({:.1}x one at a time, {:.0}% of the compute floor)",
            tps / base,
            100.0 * tps / floor
        );
    }
}
