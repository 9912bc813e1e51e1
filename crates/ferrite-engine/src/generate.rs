//! A simple in-process generation loop: a fixed set of requests run together as one flat batch
//! per step over the paged KV cache. Each step every unfinished sequence gets either its next
//! prompt chunk (chunked prefill) or one decode token; all of them go through one forward.
//!
//! The continuous-batching scheduler (admission, preemption, prefix caching) replaces this
//! loop's planning in the next stage; the step itself (plan → forward → sample) stays.

use crate::block_allocator::{BlockAllocator, BlockId};
use crate::error::{EngineError, Result};
use crate::forward_input::{ForwardInput, ScheduledChunk};
use crate::kv_cache::KvCache;
use crate::models::Model;
use crate::sampler::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// End-of-sequence ids (generation_config's list); the one generated is returned as the
    /// last token. `ignore_eos` generates through them.
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` (or the model's length limit) was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    /// `logprobs[i]`: log-softmax of the raw logits at `token_ids[i]`.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// The logits at the last prompt position, when asked for.
    pub prompt_logits: Option<Vec<f32>>,
}

/// Limits of one step.
#[derive(Debug, Clone)]
pub struct StepLimits {
    /// Most tokens of one sequence's prompt computed in one step.
    pub max_prefill_chunk_tokens: usize,
    /// Most tokens in one step over all sequences (decode tokens are planned first).
    pub max_num_batched_tokens: usize,
    /// Positions the model may reach (prompt + generated).
    pub max_model_len: usize,
    /// Keep the logits of the last prompt position in the output.
    pub keep_prompt_logits: bool,
}

impl Default for StepLimits {
    fn default() -> Self {
        Self {
            max_prefill_chunk_tokens: 2048,
            max_num_batched_tokens: 2048,
            max_model_len: usize::MAX,
            keep_prompt_logits: false,
        }
    }
}

struct Sequence {
    tokens: Vec<u32>,
    num_prompt_tokens: usize,
    num_computed_tokens: usize,
    block_table: Vec<BlockId>,
    sampler: Sampler,
    request: GenerationRequest,
    logprobs: Vec<f32>,
    prompt_logits: Option<Vec<f32>>,
    finish: Option<FinishReason>,
}

/// One generated token, as it happens.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    pub seq_index: usize,
    pub token_id: u32,
    pub logprob: f32,
    pub finish: Option<FinishReason>,
}

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Runs `requests` to completion. `on_token` sees every token as it is sampled.
pub fn generate(
    model: &dyn Model,
    kv: &mut KvCache,
    allocator: &mut BlockAllocator,
    requests: Vec<GenerationRequest>,
    limits: &StepLimits,
    mut on_token: impl FnMut(TokenEvent),
) -> Result<Vec<GenerationOutput>> {
    let bs = kv.block_size;
    let vocab = model.vocab_size();
    // Without preemption (the scheduler's job) every sequence must fit whole from the start.
    let mut needed_blocks = 0;
    for (i, r) in requests.iter().enumerate() {
        r.sampling.validate().map_err(|e| EngineError::InvalidRequest(format!("request {i}: {e}")))?;
        if r.prompt_token_ids.is_empty() {
            return Err(EngineError::InvalidRequest(format!("request {i}: the prompt is empty (0 tokens)")));
        }
        if let Some(bad) = r.prompt_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "request {i}: token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let total = r.prompt_token_ids.len() + r.max_tokens;
        if total > limits.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "request {i}: prompt ({} tokens) + max_tokens ({}) = {total} exceeds max_model_len {}",
                r.prompt_token_ids.len(),
                r.max_tokens,
                limits.max_model_len
            )));
        }
        needed_blocks += blocks_for(total, bs);
    }
    if needed_blocks > allocator.num_free_blocks() {
        return Err(EngineError::KvCache(format!(
            "the batch needs {needed_blocks} blocks of {bs} tokens but {} of {} are free; give the cache more memory or run fewer/shorter requests",
            allocator.num_free_blocks(),
            allocator.num_total_blocks()
        )));
    }

    let mut seqs: Vec<Sequence> = requests
        .into_iter()
        .map(|r| Sequence {
            tokens: r.prompt_token_ids.clone(),
            num_prompt_tokens: r.prompt_token_ids.len(),
            num_computed_tokens: 0,
            block_table: Vec::new(),
            sampler: Sampler::new(r.sampling.clone()),
            finish: (r.max_tokens == 0).then_some(FinishReason::Length),
            request: r,
            logprobs: Vec::new(),
            prompt_logits: None,
        })
        .collect();

    let result = run_steps(model, kv, allocator, &mut seqs, limits, &mut on_token);
    // Whatever happened, give every block back.
    for s in &mut seqs {
        for b in s.block_table.drain(..) {
            allocator.free(b).expect("invariant: a sequence's blocks are allocated");
        }
    }
    result?;
    Ok(seqs
        .into_iter()
        .map(|s| GenerationOutput {
            token_ids: s.tokens[s.num_prompt_tokens..].to_vec(),
            prompt_token_ids: s.request.prompt_token_ids,
            logprobs: s.logprobs,
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
            prompt_logits: s.prompt_logits,
        })
        .collect())
}

fn run_steps(
    model: &dyn Model,
    kv: &mut KvCache,
    allocator: &mut BlockAllocator,
    seqs: &mut [Sequence],
    limits: &StepLimits,
    on_token: &mut impl FnMut(TokenEvent),
) -> Result<()> {
    let bs = kv.block_size;
    loop {
        // Plan: decodes first (one token each), then prompt chunks within the budget.
        let mut budget = limits.max_num_batched_tokens.max(1);
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (seq index, tokens this step)
        for decode_pass in [true, false] {
            for (i, s) in seqs.iter().enumerate() {
                let remaining = s.tokens.len() - s.num_computed_tokens;
                if s.finish.is_some() || budget == 0 || (remaining == 1) != decode_pass {
                    continue;
                }
                let n = remaining.min(limits.max_prefill_chunk_tokens.max(1)).min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        plan.sort_unstable();
        for &(i, n) in &plan {
            let s = &mut seqs[i];
            let want = blocks_for(s.num_computed_tokens + n, bs);
            if want > s.block_table.len() {
                let new = allocator
                    .allocate_n(want - s.block_table.len())
                    .map_err(|e| EngineError::KvCache(e.to_string()))?;
                s.block_table.extend(new);
            }
        }
        let chunks: Vec<ScheduledChunk<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &seqs[i];
                ScheduledChunk {
                    token_ids: &s.tokens[s.num_computed_tokens..s.num_computed_tokens + n],
                    num_computed_tokens: s.num_computed_tokens,
                    block_table: &s.block_table,
                }
            })
            .collect();
        let input = ForwardInput::build(&chunks, bs, model.device())?;
        let logits = model.forward(&input, kv)?.to_vec2::<f32>()?;

        for (row, &(i, n)) in plan.iter().enumerate() {
            let s = &mut seqs[i];
            s.num_computed_tokens += n;
            if s.num_computed_tokens < s.tokens.len() {
                continue; // a prompt chunk that does not reach the end: nothing to sample yet
            }
            if limits.keep_prompt_logits && s.tokens.len() == s.num_prompt_tokens {
                s.prompt_logits = Some(logits[row].clone());
            }
            let sampled = s.sampler.sample(&logits[row]);
            s.tokens.push(sampled.token_id);
            s.logprobs.push(sampled.logprob);
            let generated = s.tokens.len() - s.num_prompt_tokens;
            s.finish = if !s.request.ignore_eos && s.request.eos_token_ids.contains(&sampled.token_id) {
                Some(FinishReason::Stop)
            } else if generated >= s.request.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            on_token(TokenEvent {
                seq_index: i,
                token_id: sampled.token_id,
                logprob: sampled.logprob,
                finish: s.finish,
            });
            if s.finish.is_some() {
                for b in s.block_table.drain(..) {
                    allocator.free(b).map_err(|e| EngineError::KvCache(e.to_string()))?;
                }
            }
        }
    }
}
