//! What one request asks of the sampler, with vLLM's names and meanings, and the check that
//! names the field, the limit and the value when a request asks for something impossible.

use std::collections::BTreeMap;

use crate::request::RequestError;

/// Most `top_logprobs` a request may ask for by default (vLLM's default `max_logprobs`,
/// OpenAI's limit); the engine's `max_logprobs` sets the limit it checks.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Frequency and presence penalties lie in `[-MAX_ABS_PENALTY, MAX_ABS_PENALTY]` (OpenAI).
pub const MAX_ABS_PENALTY: f32 = 2.0;
/// `logit_bias` values lie in `[-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS]` (OpenAI).
pub const MAX_ABS_LOGIT_BIAS: f32 = 100.0;

/// How to pick one sequence's tokens. `Default` is greedy with every other knob off.
///
/// Applied in vLLM's order: `logit_bias` → `min_tokens` mask → `repetition_penalty` →
/// `frequency_penalty` / `presence_penalty` → argmax if `temperature == 0`, else divide by
/// `temperature` → `top_k` → `top_p` → `min_p` → draw.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy (argmax; `top_k`, `top_p` and `min_p` then change nothing).
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Over tokens of the prompt and of the output so far: positive logits are divided by it,
    /// negative ones multiplied (HF / vLLM; 1: off, > 1 discourages repeats).
    pub repetition_penalty: f32,
    /// Over output tokens only: `logit -= count * frequency_penalty` (OpenAI; 0: off).
    pub frequency_penalty: f32,
    /// Over output tokens only: `logit -= presence_penalty` once a token appeared (OpenAI).
    pub presence_penalty: f32,
    /// Token id → bias added to its logit before anything else.
    pub logit_bias: BTreeMap<u32, f32>,
    /// `None`: a random seed per request.
    pub seed: Option<u64>,
    /// How many of the most likely tokens to report with their logprobs each step (0: none).
    /// Like the chosen token's logprob, they come from the raw logits.
    pub top_logprobs: usize,
    /// Until this many tokens are generated, the stop tokens (EOS unless `ignore_eos`, and
    /// `stop_token_ids`) cannot be sampled.
    pub min_tokens: usize,
    /// Extra token ids that end the sequence (the caller stops on them; the sampler masks them
    /// under `min_tokens`).
    pub stop_token_ids: Vec<u32>,
    /// Generate through EOS: it neither stops the sequence nor is masked under `min_tokens`.
    pub ignore_eos: bool,
    /// Stop (finish reason length, stop reason [`crate::StopReason::Cost`]) before the
    /// request's running cost, its device seconds at the device's price, would pass this many
    /// dollars: a sample ends on the token after which another step like the last one would.
    pub max_cost_usd: Option<f64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: BTreeMap::new(),
            seed: None,
            top_logprobs: 0,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            max_cost_usd: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field against its range and every token id against `vocab_size`; the
    /// message names the field, the limit and the value given.
    pub fn validate(&self, vocab_size: usize) -> Result<(), RequestError> {
        let in_range = |x: f32, lo: f32, hi: f32| x >= lo && x <= hi; // false for NaN
        let bad = RequestError::out_of_range;
        if let Some(cap) = self.max_cost_usd.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(bad(
                "max_cost_usd",
                format!("max_cost_usd must be a positive number of dollars, got {cap}"),
            ));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad("temperature", format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(bad("top_k", "top_k must be >= 1 (omit it to disable), got 0".into()));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !in_range(self.min_p, 0.0, 1.0) {
            return Err(bad("min_p", format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            let message = format!("repetition_penalty must be > 0, got {}", self.repetition_penalty);
            return Err(bad("repetition_penalty", message));
        }
        for (name, value) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            if !in_range(value, -MAX_ABS_PENALTY, MAX_ABS_PENALTY) {
                let message =
                    format!("{name} must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], got {value}");
                return Err(bad(name, message));
            }
        }
        let unknown = |param, id| RequestError::UnknownToken { param, id, vocab_size };
        for (&id, &bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(unknown("logit_bias", id));
            }
            if !in_range(bias, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS) {
                let message = format!(
                    "logit_bias for token id {id} must be in [-{MAX_ABS_LOGIT_BIAS}, {MAX_ABS_LOGIT_BIAS}], got {bias}"
                );
                return Err(bad("logit_bias", message));
            }
        }
        if let Some(&id) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(unknown("stop_token_ids", id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(params: SamplingParams) -> String {
        params.validate(448).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_edges_are_valid() {
        assert_eq!(SamplingParams::default().validate(448), Ok(()));
        let edges = SamplingParams {
            temperature: 2.0,
            top_k: Some(1),
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 0.5,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            logit_bias: BTreeMap::from([(0, -100.0), (447, 100.0)]),
            top_logprobs: 20,
            stop_token_ids: vec![447],
            ..Default::default()
        };
        assert_eq!(edges.validate(448), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named_with_its_limit_and_value() {
        let d = SamplingParams::default;
        let cases = [
            (SamplingParams { temperature: -1.0, ..d() }, "temperature must be >= 0, got -1"),
            (SamplingParams { temperature: f32::NAN, ..d() }, "temperature must be >= 0, got NaN"),
            (SamplingParams { top_k: Some(0), ..d() }, "top_k must be >= 1 (omit it to disable), got 0"),
            (SamplingParams { top_p: 0.0, ..d() }, "top_p must be in (0, 1], got 0"),
            (SamplingParams { top_p: 1.5, ..d() }, "top_p must be in (0, 1], got 1.5"),
            (SamplingParams { min_p: 1.5, ..d() }, "min_p must be in [0, 1], got 1.5"),
            (SamplingParams { min_p: -0.1, ..d() }, "min_p must be in [0, 1], got -0.1"),
            (SamplingParams { repetition_penalty: 0.0, ..d() }, "repetition_penalty must be > 0, got 0"),
            (
                SamplingParams { frequency_penalty: 2.5, ..d() },
                "frequency_penalty must be in [-2, 2], got 2.5",
            ),
            (SamplingParams { presence_penalty: -3.0, ..d() }, "presence_penalty must be in [-2, 2], got -3"),
            (
                SamplingParams { logit_bias: BTreeMap::from([(3, 1.0), (99999, 1.0)]), ..d() },
                "logit_bias token id 99999 is outside the vocabulary (size 448)",
            ),
            (
                SamplingParams { logit_bias: BTreeMap::from([(448, 1.0)]), ..d() },
                "logit_bias token id 448 is outside the vocabulary (size 448)",
            ),
            (
                SamplingParams { logit_bias: BTreeMap::from([(7, 150.0)]), ..d() },
                "logit_bias for token id 7 must be in [-100, 100], got 150",
            ),
            (
                SamplingParams { stop_token_ids: vec![1, 500], ..d() },
                "stop_token_ids token id 500 is outside the vocabulary (size 448)",
            ),
        ];
        for (params, expected) in cases {
            assert_eq!(error_of(params), expected);
        }
    }
}
