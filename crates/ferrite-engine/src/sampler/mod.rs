//! The serving engine's sampler: one step's logits, one row per sequence, become one token per
//! sequence (with logprobs), each sequence under its own [`SamplingParams`] and seeded RNG, the
//! rows in parallel.
//!
//! Per row, in vLLM's order: `logit_bias` → `min_tokens` mask → penalties (repetition,
//! frequency, presence) → argmax if `temperature == 0`, else divide by `temperature` → `top_k` →
//! `top_p` → `min_p` → one draw from the sequence's RNG. A row's token depends only on that row
//! and its own sequence's parameters, history and RNG, never on the rest of the batch (DESIGN:
//! "a request gives the same tokens alone or in a busy batch").
//!
//! Logprobs, the chosen token's and the `top_logprobs`, are the log-softmax of the RAW f32 logits,
//! before any of the steps above: what the model thinks, not what the sampler made of it (vLLM
//! v1's default `logprobs_mode = "raw_logprobs"`).
//!
//! A constrained sequence (structured output, [`crate::grammar`]) first has every token its
//! grammar disallows set to -inf; everything above, logprobs included, then reads that masked
//! row (as in vLLM, which applies the grammar's bitmask to the logits the sampler receives).

pub mod device;
mod params;
mod softmax;

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::grammar::SeqGrammar;
pub use params::{SamplingParams, MAX_ABS_LOGIT_BIAS, MAX_ABS_PENALTY, MAX_TOP_LOGPROBS};
use softmax::BlockSums;

/// One sequence's sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOutput {
    pub token_id: u32,
    /// `log_softmax(raw logits)[token_id]`.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the raw logits, `(token id, logprob)`, most
    /// likely first (ties: lower id first); empty when none were asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples one token for each sequence, in parallel over sequences, and records it in that
/// sequence's history (for penalties and `min_tokens`).
///
/// `logits`: `[seqs.len(), vocab_size]` row-major; row `i` belongs to `seqs[i]`. Returns one
/// output per sequence, in order.
///
/// # Panics
/// If `vocab_size` is 0 or `logits.len() != seqs.len() * vocab_size` (a caller bug).
pub fn sample_batch(
    logits: &[f32],
    vocab_size: usize,
    seqs: &mut [&mut SequenceSampler],
) -> Vec<SampleOutput> {
    assert!(vocab_size > 0, "sample_batch: vocab_size must be > 0");
    assert_eq!(
        logits.len(),
        seqs.len() * vocab_size,
        "sample_batch: logits must be [num_seqs ({}) * vocab_size ({vocab_size})]",
        seqs.len()
    );
    logits.par_chunks(vocab_size).zip(seqs.par_iter_mut()).map(|(row, seq)| seq.sample(row)).collect()
}

/// One sequence's sampler state: its parameters, its RNG, and the history the penalties and
/// `min_tokens` need, kept up to date by [`SequenceSampler::sample`] so that callers never
/// rebuild it.
#[derive(Debug)]
pub struct SequenceSampler {
    params: SamplingParams,
    rng: StdRng,
    /// Masked to -inf while fewer than `min_tokens` are generated: `stop_token_ids`, and the EOS
    /// ids unless `ignore_eos`. Empty when `min_tokens` is 0.
    min_tokens_masked_ids: Vec<u32>,
    /// Distinct ids of the prompt and the output so far, sorted; empty unless
    /// `repetition_penalty != 1`.
    repetition_ids: Vec<u32>,
    /// How often each id was generated; empty unless a frequency or presence penalty is set.
    output_counts: HashMap<u32, u32>,
    num_generated_tokens: usize,
    /// The grammar the output must follow, if any.
    grammar: Option<SeqGrammar>,
}

impl SequenceSampler {
    /// `params` should have passed [`SamplingParams::validate`] (ids outside the row are
    /// ignored here). An unseeded request draws a random seed.
    pub fn new(params: SamplingParams, prompt_token_ids: &[u32], eos_token_ids: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut min_tokens_masked_ids = Vec::new();
        if params.min_tokens > 0 {
            min_tokens_masked_ids.extend_from_slice(&params.stop_token_ids);
            if !params.ignore_eos {
                min_tokens_masked_ids.extend_from_slice(eos_token_ids);
            }
        }
        let mut repetition_ids = Vec::new();
        if params.repetition_penalty != 1.0 {
            repetition_ids.extend_from_slice(prompt_token_ids);
            repetition_ids.sort_unstable();
            repetition_ids.dedup();
        }
        Self {
            rng: StdRng::seed_from_u64(seed),
            params,
            min_tokens_masked_ids,
            repetition_ids,
            output_counts: HashMap::new(),
            num_generated_tokens: 0,
            grammar: None,
        }
    }

    /// This sequence's output must follow `grammar` (from its start).
    pub fn with_grammar(mut self, grammar: SeqGrammar) -> Self {
        self.grammar = Some(grammar);
        self
    }

    pub fn grammar(&self) -> Option<&SeqGrammar> {
        self.grammar.as_ref()
    }

    pub fn grammar_mut(&mut self) -> Option<&mut SeqGrammar> {
        self.grammar.as_mut()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn num_generated_tokens(&self) -> usize {
        self.num_generated_tokens
    }

    /// Samples the next token from this sequence's logits row `[vocab]` and records it.
    pub fn sample(&mut self, logits: &[f32]) -> SampleOutput {
        let masked = self.grammar.as_mut().map(|g| g.mask_row(logits));
        let logits = masked.as_deref().unwrap_or(logits);
        if let Some(pick) = self.plain_pick(logits.len()) {
            let (token_id, logprob) = pick_row(logits, &pick);
            self.accept(token_id);
            return SampleOutput { token_id, logprob, top_logprobs: Vec::new() };
        }
        let raw = RawStats::of(logits);
        let u = self.uniform();
        let token = if self.modifies_logits() {
            let mut row = logits.to_vec();
            self.apply_bias_mask_penalties(&mut row);
            self.choose(&row, None, u)
        } else if self.params.temperature == 0.0 {
            raw.argmax // greedy with top logprobs: one pass over the row, no copy
        } else {
            self.choose(logits, Some(&raw), u)
        };
        let top_logprobs = raw.top_logprobs(logits, self.params.top_logprobs);
        self.record(token as u32);
        SampleOutput { token_id: token as u32, logprob: raw.logprob(logits[token]), top_logprobs }
    }

    /// This step's [`Pick`] when the row needs nothing but its raw logits: no bias, mask or
    /// penalty, no top-k or top-p, no top logprobs. Then it can be sampled where the logits are
    /// (`device::sample_rows`, on the GPU that computed them) and only the token and its
    /// logprob need to reach the host. Draws the step's uniform, as [`Self::sample`] would; the
    /// caller passes the token to [`Self::accept`].
    pub fn plain_pick(&mut self, vocab_size: usize) -> Option<Pick> {
        let p = &self.params;
        let plain = !self.modifies_logits()
            && self.grammar.is_none()
            && p.top_logprobs == 0
            && p.top_k.is_none_or(|k| k >= vocab_size)
            && p.top_p >= 1.0;
        if !plain {
            return None;
        }
        let (inv_temperature, min_p) =
            if p.temperature == 0.0 { (0.0, 0.0) } else { (1.0 / p.temperature, p.min_p) };
        let u = self.uniform().unwrap_or(0.0);
        Some(Pick { inv_temperature, min_p, u })
    }

    /// Records a token chosen from this sequence's [`Self::plain_pick`].
    pub fn accept(&mut self, token: u32) {
        self.record(token);
    }

    /// The step's uniform draw in [0, 1), one per step at any temperature above 0 (whether or
    /// not the row turns out to be drawable), none when greedy: a seed gives one sequence of
    /// tokens whichever path samples a row.
    fn uniform(&mut self) -> Option<f64> {
        (self.params.temperature != 0.0).then(|| self.rng.random::<f64>())
    }

    fn record(&mut self, token: u32) {
        self.num_generated_tokens += 1;
        if let Some(g) = &mut self.grammar {
            g.commit(token);
        }
        if self.params.repetition_penalty != 1.0 {
            if let Err(at) = self.repetition_ids.binary_search(&token) {
                self.repetition_ids.insert(at, token);
            }
        }
        if self.params.frequency_penalty != 0.0 || self.params.presence_penalty != 0.0 {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Whether any step before the temperature changes this step's logits.
    fn modifies_logits(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || (self.num_generated_tokens < p.min_tokens && !self.min_tokens_masked_ids.is_empty())
            || p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
    }

    /// logit_bias → min_tokens mask → repetition → frequency and presence, on `row` `[vocab]`.
    fn apply_bias_mask_penalties(&self, row: &mut [f32]) {
        let p = &self.params;
        for (&id, &bias) in &p.logit_bias {
            if let Some(l) = row.get_mut(id as usize) {
                *l += bias;
            }
        }
        if self.num_generated_tokens < p.min_tokens {
            for &id in &self.min_tokens_masked_ids {
                if let Some(l) = row.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for &id in &self.repetition_ids {
            if let Some(l) = row.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
        for (&id, &count) in &self.output_counts {
            if let Some(l) = row.get_mut(id as usize) {
                *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    /// Greedy or a draw, from the (possibly penalized) row; `raw`: the row's own stats, when
    /// it is the raw row (their weights serve a draw at temperature 1); `u`: the step's uniform.
    fn choose(&self, row: &[f32], raw: Option<&RawStats>, u: Option<f64>) -> usize {
        match u {
            Some(u) => self.draw(row, raw, u),
            None => argmax(row),
        }
    }

    /// temperature → top_k → top_p → min_p → the draw `u` (inverse CDF over the kept tokens).
    fn draw(&self, row: &[f32], raw: Option<&RawStats>, u: f64) -> usize {
        let p = &self.params;
        let top_k = p.top_k.filter(|&k| k < row.len());
        if top_k.is_none() && p.top_p >= 1.0 {
            return draw_all(row, raw, 1.0 / p.temperature, p.min_p, u);
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_temperature = 1.0 / p.temperature;
        if !drawable(max, inv_temperature) {
            return argmax(row);
        }
        let weight =
            |id: usize| f64::from(crate::ops::math::exp_nonpositive((row[id] - max) * inv_temperature));
        let min_weight = f64::from(p.min_p);

        let mut ids: Vec<u32> =
            (0..row.len() as u32).filter(|&id| row[id as usize] > f32::NEG_INFINITY).collect();
        if let Some(k) = top_k.filter(|&k| k < ids.len()) {
            ids.select_nth_unstable_by(k - 1, by_logit_desc(row));
            ids.truncate(k);
        }
        if p.top_p < 1.0 {
            let total: f64 = ids.iter().map(|&id| weight(id as usize)).sum();
            let keep = nucleus_len(&mut ids, row, weight, f64::from(p.top_p) * total);
            ids.truncate(keep);
        }
        if p.min_p > 0.0 {
            ids.retain(|&id| weight(id as usize) >= min_weight);
        }
        let total: f64 = ids.iter().map(|&id| weight(id as usize)).sum();
        let mut u = u * total;
        for &id in &ids {
            let w = weight(id as usize);
            if u < w {
                return id as usize;
            }
            u -= w;
        }
        *ids.last().expect("invariant: top_k >= 1, top_p and min_p keep the most likely token") as usize
    }
}

/// Descending logit, then ascending id: a total order, so the unstable sorts and selections
/// below give one answer for one row.
fn by_logit_desc(row: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + Copy + '_ {
    move |&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
}

/// The nucleus: orders the head of `ids` by descending logit just far enough to find the
/// smallest prefix whose weight reaches `target`, and returns its length (at least 1 when `ids`
/// is not empty). The nucleus is usually a small part of the vocabulary, so blocks of growing
/// size are selected (`select_nth_unstable`, linear) and sorted, instead of sorting everything.
fn nucleus_len(ids: &mut [u32], row: &[f32], weight: impl Fn(usize) -> f64, target: f64) -> usize {
    let order = by_logit_desc(row);
    let mut cumulative = 0.0;
    let mut sorted = 0;
    let mut block = 64;
    while sorted < ids.len() {
        let end = (sorted + block).min(ids.len());
        let rest = &mut ids[sorted..];
        if end - sorted < rest.len() {
            rest.select_nth_unstable_by(end - sorted - 1, order);
        }
        rest[..end - sorted].sort_unstable_by(order);
        for (i, &id) in ids.iter().enumerate().take(end).skip(sorted) {
            cumulative += weight(id as usize);
            if cumulative >= target {
                return i + 1;
            }
        }
        sorted = end;
        block *= 4;
    }
    ids.len()
}

/// The raw row's argmax and log-sum-exp (a pass for the maximum, then vectorized block sums
/// of the weights, which a draw at temperature 1 reuses).
struct RawStats {
    argmax: usize,
    max: f32,
    /// `ln(sum(exp(logit - max)))`, summed in f64.
    ln_sum: f64,
    /// The weights behind `ln_sum`, by block: a draw at temperature 1 reuses them. `None` when
    /// the row holds NaN.
    sums: Option<BlockSums>,
}

impl RawStats {
    /// Two passes: the maximum, then the sum of `exp(logit - max)` with the exponentials in
    /// f32 and the sum in f64, vectorized (`softmax`).
    fn of(row: &[f32]) -> Self {
        let (mut argmax, mut max) = (0, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > max {
                max = v;
                argmax = i;
            }
        }
        if row.iter().any(|v| v.is_nan()) {
            return Self { argmax, max, ln_sum: f64::NAN, sums: None }; // NaN logits poison the sum
        }
        let sums = BlockSums::of(row, max, 1.0, 0.0);
        Self { argmax, max, ln_sum: sums.total.ln(), sums: Some(sums) }
    }

    fn logprob(&self, logit: f32) -> f32 {
        (f64::from(logit - self.max) - self.ln_sum) as f32
    }

    /// The `n` most likely tokens of `row` (the row these stats are of) with their logprobs.
    fn top_logprobs(&self, row: &[f32], n: usize) -> Vec<(u32, f32)> {
        top_n(row, n).into_iter().map(|id| (id, self.logprob(row[id as usize]))).collect()
    }
}

/// The `n` largest logits' ids, largest first (ties: lower id first), in one pass; for the
/// few (at most 20) top logprobs this beats selecting over a vocab-sized index array.
fn top_n(row: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(row.len());
    let mut best: Vec<u32> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (id, &v) in row.iter().enumerate() {
        if best.len() == n && v.partial_cmp(&row[best[n - 1] as usize]) != Some(Ordering::Greater) {
            continue;
        }
        // After equal values: they have lower ids.
        let at = best.partition_point(|&b| row[b as usize] >= v);
        best.insert(at, id as u32);
        best.truncate(n);
    }
    best
}

/// `token`'s log-probability under the raw `row` and the `top` most likely tokens with
/// theirs (most likely first): what a prompt position is scored with.
pub fn score_token(row: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let raw = RawStats::of(row);
    (raw.logprob(row[token as usize]), raw.top_logprobs(row, top))
}

/// How a plain row is sampled (see [`SequenceSampler::plain_pick`]): everything the row's
/// device needs besides the logits, so a GPU can sample it and send back 8 bytes instead of a
/// vocabulary's worth of f32. [`pick_row`] is the reference every device follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// `1 / temperature`; 0 when greedy.
    pub inv_temperature: f32,
    /// Tokens weighing less than `min_p` times the most likely one are left out (0: none).
    pub min_p: f32,
    /// The sequence's uniform draw in [0, 1) for this step (0 when greedy).
    pub u: f64,
}

/// A plain row's token and its raw logprob, as [`Pick`] says: the first maximum when greedy,
/// else a draw over the whole row (`draw_all`) with the pick's uniform.
pub fn pick_row(row: &[f32], pick: &Pick) -> (u32, f32) {
    let raw = RawStats::of(row);
    let token = if pick.inv_temperature == 0.0 {
        raw.argmax
    } else {
        draw_all(row, Some(&raw), pick.inv_temperature, pick.min_p, pick.u)
    };
    (token as u32, raw.logprob(row[token]))
}

/// Whether a row whose maximum is `max` can be drawn from at `inv_temperature`: something is
/// above -inf, and every weight is finite (a temperature whose reciprocal overflows, or an
/// infinite logit, leaves only the top token, whose weight would be NaN: greedy instead).
fn drawable(max: f32, inv_temperature: f32) -> bool {
    max.is_finite() && inv_temperature.is_finite()
}

/// A draw from every token of `row` weighted `exp((logit - max) * inv_temperature)`, leaving
/// out those under `min_p` (the most likely token weighs exactly 1, so min_p's threshold,
/// relative to it, is `min_p` itself): the token where the running sum of weights first passes
/// `u` times their total. The exponentials are f32, the sums f64, in blocks (`softmax`).
///
/// Greedy instead when there is nothing to draw from (every logit -inf or NaN), or when the
/// weights are not finite: a temperature so small its reciprocal overflows, or an infinite
/// logit (every weight but the top one's is 0, and the top one's NaN).
fn draw_all(row: &[f32], raw: Option<&RawStats>, inv_temperature: f32, min_p: f32, u: f64) -> usize {
    let max = match raw {
        Some(r) => r.max,
        None => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    };
    if !drawable(max, inv_temperature) {
        return argmax(row);
    }
    let reuse = raw.and_then(|r| r.sums.as_ref()).filter(|s| s.matches(max, inv_temperature, min_p));
    let owned;
    let sums = match reuse {
        Some(sums) => sums,
        None => {
            owned = BlockSums::of(row, max, inv_temperature, min_p);
            &owned
        }
    };
    // Rounding may leave a sliver of the total past the last weight: the last kept token.
    sums.draw(row, u * sums.total).or_else(|| sums.last_kept(row)).unwrap_or(0)
}

/// Index of the largest logit; the first one on ties (as torch.argmax); NaN is never chosen
/// (0 when no logit is above -inf).
pub fn argmax(logits: &[f32]) -> usize {
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > max {
            (best, max) = (i, v);
        }
    }
    best
}

/// `log_softmax(logits)[index]`, with the sum in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(logits[index] - max) - sum.ln()) as f32
}

#[cfg(test)]
mod tests;
