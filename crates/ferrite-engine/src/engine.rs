//! The engine thread: it owns the scheduler, the model, the KV cache and every sample's
//! output state; other threads reach it through an [`EngineHandle`] (a bounded intake
//! channel) and per-request event channels. One step, on one screen (`Engine::step`):
//! intake → `outputs.expire` (deadlines) → `scheduler.schedule()` → `runner.forward` →
//! `runner.sample` → `outputs.update` → `outputs.pool` (embeddings).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::energy::{default_energy_meter, EnergyMeter};
use crate::error::{EngineError, Result};
use crate::forward_input::{ForwardInput, HostInput};
use crate::grammar::{GrammarConfig, GrammarError, Grammars};
use crate::handle::{Command, EngineHandle, EngineInfo, Shared};
use crate::kv_cache::{CacheConfig, KvCache};
use crate::metrics::{EndReason, EngineMetrics};
use crate::model::arch::Model;
use crate::model::tokenizer::Tokenizer;
use crate::output::{OutputConfig, Outputs};
use crate::pooling::Pooling;
use crate::runner::{StepOutput, StepRunner};
use crate::sampler::MAX_TOP_LOGPROBS;
use crate::sched::{Scheduler, SchedulerConfig, SchedulerPlan, SeqId};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// The cache's facts; the builder sets `num_blocks` from its memory plan.
    pub cache: CacheConfig,
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
    /// Most `top_logprobs` (and `prompt_logprobs`) a request may ask for (vLLM's
    /// `max_logprobs`). Tests raise it to the vocabulary to read whole distributions.
    pub max_logprobs: usize,
    /// The structured-output compiler's settings.
    pub grammar: GrammarConfig,
    /// How the model pools embeddings, or why it makes none (the builder reads it from the
    /// checkpoint).
    pub pooling: std::result::Result<Pooling, String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            cache: CacheConfig::default(),
            max_model_len: 2048,
            max_waiting_requests: 1024,
            metrics: None,
            enforce_eager: false,
            max_logprobs: MAX_TOP_LOGPROBS,
            grammar: GrammarConfig::default(),
            pooling: Err("no pooling is configured for this engine".into()),
        }
    }
}

/// Starts the engine thread. The KV cache is allocated here, so a failure is an error now.
pub fn spawn_engine(
    model: Box<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    config: EngineConfig,
) -> Result<(EngineHandle, JoinHandle<()>)> {
    let (s, cache) = (&config.scheduler, config.cache);
    let scheduler = Scheduler::new(s.clone(), cache).map_err(|e| EngineError::KvCache(e.to_string()))?;
    let mut kv = KvCache::new(model.kv_cache_spec(), cache.block_size, cache.num_blocks, model.device())?;
    warm_up(model.as_ref(), &mut kv, cache.block_size, config.metrics.as_deref())?;
    // The cache's zero-fill and the warm-up were queued on this thread's CUDA stream; the
    // engine thread computes on its own, which nothing orders after them.
    model.device().synchronize()?;
    if let Err(e) = crate::memory::keep_freed_memory(model.device()) {
        // Only a speed matter (the pool then maps memory again each step): serve anyway.
        tracing::warn!(error = %e, "could not make the CUDA memory pool keep freed memory");
    }
    let info = EngineInfo {
        max_model_len: config.max_model_len,
        vocab_size: model.vocab_size(),
        cache,
        max_waiting_requests: config.max_waiting_requests,
        max_logprobs: config.max_logprobs,
        eos_token_ids: eos_token_ids.clone(),
        scheduling_policy: config.scheduler.policy,
        pooling: config.pooling.clone(),
        generates: model.generates(),
        price_per_hour: config.metrics.as_ref().map_or(0.0, |m| m.price_per_hour()),
    };
    let grammars = start_grammars(&tokenizer, model.vocab_size(), &eos_token_ids, &config);
    let shared = Arc::new(Shared::default());
    // The intake only has to absorb bursts between two steps; admission is bounded by
    // `waiting_requests`.
    let (tx, rx) = sync_channel(config.max_waiting_requests.max(1));
    let energy = if config.metrics.is_some() { default_energy_meter(model.device()) } else { None };
    if let Some(m) = &config.metrics {
        m.set_energy_available(energy.is_some());
    }
    let runner = StepRunner::new(model.as_ref(), !config.enforce_eager, s.max_num_seqs.min(MAX_GRAPH_BATCH));
    let outputs = OutputConfig {
        tokenizer,
        eos_token_ids,
        max_model_len: config.max_model_len,
        metrics: config.metrics.clone(),
        track_energy: energy.is_some(),
        pooling: config.pooling.clone().ok(),
    };
    let metrics = config.metrics.clone();
    let engine = Engine {
        taken_prompt_tokens: 0,
        runner,
        energy,
        energy_mark: None,
        model,
        kv,
        scheduler,
        outputs: Outputs::new(outputs, shared.clone()),
        metrics: config.metrics,
        rx,
        shared: shared.clone(),
        draining: false,
    };
    let device = engine.model.device().clone();
    let thread = std::thread::Builder::new()
        .name("ferrite-engine".into())
        .spawn(move || {
            engine.run();
            // Everything the engine held is freed now: the memory pool keeps it (see
            // `keep_freed_memory`), so hand it back for a model loaded next in this process.
            if let Err(e) = crate::memory::release_freed_memory(&device) {
                tracing::warn!(error = %e, "could not return the stopped engine's memory to the device");
            }
        })
        .map_err(|e| EngineError::Spawn(e.to_string()))?;
    Ok((EngineHandle::new(tx, shared, info, grammars, metrics), thread))
}

/// The grammar compiler for the model's vocabulary (a trie of every token's bytes). A model
/// without one serves anyway: structured requests then get the reason.
fn start_grammars(
    tokenizer: &Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_ids: &[u32],
    config: &EngineConfig,
) -> std::result::Result<Grammars, GrammarError> {
    let started = Instant::now();
    let grammars = Grammars::new(tokenizer.clone(), vocab_size, eos_token_ids, config.grammar);
    match &grammars {
        Ok(_) => {
            if let Some(m) = &config.metrics {
                m.record_startup_phase("grammar", started.elapsed().as_secs_f64());
            }
        }
        Err(e) => tracing::warn!(error = %e, "structured output is off"),
    }
    grammars
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
    let block_table = [crate::sched::BlockId(0)];
    let chunk = crate::sched::ScheduledChunk {
        token_ids: &[0],
        num_computed_tokens: 0,
        block_table: &block_table,
        all_logits: false,
        hidden: Default::default(),
    };
    let input = ForwardInput::build(&[chunk], block_size, model.device())?;
    model.forward(&input, kv)?;
    if let Some(m) = metrics {
        m.record_startup_phase("warm_up", started.elapsed().as_secs_f64());
    }
    Ok(())
}

struct Engine {
    runner: StepRunner,
    energy: Option<Box<dyn EnergyMeter>>,
    /// The meter's reading when the last step ended, while the engine has not waited since:
    /// the next step starts from it, so each step reads the meter once (a driver call).
    energy_mark: Option<f64>,
    model: Box<dyn Model>,
    kv: KvCache,
    scheduler: Scheduler,
    outputs: Outputs,
    metrics: Option<Arc<EngineMetrics>>,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    draining: bool,
    /// Prompt tokens taken in since the backlog was last published.
    taken_prompt_tokens: usize,
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
            if let Some(m) = &self.metrics {
                m.observe_scheduler(&stats);
            }
            self.shared.publish_stats(stats);
            let taken = std::mem::take(&mut self.taken_prompt_tokens);
            self.shared.publish_backlog(self.scheduler.backlog(), taken);
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
        self.shared.mark_dead("the engine has shut down");
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
            Command::AbortAll(why, reply) => {
                let live = self.outputs.keys().len();
                self.fail_all(&why);
                let _ = reply.send(live);
            }
            Command::Stats(reply) => {
                // Streams dropped before the question count as gone in the answer.
                self.drop_abandoned();
                let stats = self.scheduler.stats();
                if let Some(m) = &self.metrics {
                    m.observe_scheduler(&stats);
                }
                let _ = reply.send(stats);
            }
            Command::Submit(request, events) => {
                self.taken_prompt_tokens += request.prompt_token_ids.len();
                if let Some(seq) = self.outputs.add(*request, events) {
                    self.scheduler.add(seq);
                }
            }
            Command::Embed(request, events) => {
                self.taken_prompt_tokens += request.inputs.iter().map(Vec::len).sum::<usize>();
                for seq in self.outputs.add_embed(*request, events) {
                    self.scheduler.add(seq);
                }
            }
        }
    }

    /// Requests whose stream was dropped: remove their sequences and free their blocks.
    fn drop_abandoned(&mut self) {
        for key in self.outputs.abandoned() {
            for id in self.outputs.remove(key, EndReason::Abort, None) {
                self.scheduler.remove(id);
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        for key in self.outputs.keys() {
            for id in self.outputs.remove(key, EndReason::Error, Some(why)) {
                self.scheduler.remove(id);
            }
        }
    }

    /// One step: plan, run the flat batch, sample, emit; timed phase by phase for the metrics.
    fn step(&mut self) -> Result<()> {
        let started = Instant::now();
        self.outputs.expire(&mut self.scheduler, started)?;
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            self.energy_mark = None; // a step that did nothing charges nobody
            return Ok(());
        }
        let energy_before = self.energy_mark.take().or_else(|| self.energy.as_mut().and_then(|e| e.joules()));
        let prompt_tokens = self.prompt_tokens(&plan);
        self.outputs.scheduled(&plan.first_scheduled, &self.scheduler, Instant::now());
        let planned = Instant::now();
        let host = HostInput::build(&self.scheduler.chunks(&plan), self.scheduler.block_size())?;
        let built = Instant::now();
        let StepOutput { input, logits, hidden } = self.forward(host, &plan)?;
        let issued = Instant::now();
        // Sampling would wait for the device anyway; waiting here times the forward pass.
        self.model.device().synchronize()?;
        let computed = Instant::now();
        self.scheduler.complete_step(&plan);
        let sampled = self.runner.sample(&plan, &input, &logits, &mut self.outputs, &self.scheduler)?;
        self.charge_step(&plan, started, energy_before, prompt_tokens);
        let sampled_at = Instant::now();
        self.outputs.update(&mut self.scheduler, sampled, sampled_at)?;
        self.outputs.pool(&plan, &input, hidden.as_ref(), &mut self.scheduler, sampled_at)?;
        self.scheduler.observe_step(&plan, started.elapsed().as_secs_f64());
        if let Some(m) = &self.metrics {
            let marks = [started, planned, built, issued, computed, sampled_at, Instant::now()];
            m.observe_step_phases(&std::array::from_fn(|i| (marks[i + 1] - marks[i]).as_secs_f64()));
        }
        Ok(())
    }

    /// Issues the forward pass and, meanwhile, computes the grammar masks of the constrained
    /// samples that sample this step: beside it on the other rayon workers on the CPU, on this
    /// thread after the launches on a GPU (whose work is asynchronous). Steps without a
    /// constrained sample go straight to the forward pass.
    fn forward(&mut self, host: HostInput, plan: &SchedulerPlan) -> candle_core::Result<StepOutput> {
        let sampling: Vec<SeqId> = plan.seqs.iter().filter(|s| s.samples).map(|s| s.seq_id).collect();
        let Engine { runner, model, kv, outputs, metrics, .. } = self;
        if !outputs.any_grammar(&sampling) {
            return runner.forward(model.as_ref(), kv, host);
        }
        let mut masks = move || {
            let started = Instant::now();
            outputs.prepare_masks(&sampling);
            if let Some(m) = metrics {
                m.observe_mask_seconds(started.elapsed().as_secs_f64());
            }
        };
        if model.device().is_cpu() {
            // The masks are a job another worker takes while this one runs the forward pass
            // (whose own parallel ops the first worker free joins).
            rayon::in_place_scope(|scope| {
                scope.spawn(move |_| masks());
                runner.forward(model.as_ref(), kv, host)
            })
        } else {
            let issued = runner.forward(model.as_ref(), kv, host);
            masks();
            issued
        }
    }

    /// The step's prompt tokens (prefill, or recompute after preemption), against its decodes.
    fn prompt_tokens(&self, plan: &SchedulerPlan) -> usize {
        plan.seqs
            .iter()
            .filter(|s| {
                self.scheduler
                    .get(s.seq_id)
                    .is_none_or(|q| q.num_output_tokens() == 0 || s.num_new_tokens > 1)
            })
            .map(|s| s.num_new_tokens)
            .sum()
    }

    /// Charges the step's wall time and energy to its requests and reports it.
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
        self.outputs.charge(plan, seconds, joules);
        if let Some(m) = &self.metrics {
            m.observe_step(now, seconds, prompt, plan.num_batched_tokens.saturating_sub(prompt));
        }
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
