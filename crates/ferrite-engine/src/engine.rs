//! The engine thread and its handle. One OS thread owns the scheduler, the block manager, the
//! model, the KV cache and every sequence's sampler and detokenizer; everything else talks to
//! it through an [`EngineHandle`] (a bounded intake channel) and per-request event channels.
//!
//! Each step fits on one screen: take new requests, drop the ones whose client left, plan
//! (scheduler), run the flat batch (model), sample, detokenize, send events.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::detokenizer::Detokenizer;
use crate::error::{EngineError, Result};
use crate::forward_input::{ForwardInput, HostInput};
use crate::kv_cache::KvCache;
use crate::metrics::{default_energy_meter, EndReason, EnergyMeter, EngineMetrics, RequestRecord};
use crate::models::Model;
use crate::ops::sample::{sample_rows, RowPick};
use crate::request::{
    FinishReason, PromptLogprob, Request, RequestEvent, StopReason, SubmitError, TokenOutput, Usage,
};
use crate::runner::StepRunner;
use crate::sampler::{sample_batch, score_token, SampleOutput, SequenceSampler, MAX_TOP_LOGPROBS};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerPlan, SchedulerStats, SeqId, Sequence};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Longest prompt + output a sequence may reach.
    pub max_model_len: usize,
    /// Requests accepted but not yet scheduled, beyond which `submit` answers `QueueFull`.
    pub max_waiting_requests: usize,
    /// Where the engine reports (Prometheus); `None` reports nothing. Device seconds and cost
    /// are measured either way (cost is 0 without metrics, which carry the price).
    pub metrics: Option<Arc<EngineMetrics>>,
    /// Run every step eagerly: no CUDA graphs of decode steps (vLLM's `--enforce-eager`).
    /// Only matters on a GPU.
    pub enforce_eager: bool,
}

/// Fixed facts about the running engine, for validation and reporting.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_waiting_requests: usize,
    pub eos_token_ids: Vec<u32>,
}

enum Command {
    Submit(Box<Request>, UnboundedSender<RequestEvent>),
    Stats(std::sync::mpsc::Sender<SchedulerStats>),
    Shutdown,
}

/// State both sides read: cheap, lock-free where it is hot.
struct Shared {
    /// Accepted requests not yet scheduled (the queue `max_waiting_requests` bounds).
    waiting_requests: AtomicUsize,
    shutting_down: AtomicBool,
    dead: Mutex<Option<String>>,
    stats: Mutex<SchedulerStats>,
}

/// The only way into the engine. Cheap to clone; every clone talks to the same thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
}

/// A request's events, in order: tokens, then `Finished` or `Error`. Dropping it aborts the
/// request; its blocks are freed at the engine's next step.
pub struct RequestStream {
    rx: UnboundedReceiver<RequestEvent>,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<RequestEvent> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime (the CLI, batch jobs, tests).
    pub fn blocking_next(&mut self) -> Option<RequestEvent> {
        self.rx.blocking_recv()
    }
}

impl EngineHandle {
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Scheduler figures, asked of the engine thread between two steps (so they reflect every
    /// event already received and every stream already dropped); the last known figures if the
    /// engine has stopped.
    pub fn stats(&self) -> SchedulerStats {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Command::Stats(tx)).is_ok() {
            if let Ok(stats) = rx.recv() {
                return stats;
            }
        }
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the engine thread is alive and accepting requests.
    pub fn is_alive(&self) -> bool {
        self.shared.dead.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Checks `request` against the engine's limits and queues it.
    pub fn submit(&self, request: Request) -> Result<RequestStream, SubmitError> {
        if let Some(why) = self.shared.dead.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(SubmitError::EngineDead(why));
        }
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        self.validate(&request).map_err(SubmitError::Invalid)?;
        let limit = self.info.max_waiting_requests;
        if self.shared.waiting_requests.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull(limit));
        }
        let (tx, rx) = unbounded_channel();
        match self.tx.try_send(Command::Submit(Box::new(request), tx)) {
            Ok(()) => Ok(RequestStream { rx }),
            Err(e) => {
                self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(limit),
                    TrySendError::Disconnected(_) => {
                        SubmitError::EngineDead("the engine thread has exited".into())
                    }
                })
            }
        }
    }

    fn validate(&self, r: &Request) -> std::result::Result<(), String> {
        let info = &self.info;
        let prompt = r.prompt_token_ids.len();
        if prompt == 0 {
            return Err("the prompt is empty (0 tokens)".into());
        }
        if r.n == 0 {
            return Err("n must be at least 1, got 0".into());
        }
        if r.max_tokens == 0 {
            return Err("max_tokens must be at least 1, got 0".into());
        }
        if let Some(bad) = r.prompt_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(format!(
                "prompt token id {bad} is outside the vocabulary (size {})",
                info.vocab_size
            ));
        }
        let total = prompt + r.max_tokens;
        if total > info.max_model_len {
            return Err(format!(
                "prompt ({prompt} tokens) + max_tokens ({}) = {total} tokens exceeds max_model_len {}",
                r.max_tokens, info.max_model_len
            ));
        }
        let blocks = total.div_ceil(info.block_size);
        if blocks > info.num_blocks {
            return Err(format!(
                "prompt ({prompt} tokens) + max_tokens ({}) needs {blocks} KV cache blocks of {} tokens, but the whole cache has {}",
                r.max_tokens, info.block_size, info.num_blocks
            ));
        }
        if let Some(top) = r.prompt_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(format!("prompt_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}"));
        }
        r.sampling.validate(info.vocab_size)?;
        r.detokenize.validate().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Stops intake; running and queued requests finish, then the thread exits.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        // A full intake still gets the message once the engine drains it.
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Starts the engine thread. The KV cache is allocated here, so a failure is an error now.
pub fn spawn_engine(
    model: Box<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    config: EngineConfig,
) -> Result<(EngineHandle, JoinHandle<()>)> {
    let s = &config.scheduler;
    let scheduler = Scheduler::new(s.clone()).map_err(|e| EngineError::KvCache(e.to_string()))?;
    let mut kv = KvCache::new(model.kv_cache_spec(), s.block_size, s.num_blocks, model.device())?;
    warm_up(model.as_ref(), &mut kv, s.block_size, config.metrics.as_deref())?;
    // The cache's zero-fill and the warm-up were queued on this thread's CUDA stream; the
    // engine thread computes on its own, which nothing orders after them.
    model.device().synchronize()?;
    if let Err(e) = crate::memory::keep_freed_memory(model.device()) {
        // Only a speed matter (the pool then maps memory again each step): serve anyway.
        tracing::warn!(error = %e, "could not make the CUDA memory pool keep freed memory");
    }
    let info = Arc::new(EngineInfo {
        max_model_len: config.max_model_len,
        vocab_size: model.vocab_size(),
        block_size: s.block_size,
        num_blocks: s.num_blocks,
        max_waiting_requests: config.max_waiting_requests,
        eos_token_ids: eos_token_ids.clone(),
    });
    let shared = Arc::new(Shared {
        waiting_requests: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        dead: Mutex::new(None),
        stats: Mutex::new(SchedulerStats::default()),
    });
    // The intake only has to absorb bursts between two steps; admission is bounded by
    // `waiting_requests`.
    let (tx, rx) = sync_channel(config.max_waiting_requests.max(1));
    let energy = if config.metrics.is_some() { default_energy_meter(model.device()) } else { None };
    if let Some(m) = &config.metrics {
        m.set_energy_available(energy.is_some());
    }
    let runner = StepRunner::new(model.as_ref(), !config.enforce_eager, s.max_num_seqs.min(MAX_GRAPH_BATCH));
    let engine = Engine {
        runner,
        energy,
        energy_mark: None,
        logits_buf: Vec::new(),
        model,
        tokenizer,
        eos_token_ids,
        kv,
        scheduler,
        config,
        rx,
        shared: shared.clone(),
        requests: HashMap::new(),
        seqs: HashMap::new(),
        next_seq_id: 0,
        next_request_key: 0,
        draining: false,
    };
    let thread = std::thread::Builder::new()
        .name("ferrite-engine".into())
        .spawn(move || engine.run())
        .map_err(|e| EngineError::InvalidRequest(format!("cannot start the engine thread: {e}")))?;
    Ok((EngineHandle { tx, shared, info }, thread))
}

/// The largest decode batch replayed from a CUDA graph (vLLM's default largest capture size);
/// larger steps run eagerly, where the host's launches weigh less against the device's work.
const MAX_GRAPH_BATCH: usize = 512;

/// One 1-token forward pass before the first request (into a slot of block 0, which is free
/// and rewritten before anything reads it): lazy initialisation (buffers, kernel compilation on
/// a GPU) happens now, and a model that cannot run fails at start-up, not on a user's request.
fn warm_up(
    model: &dyn Model,
    kv: &mut KvCache,
    block_size: usize,
    metrics: Option<&EngineMetrics>,
) -> Result<()> {
    let started = Instant::now();
    let block_table = [crate::block_allocator::BlockId(0)];
    let chunk = crate::forward_input::ScheduledChunk {
        token_ids: &[0],
        num_computed_tokens: 0,
        block_table: &block_table,
        all_logits: false,
    };
    let input = ForwardInput::build(&[chunk], block_size, model.device())?;
    model.forward(&input, kv)?;
    if let Some(m) = metrics {
        m.record_startup_phase("warm_up", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// A live request: where its events go and how far its samples are.
struct LiveRequest {
    events: UnboundedSender<RequestEvent>,
    seqs: Vec<SeqId>,
    /// Samples 1..n, held back until sample 0's prompt is in the prefix cache.
    deferred: Vec<Sequence>,
    num_unfinished: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: Option<usize>,
    arrival: Instant,
    /// When the engine received it (queue time counts from here).
    queued: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    n: usize,
    max_tokens: usize,
    /// This request's share of the steps it was in.
    device_seconds: f64,
    energy_joules: Option<f64>,
    /// The finish reason of the sample that finished last.
    reason: EndReason,
}

/// One sample's output state (the scheduler keeps its tokens and blocks).
struct SeqOutput {
    request: u64,
    index: usize,
    max_tokens: usize,
    sampler: SequenceSampler,
    detokenizer: Detokenizer,
    last_token: Option<Instant>,
    /// Sample 0 of a request with `prompt_logprobs`: the prompt's scores, filled as its chunks
    /// are computed, sent with its first token.
    prompt_scores: Option<PromptScores>,
}

/// Prompt logprobs being gathered, one entry per prompt token.
struct PromptScores {
    top: usize,
    entries: Vec<Option<PromptLogprob>>,
}

struct Engine {
    runner: StepRunner,
    energy: Option<Box<dyn EnergyMeter>>,
    /// Where a GPU step's logits are copied, reused across steps (see `HostLogits`).
    logits_buf: Vec<f32>,
    /// The meter's reading when the last step ended, while the engine has not waited since:
    /// the next step starts from it, so each step reads the meter once (a driver call).
    energy_mark: Option<f64>,
    model: Box<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    kv: KvCache,
    scheduler: Scheduler,
    config: EngineConfig,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    requests: HashMap<u64, LiveRequest>,
    seqs: HashMap<SeqId, SeqOutput>,
    next_seq_id: u64,
    next_request_key: u64,
    draining: bool,
}

impl Engine {
    fn run(mut self) {
        loop {
            if !self.intake() {
                break;
            }
            self.drop_abandoned();
            if self.draining && !self.scheduler.has_work() {
                break;
            }
            // On the CPU the step runs on a rayon worker: its many parallel ops (dozens a layer)
            // then split from inside the pool, instead of each parking this thread on a latch
            // and waking it again (~15 % of a batch-1 decode step on a 2-core VM). Idle waiting,
            // above, stays outside the pool, which other threads may need meanwhile. A GPU
            // step keeps its thread (its host work is not rayon's, and its CUDA calls stay on
            // one thread).
            let on_cpu = self.model.device().is_cpu();
            let step = catch_unwind(AssertUnwindSafe(|| {
                if on_cpu {
                    rayon::scope(|_| self.step())
                } else {
                    self.step()
                }
            }));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(panic_message(&panic)),
            };
            if let Some(why) = failure {
                tracing::error!(error = %why, "engine step failed; failing every live request");
                self.fail_all(&format!("engine error: {why}"));
            }
            let stats = self.scheduler.stats();
            if let Some(m) = &self.config.metrics {
                m.observe_scheduler(&stats);
            }
            *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
        }
        self.fail_all("the engine stopped");
        let graphs = self.runner.graph_stats();
        if graphs.captures > 0 {
            tracing::info!(
                captures = graphs.captures,
                capture_ms = graphs.capture_secs * 1e3,
                replays = graphs.replays,
                evictions = graphs.evictions,
                "CUDA graphs of decode steps"
            );
        }
        *self.shared.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some("the engine has shut down".into());
    }

    /// Takes every queued command; blocks when there is nothing to do. `false`: exit now.
    fn intake(&mut self) -> bool {
        if !self.scheduler.has_work() && !self.draining {
            self.energy_mark = None; // idle time is no request's
            match self.rx.recv() {
                Ok(cmd) => self.command(cmd),
                Err(_) => return false, // every handle is gone
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    self.draining = true;
                    return true;
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Shutdown => self.draining = true,
            Command::Stats(reply) => {
                // Streams dropped before the question count as gone in the answer.
                self.drop_abandoned();
                let stats = self.scheduler.stats();
                if let Some(m) = &self.config.metrics {
                    m.observe_scheduler(&stats);
                }
                let _ = reply.send(stats);
            }
            Command::Submit(request, events) => self.add_request(*request, events),
        }
    }

    fn add_request(&mut self, r: Request, events: UnboundedSender<RequestEvent>) {
        let key = self.next_request_key;
        self.next_request_key += 1;
        let mut live = LiveRequest {
            events,
            seqs: Vec::with_capacity(r.n),
            deferred: Vec::new(),
            num_unfinished: r.n,
            prompt_tokens: r.prompt_token_ids.len(),
            completion_tokens: 0,
            cached_tokens: None,
            arrival: r.arrival,
            queued: Instant::now(),
            first_scheduled: None,
            first_token: None,
            last_token: None,
            n: r.n,
            max_tokens: r.max_tokens,
            device_seconds: 0.0,
            energy_joules: self.energy.as_ref().map(|_| 0.0),
            reason: EndReason::Stop,
        };
        if let Err(e) = r.detokenize.validate() {
            // validate() at submission checked this; keep the promise of an event anyway.
            let _ = live.events.send(RequestEvent::Error(e.to_string()));
            self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        for index in 0..r.n {
            let detokenizer =
                Detokenizer::new(r.detokenize.clone()).expect("invariant: params validated above");
            let id = SeqId(self.next_seq_id);
            self.next_seq_id += 1;
            // Sample i of a seeded request draws from seed + i: reproducible, and distinct.
            let mut sampling = r.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
            let sampler = SequenceSampler::new(sampling, &r.prompt_token_ids, &self.eos_token_ids);
            self.seqs.insert(
                id,
                SeqOutput {
                    request: key,
                    index,
                    max_tokens: r.max_tokens,
                    sampler,
                    detokenizer,
                    last_token: None,
                    prompt_scores: r.prompt_logprobs.filter(|_| index == 0).map(|top| {
                        let mut entries = vec![None; r.prompt_token_ids.len()];
                        let first = r.prompt_token_ids[0];
                        entries[0] =
                            Some(PromptLogprob { token_id: first, logprob: None, top_logprobs: vec![] });
                        PromptScores { top, entries }
                    }),
                },
            );
            let mut seq = Sequence::new(id, r.prompt_token_ids.clone());
            seq.needs_prompt_logits = index == 0 && r.prompt_logprobs.is_some();
            // Samples 1..n wait until sample 0 has computed the prompt: then its full blocks are
            // in the prefix cache and they share them instead of computing the prompt again.
            if index == 0 {
                self.scheduler.add(seq);
            } else {
                live.deferred.push(seq);
            }
            live.seqs.push(id);
        }
        self.requests.insert(key, live);
    }

    /// Requests whose stream was dropped: remove their sequences and free their blocks.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> =
            self.requests.iter().filter(|(_, r)| r.events.is_closed()).map(|(k, _)| *k).collect();
        for key in gone {
            if let Some(live) = self.remove_request(key) {
                self.record(&live, EndReason::Abort, Instant::now());
            }
        }
    }

    fn remove_request(&mut self, key: u64) -> Option<LiveRequest> {
        let live = self.requests.remove(&key)?;
        if live.first_scheduled.is_none() {
            self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
        }
        for id in &live.seqs {
            self.scheduler.remove(*id);
            self.seqs.remove(id);
        }
        Some(live)
    }

    fn fail_all(&mut self, why: &str) {
        let keys: Vec<u64> = self.requests.keys().copied().collect();
        for key in keys {
            if let Some(live) = self.remove_request(key) {
                self.record(&live, EndReason::Error, Instant::now());
                let _ = live.events.send(RequestEvent::Error(why.to_string()));
            }
        }
    }

    /// Reports an ended request to the metrics, once.
    fn record(&self, live: &LiveRequest, reason: EndReason, ended: Instant) {
        let Some(m) = &self.config.metrics else { return };
        m.observe_request(&RequestRecord {
            reason,
            arrival: live.arrival,
            queued: live.queued,
            first_scheduled: live.first_scheduled,
            first_token: live.first_token,
            last_token: live.last_token,
            ended,
            prompt_tokens: live.prompt_tokens,
            generation_tokens: live.completion_tokens,
            n: live.n,
            max_tokens: live.max_tokens,
            device_seconds: live.device_seconds,
            energy_joules: live.energy_joules,
        });
    }

    /// Splits one step's wall time (and energy) among its sequences' requests in proportion
    /// to the tokens each had in the step.
    fn charge_step(
        &mut self,
        plan: &SchedulerPlan,
        started: Instant,
        energy_before: Option<f64>,
        prompt: usize,
    ) {
        let now = Instant::now();
        let seconds = now.duration_since(started).as_secs_f64();
        let energy_now = self.energy.as_mut().and_then(|e| e.joules());
        self.energy_mark = energy_now;
        let joules = match (energy_before, energy_now) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let total = plan.num_batched_tokens.max(1) as f64;
        for s in &plan.seqs {
            let Some(out) = self.seqs.get(&s.seq_id) else { continue };
            let Some(live) = self.requests.get_mut(&out.request) else { continue };
            let share = s.num_new_tokens as f64 / total;
            live.device_seconds += seconds * share;
            if let (Some(acc), Some(j)) = (live.energy_joules.as_mut(), joules) {
                *acc += j * share;
            }
        }
        if let Some(m) = &self.config.metrics {
            m.observe_step(now, seconds, prompt, plan.num_batched_tokens.saturating_sub(prompt));
        }
    }

    fn step(&mut self) -> Result<()> {
        let started = Instant::now();
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            self.energy_mark = None; // a step that did nothing charges nobody
            return Ok(());
        }
        let energy_before = match self.energy_mark.take() {
            Some(mark) => Some(mark),
            None => self.energy.as_mut().and_then(|e| e.joules()),
        };
        // Prompt (prefill, or recompute after preemption) tokens vs decode tokens in this step.
        let prompt: usize = plan
            .seqs
            .iter()
            .filter(|s| {
                self.scheduler
                    .get(s.seq_id)
                    .is_none_or(|q| q.num_output_tokens() == 0 || s.num_new_tokens > 1)
            })
            .map(|s| s.num_new_tokens)
            .sum();
        let now = Instant::now();
        for id in &plan.first_scheduled {
            let Some(out) = self.seqs.get(id) else { continue };
            let cached = self.scheduler.get(*id).and_then(|s| s.num_cached_prompt_tokens);
            if let Some(live) = self.requests.get_mut(&out.request) {
                if live.first_scheduled.is_none() {
                    live.first_scheduled = Some(now);
                    live.cached_tokens = cached;
                    self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        let planned = Instant::now();
        let host = HostInput::build(&self.scheduler.chunks(&plan), self.kv.block_size)?;
        let built = Instant::now();
        let (input, logits) = self.runner.forward(self.model.as_ref(), &mut self.kv, host)?;
        let issued = Instant::now();
        // Sampling would wait for the device anyway; waiting here times the forward pass.
        self.model.device().synchronize()?;
        let computed = Instant::now();
        self.scheduler.complete_step(&plan);
        let charge = (started, energy_before, prompt);
        let sampled = self.sample_and_emit(&plan, &input, &logits, charge)?;
        if let Some(m) = &self.config.metrics {
            let marks = [started, planned, built, issued, computed, sampled, Instant::now()];
            m.observe_step_phases(&std::array::from_fn(|i| (marks[i + 1] - marks[i]).as_secs_f64()));
        }
        Ok(())
    }

    /// Scores the prompt tokens of chunks computed with all their logits (`rows` of `logits`,
    /// `[rows, vocab]` row-major, one per token): row `j` predicts the token after it.
    fn score_prompts(&mut self, plan: &SchedulerPlan, input: &ForwardInput, logits: &[f32], vocab: usize) {
        for (i, planned) in plan.seqs.iter().enumerate() {
            let Some(scores) = self.seqs.get_mut(&planned.seq_id).and_then(|o| o.prompt_scores.as_mut())
            else {
                continue;
            };
            if !input.all_logits[i] {
                continue; // only the last row: the chunk is past the prompt
            }
            let (rows, chunk) = (&input.logits_rows[i], &input.attention.seqs()[i]);
            let Some(seq) = self.scheduler.get(planned.seq_id) else { continue };
            let first_pos = chunk.context_len - chunk.query_len;
            for (row, pos) in rows.clone().zip(first_pos..) {
                if pos + 1 >= seq.num_prompt_tokens {
                    break;
                }
                let token_id = seq.token_ids[pos + 1];
                let (logprob, top_logprobs) =
                    score_token(&logits[row * vocab..(row + 1) * vocab], token_id, scores.top);
                scores.entries[pos + 1] =
                    Some(PromptLogprob { token_id, logprob: Some(logprob), top_logprobs });
            }
        }
    }

    /// Samples the rows that end a sequence's tokens and sends the events; the step is charged
    /// to its requests (`charge`: start, energy at start, prompt tokens) once sampling is done.
    /// Returns when sampling was done.
    fn sample_and_emit(
        &mut self,
        plan: &SchedulerPlan,
        input: &ForwardInput,
        logits: &Tensor,
        charge: (Instant, Option<f64>, usize),
    ) -> Result<Instant> {
        let sampling: Vec<usize> =
            plan.seqs.iter().enumerate().filter(|(_, s)| s.samples).map(|(i, _)| i).collect();
        let scoring = input.all_logits.iter().any(|&a| a);
        if sampling.is_empty() && !scoring {
            self.charge_step(plan, charge.0, charge.1, charge.2);
            return Ok(Instant::now());
        }
        let vocab = self.model.vocab_size();
        let ids: Vec<SeqId> = sampling.iter().map(|&i| plan.seqs[i].seq_id).collect();
        let last_row = |k: usize| input.logits_rows[sampling[k]].end - 1;
        // Plain rows are sampled where the logits are (8 bytes per row come back from a GPU);
        // the rest, and the rows prompt logprobs score, on the host.
        let mut picks: Vec<(usize, RowPick)> = Vec::new();
        let mut on_host: Vec<usize> = Vec::new();
        for (k, id) in ids.iter().enumerate() {
            let out = self.seqs.get_mut(id).expect("invariant: scheduled sequences have output state");
            match out.sampler.plain_pick(vocab) {
                Some(pick) => picks.push((k, RowPick { row: last_row(k), pick })),
                None => on_host.push(k),
            }
        }
        let mut sampled: Vec<Option<SampleOutput>> = vec![None; ids.len()];
        let row_picks: Vec<RowPick> = picks.iter().map(|&(_, p)| p).collect();
        for (&(k, _), (token_id, logprob)) in picks.iter().zip(sample_rows(logits, &row_picks)?) {
            let out = self.seqs.get_mut(&ids[k]).expect("invariant: picked sequences have output state");
            out.sampler.accept(token_id);
            sampled[k] = Some(SampleOutput { token_id, logprob, top_logprobs: Vec::new() });
        }
        if scoring || !on_host.is_empty() {
            let host: Vec<(SeqId, usize)> = on_host.iter().map(|&k| (ids[k], last_row(k))).collect();
            for (&k, s) in on_host.iter().zip(self.sample_on_host(plan, input, logits, scoring, &host)?) {
                sampled[k] = Some(s);
            }
        }
        let sampled: Vec<SampleOutput> =
            sampled.into_iter().map(|s| s.expect("invariant: every row is sampled once")).collect();
        self.charge_step(plan, charge.0, charge.1, charge.2);

        let now = Instant::now();
        for (id, s) in ids.into_iter().zip(sampled) {
            self.scheduler.append_token(id, s.token_id);
            let out = self.seqs.get_mut(&id).expect("invariant: sampled sequences have output state");
            let seq = self.scheduler.get(id).expect("invariant: sampled sequences are scheduled");
            let params = out.sampler.params();
            let stop_token = (!params.ignore_eos && self.eos_token_ids.contains(&s.token_id))
                || params.stop_token_ids.contains(&s.token_id);
            let mut finish = None;
            let text = if stop_token {
                finish = Some((FinishReason::Stop, Some(StopReason::Token(s.token_id))));
                out.detokenizer.finish(&self.tokenizer)?
            } else {
                let step = out.detokenizer.push(&self.tokenizer, s.token_id)?;
                if let Some(m) = step.stop {
                    finish = Some((FinishReason::Stop, Some(StopReason::Text(m.text))));
                    step.delta
                } else if seq.num_output_tokens() >= out.max_tokens
                    || seq.token_ids.len() >= self.config.max_model_len
                {
                    finish = Some((FinishReason::Length, None));
                    step.delta + &out.detokenizer.finish(&self.tokenizer)?
                } else {
                    step.delta
                }
            };
            let (key, index) = (out.request, out.index);
            let gap = out.last_token.map(|t| now.duration_since(t));
            out.last_token = Some(now);
            let live = self.requests.get_mut(&key).expect("invariant: a sequence's request is live");
            for deferred in live.deferred.drain(..) {
                self.scheduler.add(deferred);
            }
            live.completion_tokens += 1;
            if live.first_token.is_none() {
                live.first_token = Some(now);
                if let Some(m) = &self.config.metrics {
                    m.observe_first_token(live.arrival, now, live.prompt_tokens);
                }
            }
            live.last_token = Some(now);
            if let Some(m) = &self.config.metrics {
                m.observe_token(gap);
            }
            let prompt_logprobs = out.prompt_scores.take().map(|p| {
                debug_assert!(p.entries.iter().all(Option::is_some), "every prompt position scored");
                p.entries.into_iter().flatten().collect()
            });
            if prompt_logprobs.is_some() {
                // Sent: a recompute after preemption may use the prefix cache again.
                self.scheduler.stop_prompt_logits(id);
            }
            let event = TokenOutput {
                index,
                token_id: s.token_id,
                text,
                logprob: s.logprob,
                top_logprobs: s.top_logprobs,
                finish: finish.clone(),
                prompt_logprobs,
            };
            // A failed send means the client left; the request is dropped at the next step.
            let _ = live.events.send(RequestEvent::Token(event));
            if let Some((reason, _)) = &finish {
                live.reason = match reason {
                    FinishReason::Length => EndReason::Length,
                    FinishReason::Stop => EndReason::Stop,
                    FinishReason::Abort => EndReason::Abort,
                };
                live.num_unfinished -= 1;
                self.scheduler.remove(id);
                self.seqs.remove(&id);
                if live.num_unfinished == 0 {
                    let live = self.requests.remove(&key).expect("invariant: live");
                    self.record(&live, live.reason, now);
                    let cost_usd =
                        self.config.metrics.as_ref().map_or(0.0, |m| m.cost_of(live.device_seconds));
                    let usage = Usage {
                        prompt_tokens: live.prompt_tokens,
                        completion_tokens: live.completion_tokens,
                        cached_tokens: live.cached_tokens.unwrap_or(0),
                        arrival: live.arrival,
                        first_scheduled: live.first_scheduled,
                        first_token: live.first_token,
                        finished: now,
                        device_seconds: live.device_seconds,
                        cost_usd,
                        energy_joules: live.energy_joules,
                    };
                    let _ = live.events.send(RequestEvent::Finished(usage));
                }
            }
        }
        Ok(now)
    }

    /// The rows that need the host: `host`'s (sequence, logits row) pairs, sampled in that
    /// order, and, when `scoring`, every prompt row being scored. A CPU's logits are read in
    /// place; from a GPU only the host rows are copied, unless prompts are scored.
    fn sample_on_host(
        &mut self,
        plan: &SchedulerPlan,
        input: &ForwardInput,
        logits: &Tensor,
        scoring: bool,
        host: &[(SeqId, usize)],
    ) -> Result<Vec<SampleOutput>> {
        let vocab = self.model.vocab_size();
        let mut rows: Vec<usize> = host.iter().map(|&(_, row)| row).collect();
        let gathered;
        let source = if scoring || logits.device().is_cpu() {
            logits
        } else {
            let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let index = Tensor::from_vec(index, rows.len(), logits.device())?;
            gathered = logits.index_select(&index, 0)?;
            rows = (0..rows.len()).collect();
            &gathered
        };
        let mut buf = std::mem::take(&mut self.logits_buf);
        let on_host = HostLogits::of(source, &mut buf)?;
        let all = on_host.as_slice();
        if scoring {
            self.score_prompts(plan, input, all, vocab);
        }
        let mut sampled = Vec::new();
        if !rows.is_empty() {
            // Consecutive rows are read where they are; others are copied together first.
            let flat: Cow<[f32]> = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
                Cow::Borrowed(&all[rows[0] * vocab..(rows[rows.len() - 1] + 1) * vocab])
            } else {
                let mut flat = Vec::with_capacity(rows.len() * vocab);
                for &r in &rows {
                    flat.extend_from_slice(&all[r * vocab..(r + 1) * vocab]);
                }
                Cow::Owned(flat)
            };
            // Disjoint mutable borrows of each host row's sampler, in row order.
            let mut samplers: Vec<&mut SequenceSampler> = Vec::with_capacity(host.len());
            {
                let mut by_id: HashMap<SeqId, &mut SeqOutput> =
                    self.seqs.iter_mut().map(|(k, v)| (*k, v)).collect();
                for (id, _) in host {
                    let out = by_id.remove(id).expect("invariant: scheduled sequences have output state");
                    samplers.push(&mut out.sampler);
                }
            }
            sampled = sample_batch(&flat, vocab, &mut samplers);
        }
        drop(on_host);
        self.logits_buf = buf;
        Ok(sampled)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}

/// A step's f32 logits on the host: the CPU tensor's own storage, read in place under its read
/// lock, or a copy in the engine's reused buffer (a GPU's logits: 39 MB a step for 64 rows of a
/// 152k vocabulary, so a fresh allocation would fault in every page of it every step).
enum HostLogits<'a> {
    InPlace(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Copied(&'a [f32]),
}

impl<'a> HostLogits<'a> {
    fn of(logits: &'a Tensor, buf: &'a mut Vec<f32>) -> candle_core::Result<Self> {
        if logits.dtype() == candle_core::DType::F32 && logits.is_contiguous() {
            let (storage, layout) = logits.storage_and_layout();
            let range = layout.start_offset()..layout.start_offset() + logits.elem_count();
            match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)) => {
                    return Ok(HostLogits::InPlace(storage, range));
                }
                #[cfg(feature = "cuda")]
                candle_core::Storage::Cuda(cuda) => {
                    copy_from_gpu(cuda, range, buf)?;
                    return Ok(HostLogits::Copied(&buf[..logits.elem_count()]));
                }
                _ => {}
            }
        }
        *buf = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(HostLogits::Copied(buf))
    }

    fn as_slice(&self) -> &[f32] {
        match self {
            HostLogits::InPlace(storage, range) => match &**storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[range.clone()],
                _ => unreachable!("HostLogits::of keeps only CPU f32 storage in place"),
            },
            HostLogits::Copied(v) => v,
        }
    }
}

/// Copies `range` of a GPU f32 buffer into the front of `buf`, which only grows: after the
/// first steps its pages are mapped, and the copy is the only cost.
#[cfg(feature = "cuda")]
fn copy_from_gpu(
    cuda: &candle_core::CudaStorage,
    range: std::ops::Range<usize>,
    buf: &mut Vec<f32>,
) -> candle_core::Result<()> {
    let n = range.len();
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    let src = cuda.as_cuda_slice::<f32>()?.slice(range);
    let stream = cuda.device.cuda_stream();
    stream.memcpy_dtoh(&src, &mut buf[..n]).map_err(candle_core::Error::wrap)?;
    // A copy to pageable memory returns when done; waiting on the stream makes it certain.
    stream.synchronize().map_err(candle_core::Error::wrap)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::HostLogits;

    #[test]
    fn host_logits_read_cpu_storage_in_place_and_copy_other_layouts() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
        let rows = t.narrow(0, 1, 2).unwrap(); // contiguous, starting at element 6
        let mut buf = Vec::new();
        let h = HostLogits::of(&rows, &mut buf).unwrap();
        assert!(matches!(h, HostLogits::InPlace(..)));
        assert_eq!(h.as_slice(), (6..18).map(|x| x as f32).collect::<Vec<_>>());
        let transposed = t.t().unwrap(); // not contiguous: copied in logical order
        let mut buf = Vec::new();
        let h = HostLogits::of(&transposed, &mut buf).unwrap();
        assert!(matches!(h, HostLogits::Copied(_)));
        let want: Vec<f32> = (0..6).flat_map(|c| (0..4).map(move |r| (r * 6 + c) as f32)).collect();
        assert_eq!(h.as_slice(), want);
    }
}
