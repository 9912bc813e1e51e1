//! `ferrite generate`: load a model, run the prompts together through the engine (continuous
//! batching over the paged KV cache), print text (streamed) or one JSON object per prompt.

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;
use std::time::Instant;

use ferrite_engine::model::hf_config::GenerationConfig;
use ferrite_engine::{DetokenizerParams, Message, Request, RequestEvent, SamplingParams};

use ferrite_server::validate::SamplingDefaults;

use crate::engine_args::{EngineArgs, Running};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
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
}

/// Flags first, then the registry entry's defaults, then the model's generation_config.
fn sampling(args: &GenerateArgs, d: &SamplingDefaults, g: &GenerationConfig) -> SamplingParams {
    let model_samples = g.do_sample == Some(true);
    SamplingParams {
        temperature: args.temperature.or(d.temperature).unwrap_or(if model_samples {
            g.temperature.unwrap_or(1.0)
        } else {
            0.0
        }),
        top_p: args.top_p.or(d.top_p).or(if model_samples { g.top_p } else { None }).unwrap_or(1.0),
        top_k: args.top_k.or(d.top_k).or(if model_samples { g.top_k.filter(|&k| k > 0) } else { None }),
        min_p: d.min_p.unwrap_or(0.0),
        repetition_penalty: d.repetition_penalty.unwrap_or(1.0),
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let Running { engine, thread, tokenizer, generation_config, sampling_defaults, .. } =
        args.engine.start(args.prompt.len().max(1), None)?;
    let mut prompts = Vec::with_capacity(args.prompt.len());
    for p in &args.prompt {
        let ids = if args.chat {
            tokenizer.encode_chat(&[Message::new("user", p)])?.1
        } else {
            tokenizer.encode(p, true)?
        };
        if ids.is_empty() {
            bail!("prompt {p:?} encodes to no tokens (and the model adds no BOS); give some text");
        }
        prompts.push(ids);
    }
    let sampling = sampling(&args, &sampling_defaults, &generation_config);

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
            prompt_logprobs: None,
            grammar: None,
            arrival: Instant::now(),
            priority: 0,
            deadlines: Default::default(),
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
                Some(RequestEvent::Stopped { text: rest, finish: (reason, _), .. }) => {
                    if stream_text {
                        stdout.write_all(rest.as_bytes())?;
                    }
                    text.push_str(&rest);
                    finish_reason = reason.as_str();
                }
                Some(RequestEvent::Finished(_)) => break,
                Some(RequestEvent::Embedding { .. }) => bail!("a generation request got an embedding"),
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
