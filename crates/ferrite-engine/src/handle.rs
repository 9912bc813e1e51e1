//! The engine's face to every other thread: [`EngineHandle`] (submit, stats, shutdown), each
//! request's [`RequestStream`], and the one check of a request against the engine's real
//! limits, answered with a typed [`RequestError`] that names the field at fault.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::budgets::{BudgetKind, BudgetOutcome};
use crate::grammar::{Grammar, GrammarError, GrammarSpec, Grammars};
use crate::kv_cache::CacheConfig;
use crate::metrics::EngineMetrics;
use crate::pooling::Pooling;
use crate::request::{EmbedRequest, Request, RequestError, RequestEvent, SubmitError};
use crate::sched::{Backlog, Place, SchedulerStats, SchedulingPolicy};

/// Fixed facts about the running engine, for validation and reporting.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub cache: CacheConfig,
    pub max_waiting_requests: usize,
    pub max_logprobs: usize,
    pub eos_token_ids: Vec<u32>,
    pub scheduling_policy: SchedulingPolicy,
    /// How this model makes embeddings, or why it cannot.
    pub pooling: Result<Pooling, String>,
    /// False for an embedding model without a head: generation requests are refused.
    pub generates: bool,
    /// The device's price in dollars an hour (0: none, so requests cost nothing and
    /// `max_cost_usd` is refused).
    pub price_per_hour: f64,
}

pub(crate) enum Command {
    /// A request and its event channel (its prompt tokens pending until the engine next
    /// publishes its backlog).
    Submit(Box<Request>, UnboundedSender<RequestEvent>),
    Embed(Box<EmbedRequest>, UnboundedSender<RequestEvent>),
    Stats(std::sync::mpsc::Sender<SchedulerStats>),
    Shutdown,
    /// Fail every live request with this message; the reply is how many there were.
    AbortAll(String, std::sync::mpsc::Sender<usize>),
}

/// State both sides read: cheap, lock-free where it is hot.
#[derive(Default)]
pub(crate) struct Shared {
    /// Accepted requests not yet scheduled (the queue `max_waiting_requests` bounds).
    waiting_requests: AtomicUsize,
    shutting_down: AtomicBool,
    dead: Mutex<Option<String>>,
    stats: Mutex<SchedulerStats>,
    /// The queued prompt work as of the last step, for the first-token prediction.
    backlog: Mutex<Backlog>,
    /// Prompt tokens submitted but not yet in the published backlog.
    pending_prompt_tokens: AtomicUsize,
}

impl Shared {
    /// One accepted request left the queue (scheduled, or gone before it was).
    pub(crate) fn dequeued(&self) {
        self.waiting_requests.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn publish_stats(&self, stats: SchedulerStats) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// The scheduler's backlog now, which holds the `taken_prompt_tokens` the engine took in
    /// since it last published: those are no longer pending.
    pub(crate) fn publish_backlog(&self, backlog: Backlog, taken_prompt_tokens: usize) {
        *self.backlog.lock().unwrap_or_else(|p| p.into_inner()) = backlog;
        self.pending_prompt_tokens.fetch_sub(taken_prompt_tokens, Ordering::AcqRel);
    }

    /// From now on `submit` answers `EngineDead(why)`.
    pub(crate) fn mark_dead(&self, why: &str) {
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }
}

/// The only way into the engine. Cheap to clone; every clone talks to the same thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
    /// The grammar compiler, or why this model cannot have one.
    grammars: Arc<Result<Grammars, GrammarError>>,
    /// Where refusals by budget are counted.
    metrics: Option<Arc<EngineMetrics>>,
}

/// A request's events, in order: tokens, then `Finished` or `Error`. Dropping it aborts the
/// request; its blocks are freed at the engine's next step.
pub struct RequestStream {
    rx: UnboundedReceiver<RequestEvent>,
    /// When the first token was predicted at submission, from arrival (only for a request with
    /// a first-token budget, once the engine predicts).
    first_token_estimate: Option<std::time::Duration>,
}

impl EngineHandle {
    pub(crate) fn new(
        tx: SyncSender<Command>,
        shared: Arc<Shared>,
        info: EngineInfo,
        grammars: Result<Grammars, GrammarError>,
        metrics: Option<Arc<EngineMetrics>>,
    ) -> Self {
        Self { tx, shared, info: Arc::new(info), grammars: Arc::new(grammars), metrics }
    }
}

impl RequestStream {
    /// When the engine predicted this request's first token at submission, counted from its
    /// arrival: for a request with a first-token (or whole-request) budget, once the engine
    /// has timed enough steps to predict.
    pub fn first_token_estimate(&self) -> Option<std::time::Duration> {
        self.first_token_estimate
    }

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

    /// `spec` compiled for this model (cached by its text), for [`Request::grammar`]. It runs
    /// on the caller's thread, for up to milliseconds on a large schema: keep it off async
    /// workers.
    pub fn compile_grammar(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        match &*self.grammars {
            Ok(grammars) => grammars.compile(spec),
            Err(why) => Err(why.clone()),
        }
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

    /// Checks `request` against the engine's limits and its budgets, and queues it.
    pub fn submit(&self, request: Request) -> Result<RequestStream, SubmitError> {
        self.check_open()?;
        self.validate(&request)?;
        let estimate = self.check_budgets(&request)?;
        let prompt_tokens = request.prompt_token_ids.len();
        let mut stream = self.enqueue(prompt_tokens, |tx| Command::Submit(Box::new(request), tx))?;
        stream.first_token_estimate =
            estimate.and_then(|secs| std::time::Duration::try_from_secs_f64(secs).ok());
        Ok(stream)
    }

    /// Checks an embedding request against the engine's limits and queues it: it is scheduled
    /// beside generation, under the same queue limit.
    pub fn embed(&self, request: EmbedRequest) -> Result<RequestStream, SubmitError> {
        self.check_open()?;
        self.validate_embed(&request)?;
        let prompt_tokens = request.inputs.iter().map(Vec::len).sum();
        self.enqueue(prompt_tokens, |tx| Command::Embed(Box::new(request), tx))
    }

    fn check_open(&self) -> Result<(), SubmitError> {
        if let Some(why) = self.shared.dead.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(SubmitError::EngineDead(why));
        }
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    /// Queues a checked request of `prompt_tokens` (`command` wraps it with its event
    /// channel), within `max_waiting_requests`.
    fn enqueue(
        &self,
        prompt_tokens: usize,
        command: impl FnOnce(UnboundedSender<RequestEvent>) -> Command,
    ) -> Result<RequestStream, SubmitError> {
        let limit = self.info.max_waiting_requests;
        if self.shared.waiting_requests.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.dequeued();
            return Err(SubmitError::QueueFull(limit));
        }
        let (tx, rx) = unbounded_channel();
        // Pending before the engine can take it, so its publication never goes below zero.
        self.shared.pending_prompt_tokens.fetch_add(prompt_tokens, Ordering::AcqRel);
        match self.tx.try_send(command(tx)) {
            Ok(()) => Ok(RequestStream { rx, first_token_estimate: None }),
            Err(e) => {
                self.shared.dequeued();
                self.shared.pending_prompt_tokens.fetch_sub(prompt_tokens, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(limit),
                    TrySendError::Disconnected(_) => {
                        SubmitError::EngineDead("the engine thread has exited".into())
                    }
                })
            }
        }
    }

    /// The one full check of a request, against this engine's real limits. Counts come from
    /// clients: every sum saturates rather than wraps.
    fn validate(&self, r: &Request) -> std::result::Result<(), RequestError> {
        let info = &self.info;
        let bad = RequestError::out_of_range;
        if !info.generates {
            return Err(RequestError::NoGeneration);
        }
        let prompt_tokens = r.prompt_token_ids.len();
        if prompt_tokens == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if r.n == 0 {
            return Err(bad("n", "n must be at least 1, got 0".into()));
        }
        if r.max_tokens == 0 {
            return Err(bad("max_tokens", "max_tokens must be at least 1, got 0".into()));
        }
        if let Some(&id) = r.prompt_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(RequestError::UnknownToken { param: "prompt", id, vocab_size: info.vocab_size });
        }
        let max_model_len = info.max_model_len;
        if prompt_tokens >= max_model_len {
            return Err(RequestError::PromptTooLong { prompt_tokens, max_model_len });
        }
        let max_tokens = r.max_tokens;
        let total = prompt_tokens.saturating_add(max_tokens);
        if total > max_model_len {
            return Err(RequestError::MaxTokens { prompt_tokens, max_tokens, max_model_len });
        }
        let needed_blocks = total.div_ceil(info.cache.block_size);
        if needed_blocks > info.cache.num_blocks {
            return Err(RequestError::KvCacheTooSmall {
                prompt_tokens,
                max_tokens,
                needed_blocks,
                block_size: info.cache.block_size,
                total_blocks: info.cache.num_blocks,
            });
        }
        let max = info.max_logprobs;
        if let Some(top) = r.prompt_logprobs.filter(|&k| k > max) {
            return Err(bad("prompt_logprobs", format!("prompt_logprobs must be at most {max}, got {top}")));
        }
        let min_tokens = r.sampling.min_tokens;
        if min_tokens > max_tokens {
            let message = format!("min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})");
            return Err(bad("min_tokens", message));
        }
        let top = r.sampling.top_logprobs;
        if top > max {
            return Err(bad("top_logprobs", format!("top_logprobs must be at most {max}, got {top}")));
        }
        self.check_priority(r.priority)?;
        if r.sampling.max_cost_usd.is_some() && info.price_per_hour <= 0.0 {
            let message = "max_cost_usd needs a device price: this server has none (start it with --device-cost-per-hour)";
            return Err(bad("max_cost_usd", message.into()));
        }
        r.sampling.validate(info.vocab_size)?;
        r.detokenize.validate()
    }

    /// An embedding request against this engine's limits: a model that pools, inputs that
    /// fit the context and the whole cache (each named by its index where there are several),
    /// `dimensions` the model allows.
    fn validate_embed(&self, r: &EmbedRequest) -> std::result::Result<(), RequestError> {
        let info = &self.info;
        let pooling = info.pooling.as_ref().map_err(|why| RequestError::NoEmbeddings(why.clone()))?;
        if r.inputs.is_empty() {
            return Err(RequestError::out_of_range("input", "the input list is empty".into()));
        }
        let several = r.inputs.len() > 1;
        for (i, input) in r.inputs.iter().enumerate() {
            let which = if several { format!("input[{i}]") } else { "the input".into() };
            let tokens = input.len();
            let problem = if tokens == 0 {
                Some(format!("{which} is empty (0 tokens)"))
            } else if let Some(&id) = input.iter().find(|&&t| t as usize >= info.vocab_size) {
                Some(format!("{which}: token id {id} is outside the vocabulary (size {})", info.vocab_size))
            } else if tokens > info.max_model_len {
                Some(format!("{which} ({tokens} tokens) exceeds max_model_len {}", info.max_model_len))
            } else if tokens.div_ceil(info.cache.block_size) > info.cache.num_blocks {
                Some(format!(
                    "{which} ({tokens} tokens) needs {} KV cache blocks of {} tokens, but the whole cache has {}",
                    tokens.div_ceil(info.cache.block_size),
                    info.cache.block_size,
                    info.cache.num_blocks
                ))
            } else {
                None
            };
            if let Some(message) = problem {
                return Err(RequestError::out_of_range("input", message));
            }
        }
        if let Some(d) = r.dimensions {
            pooling.check_dimensions(d).map_err(|m| RequestError::out_of_range("dimensions", m))?;
        }
        self.check_priority(r.priority)
    }

    /// The request's budgets against what is queued: a prompt that alone would cost more than
    /// `max_cost_usd` is invalid (400), a first token predicted past its deadline infeasible
    /// (429). Until the engine has timed a few steps it predicts nothing and refuses nothing.
    /// Returns the first token's predicted seconds from arrival, where it was predicted.
    fn check_budgets(&self, r: &Request) -> Result<Option<f64>, SubmitError> {
        let (cap, budget) = (r.sampling.max_cost_usd, r.deadlines.first_token_budget());
        if cap.is_none() && budget.is_none() {
            return Ok(None);
        }
        // Read in place (the engine replaces it after each step; a clone would copy its queue).
        let backlog = self.shared.backlog.lock().unwrap_or_else(|p| p.into_inner());
        let prompt_tokens = r.prompt_token_ids.len();
        let price_per_hour = self.info.price_per_hour;
        if let (Some(cap), Some(secs)) = (cap, backlog.prompt_secs(prompt_tokens)) {
            let cost = secs * price_per_hour / 3600.0;
            if cost > cap {
                self.count_refusal(BudgetKind::Cost);
                let message = format!(
                    "the prompt alone ({prompt_tokens} tokens at {:.3} ms each at the least) is estimated to cost ${cost:.6}, above max_cost_usd ${cap}",
                    secs / prompt_tokens as f64 * 1e3
                );
                return Err(RequestError::out_of_range("max_cost_usd", message).into());
            }
        }
        let Some(budget) = budget else { return Ok(None) };
        let pending = self.shared.pending_prompt_tokens.load(Ordering::Acquire);
        let place = Place::new(self.info.scheduling_policy, r.priority, r.deadlines.earliest(r.arrival));
        let Some(first) = backlog.first_token(place, prompt_tokens, pending) else { return Ok(None) };
        drop(backlog);
        let estimate = r.arrival.elapsed().as_secs_f64() + first.secs;
        let budget = budget.as_secs_f64();
        if estimate <= budget {
            return Ok(Some(estimate));
        }
        // Which budget binds: the first token's own, or the whole request's when it is tighter.
        let (param, kind) = match r.deadlines.first_token {
            Some(t) if t.as_secs_f64() <= budget => ("ttft_deadline_ms", BudgetKind::FirstTokenDeadline),
            _ => ("deadline_ms", BudgetKind::Deadline),
        };
        self.count_refusal(kind);
        // The queue ahead drains at about a second a second.
        let retry_after_secs = (estimate - budget).ceil().max(1.0) as u64;
        Err(SubmitError::Infeasible {
            param,
            estimate_us: (estimate * 1e6).ceil() as u64,
            budget_us: (budget * 1e6).round() as u64,
            tokens_ahead: first.tokens_ahead,
            retry_after_secs,
        })
    }

    fn count_refusal(&self, kind: BudgetKind) {
        if let Some(m) = &self.metrics {
            m.observe_budget(kind, BudgetOutcome::Rejected);
        }
    }

    /// A nonzero priority needs the priority policy.
    fn check_priority(&self, priority: i32) -> std::result::Result<(), RequestError> {
        if priority != 0 && self.info.scheduling_policy != SchedulingPolicy::Priority {
            let message = format!(
                "priority {priority} is honoured only under --scheduling-policy priority (this server schedules first come, first served)"
            );
            return Err(RequestError::out_of_range("priority", message));
        }
        Ok(())
    }

    /// Stops intake; running and queued requests finish, then the thread exits.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        // A full intake still gets the message once the engine drains it.
        let _ = self.tx.send(Command::Shutdown);
    }

    /// Ends every running and queued request now with an error event saying `why` (a server
    /// whose shutdown grace is over), and returns how many there were. Waits at most `wait`
    /// for the engine to take the message (it does so between steps); `None` when it did not
    /// answer in time or has stopped.
    pub fn abort_all(&self, why: &str, wait: std::time::Duration) -> Option<usize> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx.send(Command::AbortAll(why.to_string(), reply)).ok()?;
        answer.recv_timeout(wait).ok()
    }
}
