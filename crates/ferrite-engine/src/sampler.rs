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

mod params;
mod softmax;

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

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
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn num_generated_tokens(&self) -> usize {
        self.num_generated_tokens
    }

    /// Samples the next token from this sequence's logits row `[vocab]` and records it.
    pub fn sample(&mut self, logits: &[f32]) -> SampleOutput {
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
    /// (`ops::sample::sample_rows`, on the GPU that computed them) and only the token and its
    /// logprob need to reach the host. Draws the step's uniform, as [`Self::sample`] would; the
    /// caller passes the token to [`Self::accept`].
    pub fn plain_pick(&mut self, vocab_size: usize) -> Option<Pick> {
        let p = &self.params;
        let plain = !self.modifies_logits()
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
/// else [`draw_all`] with the pick's uniform.
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
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sampler(params: SamplingParams) -> SequenceSampler {
        SequenceSampler::new(params, &[], &[])
    }

    fn random(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, seed: Some(seed), ..Default::default() }
    }

    /// How often each token comes out in `draws` samples of the same row.
    fn histogram(s: &mut SequenceSampler, row: &[f32], draws: usize) -> Vec<usize> {
        let mut seen = vec![0; row.len()];
        for _ in 0..draws {
            seen[s.sample(row).token_id as usize] += 1;
        }
        seen
    }

    /// The row `apply_bias_mask_penalties` makes of `row`.
    fn processed(s: &SequenceSampler, row: &[f32]) -> Vec<f32> {
        let mut row = row.to_vec();
        s.apply_bias_mask_penalties(&mut row);
        row
    }

    /// A deterministic, irregular logits row in [-5, 5).
    fn test_row(salt: u64, vocab: usize) -> Vec<f32> {
        (0..vocab as u64).map(|i| ((i * 2_654_435_761 + salt * 40_503) % 1000) as f32 / 100.0 - 5.0).collect()
    }

    fn ln(x: f32) -> f32 {
        x.ln()
    }

    #[test]
    fn greedy_takes_the_first_maximum_with_its_raw_logprob() {
        let mut s = sampler(SamplingParams::default());
        let out = s.sample(&[0.0, 2.0, 2.0, -1.0]);
        assert_eq!(out.token_id, 1);
        // log(e^2 / (1 + 2e^2 + e^-1))
        let expected = (2f64 - (1.0 + 2.0 * 2f64.exp() + (-1f64).exp()).ln()) as f32;
        assert!((out.logprob - expected).abs() < 1e-6);
        assert!(out.top_logprobs.is_empty());
    }

    #[test]
    fn argmax_never_takes_a_nan_even_first() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        // A row that cannot be drawn from (an infinite logit) is greedy: the same rule.
        let row = [f32::NAN, 1.0, f32::INFINITY];
        let pick = Pick { inv_temperature: 1.0, min_p: 0.0, u: 0.3 };
        assert_eq!(pick_row(&row, &pick).0, 2);
        let mut s = sampler(SamplingParams { presence_penalty: 0.1, ..random(1.0, 3) });
        assert_eq!(s.sample(&row).token_id, 2, "the host path too");
    }

    #[test]
    fn one_pass_stats_match_the_two_pass_log_softmax() {
        let increasing: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect(); // rescales every step
        let rows = [
            vec![f32::NEG_INFINITY, 3.0, -2.5, 3.0, 100.0, f32::NEG_INFINITY, 7.25],
            increasing,
            test_row(3, 500),
        ];
        for row in rows {
            let stats = RawStats::of(&row);
            assert_eq!(stats.argmax, argmax(&row));
            for (i, &l) in row.iter().enumerate() {
                let (got, want) = (stats.logprob(l), log_softmax_at(&row, i));
                assert!(got == want || (got - want).abs() < 1e-6, "token {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let params = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut s = SequenceSampler::new(params.clone(), &[0, 1, 1], &[]);
        let row = [2.0, -1.0, 0.5, 3.0];
        assert_eq!(processed(&s, &row), [1.0, -2.0, 0.5, 3.0]);
        // Output tokens count too.
        s.record(3);
        assert_eq!(processed(&s, &row), [1.0, -2.0, 0.5, 1.5]);
        // Enough to change the greedy choice: 2.0 / 2 < 1.5.
        assert_eq!(SequenceSampler::new(params, &[0], &[]).sample(&[2.0, 1.5]).token_id, 1);
        assert_eq!(
            SequenceSampler::new(SamplingParams::default(), &[0], &[]).sample(&[2.0, 1.5]).token_id,
            0
        );
    }

    #[test]
    fn frequency_and_presence_penalties_count_output_tokens_only() {
        let params = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..Default::default() };
        let mut s = SequenceSampler::new(params, &[2], &[]);
        let row = [0.0; 4];
        assert_eq!(processed(&s, &row), [0.0; 4], "nothing generated yet; prompt token 2 is not penalized");
        for t in [3, 3, 1] {
            s.record(t);
        }
        // token 1: 1 * 0.5 + 0.25; token 3: 2 * 0.5 + 0.25.
        assert_eq!(processed(&s, &row), [0.0, -0.75, 0.0, -1.25]);
        assert_eq!(s.num_generated_tokens(), 3);
    }

    #[test]
    fn logit_bias_is_added_first_and_can_force_or_ban_a_token() {
        let raw = [5.0, 0.0, 0.0];
        let params = SamplingParams { logit_bias: BTreeMap::from([(2, 10.0)]), ..Default::default() };
        let mut s = sampler(params);
        assert_eq!(processed(&s, &raw), [5.0, 0.0, 10.0]);
        let out = s.sample(&raw);
        assert_eq!(out.token_id, 2);
        assert_eq!(out.logprob, log_softmax_at(&raw, 2), "the logprob is of the raw logits");

        let banned = SamplingParams { logit_bias: BTreeMap::from([(0, -100.0)]), ..random(1.0, 5) };
        let seen = histogram(&mut sampler(banned), &[1.0, 0.0], 500);
        assert_eq!(seen[0], 0, "{seen:?}");
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_token_ids_until_reached() {
        let row = [5.0, 4.0, 3.0, 0.0];
        let eos = [0];
        let params = SamplingParams { min_tokens: 2, stop_token_ids: vec![1], ..Default::default() };
        let mut s = SequenceSampler::new(params.clone(), &[], &eos);
        let tokens: Vec<u32> = (0..3).map(|_| s.sample(&row).token_id).collect();
        assert_eq!(tokens, [2, 2, 0]);

        let mut s = SequenceSampler::new(params.clone(), &[], &eos);
        let first = s.sample(&row);
        assert_eq!(first.logprob, log_softmax_at(&row, 2), "the logprob is of the raw logits");

        // ignore_eos: EOS is an ordinary token, so only the stop token is masked.
        let ignoring = SamplingParams { ignore_eos: true, ..params.clone() };
        assert_eq!(SequenceSampler::new(ignoring, &[], &eos).sample(&row).token_id, 0);
        // min_tokens 0 masks nothing.
        let none = SamplingParams { min_tokens: 0, ..params };
        assert_eq!(SequenceSampler::new(none, &[], &eos).sample(&row).token_id, 0);
    }

    #[test]
    fn temperature_sharpens_and_flattens_the_distribution() {
        // p(token 1) = 3^(1/T) / (1 + 3^(1/T)).
        let row = [0.0, ln(3.0)];
        for (t, expected) in [(1.0f32, 0.75), (0.5, 0.9), (2.0, 3f64.sqrt() / (1.0 + 3f64.sqrt()))] {
            let seen = histogram(&mut sampler(random(t, 42)), &row, 4000);
            let p1 = seen[1] as f64 / 4000.0;
            assert!((p1 - expected).abs() < 0.025, "T={t}: p(1) = {p1}, expected {expected}");
        }
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits = test_row(1, 50);
        let run = |p: SamplingParams| {
            let mut s = sampler(p);
            (0..20).map(|_| s.sample(&logits).token_id).collect::<Vec<_>>()
        };
        assert_eq!(run(random(1.0, 7)), run(random(1.0, 7)));
        assert_ne!(run(random(1.0, 7)), run(random(1.0, 8)));
        for seed in 0..5 {
            let k1 = run(SamplingParams { top_k: Some(1), ..random(1.5, seed) });
            assert!(k1.iter().all(|&t| t as usize == argmax(&logits)), "{k1:?}");
        }
    }

    #[test]
    fn a_temperature_whose_reciprocal_overflows_or_an_infinite_logit_is_greedy() {
        let logits = test_row(2, 50);
        let best = argmax(&logits) as u32;
        assert_ne!(best, 0, "the test needs a row whose best token is not the fallback 0");
        assert_eq!(sampler(random(1e-40, 1)).sample(&logits).token_id, best);
        let mut inf_row = logits.clone();
        inf_row[7] = f32::INFINITY;
        assert_eq!(sampler(random(1.0, 1)).sample(&inf_row).token_id, 7);
    }

    #[test]
    fn top_k_keeps_the_k_largest_with_ties_to_the_lower_id() {
        let row = [1.0, 3.0, 2.0, 0.5, 2.0];
        let seen = histogram(&mut sampler(SamplingParams { top_k: Some(2), ..random(1.0, 3) }), &row, 2000);
        assert!(seen[1] > 0 && seen[2] > 0, "{seen:?}");
        assert_eq!(seen[0] + seen[3] + seen[4], 0, "{seen:?}");
    }

    #[test]
    fn top_p_keeps_the_nucleus_of_the_top_k_renormalized() {
        let row = [ln(0.5), ln(0.3), ln(0.2)];
        let top_p = |top_p, top_k| {
            histogram(&mut sampler(SamplingParams { top_p, top_k, ..random(1.0, 9) }), &row, 4000)
        };
        // 0.5 < 0.6 <= 0.5 + 0.3: two tokens, renormalized to 0.625 / 0.375.
        let seen = top_p(0.6, None);
        assert_eq!(seen[2], 0, "{seen:?}");
        assert!((seen[0] as f64 / 4000.0 - 0.625).abs() < 0.025, "{seen:?}");
        assert_eq!(top_p(0.4, None), [4000, 0, 0]);
        // After top_k = 2 the first token alone has 0.625 >= 0.6.
        assert_eq!(top_p(0.6, Some(2)), [4000, 0, 0]);
        let seen = top_p(0.85, None);
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }

    #[test]
    fn the_nucleus_found_block_by_block_matches_a_full_sort() {
        let row = test_row(7, 3000);
        let weight = |id: usize| f64::from(row[id] - 5.0).exp();
        let mut reference: Vec<u32> = (0..row.len() as u32).collect();
        reference.sort_by(by_logit_desc(&row));
        let total: f64 = reference.iter().map(|&id| weight(id as usize)).sum();
        for top_p in [0.01, 0.3, 0.9, 0.999] {
            let target = top_p * total;
            let mut cumulative = 0.0;
            let want = 1 + reference
                .iter()
                .position(|&id| {
                    cumulative += weight(id as usize);
                    cumulative >= target
                })
                .unwrap();
            let mut ids: Vec<u32> = (0..row.len() as u32).rev().collect();
            let got = nucleus_len(&mut ids, &row, weight, target);
            assert_eq!(got, want, "top_p {top_p}");
            assert_eq!(ids[..got], reference[..want], "top_p {top_p}");
        }
        // The big ones need several blocks (64, 256, 1024, ...).
        assert!(nucleus_len(&mut (0..3000).collect::<Vec<u32>>(), &row, weight, 0.9 * total) > 400);
    }

    #[test]
    fn min_p_cuts_relative_to_the_most_likely_token() {
        // Relative to the first: 1, 0.5, 0.2, 0.05. min_p 0.3 keeps the first two.
        let row = [0.0, ln(0.5), ln(0.2), ln(0.05)];
        for top_p in [1.0, 0.999] {
            // top_p < 1 takes the sorted-list path, 1 the whole-row path: same cut.
            let params = SamplingParams { min_p: 0.3, top_p, ..random(1.0, 4) };
            let seen = histogram(&mut sampler(params), &row, 3000);
            assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
            assert_eq!(seen[2] + seen[3], 0, "top_p {top_p}: {seen:?}");
        }
        // Uniform over 100 tokens (each 0.01 < 0.5): all stay, as each is as likely as the top.
        let params = SamplingParams { min_p: 0.5, ..random(1.0, 4) };
        let seen = histogram(&mut sampler(params), &[0.0; 100], 2000);
        assert!(seen.iter().filter(|&&n| n > 0).count() > 90, "{seen:?}");
    }

    #[test]
    fn top_logprobs_are_the_raw_log_softmax_sorted_descending() {
        let row = [0.5, 2.0, -1.0, 2.0, 3.5, f32::NEG_INFINITY, 1.0];
        // Everything that changes the sampled distribution is on; the logprobs must not see it.
        let params = SamplingParams {
            top_logprobs: 4,
            logit_bias: BTreeMap::from([(2, 50.0)]),
            repetition_penalty: 1.7,
            presence_penalty: 1.0,
            ..random(0.8, 2)
        };
        let mut s = SequenceSampler::new(params, &[4], &[]);
        for _ in 0..3 {
            let out = s.sample(&row);
            let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
            assert_eq!(ids, [4, 1, 3, 6], "ties: the lower id first");
            for &(id, lp) in &out.top_logprobs {
                assert!((lp - log_softmax_at(&row, id as usize)).abs() < 1e-6, "token {id}");
            }
            assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
            assert_eq!(out.logprob, RawStats::of(&row).logprob(row[out.token_id as usize]));
        }
        let mut all = sampler(SamplingParams { top_logprobs: 20, ..Default::default() });
        assert_eq!(all.sample(&row).top_logprobs.len(), row.len(), "at most the vocabulary");
        assert!(sampler(SamplingParams::default()).sample(&row).top_logprobs.is_empty());
    }

    #[test]
    fn seeded_sequences_sample_the_same_alone_and_in_any_batch() {
        let vocab = 300;
        let prompt = [1, 2, 3, 250];
        let params = [
            SamplingParams { top_p: 0.9, repetition_penalty: 1.3, top_logprobs: 2, ..random(1.0, 11) },
            SamplingParams { top_k: Some(5), frequency_penalty: 0.5, ..random(0.7, 12) },
            SamplingParams { min_p: 0.05, logit_bias: BTreeMap::from([(7, 2.0)]), ..random(1.2, 13) },
            SamplingParams { presence_penalty: 1.5, ..random(2.0, 14) },
        ];
        let new = |p: &SamplingParams| SequenceSampler::new(p.clone(), &prompt, &[0]);
        let steps = 12;
        let row_of = |seq: usize, step: usize| test_row((seq * 100 + step) as u64, vocab);

        // Alone, one at a time.
        let alone: Vec<Vec<SampleOutput>> = params
            .iter()
            .enumerate()
            .map(|(seq, p)| {
                let mut s = new(p);
                (0..steps)
                    .map(|step| sample_batch(&row_of(seq, step), vocab, &mut [&mut s]).remove(0))
                    .collect()
            })
            .collect();

        // Together in two orders, the second with an unseeded stranger in the middle.
        for order in
            [vec![Some(0), Some(1), Some(2), Some(3)], vec![Some(3), None, Some(1), Some(0), Some(2)]]
        {
            let mut samplers: Vec<SequenceSampler> = order
                .iter()
                .map(|&seq| match seq {
                    Some(seq) => new(&params[seq]),
                    None => sampler(SamplingParams { temperature: 1.0, ..Default::default() }),
                })
                .collect();
            let mut together: Vec<Vec<SampleOutput>> = vec![Vec::new(); params.len()];
            for step in 0..steps {
                let logits: Vec<f32> =
                    order.iter().flat_map(|&seq| row_of(seq.unwrap_or(99), step)).collect();
                let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
                let outs = sample_batch(&logits, vocab, &mut refs);
                assert_eq!(outs.len(), order.len());
                for (&seq, out) in order.iter().zip(outs) {
                    if let Some(seq) = seq {
                        together[seq].push(out);
                    }
                }
            }
            assert_eq!(together, alone, "order {order:?}");
        }
        // And the sequences really sample: not all greedy.
        let greedy: Vec<u32> = (0..steps).map(|step| argmax(&row_of(0, step)) as u32).collect();
        assert_ne!(alone[0].iter().map(|o| o.token_id).collect::<Vec<_>>(), greedy);
    }

    /// `pick_row` against a naive f64 reference with libm's exp: greedy is the first maximum,
    /// a draw is the first token whose cumulative weight passes `u` × total (or, when `u` sits
    /// on a boundary within rounding, its neighbour), and the logprob is the raw log-softmax.
    #[test]
    fn pick_row_matches_a_naive_inverse_cdf_and_log_softmax() {
        let mut rng = StdRng::seed_from_u64(5);
        for case in 0..300 {
            let vocab = [1, 2, 63, 64, 65, 1000, 50_000][case % 7];
            let mut row: Vec<f32> = (0..vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
            if vocab > 2 && case % 5 == 0 {
                row[rng.random_range(0..vocab)] = f32::NEG_INFINITY;
            }
            if vocab > 2 && case % 11 == 0 {
                let at = rng.random_range(1..vocab);
                row[at] = row[at - 1]; // ties
            }
            let (inv_t, min_p) = match case % 4 {
                0 => (0.0, 0.0),
                1 => (1.0, 0.0),
                2 => (1.0 / rng.random_range(0.2f32..2.0), 0.0),
                _ => (1.0 / rng.random_range(0.2f32..2.0), rng.random_range(0.0f32..0.5)),
            };
            let u = rng.random::<f64>();
            let (token, logprob) = pick_row(&row, &Pick { inv_temperature: inv_t, min_p, u });
            let t = token as usize;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln();
            let want_logprob = f64::from(row[t] - max) - lse;
            assert!((f64::from(logprob) - want_logprob).abs() < 1e-5, "case {case}: logprob");
            if inv_t == 0.0 {
                assert_eq!(t, row.iter().position(|&v| v == max).unwrap(), "case {case}: first maximum");
                continue;
            }
            let w: Vec<f64> = row
                .iter()
                .map(|&v| {
                    let w = (f64::from(v - max) * f64::from(inv_t)).exp();
                    if w >= f64::from(min_p) {
                        w
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let before: f64 = w[..t].iter().sum();
            let target = u * total;
            let slack = 1e-5 * total;
            assert!(w[t] > 0.0, "case {case}: drew a token of weight 0");
            assert!(
                before - slack <= target && target < before + w[t] + slack,
                "case {case}: token {t} covers [{before}, {}), target {target}",
                before + w[t]
            );
        }
    }

    #[test]
    fn a_plain_pick_draws_the_same_uniform_as_sample_and_accepting_records_the_token() {
        let row = test_row(3, 500);
        let params = random(0.8, 42);
        let (mut a, mut b) = (sampler(params.clone()), sampler(params));
        for _ in 0..20 {
            let pick = a.plain_pick(row.len()).expect("no penalties, top-k, top-p or logprobs");
            let (token, logprob) = pick_row(&row, &pick);
            a.accept(token);
            let out = b.sample(&row);
            assert_eq!((token, logprob), (out.token_id, out.logprob));
        }
        assert_eq!(a.num_generated_tokens(), 20);
        // Rows that need the host have no pick, and draw nothing.
        for p in [
            SamplingParams { top_p: 0.9, ..random(1.0, 1) },
            SamplingParams { top_k: Some(10), ..random(1.0, 1) },
            SamplingParams { top_logprobs: 1, ..random(1.0, 1) },
            SamplingParams { presence_penalty: 0.5, ..random(1.0, 1) },
        ] {
            assert!(sampler(p.clone()).plain_pick(row.len()).is_none(), "{p:?}");
        }
        // top_k at or above the vocabulary keeps everything: still plain.
        assert!(sampler(SamplingParams { top_k: Some(500), ..random(1.0, 1) }).plain_pick(500).is_some());
    }

    #[test]
    #[should_panic(expected = "logits must be [num_seqs (2) * vocab_size (3)]")]
    fn a_batch_whose_logits_do_not_match_panics() {
        let (mut a, mut b) = (sampler(SamplingParams::default()), sampler(SamplingParams::default()));
        sample_batch(&[0.0; 5], 3, &mut [&mut a, &mut b]);
    }
}
