//! `ferrite generate`: load a model, run the prompts together through the engine (continuous
//! batching over the paged KV cache), print text (streamed) or one JSON object per prompt.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::sync::Arc;
use std::time::Instant;

use ferrite_engine::chat_template::Message;
use ferrite_engine::detokenizer::DetokenizerParams;
use ferrite_engine::engine::{spawn_engine, EngineConfig};
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::loader::{load, LoadOptions, LoadedModel};
use ferrite_engine::request::{Request, RequestEvent};
use ferrite_engine::sampler::SamplingParams;
use ferrite_engine::scheduler::SchedulerConfig;
use ferrite_engine::{DType, Device};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A local model directory or a Hugging Face repo id (org/name[@revision]).
    #[arg(long)]
    model: String,
    /// The prompt; repeat for several prompts run together in one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Wrap each prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy. Default: the model's generation_config (greedy if it does not sample).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object per prompt instead of streaming text.
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Longest prompt + output (default: the model's max_position_embeddings).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Memory for the KV cache, GiB.
    #[arg(long, default_value_t = 1.0)]
    kv_cache_gib: f64,
    /// KV cache size in blocks (overrides --kv-cache-gib).
    #[arg(long)]
    kv_cache_blocks: Option<usize>,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Do not reuse KV blocks of identical prompt prefixes.
    #[arg(long)]
    no_prefix_caching: bool,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most tokens in one step (decode tokens first, then prompt chunks: chunked prefill).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
}

fn sampling(args: &GenerateArgs, m: &LoadedModel) -> SamplingParams {
    let g = &m.generation_config;
    let model_samples = g.do_sample == Some(true);
    SamplingParams {
        temperature: args.temperature.unwrap_or(if model_samples {
            g.temperature.unwrap_or(1.0)
        } else {
            0.0
        }),
        top_p: args.top_p.or(if model_samples { g.top_p } else { None }).unwrap_or(1.0),
        top_k: args.top_k.or(if model_samples { g.top_k.filter(|&k| k > 0) } else { None }),
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => bail!("--device cuda: this build has no CUDA support yet (CPU only)"),
    };
    let dtype = match args.dtype {
        DtypeArg::Auto => None,
        DtypeArg::F32 => Some(DType::F32),
        DtypeArg::F16 => Some(DType::F16),
        DtypeArg::Bf16 => Some(DType::BF16),
    };
    if args.block_size == 0
        || args.kv_cache_gib <= 0.0
        || args.max_num_batched_tokens == 0
        || args.max_num_seqs == 0
    {
        bail!("--block-size, --kv-cache-gib, --max-num-batched-tokens and --max-num-seqs must be positive");
    }
    let m = load(&args.model, &LoadOptions { dtype, device: device.clone() })
        .with_context(|| format!("loading model `{}`", args.model))?;

    let mut prompts = Vec::with_capacity(args.prompt.len());
    for p in &args.prompt {
        let ids = if args.chat {
            m.tokenizer.encode_chat(&[Message::new("user", p)])?.1
        } else {
            m.tokenizer.encode(p, true)?
        };
        if ids.is_empty() {
            bail!("prompt {p:?} encodes to no tokens (and the model adds no BOS); give some text");
        }
        prompts.push(ids);
    }
    let sampling = sampling(&args, &m);
    let spec = m.model.kv_cache_spec();
    let num_blocks = match args.kv_cache_blocks {
        Some(n) => n,
        None => {
            let bytes = (args.kv_cache_gib * (1u64 << 30) as f64) as usize;
            KvCache::num_blocks_for_bytes(&spec, args.block_size, bytes)
        }
    };
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_num_seqs: args.max_num_seqs,
            block_size: args.block_size,
            num_blocks,
            enable_prefix_caching: !args.no_prefix_caching,
        },
        max_model_len: args.max_model_len.unwrap_or(m.config.max_position_embeddings),
        max_waiting_requests: prompts.len().max(1),
    };
    let eos = m.eos_token_ids();
    let tokenizer = Arc::new(m.tokenizer);
    let (engine, thread) = spawn_engine(m.model, tokenizer, eos, config)?;

    // Every prompt is submitted before any is read: they run together, continuously batched.
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, ids) in prompts.iter().enumerate() {
        let request = Request {
            request_id: format!("generate-{i}"),
            prompt_token_ids: ids.clone(),
            sampling: sampling.clone(),
            detokenize: DetokenizerParams { skip_special_tokens: true, ..DetokenizerParams::default() },
            max_tokens: args.max_tokens,
            n: 1,
            arrival: Instant::now(),
        };
        streams.push(engine.submit(request).map_err(|e| anyhow::anyhow!("prompt {i}: {e}"))?);
    }
    // Text streams as it is generated only for a single prompt; several print in order.
    let stream_text = !args.json && prompts.len() == 1;
    let mut stdout = std::io::stdout().lock();
    for (ids, mut stream) in prompts.iter().zip(streams) {
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut text = String::new();
        let mut finish_reason = "length";
        loop {
            match stream.blocking_next() {
                Some(RequestEvent::Token(t)) => {
                    token_ids.push(t.token_id);
                    logprobs.push(t.logprob);
                    if stream_text {
                        stdout.write_all(t.text.as_bytes())?;
                        stdout.flush()?;
                    }
                    text.push_str(&t.text);
                    if let Some((reason, _)) = t.finish {
                        finish_reason = reason.as_str();
                    }
                }
                Some(RequestEvent::Finished(_)) => break,
                Some(RequestEvent::Error(e)) => bail!("generation failed: {e}"),
                None => bail!("the engine stopped before the request finished"),
            }
        }
        if args.json {
            let line = serde_json::json!({
                "prompt_token_ids": ids,
                "token_ids": token_ids,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            });
            writeln!(stdout, "{line}")?;
        } else if stream_text {
            writeln!(stdout)?;
        } else {
            writeln!(stdout, "{text}")?;
        }
    }
    engine.shutdown();
    drop(engine);
    thread.join().map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    Ok(())
}
