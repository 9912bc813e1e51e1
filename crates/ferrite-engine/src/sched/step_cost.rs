//! What a step costs in wall time, learned from the steps this engine ran, so prompt chunks can
//! be sized to a time target (`--max-itl-ms`) on any device without tuning a token count.
//!
//! A step's time is modelled as `fixed + per_token · tokens`: on a CPU the fixed part is
//! reading every weight once (a batch-1 decode), on a GPU the launches. The two are fitted by
//! least squares over recent steps, each older step weighing [`DECAY`] times the next, so the
//! fit follows a machine that gets busier or a context that grows. A fit whose steps were all
//! of one size cannot tell the parts apart; then the whole time is charged per token (an
//! over-estimate of a token's cost, so chunks come out smaller, never larger, than the target
//! allows).

/// Weight of the previous steps against the newest (~50 steps remembered).
const DECAY: f64 = 0.98;
/// Steps (by weight) before the model answers at all.
const MIN_WEIGHT: f64 = 3.0;
/// Prompt tokens a step keeps at the least, so prompts always progress.
pub const MIN_PREFILL_CHUNK: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct StepCost {
    /// Decayed sums of 1, tokens, seconds, tokens², tokens · seconds.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl StepCost {
    /// One step ran `tokens` tokens in `seconds`.
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if tokens == 0 || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let x = tokens as f64;
        for sum in [&mut self.w, &mut self.x, &mut self.y, &mut self.xx, &mut self.xy] {
            *sum *= DECAY;
        }
        self.w += 1.0;
        self.x += x;
        self.y += seconds;
        self.xx += x * x;
        self.xy += x * seconds;
    }

    /// `(fixed seconds, seconds per token)`, once enough steps were seen.
    pub fn estimate(&self) -> Option<(f64, f64)> {
        if self.w < MIN_WEIGHT || self.x <= 0.0 {
            return None;
        }
        let proportional = (0.0, self.y / self.x);
        let spread = self.w * self.xx - self.x * self.x;
        // Token counts that barely varied: no slope to read (relative spread under 1 %).
        if spread <= 1e-4 * self.w * self.xx {
            return Some(proportional);
        }
        let per_token = (self.w * self.xy - self.x * self.y) / spread;
        let fixed = (self.y - per_token * self.x) / self.w;
        if per_token > 0.0 && fixed >= 0.0 {
            Some((fixed, per_token))
        } else {
            Some(proportional)
        }
    }

    /// Prompt tokens a step may take beside `decode_rows` decodes to end within `target`
    /// seconds; or as long as the decodes take, when that is more (then the step runs over:
    /// prompts keep at least half of every step, so a burst of requests is not starved of
    /// first tokens by the streams it started). At least [`MIN_PREFILL_CHUNK`]; `None` until
    /// the model has seen enough steps.
    pub fn prefill_cap(&self, target: f64, decode_rows: usize) -> Option<usize> {
        let (fixed, per_token) = self.estimate()?;
        let decodes = fixed + per_token * decode_rows as f64;
        let room = (target - decodes).max(decodes);
        let tokens = (room / per_token).floor();
        Some(if tokens.is_finite() { (tokens as usize).max(MIN_PREFILL_CHUNK) } else { usize::MAX })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_fixed_part_and_a_per_token_part() {
        let mut cost = StepCost::default();
        assert_eq!(cost.estimate(), None);
        for tokens in [1, 200, 16, 64, 1, 128, 300, 5] {
            cost.observe(tokens, 0.02 + 0.001 * tokens as f64);
        }
        let (fixed, per_token) = cost.estimate().expect("eight steps");
        assert!((fixed - 0.02).abs() < 1e-9 && (per_token - 0.001).abs() < 1e-12, "{fixed} {per_token}");
        // 0.25 s target, 10 decodes (0.03 s): 220 prompt tokens fit.
        // (Within one token: the fit is not exact to the last bit.)
        let near = |cap: Option<usize>, want: usize| cap.is_some_and(|c| c.abs_diff(want) <= 1);
        assert!(near(cost.prefill_cap(0.25, 10), 220), "{:?}", cost.prefill_cap(0.25, 10));
        // 150 decodes (0.17 s) leave 0.08 s: prompts get as long as the decodes instead.
        assert!(near(cost.prefill_cap(0.25, 150), 170), "{:?}", cost.prefill_cap(0.25, 150));
        assert!(near(cost.prefill_cap(0.25, 300), 320), "{:?}", cost.prefill_cap(0.25, 300));
        // A target under the fixed part: prompts get as long as it (20 ms).
        assert!(near(cost.prefill_cap(0.001, 0), 20), "{:?}", cost.prefill_cap(0.001, 0));
    }

    #[test]
    fn steps_of_one_size_charge_the_whole_time_per_token() {
        let mut cost = StepCost::default();
        for _ in 0..5 {
            cost.observe(100, 0.2);
        }
        let (fixed, per_token) = cost.estimate().expect("five steps");
        assert_eq!(fixed, 0.0);
        assert!((per_token - 0.002).abs() < 1e-12, "{per_token}");
        // Half a token's worth of time: the smallest chunk still runs.
        assert_eq!(cost.prefill_cap(0.001, 0), Some(MIN_PREFILL_CHUNK));
    }

    #[test]
    fn recent_steps_outweigh_old_ones() {
        let mut cost = StepCost::default();
        for i in 0..200 {
            cost.observe(1 + i % 100, 0.001 * (1 + i % 100) as f64);
        }
        for i in 0..200 {
            cost.observe(1 + i % 100, 0.004 * (1 + i % 100) as f64);
        }
        let (_, per_token) = cost.estimate().expect("fitted");
        assert!((per_token - 0.004).abs() < 2e-4, "{per_token}");
    }

    #[test]
    fn empty_or_broken_steps_are_ignored() {
        let mut cost = StepCost::default();
        cost.observe(0, 1.0);
        cost.observe(10, f64::NAN);
        cost.observe(10, -1.0);
        assert_eq!(cost.estimate(), None);
    }
}
