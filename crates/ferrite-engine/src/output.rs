//! What sampled tokens and pooled rows become. One [`SeqOutput`] per sample (its sampler,
//! detokenizer and stop rule), one [`PoolOutput`] per embedding, and one [`LiveRequest`] per
//! request (its event channel, token counts, times, device seconds and energy); a sequence's
//! tokens and blocks live in the scheduler. `update` turns a step's sampled tokens into events,
//! `pool` its hidden rows into vectors, and both finish what has finished: usage, cost, metrics.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use crate::budgets::{BudgetKind, BudgetOutcome};
use crate::detokenizer::Detokenizer;
use crate::error::Result;
use crate::forward_input::ForwardInput;
use crate::grammar::SeqGrammar;
use crate::handle::Shared;
use crate::metrics::{EndReason, EngineMetrics, RequestRecord};
use crate::model::tokenizer::Tokenizer;
use crate::pooling::{Pooler, Pooling};
use crate::request::{
    EmbedRequest, FinishReason, PromptLogprob, Request, RequestEvent, StopReason, TokenOutput, Usage,
};
use crate::sampler::{SampleOutput, SequenceSampler};
use crate::sched::{Scheduler, SchedulerPlan, SeqId, Sequence};

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
    /// Its share of the last step it was in: the forecast of its next one, for `max_cost_usd`.
    step_seconds: f64,
    energy_joules: Option<f64>,
    /// The finish reason of the sample that finished last.
    reason: EndReason,
    /// When the whole request should be done ([`crate::Deadlines::total`]).
    deadline: Option<Instant>,
    /// When its first token should have come ([`crate::Deadlines::first_token`]).
    first_token_deadline: Option<Instant>,
    /// It carries a `max_cost_usd`.
    cost_capped: bool,
    priority: i32,
    /// The budget that stopped it, if one did.
    cut: Option<BudgetKind>,
}

impl LiveRequest {
    /// The budget that runs out before a token coming at `at` (the end of the next step), if
    /// one does: the first token's while it has none, else the whole request's.
    fn expired(&self, at: Instant) -> Option<BudgetKind> {
        if self.first_token.is_none() && self.first_token_deadline.is_some_and(|d| at > d) {
            Some(BudgetKind::FirstTokenDeadline)
        } else if self.deadline.is_some_and(|d| at > d) {
            Some(BudgetKind::Deadline)
        } else {
            None
        }
    }

    /// How each budget it carried ended, as it ends at `ended`.
    fn budget_outcomes(&self, ended: Instant) -> Vec<(BudgetKind, BudgetOutcome)> {
        let outcome = |kind: BudgetKind, late: bool| {
            if self.cut == Some(kind) {
                BudgetOutcome::Cut
            } else if late {
                BudgetOutcome::Missed
            } else {
                BudgetOutcome::Met
            }
        };
        let mut outcomes = Vec::new();
        if let Some(d) = self.first_token_deadline {
            let late = self.first_token.is_some_and(|t| t > d);
            outcomes.push((BudgetKind::FirstTokenDeadline, outcome(BudgetKind::FirstTokenDeadline, late)));
        }
        if let Some(d) = self.deadline {
            outcomes.push((BudgetKind::Deadline, outcome(BudgetKind::Deadline, ended > d)));
        }
        if self.cost_capped {
            outcomes.push((BudgetKind::Cost, outcome(BudgetKind::Cost, false)));
        }
        outcomes
    }
}

/// One sample's output state.
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

/// One embedding's output state.
struct PoolOutput {
    request: u64,
    /// Which of the request's inputs.
    index: usize,
    pooler: Pooler,
    dimensions: Option<usize>,
}

/// Prompt logprobs being gathered, one entry per prompt token.
pub(crate) struct PromptScores {
    /// How many alternatives per position.
    pub top: usize,
    pub entries: Vec<Option<PromptLogprob>>,
}

/// What the outputs need to know of the engine.
pub(crate) struct OutputConfig {
    pub tokenizer: Arc<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    pub metrics: Option<Arc<EngineMetrics>>,
    /// A power meter is read: requests carry their share of energy.
    pub track_energy: bool,
    /// How embeddings are pooled, where the model makes them.
    pub pooling: Option<Pooling>,
}

/// Every live request and sample, by key and by sequence id.
pub(crate) struct Outputs {
    config: OutputConfig,
    shared: Arc<Shared>,
    requests: HashMap<u64, LiveRequest>,
    seqs: HashMap<SeqId, SeqOutput>,
    pools: HashMap<SeqId, PoolOutput>,
    next_seq_id: u64,
    next_request_key: u64,
    /// The last step's seconds: when a request's next token would come at the soonest.
    step_forecast: Duration,
}

impl Outputs {
    pub fn new(config: OutputConfig, shared: Arc<Shared>) -> Self {
        Self {
            config,
            shared,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            pools: HashMap::new(),
            next_seq_id: 0,
            next_request_key: 0,
            step_forecast: Duration::ZERO,
        }
    }

    /// Takes in a checked request: one output state per sample. Returns sample 0's sequence to
    /// schedule; samples 1..n wait until it has computed the prompt (then its full blocks are
    /// in the prefix cache and they share them instead of computing the prompt again).
    pub fn add(&mut self, r: Request, events: UnboundedSender<RequestEvent>) -> Option<Sequence> {
        let key = self.next_request_key;
        self.next_request_key += 1;
        let mut live = self.live_request(events, r.prompt_token_ids.len(), r.arrival, r.n, r.max_tokens);
        live.deadline = r.deadlines.total.map(|d| r.arrival + d);
        live.first_token_deadline = r.deadlines.first_token.map(|d| r.arrival + d);
        live.cost_capped = r.sampling.max_cost_usd.is_some();
        live.priority = r.priority;
        let mut first = None;
        for index in 0..r.n {
            let detokenizer = Detokenizer::new(r.detokenize.clone());
            let id = SeqId(self.next_seq_id);
            self.next_seq_id += 1;
            // Sample i of a seeded request draws from seed + i: reproducible, and distinct.
            let mut sampling = r.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
            let mut sampler = SequenceSampler::new(sampling, &r.prompt_token_ids, &self.config.eos_token_ids);
            if let Some(grammar) = &r.grammar {
                sampler = sampler.with_grammar(grammar.start());
            }
            let prompt_scores = r.prompt_logprobs.filter(|_| index == 0).map(|top| {
                let mut entries = vec![None; r.prompt_token_ids.len()];
                let token_id = r.prompt_token_ids[0];
                entries[0] = Some(PromptLogprob { token_id, logprob: None, top_logprobs: vec![] });
                PromptScores { top, entries }
            });
            let out = SeqOutput {
                request: key,
                index,
                max_tokens: r.max_tokens,
                sampler,
                detokenizer,
                last_token: None,
                prompt_scores,
            };
            self.seqs.insert(id, out);
            let mut seq = Sequence::new(id, r.prompt_token_ids.clone());
            seq.needs_prompt_logits = index == 0 && r.prompt_logprobs.is_some();
            seq.priority = r.priority;
            seq.deadline = r.deadlines.earliest(r.arrival);
            if index == 0 {
                first = Some(seq);
            } else {
                live.deferred.push(seq);
            }
            live.seqs.push(id);
        }
        self.requests.insert(key, live);
        first
    }

    fn live_request(
        &self,
        events: UnboundedSender<RequestEvent>,
        prompt_tokens: usize,
        arrival: Instant,
        n: usize,
        max_tokens: usize,
    ) -> LiveRequest {
        LiveRequest {
            events,
            seqs: Vec::with_capacity(n),
            deferred: Vec::new(),
            num_unfinished: n,
            prompt_tokens,
            completion_tokens: 0,
            cached_tokens: None,
            arrival,
            queued: Instant::now(),
            first_scheduled: None,
            first_token: None,
            last_token: None,
            n,
            max_tokens,
            device_seconds: 0.0,
            step_seconds: 0.0,
            energy_joules: self.config.track_energy.then_some(0.0),
            reason: EndReason::Stop,
            deadline: None,
            first_token_deadline: None,
            cost_capped: false,
            priority: 0,
            cut: None,
        }
    }

    /// Takes in a checked embedding request: a sequence per input to schedule, pooled as the
    /// model says. None (and an error event) where the model makes no embeddings.
    pub fn add_embed(&mut self, r: EmbedRequest, events: UnboundedSender<RequestEvent>) -> Vec<Sequence> {
        let Some(pooling) = &self.config.pooling else {
            self.shared.dequeued();
            let _ = events.send(RequestEvent::Error("this model makes no embeddings".into()));
            return Vec::new();
        };
        let pooling_type = pooling.pooling_type;
        let key = self.next_request_key;
        self.next_request_key += 1;
        let prompt_tokens = r.inputs.iter().map(Vec::len).sum();
        let mut live = self.live_request(events, prompt_tokens, r.arrival, r.inputs.len(), 0);
        live.priority = r.priority;
        let mut seqs = Vec::with_capacity(r.inputs.len());
        for (index, input) in r.inputs.into_iter().enumerate() {
            let id = SeqId(self.next_seq_id);
            self.next_seq_id += 1;
            live.seqs.push(id);
            let pooler = Pooler::new(pooling_type);
            self.pools.insert(id, PoolOutput { request: key, index, pooler, dimensions: r.dimensions });
            let mut seq = Sequence::new(id, input);
            seq.pooling = Some(pooling_type);
            seq.priority = r.priority;
            seqs.push(seq);
        }
        self.requests.insert(key, live);
        seqs
    }

    /// The request a live sequence belongs to.
    fn request_of(&self, id: SeqId) -> Option<u64> {
        self.seqs.get(&id).map(|o| o.request).or_else(|| self.pools.get(&id).map(|p| p.request))
    }

    /// Requests whose client dropped its stream.
    pub fn abandoned(&self) -> Vec<u64> {
        self.requests.iter().filter(|(_, r)| r.events.is_closed()).map(|(k, _)| *k).collect()
    }

    pub fn keys(&self) -> Vec<u64> {
        self.requests.keys().copied().collect()
    }

    /// Ends request `key` before it finished: reports it, sends `error` if given, and returns
    /// its samples' ids for the scheduler to forget.
    pub fn remove(&mut self, key: u64, reason: EndReason, error: Option<&str>) -> Vec<SeqId> {
        let Some(live) = self.requests.remove(&key) else { return Vec::new() };
        if live.first_scheduled.is_none() {
            self.shared.dequeued();
        }
        for id in &live.seqs {
            self.seqs.remove(id);
            self.pools.remove(id);
        }
        self.record(&live, reason, Instant::now());
        if let Some(why) = error {
            let _ = live.events.send(RequestEvent::Error(why.to_string()));
        }
        live.seqs
    }

    /// Notes when each of `ids` was first scheduled and what it found in the prefix cache.
    pub fn scheduled(&mut self, ids: &[SeqId], scheduler: &Scheduler, now: Instant) {
        for id in ids {
            let Some(key) = self.request_of(*id) else { continue };
            let Some(live) = self.requests.get_mut(&key) else { continue };
            let cached = scheduler.get(*id).and_then(|s| s.num_cached_prompt_tokens);
            if live.first_scheduled.is_none() {
                live.first_scheduled = Some(now);
                live.cached_tokens = cached;
                self.shared.dequeued();
            } else if self.pools.contains_key(id) {
                // Each input of an embedding request is a prompt of its own.
                live.cached_tokens = Some(live.cached_tokens.unwrap_or(0) + cached.unwrap_or(0));
            }
        }
    }

    /// Splits one step's `seconds` (and `joules`) among its sequences' requests in proportion
    /// to the tokens each had in the step.
    pub fn charge(&mut self, plan: &SchedulerPlan, seconds: f64, joules: Option<f64>) {
        self.step_forecast = Duration::try_from_secs_f64(seconds).unwrap_or_default();
        let total = plan.num_batched_tokens.max(1) as f64;
        let mut this_step: HashMap<u64, f64> = HashMap::new();
        for s in &plan.seqs {
            let Some(key) = self.request_of(s.seq_id) else { continue };
            let Some(live) = self.requests.get_mut(&key) else { continue };
            let share = s.num_new_tokens as f64 / total;
            live.device_seconds += seconds * share;
            *this_step.entry(key).or_default() += seconds * share;
            if let (Some(acc), Some(j)) = (live.energy_joules.as_mut(), joules) {
                *acc += j * share;
            }
        }
        for (key, step) in this_step {
            if let Some(live) = self.requests.get_mut(&key) {
                live.step_seconds = step;
            }
        }
    }

    pub fn sampler_mut(&mut self, id: SeqId) -> &mut SequenceSampler {
        &mut self.seqs.get_mut(&id).expect("invariant: scheduled sequences have output state").sampler
    }

    /// The samplers of `ids`, in that order (disjoint borrows).
    pub fn samplers_mut(&mut self, ids: &[SeqId]) -> Vec<&mut SequenceSampler> {
        let mut by_id: HashMap<SeqId, &mut SeqOutput> = self.seqs.iter_mut().map(|(k, v)| (*k, v)).collect();
        ids.iter()
            .map(|id| {
                &mut by_id.remove(id).expect("invariant: scheduled sequences have output state").sampler
            })
            .collect()
    }

    /// Computes the next-token masks of the constrained samples among `ids`, in parallel (the
    /// engine calls it while the forward pass runs). Returns how many it computed.
    pub fn prepare_masks(&mut self, ids: &[SeqId]) -> usize {
        let wanted: HashSet<SeqId> = ids.iter().copied().collect();
        let mut grammars: Vec<&mut SeqGrammar> = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| wanted.contains(id))
            .filter_map(|(_, out)| out.sampler.grammar_mut())
            .collect();
        grammars.par_iter_mut().for_each(|g| g.prepare_mask());
        grammars.len()
    }

    /// Whether any of `ids` is constrained (when none is, a step computes no masks).
    pub fn any_grammar(&self, ids: &[SeqId]) -> bool {
        ids.iter().any(|id| self.seqs.get(id).is_some_and(|o| o.sampler.grammar().is_some()))
    }

    /// Sample `id`'s prompt scores while they are being gathered.
    pub fn prompt_scores_mut(&mut self, id: SeqId) -> Option<&mut PromptScores> {
        self.seqs.get_mut(&id).and_then(|o| o.prompt_scores.as_mut())
    }

    /// Appends each sampled token to its sequence and sends it as an event: text through the
    /// detokenizer, then the stop rule (EOS and stop tokens, stop strings, `max_tokens`, the
    /// model's length). A finished sample leaves the scheduler; a finished request gets its
    /// usage and cost, and is reported.
    pub fn update(
        &mut self,
        scheduler: &mut Scheduler,
        sampled: Vec<(SeqId, SampleOutput)>,
        now: Instant,
    ) -> Result<()> {
        for (id, s) in sampled {
            let Some(out) = self.seqs.get(&id) else { continue }; // its request failed this step
            if let Some(why) = out.sampler.grammar().and_then(|g| g.failure()).map(str::to_string) {
                for failed in self.remove(out.request, EndReason::Error, Some(&why)) {
                    scheduler.remove(failed);
                }
                continue;
            }
            scheduler.append_token(id, s.token_id);
            let out = self.seqs.get_mut(&id).expect("invariant: sampled sequences have output state");
            let seq = scheduler.get(id).expect("invariant: sampled sequences are scheduled");
            let at_length =
                seq.num_output_tokens() >= out.max_tokens || seq.token_ids.len() >= self.config.max_model_len;
            let over_budget = match (out.sampler.params().max_cost_usd, &self.config.metrics) {
                (Some(cap), Some(m)) => self
                    .requests
                    .get(&out.request)
                    .is_some_and(|live| m.cost_of(live.device_seconds + live.step_seconds) > cap),
                _ => false,
            };
            let (text, finish) = next_text(out, &self.config, s.token_id, at_length, over_budget)?;
            if matches!(finish, Some((_, Some(StopReason::Cost)))) {
                if let Some(live) = self.requests.get_mut(&out.request) {
                    live.cut = Some(BudgetKind::Cost);
                }
            }
            let (key, index) = (out.request, out.index);
            let gap = out.last_token.map(|t| now.duration_since(t));
            out.last_token = Some(now);
            let prompt_logprobs = out.prompt_scores.take().map(|p| {
                debug_assert!(p.entries.iter().all(Option::is_some), "every prompt position scored");
                p.entries.into_iter().flatten().collect()
            });
            if prompt_logprobs.is_some() {
                // Sent: a recompute after preemption may use the prefix cache again.
                scheduler.stop_prompt_logits(id);
            }
            let live = self.requests.get_mut(&key).expect("invariant: a sequence's request is live");
            for deferred in live.deferred.drain(..) {
                scheduler.add(deferred);
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
            if let Some((reason, _)) = finish {
                live.reason = match reason {
                    FinishReason::Length => EndReason::Length,
                    FinishReason::Stop => EndReason::Stop,
                    FinishReason::Abort => EndReason::Abort,
                };
                live.num_unfinished -= 1;
                scheduler.remove(id);
                self.seqs.remove(&id);
                if live.num_unfinished == 0 {
                    self.finish(key, now);
                }
            }
        }
        Ok(())
    }

    /// Ends the requests whose budget runs out before their next token could come (`now` plus
    /// the last step's time): the first token's deadline while they have none, or the whole
    /// request's. Their unfinished samples stop where they are (finish `length`, the deadline
    /// as stop reason), each sending the text its detokenizer held back; a request cut before
    /// it was scheduled frees its place in the queue. Budgets stop requests, never change
    /// their tokens.
    pub fn expire(&mut self, scheduler: &mut Scheduler, now: Instant) -> Result<()> {
        let next_token = now + self.step_forecast;
        let late: Vec<(u64, BudgetKind)> =
            self.requests.iter().filter_map(|(key, live)| Some((*key, live.expired(next_token)?))).collect();
        for (key, kind) in late {
            let live = self.requests.get_mut(&key).expect("invariant: listed above");
            let stop = match kind {
                BudgetKind::FirstTokenDeadline => StopReason::FirstTokenDeadline,
                _ => StopReason::Deadline,
            };
            for id in &live.seqs {
                let Some(mut out) = self.seqs.remove(id) else { continue }; // finished already
                scheduler.remove(*id);
                let text = out.detokenizer.finish(&self.config.tokenizer)?;
                let finish = (FinishReason::Length, Some(stop.clone()));
                // A failed send means the client left; nothing else is owed to it.
                let _ = live.events.send(RequestEvent::Stopped { index: out.index, text, finish });
            }
            live.deferred.clear();
            live.reason = EndReason::Length;
            live.cut = Some(kind);
            self.finish(key, now);
        }
        Ok(())
    }

    /// Pools the step's hidden rows (`hidden`: a row per `input.hidden_indices` entry) into
    /// their embeddings; an embedding whose prompt is now computed is sent, and its request
    /// finished. Call after `scheduler.complete_step`.
    pub fn pool(
        &mut self,
        plan: &SchedulerPlan,
        input: &ForwardInput,
        hidden: Option<&Tensor>,
        scheduler: &mut Scheduler,
        now: Instant,
    ) -> Result<()> {
        if self.pools.is_empty() {
            return Ok(());
        }
        // A step may finish a CLS-pooled prompt with no hidden rows at all (its row came first).
        let (width, rows) = match hidden {
            Some(h) => (h.dim(1)?, h.flatten_all()?.to_vec1::<f32>()?),
            None => (0, Vec::new()),
        };
        let normalize = self.config.pooling.as_ref().is_some_and(|p| p.normalize);
        for (i, planned) in plan.seqs.iter().enumerate() {
            let id = planned.seq_id;
            let Some(out) = self.pools.get_mut(&id) else { continue };
            let (range, chunk) = (&input.hidden_rows[i], &input.attention.seqs()[i]);
            if !range.is_empty() {
                let first_pos = chunk.context_len - chunk.query_len;
                out.pooler.add(first_pos, &rows[range.start * width..range.end * width], width);
            }
            let Some(seq) = scheduler.get(id) else { continue };
            if seq.num_computed_tokens < seq.num_prompt_tokens {
                continue;
            }
            let out = self.pools.remove(&id).expect("invariant: looked up above");
            let vector = out.pooler.finish(out.dimensions, normalize);
            scheduler.remove(id);
            let live = self.requests.get_mut(&out.request).expect("invariant: a sequence's request is live");
            // A failed send means the client left; the request is dropped at the next step.
            let _ = live.events.send(RequestEvent::Embedding { index: out.index, vector });
            live.num_unfinished -= 1;
            if live.num_unfinished == 0 {
                self.finish(out.request, now);
            }
        }
        Ok(())
    }

    /// Request `key`'s last sample finished: its usage closes the stream.
    fn finish(&mut self, key: u64, now: Instant) {
        let live = self.requests.remove(&key).expect("invariant: live");
        if live.first_scheduled.is_none() {
            self.shared.dequeued(); // cut by a deadline while it waited
        }
        self.record(&live, live.reason, now);
        let cost_usd = self.config.metrics.as_ref().map_or(0.0, |m| m.cost_of(live.device_seconds));
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
            budgets: live.budget_outcomes(now),
        };
        let _ = live.events.send(RequestEvent::Finished(usage));
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
            budgets: live.budget_outcomes(ended),
            priority: live.priority,
        });
    }
}

/// Why a sample ended, as its last token reports it.
type Finish = (FinishReason, Option<StopReason>);

/// The text `token_id` makes final, and whether it ends the sample: a stop token first, then
/// a stop string in the text, then a complete grammar, then the length (`at_length`).
fn next_text(
    out: &mut SeqOutput,
    config: &OutputConfig,
    token_id: u32,
    at_length: bool,
    over_budget: bool,
) -> Result<(String, Option<Finish>)> {
    let params = out.sampler.params();
    let stop_token = (!params.ignore_eos && config.eos_token_ids.contains(&token_id))
        || params.stop_token_ids.contains(&token_id);
    let tokenizer = &config.tokenizer;
    if stop_token {
        let text = out.detokenizer.finish(tokenizer)?;
        return Ok((text, Some((FinishReason::Stop, Some(StopReason::Token(token_id))))));
    }
    let step = out.detokenizer.push(tokenizer, token_id)?;
    Ok(if let Some(m) = step.stop {
        (step.delta, Some((FinishReason::Stop, Some(StopReason::Text(m.text)))))
    } else if out.sampler.grammar().is_some_and(|g| g.is_complete()) {
        (step.delta + &out.detokenizer.finish(tokenizer)?, Some((FinishReason::Stop, None)))
    } else if at_length {
        (step.delta + &out.detokenizer.finish(tokenizer)?, Some((FinishReason::Length, None)))
    } else if over_budget {
        (
            step.delta + &out.detokenizer.finish(tokenizer)?,
            Some((FinishReason::Length, Some(StopReason::Cost))),
        )
    } else {
        (step.delta, None)
    })
}
