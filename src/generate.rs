//! `ferrite generate`: load a model, run the prompts as one flat batch, print text (streamed)
//! or one JSON object per prompt.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ferrite_engine::block_allocator::BlockAllocator;
use ferrite_engine::chat_template::Message;
use ferrite_engine::detokenizer::IncrementalDecoder;
use ferrite_engine::generate::{generate, GenerationRequest, StepLimits};
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::loader::{load, LoadOptions, LoadedModel};
use ferrite_engine::sampler::SamplingParams;
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
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most prompt tokens of one sequence computed per step (chunked prefill).
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
    if args.block_size == 0 || args.kv_cache_gib <= 0.0 {
        bail!("--block-size and --kv-cache-gib must be positive");
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
    let params = sampling(&args, &m);
    let eos = m.eos_token_ids();
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .map(|ids| GenerationRequest {
            prompt_token_ids: ids.clone(),
            sampling: params.clone(),
            max_tokens: args.max_tokens,
            eos_token_ids: eos.clone(),
        })
        .collect();

    let spec = m.model.kv_cache_spec();
    let bytes = (args.kv_cache_gib * (1u64 << 30) as f64) as usize;
    let num_blocks = KvCache::num_blocks_for_bytes(&spec, args.block_size, bytes);
    let mut kv = KvCache::new(spec, args.block_size, num_blocks, &device)?;
    let mut allocator = BlockAllocator::new(num_blocks);
    let limits = StepLimits {
        max_prefill_chunk_tokens: args.max_num_batched_tokens,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len.unwrap_or(m.config.max_position_embeddings),
        keep_prompt_logits: false,
    };

    // Text streams as it is generated only for a single prompt; several prompts print in order.
    let stream = !args.json && prompts.len() == 1;
    let mut decoder = IncrementalDecoder::new(true);
    let mut stdout = std::io::stdout().lock();
    let mut stream_err: Option<anyhow::Error> = None;
    let outputs = generate(m.model.as_ref(), &mut kv, &mut allocator, requests, &limits, |ev| {
        if !stream || stream_err.is_some() {
            return;
        }
        let step = decoder.push(&m.tokenizer, ev.token_id).map_err(anyhow::Error::from).and_then(|text| {
            stdout.write_all(text.as_bytes())?;
            Ok(stdout.flush()?)
        });
        stream_err = step.err();
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    if stream {
        let rest = decoder.finish(&m.tokenizer)?;
        writeln!(stdout, "{rest}")?;
        return Ok(());
    }
    for out in outputs {
        let text = m.tokenizer.decode(&out.token_ids, true)?;
        if args.json {
            let line = serde_json::json!({
                "prompt_token_ids": out.prompt_token_ids,
                "token_ids": out.token_ids,
                "text": text,
                "logprobs": out.logprobs,
                "finish_reason": out.finish_reason.as_str(),
            });
            writeln!(stdout, "{line}")?;
        } else {
            writeln!(stdout, "{text}")?;
        }
    }
    Ok(())
}
