//! Turning one sequence's logits into its next token: greedy, or temperature / top-k / top-p
//! sampling from a per-sequence seeded RNG, so a seeded request's tokens depend only on its own
//! seed and logits, never on what else shares the batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be >= 1 (omit it to disable)".into());
        }
        Ok(())
    }
}

/// A chosen token and its log-probability under the raw (unscaled, unfiltered) logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    pub logprob: f32,
}

/// One sequence's sampler state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self { rng: StdRng::seed_from_u64(seed), params }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token =
            if self.params.temperature == 0.0 { argmax(logits) } else { self.sample_filtered(logits) };
        Sampled { token_id: token as u32, logprob: log_softmax_at(logits, token) }
    }

    fn sample_filtered(&mut self, logits: &[f32]) -> usize {
        let t = self.params.temperature;
        // Candidates by descending logit (ties: lower id first, like a stable sort).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.params.top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0]] / t;
        let mut probs: Vec<f64> = order.iter().map(|&i| f64::from(logits[i] / t - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cum += p;
                    cum >= f64::from(self.params.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return order[i];
            }
            u -= p;
        }
        *order.last().expect("invariant: at least one candidate")
    }
}

/// Index of the largest logit; the first one on ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
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
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        let out = s.sample(&[0.0, 2.0, 2.0, -1.0]);
        assert_eq!(out.token_id, 1);
        // log(e^2 / (1 + 2e^2 + e^-1))
        let expected = (2f64 - (1.0 + 2.0 * 2f64.exp() + (-1f64).exp()).ln()) as f32;
        assert!((out.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 1.0, top_k: None, top_p: 1.0, seed: Some(7) };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits).token_id).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let different = run(&SamplingParams { seed: Some(8), ..params.clone() });
        assert_ne!(run(&params), different);
        let k1 = run(&SamplingParams { top_k: Some(1), ..params.clone() });
        assert!(k1.iter().all(|&t| t as usize == argmax(&logits)));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: 0.7, seed: Some(1) });
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits).token_id as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 300 && seen[0] > 1000, "{seen:?}");
    }

    #[test]
    fn invalid_params_are_named() {
        let bad = SamplingParams { top_p: 1.5, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams { temperature: -1.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("temperature"));
    }
}
