//! What a step costs in wall time, learned from the steps this engine ran, so prompt chunks can
//! be sized to a time target (`--max-itl-ms`) on any device without tuning a token count.
//!
//! A step's time is modelled as `fixed + per_prompt_token · prompt tokens + per_decode ·
//! decodes`: on a CPU the fixed part is reading every weight once, on a GPU the launches; a
//! decode costs more than a prompt token (it samples: the LM head and the sampler run for its
//! row, and its attention reads a whole context). The three are fitted by least squares over
//! recent steps, each older step weighing [`DECAY`] times the next, so the fit follows a
//! machine that gets busier or contexts that grow. Where the steps cannot tell the parts apart
//! (only decodes so far, or steps all alike), simpler fits stand in: one rate for every token,
//! then the whole time charged per token, which over-estimates a token's cost, so chunks come
//! out smaller, never larger, than the target allows.

/// Weight of the previous steps against the newest (~50 steps remembered).
const DECAY: f64 = 0.98;
/// Steps (by weight) before the model answers at all.
const MIN_WEIGHT: f64 = 3.0;
/// Prompt tokens a step keeps at the least, so prompts always progress.
pub const MIN_PREFILL_CHUNK: usize = 16;

/// A step's predicted seconds: `fixed + per_prompt_token · p + per_decode · d`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub fixed: f64,
    pub per_prompt_token: f64,
    pub per_decode: f64,
}

#[derive(Debug, Clone, Default)]
pub struct StepCost {
    /// Decayed sums over steps of `v_i · v_j` for `v = (1, prompt tokens, decodes)`.
    xx: [[f64; 3]; 3],
    /// Decayed sums of `v_i · seconds`.
    xy: [f64; 3],
    /// Decayed sum of seconds.
    y: f64,
}

impl StepCost {
    /// One step ran `prompt_tokens` prompt tokens and `decodes` decodes in `seconds`.
    pub fn observe(&mut self, prompt_tokens: usize, decodes: usize, seconds: f64) {
        if prompt_tokens + decodes == 0 || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let v = [1.0, prompt_tokens as f64, decodes as f64];
        for i in 0..3 {
            for j in 0..3 {
                self.xx[i][j] = self.xx[i][j] * DECAY + v[i] * v[j];
            }
            self.xy[i] = self.xy[i] * DECAY + v[i] * seconds;
        }
        self.y = self.y * DECAY + seconds;
    }

    /// The step model, once enough steps were seen.
    pub fn estimate(&self) -> Option<Estimate> {
        let w = self.xx[0][0];
        if w < MIN_WEIGHT {
            return None;
        }
        if let Some([fixed, per_prompt_token, per_decode]) = solve3(self.xx, self.xy) {
            if fixed >= 0.0 && per_prompt_token > 0.0 && per_decode > 0.0 {
                return Some(Estimate { fixed, per_prompt_token, per_decode });
            }
        }
        // One rate for every token: sums over t = p + d.
        let x = self.xx[0][1] + self.xx[0][2];
        let xx = self.xx[1][1] + 2.0 * self.xx[1][2] + self.xx[2][2];
        let xy = self.xy[1] + self.xy[2];
        let spread = w * xx - x * x;
        if spread > 1e-4 * w * xx {
            let per_token = (w * xy - x * self.y) / spread;
            let fixed = (self.y - per_token * x) / w;
            if per_token > 0.0 && fixed >= 0.0 {
                return Some(Estimate { fixed, per_prompt_token: per_token, per_decode: per_token });
            }
        }
        let per_token = self.y / x;
        (per_token > 0.0).then_some(Estimate {
            fixed: 0.0,
            per_prompt_token: per_token,
            per_decode: per_token,
        })
    }

    /// Prompt tokens a step may take beside `decode_rows` decodes to end within `target`
    /// seconds; or as long as the decodes take, when that is more (then the step runs over:
    /// prompts keep at least half of every step, so a burst of requests is not starved of
    /// first tokens by the streams it started). At least [`MIN_PREFILL_CHUNK`]; `None` until
    /// the model has seen enough steps.
    pub fn prefill_cap(&self, target: f64, decode_rows: usize) -> Option<usize> {
        let e = self.estimate()?;
        let decodes = e.fixed + e.per_decode * decode_rows as f64;
        let room = (target - decodes).max(decodes);
        let tokens = (room / e.per_prompt_token).floor();
        Some(if tokens.is_finite() { (tokens as usize).max(MIN_PREFILL_CHUNK) } else { usize::MAX })
    }
}

/// `a · x = b` by Gaussian elimination with partial pivoting; `None` when `a` is (nearly)
/// singular: the steps seen so far cannot separate the three parts.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    let scale = a.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= 1e-9 * scale {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (done, below) = a.split_at_mut(col + 1);
        let pivot_row = done[col];
        for (r, row) in below.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
            b[col + 1 + r] -= f * b[col];
        }
    }
    let mut x = [0f64; 3];
    for row in (0..3).rev() {
        let rest: f64 = (row + 1..3).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(got: f64, want: f64, what: &str) {
        assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{what}: {got} vs {want}");
    }

    #[test]
    fn the_fit_separates_fixed_prompt_and_decode_costs() {
        let mut cost = StepCost::default();
        assert_eq!(cost.estimate(), None);
        // 20 ms fixed, 1 ms a prompt token, 3 ms a decode.
        for (p, d) in [(0, 1), (200, 0), (16, 4), (64, 8), (0, 16), (128, 2), (300, 10), (5, 5)] {
            cost.observe(p, d, 0.02 + 0.001 * p as f64 + 0.003 * d as f64);
        }
        let e = cost.estimate().expect("eight steps");
        near(e.fixed, 0.02, "fixed");
        near(e.per_prompt_token, 0.001, "per prompt token");
        near(e.per_decode, 0.003, "per decode");
        // (Within one token: the fit is not exact to the last bit.)
        let cap = |target, decodes| cost.prefill_cap(target, decodes).expect("fitted");
        // 0.25 s target, 10 decodes (0.05 s): 200 prompt tokens fit.
        assert!(cap(0.25, 10).abs_diff(200) <= 1, "{}", cap(0.25, 10));
        // 50 decodes (0.17 s) leave 0.08 s: prompts get as long as the decodes instead.
        assert!(cap(0.25, 50).abs_diff(170) <= 1, "{}", cap(0.25, 50));
        // A target under the fixed part: prompts get as long as it (20 ms).
        assert!(cap(0.001, 0).abs_diff(20) <= 1, "{}", cap(0.001, 0));
    }

    #[test]
    fn decodes_alone_give_one_rate_and_steps_all_alike_the_whole_time_per_token() {
        // Only decodes, of varying counts: no prompt rate to read, one rate for all tokens.
        let mut cost = StepCost::default();
        for d in [1, 4, 9, 16, 2] {
            cost.observe(0, d, 0.01 + 0.002 * d as f64);
        }
        let e = cost.estimate().expect("five steps");
        near(e.fixed, 0.01, "fixed");
        near(e.per_prompt_token, 0.002, "per token");
        near(e.per_decode, 0.002, "per token");
        // One step size throughout: the whole time per token.
        let mut cost = StepCost::default();
        for _ in 0..5 {
            cost.observe(100, 0, 0.2);
        }
        let e = cost.estimate().expect("five steps");
        assert_eq!(e.fixed, 0.0);
        near(e.per_prompt_token, 0.002, "per token");
        // Half a token's worth of time: the smallest chunk still runs.
        assert_eq!(cost.prefill_cap(0.001, 0), Some(MIN_PREFILL_CHUNK));
    }

    #[test]
    fn recent_steps_outweigh_old_ones() {
        let mut cost = StepCost::default();
        for rate in [0.001, 0.004] {
            for i in 0..200 {
                let (p, d) = (i % 100, 1 + i % 7);
                cost.observe(p, d, rate * (p + d) as f64);
            }
        }
        let e = cost.estimate().expect("fitted");
        assert!((e.per_prompt_token - 0.004).abs() < 2e-4, "{e:?}");
    }

    #[test]
    fn empty_or_broken_steps_are_ignored() {
        let mut cost = StepCost::default();
        cost.observe(0, 0, 1.0);
        cost.observe(10, 0, f64::NAN);
        cost.observe(10, 1, -1.0);
        assert_eq!(cost.estimate(), None);
    }

    #[test]
    fn the_solver_matches_a_known_system_and_refuses_a_singular_one() {
        let x =
            solve3([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]], [3.0, 9.5, 14.0]).expect("regular");
        for (got, want) in x.iter().zip([0.5, 2.0, 3.0]) {
            near(*got, want, "x");
        }
        assert_eq!(solve3([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]], [1.0, 2.0, 3.0]), None);
    }
}
