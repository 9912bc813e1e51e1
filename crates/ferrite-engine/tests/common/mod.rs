//! Shared by the integration tests: the fixtures' reference files, and generation through a
//! real engine (the path the server serves).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ferrite_engine::{
    DetokenizerParams, Device, EngineBuilder, EngineConfig, EngineHandle, FinishReason, KvCacheSize,
    LoadedModel, Request, RequestEvent, RequestStream, SamplingParams, SchedulerConfig, Tokenizer,
};
use serde::Deserialize;

pub mod twin;

/// Where the model tests run: `FERRITE_TEST_DEVICE=cuda` (or `cuda:N`) puts them on a GPU
/// (scripts/gpu-check.sh does), anything else or nothing on the CPU. A GPU asked for but not
/// usable fails the test: it must never pass on the CPU instead.
pub fn test_device() -> Device {
    match std::env::var("FERRITE_TEST_DEVICE").as_deref() {
        Ok(d) if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda:").map_or(0, |n| n.parse().expect("FERRITE_TEST_DEVICE=cuda:N"));
            ferrite_engine::device::open_cuda(n).unwrap_or_else(|e| panic!("FERRITE_TEST_DEVICE={d}: {e}"))
        }
        _ => Device::Cpu,
    }
}

#[derive(Debug, Deserialize)]
pub struct PromptRef {
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub greedy_logprobs: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRef {
    pub messages: Vec<serde_json::Value>,
    pub rendered: String,
    pub prompt_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompts: Vec<PromptRef>,
    #[serde(default)]
    pub chat: Vec<ChatRef>,
}

/// The committed fixtures; `FERRITE_FIXTURES` points prebuilt test binaries at a copy (on a
/// GPU machine the repository is somewhere else than where they were built).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("FERRITE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// Every reference chat renders through the engine's tokenizer to transformers' text and ids
/// (`what` names the template in failures).
pub fn check_chat(engine: &TestEngine, r: &Reference, name: &str, what: &str) {
    for (i, c) in r.chat.iter().enumerate() {
        let messages: Vec<ferrite_engine::Message> = c
            .messages
            .iter()
            .map(|v| {
                ferrite_engine::Message::new(v["role"].as_str().unwrap(), v["content"].as_str().unwrap())
            })
            .collect();
        let (text, ids) = engine.tokenizer.encode_chat(&messages).unwrap();
        assert_eq!(text, c.rendered, "{name} chat {i}: {what}");
        assert_eq!(ids, c.prompt_ids, "{name} chat {i}: ids");
    }
}

pub fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

/// The engine the tests drive: the server's own path (scheduler, sampler, detokenizer) on
/// `model`, with logprobs allowed up to the whole vocabulary so a test can read a step's full
/// distribution.
pub struct TestEngine {
    pub handle: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    thread: Option<JoinHandle<()>>,
}

/// A roomy configuration for one test: 512 blocks of 16 tokens, 2048-token budget.
pub fn test_config() -> EngineConfig {
    EngineConfig { max_logprobs: usize::MAX, ..EngineConfig::default() }
}

/// A configuration whose token budget is `tokens` per step: a lone prompt is prefilled in
/// chunks of that many tokens.
pub fn budget(tokens: usize) -> EngineConfig {
    let c = test_config();
    EngineConfig { scheduler: SchedulerConfig { max_num_batched_tokens: tokens, ..c.scheduler }, ..c }
}

impl TestEngine {
    pub fn start(m: LoadedModel, config: EngineConfig) -> Self {
        let kv_cache = KvCacheSize::Blocks(config.cache.num_blocks);
        let started = EngineBuilder::new(config, kv_cache).start(m, None, 0.0).expect("engine starts");
        Self { handle: started.handle, tokenizer: started.tokenizer, thread: Some(started.thread) }
    }

    /// Submits every request at once (they share steps), then waits for each.
    pub fn generate(&self, requests: Vec<Request>) -> Vec<Generated> {
        let streams: Vec<_> =
            requests.into_iter().map(|r| self.handle.submit(r).expect("accepted")).collect();
        let out = streams.into_iter().map(Generated::collect).collect();
        assert_eq!(self.handle.stats().num_used_blocks, 0, "every block back after the requests");
        out
    }

    pub fn generate_one(&self, request: Request) -> Generated {
        self.generate(vec![request]).remove(0)
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one single-sample request produced.
#[derive(Debug)]
pub struct Generated {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Per token, the most likely `(token id, logprob)`, most likely first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
}

impl Generated {
    fn collect(mut stream: RequestStream) -> Self {
        let (mut token_ids, mut logprobs, mut top_logprobs, mut finish) = (vec![], vec![], vec![], None);
        loop {
            match stream.blocking_next() {
                Some(RequestEvent::Token(t)) => {
                    assert_eq!(t.index, 0, "one sample");
                    token_ids.push(t.token_id);
                    logprobs.push(t.logprob);
                    top_logprobs.push(t.top_logprobs);
                    finish = t.finish.map(|(reason, _)| reason);
                }
                Some(RequestEvent::Finished(_)) => break,
                Some(RequestEvent::Stopped { .. }) => panic!("a request without budgets was stopped by one"),
                Some(RequestEvent::Embedding { .. }) => panic!("a generation request got an embedding"),
                Some(RequestEvent::Error(e)) => panic!("request failed: {e}"),
                None => panic!("stream ended without Finished"),
            }
        }
        Self { token_ids, logprobs, top_logprobs, finish_reason: finish.expect("the last token finishes") }
    }

    /// Step `i`'s log-softmax over the whole vocabulary (the request asked for every
    /// logprob: see [`full`]).
    pub fn distribution(&self, i: usize, vocab_size: usize) -> Vec<f32> {
        let top = &self.top_logprobs[i];
        assert_eq!(top.len(), vocab_size, "step {i}: the whole vocabulary was asked for");
        let mut dense = vec![f32::NAN; vocab_size];
        for &(id, lp) in top {
            dense[id as usize] = lp;
        }
        dense
    }
}

/// Greedy through EOS for `max_tokens` tokens.
pub fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request {
        request_id: "test".into(),
        prompt_token_ids: prompt.to_vec(),
        sampling: SamplingParams { ignore_eos: true, ..SamplingParams::default() },
        detokenize: DetokenizerParams::default(),
        max_tokens,
        n: 1,
        prompt_logprobs: None,
        grammar: None,
        arrival: Instant::now(),
        priority: 0,
        deadlines: Default::default(),
    }
}

/// `request`, reporting every token's logprob at each step (needs [`test_config`]'s limit).
pub fn full(mut request: Request) -> Request {
    request.sampling.top_logprobs = usize::MAX;
    request
}

/// The log-softmax of `logits` (the reference files hold raw logits).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&x| x - lse).collect()
}

/// Gap between the two largest values.
pub fn top2_margin(values: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &v in values {
        if v > a {
            (a, b) = (v, a);
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// Largest minus smallest.
pub fn spread(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::MIN, f32::max);
    let min = values.iter().copied().fold(f32::MAX, f32::min);
    max - min
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Checks that `got` tracks `want` (the f32 run of the same requests) step by step while
/// both have generated the same tokens: each logit within `rel_tol` of the step's logit range
/// (so each log-softmax value within twice that: the log-sum-exp moves too), and the same
/// pick unless f32's top two were closer than the measured error allows (a difference of two
/// log-softmax values moves by at most twice the largest error): there a rounding may
/// honestly flip the pick, and the sequences part. The steps compared must add up to at least
/// the longest request's length, so that the rule never passes by checking first steps only.
pub fn tracks(want: &[Generated], got: &[Generated], rel_tol: f32, what: &str) {
    let vocab = want[0].top_logprobs[0].len();
    let longest = want.iter().map(|w| w.token_ids.len()).max().unwrap_or(0);
    let mut compared = 0;
    for (k, (want, got)) in want.iter().zip(got).enumerate() {
        for i in 0..want.token_ids.len() {
            compared += 1;
            let (w, g) = (want.distribution(i, vocab), got.distribution(i, vocab));
            let tol = 2.0 * rel_tol * spread(&w);
            let err = max_abs_diff(&w, &g);
            assert!(
                err < tol,
                "{what} request {k} step {i}: log-softmax max abs diff {err}, tolerance {tol}"
            );
            if got.token_ids[i] != want.token_ids[i] {
                let margin = top2_margin(&w);
                assert!(
                    margin <= 2.0 * err,
                    "{what} request {k} step {i}: a pick {margin} clear of the next changed"
                );
                break; // the contexts differ from here on
            }
        }
    }
    assert!(
        compared >= longest,
        "{what}: only {compared} steps compared before the requests parted from f32 (fewer than one whole request, {longest})"
    );
}

/// Every reported logprob of every step, as bits (with its token id).
pub fn bits(g: &Generated) -> Vec<Vec<(u32, u32)>> {
    g.top_logprobs.iter().map(|step| step.iter().map(|&(id, lp)| (id, lp.to_bits())).collect()).collect()
}
