//! The scheduler: which tokens of which sequences run in the next step. Holds no tensors.
//!
//! Each step has a token budget (`max_num_batched_tokens`) and a sequence limit
//! (`max_num_seqs`). Running sequences are served first, oldest first: one token each when
//! decoding, or their next prompt chunk while still prefilling. Then waiting sequences are
//! admitted first-come-first-served, their prompts chunked to fit what is left of the budget
//! (chunked prefill); a new sequence first takes its longest cached prefix from the block
//! manager and skips computing it. When blocks run out, the most recently admitted running
//! sequence is preempted by recompute: its blocks are freed and it goes back to the front of
//! the waiting queue with its generated tokens, to be prefilled again (mostly from the prefix
//! cache). Since every sequence was checked at submission to fit the whole cache alone, the
//! oldest running sequence can always proceed: no deadlock, and FCFS admission without
//! skipping means no starvation. (vLLM v1's scheduler works the same way.)
//!
//! Under the `priority` policy ([`SchedulingPolicy::Priority`], vLLM's) the waiting and the
//! running sequences are kept ordered by each request's priority (lower first), then arrival:
//! the best are admitted and served first, the worst preempted first, and a waiting sequence
//! whose priority is strictly better than a running one's may preempt it when blocks run out.
//! Preemption is the same recompute, so outputs never change; a low priority can wait for as
//! long as better ones keep coming. The `deadline` policy ([`SchedulingPolicy::Deadline`]) is
//! the same machinery ordered by each request's deadline instead (earliest deadline first; a
//! request without one after every request with one): a [`Place`] is where a sequence stands.
//!
//! With an inter-token latency target (`max_itl`, `--max-itl-ms`) the prompt tokens of a step
//! are capped so the step, decodes included, should end within it: [`StepCost`] predicts a
//! step's time from the steps run. Prompts then finish one or a few at a time in their order,
//! so the k-th waiting request's first token comes after about k prompts' work, not after
//! every queued prompt, and running streams are not stalled by a burst of prompts. Outputs
//! never depend on how steps are cut.
//!
//! An embedding is a sequence with a [`PoolingType`](crate::pooling::PoolingType):
//! scheduled, chunked and preempted like any prompt, it never samples, and its chunks ask the
//! model for the hidden rows its pooling needs ([`HiddenRows`](super::HiddenRows)). Mean and
//! CLS pooling need every position computed, so such a sequence skips the prefix cache (as one
//! that wants prompt logprobs does).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::{Backlog, ScheduledChunk, ScheduledSeq, SchedulerPlan, SeqId, Sequence};
use crate::kv_cache::CacheConfig;
use crate::sched::block_manager::{BlockConfigError, BlockManager};
use crate::sched::StepCost;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens one step computes over all sequences: decodes first, then prompt chunks.
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    pub policy: SchedulingPolicy,
    /// Seconds a step should take at most, decodes and prompt chunks together: prompt tokens
    /// are capped to fit (prompts keep at least half of a step). `None`: the token budget alone.
    pub max_itl: Option<f64>,
}

impl Default for SchedulerConfig {
    /// The command line's defaults (vLLM's, and no latency target).
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            policy: SchedulingPolicy::Fcfs,
            max_itl: None,
        }
    }
}

/// In which order sequences are admitted, served and preempted (`--scheduling-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// First come, first served; the newest running sequence is preempted first.
    #[default]
    Fcfs,
    /// By priority (lower first), then arrival; see the module's documentation.
    Priority,
    /// By deadline (earliest first, none last), then arrival.
    Deadline,
}

/// Where a sequence stands under the policy: lower goes first, ties by arrival. Under FCFS
/// every place is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    priority: i32,
    /// `(false, Some(t))` for a deadline `t`, `(true, None)` for none: a deadline first.
    deadline: (bool, Option<Instant>),
}

impl Place {
    pub fn new(policy: SchedulingPolicy, priority: i32, deadline: Option<Instant>) -> Self {
        let none = (false, None);
        match policy {
            SchedulingPolicy::Fcfs => Place { priority: 0, deadline: none },
            SchedulingPolicy::Priority => Place { priority, deadline: none },
            SchedulingPolicy::Deadline => Place { priority: 0, deadline: (deadline.is_none(), deadline) },
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_cache_usage: f64,
    pub num_used_blocks: usize,
    pub num_total_blocks: usize,
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub num_preemptions: u64,
}

/// Prompt tokens a step takes under a latency target before the step cost model answers.
const LEARNING_CHUNK: usize = 128;

pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// Admission order (by rank under the priority policy): the last one is preempted first.
    running: Vec<SeqId>,
    num_preemptions: u64,
    /// The next sequence's arrival number.
    next_arrival: u64,
    /// What steps have cost, for `max_itl`.
    step_cost: StepCost,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, cache: CacheConfig) -> Result<Self, BlockConfigError> {
        let blocks = BlockManager::new(cache)?;
        Ok(Self {
            config,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
            next_arrival: 0,
            step_cost: StepCost::default(),
        })
    }

    /// `plan`'s step took `seconds` from planning to its outputs.
    pub fn observe_step(&mut self, plan: &SchedulerPlan, seconds: f64) {
        let decodes = plan.seqs.iter().filter(|s| s.num_new_tokens == 1 && s.samples).count();
        self.step_cost.observe(plan.num_batched_tokens - decodes, decodes, seconds);
    }

    /// Prompt tokens the next step may take under `max_itl` (unbounded without one; small
    /// chunks until the cost of a step is known, so a first burst is not one long step).
    fn prefill_cap(&self) -> usize {
        let Some(target) = self.config.max_itl else { return usize::MAX };
        let decode_rows = self.running.iter().filter(|id| !self.seqs[id].prefilling()).count();
        self.step_cost.prefill_cap(target, decode_rows).unwrap_or(LEARNING_CHUNK)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Tokens per cache block.
    pub fn block_size(&self) -> usize {
        self.blocks.block_size()
    }

    /// Blocks a sequence of `num_tokens` needs (for the submission check).
    pub fn blocks_needed(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.blocks.block_size())
    }

    pub fn add(&mut self, mut seq: Sequence) {
        seq.arrival = self.next_arrival;
        self.next_arrival += 1;
        let id = seq.id;
        self.seqs.insert(id, seq);
        if self.ordered() {
            let at = self.waiting.partition_point(|&w| self.rank(w) < self.rank(id));
            self.waiting.insert(at, id);
        } else {
            self.waiting.push_back(id);
        }
    }

    /// Whether sequences are kept in order of their [`Place`] (any policy but FCFS).
    fn ordered(&self) -> bool {
        self.config.policy != SchedulingPolicy::Fcfs
    }

    /// Where a sequence stands: lower is better.
    fn rank(&self, id: SeqId) -> (Place, u64) {
        let seq = &self.seqs[&id];
        (Place::new(self.config.policy, seq.priority, seq.deadline), seq.arrival)
    }

    /// Puts `id` among the running sequences: last (FCFS), or at its rank.
    fn start_running(&mut self, id: SeqId) {
        if self.ordered() {
            let at = self.running.partition_point(|&r| self.rank(r) < self.rank(id));
            self.running.insert(at, id);
        } else {
            self.running.push(id);
        }
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// The sequence's prompt logits have been used: its recomputes may read the prefix cache.
    pub fn stop_prompt_logits(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.needs_prompt_logits = false;
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        let b = &self.blocks;
        SchedulerStats {
            num_running: self.running.len(),
            num_waiting: self.waiting.len(),
            kv_cache_usage: b.usage(),
            num_used_blocks: b.num_total_blocks() - b.num_free_blocks(),
            num_total_blocks: b.num_total_blocks(),
            prefix_cache_queried_tokens: b.prefix_cache_queried_tokens(),
            prefix_cache_hit_tokens: b.prefix_cache_hit_tokens(),
            num_preemptions: self.num_preemptions,
        }
    }

    /// The prompt work queued now, for predicting a new request's first token
    /// ([`Backlog::first_token_secs`]).
    pub fn backlog(&self) -> Backlog {
        let decode_rows = self.running.iter().filter(|id| !self.seqs[id].prefilling()).count();
        let budget = self.config.max_num_batched_tokens.saturating_sub(decode_rows).max(1);
        Backlog {
            step: self.step_cost.estimate(),
            decode_rows,
            prompt_tokens_per_step: budget.min(self.prefill_cap()),
            running_prompt_tokens: self
                .running
                .iter()
                .map(|id| &self.seqs[id])
                .filter(|s| s.prefilling())
                .map(|s| s.num_uncomputed())
                .sum(),
            waiting: self
                .waiting
                .iter()
                .map(|&id| (self.rank(id).0, self.seqs[&id].num_uncomputed()))
                .collect(),
        }
    }

    pub fn schedule(&mut self) -> SchedulerPlan {
        let mut plan = SchedulerPlan::default();
        let mut budget = self.config.max_num_batched_tokens;
        // Prompt tokens left under the latency target; decodes do not count against it.
        let mut prefill_left = self.prefill_cap();

        // Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let prefilling = seq.prefilling();
            let cap = if prefilling { prefill_left } else { budget };
            let n = seq.num_uncomputed().min(budget).min(cap);
            if n == 0 {
                i += 1;
                continue;
            }
            let target = seq.num_computed_tokens + n;
            // Make room: preempt the newest running sequences until this one fits.
            let mut fits = false;
            loop {
                let seq = self.seqs.get_mut(&id).expect("invariant: running ids are known");
                if self.blocks.allocate_slots(&mut seq.block_table, target).is_ok() {
                    fits = true;
                    break;
                }
                let victim = *self.running.last().expect("invariant: this sequence is running");
                // Victims come after this sequence, unplanned: nothing to give back.
                budget += self.preempt(victim, &mut plan);
                if victim == id {
                    break;
                }
            }
            if !fits {
                break; // it preempted itself: everything after it is gone too
            }
            let seq = &self.seqs[&id];
            plan.seqs.push(ScheduledSeq { seq_id: id, num_new_tokens: n, samples: seq.samples_at(target) });
            budget -= n;
            if prefilling {
                prefill_left -= n;
            }
            i += 1;
        }

        // Waiting sequences in order (first come first served, or by place); under FCFS
        // none when this step had to preempt, and never one preempted in this step.
        let ordered = self.ordered();
        while (ordered || plan.preempted.is_empty())
            && budget > 0
            && prefill_left > 0
            && self.running.len() < self.config.max_num_seqs
            && !self.waiting.is_empty()
        {
            let id = self.waiting[0];
            if plan.preempted.contains(&id) {
                break;
            }
            let seq = self.seqs.get_mut(&id).expect("invariant: waiting ids are known");
            if seq.block_table.is_empty() && !seq.computes_whole_prompt() {
                let hit = self.blocks.lookup_prefix(&mut seq.block_hashes, &seq.token_ids);
                seq.block_table = hit.blocks;
                seq.num_computed_tokens = hit.num_cached_tokens;
            }
            let prefilling = seq.prefilling();
            let cap = if prefilling { prefill_left } else { budget };
            let n = seq.num_uncomputed().min(budget).min(cap);
            let target = seq.num_computed_tokens + n;
            if self.blocks.allocate_slots(&mut seq.block_table, target).is_err() {
                // Give the cached prefix back; it stays findable in the cache.
                self.blocks.free(&mut seq.block_table).expect("invariant: a sequence's blocks are allocated");
                seq.num_computed_tokens = 0;
                // A strictly better place takes the worst running sequence's blocks, and
                // its planned tokens if it had some this step.
                match self.running.last() {
                    Some(&worst) if ordered && self.rank(worst).0 > self.rank(id).0 => {
                        budget += self.preempt(worst, &mut plan);
                        continue;
                    }
                    _ => break,
                }
            }
            if seq.num_cached_prompt_tokens.is_none() {
                seq.num_cached_prompt_tokens = Some(seq.num_computed_tokens.min(seq.num_prompt_tokens));
                plan.first_scheduled.push(id);
            }
            let samples = seq.samples_at(target);
            self.waiting.pop_front();
            self.start_running(id);
            plan.seqs.push(ScheduledSeq { seq_id: id, num_new_tokens: n, samples });
            budget -= n;
            if prefilling {
                prefill_left -= n;
            }
        }
        plan.num_batched_tokens = self.config.max_num_batched_tokens - budget;
        plan
    }

    /// Frees `id`'s blocks and puts it back among the waiting (first under FCFS, at its rank
    /// otherwise). Returns the tokens it had planned in this step (0 when it had none).
    fn preempt(&mut self, id: SeqId, plan: &mut SchedulerPlan) -> usize {
        let seq = self.seqs.get_mut(&id).expect("invariant: preempted id is known");
        self.blocks.free(&mut seq.block_table).expect("invariant: a sequence's blocks are allocated");
        seq.num_computed_tokens = 0;
        seq.num_preemptions += 1;
        self.running.retain(|&r| r != id);
        if self.ordered() {
            let at = self.waiting.partition_point(|&w| self.rank(w) < self.rank(id));
            self.waiting.insert(at, id);
        } else {
            self.waiting.push_front(id);
        }
        // In the running pass the victim is the last, not planned yet; a sequence admitted
        // by priority may preempt one planned earlier in this step, whose tokens return.
        let planned: usize = plan.seqs.iter().filter(|s| s.seq_id == id).map(|s| s.num_new_tokens).sum();
        plan.seqs.retain(|s| s.seq_id != id);
        if plan.first_scheduled.contains(&id) {
            // Admitted and preempted in one step: it has not started yet.
            plan.first_scheduled.retain(|&f| f != id);
            self.seqs.get_mut(&id).expect("invariant: preempted id is known").num_cached_prompt_tokens = None;
        }
        plan.preempted.push(id);
        self.num_preemptions += 1;
        planned
    }

    /// The token slices and block tables of a plan, for [`crate::forward_input::ForwardInput`].
    pub fn chunks(&self, plan: &SchedulerPlan) -> Vec<ScheduledChunk<'_>> {
        plan.seqs
            .iter()
            .map(|s| {
                let seq = &self.seqs[&s.seq_id];
                ScheduledChunk {
                    token_ids: &seq.token_ids
                        [seq.num_computed_tokens..seq.num_computed_tokens + s.num_new_tokens],
                    num_computed_tokens: seq.num_computed_tokens,
                    block_table: &seq.block_table,
                    all_logits: seq.needs_prompt_logits && seq.num_computed_tokens < seq.num_prompt_tokens,
                    hidden: seq.hidden_rows(s.num_new_tokens),
                }
            })
            .collect()
    }

    /// After the forward: the planned tokens are in the cache; full blocks join the prefix cache.
    pub fn complete_step(&mut self, plan: &SchedulerPlan) {
        for s in &plan.seqs {
            let seq = self.seqs.get_mut(&s.seq_id).expect("invariant: planned ids are known");
            seq.num_computed_tokens += s.num_new_tokens;
            let computed = &seq.token_ids[..seq.num_computed_tokens];
            self.blocks.cache_full_blocks(&seq.block_table, &mut seq.block_hashes, computed);
        }
    }

    pub fn append_token(&mut self, id: SeqId, token_id: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.token_ids.push(token_id);
        }
    }

    /// Removes a sequence (finished or aborted) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        self.blocks.free(&mut seq.block_table).expect("invariant: a sequence's blocks are allocated");
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        Some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn scheduler(num_blocks: usize, budget: usize, max_num_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig { max_num_batched_tokens: budget, max_num_seqs, ..Default::default() },
            CacheConfig { block_size: 4, num_blocks, enable_prefix_caching: true },
        )
        .unwrap()
    }

    /// Runs one step as the engine would, appending `next` to every sequence that samples.
    fn step(s: &mut Scheduler, next: u32) -> SchedulerPlan {
        let plan = s.schedule();
        s.complete_step(&plan);
        for p in plan.seqs.iter().filter(|p| p.samples) {
            s.append_token(p.seq_id, next);
        }
        plan
    }

    fn planned(plan: &SchedulerPlan) -> Vec<(u64, usize, bool)> {
        plan.seqs.iter().map(|s| (s.seq_id.0, s.num_new_tokens, s.samples)).collect()
    }

    #[test]
    fn decodes_first_then_chunked_prefill_within_the_budget() {
        let mut s = scheduler(64, 10, 8);
        s.add(Sequence::new(SeqId(0), vec![1; 6]));
        assert_eq!(planned(&step(&mut s, 9)), vec![(0, 6, true)]);
        s.add(Sequence::new(SeqId(1), vec![2; 25]));
        // Seq 0 decodes one token; seq 1's 25-token prompt gets the remaining 9, then 9, then 7.
        assert_eq!(planned(&step(&mut s, 9)), vec![(0, 1, true), (1, 9, false)]);
        assert_eq!(planned(&step(&mut s, 9)), vec![(0, 1, true), (1, 9, false)]);
        let p = step(&mut s, 9);
        assert_eq!(planned(&p), vec![(0, 1, true), (1, 7, true)]);
        assert_eq!(p.num_batched_tokens, 8);
        assert_eq!(planned(&step(&mut s, 9)), vec![(0, 1, true), (1, 1, true)]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_it_resumes_later() {
        // 4 blocks of 4 tokens; two sequences of 6 tokens need 2 blocks each, then grow.
        let mut s = scheduler(4, 64, 8);
        s.add(Sequence::new(SeqId(0), vec![1; 6]));
        s.add(Sequence::new(SeqId(1), vec![2; 7]));
        assert_eq!(planned(&step(&mut s, 3)), vec![(0, 6, true), (1, 7, true)]);
        // Seq 1 reaches 8 tokens (2 blocks full); seq 0 at 7 then 8 fits; then seq 0 needs a third
        // block at token 9 while seq 1 needs one too: seq 1 (newest) is preempted.
        step(&mut s, 3);
        let p = step(&mut s, 3);
        assert_eq!(p.preempted, vec![SeqId(1)]);
        assert_eq!(planned(&p), vec![(0, 1, true)]);
        assert_eq!(s.stats().num_preemptions, 1);
        let seq1 = s.get(SeqId(1)).unwrap();
        assert_eq!((seq1.num_computed_tokens, seq1.block_table.len()), (0, 0));
        assert_eq!(seq1.token_ids.len(), 9, "generated tokens are kept for recompute");
        s.remove(SeqId(0));
        // Now seq 1 comes back, its full blocks found in the prefix cache.
        let p = step(&mut s, 3);
        assert_eq!(p.seqs.len(), 1);
        assert_eq!(p.seqs[0].seq_id, SeqId(1));
        assert!(p.seqs[0].num_new_tokens < 9, "part of the recompute came from the prefix cache");
        assert!(p.seqs[0].samples);
    }

    #[test]
    fn max_num_seqs_and_fcfs_admission() {
        let mut s = scheduler(64, 100, 2);
        for i in 0..3 {
            s.add(Sequence::new(SeqId(i), vec![i as u32 + 1; 3]));
        }
        let p = step(&mut s, 7);
        assert_eq!(planned(&p), vec![(0, 3, true), (1, 3, true)]);
        assert_eq!(s.stats().num_waiting, 1);
        s.remove(SeqId(0));
        let p = step(&mut s, 7);
        assert_eq!(planned(&p), vec![(1, 1, true), (2, 3, true)]);
    }

    fn by_priority(num_blocks: usize, budget: usize, max_num_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: budget,
                max_num_seqs,
                policy: SchedulingPolicy::Priority,
                max_itl: None,
            },
            CacheConfig { block_size: 4, num_blocks, enable_prefix_caching: true },
        )
        .unwrap()
    }

    fn with_priority(id: u64, tokens: Vec<u32>, priority: i32) -> Sequence {
        Sequence { priority, ..Sequence::new(SeqId(id), tokens) }
    }

    /// With one sequence running at a time: the order sequences run in, each to its first token.
    fn admission_order(s: &mut Scheduler) -> Vec<u64> {
        let mut order = Vec::new();
        while s.has_work() {
            let p = step(s, 7);
            let id = p.seqs[0].seq_id;
            order.push(id.0);
            s.remove(id);
        }
        order
    }

    #[test]
    fn priority_orders_admission_then_arrival() {
        let mut s = by_priority(64, 100, 1);
        s.add(with_priority(0, vec![1; 3], 5));
        s.add(with_priority(1, vec![2; 3], 10));
        s.add(with_priority(2, vec![3; 3], 0));
        s.add(with_priority(3, vec![4; 3], 5));
        assert_eq!(admission_order(&mut s), vec![2, 0, 3, 1], "priority, then arrival");
    }

    /// Under the deadline policy: earliest deadline first, ties by arrival, none last; a
    /// priority means nothing there.
    #[test]
    fn deadline_orders_admission_then_arrival_with_none_last() {
        let mut s = by_priority(64, 100, 1);
        s.config.policy = SchedulingPolicy::Deadline;
        let now = Instant::now();
        let at = |ms| Some(now + std::time::Duration::from_millis(ms));
        let seqs = [(None, 0), (at(300), 9), (at(100), 5), (None, -3), (at(300), 0), (at(50), 1)];
        for (id, (deadline, priority)) in seqs.into_iter().enumerate() {
            s.add(Sequence { deadline, ..with_priority(id as u64, vec![id as u32 + 1; 3], priority) });
        }
        assert_eq!(admission_order(&mut s), vec![5, 2, 1, 4, 0, 3], "deadline, then arrival, none last");
    }

    /// Blocks full of low-priority sequences: a better one preempts the worst running (the
    /// newest of the worst priority), runs in the same step, and the victim resumes after.
    #[test]
    fn a_better_priority_preempts_the_worst_running_for_blocks() {
        let mut s = by_priority(4, 64, 8);
        s.add(with_priority(0, vec![1; 8], 10));
        s.add(with_priority(1, vec![2; 8], 10));
        assert_eq!(planned(&step(&mut s, 3)), vec![(0, 8, true), (1, 8, true)]);
        s.add(with_priority(2, vec![5; 8], 0));
        // Seqs 0 and 1 each need a third block (none is free): seq 1 is preempted for seq 0,
        // which takes one of its two. Seq 2 (priority 0) needs two: seq 0, already planned,
        // is preempted for it and its token given back.
        let p = step(&mut s, 3);
        assert_eq!(p.preempted, vec![SeqId(1), SeqId(0)]);
        assert_eq!(planned(&p), vec![(2, 8, true)]);
        assert!(p.first_scheduled.contains(&SeqId(2)));
        assert_eq!(p.num_batched_tokens, 8, "the victim's planned token was given back");
        s.remove(SeqId(2));
        let p = step(&mut s, 3);
        assert_eq!(p.seqs[0].seq_id, SeqId(0), "the victims resume by rank");
        // Equal priorities never preempt each other for admission (seq 0 takes the third and
        // last block as it grows; seq 1 waits for one).
        let mut s = by_priority(3, 64, 8);
        s.add(with_priority(0, vec![1; 8], 3));
        step(&mut s, 3);
        s.add(with_priority(1, vec![2; 4], 3));
        let p = step(&mut s, 3);
        assert!(p.preempted.is_empty() && planned(&p) == vec![(0, 1, true)], "{p:?}");
    }

    /// Random workloads under a small cache: budgets and limits always hold, every sequence
    /// finishes (no deadlock, no starvation), and all blocks come back.
    #[test]
    fn random_workloads_always_finish() {
        let mut rng = StdRng::seed_from_u64(11);
        for round in 0..40 {
            let budget = rng.random_range(1..40);
            let max_seqs = rng.random_range(1..6);
            let num_blocks = rng.random_range(8..24);
            // Half the rounds by priority, with random priorities.
            let priority = round % 2 == 1;
            let mut s = if priority {
                by_priority(num_blocks, budget, max_seqs)
            } else {
                scheduler(num_blocks, budget, max_seqs)
            };
            // Every third round under a latency target, with steps costing 1 ms + 1 ms a
            // token: chunks of at least MIN_PREFILL_CHUNK, often far below the budget.
            if round % 3 == 2 {
                s.config.max_itl = Some(rng.random_range(0.001..0.05));
                for (p, d) in [(0, 1), (7, 0), (20, 2), (3, 3)] {
                    s.step_cost.observe(p, d, 0.001 + 0.001 * (p + d) as f64);
                }
            }
            let mut targets = HashMap::new();
            for i in 0..rng.random_range(1..12u64) {
                // Every sequence fits the cache alone (what submission guarantees).
                let total = rng.random_range(2..=num_blocks * 4);
                let prompt = rng.random_range(1..total);
                let shared = rng.random_bool(0.5);
                let tokens =
                    (0..prompt).map(|t| if shared { t as u32 } else { rng.random_range(0..50) }).collect();
                let p = if priority { rng.random_range(0..3) } else { 0 };
                s.add(with_priority(i, tokens, p));
                targets.insert(SeqId(i), total);
            }
            let mut steps = 0;
            while s.has_work() {
                steps += 1;
                assert!(steps < 10_000, "round {round}: no progress");
                let p = step(&mut s, 1);
                assert!(p.num_batched_tokens <= budget);
                assert!(p.seqs.len() <= max_seqs);
                assert!(!p.seqs.is_empty(), "round {round}: a step with work scheduled nothing");
                for id in p.seqs.iter().map(|x| x.seq_id) {
                    if s.get(id).unwrap().token_ids.len() >= targets[&id] {
                        s.remove(id);
                    }
                }
            }
            assert_eq!(s.stats().num_used_blocks, 0, "round {round}");
        }
    }

    /// Under a latency target a step's prompt tokens stay within what the learned step cost
    /// allows beside its decodes; decodes are never cut; prompts finish in arrival order, one
    /// or two a step, instead of all in the first step the token budget would allow.
    #[test]
    fn a_latency_target_caps_prompt_tokens_not_decodes() {
        let mut s = scheduler(256, 2048, 16);
        s.config.max_itl = Some(0.1);
        // Steps cost 10 ms + 1 ms a token: 90 tokens fit the 100 ms target.
        for (p, d) in [(0, 1), (50, 0), (200, 0), (8, 2), (100, 0)] {
            s.step_cost.observe(p, d, 0.01 + 0.001 * (p + d) as f64);
        }
        let first_cap = s.prefill_cap();
        assert!((89..=90).contains(&first_cap), "{first_cap}");
        for i in 0..4 {
            s.add(Sequence::new(SeqId(i), vec![i as u32 + 1; 60]));
        }
        let mut first_tokens = Vec::new();
        let mut steps = 0;
        while first_tokens.len() < 4 {
            steps += 1;
            assert!(steps < 20, "prompts stalled");
            let decoding = s.running.iter().filter(|id| !s.seqs[id].prefilling()).count();
            let cap = s.prefill_cap();
            let plan = step(&mut s, 5);
            let prompt_tokens: usize =
                plan.seqs.iter().filter(|p| p.num_new_tokens > 1).map(|p| p.num_new_tokens).sum();
            let decodes = plan.seqs.iter().filter(|p| p.num_new_tokens == 1).count();
            assert!(prompt_tokens <= cap, "step {steps}: {prompt_tokens} prompt tokens over the cap {cap}");
            assert_eq!(decodes, decoding, "step {steps}: every decode runs");
            for p in plan.seqs.iter().filter(|p| p.samples) {
                if s.get(p.seq_id).unwrap().num_output_tokens() == 1 {
                    first_tokens.push((p.seq_id.0, steps));
                }
            }
        }
        let order: Vec<u64> = first_tokens.iter().map(|&(id, _)| id).collect();
        assert_eq!(order, vec![0, 1, 2, 3], "first tokens in arrival order");
        // 240 prompt tokens at ~90 a step: the first request's first token in step 1, the
        // last one's by step 3 or 4; without the target all four come from step 1.
        assert_eq!(first_tokens[0].1, 1);
        assert!(first_tokens[3].1 >= 3, "{first_tokens:?}");
    }

    #[test]
    fn without_a_latency_target_the_token_budget_alone_decides() {
        let mut s = scheduler(256, 2048, 16);
        for (p, d) in [(0, 1), (50, 0), (200, 0), (8, 2), (100, 0)] {
            s.step_cost.observe(p, d, 0.01 + 0.001 * (p + d) as f64);
        }
        for i in 0..4 {
            s.add(Sequence::new(SeqId(i), vec![i as u32 + 1; 60]));
        }
        let plan = step(&mut s, 5);
        assert_eq!(planned(&plan), (0..4).map(|i| (i, 60, true)).collect::<Vec<_>>());
    }

    #[test]
    fn before_any_step_is_timed_a_latency_target_takes_small_chunks() {
        let mut s = scheduler(256, 2048, 16);
        s.config.max_itl = Some(0.25);
        for i in 0..4 {
            s.add(Sequence::new(SeqId(i), vec![i as u32 + 1; 100]));
        }
        assert_eq!(planned(&step(&mut s, 5)), vec![(0, 100, true), (1, LEARNING_CHUNK - 100, false)]);
    }
}
