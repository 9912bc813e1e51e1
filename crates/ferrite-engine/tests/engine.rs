//! The engine thread end to end: many requests at once give the reference tokens, preemption
//! and prefix caching keep outputs exact, dropped streams free their blocks, the queue bound is
//! honest, a failing model fails live requests without hanging them and the engine goes on.

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrite_engine::forward_input::ForwardInput;
use ferrite_engine::kv_cache::{KvCache, KvCacheSpec};
use ferrite_engine::model::arch::Model;
use ferrite_engine::model::tokenizer::TokenizerConfig;
use ferrite_engine::{
    load, spawn_engine, CacheConfig, DetokenizerParams, EmbedRequest, EngineConfig, EngineHandle,
    FinishReason, LoadOptions, Pooling, PoolingType, Request, RequestError, RequestEvent, RequestStream,
    SamplingParams, SchedulerConfig, SchedulingPolicy, StopReason, SubmitError, Tokenizer, Usage,
};

fn config(num_blocks: usize, max_num_seqs: usize, max_waiting: usize) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig { max_num_batched_tokens: 256, max_num_seqs, ..Default::default() },
        cache: CacheConfig { num_blocks, ..Default::default() },
        max_model_len: 1024,
        max_waiting_requests: max_waiting,
        ..EngineConfig::default()
    }
}

fn start(name: &str, cfg: EngineConfig) -> EngineHandle {
    let m = load(fixture(name).to_str().unwrap(), &LoadOptions::default()).unwrap();
    let eos = m.eos_token_ids();
    spawn_engine(m.model, Arc::new(m.tokenizer), eos, cfg).unwrap().0
}

fn request(prompt: &[u32], max_tokens: usize) -> Request {
    Request {
        request_id: "test".into(),
        prompt_token_ids: prompt.to_vec(),
        sampling: SamplingParams { ignore_eos: true, ..SamplingParams::default() },
        detokenize: DetokenizerParams { skip_special_tokens: true, ..DetokenizerParams::default() },
        max_tokens,
        n: 1,
        prompt_logprobs: None,
        grammar: None,
        arrival: Instant::now(),
        priority: 0,
        deadlines: Default::default(),
    }
}

/// What a request produced, per sample, and its usage.
#[derive(Debug)]
struct Collected {
    tokens: Vec<Vec<u32>>,
    text: Vec<String>,
    finish: Vec<Option<(FinishReason, Option<StopReason>)>>,
    usage: Usage,
}

fn collect(mut stream: RequestStream, n: usize) -> Result<Collected, String> {
    let mut tokens = vec![vec![]; n];
    let mut text = vec![String::new(); n];
    let mut finish = vec![None; n];
    loop {
        match stream.blocking_next() {
            Some(RequestEvent::Token(t)) => {
                assert!(finish[t.index].is_none(), "no token after a sample's finish");
                tokens[t.index].push(t.token_id);
                text[t.index].push_str(&t.text);
                finish[t.index] = t.finish;
            }
            Some(RequestEvent::Finished(usage)) => {
                assert!(stream.blocking_next().is_none(), "nothing after Finished");
                assert!(finish.iter().all(Option::is_some), "every sample finished before the usage");
                return Ok(Collected { tokens, text, finish, usage });
            }
            Some(RequestEvent::Embedding { .. }) => panic!("a generation request got an embedding"),
            Some(RequestEvent::Stopped { .. }) => panic!("a request without budgets was stopped by one"),
            Some(RequestEvent::Error(e)) => return Err(e),
            None => panic!("stream ended without Finished or Error"),
        }
    }
}

#[test]
fn concurrent_requests_match_the_reference() {
    let r = reference(&fixture("mistral"));
    let engine = start("mistral", config(256, 16, 64));
    let streams: Vec<_> = r
        .prompts
        .iter()
        .map(|p| engine.submit(request(&p.prompt_ids, p.greedy_ids.len())).unwrap())
        .collect();
    for (p, s) in r.prompts.iter().zip(streams) {
        let c = collect(s, 1).unwrap();
        assert_eq!(c.tokens[0], p.greedy_ids, "prompt of {} tokens", p.prompt_ids.len());
        assert_eq!(c.finish[0], Some((FinishReason::Length, None)));
        assert_eq!(c.usage.prompt_tokens, p.prompt_ids.len());
        assert_eq!(c.usage.completion_tokens, p.greedy_ids.len());
        assert!(c.usage.first_token.unwrap() >= c.usage.first_scheduled.unwrap());
    }
    assert_eq!(engine.stats().num_used_blocks, 0, "all blocks back after every request finished");
}

/// Every reference prompt of fixture `name` submitted at once to an engine configured by
/// `cfg`: each gives transformers' greedy tokens, and the engine had to preempt (its cache is
/// too small for all at once) yet gets every block back.
fn exact_when_squeezed(name: &str, cfg: EngineConfig) {
    let r = reference(&fixture(name));
    let engine = start(name, cfg);
    let streams: Vec<_> = r
        .prompts
        .iter()
        .map(|p| engine.submit(request(&p.prompt_ids, p.greedy_ids.len())).unwrap())
        .collect();
    for (p, s) in r.prompts.iter().zip(streams) {
        let got = collect(s, 1).unwrap().tokens.remove(0);
        assert_eq!(got, p.greedy_ids, "{name}: prompt of {} tokens", p.prompt_ids.len());
    }
    let stats = engine.stats();
    assert!(stats.num_preemptions > 0, "{name}: the cache was too small for all at once: {stats:?}");
    assert_eq!(stats.num_used_blocks, 0, "{name}");
}

#[test]
fn preemption_under_a_small_cache_keeps_outputs_exact() {
    // 40 blocks of 16 = 640 tokens for prompts summing to ~700 plus outputs: must preempt.
    exact_when_squeezed("qwen2", config(40, 16, 64));
}

/// Every family beyond Llama, squeezed: a 24-block pool (384 tokens: the longest prompt and its
/// output need 21 blocks) and a budget of 16 tokens per step (prompts prefilled in chunks beside
/// decodes), so sequences are preempted and recomputed; each still gives transformers' greedy
/// tokens.
#[test]
fn new_families_keep_outputs_exact_when_squeezed() {
    for name in ["gemma2", "gemma3", "granite", "olmo2", "phi3", "qwen3_moe", "mixtral"] {
        let mut cfg = config(24, 16, 64);
        cfg.scheduler.max_num_batched_tokens = 16;
        exact_when_squeezed(name, cfg);
    }
}

/// Under `--scheduling-policy priority`, a priority-0 request submitted behind 32 long
/// priority-10 requests (two run at a time) gets its first token before every one of them that
/// had not started when it arrived, and every output is still the reference's.
#[test]
fn priority_zero_overtakes_thirty_two_waiting_requests() {
    let r = reference(&fixture("qwen2"));
    let long = r.prompts.iter().max_by_key(|p| p.prompt_ids.len()).unwrap();
    let short = &r.prompts[3];
    let mut cfg = config(256, 2, 64);
    cfg.scheduler.policy = SchedulingPolicy::Priority;
    let engine = start("qwen2", cfg);
    let low: Vec<_> = (0..32)
        .map(|_| engine.submit(Request { priority: 10, ..request(&long.prompt_ids, 16) }).unwrap())
        .collect();
    let urgent = engine.submit(Request { priority: 0, ..request(&short.prompt_ids, 4) }).unwrap();
    let urgent = collect(urgent, 1).unwrap();
    assert_eq!(urgent.tokens[0], short.greedy_ids[..4]);
    let (urgent_scheduled, urgent_first) =
        (urgent.usage.first_scheduled.unwrap(), urgent.usage.first_token.unwrap());
    let mut overtaken = 0;
    for s in low {
        let c = collect(s, 1).unwrap();
        assert_eq!(c.tokens[0], long.greedy_ids[..16], "a low-priority output changed");
        // Scheduled after the urgent one was: it was still waiting when the engine took the
        // urgent request in (the client's submit time would race with the engine's intake).
        if c.usage.first_scheduled.unwrap() > urgent_scheduled {
            assert!(c.usage.first_token.unwrap() > urgent_first, "a waiting low-priority request went first");
            overtaken += 1;
        }
    }
    assert!(overtaken >= 28, "only {overtaken} of 32 were still waiting: the check would say little");
}

/// A priority is refused where nothing would honour it, naming the flag.
#[test]
fn priority_needs_the_priority_policy() {
    let r = reference(&fixture("qwen2"));
    let engine = start("qwen2", config(64, 4, 8));
    let Err(SubmitError::Invalid(e)) =
        engine.submit(Request { priority: 5, ..request(&r.prompts[1].prompt_ids, 2) })
    else {
        panic!("a priority under FCFS was accepted")
    };
    assert_eq!(e.param(), "priority");
    assert!(e.to_string().contains("--scheduling-policy priority"), "{e}");
    // Priority 0 (the default) is every request's under FCFS.
    assert!(engine.submit(Request { priority: 0, ..request(&r.prompts[1].prompt_ids, 2) }).is_ok());
}

#[test]
fn prefix_cache_skips_the_shared_prompt_and_changes_nothing() {
    let r = reference(&fixture("llama"));
    let p = r.prompts.iter().max_by_key(|p| p.prompt_ids.len()).unwrap();
    let engine = start("llama", config(256, 16, 64));
    let first = collect(engine.submit(request(&p.prompt_ids, 8)).unwrap(), 1).unwrap();
    let second = collect(engine.submit(request(&p.prompt_ids, 8)).unwrap(), 1).unwrap();
    assert_eq!(first.usage.cached_tokens, 0);
    // Whole blocks only, and never the last prompt token (it must produce logits).
    assert_eq!(second.usage.cached_tokens, (p.prompt_ids.len() - 1) / 16 * 16);
    assert_eq!(first.tokens, second.tokens);
    assert_eq!(first.tokens[0], p.greedy_ids[..8]);
    let stats = engine.stats();
    assert!(stats.prefix_cache_hit_tokens >= second.usage.cached_tokens as u64);
}

#[test]
fn n_samples_share_a_prompt_and_seeds_reproduce() {
    let r = reference(&fixture("qwen3"));
    let p = &r.prompts[3];
    let engine = start("qwen3", config(256, 16, 64));
    let sampled = |seed| {
        let mut req = request(&p.prompt_ids, 10);
        req.n = 3;
        req.sampling =
            SamplingParams { temperature: 1.0, seed: Some(seed), ignore_eos: true, ..Default::default() };
        collect(engine.submit(req).unwrap(), 3).unwrap()
    };
    let a = sampled(42);
    let b = sampled(42);
    assert_eq!(a.tokens, b.tokens, "same seed, same samples");
    assert!(a.tokens.iter().all(|t| t.len() == 10));
    assert_ne!(a.tokens[0], a.tokens[1], "the samples differ from each other");
    assert_eq!(a.usage.completion_tokens, 30, "usage counts every sample");
    assert_eq!(a.usage.prompt_tokens, p.prompt_ids.len());
    // Samples 1 and 2 of the first request reused sample 0's full prompt blocks, and all three
    // samples of the second request found them too.
    let shared = (p.prompt_ids.len() - 1) / 16 * 16;
    assert!(shared > 0);
    assert_eq!(engine.stats().prefix_cache_hit_tokens, (2 + 3) as u64 * shared as u64);
}

#[test]
fn stop_strings_end_the_text_before_the_match() {
    let r = reference(&fixture("llama"));
    let p = &r.prompts[4];
    let engine = start("llama", config(256, 16, 64));
    let full = collect(engine.submit(request(&p.prompt_ids, 24)).unwrap(), 1).unwrap();
    let text = &full.text[0];
    // A stop string from the middle of the greedy text (4 chars starting a third of the way in).
    let start_char = text.char_indices().nth(text.chars().count() / 3).unwrap().0;
    let stop: String = text[start_char..].chars().take(4).collect();
    let mut req = request(&p.prompt_ids, 24);
    req.detokenize.stop = vec![stop.clone()];
    let cut = collect(engine.submit(req).unwrap(), 1).unwrap();
    let expected = &text[..text.find(&stop).unwrap()];
    assert_eq!(cut.text[0], expected);
    assert_eq!(cut.finish[0], Some((FinishReason::Stop, Some(StopReason::Text(stop)))));
    assert!(cut.tokens[0].len() < 24);
}

#[test]
fn submit_refuses_what_can_never_run_with_the_numbers() {
    let engine = start("llama", config(8, 16, 64));
    let refused = |r: Request| match engine.submit(r) {
        Err(SubmitError::Invalid(why)) => why,
        other => panic!("expected a refusal, got {:?}", other.map(|_| "a stream")),
    };
    let (prompt_tokens, max_model_len) = (1000, 1024);
    assert_eq!(
        refused(request(&[1; 1000], 100)),
        RequestError::MaxTokens { prompt_tokens, max_tokens: 100, max_model_len }
    );
    // A count near usize::MAX must not wrap into something that fits.
    let why = refused(request(&[1; 1000], usize::MAX - 1));
    assert_eq!(why, RequestError::MaxTokens { prompt_tokens, max_tokens: usize::MAX - 1, max_model_len });
    assert_eq!(why.param(), "max_tokens");
    assert!(why.to_string().contains("exceeds max_model_len 1024"), "{why}");
    let why = refused(request(&[1; 1024], 1));
    assert_eq!(why, RequestError::PromptTooLong { prompt_tokens: 1024, max_model_len });
    assert_eq!(why.param(), "prompt");
    // 8 blocks of 16 = 128 tokens of cache.
    let why = refused(request(&[1; 100], 100));
    let needed = RequestError::KvCacheTooSmall {
        prompt_tokens: 100,
        max_tokens: 100,
        needed_blocks: 13,
        block_size: 16,
        total_blocks: 8,
    };
    assert_eq!(why, needed);
    assert_eq!(why.param(), "max_tokens");
    let why = refused(request(&[99_999], 4));
    assert_eq!(why, RequestError::UnknownToken { param: "prompt", id: 99_999, vocab_size: 448 });
    assert_eq!(why.to_string(), "prompt token id 99999 is outside the vocabulary (size 448)");
    assert_eq!(refused(request(&[], 4)), RequestError::EmptyPrompt);
    // Beyond the engine's `max_logprobs` (20 here).
    let mut r = request(&[1], 4);
    r.sampling.top_logprobs = 21;
    let why = refused(r);
    assert_eq!(
        (why.param(), why.to_string().as_str()),
        ("top_logprobs", "top_logprobs must be at most 20, got 21")
    );
    let mut r = request(&[1], 4);
    r.sampling.top_p = 0.0;
    assert_eq!(refused(r).param(), "top_p");
    // The engine still serves.
    assert!(collect(engine.submit(request(&[1, 2, 3], 2)).unwrap(), 1).is_ok());
}

#[test]
fn the_queue_bound_is_honest() {
    // One running sequence at a time, one waiting request allowed.
    let engine = start("llama", config(256, 1, 1));
    let mut a = engine.submit(request(&[1, 5, 9], 400)).unwrap();
    assert!(matches!(a.blocking_next(), Some(RequestEvent::Token(_))), "a is running now");
    let b = engine.submit(request(&[1, 6], 4)).unwrap();
    match engine.submit(request(&[1, 7], 4)) {
        Err(SubmitError::QueueFull(1)) => {}
        other => panic!("expected QueueFull(1), got {:?}", other.err()),
    }
    drop(a); // abort a: b gets the engine
    assert!(collect(b, 1).is_ok());
    assert_eq!(engine.stats().num_used_blocks, 0, "the aborted request's blocks were freed");
    assert!(collect(engine.submit(request(&[1, 7], 4)).unwrap(), 1).is_ok());
}

#[test]
fn shutdown_finishes_running_requests_and_refuses_new_ones() {
    let m = load(fixture("llama").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let eos = m.eos_token_ids();
    let (engine, thread) = spawn_engine(m.model, Arc::new(m.tokenizer), eos, config(256, 16, 64)).unwrap();
    let running = engine.submit(request(&[1, 5, 9], 30)).unwrap();
    engine.shutdown();
    assert_eq!(engine.submit(request(&[1], 2)).err(), Some(SubmitError::ShuttingDown));
    assert_eq!(collect(running, 1).unwrap().tokens[0].len(), 30);
    thread.join().unwrap();
}

/// A toy model: the next token is (last token + 1) mod vocab; token 13 in the batch panics.
struct Toy {
    vocab: usize,
    device: Device,
}

impl Model for Toy {
    fn kv_cache_spec(&self) -> KvCacheSpec {
        KvCacheSpec { num_layers: 1, num_kv_heads: 1, head_dim: 2, dtype: DType::F32 }
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn weight_bytes(&self) -> usize {
        0
    }
    fn device(&self) -> &Device {
        &self.device
    }
    /// Hidden states, where asked for: row `[token id, position]` of each token.
    fn forward_with_hidden(
        &self,
        input: &ForwardInput,
        _kv: &mut KvCache,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let ids = input.token_ids.to_vec1::<u32>()?;
        assert!(!ids.contains(&13), "toy model: token 13 is poison");
        let last = input.logits_indices.to_vec1::<u32>()?;
        let mut logits = vec![0f32; last.len() * self.vocab];
        for (row, &i) in last.iter().enumerate() {
            logits[row * self.vocab + (ids[i as usize] as usize + 1) % self.vocab] = 10.0;
        }
        let logits = Tensor::from_vec(logits, (last.len(), self.vocab), &self.device)?;
        let hidden = match &input.hidden_indices {
            Some(rows) => {
                let rows = rows.to_vec1::<u32>()?;
                let values: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| [ids[r as usize] as f32, input.positions[r as usize] as f32])
                    .collect();
                Some(Tensor::from_vec(values, (rows.len(), 2), &self.device)?)
            }
            None => None,
        };
        Ok((logits, hidden))
    }
}

#[test]
fn a_failing_step_fails_live_requests_and_the_engine_goes_on() {
    let dir = fixture("llama");
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), TokenizerConfig::default()).unwrap();
    let toy = Toy { vocab: 448, device: Device::Cpu };
    let (engine, _t) = spawn_engine(Box::new(toy), Arc::new(tok), vec![], config(64, 16, 64)).unwrap();
    let ok = collect(engine.submit(request(&[20], 5)).unwrap(), 1).unwrap();
    assert_eq!(ok.tokens[0], vec![21, 22, 23, 24, 25]);
    // Counting up from 10 reaches 13 at the 3rd step: that step panics inside the model.
    let bad = engine.submit(request(&[10], 50)).unwrap();
    let err = collect(bad, 1).unwrap_err();
    assert!(err.contains("token 13 is poison"), "{err}");
    assert!(engine.is_alive());
    assert_eq!(collect(engine.submit(request(&[30], 3)).unwrap(), 1).unwrap().tokens[0], vec![31, 32, 33]);
    assert_eq!(engine.stats().num_used_blocks, 0);
}

/// Scores a prompt made of a reference prompt and its greedy continuation: the continuation's
/// prompt logprobs must be the ones transformers gave those tokens while generating them, and
/// each such token must be the most likely one at its position.
#[test]
fn prompt_logprobs_score_the_prompt_as_the_reference_does() {
    let r = reference(&fixture("mistral"));
    let mut cfg = config(256, 16, 64);
    cfg.scheduler.max_num_batched_tokens = 7; // the prompts are scored over several chunks
    let engine = start("mistral", cfg);
    for p in &r.prompts {
        let prompt: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().collect();
        // Twice: the second time the prompt is in the prefix cache, which must not be used.
        for round in 0..2 {
            let mut req = request(&prompt, 1);
            req.n = 2;
            req.prompt_logprobs = Some(3);
            let mut stream = engine.submit(req).unwrap();
            let mut scored = Vec::new();
            loop {
                match stream.blocking_next() {
                    Some(RequestEvent::Token(t)) => scored.extend(t.prompt_logprobs.map(|lp| (t.index, lp))),
                    Some(RequestEvent::Finished(_)) => break,
                    other => panic!("unexpected event {other:?}"),
                }
            }
            assert_eq!(scored.len(), 1, "one token carries the prompt's scores");
            let (index, lp) = scored.pop().unwrap();
            assert_eq!(index, 0, "sample 0 carries them");
            assert_eq!(lp.len(), prompt.len(), "round {round}");
            assert_eq!((lp[0].token_id, lp[0].logprob), (prompt[0], None));
            for (pos, entry) in lp.iter().enumerate().skip(1) {
                assert_eq!(entry.token_id, prompt[pos]);
                let logprob = entry.logprob.unwrap();
                assert_eq!(entry.top_logprobs.len(), 3);
                assert!(entry.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first");
                assert!(logprob <= entry.top_logprobs[0].1 + 1e-6, "nothing beats the top token");
            }
            let continuation = &lp[p.prompt_ids.len()..];
            for ((entry, &id), &want) in continuation.iter().zip(&p.greedy_ids).zip(&p.greedy_logprobs) {
                let got = entry.logprob.unwrap();
                assert!((got - want).abs() < 1e-3, "token {id}: logprob {got}, transformers {want}");
                assert_eq!(entry.top_logprobs[0].0, id, "the greedy token is the most likely");
            }
        }
    }
    assert_eq!(engine.stats().num_used_blocks, 0);
}

/// A prompt computed one token per step (six decoding sequences take the rest of a 7-token
/// budget): each of its 1-token chunks still needs its logits row scored.
#[test]
fn prompt_logprobs_survive_one_token_chunks() {
    let r = reference(&fixture("mistral"));
    let p = &r.prompts[0];
    let prompt: Vec<u32> = p.prompt_ids.iter().chain(&p.greedy_ids).copied().take(8).collect();
    assert_eq!(prompt.len(), 8);
    let mut cfg = config(256, 16, 64);
    cfg.scheduler.max_num_batched_tokens = 7;
    let engine = start("mistral", cfg);
    let mut decoding: Vec<_> = (0..6).map(|_| engine.submit(request(&prompt[..2], 200)).unwrap()).collect();
    for s in &mut decoding {
        assert!(
            matches!(s.blocking_next(), Some(RequestEvent::Token(_))),
            "decoding before the scored prompt"
        );
    }
    let mut req = request(&prompt, 2);
    req.prompt_logprobs = Some(1);
    let mut stream = engine.submit(req).unwrap();
    let mut scored = None;
    loop {
        match stream.blocking_next() {
            Some(RequestEvent::Token(t)) => scored = scored.or(t.prompt_logprobs),
            Some(RequestEvent::Finished(_)) => break,
            other => panic!("unexpected event {other:?}"),
        }
    }
    // They decoded before the scored prompt came and still do: every step of it shared the
    // budget with six decodes.
    assert_eq!(engine.stats().num_running, 6, "the six decoders outlive the scored request");
    drop(decoding);
    let lp = scored.expect("the prompt's scores came with the first token");
    assert_eq!(lp.len(), 8);
    assert!(lp[1..].iter().all(|e| e.logprob.is_some()), "every position scored: {lp:?}");
    assert_eq!(lp.iter().map(|e| e.token_id).collect::<Vec<_>>(), prompt);
}

/// The toy model over 8 tokens with EOS 3, behind an engine whose step takes `budget` tokens.
fn toy_engine(budget: usize) -> EngineHandle {
    let dir = fixture("llama");
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), TokenizerConfig::default()).unwrap();
    let toy = Toy { vocab: 8, device: Device::Cpu };
    let mut cfg = config(64, 16, 64);
    cfg.scheduler.max_num_batched_tokens = budget;
    spawn_engine(Box::new(toy), Arc::new(tok), vec![3], cfg).unwrap().0
}

fn sampled(
    engine: &EngineHandle,
    prompt: &[u32],
    sampling: SamplingParams,
    max_tokens: usize,
) -> RequestStream {
    engine.submit(Request { sampling, ..request(prompt, max_tokens) }).unwrap()
}

#[test]
fn stop_tokens_end_a_sample_unless_min_tokens_or_ignore_eos() {
    let engine = toy_engine(256);
    let run = |sampling: SamplingParams| {
        let c = collect(sampled(&engine, &[0], sampling, 10), 1).unwrap();
        (c.tokens[0].clone(), c.finish[0].clone().unwrap().0)
    };
    let d = SamplingParams::default;
    assert_eq!(run(d()), (vec![1, 2, 3], FinishReason::Stop), "EOS 3 stops");
    assert_eq!(run(SamplingParams { stop_token_ids: vec![2], ..d() }), (vec![1, 2], FinishReason::Stop));
    let through = (vec![1, 2, 3, 4, 5, 6, 7, 0, 1, 2], FinishReason::Length);
    assert_eq!(run(SamplingParams { ignore_eos: true, ..d() }), through);
    // EOS is masked for the first 5 tokens: after 2 the best left is the first 0 logit.
    let min5 = SamplingParams { min_tokens: 5, ..d() };
    assert_eq!(run(min5), (vec![1, 2, 0, 1, 2, 3], FinishReason::Stop));
}

#[test]
fn min_tokens_above_max_tokens_and_a_bias_outside_the_vocabulary_are_refused() {
    let engine = toy_engine(256);
    let d = SamplingParams::default;
    let refused = |sampling: SamplingParams| match engine.submit(Request { sampling, ..request(&[0], 10) }) {
        Err(SubmitError::Invalid(why)) => (why.param(), why.to_string()),
        other => panic!("expected a refusal, got {:?}", other.map(|_| "a stream")),
    };
    let (param, message) = refused(SamplingParams { min_tokens: 11, ..d() });
    assert_eq!((param, message.as_str()), ("min_tokens", "min_tokens (11) must be at most max_tokens (10)"));
    let (param, message) = refused(SamplingParams { logit_bias: [(8, 1.0)].into(), ..d() });
    assert_eq!(
        (param, message.as_str()),
        ("logit_bias", "logit_bias token id 8 is outside the vocabulary (size 8)")
    );
}

/// Seeded samples, with top logprobs, are the same alone and beside others' prompt chunks
/// (a budget of 8 tokens cuts a 30-token prompt into chunks whose rows sit between sampled
/// ones): each sampled row lines up with its own sequence.
#[test]
fn sampled_rows_line_up_with_their_sequences_beside_prompt_chunks() {
    let hot = |seed| SamplingParams {
        temperature: 5.0,
        seed: Some(seed),
        top_logprobs: 2,
        ignore_eos: true,
        ..Default::default()
    };
    let long_prompt: Vec<u32> = (0..30).map(|i| i % 3).collect();
    let prompts = [(vec![5], 1), (long_prompt, 2), (vec![6, 7], 3)];
    let logprobs = |stream: RequestStream| {
        let mut out = Vec::new();
        let mut stream = stream;
        while let Some(RequestEvent::Token(t)) = stream.blocking_next() {
            out.push((t.token_id, t.logprob, t.top_logprobs));
        }
        out
    };
    let alone: Vec<_> =
        prompts.iter().map(|(p, seed)| logprobs(sampled(&toy_engine(256), p, hot(*seed), 6))).collect();
    let engine = toy_engine(8);
    let streams: Vec<_> = prompts.iter().map(|(p, seed)| sampled(&engine, p, hot(*seed), 6)).collect();
    let together: Vec<_> = streams.into_iter().map(logprobs).collect();
    assert_eq!(alone, together);
    assert!(together.iter().all(|steps| steps.len() == 6 && steps.iter().all(|s| s.2.len() == 2)));
    // The top logprob follows the sequence's own last token (the model favours last + 1).
    assert_eq!(together[2][0].2[0].0, 0, "after prompt [6, 7] the favourite is 0");
}

/// The toy model behind an engine that pools as `pooling` says (not normalised unless asked),
/// in steps of `budget` tokens over a cache of `num_blocks` blocks of 16.
fn toy_embedder(pooling: PoolingType, normalize: bool, budget: usize, num_blocks: usize) -> EngineHandle {
    let dir = fixture("llama");
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), TokenizerConfig::default()).unwrap();
    let toy = Toy { vocab: 448, device: Device::Cpu };
    let mut cfg = config(num_blocks, 16, 64);
    cfg.scheduler.max_num_batched_tokens = budget;
    cfg.pooling = Ok(Pooling {
        pooling_type: pooling,
        normalize,
        source: "test".into(),
        matryoshka: Some(vec![1]),
        hidden_size: 2,
    });
    spawn_engine(Box::new(toy), Arc::new(tok), vec![], cfg).unwrap().0
}

fn embed_request(prompt: &[u32], dimensions: Option<usize>) -> EmbedRequest {
    EmbedRequest {
        request_id: "embed".into(),
        inputs: vec![prompt.to_vec()],
        dimensions,
        arrival: Instant::now(),
        priority: 0,
    }
}

/// An embedding stream's vectors, by input index (each exactly once), then its usage, then
/// nothing.
fn embeddings(mut stream: RequestStream, n: usize) -> (Vec<Vec<f32>>, Usage) {
    let mut vectors = vec![None; n];
    loop {
        match stream.blocking_next() {
            Some(RequestEvent::Embedding { index, vector }) => {
                assert!(vectors[index].replace(vector).is_none(), "input {index} answered twice")
            }
            Some(RequestEvent::Finished(usage)) => {
                assert!(stream.blocking_next().is_none(), "nothing after Finished");
                let vectors = vectors.into_iter().map(|v| v.expect("every input answered")).collect();
                return (vectors, usage);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The one vector of a one-input request, and its usage.
fn embedding(stream: RequestStream) -> (Vec<f32>, Usage) {
    let (mut vectors, usage) = embeddings(stream, 1);
    (vectors.remove(0), usage)
}

/// The toy's hidden row of a token is `[token id, position]`, so each pooling has a known
/// answer. Prompts of 23 tokens are prefilled 5 tokens a step beside a generation request: the
/// vector pools every chunk (mean), the first (CLS) or the last (last-token); nothing is
/// sampled, the usage counts the input only, and every block comes back.
#[test]
fn embeddings_pool_the_hidden_rows_across_chunks_beside_generation() {
    let prompt: Vec<u32> = (100..123).collect();
    let mean_id = (100..123).sum::<u32>() as f32 / 23.0;
    for (pooling, want) in [
        (PoolingType::Mean, [mean_id, 11.0]),
        (PoolingType::Cls, [100.0, 0.0]),
        (PoolingType::Last, [122.0, 22.0]),
    ] {
        let engine = toy_embedder(pooling, false, 5, 64);
        let generating = engine.submit(request(&[200], 12)).unwrap();
        let (vector, usage) = embedding(engine.embed(embed_request(&prompt, None)).unwrap());
        assert_eq!(vector, want, "{pooling:?}");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (23, 0));
        assert_eq!(collect(generating, 1).unwrap().tokens[0], (201..213).collect::<Vec<u32>>());
        assert_eq!(engine.stats().num_used_blocks, 0, "{pooling:?}");
    }
}

/// Normalisation and Matryoshka truncation: `dimensions` keeps the leading values, then the
/// vector is normalised; a width the model was not trained for is refused, naming the field.
#[test]
fn embeddings_truncate_then_normalise() {
    let engine = toy_embedder(PoolingType::Last, true, 256, 64);
    let (full, _) = embedding(engine.embed(embed_request(&[7, 3, 4], None)).unwrap());
    let norm = (4f32 * 4.0 + 2.0 * 2.0).sqrt();
    assert!((full[0] - 4.0 / norm).abs() < 1e-6 && (full[1] - 2.0 / norm).abs() < 1e-6, "{full:?}");
    let (one, _) = embedding(engine.embed(embed_request(&[7, 3, 4], Some(1))).unwrap());
    assert_eq!(one, vec![1.0], "truncated to one value, then normalised");
    for (bad, words) in [(Some(3), "between 1 and 2"), (Some(0), "between 1 and 2")] {
        let Err(SubmitError::Invalid(e)) = engine.embed(embed_request(&[7], bad)) else {
            panic!("dimensions {bad:?} accepted")
        };
        assert_eq!(e.param(), "dimensions");
        assert!(e.to_string().contains(words), "{e}");
    }
    let Err(SubmitError::Invalid(e)) = engine.embed(embed_request(&[], None)) else {
        panic!("an empty input")
    };
    assert_eq!(e.param(), "input");
    let Err(SubmitError::Invalid(e)) = engine.embed(embed_request(&[500], None)) else { panic!("token 500") };
    assert!(e.to_string().contains("vocabulary (size 448)"), "{e}");
}

/// A cache too small for everything at once: embeddings and generations are preempted and
/// recomputed, and every vector and every output is still exact. The six inputs are one
/// request: one place in the queue, a vector per input, their tokens summed in the usage.
#[test]
fn embeddings_survive_preemption() {
    let engine = toy_embedder(PoolingType::Mean, false, 16, 8);
    let gens: Vec<_> = (0..4).map(|i| engine.submit(request(&[200 + 40 * i], 30)).unwrap()).collect();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| (20 + i..60 + 3 * i).collect()).collect();
    let request = EmbedRequest { inputs: prompts.clone(), ..embed_request(&[], None) };
    let (vectors, usage) = embeddings(engine.embed(request).unwrap(), prompts.len());
    for (p, v) in prompts.iter().zip(vectors) {
        let want = p.iter().sum::<u32>() as f32 / p.len() as f32;
        assert_eq!(v, vec![want, (p.len() - 1) as f32 / 2.0]);
    }
    assert_eq!(usage.prompt_tokens, prompts.iter().map(Vec::len).sum::<usize>());
    for (i, s) in gens.into_iter().enumerate() {
        let first = 201 + 40 * i as u32;
        assert_eq!(collect(s, 1).unwrap().tokens[0], (first..first + 30).collect::<Vec<u32>>());
    }
    let stats = engine.stats();
    assert!(stats.num_preemptions > 0, "the cache was too small for all at once: {stats:?}");
    assert_eq!(stats.num_used_blocks, 0);
}

/// The same input twice under last-token pooling: the second reads its full blocks from the
/// prefix cache and gives the same vector.
#[test]
fn last_token_embeddings_use_the_prefix_cache() {
    let engine = toy_embedder(PoolingType::Last, false, 256, 64);
    let prompt: Vec<u32> = (100..140).collect();
    let (first, u1) = embedding(engine.embed(embed_request(&prompt, None)).unwrap());
    let (second, u2) = embedding(engine.embed(embed_request(&prompt, None)).unwrap());
    assert_eq!(first, second);
    assert_eq!((u1.cached_tokens, u2.cached_tokens), (0, 32));
}

/// A model without pooling refuses embeddings, naming why, and goes on generating.
#[test]
fn a_model_without_pooling_refuses_embeddings() {
    let engine = toy_engine(256);
    let Err(SubmitError::Invalid(e)) = engine.embed(embed_request(&[1, 2], None)) else { panic!("accepted") };
    assert_eq!(e.param(), "model");
    assert!(e.to_string().contains("no pooling"), "{e}");
    assert_eq!(collect(engine.submit(request(&[0], 2)).unwrap(), 1).unwrap().tokens[0], vec![1, 2]);
}

/// `max_cost_usd` needs a device price: an engine without one refuses it, naming the flag.
#[test]
fn a_cost_cap_needs_a_device_price() {
    let engine = toy_engine(256);
    let capped = SamplingParams { max_cost_usd: Some(0.01), ..SamplingParams::default() };
    let Err(SubmitError::Invalid(e)) = engine.submit(Request { sampling: capped, ..request(&[0], 2) }) else {
        panic!("a cost cap without a price was accepted")
    };
    assert_eq!(e.param(), "max_cost_usd");
    assert!(e.to_string().contains("--device-cost-per-hour"), "{e}");
}
