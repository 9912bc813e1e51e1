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
use crate::sampler::{sample_batch, SamplingParams, SequenceSampler};

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// End-of-sequence ids (generation_config's list); the one generated is returned as the
    /// last token. `sampling.ignore_eos` generates through them.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token (unless `ignore_eos`) or one of `stop_token_ids` was generated.
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
    /// `top_logprobs[i]`: the `sampling.top_logprobs` most likely `(token id, logprob)` at step
    /// `i` under the raw logits, most likely first (empty when none were asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
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
    sampler: SequenceSampler,
    request: GenerationRequest,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
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
        r.sampling.validate(vocab).map_err(|e| EngineError::InvalidRequest(format!("request {i}: {e}")))?;
        if r.sampling.min_tokens > r.max_tokens {
            return Err(EngineError::InvalidRequest(format!(
                "request {i}: min_tokens ({}) must be at most max_tokens ({})",
                r.sampling.min_tokens, r.max_tokens
            )));
        }
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
            sampler: SequenceSampler::new(r.sampling.clone(), &r.prompt_token_ids, &r.eos_token_ids),
            finish: (r.max_tokens == 0).then_some(FinishReason::Length),
            request: r,
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
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
            top_logprobs: s.top_logprobs,
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
                    all_logits: false,
                }
            })
            .collect();
        let input = ForwardInput::build(&chunks, bs, model.device())?;
        // [plan.len(), vocab]: one row per scheduled chunk, at its last token; flat, row-major.
        let logits = model.forward(&input, kv)?;
        let (_, vocab) = logits.dims2()?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;

        // Rows whose sequence reached the end of its tokens get a new token; (plan row, seq).
        let mut to_sample: Vec<(usize, usize)> = Vec::with_capacity(plan.len());
        for (row, &(i, n)) in plan.iter().enumerate() {
            let s = &mut seqs[i];
            s.num_computed_tokens += n;
            if s.num_computed_tokens < s.tokens.len() {
                continue; // a prompt chunk that does not reach the end: nothing to sample yet
            }
            if limits.keep_prompt_logits && s.tokens.len() == s.num_prompt_tokens {
                s.prompt_logits = Some(logits[row * vocab..(row + 1) * vocab].to_vec());
            }
            to_sample.push((row, i));
        }
        if to_sample.is_empty() {
            continue;
        }
        // Usually every row is sampled; gather rows only when some are partial prompt chunks.
        let gathered: Vec<f32>;
        let rows: &[f32] = if to_sample.len() == plan.len() {
            &logits
        } else {
            gathered = to_sample
                .iter()
                .flat_map(|&(row, _)| &logits[row * vocab..(row + 1) * vocab])
                .copied()
                .collect();
            &gathered
        };
        // The plan is sorted by sequence index, so `to_sample` is too: the samplers line up.
        let mut samplers: Vec<&mut SequenceSampler> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| to_sample.binary_search_by_key(i, |&(_, j)| j).is_ok())
            .map(|(_, s)| &mut s.sampler)
            .collect();
        let sampled = sample_batch(rows, vocab, &mut samplers);

        for (&(_, i), out) in to_sample.iter().zip(sampled) {
            let s = &mut seqs[i];
            s.tokens.push(out.token_id);
            s.logprobs.push(out.logprob);
            s.top_logprobs.push(out.top_logprobs);
            let generated = s.tokens.len() - s.num_prompt_tokens;
            let p = &s.request.sampling;
            // As vLLM: nothing stops a sequence before min_tokens (the sampler masks stop tokens).
            let is_stop_token = (!p.ignore_eos && s.request.eos_token_ids.contains(&out.token_id))
                || p.stop_token_ids.contains(&out.token_id);
            s.finish = if is_stop_token && generated >= p.min_tokens {
                Some(FinishReason::Stop)
            } else if generated >= s.request.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            on_token(TokenEvent {
                seq_index: i,
                token_id: out.token_id,
                logprob: out.logprob,
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::kv_cache::KvCacheSpec;

    const VOCAB: usize = 8;

    /// Each row favours the token after the sequence's last one: `(last + 1) % VOCAB` at 5,
    /// every other token at 0. Writes nothing to the cache.
    struct NextTokenModel {
        device: Device,
    }

    impl Model for NextTokenModel {
        fn kv_cache_spec(&self) -> KvCacheSpec {
            KvCacheSpec { num_layers: 1, num_kv_heads: 1, head_dim: 1, dtype: DType::F32 }
        }
        fn vocab_size(&self) -> usize {
            VOCAB
        }
        fn weight_bytes(&self) -> usize {
            0
        }
        fn device(&self) -> &Device {
            &self.device
        }
        fn forward(&self, input: &ForwardInput, _kv: &mut KvCache) -> candle_core::Result<Tensor> {
            let last = input.token_ids.index_select(&input.logits_indices, 0)?.to_vec1::<u32>()?;
            let mut logits = vec![0f32; last.len() * VOCAB];
            for (row, &t) in last.iter().enumerate() {
                logits[row * VOCAB + (t as usize + 1) % VOCAB] = 5.0;
            }
            Tensor::from_vec(logits, (last.len(), VOCAB), &self.device)
        }
    }

    fn request(prompt: &[u32], sampling: SamplingParams, max_tokens: usize) -> GenerationRequest {
        GenerationRequest { prompt_token_ids: prompt.to_vec(), sampling, max_tokens, eos_token_ids: vec![3] }
    }

    fn run(requests: Vec<GenerationRequest>, limits: &StepLimits) -> Result<Vec<GenerationOutput>> {
        let model = NextTokenModel { device: Device::Cpu };
        let mut kv = KvCache::new(model.kv_cache_spec(), 4, 64, &Device::Cpu)?;
        let mut allocator = BlockAllocator::new(64);
        let out = generate(&model, &mut kv, &mut allocator, requests, limits, |_| {});
        assert_eq!(allocator.num_free_blocks(), 64, "every block returned");
        out
    }

    fn tokens(sampling: SamplingParams) -> (Vec<u32>, FinishReason) {
        let out = run(vec![request(&[0], sampling, 10)], &StepLimits::default()).unwrap().remove(0);
        (out.token_ids, out.finish_reason)
    }

    #[test]
    fn sampler_stop_tokens_end_the_sequence_unless_min_tokens_or_ignore_eos() {
        let d = SamplingParams::default;
        assert_eq!(tokens(d()), (vec![1, 2, 3], FinishReason::Stop), "EOS 3 stops");
        let stop_at_2 = SamplingParams { stop_token_ids: vec![2], ..d() };
        assert_eq!(tokens(stop_at_2), (vec![1, 2], FinishReason::Stop));
        let ignore = SamplingParams { ignore_eos: true, ..d() };
        assert_eq!(tokens(ignore), (vec![1, 2, 3, 4, 5, 6, 7, 0, 1, 2], FinishReason::Length));
        // EOS is masked for the first 5 tokens: after 2 the best left is the first 0 logit.
        let min5 = SamplingParams { min_tokens: 5, ..d() };
        assert_eq!(tokens(min5), (vec![1, 2, 0, 1, 2, 3], FinishReason::Stop));
    }

    #[test]
    fn sampler_min_tokens_above_max_tokens_and_bad_bias_are_rejected() {
        let d = SamplingParams::default;
        let err =
            run(vec![request(&[0], SamplingParams { min_tokens: 11, ..d() }, 10)], &StepLimits::default())
                .unwrap_err();
        assert_eq!(err.to_string(), "request 0: min_tokens (11) must be at most max_tokens (10)");
        let bias = SamplingParams { logit_bias: [(8, 1.0)].into(), ..d() };
        let err = run(vec![request(&[0], bias, 10)], &StepLimits::default()).unwrap_err();
        assert_eq!(err.to_string(), "request 0: logit_bias token id 8 is outside the vocabulary (size 8)");
    }

    #[test]
    fn sampler_outputs_line_up_with_their_sequences_beside_prompt_chunks() {
        // Seeded sampling at a high temperature (every token likely), with top logprobs.
        let sampled = |seed| SamplingParams {
            temperature: 5.0,
            seed: Some(seed),
            top_logprobs: 2,
            ..Default::default()
        };
        let long_prompt: Vec<u32> = (0..30).map(|i| i % 3).collect();
        let alone: Vec<GenerationOutput> = [(vec![5], 1), (long_prompt.clone(), 2), (vec![6, 7], 3)]
            .into_iter()
            .map(|(prompt, seed)| {
                run(vec![request(&prompt, sampled(seed), 6)], &StepLimits::default()).unwrap().remove(0)
            })
            .collect();
        // Chunks of 4 prompt tokens: the long prompt's partial rows sit between sampled ones.
        let limits =
            StepLimits { max_prefill_chunk_tokens: 4, max_num_batched_tokens: 8, ..Default::default() };
        let requests = vec![
            request(&[5], sampled(1), 6),
            request(&long_prompt, sampled(2), 6),
            request(&[6, 7], sampled(3), 6),
        ];
        let together = run(requests, &limits).unwrap();
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.token_ids, t.token_ids);
            assert_eq!(a.logprobs, t.logprobs);
            assert_eq!(a.top_logprobs, t.top_logprobs);
            assert_eq!(t.top_logprobs.len(), t.token_ids.len());
            assert!(t.top_logprobs.iter().all(|top| top.len() == 2));
        }
        // The top logprob follows the sequence's own last token (the model favours last + 1).
        let first = &together[2];
        assert_eq!(first.top_logprobs[0][0].0, 0, "after prompt [6, 7] the favourite is 0");
    }
}
