//! `bench latency` and `bench throughput`: the engine in-process, no HTTP, with `vllm bench`'s
//! flags, printed lines and JSON keys.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ferrite_engine::metrics::EngineMetrics;
use ferrite_engine::{DetokenizerParams, EngineHandle, Request, RequestEvent, RequestStream, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::datasets::{self, RandomSpec, Sample};
use super::stats::{mean, percentile, std_dev};
use super::write_json;
use crate::engine_args::{EngineArgs, Running};

#[derive(Debug, Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, default_value_t = 32)]
    input_len: usize,
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 10)]
    num_iters_warmup: usize,
    #[arg(long, default_value_t = 30)]
    num_iters: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    output_json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// random (token runs of --input-len) or sharegpt (--dataset-path).
    #[arg(long, default_value = "random")]
    dataset_name: String,
    #[arg(long)]
    dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    num_prompts: usize,
    #[arg(long, default_value_t = 1024)]
    input_len: usize,
    /// Output tokens per request (random; for sharegpt it overrides the conversation's).
    #[arg(long)]
    output_len: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    random_range_ratio: f64,
    #[arg(long, default_value_t = 0)]
    prefix_len: usize,
    #[arg(long)]
    output_json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// vLLM's benchmark sampling: temperature 1, top_p 1, never stopping early.
fn request(id: usize, prompt_ids: Vec<u32>, output_len: usize, seed: u64) -> Request {
    Request {
        request_id: format!("bench-{id}"),
        prompt_token_ids: prompt_ids,
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            ignore_eos: true,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        detokenize: DetokenizerParams::default(),
        max_tokens: output_len,
        n: 1,
        prompt_logprobs: None,
        grammar: None,
        arrival: Instant::now(),
        priority: 0,
        deadlines: Default::default(),
    }
}

/// Waits for every stream to finish; returns (prompt, generated) token totals.
fn drain(streams: Vec<RequestStream>) -> Result<(usize, usize)> {
    let (mut prompt, mut generated) = (0, 0);
    for mut s in streams {
        loop {
            match s.blocking_next() {
                Some(
                    RequestEvent::Token(_) | RequestEvent::Stopped { .. } | RequestEvent::Embedding { .. },
                ) => {}
                Some(RequestEvent::Finished(u)) => {
                    prompt += u.prompt_tokens;
                    generated += u.completion_tokens;
                    break;
                }
                Some(RequestEvent::Error(e)) => bail!("a benchmark request failed: {e}"),
                None => bail!("the engine stopped during the benchmark"),
            }
        }
    }
    Ok((prompt, generated))
}

/// Prints where the engine's steps spent their time (the `engine_step_phase_seconds_total`
/// metric), and returns it for the JSON: seconds per phase, summed over every step.
fn step_phases(metrics: &EngineMetrics) -> serde_json::Value {
    let (steps, totals) = metrics.step_phase_totals();
    let per_step = |s: f64| if steps > 0 { s / steps as f64 * 1e3 } else { 0.0 };
    let line: Vec<String> =
        totals.iter().map(|(p, s)| format!("{} {:.3} ms", p.as_str(), per_step(*s))).collect();
    println!("Engine steps: {steps}; mean per step: {}", line.join(", "));
    let phases: serde_json::Map<String, serde_json::Value> =
        totals.iter().map(|(p, s)| (p.as_str().to_string(), json!(s))).collect();
    json!({ "num_steps": steps, "seconds": phases })
}

fn submit_all(engine: &EngineHandle, requests: Vec<Request>) -> Result<Vec<RequestStream>> {
    requests.into_iter().map(|r| engine.submit(r).map_err(anyhow::Error::from)).collect()
}

pub fn latency(mut args: LatencyArgs) -> Result<()> {
    if args.batch_size == 0 || args.input_len == 0 || args.output_len == 0 || args.num_iters == 0 {
        bail!("--batch-size, --input-len, --output-len and --num-iters must be at least 1");
    }
    // As vLLM: every iteration sends the same prompts, so prefix caching would time cache hits.
    args.engine.no_prefix_caching = true;
    let Running { engine, thread, tokenizer, metrics, bf16_activations, .. } =
        args.engine.start(args.batch_size, None)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let vocab = tokenizer.vocab_size().min(10_000) as u32;
    let prompts: Vec<Vec<u32>> = (0..args.batch_size)
        .map(|_| (0..args.input_len).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let run_once = |iter: usize| -> Result<f64> {
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| request(i, p.clone(), args.output_len, (iter * args.batch_size + i) as u64))
            .collect();
        let start = Instant::now();
        drain(submit_all(&engine, requests)?)?;
        Ok(start.elapsed().as_secs_f64())
    };
    for i in 0..args.num_iters_warmup {
        run_once(i)?;
    }
    let mut latencies = Vec::with_capacity(args.num_iters);
    for i in 0..args.num_iters {
        latencies.push(run_once(args.num_iters_warmup + i)?);
    }
    let percentages = [10.0, 25.0, 50.0, 75.0, 90.0, 99.0];
    let avg = mean(&latencies);
    println!("Avg latency: {avg} seconds");
    println!("Std latency: {} seconds", std_dev(&latencies));
    let mut percentiles = serde_json::Map::new();
    for p in percentages {
        let v = percentile(&latencies, p);
        println!("{p}% percentile latency: {v} seconds");
        percentiles.insert(format!("{p}"), json!(v));
    }
    let phases = step_phases(&metrics);
    if let Some(path) = &args.output_json {
        write_json(
            path,
            &json!({
                "avg_latency": avg,
                "std_latency": std_dev(&latencies),
                "latencies": latencies,
                "percentiles": percentiles,
                "step_phases": phases,
                "cpu_kernels": ferrite_engine::ops::simd::level().name(),
                "cpu_activations": cpu_activations(&args.engine, bf16_activations),
            }),
        )?;
    }
    engine.shutdown();
    let _ = thread.join();
    Ok(())
}

/// How the CPU's products took their activations: `int8` where `--int8-activations` applied
/// (a level with int8 products), `bf16` where the loaded model's bf16 weights take bf16
/// activations (`--bf16-activations` on AVX-512 BF16), both as `int8+bf16`, else `exact`.
fn cpu_activations(engine: &EngineArgs, bf16: bool) -> &'static str {
    let int8 = engine.int8_activations && ferrite_engine::ops::blocks::int8_products();
    match (int8, bf16) {
        (true, true) => "int8+bf16",
        (true, false) => "int8",
        (false, true) => "bf16",
        (false, false) => "exact",
    }
}

pub fn throughput(args: ThroughputArgs) -> Result<()> {
    if args.num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    let Running { engine, thread, tokenizer, metrics, bf16_activations, .. } =
        args.engine.start(args.num_prompts.max(1), None)?;
    let samples: Vec<Sample> = match args.dataset_name.as_str() {
        "random" => datasets::random(
            &tokenizer,
            &RandomSpec {
                num_prompts: args.num_prompts,
                input_len: args.input_len,
                output_len: args.output_len.unwrap_or(128),
                range_ratio: args.random_range_ratio,
                prefix_len: args.prefix_len,
            },
            args.seed,
        )?,
        "sharegpt" => datasets::sharegpt_flag(
            &tokenizer,
            args.dataset_path.as_deref(),
            args.num_prompts,
            args.output_len,
            args.seed,
        )?,
        other => bail!("--dataset-name {other:?}: expected random or sharegpt"),
    };
    let requests: Vec<Request> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| request(i, s.prompt_ids.clone(), s.output_len, args.seed.wrapping_add(i as u64)))
        .collect();
    let start = Instant::now();
    let (prompt_tokens, output_tokens) = drain(submit_all(&engine, requests)?)?;
    let elapsed = start.elapsed().as_secs_f64();
    let total = prompt_tokens + output_tokens;
    let n = samples.len();
    println!(
        "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s",
        n as f64 / elapsed,
        total as f64 / elapsed,
        output_tokens as f64 / elapsed
    );
    println!("Total num prompt tokens:  {prompt_tokens}");
    println!("Total num output tokens:  {output_tokens}");
    let phases = step_phases(&metrics);
    if let Some(path) = &args.output_json {
        write_json(
            path,
            &json!({
                "elapsed_time": elapsed,
                "num_requests": n,
                "total_num_tokens": total,
                "requests_per_second": n as f64 / elapsed,
                "tokens_per_second": total as f64 / elapsed,
                "step_phases": phases,
                "cpu_kernels": ferrite_engine::ops::simd::level().name(),
                "cpu_activations": cpu_activations(&args.engine, bf16_activations),
            }),
        )?;
    }
    engine.shutdown();
    let _ = thread.join();
    Ok(())
}
